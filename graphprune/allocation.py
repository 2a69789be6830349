"""Allocation: how many units each group loses under a unit, MACs or params budget.

Modes (``PlanConfig.allocation``):

- ``uniform``: every group loses the same share. With a MACs/params target, that share is the smallest
  one (found by bisection) whose estimated reduction reaches the target.
- ``global``: units of all groups ranked together on standardised scores: each group's scores divided by
  their mean, so criteria of different scales compare (as ``plan._global_counts`` without a target).
- ``sensitivity``: as ``global``, with each group's standardised scores multiplied by its measured
  sensitivity (sensitivity.py: output change when the group alone loses its weakest half on calibration
  data), divided by the mean sensitivity. Insensitive groups lose more, sensitive ones less.

With a target, ``global`` and ``sensitivity`` remove blocks of units greedily by *importance per cost*
(ZipLM-style): a block's importance divided by the MACs and/or params share it removes. Without a
target the budget is ``ratio`` x all candidate units and each unit costs one.

Standardisation is of importance *per unit of cost* (a density), not of importance per unit. Scores of
different groups are on unrelated scales (a head's L2 norm, a neuron's), so across groups they say only
how a unit compares with the rest of its own group. Dividing each group's scores by their mean and then
by the unit's cost would give every group the total importance ``size`` whatever it costs: a group of
few costly units would be worth far less per MAC than a group of many cheap ones, and the greedy would
strip it first. On all-MiniLM-L6-v2 at -35% MACs (a head owns 4·384·32 MACs, an MLP neuron 2·384: 64x)
every layer fell to 2 of 12 heads (the cap) before any neuron went: cosine to the dense embeddings 0.726
(l2) / 0.618 (wanda-sp+rec) against uniform's 0.746 / 0.915; on MobileNetV2 the budget went to the
high-resolution early layers (-35% MACs for -6% params), wanda-sp+rec top-1 0.062 against uniform's
0.073. With the density: MiniLM 0.772 / 0.917 (a few heads, about half the neurons); MobileNetV2 -29%
params, top-1 0.115 (tools/quality_table.py --global, same calibration).

So a unit's importance is ``(s / mean(s)) x unit_cost``: each group's importance equals its cost --
lacking any evidence across groups, every MAC (or param) is taken to matter as much as any other --
and the scores say which units are below their group's par.
The greedy key, importance / cost, is then ``s / mean(s)``, the key of ``plan._global_counts``: the
budget goes to the units furthest below their group's par, in any group; a costly unit buys more of the
target per step but is not preferred for it. Groups with the same score distribution lose the same
share (as with ``uniform``); groups with a long tail of weak units lose more. Ties go to the group that
has lost the smaller share so far.

``sensitivity`` adds evidence across groups: the group's density is scaled by ``S_g / mean(S)``, so the
key is ``(s / mean(s)) x S_g / mean(S)``; with equal sensitivities it is ``global``. ``S_g`` is measured
at a fixed *share* of the group (its weakest half), which is what the allocation decides; it is not
divided by the group's cost (damage per MAC of the half, as if damage grew linearly with the MACs
removed): that variant measured worse at -35% MACs (MiniLM l2+bias cosine 0.792 against 0.832,
wanda-sp+rec 0.906 against 0.934; MobileNetV2 wanda-sp+rec top-1 0.052 against 0.146).

The last block matters with coarse units: the next in order may be one large block of a costly group
(a head) that overshoots the target where a few more small blocks (neurons) would do, for less
importance. So the greedy finishes with the completion that removes the least importance (see
``_greedy``), never with more than the plain greedy would.

Blocks follow ``round_to``: a group loses first ``size % round_to`` units, then whole multiples, never
going below ``round_to`` kept, so ``plan.round_kept`` leaves the counts as they are and the estimate is
the plan. Caps: ``max_group_ratio`` (at most that share, and one unit always kept), ``min_ratio`` (at
least that share, rounded the same way, taken first).

Costs: a unit of a group owns, in each member weight, the slice along its axis. MACs are those of the
Conv/ConvTranspose/Gemm/MatMul weights (report.node_macs, per batch item); a weight that loses units on
two axes (in and out channels) shrinks by the product of the kept fractions, which the estimate tracks
exactly. MatMuls between two activations (attention) are not in the estimate; the achieved reduction
is counted on the pruned model (metrics) and reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphprune.analysis.graph import DimGraph
from graphprune.analysis.groups import Group
from graphprune.errors import GraphpruneError
from graphprune.report import LINEAR_OPS, conv_shapes, node_macs

ALLOCATIONS = ("uniform", "global", "sensitivity")


@dataclass
class _Weight:
    macs: float  # dense MACs of its node (0 for weights that are not a linear node's weight)
    params: float  # dense elements
    # per axis: [(candidate index, fraction of the axis one unit of that group owns)]
    axes: list[list[tuple[int, float]]] = field(default_factory=list)


class CostModel:
    """Estimated MACs and params of the model as groups lose units (counts per candidate group)."""

    def __init__(self, g: DimGraph, groups: Sequence[Group], input_shapes: Mapping[str, tuple] | None = None):
        index = {group.root: i for i, group in enumerate(groups)}
        self.weights: list[_Weight] = []
        self.members: list[list[tuple[int, int]]] = [[] for _ in groups]  # per group: (weight, axis)
        seen: set = set()
        self.total_macs = 0.0
        self.total_params = 0.0
        for value in g.graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype.is_floating_point():
                self.total_params += float(np.prod(value.const_value.shape, dtype=np.float64))
        shape_of = conv_shapes(g, input_shapes)
        for use in g.params.values():
            linear = use.index == 1 and use.node.op_type in LINEAR_OPS
            macs = node_macs(use.node, use.value, shape_of) if linear else 0.0
            self.total_macs += macs
            first = use.value not in seen  # a shared initializer's params count once
            seen.add(use.value)
            shape = use.value.const_value.shape
            w = _Weight(macs, float(np.prod(shape, dtype=np.float64)) if first else 0.0)
            for axis, expr in enumerate(use.axes):
                shares = []
                length = max(int(shape[axis]), 1)
                for root in g.space.atoms(expr):
                    if root in index:
                        group = groups[index[root]]
                        positions = int((g.space.unit_map(expr, root) >= 0).sum())
                        shares.append((index[root], positions / length / group.size))
                w.axes.append(shares)
            if (w.macs or w.params) and any(w.axes):
                number = len(self.weights)
                self.weights.append(w)
                for axis, shares in enumerate(w.axes):
                    for i, _ in shares:
                        self.members[i].append((number, axis))
        self.counts = np.zeros(len(groups), dtype=np.int64)
        self._kept = [[1.0] * len(w.axes) for w in self.weights]
        self.macs_removed = 0.0
        self.params_removed = 0.0
        self.unit_macs = np.zeros(len(groups))  # first-order: what one unit owns in the dense model
        self.unit_params = np.zeros(len(groups))
        for i, members in enumerate(self.members):
            for number, axis in members:
                w = self.weights[number]
                share = sum(s for j, s in w.axes[axis] if j == i)
                self.unit_macs[i] += w.macs * share
                self.unit_params[i] += w.params * share

    def reset(self) -> None:
        self.counts[:] = 0
        self._kept = [[1.0] * len(w.axes) for w in self.weights]
        self.macs_removed = self.params_removed = 0.0

    def add(self, i: int, units: int) -> None:
        """Remove ``units`` more units of candidate ``i``; updates the removed MACs and params."""
        self.counts[i] += units
        touched = {number for number, _ in self.members[i]}
        for number in touched:
            w = self.weights[number]
            before = math.prod(self._kept[number])
            for axis, shares in enumerate(w.axes):
                if any(j == i for j, _ in shares):
                    self._kept[number][axis] = max(0.0, 1.0 - sum(self.counts[j] * s for j, s in shares))
            after = math.prod(self._kept[number])
            self.macs_removed += w.macs * (before - after)
            self.params_removed += w.params * (before - after)

    def set_counts(self, counts: Sequence[int]) -> None:
        self.reset()
        for i, count in enumerate(counts):
            if count:
                self.add(i, int(count))

    @property
    def macs_reduction(self) -> float:
        return self.macs_removed / self.total_macs if self.total_macs else 0.0

    @property
    def params_reduction(self) -> float:
        return self.params_removed / self.total_params if self.total_params else 0.0

    def reached(self, target_flops: float | None, target_params: float | None) -> bool:
        eps = 1e-12
        return ((target_flops is None or self.macs_reduction >= target_flops - eps)
                and (target_params is None or self.params_reduction >= target_params - eps))


def blocks(size: int, multiple: int) -> list[int]:
    """Removal steps that keep ``plan.round_kept`` a no-op: size % multiple first, then multiples."""
    if multiple <= 1:
        return [1] * (size - 1)
    if size <= multiple:
        return []
    steps = [size % multiple] if size % multiple else []
    return steps + [multiple] * ((size - sum(steps)) // multiple - 1)


def _rounded(count: int, size: int, multiple: int) -> int:
    from graphprune.plan import round_kept

    return size - round_kept(size - count, size, multiple)


def cap_count(size: int, multiple: int, max_ratio: float) -> int:
    """The most units a group may lose under max_ratio, rounded like the plan (never more)."""
    return _rounded(min(size - 1, int(max_ratio * size + 1e-9)), size, multiple)


def floor_count(size: int, multiple: int, min_ratio: float) -> int:
    return _rounded(round(min_ratio * size), size, multiple) if min_ratio > 0 else 0


@dataclass
class Allocation:
    """What the allocation decided, for the report."""

    mode: str
    target_flops: float | None = None
    target_params: float | None = None
    estimated_flops: float = 0.0  # estimated reduction of MACs (share of the dense model)
    estimated_params: float = 0.0
    reached: bool = True
    uniform_ratio: float | None = None  # the ratio uniform allocation settled on
    sensitivity: dict[int, float] = field(default_factory=dict)  # group root -> measured sensitivity

    def to_dict(self) -> dict:
        return {"mode": self.mode, "target_flops": self.target_flops, "target_params": self.target_params,
                "estimated_flops_reduction": float(self.estimated_flops),
                "estimated_params_reduction": float(self.estimated_params), "target_reached": bool(self.reached),
                "uniform_ratio": self.uniform_ratio}


def allocate(g: DimGraph, groups: Sequence[Group], scores: Sequence[np.ndarray], multiples: Sequence[int],
             config, sensitivity: Mapping[int, float] | None = None) -> tuple[list[int], Allocation]:
    """Units to remove per candidate group (counts already rounded), and the allocation's record."""
    if config.allocation not in ALLOCATIONS:
        raise GraphpruneError(f"unknown allocation '{config.allocation}': choose one of {', '.join(ALLOCATIONS)}.")
    for name, target in (("--target-flops", config.target_flops), ("--target-params", config.target_params)):
        if target is not None and not 0.0 <= target < 1.0:
            raise GraphpruneError(f"{name} is the share to remove and must be in [0, 1): got {target:g}.")
    mode = "global" if config.allocation == "uniform" and config.global_rank else config.allocation
    targets = (config.target_flops, config.target_params)
    result = Allocation(mode, *targets, sensitivity=dict(sensitivity or {}))
    cost = CostModel(g, groups, getattr(config, "input_shapes", None))
    sizes = [group.size for group in groups]
    max_ratio = config.max_group_ratio
    caps = [cap_count(s, m, max_ratio) for s, m in zip(sizes, multiples)]
    floors = [min(floor_count(s, m, config.min_ratio), cap) for s, m, cap in zip(sizes, multiples, caps)]
    if mode == "uniform":
        counts = _uniform(cost, sizes, multiples, floors, caps, config, result)
    else:
        unit_cost = _unit_costs(cost, config, len(groups))
        importance = _importance(groups, scores, mode, sensitivity)
        counts = _greedy(cost, importance, unit_cost, sizes, multiples, floors, caps, config)
    cost.set_counts(counts)
    result.estimated_flops, result.estimated_params = cost.macs_reduction, cost.params_reduction
    if any(t is not None for t in targets):
        result.reached = cost.reached(*targets)
    return counts, result


