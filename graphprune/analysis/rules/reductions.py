"""Reductions and ops over one axis; Gather; ops without axis relations."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.analysis.dims import Expr, Incompatible
from graphprune.analysis.graph import Decline, DimGraph
from graphprune.analysis.rules.base import (
    attr,
    block_axes,
    constant_input,
    input_or_attr,
    norm_axis,
    rule,
    set_input,
    tie_all,
    where,
)

REDUCE = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]


@rule(*REDUCE)
def reduce(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    input_form = g.opset >= 18 or (node.op_type == "ReduceSum" and g.opset >= 13)
    axes = input_or_attr(node, g, 1, "axes") if input_form else attr(node, "axes")
    if not axes:
        if input_form and attr(node, "noop_with_empty_axes", 0):
            tie_all(g, x, y)
            return
        axes = list(range(len(x)))
    reduced = {norm_axis(a, len(x)) for a in axes}
    keep = attr(node, "keepdims", 1)
    for k, e in enumerate(x):
        if k in reduced:
            g.block(e, f"reduced over by {where(node)}")
    tie_all(g, [e for k, e in enumerate(x) if k not in reduced],
            [e for k, e in enumerate(y) if not (keep and k in reduced)])


@rule("Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "CumSum", "TopK")
def over_axis(node: ir.Node, g: DimGraph) -> None:
    x = g.axes(node.inputs[0])
    if node.op_type == "CumSum":
        axis_value = g.const(node.inputs[1])
        if axis_value is None:
            raise Decline("the axis is computed at run time")
        axes = {norm_axis(int(axis_value), len(x))}
    else:
        axis = norm_axis(attr(node, "axis", -1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax", "TopK")
                                        else 0), len(x))
        coerced = node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and g.opset < 13
        axes = set(range(axis, len(x))) if coerced else {axis}
    for k in axes:
        g.block(x[k], f"{node.op_type} over this axis in '{node.name}'")
    for out in node.outputs:
        if out is None or not out.name:
            continue
        y = g.axes(out)
        if len(y) == len(x):
            for k in range(len(x)):
                if k in axes:
                    g.block(y[k], f"{node.op_type} over this axis in '{node.name}'")
                else:
                    g.tie(x[k], y[k])
        else:
            tie_all(g, [e for k, e in enumerate(x) if k not in axes], y)


@rule("Gather")
def gather(node: ir.Node, g: DimGraph) -> None:
    indices = node.inputs[1]
    x = g.operand(node, 0)
    axis = norm_axis(attr(node, "axis", 0), len(x))
    idx_rank = len(g.const(indices).shape) if g.const(indices) is not None else len(g.axes(indices))
    _gather_along(node, g, x, axis, idx_rank)


def _gather_along(node: ir.Node, g: DimGraph, x: list[Expr], axis: int, idx_rank: int) -> None:
    """Gather's relations: the axes before and after ``axis`` pass through, ``axis`` is indexed."""
    data, indices = node.inputs
    y = g.axes(node.outputs[0])
    if not (g.is_param(indices) and not g.is_param(data) and _pin_picked(node, g, x[axis])):
        g.block(x[axis], f"gathered along by {where(node)}")
    tie_all(g, x[:axis], y[:axis])
    tie_all(g, x[axis + 1:], y[axis + idx_rank:])
    if not g.is_param(indices):
        tie_all(g, g.axes(indices), y[axis:axis + idx_rank])
    else:  # the picked positions are fixed by constant indices, which nothing rewrites
        block_axes(g, y[axis:axis + idx_rank], f"gathered along by {where(node)} with constant indices")
    if g.is_param(data):  # an embedding table produces its columns
        for k in range(len(x)):
            if k != axis:
                g.set_role(node, 0, k, "out")


def _pin_picked(node: ir.Node, g: DimGraph, along: Expr) -> bool:
    """Constant indices pick a few positions of an activation's axis: pin those, free the rest.

    Falcon's multi-query attention slices K and V out of a fused [heads + 2] axis with indices [-2]
    and [-1]; blocking the whole axis would hide the query heads. The picked positions become fixed
    units, and a hook renumbers the indices once other positions are removed. False: block it all.
    """
    n = g.space.size(along)
    raw = g.const(node.inputs[1])
    if n is None or raw is None or raw.size == 0 or raw.size > 64:
        return False
    positions = np.where(raw < 0, raw + n, raw).astype(np.int64)
    if positions.min() < 0 or positions.max() >= n:
        return False
    try:
        for p in sorted(set(positions.reshape(-1).tolist())):
            g.block(g.space.subrange(along, p, p + 1), f"picked by {where(node)} with constant indices")
    except Incompatible:
        return False

    def renumber(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
        kept = g.space.kept_positions(along, removed)
        if kept is None:
            return
        new = np.searchsorted(kept, positions).astype(np.int64)
        value = constant_input(g, new.reshape(-1).tolist(), node.inputs[1], "indices")
        value.const_value = ir.tensor(new.reshape(raw.shape))
        value.shape = ir.Shape(raw.shape)
        set_input(node, 1, value)

    g.hook(node, renumber)
    return True


@rule("GatherElements", "ScatterElements", "GatherND", "ScatterND")
def gather_elements(node: ir.Node, g: DimGraph) -> None:
    """Index arithmetic over positions: nothing that carries units may pass through.

    Exporters use GatherElements on constant buffers (BERT's token-type ids); blocking every axis it
    touches is exact and keeps the node out of the declined list.
    """
    indices = g.const(node.inputs[1])
    if (node.op_type == "GatherND" and attr(node, "batch_dims", 0) == 0 and indices is not None
            and indices.ndim >= 1 and indices.shape[-1] == 1 and not g.is_param(node.inputs[0])):
        # data[indices[..., 0]]: a Gather along the first axis (dynamo writes x[[-2]] this way).
        _gather_along(node, g, g.axes(node.inputs[0]), 0, indices.ndim - 1)
        return
    reason = f"indexed element-wise by {where(node)}"
    for value in [*node.inputs, *node.outputs]:
        if value is not None and not g.is_param(value) and value.shape is not None:
            block_axes(g, g.axes(value), reason)
    for index, value in enumerate(node.inputs):
        if g.is_param(value):
            block_axes(g, g.operand(node, index), reason)


@rule("Shape", "Size", "ConstantOfShape", "Range", "EyeLike", "Constant", "RandomNormalLike",
      "RandomUniformLike")
def no_relation(node: ir.Node, g: DimGraph) -> None:
    """These read only extents (or nothing) from their input: the output is a new index space."""


@rule("Trilu")
def trilu(node: ir.Node, g: DimGraph) -> None:
    x = g.axes(node.inputs[0])
    block_axes(g, x[-2:], f"triangular mask of {where(node)}")
    tie_all(g, x, g.axes(node.outputs[0]))
