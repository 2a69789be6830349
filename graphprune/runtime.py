"""ONNX Runtime access and the model-or-path plumbing shared by verify, metrics and latency."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from graphprune.errors import GraphpruneError, RuntimeMissingError, VerificationError

ModelLike = onnx.ModelProto | str | os.PathLike

# protobuf cannot serialise a message of 2 GiB or more; such protos must go through a file.
PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}
_ORT_PREFIX = re.compile(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
# ORT kernels prefix messages with "<source file>:<line> <C++ signature>", which tells a user nothing.
_ORT_SOURCE = re.compile(r"\S*onnxruntime_src/\S+:\d+\s+(?:[\w:<>*&]+\s+){0,3}[\w:~<>]+\([^)]*\)\s*")
_MESSAGE_LIMIT = 400


def import_onnxruntime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeMissingError() from exc
    return onnxruntime


def model_path(model: ModelLike) -> Path | None:
    if isinstance(model, onnx.ModelProto):
        return None
    return Path(os.fspath(model))


def model_label(model: ModelLike) -> str:
    path = model_path(model)
    if path is not None:
        return f"'{path}'"
    name = model.graph.name  # type: ignore[union-attr]
    return f"the in-memory model '{name}'" if name else "the in-memory model"


def load_structure(model: ModelLike) -> onnx.ModelProto:
    """The proto itself, or the file's graph without its external weights (dims and types stay)."""
    path = model_path(model)
    if path is None:
        return model  # type: ignore[return-value]
    if not path.is_file():
        raise GraphpruneError(f"model file '{path}' does not exist.")
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:
        raise GraphpruneError(f"cannot read '{path}' as an ONNX model: {first_line(exc)}") from exc


def is_oversized(proto: onnx.ModelProto) -> bool:
    return proto.ByteSize() >= PROTOBUF_LIMIT


@contextmanager
def saved_copy(proto: onnx.ModelProto) -> Iterator[Path]:
    """Write a proto (weights as external data) to a temporary folder, for APIs that need a path."""
    with tempfile.TemporaryDirectory(prefix="graphprune-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(proto, os.fspath(path), save_as_external_data=True, location="model.onnx.data")
        yield path


def first_line(exc: BaseException) -> str:
    """The error message as one line (checker messages wrap mid-sentence), without ORT's code noise."""
    text = _ORT_SOURCE.sub("", _ORT_PREFIX.sub("", str(exc)))
    text = " ".join(text.split())
    if len(text) > _MESSAGE_LIMIT:
        text = text[: _MESSAGE_LIMIT - 3].rstrip() + "..."
    return text or type(exc).__name__


def make_session(
    model: ModelLike,
    providers: Sequence[Any] | None = None,
    threads: int | None = None,
    optimization: str = "all",
    label: str | None = None,
) -> Any:
    """An InferenceSession (CPU unless providers say otherwise); load failures become VerificationError."""
    ort = import_onnxruntime()
    options = _session_options(ort, threads, optimization)
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    label = label or model_label(model)
    path = model_path(model)
    if path is not None:
        return _create(ort, os.fspath(path), options, providers, label)
    proto: onnx.ModelProto = model  # type: ignore[assignment]
    if not is_oversized(proto):
        return _create(ort, proto.SerializeToString(), options, providers, label)
    tmp = tempfile.TemporaryDirectory(prefix="graphprune-")
    path = Path(tmp.name) / "model.onnx"
    onnx.save_model(proto, os.fspath(path), save_as_external_data=True, location="model.onnx.data")
    session = _create(ort, os.fspath(path), options, providers, label)
    # ORT may memory-map the external weights, so the folder must live as long as the session.
    session._graphprune_tmpdir = tmp
    return session


def _session_options(ort: ModuleType, threads: int | None, optimization: str) -> Any:
    if optimization not in _OPT_LEVELS:
        choices = ", ".join(_OPT_LEVELS)
        raise GraphpruneError(f"unknown graph optimisation level '{optimization}': use one of {choices}.")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[optimization])
    if threads:
        options.intra_op_num_threads = threads
    # Failures are re-raised with ORT's message; its own error log would only repeat them.
    options.log_severity_level = 4
    return options


def _create(ort: ModuleType, source: str | bytes, options: Any, providers: list[Any], label: str) -> Any:
    try:
        return ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime cannot load {label}: {first_line(exc)}") from exc


def run_session(session: Any, feeds: Mapping[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    """Run with only the inputs the session declares; failures become VerificationError."""
    wanted = [i.name for i in session.get_inputs()]
    missing = [name for name in wanted if name not in feeds]
    if missing:
        raise VerificationError(f"no input data for {label}'s input(s) {', '.join(missing)}.")
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, {name: feeds[name] for name in wanted})
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime failed to run {label}: {first_line(exc)}") from exc
    return dict(zip(names, values, strict=True))