def _unit_costs(cost: CostModel, config, size: int) -> np.ndarray:
    """What one unit of each group buys toward the budget: MACs and/or params shares, or 1 without one."""
    if config.target_flops is None and config.target_params is None:
        return np.ones(size)
    unit_cost = np.zeros(size)
    if config.target_flops is not None and cost.total_macs:
        unit_cost += cost.unit_macs / cost.total_macs
    if config.target_params is not None and cost.total_params:
        unit_cost += cost.unit_params / cost.total_params
    return unit_cost


def _importance(groups, scores, mode: str, sensitivity: Mapping[int, float] | None) -> list[np.ndarray]:
    """Per group, unit importance *densities* (importance / cost) sorted ascending; see the module doc.

    ``global``: ``s / mean(s)``. ``sensitivity``: times the group's measured sensitivity divided by the
    mean sensitivity.
    """
    weights = np.ones(len(groups))
    if mode == "sensitivity":
        values = np.array([max(float((sensitivity or {}).get(group.root, 0.0)), 0.0) for group in groups])
        if len(values) and values.mean() > 0:
            weights = values / values.mean()
    out = []
    for s, weight in zip(scores, weights):
        s = np.sort(np.asarray(s, dtype=np.float64))
        mean = s.mean()
        out.append((s / mean if mean > 0 else s) * weight)
    return out


