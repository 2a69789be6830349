"""Per-channel statistics matching after pruning: the folded-BatchNorm form of re-estimating BatchNorm.

A pruned network's layers see inputs whose per-channel mean and spread have drifted from the dense
model's, and the drift compounds layer by layer. In a network that still has BatchNorm, re-estimating
its statistics on a few batches (EagleEye's "adaptive BN") removes most of that drift without training.
Exported models usually have BatchNorm folded into the convolutions, so here the same correction is a
per-output-channel affine map written into each Conv/Gemm's weight and bias: with the pruned output
y_p and the dense output y_d of the same node (same name; kept channels only) on the calibration data,

    y' = s · y_p + c,   W' = s · W (per output channel),   b' = s · b + c,

where ``mode`` chooses s and c:

- "mean":       s = 1, c = mean(y_d) − mean(y_p) (bias correction only);
- "moments":    s = std(y_d) / std(y_p), c = mean(y_d) − s · mean(y_p) (mean and spread of the dense
                 channel: what BatchNorm re-estimation gives);
- "regression": s = cov(y_d, y_p) / var(y_p), c likewise (the per-channel least-squares fit; never
                 raises the calibration error, but shrinks channels that correlate weakly).

Nodes are corrected in topological order, a stage at a time (a stage holds nodes none of which reads
another's output), each on the pruned model as already corrected upstream. Each stage runs only the
nodes between the last stage's outputs and its own, fed from a cache (staged.py), so all stages together
cost about one run of each model over the calibration set. Only nodes downstream of a removal are
touched. Grouped and depthwise convolutions are included (their output channels are still axis 0 of the
weight). A MatMul is
corrected where one Add of a constant per-channel bias reads it (a PyTorch Linear), matched on that
Add's output; other MatMuls have no bias to shift and are left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.analysis.graph import DimGraph
from graphprune.analysis.rules.base import attr
from graphprune.errors import GraphpruneError
from graphprune.reconstruct import _depends
from graphprune.report import LINEAR_OPS
from graphprune.rewrite import set_constant_input
from graphprune.staged import CACHE_BYTES, StagedRunner

MODES = ("mean", "moments", "regression")
MAX_SCALE = 4.0  # a channel the pruned model almost silenced is not blown up past this


@dataclass
class MatchReport:
    mode: str
    corrected: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Per corrected node: relative calibration error ‖y_d − y_p‖ / ‖y_d − mean(y_d)‖ before and after.
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    passes: int = 0

    def to_dict(self) -> dict:
        before = [e[0] for e in self.errors.values()]
        after = [e[1] for e in self.errors.values()]
        return {"mode": self.mode, "corrected": len(self.corrected),
                "skipped": [{"node": n, "reason": r} for n, r in self.skipped],
                "mean_relative_error_before": float(np.mean(before)) if before else None,
                "mean_relative_error_after": float(np.mean(after)) if after else None,
                "calibration_passes": self.passes}


@dataclass
class MatchTarget:
    node: ir.Node
    output: str
    out_kept: np.ndarray | None  # kept output channels (None: all)
    weight_axis: int  # the weight's output-channel axis
    channel_axis: int  # the output's channel axis
    bias: tuple[ir.Node, int] | None = None  # where the bias lives (None: the node's input 2)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise GraphpruneError(f"--match-stats: unknown mode '{mode}'; choose from {', '.join(MODES)}.")
    return mode


def match_targets(g: DimGraph, removed: dict[int, np.ndarray], report: MatchReport) -> list[MatchTarget]:
    """The Conv/Gemm nodes downstream of a removal, in topological order, with their kept output
    channels; call it before rewrite.apply_removal."""
    sliced = {use.node for use in g.params.values()
              if any(g.space.kept_positions(axis, removed) is not None for axis in use.axes)}
    heads = _heads(g.model.graph)
    affected: set[ir.Node] = set()
    found = []
    for node in g.model.graph:
        upstream = any(v is not None and v.producer() in affected for v in node.inputs)
        if node not in sliced and not upstream:
            continue
        affected.add(node)
        if node.op_type not in ("Conv", "Gemm", "MatMul") or (node, 1) not in g.params:
            continue
        if node in heads:
            why = "it computes the model's output (a head), where no BatchNorm sits to re-estimate"
            report.skipped.append((node.name, why))
            continue
        if not node.outputs or not node.outputs[0].name:
            report.skipped.append((node.name, "its output has no name to match in the dense model"))
            continue
        if len(node.inputs) > 2 and node.inputs[2] is not None and g.const(node.inputs[2]) is None:
            report.skipped.append((node.name, "its bias is not a constant"))
            continue
        use = g.params[(node, 1)]
        if node.op_type == "MatMul":
            bias = _matmul_bias(g, node)
            if isinstance(bias, str):
                report.skipped.append((node.name, bias))
                continue
            add, _ = bias
            if not add.outputs[0].name:
                report.skipped.append((node.name, "its bias Add's output has no name to match"))
                continue
            out_kept = g.space.kept_positions(use.axes[1], removed)
            found.append(MatchTarget(node, add.outputs[0].name, out_kept, 1, -1, bias))
            continue
        if node.op_type == "Conv":
            weight_axis, channel_axis = 0, 1
        else:
            weight_axis, channel_axis = (0 if attr(node, "transB", 0) else 1), -1
        out_kept = g.space.kept_positions(use.axes[weight_axis], removed)
        found.append(MatchTarget(node, node.outputs[0].name, out_kept, weight_axis, channel_axis))
    return found


def _matmul_bias(g: DimGraph, node: ir.Node) -> tuple[ir.Node, int] | str:
    """A MatMul's bias: the constant operand of the one Add that reads it (one value per output
    channel), as PyTorch exports a Linear; else why there is none (an Add would have to be inserted)."""
    weight = g.const(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return "its weight is not a constant matrix"
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        add, index = uses[0].node, 1 - uses[0].idx
        bias = g.const(add.inputs[index])
        if bias is not None and bias.size == weight.shape[1] and bias.shape[-1] == weight.shape[1]:
            return add, index
    return "MatMul without a constant bias Add after it"


def _heads(graph: ir.Graph) -> set[ir.Node]:
    """The layers that reach a graph output through no other layer (a classifier, a detection head).

    Re-estimating BatchNorm corrects the layers a BatchNorm follows; a head has none. Matching a
    classifier's per-class logit statistics on a small calibration set also measured worse on
    MobileNetV2 (top-1 agreement 0.27 with, 0.30 without; docs/stat_match.md)."""
    heads: set[ir.Node] = set()
    seen: set[ir.Node] = set()
    stack = [v.producer() for v in graph.outputs if v.producer() is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op_type in LINEAR_OPS:
            heads.add(node)
            continue
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return heads


class _Moments:
    """Per-channel sums of y_p, y_p², y_d, y_d² and y_p·y_d (float64)."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.sums = np.zeros((5, channels))

    def add(self, p: np.ndarray, d: np.ndarray) -> None:
        self.n += p.shape[0]
        self.sums += np.stack([p.sum(0), (p * p).sum(0), d.sum(0), (d * d).sum(0), (p * d).sum(0)])

    def fit(self, mode: str) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(s, c, relative error before, after)."""
        mp, pp, md, dd, pd = self.sums / max(self.n, 1)
        var_p, var_d = np.maximum(pp - mp * mp, 0.0), np.maximum(dd - md * md, 0.0)
        cov = pd - mp * md
        live = var_p > 1e-12 * np.maximum(var_d, 1e-30)
        s = np.ones_like(mp)
        if mode == "moments":
            s[live] = np.sqrt(var_d[live] / var_p[live])
        elif mode == "regression":
            s[live] = np.maximum(cov[live] / var_p[live], 0.0)
        s = np.minimum(s, MAX_SCALE)
        c = md - s * mp

        def error(scale: np.ndarray, shift: np.ndarray) -> float:
            # E[(d − s p − c)²] summed over channels, from the moments.
            e = (dd - 2 * scale * pd - 2 * shift * md + scale * scale * pp + 2 * scale * shift * mp
                 + shift * shift)
            return float(np.sqrt(max(e.sum(), 0.0) / max(var_d.sum(), 1e-30)))

        return s, c, error(np.ones_like(s), np.zeros_like(c)), error(s, c)


def match_statistics(g: DimGraph, dense: ir.Model, found: list[MatchTarget], report: MatchReport,
                     calibration: Iterable, *, cache_bytes: int = CACHE_BYTES,
                     progress: Callable[[int], None] | None = None) -> None:
    """Correct ``found`` (match_targets) on the sliced model ``g.model`` against ``dense`` (a copy of the
    model before pruning), stage by stage; each stage runs from the values the last one left
    (staged.StagedRunner, up to ``cache_bytes`` of them per model; 0: from the inputs every time)."""
    pruned_runner, dense_runner = StagedRunner(calibration, cache_bytes), StagedRunner(calibration, cache_bytes)
    for stage in _stages(found):
        report.passes += 1
        names = [t.output for t in stage]
        moments: dict[int, _Moments] = {}
        failed: dict[int, str] = {}
        pruned_runs = pruned_runner.run(g.model, names, progress)
        dense_runs = dense_runner.run(dense, names)
        for pruned, reference in zip(pruned_runs, dense_runs):
            for i, t in enumerate(stage):
                if i not in failed:
                    why = _accumulate(moments, i, t, pruned[t.output], reference[t.output])
                    if why:
                        failed[i] = why
        for i, t in enumerate(stage):
            if i in failed or i not in moments:
                report.skipped.append((t.node.name, failed.get(i, "no calibration rows for its output")))
                continue
            s, c, before, after = moments[i].fit(report.mode)
            if not (np.all(np.isfinite(s)) and np.all(np.isfinite(c))):
                report.skipped.append((t.node.name, "its channel statistics are not finite"))
                continue
            why = _write(g, t, s, c)
            if why:
                report.skipped.append((t.node.name, why))
                continue
            pruned_runner.update(t.output, _affine(s, c, t.channel_axis))
            report.corrected.append(t.node.name)
            report.errors[t.node.name] = (before, after)


def _affine(s: np.ndarray, c: np.ndarray, axis: int) -> Callable[[np.ndarray], np.ndarray]:
    """y -> s·y + c along the channel axis, in y's dtype (what the rewritten layer now outputs)."""
    def change(y: np.ndarray) -> np.ndarray:
        shape = [1] * y.ndim
        shape[axis] = len(s)
        return (y * s.reshape(shape) + c.reshape(shape)).astype(y.dtype)

    return change


