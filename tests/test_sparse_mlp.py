"""SparseMLP (runtime_ops/sparse_mlp.py): the standard-ops function in ONNX Runtime and the C kernel both
match the numpy reference at every sparsity, batch size, activation and score; an independent dense numpy
MLP checks the reference itself at zero sparsity."""

from __future__ import annotations

import os
from math import erf

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes import common

from graphprune.errors import GraphpruneError
from graphprune.runtime_ops.sparse_mlp import (
    DOMAIN,
    OP_TYPE,
    MLPWeights,
    Selection,
    SparseMLPConfig,
    insert_sparse_mlp,
    reference,
    sparse_mlp_model,
)

ort = pytest.importorskip("onnxruntime")

D, H, O = 24, 64, 20
SHARES = (1.0, 0.5, 0.25, 0.1, 0.0)
FORMS = {  # name: (activation, gated, biases)
    "relu": ("relu", False, ("up", "down")),
    "gelu": ("gelu", False, ()),
    "swiglu": ("silu", True, ()),
    "geglu_tanh": ("gelu_tanh", True, ("up", "down", "gate")),
}


def weights(form: str, seed: int = 0, dtype=np.float32) -> MLPWeights[np.ndarray]:
    _, gated, biases = FORMS[form]
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype)

    def b(n: int, which: str) -> np.ndarray | None:
        return (rng.standard_normal(n) * 0.1).astype(dtype) if which in biases else None

    return MLPWeights(w(D, H), w(H, O), w(D, H) if gated else None, b(H, "up"), b(O, "down"),
                      b(H, "gate") if gated else None)


def dense_numpy(x: np.ndarray, w: MLPWeights[np.ndarray], activation: str) -> np.ndarray:
    """The plain MLP, written independently of sparse_mlp.reference."""
    x64 = x.astype(np.float64)

    def affine(m, b):
        return x64 @ m.astype(np.float64) + (0 if b is None else b)

    acts = {
        "relu": lambda v: np.maximum(v, 0),
        "gelu": lambda v: v * 0.5 * (1 + np.array([erf(t) for t in (v / np.sqrt(2)).ravel()]).reshape(v.shape)),
        "silu": lambda v: v / (1 + np.exp(-v)),
        "gelu_tanh": lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3))),
    }
    act = acts[activation]
    up = affine(w.w_up, w.b_up)
    hidden = act(affine(w.w_gate, w.b_gate)) * up if w.w_gate is not None else act(up)
    return hidden @ w.w_down.astype(np.float64) + (0 if w.b_down is None else w.b_down)


def _cut(scores: np.ndarray, share: float) -> float:
    """A threshold keeping about `share` of the scores, midway between two well-separated ones so that
    float rounding in ORT's matmuls cannot move a score across it."""
    flat = np.sort(scores.ravel().astype(np.float64))
    drop = round((1 - share) * flat.size)
    if drop == 0:
        return 0.0
    if drop == flat.size:
        return float(flat[-1] * 2 + 1)
    drop = max(range(max(1, drop - 2), min(flat.size, drop + 3)), key=lambda i: flat[i] - flat[i - 1])
    assert flat[drop] - flat[drop - 1] > 1e-6 * max(1.0, abs(flat[drop])), "test data too close to the cut"
    return float((flat[drop - 1] + flat[drop]) / 2)


def config(form: str, w: MLPWeights[np.ndarray], x: np.ndarray, share: float, mode: str,
           wina: bool) -> SparseMLPConfig:
    """Both matmuls sparsified to `share`; thresholds from this x, as calibration would set them."""
    activation, gated, _ = FORMS[form]
    if mode == "topk":
        return SparseMLPConfig(activation, gated, Selection(k=round(share * D), wina=wina),
                               Selection(k=round(share * H), wina=wina))
    rows = x.reshape(-1, D)
    s_in = np.linalg.norm(np.hstack([w.w_up, w.w_gate]) if gated else w.w_up, axis=1) if wina else 1
    inp = Selection(threshold=_cut(np.abs(rows) * s_in, share), wina=wina)
    # The hidden activation after the input selection, from the reference with a dense hidden stage.
    hidden = reference(rows, MLPWeights(w.w_up, np.eye(H, dtype=x.dtype), w.w_gate, w.b_up, None, w.b_gate),
                       SparseMLPConfig(activation, gated, inp))
    s_hidden = np.linalg.norm(w.w_down, axis=1) if wina else 1
    return SparseMLPConfig(activation, gated, inp, Selection(threshold=_cut(np.abs(hidden) * s_hidden, share),
                                                             wina=wina))


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def close(actual: np.ndarray, expected: np.ndarray, tol: float = 2e-5) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


