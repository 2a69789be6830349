"""Groups: the prunable index spaces of a dimension graph, with every weight slice they own."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.analysis.graph import DimGraph, ParamUse

# Unit kinds that a plain --ratio prunes; other kinds need their own pass or option.
DEFAULT_KINDS = ("channel", "head")
UNIT_KINDS = ("channel", "head", "head-repeat", "head-dim", "conv-group")


@dataclass
class Group:
    id: int
    root: int
    size: int
    kind: str
    params: list[tuple[ParamUse, int]] = field(default_factory=list)  # (weight use, axis)
    values: list[tuple[ir.Value, int]] = field(default_factory=list)  # (activation, axis)
    blocked: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.why_not

    @property
    def why_not(self) -> str:
        if self.blocked:
            return self.blocked[0]
        if self.size < 2:
            return "a single unit"
        if not any(use.roles[axis] in ("in", "out") for use, axis in self.params):
            return "no weights to remove"
        return ""

    @property
    def nodes(self) -> list[ir.Node]:
        seen: dict[ir.Node, None] = {}
        for use, _ in self.params:
            seen.setdefault(use.node)
        return list(seen)

    def weights_per_unit(self, g: DimGraph) -> float:
        """Weight elements that one unit of this group owns, summed over its members."""
        total = 0.0
        for use, axis in self.params:
            positions = int((g.space.unit_map(use.axes[axis], self.root) >= 0).sum())
            shape = use.value.const_value.shape
            total += np.prod(shape, dtype=np.float64) / shape[axis] * positions / self.size
        return total


def find_groups(g: DimGraph) -> list[Group]:
    """Every index space that a weight axis belongs to, in graph order."""
    by_root: dict[int, Group] = {}

    def group_of(root: int) -> Group:
        if root not in by_root:
            var = g.space.vars[root]
            by_root[root] = Group(len(by_root), root, var.size or 0, var.kind, blocked=g.space.reasons(root))
        return by_root[root]

    for use in g.params.values():
        for axis, expr in enumerate(use.axes):
            for root in g.space.atoms(expr):
                if g.space.vars[root].kind != "fixed":
                    group_of(root).params.append((use, axis))
    for value, exprs in g.axes_of.items():
        for axis, expr in enumerate(exprs):
            for root in g.space.atoms(expr):
                if root in by_root:
                    by_root[root].values.append((value, axis))
    # Index spaces that no weight reads or produces (kernel taps, biases alone) are not channels.
    return [group for group in by_root.values() if group.size > 1
            and any(use.roles[axis] in ("in", "out") for use, axis in group.params)]


PROTECTABLE = ("residual",)


def residual_roots(g: DimGraph) -> set[int]:
    """Roots of the dimension variables that pass through a residual sum: an Add (or Sum) of two or more
    activations. Such a group is the stream every block of a stage reads and writes; a unit removed there
    is missing from all of them at once, which no single consumer's compensation can repair."""
    roots: set[int] = set()
    for node in g.graph:
        if node.op_type not in ("Add", "Sum") or not node.outputs or node.outputs[0] not in g.axes_of:
            continue
        activations = [v for v in node.inputs if v is not None and not g.is_param(v)]
        if len(activations) < 2:
            continue
        # Only what two operands both carry is a stream: an attention mask added to the scores is
        # broadcast over the heads, which therefore stay prunable.
        carried = [{a for expr in g.axes_of.get(v, []) for a in g.space.atoms(expr)} for v in activations]
        for expr in g.axes_of[node.outputs[0]]:
            roots.update(a for a in g.space.atoms(expr) if sum(a in seen for seen in carried) >= 2)
    return roots
