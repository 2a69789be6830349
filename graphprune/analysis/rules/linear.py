"""Conv, ConvTranspose, Gemm, MatMul: the producers and consumers of units."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.analysis.dims import Expr, Prod
from graphprune.analysis.graph import Decline, DimGraph
from graphprune.analysis.rules.base import (
    attr,
    block_axes,
    rule,
    set_attr,
    where,
)


@dataclass
class ConvChannels:
    x: Expr  # input channel axis
    y: Expr  # output channel axis
    per_in: Expr  # input channels within one group
    per_out: Expr  # output channels within one group
    groups: Expr | None  # the group index, when there is more than one group


def _conv_channels(node: ir.Node, g: DimGraph, groups: int, per_in: int, per_out: int) -> ConvChannels:
    origin = node.name
    cout = g.space.new(per_out, "channel", origin)
    if groups == 1:
        cin = g.space.new(per_in, "channel", origin)
        return ConvChannels(cin, cout, cin, cout, None)
    if per_in == 1:
        # Depthwise: each input channel has its own filters; the channel is the group itself.
        group_var = g.space.new(groups, "channel", origin)
        return ConvChannels(group_var, Prod((group_var, cout)), g.fixed(1, origin, "depthwise"), cout,
                            group_var)
    # Grouped: the same in/out index is removed in every group, so all groups keep equal width;
    # whole groups are a separate unit kind.
    group_var = g.space.new(groups, "conv-group", origin)
    cin = g.space.new(per_in, "channel", origin)
    return ConvChannels(Prod((group_var, cin)), Prod((group_var, cout)), cin, cout, group_var)


@rule("Conv", "ConvTranspose")
def conv(node: ir.Node, g: DimGraph) -> None:
    if not g.is_param(node.inputs[1]):
        raise Decline("the weight is not a constant")
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    w = g.operand(node, 1)
    w_shape = g.const(node.inputs[1]).shape
    groups = attr(node, "group", 1)
    if node.op_type == "ConvTranspose":  # weight [in, out/group, k...]
        ch = _conv_channels(node, g, groups, w_shape[0] // groups, w_shape[1])
        g.tie(w[0], ch.x)
        g.tie(w[1], ch.per_out)
        w_in, w_out = 0, 1
    else:  # weight [out, in/group, k...]
        ch = _conv_channels(node, g, groups, w_shape[1], w_shape[0] // groups)
        g.tie(w[0], ch.y)
        g.tie(w[1], ch.per_in)
        w_in, w_out = 1, 0
    g.tie(x[0], y[0])
    g.tie(x[1], ch.x)
    g.tie(y[1], ch.y)
    g.set_role(node, 1, w_in, "in")
    g.set_role(node, 1, w_out, "out")
    if groups > 1 and g.space.size(ch.per_in) == 1:
        g.set_role(node, 1, 0, "in")  # depthwise: each filter reads exactly its channel
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        g.tie(g.operand(node, 2, role="out")[0], y[1])
    block_axes(g, x[2:] + y[2:] + w[2:], f"spatial axis of {where(node)}")
    for axis in range(2, len(w)):
        g.set_role(node, 1, axis, "kernel")
    if ch.groups is not None:
        group_expr = ch.groups

        def update(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
            new = g.new_size(group_expr, removed)
            if new != attr(node, "group", 1):
                set_attr(node, "group", int(new))

        g.hook(node, update)


@rule("Gemm")
def gemm(node: ir.Node, g: DimGraph) -> None:
    if not g.is_param(node.inputs[1]) or g.is_param(node.inputs[0]):
        raise Decline("only Gemm with a constant B and a computed A is supported")
    a, b, y = g.axes(node.inputs[0]), g.operand(node, 1), g.axes(node.outputs[0])
    m, k = (a[1], a[0]) if attr(node, "transA", 0) else (a[0], a[1])
    bk, bn = (1, 0) if attr(node, "transB", 0) else (0, 1)
    g.tie(m, y[0])
    g.tie(k, b[bk])
    g.tie(b[bn], y[1])
    g.set_role(node, 1, bk, "in")
    g.set_role(node, 1, bn, "out")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = g.operand(node, 2, role="out")
        c_shape = g.const(node.inputs[2]).shape
        for axis, (dim, e) in enumerate(zip(c_shape, c)):
            target = y[len(y) - len(c) + axis]
            if dim != 1:
                g.tie(e, target)


@rule("MatMul")
def matmul(node: ir.Node, g: DimGraph) -> None:
    matmul_relations(node, g, trans_a=False, trans_b=False)


def matmul_relations(node: ir.Node, g: DimGraph, trans_a: bool, trans_b: bool) -> None:
    """op(A)·op(B) with numpy broadcasting of the batch axes; op transposes the last two axes.

    Shared by MatMul and com.microsoft FusedMatMul. A constant operand is a weight: its contracted
    axis reads units ("in"), its free axis produces them ("out").
    """
    a_val, b_val = node.inputs[0], node.inputs[1]
    if g.is_param(a_val) and g.is_param(b_val):
        raise Decline("both operands are constants")
    a, b, y = g.operand(node, 0), g.operand(node, 1), g.axes(node.outputs[0])
    if len(a) < 2 or len(b) < 2:
        raise Decline("1-D MatMul operands are not supported")
    a_m, a_k = (len(a) - 1, len(a) - 2) if trans_a else (len(a) - 2, len(a) - 1)
    b_k, b_n = (len(b) - 1, len(b) - 2) if trans_b else (len(b) - 2, len(b) - 1)
    g.tie(a[a_k], b[b_k])
    g.tie(a[a_m], y[-2])
    g.tie(b[b_n], y[-1])
    for axes in (a, b):
        extra = axes[:-2]
        for k, e in enumerate(extra):
            target = y[len(y) - 2 - len(extra) + k]
            if g.space.size(e) == g.space.size(target) and g.space.size(e) != 1:
                g.tie(e, target)
    if g.is_param(b_val):
        g.set_role(node, 1, b_k, "in")
        g.set_role(node, 1, b_n, "out")
    elif g.is_param(a_val):
        g.set_role(node, 0, a_k, "in")
        g.set_role(node, 0, a_m, "out")
    else:
        # Contracted between two activations: removing units there is not a masking of weights.
        g.block(a[a_k], f"contracted between two activations by {where(node)}")
        g.activation_matmuls.append((node, b[b_n]))
