"""The graphprune command line: analyze, optimize, and one-line errors that leave nothing behind."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphprune.cli import main
from graphprune.models.zoo import export


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> Path:
    """A private copy of the legacy resnet_basic export, so tests can hash and compare it freely."""
    path = tmp_path_factory.mktemp("model") / "resnet_basic.onnx"
    shutil.copy(export("resnet_basic", "legacy"), path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert "graphprune" in result.stdout and "0." in result.stdout


def test_analyze_prints_groups_and_totals(resnet):
    result = invoke("analyze", resnet)
    assert result.exit_code == 0, result.output
    assert "prunable" in result.stdout and "blocked" in result.stdout
    assert "Totals: 8 groups, 6 prunable" in result.stdout


def test_analyze_json_is_the_report_and_nothing_else(resnet):
    result = invoke("analyze", resnet, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["totals"]["prunable_groups"] == sum(g["prunable"] for g in data["groups"]) > 0
    assert {"id", "size", "kind", "prunable", "reason", "members", "params_share", "macs_share"} <= set(
        data["groups"][0]
    )
    assert data["declined_nodes"] == []


def test_optimize_writes_a_smaller_model_and_a_report(resnet, tmp_path):
    before = digest(resnet)
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    result = invoke("optimize", resnet, "-o", out, "--ratio", 0.5, "--report", report)
    assert result.exit_code == 0, result.output
    assert "Dense vs pruned" in result.stdout and "latency" in result.stdout and " ms " in result.stdout
    assert "top-1 agreement" in result.stdout
    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.loads(report.read_text())
    assert data["after"]["params"] < data["before"]["params"]
    assert data["after"]["file_bytes"] == out.stat().st_size
    pruned = [g for g in data["groups"] if g["removed"]]
    assert pruned and all(len(g["removed"]) + len(g["kept"]) == g["size"] for g in pruned)
    assert data["units_removed"] == sum(len(g["removed"]) for g in data["groups"])
    assert data["fidelity"]["outputs"]["output"]["top1_agreement"] is not None
    assert data["latency"]["dense"]["median_ms"] > 0 and data["latency"]["speedup"] > 0
    assert digest(resnet) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.onnx", "report.html", "report.json"]


def kept_counts(resnet: Path, tmp_path: Path, *extra: object) -> dict[int, int]:
    report = tmp_path / "report.json"
    result = invoke("optimize", resnet, "-o", tmp_path / "out.onnx", "--ratio", 0.3, "--no-latency",
                    "--samples", 1, "--report", report, *extra)
    assert result.exit_code == 0, result.output
    return {g["id"]: len(g["kept"]) for g in json.loads(report.read_text())["groups"] if g["prunable"]}


def test_round_to_changes_kept_counts(resnet, tmp_path):
    rounded, exact = kept_counts(resnet, tmp_path), kept_counts(resnet, tmp_path, "--round-to", 1)
    # 16-unit groups are left whole; 32-unit groups keep 22, rounded up (never remove more than asked).
    assert sorted(rounded.values()) == [16, 16, 16, 32, 32, 32]
    assert exact != rounded
    assert sorted(exact.values()) == [11, 11, 11, 22, 22, 22]  # 16 and 32 units at ratio 0.3, unrounded


def test_exclude_leaves_the_matching_groups_whole(resnet, tmp_path):
    report = tmp_path / "report.json"
    node = "/layers/layers.0/conv1/Conv"
    result = invoke("optimize", resnet, "-o", tmp_path / "out.onnx", "--ratio", 0.5, "--no-latency",
                    "--exclude", "*layers.0/conv1*", "--report", report)
    assert result.exit_code == 0, result.output
    groups = json.loads(report.read_text())["groups"]
    touching = [g for g in groups if any(f"'{node}'" in m for m in g["members"])]
    assert touching
    for g in touching:
        assert g["removed"] == [] and "excluded by pattern" in g["reason"]
    assert any(g["removed"] for g in groups if g not in touching)


# ---------- bad inputs: exit 2, one line on stderr naming what is wrong, nothing written ----------


def tiny_conv(path: Path) -> None:
    """A single Conv between graph input and graph output: both channel groups are pinned."""
    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "W")
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    graph = helper.make_graph([node], "tiny", [x], [y], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def external_data_missing(resnet: Path, path: Path) -> None:
    onnx.save(onnx.load(resnet), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.data", size_threshold=0)
    (path.parent / "weights.data").unlink()


def bad_case(case: str, resnet: Path, tmp: Path) -> tuple[Path, list[object], str]:
    """(input model, optimize arguments after the model, text the error must contain)."""
    model, out = tmp / "model.onnx", tmp / "out.onnx"
    shutil.copy(resnet, model)
    if case == "ratio-one":
        return model, ["-o", out, "--ratio", 1.0], "--ratio"
    if case == "ratio-negative":
        return model, ["-o", out, "--ratio", -0.1], "--ratio"
    if case == "output-is-input":
        return model, ["-o", model, "--ratio", 0.3], "--output"
    if case == "output-folder-missing":
        return model, ["-o", tmp / "nowhere" / "out.onnx", "--ratio", 0.3], "nowhere"
    if case == "report-folder-missing":
        return model, ["-o", out, "--ratio", 0.3, "--report", tmp / "nowhere" / "r.json"], "--report"
    if case == "input-missing":
        model.unlink()
        return model, ["-o", out, "--ratio", 0.3], "model.onnx"
    if case == "input-corrupt":
        model.write_bytes(b"this is not a protobuf \xff\xfe" * 8)
        return model, ["-o", out, "--ratio", 0.3], "model.onnx"
    if case == "input-empty":
        model.write_bytes(b"")
        return model, ["-o", out, "--ratio", 0.3], "model.onnx"
    if case == "external-data-missing":
        external_data_missing(resnet, model)
        return model, ["-o", out, "--ratio", 0.3], "weights.data"
    if case == "nothing-prunable":
        tiny_conv(model)
        return model, ["-o", out, "--ratio", 0.3], "nothing is prunable"
    if case == "unknown-input-shape":
        return model, ["-o", out, "--ratio", 0.3, "--input-shape", "pixels:1x3x32x32"], "pixels"
    raise AssertionError(case)


BAD_CASES = ["ratio-one", "ratio-negative", "output-is-input", "output-folder-missing",
             "report-folder-missing", "input-missing", "input-corrupt", "input-empty",
             "external-data-missing", "nothing-prunable", "unknown-input-shape"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, resnet, tmp_path):
    model, args, named = bad_case(case, resnet, tmp_path)
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    report = [] if "--report" in args else ["--report", tmp_path / "report.json"]
    result = invoke("optimize", model, *args, *report)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.output
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before  # nothing new, input unchanged


@pytest.mark.parametrize("args, named", [
    (["--ratio", 0.3, "--units", "channel,bogus"], "--units: unknown unit kind 'bogus'"),
    (["--ratio", 0.3, "--reconstruct"], "--reconstruct needs calibration data"),
    (["--ratio", 0.3, "--compensate"], "--compensate needs calibration data"),
    (["--ratio", 0.3, "--global", "--max-ratio", 0.5, "--min-ratio", 0.7], "--min-ratio must be in"),
    (["--ratio", 0.3, "--calib", "nowhere.npz"], "--calib nowhere.npz: no such file"),
    (["--ratio", 0.3, "--calib-batch-size", 0], "--calib-batch-size must be 1 or more"),
    (["--ratio", 0.3, "--input-shape", "input:1x3"], "has rank 2"),
    (["--target-speedup", 1.5, "--provider", "nopu"], "unknown provider 'nopu'"),
    (["--target-speedup", 1.5, "--threads", 0], "--threads must be 1 or more"),
])
def test_dry_run_rejects_what_a_real_run_rejects_and_prints_nothing(resnet, tmp_path, args, named):
    dry = invoke("optimize", resnet, *args, "--dry-run")
    real = invoke("optimize", resnet, *args, "-o", tmp_path / "out.onnx", "--no-latency")
    assert dry.exit_code == real.exit_code == 2, dry.output + real.output
    assert dry.stdout == "" and dry.stderr == real.stderr  # the same sentence
    assert dry.stderr.startswith("error: ") and named in dry.stderr and dry.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--criterion", "--allocation", "--reconstruct-mode", "--protect"])
def test_dry_run_rejects_unknown_choices_as_a_real_run_does(resnet, tmp_path, option):
    dry = invoke("optimize", resnet, "--ratio", 0.3, option, "bogus", "--dry-run")
    real = invoke("optimize", resnet, "--ratio", 0.3, option, "bogus", "-o", tmp_path / "out.onnx")
    assert dry.exit_code == real.exit_code == 2 and dry.stdout == "" and dry.stderr == real.stderr
    assert f"Invalid value for '{option}'" in dry.stderr  # click's choice check, before either
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["input-missing", "input-corrupt", "external-data-missing"])
def test_analyze_bad_input_is_one_line_exit_2(case, resnet, tmp_path):
    model, _args, named = bad_case(case, resnet, tmp_path)
    result = invoke("analyze", model, "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and named in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_optimize_with_calibration_data(resnet, tmp_path):
    from graphprune.models.zoo import sample_input

    sample = sample_input("resnet_basic")
    np.savez(tmp_path / "calib.npz", input=np.concatenate([sample, -sample, 0.5 * sample]))
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    result = invoke("optimize", resnet, "-o", out, "--ratio", 0.3, "--no-latency", "--criterion", "flap", "--round-to", 1,
                    "--calib", tmp_path / "calib.npz", "--calib-batch-size", 2, "--report", report)
    assert result.exit_code == 0, result.output
    assert "Bias compensation:" in result.stdout
    settings = json.loads(report.read_text())["settings"]
    assert settings["criteria_used"] == ["flap"] and settings["compensate"] is True
    assert settings["compensation"]["compensated"] > 0
    # Reconstruction: the consumers it rebuilds are not bias-compensated again; it needs data too.
    result = invoke("optimize", resnet, "-o", out, "--ratio", 0.3, "--no-latency", "--criterion", "flap",
                    "--round-to", 1, "--calib", tmp_path / "calib.npz", "--reconstruct", "--report", report)
    assert result.exit_code == 0, result.output
    assert "Reconstruction (one-shot):" in result.stdout
    settings = json.loads(report.read_text())["settings"]
    assert settings["reconstruction"]["reconstructed"] > 0
    result = invoke("optimize", resnet, "-o", out, "--ratio", 0.3, "--no-latency", "--criterion", "flap",
                    "--round-to", 1, "--calib", tmp_path / "calib.npz", "--reconstruct-mode", "sequential",
                    "--report", report)
    assert result.exit_code == 0, result.output
    assert "Reconstruction (sequential):" in result.stdout
    settings = json.loads(report.read_text())["settings"]
    assert settings["reconstruction"]["mode"] == "sequential" and settings["reconstruction"]["reconstructed"] > 0
    result = invoke("optimize", resnet, "-o", out, "--ratio", 0.3, "--reconstruct")
    assert result.exit_code == 2 and "--reconstruct needs calibration data" in result.output
    # Without data the criterion falls back and says so; compensation without data is refused.
    result = invoke("optimize", resnet, "-o", out, "--ratio", 0.3, "--no-latency", "--criterion", "wanda-sp")
    assert result.exit_code == 0, result.output
    assert "wanda-sp/data-free" in result.stdout
    result = invoke("optimize", resnet, "-o", out, "--ratio", 0.3, "--compensate")
    assert result.exit_code == 2 and "--compensate needs calibration data" in result.output
    result = invoke("optimize", resnet, "-o", out, "--ratio", 0.3, "--calib", tmp_path / "nope.npz")
    assert result.exit_code == 2 and "nope.npz" in result.output


def test_eval_prints_the_real_metric_before_and_after(tmp_path):
    from graphprune.models import real

    if not real.available("silero_vad") or not real.available("pyannote-audio"):
        pytest.skip("silero-vad or pyannote-audio wheel not fetched")
    out, report = tmp_path / "vad.onnx", tmp_path / "report.json"
    result = invoke("optimize", real.silero_vad_path(), "-o", out, "--ratio", 0.3, "--no-latency",
                    "--input-shape", "input:1x576",
                    "--eval", "silero_vad", "--report", report)
    assert result.exit_code == 0, result.output
    assert "silero_vad" in result.output
    evaluation = json.loads(report.read_text())["evaluation"]
    assert set(evaluation["dense"]) == set(evaluation["pruned"]) and evaluation["dense"]


def test_unknown_evaluator_fails_before_any_work(resnet, tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke("optimize", resnet, "-o", out, "--ratio", 0.3, "--eval", "imagenet")
    assert result.exit_code == 2 and "imagenet" in result.output and not out.exists()
