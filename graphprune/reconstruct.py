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

That one-shot mode fits every consumer on the dense model's activations. The sequential mode at the end
of this module (reconstruct_sequential) fits them after slicing, on the pruned model's own activations,
against the dense outputs.
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
from graphprune.rewrite import set_constant_input
from graphprune.staged import CACHE_BYTES, StagedRunner

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
    passes: int = 0  # runs over the calibration set (sequential: stages, each running both models)
    mode: str = "one-shot"  # or "sequential", or "refit" (reconstruct.refit_targets)

    def to_dict(self) -> dict:
        sliced = [e[0] for e in self.errors.values()]
        rebuilt = [e[1] for e in self.errors.values()]
        return {"reconstructed": len(self.reconstructed),
                "skipped": [{"node": n, "reason": r} for n, r in self.skipped],
                "mean_relative_error_sliced": float(np.mean(sliced)) if sliced else None,
                "mean_relative_error_reconstructed": float(np.mean(rebuilt)) if rebuilt else None,
                "calibration_passes": self.passes, "mode": self.mode}


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
        return _input_axis(self.use.node)

    @property
    def outputs(self) -> int:
        """Output channels the weight produces."""
        return int(self.use.array.shape[0 if self.use.node.op_type == "Conv" else 1 - self.axis])

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


def _input_axis(node: ir.Node) -> int:
    """The weight axis a Conv, Gemm or MatMul reads its input features along."""
    return 1 if node.op_type == "Conv" or (node.op_type == "Gemm" and attr(node, "transB", 0)) else 0


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


def weight_target(g: DimGraph, use: ParamUse, axis: int) -> _Target | None:
    """The target of a weight use with every input position kept: its Gram request, kernel taps and
    [features, outputs] layout, which the obs criterion reads too; None where _target declines."""
    return _target(g, use, axis, np.arange(use.array.shape[axis]))[0]


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
    use.value = set_constant_input(g.graph, use.node, use.index, array, f"{use.value.name}__reconstructed",
                                   use.value.type)


# ---------- sequential reconstruction: fit on the pruned model's own activations ---------------------
#
# One-shot reconstruction above fits every consumer on the dense model's inputs, so the errors of earlier
# pruned layers compound. Sequential mode runs after the weights are sliced: consumers are fitted in
# topological order, a stage at a time, each on its input in the *already pruned and reconstructed* model
# (rows X_p, kept features only) against the dense model's output of the same node (matched by name; kept
# output channels only), less the node's own bias term:
#
#     min ‖Y − X_p W' − 1 dᵀ‖² + λ ‖W' − W_K‖²,    λ = damp · mean(diag(X_pᵀ X_p)),
#
# from X_pᵀX_p, X_pᵀY, X_pᵀ1, 1ᵀY, ‖Y‖² and the row count (λ grows further where the rows are fewer than
# ROWS_PER_FEATURE per feature). Both models run on the same batches; one stage costs one run of each
# over the calibration set. A stage holds consecutive consumers none of which reads another's output
# (directly or not), so each is fitted on inputs that already reflect every fit upstream; beyond
# ``max_stages`` such stages, consecutive ones are merged and a consumer may then be fitted on inputs from
# before an upstream fit of its own stage.


MAX_STAGES = 64  # measured on MobileNetV2: 12 stages (stale inputs inside a stage) lost 0.16 logit cosine
ROWS_PER_FEATURE = 4.0


@dataclass
class SequentialTarget:
    target: _Target
    output: str  # the node's output value (same name in the dense model)
    out_kept: np.ndarray | None  # kept output channels (None: all)
    own_bias: np.ndarray | None  # the dense node's bias term in "XW" units, broadcastable to its output
    alpha: float = 1.0  # Gemm: output = alpha · (XW) + bias term

    @property
    def channel_axis(self) -> int:  # the output's channel axis
        return 1 if self.target.use.node.op_type == "Conv" else -1


