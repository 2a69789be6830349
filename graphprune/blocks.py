"""Residual sub-blocks: ``y = x + f(x)`` where the branch ``f`` reads nothing but ``x``.

A block is an Add (or two-input Sum) node with operands ``x`` and ``b`` where ``b`` is produced by a
branch ``f`` (every node upstream of ``b`` back to ``x``) such that

- every activation ``f`` reads is ``x`` or computed inside ``f``. Besides ``x``, ``f`` may read *side
  values*: constants, shape reads, and values computed from integer/bool graph inputs and constants
  alone (attention masks, position ids, rotary tables). A float graph input (a second image, a KV cache)
  or an embedding lookup is an activation of its own, so a branch that reaches one is no block;
- nothing outside ``f`` reads a value of ``f`` except the Add reading ``b``, and no value of ``f`` is a
  graph output: bypassing the Add (``y := x``) leaves all of ``f`` dead, to be removed;
- ``f`` does some multiply-accumulates (a Conv, Gemm or MatMul): a branch that is a Mul by a constant
  (the cubic term of tanh-GELU) is part of an activation function, not a layer.

Transformer attention and MLP sublayers (pre-LN and post-LN: the LayerNorm after the Add of post-LN BERT
is outside the block) and CNN blocks with an identity shortcut are blocks; a projection shortcut is not
(neither operand is the value the other branch reads). A block inside another's branch is listed too;
bypassing the outer one removes the inner one with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from graphprune.inputs import resolve_shapes

# Private helpers of metrics, reused so that a block's MACs are counted exactly as model_stats counts
# the whole model (same resolved input shapes, same per-op formulas).
from graphprune.metrics import _COUNTERS, _infer_shapes, _op_key, _skeleton

# Ops whose outputs describe a tensor's shape, not its data: reading an activation through them does not
# make a value an activation (Reshape targets, ConstantOfShape fills).
SHAPE_READS = frozenset({"Shape", "Size"})
MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedMatMul", "ConvInteger", "MatMulInteger",
                     "QLinearConv", "QLinearMatMul"})


@dataclass
class ResidualBlock:
    name: str  # readable: the common path of the branch's weighted nodes and the kind
    kind: str  # "attention" (the branch has a Softmax), "conv" (a Conv), else "mlp"
    add: ir.Node  # the Add / Sum that closes the block
    x_index: int  # which input of ``add`` is the shortcut x; the other is the branch output b
    nodes: list[ir.Node]  # the branch f, in graph order
    macs: int = 0  # multiply-accumulates of f, per model_stats' count at the resolved input shapes
    first_weight: str = ""  # name of the first Conv/Gemm/MatMul in f with a weight operand

    @property
    def x(self) -> ir.Value:
        """The shortcut as it is now (an earlier bypass may have rewired it)."""
        return self.add.inputs[self.x_index]

    @property
    def branch(self) -> ir.Value:
        return self.add.inputs[1 - self.x_index]

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "add": self.add.name, "first_weight": self.first_weight,
                "nodes": len(self.nodes), "macs": self.macs}


@dataclass
class _Walk:
    """What walking a branch back from b found."""

    nodes: set = field(default_factory=set)
    reads_x: bool = False


def find_residual_blocks(model: ir.Model, input_shapes: Mapping[str, tuple[int, ...]] | None = None, *,
                         macs: Mapping[str, int] | None = None) -> list[ResidualBlock]:
    """Every residual block of the top-level graph, in graph order (see the module doc).

    ``model`` should be prepared (graphprune.io.prepare): topologically sorted, named nodes, inferred
    shapes. ``input_shapes`` resolves dynamic input dims for the MACs count; ``macs``: node_macs of the
    model, when the caller has them already.
    """
    graph = model.graph
    order = {node: i for i, node in enumerate(graph)}
    activations = _activations(graph)
    blocks = []
    for add in graph:
        if not _is_binary_sum(add):
            continue
        for x_index in (0, 1):
            nodes = _branch(add, x_index, order, activations)
            if nodes is not None:
                blocks.append(_block(add, x_index, sorted(nodes, key=order.__getitem__)))
                break  # one orientation at most: the other operand is then downstream of x
    blocks = [b for b in blocks if any(_has_weight(n) and n.op_type in MAC_OPS for n in b.nodes)]
    if blocks:
        macs = node_macs(ir.to_proto(model), input_shapes) if macs is None else macs
        for block in blocks:
            block.macs = sum(macs.get(n.name, 0) for n in block.nodes)
    return blocks


def _is_binary_sum(node: ir.Node) -> bool:
    return (node.domain in ("", "ai.onnx") and node.op_type in ("Add", "Sum") and len(node.inputs) == 2
            and all(v is not None for v in node.inputs) and node.inputs[0] is not node.inputs[1])


def _activations(graph: ir.Graph) -> set[ir.Value]:
    """Values that carry data derived from a float graph input or an embedding lookup.

    Masks, positions and other values computed from integer inputs and constants alone are not
    activations; neither are shape reads. A node with an activation operand makes activations.
    """
    found: set[ir.Value] = set()
    for value in graph.inputs:
        if value.const_value is None and value.dtype is not None and value.dtype.is_floating_point():
            found.add(value)
    for node in graph:
        if node.op_type in SHAPE_READS:
            continue
        data_inputs = [v for v in node.inputs if v is not None]
        lookup = (node.op_type == "Gather" and len(data_inputs) == 2 and _is_constant(node.inputs[0])
                  and not _is_constant(node.inputs[1]) and node.inputs[0].dtype is not None
                  and node.inputs[0].dtype.is_floating_point())
        if lookup or any(v in found for v in data_inputs):
            found.update(node.outputs)
    return found


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and (value.const_value is not None or value.is_initializer())


def _has_weight(node: ir.Node) -> bool:
    return any(_is_constant(v) and v.dtype is not None and v.dtype.is_floating_point()
               and v.const_value is not None and v.const_value.size > 1 for v in node.inputs)


def _branch(add: ir.Node, x_index: int, order: Mapping[ir.Node, int],
            activations: set[ir.Value]) -> set[ir.Node] | None:
    """The nodes of f when ``add.inputs[x_index]`` is the shortcut x and f reads only x; else None."""
    x, b = add.inputs[x_index], add.inputs[1 - x_index]
    if x not in activations or b not in activations or b.producer() is None or b.is_graph_output():
        return None
    if len(b.uses()) != 1 or not _same_shape(x, add.outputs[0]):
        return None  # b read elsewhere, or x broadcast up by b: bypassing would change a shape
    x_producer = x.producer()
    floor = order[x_producer] if x_producer is not None else -1
    walk = _Walk()
    stack = [b.producer()]
    while stack:
        node = stack.pop()
        if node in walk.nodes:
            continue
        # f lies between x and the Add. A node at or before x's producer cannot descend from x, so f reads
        # another stream; the walk would reject it at that stream's source anyway, this stops it early.
        if node.graph is not add.graph or order.get(node, -1) <= floor:
            return None
        walk.nodes.add(node)
        if not any(v in activations for v in node.inputs if v is not None):
            return None  # an embedding lookup: a source of activations of its own
        for value in node.inputs:
            if value is None or value not in activations:
                continue  # constants and side values stay outside f
            if value is x:
                walk.reads_x = True
            elif value.producer() is None:
                return None  # a float graph input other than x
            else:
                stack.append(value.producer())
    if not walk.reads_x or not _closed(walk.nodes, b):
        return None
    return walk.nodes


def _same_shape(x: ir.Value, y: ir.Value) -> bool:
    """False only when both shapes are known and differ (unknown shapes are left to verification)."""
    if x.shape is None or y.shape is None:
        return True
    return len(x.shape) == len(y.shape) and all(
        a == b for a, b in zip(x.shape, y.shape, strict=True) if isinstance(a, int) and isinstance(b, int))


def _closed(nodes: set[ir.Node], b: ir.Value) -> bool:
    """No value of f but b is read outside f, and none is a graph output."""
    for node in nodes:
        for value in node.outputs:
            if value.is_graph_output():
                return False
            for use in value.uses():
                if use.node not in nodes and value is not b:
                    return False
    return True


def _block(add: ir.Node, x_index: int, nodes: list[ir.Node]) -> ResidualBlock:
    weighted = [n for n in nodes if _has_weight(n)]
    if any(n.op_type == "Softmax" for n in nodes):
        kind = "attention"
    elif any(n.op_type in ("Conv", "ConvTranspose") for n in nodes):
        kind = "conv"
    else:
        kind = "mlp"
    path = _common_path([n.name or "" for n in weighted]) or add.name or f"{add.op_type}"
    linear = [n for n in weighted if n.op_type in MAC_OPS]
    return ResidualBlock(name=f"{path} ({kind})", kind=kind, add=add, x_index=x_index, nodes=nodes,
                         first_weight=linear[0].name if linear else "")


def _common_path(names: list[str]) -> str:
    """The longest shared '/'-separated prefix of node names, e.g. 'bert/encoder/layer.0/attention'."""
    parts = [[p for p in name.split("/") if p] for name in names if name]
    if not parts:
        return ""
    if len(parts) == 1:
        return "/".join(parts[0][:-1]) or parts[0][0]
    common = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return "/".join(common)


def node_macs(proto: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
              ) -> dict[str, int]:
    """MACs per top-level node name, as metrics.count_macs counts them (nodes it cannot size: absent)."""
    shapes = resolve_shapes(proto, input_shapes, strict=False)
    shape_of = _infer_shapes(_skeleton(proto, shapes))
    result: dict[str, int] = {}
    for node in proto.graph.node:
        counter = _COUNTERS.get(_op_key(node))
        macs = counter(node, shape_of) if counter is not None else None
        if macs is not None and node.name:
            result[node.name] = result.get(node.name, 0) + int(macs)
    return result

