"""Benchmark one model, or two interleaved, per ONNX Runtime execution provider.

``bench`` returns plain dicts (JSON-ready), so `graphprune bench` and other reports can share it.
Each provider gets its own sessions; with two models the runs alternate one by one (the first
model of each round rotates), so machine drift and noise hit both models alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.errors import GraphpruneError
from graphprune.inputs import InputSpec, _looks_like_image, input_specs, make_inputs, resolve_shape
from graphprune.latency import _feeds_for, _timed_run
from graphprune.runtime import ModelLike, import_onnxruntime, make_session, model_label

# Short name -> (execution provider, what to install to get it).
PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": ("CPUExecutionProvider", "graphprune[cpu] (onnxruntime)"),
    "cuda": ("CUDAExecutionProvider", "graphprune[gpu] (onnxruntime-gpu) with a CUDA-capable GPU"),
    "tensorrt": ("TensorrtExecutionProvider", "graphprune[gpu] (onnxruntime-gpu) with TensorRT"),
    "trt": ("TensorrtExecutionProvider", "graphprune[gpu] (onnxruntime-gpu) with TensorRT"),
    "openvino": ("OpenVINOExecutionProvider", "onnxruntime-openvino instead of onnxruntime"),
    "qnn": ("QNNExecutionProvider", "onnxruntime-qnn instead of onnxruntime"),
    "directml": ("DmlExecutionProvider", "onnxruntime-directml instead of onnxruntime"),
    "dml": ("DmlExecutionProvider", "onnxruntime-directml instead of onnxruntime"),
    "coreml": ("CoreMLExecutionProvider", "onnxruntime on macOS"),
    "rocm": ("ROCMExecutionProvider", "an onnxruntime build with ROCm"),
    "migraphx": ("MIGraphXExecutionProvider", "onnxruntime-migraphx instead of onnxruntime"),
    "dnnl": ("DnnlExecutionProvider", "an onnxruntime build with oneDNN"),
    "xnnpack": ("XnnpackExecutionProvider", "an onnxruntime build with XNNPACK"),
    "cann": ("CANNExecutionProvider", "onnxruntime-cann instead of onnxruntime"),
}


def cpu_name(default: str = "unknown") -> str:
    """The processor's model name from /proc/cpuinfo (for benchmark footers), or ``default``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def parse_providers(text: str | Sequence[str]) -> list[str]:
    """"cpu,cuda" (or a list) -> short names, checked to be known; order kept, repeats dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        name = item.strip().lower()
        if not name:
            continue
        if name not in PROVIDERS:
            raise GraphpruneError(f"unknown provider '{item.strip()}': use one of {', '.join(PROVIDERS)}.")
        if name not in names:
            names.append(name)
    if not names:
        raise GraphpruneError(f"no provider given: use one or more of {', '.join(PROVIDERS)}, comma-separated.")
    return names


def check_available(names: Sequence[str]) -> None:
    """Raise one line naming the first provider this onnxruntime lacks, and what to install."""
    available = set(import_onnxruntime().get_available_providers())
    for name in names:
        ep, install = PROVIDERS[name]
        if ep not in available:
            raise GraphpruneError(
                f"provider '{name}' ({ep}) is not available in the installed onnxruntime: install {install}."
            )


def bench_shapes(model: ModelLike, batch: int | None = None, seq: int | None = None,
                 overrides: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: the first symbolic dim of each input is the batch, a second the sequence.

    ``overrides`` (from --input-shape) win; image-like inputs (N, C, H, W) keep their H and W defaults.
    """
    overrides = dict(overrides or {})
    specs = input_specs(model)
    known = {s.name for s in specs}
    unknown = [n for n in overrides if n not in known]
    if unknown:
        raise GraphpruneError(f"the model has no input named {', '.join(map(repr, unknown))} "
                              f"(its inputs: {', '.join(sorted(known)) or 'none'}).")
    return {s.name: _shape(s, overrides.get(s.name), batch, seq) for s in specs}


def _symbolic_axes(spec: InputSpec) -> list[int]:
    return [i for i, d in enumerate(spec.shape or ()) if not isinstance(d, int)]


def _shape(spec: InputSpec, override: tuple[int, ...] | None, batch: int | None, seq: int | None) -> tuple[int, ...]:
    dims = list(resolve_shape(spec, override, batch=batch or 1))
    if override is not None:
        return tuple(dims)
    axes = _symbolic_axes(spec)
    if batch is not None and axes:
        dims[axes[0]] = batch
    if seq is not None and len(axes) > 1 and not _looks_like_image(spec):
        dims[axes[1]] = seq
    return tuple(dims)


