"""The SparseMLP CPU kernel (kernels/sparse_mlp.c) called through ctypes, outside ONNX Runtime.

It reads the kept weight rows in place, which the standard-ops form cannot (Gather copies them). It is
not registered with ONNX Runtime: that needs ORT's C API header (onnxruntime_c_api.h), which no package
reachable here ships (see docs/sparse_mlp.md). Until then it serves to check the semantics against the
numpy reference and to measure what a row-reading kernel gains on this machine.
"""

from __future__ import annotations

import ctypes

import numpy as np

from graphprune.errors import GraphpruneError
from graphprune.runtime_ops import native
from graphprune.runtime_ops.sparse_mlp import ACTIVATIONS, MLPWeights, SparseMLPConfig, wina_scales

_MODES = {"threshold": 1, "topk": 2}  # 0: keep all


class _Params(ctypes.Structure):
    _fields_ = [
        ("d_in", ctypes.c_int64), ("d_hidden", ctypes.c_int64), ("d_out", ctypes.c_int64),
        ("w_up", ctypes.c_void_p), ("w_gate", ctypes.c_void_p), ("w_down", ctypes.c_void_p),
        ("b_up", ctypes.c_void_p), ("b_gate", ctypes.c_void_p), ("b_down", ctypes.c_void_p),
        ("s_in", ctypes.c_void_p), ("s_hidden", ctypes.c_void_p),
        ("activation", ctypes.c_int32), ("input_mode", ctypes.c_int32), ("hidden_mode", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("input_threshold", ctypes.c_float), ("hidden_threshold", ctypes.c_float),
        ("input_k", ctypes.c_int64), ("hidden_k", ctypes.c_int64),
    ]


def _library() -> ctypes.CDLL:
    lib = native.load("sparse_mlp")
    lib.gp_sparse_mlp.argtypes = [ctypes.POINTER(_Params), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.gp_sparse_mlp.restype = ctypes.c_int
    return lib


def available() -> tuple[bool, str]:
    """Whether the kernel builds and loads here, and if not, why."""
    try:
        _library()
    except native.KernelUnavailable as exc:
        return False, str(exc)
    return True, ""


class SparseMLPKernel:
    """One MLP's float32 weights prepared once (contiguous, WINA scales); call with x [..., D]."""

    def __init__(self, weights: MLPWeights[np.ndarray], config: SparseMLPConfig, threads: int = 1) -> None:
        self._lib = _library()
        keep = {f: _f32(getattr(weights, f)) for f in ("w_up", "w_down", "w_gate", "b_up", "b_down", "b_gate")}
        wina_in, wina_hidden = (bool(s and s.wina) for s in (config.input, config.hidden))
        if wina_in or wina_hidden:
            s_in, s_hidden = wina_scales(MLPWeights(keep["w_up"], keep["w_down"], keep["w_gate"]))
        keep["s_in"] = s_in if wina_in else None
        keep["s_hidden"] = s_hidden if wina_hidden else None
        self._arrays = keep  # the struct points into these; they must live as long as self
        d_in, hidden = keep["w_up"].shape
        self.d_in, self.d_out = d_in, keep["w_down"].shape[1]
        pointers = {f: _ptr(keep[f]) for f in keep}
        self._params = _Params(d_in=d_in, d_hidden=hidden, d_out=self.d_out, activation=ACTIVATIONS.index(
            config.activation), threads=threads, **pointers)
        for prefix, selection, extent in (("input", config.input, d_in), ("hidden", config.hidden, hidden)):
            if selection is not None:
                if selection.k is not None and selection.k > extent:
                    raise GraphpruneError(f"SparseMLP kernel: {prefix} top-k {selection.k} exceeds the {extent} "
                                          f"{prefix} entries.")
                setattr(self._params, f"{prefix}_mode", _MODES[selection.mode])
                setattr(self._params, f"{prefix}_threshold", selection.threshold or 0.0)
                setattr(self._params, f"{prefix}_k", selection.k or 0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.d_in)
        y = np.empty((rows.shape[0], self.d_out), dtype=np.float32)
        if self._lib.gp_sparse_mlp(ctypes.byref(self._params), _ptr(rows), rows.shape[0], _ptr(y)):
            raise MemoryError("the SparseMLP kernel could not allocate its work buffers.")
        return y.reshape(*x.shape[:-1], self.d_out)


def _f32(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.ascontiguousarray(array, dtype=np.float32)


def _ptr(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data