def _stages(found: list[MatchTarget]) -> list[list[MatchTarget]]:
    """Consecutive targets, a new stage wherever one reads (directly or not) a target of the current one.
    Never merged beyond that: on MobileNetV2, 8 merged stages (layers corrected on inputs from before
    their upstream neighbours' corrections) gave top-1 agreement 0.01 against 0.27 (docs/stat_match.md)."""
    stages: list[list[MatchTarget]] = []
    members: set[ir.Node] = set()
    for t in found:
        if not stages or _depends(t.node, members):
            stages.append([])
            members = set()
        stages[-1].append(t)
        members.add(t.node)
    return stages


def _accumulate(moments: dict[int, _Moments], i: int, t: MatchTarget, p: np.ndarray, d: np.ndarray) -> str:
    p = np.asarray(p, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    if t.out_kept is not None:
        d = np.take(d, t.out_kept, axis=t.channel_axis)
    if p.shape != d.shape:
        return f"its output has shape {list(p.shape)}, the dense model's kept channels {list(d.shape)}"
    p = np.moveaxis(p, t.channel_axis, -1).reshape(-1, p.shape[t.channel_axis])
    d = np.moveaxis(d, t.channel_axis, -1).reshape(-1, d.shape[t.channel_axis])
    if i not in moments:
        moments[i] = _Moments(p.shape[1])
    if moments[i].sums.shape[1] != p.shape[1]:
        return "its output changes its channel count between calibration batches"
    moments[i].add(p, d)
    return ""


def _write(g: DimGraph, t: MatchTarget, s: np.ndarray, c: np.ndarray) -> str:
    node = t.node
    weight = node.inputs[1].const_value if node.inputs[1] is not None else None
    if weight is None:
        return "its weight is not a constant after slicing"
    w = weight.numpy()
    if w.shape[t.weight_axis] != len(s):
        return f"its weight has {w.shape[t.weight_axis]} output channels, its output {len(s)}"
    shape = [1] * w.ndim
    shape[t.weight_axis] = len(s)
    bias_node, bias_index = t.bias or (node, 2)
    bias_value = bias_node.inputs[bias_index] if len(bias_node.inputs) > bias_index else None
    if node.op_type == "Gemm":
        beta = float(attr(node, "beta", 1.0))
        if beta == 0.0:
            return "Gemm with beta 0 ignores its bias"
    else:
        beta = 1.0
    if bias_value is not None:
        bias = g.const(bias_value)
        if bias is None:
            return "its bias is not a constant"
        bias = bias.astype(np.float64)
        if bias.size == 1:
            bias = np.full(len(s), float(bias.reshape(-1)[0]))
        elif bias.shape[-1] != len(s) or bias.size != len(s):
            return f"its bias of shape {list(bias.shape)} is not one value per output channel"
        bias = bias.reshape(-1) * beta
    else:
        bias = np.zeros(len(s))
    new_bias = (s * bias + c) / beta
    _set_input(g, node, 1, (w.astype(np.float64) * s.reshape(shape)).astype(w.dtype), "matched")
    dtype = g.const(bias_value).dtype if bias_value is not None else w.dtype
    _set_input(g, bias_node, bias_index, new_bias.astype(dtype), "matched_bias")
    return ""


def _set_input(g: DimGraph, node: ir.Node, index: int, array: np.ndarray, tag: str) -> None:
    set_constant_input(g.graph, node, index, array, f"{node.name}__{tag}")
