"""sparsify-activations: MLP blocks are found in every exported form (and others declined with a reason),
sparsity 0 is the dense model, the measured dropped share hits the target, the rewritten model is exactly
the numpy SparseMLP reference applied to the model's own weights, and the API, CLI and recipe step work."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphprune import api
from graphprune.cli import main
from graphprune.errors import GraphpruneError
from graphprune.io import prepare
from graphprune.models import transformer_zoo
from graphprune.passes.mlp_patterns import find_mlps
from graphprune.passes.sparsify_activations import ScoreSample
from graphprune.recipe import parse_recipe, run_recipe
from graphprune.runtime_ops.sparse_mlp import OP_TYPE, MLPWeights, Selection, SparseMLPConfig, reference

ort = pytest.importorskip("onnxruntime")

D, H, LAYERS = 16, 48, 2
# kind: (SparseMLP activation, gated)
KINDS = {"relu": ("relu", False), "gelu": ("gelu", False), "gelu_op": ("gelu", False),
         "gelu_tanh": ("gelu_tanh", False), "swiglu": ("silu", True), "gemm_relu": ("relu", False)}


class Builder:
    """A residual stack of MLP blocks x <- x + mlp(x), written as PyTorch's exporters write them."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.weights: list[MLPWeights] = []  # numpy, [in, out], per block

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}/{op}", **attrs))
        return out

    def linear(self, x: str, name: str, n_in: int, n_out: int, bias: bool, gemm: bool = False):
        w = (self.rng.standard_normal((n_in, n_out)) / math.sqrt(n_in)).astype(np.float32)
        b = (self.rng.standard_normal(n_out) * 0.1).astype(np.float32) if bias else None
        if gemm:  # transB=1 with the bias as C, as torch.nn.Linear exports for 2-D inputs
            inputs = [x, self.const(f"{name}.weight", w.T)] + ([self.const(f"{name}.bias", b)] if bias else [])
            return self.node("Gemm", inputs, f"{name}/out", transB=1), w, b
        y = self.node("MatMul", [x, self.const(f"{name}.w", w)], f"{name}/mm")
        if bias:
            y = self.node("Add", [self.const(f"{name}.bias", b), y], f"{name}/out")
        return y, w, b

    def activation(self, kind: str, u: str, name: str) -> str:
        if kind in ("relu", "gemm_relu"):
            return self.node("Relu", [u], f"{name}/relu")
        if kind == "gelu_op":
            return self.node("Gelu", [u], f"{name}/gelu")
        if kind == "gelu":  # legacy exporter: x * (erf(x / sqrt 2) + 1) * 0.5
            e = self.node("Erf", [self.node("Div", [u, self.const(f"{name}.sqrt2", 1.4142135)], f"{name}/div")],
                          f"{name}/erf")
            a = self.node("Add", [e, self.const(f"{name}.one", 1.0)], f"{name}/add")
            return self.node("Mul", [self.node("Mul", [u, a], f"{name}/mul"), self.const(f"{name}.half", 0.5)],
                             f"{name}/mul1")
        if kind == "gelu_tanh":  # GPT-2's gelu_new
            cube = self.node("Mul", [self.node("Pow", [u, self.const(f"{name}.three", 3.0)], f"{name}/pow"),
                                     self.const(f"{name}.c", 0.044715)], f"{name}/cube")
            inner = self.node("Mul", [self.node("Add", [u, cube], f"{name}/add"),
                                      self.const(f"{name}.s", math.sqrt(2 / math.pi))], f"{name}/inner")
            t = self.node("Add", [self.node("Tanh", [inner], f"{name}/tanh"), self.const(f"{name}.one", 1.0)],
                          f"{name}/add1")
            return self.node("Mul", [self.node("Mul", [u, self.const(f"{name}.half", 0.5)], f"{name}/half"), t],
                             f"{name}/gelu")
        raise KeyError(kind)

    def block(self, x: str, k: int, kind: str, bias: bool) -> str:
        name = f"layers.{k}/mlp"
        gemm = kind == "gemm_relu"
        u, w_up, b_up = self.linear(x, f"{name}/up", D, H, bias, gemm)
        w_gate = b_gate = None
        if kind == "swiglu":
            g, w_gate, b_gate = self.linear(x, f"{name}/gate", D, H, bias)
            silu = self.node("Mul", [g, self.node("Sigmoid", [g], f"{name}/sigmoid")], f"{name}/silu")
            hidden = self.node("Mul", [silu, u], f"{name}/glu")
        else:
            hidden = self.activation(kind, u, f"{name}/act")
        y, w_down, b_down = self.linear(hidden, f"{name}/down", H, D, bias, gemm)
        self.weights.append(MLPWeights(w_up, w_down, w_gate, b_up, b_down, b_gate))
        return self.node("Add", [x, y], f"layers.{k}/residual")

    def model(self, output: str, extra_outputs: tuple[str, ...] = (), inputs: tuple[str, ...] = ("x",)):
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (output, *extra_outputs)]
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", D]) for n in inputs]
        graph = helper.make_graph(self.nodes, "mlps", ins, outs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)


