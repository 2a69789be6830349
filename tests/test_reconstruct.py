"""Least-squares reconstruction of consumer weights (reconstruct.py) and the Gram matrices it reads."""

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracle import assert_close, load, relative_error, run

from graphprune import api
from graphprune.calibration import Gram, Patches, collect_gram
from graphprune.errors import GraphpruneError
from graphprune.passes.prune_channels import PruneChannelsConfig, PruneChannelsPass
from graphprune.reconstruct import solve

HIDDEN = 8
DEPENDENT = [2, 5]  # hidden units that are linear combinations of the others


def _combination(rng, kept_rows: np.ndarray) -> np.ndarray:
    """Rows for DEPENDENT: small random combinations of the kept rows (so act-norm ranks them lowest)."""
    return rng.normal(scale=0.05, size=(len(DEPENDENT), kept_rows.shape[0])) @ kept_rows


def _model(kind: str, seed: int = 0) -> onnx.ModelProto:
    """x -> producer (HIDDEN units, DEPENDENT ones linear combinations of the rest, biases included) ->
    no nonlinearity -> consumer that reads the DEPENDENT units with large weights -> y."""
    rng = np.random.default_rng(seed)
    kept = [u for u in range(HIDDEN) if u not in DEPENDENT]
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    # The producer as [HIDDEN, features] rows with the bias as a last column: combinations of whole rows.
    features = {"conv": 3 * 9, "gemm": 6, "matmul": 6}[kind]
    rows = rng.normal(size=(HIDDEN, features + 1))
    rows[DEPENDENT] = _combination(rng, rows[kept])
    w1, b1 = rows[:, :-1], rows[:, -1]
    if kind == "conv":
        w2 = rng.normal(size=(5, HIDDEN, 3, 3))
        w2[:, DEPENDENT] *= 30
        nodes += [helper.make_node("Conv", ["x", const("w1", w1.reshape(HIDDEN, 3, 3, 3)), const("b1", b1)],
                                   ["h"], pads=[1, 1, 1, 1], name="conv1"),
                  helper.make_node("Conv", ["h", const("w2", w2), const("b2", rng.normal(size=5))], ["y"],
                                   pads=[1, 1, 1, 1], name="conv2")]
        x_shape, y_shape = ["n", 3, 6, 6], ["n", 5, 6, 6]
    elif kind == "gemm":
        w2 = rng.normal(size=(HIDDEN, 4))
        w2[DEPENDENT] *= 30
        nodes += [helper.make_node("Gemm", ["x", const("w1", w1), const("b1", b1)], ["h"], transB=1,
                                   name="fc1"),
                  helper.make_node("Gemm", ["h", const("w2", w2), const("c2", rng.normal(size=4))], ["y"],
                                   alpha=0.5, beta=2.0, name="fc2")]
        x_shape, y_shape = ["n", 6], ["n", 4]
    else:
        w2 = rng.normal(size=(HIDDEN, 4))
        w2[DEPENDENT] *= 30
        nodes += [helper.make_node("MatMul", ["x", const("w1", w1.T)], ["m1"], name="mm1"),
                  helper.make_node("Add", ["m1", const("b1", b1)], ["h"], name="add1"),
                  helper.make_node("MatMul", ["h", const("w2", w2)], ["m2"], name="mm2"),
                  helper.make_node("Add", ["m2", const("b2", rng.normal(size=4))], ["y"], name="add2")]
        x_shape, y_shape = ["n", 2, 6], ["n", 2, 4]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batches(proto, count=4, size=16, seed=1):
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    shape = [size if isinstance(d, str) else d for d in dims]
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(count)]


def _prune(proto, **options):
    model = load(proto)
    config = PruneChannelsConfig(round_to=1, ratio=len(DEPENDENT) / HIDDEN, criterion="act-norm", **options)
    pruning = PruneChannelsPass(config)
    pruning(model)
    return ir.to_proto(model), pruning


