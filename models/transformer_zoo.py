"""Tiny transformers (random init, structure only) exported with both torch exporters.

Used as models "nobody tuned for" by the channel-pruning tests; the transformers issue grows this.

Two families of forms:

- ``NAMES``: encoders and decoders without a cache, ``(input_ids, attention_mask) -> last_hidden_state``
  (ViT: ``pixel_values -> last_hidden_state``).
- ``KV_NAMES``: causal LMs that take and return a key/value cache, flattened as graph inputs
  ``past_key_values.{i}.key`` / ``.value`` of shape ``[batch, kv_heads, PAST, head_dim]`` and outputs
  ``logits`` plus ``present.{i}.key`` / ``.value`` of shape ``[batch, kv_heads, PAST + SEQ, head_dim]``.
  transformers keeps the cache in a ``DynamicCache``; a wrapper builds one from the flat past tensors
  and flattens the presents, so both exporters see tensors only.

Every shape is static (batch 1, SEQ tokens, PAST cached positions).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .zoo import default_cache_dir

SEQ = 16
PAST = 8  # cached positions the KV forms are exported with
NAMES = ("bert", "gpt2", "llama_gqa", "mistral", "qwen2", "vit")
KV_NAMES = ("gpt2_kv", "llama_kv", "mistral_kv", "qwen2_kv")
LAYERS = 2
HEADS = 4
KV_HEADS = {"gpt2_kv": 4, "llama_kv": 2, "mistral_kv": 2, "qwen2_kv": 2}  # key/value heads per layer
HEAD_DIM = 16


def _build(name: str):
    import torch
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        GPT2Model,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaModel,
        MistralConfig,
        MistralForCausalLM,
        MistralModel,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2Model,
        ViTConfig,
        ViTModel,
    )

    torch.manual_seed(0)
    small = {"num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": 128}
    gqa = {"hidden_size": 64, "num_key_value_heads": 2, "vocab_size": 100, **small}
    if name == "bert":
        return BertModel(BertConfig(hidden_size=64, vocab_size=100, **small))
    if name in ("gpt2", "gpt2_kv"):
        config = GPT2Config(n_embd=64, n_layer=LAYERS, n_head=HEADS, vocab_size=100)
        return GPT2Model(config) if name == "gpt2" else GPT2LMHeadModel(config)
    if name in ("llama_gqa", "llama_kv"):
        return LlamaModel(LlamaConfig(**gqa)) if name == "llama_gqa" else LlamaForCausalLM(LlamaConfig(**gqa))
    if name in ("mistral", "mistral_kv"):
        config = MistralConfig(**gqa)
        return MistralModel(config) if name == "mistral" else MistralForCausalLM(config)
    if name in ("qwen2", "qwen2_kv"):
        config = Qwen2Config(**gqa)
        return Qwen2Model(config) if name == "qwen2" else Qwen2ForCausalLM(config)
    if name == "vit":
        return ViTModel(ViTConfig(hidden_size=64, image_size=32, patch_size=8, **small))
    raise KeyError(f"unknown transformer {name!r}; known: {', '.join(NAMES + KV_NAMES)}")


def cache_names(name: str) -> tuple[list[str], list[str]]:
    """Names of the past (input) and present (output) cache tensors of a KV form, per layer key then value."""
    past = [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    return past, present


def sample_inputs(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if name == "vit":
        return {"pixel_values": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}
    feeds = {"input_ids": rng.integers(0, 100, (1, SEQ)).astype(np.int64)}
    if name not in KV_NAMES:
        feeds["attention_mask"] = np.ones((1, SEQ), dtype=np.int64)
        return feeds
    feeds["attention_mask"] = np.ones((1, PAST + SEQ), dtype=np.int64)
    for past in cache_names(name)[0]:
        feeds[past] = rng.standard_normal((1, KV_HEADS[name], PAST, HEAD_DIM)).astype(np.float32)
    return feeds


def output_names(name: str) -> list[str]:
    if name in KV_NAMES:
        return ["logits", *cache_names(name)[1]]
    return ["last_hidden_state"]


def _wrapped(name: str):
    import torch

    model = _build(name).eval()

    class LastHidden(torch.nn.Module):
        """Keyword arguments and a plain tensor output, which both exporters take."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args):
            if name == "vit":
                return self.model(pixel_values=args[0]).last_hidden_state
            return self.model(input_ids=args[0], attention_mask=args[1], use_cache=False).last_hidden_state

    class WithCache(torch.nn.Module):
        """Flat past tensors in, logits and flat present tensors out: a DynamicCache lives only inside."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *past):
            from transformers import DynamicCache

            cache = DynamicCache(list(zip(past[0::2], past[1::2])))
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                             use_cache=True)
            presents = []
            for layer in out.past_key_values.layers:
                presents.extend((layer.keys, layer.values))
            return (out.logits, *presents)

    return WithCache() if name in KV_NAMES else LastHidden()


def _dynamic_axes(name: str, inputs: list[str], outputs: list[str]) -> dict[str, dict[int, str]]:
    """Batch and sequence axes left symbolic, as deployment exports (optimum, HF) write them."""
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"},
                                       "attention_mask": {0: "batch", 1: "total"},
                                       "pixel_values": {0: "batch"},
                                       "last_hidden_state": {0: "batch", 1: "sequence"},
                                       "logits": {0: "batch", 1: "sequence"}}
    if name in KV_NAMES:
        past, present = cache_names(name)
        axes.update({n: {0: "batch", 2: "past"} for n in past})
        axes.update({n: {0: "batch", 2: "total"} for n in present})
    return {k: v for k, v in axes.items() if k in inputs or k in outputs}


def export(name: str, exporter: str = "legacy", cache_dir: str | Path | None = None) -> Path:
    """Export a zoo transformer: exporter "legacy" (TorchScript, opset 17), "legacy-dynamic" (the same
    with symbolic batch and sequence axes) or "dynamo"."""
    import torch
    import transformers

    out_dir = Path(cache_dir) / "zoo" if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{name}{exporter}{torch.__version__}{transformers.__version__}".encode()).hexdigest()[:12]
    path = out_dir / f"tf-{name}-{exporter}-{key}.onnx"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = sample_inputs(name)
    args = tuple(torch.from_numpy(v) for v in inputs.values())
    outputs = output_names(name)
    fd, tmp = tempfile.mkstemp(prefix=f".tf-{name}-", suffix=".onnx.tmp", dir=out_dir)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter in ("legacy", "legacy-dynamic"):
                dynamic = _dynamic_axes(name, list(inputs), outputs) if exporter == "legacy-dynamic" else None
                torch.onnx.export(_wrapped(name), args, tmp, dynamo=False, opset_version=17,
                                  input_names=list(inputs), output_names=outputs, dynamic_axes=dynamic)
            else:
                torch.onnx.export(_wrapped(name), args, tmp, dynamo=True, external_data=False,
                                  input_names=list(inputs), output_names=outputs, verbose=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
