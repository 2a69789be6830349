"""Latency measurement with ONNX Runtime; several models are timed interleaved so noise hits all alike."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from graphprune.errors import GraphpruneError, VerificationError
from graphprune.runtime import ModelLike, first_line, make_session, model_label, run_session


@dataclass
class LatencyResult:
    model: str
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    rounds: int
    samples_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not samples:
            del data["samples_ms"]
        return data


def compare_latency(
    models: Sequence[ModelLike],
    inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],  # shared, or one per model
    rounds: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    providers: Sequence[Any] | None = None,
    optimization: str = "all",
) -> list[LatencyResult]:
    """One session per model; each round runs every model once, so drift and noise are shared."""
    if rounds < 1 or warmup < 0:
        raise GraphpruneError(f"latency needs rounds >= 1 and warmup >= 0 (got {rounds} and {warmup}).")
    labels = _labels(models)
    sessions = [
        make_session(m, providers=providers, threads=threads, optimization=optimization, label=label)
        for m, label in zip(models, labels, strict=True)
    ]
    per_model = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs] * len(models)
    feeds = [_feeds_for(s, x, label) for s, x, label in zip(sessions, per_model, labels, strict=True)]
    for _ in range(warmup):
        for session, feed, label in zip(sessions, feeds, labels, strict=True):
            run_session(session, feed, label)
    times: list[list[float]] = [[] for _ in sessions]
    for round_index in range(rounds):
        # Rotate the starting model so none always runs first (right after another model's cache traffic).
        for offset in range(len(sessions)):
            i = (round_index + offset) % len(sessions)
            times[i].append(_timed_run(sessions[i], feeds[i], labels[i]))
    return [_result(label, samples) for label, samples in zip(labels, times, strict=True)]


def measure_latency(
    model: ModelLike,
    inputs: Mapping[str, np.ndarray],
    rounds: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    providers: Sequence[Any] | None = None,
    optimization: str = "all",
) -> LatencyResult:
    return compare_latency([model], inputs, rounds, warmup, threads, providers, optimization)[0]


def _labels(models: Sequence[ModelLike]) -> list[str]:
    labels = [model_label(m) for m in models]
    if len(set(labels)) == len(labels):
        return labels
    return [f"model {i} ({label})" for i, label in enumerate(labels)]


def _feeds_for(session: Any, inputs: Mapping[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    # Checked once up front, so the timed loop only calls session.run.
    wanted = [i.name for i in session.get_inputs()]
    missing = [name for name in wanted if name not in inputs]
    if missing:
        raise GraphpruneError(f"no input data for {label}'s input(s) {', '.join(missing)}.")
    return {name: inputs[name] for name in wanted}


def _timed_run(session: Any, feeds: dict[str, np.ndarray], label: str) -> float:
    start = time.perf_counter()
    try:
        session.run(None, feeds)
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime failed to run {label}: {first_line(exc)}") from exc
    return (time.perf_counter() - start) * 1000.0


def _result(label: str, samples: list[float]) -> LatencyResult:
    data = np.asarray(samples)
    return LatencyResult(
        model=label,
        median_ms=float(np.median(data)),
        p90_ms=float(np.percentile(data, 90)),
        mean_ms=float(np.mean(data)),
        min_ms=float(np.min(data)),
        rounds=len(samples),
        samples_ms=list(samples),
    )


def dense_vs_pruned(dense: ModelLike, pruned: ModelLike, overrides: Mapping[str, tuple[int, ...]] | None = None,
                    seed: int = 0, rounds: int = 100, resized: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Median ONNX Runtime CPU latency of both models, timed interleaved on the same inputs.

    ``resized`` (KV caches that pruning shrank): the pruned model gets the kept slice of those inputs.
    """
    from graphprune.inputs import make_inputs
    from graphprune.verify import take_kept

    inputs = make_inputs(dense, overrides=overrides, seed=seed)
    results = compare_latency([dense, pruned], [inputs, take_kept(inputs, resized)], rounds=rounds)
    return {
        "rounds": rounds,
        "inputs": {name: list(value.shape) for name, value in inputs.items()},
        "dense": results[0].to_dict(),
        "pruned": results[1].to_dict(),
        "speedup": results[0].median_ms / results[1].median_ms,
    }
