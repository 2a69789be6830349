"""Size and cost of a model: parameter count, multiply-accumulates, bytes on disk."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner  # not loaded by `import onnx`; model_stats inlines local functions
from onnx import TensorProto

from graphprune.errors import GraphpruneError
from graphprune.inputs import resolve_shapes
from graphprune.runtime import ModelLike, load_structure, model_path

Shape = tuple[int, ...]
ShapeOf = Callable[[str], Shape | None]

_FLOAT_NAMES = (
    "FLOAT",
    "FLOAT16",
    "DOUBLE",
    "BFLOAT16",
    "FLOAT8E4M3FN",
    "FLOAT8E4M3FNUZ",
    "FLOAT8E5M2",
    "FLOAT8E5M2FNUZ",
    "FLOAT8E8M0",
    "FLOAT4E2M1",
    "FLOAT6E2M3",
    "FLOAT6E3M2",
)
FLOAT_TYPES = frozenset(getattr(TensorProto, n) for n in _FLOAT_NAMES if hasattr(TensorProto, n))
# Bigger tensors are reduced to name/type/dims for shape inference; small ones keep data for shape folding.
_INLINE_LIMIT = 4096


# ---------- parameters ----------

# Integer types that hold quantized weights: an int8 weight is as many parameters as the float one.
_QUANTIZED_NAMES = ("INT8", "UINT8", "INT16", "UINT16", "INT4", "UINT4", "INT2", "UINT2")
QUANTIZED_TYPES = frozenset(getattr(TensorProto, n) for n in _QUANTIZED_NAMES if hasattr(TensorProto, n))
_QUANT_DOMAINS = ("", "ai.onnx", "com.microsoft")
# The scale and zero-point inputs of the quantization ops (ONNX and ONNX Runtime's contrib ops, positions as
# in their schemas): bookkeeping of the quantization, not parameters. QLinearConcat: _bookkeeping_positions.
_BOOKKEEPING: dict[str, frozenset[int]] = {
    **dict.fromkeys(("QuantizeLinear", "DequantizeLinear"), frozenset({1, 2})),
    **dict.fromkeys(("ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul"), frozenset({2, 3})),
    "MatMulIntegerToFloat": frozenset({2, 3, 4, 5}),
    **dict.fromkeys(("QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul"),
                    frozenset({1, 2, 4, 5, 6, 7})),
    "QGemm": frozenset({1, 2, 4, 5, 7, 8}),
    **dict.fromkeys(("QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool",
                     "QLinearSoftmax", "QLinearReduceMean"), frozenset({1, 2, 3, 4})),
    "QLinearWhere": frozenset({2, 3, 5, 6, 7, 8}),
    "QAttention": frozenset({3, 4, 6, 7}),
    "DynamicQuantizeLSTM": frozenset({8, 9, 10, 11}),
    # fc1-3 scales, fc1-3 zero points, then global and activation scales; packed 4-bit weights count per byte.
    "QMoE": frozenset({3, 6, 9, 11, 12, 13, *range(15, 21)}),
}


def count_params(model: ModelLike) -> int:
    """Elements of the weights, subgraphs included: initializers and Constant tensors that are floating point,
    hold quantized integers (int8, ...) or are a quantization op's data (int32 biases), so that quantizing
    keeps the count (the file size is what falls); not the quantization ops' scales and zero points, nor
    other integer tensors (shapes, indices)."""
    graph = load_structure(model).graph
    tensors = list(_weight_tensors(graph))
    data, bookkeeping = _quantization_inputs(graph, {name for name, _, _ in tensors})
    return sum(count for name, dtype, count in tensors
               if (dtype in FLOAT_TYPES or dtype in QUANTIZED_TYPES or name in data)
               and name not in bookkeeping)


def _bookkeeping_positions(node: onnx.NodeProto) -> frozenset[int] | None:
    """The inputs of a quantization op that are scales or zero points; None for other ops."""
    if node.domain not in _QUANT_DOMAINS:
        return None
    if node.op_type == "QLinearConcat":  # Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) per input
        return frozenset(i for i in range(len(node.input)) if i < 2 or (i - 2) % 3)
    return _BOOKKEEPING.get(node.op_type)


def _quantization_inputs(graph: onnx.GraphProto, constants: set[str]) -> tuple[set[str], set[str]]:
    """Names that quantization ops read as data, and those read only as scales or zero points.

    DynamicQuantizeLinear computes an activation's scale and zero point at run time; ONNX Runtime's dynamic
    quantizer multiplies a weight's scale into that scale (Mul(x_scale, w_scale)) to rescale the integer
    product, so a constant in a Mul of run-time scales and constants is bookkeeping as well."""
    data, bookkeeping, other = set(), set(), set()
    runtime_scales: set[str] = set()  # DynamicQuantizeLinear's scales, and products of them with constants
    for g in all_graphs(graph):
        for node in g.node:
            positions = _bookkeeping_positions(node)
            if node.domain in _QUANT_DOMAINS and node.op_type == "DynamicQuantizeLinear":
                runtime_scales.update(node.output[1:])
            elif (node.domain in ("", "ai.onnx") and node.op_type == "Mul"
                  and runtime_scales.intersection(node.input)
                  and set(node.input) <= runtime_scales | constants):
                runtime_scales.update(node.output)
                positions = frozenset(range(len(node.input)))
            for index, name in enumerate(node.input):
                if name:
                    (other if positions is None else bookkeeping if index in positions else data).add(name)
    return data, bookkeeping - data - other


def _weight_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, int, int]]:
    """(name, element type, element count) of every initializer and Constant value."""
    for g in all_graphs(graph):
        for tensor in g.initializer:
            yield tensor.name, tensor.data_type, math.prod(tensor.dims)
        for sparse in g.sparse_initializer:
            yield sparse.values.name, sparse.values.data_type, math.prod(sparse.values.dims)
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                yield from ((node.output[0], *t) for t in _constant_tensors(node))


def _constant_tensors(node: onnx.NodeProto) -> Iterator[tuple[int, int]]:
    for attr in node.attribute:
        if attr.name == "value":
            yield attr.t.data_type, math.prod(attr.t.dims)
        elif attr.name == "sparse_value":
            yield attr.sparse_tensor.values.data_type, math.prod(attr.sparse_tensor.values.dims)
        elif attr.name == "value_float":
            yield TensorProto.FLOAT, 1
        elif attr.name == "value_floats":
            yield TensorProto.FLOAT, len(attr.floats)


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph inside it (If branches, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from all_graphs(sub)


# ---------- multiply-accumulates ----------


@dataclass
class MacCount:
    """MACs of the top-level graph's Conv/ConvTranspose/Gemm/MatMul-like nodes (subgraph bodies excluded).

    skipped_nodes counts such nodes whose shapes could not be inferred; they add nothing to total.
    """

    total: int = 0
    skipped_nodes: int = 0
    skipped: list[str] = field(default_factory=list)
    by_op_type: dict[str, int] = field(default_factory=dict)

    def __int__(self) -> int:
        return self.total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_macs(model: ModelLike, input_shapes: Mapping[str, Shape] | None = None) -> MacCount:
    """input_shapes gives whole shapes per input; other dynamic dims follow make_inputs' defaults."""
    proto = load_structure(model)
    shape_of = value_shapes(proto, input_shapes)
    result = MacCount()
    for index, node in enumerate(proto.graph.node):
        counter = _COUNTERS.get(_op_key(node))
        if counter is None:
            continue
        macs = counter(node, shape_of)
        if macs is None:
            result.skipped_nodes += 1
            result.skipped.append(node.name or f"{node.op_type}#{index}")
            continue
        result.total += macs
        result.by_op_type[node.op_type] = result.by_op_type.get(node.op_type, 0) + macs
    return result


