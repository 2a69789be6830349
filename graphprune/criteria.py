"""Importance criteria: a score per unit of a group, aggregated over every member (DepGraph-style)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from graphprune.analysis.graph import DimGraph, ParamUse
from graphprune.analysis.groups import Group
from graphprune.errors import GraphpruneError

# Activation-aware criteria read calibration statistics of the activation each consumer reads.
ACTIVATION_CRITERIA = ("wanda-sp", "flap", "act-norm")
# Second-order criteria read the Gram matrix of each consumer's input (obs.py).
GRAM_CRITERIA = ("obs",)
CRITERIA = ("l1", "l2", "bn-scale", "random", *ACTIVATION_CRITERIA, *GRAM_CRITERIA)


def _member_norms(g: DimGraph, group: Group, use, axis: int, order: int) -> np.ndarray:
    units = g.space.unit_map(use.axes[axis], group.root)
    array = np.moveaxis(np.asarray(use.array, dtype=np.float64), axis, 0).reshape(len(units), -1)
    per_position = np.abs(array).sum(1) if order == 1 else (array**2).sum(1)
    mask = units >= 0
    member = np.bincount(units[mask], weights=per_position[mask], minlength=group.size)
    return np.sqrt(member) if order == 2 else member


def unit_norms(g: DimGraph, group: Group, order: int) -> np.ndarray:
    """Sum over members of each unit's weight norm, each member normalised by its mean.

    A unit that every producing slice leaves at zero, or that every reading slice ignores, is dead
    whatever its other members hold: it scores 0, so magnitude criteria remove it first.
    """
    total = np.zeros(group.size)
    produced = np.zeros(group.size)
    read = np.zeros(group.size)
    has = {"out": False, "in": False}
    for use, axis in group.params:
        member = _member_norms(g, group, use, axis, order)
        mean = member.mean()
        total += member / mean if mean > 0 else member
        role = use.roles[axis]
        if role in has:
            has[role] = True
            (produced if role == "out" else read)[:] += member
    dead = (has["out"] & (produced == 0)) | (has["in"] & (read == 0))
    total[dead] = 0.0
    return total


def bn_scale(g: DimGraph, group: Group) -> np.ndarray | None:
    scales = [(use, axis) for use, axis in group.params
              if use.node.op_type == "BatchNormalization" and use.index == 1]
    if not scales:
        return None
    total = np.zeros(group.size)
    for use, axis in scales:
        units = g.space.unit_map(use.axes[axis], group.root)
        mask = units >= 0
        total += np.bincount(units[mask], weights=np.abs(use.array.astype(np.float64))[mask],
                             minlength=group.size)
    return total


@dataclass
class Consumer:
    """A weight use that reads the group's units ("in" role), and the activation it reads them from."""

    use: ParamUse
    axis: int  # the weight axis that carries the units
    units: np.ndarray  # per position of that axis: the unit (-1: none of this group)
    key: tuple[str, int] | None  # (activation name, axis) with the same positions; None if not found


def consumers(g: DimGraph, group: Group) -> list[Consumer]:
    found = []
    for use, axis in group.params:
        if use.roles[axis] != "in":
            continue
        units = g.space.unit_map(use.axes[axis], group.root)
        found.append(Consumer(use, axis, units, _activation_axis(g, group, use, units)))
    return found


def _activation_axis(g: DimGraph, group: Group, use: ParamUse, units: np.ndarray) -> tuple[str, int] | None:
    """The axis of the consumer's activation input whose positions are the weight axis's positions.

    Grouped convs read ``groups`` times more channels than a filter holds: no axis matches, no data.
    """
    for index, value in enumerate(use.node.inputs):
        if index == use.index or value is None or g.is_param(value) or value not in g.axes_of:
            continue
        for axis, expr in enumerate(g.axes_of[value]):
            if g.space.size(expr) == len(units) and np.array_equal(g.space.unit_map(expr, group.root), units):
                return value.name, axis
    return None


