"""Fused attention and ONNX Runtime's other fusions (rules/attention.py), checked against ONNX Runtime.

Every model is input -> projection(s) -> the op under test -> output projection -> output, so that the
heads (and neurons) the op defines are prunable groups: the oracle holds, the head groups have the kind
and size the op's attributes say, and the pruned model's head-count attributes follow.

ONNX shape inference knows no com.microsoft op: like an exporter writing value_info, the models carry
the shape of every value, as ONNX Runtime computes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracle import check_model, load, prune, run

from graphprune.analysis import build_dim_graph
from graphprune.analysis.groups import find_groups
from graphprune.api import analyze
from graphprune.plan import PlanConfig
from graphprune.verify import check_model as check_model_as_verified

MS = "com.microsoft"
B, S, IN, HEADS, D = 1, 5, 8, 4, 4  # batch, sequence, input width, heads, head size
HIDDEN = HEADS * D


class Builder:
    """Nodes, seeded random initializers and graph inputs (with their feeds) of one test model."""

    def __init__(self, opset: int = 17, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}

    def input(self, name: str, array: np.ndarray) -> str:
        dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(array.shape)))
        self.feeds[name] = array
        return name

    def x(self, shape=(B, S, IN)) -> str:
        return self.input("x", self.rng.standard_normal(shape).astype(np.float32))

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def rand(self, name: str, shape, scale: float = 1.0) -> str:
        return self.const(name, (scale * self.rng.standard_normal(shape)).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "",
           **attrs) -> str | list[str]:
        outs = [f"{name}.out"] if outputs == 1 else [f"{name}.out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if outputs == 1 else outs

    def linear(self, x: str, k: int, n: int, name: str, bias: bool = True) -> str:
        """MatMul by a constant [k, n] (weight "{name}.w"), plus a constant bias "{name}.b"."""
        h = self.op("MatMul", [x, self.rand(f"{name}.w", (k, n), 1 / np.sqrt(k))], name)
        return self.op("Add", [h, self.rand(f"{name}.b", n, 0.1)], f"{name}.add") if bias else h

    def model(self, outputs: list[str], shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
        """Outputs named as given; every value's shape written down, as ONNX Runtime computes it (or as
        given in ``shapes``, for models it cannot run)."""
        graph = helper.make_graph(self.nodes, "attention", self.inputs, [], self.inits)
        opsets = [helper.make_opsetid("", self.opset), helper.make_opsetid(MS, 1)]
        proto = helper.make_model(graph, opset_imports=opsets, ir_version=10)
        if shapes is None:
            shapes = value_shapes(proto, self.feeds)
        info = {name: helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in shapes.items()}
        for node in proto.graph.node:
            for name in node.output:
                if name and name in info and name not in outputs:
                    proto.graph.value_info.append(info[name])
        proto.graph.output.extend(info[name] for name in outputs)
        check_model_as_verified(proto)
        return proto


def value_shapes(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """The shape of every float value a run of the model computes."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    names = [name for node in probe.graph.node for name in node.output if name]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    results = run(probe, feeds)
    return {name: list(array.shape) for name, array in zip(names, results) if array.dtype == np.float32}


@dataclass
class Case:
    proto: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    # (kind, size) of every prunable group, sorted
    prunable: list[tuple[str, int]]
    # node name -> attributes the model pruned at ratio 0.5 (random, heads and channels) must have
    attrs: dict[str, dict[str, object]] = field(default_factory=dict)
    kinds: tuple[tuple[str, ...], ...] = ()  # further unit kinds to run the oracle on
    blocked: dict[str, str] = field(default_factory=dict)  # weight axis -> text of a reason


CASES: dict[str, Callable[[], Case]] = {}


def case(fn: Callable[[], Case]) -> Callable[[], Case]:
    CASES[fn.__name__] = fn
    return fn


def qkv(b: Builder, x: str, q: int, k: int, v: int, bias: bool = True) -> tuple[str, str, str]:
    return b.linear(x, IN, q, "q", bias), b.linear(x, IN, k, "k", bias), b.linear(x, IN, v, "v", bias)