def value_shapes(proto: onnx.ModelProto, input_shapes: Mapping[str, Shape] | None = None) -> ShapeOf:
    """Static shape of each value by name (None where inference cannot tell), with the inputs bound as
    count_macs binds them: ``input_shapes`` first, then make_inputs' defaults for other dynamic dims."""
    return _infer_shapes(_skeleton(proto, resolve_shapes(proto, input_shapes, strict=False)))


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _skeleton(model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> onnx.ModelProto:
    """A light copy for shape inference: big weights reduced to dims, inputs bound to concrete shapes."""
    sk = onnx.ModelProto(ir_version=model.ir_version)
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    graph = sk.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.initializer.extend(_light(t) for t in model.graph.initializer)
    graph.sparse_initializer.extend(model.graph.sparse_initializer)
    for vi in model.graph.input:
        graph.input.append(_bound(vi, input_shapes.get(vi.name)))
    for vi in model.graph.output:
        # Declared output dims may be symbolic or stale; let inference decide them.
        graph.output.append(_bound(vi, None, clear=True))
    if sk.functions:
        sk = onnx.inliner.inline_local_functions(sk)
    return sk


def _light(tensor: TensorProto) -> TensorProto:
    external = tensor.data_location == TensorProto.EXTERNAL
    if not external and math.prod(tensor.dims) <= _INLINE_LIMIT:
        return tensor
    return TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)


def _bound(vi: onnx.ValueInfoProto, shape: Shape | None, clear: bool = False) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    if not out.type.HasField("tensor_type"):
        return out
    if clear:
        out.type.tensor_type.ClearField("shape")
    elif shape is not None:
        dims = out.type.tensor_type.shape
        dims.ClearField("dim")
        for d in shape:
            dims.dim.add().dim_value = int(d)
    return out


def _infer_shapes(skeleton: onnx.ModelProto) -> ShapeOf:
    try:
        sk = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError):
        sk = skeleton  # keep the declared shapes; nodes left unknown are reported as skipped
    known: dict[str, Shape] = {t.name: tuple(t.dims) for t in sk.graph.initializer}
    for vi in [*sk.graph.input, *sk.graph.value_info, *sk.graph.output]:
        shape = _static_shape(vi)
        if shape is not None:
            known[vi.name] = shape
    return known.get