def _greedy(cost: CostModel, importance, unit_cost, sizes, multiples, floors, caps, config) -> list[int]:
    """Blocks in ascending order of importance per cost (the densities), until the budget is spent.

    With a target, the last block matters: the next in order may be one large block of a costly group
    (a head) that overshoots where a few more small blocks (neurons) would do, for less importance. So a
    block that would reach the target is not taken: the walk records the completion it offers (the
    importance spent so far plus that of the least important block of any group that reaches the target
    from here), closes its group and goes on with the others; the plan is the recorded completion that
    removes the least importance (importance = density x cost, first order). A block that does not reach
    the target is taken as before, so without a finish the plan is the plain greedy one (target not
    reached: everything the caps allow).
    """
    targets = (config.target_flops, config.target_params)
    budgeted = any(t is not None for t in targets)
    counts = [0] * len(sizes)
    for i, floor in enumerate(floors):
        if floor:
            cost.add(i, floor)
            counts[i] = floor
    units_left = None if budgeted else round(config.ratio * sum(sizes)) - sum(counts)
    entries = []
    for i, (density, size, multiple) in enumerate(zip(importance, sizes, multiples)):
        if unit_cost[i] <= 0:
            continue  # removing it buys nothing toward the budget
        start = 0
        for number, step in enumerate(blocks(size, multiple)):
            end = start + step
            if end > floors[i]:
                # importance / cost = (density x unit_cost x step) / (unit_cost x step); ties: least share first
                entries.append((float(density[start:end].mean()), end / size, i, number, step, end))
            start = end
    entries.sort(key=lambda e: e[:4])
    following = {(e[2], e[5] - e[4]): e for e in entries}  # (group, units removed so far) -> its next block

    def spent_by(e) -> float:
        return e[0] * unit_cost[e[2]] * e[4]

    def reaches(i: int, step: int) -> bool:
        cost.add(i, step)
        done = cost.reached(*targets)
        cost.add(i, -step)
        return done

    if budgeted and cost.reached(*targets):
        return counts  # the floors alone reach it
    spent = 0.0
    best: tuple[float, list[int]] | None = None  # (importance removed, counts) of the best completion
    closed: set[int] = set()
    for entry in entries:
        _key, _share, i, _number, step, end = entry
        if units_left is not None and units_left <= 0:
            break
        if i in closed or end > caps[i] or counts[i] + step != end:
            continue
        if units_left is not None and step > units_left:
            continue
        if budgeted and reaches(i, step):
            for j in range(len(sizes)):
                e = following.get((j, counts[j]))
                if e is not None and j not in closed and e[5] <= caps[j] and reaches(j, e[4]):
                    total = spent + spent_by(e)
                    if best is None or total < best[0]:
                        best = (total, [e[5] if k == j else c for k, c in enumerate(counts)])
            closed.add(i)
            continue
        cost.add(i, step)
        counts[i] = end
        spent += spent_by(entry)
        if units_left is not None:
            units_left -= step
    return best[1] if best is not None else counts


def _uniform(cost: CostModel, sizes, multiples, floors, caps, config, result: Allocation) -> list[int]:
    def counts_at(ratio: float) -> list[int]:
        return [min(cap, max(floor, _rounded(round(ratio * s), s, m)))
                for s, m, floor, cap in zip(sizes, multiples, floors, caps)]

    targets = (config.target_flops, config.target_params)
    if all(t is None for t in targets):
        result.uniform_ratio = config.ratio
        return [_rounded(round(config.ratio * s), s, m) for s, m in zip(sizes, multiples)]
    low, high = 0.0, 1.0
    cost.set_counts(counts_at(high))
    if not cost.reached(*targets):
        result.uniform_ratio = config.max_group_ratio
        return counts_at(high)
    for _ in range(40):
        middle = (low + high) / 2
        cost.set_counts(counts_at(middle))
        if cost.reached(*targets):
            high = middle
        else:
            low = middle
    result.uniform_ratio = high
    return counts_at(high)
