"""Normalisations: per-channel parameters, and the axes they normalise over."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.analysis.dims import Prod
from graphprune.analysis.graph import Decline, DimGraph
from graphprune.analysis.rules.base import (
    attr,
    block_axes,
    norm_axis,
    rule,
    set_attr,
    tie_all,
    where,
)


@rule("BatchNormalization")
def batch_norm(node: ir.Node, g: DimGraph) -> None:
    x = g.axes(node.inputs[0])
    for index in range(1, 5):
        g.tie(g.operand(node, index)[0], x[1])
    tie_all(g, x, g.axes(node.outputs[0]))
    for extra in node.outputs[1:]:
        if extra is not None and extra.name:
            raise Decline("training-mode outputs are not supported")


@rule("InstanceNormalization")
def instance_norm(node: ir.Node, g: DimGraph) -> None:
    x = g.axes(node.inputs[0])
    for index in (1, 2):
        g.tie(g.operand(node, index)[0], x[1])
    block_axes(g, x[2:], f"normalised over by {where(node)}")
    tie_all(g, x, g.axes(node.outputs[0]))


@rule("GroupNormalization")
def group_norm(node: ir.Node, g: DimGraph) -> None:
    x = g.axes(node.inputs[0])
    groups = attr(node, "num_groups")
    channels = g.space.size(x[1])
    if channels is None:
        raise Decline("the channel extent is not known")
    # Statistics are taken over each group's channels: whole groups are the unit, the index within
    # a group is normalised over.
    group_var = g.space.new(groups, "channel", node.name)
    within = g.space.new(channels // groups, "channel", node.name, blocked=f"normalised over by {where(node)}")
    g.tie(x[1], Prod((group_var, within)))
    for index in (1, 2):
        param = g.operand(node, index)[0]
        g.tie(param, group_var if g.space.size(param) == groups else x[1])
    block_axes(g, x[2:], f"normalised over by {where(node)}")
    tie_all(g, x, g.axes(node.outputs[0]))

    def update(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
        new = g.new_size(group_var, removed)
        if new != groups:
            set_attr(node, "num_groups", int(new))

    g.hook(node, update)


@rule("LayerNormalization", "RMSNormalization")
def layer_norm(node: ir.Node, g: DimGraph) -> None:
    x = g.axes(node.inputs[0])
    axis = norm_axis(attr(node, "axis", -1), len(x))
    block_axes(g, x[axis:], f"normalised over by {where(node)}")
    for index in (1, 2):
        if len(node.inputs) > index and node.inputs[index] is not None:
            param = g.operand(node, index)
            tie_all(g, param, x[len(x) - len(param):])
    tie_all(g, x, g.axes(node.outputs[0]))


@rule("LRN")
def lrn(node: ir.Node, g: DimGraph) -> None:
    x = g.axes(node.inputs[0])
    g.block(x[1], f"normalised across channels by {where(node)}")
    tie_all(g, x, g.axes(node.outputs[0]))


@rule("MeanVarianceNormalization")
def mvn(node: ir.Node, g: DimGraph) -> None:
    x = g.axes(node.inputs[0])
    for axis in attr(node, "axes", [0, 2, 3]):
        g.block(x[norm_axis(axis, len(x))], f"normalised over by {where(node)}")
    tie_all(g, x, g.axes(node.outputs[0]))
