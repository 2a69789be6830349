"""MLP blocks of an ONNX graph, ``down(act(up(x)))`` or gated ``down(act(gate(x)) * up(x))``.

A *projection* is a MatMul with a constant 2-D weight on its right, or a Gemm (transA = 0) with a
constant B, plus an optional constant bias Add; Reshapes that keep the last axis (GPT-2's Conv1D flattens
the rows around each Gemm) may sit on either side of it.

Candidates: every projection whose input is computed from other projections' outputs and constants
through elementwise ops only (the *down* projection of an MLP). A candidate is an MLP when its input
matches one of the activation patterns of ``ACTIVATIONS`` (or its gated form ``act(G) * U``) with the
pattern variables bound to projections of one common input ``x``; otherwise it is declined with the
reason. Patterns are declared, not walked by hand: ``Prod`` and ``Sum`` match a tree of Mul (Div by a
constant) or Add (Sub of a constant) nodes in any order and association, with its constants folded
into one coefficient, so exporters' variants of one formula (``x / sqrt 2`` or ``x * 0.7071``, the 0.5
on either side) are one entry. Adding an activation is one entry in ``ACTIVATIONS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.blocks import _common_path

# ---------- patterns ----------


@dataclass(frozen=True)
class Var:
    """Any non-constant value; the same name binds the same value."""

    name: str


@dataclass(frozen=True)
class Const:
    value: float


@dataclass(frozen=True)
class Op:
    op_type: str
    args: tuple
    domain: str = ""
    attrs: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Prod:
    """coef * factor_1 * ... * factor_n, matched in any order."""

    coef: float
    factors: tuple


@dataclass(frozen=True)
class Sum:
    """const + term_1 + ... + term_n, matched in any order."""

    const: float
    terms: tuple


Pattern = Var | Const | Op | Prod | Sum
U, G = Var("u"), Var("g")


def _gelu_erf(v: Pattern) -> Pattern:
    return Prod(0.5, (v, Sum(1.0, (Op("Erf", (Prod(1 / math.sqrt(2), (v,)),)),))))


def _gelu_tanh(v: Pattern) -> Pattern:
    cubic = Prod(0.044715, (Op("Pow", (v, Const(3.0))),))
    return Prod(0.5, (v, Sum(1.0, (Op("Tanh", (Prod(math.sqrt(2 / math.pi), (Sum(0.0, (v, cubic)),)),)),))))


# SparseMLP activation -> the forms of act(v) exporters write (PyTorch's legacy and dynamo exporters).
ACTIVATIONS: dict[str, tuple[Callable[[Pattern], Pattern], ...]] = {
    "relu": (lambda v: Op("Relu", (v,)),),
    "gelu": (lambda v: Op("Gelu", (v,), attrs=(("approximate", "none"),)),
             lambda v: Op("Gelu", (v,), domain="com.microsoft"),
             _gelu_erf),
    "gelu_tanh": (lambda v: Op("Gelu", (v,), attrs=(("approximate", "tanh"),)), _gelu_tanh),
    "silu": (lambda v: Prod(1.0, (v, Op("Sigmoid", (v,)))),),
}
ATTRIBUTE_DEFAULTS = {"approximate": "none"}
SUPPORTED = ("relu, gelu (Gelu or its erf form), gelu_tanh (Gelu tanh or its tanh form), silu (x * Sigmoid(x)), "
             "each alone or gated as act(gate) * up (ReGLU, GeGLU, SwiGLU)")


def _gated(act: Pattern) -> Pattern:
    """act(G) * U, flattened as Prod matching flattens the graph."""
    if isinstance(act, Prod):
        return Prod(act.coef, (*act.factors, U))
    return Prod(1.0, (act, U))


# (activation, gated, pattern of the hidden activation): ungated forms first.
PATTERNS: tuple[tuple[str, bool, Pattern], ...] = (
    *((name, False, form(U)) for name, forms in ACTIVATIONS.items() for form in forms),
    *((name, True, _gated(form(G))) for name, forms in ACTIVATIONS.items() for form in forms),
)


def _uniform(value: ir.Value | None) -> float | None:
    """The value of a constant whose entries are all equal (a scalar in effect)."""
    tensor = value.const_value if value is not None else None
    if tensor is None or tensor.size == 0 or tensor.size > 64:
        return None
    array = tensor.numpy()
    if array.dtype.kind not in "fiu":
        return None
    flat = array.reshape(-1).astype(np.float64)
    return float(flat[0]) if np.all(flat == flat[0]) else None


def _standard(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _product(value: ir.Value) -> tuple[float, list[ir.Value]]:
    c = _uniform(value)
    if c is not None:
        return c, []
    node = value.producer()
    if _affine(node):
        return 1.0, [value]
    if node is not None and _standard(node) and node.op_type == "Mul":
        ca, fa = _product(node.inputs[0])
        cb, fb = _product(node.inputs[1])
        return ca * cb, fa + fb
    if node is not None and _standard(node) and node.op_type == "Div":
        d = _uniform(node.inputs[1])
        if d:
            c, factors = _product(node.inputs[0])
            return c / d, factors
    return 1.0, [value]


def _affine(node: ir.Node | None) -> bool:
    """A node with a constant operand that is not one number (a bias, a per-channel scale): an atom of the
    formula, not part of its products and sums."""
    return node is not None and any(v is not None and v.const_value is not None and _uniform(v) is None
                                    for v in node.inputs)


def _sum(value: ir.Value) -> tuple[float, list[ir.Value]]:
    c = _uniform(value)
    if c is not None:
        return c, []
    node = value.producer()
    if _affine(node):
        return 0.0, [value]
    if node is not None and _standard(node) and node.op_type == "Add":
        ca, ta = _sum(node.inputs[0])
        cb, tb = _sum(node.inputs[1])
        return ca + cb, ta + tb
    if node is not None and _standard(node) and node.op_type == "Sub":
        d = _uniform(node.inputs[1])
        if d is not None:
            c, terms = _sum(node.inputs[0])
            return c - d, terms
    return 0.0, [value]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * abs(b) + 1e-7


def _attribute(node: ir.Node, name: str) -> object:
    attr = node.attributes.get(name)
    return attr.value if attr is not None else ATTRIBUTE_DEFAULTS.get(name)


Bindings = dict[str, ir.Value]


def match(pattern: Pattern, value: ir.Value | None, bound: Bindings) -> Bindings | None:
    """The bindings extended so that ``value`` is ``pattern``, or None."""
    if value is None:
        return None
    if isinstance(pattern, Var):
        if value.const_value is not None:
            return None
        if pattern.name in bound:
            return bound if bound[pattern.name] is value else None
        return {**bound, pattern.name: value}
    if isinstance(pattern, Const):
        c = _uniform(value)
        return bound if c is not None and _close(c, pattern.value) else None
    if isinstance(pattern, Op):
        node = value.producer()
        domain = "" if node is None or _standard(node) else node.domain
        if node is None or node.op_type != pattern.op_type or domain != pattern.domain:
            return None
        inputs = list(node.inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        if len(inputs) != len(pattern.args) or any(_attribute(node, k) != v for k, v in pattern.attrs):
            return None
        for arg, item in zip(pattern.args, inputs, strict=True):
            bound = match(arg, item, bound)
            if bound is None:
                return None
        return bound
    coef, items = _product(value) if isinstance(pattern, Prod) else _sum(value)
    parts = pattern.factors if isinstance(pattern, Prod) else pattern.terms
    want = pattern.coef if isinstance(pattern, Prod) else pattern.const
    if not _close(coef, want) or len(items) != len(parts):
        return None
    return _assign(list(parts), items, bound)


def _assign(patterns: list[Pattern], values: list[ir.Value], bound: Bindings) -> Bindings | None:
    """Match patterns to values one to one, in any order (a handful of items: plain backtracking)."""
    if not patterns:
        return bound
    for i, value in enumerate(values):
        got = match(patterns[0], value, bound)
        if got is not None:
            done = _assign(patterns[1:], values[:i] + values[i + 1:], got)
            if done is not None:
                return done
    return None


# ---------- projections ----------


@dataclass
class Projection:
    """y = x @ weight + bias, weight [in, out]; ``*_value``: the graph's initializer when usable as it is."""

    node: ir.Node  # the MatMul or Gemm
    x: ir.Value
    weight: np.ndarray
    weight_value: ir.Value | None
    bias: np.ndarray | None = None
    bias_value: ir.Value | None = None
    nodes: list[ir.Node] = field(default_factory=list)  # the MatMul/Gemm, bias Add, Reshapes

    @property
    def width(self) -> int:
        return int(self.weight.shape[1])


