"""Fused attention and the other fusions of ONNX Runtime's transformer optimizer.

A fused attention op has no activation×activation MatMul for ``analysis/heads.py`` to find, so its rule
states the head structure itself: the hidden axis of Q/K/V is ``Prod((head, head_size))`` with a fresh
variable of kind "head" (the op computes each head on its own). The per-head width of Q and K is
contracted (QKᵀ, and the default scale 1/sqrt(head_size) reads it): blocked. The per-head width of V is
free, kind "head-dim", where the op accepts a value width other than the query width. Under grouped-query
attention the query heads are ``Prod((kv_group, repeat))``, query head i reading KV head i // repeat:
the KV group is the "head" unit and the repeat "head-repeat", as heads.py names them. A hook keeps the
head-count attributes (num_heads, kv_num_heads, q_num_heads, qkv_hidden_sizes) in step.

Sequence axes that attention mixes (keys, masks, caches' time axis) are blocked; masks and caches
relate their head axis when they have one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.analysis.dims import Atom, Cat, Expr, Prod
from graphprune.analysis.graph import Decline, DimGraph
from graphprune.analysis.rules.base import (
    MICROSOFT,
    attr,
    block_axes,
    rule,
    set_attr,
    tie_all,
    where,
)
from graphprune.analysis.rules.elementwise import broadcast, unary
from graphprune.analysis.rules.linear import matmul_relations
from graphprune.analysis.rules.normalization import layer_norm


# ---- helpers ---------------------------------------------------------------------------------
def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index] is not None else None


def _output(node: ir.Node, index: int) -> ir.Value | None:
    """An optional output that is there. onnx_ir names omitted outputs too ("v", "v_2"): an output that
    nothing reads, that is no graph output and whose shape is unknown counts as omitted."""
    out = node.outputs[index] if len(node.outputs) > index else None
    if out is None or not out.name:
        return None
    if out.shape is None and not out.uses() and not out.is_graph_output():
        return None
    return out


def _same(g: DimGraph, a: Expr, b: Expr, reason: str) -> None:
    """Tie two batch or sequence axes when their extents agree; else block both (no guess)."""
    if g.space.size(a) == g.space.size(b):
        g.tie(a, b)
    else:
        g.block(a, reason)
        g.block(b, reason)


def _extent(g: DimGraph, value: ir.Value, axis: int) -> int:
    array = g.const(value)
    dims = list(array.shape) if array is not None else g.shape(value)
    if dims is None or not isinstance(dims[axis], int):
        raise Decline(f"axis {axis} of '{value.name}' has no static extent")
    return int(dims[axis])


def _head_vars(g: DimGraph, node: ir.Node, q_heads: int, kv_heads: int) -> tuple[Expr, Expr]:
    """(query-head expression, KV-head expression): Prod((kv, repeat)) under grouped-query attention."""
    if kv_heads <= 0 or q_heads % kv_heads:
        raise Decline(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    kv = g.space.new(kv_heads, "head", node.name)
    if q_heads == kv_heads:
        return kv, kv
    repeat = g.space.new(q_heads // kv_heads, "head-repeat", node.name)
    return Prod((kv, repeat)), kv


def _head_size(g: DimGraph, node: ir.Node, size: int, what: str = "query/key") -> Atom:
    return g.space.new(size, "channel", node.name,
                       blocked=f"{what} width of each head, contracted by {where(node)}")


def _value_size(g: DimGraph, node: ir.Node, size: int) -> Atom:
    """The per-head value width: free (kind "head-dim"), since the op takes any value width."""
    return g.space.new(size, "head-dim", node.name)


def _div(total: int, parts: int, what: str) -> int:
    if parts <= 0 or total % parts:
        raise Decline(f"{what} ({total}) is not a multiple of the head count ({parts})")
    return total // parts


def _mask(g: DimGraph, node: ir.Node, index: int, heads: Expr, why: str) -> None:
    """An additive/boolean mask broadcast to [batch, heads, query, key]: its head axis is the heads,
    every other axis is blocked (a constant mask is a per-use parameter the rewriter slices)."""
    value = _input(node, index)
    if value is None:
        return
    axes = g.operand(node, index) if g.is_param(value) else g.axes(value)
    head_axis = len(axes) - 3
    for k, e in enumerate(axes):
        if k == head_axis and g.space.size(e) == g.space.size(heads) and g.space.size(heads) != 1:
            g.tie(e, heads)
        elif k != head_axis or g.space.size(e) != 1:
            g.block(e, f"{why} of {where(node)}")


def _block_input(g: DimGraph, node: ir.Node, index: int, why: str) -> None:
    """An input read in a way no axis relation states (masks, lengths, caches of angles). A constant is
    not related to anything, so it needs no blocking."""
    value = _input(node, index)
    if value is not None and not g.is_param(value) and value.shape is not None:
        g.block_value(value, f"{why} of {where(node)}")


def _block_output(g: DimGraph, node: ir.Node, index: int, why: str) -> None:
    value = _output(node, index)
    if value is not None and value.shape is not None:
        g.block_value(value, f"{why} of {where(node)}")


def _heads_hook(g: DimGraph, node: ir.Node, counts: dict[str, Expr], always: bool = True) -> None:
    """Keep head-count attributes equal to the new extents of their expressions."""

    def update(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
        for name, expr in counts.items():
            if not always and attr(node, name) is None:
                continue
            new = g.new_size(expr, removed)
            if new != attr(node, name):
                set_attr(node, name, int(new))

    g.hook(node, update)


def _cache(g: DimGraph, value: ir.Value | None, batch: Expr, heads: Expr, width: Expr, why: str) -> None:
    """A [batch, heads, time, width] key or value cache (past input or present output)."""
    if value is None:
        return
    axes = g.axes(value)
    if len(axes) != 4:
        raise Decline(f"cache '{value.name}' is not [batch, heads, time, head_size]")
    _same(g, axes[0], batch, f"batch of {why}")
    g.tie(axes[1], heads)
    g.block(axes[2], f"time axis of {why}")
    g.tie(axes[3], width)


def _scores_output(g: DimGraph, node: ir.Node, index: int, heads: Expr) -> None:
    """The optional [batch, heads, query, key] scores output: its head axis follows the heads."""
    if _output(node, index) is None:
        return
    qk = g.axes(node.outputs[index])
    g.tie(qk[1], heads)
    block_axes(g, [qk[0], qk[2], qk[3]], f"attention scores of {where(node)}")


# ---- com.microsoft Attention -------------------------------------------------------------------
@rule("Attention", domain=MICROSOFT)
def ms_attention(node: ir.Node, g: DimGraph) -> None:
    """input [B,S,in] · weights [in, Q+K+V] (+ bias) -> output [B,S,V]; each of Q, K, V is heads × width."""
    if not g.is_param(node.inputs[1]):
        raise Decline("the QKV weight is not a constant")
    x, w = g.axes(node.inputs[0]), g.operand(node, 1)
    y = g.axes(node.outputs[0])
    if len(x) != 3 or len(w) != 2:
        raise Decline("only input [batch, sequence, hidden] with a 2-D weight is supported")
    heads = attr(node, "num_heads")
    width = _extent(g, node.inputs[1], 1)
    sizes = attr(node, "qkv_hidden_sizes")
    if sizes is not None:
        q_size, k_size, v_size = (int(s) for s in sizes)
    else:
        q_size = k_size = v_size = _div(width, 3, "the QKV weight width")
    if q_size != k_size or q_size + k_size + v_size != width:
        raise Decline(f"qkv_hidden_sizes {sizes} do not fit a weight of width {width}")
    h, _ = _head_vars(g, node, heads, heads)
    dq = _head_size(g, node, _div(q_size, heads, "the query width"))
    dv = _value_size(g, node, _div(v_size, heads, "the value width"))
    qkv = Cat((Prod((h, dq)), Prod((h, dq)), Prod((h, dv))))
    g.tie(w[0], x[2])
    g.tie(w[1], qkv)
    g.set_role(node, 1, 0, "in")
    g.set_role(node, 1, 1, "out")
    if _input(node, 2) is not None:
        g.tie(g.operand(node, 2, role="out")[0], qkv)
    g.tie(y[0], x[0])
    g.tie(y[1], x[1])
    g.tie(y[2], Prod((h, dv)))
    g.block(x[1], f"attended over by {where(node)}")
    _block_input(g, node, 3, "attention mask")
    past, present = _input(node, 4), _output(node, 1)
    if past is not None or present is not None:
        if q_size != v_size:
            raise Decline("a past/present state needs equal query and value widths")
        for value in (past, present):
            if value is None:
                continue
            axes = g.axes(value)  # [2 (key, value), batch, heads, time, head_size]
            if len(axes) != 5:
                raise Decline(f"state '{value.name}' is not [2, batch, heads, time, head_size]")
            g.block(axes[0], f"key/value index of {where(node)}")
            _same(g, axes[1], x[0], f"batch of {where(node)}")
            g.tie(axes[2], h)
            g.block(axes[3], f"time axis of {where(node)}")
            g.tie(axes[4], dq)
            g.tie(dv, dq)
    _mask(g, node, 5, h, "attention bias")
    _block_input(g, node, 6, "past sequence length")

    def update(g: DimGraph, removed: dict[int, np.ndarray]) -> None:
        new_heads = g.new_size(h, removed)
        if new_heads != heads:
            set_attr(node, "num_heads", int(new_heads))
        q, v = g.new_size(Prod((h, dq)), removed), g.new_size(Prod((h, dv)), removed)
        if (sizes is not None or q != v) and [q, q, v] != [int(s) for s in (sizes or [])]:
            set_attr(node, "qkv_hidden_sizes", [int(q), int(q), int(v)])

    g.hook(node, update)


# ---- com.microsoft MultiHeadAttention ------------------------------------------------------------
@rule("MultiHeadAttention", domain=MICROSOFT)
def ms_multi_head_attention(node: ir.Node, g: DimGraph) -> None:
    """query [B,S,H*D], key [B,L,H*D] or [B,H,L,D], value [B,L,H*Dv] or [B,H,L,Dv] -> [B,S,H*Dv]."""
    heads = attr(node, "num_heads")
    q, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    key, value = _input(node, 1), _input(node, 2)
    if len(q) != 3:
        raise Decline("packed QKV ([batch, sequence, heads, 3, head_size]) is not supported")
    if key is None or value is None:
        raise Decline("a query without separate key and value is not supported")
    k, v = g.axes(key), g.axes(value)
    if len(k) == 5:
        raise Decline("packed KV ([batch, sequence, heads, 2, head_size]) is not supported")
    h, _ = _head_vars(g, node, heads, heads)
    dq = _head_size(g, node, _div(g.space.size(q[2]), heads, "the query width"))
    g.tie(q[2], Prod((h, dq)))
    g.tie(y[0], q[0])
    g.tie(y[1], q[1])
    if len(k) == 3 and len(v) == 3:
        dv = _value_size(g, node, _div(g.space.size(v[2]), heads, "the value width"))
        g.tie(k[2], Prod((h, dq)))
        g.tie(v[2], Prod((h, dv)))
        key_time = (k[1], v[1])
        batch = (k[0], v[0])
    elif len(k) == 4 and len(v) == 4:  # keys and values already split into heads (BNSH)
        dv = _value_size(g, node, g.space.size(v[3]))
        g.tie(k[1], h)
        g.tie(k[3], dq)
        g.tie(v[1], h)
        g.tie(v[3], dv)
        key_time = (k[2], v[2])
        batch = (k[0], v[0])
        if _input(node, 3) is not None:
            raise Decline("a bias with key/value in [batch, heads, sequence, head_size] is not supported")
    else:
        raise Decline("key and value of different ranks are not supported")
    for e in batch:
        _same(g, e, q[0], f"batch of {where(node)}")
    g.tie(key_time[0], key_time[1])
    g.block(key_time[0], f"attended over by {where(node)}")
    g.tie(y[2], Prod((h, dv)))
    if attr(node, "unidirectional", 0):
        g.block(q[1], f"causal mask of {where(node)}")
    if _input(node, 3) is not None:
        bias = g.operand(node, 3, role="out") if g.is_param(node.inputs[3]) else g.axes(node.inputs[3])
        g.tie(bias[0], Cat((Prod((h, dq)), Prod((h, dq)), Prod((h, dv)))))
    _block_input(g, node, 4, "key padding mask")
    _mask(g, node, 5, h, "attention bias")
    _cache(g, _input(node, 6), q[0], h, dq, f"past key of {where(node)}")
    _cache(g, _input(node, 7), q[0], h, dv, f"past value of {where(node)}")
    _block_input(g, node, 8, "past sequence length")
    _block_input(g, node, 9, "cache indirection")
    _cache(g, _output(node, 1), q[0], h, dq, f"present key of {where(node)}")
    _cache(g, _output(node, 2), q[0], h, dv, f"present value of {where(node)}")
    _scores_output(g, node, 3, h)
    _heads_hook(g, node, {"num_heads": h})


# ---- com.microsoft GroupQueryAttention -----------------------------------------------------------
@rule("GroupQueryAttention", domain=MICROSOFT)
def ms_group_query_attention(node: ir.Node, g: DimGraph) -> None:
    """query [B,S,Hq*D], key/value [B,L,Hkv*D] (or packed in query) -> [B,S,Hq*D]; Hq = Prod(kv, repeat)."""
    q_heads, kv_heads = attr(node, "num_heads"), attr(node, "kv_num_heads")
    for index, name in ((12, "k_scale"), (13, "v_scale")):
        if _input(node, index) is not None:
            raise Decline(f"a quantized key/value cache ({name}) is not supported")
    q, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    if len(q) != 3:
        raise Decline("only query [batch, sequence, hidden] is supported")
    hq, kv = _head_vars(g, node, q_heads, kv_heads)
    key, value = _input(node, 1), _input(node, 2)
    if key is None and value is None:  # packed: query holds Q, K and V one after the other
        d = _head_size(g, node, _div(g.space.size(q[2]), q_heads + 2 * kv_heads, "the packed QKV width"))
        g.tie(q[2], Cat((Prod((hq, d)), Prod((kv, d)), Prod((kv, d)))))
        g.block(q[1], f"attended over by {where(node)}")
    elif key is not None and value is not None:
        d = _head_size(g, node, _div(g.space.size(q[2]), q_heads, "the query width"))
        g.tie(q[2], Prod((hq, d)))
        k, v = g.axes(key), g.axes(value)
        if len(k) != 3 or len(v) != 3:
            raise Decline("only key and value [batch, sequence, hidden] are supported")
        g.tie(k[2], Prod((kv, d)))
        g.tie(v[2], Prod((kv, d)))  # the kernels take one head size for keys and values
        for e in (k[0], v[0]):
            _same(g, e, q[0], f"batch of {where(node)}")
        g.tie(k[1], v[1])
        g.block(k[1], f"attended over by {where(node)}")
    else:
        raise Decline("key and value must both be given or both be packed into the query")
    g.tie(y[0], q[0])
    g.tie(y[1], q[1])
    g.tie(y[2], Prod((hq, d)))
    if attr(node, "causal", 1):
        g.block(q[1], f"causal mask of {where(node)}")
    _cache(g, _input(node, 3), q[0], kv, d, f"past key of {where(node)}")
    _cache(g, _input(node, 4), q[0], kv, d, f"past value of {where(node)}")
    _cache(g, _output(node, 1), q[0], kv, d, f"present key of {where(node)}")
    _cache(g, _output(node, 2), q[0], kv, d, f"present value of {where(node)}")
    _block_input(g, node, 5, "sequence lengths")
    _block_input(g, node, 6, "total sequence length")
    _block_input(g, node, 7, "rotary cos cache")
    _block_input(g, node, 8, "rotary sin cache")
    _block_input(g, node, 9, "position ids")
    _mask(g, node, 10, hq, "attention bias")
    sink = _input(node, 11)
    if sink is not None:  # one softmax sink per query head
        g.tie((g.operand(node, 11) if g.is_param(sink) else g.axes(sink))[0], hq)
    for index in (14, 15):  # per-head RMS norm weights of Q and K: over the head width
        norm = _input(node, index)
        if norm is not None:
            g.tie((g.operand(node, index) if g.is_param(norm) else g.axes(norm))[0], d)
    _block_input(g, node, 16, "query sequence lengths")
    _scores_output(g, node, 3, hq)
    _heads_hook(g, node, {"num_heads": hq, "kv_num_heads": kv})


# ---- RotaryEmbedding (com.microsoft and ONNX 23) ---------------------------------------------------
@rule("RotaryEmbedding", domain=MICROSOFT)
def ms_rotary_embedding(node: ir.Node, g: DimGraph) -> None:
    if attr(node, "is_packed_batching", 0):
        raise Decline("packed batching is not supported")
    _rotary(node, g, cos_index=2, position_index=1)


@rule("RotaryEmbedding")
def rotary_embedding(node: ir.Node, g: DimGraph) -> None:
    _rotary(node, g, cos_index=1, position_index=3)


def _rotary(node: ir.Node, g: DimGraph, cos_index: int, position_index: int) -> None:
    """Rotates pairs of positions within each head's width by an angle that depends on the position:
    heads are free, the head width is blocked (its halves or pairs are mixed), the sequence axis too."""
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    tie_all(g, x, y)
    why = f"rotated within each head by {where(node)}"
    if len(x) == 4:  # [batch, heads, sequence, head_size]
        g.block(x[2], f"position axis of {where(node)}")
        g.block(x[3], why)
    elif len(x) == 3:  # [batch, sequence, heads * head_size]
        heads = attr(node, "num_heads", 0)
        hidden = g.space.size(x[2])
        if heads:
            size = _div(hidden, heads, "the hidden width")
        else:  # com.microsoft: the head size is twice the cache width when num_heads is not given
            if attr(node, "rotary_embedding_dim", 0):
                raise Decline("rotary_embedding_dim without num_heads")
            size = 2 * _extent(g, node.inputs[cos_index], -1)
            heads = _div(hidden, size, "the hidden width")
        h = g.space.new(heads, "head", node.name)
        g.tie(x[2], Prod((h, g.space.new(size, "channel", node.name, blocked=why))))
        g.block(x[1], f"position axis of {where(node)}")
        _heads_hook(g, node, {"num_heads": h}, always=False)
    else:
        raise Decline("only inputs [batch, sequence, hidden] and [batch, heads, sequence, head_size]")
    _block_input(g, node, cos_index, "rotary cos cache")
    _block_input(g, node, cos_index + 1, "rotary sin cache")
    _block_input(g, node, position_index, "position ids")


# ---- ONNX Attention (opset 23) --------------------------------------------------------------------
@rule("Attention")
def onnx_attention(node: ir.Node, g: DimGraph) -> None:
    """Q/K/V [B,S,H*D] with q_num_heads/kv_num_heads, or [B,H,S,D]; K/V heads are query groups (GQA)."""
    q, k, v = (g.axes(node.inputs[i]) for i in range(3))
    y = g.axes(node.outputs[0])
    if not len(q) == len(k) == len(v) or len(q) not in (3, 4):
        raise Decline("Q, K and V must all be 3-D or all be 4-D")
    if len(q) == 3:
        q_heads, kv_heads = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
        if not q_heads or not kv_heads:
            raise Decline("3-D inputs without q_num_heads and kv_num_heads")
        hq, kv = _head_vars(g, node, q_heads, kv_heads)
        d = _head_size(g, node, _div(g.space.size(q[2]), q_heads, "the query width"))
        dv = _value_size(g, node, _div(g.space.size(v[2]), kv_heads, "the value width"))
        g.tie(q[2], Prod((hq, d)))
        g.tie(k[2], Prod((kv, d)))
        g.tie(v[2], Prod((kv, dv)))
        batch, q_time, key_time = (q[0], k[0], v[0]), q[1], (k[1], v[1])
        g.tie(y[0], q[0])
        g.tie(y[1], q[1])
        g.tie(y[2], Prod((hq, dv)))
        _heads_hook(g, node, {"q_num_heads": hq, "kv_num_heads": kv})
    else:
        q_heads, kv_heads = g.space.size(q[1]), g.space.size(k[1])
        if q_heads is None or kv_heads is None:
            raise Decline("the head axes have no static extent")
        hq, kv = _head_vars(g, node, q_heads, kv_heads)
        d = _head_size(g, node, g.space.size(q[3]))
        dv = _value_size(g, node, g.space.size(v[3]))
        g.tie(q[1], hq)
        g.tie(k[1], kv)
        g.tie(v[1], kv)
        g.tie(q[3], d)
        g.tie(k[3], d)
        g.tie(v[3], dv)
        batch, q_time, key_time = (q[0], k[0], v[0]), q[2], (k[2], v[2])
        tie_all(g, [y[0], y[1], y[2], y[3]], [q[0], hq, q[2], dv])
        _heads_hook(g, node, {"q_num_heads": hq, "kv_num_heads": kv}, always=False)
    for e in batch[1:]:
        _same(g, e, batch[0], f"batch of {where(node)}")
    g.tie(key_time[0], key_time[1])
    g.block(key_time[0], f"attended over by {where(node)}")
    if attr(node, "is_causal", 0):
        g.block(q_time, f"causal mask of {where(node)}")
    _mask(g, node, 3, hq, "attention mask")
    _cache(g, _input(node, 4), batch[0], kv, d, f"past key of {where(node)}")
    _cache(g, _input(node, 5), batch[0], kv, dv, f"past value of {where(node)}")
    _block_input(g, node, 6, "non-padding key lengths")
    _cache(g, _output(node, 1), batch[0], kv, d, f"present key of {where(node)}")
    _cache(g, _output(node, 2), batch[0], kv, dv, f"present value of {where(node)}")
    _scores_output(g, node, 3, hq)


# ---- normalisations ------------------------------------------------------------------------------
@rule("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MICROSOFT)
def skip_layer_norm(node: ir.Node, g: DimGraph) -> None:
    """LayerNorm(input + skip + bias) * gamma (+ beta) over the last axis; may also return the sum."""
    x, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    tie_all(g, x, y)
    g.block(x[-1], f"normalised over by {where(node)}")
    skip = g.operand(node, 1)
    dims = [g.space.size(e) for e in skip]
    for k, e in enumerate(skip):  # the skip may broadcast: [S, H], [1, S, H]
        target = x[len(x) - len(skip) + k]
        if dims[k] == g.space.size(target):
            g.tie(e, target)
        elif dims[k] != 1:
            raise Decline(f"skip axis {k} ({dims[k]}) does not broadcast to {g.space.size(target)}")
    params = (2, 3, 4) if node.op_type == "SkipLayerNormalization" else (2, 3)  # gamma, beta, bias
    for index in params:
        if _input(node, index) is not None:
            g.tie(g.operand(node, index)[-1], x[-1])
    for index in (1, 2):  # mean and inverse standard deviation: [..., 1]
        out = _output(node, index)
        if out is not None:
            stats = g.axes(out)
            if len(stats) != len(x):
                raise Decline(f"statistics output '{out.name}' has another rank than the input")
            tie_all(g, stats[:-1], x[:-1])
    if _output(node, 3) is not None:  # input + skip + bias, before normalising
        tie_all(g, g.axes(node.outputs[3]), x)


# SimplifiedLayerNormalization (RMSNorm) is registered by ONNX Runtime in the standard domain.
# (ONNX Runtime has no com.microsoft LayerNormalization: its contrib LayerNormalization is the standard one.)
rule("SimplifiedLayerNormalization")(layer_norm)
rule("SimplifiedLayerNormalization", domain=MICROSOFT)(layer_norm)


@rule("EmbedLayerNormalization", domain=MICROSOFT)
def embed_layer_norm(node: ir.Node, g: DimGraph) -> None:
    """Word + position (+ segment) embeddings, then LayerNorm: the hidden axis is normalised over."""
    ids, y = g.axes(node.inputs[0]), g.axes(node.outputs[0])
    g.tie(y[0], ids[0])
    g.tie(y[1], ids[1])
    why = f"normalised over by {where(node)}"
    g.block(y[2], why)
    for index in (2, 3, 4, 5, 6):  # word, position, segment embeddings; gamma, beta
        if _input(node, index) is not None:
            axes = g.operand(node, index)
            g.tie(axes[-1], y[2])
            block_axes(g, axes[:-1], f"gathered along by {where(node)}")
    for index in (1, 7, 8):  # segment ids, mask, position ids
        _block_input(g, node, index, "indices")
    _block_output(g, node, 1, "mask index")
    if _output(node, 2) is not None:
        tie_all(g, g.axes(node.outputs[2]), y)


# ---- elementwise fusions ---------------------------------------------------------------------------
# Gelu(x + bias), x + bias + skip: the broadcasting relations of Add; Gelu and QuickGelu (x·σ(αx)) are unary.
rule("BiasGelu", "FastGelu", "BiasAdd", domain=MICROSOFT)(broadcast)
rule("Gelu", "QuickGelu", domain=MICROSOFT)(unary)


@rule("FusedMatMul", "TransposeMatMul", domain=MICROSOFT)
def fused_matmul(node: ir.Node, g: DimGraph) -> None:
    """alpha · op(A) · op(B), op transposing the last two axes when transA/transB are set."""
    if attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0):
        raise Decline("transBatchA/transBatchB are not supported")
    matmul_relations(node, g, trans_a=bool(attr(node, "transA", 0)), trans_b=bool(attr(node, "transB", 0)))