# ---------- the oracle: removing linear combinations of kept units and reconstructing is exact ----------


@pytest.mark.parametrize("kind", ["conv", "gemm", "matmul"])
def test_reconstruction_recovers_linearly_dependent_units(kind):
    proto = _model(kind)
    calib = _batches(proto)
    feeds = _batches(proto, count=1, size=5, seed=7)[0]
    expected = run(proto, feeds)
    rebuilt, pruning = _prune(proto, calibration=calib, reconstruct=True, reconstruct_damp=1e-9)
    assert [sorted(units) for units in pruning.plan.removed.values()] == [DEPENDENT]
    report = pruning.reconstruction
    assert len(report.reconstructed) == 1 and not report.skipped
    assert_close(expected, run(rebuilt, feeds), rtol=1e-4)
    # Plain slicing loses the dependent units' large contribution.
    plain, _ = _prune(proto, calibration=calib)
    sliced = relative_error(expected[0], run(plain, feeds)[0])
    assert sliced > 0.1
    # The default ridge (towards the sliced weights) recovers most of it, not all.
    damped, _ = _prune(proto, calibration=calib, reconstruct=True)
    assert relative_error(expected[0], run(damped, feeds)[0]) < 0.1 * sliced


def test_reconstruction_replaces_bias_compensation_for_its_consumers():
    proto = _model("gemm")
    calib = _batches(proto)
    _, pruning = _prune(proto, calibration=calib, reconstruct=True, compensate=True)
    assert pruning.reconstruction.reconstructed == ["fc2"]
    assert pruning.compensation.compensated == [] and pruning.compensation.skipped == []


# ---------- never worse than plain slicing ---------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("damp", [0.0, 1e-3, 1.0])
def test_solve_never_worse_than_slicing(seed, intercept, damp):
    rng = np.random.default_rng(seed)
    n, features, out = int(rng.integers(5, 60)), int(rng.integers(3, 20)), int(rng.integers(1, 6))
    x = rng.normal(size=(n, features)) * rng.uniform(0.1, 3, size=features) + rng.normal(size=features)
    gram = Gram.empty(features)
    gram.add(x)
    w = rng.normal(size=(features, out))
    columns = np.sort(rng.choice(features, size=int(rng.integers(1, features)), replace=False))
    new, shift, before, after = solve(gram, w, columns, damp, intercept)
    assert after <= before + 1e-9
    # The reported errors are the objective, computed from the rows themselves.
    direct = np.linalg.norm(x @ w)
    assert before == pytest.approx(np.linalg.norm(x @ w - x[:, columns] @ w[columns]) / direct, rel=1e-6)
    assert after == pytest.approx(np.linalg.norm(x @ w - x[:, columns] @ new - shift) / direct, rel=1e-6,
                                  abs=1e-9)
    if not intercept:
        assert not np.any(shift)


def test_pass_reports_lower_calibration_error_on_a_random_model():
    proto = _model("conv", seed=3)
    rng = np.random.default_rng(5)
    for init in proto.graph.initializer:  # random weights: nothing is a linear combination any more
        array = rng.normal(size=numpy_helper.to_array(init).shape).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(array, init.name))
    calib = _batches(proto)
    _, pruning = _prune(proto, calibration=calib, reconstruct=True)
    (before, after), = pruning.reconstruction.errors.values()
    assert after < before
    # On held-out data the reconstructed consumer is closer to the dense model too (enough samples).
    feeds = _batches(proto, count=1, size=8, seed=9)[0]
    expected = run(proto, feeds)[0]
    plain, _ = _prune(proto, calibration=calib)
    rebuilt, _ = _prune(proto, calibration=calib, reconstruct=True)
    assert relative_error(expected, run(rebuilt, feeds)[0]) < relative_error(expected, run(plain, feeds)[0])


