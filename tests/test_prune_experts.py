"""prune-experts: ONNX Runtime's MoE routing as the pass assumes it, the oracle (experts the router never
selects on the data go, and the outputs on that data do not move), the budget, top-k validity, the
data-free fallback, QMoE, declined routers, the API and the command line."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from graphprune import api
from graphprune.cli import main
from graphprune.errors import GraphpruneError
from graphprune.io import prepare
from graphprune.models import moe
from graphprune.passes.prune_experts import find_moe_layers

HIDDEN = 16


def run(model, x):
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def initializers(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.fixture
def tokens():
    return moe.tokens_like(HIDDEN, 64, seed=1)


@pytest.fixture
def calib(tmp_path, tokens):
    path = tmp_path / "calib.npz"
    np.savez(path, x=tokens)
    return path


def _softmax(a):
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _reference(proto, x, k, normalize):
    """numpy MoE as the pass assumes ONNX Runtime computes it: softmax of the logits over all experts,
    top k, gate weights optionally renormalised over the k."""
    w = initializers(proto)
    p = _softmax(x.astype(np.float64) @ w["moe.router.weight"] + w["moe.router.bias"])
    y = np.zeros(x.shape)
    for t in range(len(x)):
        top = np.argsort(-p[t], kind="stable")[:k]
        gates = p[t, top] / (p[t, top].sum() if normalize else 1.0)
        for e, g in zip(top, gates, strict=True):
            h = np.maximum(w["moe.experts.fc1"][e] @ x[t] + w["moe.experts.fc1_bias"][e], 0)
            y[t] += g * (w["moe.experts.fc2"][e] @ h + w["moe.experts.fc2_bias"][e])
    return y


@pytest.mark.parametrize("normalize", [0, 1])
def test_ort_moe_routing_semantics(normalize, tokens):
    proto = moe.ort_moe(experts=6, k=2, normalize=normalize)
    np.testing.assert_allclose(run(proto, tokens), _reference(proto, tokens, 2, normalize), atol=1e-5)


# ---------- the oracle ----------


@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("budget", [{"experts_keep": 4}, {"ratio": 0.34}])
def test_never_selected_experts_go_and_nothing_changes(normalize, budget, calib, tokens, tmp_path):
    # Experts 1 and 4 have router logits ~-1e4: softmax weight 0, never in the top k, in both layers.
    proto = moe.ort_moe(layers=2, experts=6, k=2, normalize=normalize, dead=[1, 4])
    out = tmp_path / "pruned.onnx"
    result = api.prune_experts(proto, out, calib=calib, **budget)
    assert [c.removed for c in result.layers] == [[1, 4], [1, 4]]
    assert all(c.exact and c.removed_routes == 0 and c.frequency[1] == 0 for c in result.layers)
    np.testing.assert_array_equal(run(str(out), tokens), run(proto, tokens))
    # The experts are gone, not merely unused: the router has 4 outputs and every stack 4 experts.
    w = initializers(onnx.load(out))
    assert w["layer0.router.weight"].shape == (HIDDEN, 4) and w["layer1.router.bias"].shape == (4,)
    assert w["layer0.experts.fc1"].shape[0] == w["layer1.experts.fc2_bias"].shape[0] == 4
    assert result.after.params < result.before.params


def test_normalized_gates_are_unchanged_where_removed_experts_keep_softmax_mass(calib, tokens, tmp_path):
    # A milder bias (-4): the dead experts are still never in the top 2 but hold some softmax mass.
    proto = moe.ort_moe(experts=6, k=2, normalize=1, dead=[1, 4], dead_bias=-4.0)
    result = api.prune_experts(proto, tmp_path / "p.onnx", experts_keep=4, calib=calib)
    (choice,) = result.layers
    assert choice.removed == [1, 4] and choice.removed_routes == 0 and choice.removed_mass_max > 1e-3
    assert choice.exact
    np.testing.assert_allclose(run(str(tmp_path / "p.onnx"), tokens), run(proto, tokens), rtol=1e-5, atol=1e-6)


def test_unnormalized_gates_grow_by_the_removed_softmax_mass(calib, tokens, tmp_path):
    # normalize_routing_weights=0: each token's output is scaled by 1 / (1 - m_t), m_t the removed mass.
    proto = moe.ort_moe(experts=6, k=2, normalize=0, dead=[1, 4], dead_bias=-4.0)
    result = api.prune_experts(proto, tmp_path / "p.onnx", experts_keep=4, calib=calib)
    (choice,) = result.layers
    assert choice.removed == [1, 4] and choice.removed_routes == 0 and not choice.exact
    w = initializers(proto)
    p = _softmax(tokens.astype(np.float64) @ w["moe.router.weight"] + w["moe.router.bias"])
    mass = p[:, [1, 4]].sum(axis=1)
    assert choice.removed_mass_max == pytest.approx(mass.max(), rel=1e-6)
    dense, pruned = run(proto, tokens), run(str(tmp_path / "p.onnx"), tokens)
    assert np.abs(pruned - dense).max() > 1e-3
    np.testing.assert_allclose(pruned, dense / (1 - mass[:, None]), rtol=1e-4, atol=1e-5)


def test_routing_frequency_and_gate_weight_rank_the_experts(calib, tokens):
    proto = moe.ort_moe(experts=6, k=2, normalize=1)
    result = api.prune_experts(proto, experts_keep=3, calib=calib)
    (choice,) = result.layers
    w = initializers(proto)
    p = _softmax(tokens.astype(np.float64) @ w["moe.router.weight"] + w["moe.router.bias"])
    top = np.argsort(-p, axis=1, kind="stable")[:, :2]
    gates = np.take_along_axis(p, top, 1) / np.take_along_axis(p, top, 1).sum(1, keepdims=True)
    summed = np.bincount(top.ravel(), gates.ravel(), minlength=6)
    np.testing.assert_allclose(choice.gate_weight, summed, rtol=1e-6)  # ORT logits are float32
    np.testing.assert_allclose(choice.frequency, np.bincount(top.ravel(), minlength=6) / len(tokens))
    assert choice.kept == sorted(np.argsort(-summed, kind="stable")[:3].tolist())
    assert choice.removed_routes == int(np.isin(top, choice.removed).sum()) > 0 and not choice.exact


@pytest.mark.parametrize("budget", [{"experts_keep": 6}, {"ratio": 0.0}])
def test_keeping_every_expert_changes_nothing(budget, calib, tokens, tmp_path):
    proto = moe.ort_moe(layers=2, experts=6)
    out = tmp_path / "same.onnx"
    result = api.prune_experts(proto, out, calib=calib, **budget)
    assert all(c.removed == [] for c in result.layers) and result.after.params == result.before.params
    np.testing.assert_array_equal(run(str(out), tokens), run(proto, tokens))


def test_swiglu_experts(calib, tokens, tmp_path):
    proto = moe.ort_moe(experts=6, swiglu=True, dead=[0, 5])
    result = api.prune_experts(proto, tmp_path / "p.onnx", experts_keep=4, calib=calib)
    assert result.layers[0].removed == [0, 5]
    np.testing.assert_array_equal(run(str(tmp_path / "p.onnx"), tokens), run(proto, tokens))


def test_qmoe_never_selected_experts_go_and_nothing_changes(calib, tokens, tmp_path):
    proto = moe.ort_qmoe(experts=6, dead=[0, 3])
    out = tmp_path / "q.onnx"
    result = api.prune_experts(proto, out, experts_keep=4, calib=calib)
    assert result.layers[0].removed == [0, 3] and result.layers[0].op == "QMoE"
    np.testing.assert_array_equal(run(str(out), tokens), run(proto, tokens))
    w = initializers(onnx.load(out))
    assert w["moe.experts.fc1"].shape == (4, 32, HIDDEN) and w["moe.experts.fc2_scales"].shape == (4, HIDDEN)


# ---------- budget, top-k, data-free ----------


def test_top_k_must_stay_valid():
    with pytest.raises(GraphpruneError, match=r"fewer than its top-k \(k=2\)"):
        api.prune_experts(moe.ort_moe(experts=6, k=2), experts_keep=1)
    with pytest.raises(GraphpruneError, match=r"fewer than its top-k \(k=2\)"):
        api.prune_experts(moe.ort_moe(experts=4, k=2), ratio=0.75)
    with pytest.raises(GraphpruneError, match="more than the 6 experts"):
        api.prune_experts(moe.ort_moe(experts=6), experts_keep=7)
    with pytest.raises(GraphpruneError, match="one of them"):
        api.prune_experts(moe.ort_moe(), experts_keep=2, ratio=0.5)


def test_data_free_fallback_ranks_by_weight_norm_and_says_so(tokens):
    proto = moe.ort_moe(experts=6, k=2)
    for tensor in proto.graph.initializer:  # expert 2 gets tiny weights: the smallest norm
        if tensor.name in ("moe.experts.fc1", "moe.experts.fc2"):
            array = numpy_helper.to_array(tensor).copy()
            array[2] *= 0.01
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    result = api.prune_experts(proto, experts_keep=5)
    assert result.data.startswith("data-free") and result.layers[0].removed == [2]
    assert result.layers[0].frequency is None and result.layers[0].exact is None


def test_declined_routers_are_reported():
    proto = moe.ort_moe(experts=4)
    # A Softmax between router and MoE: dropping a column would renormalise it before the op's own softmax.
    moe_node = next(n for n in proto.graph.node if n.op_type == "MoE")
    moe_node.input[1] = "probs"
    proto.graph.node.insert(len(proto.graph.node) - 1,
                            helper.make_node("Softmax", ["moe.router_logits"], ["probs"], name="router/Softmax"))
    model = ir.from_proto(proto)
    prepare(model)
    layers, declined = find_moe_layers(model)
    assert layers == [] and "Softmax" in declined[0]["reason"]
    with pytest.raises(GraphpruneError, match="no MoE layer to prune.*Softmax"):
        api.prune_experts(proto, experts_keep=2)


# ---------- command line ----------


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_end_to_end(tmp_path, calib, tokens):
    model = tmp_path / "moe.onnx"
    onnx.save(moe.ort_moe(layers=2, experts=6, dead=[1, 4]), model)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke("prune-experts", model, "-o", out, "--ratio", 0.34, "--calib", calib, "--report", report,
                    "--no-latency")
    assert result.exit_code == 0, result.output
    assert "Kept 8 of 12 experts in 2 MoE layer(s)" in result.stdout
    data = json.loads(report.read_text())
    assert [layer["removed"] for layer in data["layers"]] == [[1, 4], [1, 4]]
    assert all(layer["exact_on_calibration"] for layer in data["layers"])
    assert data["fidelity"]["worst_max_abs_error"] == 0.0
    np.testing.assert_array_equal(run(str(out), tokens), run(str(model), tokens))


def test_cli_top_k_error_fails_cleanly(tmp_path):
    model = tmp_path / "moe.onnx"
    onnx.save(moe.ort_moe(experts=6, k=2), model)
    out = tmp_path / "out.onnx"
    result = invoke("prune-experts", model, "-o", out, "--experts-keep", 1, "--no-latency")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: keeping 1 of the 6 experts") and len(result.stderr.splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["moe.onnx"]


# ---------- the written-out form: transformers' Mixtral exported with experts_implementation='batched_mm' ----------


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("mixtral")
    path = moe.export_mixtral(folder / "mixtral.onnx", layers=2, experts=6, k=2, dead=[1, 4])
    feeds = moe.token_ids(16, 12)
    np.savez(folder / "calib.npz", **feeds)
    return path, folder / "calib.npz", feeds


def _run_feeds(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_mixtral_router_and_stacks_are_found(mixtral):
    path, _, _ = mixtral
    model = ir.load(str(path))
    prepare(model)
    layers, declined = find_moe_layers(model)
    assert declined == [] and [layer.name for layer in layers] == ["model/layers.0/mlp", "model/layers.1/mlp"]
    for layer in layers:
        assert (layer.op, layer.experts, layer.k, layer.normalize) == ("written-out", 6, 2, True)
        assert [n.op_type for n, _, _ in layer.router] == ["MatMul"]
        assert sorted(n.inputs[0].name.rsplit(".", 1)[-1] for n, _ in layer.stacks) == ["down_proj", "gate_up_proj"]


def test_mixtral_never_selected_experts_go_and_nothing_changes(mixtral, tmp_path):
    path, calib, feeds = mixtral
    out = tmp_path / "pruned.onnx"
    result = api.prune_experts(path, out, experts_keep=4, calib=calib)
    assert [c.removed for c in result.layers] == [[1, 4], [1, 4]]
    assert all(c.exact and c.removed_routes == 0 for c in result.layers)
    np.testing.assert_allclose(_run_feeds(out, feeds), _run_feeds(path, feeds), rtol=1e-6, atol=1e-6)
    w = initializers(onnx.load(out))
    assert sorted(v.shape[0] for name, v in w.items() if name.endswith(("gate_up_proj", "down_proj"))) == [4] * 4
    # Pruning experts that are selected changes the outputs (the oracle can fail).
    moved = api.prune_experts(path, tmp_path / "more.onnx", experts_keep=2, calib=calib)
    assert all(c.removed_routes > 0 and not c.exact for c in moved.layers)
    assert np.abs(_run_feeds(tmp_path / "more.onnx", feeds) - _run_feeds(path, feeds)).max() > 1e-3


def test_gemm_router_with_transposed_weight(calib, tokens, tmp_path):
    proto = moe.ort_moe(experts=6, dead=[2, 3])
    w = initializers(proto)
    nodes = [n for n in proto.graph.node if n.op_type == "MoE"]
    gemm = helper.make_node("Gemm", ["x", "router_t", "moe.router.bias"], ["moe.router_logits"], transB=1,
                            name="moe/router/Gemm")
    del proto.graph.node[:]
    proto.graph.node.extend([gemm, *nodes])
    proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w["moe.router.weight"].T),
                                                           "router_t"))
    out = tmp_path / "gemm.onnx"
    result = api.prune_experts(proto, out, experts_keep=4, calib=calib)
    assert result.layers[0].removed == [2, 3]
    np.testing.assert_array_equal(run(str(out), tokens), run(proto, tokens))
    assert initializers(onnx.load(out))["router_t"].shape == (4, HIDDEN)
