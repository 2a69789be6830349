"""The cookbook's recipes (docs/recipes/*.yaml) stay valid as the API moves.

Every recipe loads, dry-runs through `graphprune run --dry-run` and names only option values the API
knows; those whose steps need no attention, MoE or ViT model run for real on a small residual MLP (the
MoE one on a small com.microsoft MoE model), verified against it. `-m slow` runs every recipe on the zoo
models the cookbook was checked on (docs/cookbook.md).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphprune.allocation import ALLOCATIONS
from graphprune.analysis.groups import PROTECTABLE, UNIT_KINDS
from graphprune.cli import main
from graphprune.criteria import CRITERIA
from graphprune.deploy import MODES
from graphprune.errors import GraphpruneError
from graphprune.models import moe
from graphprune.passes.prune_channels import reconstruct_mode
from graphprune.passes.prune_tokens import check_stages, parse_stage
from graphprune.recipe import Recipe, load_recipe, parse_recipe, run_recipe

DOCS = Path(__file__).resolve().parent.parent / "docs"
RECIPES = sorted((DOCS / "recipes").glob("*.yaml"))
WIDTH, HIDDEN, BLOCKS, CLASSES = 32, 64, 3, 10
# Steps a plain residual MLP can take: no heads, experts or tokens to find there.
MLP_STEPS = {"prune-channels", "drop-layers", "refit", "quantize"}


def residual_mlp() -> onnx.ModelProto:
    """x [n, 32] -> 3 blocks x + fc2(relu(fc1(x))) (hidden 64) -> Gemm to 10 classes; groups wider than 16."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"

    def weight(name: str, shape: tuple[int, ...]) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32),
                                             name))
        return name

    for k in range(BLOCKS):
        p = f"/blocks.{k}"
        nodes += [helper.make_node("MatMul", [x, weight(f"w1_{k}", (WIDTH, HIDDEN))], [f"h{k}"], name=f"{p}/fc1/MatMul"),
                  helper.make_node("Relu", [f"h{k}"], [f"r{k}"], name=f"{p}/Relu"),
                  helper.make_node("MatMul", [f"r{k}", weight(f"w2_{k}", (HIDDEN, WIDTH))], [f"b{k}"],
                                   name=f"{p}/fc2/MatMul"),
                  helper.make_node("Add", [x, f"b{k}"], [f"y{k}"], name=f"{p}/Add")]
        x = f"y{k}"
    inits.append(numpy_helper.from_array(np.zeros(CLASSES, np.float32), "head_b"))
    nodes.append(helper.make_node("Gemm", [x, weight("head_w", (WIDTH, CLASSES)), "head_b"], ["logits"],
                                  name="/classifier/Gemm"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", CLASSES])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cookbook_mlp")
    onnx.save(residual_mlp(), folder / "mlp.onnx")
    np.savez(folder / "calib.npz", x=np.random.default_rng(1).standard_normal((64, WIDTH)).astype(np.float32))
    return folder / "mlp.onnx", folder / "calib.npz"


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cookbook_moe")
    onnx.save(moe.ort_moe(layers=2, experts=6, hidden=16, inter=32), folder / "moe.onnx")
    np.savez(folder / "calib.npz", x=moe.tokens_like(16, 128))
    return folder / "moe.onnx", folder / "calib.npz"


def step_names(recipe: Recipe) -> set[str]:
    return {step.name for step in recipe.steps}


def check_values(recipe: Recipe) -> None:
    """The option values the loader leaves to the API (names of criteria, modes, kinds, roles, stages)."""
    for step in recipe.steps:
        options = step.resolved()
        where = f"{recipe.source}, {step.name}"
        for key in ("ratio", "target_flops", "target_params", "min_ratio"):
            if options.get(key) is not None:
                assert 0.0 <= options[key] < 1.0, where
        if step.name in ("prune-channels", "prune-heads"):
            assert options["criterion"] in CRITERIA, where
            assert options["allocation"] in ALLOCATIONS, where
            assert set(options["units"]) <= set(UNIT_KINDS), where
            assert set(options["protect"]) <= set(PROTECTABLE), where
            assert options["min_ratio"] <= options["max_group_ratio"] <= 1.0, where
            reconstruct_mode(options["reconstruct"])  # raises on an unknown mode
            assert not (options["target_speedup"] and options["reconstruct"]), f"{where}: not combined yet"
            if options["reconstruct"] or options["compensate"]:
                assert options["calib"] is not None, f"{where}: reconstruction needs calib"
        if step.name == "prune-tokens":
            check_stages([parse_stage(k) if isinstance(k, str) else parse_stage(f"{k[1]}@{k[0]}")
                          for k in options["keep"]])
        if step.name == "quantize":
            assert options["mode"] in MODES, where
            if options["mode"] == "qdq":
                assert options["calib"] is not None, f"{where}: qdq needs calib"


def test_the_cookbook_shows_every_recipe_as_it_is():
    assert len(RECIPES) >= 8
    text = (DOCS / "cookbook.md").read_text()
    shown = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)]
    for path in RECIPES:
        assert f"recipes/{path.name}" in text, f"docs/cookbook.md does not link {path.name}"
        assert yaml.safe_load(path.read_text()) in shown, f"docs/cookbook.md shows {path.name} otherwise"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_and_dry_runs(path, mlp, tmp_path, monkeypatch):
    recipe = load_recipe(path)
    check_values(recipe)
    # A dry run checks that the calibration files exist: stand-ins where the recipes expect them.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib").mkdir()
    for name in ("tokens.npz", "moe_tokens.npz"):
        (tmp_path / "calib" / name).write_bytes(b"")
    result = CliRunner().invoke(main, ["run", str(mlp[0]), "--recipe", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed == yaml.safe_load(recipe.to_yaml())
    assert [next(iter(s)) for s in printed["steps"]] == [s.name for s in recipe.steps]


def test_a_broken_recipe_would_be_caught(tmp_path, mlp):
    """The checks above fail on what rots: a renamed option, an unknown criterion, a bad stage."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - prune-channels: {target-flop: 0.3}\n")
    assert CliRunner().invoke(main, ["run", str(mlp[0]), "--recipe", str(bad), "--dry-run"]).exit_code == 2
    with pytest.raises(AssertionError):
        check_values(parse_recipe({"steps": [{"prune-channels": {"criterion": "wanda"}}]}))
    with pytest.raises(GraphpruneError):
        check_values(parse_recipe({"steps": [{"prune-tokens": {"keep": ["3@0.7"]}}]}))


def _runnable(path: Path, model: Path, calib: Path) -> Recipe:
    """The recipe with its calibration data pointed at ``calib`` (the cookbook's paths are examples), and
    quantize's ONNX Runtime preprocessing off (7 s of shape inference on an MLP that needs none)."""
    data = yaml.safe_load(path.read_text())
    if data.get("calib") is not None:
        data["calib"] = str(calib)
    for step in data["steps"]:
        if isinstance(step, dict) and "quantize" in step:
            step["quantize"] = {**(step["quantize"] or {}), "preprocess": False}
    return parse_recipe(data, str(path))


def _run_and_check(recipe: Recipe, model: Path, out: Path) -> None:
    result = run_recipe(model, recipe, out)
    assert result.verification is not None and out.is_file()
    assert result.after.macs < result.before.macs or result.after.params < result.before.params
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.default_rng(2).standard_normal(
        [d if isinstance(d, int) and d > 0 else 4 for d in i.shape]).astype(np.float32) for i in session.get_inputs()}
    assert all(np.isfinite(o).all() for o in session.run(None, feeds))


def _steps_of(path: Path) -> tuple[set[str], bool]:
    """(step names, whether a step has a speedup target); a recipe that does not load runs nowhere here
    (test_recipe_loads_and_dry_runs reports it)."""
    try:
        recipe = load_recipe(path)
    except GraphpruneError:
        return set(), False
    return step_names(recipe), any(s.resolved().get("target_speedup") for s in recipe.steps)


MLP_RECIPES = [p for p in RECIPES if (case := _steps_of(p))[0] and case[0] <= MLP_STEPS and not case[1]]
MOE_RECIPES = [p for p in RECIPES if _steps_of(p)[0] == {"prune-experts"}]


def test_enough_recipes_run_for_real():
    assert len(MLP_RECIPES) >= 5 and MOE_RECIPES


@pytest.mark.parametrize("path", MLP_RECIPES, ids=[p.stem for p in MLP_RECIPES])
def test_recipe_runs_on_a_residual_mlp(path, mlp, tmp_path):
    model, calib = mlp
    _run_and_check(_runnable(path, model, calib), model, tmp_path / "out.onnx")


@pytest.mark.parametrize("path", MOE_RECIPES, ids=[p.stem for p in MOE_RECIPES])
def test_recipe_runs_on_an_moe_model(path, moe_model, tmp_path):
    model, calib = moe_model
    _run_and_check(_runnable(path, model, calib), model, tmp_path / "out.onnx")


# ---------- -m slow: every recipe on the zoo models of docs/cookbook.md's "Checked on" table ----------

# Recipes for other model families than the zoo's MobileNetV2 (the default).
ZOO_MODELS = {"encoder_heads_mlp": "bert", "chain_encoder": "bert", "drop_layers_refit": "bert",
              "moe_experts": "moe", "vit_tokens": "vit"}


def _zoo_case(stem: str, folder: Path, cache: Path) -> tuple[Path, str | None]:
    """(model, calibration spec) for a recipe, as the cookbook checked it; transformer exports go to ``cache``."""
    from graphprune.models import transformer_zoo, zoo

    kind = ZOO_MODELS.get(stem, "mobilenet_v2")
    rng = np.random.default_rng(1)
    if kind == "moe":
        onnx.save(moe.ort_moe(layers=2, experts=6, hidden=32, inter=64), folder / "moe.onnx")
        np.savez(folder / "calib.npz", x=moe.tokens_like(32, 256))
        return folder / "moe.onnx", str(folder / "calib.npz")
    if kind == "vit":
        return transformer_zoo.export("vit", "legacy", cache_dir=cache), None
    if kind == "bert":
        np.savez(folder / "calib.npz", input_ids=rng.integers(0, 100, (32, 16)),
                 attention_mask=np.ones((32, 16), np.int64))
        return transformer_zoo.export("bert", "legacy", cache_dir=cache), str(folder / "calib.npz")
    (folder / "calib").mkdir()
    np.savez(folder / "calib" / "part0.npz", input=rng.standard_normal((32, 3, 32, 32)).astype(np.float32))
    return zoo.export("mobilenet_v2"), str(folder / "calib")


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_on_its_zoo_model(path, tmp_path, tmp_path_factory):
    model, calib = _zoo_case(path.stem, tmp_path, tmp_path_factory.getbasetemp() / "tf")
    data = yaml.safe_load(path.read_text())
    if data.get("calib") not in (None, "photos-calib"):
        data["calib"] = calib
    if data.get("calib") == "photos-calib":
        pytest.importorskip("skimage", reason="the photos calibration set needs scikit-image")
    if path.stem == "vit_tokens":  # written for ViT-Base's 12 layers; the zoo ViT has 2
        with pytest.raises(GraphpruneError, match="encoder layers"):
            run_recipe(model, parse_recipe(data, str(path)), tmp_path / "base.onnx")
        data["steps"][0]["prune-tokens"]["keep"] = ["0.5@0"]
    recipe = parse_recipe(data, str(path))
    result = run_recipe(model, recipe, tmp_path / "out.onnx")
    assert result.verification is not None and (tmp_path / "out.onnx").is_file()
    assert result.after.macs < result.before.macs or result.after.params < result.before.params
