"""FLAP bias compensation: removed input channels are replaced by their calibration mean.

For a consumer y = W x + b that loses the input positions R, b' = b + W[:, R] · mean(X[:, R]) keeps the
output's expectation (exact when the removed channels are constant on the data). It must run on the
unsliced weights, before rewrite.apply_removal:

- Conv (one group): the removed channel's mean times the sum of its kernel taps goes into the bias
  (input 2, created when absent). With zero padding, border outputs see fewer taps of the constant, so
  the compensation is approximate at the borders (exact for 1x1 convs and unpadded ones).
  Grouped and depthwise convs are skipped: a depthwise filter's output channel goes with its input.
- Gemm with a constant B: alpha · mean[R] · B[R, :] / beta into C (created when absent).
- MatMul with a constant 2-D right operand followed by an Add of a constant [out] bias: into that bias.
  Otherwise the MatMul is skipped (no Add is inserted yet).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.analysis.dims import Expr
from graphprune.analysis.graph import DimGraph, ParamUse
from graphprune.analysis.rules.base import attr
from graphprune.criteria import Consumer, consumers
from graphprune.plan import PrunePlan
from graphprune.rewrite import set_constant_input


@dataclass
class CompensationReport:
    compensated: list[str] = field(default_factory=list)  # consumer node names
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node name, why)

    def to_dict(self) -> dict:
        return {"compensated": len(self.compensated),
                "skipped": [{"node": n, "reason": r} for n, r in self.skipped]}


def compensate_bias(g: DimGraph, plan: PrunePlan, stats: Mapping,
                    skip: Collection[tuple[ir.Node, int]] = ()) -> CompensationReport:
    """``skip``: weight uses (node, input index) already reconstructed (reconstruct.py): left alone."""
    report = CompensationReport()
    for decision in plan.decisions:
        if not len(decision.removed):
            continue
        for c in consumers(g, decision.group):
            node = c.use.node
            if (node, c.use.index) in skip:
                continue
            s = stats.get(c.key) if c.key is not None else None
            if s is None:
                report.skipped.append((node.name, "no calibration statistics for its input"))
                continue
            positions = np.flatnonzero(np.isin(c.units, decision.removed))
            if not len(positions):
                continue
            why = _compensate(g, c, positions, s.mean[positions])
            if why:
                report.skipped.append((node.name, why))
            elif why is not None:
                report.compensated.append(node.name)
    return report


def _compensate(g: DimGraph, c: Consumer, positions: np.ndarray, mean: np.ndarray) -> str | None:
    """Empty when compensated, else why not; None when nothing needs it (a depthwise filter's output channel
    is the removed input channel itself, so it goes as well)."""
    node, use = c.use.node, c.use
    dtype = use.array.dtype
    w = np.asarray(use.array, dtype=np.float64)
    if node.op_type == "Conv" and use.index == 1:
        groups = attr(node, "group", 1)
        if groups > 1 and w.shape[1] == 1 and w.shape[0] == groups:
            return None
        if groups != 1 or c.axis != 1:
            return "grouped conv"
        delta = w[:, positions].reshape(w.shape[0], len(positions), -1).sum(-1) @ mean
        return add_to_bias(g, node, 2, delta, use.axes[0], dtype)
    if node.op_type == "Gemm" and use.index == 1 and w.ndim == 2:
        b = w.T if attr(node, "transB", 0) else w  # [in, out]
        beta = float(attr(node, "beta", 1.0))
        if beta == 0.0:
            return "Gemm with beta 0 ignores its bias"
        delta = float(attr(node, "alpha", 1.0)) * (mean @ b[positions]) / beta
        out_axis = 0 if attr(node, "transB", 0) else 1
        return add_to_bias(g, node, 2, delta, use.axes[out_axis], dtype)
    if node.op_type == "MatMul" and use.index == 1 and w.ndim == 2:
        delta = mean @ w[positions]
        uses = list(node.outputs[0].uses())
        if len(uses) == 1 and uses[0].node.op_type == "Add":
            add, index = uses[0].node, 1 - uses[0].idx
            bias = g.const(add.inputs[index])
            if bias is not None and bias.shape == delta.shape and (add, index) in g.params:
                return add_to_bias(g, add, index, delta, use.axes[1], dtype)
        return "MatMul without a constant bias Add after it"
    return f"{node.op_type} consumer not supported"


def add_to_bias(g: DimGraph, node: ir.Node, index: int, delta: np.ndarray, out_axis: Expr, dtype) -> str:
    """Add delta to the node's bias input (broadcast on its last axis), as a fresh initializer."""
    current = node.inputs[index] if index < len(node.inputs) else None
    if current is None:
        array = delta
    else:
        bias = g.const(current)
        if bias is None or (node, index) not in g.params:
            return "its bias is not a constant"
        if not bias.shape or bias.shape[-1] != len(delta):
            return f"its bias of shape {list(bias.shape)} does not broadcast per output"
        array = bias.astype(np.float64) + delta
        dtype = bias.dtype
    value = set_constant_input(g.graph, node, index, array.astype(dtype), f"{node.name}__bias_compensated")
    key = (node, index)
    if key in g.params:
        g.params[key].value = value  # the slicing plan of the old bias holds for the new one
    else:
        g.params[key] = ParamUse(node, index, value, [out_axis], ["out"])
    return ""
