"""Least-squares reconstruction of consumer weights after channel removal (FLAP/SlimGPT-style).

A consumer y = W x (+ b) that loses the input columns R keeps K. On calibration rows X of its input (the
dense model's activations; a Conv's rows are its im2col windows, columns = channel × kernel tap), the new
kept weights W' and a bias shift d solve

    min ‖X W − X_K W' − 1 dᵀ‖² + λ ‖W' − W_K‖²,    λ = damp · mean(diag(X_Kᵀ X_K)),

from the accumulated Gram matrix XᵀX, Xᵀ1 and the row count (never X itself): the normal equations are
[[G_KK + λI, s_K], [s_Kᵀ, n]] [W'; dᵀ] = [G_K: W + λ W_K; sᵀ W]. The ridge pulls towards the plainly
sliced weights W_K rather than towards 0: directions the calibration data never excites keep their
original weights, and since (W_K, 0) is feasible the calibration objective is never worse than plain
slicing (nor than FLAP bias compensation, which is (W_K, W_R mean(X_R))). With damp → 0 and removed
channels that are exact linear combinations of kept ones, the outputs are unchanged.

The bias shift d goes into the consumer's bias like compensate.py's (Conv input 2, Gemm C scaled by
alpha/beta, a constant Add after a MatMul); without a bias slot the solve has no intercept. A consumer
reconstructed here is not bias-compensated again. Grouped convs are skipped (depthwise ones need
nothing: their output channel goes with the input). Memory: one features² float64 Gram per consumer,
consumers over ``max_features`` columns skipped, and the calibration set is run once per ``gram_bytes``
of Gram matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.analysis.graph import DimGraph, ParamUse
from graphprune.analysis.rules.base import attr
from graphprune.calibration import Gram, Patches, collect_gram
from graphprune.compensate import add_to_bias
from graphprune.criteria import consumers
from graphprune.plan import PrunePlan

DAMP = 1e-2  # measured on MobileNetV2 (docs/quality_mobilenet_v2.md): 1e-5..1 all help, 1e-2 the most
MAX_FEATURES = 4096
GRAM_BYTES = 1 << 30


@dataclass
class ReconstructionReport:
    reconstructed: list[str] = field(default_factory=list)  # consumer node names
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node name, why)
    # Per reconstructed consumer: relative calibration error ‖XW − X_K W'‖ / ‖XW‖ of plain slicing and
    # of the reconstruction (the objective without the ridge term).
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    passes: int = 0  # runs over the calibration set

    def to_dict(self) -> dict:
        sliced = [e[0] for e in self.errors.values()]
        rebuilt = [e[1] for e in self.errors.values()]
        return {"reconstructed": len(self.reconstructed),
                "skipped": [{"node": n, "reason": r} for n, r in self.skipped],
                "mean_relative_error_sliced": float(np.mean(sliced)) if sliced else None,
                "mean_relative_error_reconstructed": float(np.mean(rebuilt)) if rebuilt else None,
                "calibration_passes": self.passes}


@dataclass
class _Target:
    use: ParamUse
    kept: np.ndarray  # kept positions of the weight's input axis
    request: tuple[str, Patches]
    taps: int  # kernel taps per input channel (1 for Gemm and MatMul)
    bias: tuple[ir.Node, int] | None  # where the intercept goes
    bias_scale: float = 1.0

    @property
    def features(self) -> int:
        return int(self.use.array.shape[self.axis]) * self.taps

    @property
    def axis(self) -> int:
        node = self.use.node
        if node.op_type == "Conv" or (node.op_type == "Gemm" and attr(node, "transB", 0)):
            return 1
        return 0

    def columns(self) -> np.ndarray:
        """The weight as [input features, outputs] in float64."""
        w = np.asarray(self.use.array, dtype=np.float64)
        node = self.use.node
        if node.op_type == "Conv":
            return w.reshape(w.shape[0], -1).T
        if node.op_type == "Gemm" and attr(node, "transB", 0):
            return w.T
        return w

    def store(self, columns: np.ndarray) -> np.ndarray:
        """Inverse of columns(), in the weight's dtype."""
        node, w = self.use.node, self.use.array
        if node.op_type == "Conv":
            array = columns.T.reshape(w.shape)
        elif node.op_type == "Gemm" and attr(node, "transB", 0):
            array = columns.T
        else:
            array = columns
        return np.ascontiguousarray(array.astype(w.dtype))