def stats_requests(g: DimGraph, groups: list[Group]) -> list[tuple[str, int]]:
    """The (activation, axis) pairs whose statistics the activation criteria and compensation read."""
    keys: dict[tuple[str, int], None] = {}
    for group in groups:
        for c in consumers(g, group):
            if c.key is not None:
                keys.setdefault(c.key)
    return list(keys)


def activation_scores(g: DimGraph, group: Group, criterion: str,
                      stats: Mapping | None) -> tuple[np.ndarray, bool] | None:
    """Group-aggregated activation-aware scores over the group's consumers; None without consumers.

    Per position p of a consumer's input axis, with W[:, p] the weight slice reading it (every other
    axis, kernel taps included) and X_p the calibration activations there:
    wanda-sp: sum|W[:, p]| * ||X_p||_2 (column L1 times activation L2); flap: Var(X_p) * ||W[:, p]||_2^2;
    act-norm: ||X_p||_2. Positions are summed per unit (act-norm: squared, then the root), each consumer
    normalised by its mean, consumers summed. Without statistics a consumer uses the data-free form
    (the activation factor taken as 1; act-norm then reads ||W[:, p]||_2). Units that no consumer's
    weights read score 0. Also returns whether any statistics were used.
    """
    total = np.zeros(group.size)
    read = np.zeros(group.size)
    used = False
    found = consumers(g, group)
    for c in found:
        columns = np.moveaxis(np.asarray(c.use.array, dtype=np.float64), c.axis, 0).reshape(len(c.units), -1)
        l1, sq = np.abs(columns).sum(1), (columns**2).sum(1)
        s = stats.get(c.key) if stats and c.key is not None else None
        used |= s is not None
        if criterion == "wanda-sp":
            per = l1 * (s.norm if s is not None else 1.0)
        elif criterion == "flap":
            per = sq * (s.var if s is not None else 1.0)
        else:
            per = s.sq_norm if s is not None else sq
        mask = c.units >= 0
        member = np.bincount(c.units[mask], weights=per[mask], minlength=group.size)
        if criterion == "act-norm":
            member = np.sqrt(member)
        mean = member.mean()
        total += member / mean if mean > 0 else member
        read += np.bincount(c.units[mask], weights=sq[mask], minlength=group.size)
    if not found:
        return None
    total[read == 0] = 0.0
    return total, used


def score_group(g: DimGraph, group: Group, criterion: str, rng: np.random.Generator,
                stats: Mapping | None = None, grams: Mapping | None = None) -> tuple[np.ndarray, str]:
    """Scores (higher = more important) and the criterion actually used.

    ``stats``: calibration statistics keyed by (activation name, axis) (calibration.collect_stats), read
    by the activation criteria; ``grams``: Gram matrices keyed by request (calibration.collect_gram, or
    obs.collect_obs_blocks' per-group cuts of them), read by obs. Without them those criteria fall back
    to data-free forms, recorded in the name.
    """
    if criterion == "obs":
        from graphprune.obs import obs_scores  # obs builds on reconstruct, which imports this module

        result = obs_scores(g, group, grams)
        if result is None:
            return unit_norms(g, group, 2), "l2 (obs: no consumer weights)"
        scores, used = result
        return scores, "obs" if used else "obs/data-free"
    if criterion in ACTIVATION_CRITERIA:
        result = activation_scores(g, group, criterion, stats)
        if result is None:
            return unit_norms(g, group, 2), f"l2 ({criterion}: no consumer weights)"
        scores, used = result
        if used:
            return scores, criterion
        if criterion == "act-norm":
            return unit_norms(g, group, 2), "l2 (act-norm: no calibration data)"
        return scores, f"{criterion}/data-free"
    if criterion == "l1":
        return unit_norms(g, group, 1), "l1"
    if criterion == "l2":
        return unit_norms(g, group, 2), "l2"
    if criterion == "bn-scale":
        scores = bn_scale(g, group)
        # Exporters fold most BatchNorms into convs; groups without one fall back to L2.
        return (scores, "bn-scale") if scores is not None else (unit_norms(g, group, 2), "l2")
    if criterion == "random":
        return rng.random(group.size), "random"
    raise GraphpruneError(f"unknown criterion '{criterion}': choose one of {', '.join(CRITERIA)}.")
