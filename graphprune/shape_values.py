"""Follow the *values* of small shape vectors, entry by entry, where shape inference gives up.

Exporters build attention masks and reshape targets from run-time shape arithmetic:
``Expand(mask, Where(Equal(Concat(Shape(x)[0], 1, ...), -1), ...))``. With a dynamic batch the
vector is not constant, so ONNX's inference leaves every extent of the result unknown, even the
head axis that is plainly 1. Here each entry of a 1-D int64 vector is tracked on its own (an int, or
None when it depends on a run-time extent), and Expand/Reshape outputs get every extent that their
known entries fix.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class _NonNegative:
    """An entry not known statically but never negative: a run-time extent read by Shape."""

    def __repr__(self) -> str:
        return "NONNEG"


NONNEG = _NonNegative()
Entries = list  # of int (known), NONNEG, or None (anything)
MAX_ENTRIES = 16  # shape vectors are short; anything longer is data, not a shape


def propagate_shape_values(model: ir.Model) -> bool:
    """Fill extents of Expand and Reshape outputs from partially known shape vectors; True if any."""
    known: dict[ir.Value, Entries] = {}
    changed = False
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        entries = _evaluate(node, lambda v: _entries(v, known))
        if entries is not None and node.outputs and len(entries) <= MAX_ENTRIES:
            known[node.outputs[0]] = entries
        if node.op_type == "Where":
            changed |= _bypass_decided_where(node, known)
        if node.op_type == "Expand":
            changed |= _refine(node.outputs[0], _expanded(node, _entries(node.inputs[1], known)))
        elif node.op_type == "Reshape":
            changed |= _refine(node.outputs[0], _reshaped(node, _entries(node.inputs[1], known)))
    return changed


def _entries(value: ir.Value | None, known: dict[ir.Value, Entries]) -> Entries | None:
    if value is None:
        return None
    if value.const_value is not None:
        array = value.const_value.numpy()
        if array.dtype.kind in "iub" and array.ndim <= 1 and array.size <= MAX_ENTRIES:
            return [int(x) for x in array.reshape(-1)]
        return None
    return known.get(value)


def _dims(value: ir.Value | None) -> Entries | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _aligned(*vectors: Entries | None) -> list[Entries] | None:
    """Broadcast vectors of length 1 against the others; None if any is unknown or lengths clash."""
    if any(v is None for v in vectors):
        return None
    n = max(len(v) for v in vectors)
    out = [v * n if len(v) == 1 else v for v in vectors]
    return out if all(len(v) == n for v in out) else None


def _combine(op: str, x, y):
    if isinstance(x, int) and isinstance(y, int):
        return int(BINARY[op](x, y))
    if op == "Equal" and NONNEG in (x, y) and any(isinstance(v, int) and v < 0 for v in (x, y)):
        return 0  # a run-time extent never equals a negative constant (the -1 of "infer this")
    if op in ("Add", "Mul", "Max") and all(v is NONNEG or (isinstance(v, int) and v >= 0) for v in (x, y)):
        return NONNEG
    return None


def _elementwise(op: str, a: Entries | None, b: Entries | None) -> Entries | None:
    pair = _aligned(a, b)
    if pair is None:
        return None
    return [_combine(op, x, y) for x, y in zip(*pair)]


BINARY = {
    "Add": lambda x, y: x + y,
    "Sub": lambda x, y: x - y,
    "Mul": lambda x, y: x * y,
    "Div": lambda x, y: x // y if y else 0,
    "Max": max,
    "Min": min,
    "Equal": lambda x, y: x == y,
}


def _evaluate(node: ir.Node, get) -> Entries | None:
    op = node.op_type
    inputs = node.inputs
    if op == "Shape":
        dims = _dims(inputs[0])
        if dims is None:
            return None
        start, end = node.attributes.get("start"), node.attributes.get("end")
        return [NONNEG if d is None else d for d in dims[start.value if start else 0: end.value if end else None]]
    if op in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
        return get(inputs[0])
    if op == "Concat":
        parts = [get(v) for v in inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if op == "Gather":
        data, indices = get(inputs[0]), get(inputs[1])
        if data is None or indices is None or any(i is None for i in indices):
            return None
        return [data[i] for i in indices]
    if op == "Slice":
        data, starts, ends = get(inputs[0]), get(inputs[1]), get(inputs[2])
        steps = get(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1]
        if data is None or not starts or not ends or None in starts + ends + steps or len(starts) != 1:
            return None
        return data[slice(starts[0], ends[0], steps[0])]
    if op in BINARY:
        return _elementwise(op, get(inputs[0]), get(inputs[1]))
    if op == "Where":
        aligned = _aligned(*(get(v) for v in inputs))
        if aligned is None:
            return None
        return [x if c == 1 else y if c == 0 else None for c, x, y in zip(*aligned)]
    return None


def _bypass_decided_where(node: ir.Node, known: dict[ir.Value, Entries]) -> bool:
    """Where(Equal(v, -1), ones, v) over a shape vector whose entries are never -1 is just v.

    Exporters write this guard before every Expand; removing it lets the rules see, and rewrite,
    the Concat of constant pieces that the target shape really is.
    """
    cond = _entries(node.inputs[0], known)
    if cond is None or any(c not in (0, 1) for c in cond):
        return False
    branch = node.inputs[1] if all(c == 1 for c in cond) else node.inputs[2] if all(c == 0 for c in cond) else None
    out = node.outputs[0]
    if branch is None or branch.shape is None or out.shape is None or list(branch.shape) != list(out.shape):
        return False
    if out in node.graph.outputs:
        return False
    ir.convenience.replace_all_uses_with(out, branch)
    return True


def _expanded(node: ir.Node, target: Entries | None) -> Entries | None:
    """Numpy broadcasting of the input's dims against the target shape vector, entry by entry."""
    dims = _dims(node.inputs[0])
    if dims is None or target is None:
        return None
    rank = max(len(dims), len(target))
    dims = [1] * (rank - len(dims)) + dims
    target = [1] * (rank - len(target)) + target
    out: Entries = []
    target = [t if isinstance(t, int) else None for t in target]
    for d, t in zip(dims, target):
        if d == 1:
            out.append(t)
        elif t == 1 or t == d:
            out.append(d)
        else:
            out.append(d if d is not None and t is None else None)
    return out


def _reshaped(node: ir.Node, target: Entries | None) -> Entries | None:
    dims = _dims(node.inputs[0])
    if target is None or dims is None:
        return None
    allowzero = node.attributes.get("allowzero")
    target = [t if isinstance(t, int) else None for t in target]
    out: Entries = []
    for k, t in enumerate(target):
        if t == 0 and not (allowzero and allowzero.value):
            out.append(dims[k] if k < len(dims) else None)
        else:
            out.append(t if t is None or t > 0 else None)
    if target.count(-1) == 1 and None not in dims:
        rest = [d for d, t in zip(out, target) if t != -1]
        if None not in rest and np.prod(rest, dtype=np.int64) > 0:
            out[target.index(-1)] = int(np.prod(dims, dtype=np.int64) // np.prod(rest, dtype=np.int64))
    return out


def _refine(value: ir.Value, found: Entries | None) -> bool:
    """Set extents the output does not know yet; never overrides a known one."""
    if found is None:
        return False
    dims = list(value.shape) if value.shape is not None else [None] * len(found)
    if len(dims) != len(found):
        return False
    changed = False
    for k, (d, f) in enumerate(zip(dims, found)):
        if not isinstance(d, int) and isinstance(f, int) and f >= 0:
            dims[k], changed = f, True
    if changed:
        value.shape = ir.Shape(dims)
    return changed
