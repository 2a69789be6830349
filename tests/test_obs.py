"""OBS-style structured saliency (obs.py, criterion "obs"): the least-squares refit cost of removing a unit."""

import numpy as np
import onnx
import pytest
from graphgen import random_cnn
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper
from oracle import load

from graphprune import api
from graphprune.analysis import build_dim_graph
from graphprune.analysis.groups import find_groups
from graphprune.calibration import collect_gram
from graphprune.criteria import consumers, score_group
from graphprune.obs import GroupInverse, collect_obs_blocks, gram_targets, obs_scores, saliency, unit_blocks
from graphprune.passes.prune_channels import PruneChannelsConfig, PruneChannelsPass

# ---------- the formula: S(C) is the error increase after the least-squares refit of the other columns ----


def _refit_cost(x: np.ndarray, w: np.ndarray, columns: np.ndarray) -> float:
    """min over W' of ‖XW − X_K W'‖² with the columns C removed, by brute force."""
    kept = np.setdiff1d(np.arange(x.shape[1]), columns)
    refit = np.linalg.lstsq(x[:, kept], x @ w, rcond=None)[0]
    return float(np.sum((x @ w - x[:, kept] @ refit) ** 2))


@pytest.mark.parametrize("taps", [1, 3])
def test_saliency_is_the_least_squares_refit_cost(taps):
    rng = np.random.default_rng(0)
    units = np.array([0, 1, 2, 2, -1, 3])  # unit 2 owns two positions; position 4 is kept by every unit
    features = len(units) * taps
    x = rng.normal(size=(40, features))
    x[:, -1] += 0.8 * x[:, 0]  # correlated columns: the refit matters
    w = rng.normal(size=(features, 5))
    scores = saliency(x.T @ x, w, units, taps, damp=1e-12)
    for unit in range(4):
        positions = np.flatnonzero(units == unit)
        columns = (positions[:, None] * taps + np.arange(taps)).reshape(-1)
        expected = _refit_cost(x, w, columns)
        np.testing.assert_allclose(scores[unit], expected, rtol=1e-6)
        # The refit helps: without it the cost is the columns' whole contribution.
        assert expected < np.sum((x[:, columns] @ w[columns]) ** 2)


# ---------- greedy removal: the order brute-force greedy refitting gives ----------------------------------


def _brute_greedy(x: np.ndarray, w: np.ndarray, owned: list[np.ndarray], steps: int) -> list[int]:
    """Remove, one at a time, the unit whose removal (with every earlier one) costs least after a refit."""
    removed: list[int] = []
    for _ in range(steps):
        left = [u for u in range(len(owned)) if u not in removed]
        costs = [_refit_cost(x, w, np.concatenate([owned[v] for v in removed + [u]])) for u in left]
        removed.append(left[int(np.argmin(costs))])
    return removed


@pytest.mark.parametrize("taps", [1, 2])
def test_greedy_scores_follow_brute_force_greedy_refitting(taps):
    rng = np.random.default_rng(1)
    units = np.array([0, 1, 2, 3, 4, 5, -1, 6])
    features = len(units) * taps
    x = rng.normal(size=(200, features))
    x[:, :taps] = x[:, taps : 2 * taps] + 0.05 * rng.normal(size=(200, taps))  # unit 0 ≈ unit 1
    w = rng.normal(size=(features, 3))
    owned = [(np.flatnonzero(units == u)[:, None] * taps + np.arange(taps)).reshape(-1) for u in range(7)]
    blocks = unit_blocks(x.T @ x, units, taps, damp=1e-12)
    assert isinstance(blocks, GroupInverse)
    scores = blocks.scores(w, 7)
    order = list(np.argsort(scores, kind="stable"))
    assert order[:6] == _brute_greedy(x, w, owned, 6)
    assert np.all(np.diff(scores[order]) >= 0)


def test_greedy_keeps_one_of_two_copies_where_one_shot_scores_drop_both():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 4))
    x[:, 1] = x[:, 0] + 1e-3 * rng.normal(size=300)  # two near-copies: each alone is free to remove
    w = np.ones((4, 2))
    units = np.arange(4)
    one_shot = saliency(x.T @ x, w, units, damp=1e-12)
    assert set(np.argsort(one_shot)[:2]) == {0, 1}  # one-shot would remove both copies
    greedy = unit_blocks(x.T @ x, units, 1, damp=1e-12).scores(w, 4)
    assert len({0, 1} & set(np.argsort(greedy)[:2])) == 1  # greedy removes one, keeps the other


