"""prune-tokens: keep the top tokens by attention received, after chosen encoder layers (ViT-style).

A *stage* is ``(layer, keep)``. After encoder layer ``layer`` (0-based, in graph order: the layer whose
attention and MLP residual blocks are the ``layer``-th pair that graphprune.blocks finds), the residual
stream ``[B, T, D]`` is cut to the tokens that layer's attention probabilities ``P [B, H, T, T]`` (its
Softmax output) rate highest; every later layer then runs on fewer tokens.

Score of token j:

- with a CLS token (the default): the attention it receives from the CLS query, summed over heads,
  ``sum_h P[:, h, 0, j]`` (the mean over heads ranks the same). Token 0 is always kept, and of the other
  ``T - 1`` the top ``ceil(keep * (T - 1))``;
- without one (``cls=False``): the attention it receives from all queries, ``sum_{h,q} P[:, h, q, j]``;
  the top ``ceil(keep * T)`` of all tokens are kept.

Written with standard ONNX ops only, so every provider runs it: Gather (the CLS row), ReduceSum, Slice,
TopK (the k best), a second TopK (largest=0) that sorts the kept indices so the tokens keep their
positional order, Add/Mul/Concat/Unsqueeze to put CLS first, and GatherND (batch_dims=1) to take the kept
rows of each batch item. Needs opset 13 or later (ReduceSum and Unsqueeze with axes as inputs).

Sequence lengths baked into the graph: exporters write the token count T into Reshape shapes (legacy:
``[1, 197, -1, 64]``; dynamo also ``[-1, 197, 64]`` for the batched key transpose). After the cut, every
Reshape shape downstream has its entries equal to T replaced by the new count (a fresh constant, never
the shared one). That is sound only when T equals no other extent there, so the pass declines when T is
the batch size, the head count, the head width or an extent of any weight. An integer constant equal to
T read by any other downstream op (Expand, ConstantOfShape, Slice, ...) is declined with the node's name,
as is a token count that is not static.

The model's outputs change shape on the token axis (``last_hidden_state [B, T, D]`` becomes
``[B, 1 + k, D]``); outputs computed from CLS alone (a pooler) keep theirs. ``compare_outputs`` compares
what stays comparable: outputs of unchanged shape in full, token-axis outputs by their CLS row (or their
mean over tokens without CLS).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.blocks import ResidualBlock, find_residual_blocks
from graphprune.errors import GraphpruneError
from graphprune.io import infer_shapes
from graphprune.rewrite import cleanup

PREFIX = "graphprune_tokens"
# Ops that only move probabilities between the Softmax and the P @ V MatMul (dynamo writes a NaN guard).
_PASS_THROUGH = frozenset({"Where", "IsNaN", "Cast", "Dropout", "Identity"})
MIN_OPSET = 13
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Max", "Min"})


@dataclass(frozen=True)
class TokenStage:
    layer: int  # 0-based encoder layer; tokens are cut from its output
    keep: float  # share of the candidate tokens kept, in (0, 1]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "keep": self.keep}


def parse_stage(text: str) -> TokenStage:
    """``"0.7@3"``: keep 0.7 of the tokens after layer 3."""
    keep, sep, layer = text.partition("@")
    try:
        if not sep:
            raise ValueError
        return TokenStage(layer=int(layer), keep=float(keep))
    except ValueError:
        raise GraphpruneError(f"--keep '{text}': write KEEP@LAYER, e.g. 0.7@3 (keep 70% of the tokens after "
                              "layer 3, layers counted from 0).") from None


@dataclass
class PruneTokensConfig:
    """``stages``: one or more (layer, keep); ``cls``: token 0 is a CLS token (scored by its attention row,
    always kept). ``input_shapes`` resolves dynamic input dims for the MACs count."""

    stages: Sequence[TokenStage] = ()
    cls: bool = True
    input_shapes: Mapping[str, tuple[int, ...]] | None = None


@dataclass
class StageReport:
    layer: int
    keep: float
    softmax: str  # the attention probabilities scored
    add: str  # the Add whose output (the residual stream after the layer) was cut
    tokens_before: int
    tokens_after: int
    reshapes_rewritten: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "keep": self.keep, "softmax": self.softmax, "add": self.add,
                "tokens_before": self.tokens_before, "tokens_after": self.tokens_after,
                "reshapes_rewritten": self.reshapes_rewritten}


@dataclass
class TokenReport:
    layers: int = 0  # encoder layers found
    stages: list[StageReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "stages": [s.to_dict() for s in self.stages]}


@dataclass
class EncoderLayer:
    attention: ResidualBlock
    mlp: ResidualBlock
    softmax: ir.Node


class PruneTokensPass(ir.passes.InPlacePass):
    name = "prune-tokens"

    def __init__(self, config: PruneTokensConfig | None = None) -> None:
        super().__init__()
        self.config = config or PruneTokensConfig(stages=(TokenStage(0, 1.0),))
        self.report = TokenReport()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        stages = check_stages(self.config.stages)
        opset = model.opset_imports.get("", 0)
        if opset < MIN_OPSET:
            raise GraphpruneError(f"the model uses opset {opset}; prune-tokens writes ReduceSum and Unsqueeze with "
                                  f"axes as inputs and needs opset {MIN_OPSET} or later.")
        layers = find_layers(model, self.config.input_shapes)
        self.report = TokenReport(layers=len(layers))
        for stage in stages:
            if stage.layer >= len(layers):
                raise GraphpruneError(f"--keep {stage.keep:g}@{stage.layer}: the model has {len(layers)} encoder "
                                      f"layers (0 to {len(layers) - 1}); choose a layer in that range.")
        for number, stage in enumerate(stages):
            # Found once, before any cut: the score nodes of a cut read inside its attention block, which
            # then no longer counts as a residual block. Later layers' nodes survive; their shapes are
            # re-inferred after each cut.
            self.report.stages.append(_cut(model, layers[stage.layer], stage, self.config.cls, number))
            cleanup(model)
        return ir.passes.PassResult(model, modified=bool(stages))


def check_stages(stages: Sequence[TokenStage]) -> list[TokenStage]:
    if not stages:
        raise GraphpruneError("give at least one stage: --keep KEEP@LAYER (e.g. 0.7@3).")
    for stage in stages:
        if not 0.0 < stage.keep <= 1.0:
            raise GraphpruneError(f"--keep {stage.keep:g}@{stage.layer}: the keep ratio must be in (0, 1].")
        if stage.layer < 0:
            raise GraphpruneError(f"--keep {stage.keep:g}@{stage.layer}: layers are counted from 0.")
    ordered = sorted(stages, key=lambda s: s.layer)
    if len({s.layer for s in ordered}) != len(ordered):
        raise GraphpruneError("two --keep stages name the same layer; give each layer once.")
    return ordered


def find_layers(model: ir.Model, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> list[EncoderLayer]:
    """Encoder layers in graph order: an attention residual block followed by an MLP block that reads its
    output, each attention block holding one Softmax over a [B, H, T, T] score that feeds a MatMul."""
    blocks = find_residual_blocks(model, input_shapes, macs={})
    layers = []
    for first, second in itertools.pairwise(blocks):
        if first.kind != "attention" or second.kind != "mlp" or second.x is not first.add.outputs[0]:
            continue
        softmaxes = [n for n in first.nodes if n.op_type == "Softmax"]
        if len(softmaxes) != 1:
            continue
        softmax = softmaxes[0]
        shape = softmax.outputs[0].shape
        if shape is None or len(shape) != 4 or not _feeds_matmul(softmax.outputs[0]):
            continue
        layers.append(EncoderLayer(first, second, softmax))
    if not layers:
        raise GraphpruneError("found no encoder layer (an attention residual block with one Softmax over [B, H, "
                              "T, T] feeding a MatMul, followed by an MLP residual block): nothing to prune "
                              "tokens after.")
    return layers


def _feeds_matmul(value: ir.Value, depth: int = 4) -> bool:
    for use in value.uses():
        if use.node.op_type == "MatMul" and use.idx == 0:
            return True
        if depth and use.node.op_type in _PASS_THROUGH and _feeds_matmul(use.node.outputs[0], depth - 1):
            return True
    return False


def kept_count(tokens: int, keep: float, cls: bool) -> int:
    """How many tokens a stage leaves: CLS plus ceil(keep * (T - 1)), or ceil(keep * T) without CLS."""
    candidates = tokens - 1 if cls else tokens
    # round() first so that 0.7 * 10 = 7.000000000000001 does not become 8.
    kept = max(1, math.ceil(round(keep * candidates, 9)))
    return kept + 1 if cls else kept


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def _cut(model: ir.Model, layer: EncoderLayer, stage: TokenStage, cls: bool, number: int) -> StageReport:
    graph = model.graph
    probs = layer.softmax.outputs[0]
    stream = layer.mlp.add.outputs[0]
    batch, heads, queries, tokens = (_static(d) for d in probs.shape)
    where = f"layer {stage.layer} ({layer.softmax.name})"
    if tokens is None or queries != tokens:
        raise GraphpruneError(f"{where}: the attention probabilities have shape {probs.shape}, not a static "
                              "[B, H, T, T]; give static input shapes with --input-shape.")
    if stream.shape is None or len(stream.shape) != 3 or _static(stream.shape[1]) != tokens:
        raise GraphpruneError(f"{where}: the residual stream after the layer ({stream.name}) has shape "
                              f"{stream.shape}, not [B, {tokens}, D]; prune-tokens needs tokens on axis 1.")
    if cls and tokens < 2:
        raise GraphpruneError(f"{where}: only {tokens} token; nothing to choose besides CLS.")
    new = kept_count(tokens, stage.keep, cls)
    _check_unambiguous(graph, layer, tokens, batch, heads)
    p = f"{PREFIX}{number}"

    def const(name: str, array) -> ir.Value:
        array = np.asarray(array, dtype=np.int64)
        value = ir.Value(name=f"{p}_{name}", shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(array, name=f"{p}_{name}"))
        graph.register_initializer(value)
        return value

    nodes: list[ir.Node] = []

    def add(op: str, inputs: list, name: str, attributes: dict | None = None, outputs: int = 1) -> ir.Node:
        node = ir.node(op, inputs, attributes or {}, name=f"{p}_{name}", num_outputs=outputs)
        for k, out in enumerate(node.outputs):
            out.name = f"{p}_{name}" if outputs == 1 else f"{p}_{name}_{k}"
        nodes.append(node)
        return node

    if cls:
        row = add("Gather", [probs, const("cls_query", 0)], "cls_row", {"axis": 2}).outputs[0]  # [B, H, T]
        summed = add("ReduceSum", [row, const("head_axis", [1])], "score", {"keepdims": 0}).outputs[0]  # [B, T]
        scores = add("Slice", [summed, const("from", [1]), const("to", [np.iinfo(np.int64).max]),
                               const("token_axis", [1])], "score_others").outputs[0]  # [B, T - 1]
        chosen = new - 1
    else:
        scores = add("ReduceSum", [probs, const("head_query_axes", [1, 2])], "score",
                     {"keepdims": 0}).outputs[0]  # [B, T]
        chosen = new
    k = const("k", [chosen])
    best = add("TopK", [scores, k], "topk", {"axis": -1, "largest": 1, "sorted": 1}, outputs=2).outputs[1]
    # A second TopK, smallest first, sorts the chosen indices: tokens keep their positional order.
    order = add("TopK", [best, k], "sort", {"axis": -1, "largest": 0, "sorted": 1}, outputs=2).outputs[0]
    if cls:
        shifted = add("Add", [order, const("one", 1)], "shift").outputs[0]  # indices into the full T
        first = add("Slice", [shifted, const("first_from", [0]), const("first_to", [1]), const("first_axis", [1])],
                    "first").outputs[0]
        zero = add("Mul", [first, const("zero", 0)], "cls_index").outputs[0]  # [B, 1] zeros
        order = add("Concat", [zero, shifted], "kept", {"axis": 1}).outputs[0]
    indices = add("Unsqueeze", [order, const("last_axis", [-1])], "indices").outputs[0]  # [B, new, 1]
    gather = add("GatherND", [stream, indices], "gather", {"batch_dims": 1})
    kept = gather.outputs[0]
    kept.dtype = stream.dtype
    # Inserted right after the Add: the score nodes read P (earlier), the gather reads the Add's output.
    graph.insert_after(layer.mlp.add, nodes)
    if stream.is_graph_output():
        name, stream.name = stream.name, f"{stream.name}__all_tokens"
        kept.name = name
        graph.outputs[list(graph.outputs).index(stream)] = kept
    for use in list(stream.uses()):
        if use.node is not gather:
            use.node.replace_input_with(use.idx, kept)
    rewritten = _rewrite_baked_lengths(graph, kept, tokens, new, p) if new != tokens else []
    _forget_shapes(graph, kept)
    infer_shapes(model)
    return StageReport(stage.layer, stage.keep, layer.softmax.name, layer.mlp.add.name, tokens, new, rewritten)


def _downstream(value: ir.Value) -> list[ir.Node]:
    """Nodes that read ``value`` directly or through others, in no particular order."""
    seen: dict[ir.Node, None] = {}
    stack = [value]
    while stack:
        for use in stack.pop().uses():
            if use.node not in seen:
                seen[use.node] = None
                stack.extend(use.node.outputs)
    return list(seen)


def _check_unambiguous(graph: ir.Graph, layer: EncoderLayer, tokens: int, batch: int | None,
                       heads: int | None) -> None:
    """Decline when T equals another extent: a Reshape entry equal to T could then be either."""
    clashes = {"the batch size": batch, "the head count": heads}
    for use in layer.softmax.outputs[0].uses():
        out = use.node.outputs[0].shape if use.node.op_type == "MatMul" else None
        if out is not None and len(out) == 4:
            clashes["the head width"] = _static(out[3])
    for name, extent in clashes.items():
        if extent == tokens:
            raise GraphpruneError(f"the token count {tokens} equals {name}: a Reshape entry {tokens} after the cut "
                                  "could be either, so prune-tokens declines; export with another batch size.")
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        for init in node.inputs:
            if init is None or init.const_value is None or init.shape is None:
                continue
            if tokens in tuple(init.shape):
                raise GraphpruneError(f"the token count {tokens} equals an extent of the weight '{init.name}' "
                                      f"{tuple(init.shape)}: a Reshape entry {tokens} after the cut could be "
                                      "either, so prune-tokens declines.")


def _rewrite_baked_lengths(graph: ir.Graph, kept: ir.Value, tokens: int, new: int, prefix: str) -> list[str]:
    """Replace T by the new count in the constant shapes of Reshapes downstream; decline other baked T."""
    rewritten = []
    for node in sorted(_downstream(kept), key=lambda n: n.name or ""):
        for index, value in enumerate(node.inputs):
            if value is None or value.const_value is None or value.dtype is None:
                continue
            array = value.const_value.numpy()
            if value.dtype.is_floating_point():
                if tokens not in array.shape:
                    continue
                if array.size and np.all(array == array.flat[0]) and node.op_type in _BROADCASTING:
                    # A uniform table over T tokens (dynamo's all-zero attention bias [1, 1, T, T]): one
                    # value broadcast serves any token count.
                    one = np.full((1,) * array.ndim, array.flat[0], dtype=array.dtype)
                    _replace_constant(graph, node, index, one, f"{prefix}_{node.name}_uniform", value.type)
                    rewritten.append(node.name)
                    continue
                raise GraphpruneError(f"node '{node.name}' ({node.op_type}) after the cut reads the constant "
                                      f"'{value.name}' {array.shape} sized for {tokens} tokens (not one uniform "
                                      "value); prune-tokens cannot cut it to the kept tokens, so it declines.")
            if not np.issubdtype(array.dtype, np.integer) or not np.any(array == tokens):
                continue
            if node.op_type != "Reshape" or index != 1:
                raise GraphpruneError(f"node '{node.name}' ({node.op_type}) after the cut reads a constant holding "
                                      f"the token count {tokens} ({value.name}); prune-tokens rewrites that only in "
                                      "Reshape shapes, so it declines.")
            fixed = np.where(array == tokens, new, array).astype(array.dtype)
            _replace_constant(graph, node, index, fixed, f"{prefix}_{node.name}_shape", value.type)
            rewritten.append(node.name)
    return rewritten


def _replace_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str, type_) -> None:
    """A fresh initializer for this reader only: the old constant is shared with the layers before the cut."""
    name = name.replace("/", "_")
    replacement = ir.Value(name=name, shape=ir.Shape(array.shape), type=type_, const_value=ir.tensor(array, name=name))
    graph.register_initializer(replacement)
    node.replace_input_with(index, replacement)


def _forget_shapes(graph: ir.Graph, kept: ir.Value) -> None:
    """Shapes downstream of the cut are stale (T is baked in them), graph outputs' included."""
    for node in _downstream(kept):
        for value in node.outputs:
            value.shape = None
    kept.shape = None


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], cls: bool = True
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The comparable parts of two sets of outputs, keyed by what was compared.

    Same shape: compared in full, under its own name. Shapes that differ on one axis (the token axis):
    the CLS row on it (``name[token 0]``), or without CLS the mean over it (``name[mean over tokens]``).
    Outputs differing otherwise are left out.
    """
    ref, cand = {}, {}
    for name, r in reference.items():
        c = candidate.get(name)
        if c is None:
            continue
        if r.shape == c.shape:
            ref[name], cand[name] = r, c
            continue
        if r.ndim != c.ndim:
            continue
        differ = [axis for axis in range(r.ndim) if r.shape[axis] != c.shape[axis]]
        if len(differ) != 1:
            continue
        axis = differ[0]
        if cls:
            key = f"{name}[token 0]"
            ref[key], cand[key] = np.take(r, 0, axis=axis), np.take(c, 0, axis=axis)
        else:
            key = f"{name}[mean over tokens]"
            ref[key], cand[key] = r.mean(axis=axis), c.mean(axis=axis)
    return ref, cand
