"""The dimension graph: every tensor axis of a model as an expression over dimension variables.

Op rules (``rules/``) relate the axes of each node's inputs and outputs. Weights are seen per use
(node, input slot), so an initializer shared by unrelated nodes is never silently coupled: the
rewriter slices it once when all uses agree and copies it otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.analysis.dims import Atom, DimSpace, Expr, Incompatible


class Decline(Exception):
    """Raised by an op rule that cannot relate this node's axes; the node's axes get blocked."""


@dataclass
class ParamUse:
    """One constant operand of one node, with the expression of each of its axes."""

    node: ir.Node
    index: int
    value: ir.Value
    axes: list[Expr]
    roles: list[str]  # per axis: "in" (read and contracted), "out" (produces the unit), "param"

    @property
    def array(self) -> np.ndarray:
        return self.value.const_value.numpy()


RewriteHook = Callable[["DimGraph", dict[int, np.ndarray]], None]


@dataclass
class DimGraph:
    model: ir.Model
    space: DimSpace = field(default_factory=DimSpace)
    axes_of: dict[ir.Value, list[Expr]] = field(default_factory=dict)
    params: dict[tuple[ir.Node, int], ParamUse] = field(default_factory=dict)
    hooks: list[tuple[ir.Node, RewriteHook]] = field(default_factory=list)
    declined: list[tuple[ir.Node, str]] = field(default_factory=list)
    # MatMuls between two activations (attention scores and mixing), with the free axis of their
    # second operand: their batch axes are heads, and that axis of P·V is the per-head value width.
    activation_matmuls: list[tuple[ir.Node, Expr]] = field(default_factory=list)
    # Axes an Expand creates from an extent of 1 (the repeat of grouped-query attention, masks).
    broadcasts: list[Expr] = field(default_factory=list)
    # Graph inputs and outputs whose axes pruning may shrink (KV caches): (value, axis).
    interface_axes: list[tuple[ir.Value, int]] = field(default_factory=list)

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    @property
    def opset(self) -> int:
        return self.model.opset_imports.get("", self.model.opset_imports.get("ai.onnx", 1))

    # ---- values ----------------------------------------------------------------------------
    @staticmethod
    def const(value: ir.Value | None) -> np.ndarray | None:
        if value is None or value.is_graph_input():
            return None
        if value.const_value is not None:
            return value.const_value.numpy()
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
            attr = producer.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                return attr.value.numpy()
        return None

    @staticmethod
    def shape(value: ir.Value) -> list[int | str | None] | None:
        if value.shape is None:
            return None
        dims: list[int | str | None] = []
        for d in value.shape:
            if isinstance(d, int):
                dims.append(d)
            else:
                dims.append(d.value if isinstance(d.value, str) else None)
        return dims

    def axes(self, value: ir.Value) -> list[Expr]:
        """Expressions of an activation's axes, created on first sight from its inferred shape."""
        if value in self.axes_of:
            return self.axes_of[value]
        dims = self.shape(value)
        if dims is None:
            raise Decline(f"the shape of '{value.name}' is not known")
        exprs = [
            self.space.new(d if isinstance(d, int) else None, "channel", value.name) for d in dims
        ]
        self.axes_of[value] = exprs
        return exprs

    def operand(self, node: ir.Node, index: int, role: str = "param") -> list[Expr]:
        """Axes of input ``index``: per-use for constants (recorded as parameters), else activations."""
        value = node.inputs[index]
        array = self.const(value)
        if array is None or value.const_value is None:
            return self.axes(value)
        key = (node, index)
        if key not in self.params:
            exprs = [self.space.new(int(n), "channel", value.name) for n in array.shape]
            self.params[key] = ParamUse(node, index, value, exprs, [role] * array.ndim)
        return self.params[key].axes

    def set_role(self, node: ir.Node, index: int, axis: int, role: str) -> None:
        self.params[(node, index)].roles[axis] = role

    def is_param(self, value: ir.Value | None) -> bool:
        return value is not None and value.const_value is not None and not value.is_graph_input()

    # ---- relations -------------------------------------------------------------------------
    def tie(self, a: Expr, b: Expr) -> None:
        try:
            self.space.unify(a, b)
        except Incompatible as err:
            self.space.block(a, str(err))
            self.space.block(b, str(err))
            raise Decline(f"axes cannot be related: {err}") from err

    def fixed(self, size: int, origin: str, why: str) -> Atom:
        return self.space.new(size, "fixed", origin, blocked=why)

    def block(self, e: Expr, reason: str) -> None:
        self.space.block(e, reason)

    def block_value(self, value: ir.Value, reason: str) -> None:
        if value.shape is None or value.const_value is not None:
            return
        for e in self.axes(value):
            self.space.block(e, reason)

    def hook(self, node: ir.Node, fn: RewriteHook) -> None:
        self.hooks.append((node, fn))

    def new_size(self, e: Expr, removed: dict[int, np.ndarray]) -> int | None:
        return self.space.new_size(e, removed)