def sequential_targets(g: DimGraph, plan: PrunePlan, *, max_features: int = MAX_FEATURES
                       ) -> tuple[ReconstructionReport, list[SequentialTarget]]:
    """The consumers sequential reconstruction will fit, with what it needs of the dense model; call it
    before rewrite.apply_removal (compensate_bias should skip these consumers)."""
    report = ReconstructionReport(mode="sequential")
    order = {node: i for i, node in enumerate(g.model.graph)}
    found = []
    for t in sorted(_targets(g, plan, max_features, report), key=lambda t: order.get(t.use.node, 0)):
        use = t.use
        out_axis = use.axes[0] if use.node.op_type == "Conv" else use.axes[1 - t.axis]
        target = _sequential_target(g, t, g.space.kept_positions(out_axis, plan.removed), report)
        if target is not None:
            found.append(target)
    return report, found


def _sequential_target(g: DimGraph, t: _Target, out_kept: np.ndarray | None,
                       report: ReconstructionReport) -> SequentialTarget | None:
    node, use = t.use.node, t.use
    output = node.outputs[0].name if node.outputs else ""
    if not output:
        report.skipped.append((node.name, "its output has no name to match in the dense model"))
        return None
    own, alpha = None, 1.0
    if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = g.const(node.inputs[2])
        if bias is None:
            report.skipped.append((node.name, "its bias is not a constant"))
            return None
        own = bias.astype(np.float64)
        if node.op_type == "Conv":
            own = own.reshape(-1, *([1] * (len(use.array.shape) - 2)))
    if node.op_type == "Gemm":
        alpha = float(attr(node, "alpha", 1.0))
        if alpha == 0.0:
            report.skipped.append((node.name, "Gemm with alpha 0 ignores its weight"))
            return None
        if own is not None:
            own = own * float(attr(node, "beta", 1.0))
    return SequentialTarget(t, output, out_kept, own, alpha)


def refit_targets(g: DimGraph, dense: ir.Model, *, max_features: int = MAX_FEATURES
                  ) -> tuple[ReconstructionReport, list[SequentialTarget]]:
    """Every linear node of ``g.model`` (ungrouped Conv, Gemm, MatMul with a constant weight) whose output
    the dense model has under the same name with the same channel count: after any pass that keeps node
    and value names (drop-layers, another tool's pruning), reconstruct_sequential then refits each one on
    the modified model's own input against the dense output. Nodes whose output lost channels need the
    kept positions, which only the pass that removed them knows (prune-channels fits those itself)."""
    report = ReconstructionReport(mode="refit")
    dense_channels: dict[str, int | None] = {}
    for node in dense.graph:
        for value in node.outputs:
            shape = value.shape
            axis = 1 if node.op_type == "Conv" else -1
            known = shape is not None and len(shape) >= 2 and isinstance(shape[axis], int)
            dense_channels[value.name] = shape[axis] if known else None  # None: checked while fitting
    found = []
    for node in g.model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or (node, 1) not in g.params:
            continue
        use = g.params[(node, 1)]
        axis = _input_axis(node)
        t, why = _target(g, use, axis, np.arange(use.array.shape[axis]))
        if t is None:
            if why:
                report.skipped.append((node.name, why))
            continue
        if t.features > max_features:
            report.skipped.append((node.name, f"{t.features} input features exceed the limit {max_features}"))
            continue
        output = node.outputs[0].name
        if output not in dense_channels:
            report.skipped.append((node.name, "the dense model has no output of this name"))
            continue
        if dense_channels[output] not in (None, t.outputs):
            why = f"its output has {t.outputs} channels, the dense model's {dense_channels[output]}"
            report.skipped.append((node.name, why))
            continue
        target = _sequential_target(g, t, None, report)
        if target is not None:
            found.append(target)
    return report, found


@dataclass
class _Cross:
    """X_pᵀX_p, X_pᵀ1, X_pᵀY, 1ᵀY, ‖Y‖² and the row count (float64)."""

    gram: Gram
    cross: np.ndarray
    target_total: np.ndarray
    target_sq: float = 0.0

    def add(self, rows: np.ndarray, target: np.ndarray) -> None:
        self.gram.add(rows)
        self.cross += rows.T @ target
        self.target_total += target.sum(0)
        self.target_sq += float(np.einsum("ij,ij->", target, target))


