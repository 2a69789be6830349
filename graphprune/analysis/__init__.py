"""Dependency analysis: the dimension graph of a model and the groups of coupled channels."""

from __future__ import annotations

import re

import onnx_ir as ir

from graphprune.analysis.graph import Decline, DimGraph
from graphprune.analysis.heads import classify_heads
from graphprune.analysis.rules import rule_for

STANDARD_DOMAINS = ("", "ai.onnx")


def build_dim_graph(model: ir.Model) -> DimGraph:
    """Apply the op rule of every node; graph inputs, outputs and declined nodes block their axes."""
    g = DimGraph(model)
    graph = model.graph
    for node in graph:
        reason = _apply_rule(node, g)
        if reason is not None:
            _decline(node, g, reason)
        _block_captured(node, g)
    classify_heads(g)
    # Blocking the interface last gives the same result as blocking it first (reasons follow the
    # union-find), and lets a KV cache's head axis be recognised as a head before deciding.
    for value in graph.inputs:
        if value.const_value is None:
            _block_interface(g, value, f"graph input '{value.name}'")
    for value in graph.outputs:
        if value.shape is not None:
            _block_interface(g, value, f"graph output '{value.name}'")
    return g


# Past/present key and value tensors of decoders: the caller allocates them at the model's head
# count, so head pruning may shrink them (the report tells the caller); every other axis is fixed.
CACHE_NAME = re.compile(r"past|present|cache", re.IGNORECASE)


def _block_interface(g: DimGraph, value: ir.Value, reason: str) -> None:
    if value.shape is None:
        return
    cache = bool(CACHE_NAME.search(value.name or ""))
    for axis, expr in enumerate(g.axes(value)):
        if cache and all(g.space.vars[a].kind in ("head", "head-repeat") for a in g.space.atoms(expr)):
            g.interface_axes.append((value, axis))
            continue
        g.block(expr, reason)


def _apply_rule(node: ir.Node, g: DimGraph) -> str | None:
    fn = rule_for(node)
    if fn is None:
        if node.domain not in STANDARD_DOMAINS:
            return f"no rule for op {node.domain}::{node.op_type}"
        return f"no rule for op {node.op_type}"
    try:
        fn(node, g)
    except Decline as err:
        return str(err)
    return None


def _decline(node: ir.Node, g: DimGraph, reason: str) -> None:
    why = f"{node.op_type} '{node.name}': {reason}"
    g.declined.append((node, reason))
    for value in [*node.inputs, *node.outputs]:
        if value is not None and value.shape is not None and not g.is_param(value):
            g.block_value(value, why)
    for index in range(len(node.inputs)):
        use = g.params.get((node, index))
        if use is not None:
            for e in use.axes:
                g.block(e, why)


def _block_captured(node: ir.Node, g: DimGraph) -> None:
    """Values read from inside a subgraph (If/Loop/Scan bodies) are used in ways we do not see."""
    for attribute in node.attributes.values():
        if attribute.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            continue
        subgraphs = attribute.value if attribute.type == ir.AttributeType.GRAPHS else [attribute.value]
        for sub in subgraphs:
            for inner in ir.traversal.RecursiveGraphIterator(sub):
                for value in inner.inputs:
                    if value is not None and value.graph is g.graph and value.shape is not None:
                        g.block_value(value, f"read inside a subgraph of {node.op_type} '{node.name}'")


__all__ = ["Decline", "DimGraph", "build_dim_graph"]
