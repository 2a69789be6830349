"""Pooling, Pad, Resize, DepthToSpace/SpaceToDepth."""

from __future__ import annotations

import onnx_ir as ir

from graphprune.analysis.dims import Prod
from graphprune.analysis.graph import DimGraph
from graphprune.analysis.rules.base import (
    attr,
    block_axes,
    input_or_attr,
    norm_axis,
    rule,
    where,
)
from graphprune.analysis.rules.layout import shape_hook


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
      "MaxRoiPool", "MaxUnpool")
def pool(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    g.tie(x[0], y[0])
    g.tie(x[1], y[1])
    block_axes(g, x[2:] + y[2:], f"spatial axis of {where(node)}")
    for extra in node.outputs[1:]:
        if extra is not None and extra.name:
            g.block_value(extra, f"pooling indices of {where(node)}")


@rule("Pad")
def pad(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    pads = input_or_attr(node, g, 1, "pads") if g.opset >= 11 else attr(node, "pads")
    axes = (input_or_attr(node, g, 3, "axes") if g.opset >= 18 else None) or list(range(len(x)))
    padded = {norm_axis(a, len(x)) for k, a in enumerate(axes)
              if pads[k] != 0 or pads[k + len(axes)] != 0}
    for k in range(len(x)):
        if k in padded:
            g.block(x[k], f"padded by {where(node)}")
            g.block(y[k], f"padded by {where(node)}")
        else:
            g.tie(x[k], y[k])


@rule("Resize", "Upsample")
def resize(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    x_dims, y_dims = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    for k in range(len(x)):
        if isinstance(x_dims[k], int) and x_dims[k] == y_dims[k] and k < 2:
            g.tie(x[k], y[k])
        else:
            g.block(x[k], f"resized by {where(node)}")
            g.block(y[k], f"resized by {where(node)}")
    sizes = node.inputs[3] if node.op_type == "Resize" and len(node.inputs) > 3 else None
    if sizes is not None and not (g.const(sizes) is not None and g.const(sizes).size == 0):
        shape_hook(node, g, sizes, y, keep_special=False)


@rule("DepthToSpace", "SpaceToDepth")
def depth_space(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    b = attr(node, "blocksize")
    why = f"block position of {where(node)}"
    bh, bw = g.fixed(b, node.name, why), g.fixed(b, node.name, why)
    g.tie(x[0], y[0])
    if node.op_type == "SpaceToDepth":
        g.tie(y[1], Prod((bh, bw, x[1])))
    elif attr(node, "mode", "DCR") == "CRD":
        g.tie(x[1], Prod((y[1], bh, bw)))
    else:
        g.tie(x[1], Prod((bh, bw, y[1])))
    block_axes(g, x[2:] + y[2:], f"spatial axis of {where(node)}")
