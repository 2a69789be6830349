"""The rule registry and the helpers rules share."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphprune.analysis.dims import Expr
from graphprune.analysis.graph import Decline, DimGraph

Rule = Callable[[ir.Node, DimGraph], None]
# (domain, op_type) -> rule; the standard domain is "" (nodes written "ai.onnx" are looked up as "").
RULES: dict[tuple[str, str], Rule] = {}
MICROSOFT = "com.microsoft"


def rule(*op_types: str, domain: str = "") -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in op_types:
            RULES[(domain, op)] = fn
        return fn

    return register


def rule_for(node: ir.Node) -> Rule | None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    return RULES.get((domain, node.op_type))


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def set_attr(node: ir.Node, name: str, value) -> None:
    node.attributes[name] = ir.convenience.convert_attribute(name, value)


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def where(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'"


def input_or_attr(node: ir.Node, g: DimGraph, index: int, name: str) -> list[int] | None:
    """An int list given as attribute (older opsets) or constant input (newer); None if absent."""
    if len(node.inputs) > index and node.inputs[index] is not None:
        value = g.const(node.inputs[index])
        if value is None:
            raise Decline(f"input '{name}' is computed at run time")
        return [int(v) for v in np.atleast_1d(value)]
    value = attr(node, name)
    return None if value is None else [int(v) for v in value]


_fresh = itertools.count()


def constant_input(g: DimGraph, values: list[int], like: ir.Value | None, name: str) -> ir.Value:
    """A fresh integer initializer of ``like``'s type (int64 by default; TF exports use int32 shape
    pieces, and a Concat of shape pieces must keep one type). Never edits one in place: it may be shared."""
    dtype = np.int64
    if like is not None and like.const_value is not None and like.const_value.dtype == ir.DataType.INT32:
        dtype = np.int32
    array = np.asarray(values, dtype=dtype)
    base = like.name if like is not None and like.name else name
    value = ir.Value(name=f"{base}__gp{next(_fresh)}", shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array))
    g.graph.register_initializer(value)
    return value


def set_input(node: ir.Node, index: int, value: ir.Value) -> None:
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def tie_all(g: DimGraph, a: list[Expr], b: list[Expr]) -> None:
    for x, y in zip(a, b):
        g.tie(x, y)


def block_axes(g: DimGraph, exprs: list[Expr], reason: str) -> None:
    for e in exprs:
        g.block(e, reason)
