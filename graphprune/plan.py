"""Planning: which units of which groups to remove under the user's budget and constraints."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from graphprune.analysis.graph import DimGraph
from graphprune.analysis.groups import DEFAULT_KINDS, PROTECTABLE, Group, residual_roots
from graphprune.criteria import score_group
from graphprune.errors import GraphpruneError


@dataclass
class PlanConfig:
    ratio: float = 0.3
    criterion: str = "l2"
    global_rank: bool = False
    max_group_ratio: float = 0.9  # global ranking never removes more than this share of one group
    round_to: int = 16  # ORT's blocked CPU conv kernels work in 16-channel blocks (docs/round_to.md)
    # Heads are whole blocks of work already: they are never rounded.
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] = DEFAULT_KINDS
    seed: int = 0
    # Allocation across groups (allocation.py): uniform, global (= global_rank) or sensitivity.
    allocation: str = "uniform"
    # Budgets: the share of the dense model's MACs / params to *remove* (0.35 = -35%); ``ratio`` is then
    # ignored and the plan removes units until the estimated reduction reaches every target given.
    target_flops: float | None = None
    target_params: float | None = None
    min_ratio: float = 0.0  # with a target or non-uniform allocation: every group loses at least this
    # Group roles left whole: "residual" = groups that pass through a sum of activations (residual
    # streams; on MobileNetV2 protecting them doubled the held-out top-5 agreement at -35% MACs).
    protect: tuple[str, ...] = ()
    # Input shapes the MACs budget is counted at (api's --input-shapes), as the reported counts are.
    input_shapes: dict[str, tuple[int, ...]] | None = None


@dataclass
class GroupDecision:
    group: Group
    criterion: str = ""
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    skipped: str = ""  # why this group was not pruned

    @property
    def kept(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.group.size), self.removed)


@dataclass
class PrunePlan:
    decisions: list[GroupDecision]
    allocation: object | None = None  # allocation.Allocation when the counts came from allocate()

    @property
    def removed(self) -> dict[int, np.ndarray]:
        return {d.group.root: d.removed for d in self.decisions if len(d.removed)}

    @property
    def units_removed(self) -> int:
        return sum(len(d.removed) for d in self.decisions)


def round_kept(kept: int, size: int, multiple: int) -> int:
    """Round a kept count to a multiple the runtime's kernels like; always keep at least one unit.

    A group no larger than the multiple is left whole: the runtime pads it back to a full block
    anyway, and thin layers fall off the fast kernels (measured in docs/round_to.md). Counts round
    *up*: a group never loses more units than the ratio asks, so planting that many dead units and
    pruning at that ratio can only remove dead ones.
    """
    if multiple <= 1:
        return int(min(size, max(1, kept)))
    if size <= multiple:
        return size
    return int(min(size, max(multiple, -(-kept // multiple) * multiple)))


def excluded(group: Group, patterns: tuple[str, ...]) -> str:
    for node in group.nodes:
        for pattern in patterns:
            if fnmatch.fnmatchcase(node.name or "", pattern):
                return f"excluded by pattern '{pattern}' (node '{node.name}')"
    return ""


def make_plan(g: DimGraph, groups: list[Group], config: PlanConfig, stats: Mapping | None = None,
              sensitivity: Mapping[int, float] | None = None, grams: Mapping | None = None) -> PrunePlan:
    """``stats``: calibration statistics for the activation-aware criteria (calibration.collect_stats).

    ``grams``: Gram matrices of the consumers' inputs for the obs criterion (obs.collect_obs_blocks).

    ``sensitivity``: group root -> measured output change (sensitivity.py), for allocation "sensitivity".
    """
    rng = np.random.default_rng(config.seed)
    decisions = [GroupDecision(group) for group in groups]
    unknown = [p for p in config.protect if p not in PROTECTABLE]
    if unknown:
        raise GraphpruneError(f"--protect: unknown role '{unknown[0]}'; choose from {', '.join(PROTECTABLE)}.")
    residual = residual_roots(g) if "residual" in config.protect else set()
    candidates: list[tuple[GroupDecision, np.ndarray]] = []
    for d in decisions:
        group = d.group
        if not group.prunable:
            d.skipped = group.why_not
        elif group.kind not in config.kinds:
            d.skipped = f"unit kind '{group.kind}' is not pruned by this pass"
        elif group.root in residual:
            d.skipped = "residual stream (--protect residual)"
        else:
            d.skipped = excluded(group, config.exclude)
        if d.skipped:
            continue
        scores, d.criterion = score_group(g, group, config.criterion, rng, stats, grams)
        candidates.append((d, scores))
    multiples = [1 if d.group.kind in ("head", "head-repeat") else config.round_to for d, _ in candidates]
    allocation = None
    budgeted = config.target_flops is not None or config.target_params is not None
    if budgeted or config.allocation == "sensitivity":
        from graphprune.allocation import allocate

        counts, allocation = allocate(g, [d.group for d, _ in candidates], [s for _, s in candidates],
                                      multiples, config, sensitivity)
    elif config.global_rank or config.allocation == "global":
        counts = _global_counts(candidates, config)
    else:
        counts = [round(config.ratio * d.group.size) for d, _ in candidates]
    for (d, scores), remove, multiple in zip(candidates, counts, multiples):
        kept = round_kept(d.group.size - remove, d.group.size, multiple)
        d.removed = np.sort(np.argsort(scores, kind="stable")[: d.group.size - kept]).astype(np.int64)
        if not len(d.removed):
            d.skipped = ("smaller than --round-to, left whole" if d.group.size <= multiple > 1
                         else "nothing to remove at this ratio")
    return PrunePlan(decisions, allocation)


def _global_counts(candidates: list[tuple[GroupDecision, np.ndarray]], config: PlanConfig) -> list[int]:
    """Rank all units together on scores standardised per group; cap each group's share."""
    entries = []
    for index, (d, scores) in enumerate(candidates):
        mean = scores.mean()
        normalised = scores / mean if mean > 0 else scores
        entries.extend((value, index) for value in normalised)
    entries.sort(key=lambda e: e[0])
    budget = round(config.ratio * sum(d.group.size for d, _ in candidates))
    counts = [0] * len(candidates)
    caps = [min(d.group.size - 1, int(config.max_group_ratio * d.group.size)) for d, _ in candidates]
    for _, index in entries:
        if budget == 0:
            break
        if counts[index] < caps[index]:
            counts[index] += 1
            budget -= 1
    return counts