def _linear(node: ir.Node | None) -> Projection | str | None:
    """The MatMul/Gemm as a projection, a reason it cannot be one, or None when it is no linear layer."""
    if node is None or not _standard(node) or node.op_type not in ("MatMul", "Gemm"):
        return None
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None or w.const_value is None or x.const_value is not None:
        return None
    weight = w.const_value.numpy()
    if weight.ndim != 2 or weight.dtype.kind != "f":
        return None
    if node.op_type == "MatMul":
        return Projection(node, x, weight, w, nodes=[node])
    if _attribute(node, "transA"):
        return f"Gemm '{node.name}' has transA=1"
    alpha = _attribute(node, "alpha")
    alpha = 1.0 if alpha is None else float(alpha)
    trans = bool(_attribute(node, "transB"))
    plain = not trans and alpha == 1.0
    weight = (weight.T if trans else weight) * np.asarray(alpha, weight.dtype) if not plain else weight
    proj = Projection(node, x, np.ascontiguousarray(weight), w if plain else None, nodes=[node])
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is not None:
        if c.const_value is None or c.const_value.size != proj.width:
            return f"Gemm '{node.name}' has a bias C that is not a constant per output"
        beta = _attribute(node, "beta")
        beta = 1.0 if beta is None else float(beta)
        proj.bias = (c.const_value.numpy().reshape(-1) * np.asarray(beta, weight.dtype)).astype(weight.dtype)
        proj.bias_value = c if beta == 1.0 and tuple(c.shape or ()) == (proj.width,) else None
    return proj


