"""Mixture-of-experts test models: ONNX Runtime's com.microsoft MoE op with a MatMul router.

``ort_moe`` builds ``x [T, D] -> MatMul(W_r [D, E]) (+ b_r [E]) -> router logits [T, E] ->
MoE(x, logits, fc1 [E, H, D], fc1_bias [E, H], fc2 [E, D, H], fc2_bias [E, D]) -> y``,
optionally repeated as a residual stack of ``layers`` MoE blocks. Weights are random (numpy, seeded):
outputs mean nothing, fidelity is to the dense model only.

ONNX Runtime's MoE (checked on the CPU kernel of onnxruntime 1.32 against a numpy reference,
``tests/test_prune_experts.py::test_ort_moe_routing_semantics``): ``router_probs`` are *logits*; the op
takes the softmax over all E of them, picks the top k, and with ``normalize_routing_weights=1`` divides the
k weights by their sum. fc1/fc2/fc3 are stored [E, out, in] (each expert computes ``W @ x``).

``dead`` experts get a router bias of ``dead_bias``: with the default -1e4 their softmax weight is 0 in
float32, so the router never selects them and they do not enter any normalisation; a milder value (-4)
keeps them out of the top k on most data but leaves them a share of the softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import ModelProto, helper, numpy_helper

OPSET = 17


def ort_moe(*, tokens: int | str = "tokens", hidden: int = 16, inter: int = 32, experts: int = 4, k: int = 2,
            layers: int = 1, normalize: int = 1, activation: str = "relu", bias: bool = True,
            swiglu: bool = False, dead: Sequence[int] = (), dead_bias: float = -1e4, router_bias: bool = True,
            seed: int = 0, dtype=np.float32) -> ModelProto:
    """A stack of ``layers`` residual MoE blocks ``x + MoE(x)`` (one block: ``y = MoE(x)``, no residual).

    ``swiglu``: activation 'swiglu' with gate and up fused and interleaved in fc1 (swiglu_fusion=1: the only
    SwiGLU layout ONNX Runtime 1.32's CPU kernel accepts; separate fc3 weights are CUDA-only there).
    ``dead``: experts the router never selects (see the module doc), in every layer.
    """
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], []

    def add(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    x = "x"
    for layer in range(layers):
        p = f"layer{layer}" if layers > 1 else "moe"
        wr = add(f"{p}.router.weight", rng.standard_normal((hidden, experts)) / np.sqrt(hidden))
        nodes.append(helper.make_node("MatMul", [x, wr], [f"{p}.router_mm"], name=f"{p}/router/MatMul"))
        logits = f"{p}.router_mm"
        if router_bias or dead:
            b = rng.standard_normal(experts) * 0.1
            b[list(dead)] = dead_bias
            br = add(f"{p}.router.bias", b)
            nodes.append(helper.make_node("Add", [logits, br], [f"{p}.router_logits"], name=f"{p}/router/Add"))
            logits = f"{p}.router_logits"
        fused = 2 if swiglu else 1  # gate and up rows interleaved in fc1
        fc1 = add(f"{p}.experts.fc1", rng.standard_normal((experts, fused * inter, hidden)) / np.sqrt(hidden))
        fc2 = add(f"{p}.experts.fc2", rng.standard_normal((experts, hidden, inter)) / np.sqrt(inter))
        b1 = add(f"{p}.experts.fc1_bias", rng.standard_normal((experts, fused * inter)) * 0.1) if bias else ""
        b2 = add(f"{p}.experts.fc2_bias", rng.standard_normal((experts, hidden)) * 0.1) if bias else ""
        inputs = [x, logits, fc1, b1, fc2, b2]
        attrs = {"k": k, "normalize_routing_weights": normalize, "activation_type": activation}
        if swiglu:
            attrs.update(activation_type="swiglu", swiglu_fusion=1)
        out = f"{p}.moe_out" if layers > 1 else "y"
        nodes.append(helper.make_node("MoE", inputs, [out], domain="com.microsoft", name=f"{p}/MoE", **attrs))
        if layers > 1:
            y = f"{p}.out" if layer < layers - 1 else "y"
            nodes.append(helper.make_node("Add", [x, out], [y], name=f"{p}/Add"))
            x = y
    graph = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", elem, [tokens, hidden])],
                              [helper.make_tensor_value_info("y", elem, [tokens, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                   helper.make_opsetid("com.microsoft", 1)])


def tokens_like(hidden: int, count: int, seed: int = 1, dtype=np.float32) -> np.ndarray:
    """``count`` standard normal token rows of width ``hidden``: calibration / evaluation data."""
    return np.random.default_rng(seed).standard_normal((count, hidden)).astype(dtype)


def ort_qmoe(*, tokens: int | str = "tokens", hidden: int = 16, inter: int = 32, experts: int = 4, k: int = 2,
             normalize: int = 1, dead: Sequence[int] = (), dead_bias: float = -1e4, seed: int = 0) -> ModelProto:
    """One com.microsoft QMoE layer, 8-bit weights: ``y = QMoE(x, MatMul(x, W_r) + b_r)``.

    fc1 [E, H, D] and fc2 [E, D, H] are uint8 with per-row scales [E, H] / [E, D] and the default zero point
    128 (ONNX Runtime 1.32's CPU kernel dequantises ``(w - 128) * scale``). ``dead`` as in ``ort_moe``.
    """
    rng = np.random.default_rng(seed)
    wr = rng.standard_normal((hidden, experts)) / np.sqrt(hidden)
    br = rng.standard_normal(experts) * 0.1
    br[list(dead)] = dead_bias
    arrays = {
        "moe.router.weight": wr.astype(np.float32), "moe.router.bias": br.astype(np.float32),
        "moe.experts.fc1": rng.integers(0, 256, (experts, inter, hidden), dtype=np.uint8),
        "moe.experts.fc1_scales": (rng.random((experts, inter)) * 0.02 / np.sqrt(hidden)).astype(np.float32),
        "moe.experts.fc2": rng.integers(0, 256, (experts, hidden, inter), dtype=np.uint8),
        "moe.experts.fc2_scales": (rng.random((experts, hidden)) * 0.02 / np.sqrt(inter)).astype(np.float32),
    }
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    nodes = [helper.make_node("MatMul", ["x", "moe.router.weight"], ["router_mm"], name="moe/router/MatMul"),
             helper.make_node("Add", ["router_mm", "moe.router.bias"], ["router_logits"], name="moe/router/Add"),
             helper.make_node("QMoE", ["x", "router_logits", "moe.experts.fc1", "moe.experts.fc1_scales", "",
                                       "moe.experts.fc2", "moe.experts.fc2_scales"], ["y"], domain="com.microsoft",
                              name="moe/QMoE", k=k, expert_weight_bits=8, activation_type="relu",
                              normalize_routing_weights=normalize)]
    graph = helper.make_graph(nodes, "qmoe", [helper.make_tensor_value_info("x", 1, [tokens, hidden])],
                              [helper.make_tensor_value_info("y", 1, [tokens, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                   helper.make_opsetid("com.microsoft", 1)])


def export_mixtral(path, *, hidden: int = 64, inter: int = 128, experts: int = 4, k: int = 2, layers: int = 1,
                   heads: int = 4, kv_heads: int = 2, vocab: int = 100, tokens: int = 16, dead: Sequence[int] = (),
                   seed: int = 0, dynamic: bool = True):
    """transformers' MixtralModel, random init, exported written out (``experts_implementation='batched_mm'``,
    the legacy TorchScript exporter, opset 17) to ``path``; inputs input_ids and attention_mask [batch,
    sequence] (symbolic when ``dynamic``), output last_hidden_state.

    The export holds per layer: router ``MatMul(x, W_r [D, E]) -> Cast -> Softmax -> TopK(k)``, the top-k
    values divided by their sum, and the expert ids gathering ``gate_up_proj [E, 2I, D]`` and ``down_proj
    [E, D, I]`` for batched MatMuls.

    ``dead``: experts the router never selects. Hidden unit 0 of the token embeddings is set to 10, so every
    token's normalised hidden state has a large positive unit 0 before each MoE block (the other units stay
    small at this initialisation); the live experts' router rows ignore it and the dead experts' rows read
    only it, with weight -100: their logits
    are around -800 and their softmax weight is 0 in float32.
    """
    import warnings

    import torch
    from transformers import MixtralConfig, MixtralModel

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
                           num_experts_per_tok=k, vocab_size=vocab, experts_implementation="batched_mm",
                           attn_implementation="eager")
    model = MixtralModel(config).eval()
    if dead:
        with torch.no_grad():
            model.embed_tokens.weight[:, 0] = 10.0
            for layer in model.layers:
                layer.mlp.gate.weight[:, 0] = 0.0  # the live experts' logits ignore unit 0
                layer.mlp.gate.weight[list(dead)] = 0.0
                layer.mlp.gate.weight[list(dead), 0] = -100.0

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"}} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped(), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes=axes)
    return path


def token_ids(count: int, length: int, vocab: int = 100, seed: int = 1) -> dict[str, np.ndarray]:
    """Random token ids [count, length] and an all-ones mask: feeds for ``export_mixtral``'s model."""
    ids = np.random.default_rng(seed).integers(0, vocab, (count, length)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