def reconstruct_sequential(g: DimGraph, dense: ir.Model, found: list[SequentialTarget], report:
                           ReconstructionReport, calibration: Iterable, *, damp: float = DAMP,
                           gram_bytes: int = GRAM_BYTES, max_stages: int = MAX_STAGES,
                           cache_bytes: int = CACHE_BYTES,
                           progress: Callable[[int], None] | None = None) -> set[tuple[ir.Node, int]]:
    """Fit ``found`` (sequential_targets) on the sliced model ``g.model`` against ``dense`` (a copy of
    the model before pruning); returns the weight uses rewritten. Each stage runs from the values the
    last one left (staged.StagedRunner, up to ``cache_bytes`` of them per model; 0: from the inputs):
    a stage asks for its consumers' inputs, so the consumers themselves run, with their new weights,
    in the next stage's part of the model."""
    pruned_runner, dense_runner = StagedRunner(calibration, cache_bytes), StagedRunner(calibration, cache_bytes)
    done: set[tuple[ir.Node, int]] = set()
    for stage in _stages(found, max_stages, gram_bytes):
        ready = []
        for s in stage:
            node = s.target.use.node
            x = node.inputs[0]
            s.target.use.value = node.inputs[s.target.use.index]  # slicing may have given it a copy
            if x is None or s.target.use.value is None or s.target.use.value.const_value is None:
                report.skipped.append((node.name, "its input or weight changed when the weights were sliced"))
                continue
            ready.append((s, x.name))
        if not ready:
            continue
        report.passes += 1
        stats: dict[int, _Cross] = {}
        pruned_runs = pruned_runner.run(g.model, [name for _, name in ready], progress)
        dense_runs = dense_runner.run(dense, [s.output for s, _ in ready])
        failed: dict[int, str] = {}
        for inputs, outputs in zip(pruned_runs, dense_runs):
            for i, (s, name) in enumerate(ready):
                if i in failed:
                    continue
                why = _accumulate(stats, i, s, inputs[name], outputs[s.output])
                if why:
                    failed[i] = why
        for i, (s, _) in enumerate(ready):
            node = s.target.use.node
            if i in failed or i not in stats or stats[i].gram.count == 0:
                report.skipped.append((node.name, failed.get(i, "no calibration rows for its input")))
                continue
            result = _solve_sequential(s, stats[i], damp, report)
            if isinstance(result, str):
                report.skipped.append((node.name, result))
                continue
            why = _write(g, s.target, *result)
            if why:
                report.skipped.append((node.name, why))
                report.errors.pop(node.name, None)
            else:
                report.reconstructed.append(node.name)
                done.add((node, s.target.use.index))
    return done


