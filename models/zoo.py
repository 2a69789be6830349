"""Registry of zoo architectures and a cached ONNX export for each (legacy and dynamo exporters)."""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cnn

EXPORTERS = ("legacy", "dynamo")
LEGACY_OPSET = 17
# Bump when export() itself changes in a way that alters the written files.
_EXPORT_VERSION = 1


@dataclass(frozen=True)
class ZooEntry:
    name: str
    builder: Callable[[], object]
    input_shape: tuple[int, ...]
    description: str


def _entries() -> dict[str, ZooEntry]:
    img32, img64 = (1, 3, 32, 32), (1, 3, 64, 64)
    rows = [
        ("resnet_basic", cnn.resnet_basic, img32, "ResNet BasicBlocks, stride-2 projection shortcut"),
        (
            "resnet_bottleneck",
            cnn.resnet_bottleneck,
            img32,
            "ResNet Bottleneck blocks with projection shortcut",
        ),
        ("mobilenet_v2", cnn.mobilenet_v2, img32, "inverted residuals, depthwise convs, ReLU6"),
        ("mobilenet_v3", cnn.mobilenet_v3, img64, "SE (hardsigmoid gate), HardSwish, depthwise"),
        ("densenet_block", cnn.densenet_block, img32, "dense blocks with concat growth + transition"),
        ("resnext", cnn.resnext, img32, "grouped 3x3 bottlenecks (groups 8 and 4) with residuals"),
        ("shufflenet_v2", cnn.shufflenet_v2, img64, "chunk split, concat, channel shuffle; stride 1 and 2"),
        ("efficientnet", cnn.efficientnet, img32, "MBConv with SE + SiLU"),
        ("convnext", cnn.convnext, img32, "dw 7x7, channels-last LayerNorm, Linear MLP + GELU, layer scale"),
        ("unet", cnn.unet, img32, "encoder/decoder, ConvTranspose2d upsampling, concat skips"),
        ("inception", cnn.inception, img32, "parallel 1x1/3x3/5x5/pool branches concatenated"),
        ("yolov8_c2f", cnn.yolov8_c2f, img64, "C2f split/concat, upsample+concat neck, box/cls head"),
        ("conv1d_audio", cnn.conv1d_audio, (1, 1, 1600), "Conv1d+BN+ReLU stack, global pool, Linear"),
        ("flatten_gemm", cnn.flatten_gemm, img32, "convs then flatten of a 16x4x4 map into Linear layers"),
    ]
    return {r[0]: ZooEntry(*r) for r in rows}


ZOO: dict[str, ZooEntry] = _entries()


def names() -> list[str]:
    return list(ZOO)


def sample_input(name: str, batch: int = 1, seed: int = 0) -> np.ndarray:
    shape = (batch, *ZOO[name].input_shape[1:])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def default_cache_dir() -> Path:
    root = os.environ.get("GRAPHPRUNE_CACHE") or Path.home() / ".cache" / "graphprune"
    return Path(root) / "zoo"


def _cache_key(entry: ZooEntry, exporter: str, opset: int | None = None) -> str:
    import torch

    # Hash the whole builder module: builders delegate to helper classes whose edits must
    # invalidate the cache too.
    src = inspect.getsource(inspect.getmodule(entry.builder) or entry.builder)
    parts = [entry.name, exporter, torch.__version__, str(_EXPORT_VERSION), str(entry.input_shape), src,
             str(opset)]
    if exporter == "dynamo":
        import onnxscript

        parts.append(onnxscript.__version__)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def export(name: str, exporter: str = "legacy", cache_dir: str | Path | None = None,
           opset: int | None = None) -> Path:
    """Export a zoo model (cached). ``opset`` picks the legacy exporter's opset (default 17)."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    entry = ZOO[name]
    out_dir = Path(cache_dir) / "zoo" if cache_dir is not None else default_cache_dir()
    if opset is not None and exporter != "legacy":
        raise ValueError("only the legacy exporter takes an opset")
    path = out_dir / f"{name}-{exporter}-{_cache_key(entry, exporter, opset)}.onnx"
    if path.exists():
        return path

    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".onnx.tmp", dir=out_dir)
    os.close(fd)
    try:
        _export_to(entry, exporter, Path(tmp), opset)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached files are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _export_to(entry: ZooEntry, exporter: str, dest: Path, opset: int | None = None) -> None:
    import torch

    model = entry.builder()
    x = torch.from_numpy(sample_input(entry.name))
    with torch.no_grad():
        ref = model(x)
    n_out = len(ref) if isinstance(ref, (tuple, list)) else 1
    outputs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]

    if exporter == "legacy":
        axes = {k: {0: "batch"} for k in ["input", *outputs]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                str(dest),
                dynamo=False,
                opset_version=opset or LEGACY_OPSET,
                input_names=["input"],
                output_names=outputs,
                dynamic_axes=axes,
            )
        return

    # verbose=False stops the progress prints; the registry warnings go through the torch.onnx logger.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                external_data=False,
                input_names=["input"],
                output_names=outputs,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    # external_data=False again at save time: embed every weight in the one .onnx file.
    prog.save(str(dest), external_data=False)
