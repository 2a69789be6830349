"""The HTML report (html_report.py, charts.py, `graphprune report`): sections, numbers, escaping, the
--report round trip, and the page in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import escape
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from test_drop_layers import WIDTH, residual_stack

from graphprune import api
from graphprune.cli import main
from graphprune.html_report import load_report, render_html, report_paths
from graphprune.metrics import ModelStats
from graphprune.passes.prune_tokens import StageReport


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def small_cnn() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv 3->16 -> Relu -> Conv 16->16 -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    shapes = {"conv1.weight": (16, 3, 3, 3), "conv1.bias": (16,), "conv2.weight": (16, 16, 3, 3),
              "conv2.bias": (16,), "fc.weight": (10, 16), "fc.bias": (10,)}
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in shapes.items()]
    pads = [1, 1, 1, 1]
    nodes = [helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=pads),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=pads),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def optimized(tmp_path_factory) -> Path:
    """A real optimize run with --report: budget, sensitivity allocation, latency, fidelity."""
    tmp = tmp_path_factory.mktemp("optimize")
    onnx.save(small_cnn(), tmp / "cnn.onnx")
    np.savez(tmp / "calib.npz", x=np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32))
    result = invoke("optimize", tmp / "cnn.onnx", "-o", tmp / "pruned.onnx", "--target-flops", 0.4,
                    "--round-to", 1, "--allocation", "sensitivity", "--calib", tmp / "calib.npz",
                    "--samples", 1, "--report", tmp / "report.json")
    assert result.exit_code == 0, result.output
    return tmp / "report.json"


def section(page: str, sid: str) -> str:
    found = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.DOTALL)
    assert found, f"no section {sid}"
    return found.group(1)


BAR = re.compile(r'data-series="([^"]+)" data-value="[^"]+" x="[^"]+" y="[^"]+" width="([^"]+)"')


def bars(page: str, sid: str) -> list[dict[str, float]]:
    """Per bar-chart row of a section: {series: drawn width}."""
    return [{name: float(width) for name, width in BAR.findall(row)}
            for row in re.findall(r'<g class="row">(.*?)</g>', section(page, sid), re.DOTALL)]


def removed_share(row: dict[str, float]) -> float:
    """The removed part of a stacked bar; widths are drawn to 0.01 px of 440."""
    return row["removed"] / (row["kept"] + row["removed"])


# ---------- the --report round trip ----------


def test_report_writes_json_and_page_and_report_command_rerenders_them(optimized, tmp_path):
    page = optimized.with_suffix(".html")
    assert page.exists()
    data = json.loads(optimized.read_text())
    assert page.read_text() == render_html(data)
    result = invoke("report", optimized, "-o", tmp_path / "again.html")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again.html").read_bytes() == page.read_bytes()
    # The page carries its data: rendering from the page gives the page again.
    assert load_report(page) == data
    result = invoke("report", page, "-o", tmp_path / "from_page.html")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from_page.html").read_bytes() == page.read_bytes()
    # Without -o the page goes beside the JSON.
    copy = tmp_path / "copy.json"
    shutil.copy(optimized, copy)
    assert invoke("report", copy).exit_code == 0
    assert (tmp_path / "copy.html").read_bytes() == page.read_bytes()


def test_page_shows_the_reported_numbers(optimized):
    data = json.loads(optimized.read_text())
    page = render_html(data)
    before, after = data["before"], data["after"]
    size = section(page, "size")
    assert f"{before['params']:,}" in size and f"{after['params']:,}" in size
    assert f"{100 * (after['macs'] - before['macs']) / before['macs']:+.1f}%" in size
    speedup = data["latency"]["speedup"]
    shown = f"{speedup:.2f}× faster" if speedup >= 1 else f"{1 / speedup:.2f}× slower"
    assert shown in section(page, "summary")
    fidelity = section(page, "fidelity")
    assert f"{data['fidelity']['outputs']['y']['relative_l2']:.4g}" in fidelity
    # Per-group bars: the removed share drawn equals the share the plan removed.
    pruned = [g for g in data["groups"] if g["prunable"]]
    drawn = bars(page, "layers")
    assert len(drawn) == len(pruned) and any(g["removed"] for g in pruned)
    for group, row in zip(pruned, drawn, strict=True):
        assert removed_share(row) == pytest.approx(len(group["removed"]) / group["size"], abs=1e-4)
    sensitivity = section(page, "sensitivity")
    measured = data["allocation"]["sensitivity"]
    assert measured and sensitivity.count('<circle class="s1"') == len(measured)
    for row in measured:
        assert f"{row['sensitivity']:.4g}" in sensitivity
    budget = section(page, "budget")
    assert f"-{100 * data['allocation']['achieved_flops_reduction']:.1f}%" in budget
    assert str(optimized.parent / "calib.npz") in section(page, "settings")


def test_sections_appear_only_with_their_data(optimized):
    data = json.loads(optimized.read_text())
    bare = {**data, "allocation": None, "latency": None, "fidelity": None, "evaluation": None,
            "settings": {**data["settings"], "compensation": None, "reconstruction": None},
            "groups": [{**g, "sensitivity": None} for g in data["groups"]]}
    page = render_html(bare)
    for sid in ("sensitivity", "budget", "fidelity", "evaluation", "reconstruction", "other"):
        assert f'id="{sid}"' not in page
    assert "latency" not in section(page, "size")
    evaluation = {"evaluator": "mobilenet_v2", "metric": "top-1/top-5 agreement", "primary": "top1",
                  "higher_is_better": True, "dense": {"top1": 1.0, "top5": 1.0},
                  "pruned": {"top1": 0.625, "top5": 0.875}, "agreement": {"top1": 0.625}}
    page = render_html({**bare, "evaluation": evaluation, "mobile_export": {"ort_bytes": 1234}})
    shown = section(page, "evaluation")
    assert "0.625" in shown and "0.875" in shown and "-37.5%" in shown
    assert "ort_bytes" in section(page, "other")


def test_statistics_matching_is_shown_beside_reconstruction(optimized):
    data = json.loads(optimized.read_text())
    matching = {"mode": "moments", "corrected": 7, "skipped": [{"node": "fc9", "reason": "its bias is odd"}],
                "mean_relative_error_before": 0.4321, "mean_relative_error_after": 0.1234, "calibration_passes": 5}
    page = render_html({**data, "settings": {**data["settings"], "stat_matching": matching}})
    shown = section(page, "reconstruction")
    assert "Statistics matching" in shown and "moments" in shown
    assert "0.4321" in shown and "0.1234" in shown and "its bias is odd" in shown
    assert "stat_matching" not in section(page, "settings")


def test_text_is_escaped_everywhere(optimized):
    data = json.loads(optimized.read_text())
    evil = '<script>alert("x")</script>&<b>'
    data["settings"]["model"] = evil
    data["groups"][0]["members"] = [f"w[0] (Conv '{evil}')"]
    data["fidelity"]["outputs"] = {evil: data["fidelity"]["outputs"]["y"]}
    page = render_html(data)
    assert evil not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&lt;b&gt;" in page
    assert page.count("<script") == page.count("</script>") == 2  # the embedded data and the page's script
    embedded = re.search(r'<script type="application/json" id="graphprune-report">(.*?)</script>', page)
    assert json.loads(embedded.group(1)) == data


# ---------- every command's report ----------


def test_drop_layers_and_recipe_reports(tmp_path):
    onnx.save(residual_stack(zero_block=1), tmp_path / "stack.onnx")
    result = invoke("drop-layers", tmp_path / "stack.onnx", "-o", tmp_path / "out.onnx", "--drop", 1,
                    "--samples", 1, "--no-latency", "--report", tmp_path / "drop.html")  # JSON beside it
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "drop.json").read_text())
    page = (tmp_path / "drop.html").read_text()
    drawn = bars(page, "layers")
    assert len(drawn) == len(data["blocks"])
    gone = {d["add"] for d in data["dropped"]}
    for block, row in zip(data["blocks"], drawn, strict=True):
        series = "dropped" if block["add"] in gone else "kept"
        assert row[series] > 0 and row["kept" if series == "dropped" else "dropped"] == 0

    recipe = "steps:\n  - prune-channels: {ratio: 0.5, round-to: 1}\n  - drop-layers: {drop: 1}\n"
    (tmp_path / "r.yaml").write_text(recipe)
    result = invoke("run", tmp_path / "stack.onnx", "--recipe", tmp_path / "r.yaml",
                    "-o", tmp_path / "r.onnx", "--report", tmp_path / "recipe.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "recipe.json").read_text())
    page = (tmp_path / "recipe.html").read_text()
    steps = section(page, "steps")
    assert "1. prune-channels" in steps and "2. drop-layers" in steps
    macs = data["steps"][0]["summary"]["after"]["macs"] / data["before"]["macs"]
    assert f"{100 * macs:.1f}%" in steps
    assert "round-to: 1" in section(page, "settings")  # the resolved recipe, as YAML


def test_refit_report(tmp_path):
    onnx.save(residual_stack(zero_block=None), tmp_path / "dense.onnx")
    changed = residual_stack(zero_block=None)
    weight = changed.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(1.5 * numpy_helper.to_array(weight), weight.name))
    onnx.save(changed, tmp_path / "changed.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, WIDTH)).astype(np.float32))
    result = invoke("refit", tmp_path / "changed.onnx", "--dense", tmp_path / "dense.onnx", "--calib",
                    tmp_path / "calib.npz", "-o", tmp_path / "out.onnx", "--report", tmp_path / "refit.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "refit.json").read_text())
    page = (tmp_path / "refit.html").read_text()
    fidelity = section(page, "fidelity")
    assert "Given model vs dense" in fidelity and "Refitted model vs dense" in fidelity
    assert f"{data['fidelity_before']['worst_relative_l2']:.4g}" in fidelity
    rec = section(page, "reconstruction")
    assert f"{data['reconstruction']['mean_relative_error_reconstructed']:.4g}" in rec
    assert "dense.onnx" in section(page, "settings")


def test_experts_and_tokens_reports():
    from graphprune.models import moe

    result = api.prune_experts(moe.ort_moe(layers=2, experts=6, dead=[1, 4]), ratio=0.34, samples=1)
    data = {**result.to_dict(), "output": "out.onnx"}
    drawn = bars(render_html(data), "layers")
    assert len(drawn) == len(data["layers"]) == 2
    for layer, row in zip(data["layers"], drawn, strict=True):
        assert removed_share(row) == pytest.approx(len(layer["removed"]) / layer["experts"], abs=1e-4)

    stages = [StageReport(layer=1, keep=0.5, softmax="l1/Softmax", add="l1/Add", tokens_before=17,
                          tokens_after=9)]
    settings = {"model": "vit.onnx", "keep": [{"layer": 1, "keep": 0.5}]}
    tokens = api.PruneTokensResult(None, stages, 4, ModelStats(100, 2000, 900), ModelStats(100, 1200, 950),
                                   None, settings=settings).to_dict()
    page = render_html(tokens)
    (row,) = bars(page, "layers")
    assert removed_share(row) == pytest.approx(8 / 17, abs=1e-4)
    assert "9/17 tokens kept" in page and "(4 encoder layers)" in page


def test_analyze_json_renders(tmp_path):
    onnx.save(small_cnn(), tmp_path / "cnn.onnx")
    analysis = invoke("analyze", tmp_path / "cnn.onnx", "--json")
    assert analysis.exit_code == 0, analysis.output
    (tmp_path / "groups.json").write_text(analysis.stdout)
    result = invoke("report", tmp_path / "groups.json")
    assert result.exit_code == 0, result.output
    data = json.loads(analysis.stdout)
    page = (tmp_path / "groups.html").read_text()
    totals = data["totals"]
    assert f"{totals['prunable_groups']} of {totals['groups']} prunable" in section(page, "summary")
    layers = section(page, "layers")
    assert layers.count("<tr>") == 1 + len(data["groups"])  # header and one row per group
    assert all(escape(g["reason"]) in layers for g in data["groups"] if not g["prunable"])


# ---------- errors and paths ----------


def test_report_paths():
    assert report_paths(Path("a/r.json")) == (Path("a/r.json"), Path("a/r.html"))
    assert report_paths(Path("a/r.html")) == (Path("a/r.json"), Path("a/r.html"))
    assert report_paths(Path("r")) == (Path("r"), Path("r.html"))
    assert report_paths(Path("r.txt")) == (Path("r.txt"), Path("r.txt.html"))


def test_report_command_errors_are_one_line(tmp_path, optimized):
    (tmp_path / "bad.json").write_text('{"settings": ')
    (tmp_path / "other.json").write_text('{"name": "not a report"}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "page.html").write_text("<html><body>hello</body></html>")
    cases = [((tmp_path / "bad.json",), "not valid JSON"),
             ((tmp_path / "other.json",), "not a graphprune report"),
             ((tmp_path / "list.json",), "not a graphprune report"),
             ((tmp_path / "missing.json",), "no such file"),
             ((tmp_path / "page.html", "-o", tmp_path / "x.html"), "without embedded report data"),
             ((optimized.with_suffix(".html"),), "would overwrite"),
             ((optimized, "-o", tmp_path / "no" / "x.html"), "does not exist")]
    for args, message in cases:
        result = invoke("report", *args)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.splitlines()) == 1


def test_report_page_may_not_overwrite_the_model(tmp_path):
    onnx.save(small_cnn(), tmp_path / "cnn.onnx")
    # The page of --report out.json would be out.html: the output model's own name.
    result = invoke("optimize", tmp_path / "cnn.onnx", "-o", tmp_path / "out.html", "--ratio", 0.5,
                    "--report", tmp_path / "out.json")
    assert result.exit_code == 2 and "--report" in result.stderr
    assert not (tmp_path / "out.html").exists() and not (tmp_path / "out.json").exists()


# ---------- the page in a browser ----------


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("chromium is not installed (tools/setup.sh installs Debian's chromium package)")


def test_page_renders_in_headless_chromium(optimized, tmp_path):
    page = optimized.with_suffix(".html")
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    ran = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=False)
    assert ran.returncode == 0, ran.stderr[-2000:]
    dom = ran.stdout
    charts = page.read_text().count('<svg class="chart')
    assert charts >= 3
    assert 'data-rendered="1"' in dom  # the page's script ran to its end
    assert f'data-charts="{charts}"' in dom  # and the browser parsed every chart as SVG
    assert 'class="removed"' in dom and "<polyline" in dom
    shot = tmp_path / "page.png"
    subprocess.run([*flags, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    image = pytest.importorskip("PIL.Image").open(shot).convert("RGB")
    pixels = np.asarray(image).reshape(-1, 3)
    assert len({tuple(c) for c in pixels[::7]}) > 20  # not a blank page
    kept = np.all(pixels == (0x4E, 0x79, 0xA7), axis=1).sum()
    removed = np.all(pixels == (0xE1, 0x57, 0x59), axis=1).sum()
    assert kept > 1000 and removed > 100, (kept, removed)  # the bars were painted in the page's colours
