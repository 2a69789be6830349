"""Attention heads, found through the dimension graph rather than by matching attention patterns.

A head is an index that an activation×activation MatMul (scores = Q·Kᵀ, context = P·V) carries as a
*batch* axis: every head computes its own attention. The projections that produce Q, K and V and the
output projection that consumes the context see the same index as the outer factor of a reshaped
axis, so removing a head removes a slice from each of them.

Grouped-query attention repeats each KV head for several query heads (Expand then Reshape, or an
Expand of a new axis): the query-head axis is Prod(kv_group, repeat). The KV group is the "head" unit
(removing it removes its query heads with it); the repeat factor is its own kind, "head-repeat"
(one query head out of every group), which is not pruned by default.

The free axis of V in P·V is the per-head value width, "head-dim": removing it keeps attention
exact but leaves heads with value and query widths that fused kernels may reject, so it is not
pruned by default either.
"""

from __future__ import annotations

from graphprune.analysis.dims import Atom
from graphprune.analysis.graph import DimGraph

# A var seen both as a repeat and as a head is a repeat; a head-dim seen as a head is a head.
KIND_RANK = {"head-repeat": 0, "head": 1, "head-dim": 2}


def classify_heads(g: DimGraph) -> None:
    space = g.space
    repeats = set()
    for expr in g.broadcasts:
        resolved = space.resolve(expr)
        if isinstance(resolved, Atom):  # an axis that is wholly a broadcast, not a product of one
            repeats.add(resolved.var)

    def mark(root: int, kind: str) -> None:
        var = space.vars[root]
        if var.kind == "channel" or KIND_RANK.get(kind, 9) < KIND_RANK.get(var.kind, 9):
            var.kind = kind

    for node, free in g.activation_matmuls:
        y = g.axes_of.get(node.outputs[0])
        if y is None:
            continue
        for expr in y[:-2]:
            atoms = space.atoms(expr)
            derived = [a for a in atoms if a not in repeats]
            for root in atoms:
                if space.vars[root].kind in ("fixed", "conv-group"):
                    continue
                mark(root, "head-repeat" if root in repeats and derived and len(atoms) > 1 else "head")
        for root in space.atoms(free):
            if space.vars[root].kind == "channel" and not space.is_blocked(root):
                space.vars[root].kind = "head-dim"