def _row_reshape(node: ir.Node | None) -> bool:
    """A Reshape that keeps the last axis: the rows are the same rows."""
    if node is None or not _standard(node) or node.op_type != "Reshape":
        return False
    src, out = node.inputs[0].shape, node.outputs[0].shape
    return (src is not None and out is not None and len(src) > 0 and len(out) > 0
            and isinstance(src[-1], int) and src[-1] == out[-1])


def _bias_operand(node: ir.Node, width: int | None = None) -> int | None:
    """Index of the constant operand of an Add that is a per-output bias, or None."""
    if not _standard(node) or node.op_type != "Add":
        return None
    for k in (0, 1):
        const, other = node.inputs[k], node.inputs[1 - k]
        tensor = const.const_value if const is not None else None
        if tensor is None or other is None or other.const_value is not None or tensor.size < 1:
            continue
        shape = tuple(tensor.shape)
        rank = len(other.shape) if other.shape is not None else 1
        if shape and shape[-1] == tensor.size and len(shape) <= rank and (width is None or tensor.size == width):
            return k
    return None


def projection_of(value: ir.Value) -> Projection | str:
    """The projection that computes ``value``, through row Reshapes and a bias Add."""
    nodes: list[ir.Node] = []
    bias: ir.Value | None = None
    while True:
        node = value.producer()
        if _row_reshape(node):
            nodes.append(node)
            value = node.inputs[0]
            continue
        k = _bias_operand(node) if node is not None and bias is None else None
        if k is not None:
            nodes.append(node)
            bias, value = node.inputs[k], node.inputs[1 - k]
            continue
        break
    proj = _linear(value.producer())
    if not isinstance(proj, Projection):
        return proj or f"'{value.name}' is not computed by a MatMul or Gemm with a constant weight"
    if bias is not None:
        extra = bias.const_value.numpy().reshape(-1)
        if extra.size != proj.width:
            return f"the bias '{bias.name}' does not have one entry per output of '{proj.node.name}'"
        proj.bias_value = bias if proj.bias is None and tuple(bias.const_value.shape) == (proj.width,) else None
        proj.bias = extra if proj.bias is None else proj.bias + extra
    proj.nodes = [proj.node, *reversed(nodes)]
    return proj