# ---- com.microsoft Attention ------------------------------------------------------------------------
@case
def ms_attention() -> Case:
    """x -> p (12 neurons) -> Attention (fused QKV weight, mask) -> c; the value width is "head-dim"."""
    b = Builder()
    h = b.op("Relu", [b.linear(b.x(), IN, 12, "p")], "relu")
    mask = b.input("mask", np.array([[1, 1, 1, 1, 0]], dtype=np.int32))
    w, bias = b.rand("attn.w", (12, 3 * HIDDEN), 0.3), b.rand("attn.b", 3 * HIDDEN, 0.1)
    h = b.op("Attention", [h, w, bias, mask], "attn", domain=MS, num_heads=HEADS)
    y = b.linear(h, HIDDEN, 6, "c")
    return Case(b.model([y]), b.feeds, [("channel", 12), ("head", HEADS), ("head-dim", D)],
                attrs={"attn": {"num_heads": 2}}, kinds=(("head-dim",),),
                blocked={"attn.w[1]": "contracted by Attention 'attn'"})


@case
def ms_attention_qkv_hidden_sizes() -> Case:
    """Values 3 wide per head against queries 4 wide; causal; pruning heads rewrites qkv_hidden_sizes."""
    b = Builder()
    w, bias = b.rand("attn.w", (IN, 2 * HIDDEN + HEADS * 3), 0.3), b.rand("attn.b", 2 * HIDDEN + HEADS * 3, 0.1)
    h = b.op("Attention", [b.x(), w, bias], "attn", domain=MS, num_heads=HEADS, unidirectional=1,
             qkv_hidden_sizes=[HIDDEN, HIDDEN, HEADS * 3])
    y = b.linear(h, HEADS * 3, 6, "c")
    return Case(b.model([y]), b.feeds, [("head", HEADS), ("head-dim", 3)],
                attrs={"attn": {"num_heads": 2, "qkv_hidden_sizes": [8, 8, 6]}}, kinds=(("head-dim",),))


@case
def ms_attention_past_present() -> Case:
    """GPT-2 style with a key/value state: the state's head axis shrinks with the heads."""
    b = Builder()
    past = b.input("past", b.rng.standard_normal((2, B, HEADS, 3, D)).astype(np.float32))
    w, bias = b.rand("attn.w", (IN, 3 * HIDDEN), 0.3), b.rand("attn.b", 3 * HIDDEN, 0.1)
    h, present = b.op("Attention", [b.x(), w, bias, "", past], "attn", outputs=2, domain=MS,
                      num_heads=HEADS, unidirectional=1)
    y = b.linear(h, HIDDEN, 6, "c")
    b.nodes.append(helper.make_node("Identity", [present], ["present"], name="present_out"))
    return Case(b.model([y, "present"]), b.feeds, [("head", HEADS)], attrs={"attn": {"num_heads": 2}})


# ---- com.microsoft MultiHeadAttention ---------------------------------------------------------------
@case
def ms_mha_projections() -> Case:
    """Q/K/V as MatMul + Add (as ORT's optimizer leaves them), a key padding mask, an output projection."""
    b = Builder()
    q, k, v = qkv(b, b.x(), HIDDEN, HIDDEN, HEADS * 3)
    mask = b.input("mask", np.array([[1, 1, 1, 0, 1]], dtype=np.int32))
    h = b.op("MultiHeadAttention", [q, k, v, "", mask], "mha", domain=MS, num_heads=HEADS)
    y = b.linear(h, HEADS * 3, 6, "c")
    return Case(b.model([y]), b.feeds, [("head", HEADS), ("head-dim", 3)],
                attrs={"mha": {"num_heads": 2}}, kinds=(("head-dim",),),
                blocked={"q.w[1]": "contracted by MultiHeadAttention 'mha'"})


