"""Calibration data, activation statistics, activation-aware criteria and FLAP bias compensation."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracle import assert_close, load, run

from graphprune.analysis import build_dim_graph
from graphprune.analysis.groups import find_groups
from graphprune.calibration import ChannelStats, collect_stats, load_calibration
from graphprune.criteria import score_group, stats_requests
from graphprune.errors import GraphpruneError
from graphprune.passes.prune_channels import PruneChannelsConfig, PruneChannelsPass

DEAD = [1, 4, 6]  # planted units of the hidden layer
HIDDEN = 8


def _model(kind: str, seed: int = 0, dead_bias: float = 0.7) -> onnx.ModelProto:
    """x -> layer 1 (HIDDEN units; DEAD ones have zero weights and a positive bias) -> Relu -> layer 2.

    The DEAD units are constant (= dead_bias) on every input: removing them with bias compensation is
    exact, without it the outputs shift by layer 2's weights times that constant.
    """
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    if kind == "conv":
        w1 = rng.normal(size=(HIDDEN, 3, 3, 3))
        w1[DEAD] = 0
        b1 = rng.normal(size=HIDDEN)
        b1[DEAD] = dead_bias
        nodes += [helper.make_node("Conv", ["x", const("w1", w1), const("b1", b1)], ["h"], pads=[1, 1, 1, 1],
                                   name="conv1"),
                  helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("Conv", ["r", const("w2", rng.normal(size=(4, HIDDEN, 1, 1)))], ["y"],
                                   name="conv2")]
        x_shape, y_shape = ["n", 3, 5, 5], ["n", 4, 5, 5]
    elif kind == "gemm":
        w1 = rng.normal(size=(HIDDEN, 3))
        w1[DEAD] = 0
        b1 = rng.normal(size=HIDDEN)
        b1[DEAD] = dead_bias
        nodes += [helper.make_node("Gemm", ["x", const("w1", w1), const("b1", b1)], ["h"], transB=1,
                                   name="fc1"),
                  helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("Gemm", ["r", const("w2", rng.normal(size=(HIDDEN, 4)))], ["y"], alpha=0.5,
                                   name="fc2")]
        x_shape, y_shape = ["n", 3], ["n", 4]
    else:  # matmul + add
        w1 = rng.normal(size=(3, HIDDEN))
        w1[:, DEAD] = 0
        b1 = rng.normal(size=HIDDEN)
        b1[DEAD] = dead_bias
        nodes += [helper.make_node("MatMul", ["x", const("w1", w1)], ["m1"], name="mm1"),
                  helper.make_node("Add", ["m1", const("b1", b1)], ["h"], name="add1"),
                  helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("MatMul", ["r", const("w2", rng.normal(size=(HIDDEN, 4)))], ["m2"],
                                   name="mm2"),
                  helper.make_node("Add", ["m2", const("b2", rng.normal(size=4))], ["y"], name="add2")]
        x_shape, y_shape = ["n", 2, 3], ["n", 2, 4]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batches(proto, count=3, size=4, seed=1):
    shape = [size if isinstance(d, str) else d for d in
             [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]]
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(count)]


def _prune(proto, **options):
    model = load(proto)
    pruning = PruneChannelsPass(PruneChannelsConfig(round_to=1, ratio=len(DEAD) / HIDDEN, **options))
    pruning(model)
    import onnx_ir as ir

    return ir.to_proto(model), pruning


# ---------- loading ----------------------------------------------------------------------------


def test_npz_npy_folder_rechunk(tmp_path):
    a, b = np.arange(30, dtype=np.float64).reshape(5, 3, 2), np.ones((4, 3, 2))
    np.savez(tmp_path / "one.npz", x=a, other=np.zeros(1))
    np.save(tmp_path / "two.npy", b)
    batches = list(load_calibration(tmp_path, ["x"], 4, ranks={"x": 3}, dtypes={"x": np.float32}))
    assert [f["x"].shape[0] for f in batches] == [4, 4, 1]
    assert batches[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in batches]), np.concatenate([a, b]))
    assert len(list(load_calibration(tmp_path / "one.npz", ["x"], 2, max_batches=2))) == 2
    assert len(list(load_calibration(tmp_path / "two.npy", ["x"], 10))) == 1


def test_files_of_different_sample_shapes_never_share_a_batch(tmp_path):
    np.savez(tmp_path / "a.npz", ids=np.zeros((5, 64), dtype=np.int64))
    np.savez(tmp_path / "b.npz", ids=np.ones((6, 3), dtype=np.int64))
    shapes = [f["ids"].shape for f in load_calibration(tmp_path, ["ids"], 4)]
    assert shapes == [(4, 64), (1, 64), (4, 3), (2, 3)]


def test_named_dataset_photos():
    pytest.importorskip("skimage")
    calib = list(load_calibration("photos-calib", ["input"], 16, max_batches=1))
    assert calib[0]["input"].shape == (16, 3, 224, 224)


def test_named_photos_follow_the_input_layout_and_size():
    pytest.importorskip("skimage")
    nhwc = next(iter(load_calibration("photos-calib", ["img"], 4, shapes={"img": (None, 160, 192, 3)})))
    nchw = next(iter(load_calibration("photos-calib", ["img"], 4, shapes={"img": (1, 3, 160, 192)})))
    assert nhwc["img"].shape == (4, 160, 192, 3) and nchw["img"].shape == (4, 3, 160, 192)
    np.testing.assert_array_equal(nhwc["img"], nchw["img"].transpose(0, 2, 3, 1))
    symbolic = next(iter(load_calibration("photos-calib", ["img"], 2, shapes={"img": (None, 3, None, None)})))
    assert symbolic["img"].shape == (2, 3, 224, 224)
    with pytest.raises(GraphpruneError, match="rank 4; input 'ids' has rank 2"):
        next(iter(load_calibration("photos-calib", ["ids"], 2, shapes={"ids": (1, 128)})))


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such file"),
    (lambda d: np.savez(d / "c.npz", y=np.zeros((2, 3))), "no array for input(s) x"),
    (lambda d: np.savez(d / "c.npz", x=np.zeros((2, 3, 4, 5))), "rank 4"),
    (lambda d: np.save(d / "c.npy", np.zeros((2, 3))), "single-input"),
    (lambda d: (d / "c.npz").write_bytes(b"garbage"), "cannot be read"),
])
def test_bad_calibration_names_the_file(tmp_path, setup, message):
    setup(tmp_path)
    names = ["x", "mask"] if message == "single-input" else ["x"]
    found = sorted(tmp_path.iterdir())
    spec = found[0] if found else tmp_path / "missing.npz"
    with pytest.raises(GraphpruneError, match="missing|c.np") as err:
        list(load_calibration(spec, names, 2, ranks={"x": 2}))
    assert message in str(err.value)


# ---------- inputs that are not samples on axis 0 (a recurrent state, a scalar) --------------------------


def _recurrent(batch) -> onnx.ModelProto:
    """Silero-VAD-shaped: x [batch, 8], state [2, batch, 4] (batch on axis 1), sr a scalar int64 ->
    h = Relu(x W + state[0] + state[1]) * sr / 16000, out = h V [batch, 2], stateN = [h, -h]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(4, 2)).astype(np.float32), "v"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
             numpy_helper.from_array(np.float32(1 / 16000), "per_hz")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0),
             helper.make_node("Add", ["xw", "s"], ["pre"]),
             helper.make_node("Relu", ["pre"], ["r"]),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["srf", "per_hz"], ["scale"]),
             helper.make_node("Mul", ["r", "scale"], ["h"]),
             helper.make_node("MatMul", ["h", "v"], ["out"]),
             helper.make_node("Neg", ["h"], ["minus"]),
             helper.make_node("Unsqueeze", ["h", "axis0"], ["h0"]),
             helper.make_node("Unsqueeze", ["minus", "axis0"], ["h1"]),
             helper.make_node("Concat", ["h0", "h1"], ["stateN"], axis=0)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch, 4]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 2]),
               helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, batch, 4])]
    graph = helper.make_graph(nodes, "recurrent", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _recurrent_calib(proto, spec, batch_size=8):
    from graphprune.calibration import model_inputs

    names, ranks, dtypes = model_inputs(load(proto))
    assert ranks == {"x": 2, "state": 3, "sr": 0}
    return load_calibration(spec, names, batch_size, ranks=ranks, dtypes=dtypes)


# "batch": silero-vad's case, where state's static axis 0 (2) once passed for a fixed batch size and every
# batch-1 feed was dropped, so the statistics came back empty.
@pytest.mark.parametrize("batch", [1, "batch"])
@pytest.mark.parametrize("x_layout", ["samples", "stacked"])
def test_recurrent_state_and_scalar_feed_and_collect_stats(tmp_path, batch, x_layout):
    proto = _recurrent(batch)
    rng = np.random.default_rng(1)
    n = 5
    x = rng.normal(size=(n, 8)).astype(np.float32)
    state = rng.normal(size=(n, 2, 1, 4)).astype(np.float32)
    # x as samples [N, 8] (model rank 2) or as a stack of whole feeds [N, 1, 8] (rank 3): the same feeds
    np.savez(tmp_path / "vad.npz", x=x if x_layout == "samples" else x[:, None], state=state,
             sr=np.array(16000, dtype=np.int64))
    calib = _recurrent_calib(proto, tmp_path / "vad.npz")
    feeds = list(calib)
    assert len(feeds) == n  # one item per batch: a stack is never concatenated
    for i, f in enumerate(feeds):
        assert {k: v.shape for k, v in f.items()} == {"x": (1, 8), "state": (2, 1, 4), "sr": ()}
        assert f["sr"].dtype == np.int64 and f["sr"] == 16000
        np.testing.assert_array_equal(f["x"][0], x[i])
        np.testing.assert_array_equal(f["state"], state[i])
        out, state_n = run(proto, f)
        assert out.shape == (1, 2) and state_n.shape == (2, 1, 4)
    h = np.maximum(x @ numpy_helper.to_array(proto.graph.initializer[0]) + state.sum(1)[:, 0], 0)
    stats = collect_stats(load(proto), [("h", 1), ("state", 2)], calib)
    assert stats[("h", 1)].count == n
    np.testing.assert_allclose(stats[("h", 1)].mean, h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats[("h", 1)].sq_norm, (h.astype(np.float64) ** 2).sum(0), rtol=1e-5)
    assert stats[("state", 2)].count == 2 * n


def test_scalar_input_fixed_or_one_value_per_item(tmp_path):
    proto = _recurrent(1)
    x, state = np.ones((3, 8), np.float32), np.zeros((3, 2, 1, 4), np.float32)
    np.savez(tmp_path / "a.npz", x=x, state=state, sr=np.array([8000]))  # [1]: fixed, like a scalar
    np.savez(tmp_path / "b.npz", x=x, state=state, sr=np.array([8000, 16000, 8000]))  # [N]: one per item
    fixed = list(_recurrent_calib(proto, tmp_path / "a.npz"))
    per_item = list(_recurrent_calib(proto, tmp_path / "b.npz"))
    assert [f["sr"].shape for f in fixed + per_item] == [()] * 6
    assert [int(f["sr"]) for f in fixed + per_item] == [8000] * 3 + [8000, 16000, 8000]
    assert all(f["sr"].dtype == np.int64 for f in fixed)  # cast to the model's dtype


def test_samples_with_a_fixed_scalar_batch_and_never_mix_scalars(tmp_path):
    # an input of rank 1 read as samples next to a scalar fed with every batch; files with another scalar,
    # or with a stack, never share a batch with the pending samples
    np.savez(tmp_path / "a.npz", x=np.arange(5.0), sr=np.array(16000))
    np.savez(tmp_path / "b.npz", x=np.arange(3.0), sr=np.array(16000))
    np.savez(tmp_path / "c.npz", x=np.arange(2.0), sr=np.array(8000))
    np.savez(tmp_path / "d.npz", x=np.arange(4.0).reshape(2, 2), sr=np.array(8000))
    batches = list(load_calibration(tmp_path, ["x", "sr"], 4, ranks={"x": 1, "sr": 0}))
    assert [(f["x"].shape, int(f["sr"])) for f in batches] == [
        ((4,), 16000), ((4,), 16000), ((2,), 8000), ((2,), 8000), ((2,), 8000)]
    assert [list(f) for f in batches] == [["x", "sr"]] * 5  # scalars last (_split reads axis 0 of the first)
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in batches[:2]]), np.r_[np.arange(5.0),
                                                                                      np.arange(3.0)])


