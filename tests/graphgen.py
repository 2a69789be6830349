"""Hypothesis strategy that builds random but valid ONNX CNN graphs.

The graphs exercise the channel-coupling patterns a structured pruner has to get right: residual Adds,
Concats of several branches, Split, grouped/depthwise convs, channel shuffles, per-channel constants,
channel Slices, long-range fan-out, flatten-into-Gemm heads and multiple graph outputs.

Usage::

    from graphgen import random_cnn, block_kinds

    @given(random_cnn())
    def test_something(model: onnx.ModelProto) -> None: ...

The graph is self-describing (read ``model.graph`` to find Conv/Gemm nodes; every node and initializer has
a unique readable name such as ``conv3``, ``conv3.weight``, ``bn2.var``). In addition the model carries
two metadata props for test statistics: ``graphgen.blocks`` (comma-separated block kinds, in order) and
``graphgen.head``; ``block_kinds(model)`` decodes the former.

All structure choices are drawn from hypothesis so shrinking simplifies the graph; tensor values come from
``np.random.default_rng(seed)`` with a drawn ``seed``, which keeps shrinking cheap (one integer) while
staying reproducible.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.32 loads it, and it is the IR version that goes with opset 17
MIN_WIDTH, MAX_WIDTH = 2, 16
MAX_PENDING_FANOUTS = 2

BLOCK_KINDS: tuple[str, ...] = (
    "conv",
    "grouped_conv",
    "depthwise_conv",
    "residual",
    "branch_concat",
    "split",
    "shuffle",
    "affine",
    "pool",
    "slice",
    "fanout",
)
HEAD_KINDS: tuple[str, ...] = ("gap_gemm", "flatten_gemm", "conv")
ACTIVATIONS: tuple[str, ...] = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSwish", "SiLU")

META_BLOCKS = "graphgen.blocks"
META_HEAD = "graphgen.head"

Draw = st.DrawFn


@dataclass(frozen=True)
class Feat:
    """A feature map of shape [1, c, h, h] in the graph under construction."""

    name: str
    c: int
    h: int


class GraphBuilder:
    """Accumulates nodes and initializers, hands out unique names, owns the value RNG."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counters: Counter[str] = Counter()

    def fresh(self, prefix: str) -> str:
        """Next unique name for `prefix`: conv0, conv1, ..."""
        index = self._counters[prefix]
        self._counters[prefix] += 1
        return f"{prefix}{index}"

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def int64s(self, name: str, values: list[int]) -> str:
        return self.const(name, np.asarray(values, dtype=np.int64))

    def floats(self, name: str, array: np.ndarray) -> str:
        return self.const(name, np.asarray(array, dtype=np.float32))

    def node(
        self,
        op: str,
        name: str,
        inputs: list[str],
        n_outputs: int = 1,
        output: str | None = None,
        **attrs: object,
    ) -> list[str]:
        """Add a node; outputs are named after the node (or `output` for a graph output)."""
        if output is not None:
            outputs = [output]
        elif n_outputs == 1:
            outputs = [f"{name}.out"]
        else:
            outputs = [f"{name}.out{i}" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs


def widths(low: int = MIN_WIDTH, high: int = MAX_WIDTH) -> st.SearchStrategy[int]:
    return st.integers(low, high)


# ---------------------------------------------------------------------------------------------------------
# Single-op helpers
# ---------------------------------------------------------------------------------------------------------


def conv(
    draw: Draw,
    b: GraphBuilder,
    x: Feat,
    out_c: int,
    k: int | None = None,
    group: int = 1,
    output: str | None = None,
) -> Feat:
    """Conv with 'same' padding; kernel size (if not given) and bias presence are drawn."""
    if k is None:
        k = draw(st.sampled_from([1, 3]))
    has_bias = draw(st.booleans())
    name = b.fresh("conv")
    fan_in = (x.c // group) * k * k
    # 1/sqrt(fan_in) keeps activations O(1) through ~10 blocks, so outputs stay finite and comparable.
    weight = b.rng.standard_normal((out_c, x.c // group, k, k)) / np.sqrt(fan_in)
    inputs = [x.name, b.floats(f"{name}.weight", weight)]
    if has_bias:
        inputs.append(b.floats(f"{name}.bias", 0.1 * b.rng.standard_normal(out_c)))
    pad = k // 2
    (out,) = b.node(
        "Conv", name, inputs, output=output, kernel_shape=[k, k], pads=[pad] * 4, strides=[1, 1], group=group
    )
    return Feat(out, out_c, x.h)


def batchnorm(b: GraphBuilder, x: Feat) -> Feat:
    name = b.fresh("bn")
    c = x.c
    inputs = [
        x.name,
        b.floats(f"{name}.scale", b.rng.uniform(0.5, 1.5, c) * b.rng.choice([-1.0, 1.0], c)),
        b.floats(f"{name}.bias", 0.1 * b.rng.standard_normal(c)),
        b.floats(f"{name}.mean", 0.1 * b.rng.standard_normal(c)),
        # Strictly positive variance, bounded away from 0 so the normalisation doesn't amplify much.
        b.floats(f"{name}.var", b.rng.uniform(0.5, 2.0, c)),
    ]
    (out,) = b.node("BatchNormalization", name, inputs, epsilon=1e-5)
    return Feat(out, c, x.h)


def activation(b: GraphBuilder, x: Feat, kind: str) -> Feat:
    if kind == "SiLU":
        # No SiLU op in opset 17: the exporter pattern x * Sigmoid(x) (x has two consumers).
        name = b.fresh("silu")
        (sig,) = b.node("Sigmoid", f"{name}.sigmoid", [x.name])
        (out,) = b.node("Mul", f"{name}.mul", [x.name, sig])
        return Feat(out, x.c, x.h)
    name = b.fresh(kind.lower())
    attrs = {"alpha": 0.1} if kind == "LeakyRelu" else {}
    (out,) = b.node(kind, name, [x.name], **attrs)
    return Feat(out, x.c, x.h)


def post_conv(draw: Draw, b: GraphBuilder, x: Feat, allow_act: bool = True) -> Feat:
    """Optional BatchNormalization, then optional activation."""
    if draw(st.booleans()):
        x = batchnorm(b, x)
    if allow_act:
        act = draw(st.one_of(st.none(), st.sampled_from(ACTIVATIONS)))
        if act is not None:
            x = activation(b, x, act)
    return x


def add(b: GraphBuilder, prefix: str, xs: list[Feat]) -> Feat:
    """Chain of binary Adds over same-shaped features."""
    out = xs[0]
    for i, other in enumerate(xs[1:]):
        (name,) = b.node("Add", f"{prefix}.add{i}", [out.name, other.name])
        out = Feat(name, out.c, out.h)
    return out


def concat(b: GraphBuilder, prefix: str, xs: list[Feat]) -> Feat:
    (name,) = b.node("Concat", f"{prefix}.concat", [x.name for x in xs], axis=1)
    return Feat(name, sum(x.c for x in xs), xs[0].h)


def pool2(b: GraphBuilder, x: Feat, op: str) -> Feat:
    name = b.fresh("maxpool" if op == "MaxPool" else "avgpool")
    (out,) = b.node(op, name, [x.name], kernel_shape=[2, 2], strides=[2, 2])
    return Feat(out, x.c, x.h // 2)


# ---------------------------------------------------------------------------------------------------------
# Blocks: each takes the current feature and returns the new current feature
# ---------------------------------------------------------------------------------------------------------


def conv_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    return post_conv(draw, b, conv(draw, b, x, draw(widths())))


def grouped_conv_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    group = draw(st.sampled_from([g for g in (2, 4) if x.c % g == 0]))
    out_c = group * draw(st.integers(1, MAX_WIDTH // group))  # >= 2 since group >= 2
    return post_conv(draw, b, conv(draw, b, x, out_c, group=group))


def depthwise_conv_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    multiplier = draw(st.sampled_from([m for m in (1, 2) if x.c * m <= MAX_WIDTH]))
    return post_conv(draw, b, conv(draw, b, x, x.c * multiplier, group=x.c))


def residual_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """x -> conv chain (last conv back to x.c channels, no activation) -> Add(x) -> optional act."""
    n_convs = draw(st.integers(1, 2))
    y = x
    for i in range(n_convs):
        last = i == n_convs - 1
        y = conv(draw, b, y, x.c if last else draw(widths()))
        y = post_conv(draw, b, y, allow_act=not last)
    out = add(b, b.fresh("res"), [y, x])
    act = draw(st.one_of(st.none(), st.sampled_from(ACTIVATIONS)))
    return out if act is None else activation(b, out, act)


def branch_concat_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """2-3 conv branches of distinct widths from the same input, concatenated on channels."""
    n = draw(st.integers(2, 3))
    # A prefix of a permutation gives distinct widths without rejection sampling (unique lists reject).
    branch_widths = draw(st.permutations(range(MIN_WIDTH, MAX_WIDTH // n + 1)))[:n]
    branches = [post_conv(draw, b, conv(draw, b, x, w)) for w in branch_widths]
    return concat(b, b.fresh("branch"), branches)


def split_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """Split channels into 2-3 parts, a conv per part, then Concat (any widths) or Add (equal widths)."""
    n = draw(st.integers(2, min(3, x.c)))
    cuts = sorted(draw(st.permutations(range(1, x.c)))[: n - 1])
    sizes = [hi - lo for lo, hi in zip([0, *cuts], [*cuts, x.c], strict=True)]
    name = b.fresh("split")
    # Opset 13+ form: split sizes come as a constant int64 input, not an attribute.
    parts = b.node("Split", name, [x.name, b.int64s(f"{name}.split", sizes)], n_outputs=n, axis=1)
    feats = [Feat(p, s, x.h) for p, s in zip(parts, sizes, strict=True)]
    if draw(st.booleans()):
        width = draw(widths())
        return add(b, name, [post_conv(draw, b, conv(draw, b, f, width)) for f in feats])
    outs = [post_conv(draw, b, conv(draw, b, f, draw(widths(high=MAX_WIDTH // n)))) for f in feats]
    return concat(b, name, outs)


def shuffle_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """ShuffleNet channel shuffle: Reshape [1,g,C/g,H,W] -> Transpose [0,2,1,3,4] -> Reshape back."""
    g = draw(st.sampled_from([g for g in (2, 4) if x.c % g == 0 and x.c > g]))
    name = b.fresh("shuffle")
    shape5 = b.int64s(f"{name}.shape5d", [1, g, x.c // g, x.h, x.h])
    shape4 = b.int64s(f"{name}.shape4d", [1, x.c, x.h, x.h])
    (r1,) = b.node("Reshape", f"{name}.reshape0", [x.name, shape5])
    (t,) = b.node("Transpose", f"{name}.transpose", [r1], perm=[0, 2, 1, 3, 4])
    (r2,) = b.node("Reshape", f"{name}.reshape1", [t, shape4])
    return Feat(r2, x.c, x.h)


def affine_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """Per-channel Mul by a [C,1,1] constant then Add of a [1,C,1,1] constant (two broadcast layouts)."""
    name = b.fresh("affine")
    scale = b.rng.uniform(0.5, 1.5, (x.c, 1, 1)) * b.rng.choice([-1.0, 1.0], (x.c, 1, 1))
    (m,) = b.node("Mul", f"{name}.mul", [x.name, b.floats(f"{name}.scale", scale)])
    shift = 0.1 * b.rng.standard_normal((1, x.c, 1, 1))
    (a,) = b.node("Add", f"{name}.add", [m, b.floats(f"{name}.shift", shift)])
    return Feat(a, x.c, x.h)


def pool_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    return pool2(b, x, draw(st.sampled_from(["MaxPool", "AveragePool"])))


def slice_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """Keep a contiguous channel sub-range [start, start+length) with 2 <= length < C."""
    length = draw(st.integers(MIN_WIDTH, x.c - 1))
    start = draw(st.integers(0, x.c - length))
    name = b.fresh("slice")
    inputs = [
        x.name,
        b.int64s(f"{name}.starts", [start]),
        b.int64s(f"{name}.ends", [start + length]),
        b.int64s(f"{name}.axes", [1]),
    ]
    (out,) = b.node("Slice", name, inputs)
    return Feat(out, length, x.h)


BlockFn = Callable[[Draw, GraphBuilder, Feat], Feat]

BLOCKS: dict[str, BlockFn] = {
    "conv": conv_block,
    "grouped_conv": grouped_conv_block,
    "depthwise_conv": depthwise_conv_block,
    "residual": residual_block,
    "branch_concat": branch_concat_block,
    "split": split_block,
    "shuffle": shuffle_block,
    "affine": affine_block,
    "pool": pool_block,
    "slice": slice_block,
}


def applicable_blocks(x: Feat, n_pending: int) -> list[str]:
    """Block kinds valid for the current feature; order matters: hypothesis shrinks toward the first."""
    ok = {
        "conv": True,
        "grouped_conv": x.c % 2 == 0,
        "depthwise_conv": x.c >= 2,
        "residual": True,
        "branch_concat": True,
        "split": x.c >= 2,
        "shuffle": any(x.c % g == 0 and x.c > g for g in (2, 4)),
        "affine": True,
        "pool": x.h >= 4 and x.h % 2 == 0,
        "slice": x.c >= MIN_WIDTH + 1,
        "fanout": n_pending < MAX_PENDING_FANOUTS,
    }
    return [kind for kind in BLOCK_KINDS if ok[kind]]


def merge_fanout(draw: Draw, b: GraphBuilder, x: Feat, stash: Feat) -> Feat:
    """Second consumer of a fanned-out tensor: combine it with the current feature.

    Pools the stashed tensor down to the current spatial size (every pool halves an even size, so this
    reproduces the main path's sizes), then Add (same width), Concat (fits in MAX_WIDTH), or a 1x1
    projection to x.c followed by Add.
    """
    while stash.h > x.h:
        stash = pool2(b, stash, "MaxPool")
    options = ["project_add"]
    if stash.c == x.c:
        options.insert(0, "add")
    if stash.c + x.c <= MAX_WIDTH:
        options.insert(0, "concat")
    how = draw(st.sampled_from(options))
    name = b.fresh("merge")
    if how == "concat":
        return concat(b, name, [x, stash])
    if how == "project_add":
        stash = conv(draw, b, stash, x.c, k=1)
    return add(b, name, [x, stash])


# ---------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------


def gemm(b: GraphBuilder, x_name: str, in_features: int, out_features: int, output: str) -> None:
    name = b.fresh("gemm")
    weight = b.rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)
    inputs = [
        x_name,
        b.floats(f"{name}.weight", weight),
        b.floats(f"{name}.bias", 0.1 * b.rng.standard_normal(out_features)),
    ]
    b.node("Gemm", name, inputs, output=output, transB=1)


def head(draw: Draw, b: GraphBuilder, x: Feat, kind: str, output: str) -> list[int]:
    """Build the head producing graph output `output`; returns its shape."""
    k = draw(st.integers(2, 10))
    if kind == "gap_gemm":
        name = b.fresh("gap")
        (pooled,) = b.node("GlobalAveragePool", name, [x.name])
        (flat,) = b.node("Flatten", f"{name}.flatten", [pooled], axis=1)
        gemm(b, flat, x.c, k, output)
        return [1, k]
    if kind == "flatten_gemm":
        # Channel c owns a contiguous block of h*h Gemm input columns: a pruner must map them.
        (flat,) = b.node("Flatten", b.fresh("flatten"), [x.name], axis=1)
        gemm(b, flat, x.c * x.h * x.h, k, output)
        return [1, k]
    conv(draw, b, x, k, output=output)
    return [1, k, x.h, x.h]


# ---------------------------------------------------------------------------------------------------------
# The strategy
# ---------------------------------------------------------------------------------------------------------


@st.composite
def random_cnn(draw: Draw, min_blocks: int = 3, max_blocks: int = 10) -> onnx.ModelProto:
    """A random valid CNN: input "input" [1, C0, H, H], output "output", sometimes also "aux_output"."""
    b = GraphBuilder(draw(st.integers(0, 2**32 - 1)))
    c0 = draw(st.integers(1, 4))
    size = draw(st.sampled_from([4, 6, 8]))
    x = Feat("input", c0, size)

    n_blocks = draw(st.integers(min_blocks, max_blocks))
    kinds: list[str] = []
    features: list[Feat] = []  # block outputs, candidates for the auxiliary output
    pending: list[Feat] = []  # fanned-out tensors still waiting for their second consumer
    for _ in range(n_blocks):
        kind = draw(st.sampled_from(applicable_blocks(x, len(pending))))
        kinds.append(kind)
        if kind == "fanout":
            # x feeds the next block now and a merge some blocks later.
            pending.append(x)
            continue
        x = BLOCKS[kind](draw, b, x)
        features.append(x)
        if pending and draw(st.booleans()):
            x = merge_fanout(draw, b, x, pending.pop(0))
    while pending:
        x = merge_fanout(draw, b, x, pending.pop(0))
    features.append(x)

    head_kind = draw(st.sampled_from(HEAD_KINDS))
    output_shape = head(draw, b, x, head_kind, "output")
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, output_shape)]
    if draw(st.booleans()):
        # Second graph output from some intermediate feature: its channels feed two consumers, one of
        # which is a graph output.
        src = draw(st.sampled_from(features))
        aux_c = draw(widths())
        conv(draw, b, src, aux_c, k=1, output="aux_output")
        aux_shape = [1, aux_c, src.h, src.h]
        outputs.append(helper.make_tensor_value_info("aux_output", TensorProto.FLOAT, aux_shape))

    graph = helper.make_graph(
        b.nodes,
        "graphgen",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c0, size, size])],
        outputs,
        initializer=b.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name="graphgen"
    )
    helper.set_model_props(model, {META_BLOCKS: ",".join(kinds), META_HEAD: head_kind})
    return model


def block_kinds(model: onnx.ModelProto) -> list[str]:
    """Block kinds recorded by random_cnn, in graph order."""
    props = {p.key: p.value for p in model.metadata_props}
    return [k for k in props.get(META_BLOCKS, "").split(",") if k]


def head_kind(model: onnx.ModelProto) -> str:
    return {p.key: p.value for p in model.metadata_props}.get(META_HEAD, "")