@case
def ms_mha_bias_and_attention_bias() -> Case:
    """Projection biases as the op's bias input, and a per-head constant attention bias."""
    b = Builder()
    q, k, v = qkv(b, b.x(), HIDDEN, HIDDEN, HIDDEN, bias=False)
    bias = b.rand("mha.b", 3 * HIDDEN, 0.1)
    alibi = b.rand("alibi", (1, HEADS, S, S), 0.5)
    h = b.op("MultiHeadAttention", [q, k, v, bias, "", alibi], "mha", domain=MS, num_heads=HEADS)
    y = b.linear(h, HIDDEN, 6, "c")
    return Case(b.model([y]), b.feeds, [("head", HEADS), ("head-dim", D)], attrs={"mha": {"num_heads": 2}})


@case
def ms_mha_past_present() -> Case:
    """Decoder step: past key/value [B, H, P, D] as graph inputs, present as outputs, causal."""
    b = Builder()
    q, k, v = qkv(b, b.x(), HIDDEN, HIDDEN, HIDDEN)
    past = [b.input(f"past_{n}", b.rng.standard_normal((B, HEADS, 3, D)).astype(np.float32)) for n in "kv"]
    h, pk, pv = b.op("MultiHeadAttention", [q, k, v, "", "", "", *past], "mha", outputs=3, domain=MS,
                     num_heads=HEADS, unidirectional=1)
    y = b.linear(h, HIDDEN, 6, "c")
    b.nodes.append(helper.make_node("Identity", [pk], ["present_key"], name="pk"))
    b.nodes.append(helper.make_node("Identity", [pv], ["present_value"], name="pv"))
    return Case(b.model([y, "present_key", "present_value"]), b.feeds, [("head", HEADS)],
                attrs={"mha": {"num_heads": 2}})