def reconstruct_consumers(g: DimGraph, plan: PrunePlan, calibration: Iterable, *, damp: float = DAMP,
                          max_features: int = MAX_FEATURES, gram_bytes: int = GRAM_BYTES,
                          progress: Callable[[int], None] | None = None
                          ) -> tuple[ReconstructionReport, set[tuple[ir.Node, int]]]:
    """Reconstruct every consumer that loses input columns; returns the report and the weight uses done
    (compensate_bias skips those). Must run on the unsliced weights, before rewrite.apply_removal."""
    report = ReconstructionReport()
    targets = _targets(g, plan, max_features, report)
    done: set[tuple[ir.Node, int]] = set()
    # Every pass must see the dense model's activations: solutions are written after the last pass.
    solved: list[tuple[_Target, np.ndarray, np.ndarray]] = []
    for batch in _by_memory(targets, gram_bytes):
        report.passes += 1
        grams = collect_gram(g.model, [t.request for t in batch], calibration, progress=progress)
        for t in batch:
            gram = grams.get(t.request)
            if gram is None or gram.count == 0:
                report.skipped.append((t.use.node.name, "no calibration rows for its input"))
                continue
            result = _solve(t, gram, damp, report)
            if isinstance(result, str):
                report.skipped.append((t.use.node.name, result))
            else:
                solved.append((t, *result))
        del grams
    for t, rebuilt, shift in solved:
        why = _write(g, t, rebuilt, shift)
        if why:
            report.skipped.append((t.use.node.name, why))
            report.errors.pop(t.use.node.name, None)
        else:
            report.reconstructed.append(t.use.node.name)
            done.add((t.use.node, t.use.index))
    return report, done


def _by_memory(targets: list[_Target], budget: int) -> list[list[_Target]]:
    """Consecutive targets whose Gram matrices (shared inputs counted once) fit in ``budget`` bytes."""
    batches: list[list[_Target]] = []
    seen: set = set()
    used = 0
    for t in targets:
        size = 0 if t.request in seen else 8 * t.features**2
        if batches and used + size > budget:
            batches.append([])
            seen, used, size = set(), 0, 8 * t.features**2
        if not batches:
            batches.append([])
        batches[-1].append(t)
        seen.add(t.request)
        used += size
    return batches


def _targets(g: DimGraph, plan: PrunePlan, max_features: int, report: ReconstructionReport) -> list[_Target]:
    removed = plan.removed
    found: dict[tuple[ir.Node, int], _Target] = {}
    for decision in plan.decisions:
        if not len(decision.removed):
            continue
        for c in consumers(g, decision.group):
            key = (c.use.node, c.use.index)
            if key in found:
                continue
            kept = g.space.kept_positions(c.use.axes[c.axis], removed)
            if kept is None:
                continue
            target, why = _target(g, c.use, c.axis, kept)
            if target is None:
                if why and c.use.node.name not in {n for n, _ in report.skipped}:
                    report.skipped.append((c.use.node.name, why))
                continue
            if target.features > max_features:
                why = f"{target.features} input features (channels × taps) exceed the limit {max_features}"
                report.skipped.append((c.use.node.name, why))
                continue
            found[key] = target
    return list(found.values())


def _target(g: DimGraph, use: ParamUse, axis: int, kept: np.ndarray) -> tuple[_Target | None, str]:
    """The reconstruction target of one weight use, or None and why not (empty: nothing to do)."""
    node, w = use.node, use.array
    x = node.inputs[0]
    if x is None or g.is_param(x):
        return None, f"{node.op_type} with a constant input"
    if node.op_type == "Conv" and use.index == 1:
        groups = attr(node, "group", 1)
        if groups > 1 and w.shape[1] == 1 and w.shape[0] == groups:
            return None, ""  # depthwise: the output channel goes with the removed input channel
        if groups != 1 or axis != 1:
            return None, "grouped conv"
        kernel = tuple(int(k) for k in w.shape[2:])
        geometry = (tuple(attr(node, a, ()) or ()) for a in ("strides", "pads", "dilations"))
        patches = Patches(1, kernel, *geometry, attr(node, "auto_pad", "NOTSET") or "NOTSET")
        bias = (node, 2) if _bias_ok(g, node, 2, w.shape[0]) else None
        return _Target(use, kept, (x.name, patches), int(np.prod(kernel, dtype=np.int64)), bias), ""
    if node.op_type == "Gemm" and use.index == 1 and w.ndim == 2:
        if axis != (1 if attr(node, "transB", 0) else 0):
            return None, "Gemm weight read on an unexpected axis"
        beta = float(attr(node, "beta", 1.0))
        out = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
        bias = (node, 2) if beta != 0.0 and _bias_ok(g, node, 2, out) else None
        patches = Patches(0 if attr(node, "transA", 0) else 1)
        scale = float(attr(node, "alpha", 1.0)) / beta if beta != 0.0 else 1.0
        return _Target(use, kept, (x.name, patches), 1, bias, scale), ""
    if node.op_type == "MatMul" and use.index == 1 and w.ndim == 2:
        if axis != 0:
            return None, "MatMul weight read on an unexpected axis"
        bias = None
        uses = list(node.outputs[0].uses())
        if len(uses) == 1 and uses[0].node.op_type == "Add":
            add, index = uses[0].node, 1 - uses[0].idx
            constant = g.const(add.inputs[index])
            if constant is not None and constant.shape == (w.shape[1],) and (add, index) in g.params:
                bias = (add, index)
        return _Target(use, kept, (x.name, Patches(-1)), 1, bias), ""
    return None, f"{node.op_type} consumer not supported"