# ---------- a planted linear combination: obs finds it, l2 does not -------------------------------------

HIDDEN, INPUTS, OUTPUTS = 6, 8, 4
PLANTED = 3  # 0.3 · (unit 1 + unit 2): removable with nothing lost once the consumer is refitted
QUIET = 0  # independent, but with small weights: l2's choice


def _planted(kind: str, seed: int = 0) -> onnx.ModelProto:
    """x -> producer (HIDDEN units) -> consumer -> y, linear, with PLANTED a combination of units 1 and 2
    read by the consumer with large weights, and QUIET an independent unit with small producer weights."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(INPUTS, HIDDEN))
    w1 /= np.linalg.norm(w1, axis=0)
    w1[:, PLANTED] = 0.3 * (w1[:, 1] + w1[:, 2])
    w1[:, QUIET] *= 0.4
    taps = 9 if kind == "conv" else 1
    w2 = rng.normal(size=(HIDDEN, taps, OUTPUTS))
    w2 /= np.linalg.norm(w2.reshape(HIDDEN, -1), axis=1)[:, None, None]
    w2[PLANTED] *= 2.0
    inits = []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    if kind == "conv":  # 1x1 producer, 3x3 consumer: each unit owns 9 columns of the consumer
        nodes = [helper.make_node("Conv", ["x", const("w1", w1.T[:, :, None, None])], ["h"], name="conv1"),
                 helper.make_node("Conv", ["h", const("w2", w2.transpose(2, 0, 1).reshape(OUTPUTS, HIDDEN, 3, 3))],
                                  ["y"], pads=[1, 1, 1, 1], name="conv2")]
        x_shape, y_shape = ["n", INPUTS, 4, 4], ["n", OUTPUTS, 4, 4]
    elif kind == "gemm":
        nodes = [helper.make_node("Gemm", ["x", const("w1", w1.T)], ["h"], transB=1, name="fc1"),
                 helper.make_node("Gemm", ["h", const("w2", w2[:, 0])], ["y"], name="fc2")]
        x_shape, y_shape = ["n", INPUTS], ["n", OUTPUTS]
    else:
        nodes = [helper.make_node("MatMul", ["x", const("w1", w1)], ["h"], name="mm1"),
                 helper.make_node("MatMul", ["h", const("w2", w2[:, 0])], ["y"], name="mm2")]
        x_shape, y_shape = ["n", 2, INPUTS], ["n", 2, OUTPUTS]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _calibration(proto: onnx.ModelProto, count: int = 3, size: int = 16, seed: int = 1) -> list[dict]:
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    shape = [size if isinstance(d, str) else d for d in dims]
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(count)]


def _prune(proto: onnx.ModelProto, criterion: str, **options) -> PruneChannelsPass:
    pruning = PruneChannelsPass(PruneChannelsConfig(ratio=1 / HIDDEN, round_to=1, criterion=criterion, **options))
    pruning(load(proto))
    return pruning


def _removed(pruning: PruneChannelsPass) -> tuple[list[str], list[list[int]]]:
    decisions = [d for d in pruning.plan.decisions if len(d.removed)]
    return [d.criterion for d in decisions], [d.removed.tolist() for d in decisions]


@pytest.mark.parametrize("kind", ["matmul", "gemm", "conv"])
def test_obs_removes_the_planted_combination_where_l2_does_not(kind):
    proto = _planted(kind)
    calib = _calibration(proto)
    assert _removed(_prune(proto, "obs", calibration=calib)) == (["obs"], [[PLANTED]])
    assert _removed(_prune(proto, "l2")) == (["l2"], [[QUIET]])
    # With (almost) no ridge, the planted unit costs nothing: the refit recovers it exactly.
    g = build_dim_graph(load(proto))
    (group,) = [gr for gr in find_groups(g) if gr.prunable]
    (target,), _ = gram_targets(g, [group])
    grams = collect_gram(g.model, [target.request], calib)
    scores, used = obs_scores(g, group, grams, damp=1e-10)
    assert used and scores[PLANTED] < 1e-6 * np.median(scores)


def test_without_a_gram_obs_is_the_squared_norm_of_the_reading_weights():
    """H = I: per consumer ‖W_C‖², and the name says no data was used; a Gram over the feature limit is
    ignored the same way."""
    proto = _planted("conv")
    g = build_dim_graph(load(proto))
    (group,) = [gr for gr in find_groups(g) if gr.prunable]
    (consumer,) = consumers(g, group)
    weight = consumer.use.array.astype(np.float64)  # [OUTPUTS, HIDDEN, 3, 3]
    squared = (weight**2).sum((0, 2, 3))
    scores, used = score_group(g, group, "obs", np.random.default_rng(0))
    assert used == "obs/data-free"
    np.testing.assert_allclose(scores, squared / squared.mean(), rtol=1e-9)
    (target,), _ = gram_targets(g, [group])
    grams = collect_gram(g.model, [target.request], _calibration(proto))
    wide, measured = obs_scores(g, group, grams, max_features=target.features - 1)
    assert not measured
    np.testing.assert_allclose(wide, scores, rtol=1e-9)


def test_blocks_cut_per_pass_match_the_whole_gram_and_bounded_passes_agree():
    proto = _planted("conv")
    calib = _calibration(proto)
    g = build_dim_graph(load(proto))
    (group,) = [gr for gr in find_groups(g) if gr.prunable]
    (target,), _ = gram_targets(g, [group])
    whole = score_group(g, group, "obs", np.random.default_rng(0),
                        grams=collect_gram(g.model, [target.request], calib))
    for budget in (1 << 30, 1):
        blocks = collect_obs_blocks(g.model, g, [group], calib, gram_bytes=budget)
        scores, used = score_group(g, group, "obs", np.random.default_rng(0), grams=blocks)
        assert used == whole[1] == "obs"
        np.testing.assert_allclose(scores, whole[0], rtol=1e-9)


# ---------- plumbing: API, allocation, robustness ---------------------------------------------------------


def test_api_obs_with_and_without_calibration(tmp_path):
    proto = _planted("conv")
    np.savez(tmp_path / "calib.npz", x=np.concatenate([b["x"] for b in _calibration(proto)]))
    result = api.optimize(proto, ratio=1 / HIDDEN, round_to=1, criterion="obs", calib=tmp_path / "calib.npz")
    assert result.settings["criteria_used"] == ["obs"]
    assert [d.removed.tolist() for d in result.plan.decisions if len(d.removed)] == [[PLANTED]]
    assert result.verification is not None and result.verification.min_cosine > 0.9
    free = api.optimize(proto, ratio=1 / HIDDEN, round_to=1, criterion="obs")
    assert free.settings["criteria_used"] == ["obs/data-free"] and free.verification is not None


@pytest.mark.parametrize("allocation", ["global", "sensitivity"])
def test_obs_drives_global_and_sensitivity_allocation(allocation):
    proto = _planted("conv")
    pruning = _prune(proto, "obs", calibration=_calibration(proto), allocation=allocation)
    assert _removed(pruning) == (["obs"], [[PLANTED]])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cnn(max_blocks=6))
def test_obs_scores_are_finite_on_random_graphs(model):
    """Every coupling pattern (grouped and depthwise convs, concats, flatten heads, ...) scores, with and
    without calibration, finitely and never below 0, under the names obs reports."""
    proto = onnx.shape_inference.infer_shapes(model)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    calib = [{"input": np.random.default_rng(0).normal(size=shape).astype(np.float32)}]
    for options in ({}, {"calibration": calib}):
        pruning = _prune(proto, "obs", **options)
        for decision in pruning.plan.decisions:
            if decision.criterion:
                assert decision.criterion.startswith(("obs", "l2 (obs"))
        g = build_dim_graph(load(proto))
        for group in find_groups(g):
            if group.prunable:
                scores, _ = score_group(g, group, "obs", np.random.default_rng(0), grams=pruning.grams)
                assert np.all(np.isfinite(scores)) and np.all(scores >= 0)
