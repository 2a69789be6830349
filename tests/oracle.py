"""The correctness oracle: pruning must equal masking, and planted dead units must be found."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphprune.analysis import build_dim_graph
from graphprune.analysis.groups import find_groups
from graphprune.io import prepare
from graphprune.passes.prune_channels import PruneChannelsPass
from graphprune.plan import PlanConfig, make_plan


def load(proto: onnx.ModelProto) -> ir.Model:
    model = ir.from_proto(proto)
    prepare(model)
    return model


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def prune(proto: onnx.ModelProto, config: PlanConfig):
    """Prune a copy with the prune-channels pass; returns (pruned proto, plan)."""
    model = load(proto)
    pruning = PruneChannelsPass(config)
    pruning(model)
    pruned = ir.to_proto(model)
    onnx.checker.check_model(pruned, full_check=True)
    return pruned, pruning.plan


def edit_slices(proto: onnx.ModelProto, choose: dict[int, np.ndarray], roles: tuple[str, ...]) -> onnx.ModelProto:
    """Zero the slices of the chosen units (root -> units) in every weight use whose role is in roles.

    Each edited use gets its own copy of the initializer, so shared tensors stay intact elsewhere.
    """
    model = load(proto)
    g = build_dim_graph(model)
    for use in list(g.params.values()):
        array = None
        for axis, expr in enumerate(use.axes):
            if use.roles[axis] not in roles or (use.node.op_type in ("Div", "Pow") and use.index == 1):
                continue
            kept = g.space.kept_positions(expr, choose)
            if kept is None:
                continue
            mask = np.ones(g.space.size(expr), dtype=bool)
            mask[kept] = False  # what is not kept belongs to a chosen unit
            if mask.any():
                array = np.array(use.array if array is None else array)
                index = [slice(None)] * array.ndim
                index[axis] = mask
                array[tuple(index)] = 0
        if array is not None:
            value = ir.Value(name=f"{use.value.name}__edit{len(g.graph.initializers)}",
                             shape=ir.Shape(array.shape), type=use.value.type, const_value=ir.tensor(array))
            g.graph.register_initializer(value)
            use.node.replace_input_with(use.index, value)
    return ir.to_proto(model)


def relative_error(e: np.ndarray, a: np.ndarray) -> float:
    """Max abs difference relative to the output's scale."""
    if not e.size:
        return 0.0
    return float(np.abs(e - a).max()) / max(float(np.abs(e).max()), 1e-6)


def noise_floor(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """How much the model's outputs move under mere reordering of float sums (ORT fusions on/off).

    Deep models with attention amplify rounding; a difference below a few times this is rounding.
    """
    plain, fused = run(proto, feeds), run(proto, feeds, optimize=True)
    return max(relative_error(e, a) for e, a in zip(plain, fused))


def assert_close(expected: list[np.ndarray], actual: list[np.ndarray], rtol: float = 1e-5,
                 floor: float = 0.0) -> None:
    assert len(expected) == len(actual)
    tolerance = max(rtol, 4 * floor)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape, (e.shape, a.shape)
        err = relative_error(e, a)
        assert err <= tolerance, f"relative error {err:.3g} above {tolerance:.3g}"


def planted_units(plan_groups, ratio: float, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """For each group a magnitude plan would prune, as many random units as the ratio removes."""
    from graphprune.plan import round_kept

    chosen = {}
    for group in plan_groups:
        count = group.size - round_kept(group.size - round(ratio * group.size), group.size, 1)
        if count:
            chosen[group.root] = np.sort(rng.choice(group.size, size=count, replace=False))
    return chosen


def prunable_groups(proto: onnx.ModelProto, config: PlanConfig):
    model = load(proto)
    g = build_dim_graph(model)
    plan = make_plan(g, find_groups(g), config)
    return [d.group for d in plan.decisions if not d.skipped or d.skipped == "nothing to remove at this ratio"]


def assert_equivalent(expected: onnx.ModelProto, actual: onnx.ModelProto, feeds: dict[str, np.ndarray],
                      rtol: float = 1e-5) -> None:
    """Outputs agree within rtol, or within a few times the rounding noise of the two models."""
    floor = max(noise_floor(expected, feeds), noise_floor(actual, feeds))
    assert_close(run(expected, feeds), run(actual, feeds), rtol=rtol, floor=floor)


def check_model(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], ratio: float, seed: int = 0) -> dict:
    """All three oracle properties on one model; returns a few numbers for reports."""
    # Ratio 0 changes nothing.
    same, plan0 = prune(proto, PlanConfig(ratio=0.0, round_to=1))
    assert plan0.units_removed == 0
    assert_equivalent(proto, same, feeds)
    # Later steps compare plans of different models by group id: start them all from the prepared
    # model, so that every analysis sees the same graph (preparing again changes nothing).
    proto = ir.to_proto(load(proto))
    # Pruning equals masking the removed units' consumers.
    config = PlanConfig(ratio=ratio, criterion="random", round_to=1, seed=seed)
    pruned, plan = prune(proto, config)
    assert_equivalent(edit_slices(proto, plan.removed, roles=("in",)), pruned, feeds)
    # Planted dead units are exactly what L2 removes, and removing them changes nothing.
    groups = prunable_groups(proto, PlanConfig(ratio=ratio, round_to=1))
    chosen = planted_units(groups, ratio, np.random.default_rng(seed))
    planted = edit_slices(proto, chosen, roles=("in", "out", "param"))
    pruned_planted, plan_l2 = prune(planted, PlanConfig(ratio=ratio, criterion="l2", round_to=1))
    found = plan_l2.removed
    assert set(found) == set(chosen), "L2 did not prune exactly the planted groups"
    for root, units in chosen.items():
        assert np.array_equal(found[root], units), f"group {root}: planted {units}, removed {found[root]}"
    assert_equivalent(planted, pruned_planted, feeds)
    return {"groups": len(groups), "removed": plan.units_removed}
