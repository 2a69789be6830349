"""A corpus of bad inputs (issue 7, item 4): each gives one clear sentence, a non-zero exit, no traceback,
leaves the input untouched and writes nothing (no output, no stray temporary files).

tests/test_cli.py already covers `optimize` with --ratio 1.0/-0.1, output == input, a missing output
folder, a missing/corrupt/empty input and missing external data; this file adds the rest, and those
cases for `analyze`, `drop-layers`, `prune-tokens` and `prune-experts`.

Cases that legitimately succeed, and what they do:

* dynamic shapes without --input-shape (symbolic N, H, W): analysed and pruned; random verification
  inputs fill the symbols.
* opset 7 (IR 3, weights also graph inputs) and the newest opset onnx knows: analysed and pruned.
* a prunable conv pair at the top level feeding an If (with a conv in a branch): `analyze` declines the
  If and blocks the group that enters it; `optimize` prunes the top-level group only, the If untouched.
* convs only inside an If's branches or a Loop's body: `analyze` lists the If/Loop as declined (no rule)
  and finds no group; `optimize` says nothing is prunable (exit 2, one line naming the op).
* an op from an unknown custom domain: `analyze` declines it and still reports the groups before it;
  `optimize` fails with one line, because ONNX Runtime cannot load the original to verify against.
* an --exclude pattern that matches no node name: a choice made here -- a typo must not pass silently,
  yet an unmatched pattern is harmless -- so `optimize` prints one `note:` line on stderr naming the
  pattern and succeeds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest
from bad_inputs import (
    control_flow,
    convs_then_if,
    custom_domain,
    empty_file,
    empty_graph,
    external_data_missing,
    random_bytes,
    text_file,
    truncated,
    two_conv,
)
from click.testing import CliRunner

from graphprune.cli import main

FAST = ["--no-latency", "--samples", "1"]


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry of the folder (hidden ones included) with its content's hash."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in folder.iterdir()}


def assert_no_crash(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def assert_one_line_error(result, *named: str) -> None:
    assert_no_crash(result)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in named:
        assert text in lines[0], lines[0]


# ---------- unreadable models: every command that reads MODEL refuses it in one line ----------


def _unreadable(case: str, tmp: Path) -> Path:
    if case == "truncated":
        return truncated(tmp / "model.onnx", two_conv(tmp / "source.onnx"))
    if case == "random-bytes":
        return random_bytes(tmp / "model.onnx")
    if case == "text-file":
        return text_file(tmp / "model.txt")
    if case == "empty-file":
        return empty_file(tmp / "model.onnx")
    if case == "external-data-missing":
        return external_data_missing(tmp / "model.onnx")
    if case == "no-nodes":
        return empty_graph(tmp / "model.onnx")
    if case == "directory":
        (tmp / "model.onnx").mkdir()
        return tmp / "model.onnx"
    if case == "missing":
        return tmp / "model.onnx"
    raise AssertionError(case)


UNREADABLE = {  # case -> what the one line must say besides the file's name
    "truncated": "cannot read",
    "random-bytes": "cannot read",
    "text-file": "cannot read",
    "empty-file": "is not an ONNX model",
    "external-data-missing": "model.onnx.data",
    "no-nodes": "no nodes",
    "directory": "is not a file",
    "missing": "no such file",
}

COMMANDS = {
    "analyze": lambda model, out: ["analyze", model],
    "analyze-json": lambda model, out: ["analyze", model, "--json"],
    "optimize": lambda model, out: ["optimize", model, "-o", out, "--ratio", 0.3, *FAST],
    "drop-layers": lambda model, out: ["drop-layers", model, "-o", out, "--drop", 1, *FAST],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_model_is_one_line_and_writes_nothing(case, command, tmp_path):
    model = _unreadable(case, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before, out_before = snapshot(tmp_path), snapshot(out_dir)
    result = invoke(*COMMANDS[command](model, out_dir / "pruned.onnx"))
    assert_one_line_error(result, model.name, UNREADABLE[case])
    assert snapshot(tmp_path) == before and snapshot(out_dir) == out_before == {}


# ---------- bad destinations and options on the newer commands ----------


def _bad_request(case: str, model: Path, tmp: Path) -> tuple[list[object], str]:
    out = tmp / "pruned.onnx"
    if case == "drop-layers-output-is-input":
        return ["drop-layers", model, "-o", model, "--drop", 1], "equals the input model"
    if case == "drop-layers-output-folder-missing":
        return ["drop-layers", model, "-o", tmp / "nowhere" / "o.onnx", "--drop", 1], "nowhere"
    if case == "drop-layers-output-is-folder":
        (tmp / "folder.onnx").mkdir()
        return ["drop-layers", model, "-o", tmp / "folder.onnx", "--drop", 1], "is a folder"
    if case == "prune-tokens-output-is-input":
        return ["prune-tokens", model, "-o", model, "--keep", "0.5@1"], "equals the input model"
    if case == "prune-experts-ratio-one":
        return ["prune-experts", model, "-o", out, "--ratio", 1.0], "--ratio"
    if case == "prune-experts-ratio-negative":
        return ["prune-experts", model, "-o", out, "--ratio", -0.1], "--ratio"
    if case == "optimize-report-is-input":
        return ["optimize", model, "-o", out, "--ratio", 0.3, "--report", model], "--report"
    if case == "optimize-report-is-output":
        return ["optimize", model, "-o", out, "--ratio", 0.3, "--report", out], "--report"
    raise AssertionError(case)


BAD_REQUESTS = ["drop-layers-output-is-input", "drop-layers-output-folder-missing",
                "drop-layers-output-is-folder", "prune-tokens-output-is-input", "prune-experts-ratio-one",
                "prune-experts-ratio-negative", "optimize-report-is-input", "optimize-report-is-output"]


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_one_line_and_writes_nothing(case, tmp_path):
    model = two_conv(tmp_path / "model.onnx")
    args, named = _bad_request(case, model, tmp_path)
    before = snapshot(tmp_path)
    result = invoke(*args, *FAST)
    assert_one_line_error(result, named)
    assert snapshot(tmp_path) == before


# ---------- models that are unusual but valid ----------


def _assert_pruned(result, tmp: Path, model: Path, before: dict[str, str], out: Path) -> None:
    """Exit 0, the input unchanged, exactly one new file (the output), which passes the checker."""
    assert_no_crash(result)
    assert result.exit_code == 0, result.output
    after = snapshot(tmp)
    assert after.pop(out.name)
    assert after == before
    onnx.checker.check_model(onnx.load(out), full_check=True)


@pytest.mark.parametrize("case", ["dynamic-shapes", "opset-7", "newest-opset", "convs-then-if"])
def test_valid_unusual_models_are_analysed_and_pruned(case, tmp_path):
    model = tmp_path / "model.onnx"
    if case == "dynamic-shapes":
        two_conv(model, dims=("N", 3, "H", "W"))
    elif case == "opset-7":
        two_conv(model, opset=7, ir_version=3)
    elif case == "newest-opset":
        two_conv(model, opset=onnx.defs.onnx_opset_version(), ir_version=onnx.IR_VERSION)
    else:
        convs_then_if(model)
    before = snapshot(tmp_path)

    analysis = invoke("analyze", model, "--json")
    assert_no_crash(analysis)
    assert analysis.exit_code == 0, analysis.output
    assert json.loads(analysis.stdout)["totals"]["prunable_groups"] == 1
    assert snapshot(tmp_path) == before

    out = tmp_path / "pruned.onnx"
    result = invoke("optimize", model, "-o", out, "--ratio", 0.5, "--round-to", 1, *FAST)
    _assert_pruned(result, tmp_path, model, before, out)
    assert "Removed 4 units from 1 of" in result.stdout
    if case == "convs-then-if":
        report = json.loads(analysis.stdout)
        assert [d["op"] for d in report["declined_nodes"]] == ["If"]
        assert any("If 'branch'" in (g.get("reason") or "") for g in report["groups"] if not g["prunable"])
        pruned = onnx.load(out)
        assert [n.op_type for n in pruned.graph.node].count("If") == 1
        weights = {t.name: list(t.dims) for t in pruned.graph.initializer}
        assert weights["W1"] == [4, 3, 3, 3] and weights["W2"] == [4, 4, 3, 3]  # 8 -> 4 at the top level
        assert weights["W3"] == [4, 4, 1, 1]  # inside the branch: untouched


@pytest.mark.parametrize("kind", ["If", "Loop"])
def test_convs_only_in_subgraphs_are_declined_and_nothing_is_prunable(kind, tmp_path):
    model = control_flow(tmp_path / "model.onnx", kind.lower())
    before = snapshot(tmp_path)
    analysis = invoke("analyze", model, "--json")
    assert_no_crash(analysis)
    assert analysis.exit_code == 0, analysis.output
    report = json.loads(analysis.stdout)
    assert [d["op"] for d in report["declined_nodes"]] == [kind]
    assert report["totals"]["prunable_groups"] == 0
    table = invoke("analyze", model)
    assert table.exit_code == 0 and "Declined" in table.stdout and f"no rule for op {kind}" in table.stdout

    result = invoke("optimize", model, "-o", tmp_path / "pruned.onnx", "--ratio", 0.5, *FAST)
    assert_one_line_error(result, "model.onnx", "nothing is prunable", kind)
    assert snapshot(tmp_path) == before


def test_unknown_custom_domain_is_declined_then_refused_in_one_line(tmp_path):
    model = custom_domain(tmp_path / "model.onnx")
    before = snapshot(tmp_path)
    analysis = invoke("analyze", model, "--json")
    assert_no_crash(analysis)
    assert analysis.exit_code == 0, analysis.output
    report = json.loads(analysis.stdout)
    assert [d["op"] for d in report["declined_nodes"]] == ["Frobnicate"]
    assert "com.example.unknown" in report["declined_nodes"][0]["reason"]

    result = invoke("optimize", model, "-o", tmp_path / "pruned.onnx", "--ratio", 0.5, "--round-to", 1, *FAST)
    assert_one_line_error(result, "model.onnx", "com.example.unknown")
    assert snapshot(tmp_path) == before


def test_exclude_that_matches_nothing_notes_it_and_succeeds(tmp_path):
    model = two_conv(tmp_path / "model.onnx")
    before = snapshot(tmp_path)
    out = tmp_path / "pruned.onnx"
    result = invoke("optimize", model, "-o", out, "--ratio", 0.5, "--round-to", 1, *FAST,
                    "--exclude", "conv*", "--exclude", "layer.9*")
    _assert_pruned(result, tmp_path, model, before, out)
    notes = result.stderr.strip().splitlines()
    assert notes == [f"note: --exclude 'layer.9*' matches no node name in {model}; it excludes nothing."]
    assert "Removed 0 units" in result.stdout  # 'conv*' matched, and left the only group whole
