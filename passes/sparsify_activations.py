"""sparsify-activations: MLP blocks become SparseMLP nodes that skip the weight rows of small activations.

TEAL: an entry of the MLP input ``x`` (before the up and gate projections) or of the hidden activation
(before the down projection) whose magnitude is at most a per-layer threshold is zeroed, and the weight
row it would multiply is not read. WINA (``wina``): the score is ``|v_i|`` times the L2 norm of that
weight row instead. Top-k (``mode="topk"``): each row keeps its ``k = round((1 - sparsity) * width)``
highest scores. The op and its exact semantics are runtime_ops/sparse_mlp.py (docs/sparse_mlp.md).

MLPs are found by passes/mlp_patterns.py (ReLU, GELU in both exported forms, tanh-GELU, SiLU, and their
gated forms such as SwiGLU); other candidates are declined with the reason.

Calibration: the dense model runs over the calibration batches (or, without them, ``samples`` random
input sets: the report says which) with every MLP's input and hidden activation as extra outputs. Per
layer and side, a uniform random sample of at most ``max_samples`` scores is kept (bounded memory); the
threshold is its ``sparsity`` quantile, so that share of the entries is at most the threshold and is
dropped (``sparsity = 0`` gives threshold 0, the dense MLP).

Those thresholds come from the dense model's activations, as TEAL's do; but a block behind sparse blocks
reads other activations, and drops more than the target (all-MiniLM-L6-v2 at 0.9 on the hidden side:
0.94-0.95 in layers 2-5). So, after the SparseMLP nodes replace the MLPs and before the dense nodes are
removed, the model runs over the batches again (``refits`` times, default once) with each block's input
and its dense hidden activation as outputs: the dense nodes then read the sparse upstream blocks, so these
are exactly what each SparseMLP selects on, and the thresholds are re-fitted to them.

Measurement: one more such pass counts the dropped share per layer and side (``measured``) and the share
that was zero anyway (``already_zero``: ReLU), and compares the model outputs with the dense ones (on the
first batches whose dense outputs fit in ``MAX_REFERENCE_BYTES``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from graphprune.calibration import _run_with_outputs
from graphprune.errors import GraphpruneError
from graphprune.inputs import random_feeds
from graphprune.passes.mlp_patterns import MLP, Declined, find_mlps
from graphprune.rewrite import cleanup
from graphprune.runtime_ops.sparse_mlp import (
    MIN_OPSET,
    MLPWeights,
    Selection,
    SparseMLPConfig,
    _initializer,
    insert_sparse_mlp,
    wina_scales,
)
from graphprune.verify import VerifyReport, _aggregate, fidelity

WHERE = ("auto", "input", "hidden", "both")
MODES = ("threshold", "topk")
# Dense outputs kept to compare the sparse model with on the calibration batches (the first ones that fit).
MAX_REFERENCE_BYTES = 256 << 20
# Random calibration inputs use seeds from seed + this; verification uses seed, seed + 1, ... (drop-layers too).
SAMPLING_SEED_OFFSET = 1000


@dataclass
class SparsifyActivationsConfig:
    """``sparsity``: the share of entries to drop, in [0, 1]; ``where``: which matmul inputs (auto: both
    for a plain ReLU MLP, whose hidden activation is mostly zero already, the hidden one otherwise).

    ``calibration``: re-iterable feed dicts, at most ``max_batches`` used; without it ``samples`` random
    input sets at ``input_shapes``. ``progress`` is called with the number of batches done.
    """

    sparsity: float = 0.5
    where: str = "auto"
    wina: bool = False
    mode: str = "threshold"
    calibration: Iterable | None = None
    max_batches: int | None = None
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    samples: int = 4
    seed: int = 0
    max_samples: int = 1 << 18  # scores kept per layer and side for the quantile
    refits: int = 1  # passes re-fitting the thresholds on the sparsified model (0: dense activations only)
    progress: Callable[[int], None] | None = None


@dataclass
class SideChoice:
    """The selection on one matmul input of one layer, and what it did on the calibration data."""

    side: str  # input or hidden
    width: int
    threshold: float | None = None
    k: int | None = None
    measured: float = 0.0  # share of entries dropped
    already_zero: float = 0.0  # share of entries that were exactly zero

    def to_dict(self) -> dict:
        return {"side": self.side, "width": self.width, "threshold": self.threshold, "k": self.k,
                "measured_sparsity": self.measured, "already_zero": self.already_zero}


@dataclass
class LayerChoice:
    mlp: dict  # mlp_patterns.MLP.to_dict()
    node: str  # the SparseMLP node
    sides: list[SideChoice]

    def to_dict(self) -> dict:
        return {**self.mlp, "node": self.node, "sides": [s.to_dict() for s in self.sides]}


@dataclass
class SparsifyReport:
    layers: list[LayerChoice] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)
    data: str = ""
    calibration_fidelity: VerifyReport | None = None  # outputs vs dense on the calibration batches


def check_options(sparsity: float, where: str, mode: str) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise GraphpruneError(f"--sparsity must be in [0, 1] (the share of activations to drop): got {sparsity:g}.")
    if where not in WHERE:
        raise GraphpruneError(f"--where must be one of {', '.join(WHERE)}: got '{where}'.")
    if mode not in MODES:
        raise GraphpruneError(f"--mode must be one of {', '.join(MODES)}: got '{mode}'.")


class SparsifyActivationsPass(ir.passes.InPlacePass):
    name = "sparsify-activations"

    def __init__(self, config: SparsifyActivationsConfig | None = None) -> None:
        super().__init__()
        self.config = config or SparsifyActivationsConfig()
        self.report = SparsifyReport()
        self.mlps: list[MLP] = []
        self.batches_run = 0  # over all passes, for progress

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config = self.config
        check_options(config.sparsity, config.where, config.mode)
        opset = model.graph.opset_imports.get("", model.opset_imports.get("", 0))
        if opset < MIN_OPSET:
            raise GraphpruneError(f"the model's opset {opset} is below {MIN_OPSET}, which SparseMLP needs: convert "
                                  "it with onnx.version_converter first.")
        self.mlps, declined = find_mlps(model)
        self.report = SparsifyReport(declined=declined)
        if not self.mlps:
            first = f"; {len(declined)} candidate(s) declined, first '{declined[0].down}': {declined[0].reason}" \
                if declined else ""
            raise GraphpruneError("the model has no MLP block (up projection, activation, down projection with "
                                  f"constant weights){first}.")
        batches, self.report.data = _batches(model, config)
        sides = [_sides(mlp, config.where) for mlp in self.mlps]
        arrays = [_arrays(mlp) for mlp in self.mlps]
        scales = [wina_scales(a) if config.wina else None for a in arrays]
        dense, samples = self._calibrate(model, batches, sides, scales)
        configs = [SparseMLPConfig(mlp.activation, mlp.gated,
                                   **{side: _selection(samples, i, side, mlp, config) for side in chosen})
                   for i, (mlp, chosen) in enumerate(zip(self.mlps, sides, strict=True))]
        nodes = self._insert(model, configs)
        if config.mode == "threshold":
            for _ in range(config.refits):
                configs = self._refit(model, batches, configs, scales, nodes)
        self._measure(model, batches, configs, scales, dense, nodes)
        cleanup(model)
        return ir.passes.PassResult(model, modified=True)

    def _calibrate(self, model: ir.Model, batches: Iterable, sides: list[tuple[str, ...]],
                   scales: list) -> tuple[list[list[np.ndarray]], dict]:
        """Dense outputs per batch, and per (layer, side) a sample of scores (threshold mode)."""
        config = self.config
        outputs = [v.name for v in model.graph.outputs if _is_float(v)]
        wanted = {(i, side): _side_value(mlp, side).name for i, mlp in enumerate(self.mlps) for side in sides[i]}
        rng = np.random.default_rng(config.seed)
        samples = {key: ScoreSample(config.max_samples, rng) for key in wanted} if config.mode == "threshold" else {}
        dense: list[list[np.ndarray]] = []
        kept_bytes = 0
        names = [*outputs, *wanted.values()] if samples else outputs
        for arrays in _run_with_outputs(model, names, batches, self._tick()):
            reference = [np.asarray(arrays[n]) for n in outputs]
            kept_bytes += sum(a.nbytes for a in reference)
            if kept_bytes <= MAX_REFERENCE_BYTES or not dense:
                dense.append(reference)
            for (i, side), sample in samples.items():
                sample.add(_scores(arrays[wanted[(i, side)]], _scale(scales[i], side)))
        return dense, samples

    def _insert(self, model: ir.Model, configs: list[SparseMLPConfig]) -> list[ir.Node]:
        """A SparseMLP node per block, reading the (possibly already replaced) input, replacing its output."""
        replaced: dict[ir.Value, ir.Value] = {}
        nodes = []
        for mlp, cfg in zip(self.mlps, configs, strict=True):
            x = replaced.get(mlp.x, mlp.x)
            node = insert_sparse_mlp(model, x, _weight_values(model, mlp), cfg, replace=mlp.out, name=mlp.name)
            replaced[mlp.out] = node.outputs[0]
            nodes.append(node)
        return nodes

    def _refit(self, model: ir.Model, batches: Iterable, configs: list[SparseMLPConfig], scales: list,
               nodes: list[ir.Node]) -> list[SparseMLPConfig]:
        """Thresholds again, from what each SparseMLP reads with the blocks before it sparse already."""
        wanted = self._probes(configs, nodes)
        rng = np.random.default_rng(self.config.seed + 1)
        samples = {key: ScoreSample(self.config.max_samples, rng) for key in wanted}
        for arrays in _run_with_outputs(model, list(wanted.values()), batches, self._tick()):
            for (i, side), name in wanted.items():
                samples[(i, side)].add(_scores(arrays[name], _scale(scales[i], side)))
        refitted = []
        for i, (cfg, node) in enumerate(zip(configs, nodes, strict=True)):
            changes = {}
            for side in ("input", "hidden"):
                if getattr(cfg, side) is not None:
                    threshold = samples[(i, side)].threshold(self.config.sparsity)
                    changes[side] = replace(getattr(cfg, side), threshold=threshold)
                    node.attributes[f"{side}_threshold"] = ir.AttrFloat32(f"{side}_threshold", threshold)
            refitted.append(replace(cfg, **changes))
        return refitted

    def _probes(self, configs: list[SparseMLPConfig], nodes: list[ir.Node]) -> dict[tuple[int, str], str]:
        """What each SparseMLP selects on, by (block, side): its input, and the dense block's hidden
        activation, whose nodes still run (reading the sparse upstream blocks) until cleanup."""
        wanted: dict[tuple[int, str], str] = {}
        for i, (mlp, cfg, node) in enumerate(zip(self.mlps, configs, nodes, strict=True)):
            if cfg.input is not None:
                wanted[(i, "input")] = node.inputs[0].name
            if cfg.hidden is not None:
                wanted[(i, "hidden")] = mlp.hidden.name
        return wanted

    def _tick(self) -> Callable[[int], None] | None:
        """A progress callback for one more pass over the batches, counting on from the earlier passes."""
        progress = self.config.progress
        if progress is None:
            return None
        start = self.batches_run

        def tick(done: int) -> None:
            self.batches_run = start + done
            progress(self.batches_run)

        return tick

    def _measure(self, model: ir.Model, batches: Iterable, configs: list[SparseMLPConfig], scales: list,
                 dense: list[list[np.ndarray]], nodes: list[ir.Node]) -> None:
        outputs = [v.name for v in model.graph.outputs if _is_float(v)]
        wanted = self._probes(configs, nodes)
        counts = {key: [0, 0, 0] for key in wanted}  # dropped, zero, total
        per_batch = []
        for k, arrays in enumerate(_run_with_outputs(model, [*outputs, *wanted.values()], batches, self._tick())):
            if k < len(dense):
                per_batch.append(fidelity(dict(zip(outputs, dense[k], strict=True)),
                                          {n: np.asarray(arrays[n]) for n in outputs}))
            for (i, side), name in wanted.items():
                selection = getattr(configs[i], side)
                dropped, zero, total = _dropped(arrays[name], selection, _scale(scales[i], side))
                c = counts[(i, side)]
                c[0], c[1], c[2] = c[0] + dropped, c[1] + zero, c[2] + total
        self.report.calibration_fidelity = VerifyReport(len(per_batch), _aggregate(per_batch)) if per_batch else None
        for i, (mlp, cfg, node) in enumerate(zip(self.mlps, configs, nodes, strict=True)):
            chosen = []
            for side in ("input", "hidden"):
                selection = getattr(cfg, side)
                if selection is None:
                    continue
                dropped, zero, total = counts[(i, side)]
                width = mlp.up.weight.shape[0] if side == "input" else mlp.up.width
                chosen.append(SideChoice(side, int(width), selection.threshold, selection.k,
                                         dropped / max(total, 1), zero / max(total, 1)))
            self.report.layers.append(LayerChoice(mlp.to_dict(), node.name, chosen))


class ScoreSample:
    """A uniform random sample of at most ``cap`` scores from a stream: each score gets a random key and
    the ``cap`` smallest keys stay (bounded memory, exact quantiles of the sample)."""

    def __init__(self, cap: int, rng: np.random.Generator) -> None:
        self.cap, self.rng = cap, rng
        self.values = np.empty(0, dtype=np.float32)
        self.keys = np.empty(0, dtype=np.float32)
        self.limit = 1.0  # once full: the largest key kept; larger new keys cannot enter

    def add(self, scores: np.ndarray) -> None:
        values = scores.reshape(-1).astype(np.float32)
        keys = self.rng.random(values.size, dtype=np.float32)
        if self.values.size >= self.cap:
            entering = keys < self.limit
            values, keys = values[entering], keys[entering]
        values, keys = np.concatenate([self.values, values]), np.concatenate([self.keys, keys])
        if values.size > self.cap:
            keep = np.argpartition(keys, self.cap)[: self.cap]
            values, keys = values[keep], keys[keep]
        self.values, self.keys = values, keys
        if values.size >= self.cap:
            self.limit = float(keys.max())

    def threshold(self, share: float) -> float:
        """The largest t with about ``share`` of the scores at most t (0 for share 0: nothing but zeros)."""
        k = round(share * self.values.size)
        if k <= 0 or self.values.size == 0:
            return 0.0
        return float(np.partition(self.values, k - 1)[k - 1])


def _batches(model: ir.Model, config: SparsifyActivationsConfig) -> tuple[Iterable, str]:
    if config.calibration is not None:
        calibration, limit = config.calibration, config.max_batches

        class Limited:  # re-iterable: calibrated once, measured once
            def __iter__(self):
                return itertools.islice(iter(calibration), limit)

        count = sum(1 for _ in Limited())
        if not count:
            raise GraphpruneError("the calibration data holds no samples to calibrate the thresholds on.")
        return Limited(), f"calibration data: {count} batch(es)"
    batches, described = random_feeds(ir.to_proto(model), config.samples, config.input_shapes,
                                      config.seed + SAMPLING_SEED_OFFSET)
    return batches, described + "; give --calib for thresholds fitted to real data"


def _sides(mlp: MLP, where: str) -> tuple[str, ...]:
    if where == "auto":
        return ("input", "hidden") if mlp.activation == "relu" and not mlp.gated else ("hidden",)
    return ("input", "hidden") if where == "both" else (where,)


def _side_value(mlp: MLP, side: str) -> ir.Value:
    return mlp.x if side == "input" else mlp.hidden


def _scale(scales: tuple[np.ndarray, np.ndarray] | None, side: str) -> np.ndarray | None:
    return None if scales is None else scales[0 if side == "input" else 1]


def _scores(array: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    score = np.abs(np.asarray(array))
    return score if scale is None else score * scale


def _selection(samples: dict, i: int, side: str, mlp: MLP, config: SparsifyActivationsConfig) -> Selection:
    if config.mode == "topk":
        width = mlp.up.weight.shape[0] if side == "input" else mlp.up.width
        return Selection(k=int(width) - round(config.sparsity * width), wina=config.wina)
    return Selection(threshold=samples[(i, side)].threshold(config.sparsity), wina=config.wina)


def _dropped(array: np.ndarray, selection: Selection, scale: np.ndarray | None) -> tuple[int, int, int]:
    """(entries the selection drops, entries already zero, entries) of one batch's activation."""
    array = np.asarray(array)
    rows = array.reshape(-1, array.shape[-1])
    if selection.k is not None:
        dropped = rows.shape[0] * (rows.shape[1] - selection.k)
    else:
        score = _scores(rows, scale)
        dropped = int(np.count_nonzero(~(score > np.asarray(selection.threshold, dtype=score.dtype))))
    return dropped, int(np.count_nonzero(rows == 0)), rows.size


def _arrays(mlp: MLP) -> MLPWeights[np.ndarray]:
    return MLPWeights(mlp.up.weight, mlp.down.weight, mlp.gate.weight if mlp.gate else None)


def _weight_values(model: ir.Model, mlp: MLP) -> MLPWeights[ir.Value]:
    """The block's weights as graph values: its initializers where usable as they are, else new ones
    (a Gemm's transposed or scaled weight, a bias of another shape)."""
    values = {}
    for field_name, proj in (("up", mlp.up), ("down", mlp.down), ("gate", mlp.gate)):
        if proj is None:
            values[f"w_{field_name}"] = values[f"b_{field_name}"] = None
            continue
        values[f"w_{field_name}"] = proj.weight_value or _initializer(model.graph, f"{mlp.name}_w_{field_name}",
                                                                      proj.weight)
        if proj.bias is None:
            values[f"b_{field_name}"] = None
        else:
            values[f"b_{field_name}"] = proj.bias_value or _initializer(
                model.graph, f"{mlp.name}_b_{field_name}", proj.bias.astype(proj.weight.dtype))
    return MLPWeights(**values)


def _is_float(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_floating_point()
