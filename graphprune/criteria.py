"""Importance criteria: a score per unit of a group, aggregated over every member (DepGraph-style)."""

from __future__ import annotations

import numpy as np

from graphprune.analysis.graph import DimGraph
from graphprune.analysis.groups import Group
from graphprune.errors import GraphpruneError

CRITERIA = ("l1", "l2", "bn-scale", "random")


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


def score_group(g: DimGraph, group: Group, criterion: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Scores (higher = more important) and the criterion actually used."""
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