def _stages(found: list[SequentialTarget], max_stages: int, budget: int) -> list[list[SequentialTarget]]:
    """Consecutive (topologically ordered) targets, a new stage wherever one depends on a target of the
    current stage or the stage's matrices would exceed ``budget`` bytes; beyond ``max_stages`` stages,
    neighbours are merged evenly."""
    stages: list[list[SequentialTarget]] = []
    members: set[ir.Node] = set()
    used = 0
    for s in found:
        k = s.target.features
        need = 8 * k * (k + s.target.use.array.shape[0 if s.target.use.node.op_type == "Conv" else -1])
        if not stages or used + need > budget or _depends(s.target.use.node, members):
            stages.append([])
            members, used = set(), 0
        stages[-1].append(s)
        members.add(s.target.use.node)
        used += need
    if len(stages) > max(1, max_stages):
        per = -(-len(stages) // max(1, max_stages))
        stages = [[s for stage in stages[i : i + per] for s in stage] for i in range(0, len(stages), per)]
    return stages


def _depends(node: ir.Node, on: set[ir.Node]) -> bool:
    """Whether ``node`` reads (directly or not) the output of a node in ``on``."""
    if not on:
        return False
    seen: set[ir.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        for value in current.inputs:
            producer = value.producer() if value is not None else None
            if producer is None or producer in seen:
                continue
            if producer in on:
                return True
            seen.add(producer)
            stack.append(producer)
    return False


def _accumulate(stats: dict[int, _Cross], i: int, s: SequentialTarget, x: np.ndarray, y: np.ndarray) -> str:
    t = s.target
    y = np.asarray(y, dtype=np.float64)
    if s.own_bias is not None:
        y = y - (s.own_bias if s.channel_axis == 1 else np.broadcast_to(s.own_bias, y.shape))
    y = np.moveaxis(y, s.channel_axis, -1).reshape(-1, y.shape[s.channel_axis])
    if s.out_kept is not None:
        y = y[:, s.out_kept]
    y = y / s.alpha
    start = 0
    for rows in t.request[1].rows(x):
        block = y[start : start + rows.shape[0]]
        if block.shape[0] != rows.shape[0]:
            return "its input rows and the dense model's output rows do not match"
        start += rows.shape[0]
        if i not in stats:
            stats[i] = _Cross(Gram.empty(rows.shape[1]), np.zeros((rows.shape[1], y.shape[1])),
                              np.zeros(y.shape[1]))
        if stats[i].cross.shape != (rows.shape[1], y.shape[1]):
            return "its input or output changes its channel count between calibration batches"
        stats[i].add(rows, block)
    if start != y.shape[0]:
        return "its input rows and the dense model's output rows do not match"
    return ""


def _solve_sequential(s: SequentialTarget, stats: _Cross, damp: float,
                      report: ReconstructionReport) -> tuple[np.ndarray, np.ndarray] | str:
    t = s.target
    weights = t.columns()  # the sliced weights [kept features, kept outputs]
    G, sums, n = stats.gram.gram, stats.gram.total, float(stats.gram.count)
    if G.shape[0] != weights.shape[0] or stats.cross.shape[1] != weights.shape[1]:
        return (f"its pruned input has {G.shape[0]} features and {stats.cross.shape[1]} target outputs, its "
                f"sliced weight {list(weights.shape)}")
    k = G.shape[0]
    scale = float(np.mean(np.diag(G))) if k else 0.0
    # The target carries every upstream error, so a consumer with few rows per feature over-fits it (on
    # MobileNetV2's 40 calibration crops the last layers reproduced the dense logits on the calibration
    # data and generalised worse): below ROWS_PER_FEATURE the ridge grows as the rows shrink.
    lam = (damp * scale if scale > 0 else 1.0) * max(1.0, ROWS_PER_FEATURE * k / max(n, 1.0))
    intercept = t.bias is not None
    if intercept:
        A = np.zeros((k + 1, k + 1))
        A[:k, :k] = G + lam * np.eye(k)
        A[:k, k] = A[k, :k] = sums
        A[k, k] = n
        rhs = np.vstack([stats.cross + lam * weights, stats.target_total])
    else:
        A = G + lam * np.eye(k)
        rhs = stats.cross + lam * weights
    try:
        theta = np.linalg.solve(A, rhs)
    except np.linalg.LinAlgError:
        theta = np.linalg.lstsq(A, rhs, rcond=None)[0]
    new, shift = (theta[:k], theta[k]) if intercept else (theta, np.zeros(weights.shape[1]))
    if not np.all(np.isfinite(new)) or not np.all(np.isfinite(shift)):
        return "the least-squares solve was not finite"

    def error(w: np.ndarray, d: np.ndarray) -> float:
        # ‖Y − X_p w − 1 dᵀ‖² expanded over the accumulated sums.
        value = (stats.target_sq - 2 * np.einsum("ij,ij->", w, stats.cross) - 2 * float(d @ stats.target_total)
                 + np.einsum("ij,ij->", w, G @ w) + 2 * float(d @ (sums @ w)) + n * float(d @ d))
        return float(np.sqrt(max(value, 0.0) / stats.target_sq)) if stats.target_sq > 0 else 0.0

    before, after = error(weights, np.zeros_like(shift)), error(new, shift)
    if after > before + 1e-9:
        return "reconstruction did not lower the calibration error"
    report.errors[t.use.node.name] = (before, after)
    return t.store(new), shift