def items_per_run(model: ModelLike, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Batch size fed: the first input's first symbolic dim, else its leading dim, else 1."""
    specs = [s for s in input_specs(model) if s.name in shapes]
    for spec in specs:
        axes = _symbolic_axes(spec)
        if axes and shapes[spec.name]:
            return int(shapes[spec.name][axes[0]])
    for spec in specs:
        if shapes[spec.name]:
            return int(shapes[spec.name][0])
    return 1


def stats(samples_ms: Sequence[float], items: int) -> dict[str, float]:
    data = np.asarray(samples_ms, dtype=np.float64)
    p10, p25, median, p75, p90 = np.percentile(data, [10, 25, 50, 75, 90])
    return {
        "median_ms": float(median),
        "p10_ms": float(p10),
        "p25_ms": float(p25),
        "p75_ms": float(p75),
        "p90_ms": float(p90),
        "min_ms": float(data.min()),
        "mean_ms": float(data.mean()),
        "rounds": int(data.size),
        "throughput": float(items / (median / 1000.0)) if median > 0 else float("inf"),
    }


def bench(
    models: Sequence[ModelLike],
    providers: str | Sequence[str] = ("cpu",),
    batch: int | None = None,
    seq: int | None = None,
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    rounds: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    seed: int = 0,
    optimization: str = "all",
    samples: bool = False,
) -> dict[str, Any]:
    """Time each model on each provider; with several models, runs are interleaved run by run.

    Returns {"models", "inputs", "batch", "rounds", "warmup", "threads", "providers": [...]}, where each
    provider entry has per-model stats (ms and items/s), "speedup" (first model's median over each
    other's) and "order" (model index of every timed run, in the order they ran).
    """
    if not models:
        raise GraphpruneError("bench needs at least one model.")
    if rounds < 1 or warmup < 0:
        raise GraphpruneError(f"bench needs rounds >= 1 and warmup >= 0 (got {rounds} and {warmup}).")
    for option, value in (("batch", batch), ("seq", seq), ("threads", threads)):
        if value is not None and value < 1:
            raise GraphpruneError(f"--{option} must be 1 or more: got {value}.")
    names = parse_providers(providers)
    check_available(names)
    labels = _labels(models)
    shapes = [bench_shapes(m, batch, seq, overrides) for m in models]
    feeds = [make_inputs(m, overrides=s, seed=seed) for m, s in zip(models, shapes, strict=True)]
    items = [items_per_run(m, s) for m, s in zip(models, shapes, strict=True)]
    result: dict[str, Any] = {
        "models": labels,
        "inputs": {label: {k: list(v) for k, v in s.items()} for label, s in zip(labels, shapes, strict=True)},
        "batch": items[0],
        "rounds": rounds,
        "warmup": warmup,
        "threads": threads,
        "providers": [],
    }
    for name in names:
        result["providers"].append(_bench_provider(name, models, labels, feeds, items, rounds, warmup,
                                                   threads, optimization, samples))
    return result


def _labels(models: Sequence[ModelLike]) -> list[str]:
    labels = [model_label(m).strip("'") for m in models]
    if len(set(labels)) == len(labels):
        return labels
    return [f"#{i} {label}" for i, label in enumerate(labels)]


def _bench_provider(name: str, models: Sequence[ModelLike], labels: list[str], feeds: list[dict[str, np.ndarray]],
                    items: list[int], rounds: int, warmup: int, threads: int | None, optimization: str,
                    samples: bool) -> dict[str, Any]:
    ep = PROVIDERS[name][0]
    chain = [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]
    sessions = [make_session(m, providers=chain, threads=threads, optimization=optimization, label=label)
                for m, label in zip(models, labels, strict=True)]
    runs = [_feeds_for(s, f, label) for s, f, label in zip(sessions, feeds, labels, strict=True)]
    for _ in range(warmup):
        for session, feed, label in zip(sessions, runs, labels, strict=True):
            _timed_run(session, feed, label)
    times: list[list[float]] = [[] for _ in sessions]
    order: list[int] = []
    for r in range(rounds):
        for offset in range(len(sessions)):
            i = (r + offset) % len(sessions)
            times[i].append(_timed_run(sessions[i], runs[i], labels[i]))
            order.append(i)
    entries = []
    for label, session, t, n in zip(labels, sessions, times, items, strict=True):
        entry = {"model": label, "items": n, **stats(t, n), "active_providers": list(session.get_providers())}
        if samples:
            entry["samples_ms"] = t
        entries.append(entry)
    base = entries[0]["median_ms"]
    return {
        "provider": name,
        "execution_provider": ep,
        "models": entries,
        "speedup": [base / e["median_ms"] if e["median_ms"] > 0 else None for e in entries[1:]],
        "order": order,
    }


