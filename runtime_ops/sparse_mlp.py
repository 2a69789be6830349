"""SparseMLP: an MLP that multiplies only the weight rows its kept activations select.

``graphprune.sparse.SparseMLP`` (opset version 1) computes, for ``X [..., D]``::

    U = S_in(X) @ W_up + B_up                        # W_up [D, H], stored like a MatMul weight
    G = S_in(X) @ W_gate + B_gate                    # gated forms only
    A = act(G) * U   (gated)   or   act(U)
    Y = S_hidden(A) @ W_down + B_down                # W_down [H, D_out]

``S(v)`` zeroes entries of ``v`` that a selection drops; the rest pass unchanged. Selections (each
optional): *threshold* keeps entries whose score is greater than ``t`` (TEAL); *top-k* keeps the ``k``
highest scores, ties to the lower index. The score is ``|v_i|``, or with WINA ``|v_i| * s_i`` where
``s`` is the L2 norm of the weight row that ``v_i`` multiplies (for the input of a gated MLP, of the
row of ``[W_up | W_gate]``); the scales are inputs ``S_in [D]`` and ``S_hidden [H]``, computed from the
weights when the node is inserted.

Selection is per row of ``X`` flattened to ``[B, D]``. The standard-ops body multiplies the rows that
any batch row keeps (their union), each batch row's dropped entries zeroed, which equals per-row
masking; at batch 1 it is exactly the row's own selection.

Inputs: ``X, W_up, W_down, W_gate, B_up, B_down, B_gate, S_in, S_hidden`` (optional ones empty).
Attributes: ``activation`` (relu, gelu, gelu_tanh, silu), ``input_threshold`` or ``input_k``,
``hidden_threshold`` or ``hidden_k``. The body is a model-local function; its overload names the
structure (activation, gating, biases, selection kinds, dtype) so that one model can hold several.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import GraphpruneError

DOMAIN = "graphprune.sparse"
OP_TYPE = "SparseMLP"
DOMAIN_VERSION = 1
# Reshape/Squeeze/ReduceMax forms used below exist from opset 13; function overloads need IR 10.
MIN_OPSET = 13
MIN_IR_VERSION = 10
INPUTS = ("X", "W_up", "W_down", "W_gate", "B_up", "B_down", "B_gate", "S_in", "S_hidden")
ATTRIBUTES = ("activation", "input_threshold", "input_k", "hidden_threshold", "hidden_k")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
_DTYPES = {TensorProto.FLOAT: "f32", TensorProto.FLOAT16: "f16", TensorProto.DOUBLE: "f64",
           TensorProto.BFLOAT16: "bf16"}

T = TypeVar("T")


@dataclass(frozen=True)
class Selection:
    """Which entries of a matmul's input are kept: ``threshold`` (score > t) or ``k`` (top k)."""

    threshold: float | None = None
    k: int | None = None
    wina: bool = False  # score |v| times the norm of the weight row v multiplies, instead of |v|

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.k is None):
            raise GraphpruneError("a SparseMLP selection needs exactly one of threshold and k.")
        if self.threshold is not None and not self.threshold >= 0:
            raise GraphpruneError(f"a SparseMLP threshold must be 0 or more, not {self.threshold}.")
        if self.k is not None and self.k < 0:
            raise GraphpruneError(f"a SparseMLP top-k must be 0 or more, not {self.k}.")

    @property
    def mode(self) -> str:
        return "threshold" if self.threshold is not None else "topk"


@dataclass(frozen=True)
class SparseMLPConfig:
    activation: str = "relu"
    gated: bool = False  # A = act(X W_gate + B_gate) * (X W_up + B_up): SwiGLU with silu, GeGLU with gelu
    input: Selection | None = None  # on X, before the up (and gate) matmul
    hidden: Selection | None = None  # on A, before the down matmul

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise GraphpruneError(f"unknown SparseMLP activation '{self.activation}': use one of "
                                  f"{', '.join(ACTIVATIONS)}.")


@dataclass(frozen=True)
class MLPWeights(Generic[T]):
    """The MLP's tensors: numpy arrays for the reference, IR values for insertion."""

    w_up: T
    w_down: T
    w_gate: T | None = None
    b_up: T | None = None
    b_down: T | None = None
    b_gate: T | None = None


