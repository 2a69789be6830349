"""The op-rule table: how each ONNX op relates the axes of its inputs and outputs.

One entry per op family. A rule ties axes that index the same space (``g.tie``), blocks axes it
reduces or mixes (``g.block``), and registers a rewrite hook when attributes or shape constants
depend on axis extents. An op with no entry is declined: its axes are blocked with the reason.
To support a new op, add a function here with ``@rule("OpType")`` and a test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.analysis.dims import Cat, Expr, Prod
from graphprune.analysis.graph import Decline, DimGraph

Rule = Callable[[ir.Node, DimGraph], None]
RULES: dict[str, Rule] = {}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in op_types:
            RULES[op] = fn
        return fn

    return register


# ---- helpers ---------------------------------------------------------------------------------
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
    """A fresh int64 initializer (never edit one in place: it may be shared)."""
    array = np.asarray(values, dtype=np.int64)
    base = like.name if like is not None and like.name else name
    value = ir.Value(name=f"{base}__gp{next(_fresh)}", shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.INT64), const_value=ir.tensor(array))
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


# ---- elementwise -----------------------------------------------------------------------------
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


# ---- normalisation ---------------------------------------------------------------------------
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


@rule("LayerNormalization")
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


# ---- linear layers ---------------------------------------------------------------------------
@dataclass
class ConvChannels:
    x: Expr  # input channel axis
    y: Expr  # output channel axis
    per_in: Expr  # input channels within one group
    per_out: Expr  # output channels within one group
    groups: Expr | None  # the group index, when there is more than one group


def _conv_channels(node: ir.Node, g: DimGraph, groups: int, per_in: int, per_out: int) -> ConvChannels:
    origin = node.name
    cout = g.space.new(per_out, "channel", origin)
    if groups == 1:
        cin = g.space.new(per_in, "channel", origin)
        return ConvChannels(cin, cout, cin, cout, None)
    if per_in == 1:
        # Depthwise: each input channel has its own filters; the channel is the group itself.
        group_var = g.space.new(groups, "channel", origin)
        return ConvChannels(group_var, Prod((group_var, cout)), g.fixed(1, origin, "depthwise"), cout,
                            group_var)
    # Grouped: the same in/out index is removed in every group, so all groups keep equal width;
    # whole groups are a separate unit kind.
    group_var = g.space.new(groups, "conv-group", origin)
    cin = g.space.new(per_in, "channel", origin)
    return ConvChannels(Prod((group_var, cin)), Prod((group_var, cout)), cin, cout, group_var)


@rule("Conv", "ConvTranspose")
def conv(node: ir.Node, g: DimGraph) -> None:
    if not g.is_param(node.inputs[1]):
        raise Decline("the weight is not a constant")
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    w = g.operand(node, 1)
    w_shape = g.const(node.inputs[1]).shape
    groups = attr(node, "group", 1)
    if node.op_type == "ConvTranspose":  # weight [in, out/group, k...]
        ch = _conv_channels(node, g, groups, w_shape[0] // groups, w_shape[1])
        g.tie(w[0], ch.x)
        g.tie(w[1], ch.per_out)
        w_in, w_out = 0, 1
    else:  # weight [out, in/group, k...]
        ch = _conv_channels(node, g, groups, w_shape[1], w_shape[0] // groups)
        g.tie(w[0], ch.y)
        g.tie(w[1], ch.per_in)
        w_in, w_out = 1, 0
    g.tie(x[0], y[0])
    g.tie(x[1], ch.x)
    g.tie(y[1], ch.y)
    g.set_role(node, 1, w_in, "in")
    g.set_role(node, 1, w_out, "out")
    if groups > 1 and g.space.size(ch.per_in) == 1:
        g.set_role(node, 1, 0, "in")  # depthwise: each filter reads exactly its channel
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        g.tie(g.operand(node, 2, role="out")[0], y[1])
    block_axes(g, x[2:] + y[2:] + w[2:], f"spatial axis of {where(node)}")
    for axis in range(2, len(w)):
        g.set_role(node, 1, axis, "kernel")
    if ch.groups is not None:
        group_expr = ch.groups

        def update(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
            new = g.new_size(group_expr, removed)
            if new != attr(node, "group", 1):
                set_attr(node, "group", int(new))

        g.hook(node, update)


@rule("Gemm")
def gemm(node: ir.Node, g: DimGraph) -> None:
    if not g.is_param(node.inputs[1]) or g.is_param(node.inputs[0]):
        raise Decline("only Gemm with a constant B and a computed A is supported")
    a, b, y = g.axes(node.inputs[0]), g.operand(node, 1), g.axes(node.outputs[0])
    m, k = (a[1], a[0]) if attr(node, "transA", 0) else (a[0], a[1])
    bk, bn = (1, 0) if attr(node, "transB", 0) else (0, 1)
    g.tie(m, y[0])
    g.tie(k, b[bk])
    g.tie(b[bn], y[1])
    g.set_role(node, 1, bk, "in")
    g.set_role(node, 1, bn, "out")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = g.operand(node, 2, role="out")
        c_shape = g.const(node.inputs[2]).shape
        for axis, (dim, e) in enumerate(zip(c_shape, c)):
            target = y[len(y) - len(c) + axis]
            if dim != 1:
                g.tie(e, target)


@rule("MatMul")
def matmul(node: ir.Node, g: DimGraph) -> None:
    a_val, b_val = node.inputs
    if g.is_param(a_val) and g.is_param(b_val):
        raise Decline("both operands are constants")
    a, b = g.operand(node, 0), g.operand(node, 1)
    y = g.axes(node.outputs[0])
    if len(a) < 2 or len(b) < 2:
        raise Decline("1-D MatMul operands are not supported")
    g.tie(a[-1], b[-2])
    g.tie(a[-2], y[-2])
    g.tie(b[-1], y[-1])
    for operand, axes in ((0, a), (1, b)):
        extra = axes[:-2]
        for k, e in enumerate(extra):
            target = y[len(y) - 2 - len(extra) + k]
            if g.space.size(e) == g.space.size(target) and g.space.size(e) != 1:
                g.tie(e, target)
    if g.is_param(b_val):
        g.set_role(node, 1, len(b) - 2, "in")
        g.set_role(node, 1, len(b) - 1, "out")
    elif g.is_param(a_val):
        g.set_role(node, 0, len(a) - 1, "in")
        g.set_role(node, 0, len(a) - 2, "out")
    else:
        # Contracted between two activations: removing units there is not a masking of weights.
        g.block(a[-1], f"contracted between two activations by {where(node)}")


# ---- layout ----------------------------------------------------------------------------------
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

    head, i, j = forward(a, b)
    tail_r, ri, rj = forward(a[i:][::-1], b[j:][::-1])
    tail = [([len(a) - 1 - k for k in bi][::-1], [len(b) - 1 - k for k in bj][::-1]) for bi, bj in tail_r]
    left_a = set(range(i, len(a) - ri))
    left_b = set(range(j, len(b) - rj))
    return head + tail[::-1], left_a, left_b


def _shape_pieces(g: DimGraph, value: ir.Value, rank: int) -> list[tuple[ir.Node | None, int, int] | None]:
    """For each entry of a shape tensor: where its constant lives (node, input slot, offset), or None.

    A whole-constant shape gives (None, -1, k); a Concat of pieces gives the piece holding entry k.
    """
    if g.const(value) is not None:
        return [(None, -1, k) for k in range(rank)]
    producer = value.producer()
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
    for bi, bj in blocks:
        g.tie(Prod(tuple(x[k] for k in bi)), Prod(tuple(y[k] for k in bj)))
    for k in left_x:
        g.block(x[k], f"reshaped by {where(node)} in a way that cannot be followed")
    for k in left_y:
        g.block(y[k], f"reshaped by {where(node)} in a way that cannot be followed")
    _shape_hook(node, g, node.inputs[1], y, keep_special=True)


def _shape_hook(node: ir.Node, g: DimGraph, shape_value: ir.Value, y: list[Expr], keep_special: bool) -> None:
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
    for k, (d, e) in enumerate(zip(x_dims, x)):
        if d != 1 and d == y_dims[offset + k]:
            g.tie(e, y[offset + k])
        elif d != 1:
            raise Decline(f"axis {k} ({d}) does not expand to {y_dims[offset + k]}")
    _shape_hook(node, g, node.inputs[1], y, keep_special=False)


@rule("Tile")
def tile(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    repeats = g.const(node.inputs[1])
    if repeats is None:
        raise Decline("repeats are computed at run time")
    for k, r in enumerate(np.atleast_1d(repeats)):
        g.tie(y[k], Prod((g.fixed(int(r), node.name, f"repeat of {where(node)}"), x[k])))


# ---- spatial ---------------------------------------------------------------------------------
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
        _shape_hook(node, g, sizes, y, keep_special=False)


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


# ---- reductions and ops over one axis --------------------------------------------------------
REDUCE = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]


@rule(*REDUCE)
def reduce(node: ir.Node, g: DimGraph) -> None:
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    input_form = g.opset >= 18 or (node.op_type == "ReduceSum" and g.opset >= 13)
    axes = input_or_attr(node, g, 1, "axes") if input_form else attr(node, "axes")
    if not axes:
        if input_form and attr(node, "noop_with_empty_axes", 0):
            tie_all(g, x, y)
            return
        axes = list(range(len(x)))
    reduced = {norm_axis(a, len(x)) for a in axes}
    keep = attr(node, "keepdims", 1)
    for k, e in enumerate(x):
        if k in reduced:
            g.block(e, f"reduced over by {where(node)}")
    tie_all(g, [e for k, e in enumerate(x) if k not in reduced],
            [e for k, e in enumerate(y) if not (keep and k in reduced)])


@rule("Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "CumSum", "TopK")
def over_axis(node: ir.Node, g: DimGraph) -> None:
    x = g.axes(node.inputs[0])
    if node.op_type == "CumSum":
        axis_value = g.const(node.inputs[1])
        if axis_value is None:
            raise Decline("the axis is computed at run time")
        axes = {norm_axis(int(axis_value), len(x))}
    else:
        axis = norm_axis(attr(node, "axis", -1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax", "TopK")
                                        else 0), len(x))
        coerced = node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and g.opset < 13
        axes = set(range(axis, len(x))) if coerced else {axis}
    for k in axes:
        g.block(x[k], f"{node.op_type} over this axis in '{node.name}'")
    for out in node.outputs:
        if out is None or not out.name:
            continue
        y = g.axes(out)
        if len(y) == len(x):
            for k in range(len(x)):
                if k in axes:
                    g.block(y[k], f"{node.op_type} over this axis in '{node.name}'")
                else:
                    g.tie(x[k], y[k])
        else:
            tie_all(g, [e for k, e in enumerate(x) if k not in axes], y)


@rule("Gather")
def gather(node: ir.Node, g: DimGraph) -> None:
    data, indices = node.inputs
    x = g.operand(node, 0)
    axis = norm_axis(attr(node, "axis", 0), len(x))
    y = g.axes(node.outputs[0])
    idx_rank = len(g.const(indices).shape) if g.const(indices) is not None else len(g.axes(indices))
    g.block(x[axis], f"gathered along by {where(node)}")
    tie_all(g, x[:axis], y[:axis])
    tie_all(g, x[axis + 1:], y[axis + idx_rank:])
    if not g.is_param(indices):
        tie_all(g, g.axes(indices), y[axis:axis + idx_rank])
    else:  # the picked positions are fixed by constant indices, which nothing rewrites
        block_axes(g, y[axis:axis + idx_rank], f"gathered along by {where(node)} with constant indices")
    if g.is_param(data):  # an embedding table produces its columns
        for k in range(len(x)):
            if k != axis:
                g.set_role(node, 0, k, "out")


@rule("Shape", "Size", "ConstantOfShape", "Range", "EyeLike", "Constant", "RandomNormalLike",
      "RandomUniformLike")
def no_relation(node: ir.Node, g: DimGraph) -> None:
    """These read only extents (or nothing) from their input: the output is a new index space."""


@rule("Trilu")
def trilu(node: ir.Node, g: DimGraph) -> None:
    x = g.axes(node.inputs[0])
    block_axes(g, x[-2:], f"triangular mask of {where(node)}")
    tie_all(g, x, g.axes(node.outputs[0]))