def stack(kind: str, bias: bool = True, layers: int = LAYERS, seed: int = 0) -> tuple[onnx.ModelProto, list]:
    b = Builder(seed)
    x = "x"
    for k in range(layers):
        x = b.block(x, k, kind, bias)
    return b.model(x), b.weights


def run(model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def data(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, D)).astype(np.float32)


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=data(128, 1))
    return str(path)


def prepared(proto: onnx.ModelProto) -> ir.Model:
    model = ir.from_proto(proto)
    prepare(model)
    return model


# ---------- finding MLP blocks ----------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_exported_form_is_found(kind, bias):
    proto, _ = stack(kind, bias)
    mlps, declined = find_mlps(prepared(proto))
    activation, gated = KINDS[kind]
    assert [(m.activation, m.gated) for m in mlps] == [(activation, gated)] * LAYERS and not declined
    assert all(bool(m.to_dict()["biases"]) == bias for m in mlps)


def test_unknown_activation_is_declined_with_the_reason():
    b = Builder()
    x = b.block("x", 0, "relu", True)
    u, _, _ = b.linear(x, "odd/up", D, H, True)
    y, _, _ = b.linear(b.node("LeakyRelu", [u], "odd/leaky"), "odd/down", H, D, True)
    result = api.sparsify_activations(b.model(y), sparsity=0.5, check=False)
    assert len(result.layers) == 1
    (declined,) = result.declined
    assert declined["down"] == "odd/down/mm/MatMul" and "LeakyRelu" in declined["reason"]


def test_hidden_value_read_elsewhere_is_declined():
    b = Builder()
    x = b.block("x", 0, "relu", True)
    model = b.model(x, extra_outputs=("layers.0/mlp/act/relu",))
    mlps, declined = find_mlps(prepared(model))
    assert not mlps and "graph output" in declined[0].reason
    with pytest.raises(GraphpruneError, match="no MLP block.*graph output"):
        api.sparsify_activations(model, sparsity=0.5)


def test_gate_and_up_reading_different_inputs_is_declined():
    b = Builder()
    g, _, _ = b.linear("x", "m/gate", D, H, False)
    u, _, _ = b.linear("y", "m/up", D, H, False)
    hidden = b.node("Mul", [b.node("Mul", [g, b.node("Sigmoid", [g], "m/sig")], "m/silu"), u], "m/glu")
    out, _, _ = b.linear(hidden, "m/down", H, D, False)
    mlps, declined = find_mlps(prepared(b.model(out, inputs=("x", "y"))))
    assert not mlps and "different inputs" in declined[0].reason


def test_a_model_without_mlp_is_an_error():
    b = Builder()
    y, _, _ = b.linear("x", "only", D, D, True)
    with pytest.raises(GraphpruneError, match="no MLP block"):
        api.sparsify_activations(b.model(y), sparsity=0.5)


# ---------- what the rewrite computes ----------


@pytest.mark.parametrize("kind", list(KINDS))
def test_sparsity_zero_is_the_dense_model(kind, calib):
    proto, _ = stack(kind)
    result = api.sparsify_activations(proto, sparsity=0.0, where="both", calib=calib)
    assert sum(n.op_type == OP_TYPE for n in result.model.graph) == LAYERS
    assert not any(n.op_type in ("MatMul", "Gemm") for n in result.model.graph)  # the dense nodes are gone
    x = data(9, 7)
    np.testing.assert_allclose(run(result.model, x), run(proto, x), rtol=1e-5, atol=1e-5)
    assert result.verification.worst_relative_l2 < 1e-5


