"""The tiny zoo transformers after ONNX Runtime's transformer optimizer: the fused forms users deploy.

``optimized(name)`` takes ``transformer_zoo.export(name, exporter)`` through
``onnxruntime.transformers.optimizer.optimize_model`` (4 heads, hidden 64) and writes down the shape of
every value with ONNX Runtime's symbolic shape inference, as ONNX shape inference knows no contrib op
(exporters write value_info the same way). Results are cached beside the zoo exports.

What onnxruntime 1.32 fuses in these exports (``FUSED``; tests/test_ort_fused.py checks it):

- The zoo exports use PyTorch's SDPA attention (Mul-scaled Q and K, IsNaN/Where after the Softmax), which
  no attention fusion of the optimizer matches: only the normalisations and activations fuse.
- ``attention="eager"`` re-exports with the eager attention of transformers: BERT then fuses into
  com.microsoft ``Attention`` (at opt_level 0; at 2 the C++ passes first rewrite the mask and it does
  not). GPT-2, ViT and Llama do not fuse attention either way, and Llama gets no RotaryEmbedding or
  GroupQueryAttention (model types "gpt2", "bert" and "qwen3" alike).
- EmbedLayerNormalization never fuses (BERT's token-type ids go through GatherElements).
- GPT-2 exported by the dynamo exporter makes the optimizer fail (IndexError inside its fusions).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from graphprune.io import working_directory

from . import transformer_zoo
from .zoo import default_cache_dir

MODEL_TYPE = {"bert": "bert", "gpt2": "gpt2", "vit": "vit", "llama_gqa": "gpt2"}  # optimize_model's model_type
# opt_level 0 runs the Python fusions only; 2 runs ONNX Runtime's own passes first (needed for QuickGelu).
OPT_LEVEL = {"bert": 0, "gpt2": 0, "vit": 0, "llama_gqa": 2}
HEADS, HIDDEN = 4, 64

# (name, attention) -> the contrib (and ORT standard-domain) ops the optimized model contains.
FUSED = {
    ("bert", "sdpa"): ("BiasGelu", "SkipLayerNormalization"),
    ("gpt2", "sdpa"): ("FastGelu", "SkipLayerNormalization"),
    ("vit", "sdpa"): ("BiasGelu", "SkipLayerNormalization"),
    ("llama_gqa", "sdpa"): ("QuickGelu", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
    ("bert", "eager"): ("Attention", "BiasGelu", "SkipLayerNormalization"),
}


def _out_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) / "zoo" if cache_dir is not None else default_cache_dir()


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def optimized(name: str, exporter: str = "legacy", cache_dir: str | Path | None = None,
              attention: str = "sdpa", opt_level: int | None = None) -> Path:
    """Path of the ORT-optimized form of zoo transformer ``name`` (cached).

    ``attention``: "sdpa" (the zoo export as is) or "eager" (re-exported with eager attention, legacy
    exporter only, so that BERT's attention fuses). ``opt_level``: the optimizer's (default ``OPT_LEVEL``).
    """
    import onnx
    import onnxruntime
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from onnxruntime.transformers.optimizer import optimize_model

    if name not in MODEL_TYPE:
        raise KeyError(f"no optimizer settings for {name!r}; known: {', '.join(MODEL_TYPE)}")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', not {attention!r}")
    level = OPT_LEVEL[name] if opt_level is None else opt_level
    if attention == "eager":
        if exporter != "legacy":
            raise ValueError("the eager-attention form is exported with the legacy exporter only")
        source = _export_eager(name, cache_dir)
    else:
        source = transformer_zoo.export(name, exporter, cache_dir)
    out_dir = _out_dir(cache_dir)
    path = out_dir / f"ort-{name}-{exporter}-{attention}-O{level}-{_key(f'{source.name}{onnxruntime.__version__}')}.onnx"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ort-") as staging, working_directory(staging):
        # Both ORT tools leave scratch files (external data, a temp model) in the working folder.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = optimize_model(str(Path(source).resolve()), model_type=MODEL_TYPE[name], num_heads=HEADS,
                                   hidden_size=HIDDEN, opt_level=level, use_gpu=False)
        raw = Path(staging) / "fused.onnx"
        fused.save_model_to_file(str(raw))  # sorts the nodes and imports com.microsoft
        proto = SymbolicShapeInference.infer_shapes(onnx.load(raw), auto_merge=True)
    _atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return path


def _atomic_write(path: Path, save: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _export_eager(name: str, cache_dir: str | Path | None) -> Path:
    """The zoo model exported (legacy exporter, opset 17) with transformers' eager attention."""
    import torch
    import transformers

    if name in getattr(transformer_zoo, "KV_NAMES", ()):
        raise ValueError(f"{name!r}: only the forms without a cache have an eager-attention export")
    out_dir = _out_dir(cache_dir)
    path = out_dir / f"tf-{name}-legacy-eager-{_key(f'{name}{torch.__version__}{transformers.__version__}')}.onnx"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped = transformer_zoo._wrapped(name)
    for module in wrapped.modules():
        if isinstance(module, transformers.PreTrainedModel):
            module.set_attn_implementation("eager")
            break
    inputs = transformer_zoo.sample_inputs(name)
    args = tuple(torch.from_numpy(v) for v in inputs.values())

    def save(tmp: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, args, tmp, dynamo=False, opset_version=17, input_names=list(inputs),
                              output_names=["last_hidden_state"])

    _atomic_write(path, save)
    return path