def inputs(seed: int, batch: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).standard_normal((batch, D)).astype(np.float32)


@pytest.mark.parametrize("wina", [False, True], ids=["abs", "wina"])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("form", list(FORMS))
def test_function_body_matches_reference(form: str, mode: str, wina: bool) -> None:
    w = weights(form)
    for batch in (1, 3):
        x = inputs(len(form), batch)
        for share in SHARES:
            cfg = config(form, w, x, share, mode, wina)
            model = sparse_mlp_model(w, cfg)
            expected = reference(x, w, cfg)
            close(run_ort(model, x), expected)
            if share == 0.0 and w.b_down is None:
                assert not expected.any()  # nothing kept: only the biases remain


@pytest.mark.parametrize("wina", [False, True], ids=["abs", "wina"])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("form", list(FORMS))
def test_kernel_matches_reference(form: str, mode: str, wina: bool) -> None:
    kernel = pytest.importorskip("graphprune.runtime_ops.sparse_mlp_kernel")
    ok, reason = kernel.available()
    if not ok:
        pytest.skip(reason)
    w = weights(form)
    for batch in (1, 3):
        x = inputs(len(form), batch)
        for share in SHARES:
            cfg = config(form, w, x, share, mode, wina)
            close(kernel.SparseMLPKernel(w, cfg, threads=2)(x), reference(x, w, cfg))


@pytest.mark.parametrize("form", list(FORMS))
def test_zero_sparsity_is_the_dense_mlp(form: str) -> None:
    w = weights(form)
    x = inputs(1, 4)
    dense = dense_numpy(x, w, FORMS[form][0])
    activation, gated, _ = FORMS[form]
    for cfg in (SparseMLPConfig(activation, gated),
                SparseMLPConfig(activation, gated, Selection(threshold=0.0), Selection(threshold=0.0)),
                SparseMLPConfig(activation, gated, Selection(k=D, wina=True), Selection(k=H))):
        close(reference(x, w, cfg), dense)
        close(run_ort(sparse_mlp_model(w, cfg), x), dense)


def test_selection_is_per_row_at_batch_above_one() -> None:
    w = weights("relu")
    x = inputs(7, 4)
    cfg = SparseMLPConfig("relu", input=Selection(k=3), hidden=Selection(k=5))
    batched = run_ort(sparse_mlp_model(w, cfg), x)
    one_by_one = np.concatenate([run_ort(sparse_mlp_model(w, cfg), row[None]) for row in x])
    close(batched, one_by_one)
    # Rows choose different entries, so a shared selection would differ.
    chosen = [set(np.argsort(-np.abs(row))[:3]) for row in x]
    assert len({frozenset(c) for c in chosen}) > 1


def test_top_k_ties_go_to_the_lower_index() -> None:
    w = weights("relu")
    rng = np.random.default_rng(8)
    x = np.where(rng.random((2, D)) > 0.5, 1.0, -1.0).astype(np.float32)  # all scores tie
    x[1, ::3] = 0.5
    cfg = SparseMLPConfig("relu", input=Selection(k=7))
    expected = reference(x, w, cfg)
    kept = x.copy()
    kept[0, 7:] = 0  # row 0: the first 7; row 1: the first 7 of the entries with |x| = 1
    ones = [i for i in range(D) if abs(x[1, i]) == 1]
    kept[1, [i for i in range(D) if i not in ones[:7]]] = 0
    close(expected, dense_numpy(kept, w, "relu"))
    close(run_ort(sparse_mlp_model(w, cfg), x), expected)
    kernel = pytest.importorskip("graphprune.runtime_ops.sparse_mlp_kernel")
    if kernel.available()[0]:
        close(kernel.SparseMLPKernel(w, cfg)(x), expected)