# ---------- MLP blocks ----------

ELEMENTWISE = frozenset((
    "Add", "Sub", "Mul", "Div", "Pow", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Erf",
    "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish", "Exp", "Log", "Sqrt",
    "Reciprocal", "Neg", "Abs", "Clip", "Max", "Min", "Identity", "Cast", "ThresholdedRelu", "Swish", "FastGelu",
    "BiasGelu", "QuickGelu",
))
MAX_CONE = 64  # nodes between the projections: an activation is a handful


@dataclass
class MLP:
    name: str
    activation: str  # a SparseMLP activation
    gated: bool
    x: ir.Value
    hidden: ir.Value  # act(...) [* up]: what the down projection multiplies
    out: ir.Value  # the block's output (after the down projection's bias)
    up: Projection
    down: Projection
    gate: Projection | None = None
    nodes: list[ir.Node] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "activation": self.activation, "gated": self.gated,
                "up": self.up.node.name, "gate": self.gate.node.name if self.gate else None,
                "down": self.down.node.name, "d_in": int(self.up.weight.shape[0]), "hidden": self.up.width,
                "d_out": self.down.width, "biases": [k for k in ("up", "gate", "down")
                                                     if getattr(self, k) is not None
                                                     and getattr(self, k).bias is not None]}


@dataclass
class Declined:
    down: str  # the down projection's node
    reason: str

    def to_dict(self) -> dict:
        return {"down": self.down, "reason": self.reason}


def find_mlps(model: ir.Model) -> tuple[list[MLP], list[Declined]]:
    """Every MLP block of the top-level graph, in graph order, and the candidates declined with the reason."""
    found: list[MLP] = []
    declined: list[Declined] = []
    for node in model.graph:
        down = _linear(node)
        if not isinstance(down, Projection):
            continue
        hidden, reshapes = down.x, []
        while _row_reshape(hidden.producer()):
            reshapes.append(hidden.producer())
            hidden = hidden.producer().inputs[0]
        ops = _cone(hidden)
        if ops is None:
            continue
        result = _block(down, hidden, reshapes, ops)
        if isinstance(result, MLP):
            found.append(result)
        else:
            declined.append(Declined(node.name, result))
    names: set[str] = set()
    for k, mlp in enumerate(found):
        path = _common_path([n.name for n in (mlp.up.node, mlp.down.node)])
        name = f"{path}/sparse_mlp" if path else f"sparse_mlp_{k}"
        mlp.name = name if name not in names else f"{name}_{k}"
        names.add(mlp.name)
    return found, declined


def _cone(hidden: ir.Value) -> list[str] | None:
    """Op types between projections and ``hidden`` when it is computed from projections and constants by
    elementwise ops only (and is not itself a projection); None otherwise."""
    if isinstance(projection_of(hidden), Projection):
        return None  # two projections in a row: no activation between them
    ops: list[str] = []
    seen: set[int] = set()
    stack = [hidden]
    reached = False
    while stack:
        value = stack.pop()
        if value is None or value.const_value is not None or id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None:
            return None
        if isinstance(_linear(node), Projection):
            reached = True
            continue
        if not (node.op_type in ELEMENTWISE or _row_reshape(node)) or len(seen) > MAX_CONE:
            return None
        ops.append(node.op_type)
        stack.extend(node.inputs)
    return sorted(set(ops)) if reached else None