def _static_shape(vi: onnx.ValueInfoProto) -> Shape | None:
    tensor = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    if not all(d.HasField("dim_value") for d in tensor.shape.dim):
        return None
    return tuple(d.dim_value for d in tensor.shape.dim)


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _input_shape(node: onnx.NodeProto, index: int, shape_of: ShapeOf) -> Shape | None:
    return shape_of(node.input[index]) if len(node.input) > index and node.input[index] else None


def _conv_counter(x_index: int, w_index: int) -> Callable[[onnx.NodeProto, ShapeOf], int | None]:
    def count(node: onnx.NodeProto, shape_of: ShapeOf) -> int | None:
        y, w = shape_of(node.output[0]), _input_shape(node, w_index, shape_of)
        if y is None or w is None or len(w) < 2:
            return None
        # W is (C_out, C_in / group, *kernel): each output element needs C_in/group * kernel MACs.
        return math.prod(y) * w[1] * math.prod(w[2:])

    return count


def _conv_transpose(node: onnx.NodeProto, shape_of: ShapeOf) -> int | None:
    x, w = _input_shape(node, 0, shape_of), _input_shape(node, 1, shape_of)
    if x is None or w is None or len(w) < 2:
        return None
    # W is (C_in, C_out / group, *kernel): each input element scatters into C_out/group * kernel outputs.
    return math.prod(x) * w[1] * math.prod(w[2:])


def _gemm(node: onnx.NodeProto, shape_of: ShapeOf) -> int | None:
    a, b = _input_shape(node, 0, shape_of), _input_shape(node, 1, shape_of)
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if _attr(node, "transA") else a
    n = b[0] if _attr(node, "transB") else b[1]
    return m * n * k


def _matmul_counter(a_index: int, b_index: int) -> Callable[[onnx.NodeProto, ShapeOf], int | None]:
    def count(node: onnx.NodeProto, shape_of: ShapeOf) -> int | None:
        a, b = _input_shape(node, a_index, shape_of), _input_shape(node, b_index, shape_of)
        return None if a is None or b is None else _matmul_macs(a, b)

    return count


def _fused_matmul(node: onnx.NodeProto, shape_of: ShapeOf) -> int | None:
    a, b = _input_shape(node, 0, shape_of), _input_shape(node, 1, shape_of)
    if a is None or b is None or _attr(node, "transBatchA") or _attr(node, "transBatchB"):
        return None
    if _attr(node, "transA") and len(a) >= 2:
        a = (*a[:-2], a[-1], a[-2])
    if _attr(node, "transB") and len(b) >= 2:
        b = (*b[:-2], b[-1], b[-2])
    return _matmul_macs(a, b)


def _matmul_macs(a: Shape, b: Shape) -> int | None:
    """numpy.matmul semantics: 1-D operands are promoted, batch dims broadcast."""
    if not a or not b:
        return None
    m = a[-2] if len(a) >= 2 else 1
    n = b[-1] if len(b) >= 2 else 1
    try:
        batch = np.broadcast_shapes(a[:-2], b[:-2])
    except ValueError:
        return None
    return math.prod(batch) * m * n * a[-1]


_COUNTERS: dict[str, Callable[[onnx.NodeProto, ShapeOf], int | None]] = {
    "Conv": _conv_counter(0, 1),
    "ConvInteger": _conv_counter(0, 1),
    "QLinearConv": _conv_counter(0, 3),
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul_counter(0, 1),
    "MatMulInteger": _matmul_counter(0, 1),
    "QLinearMatMul": _matmul_counter(0, 3),
    "com.microsoft.FusedMatMul": _fused_matmul,
}


# ---------- file size and summary ----------


def file_size(path: str | os.PathLike) -> int:
    """Bytes of the .onnx file plus every external data file it references."""
    path = Path(os.fspath(path))
    proto = load_structure(path)
    total = path.stat().st_size
    for location in sorted(_external_locations(proto)):
        data = path.parent / location
        if not data.is_file():
            raise GraphpruneError(
                f"model '{path}' references external data '{location}', which does not exist."
            )
        total += data.stat().st_size
    return total


def _external_locations(proto: onnx.ModelProto) -> set[str]:
    locations = set()
    for tensor in _all_tensors(proto):
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            if entries.get("location"):
                locations.add(entries["location"])
    return locations


def _all_tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    graphs = list(all_graphs(proto.graph))
    nodes = [node for g in graphs for node in g.node]
    nodes += [node for f in proto.functions for node in f.node]
    for g in graphs:
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield from (sparse.values, sparse.indices)
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)


@dataclass
class ModelStats:
    params: int
    macs: int
    file_bytes: int  # on-disk size with external data for a path; serialised size for a proto
    macs_skipped_nodes: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def model_stats(model: ModelLike, input_shapes: Mapping[str, Shape] | None = None) -> ModelStats:
    proto = load_structure(model)
    path = model_path(model)
    macs = count_macs(proto, input_shapes)
    size = file_size(path) if path is not None else proto.ByteSize()
    return ModelStats(count_params(proto), macs.total, size, macs.skipped_nodes)