@case
def ms_mha_rotary() -> Case:
    """Rotary embeddings (com.microsoft, [B, S, hidden]) on Q and K before attention."""
    b = Builder()
    q, k, v = qkv(b, b.x(), HIDDEN, HIDDEN, HIDDEN)
    positions = b.const("pos", np.arange(S, dtype=np.int64)[None])
    angles = np.arange(8)[:, None] / 10000 ** (np.arange(D // 2) / (D // 2))
    cos, sin = b.const("cos", np.cos(angles).astype(np.float32)), b.const("sin", np.sin(angles).astype(np.float32))
    q = b.op("RotaryEmbedding", [q, positions, cos, sin], "rot_q", domain=MS)
    k = b.op("RotaryEmbedding", [k, positions, cos, sin], "rot_k", domain=MS, num_heads=HEADS)
    h = b.op("MultiHeadAttention", [q, k, v], "mha", domain=MS, num_heads=HEADS)
    y = b.linear(h, HIDDEN, 6, "c")
    return Case(b.model([y]), b.feeds, [("head", HEADS), ("head-dim", D)],
                attrs={"mha": {"num_heads": 2}, "rot_k": {"num_heads": 2}},
                blocked={"q.w[1]": "rotated within each head"})


# ---- com.microsoft GroupQueryAttention --------------------------------------------------------------
GD = 16  # ONNX Runtime's CPU GroupQueryAttention takes head sizes that are multiples of 8 (16 with rotary)


def gqa_lengths(b: Builder, total: int) -> list[str]:
    return [b.const("seqlens_k", np.full(B, total - 1, dtype=np.int32)),
            b.const("total_len", np.array(total, dtype=np.int32))]


@case
def ms_gqa() -> Case:
    """4 query heads over 2 KV heads: KV groups are "head" units, the 2 query heads per group "head-repeat"."""
    b = Builder()
    q, k, v = qkv(b, b.x(), HEADS * GD, 2 * GD, 2 * GD)
    h = b.op("GroupQueryAttention", [q, k, v, "", "", *gqa_lengths(b, S)], "gqa", domain=MS,
             num_heads=HEADS, kv_num_heads=2)
    y = b.linear(h, HEADS * GD, 6, "c")
    return Case(b.model([y]), b.feeds, [("head", 2), ("head-repeat", 2)],
                attrs={"gqa": {"num_heads": 2, "kv_num_heads": 1}}, kinds=(("head-repeat",),),
                blocked={"k.w[1]": "contracted by GroupQueryAttention 'gqa'"})


@case
def ms_gqa_past_rotary() -> Case:
    """With a KV cache (graph inputs/outputs that shrink with the KV groups) and built-in rotary."""
    b = Builder()
    q, k, v = qkv(b, b.x(), HEADS * GD, 2 * GD, 2 * GD)
    past = [b.input(f"past_{n}", b.rng.standard_normal((B, 2, 3, GD)).astype(np.float32)) for n in "kv"]
    angles = np.arange(16)[:, None] / 10000 ** (np.arange(GD // 2) / (GD // 2))
    cos, sin = b.const("cos", np.cos(angles).astype(np.float32)), b.const("sin", np.sin(angles).astype(np.float32))
    h, pk, pv = b.op("GroupQueryAttention", [q, k, v, *past, *gqa_lengths(b, 3 + S), cos, sin], "gqa",
                     outputs=3, domain=MS, num_heads=HEADS, kv_num_heads=2, do_rotary=1)
    y = b.linear(h, HEADS * GD, 6, "c")
    b.nodes.append(helper.make_node("Identity", [pk], ["present_key"], name="pk"))
    b.nodes.append(helper.make_node("Identity", [pv], ["present_value"], name="pv"))
    return Case(b.model([y, "present_key", "present_value"]), b.feeds, [("head", 2), ("head-repeat", 2)],
                attrs={"gqa": {"num_heads": 2, "kv_num_heads": 1}}, kinds=(("head-repeat",),))


@case
def ms_gqa_packed() -> Case:
    """Q, K and V packed into the query input by one projection: [Hq*D | Hkv*D | Hkv*D]."""
    b = Builder()
    packed = b.linear(b.x(), IN, (HEADS + 4) * GD, "qkv")
    h = b.op("GroupQueryAttention", [packed, "", "", "", "", *gqa_lengths(b, S)], "gqa", domain=MS,
             num_heads=HEADS, kv_num_heads=2)
    y = b.linear(h, HEADS * GD, 6, "c")
    return Case(b.model([y]), b.feeds, [("head", 2), ("head-repeat", 2)],
                attrs={"gqa": {"num_heads": 2, "kv_num_heads": 1}})


# ---- ONNX Attention and RotaryEmbedding (opset 23) -------------------------------------------------
@case
def onnx_attention_3d() -> Case:
    """[B, S, H*D] inputs with q_num_heads/kv_num_heads (grouped: 4 over 2), values 3 wide, a causal mask."""
    b = Builder(opset=23)
    q, k, v = qkv(b, b.x(), HIDDEN, 2 * D, 2 * 3)
    mask = b.rand("attn.mask", (1, HEADS, S, S), 0.5)  # additive, one per query head: sliced with them
    h = b.op("Attention", [q, k, v, mask], "attn", q_num_heads=HEADS, kv_num_heads=2, is_causal=1)
    y = b.linear(h, HEADS * 3, 6, "c")
    return Case(b.model([y]), b.feeds, [("head", 2), ("head-dim", 3), ("head-repeat", 2)],
                attrs={"attn": {"q_num_heads": 2, "kv_num_heads": 1}},
                kinds=(("head-repeat",), ("head-dim",)))


@case
def onnx_rotary_attention_4d() -> Case:
    """[B, H, S, D] form: Reshape/Transpose into heads, RotaryEmbedding-23 on Q and K, Attention-23 with a
    boolean mask, back to [B, S, H*D]; heads come out of the reshapes, no attribute changes."""
    b = Builder(opset=23)
    q, k, v = qkv(b, b.x(), HIDDEN, HIDDEN, HIDDEN)
    split = b.const("split_shape", np.array([B, S, HEADS, D], dtype=np.int64))
    q, k, v = (b.op("Transpose", [b.op("Reshape", [t, split], f"{n}.r")], f"{n}.t", perm=[0, 2, 1, 3])
               for t, n in ((q, "q"), (k, "k"), (v, "v")))
    angles = np.arange(S)[:, None] / 10000 ** (np.arange(D // 2) / (D // 2))
    cos, sin = b.const("cos", np.cos(angles).astype(np.float32)), b.const("sin", np.sin(angles).astype(np.float32))
    positions = b.const("pos", np.arange(S, dtype=np.int64)[None])
    q = b.op("RotaryEmbedding", [q, cos, sin, positions], "rot_q")
    k = b.op("RotaryEmbedding", [k, cos, sin, positions], "rot_k")
    mask = b.input("mask", np.tril(np.ones((1, 1, S, S), dtype=bool)))
    h = b.op("Attention", [q, k, v, mask], "attn")
    h = b.op("Transpose", [h], "o.t", perm=[0, 2, 1, 3])
    h = b.op("Reshape", [h, b.const("merge_shape", np.array([B, S, HIDDEN], dtype=np.int64))], "o.r")
    y = b.linear(h, HIDDEN, 6, "c")
    return Case(b.model([y]), b.feeds, [("head", HEADS), ("head-dim", D)], kinds=(("head-dim",),),
                blocked={"q.w[1]": "rotated within each head"})


@case
def onnx_rotary_3d() -> Case:
    """RotaryEmbedding-23 on [B, S, H*D] (num_heads given) before a 3-D Attention-23."""
    b = Builder(opset=23)
    q, k, v = qkv(b, b.x(), HIDDEN, HIDDEN, HIDDEN)
    angles = np.arange(S)[:, None] / 10000 ** (np.arange(D // 2) / (D // 2))
    cos, sin = b.const("cos", np.cos(angles).astype(np.float32)), b.const("sin", np.sin(angles).astype(np.float32))
    positions = b.const("pos", np.arange(S, dtype=np.int64)[None])
    q = b.op("RotaryEmbedding", [q, cos, sin, positions], "rot_q", num_heads=HEADS)
    k = b.op("RotaryEmbedding", [k, cos, sin, positions], "rot_k", num_heads=HEADS)
    h = b.op("Attention", [q, k, v], "attn", q_num_heads=HEADS, kv_num_heads=HEADS)
    y = b.linear(h, HIDDEN, 6, "c")
    return Case(b.model([y]), b.feeds, [("head", HEADS), ("head-dim", D)],
                attrs={"attn": {"q_num_heads": 2, "kv_num_heads": 2}, "rot_q": {"num_heads": 2}})


# ---- normalisations and elementwise fusions ----------------------------------------------------------
def mlp(b: Builder, h: str, act: Callable[[str], str], width: int = 12) -> str:
    return b.linear(act(b.linear(h, IN, width, "fc1", bias=False)), width, IN, "fc2")


@case
def skip_layer_norm_and_bias_gelu() -> Case:
    """A post-norm block as ORT fuses it: SkipLayerNormalization(fc2 out, residual, gamma, beta, bias) and
    BiasGelu(fc1 out, fc1 bias); the MLP neurons are prunable, the normalised hidden axis is not."""
    b = Builder()
    x = b.x()
    h = mlp(b, x, lambda t: b.op("BiasGelu", [t, b.rand("fc1.b", 12, 0.1)], "gelu", domain=MS))
    gamma, beta, bias = b.rand("ln.g", IN), b.rand("ln.b", IN, 0.1), b.rand("ln.bias", IN, 0.1)
    outs = b.op("SkipLayerNormalization", [h, x, gamma, beta, bias], "ln", outputs=4, domain=MS)
    b.nodes[-1].output[1:3] = ["", ""]
    y = b.op("Add", [b.linear(outs[0], IN, 6, "c"), b.linear(outs[3], IN, 6, "d")], "sum")
    return Case(b.model([y]), b.feeds, [("channel", 12)],
                blocked={"c.w[0]": "normalised over by SkipLayerNormalization 'ln'",
                         "fc2.w[1]": "normalised over by SkipLayerNormalization 'ln'"})


@case
def skip_simplified_layer_norm_and_fast_gelu() -> Case:
    b = Builder()
    x = b.x()
    h = mlp(b, x, lambda t: b.op("FastGelu", [t, b.rand("fc1.b", 12, 0.1)], "gelu", domain=MS))
    h = b.op("SkipSimplifiedLayerNormalization", [h, x, b.rand("ln.g", IN)], "ln", domain=MS)
    return Case(b.model([b.linear(h, IN, 6, "c")]), b.feeds, [("channel", 12)],
                blocked={"c.w[0]": "normalised over by SkipSimplifiedLayerNormalization 'ln'"})


@case
def simplified_layer_norm_and_quick_gelu() -> Case:
    b = Builder()
    h = b.op("SimplifiedLayerNormalization", [b.x(), b.rand("ln.g", IN)], "ln", axis=-1, epsilon=1e-5)
    h = mlp(b, h, lambda t: b.op("QuickGelu", [t], "gelu", domain=MS, alpha=1.702))
    return Case(b.model([b.linear(h, IN, 6, "c")]), b.feeds, [("channel", 12), ("channel", IN)],
                blocked={"fc1.w[0]": "normalised over by SimplifiedLayerNormalization 'ln'"})


@case
def gelu_fast_gelu_without_bias() -> Case:
    b = Builder()
    h = mlp(b, b.x(), lambda t: b.op("FastGelu", [b.op("Gelu", [t], "gelu", domain=MS)], "fast", domain=MS))
    return Case(b.model([h]), b.feeds, [("channel", 12)])


@case
def fused_matmul() -> Case:
    """FusedMatMul with a constant transposed weight, and as Q·Kᵀ (transB) inside an attention."""
    b = Builder()
    x = b.x()
    w = b.rand("fc1.w", (12, IN), 0.3)  # [out, in]: transB
    h = b.op("Relu", [b.op("FusedMatMul", [x, w], "fc1", domain=MS, transB=1, alpha=0.5)], "relu")
    h = b.linear(h, 12, HIDDEN, "v")
    q, k = b.linear(x, IN, HIDDEN, "q"), b.linear(x, IN, HIDDEN, "k")
    split = b.const("split_shape", np.array([B, S, HEADS, D], dtype=np.int64))
    q, k, v = (b.op("Transpose", [b.op("Reshape", [t, split], f"{n}.r")], f"{n}.t", perm=[0, 2, 1, 3])
               for t, n in ((q, "q"), (k, "k"), (h, "v")))
    scores = b.op("FusedMatMul", [q, k], "qk", domain=MS, transB=1, alpha=0.5)
    h = b.op("MatMul", [b.op("Softmax", [scores], "softmax", axis=-1), v], "pv")
    h = b.op("Reshape", [b.op("Transpose", [h], "o.t", perm=[0, 2, 1, 3]),
                         b.const("merge_shape", np.array([B, S, HIDDEN], dtype=np.int64))], "o.r")
    return Case(b.model([b.linear(h, HIDDEN, 6, "c")]), b.feeds,
                [("channel", 12), ("head", HEADS), ("head-dim", D)])


@case
def embed_layer_norm() -> Case:
    """BERT's fused embeddings: the hidden axis is normalised over; what follows is prunable."""
    b = Builder()
    ids = b.input("input_ids", b.rng.integers(0, 10, (B, S)).astype(np.int32))
    segments = b.input("segment_ids", np.zeros((B, S), dtype=np.int32))
    tables = [b.rand("word", (10, IN)), b.rand("position", (S, IN)), b.rand("segment", (2, IN))]
    outs = b.op("EmbedLayerNormalization", [ids, segments, *tables, b.rand("ln.g", IN), b.rand("ln.b", IN, 0.1)],
                "emb", outputs=2, domain=MS)
    h = mlp(b, outs[0], lambda t: b.op("Relu", [t], "relu"))
    return Case(b.model([b.linear(h, IN, 6, "c")]), b.feeds, [("channel", 12), ("channel", IN)],
                blocked={"fc1.w[0]": "normalised over by EmbedLayerNormalization 'emb'"})


# ---- the tests ---------------------------------------------------------------------------------------
def groups_with(report, member: str):
    return [s for s in report.groups if any(m.startswith(f"{member} ") for m in s.members)]


def group_for(report, member: str):
    found = groups_with(report, member)
    assert len(found) == 1, f"{member}: {len(found)} groups in {[s.members for s in report.groups]}"
    return found[0]


def all_reasons(proto: onnx.ModelProto) -> dict[int, list[str]]:
    """Every reason each group is blocked for (analyze reports the first only)."""
    g = build_dim_graph(load(proto))
    return {group.id: group.blocked for group in find_groups(g)}


def node_attrs(proto: onnx.ModelProto, name: str) -> dict[str, object]:
    node = next(n for n in proto.graph.node if n.name == name)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_rule(name):
    c = CASES[name]()
    report = analyze(c.proto)
    assert not report.declined, report.declined
    assert sorted((s.kind, s.size) for s in report.prunable) == sorted(c.prunable), \
        [(s.kind, s.size, s.reason, s.members) for s in report.groups]
    reasons = all_reasons(c.proto)
    for member, why in c.blocked.items():  # one of the groups this weight axis belongs to
        found = [reasons[s.id] for s in groups_with(report, member)]
        assert any(why in r for rs in found for r in rs), (member, found)
    check_model(c.proto, c.feeds, ratio=0.5)
    for kinds in c.kinds:
        result = check_model(c.proto, c.feeds, ratio=0.5, kinds=kinds, zero=False)
        assert result["kinds"] == list(kinds), result
    if c.attrs:
        pruned, plan = prune(c.proto, PlanConfig(ratio=0.5, criterion="random", round_to=1))
        assert plan.units_removed
        for node, expected in c.attrs.items():
            found = node_attrs(pruned, node)
            assert {k: found.get(k) for k in expected} == expected, (node, found)


def test_bias_add_relations():
    """BiasAdd (x + bias + skip) has no CPU kernel in ONNX Runtime: its relations are checked, not run."""
    b = Builder()
    x = b.x((B, S, 12))
    h = b.linear(x, 12, 12, "p", bias=False)
    h = b.op("BiasAdd", [h, b.rand("ba.b", 12, 0.1), x], "biasadd", domain=MS)
    proto = helper.make_model(
        helper.make_graph([*b.nodes, helper.make_node("MatMul", [h, b.rand("c.w", (12, 6))], ["y"], name="c")],
                          "biasadd", b.inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, 6])],
                          b.inits, value_info=[helper.make_tensor_value_info(h, TensorProto.FLOAT, [B, S, 12])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=10)
    report = analyze(proto)
    assert not report.declined
    # The skip ties the BiasAdd's channels to the graph input: nothing prunable, and p's output channels
    # share that group with the bias and c's input.
    summary = group_for(report, "p.w[1]")
    assert not summary.prunable and "graph input 'x'" in summary.reason
    assert any(m.startswith("ba.b[0] ") for m in summary.members)
    assert any(m.startswith("c.w[0] ") for m in summary.members)


def test_packed_mha_is_declined_with_the_reason():
    b = Builder()
    packed = b.op("Reshape", [b.linear(b.x(), IN, 3 * HIDDEN, "qkv"),
                              b.const("shape", np.array([B, S, HEADS, 3, D], dtype=np.int64))], "r")
    h = b.op("MultiHeadAttention", [packed], "mha", domain=MS, num_heads=HEADS)
    y = b.linear(h, HIDDEN, 6, "c")
    # ONNX Runtime has no CPU kernel for this form: the shapes are written down by hand.
    shapes = {"qkv.out": [B, S, 3 * HIDDEN], "qkv.add.out": [B, S, 3 * HIDDEN], "r.out": [B, S, HEADS, 3, D],
              "mha.out": [B, S, HIDDEN], "c.out": [B, S, 6], y: [B, S, 6]}
    proto = b.model([y], shapes)
    report = analyze(proto)
    assert [d["reason"] for d in report.declined] == [
        "packed QKV ([batch, sequence, heads, 3, head_size]) is not supported"]
    assert not any(s.prunable for s in groups_with(report, "qkv.w[1]"))