def _block(down: Projection, hidden: ir.Value, reshapes: list[ir.Node], ops: list[str]) -> MLP | str:
    for activation, gated, pattern in PATTERNS:
        bound = match(pattern, hidden, {})
        if bound is not None:
            break
    else:
        return f"its activation ({', '.join(ops)}) matches none of the supported forms: {SUPPORTED}"
    up = projection_of(bound["u"])
    if not isinstance(up, Projection):
        return f"the activation's input: {up}"
    gate = projection_of(bound["g"]) if gated else None
    if isinstance(gate, str):
        return f"the gate: {gate}"
    if gate is not None and gate.x is not up.x:
        return f"the gate '{gate.node.name}' and up '{up.node.name}' projections read different inputs"
    if gate is not None and gate.weight.shape != up.weight.shape:
        return f"the gate '{gate.node.name}' and up '{up.node.name}' projections have different shapes"
    if down.weight.shape[0] != up.width:
        return f"'{down.node.name}' reads {down.weight.shape[0]} entries, the activation has {up.width}"
    dtypes = {p.weight.dtype for p in (up, gate, down) if p is not None}
    if len(dtypes) > 1 or (up.x.dtype is not None and np.dtype(up.x.dtype.numpy()) not in dtypes):
        return "its input and weights do not share one float type"
    _extend_down(down)
    out = down.nodes[-1].outputs[0]
    activation_nodes = _between(hidden, {bound["u"], *([bound["g"]] if gated else [])})
    nodes = [*up.nodes, *(gate.nodes if gate else []), *activation_nodes, *reshapes, *down.nodes]
    problem = _read_outside(nodes, out)
    if problem:
        return problem
    if any(n.op_type == "Reshape" for n in nodes) and not _same_rows(up.x, out):
        return "Reshapes between its projections change the leading axes of its input"
    return MLP("", activation, gated, up.x, hidden, out, up, down, gate, nodes)


def _extend_down(down: Projection) -> None:
    """Take the bias Add that alone reads the down projection's output into it."""
    out = down.node.outputs[0]
    users = [use.node for use in out.uses()]
    if len(users) != 1 or out.is_graph_output():
        return
    k = _bias_operand(users[0], down.width)
    if k is None:
        return
    const = users[0].inputs[k]
    extra = const.const_value.numpy().reshape(-1)
    down.bias_value = const if down.bias is None and tuple(const.shape) == (down.width,) else None
    down.bias = extra if down.bias is None else down.bias + extra
    down.nodes.append(users[0])


def _between(hidden: ir.Value, inputs: set[ir.Value]) -> list[ir.Node]:
    """The nodes that compute ``hidden`` from ``inputs`` (and constants)."""
    nodes: list[ir.Node] = []
    stack = [hidden]
    while stack:
        value = stack.pop()
        node = value.producer() if value is not None else None
        if value in inputs or node is None or value.const_value is not None or node in nodes:
            continue
        nodes.append(node)
        stack.extend(node.inputs)
    return nodes


def _read_outside(nodes: list[ir.Node], out: ir.Value) -> str | None:
    inside = set(nodes)
    for node in nodes:
        for value in node.outputs:
            if value is out:
                continue
            if value.is_graph_output():
                return f"its value '{value.name}' is a graph output"
            for use in value.uses():
                if use.node not in inside:
                    return f"its value '{value.name}' is also read by '{use.node.name}' outside the block"
    return None


def _same_rows(x: ir.Value, out: ir.Value) -> bool:
    if x.shape is None or out.shape is None:
        return False
    return list(x.shape)[:-1] == list(out.shape)[:-1]
