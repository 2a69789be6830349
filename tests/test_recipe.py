"""Recipes (recipe.py, `graphprune run`, `graphprune passes`): steps in a row, verified once."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from test_drop_layers import residual_stack, run

from graphprune import api
from graphprune.cli import main
from graphprune.errors import GraphpruneError
from graphprune.recipe import PASSES_API, Step, check_step, load_recipe, parse_recipe, run_recipe

TWO_STEPS = """\
steps:
  - prune-channels: {ratio: 0.5, round-to: 1}
  - drop-layers: {drop: 1}
"""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "stack.onnx"
    onnx.save(residual_stack(zero_block=None), path)
    return path


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def weights(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_two_steps_run_in_order_and_the_output_verifies(model, tmp_path):
    out = tmp_path / "out.onnx"
    result = run_recipe(model, load_recipe(write(tmp_path, TWO_STEPS)), out)
    assert [s["step"] for s in result.steps] == ["prune-channels", "drop-layers"]
    # 3 blocks of 2 x 8x16 MatMuls: half the hidden channels go, then one of the three blocks.
    assert result.before.macs == 768
    assert result.steps[0]["summary"]["after"]["macs"] == 384
    assert result.after.macs == 256
    assert result.verification is not None and result.verification.samples == 4
    assert result.steps[1]["summary"]["dropped"][0]["kind"] == "mlp"
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert np.isfinite(run(str(out), {"x": x})).all()
    assert sum(n.op_type == "MatMul" for n in onnx.load(out).graph.node) == 4
    # The report is JSON-serialisable and names the resolved options.
    data = json.loads(json.dumps(result.to_dict()))
    assert data["steps"][0]["options"]["round-to"] == 1 and "groups" not in data["steps"][0]["summary"]


def test_single_prune_channels_step_equals_optimize(model, tmp_path):
    options = {"ratio": 0.5, "round_to": 1, "criterion": "l1"}
    recipe = parse_recipe({"steps": [{"prune-channels": {k.replace("_", "-"): v for k, v in options.items()}}]})
    out = tmp_path / "out.onnx"
    result = run_recipe(model, recipe, out)
    direct = api.optimize(model, **options)
    ours, theirs = weights(onnx.load(out)), weights(ir.to_proto(direct.model))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert result.after.macs == direct.after.macs < direct.before.macs
    # The fidelity matches optimize's own verification of the same model.
    assert result.verification.worst_relative_l2 == pytest.approx(direct.verification.worst_relative_l2)


def test_options_resolve_from_the_api_signatures(tmp_path):
    recipe = parse_recipe({"calib": "c.npz", "steps": ["drop-layers", {"prune-heads": {"global": True}}]})
    (drop, heads) = recipe.resolved()
    assert drop["drop-layers"]["calib"] == "c.npz" and drop["drop-layers"]["calib-batch-size"] == 8
    assert heads["prune-heads"]["units"] == ["head"] and heads["prune-heads"]["global-rank"] is True
    assert heads["prune-heads"]["round-to"] == 16


@pytest.mark.parametrize("text, match", [
    ("steps:\n  - prune-everything: {}\n", r"recipe\.yaml, step 1: unknown step 'prune-everything'; choose from"),
    ("steps:\n  - drop-layers: {drop: 1}\n  - drop-layers: {blocks: 2}\n",
     r"recipe\.yaml, step 2 \(drop-layers\): unknown option 'blocks'; valid options: drop, target-flops"),
    ("steps: [\n", r"recipe\.yaml: is not valid YAML at line"),
    ("steps: []\n", r"recipe\.yaml: the recipe has no steps"),
    ("- drop-layers\n", r"recipe\.yaml: a recipe is a mapping with a 'steps' list"),
    ("steps:\n  - drop-layers: {drop: one}\n", r"step 1 \(drop-layers\): option 'drop' takes int"),
    ("steps:\n  - refit: {}\n", r"step 1 \(refit\): option 'calib' is required"),
    ("stpes: []\n", r"unknown key 'stpes'"),
])
def test_bad_recipes_give_one_clear_sentence(tmp_path, text, match):
    with pytest.raises(GraphpruneError, match=match):
        load_recipe(write(tmp_path, text))


def test_a_failing_step_is_named_and_nothing_is_written(model, tmp_path):
    out = tmp_path / "out.onnx"
    recipe = load_recipe(write(tmp_path, "steps:\n  - prune-channels: {ratio: 0.5, round-to: 1}\n"
                                         "  - drop-layers: {drop: 9}\n"))
    with pytest.raises(GraphpruneError, match=r"recipe\.yaml, step 2 \(drop-layers\): .*residual blocks"):
        run_recipe(model, recipe, out)
    assert not out.exists()


def test_cli_dry_run_prints_the_resolved_recipe_and_writes_nothing(model, tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke("run", model, "--recipe", write(tmp_path, TWO_STEPS), "-o", out, "--dry-run")
    assert result.exit_code == 0, result.output
    resolved = __import__("yaml").safe_load(result.stdout)
    assert list(resolved["steps"][0]) == ["prune-channels"]
    assert resolved["steps"][0]["prune-channels"]["criterion"] == "l2"  # a default filled in
    assert resolved["steps"][1]["drop-layers"]["drop"] == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "stack.onnx"]


def test_cli_run_writes_model_and_report(model, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke("run", model, "--recipe", write(tmp_path, TWO_STEPS), "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    assert "Ran 2 step(s)" in result.stdout
    data = json.loads(report.read_text())
    assert data["after"]["macs"] == 256 and data["fidelity"]["samples"] == 4 and data["output"] == str(out)


def test_cli_errors_are_one_line_exit_2_and_write_nothing(model, tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke("run", model, "--recipe", write(tmp_path, "steps:\n  - drop-layers: {blocks: 1}\n"), "-o", out)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "unknown option 'blocks'" in result.stderr
    assert not out.exists()
    result = invoke("run", model, "--recipe", write(tmp_path, TWO_STEPS))
    assert result.exit_code == 2 and "-o OUTPUT" in result.stderr


@pytest.mark.parametrize("bad, named", [
    ("prune-channels: {criterion: l3}", "unknown criterion 'l3': choose one of l1, l2"),
    ("prune-channels: {allocation: even}", "unknown allocation 'even': choose one of uniform"),
    ("prune-channels: {reconstruct: twice, calib: photos-calib}", "--reconstruct-mode: unknown mode 'twice'"),
    ("prune-channels: {protect: [stem]}", "--protect: unknown role 'stem'"),
    ("prune-heads: {min-ratio: 0.95}", "--min-ratio must be in [0, --max-ratio]"),
    ("quantize: {mode: int4}", "--mode 'int4': choose from dynamic, qdq"),
    ("drop-layers: {drop: 1, calib: nowhere.npz}", "--calib nowhere.npz: no such file"),
])
def test_dry_run_and_run_check_every_step_before_any_work(model, tmp_path, bad, named):
    # The bad step comes second: the run fails before the first step's work, as the dry run does.
    recipe = write(tmp_path, f"steps:\n  - prune-channels: {{ratio: 0.5, round-to: 1}}\n  - {bad}\n")
    out = tmp_path / "out.onnx"
    dry = invoke("run", model, "--recipe", recipe, "--dry-run")
    real = invoke("run", model, "--recipe", recipe, "-o", out)
    assert dry.exit_code == real.exit_code == 2, dry.output + real.output
    assert dry.stdout == real.stdout == "" and dry.stderr == real.stderr  # the same sentence
    assert dry.stderr.startswith("error: ") and dry.stderr.count("\n") == 1
    assert f"recipe.yaml, step 2 ({bad.split(':')[0]}): " in dry.stderr and named in dry.stderr
    assert not out.exists()


@pytest.mark.parametrize("name, options", [
    ("prune-channels", {}), ("prune-heads", {}), ("drop-layers", {"drop": 1}),
    ("prune-experts", {"ratio": 0.5}),
    ("prune-tokens", {"keep": ["0.5@1"]}), ("sparsify-activations", {"sparsity": 0.5}),
    ("refit", {"calib": "photos-calib"}), ("quantize", {}),
])
def test_check_step_stops_every_pass_before_it_loads_the_model(tmp_path, name, options):
    # A new pass: add it above.
    assert set(PASSES_API) == {"prune-channels", "prune-heads", "drop-layers", "prune-experts",
                               "prune-tokens", "sparsify-activations", "refit", "quantize"}
    check_step(Step(name, options), tmp_path / "missing.onnx")  # no such model: nothing was loaded


def test_cli_passes_lists_every_step_with_options():
    result = CliRunner().invoke(main, ["passes"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("drop-layers", "prune-experts", "prune-tokens", "prune-channels", "prune-heads", "refit"):
        assert f"{name}:" in result.stdout
    assert set(PASSES_API) == {"drop-layers", "prune-experts", "prune-tokens", "prune-channels", "prune-heads",
                               "refit", "quantize", "sparsify-activations"}
    assert "target-flops" in result.stdout and "experts-keep" in result.stdout and "<required>" in result.stdout


# ---------- optimize's flags are shorthand for a one-step recipe ----------


def test_optimize_dry_run_prints_the_recipe_its_flags_stand_for(model, tmp_path):
    flags = ("--ratio", 0.4, "--criterion", "l1", "--round-to", 1, "--exclude", "nomatch*")
    printed = invoke("optimize", model, *flags, "--dry-run")
    assert printed.exit_code == 0, printed.output
    recipe_file = write(tmp_path, printed.stdout, "flags.yaml")
    step = load_recipe(recipe_file).steps[0]
    assert step.name == "prune-channels" and step.options["ratio"] == 0.4 and step.options["criterion"] == "l1"
    via_recipe = invoke("run", model, "--recipe", recipe_file, "-o", tmp_path / "a.onnx", "-q")
    via_flags = invoke("optimize", model, *flags, "-o", tmp_path / "b.onnx", "-q", "--no-latency")
    assert via_recipe.exit_code == 0 and via_flags.exit_code == 0, via_recipe.output + via_flags.output
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_optimize_recipe_runs_the_file_and_refuses_pruning_flags(model, tmp_path):
    recipe_file = write(tmp_path, "steps:\n  - prune-channels: {ratio: 0.5, round-to: 1}\n")
    done = invoke("optimize", model, "--recipe", recipe_file, "-o", tmp_path / "a.onnx", "-q")
    assert done.exit_code == 0, done.output
    same = invoke("run", model, "--recipe", recipe_file, "-o", tmp_path / "b.onnx", "-q")
    assert same.exit_code == 0 and (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    mixed = invoke("optimize", model, "--recipe", recipe_file, "--ratio", 0.2, "-o", tmp_path / "c.onnx")
    assert mixed.exit_code == 2 and "leave out --ratio" in mixed.stderr
    assert not (tmp_path / "c.onnx").exists()


def test_optimize_needs_an_output_unless_dry_run(model):
    result = invoke("optimize", model, "--ratio", 0.3)
    assert result.exit_code == 2 and "-o OUTPUT" in result.stderr
