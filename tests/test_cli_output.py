"""--quiet, --json and progress counts on every command; the budget lines `run` prints of its steps."""

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from graphprune import api
from graphprune.cli import _pct, main
from graphprune.models.zoo import export


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "resnet_basic.onnx"
    shutil.copy(export("resnet_basic", "legacy"), path)
    return path


@pytest.fixture(scope="module")
def calib(resnet, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.normal(size=(12, 3, 32, 32)).astype(np.float32))
    return path


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_optimize_json_prints_only_the_report(resnet, tmp_path):
    result = invoke("optimize", resnet, "-o", tmp_path / "p.onnx", "--ratio", 0.3, "--round-to", 1, "--no-latency", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert data["output"] == str(tmp_path / "p.onnx")
    assert data["after"]["macs"] < data["before"]["macs"]
    assert (tmp_path / "p.onnx").exists()


def test_optimize_json_equals_the_report_file(resnet, tmp_path):
    report = tmp_path / "r.json"
    result = invoke("optimize", resnet, "-o", tmp_path / "p.onnx", "--ratio", 0.3, "--round-to", 1, "--no-latency", "--json",
                    "--report", report)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(report.read_text())


def test_quiet_prints_nothing_on_success(resnet, tmp_path):
    result = invoke("optimize", resnet, "-o", tmp_path / "p.onnx", "--ratio", 0.3, "--round-to", 1, "--no-latency", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert (tmp_path / "p.onnx").exists()
    assert invoke("analyze", resnet, "-q").stdout == ""
    assert invoke("passes", "--quiet").stdout == ""


def test_quiet_still_reports_errors(resnet, tmp_path):
    result = invoke("optimize", resnet, "-o", tmp_path / "p.onnx", "--ratio", 1.5, "--quiet")
    assert result.exit_code == 2
    assert result.stdout == "" and result.stderr.startswith("error: --ratio")


def test_passes_and_dry_run_json(resnet, tmp_path):
    listed = json.loads(invoke("passes", "--json").stdout)
    assert "prune-channels" in listed["steps"] and "ratio" in listed["steps"]["prune-channels"]["options"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - prune-channels: {ratio: 0.25}\n")
    result = invoke("run", resnet, "--recipe", recipe, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"][0]["prune-channels"]["ratio"] == 0.25


def test_commands_without_json_results_say_so_by_empty_object(resnet, tmp_path):
    report = tmp_path / "r.json"
    assert invoke("optimize", resnet, "-o", tmp_path / "p.onnx", "--ratio", 0.3, "--round-to", 1, "--no-latency", "-q",
                  "--report", report).exit_code == 0
    rendered = invoke("report", report, "-o", tmp_path / "page.html", "--json")
    assert rendered.exit_code == 0, rendered.output
    assert json.loads(rendered.stdout) == {"report": str(report), "html": str(tmp_path / "page.html")}


class CountingProgress:
    """A progress object as the CLI's: a context manager per step, and counts of batches done."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.counts: list[int] = []

    @contextmanager
    def __call__(self, text: str):
        self.steps.append(text)
        yield

    def count(self, done: int) -> None:
        self.counts.append(done)


def test_calibration_batches_are_counted(resnet, calib):
    progress = CountingProgress()
    api.optimize(str(resnet), ratio=0.3, criterion="wanda-sp", calib=str(calib), calib_batch_size=4,
                 reconstruct=True, check=False, progress=progress)
    assert any("activation statistics" in s for s in progress.steps)
    assert progress.counts and max(progress.counts) >= 3  # 12 samples in batches of 4, per pass
    assert all(c >= 1 for c in progress.counts)


def test_optimize_bench_puts_the_bench_numbers_in_the_report(resnet, tmp_path):
    report = tmp_path / "r.json"
    result = invoke("optimize", resnet, "-o", tmp_path / "p.onnx", "--ratio", 0.3, "--round-to", 1, "--no-latency",
                    "--bench", "cpu", "--report", report)
    assert result.exit_code == 0, result.output
    timing = json.loads(report.read_text())["bench"]
    (entry,) = timing["providers"]
    assert entry["provider"] == "cpu" and len(entry["models"]) == 2 and len(entry["speedup"]) == 1
    assert all(row["median_ms"] > 0 for row in entry["models"])
    assert "speedup" in result.stdout


def test_optimize_bench_with_a_missing_provider_fails_before_any_work(resnet, tmp_path):
    result = invoke("optimize", resnet, "-o", tmp_path / "p.onnx", "--ratio", 0.3, "--bench", "cuda")
    assert result.exit_code == 2 and "graphprune[gpu]" in result.stderr
    assert not (tmp_path / "p.onnx").exists()


def flat(text: str) -> str:
    """Printed text with rich's wrapping at the terminal width undone."""
    return " ".join(text.split())


def test_run_prints_the_budget_of_each_budgeted_prune_step_as_optimize_does(resnet, tmp_path):
    optimized = invoke("optimize", resnet, "-o", tmp_path / "o.onnx", "--target-flops", 0.3, "--round-to", 1,
                       "--no-latency")
    assert optimized.exit_code == 0, optimized.output
    (budget,) = re.findall(r"Budget: MACs -30\.0% requested, .*? allocation\)\.", flat(optimized.stdout))
    recipe, report = tmp_path / "r.yaml", tmp_path / "r.json"
    recipe.write_text("steps:\n  - prune-channels: {target-flops: 0.3, round-to: 1}\n"
                      "  - prune-channels: {ratio: 0.2, round-to: 1}\n"
                      "  - prune-channels: {target-params: 0.2, allocation: global, round-to: 1}\n")
    result = invoke("run", resnet, "--recipe", recipe, "-o", tmp_path / "r.onnx", "--report", report)
    assert result.exit_code == 0, result.output
    printed = flat(result.stdout)
    assert f"Step 1 (prune-channels): {budget}" in printed  # the same step as optimize's flags, the same line
    assert "Step 2" not in printed  # a ratio is no budget
    third = json.loads(report.read_text())["steps"][2]["summary"]["allocation"]  # of the step's own input
    assert (f"Step 3 (prune-channels): Budget: params -20.0% requested, "
            f"-{_pct(third['estimated_params_reduction'])} estimated, "
            f"-{_pct(third['achieved_params_reduction'])} achieved (global allocation).") in printed


def test_run_prints_the_speedup_target_line_of_a_prune_step(resnet, tmp_path):
    recipe, report = tmp_path / "r.yaml", tmp_path / "r.json"
    recipe.write_text("steps:\n  - prune-channels: {target-speedup: 1.2, threads: 1}\n")
    result = invoke("run", resnet, "--recipe", recipe, "-o", tmp_path / "r.onnx", "--report", report)
    assert result.exit_code == 0, result.output
    plan = json.loads(report.read_text())["steps"][0]["summary"]["settings"]["latency_plan"]
    assert (f"Step 1 (prune-channels): Target speedup: 1.20x requested, {plan['measured_speedup']:.2f}x "
            f"measured on cpu ({len(plan['iterations'])} whole-model check(s)") in flat(result.stdout)
