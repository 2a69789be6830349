"""Per-channel statistics matching after pruning (stat_match.py)."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracle import assert_close, load, relative_error, run
from test_reconstruct import _batches, _chain, saved_with_calibration

from graphprune import api
from graphprune.errors import GraphpruneError
from graphprune.passes.prune_channels import PruneChannelsConfig, PruneChannelsPass
from graphprune.stat_match import _Moments

SCALE = 0.2  # the removed unit is SCALE times the kept one


def _rescaled(seed: int = 0) -> onnx.ModelProto:
    """x -> conv1 (2 units; unit 1 = SCALE x unit 0, bias included) -> conv2 (1x1, reads both with
    positive weights) -> relu -> conv3 -> y. Removing unit 1 turns each conv2 output channel into
    s · (its value) + c exactly, with s > 0: a per-channel affine map that matching undoes."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(1, 3, 3, 3))
    b1 = rng.normal(size=1)
    w1 = np.concatenate([w1, SCALE * w1])
    b1 = np.concatenate([b1, SCALE * b1])
    w2 = rng.uniform(0.5, 1.5, size=(4, 2, 1, 1))
    w3 = rng.normal(size=(3, 4, 3, 3))
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("w1", w1), ("b1", b1), ("w2", w2), ("b2", rng.normal(size=4)), ("w3", w3), ("b3", rng.normal(size=3)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Conv", ["h1", "w2", "b2"], ["h2"], name="conv2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], pads=[1, 1, 1, 1], name="conv3")]
    graph = helper.make_graph(nodes, "rescaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _residual(seed: int) -> onnx.ModelProto:
    """conv0 -> relu -> conv1 -> relu -> conv2 -> + (relu0's output) -> relu -> conv3: the residual branch
    crosses three stages, so a staged run must carry it in its cache."""
    rng = np.random.default_rng(seed)
    shapes = {"w0": (8, 3, 3, 3), "w1": (8, 8, 3, 3), "w2": (8, 8, 1, 1), "w3": (4, 8, 3, 3)}
    inits = []
    for name, shape in shapes.items():
        inits.append(numpy_helper.from_array(rng.normal(scale=1 / np.sqrt(np.prod(shape[1:])), size=shape)
                                             .astype(np.float32), name))
        inits.append(numpy_helper.from_array(rng.normal(scale=0.1, size=shape[0]).astype(np.float32),
                                             "b" + name[1:]))
    pad = {"pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", **pad),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", **pad),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "r0"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3", **pad)]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _rescaled_linear(seed: int = 0) -> onnx.ModelProto:
    """_rescaled as PyTorch exports Linear layers: MatMul then Add of a bias, on [n, 6] rows."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(6, 1))
    b1 = rng.normal(size=1)
    w1, b1 = np.concatenate([w1, SCALE * w1], 1), np.concatenate([b1, SCALE * b1])
    arrays = {"w1": w1, "b1": b1, "w2": rng.uniform(0.5, 1.5, size=(2, 4)), "b2": rng.normal(size=4),
              "w3": rng.normal(size=(4, 3)), "b3": rng.normal(size=3)}
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = []
    source = "x"
    for k in (1, 2, 3):
        nodes += [helper.make_node("MatMul", [source, f"w{k}"], [f"m{k}"], name=f"mm{k}"),
                  helper.make_node("Add", [f"m{k}", f"b{k}"], [f"h{k}" if k < 3 else "y"], name=f"add{k}")]
        source = f"h{k}"
        if k == 2:
            nodes.append(helper.make_node("Relu", ["h2"], ["r2"], name="relu2"))
            source = "r2"
    graph = helper.make_graph(nodes, "rescaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _prune(proto, **options):
    """Prune with plain L2 at round-to 1; on _rescaled only conv1's units (conv2's group reads conv3)."""
    if proto.graph.name == "rescaled":
        options.setdefault("exclude", ("conv3", "mm3"))
    model = load(proto)
    pruning = PruneChannelsPass(PruneChannelsConfig(round_to=1, criterion="l2", **options))
    pruning(model)
    return ir.to_proto(model), pruning


# ---------- the oracle: a removal whose only effect is a per-channel affine map is undone exactly ----------


@pytest.mark.parametrize("mode", ["moments", "regression"])
def test_matching_undoes_a_per_channel_rescaling(mode):
    proto = _rescaled()
    calib = _batches(proto)
    feeds = _batches(proto, count=1, size=5, seed=7)[0]
    expected = run(proto, feeds)
    matched, pruning = _prune(proto, ratio=0.5, calibration=calib, match_stats=mode)
    assert [sorted(units) for units in pruning.plan.removed.values()] == [[1]]
    report = pruning.matching
    assert report.corrected == ["conv1", "conv2"]
    assert [name for name, _ in report.skipped] == ["conv3"]  # the head: it computes the model's output
    assert report.passes == 2  # a chain: one stage per node
    assert_close(expected, run(matched, feeds), rtol=1e-4)
    # Plain slicing loses the removed unit's share; the bias-only correction cannot restore a scale.
    plain, _ = _prune(proto, ratio=0.5)
    sliced = relative_error(expected[0], run(plain, feeds)[0])
    assert sliced > 0.05
    mean_only, _ = _prune(proto, ratio=0.5, calibration=calib, match_stats="mean")
    assert relative_error(expected[0], run(mean_only, feeds)[0]) > 0.2 * sliced


def test_a_linear_layers_bias_add_takes_the_shift():
    """MatMul + Add (a PyTorch Linear): matched on the Add's output, the shift goes into the Add's bias."""
    proto = _rescaled_linear()
    calib = _batches(proto)
    feeds = _batches(proto, count=1, size=5, seed=7)[0]
    matched, pruning = _prune(proto, ratio=0.5, calibration=calib, match_stats="moments")
    assert [sorted(units) for units in pruning.plan.removed.values()] == [[1]]
    assert pruning.matching.corrected == ["mm1", "mm2"]
    assert [name for name, _ in pruning.matching.skipped] == ["mm3"]  # the head
    assert_close(run(proto, feeds), run(matched, feeds), rtol=1e-4)
    plain, _ = _prune(proto, ratio=0.5)
    assert relative_error(run(proto, feeds)[0], run(plain, feeds)[0]) > 0.05


def test_nothing_removed_changes_nothing():
    proto = _rescaled()
    calib = _batches(proto)
    untouched, pruning = _prune(proto, ratio=0.0, calibration=calib, match_stats="moments")
    assert pruning.matching is None
    plain, _ = _prune(proto, ratio=0.0)
    assert untouched.SerializeToString() == plain.SerializeToString()


# ---------- regression mode never raises a node's calibration error --------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_regression_lowers_each_nodes_calibration_error(seed):
    proto = _chain(seed)
    calib = _batches(proto, count=3, size=8, seed=seed + 10)
    _, pruning = _prune(proto, ratio=0.5, calibration=calib, match_stats="regression")
    errors = pruning.matching.errors
    assert set(errors) == {"conv0", "conv1"}  # conv2 computes the output: a head, left alone
    for before, after in errors.values():
        assert after <= before + 1e-9
    assert errors["conv1"][1] < errors["conv1"][0]  # conv1 reads pruned inputs: a real correction


def test_moments_give_the_dense_mean_and_spread():
    rng = np.random.default_rng(0)
    d = rng.normal(loc=[1.0, -2.0, 0.5], scale=[2.0, 0.5, 1.0], size=(500, 3))
    p = 0.3 * d + rng.normal(scale=0.1, size=d.shape) + 4.0
    m = _Moments(3)
    m.add(p[:200], d[:200])
    m.add(p[200:], d[200:])
    s, c, before, after = m.fit("moments")
    corrected = s * p + c
    assert np.allclose(corrected.mean(0), d.mean(0)) and np.allclose(corrected.std(0), d.std(0))
    assert after < before
    s, c, _, after_regression = m.fit("regression")
    assert after_regression <= after + 1e-12  # least squares is the lowest error of any affine map


# ---------- options ------------------------------------------------------------------------------------


def test_mode_is_checked_and_needs_calibration(tmp_path):
    path = saved_with_calibration(_rescaled(), tmp_path)
    with pytest.raises(GraphpruneError, match="match-stats"):
        api.optimize(path, tmp_path / "out.onnx", ratio=0.5, round_to=1, calib=tmp_path / "calib.npz",
                     match_stats="median")
    with pytest.raises(GraphpruneError, match="calibration"):
        api.optimize(path, tmp_path / "out.onnx", ratio=0.5, round_to=1, match_stats="moments")
    assert not (tmp_path / "out.onnx").exists()
    result = api.optimize(path, tmp_path / "out.onnx", ratio=0.5, round_to=1, calib=tmp_path / "calib.npz",
                          match_stats="moments")
    assert result.settings["stat_matching"]["mode"] == "moments"
    assert result.settings["stat_matching"]["corrected"] == 2


# ---------- staged runs from cached values give what runs from the inputs give -----------------------------


@pytest.mark.parametrize("seed", range(2))
def test_cached_stages_match_runs_from_the_inputs(seed, monkeypatch):
    """stat_match runs each stage from the values the last one left (staged.py); with the cache off it
    runs the model from its inputs every time. Both must write the same model, and the cached one must
    run each node about once per batch in all, not once per stage."""
    from graphprune import staged

    proto = _residual(seed)
    calib = _batches(proto, count=3, size=4, seed=seed)
    feeds = _batches(proto, count=1, size=5, seed=9)[0]
    built = []
    real = staged.make_session
    monkeypatch.setattr(staged, "make_session", lambda model, **kw: built.append(model) or real(model, **kw))
    cached, pruning = _prune(proto, ratio=0.5, calibration=calib, match_stats="moments")
    uncached, _ = _prune(proto, ratio=0.5, calibration=calib, match_stats="moments", stage_cache_bytes=0)
    assert pruning.matching.passes == 3 and [n for n, _ in pruning.matching.skipped] == ["conv3"]
    assert_close(run(uncached, feeds), run(cached, feeds), rtol=1e-4)
    ran = [len(m.graph.node) for m in built]
    nodes = len(proto.graph.node)
    assert sum(ran) <= 2 * nodes  # pruned and dense: each node once
    assert len(built) == 2 * pruning.matching.passes


def test_heads_are_the_layers_nearest_the_outputs():
    from graphprune.stat_match import _heads

    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    fc = numpy_helper.from_array(np.ones((4, 5), np.float32), "fc")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="classifier"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 5])], [w, fc])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert {n.name for n in _heads(model.graph)} == {"classifier"}
    # A second output straight from the features makes the conv a head as well.
    model.graph.outputs.append(next(n for n in model.graph if n.name == "relu").outputs[0])
    assert {n.name for n in _heads(model.graph)} == {"classifier", "conv"}


@pytest.mark.parametrize("seed", range(2))
def test_sequential_reconstruction_runs_cached_stages_too(seed):
    """reconstruct_sequential asks each stage for its consumers' inputs through the same staged runner:
    the consumers then run with their new weights in the next stage's part of the model, so the cached
    and the from-the-inputs runs must write the same model."""
    proto = _residual(seed)
    calib = _batches(proto, count=3, size=4, seed=seed)
    feeds = _batches(proto, count=1, size=5, seed=9)[0]
    cached, pruning = _prune(proto, ratio=0.5, calibration=calib, reconstruct="sequential")
    uncached, _ = _prune(proto, ratio=0.5, calibration=calib, reconstruct="sequential", stage_cache_bytes=0)
    assert len(pruning.reconstruction.reconstructed) >= 2
    assert_close(run(uncached, feeds), run(cached, feeds), rtol=1e-4)
    plain, _ = _prune(proto, ratio=0.5)
    assert relative_error(run(proto, feeds)[0], run(cached, feeds)[0]) < relative_error(
        run(proto, feeds)[0], run(plain, feeds)[0])


@pytest.mark.parametrize("reconstruct", [True, "sequential"])
def test_a_pruned_model_can_be_pruned_again(tmp_path, reconstruct):
    """Each step names its new weights afresh: the second step must not reuse a name the first one gave
    (it once counted the initializers, which repeats a name the first step wrote)."""
    path = saved_with_calibration(_residual(3), tmp_path)
    calib = tmp_path / "calib.npz"
    once = api.optimize(path, tmp_path / "once.onnx", ratio=0.25, round_to=1, calib=calib,
                        reconstruct=reconstruct, match_stats="moments")
    twice = api.optimize(tmp_path / "once.onnx", tmp_path / "twice.onnx", ratio=0.25, round_to=1, calib=calib,
                         reconstruct=reconstruct, match_stats="moments")
    assert twice.after.params < once.after.params < once.before.params
    names = [i.name for i in onnx.load(tmp_path / "twice.onnx").graph.initializer]
    assert len(names) == len(set(names))
    x = np.load(calib)["x"]
    assert run(onnx.load(tmp_path / "twice.onnx"), {"x": x})[0].shape == run(onnx.load(path), {"x": x})[0].shape


def test_a_batch_extent_written_as_minus_one_is_dynamic(tmp_path):
    """paddle2onnx writes a dynamic batch as dim_value -1; the staged runs once read it as a fixed batch
    of -1 and found no samples in the calibration data."""
    proto = _residual(4)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32))
    result = api.optimize(path, tmp_path / "out.onnx", ratio=0.25, round_to=1, calib=tmp_path / "calib.npz",
                          reconstruct=True, match_stats="moments", check=False)
    assert result.settings["stat_matching"]["corrected"] == 3
