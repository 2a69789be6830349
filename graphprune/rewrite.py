"""Apply a plan: slice every weight use, update attributes and shape constants, then clean up."""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from graphprune.analysis.graph import DimGraph
from graphprune.io import fold_constants, infer_shapes


def apply_removal(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
    if not removed:
        return
    _slice_params(g, removed)
    for _, hook in g.hooks:
        hook(g, removed)
    _resize_interface(g, removed)
    cleanup(g.model)


def _resize_interface(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
    """Declare the new extents of graph inputs and outputs that pruning may shrink (KV caches)."""
    for value, axis in g.interface_axes:
        dims = list(value.shape)
        if not isinstance(dims[axis], int):
            continue
        new = g.new_size(g.axes_of[value][axis], removed)
        if new is not None and new != dims[axis]:
            dims[axis] = new
            value.shape = ir.Shape(dims)


def interface_changes(g: DimGraph, removed: dict[int, np.ndarray]) -> list[dict]:
    """Graph inputs and outputs whose extents change: the caller must allocate them smaller."""
    changes = []
    for value, axis in g.interface_axes:
        before = g.space.size(g.axes_of[value][axis])
        after = g.new_size(g.axes_of[value][axis], removed)
        if before is not None and after is not None and after != before:
            kept = g.space.kept_positions(g.axes_of[value][axis], removed)
            changes.append({"value": value.name, "axis": axis, "before": int(before), "after": int(after),
                            "kept": [int(k) for k in kept]})
    return changes


def _kept_axes(g: DimGraph, node: ir.Node, index: int, removed: dict[int, np.ndarray]) -> tuple:
    use = g.params.get((node, index))
    if use is None:
        return ()
    kept = [g.space.kept_positions(e, removed) for e in use.axes]
    return tuple(None if k is None else tuple(int(i) for i in k) for k in kept)


def _slice_params(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
    """Slice each initializer once when all its readers agree, else give each reader its own copy.

    Exporters de-duplicate equal tensors, so one initializer may feed unrelated nodes.
    """
    for value in {use.value for use in g.params.values()}:
        readers = [(u.node, u.idx) for u in value.uses()]
        plans = {reader: _kept_axes(g, *reader, removed) for reader in readers}
        distinct = set(plans.values())
        if distinct <= {()} or all(k is None for plan in distinct for k in plan):
            continue
        tensor = value.const_value
        if len(distinct) == 1:
            _set_value(value, _sliced(tensor, next(iter(distinct)), value.name))
            continue
        copies: dict[tuple, ir.Value] = {}
        for (node, index), plan in plans.items():
            if not plan or all(k is None for k in plan):
                continue
            if plan not in copies:
                name = fresh_name(g.model.graph, f"{value.name}__pruned", len(copies))
                copies[plan] = _new_initializer(g.model.graph, value, _sliced(tensor, plan, name))
            node.replace_input_with(index, copies[plan])


def _take(array: np.ndarray, plan: tuple) -> np.ndarray:
    for axis, kept in enumerate(plan):
        if kept is not None:
            array = np.take(array, np.asarray(kept, dtype=np.int64), axis=axis)
    return np.ascontiguousarray(array)


def _sliced(tensor: ir.TensorProtocol, plan: tuple, name: str) -> ir.TensorProtocol:
    """The kept slice of a weight. One still in its data file stays there: the slice is taken each time
    it is read and when it is written, so a large model's sliced weights are never all in memory at once."""
    if not isinstance(tensor, ir.ExternalTensor):
        return ir.tensor(_take(tensor.numpy(), plan), name=name)
    shape = [len(plan[axis]) if axis < len(plan) and plan[axis] is not None else dim
             for axis, dim in enumerate(tensor.shape)]
    # A private, not yet mapped handle on the same bytes: mapped only while a slice is taken.
    source = ir.ExternalTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                               name=tensor.name, base_dir=tensor.base_dir)
    return ir.LazyTensor(functools.partial(_take_mapped, source, plan, name), dtype=tensor.dtype,
                         shape=ir.Shape(shape), name=name)


def _take_mapped(source: ir.ExternalTensor, plan: tuple, name: str) -> ir.Tensor:
    try:
        return ir.tensor(_take(source.numpy(), plan), name=name)
    finally:
        source.release()  # unmap: the pages read would otherwise stay resident


def _set_value(value: ir.Value, tensor: ir.TensorProtocol) -> None:
    value.const_value = tensor
    value.shape = ir.Shape(tensor.shape)


def fresh_name(graph: ir.Graph, stem: str, start: int) -> str:
    """``stem`` followed by the first number from ``start`` that no initializer of ``graph`` has yet.

    The numbers only make names unique; a model pruned a second time already holds the names its first
    pruning gave, so counting alone (e.g. the initializers) could repeat one.
    """
    while f"{stem}{start}" in graph.initializers:
        start += 1
    return f"{stem}{start}"


def set_constant_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, stem: str,
                       kind: ir.TypeProtocol | None = None) -> ir.Value:
    """Feed ``array`` to input ``index`` of ``node`` as a fresh initializer named after ``stem``, for this
    reader only (the old value may feed other nodes); ``kind``: its type (default: the array's)."""
    name = fresh_name(graph, stem, len(graph.initializers))
    array = np.ascontiguousarray(array)
    kind = kind or ir.TensorType(ir.DataType.from_numpy(array.dtype))
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=kind, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    return value


def _new_initializer(graph: ir.Graph, like: ir.Value, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape), type=like.type, const_value=tensor)
    graph.register_initializer(value)
    return value


def cleanup(model: ir.Model) -> None:
    """Drop stale shapes and dead nodes, fold what became constant, re-infer shapes."""
    graph = model.graph
    outputs = set(graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:
            if value not in outputs:
                value.shape = None
    common.RemoveUnusedNodesPass()(model)
    fold_constants(model)
    common.RemoveUnusedNodesPass()(model)
    infer_shapes(model)
