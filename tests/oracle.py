"""The correctness oracle: pruning must equal masking, and planted dead units must be found."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphprune.analysis import CACHE_NAME, build_dim_graph
from graphprune.analysis.graph import DimGraph
from graphprune.analysis.groups import DEFAULT_KINDS, find_groups
from graphprune.io import prepare
from graphprune.passes.prune_channels import PruneChannelsPass
from graphprune.plan import PlanConfig, make_plan
from graphprune.verify import check_model as check_model_as_verified


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
    check_model_as_verified(pruned)
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


def interface_kept(model: onnx.ModelProto | DimGraph,
                   removed: dict[int, np.ndarray]) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Graph inputs and outputs that a removal shrinks (KV caches): name -> [(axis, kept positions)].

    ``removed`` must come from a plan made on this same (prepared) model, so that roots agree.
    """
    if isinstance(model, onnx.ModelProto):
        if not has_cache(model):
            return {}
        model = build_dim_graph(load(model))
    kept: dict[str, list[tuple[int, np.ndarray]]] = {}
    for value, axis in model.interface_axes:
        positions = model.space.kept_positions(model.axes_of[value][axis], removed)
        if positions is not None:
            kept.setdefault(value.name, []).append((axis, positions))
    return kept


def has_cache(proto: onnx.ModelProto) -> bool:
    """Whether some graph input or output is named like a KV cache (only those may shrink)."""
    return any(CACHE_NAME.search(v.name) for v in [*proto.graph.input, *proto.graph.output])


def take_kept(array: np.ndarray, kept: list[tuple[int, np.ndarray]]) -> np.ndarray:
    for axis, positions in kept:
        array = np.take(array, positions, axis=axis)
    return array


def assert_declared_shapes(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[np.ndarray]) -> None:
    """The graph's declared input and output extents are those of the tensors it takes and returns."""
    declared = {v.name: [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                       for d in v.type.tensor_type.shape.dim]
                for v in [*proto.graph.input, *proto.graph.output] if v.type.tensor_type.HasField("shape")}
    actual = {**{k: v.shape for k, v in feeds.items()},
              **{o.name: a.shape for o, a in zip(proto.graph.output, outputs)}}
    for name, dims in declared.items():
        if name in actual:
            assert len(dims) == len(actual[name]) and all(d in (None, a) for d, a in zip(dims, actual[name])), \
                f"'{name}' is declared {dims} but is {list(actual[name])}"


def assert_equivalent(expected: onnx.ModelProto, actual: onnx.ModelProto, feeds: dict[str, np.ndarray],
                      rtol: float = 1e-5, kept: dict[str, list[tuple[int, np.ndarray]]] | None = None) -> None:
    """Outputs agree within rtol, or within a few times the rounding noise of the two models.

    ``kept`` (from interface_kept) names graph inputs and outputs that ``actual`` declares smaller: it is
    fed only their kept positions, and its outputs are compared with the kept positions of ``expected``'s.
    """
    kept = kept or {}
    actual_feeds = {name: take_kept(array, kept.get(name, [])) for name, array in feeds.items()}
    floor = max(noise_floor(expected, feeds), noise_floor(actual, actual_feeds))
    names = [o.name for o in expected.graph.output]
    assert names == [o.name for o in actual.graph.output], "pruning changed the graph outputs"
    want = [take_kept(e, kept.get(name, [])) for name, e in zip(names, run(expected, feeds))]
    got = run(actual, actual_feeds)
    assert_declared_shapes(actual, actual_feeds, got)
    assert_close(want, got, rtol=rtol, floor=floor)


def check_model(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], ratio: float, seed: int = 0,
                kinds: tuple[str, ...] = DEFAULT_KINDS, zero: bool = True) -> dict:
    """All three oracle properties on one model, pruning the unit kinds given; returns a few numbers.

    Models whose interface shrinks (a KV cache losing heads) are compared on what survives: the pruned
    model is fed the kept heads of each past tensor, and its present tensors are compared with the kept
    heads of the reference's. ``zero=False`` skips the ratio-0 check (it does not depend on ``kinds``).
    """
    if zero:
        # Ratio 0 changes nothing.
        same, plan0 = prune(proto, PlanConfig(ratio=0.0, round_to=1, kinds=kinds))
        assert plan0.units_removed == 0
        assert_equivalent(proto, same, feeds)
    # Later steps compare plans of different models by group id: start them all from the prepared
    # model, so that every analysis sees the same graph (preparing again changes nothing).
    proto = ir.to_proto(load(proto))
    # Pruning equals masking the removed units' consumers.
    config = PlanConfig(ratio=ratio, criterion="random", round_to=1, seed=seed, kinds=kinds)
    pruned, plan = prune(proto, config)
    # One analysis of the prepared model maps removed units to the kept positions of the interface.
    interface = build_dim_graph(load(proto)) if has_cache(proto) else proto
    kept = interface_kept(interface, plan.removed)
    assert_equivalent(edit_slices(proto, plan.removed, roles=("in",)), pruned, feeds, kept=kept)
    # Planted dead units are exactly what L2 removes, and removing them changes nothing.
    groups = prunable_groups(proto, PlanConfig(ratio=ratio, round_to=1, kinds=kinds))
    chosen = planted_units(groups, ratio, np.random.default_rng(seed))
    planted = edit_slices(proto, chosen, roles=("in", "out", "param"))
    pruned_planted, plan_l2 = prune(planted, PlanConfig(ratio=ratio, criterion="l2", round_to=1, kinds=kinds))
    found = plan_l2.removed
    assert set(found) == set(chosen), "L2 did not prune exactly the planted groups"
    for root, units in chosen.items():
        assert np.array_equal(found[root], units), f"group {root}: planted {units}, removed {found[root]}"
    assert_equivalent(planted, pruned_planted, feeds, kept=interface_kept(interface, chosen))
    return {"groups": len(groups), "removed": plan.units_removed, "resized": sorted(kept),
            "kinds": sorted({d.group.kind for d in plan.decisions if len(d.removed)})}