@dataclass(frozen=True)
class Form:
    """What the function body depends on; the numbers (thresholds, k) are node attributes."""

    activation: str
    gated: bool
    biases: tuple[str, ...]  # of "up", "down", "gate"
    input: str  # none, threshold or topk
    hidden: str
    input_scaled: bool
    hidden_scaled: bool
    dtype: int = TensorProto.FLOAT

    @classmethod
    def of(cls, config: SparseMLPConfig, biases: tuple[str, ...], dtype: int = TensorProto.FLOAT) -> Form:
        return cls(config.activation, config.gated, tuple(b for b in ("up", "down", "gate") if b in biases),
                   config.input.mode if config.input else "none", config.hidden.mode if config.hidden else "none",
                   bool(config.input and config.input.wina), bool(config.hidden and config.hidden.wina), dtype)

    @property
    def overload(self) -> str:
        act = self.activation + ("_glu" if self.gated else "")
        bias = "b_" + "_".join(self.biases) if self.biases else "nobias"
        x = self.input + ("_wina" if self.input_scaled else "")
        h = self.hidden + ("_wina" if self.hidden_scaled else "")
        return f"{act}.{bias}.in_{x}.hid_{h}.{_DTYPES.get(self.dtype, str(self.dtype))}"


class _Body:
    """Collects function-body nodes; every op has fresh output names."""

    def __init__(self, dtype: int, opset: int) -> None:
        self.dtype, self.opset = dtype, opset
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: object) -> str | list[str]:
        names = [f"_t{len(self.nodes)}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def ints(self, *values: int) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.array(values, dtype=np.int64)))

    def scalar(self, value: float) -> str:
        np_type = helper.tensor_dtype_to_np_dtype(self.dtype)
        return self.op("Constant", value=numpy_helper.from_array(np.array(value, dtype=np_type)))

    def attr(self, name: str, kind: int) -> str:
        node = helper.make_node("Constant", [], [f"_t{len(self.nodes)}_0"])
        field = "value_float" if kind == onnx.AttributeProto.FLOAT else "value_int"
        node.attribute.append(helper.make_attribute_ref(field, kind, ref_attr_name=name))
        self.nodes.append(node)
        return node.output[0]

    def reduce_max_rows(self, value: str) -> str:
        if self.opset >= 18:
            return self.op("ReduceMax", value, self.ints(0), keepdims=0)
        return self.op("ReduceMax", value, axes=[0], keepdims=0)


def _activation(b: _Body, v: str, name: str) -> str:
    if name == "relu":
        return b.op("Relu", v)
    if name == "silu":
        return b.op("Mul", v, b.op("Sigmoid", v))
    if name == "gelu":
        inner = b.op("Erf", b.op("Mul", v, b.scalar(1 / np.sqrt(2.0))))
        return b.op("Mul", b.op("Mul", v, b.scalar(0.5)), b.op("Add", inner, b.scalar(1.0)))
    cube = b.op("Mul", b.op("Mul", v, v), v)
    inner = b.op("Mul", b.op("Add", v, b.op("Mul", cube, b.scalar(0.044715))), b.scalar(np.sqrt(2 / np.pi)))
    return b.op("Mul", b.op("Mul", v, b.scalar(0.5)), b.op("Add", b.op("Tanh", inner), b.scalar(1.0)))


def _select(b: _Body, v: str, weights: list[str], mode: str, scale: str | None,
            prefix: str) -> tuple[str, list[str]]:
    """Kept columns of v [B, n] and the matching rows of each weight: Gather, so MatMul reads only them."""
    if mode == "none":
        return v, weights
    score = b.op("Abs", v)
    if scale is not None:
        score = b.op("Mul", score, scale)
    if mode == "threshold":
        limit = b.op("Cast", b.attr(f"{prefix}_threshold", onnx.AttributeProto.FLOAT), to=b.dtype)
        mask = b.op("Greater", score, limit)
    else:
        k = b.op("Reshape", b.attr(f"{prefix}_k", onnx.AttributeProto.INT), b.ints(1))
        _, best = b.op("TopK", score, k, outputs=2, axis=-1, largest=1, sorted=1)
        false = numpy_helper.from_array(np.array([False]))
        true = numpy_helper.from_array(np.array([True]))
        empty = b.op("ConstantOfShape", b.op("Shape", score), value=false)
        mask = b.op("ScatterElements", empty, best, b.op("ConstantOfShape", b.op("Shape", best), value=true),
                    axis=-1)
    kept = b.op("Where", mask, v, b.scalar(0.0))
    # Rows any batch row keeps; the others' dropped entries are zero in `kept`, so per-row results stay exact.
    union = b.reduce_max_rows(b.op("Cast", mask, to=TensorProto.INT32))
    index = b.op("Squeeze", b.op("NonZero", union), b.ints(0))
    return b.op("Gather", kept, index, axis=1), [b.op("Gather", w, index, axis=0) for w in weights]


def sparse_mlp_function(form: Form, opset: int) -> onnx.FunctionProto:
    """The standard-ops body of SparseMLP for one form, for a model whose default opset is ``opset``."""
    if opset < MIN_OPSET:
        raise GraphpruneError(f"SparseMLP needs opset {MIN_OPSET} or later, not {opset}: convert the model "
                              "with onnx.version_converter first.")
    b = _Body(form.dtype, opset)
    x = b.op("Reshape", "X", b.op("Concat", b.ints(-1), b.op("Slice", b.op("Shape", "W_up"), b.ints(0), b.ints(1)),
                                   axis=0))
    up_weights = ["W_up", "W_gate"] if form.gated else ["W_up"]
    xs, selected = _select(b, x, up_weights, form.input, "S_in" if form.input_scaled else None, "input")
    up = b.op("MatMul", xs, selected[0])
    if "up" in form.biases:
        up = b.op("Add", up, "B_up")
    if form.gated:
        gate = b.op("MatMul", xs, selected[1])
        if "gate" in form.biases:
            gate = b.op("Add", gate, "B_gate")
        hidden = b.op("Mul", _activation(b, gate, form.activation), up)
    else:
        hidden = _activation(b, up, form.activation)
    hs, (down,) = _select(b, hidden, ["W_down"], form.hidden, "S_hidden" if form.hidden_scaled else None, "hidden")
    y = b.op("MatMul", hs, down)
    if "down" in form.biases:
        y = b.op("Add", y, "B_down")
    lead = b.op("Slice", b.op("Shape", "X"), b.ints(0), b.ints(-1))
    shape = b.op("Concat", lead, b.op("Slice", b.op("Shape", "W_down"), b.ints(1), b.ints(2)), axis=0)
    b.nodes.append(helper.make_node("Reshape", [y, shape], ["Y"]))
    return helper.make_function(DOMAIN, OP_TYPE, list(INPUTS), ["Y"], b.nodes,
                                [helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
                                overload=form.overload,
                                doc_string="graphprune SparseMLP, standard-ops form (see runtime_ops/sparse_mlp.py).")


def node_attributes(config: SparseMLPConfig) -> dict[str, object]:
    attrs: dict[str, object] = {"activation": config.activation}
    for prefix, selection in (("input", config.input), ("hidden", config.hidden)):
        if selection is None:
            continue
        if selection.threshold is not None:
            attrs[f"{prefix}_threshold"] = float(selection.threshold)
        else:
            attrs[f"{prefix}_k"] = int(selection.k)  # type: ignore[arg-type]
    return attrs


def wina_scales(weights: MLPWeights[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Row norms that WINA multiplies |v| by: of [W_up | W_gate] for the input, of W_down for the hidden."""
    squares = np.sum(np.square(weights.w_up, dtype=np.float64), axis=1)
    if weights.w_gate is not None:
        squares += np.sum(np.square(weights.w_gate, dtype=np.float64), axis=1)
    down = np.sum(np.square(weights.w_down, dtype=np.float64), axis=1)
    dtype = weights.w_up.dtype
    return np.sqrt(squares).astype(dtype), np.sqrt(down).astype(dtype)


def insert_sparse_mlp(model: ir.Model, x: ir.Value, weights: MLPWeights[ir.Value], config: SparseMLPConfig,
                      *, replace: ir.Value | None = None, name: str = "sparse_mlp") -> ir.Node:
    """Add a SparseMLP node reading ``x`` (and its function, domain import, WINA scales) to ``model``.

    With ``replace``, every reader of that value (the dense MLP's output) reads the new node's output
    instead and a graph output keeps its name; the dense nodes are left for cleanup to remove.
    Weights must be constant where WINA needs their norms. Returns the new node.
    """
    graph = model.graph
    opset = graph.opset_imports.get("", model.opset_imports.get("", 0))
    arrays = _check_weights(weights, config, name)
    taken = {v.name for v in graph.inputs} | set(graph.initializers) | {
        v.name for n in graph for v in n.outputs}
    clash = sorted(taken & {f"{name}_out", f"{name}_wina_in", f"{name}_wina_hidden"})
    if clash:
        raise GraphpruneError(f"SparseMLP '{name}': the graph already has a value named '{clash[0]}'; give each "
                              "inserted node its own name.")
    biases = tuple(b for b in ("up", "down", "gate") if getattr(weights, f"b_{b}") is not None)
    form = Form.of(config, biases, int(weights.w_up.dtype))  # type: ignore[union-attr]
    key = (DOMAIN, OP_TYPE, form.overload)
    if key not in model.functions:
        model.functions[key] = ir.serde.deserialize_function(sparse_mlp_function(form, opset))
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
    graph.opset_imports[DOMAIN] = DOMAIN_VERSION
    model.ir_version = max(model.ir_version or 0, MIN_IR_VERSION)
    scale_in = scale_hidden = None
    if form.input_scaled or form.hidden_scaled:
        s_in, s_hidden = wina_scales(arrays)
        if form.input_scaled:
            scale_in = _initializer(graph, f"{name}_wina_in", s_in)
        if form.hidden_scaled:
            scale_hidden = _initializer(graph, f"{name}_wina_hidden", s_hidden)
    inputs = [x, weights.w_up, weights.w_down, weights.w_gate, weights.b_up, weights.b_down, weights.b_gate,
              scale_in, scale_hidden]
    while inputs[-1] is None:
        inputs.pop()
    node = ir.Node(DOMAIN, OP_TYPE, inputs, _ir_attributes(node_attributes(config)), overload=form.overload,
                   name=name, num_outputs=1)
    out = node.outputs[0]
    out.name, out.dtype = f"{name}_out", x.dtype
    d_out = _static_shape(weights.w_down)
    if x.shape is not None and d_out is not None:
        out.shape = ir.Shape([*x.shape[:-1], d_out[1]])
    producer = x.producer()
    if producer is not None:
        graph.insert_after(producer, node)
    elif len(graph) > 0:
        graph.insert_before(graph[0], node)
    else:
        graph.append(node)
    if replace is not None:
        _replace(graph, replace, out)
    return node


def sparse_mlp_model(weights: MLPWeights[np.ndarray], config: SparseMLPConfig, *, leading: tuple = ("batch",),
                     opset: int = 17) -> onnx.ModelProto:
    """A model of one SparseMLP node: input ``x [*leading, D]``, output ``y``, weights as initializers."""
    d_in = weights.w_up.shape[0]
    dtype = ir.DataType(helper.np_dtype_to_tensor_dtype(weights.w_up.dtype))
    x = ir.Value(name="x", shape=ir.Shape([*leading, d_in]), type=ir.TensorType(dtype))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": opset}, name="sparse_mlp")
    values = {}
    for field in ("w_up", "w_down", "w_gate", "b_up", "b_down", "b_gate"):
        array = getattr(weights, field)
        values[field] = None if array is None else _initializer(graph, field, array)
    model = ir.Model(graph, ir_version=MIN_IR_VERSION, producer_name="graphprune")
    node = insert_sparse_mlp(model, x, MLPWeights(**values), config)
    node.outputs[0].name = "y"
    graph.outputs.append(node.outputs[0])
    return ir.serde.serialize_model(model)


def _check_weights(weights: MLPWeights[ir.Value], config: SparseMLPConfig, name: str) -> MLPWeights[np.ndarray]:
    if config.gated != (weights.w_gate is not None):
        raise GraphpruneError(f"SparseMLP '{name}': a gated config needs W_gate and an ungated one must not "
                              "have it.")
    if weights.b_gate is not None and weights.w_gate is None:
        raise GraphpruneError(f"SparseMLP '{name}': B_gate given without W_gate.")
    shapes = {f: _static_shape(getattr(weights, f)) for f in ("w_up", "w_down", "w_gate")}
    d_in, hidden = shapes["w_up"] or (None, None)
    for label, selection, extent in (("input", config.input, d_in), ("hidden", config.hidden, hidden)):
        if selection is not None and selection.k is not None and extent is not None and selection.k > extent:
            raise GraphpruneError(f"SparseMLP '{name}': {label} top-k {selection.k} exceeds the {extent} "
                                  f"{label} entries.")
    needs_values = bool((config.input and config.input.wina) or (config.hidden and config.hidden.wina))
    if not needs_values:
        return MLPWeights(np.empty(0), np.empty(0))

    def value(field: str) -> np.ndarray | None:
        v = getattr(weights, field)
        if v is None:
            return None
        if v.const_value is None:
            raise GraphpruneError(f"SparseMLP '{name}': WINA needs the weight '{v.name}' as a constant "
                                  "initializer.")
        return v.const_value.numpy()

    return MLPWeights(value("w_up"), value("w_down"), value("w_gate"))  # type: ignore[arg-type]


def _static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)  # type: ignore[arg-type]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType(
        helper.np_dtype_to_tensor_dtype(array.dtype))), const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _ir_attributes(attrs: dict[str, object]) -> list[ir.Attr]:
    out = []
    for key, val in attrs.items():
        if isinstance(val, str):
            out.append(ir.AttrString(key, val))
        elif isinstance(val, float):
            out.append(ir.AttrFloat32(key, val))
        else:
            out.append(ir.AttrInt64(key, int(val)))  # type: ignore[call-overload]
    return out


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    if old.shape is not None:
        new.shape = old.shape
    if old.is_graph_output():
        name, old.name = old.name, f"{old.name}__dense"
        new.name = name
        outputs = list(graph.outputs)
        graph.outputs[outputs.index(old)] = new
    old.replace_all_uses_with(new)


def reference(x: np.ndarray, weights: MLPWeights[np.ndarray], config: SparseMLPConfig) -> np.ndarray:
    """Numpy SparseMLP: the dense MLP with each row's dropped entries zeroed (per-row selection)."""
    w = weights
    rows = x.reshape(-1, w.w_up.shape[0])
    s_in = s_hidden = None
    if config.input is not None and config.input.wina:
        rows_of = w.w_up if w.w_gate is None else np.concatenate([w.w_up, w.w_gate], axis=1)
        s_in = np.linalg.norm(rows_of.astype(np.float64), axis=1).astype(x.dtype)
    if config.hidden is not None and config.hidden.wina:
        s_hidden = np.linalg.norm(w.w_down.astype(np.float64), axis=1).astype(x.dtype)
    xs = _mask(rows, config.input, s_in)
    up = xs @ w.w_up + (w.b_up if w.b_up is not None else 0)
    if config.gated:
        gate = xs @ w.w_gate + (w.b_gate if w.b_gate is not None else 0)
        hidden = _np_activation(gate, config.activation) * up
    else:
        hidden = _np_activation(up, config.activation)
    y = _mask(hidden, config.hidden, s_hidden) @ w.w_down + (w.b_down if w.b_down is not None else 0)
    return y.reshape(*x.shape[:-1], w.w_down.shape[1]).astype(x.dtype)


def _mask(v: np.ndarray, selection: Selection | None, scale: np.ndarray | None) -> np.ndarray:
    if selection is None:
        return v
    score = np.abs(v) if scale is None else np.abs(v) * scale
    if selection.threshold is not None:
        keep = score > np.asarray(selection.threshold, dtype=v.dtype)
    else:
        if selection.k > v.shape[-1]:  # type: ignore[operator]
            raise GraphpruneError(f"top-k {selection.k} exceeds the {v.shape[-1]} entries.")
        order = np.argsort(-score, axis=-1, kind="stable")[:, : selection.k]
        keep = np.zeros(v.shape, dtype=bool)
        np.put_along_axis(keep, order, True, axis=-1)
    return np.where(keep, v, np.zeros((), v.dtype))


def _np_activation(v: np.ndarray, name: str) -> np.ndarray:
    if name == "relu":
        return np.maximum(v, 0)
    if name == "silu":
        return v / (1 + np.exp(-v))
    if name == "gelu":
        from math import erf

        return (0.5 * v * (1 + np.vectorize(erf)(v / np.sqrt(2)))).astype(v.dtype)
    return (0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))).astype(v.dtype)
