"""Hypothesis strategy that builds random but valid ONNX CNN graphs.

The graphs exercise the channel-coupling patterns a structured pruner has to get right: residual Adds,
Concats of several branches, Split, grouped/depthwise convs, channel shuffles, per-channel constants,
channel Slices, long-range fan-out, flatten-into-Gemm heads and multiple graph outputs; and the forms that
exporters other than PyTorch write: ConvTranspose upsampling, explicit Pad before an unpadded Conv, Resize,
PRelu, Instance/GroupNormalization, channels-last MatMul MLPs between Transposes (TF/Keras), Conv bias as a
separate Add (tf2onnx), BatchNormalization fed by Constant nodes (paddle2onnx), SpaceToDepth/DepthToSpace
round trips and squeeze-excitation gates pooled by GlobalAveragePool or ReduceMean.

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

Models are opset 17 (IR 8). Where GroupNormalization may appear (its opset-21 form, scale and bias of length
C) the opset is drawn per model from 17 and 21 (IR 10); ops whose form changed in between (ReduceMean's axes)
are written the way the model's opset wants. ``random_cnn(kinds=...)`` sets the block kinds, e.g. to
reproduce or stress one of them, including kinds in ``DISABLED_BLOCKS`` (off by default).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.32 loads it, and it is the IR version that goes with opset 17
# GroupNormalization's scale/bias are per channel from opset 21 (per group, and deprecated, in 18).
GROUP_NORM_OPSET = 21
IR_VERSIONS = {OPSET: IR_VERSION, GROUP_NORM_OPSET: 10}
MIN_WIDTH, MAX_WIDTH = 2, 16
MAX_SIZE = 16  # spatial side a feature may grow to (ConvTranspose); Resize goes to 2x this transiently
MAX_S2D_WIDTH = 32  # channel count inside a SpaceToDepth -> Conv -> DepthToSpace round trip
MAX_PENDING_FANOUTS = 2

ALL_BLOCK_KINDS: tuple[str, ...] = (
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
    # Forms written by exporters other than PyTorch (appended: hypothesis shrinks toward the first kinds).
    "conv_transpose",
    "pad_conv",
    "resize",
    "prelu",
    "instance_norm",
    "group_norm",
    "channels_last_mlp",
    "conv_add_bias",
    "bn_constants",
    "space_to_depth",
    "se",
)
# Kinds left out of default generation while the pruner gets them wrong; `random_cnn(kinds=...)` still
# draws a disabled kind when asked by name. group_norm: preparation is not a fixed point after chained
# GroupNormalizations (ONNX shape inference gives nothing for them; each prepare() gets shapes only a
# little further), so analyses that the oracle compares see different groups.
DISABLED_BLOCKS: frozenset[str] = frozenset()
BLOCK_KINDS: tuple[str, ...] = tuple(k for k in ALL_BLOCK_KINDS if k not in DISABLED_BLOCKS)
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

    def __init__(self, seed: int, opset: int = OPSET) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
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

    def constant_node(self, name: str, array: np.ndarray) -> str:
        """A Constant node (not an initializer) holding a float32 array; returns its output."""
        tensor = numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)
        (out,) = self.node("Constant", name, [], value=tensor)
        return out


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
    stride: int = 1,
    bias: bool | None = None,
    pads: list[int] | None = None,
) -> Feat:
    """Conv with 'same' padding (halving for stride 2 on an even side); kernel size and bias are drawn.

    `pads` overrides the padding (e.g. 0 after an explicit Pad); the caller then owns the output size.
    """
    if k is None:
        k = draw(st.sampled_from([1, 3] if stride == 1 else [3, 2]))
    has_bias = draw(st.booleans()) if bias is None else bias
    name = b.fresh("conv")
    fan_in = (x.c // group) * k * k
    # 1/sqrt(fan_in) keeps activations O(1) through ~10 blocks, so outputs stay finite and comparable.
    weight = b.rng.standard_normal((out_c, x.c // group, k, k)) / np.sqrt(fan_in)
    inputs = [x.name, b.floats(f"{name}.weight", weight)]
    if has_bias:
        inputs.append(b.floats(f"{name}.bias", 0.1 * b.rng.standard_normal(out_c)))
    if pads is None:
        pads = [(k - 1) // 2 if stride == 2 else k // 2] * 4
    (out,) = b.node(
        "Conv",
        name,
        inputs,
        output=output,
        kernel_shape=[k, k],
        pads=pads,
        strides=[stride, stride],
        group=group,
    )
    h = (x.h + pads[0] + pads[2] - k) // stride + 1
    return Feat(out, out_c, h)


def batchnorm(b: GraphBuilder, x: Feat, constant_nodes: bool = False) -> Feat:
    """BatchNormalization; with `constant_nodes` its four tensors come from Constant nodes (paddle2onnx)."""
    name = b.fresh("bn")
    c = x.c
    tensors = {
        "scale": b.rng.uniform(0.5, 1.5, c) * b.rng.choice([-1.0, 1.0], c),
        "bias": 0.1 * b.rng.standard_normal(c),
        "mean": 0.1 * b.rng.standard_normal(c),
        # Strictly positive variance, bounded away from 0 so the normalisation doesn't amplify much.
        "var": b.rng.uniform(0.5, 2.0, c),
    }
    make = b.constant_node if constant_nodes else b.floats
    inputs = [x.name, *(make(f"{name}.{key}", value) for key, value in tensors.items())]
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


def upsample2(b: GraphBuilder, x: Feat, by_sizes: bool = False, mode: str = "asymmetric") -> Feat:
    """Nearest Resize by 2, given as scales [1,1,2,2] or as output sizes [1,C,2H,2W] (C is spelled out)."""
    name = b.fresh("resize")
    if by_sizes:
        sizes = b.int64s(f"{name}.sizes", [1, x.c, 2 * x.h, 2 * x.h])
        inputs = [x.name, "", "", sizes]
    else:
        inputs = [x.name, "", b.floats(f"{name}.scales", np.array([1, 1, 2, 2]))]
    attrs: dict[str, object] = {"mode": "nearest", "coordinate_transformation_mode": mode}
    if mode == "asymmetric":
        attrs["nearest_mode"] = "floor"  # what PyTorch and tf2onnx write
    (out,) = b.node("Resize", name, inputs, **attrs)
    return Feat(out, x.c, 2 * x.h)


def halve(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """Back to half the (even) side: MaxPool, AveragePool, or a stride-2 Conv (new width, post ops)."""
    how = draw(st.sampled_from(["MaxPool", "AveragePool", "conv"]))
    if how == "conv":
        return post_conv(draw, b, conv(draw, b, x, draw(widths()), stride=2))
    return pool2(b, x, how)


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


def conv_transpose_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """Stride-2 ConvTranspose (optionally grouped) doubling the side, then back down or kept if it fits.

    Three parameterisations give exactly 2H: k2 p0, k4 p1, and k3 p1 with output_padding 1.
    """
    groups = [1] + [g for g in (2, 4) if x.c % g == 0]
    group = draw(st.sampled_from(groups))
    out_c = (
        draw(widths())
        if group == 1
        else group * draw(st.integers(max(1, MIN_WIDTH // group), MAX_WIDTH // group))
    )
    k, pad, output_padding = draw(st.sampled_from([(2, 0, 0), (4, 1, 0), (3, 1, 1)]))
    name = b.fresh("convtranspose")
    # Each output pixel sums about (k/2)^2 taps per input channel of its group.
    fan_in = (x.c // group) * max(1.0, k * k / 4)
    weight = b.rng.standard_normal((x.c, out_c // group, k, k)) / np.sqrt(fan_in)
    inputs = [x.name, b.floats(f"{name}.weight", weight)]
    if draw(st.booleans()):
        inputs.append(b.floats(f"{name}.bias", 0.1 * b.rng.standard_normal(out_c)))
    attrs: dict[str, object] = {"kernel_shape": [k, k], "pads": [pad] * 4, "strides": [2, 2], "group": group}
    if output_padding:
        attrs["output_padding"] = [output_padding] * 2
    (out,) = b.node("ConvTranspose", name, inputs, **attrs)
    y = post_conv(draw, b, Feat(out, out_c, 2 * x.h))
    if y.h <= MAX_SIZE and draw(st.booleans()):
        return y  # grown; later pools (or a merge) bring it down again
    return halve(draw, b, y)


def pad_conv_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """Explicit constant Pad on H, W only, then a Conv with pads 0 (TF 'SAME' as exporters spell it).

    same3: pads 1 all round, k3. same2: pads (0, 1) begin/end, k2. down: pads (0, 1), k3 stride 2 on an
    even side, halving it (TF's asymmetric 'SAME' for strided convs).
    """
    options = ["same3", "same2"] + (["down"] if x.h >= 4 and x.h % 2 == 0 else [])
    how = draw(st.sampled_from(options))
    begin, end = (1, 1) if how == "same3" else (0, 1)
    name = b.fresh("pad")
    inputs = [x.name, b.int64s(f"{name}.pads", [0, 0, begin, begin, 0, 0, end, end])]
    value = draw(st.sampled_from([None, 0.0, 0.5]))
    if value is not None:
        inputs.append(b.floats(f"{name}.value", np.array(value)))
    (out,) = b.node("Pad", name, inputs, mode="constant")
    padded = Feat(out, x.c, x.h + begin + end)
    k, stride = {"same3": (3, 1), "same2": (2, 1), "down": (3, 2)}[how]
    return post_conv(draw, b, conv(draw, b, padded, draw(widths()), k=k, stride=stride, pads=[0, 0, 0, 0]))


def resize_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """Nearest Resize x2 (scales, or sizes naming the channel count), then a stride-2 conv or a pool."""
    by_sizes = draw(st.booleans())
    mode = draw(st.sampled_from(["asymmetric", "half_pixel"]))
    return halve(draw, b, upsample2(b, x, by_sizes=by_sizes, mode=mode))


def prelu_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """PRelu with a per-channel [C,1,1] slope (Keras/tf2onnx, Caffe, paddle write it this way)."""
    name = b.fresh("prelu")
    slope = b.rng.uniform(0.05, 0.3, (x.c, 1, 1)) * b.rng.choice([-1.0, 1.0], (x.c, 1, 1))
    (out,) = b.node("PRelu", name, [x.name, b.floats(f"{name}.slope", slope)])
    return Feat(out, x.c, x.h)


def maybe_activation(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    act = draw(st.one_of(st.none(), st.sampled_from(ACTIVATIONS)))
    return x if act is None else activation(b, x, act)


def instance_norm_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """InstanceNormalization with per-channel scale and bias, then an optional activation."""
    name = b.fresh("instnorm")
    inputs = [
        x.name,
        b.floats(f"{name}.scale", b.rng.uniform(0.5, 1.5, x.c) * b.rng.choice([-1.0, 1.0], x.c)),
        b.floats(f"{name}.bias", 0.1 * b.rng.standard_normal(x.c)),
    ]
    (out,) = b.node("InstanceNormalization", name, inputs, epsilon=1e-5)
    return maybe_activation(draw, b, Feat(out, x.c, x.h))


def group_norm_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """GroupNormalization (opset 21: scale and bias of length C) over a drawn divisor of C groups."""
    groups = draw(st.sampled_from([g for g in range(1, x.c + 1) if x.c % g == 0]))
    name = b.fresh("groupnorm")
    inputs = [
        x.name,
        b.floats(f"{name}.scale", b.rng.uniform(0.5, 1.5, x.c) * b.rng.choice([-1.0, 1.0], x.c)),
        b.floats(f"{name}.bias", 0.1 * b.rng.standard_normal(x.c)),
    ]
    (out,) = b.node("GroupNormalization", name, inputs, num_groups=groups, epsilon=1e-5)
    return maybe_activation(draw, b, Feat(out, x.c, x.h))


def channels_last_mlp_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """TF/Keras dense layers on NHWC: Transpose -> MatMul [C,C'] -> Add [C'] -> act -> MatMul [C',C''] ->
    Add [C''] -> Transpose back; optionally a residual Add in NCHW (after) or NHWC (before the Transpose).
    """
    residual = draw(st.sampled_from([None, "nchw", "nhwc"]))
    hidden = draw(widths())
    out_c = x.c if residual else draw(widths())
    name = b.fresh("mlp")
    (t,) = b.node("Transpose", f"{name}.to_nhwc", [x.name], perm=[0, 2, 3, 1])
    y = t
    for i, (n_in, n_out) in enumerate([(x.c, hidden), (hidden, out_c)]):
        weight = b.rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)
        (y,) = b.node("MatMul", f"{name}.matmul{i}", [y, b.floats(f"{name}.weight{i}", weight)])
        (y,) = b.node(
            "Add", f"{name}.add{i}", [y, b.floats(f"{name}.bias{i}", 0.1 * b.rng.standard_normal(n_out))]
        )
        if i == 0:
            y = activation(b, Feat(y, hidden, x.h), draw(st.sampled_from(ACTIVATIONS))).name
    if residual == "nhwc":
        (y,) = b.node("Add", f"{name}.residual", [y, t])
    (out,) = b.node("Transpose", f"{name}.to_nchw", [y], perm=[0, 3, 1, 2])
    if residual == "nchw":
        (out,) = b.node("Add", f"{name}.residual", [out, x.name])
    return Feat(out, out_c, x.h)


def conv_add_bias_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """Conv without bias, its bias a separate Add of a [1,C,1,1] constant (tf2onnx), then post ops."""
    y = conv(draw, b, x, draw(widths()), bias=False)
    name = b.fresh("biasadd")
    bias = 0.1 * b.rng.standard_normal((1, y.c, 1, 1))
    (out,) = b.node("Add", name, [y.name, b.floats(f"{name}.bias", bias)])
    return post_conv(draw, b, Feat(out, y.c, y.h))


def bn_constants_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """Conv then BatchNormalization whose tensors are Constant nodes (paddle2onnx), optional activation."""
    y = batchnorm(b, conv(draw, b, x, draw(widths())), constant_nodes=True)
    return maybe_activation(draw, b, y)


def space_to_depth_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """SpaceToDepth(2) -> Conv to 4*C' channels (post ops) -> DepthToSpace(2, DCR or CRD): C' at H x W."""
    name = b.fresh("s2d")
    (s,) = b.node("SpaceToDepth", name, [x.name], blocksize=2)
    inner = Feat(s, 4 * x.c, x.h // 2)
    c_out = draw(st.integers(1, MAX_S2D_WIDTH // 4))
    y = post_conv(draw, b, conv(draw, b, inner, 4 * c_out))
    mode = draw(st.sampled_from(["DCR", "CRD"]))
    (out,) = b.node("DepthToSpace", b.fresh("d2s"), [y.name], blocksize=2, mode=mode)
    return Feat(out, c_out, x.h)


def global_mean(draw: Draw, b: GraphBuilder, x: Feat, prefix: str) -> str:
    """[1,C,1,1] spatial mean: GlobalAveragePool, or ReduceMean keepdims=1 (axes as the opset wants)."""
    if draw(st.booleans()):
        (out,) = b.node("GlobalAveragePool", f"{prefix}.gap", [x.name])
        return out
    if b.opset >= 18:
        (out,) = b.node(
            "ReduceMean", f"{prefix}.mean", [x.name, b.int64s(f"{prefix}.axes", [2, 3])], keepdims=1
        )
    else:
        (out,) = b.node("ReduceMean", f"{prefix}.mean", [x.name], axes=[2, 3], keepdims=1)
    return out


def se_block(draw: Draw, b: GraphBuilder, x: Feat) -> Feat:
    """Squeeze-excitation: x * gate(conv1x1(relu(conv1x1(mean(x))))), gate Sigmoid or HardSigmoid."""
    name = b.fresh("se")
    pooled = Feat(global_mean(draw, b, x, name), x.c, 1)
    squeezed = activation(b, conv(draw, b, pooled, draw(widths(high=max(MIN_WIDTH, x.c))), k=1), "Relu")
    excited = conv(draw, b, squeezed, x.c, k=1)
    gate_op = draw(st.sampled_from(["Sigmoid", "HardSigmoid"]))
    (gate,) = b.node(gate_op, f"{name}.gate", [excited.name])
    (out,) = b.node("Mul", f"{name}.mul", [x.name, gate])
    return Feat(out, x.c, x.h)


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
    "conv_transpose": conv_transpose_block,
    "pad_conv": pad_conv_block,
    "resize": resize_block,
    "prelu": prelu_block,
    "instance_norm": instance_norm_block,
    "group_norm": group_norm_block,
    "channels_last_mlp": channels_last_mlp_block,
    "conv_add_bias": conv_add_bias_block,
    "bn_constants": bn_constants_block,
    "space_to_depth": space_to_depth_block,
    "se": se_block,
}


def applicable_blocks(
    x: Feat, n_pending: int, opset: int = OPSET, kinds: Collection[str] | None = None
) -> list[str]:
    """Block kinds valid for the current feature; order matters: hypothesis shrinks toward the first.

    `kinds` (default: the enabled BLOCK_KINDS) may name disabled kinds too; where none fits, "conv" does.
    """
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
        "conv_transpose": True,
        "pad_conv": True,
        "resize": x.h <= MAX_SIZE,
        "prelu": True,
        "instance_norm": True,
        "group_norm": opset >= GROUP_NORM_OPSET,
        "channels_last_mlp": True,
        "conv_add_bias": True,
        "bn_constants": True,
        "space_to_depth": x.h % 2 == 0 and 4 * x.c <= MAX_S2D_WIDTH,
        "se": True,
    }
    allowed = BLOCK_KINDS if kinds is None else [k for k in ALL_BLOCK_KINDS if k in kinds]
    return [kind for kind in allowed if ok[kind]] or ["conv"]


def merge_fanout(draw: Draw, b: GraphBuilder, x: Feat, stash: Feat) -> Feat:
    """Second consumer of a fanned-out tensor: combine it with the current feature.

    Pools the stashed tensor down to the current spatial size (every pool halves an even size, so this
    reproduces the main path's sizes), or Resizes it up where the main path grew, then Add (same width), Concat (fits in MAX_WIDTH), or a 1x1
    projection to x.c followed by Add.
    """
    while stash.h > x.h:
        stash = pool2(b, stash, "MaxPool")
    while stash.h < x.h:
        stash = upsample2(b, stash)
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
def random_cnn(
    draw: Draw, min_blocks: int = 3, max_blocks: int = 10, kinds: Collection[str] | None = None
) -> onnx.ModelProto:
    """A random valid CNN: input "input" [1, C0, H, H], output "output", sometimes also "aux_output".

    `kinds` sets the block kinds drawn (default: the enabled BLOCK_KINDS; a disabled kind when named; plain
    "conv" where none of them fits). Opset 21 is drawn only where GroupNormalization may appear.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    opsets = (
        (OPSET, GROUP_NORM_OPSET) if "group_norm" in (BLOCK_KINDS if kinds is None else kinds) else (OPSET,)
    )
    opset = draw(st.sampled_from(opsets))
    b = GraphBuilder(seed, opset)
    c0 = draw(st.integers(1, 4))
    size = draw(st.sampled_from([4, 6, 8]))
    x = Feat("input", c0, size)

    n_blocks = draw(st.integers(min_blocks, max_blocks))
    drawn: list[str] = []
    features: list[Feat] = []  # block outputs, candidates for the auxiliary output
    pending: list[Feat] = []  # fanned-out tensors still waiting for their second consumer
    for _ in range(n_blocks):
        kind = draw(st.sampled_from(applicable_blocks(x, len(pending), opset, kinds)))
        drawn.append(kind)
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
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_VERSIONS[opset],
        producer_name="graphgen",
    )
    helper.set_model_props(model, {META_BLOCKS: ",".join(drawn), META_HEAD: head_kind})
    return model


def block_kinds(model: onnx.ModelProto) -> list[str]:
    """Block kinds recorded by random_cnn, in graph order."""
    props = {p.key: p.value for p in model.metadata_props}
    return [k for k in props.get(META_BLOCKS, "").split(",") if k]


def head_kind(model: onnx.ModelProto) -> str:
    return {p.key: p.value for p in model.metadata_props}.get(META_HEAD, "")