@pytest.mark.parametrize("arrays, ranks, message", [
    ({"x": np.zeros((3, 8)), "state": np.zeros((3, 1, 2, 1, 4)), "sr": np.array(1)},
     {"x": 2, "state": 3, "sr": 0}, "input 'state' has rank 5 (shape [3, 1, 2, 1, 4]) but the model expects rank 3"),
    ({"x": np.zeros((3, 8)), "state": np.zeros((3, 2, 1, 4)), "sr": np.zeros((3, 1))},
     {"x": 2, "state": 3, "sr": 0}, "input 'sr' has rank 2 (shape [3, 1]) but the model expects a scalar"),
    ({"x": np.zeros((3, 8)), "state": np.zeros((4, 2, 1, 4)), "sr": np.array(1)},
     {"x": 2, "state": 3, "sr": 0}, "different sample counts along axis 0 (x 3, state 4)"),
    ({"x": np.zeros((3, 8)), "state": np.zeros((3, 2, 1, 4)), "sr": np.array(1)},
     None, "input 'sr' is a scalar; put samples on axis 0"),  # the model's ranks unknown
])
def test_arrays_that_fit_no_layout_name_the_file_and_input(tmp_path, arrays, ranks, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(GraphpruneError, match="bad.npz") as err:
        list(load_calibration(tmp_path / "bad.npz", ["x", "state", "sr"], 2, ranks=ranks))
    assert message in str(err.value)


def test_empty_folder_fails(tmp_path):
    with pytest.raises(GraphpruneError, match="no .npz or .npy"):
        load_calibration(tmp_path, ["x"], 2)


# ---------- statistics ---------------------------------------------------------------------------


def test_stats_match_numpy():
    proto = _model("conv")
    batches = _batches(proto)
    model = load(proto)
    stats = collect_stats(model, [("r", 1), ("x", 1), ("y", 0)], batches)
    with_r = onnx.helper.make_model(_with_output(proto, "r"), opset_imports=proto.opset_import)
    r = np.concatenate([run(with_r, f)[1] for f in batches])
    rows = np.moveaxis(r, 1, -1).reshape(-1, HIDDEN).astype(np.float64)
    s = stats[("r", 1)]
    assert s.count == rows.shape[0]
    np.testing.assert_allclose(s.mean, rows.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s.var, rows.var(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(s.sq_norm, (rows**2).sum(0), rtol=1e-6)
    np.testing.assert_allclose(s.max_abs, np.abs(rows).max(0), rtol=1e-6)
    assert np.all(s.var[DEAD] < 1e-9)
    x = np.concatenate([f["x"] for f in batches])
    np.testing.assert_allclose(stats[("x", 1)].mean, x.mean((0, 2, 3)), rtol=1e-5)
    assert stats[("y", 0)].count == 3 * 4 * 5 * 5 and len(stats[("y", 0)].mean) == 4


def _with_output(proto, name):
    graph = onnx.GraphProto()
    graph.CopyFrom(proto.graph)
    graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return graph


def test_channel_stats_are_stable_far_from_zero():
    s = ChannelStats.empty(1)
    rows = 1e4 + np.random.default_rng(0).normal(size=(1000, 1))
    for chunk in np.split(rows, 10):
        s.add(chunk, 1)
    np.testing.assert_allclose(s.var, rows.var(0), rtol=1e-6)


# ---------- criteria -----------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["wanda-sp", "flap", "act-norm"])
@pytest.mark.parametrize("plant", ["zero-activation", "zero-weights"])
def test_planted_units_score_lowest(criterion, plant):
    # zero-activation: the DEAD units are 0 after the Relu (bias 0); zero-weights: layer 2 never reads them.
    proto = _model("conv", dead_bias=0.0 if plant == "zero-activation" else 0.7)
    if plant == "zero-weights":
        w2 = numpy_helper.to_array(proto.graph.initializer[2]).copy()
        w2[:, DEAD] = 0
        w1 = numpy_helper.to_array(proto.graph.initializer[0]).copy()
        w1[DEAD] = 1.0  # they are produced and vary: only the reading side is dead
        proto.graph.initializer[2].CopyFrom(numpy_helper.from_array(w2, "w2"))
        proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    model = load(proto)
    g = build_dim_graph(model)
    group = next(gr for gr in find_groups(g) if gr.prunable)
    stats = collect_stats(model, stats_requests(g, [group]), _batches(proto))
    scores, used = score_group(g, group, criterion, np.random.default_rng(0), stats)
    assert used == criterion
    assert set(np.argsort(scores, kind="stable")[: len(DEAD)]) == set(DEAD)
    assert np.all(scores[DEAD] <= 1e-6 * scores.max())


@pytest.mark.parametrize("criterion", ["wanda-sp", "flap", "act-norm"])
def test_without_data_criteria_fall_back_and_say_so(criterion):
    proto = _model("conv")
    g = build_dim_graph(load(proto))
    group = next(gr for gr in find_groups(g) if gr.prunable)
    _, used = score_group(g, group, criterion, np.random.default_rng(0))
    expected = "l2 (act-norm: no calibration data)" if criterion == "act-norm" else f"{criterion}/data-free"
    assert used == expected


# ---------- bias compensation oracle --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "gemm", "matmul"])
def test_compensation_makes_removing_constant_units_exact(kind):
    proto = _model(kind)
    calib = _batches(proto)
    feeds = _batches(proto, count=1, size=5, seed=7)[0]
    expected = run(proto, feeds)
    compensated, pruning = _prune(proto, criterion="flap", calibration=calib, compensate=True)
    assert [sorted(units) for units in pruning.plan.removed.values()] == [DEAD]
    assert pruning.compensation.compensated and not pruning.compensation.skipped
    assert_close(expected, run(compensated, feeds), rtol=1e-5)
    plain, _ = _prune(proto, criterion="flap", calibration=calib, compensate=False)
    error = np.abs(run(plain, feeds)[0] - expected[0]).max() / np.abs(expected[0]).max()
    assert error > 1e-2, "without compensation the constant units' removal should show"


def test_truncated_runs_give_the_same_values_and_skip_the_rest(monkeypatch):
    """Staged passes (sequential reconstruction, statistics matching) ask for early outputs only: the
    truncated model must give the same arrays while running none of the nodes after them."""
    from test_reconstruct import _batches, _chain

    from graphprune import calibration

    model = ir.from_proto(_chain(0))
    batches = _batches(_chain(0), count=2, size=4)
    built = []
    real = calibration.make_session
    monkeypatch.setattr(calibration, "make_session", lambda proto, **kw: built.append(proto) or real(proto, **kw))
    full = list(calibration._run_with_outputs(model, ["c0"], batches, None))
    cut = list(calibration._run_with_outputs(model, ["c0"], batches, None, truncate=True))
    assert len(full) == len(cut) == 2
    for a, b in zip(full, cut):
        np.testing.assert_array_equal(a["c0"], b["c0"])
    assert [n.name for n in built[0].graph.node] == ["conv0", "relu0", "conv1", "relu1", "conv2"]
    assert [n.name for n in built[1].graph.node] == ["conv0"]
    assert [o.name for o in built[1].graph.output] == ["c0"]
    assert sorted(t.name for t in built[1].graph.initializer) == ["b0", "w0"]
    # Only a graph input asked for (refit's first layer reads the model input): nothing to cut.
    inputs_only = list(calibration._run_with_outputs(model, ["x"], batches, None, truncate=True))
    np.testing.assert_array_equal(inputs_only[0]["x"], batches[0]["x"])