# ---------- Gram matrices: im2col rows reproduce the conv ------------------------------------------


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 0, 2, 1]},
    {"strides": [2, 1], "dilations": [1, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER"},
    {"auto_pad": "VALID", "strides": [1, 2]},
    {"kernel": (1, 1), "strides": [2, 3]},
    {"kernel": (1, 1), "pads": [0, 1, 0, 0]},
])
def test_im2col_rows_reproduce_the_conv(attrs):
    rng = np.random.default_rng(0)
    attrs = dict(attrs)
    kernel = attrs.pop("kernel", (3, 2))
    w = rng.normal(size=(4, 3, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 7, 6])
    graph = helper.make_graph([node], "c", [x_info],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(2, 3, 7, 6)).astype(np.float32)
    y = run(proto, {"x": x})[0]
    patches = Patches(1, kernel, tuple(attrs.get("strides", ())), tuple(attrs.get("pads", ())),
                      tuple(attrs.get("dilations", ())), attrs.get("auto_pad", "NOTSET"))
    rows = list(patches.rows(x))
    for sample, r in enumerate(rows):
        np.testing.assert_allclose(r @ w.reshape(4, -1).T.astype(np.float64),
                                   y[sample].reshape(4, -1).T, rtol=1e-4, atol=1e-4)
    grams = collect_gram(load(proto), [("x", patches)], [{"x": x}])
    stacked = np.concatenate(rows)
    np.testing.assert_allclose(grams[("x", patches)].gram, stacked.T @ stacked, rtol=1e-10)
    assert grams[("x", patches)].count == stacked.shape[0]


# ---------- options --------------------------------------------------------------------------------


def test_api_reconstruct_needs_calibration_and_reports(tmp_path):
    proto = _model("gemm")
    with pytest.raises(GraphpruneError, match="--reconstruct needs calibration data"):
        api.optimize(proto, ratio=0.25, round_to=1, reconstruct=True, check=False)
    np.savez(tmp_path / "calib.npz", x=np.concatenate([b["x"] for b in _batches(proto)]))
    result = api.optimize(proto, ratio=0.25, round_to=1, criterion="act-norm", calib=tmp_path / "calib.npz",
                          reconstruct=True, check=False)
    assert result.settings["reconstruct"] is True
    assert result.settings["reconstruction"]["reconstructed"] == 1


def test_wide_consumers_are_skipped_and_reported():
    proto = _model("conv")
    _, pruning = _prune(proto, calibration=_batches(proto), reconstruct=True, reconstruct_max_features=50)
    assert not pruning.reconstruction.reconstructed
    why = "72 input features (channels × taps) exceed the limit 50"
    assert pruning.reconstruction.skipped == [("conv2", why)]


def test_memory_bounded_passes_give_the_same_result():
    """With a Gram budget of one consumer per pass, each pass still sees the dense model's activations."""
    from graphprune.analysis import build_dim_graph
    from graphprune.analysis.groups import find_groups
    from graphprune.plan import PlanConfig, make_plan
    from graphprune.reconstruct import reconstruct_consumers
    from graphprune.rewrite import apply_removal

    rng = np.random.default_rng(2)
    sizes = [6, 8, 8, 3]
    inits = [numpy_helper.from_array(rng.normal(size=(a, b)).astype(np.float32), f"w{i}")
             for i, (a, b) in enumerate(itertools.pairwise(sizes))]
    names = ["x", "h0", "h1", "y"]
    nodes = [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]], name=f"mm{i}") for i in range(3)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = _batches(proto)
    outputs = []
    for budget in (1 << 30, 1):
        model = load(proto)
        g = build_dim_graph(model)
        plan = make_plan(g, find_groups(g), PlanConfig(ratio=0.25, round_to=1))
        report, _ = reconstruct_consumers(g, plan, calib, gram_bytes=budget)
        assert sorted(report.reconstructed) == ["mm1", "mm2"] and report.passes == (1 if budget > 1 else 2)
        apply_removal(g, plan.removed)
        outputs.append(run(ir.to_proto(model), calib[0])[0])
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


# ---------- sequential reconstruction: fitted on the pruned model's own activations ----------------------


