"""Importance criteria: a score per unit of a group, aggregated over every member (DepGraph-style)."""

from __future__ import annotations

import numpy as np

from graphprune.analysis.graph import DimGraph
from graphprune.analysis.groups import Group
from graphprune.errors import GraphpruneError

CRITERIA = ("l1", "l2", "bn-scale", "random")


def unit_norms(g: DimGraph, group: Group, order: int) -> np.ndarray:
    """Sum over members of each unit's weight norm, each member normalised by its mean."""
    total = np.zeros(group.size)
    for use, axis in group.params:
        units = g.space.unit_map(use.axes[axis], group.root)
        array = np.moveaxis(np.asarray(use.array, dtype=np.float64), axis, 0).reshape(len(units), -1)
        per_position = np.abs(array).sum(1) if order == 1 else (array**2).sum(1)
        mask = units >= 0
        member = np.bincount(units[mask], weights=per_position[mask], minlength=group.size)
        if order == 2:
            member = np.sqrt(member)
        mean = member.mean()
        total += member / mean if mean > 0 else member
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
