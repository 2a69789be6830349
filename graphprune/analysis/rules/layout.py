"""Concat, Split, Slice, Reshape, Flatten, Transpose, Squeeze/Unsqueeze, Expand, Tile."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.analysis.dims import Cat, Expr, Prod
from graphprune.analysis.graph import Decline, DimGraph
from graphprune.analysis.rules.base import (
    attr,
    constant_input,
    input_or_attr,
    norm_axis,
    rule,
    set_attr,
    set_input,
    tie_all,
    where,
)
from graphprune.io import PROBED


@rule("Concat")
def concat(node: ir.Node, g: DimGraph) -> None:
    y = g.axes(node.outputs[0])
    axis = norm_axis(attr(node, "axis"), len(y))
    parts = [g.operand(node, i) for i in range(len(node.inputs))]
    g.tie(y[axis], Cat(tuple(p[axis] for p in parts)))
    for p in parts:
        tie_all(g, [e for k, e in enumerate(p) if k != axis], [e for k, e in enumerate(y) if k != axis])


@rule("Split")
def split(node: ir.Node, g: DimGraph) -> None:
    x = g.axes(node.inputs[0])
    axis = norm_axis(attr(node, "axis", 0), len(x))
    outs = [g.axes(o) for o in node.outputs]
    g.tie(x[axis], Cat(tuple(o[axis] for o in outs)))
    for o in outs:
        tie_all(g, [e for k, e in enumerate(x) if k != axis], [e for k, e in enumerate(o) if k != axis])
    input_form = g.opset >= 13

    def update(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
        sizes = [g.new_size(o[axis], removed) for o in outs]
        old = [g.space.size(o[axis]) for o in outs]
        if sizes == old:
            return
        if input_form:
            node.attributes.pop("num_outputs", None)
            set_input(node, 1, constant_input(g, sizes, node.inputs[1] if len(node.inputs) > 1 else None,
                                              f"{node.name}.split"))
        else:
            set_attr(node, "split", sizes)

    g.hook(node, update)


@rule("Slice")
def slice_(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    dims = g.shape(node.inputs[0])
    attr_form = g.opset < 10
    if not attr_form and (g.const(node.inputs[1]) is None or g.const(node.inputs[2]) is None):
        _slice_at_run_time(node, g, x, y)
        return
    starts = input_or_attr(node, g, 1, "starts") if not attr_form else list(attr(node, "starts"))
    ends = input_or_attr(node, g, 2, "ends") if not attr_form else list(attr(node, "ends"))
    axes = (input_or_attr(node, g, 3, "axes") if not attr_form else attr(node, "axes")) or list(
        range(len(starts)))
    steps = (input_or_attr(node, g, 4, "steps") if not attr_form else None) or [1] * len(starts)
    sliced: dict[int, tuple[Expr, Expr]] = {}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = norm_axis(axis, len(x))
        n = dims[axis]
        if not isinstance(n, int) or step != 1:
            g.block(x[axis], f"sliced by {where(node)}")
            g.block(y[axis], f"sliced by {where(node)}")
            sliced[axis] = None
            continue
        lo = max(0, min(n, start + n if start < 0 else start))
        hi = max(lo, min(n, end + n if end < 0 else end))
        pre = g.space.new(lo, "channel", node.name)
        post = g.space.new(n - hi, "channel", node.name)
        g.tie(x[axis], Cat((pre, y[axis], post)))
        sliced[axis] = (pre, y[axis])
    for k in range(len(x)):
        if k not in sliced:
            g.tie(x[k], y[k])

    def update(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
        new_starts, new_ends, changed = list(starts), list(ends), False
        for i, axis in enumerate(axes):
            kept = sliced.get(norm_axis(axis, len(x)))
            if kept is None:
                continue
            pre, mid = kept
            lo, size = g.new_size(pre, removed), g.new_size(mid, removed)
            old_lo, old_size = g.space.size(pre), g.space.size(mid)
            if (lo, size) != (old_lo, old_size):
                new_starts[i], new_ends[i], changed = lo, lo + size, True
        if not changed:
            return
        if attr_form:
            set_attr(node, "starts", new_starts)
            set_attr(node, "ends", new_ends)
        else:
            set_input(node, 1, constant_input(g, new_starts, node.inputs[1], f"{node.name}.starts"))
            set_input(node, 2, constant_input(g, new_ends, node.inputs[2], f"{node.name}.ends"))

    g.hook(node, update)


def _slice_at_run_time(node: ir.Node, g: DimGraph, x: list[Expr], y: list[Expr]) -> None:
    """Bounds computed at run time (a position-id buffer cut to the sequence length): the sliced
    axes are blocked, every other axis passes through. Without constant axes nothing is known."""
    axes_value = node.inputs[3] if len(node.inputs) > 3 else None
    if axes_value is None:
        raise Decline("input 'ends' is computed at run time and no axes are given")
    axes = g.const(axes_value)
    if axes is None:
        raise Decline("inputs 'ends' and 'axes' are computed at run time")
    sliced = {norm_axis(int(a), len(x)) for a in np.atleast_1d(axes)}
    for k in range(len(x)):
        if k in sliced or g.space.size(x[k]) != g.space.size(y[k]):  # unknown on one side: block
            g.block(x[k], f"sliced at run time by {where(node)}")
            g.block(y[k], f"sliced at run time by {where(node)}")
        else:
            g.tie(x[k], y[k])


def _align(a: list, b: list) -> tuple[list[tuple[list[int], list[int]]], set[int], set[int]]:
    """Pair runs of axes with equal products; returns blocks and the axes that could not be paired."""

    def forward(a: list, b: list) -> tuple[list, int, int]:
        blocks, i, j = [], 0, 0
        while i < len(a) and j < len(b):
            if not isinstance(a[i], int) or not isinstance(b[j], int):
                if a[i] is not None and a[i] == b[j]:
                    blocks.append(([i], [j]))
                    i, j = i + 1, j + 1
                    continue
                break
            bi, bj, pa, pb = [i], [j], a[i], b[j]
            i, j = i + 1, j + 1
            while pa != pb:
                if pa < pb and i < len(a) and isinstance(a[i], int):
                    pa, i = pa * a[i], i + 1
                    bi.append(i - 1)
                elif pb < pa and j < len(b) and isinstance(b[j], int):
                    pb, j = pb * b[j], j + 1
                    bj.append(j - 1)
                else:
                    return blocks, bi[0], bj[0]
            blocks.append((bi, bj))
        # Trailing axes of extent 1 belong to the last block.
        while blocks and i < len(a) and a[i] == 1:
            blocks[-1][0].append(i)
            i += 1
        while blocks and j < len(b) and b[j] == 1:
            blocks[-1][1].append(j)
            j += 1
        return blocks, i, j

    segmented = _align_segments(a, b)
    if segmented is not None:
        return segmented, set(), set()
    head, i, j = forward(a, b)
    tail_r, ri, rj = forward(a[i:][::-1], b[j:][::-1])
    tail = [([len(a) - 1 - k for k in bi][::-1], [len(b) - 1 - k for k in bj][::-1]) for bi, bj in tail_r]
    left_a = set(range(i, len(a) - ri))
    left_b = set(range(j, len(b) - rj))
    return head + tail[::-1], left_a, left_b


def _align_probed(node: ir.Node, blocks, left_x, left_y):
    """Align by the concrete shapes preparation saw under its two probes of the run-time extents:
    [batch, 4, seq, 16] -> [batch·4, seq, 16] pairs (batch, 4) with the merged axis. Used only when
    both probes give the same complete alignment; otherwise the symbolic one stands."""
    probed_x = node.inputs[0].meta.get(PROBED)
    probed_y = node.outputs[0].meta.get(PROBED)
    if not probed_x or not probed_y:
        return blocks, left_x, left_y
    found = [_align(list(a), list(b)) for a, b in zip(probed_x, probed_y)]
    if any(left_a or left_b for _, left_a, left_b in found) or found[0][0] != found[1][0]:
        return blocks, left_x, left_y
    return found[0][0], set(), set()


def _align_segments(a: list, b: list) -> list[tuple[list[int], list[int]]] | None:
    """Align shapes with run-time extents that sit at the same places on both sides.

    [batch, 2, 2, seq, 16] -> [batch', 4, seq', 16]: the run-time extents split both shapes into
    static runs; when there are as many on each side and every run has the same product, the
    run-time extents pair up in order (exporters compute them from the same Shape reads, under
    other symbol names) and each static run aligns on its own. None: no such structure.
    """
    def runs(shape: list) -> tuple[list[list[int]], list[int]] | None:
        pieces, opaque, current = [], [], []
        for k, d in enumerate(shape):
            if isinstance(d, int):
                current.append(k)
            else:
                pieces.append(current)
                opaque.append(k)
                current = []
        pieces.append(current)
        return pieces, opaque

    if all(isinstance(d, int) for d in a) or all(isinstance(d, int) for d in b):
        return None
    (runs_a, opaque_a), (runs_b, opaque_b) = runs(a), runs(b)
    if len(opaque_a) != len(opaque_b):
        return None
    blocks: list[tuple[list[int], list[int]]] = []
    for run_a, run_b in zip(runs_a, runs_b):
        if int(np.prod([a[k] for k in run_a])) != int(np.prod([b[k] for k in run_b])):
            return None
        if not run_a or not run_b:
            if run_a or run_b:
                return None  # extents of 1 on one side only: leave it to the general alignment
            continue
        inner, left_a, left_b = _align([a[k] for k in run_a], [b[k] for k in run_b])
        if left_a or left_b:
            return None
        blocks.extend(([run_a[i] for i in bi], [run_b[j] for j in bj]) for bi, bj in inner)
    blocks.extend(([i], [j]) for i, j in zip(opaque_a, opaque_b))
    return blocks


def _shape_pieces(g: DimGraph, value: ir.Value, rank: int) -> list[tuple[ir.Node | None, int, int] | None]:
    """For each entry of a shape tensor: where its constant lives (node, input slot, offset), or None.

    A whole-constant shape gives (None, -1, k); a Concat of pieces gives the piece holding entry k.
    """
    if g.const(value) is not None:
        return [(None, -1, k) for k in range(rank)]
    producer = value.producer()
    # A 1-D vector passed through Reshape/Identity/Cast keeps its entries: look through to the Concat.
    while (producer is not None and producer.op_type in ("Reshape", "Identity", "Cast")
           and producer.inputs[0] is not None and g.shape(producer.inputs[0]) == [rank]
           and g.const(producer.inputs[0]) is None):
        producer = producer.inputs[0].producer()
    if producer is None or producer.op_type != "Concat":
        return [None] * rank
    entries: list = []
    for slot, piece in enumerate(producer.inputs):
        array = g.const(piece)
        dims = g.shape(piece)
        length = array.size if array is not None else (dims[0] if dims and isinstance(dims[0], int) else None)
        if length is None:
            return [None] * rank
        entries.extend((producer, slot, k) if array is not None else None for k in range(length))
    return entries if len(entries) == rank else [None] * rank


@rule("Reshape")
def reshape(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    blocks, left_x, left_y = _align(g.shape(node.inputs[0]), g.shape(node.outputs[0]))
    if left_x or left_y:
        blocks, left_x, left_y = _align_probed(node, blocks, left_x, left_y)
    for bi, bj in blocks:
        g.tie(Prod(tuple(x[k] for k in bi)), Prod(tuple(y[k] for k in bj)))
    for k in left_x:
        g.block(x[k], f"reshaped by {where(node)} in a way that cannot be followed")
    for k in left_y:
        g.block(y[k], f"reshaped by {where(node)} in a way that cannot be followed")
    shape_hook(node, g, node.inputs[1], y, keep_special=True)


def shape_hook(node: ir.Node, g: DimGraph, shape_value: ir.Value, y: list[Expr], keep_special: bool) -> None:
    """Keep a target-shape input in step with the new extents of the output axes."""
    pieces = _shape_pieces(g, shape_value, len(y))
    original = g.const(shape_value)
    shape_slot = list(node.inputs).index(shape_value)
    for k, piece in enumerate(pieces):
        if piece is None:
            g.block(y[k], f"{where(node)} computes this extent at run time")

    def update(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
        edits: dict[tuple, list[tuple[int, int]]] = {}
        for k, piece in enumerate(pieces):
            old, new = g.space.size(y[k]), g.new_size(y[k], removed)
            if piece is None or old == new:
                continue
            owner, slot, offset = piece
            source = original if owner is None else g.const(owner.inputs[slot])
            entry = int(np.atleast_1d(source).reshape(-1)[offset])
            if keep_special and entry in (0, -1):
                continue  # 0 copies the input extent and -1 is inferred: both follow the new size
            edits.setdefault((owner, slot), []).append((offset, new))
        for (owner, slot), changes in edits.items():
            target_node = node if owner is None else owner
            target_slot = shape_slot if owner is None else slot
            old_value = target_node.inputs[target_slot]
            array = np.array(g.const(old_value), dtype=np.int64)
            flat = array.reshape(-1)
            for offset, new in changes:
                flat[offset] = new
            set_input(target_node, target_slot,
                      constant_input(g, flat.reshape(array.shape).tolist(), old_value, f"{node.name}.shape"))

    g.hook(node, update)


@rule("Flatten")
def flatten(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    axis = norm_axis(attr(node, "axis", 1), len(x))
    g.tie(y[0], Prod(tuple(x[:axis])))
    g.tie(y[1], Prod(tuple(x[axis:])))


@rule("Transpose")
def transpose(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    perm = attr(node, "perm", list(range(len(x)))[::-1])
    for out_axis, in_axis in enumerate(perm):
        g.tie(y[out_axis], x[in_axis])


def _axes_arg(node: ir.Node, g: DimGraph) -> list[int] | None:
    return input_or_attr(node, g, 1, "axes") if g.opset >= 13 else attr(node, "axes")


@rule("Squeeze")
def squeeze(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    axes = _axes_arg(node, g)
    dims = g.shape(node.inputs[0])
    dropped = {norm_axis(a, len(x)) for a in axes} if axes else {k for k, d in enumerate(dims) if d == 1}
    tie_all(g, [e for k, e in enumerate(x) if k not in dropped], y)


@rule("Unsqueeze")
def unsqueeze(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    added = {norm_axis(a, len(y)) for a in _axes_arg(node, g)}
    tie_all(g, x, [e for k, e in enumerate(y) if k not in added])


@rule("Expand")
def expand(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    x_dims, y_dims = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    offset = len(y) - len(x)
    g.broadcasts.extend(e for e, d in zip(y[:offset], y_dims) if d != 1)
    for k, (d, e) in enumerate(zip(x_dims, x)):
        if not isinstance(d, int) or not isinstance(y_dims[offset + k], int):
            # A run-time extent: it may broadcast or not; either way no unit passes through it.
            g.block(e, f"run-time extent expanded by {where(node)}")
            g.block(y[offset + k], f"run-time extent expanded by {where(node)}")
        elif d != 1 and d == y_dims[offset + k]:
            g.tie(e, y[offset + k])
        elif d != 1:
            raise Decline(f"axis {k} ({d}) does not expand to {y_dims[offset + k]}")
        elif y_dims[offset + k] != 1:
            g.broadcasts.append(y[offset + k])
    shape_hook(node, g, node.inputs[1], y, keep_special=False)


@rule("Tile")
def tile(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    repeats = g.const(node.inputs[1])
    if repeats is None:
        raise Decline("repeats are computed at run time")
    for k, r in enumerate(np.atleast_1d(repeats)):
        g.tie(y[k], Prod((g.fixed(int(r), node.name, f"repeat of {where(node)}"), x[k])))