def numpy_stack(x: np.ndarray, weights: list, result, kind: str) -> np.ndarray:
    """The stack with each block replaced by sparse_mlp.reference at the chosen selections."""
    activation, gated = KINDS[kind]
    for w, layer in zip(weights, result.layers, strict=True):
        sides = {s.side: Selection(threshold=s.threshold, k=s.k, wina=result.settings["wina"]) for s in layer.sides}
        x = x + reference(x, w, SparseMLPConfig(activation, gated, sides.get("input"), sides.get("hidden")))
    return x


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("wina", [False, True])
@pytest.mark.parametrize("kind", ["relu", "gelu", "gelu_tanh", "swiglu", "gemm_relu"])
def test_rewritten_model_is_the_numpy_reference(kind, wina, mode, calib):
    proto, weights = stack(kind)
    result = api.sparsify_activations(proto, sparsity=0.5, where="both", wina=wina, mode=mode, calib=calib,
                                      check=False)
    x = data(11, 3)  # not the calibration data: no entry sits on a threshold
    np.testing.assert_allclose(run(result.model, x), numpy_stack(x, weights, result, kind), rtol=1e-4, atol=1e-4)
    assert not np.allclose(run(result.model, x), run(proto, x), atol=1e-3)  # something was dropped


@pytest.mark.parametrize("wina", [False, True])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("kind", ["relu", "gelu", "swiglu"])
def test_measured_sparsity_hits_the_target(kind, sparsity, wina, calib):
    proto, _ = stack(kind)
    result = api.sparsify_activations(proto, sparsity=sparsity, where="both", wina=wina, calib=calib, check=False)
    for layer in result.layers:
        for side in layer.sides:
            # A ReLU's zeros are dropped at any threshold: below their share, the target is their share.
            # The re-fit on the sparse model makes the second block exact too (its upstream is final).
            assert abs(side.measured - max(sparsity, side.already_zero)) < 0.01, (layer.node, side)
    hidden = [s for layer in result.layers for s in layer.sides if s.side == "hidden"]
    assert all(s.already_zero > 0.3 for s in hidden) == (kind == "relu")
    assert result.calibration_fidelity.samples == 16 and result.calibration_fidelity.min_cosine < 1.0


def test_refit_brings_later_blocks_to_the_target(calib):
    from graphprune.calibration import load_calibration
    from graphprune.passes.sparsify_activations import SparsifyActivationsConfig, SparsifyActivationsPass

    deviation = []
    for refits in (0, 1):
        model = prepared(stack("swiglu", layers=4)[0])
        config = SparsifyActivationsConfig(sparsity=0.75, where="both", refits=refits,
                                           calibration=load_calibration(calib, ["x"], 8))
        sparsifying = SparsifyActivationsPass(config)
        sparsifying(model)
        deviation.append(max(abs(s.measured - 0.75) for layer in sparsifying.report.layers for s in layer.sides))
    assert deviation[1] < 0.03 and deviation[0] > 0.1  # one re-fit: 0.026; none: 0.13


def test_topk_keeps_k_per_row():
    proto, _ = stack("gelu")
    result = api.sparsify_activations(proto, sparsity=0.75, where="hidden", mode="topk", check=False)
    for layer in result.layers:
        (side,) = layer.sides
        assert side.k == H // 4 and side.measured == pytest.approx(0.75)
    assert "random inputs" in result.data


def test_auto_sides_and_expected_macs(calib):
    relu = api.sparsify_activations(stack("relu")[0], sparsity=0.5, calib=calib, check=False)
    swiglu = api.sparsify_activations(stack("swiglu")[0], sparsity=0.5, calib=calib, check=False)
    assert [[s.side for s in layer.sides] for layer in relu.layers] == [["input", "hidden"]] * LAYERS
    assert [[s.side for s in layer.sides] for layer in swiglu.layers] == [["hidden"]] * LAYERS
    # gate, up and down MatMuls of LAYERS blocks over the default random shapes' rows
    rows = swiglu.macs["dense_mlp"] // (LAYERS * 3 * D * H)
    assert swiglu.macs["dense_mlp"] == rows * LAYERS * 3 * D * H and rows >= 1
    kept_down = sum(1 - layer.sides[0].measured for layer in swiglu.layers) * rows * D * H
    assert swiglu.macs["expected_mlp"] == pytest.approx(rows * LAYERS * 2 * D * H + kept_down, abs=1)
    assert swiglu.after.macs == swiglu.before.macs - swiglu.macs["dense_mlp"] + swiglu.macs["expected_mlp"]


