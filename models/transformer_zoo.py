"""Tiny transformers (random init, structure only) exported with both torch exporters.

Used as models "nobody tuned for" by the channel-pruning tests; the transformers issue grows this.
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
NAMES = ("bert", "gpt2", "llama_gqa", "vit")


def _build(name: str):
    import torch
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2Model,
        LlamaConfig,
        LlamaModel,
        ViTConfig,
        ViTModel,
    )

    torch.manual_seed(0)
    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    if name == "bert":
        return BertModel(BertConfig(hidden_size=64, vocab_size=100, **small))
    if name == "gpt2":
        return GPT2Model(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100))
    if name == "llama_gqa":
        return LlamaModel(LlamaConfig(hidden_size=64, num_key_value_heads=2, vocab_size=100, **small))
    if name == "vit":
        return ViTModel(ViTConfig(hidden_size=64, image_size=32, patch_size=8, **small))
    raise KeyError(f"unknown transformer {name!r}; known: {', '.join(NAMES)}")


def sample_inputs(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if name == "vit":
        return {"pixel_values": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}
    return {"input_ids": rng.integers(0, 100, (1, SEQ)).astype(np.int64),
            "attention_mask": np.ones((1, SEQ), dtype=np.int64)}


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

    return LastHidden()


def export(name: str, exporter: str = "legacy", cache_dir: str | Path | None = None) -> Path:
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
    fd, tmp = tempfile.mkstemp(prefix=f".tf-{name}-", suffix=".onnx.tmp", dir=out_dir)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "legacy":
                torch.onnx.export(_wrapped(name), args, tmp, dynamo=False, opset_version=17,
                                  input_names=list(inputs), output_names=["last_hidden_state"])
            else:
                torch.onnx.export(_wrapped(name), args, tmp, dynamo=True, external_data=False,
                                  input_names=list(inputs), output_names=["last_hidden_state"], verbose=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