@pytest.mark.parametrize("kind", ["conv", "gemm", "matmul"])
def test_sequential_reconstruction_recovers_linearly_dependent_units(kind):
    proto = _model(kind)
    calib = _batches(proto)
    feeds = _batches(proto, count=1, size=5, seed=7)[0]
    expected = run(proto, feeds)
    rebuilt, pruning = _prune(proto, calibration=calib, reconstruct="sequential", reconstruct_damp=1e-9)
    assert [sorted(units) for units in pruning.plan.removed.values()] == [DEPENDENT]
    report = pruning.reconstruction
    assert report.mode == "sequential" and len(report.reconstructed) == 1 and not report.skipped
    assert report.passes == 1
    assert_close(expected, run(rebuilt, feeds), rtol=1e-4)


def _chain(seed: int) -> onnx.ModelProto:
    """conv -> relu -> conv -> relu -> conv, random weights and biases."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    widths = [3, 12, 12, 6]
    source = "x"
    for i in range(3):
        w = rng.normal(scale=1 / np.sqrt(9 * widths[i]), size=(widths[i + 1], widths[i], 3, 3))
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(scale=0.1, size=widths[i + 1]).astype(np.float32), f"b{i}")]
        out = "y" if i == 2 else f"c{i}"
        nodes.append(helper.make_node("Conv", [source, f"w{i}", f"b{i}"], [out], pads=[1, 1, 1, 1], name=f"conv{i}"))
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            source = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("seed", range(4))
def test_sequential_is_never_worse_than_one_shot_on_a_chain(seed):
    proto = _chain(seed)
    calib = _batches(proto, count=3, size=8, seed=seed + 10)
    errors = {}
    for mode in (True, "sequential"):
        model = load(proto)
        pruning = PruneChannelsPass(PruneChannelsConfig(round_to=1, ratio=0.5, criterion="l2", calibration=calib,
                                                        reconstruct=mode))
        pruning(model)
        assert len(pruning.reconstruction.reconstructed) == 2  # conv1 and conv2 lose input channels
        pruned = ir.to_proto(model)
        errors[mode] = np.mean([relative_error(run(proto, f)[0], run(pruned, f)[0]) for f in calib])
    assert pruning.reconstruction.passes == 2  # one stage per consumer
    assert errors["sequential"] <= errors[True] * (1 + 1e-6)


def saved_with_calibration(proto, folder):
    """The model as m.onnx in ``folder`` and one batch of its calibration data as calib.npz there."""
    path = folder / "m.onnx"
    onnx.save(proto, path)
    np.savez(folder / "calib.npz", x=_batches(proto, count=1)[0]["x"])
    return path


def test_reconstruct_mode_is_checked_and_reported(tmp_path):
    path = saved_with_calibration(_model("gemm"), tmp_path)
    with pytest.raises(GraphpruneError, match="reconstruct-mode"):
        api.optimize(path, tmp_path / "out.onnx", ratio=0.25, round_to=1, calib=tmp_path / "calib.npz",
                     reconstruct="layer-wise")
    result = api.optimize(path, tmp_path / "out.onnx", ratio=0.25, round_to=1, calib=tmp_path / "calib.npz",
                          reconstruct="sequential")
    assert result.settings["reconstruction"]["mode"] == "sequential"
    assert result.settings["reconstruction"]["reconstructed"] == 1


def test_sequential_stages_follow_dependencies_and_respect_the_cap():
    proto = _chain(0)
    calib = _batches(proto, count=2, size=4)
    for stages, passes in ((64, 2), (1, 1)):
        model = load(proto)
        pruning = PruneChannelsPass(PruneChannelsConfig(round_to=1, ratio=0.5, criterion="l2", calibration=calib,
                                                        reconstruct="sequential", reconstruct_stages=stages))
        pruning(model)
        assert pruning.reconstruction.passes == passes
        assert len(pruning.reconstruction.reconstructed) == 2