def test_any_leading_shape_and_float16() -> None:
    w = weights("swiglu")
    cfg = SparseMLPConfig("silu", True, Selection(k=8), Selection(threshold=0.05, wina=True))
    x = np.random.default_rng(3).standard_normal((2, 3, D)).astype(np.float32)
    close(run_ort(sparse_mlp_model(w, cfg, leading=("b", "s")), x), reference(x, w, cfg))
    w16 = weights("swiglu", dtype=np.float16)
    x16 = x[0].astype(np.float16)
    got = run_ort(sparse_mlp_model(w16, cfg), x16)
    assert got.dtype == np.float16
    close(got.astype(np.float32), reference(x16, w16, cfg).astype(np.float32), tol=5e-3)


def test_model_checks_and_converts_to_ort_format(tmp_path) -> None:
    w = weights("geglu_tanh")
    x = inputs(2, 2)
    cfg = config("geglu_tanh", w, x, 0.25, "threshold", True)
    model = sparse_mlp_model(w, cfg)
    onnx.checker.check_model(model, full_check=True)
    (function,) = model.functions
    assert (function.domain, function.name) == (DOMAIN, OP_TYPE)
    assert all(n.domain in ("", "ai.onnx") for n in function.node), "the body must be standard ops only"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = os.fspath(tmp_path / "sparse_mlp.ort")
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    converted = ort.InferenceSession(os.fspath(tmp_path / "sparse_mlp.ort"), providers=["CPUExecutionProvider"])
    close(converted.run(None, {"x": x})[0], reference(x, w, cfg))