def _bias_ok(g: DimGraph, node: ir.Node, index: int, out: int) -> bool:
    current = node.inputs[index] if index < len(node.inputs) else None
    if current is None:
        return True
    bias = g.const(current)
    return bias is not None and (node, index) in g.params and bool(bias.shape) and bias.shape[-1] == out


def solve(gram: Gram, weights: np.ndarray, columns: np.ndarray, damp: float,
          intercept: bool) -> tuple[np.ndarray, np.ndarray, float, float]:
    """New kept weights [len(columns), out], the bias shift [out], and the relative calibration error
    of plain slicing and of the solution. ``weights``: [features, out], float64."""
    G, s, n = gram.gram, gram.total, float(gram.count)
    k = len(columns)
    G_kk = G[np.ix_(columns, columns)]
    scale = float(np.mean(np.diag(G_kk))) if k else 0.0
    lam = damp * scale if scale > 0 else 1.0
    target = G[columns] @ weights  # Z_Kᵀ X W
    sliced = weights[columns]
    if intercept:
        A = np.zeros((k + 1, k + 1))
        A[:k, :k] = G_kk + lam * np.eye(k)
        A[:k, k] = A[k, :k] = s[columns]
        A[k, k] = n
        rhs = np.vstack([target + lam * sliced, s @ weights])
    else:
        A = G_kk + lam * np.eye(k)
        rhs = target + lam * sliced
    try:
        theta = np.linalg.solve(A, rhs)
    except np.linalg.LinAlgError:
        theta = np.linalg.lstsq(A, rhs, rcond=None)[0]
    new, shift = (theta[:k], theta[k]) if intercept else (theta, np.zeros(weights.shape[1]))
    full = float(np.einsum("ij,ij->", weights, G @ weights))  # ‖XW‖²

    def error(w_k: np.ndarray, d: np.ndarray) -> float:
        # ‖XW − X_K w_k − 1 dᵀ‖² expanded over the Gram matrix.
        cross = np.einsum("ij,ij->", w_k, target) + float(d @ (s @ weights))
        own = (np.einsum("ij,ij->", w_k, G_kk @ w_k) + 2 * float(d @ (s[columns] @ w_k)) + n * float(d @ d))
        return float(np.sqrt(max(full - 2 * cross + own, 0.0) / full)) if full > 0 else 0.0

    return new, shift, error(sliced, np.zeros_like(shift)), error(new, shift)


def _solve(t: _Target, gram: Gram, damp: float,
           report: ReconstructionReport) -> tuple[np.ndarray, np.ndarray] | str:
    """The full rebuilt weight (removed columns untouched: slicing drops them) and the bias shift, or why
    not."""
    weights = t.columns()
    if gram.gram.shape[0] != weights.shape[0]:
        return (f"its input has {gram.gram.shape[0]} features on the calibration data, its weight "
                f"{weights.shape[0]}")
    columns = (t.kept[:, None] * t.taps + np.arange(t.taps)).reshape(-1)
    new, shift, before, after = solve(gram, weights, columns, damp, t.bias is not None)
    if not np.all(np.isfinite(new)) or not np.all(np.isfinite(shift)):
        return "the least-squares solve was not finite"
    if after > before + 1e-9:  # only rounding can do this (the ridge keeps W_K feasible): keep slicing
        return "reconstruction did not lower the calibration error"
    rebuilt = weights.copy()
    rebuilt[columns] = new
    report.errors[t.use.node.name] = (before, after)
    return t.store(rebuilt), shift


def _write(g: DimGraph, t: _Target, rebuilt: np.ndarray, shift: np.ndarray) -> str:
    if t.bias is not None and np.any(shift):
        node, index = t.bias
        use = t.use
        out_axis = use.axes[0] if use.node.op_type == "Conv" else use.axes[1 - t.axis]
        why = add_to_bias(g, node, index, shift * t.bias_scale, out_axis, use.array.dtype)
        if why:
            return why
    _replace_weight(g, t.use, rebuilt)
    return ""


def _replace_weight(g: DimGraph, use: ParamUse, array: np.ndarray) -> None:
    """A fresh initializer for this reader only (the old one may feed other nodes)."""
    name = f"{use.value.name}__reconstructed{len(g.graph.initializers)}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=use.value.type,
                     const_value=ir.tensor(array, name=name))
    g.graph.register_initializer(value)
    use.node.replace_input_with(use.index, value)
    use.value = value
