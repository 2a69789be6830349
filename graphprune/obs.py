"""OBS-style structured saliency ("obs" criterion): the calibration error that removing a unit costs its
consumers after the best least-squares refit of every other input column (Optimal Brain Surgeon).

A consumer y = x W (W as [features, outputs], features = input positions × kernel taps, the layout of
reconstruct._Target.columns()) with H = XᵀX over calibration rows of its input, damped H_λ = H + λI,
λ = damp · mean(diag H), loses, when the column set C of one unit goes,

    S(C) = tr(W_Cᵀ [(H_λ⁻¹)_CC]⁻¹ W_C)

which, with λ → 0, is the increase of ‖XW − XW'‖² when W' refits the other columns by least squares
(the Schur complement [(H⁻¹)_CC]⁻¹ = X_Cᵀ(I − P_K)X_C). A unit owns every tap of every position that
maps to it, and its block is inverted whole. Per consumer the scores are normalised by their mean and
summed over the group's consumers, as activation_scores does; units no consumer reads score 0.

Only the inverse's per-unit diagonal blocks are kept (collect_obs_blocks cuts them right after each
calibration pass), so holding the statistics of a whole model costs features × block size per input,
not features².

Without a Gram matrix (no calibration data, grouped convs, other consumers reconstruct.py cannot model,
inputs over ``max_features`` columns) a consumer takes H = I ("obs/data-free" when no consumer of the
group had data): S(C) = (1 + λ)‖W_C‖², the squared norm of the weights reading the unit. The SPA paper
(Structurally Prune Anything, Wang et al. 2024) pairs OBS with a data-free mode (OBSPA); the stored copies
here show only its abstract. A proxy from the producers' weights (H ≈ W_pᵀW_p, the input's second moment
if the producer read white input) was tried and ranked worse than l2 on the pretrained MobileNetV2: its
channel energies do not follow the data's once BatchNorms are folded into the filters, and without data
nothing refits the kept weights as S(C) assumes. So no proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.analysis.graph import DimGraph
from graphprune.analysis.groups import Group
from graphprune.calibration import Gram, GramKey, collect_gram
from graphprune.criteria import Consumer, consumers
from graphprune.reconstruct import DAMP, GRAM_BYTES, MAX_FEATURES, _by_memory, _Target, weight_target


@dataclass
class UnitBlocks:
    """[(H_λ⁻¹)_CC]⁻¹ for the column set C of every unit of one group in one consumer input."""

    units: np.ndarray  # per input position: the unit it was cut for (-1: another group's or none)
    taps: int
    features: int
    # per block size: (unit ids [U], their columns [U, k], the inverted blocks [U, k, k])
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]

    def scores(self, weights: np.ndarray, size: int) -> np.ndarray:
        """S(C) per unit (0 for units without columns here); ``weights``: [features, outputs]."""
        total = np.zeros(size)
        for unit_ids, columns, blocks in self.parts:
            w = weights[columns]  # [U, k, outputs]
            total[unit_ids] = np.einsum("uko,ukl,ulo->u", w, blocks, w)
        return total


@dataclass
class GroupInverse:
    """(H_λ⁻¹) restricted to all columns of one group's units in one consumer input, for greedy removal.

    Scoring every unit once against the full model (UnitBlocks) misjudges correlated units: each looks
    cheap because the others can stand in for it, and removing them together is not. Greedy elimination
    (as ZipLM/OBC do) removes the cheapest unit, refits the weights and downdates the inverse, and scores
    the next ones against what is left; a unit's score is the cost at its turn, made non-decreasing so
    that the k lowest scores are the first k units removed.
    """

    units: np.ndarray
    taps: int
    features: int
    unit_ids: np.ndarray  # [U]
    columns: np.ndarray  # [U, k]
    inverse: np.ndarray  # [U·k, U·k], rows and columns in the order of columns.reshape(-1)

    def scores(self, weights: np.ndarray, size: int) -> np.ndarray:
        count, width = self.columns.shape
        inverse = self.inverse.copy()  # [U·k, U·k]; rows of removed units go stale and are never read
        w = np.asarray(weights, dtype=np.float64)[self.columns.reshape(-1)]  # [U·k, outputs]
        alive = np.ones(count, dtype=bool)
        costs = np.zeros(count)
        last = 0.0
        for _ in range(count - 1):
            live = np.flatnonzero(alive)
            cols = live[:, None] * width + np.arange(width)  # [L, k]
            diagonal = inverse[cols[:, :, None], cols[:, None, :]]
            blocks = np.linalg.inv((diagonal + diagonal.transpose(0, 2, 1)) / 2)
            own = w[cols]  # [L, k, outputs]
            cost = np.einsum("uko,ukl,ulo->u", own, blocks, own)
            pick = int(np.argmin(cost))
            unit, block = live[pick], blocks[pick]
            last = max(last, float(cost[pick]))
            costs[unit] = last
            alive[unit] = False
            # OBS update of the other weights and Schur downdate of the inverse: one rank-k step each.
            cross = inverse[:, unit * width : (unit + 1) * width] @ block  # [U·k, k]
            w -= cross @ w[unit * width : (unit + 1) * width]
            inverse -= cross @ inverse[unit * width : (unit + 1) * width]
        costs[alive] = 2 * last if last > 0 else 1.0  # the survivor goes last
        total = np.zeros(size)
        total[self.unit_ids] = costs
        return total


GREEDY_FEATURES = 3072  # columns of one group's inverse kept for greedy removal (72 MB in float64)


def _group_inverse(inverse: np.ndarray, units: np.ndarray, taps: int) -> GroupInverse | None:
    """The group's block of the inverse when its units own equally many columns and it fits the bound."""
    ids = np.unique(units[units >= 0])
    positions = [np.flatnonzero(units == unit) for unit in ids]
    if not positions or len({len(p) for p in positions}) != 1 or len(ids) * len(positions[0]) * taps \
            > GREEDY_FEATURES:
        return None
    columns = np.stack([(p[:, None] * taps + np.arange(taps)).reshape(-1) for p in positions])
    flat = columns.reshape(-1)
    return GroupInverse(units, taps, len(units) * taps, ids, columns, inverse[np.ix_(flat, flat)])