def _dense_block_model(w: MLPWeights[np.ndarray]) -> onnx.ModelProto:
    """x -> MatMul/Add/Relu/MatMul/Add -> + x (residual) -> y, and the MLP output itself as a second output."""
    nodes = [helper.make_node("MatMul", ["x", "w_up"], ["u0"]), helper.make_node("Add", ["u0", "b_up"], ["u"]),
             helper.make_node("Relu", ["u"], ["h"]), helper.make_node("MatMul", ["h", "w_down"], ["m0"]),
             helper.make_node("Add", ["m0", "b_down"], ["mlp"]), helper.make_node("Add", ["mlp", "x"], ["y"])]
    inits = [numpy_helper.from_array(getattr(w, n), n) for n in ("w_up", "b_up", "w_down", "b_down")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", D]),
                               helper.make_tensor_value_info("mlp", TensorProto.FLOAT, ["b", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_insert_replaces_a_dense_mlp_in_a_model() -> None:
    rng = np.random.default_rng(5)
    w = MLPWeights(rng.standard_normal((D, H)).astype(np.float32) / 5, rng.standard_normal((H, D)).astype(np.float32) / 8,
                   b_up=rng.standard_normal(H).astype(np.float32) / 10,
                   b_down=rng.standard_normal(D).astype(np.float32) / 10)
    x = inputs(9, 3)
    original = _dense_block_model(w)
    cfg = SparseMLPConfig("relu", input=Selection(threshold=0.4, wina=True), hidden=Selection(k=16))
    model = ir.serde.deserialize_model(original)
    values = {v.name: v for v in model.graph.initializers.values()}
    mlp = next(v for v in model.graph.outputs if v.name == "mlp")
    node = insert_sparse_mlp(model, model.graph.inputs[0], MLPWeights(
        values["w_up"], values["w_down"], b_up=values["b_up"], b_down=values["b_down"]), cfg, replace=mlp)
    common.RemoveUnusedNodesPass()(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node] == [OP_TYPE, "Add"]  # the dense nodes are gone
    assert node.outputs[0].name == "mlp" and proto.ir_version >= 10
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y, out = session.run(["y", "mlp"], {"x": x})
    expected = reference(x, w, cfg)
    close(out, expected)
    close(y, expected + x)
    # The original model is untouched and still computes the dense block.
    dense = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    close(dense.run(["mlp"], {"x": x})[0], dense_numpy(x, w, "relu"))


def test_two_forms_share_one_model() -> None:
    w_relu = weights("relu")
    rng = np.random.default_rng(1)
    # The second MLP (SwiGLU) reads the first one's output, of width O.
    w_glu = MLPWeights(*(rng.standard_normal(shape).astype(np.float32) / 4 for shape in ((O, H), (H, O), (O, H))))
    cfg1 = SparseMLPConfig("relu", hidden=Selection(k=10))
    cfg2 = SparseMLPConfig("silu", True, Selection(k=5, wina=True))
    model = ir.serde.deserialize_model(sparse_mlp_model(w_relu, cfg1))
    graph = model.graph
    second = {}
    for field in ("w_up", "w_down", "w_gate"):
        array = getattr(w_glu, field)
        second[field] = ir.Value(name=f"glu_{field}", shape=ir.Shape(array.shape), type=ir.TensorType(
            ir.DataType.FLOAT), const_value=ir.tensor(array, name=f"glu_{field}"))
        graph.register_initializer(second[field])
    node = insert_sparse_mlp(model, graph.outputs[0], MLPWeights(**second), cfg2, name="glu")
    graph.outputs.append(node.outputs[0])
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert len(proto.functions) == 2 and len({f.overload for f in proto.functions}) == 2
    x = inputs(4, 2)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    first, out = session.run(None, {"x": x})
    close(first, reference(x, w_relu, cfg1))
    close(out, reference(first, w_glu, cfg2))


def test_bad_requests_are_one_sentence_errors() -> None:
    with pytest.raises(GraphpruneError, match="exactly one of threshold and k"):
        Selection(threshold=0.1, k=3)
    with pytest.raises(GraphpruneError, match="unknown SparseMLP activation 'tanh'"):
        SparseMLPConfig("tanh")
    w = weights("relu")
    with pytest.raises(GraphpruneError, match="input top-k 99 exceeds the 24 input entries"):
        sparse_mlp_model(w, SparseMLPConfig(input=Selection(k=99)))
    with pytest.raises(GraphpruneError, match="gated config needs W_gate"):
        sparse_mlp_model(w, SparseMLPConfig("silu", gated=True))
    with pytest.raises(GraphpruneError, match="needs opset 13 or later"):
        sparse_mlp_model(w, SparseMLPConfig(), opset=12)
    model = ir.serde.deserialize_model(sparse_mlp_model(w, SparseMLPConfig()))
    values = {v.name: v for v in model.graph.initializers.values()}
    mlp = MLPWeights(values["w_up"], values["w_down"])
    insert_sparse_mlp(model, model.graph.inputs[0], mlp, SparseMLPConfig(), name="second")
    with pytest.raises(GraphpruneError, match="already has a value named 'second_out'"):
        insert_sparse_mlp(model, model.graph.inputs[0], mlp, SparseMLPConfig(), name="second")


def test_kernels_build_once_and_rebuild_when_the_source_changes(tmp_path, monkeypatch) -> None:
    from graphprune.runtime_ops import native

    if native.compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("GRAPHPRUNE_CACHE", os.fspath(tmp_path / "cache"))
    monkeypatch.setattr(native, "KERNELS", tmp_path)
    native.load.cache_clear()
    try:
        for answer in (1, 2):
            (tmp_path / "probe.c").write_text(f"int gp_probe(void) {{ return {answer}; }}\n")
            native.load.cache_clear()
            assert native.load("probe").gp_probe() == answer
        assert len(list((tmp_path / "cache" / "kernels").glob("probe-*.so"))) == 1
        monkeypatch.setattr(native, "compiler", lambda: None)
        native.load.cache_clear()
        with pytest.raises(native.KernelUnavailable, match="no C compiler found"):
            native.load("probe")
    finally:
        native.load.cache_clear()
