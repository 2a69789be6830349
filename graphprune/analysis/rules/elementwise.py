"""Unary and broadcasting elementwise ops."""

from __future__ import annotations

import onnx_ir as ir

from graphprune.analysis.graph import Decline, DimGraph
from graphprune.analysis.rules.base import (
    rule,
    tie_all,
)

UNARY = ["Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "Erf", "Gelu", "Softplus", "Softsign", "Elu", "Selu", "Celu", "ThresholdedRelu", "Mish", "Swish", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN", "IsInf", "Identity", "Cast", "Clip", "CastLike", "BitwiseNot"]


@rule(*UNARY)
def unary(node: ir.Node, g: DimGraph) -> None:
    # Extra inputs (Clip's min/max, CastLike's target) are scalars or type carriers.
    tie_all(g, g.axes(node.inputs[0]), g.axes(node.outputs[0]))


@rule("Dropout")
def dropout(node: ir.Node, g: DimGraph) -> None:
    for out in node.outputs:
        if out is not None and out.name:
            tie_all(g, g.axes(node.inputs[0]), g.axes(out))


BROADCAST = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor"]


@rule(*BROADCAST)
def broadcast(node: ir.Node, g: DimGraph) -> None:
    out_dims = g.shape(node.outputs[0])
    if out_dims is None:
        raise Decline("the output shape is not known")
    out = g.axes(node.outputs[0])
    for index, value in enumerate(node.inputs):
        if value is None:
            continue
        dims = g.shape(value) if not g.is_param(value) else list(g.const(value).shape)
        if dims is None:
            raise Decline(f"the shape of '{value.name}' is not known")
        axes = g.operand(node, index)
        offset = len(out_dims) - len(dims)
        for k, (d, e) in enumerate(zip(dims, axes)):
            target = out_dims[offset + k]
            if isinstance(d, int) and d == target and d != 1:
                g.tie(e, out[offset + k])
            elif not isinstance(d, int) and not isinstance(target, int):
                g.tie(e, out[offset + k])  # two run-time extents: never pruned, may as well be one
            elif not isinstance(d, int) or not isinstance(target, int):
                # Known on one side only: it may broadcast at run time, so neither side is pruned.
                g.block(e, f"extent {d} meets {target} at {node.op_type} '{node.name}'")
                g.block(out[offset + k], f"extent {d} meets {target} at {node.op_type} '{node.name}'")
            elif d != 1:
                raise Decline(f"input '{value.name}' axis {k} ({d}) does not broadcast to {target}")