# What ``grams`` may map a Gram request to: the Gram itself (cut per group when scored), or the per-group
# blocks collect_obs_blocks already cut from it (group root -> blocks).
GramEntry = Gram | dict[int, UnitBlocks | GroupInverse]


def unit_blocks(h: np.ndarray, units: np.ndarray, taps: int, damp: float = DAMP,
                greedy: bool = True) -> UnitBlocks | GroupInverse:
    """Damp ``h`` (features = len(units) × taps) and invert it; keep the group's block of the inverse for
    greedy removal (``greedy`` and small enough), else cut and invert each unit's block."""
    features = h.shape[0]
    scale = float(np.mean(np.diag(h))) if features else 0.0
    lam = damp * scale if scale > 0 else 1.0  # the ridge convention of reconstruct.solve
    inverse = np.linalg.inv(h + lam * np.eye(features))
    if greedy:
        found = _group_inverse(inverse, units, taps)
        if found is not None:
            return found
    by_size: dict[int, list[tuple[int, np.ndarray]]] = {}
    for unit in np.unique(units[units >= 0]):
        positions = np.flatnonzero(units == unit)
        columns = (positions[:, None] * taps + np.arange(taps)).reshape(-1)
        by_size.setdefault(len(columns), []).append((int(unit), columns))
    parts = []
    for members in by_size.values():  # one batched inverse per block size
        ids = np.array([unit for unit, _ in members])
        columns = np.stack([cols for _, cols in members])
        blocks = inverse[columns[:, :, None], columns[:, None, :]]
        parts.append((ids, columns, np.linalg.inv((blocks + blocks.transpose(0, 2, 1)) / 2)))
    return UnitBlocks(units, taps, features, parts)


def saliency(h: np.ndarray, weights: np.ndarray, units: np.ndarray, taps: int = 1,
             damp: float = DAMP) -> np.ndarray:
    """S(C) for every unit of ``units`` (per input position), ``weights`` [features, outputs]."""
    size = int(units.max()) + 1 if (units >= 0).any() else 0
    return unit_blocks(h, units, taps, damp, greedy=False).scores(weights, size)


# ---------- calibration: per-group blocks of every consumer input's Gram matrix ----------------------