def test_score_sample_keeps_a_bounded_uniform_sample():
    rng = np.random.default_rng(0)
    sample = ScoreSample(4096, rng)
    for _ in range(20):
        sample.add(rng.random(10_000))
    assert sample.values.size == 4096
    assert sample.threshold(0.3) == pytest.approx(0.3, abs=0.03)
    assert sample.threshold(0.0) == 0.0


# ---------- zoo transformers ----------


@pytest.mark.parametrize(("name", "exporter", "activation", "gated"), [
    ("bert", "legacy", "gelu", False), ("gpt2", "legacy", "gelu_tanh", False),
    ("gpt2", "dynamo", "gelu_tanh", False), ("llama_gqa", "dynamo", "silu", True)])
def test_zoo_transformers(name, exporter, activation, gated):
    path = transformer_zoo.export(name, exporter)
    dense = api.sparsify_activations(path, sparsity=0.0)
    assert [(layer.mlp["activation"], layer.mlp["gated"]) for layer in dense.layers] == \
        [(activation, gated)] * transformer_zoo.LAYERS
    assert dense.verification.worst_relative_l2 < 1e-5 and not dense.declined
    sparse = api.sparsify_activations(path, sparsity=0.5)
    assert all(abs(s.measured - 0.5) < 0.05 for layer in sparse.layers for s in layer.sides)
    assert 0.5 < sparse.verification.min_cosine < 1.0


# ---------- errors, CLI, recipe ----------


@pytest.mark.parametrize(("options", "message"), [
    ({"sparsity": 1.5}, "--sparsity must be in [0, 1]"),
    ({"sparsity": -0.1}, "--sparsity must be in [0, 1]"),
    ({"sparsity": 0.5, "where": "middle"}, "--where must be one of auto, input, hidden, both"),
    ({"sparsity": 0.5, "mode": "random"}, "--mode must be one of threshold, topk"),
    ({"sparsity": 0.5, "calib_batches": 0}, "--calib-batches must be 1 or more"),
])
def test_bad_options_are_one_sentence(options, message):
    with pytest.raises(GraphpruneError) as err:
        api.sparsify_activations(stack("relu")[0], **options)
    text = str(err.value)
    assert text.startswith(message) and text.endswith(".") and "\n" not in text


def test_cli(tmp_path, calib):
    model, out = tmp_path / "m.onnx", tmp_path / "sparse.onnx"
    onnx.save(stack("swiglu")[0], model)
    runner = CliRunner()
    result = runner.invoke(main, ["sparsify-activations", str(model), "-o", str(out), "--sparsity", "0.5",
                                  "--calib", calib, "--no-latency", "--json", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["layers"]) == LAYERS and data["fidelity"]["min_cosine"] < 1.0 and out.exists()
    assert json.loads((tmp_path / "r.json").read_text())["layers"] == data["layers"]
    text = runner.invoke(main, ["sparsify-activations", str(model), "-o", str(out), "--sparsity", "0.25",
                                "--no-latency"])
    assert text.exit_code == 0 and "random inputs" in " ".join(text.output.split())
    bad = runner.invoke(main, ["sparsify-activations", str(model), "-o", str(out), "--sparsity", "2"])
    assert bad.exit_code == 2 and bad.output.startswith("error: --sparsity must be in [0, 1]")
    bad = runner.invoke(main, ["sparsify-activations", str(model), "-o", str(out), "--sparsity", "0.5",
                               "--where", "up"])
    assert bad.exit_code == 2 and bad.output.startswith("error: --where must be one of")


def test_recipe_step(tmp_path, calib):
    model, out = tmp_path / "m.onnx", tmp_path / "r.onnx"
    onnx.save(stack("gelu")[0], model)
    recipe = parse_recipe({"calib": calib, "steps": [{"sparsify-activations": {"sparsity": 0.5, "wina": True}}]})
    result = run_recipe(model, recipe, out)
    assert out.exists() and result.verification is not None
    assert len(result.steps[0]["summary"]["layers"]) == LAYERS
    with pytest.raises(GraphpruneError, match="option 'sparsity' is required"):
        parse_recipe({"steps": ["sparsify-activations"]})