def gram_targets(g: DimGraph, groups: list[Group], max_features: int = MAX_FEATURES
                 ) -> tuple[list[_Target], dict[GramKey, dict[int, np.ndarray]]]:
    """One target per distinct Gram request read by the groups' consumers, and per request the unit map
    of every group that reads it."""
    targets: dict[GramKey, _Target] = {}
    partitions: dict[GramKey, dict[int, np.ndarray]] = {}
    for group in groups:
        for c in consumers(g, group):
            t = weight_target(g, c.use, c.axis)
            if t is None or t.features > max_features:
                continue
            targets.setdefault(t.request, t)
            partitions.setdefault(t.request, {}).setdefault(group.root, c.units)
    return list(targets.values()), partitions


def collect_obs_blocks(model: ir.Model, g: DimGraph, groups: list[Group], calibration: Iterable, *,
                       damp: float = DAMP, max_features: int = MAX_FEATURES, gram_bytes: int = GRAM_BYTES,
                       progress: Callable[[int], None] | None = None) -> dict[GramKey, dict[int, UnitBlocks]]:
    """Per Gram request of the groups' consumers, the per-group unit blocks the obs criterion reads.

    Gram matrices are collected in runs over the calibration set of at most ``gram_bytes`` of them (an
    input read by several consumers counts once) and cut into blocks before the next run.
    """
    targets, partitions = gram_targets(g, groups, max_features)
    found: dict[GramKey, dict[int, UnitBlocks]] = {}
    for batch in _by_memory(targets, gram_bytes):
        grams = collect_gram(model, [t.request for t in batch], calibration, progress=progress)
        for t in batch:
            gram = grams.get(t.request)
            # No rows, another width than the weight reads, or overflowing activations: data-free there.
            if gram is None or gram.count == 0 or gram.gram.shape[0] != t.features \
                    or not np.all(np.isfinite(gram.gram)):
                continue
            found[t.request] = {root: unit_blocks(gram.gram, units, t.taps, damp)
                                for root, units in partitions[t.request].items()}
        del grams
    return found


# ---------- scores -------------------------------------------------------------------------------------


def obs_scores(g: DimGraph, group: Group, grams: Mapping[GramKey, GramEntry] | None, *,
               damp: float = DAMP, max_features: int = MAX_FEATURES) -> tuple[np.ndarray, bool] | None:
    """Group-aggregated S(C) over the group's consumers (None without consumers), and whether any
    consumer's H came from calibration data."""
    found = consumers(g, group)
    if not found:
        return None
    total = np.zeros(group.size)
    read = np.zeros(group.size)
    used = False
    for c in found:
        member, measured = _consumer_saliency(g, group, c, grams, damp, max_features)
        used |= measured
        mean = member.mean()
        total += member / mean if mean > 0 else member
        read += _squared_norms(c, group.size)
    total[read == 0] = 0.0
    return total, used


def _consumer_saliency(g: DimGraph, group: Group, c: Consumer, grams: Mapping | None, damp: float,
                       max_features: int) -> tuple[np.ndarray, bool]:
    t = weight_target(g, c.use, c.axis)  # None: grouped convs and consumers reconstruction cannot model
    if t is not None and grams:
        blocks = _cut(grams.get(t.request), group.root, c.units, t.taps, damp, max_features)
        if blocks is not None and blocks.features == t.features:
            return blocks.scores(t.columns(), group.size), True
    # H = I: S(C) = (1 + λ) ‖W_C‖², a constant factor that the per-consumer normalisation drops.
    return _squared_norms(c, group.size), False


def _squared_norms(c: Consumer, size: int) -> np.ndarray:
    """‖W_C‖² per unit: the weight slices reading its positions, every other axis included."""
    rows = np.moveaxis(np.asarray(c.use.array, dtype=np.float64), c.axis, 0).reshape(len(c.units), -1)
    mask = c.units >= 0
    return np.bincount(c.units[mask], weights=(rows[mask] ** 2).sum(1), minlength=size)


def _cut(entry: GramEntry | None, root: int, units: np.ndarray, taps: int, damp: float,
         max_features: int) -> UnitBlocks | None:
    if isinstance(entry, Gram):
        if entry.count == 0 or entry.gram.shape[0] > max_features:
            return None
        return unit_blocks(entry.gram, units, taps, damp)
    blocks = entry.get(root) if isinstance(entry, dict) else None
    return blocks if blocks is not None and np.array_equal(blocks.units, units) else None
