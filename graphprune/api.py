"""The Python API: the same pipeline the CLI drives."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from graphprune.analysis import build_dim_graph
from graphprune.analysis.groups import DEFAULT_KINDS, UNIT_KINDS, find_groups
from graphprune.calibration import input_shapes as declared_shapes
from graphprune.calibration import load_calibration, model_inputs
from graphprune.errors import GraphpruneError
from graphprune.io import load_model, prepare, publish, write_model
from graphprune.latency import dense_vs_pruned
from graphprune.metrics import ModelStats, file_size, model_stats
from graphprune.passes.drop_layers import DropLayersConfig, DropLayersPass, DroppedBlock
from graphprune.passes.prune_channels import PruneChannelsConfig, PruneChannelsPass, reconstruct_mode
from graphprune.plan import PrunePlan
from graphprune.report import AnalysisReport, GroupSummary, declined_nodes, summarise_groups
from graphprune.stat_match import check_mode
from graphprune.verify import VerifyReport, verify

ModelInput = str | os.PathLike | onnx.ModelProto | ir.Model


def _load(model: ModelInput) -> tuple[ir.Model, str, ModelInput]:
    """The model prepared for analysis, a label, and the untouched original to verify against."""
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    if isinstance(model, onnx.ModelProto):
        loaded = ir.from_proto(model)
        prepare(loaded)
        return loaded, model.graph.name or "<model>", model
    return load_model(model), os.fspath(model), model


def analyze(model: ModelInput) -> AnalysisReport:
    """Groups of coupled channels, each prunable or blocked with the reason."""
    loaded, label, _ = _load(model)
    g = build_dim_graph(loaded)
    return AnalysisReport(label, summarise_groups(g, find_groups(g)), declined_nodes(g))


@dataclass
class OptimizeResult:
    model: ir.Model
    plan: PrunePlan
    groups: list[GroupSummary]
    before: ModelStats
    after: ModelStats
    verification: VerifyReport | None
    latency: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    # Graph inputs/outputs that shrank (KV caches): {"value", "axis", "before", "after", "kept"}.
    resized: list[dict[str, Any]] = field(default_factory=list)
    # Allocation mode, budgets requested, estimated and achieved (None: a plain uniform --ratio).
    allocation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **_outcome(self),
            "units_removed": self.plan.units_removed,
            "groups": [g.to_dict() for g in self.groups],
            "allocation": self.allocation,
            "resized_interface": self.resized,
        }


Progress = Callable[[str], AbstractContextManager[Any]]


def _counter(progress: Progress | None) -> Callable[[int], None] | None:
    """A progress object may also count what a long step has done (calibration batches, model runs)."""
    return getattr(progress, "count", None)


def _check_output(model: ModelInput, output: str | os.PathLike | None) -> None:
    if output is None:
        return
    out = Path(output)
    if isinstance(model, (str, os.PathLike)) and Path(model).resolve() == out.resolve():
        raise GraphpruneError(f"{out}: the output path equals the input; choose another file name.")
    if not out.parent.exists():
        raise GraphpruneError(f"{out}: the output folder '{out.parent}' does not exist; create it first.")


# ---------- steps every pass's API shares ----------


def _outcome(result: Any) -> dict[str, Any]:
    """The report keys every pass's result has: settings, dense and pruned stats, fidelity, latency."""
    return {"settings": result.settings, "before": result.before.to_dict(), "after": result.after.to_dict(),
            "fidelity": result.verification.to_dict() if result.verification else None,
            "latency": result.latency}


def _load_counted(model: ModelInput, input_shapes: dict[str, tuple[int, ...]] | None
                  ) -> tuple[ir.Model, str, ModelInput, ModelStats]:
    """_load plus the dense stats, counted on the prepared model (run-time shape arithmetic is folded
    there, so every conv's extents are known; counting the raw file can miss layers)."""
    loaded, label, original = _load(model)
    before = model_stats(ir.to_proto(loaded), input_shapes)
    before.file_bytes = file_size(original) if isinstance(original, (str, os.PathLike)) else original.ByteSize()
    return loaded, label, original, before


def _calibration_set(loaded: ir.Model, calib: str | os.PathLike, batch_size: int, max_batches: int | None,
                     input_shapes: dict[str, tuple[int, ...]] | None):
    names, ranks, dtypes = model_inputs(loaded)
    shapes = {**declared_shapes(loaded), **{k: tuple(v) for k, v in (input_shapes or {}).items()}}
    return load_calibration(calib, names, batch_size, ranks=ranks, dtypes=dtypes, max_batches=max_batches,
                            shapes=shapes)


def _write_checked(loaded: ir.Model, original: ModelInput, output: str | os.PathLike | None, step, *,
                   external_data: bool | None, check: Callable[[Path], Any] | None,
                   input_shapes: dict[str, tuple[int, ...]] | None, seed: int, latency_rounds: int,
                   resized: list[dict] | None = None) -> tuple[Any, ModelStats, dict[str, Any] | None]:
    """Write to a staging folder beside ``output``, verify that very file (``check(staged)``), count its
    stats, time it against the original if asked, then rename it into place: (verification, stats, latency)."""
    speed = None
    with tempfile.TemporaryDirectory(dir=Path(output).parent if output else None, prefix=".graphprune-") as staging:
        staged = Path(staging) / (Path(output).name if output else "pruned.onnx")
        with step("Writing the model"):
            write_model(loaded, staged, external_data)
        report = None
        if check is not None:
            with step("Verifying against the original"):
                report = check(staged)
        after = model_stats(staged, input_shapes)
        if latency_rounds:
            with step("Measuring latency (dense and pruned, interleaved)"):
                speed = dense_vs_pruned(original, staged, input_shapes, seed, latency_rounds, resized or [])
        if output is not None:
            publish(staged, Path(output))
    return report, after, speed


def optimize(
    model: ModelInput,
    output: str | os.PathLike | None = None,
    *,
    ratio: float = 0.3,
    criterion: str = "l2",
    global_rank: bool = False,
    round_to: int = 16,
    exclude: tuple[str, ...] = (),
    max_group_ratio: float = 0.9,
    units: tuple[str, ...] = DEFAULT_KINDS,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    samples: int = 4,
    check: bool = True,
    external_data: bool | None = None,
    latency_rounds: int = 0,
    progress: Progress | None = None,
    calib: str | os.PathLike | None = None,
    compensate: bool | None = None,
    calib_batches: int | None = None,
    calib_batch_size: int = 8,
    allocation: str = "uniform",
    target_flops: float | None = None,
    target_params: float | None = None,
    min_ratio: float = 0.0,
    reconstruct: bool | str = False,
    match_stats: str = "",
    protect: tuple[str, ...] = (),
    target_speedup: float | None = None,
    provider: str = "cpu",
    threads: int | None = None,
) -> OptimizeResult:
    """Prune channels, verify against the original, and (if ``output`` is given) save atomically.

    ``units``: the unit kinds to remove ("channel", "head", "head-repeat", "head-dim", "conv-group").
    Left at its default (``DEFAULT_KINDS`` itself), ``target_speedup`` may add conv-group units when
    these fall short (latency_plan.py); ``units`` passed, even the same kinds, are kept as given.
    ``external_data``: keep weights in ``<output>.data`` (default: only for models over 1 GB).
    ``latency_rounds``: time dense vs pruned on ONNX Runtime CPU, interleaved (0: skip).
    ``progress``: called with a step's description, returns a context manager around the step.
    ``calib``: calibration data (calibration.load_calibration: .npz/.npy file, folder, or a named set such
    as "photos"), read by the activation criteria (wanda-sp, flap, act-norm), obs (Gram matrices) and by
    ``compensate``
    (FLAP bias compensation; on by default when ``calib`` is given). ``calib_batches`` caps the batches.
    ``reconstruct``: least-squares reconstruction of the consumers' kept weights on ``calib``
    (reconstruct.py); it replaces bias compensation for the consumers it reconstructs. True or "one-shot":
    every consumer fitted on the dense model's activations; "sequential": fitted in topological order on
    the pruned model's own activations against the dense outputs (a few more passes over ``calib``).
    ``target_flops`` / ``target_params``: the share of the dense MACs / params to *remove* (0.35 = -35%);
    ``ratio`` is then ignored. ``allocation``: uniform, global (= ``global_rank``) or sensitivity (needs
    ``calib``); see allocation.py. ``min_ratio`` / ``max_group_ratio``: per-group bounds of non-uniform
    allocations and budgets. The achieved MACs/params reduction is counted on the pruned model.
    ``protect``: group roles left whole; "residual": the groups that pass through a sum of activations
    (residual streams).
    ``target_speedup``: prune until the model measured on ``provider`` (an ONNX Runtime execution
    provider, bench.PROVIDERS) runs this many times faster than the original; ``ratio``, ``round_to`` and
    ``allocation`` are then replaced by the latency plan (latency_plan.py), recorded in
    ``settings["latency_plan"]``. ``threads``: ONNX Runtime intra-op threads for that timing (None: ORT's).
    """
    if target_speedup is not None:
        from graphprune.latency_plan import check_target

        if target_flops is not None or target_params is not None:
            raise GraphpruneError("--target-speedup and --target-flops/--target-params both say how much to "
                                  "remove; give one of them.")
        provider = check_target(target_speedup, provider)
        if threads is not None and threads < 1:
            raise GraphpruneError(f"--threads must be 1 or more: got {threads}.")
    if not 0.0 <= ratio < 1.0:
        raise GraphpruneError(f"--ratio must be in [0, 1): got {ratio}.")
    if round_to < 1:
        raise GraphpruneError(f"--round-to must be 1 or more: got {round_to}.")
    if seed < 0:
        raise GraphpruneError(f"--seed must be 0 or more: got {seed}.")
    unknown = [u for u in units if u not in UNIT_KINDS]
    if unknown or not units:
        raise GraphpruneError(f"--units: unknown unit kind '{unknown[0] if unknown else ''}'; "
                              f"choose from {', '.join(UNIT_KINDS)}.")
    if compensate and calib is None:
        raise GraphpruneError("--compensate needs calibration data: give --calib as well.")
    reconstruct_mode(reconstruct)  # an unknown mode fails here
    if reconstruct and calib is None:
        raise GraphpruneError("--reconstruct needs calibration data: give --calib as well.")
    if match_stats:
        check_mode(match_stats)  # an unknown mode fails here
        if calib is None:
            raise GraphpruneError("--match-stats needs calibration data: give --calib as well.")
    if calib_batches is not None and calib_batches < 1:
        raise GraphpruneError(f"--calib-batches must be 1 or more: got {calib_batches}.")
    compensate = calib is not None if compensate is None else compensate
    if allocation == "sensitivity" and calib is None:
        raise GraphpruneError("--allocation sensitivity measures each group's output change on calibration "
                              "data: give --calib as well.")
    if not 0.0 <= min_ratio <= max_group_ratio:
        raise GraphpruneError(f"--min-ratio must be in [0, --max-ratio]: got {min_ratio:g}.")
    _check_output(model, output)
    step = progress or (lambda _: nullcontext())
    with step("Loading"):
        loaded, label, original, before = _load_counted(model, input_shapes)
    config = PruneChannelsConfig(ratio=ratio, criterion=criterion, global_rank=global_rank, round_to=round_to,
                                 exclude=tuple(exclude), max_group_ratio=max_group_ratio, seed=seed,
                                 kinds=tuple(units), compensate=compensate, allocation=allocation,
                                 target_flops=target_flops, target_params=target_params, min_ratio=min_ratio,
                                 reconstruct=reconstruct, match_stats=match_stats, protect=tuple(protect),
                                 input_shapes=input_shapes)
    config.progress = _counter(progress)
    if calib is not None:
        config.calibration = _calibration_set(loaded, calib, calib_batch_size, calib_batches, input_shapes)
    pruning = PruneChannelsPass(config)
    if target_speedup is not None:
        from graphprune.latency_plan import SpeedupPass, SpeedupTarget

        pruning = SpeedupPass(config, SpeedupTarget(target_speedup, provider, input_shapes, seed, threads,
                                                    units_given=units is not DEFAULT_KINDS), original)
    doing = (("collecting activation statistics, " if calib is not None else "")
             + ("measuring sensitivity, " if allocation == "sensitivity" else "")
             + (f"timing layers on {provider} and planning, " if target_speedup is not None else "")
             + "analysing and pruning")
    with step(doing[0].upper() + doing[1:]):
        pruning(loaded)
    if not any(group.prunable for group in pruning.groups):
        reasons = sorted({group.why_not for group in pruning.groups})[:3] or ["no weight groups"]
        if pruning.declined:
            node, why = pruning.declined[0]
            reasons.append(f"{len(pruning.declined)} node(s) declined, first {node.op_type} '{node.name}': {why}")
        raise GraphpruneError(f"{label}: nothing is prunable ({'; '.join(reasons)}); "
                              "run `graphprune analyze` to see every group and why.")
    # Verify the very file we publish (external data included), then rename it into place.
    report, after, speed = _write_checked(
        loaded, original, output, step, external_data=external_data,
        check=(lambda staged: verify(original, staged, overrides=input_shapes, samples=samples,
                                     resized=pruning.resized)) if check else None,
        input_shapes=input_shapes, seed=seed, latency_rounds=latency_rounds, resized=pruning.resized)
    settings = {"model": label, "ratio": ratio, "criterion": criterion, "global": global_rank,
                "round_to": round_to, "exclude": list(exclude), "protect": list(protect), "units": list(units),
                "seed": seed,
                "calib": None if calib is None else os.fspath(calib), "compensate": compensate,
                "criteria_used": sorted({d.criterion for d in pruning.plan.decisions if d.criterion}),
                "compensation": pruning.compensation.to_dict() if pruning.compensation else None,
                "reconstruct": reconstruct,
                "reconstruction": pruning.reconstruction.to_dict() if pruning.reconstruction else None}
    if match_stats:
        settings["stat_matching"] = pruning.matching.to_dict() if pruning.matching else None
    if target_speedup is not None:
        settings["latency_plan"] = pruning.search.to_dict()
    budget = None
    if pruning.plan.allocation is not None:
        budget = {**pruning.plan.allocation.to_dict(),
                  "achieved_flops_reduction": 1 - after.macs / before.macs if before.macs else 0.0,
                  "achieved_params_reduction": 1 - after.params / before.params if before.params else 0.0,
                  "sensitivity": [{"group": s.id, "size": s.size, "kind": s.kind, "sensitivity": s.sensitivity,
                                   "ratio": s.ratio} for s in pruning.summaries if s.sensitivity is not None]}
    return OptimizeResult(loaded, pruning.plan, pruning.summaries, before, after, report, speed, settings,
                          pruning.resized, budget)


@dataclass
class RefitResult:
    model: ir.Model
    reconstruction: dict[str, Any]
    before: VerifyReport | None  # the given model against the dense one
    after: VerifyReport | None  # the refitted model against the dense one

    def to_dict(self) -> dict[str, Any]:
        return {"reconstruction": self.reconstruction,
                "fidelity_before": self.before.to_dict() if self.before else None,
                "fidelity_after": self.after.to_dict() if self.after else None}


def refit(model: ModelInput, dense: ModelInput, output: str | os.PathLike | None = None, *,
          calib: str | os.PathLike, damp: float | None = None, calib_batches: int | None = None,
          calib_batch_size: int = 8, check: bool = True, input_shapes: dict[str, tuple[int, ...]] | None = None,
          samples: int = 4, progress: Progress | None = None) -> RefitResult:
    """Least-squares refit of a modified model's linear layers towards the dense model it came from.

    Usable after any pass or tool that keeps node and value names (drop-layers, another pruner): every
    ungrouped Conv, Gemm and MatMul with a constant weight whose output the dense model has under the same
    name and width is refitted, in topological order, on ``model``'s own input against the dense output
    (reconstruct.refit_targets, reconstruct_sequential). ``calib`` as in ``optimize``. ``check``: verify
    both the given and the refitted model against ``dense`` (the gain shows in ``before``/``after``).
    """
    from graphprune.reconstruct import DAMP, reconstruct_sequential, refit_targets
    from graphprune.rewrite import cleanup

    if calib_batches is not None and calib_batches < 1:
        raise GraphpruneError(f"--calib-batches must be 1 or more: got {calib_batches}.")
    _check_output(model, output)
    step = progress or (lambda _: nullcontext())
    with step("Loading"):
        loaded, label, original = _load(model)
        dense_loaded, _, dense_original = _load(dense)
    calibration = _calibration_set(loaded, calib, calib_batch_size, calib_batches, input_shapes)
    with step("Refitting linear layers on calibration data"):
        g = build_dim_graph(loaded)
        report, found = refit_targets(g, dense_loaded)
        if not found:
            raise GraphpruneError(f"{label}: no linear layer matches the dense model by name and width; refit "
                                  "needs a model derived from the dense one with node names kept.")
        reconstruct_sequential(g, dense_loaded, found, report, calibration,
                               damp=DAMP if damp is None else damp)
        cleanup(loaded)
    before = None
    if check:
        with step("Verifying the given model against the dense model"):
            before = verify(dense_original, original, overrides=input_shapes, samples=samples)
    after, _, _ = _write_checked(
        loaded, original, output, step, external_data=None,
        check=(lambda staged: verify(dense_original, staged, overrides=input_shapes, samples=samples))
        if check else None,
        input_shapes=input_shapes, seed=0, latency_rounds=0)
    return RefitResult(loaded, report.to_dict(), before, after)


@dataclass
class DropLayersResult:
    model: ir.Model
    dropped: list[DroppedBlock]
    blocks: list[dict]  # every residual block found (blocks.ResidualBlock.to_dict)
    before: ModelStats
    after: ModelStats
    verification: VerifyReport | None
    latency: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=dict)  # data, estimated MACs, target reached

    def to_dict(self) -> dict[str, Any]:
        return {
            **_outcome(self),
            "dropped": [d.to_dict() for d in self.dropped],
            "blocks": self.blocks,
            "scoring": self.scoring,
        }


def drop_layers(
    model: ModelInput,
    output: str | os.PathLike | None = None,
    *,
    drop: int | None = None,
    target_flops: float | None = None,
    calib: str | os.PathLike | None = None,
    calib_batches: int | None = None,
    calib_batch_size: int = 8,
    check: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    samples: int = 4,
    seed: int = 0,
    external_data: bool | None = None,
    latency_rounds: int = 0,
    progress: Progress | None = None,
) -> DropLayersResult:
    """Remove whole residual sub-blocks (FinerCut), verify against the original, save atomically.

    ``drop``: how many blocks to remove, or ``target_flops``: the share of the dense MACs to remove
    (0.3 = -30%); exactly one. Blocks are scored on ``calib`` (calibration.load_calibration; at most
    ``calib_batches`` batches of ``calib_batch_size``), or without it on ``samples`` random input sets,
    which the result's ``scoring["data"]`` says. See passes/drop_layers.py for the method.
    """
    if (drop is None) == (target_flops is None):
        raise GraphpruneError("give how much to drop: --drop N (blocks) or --target-flops SHARE, one of them.")
    if calib_batches is not None and calib_batches < 1:
        raise GraphpruneError(f"--calib-batches must be 1 or more: got {calib_batches}.")
    _check_output(model, output)
    step = progress or (lambda _: nullcontext())
    with step("Loading"):
        loaded, label, original, before = _load_counted(model, input_shapes)
    config = DropLayersConfig(drop=drop, target_flops=target_flops, max_batches=calib_batches,
                              input_shapes=input_shapes, samples=samples, seed=seed,
                              progress=_counter(progress))
    if calib is not None:
        config.calibration = _calibration_set(loaded, calib, calib_batch_size, calib_batches, input_shapes)
    dropping = DropLayersPass(config)
    with step("Scoring residual blocks and dropping"):
        dropping(loaded)
    # Verify the very file we publish (external data included), then rename it into place.
    report, after, speed = _write_checked(
        loaded, original, output, step, external_data=external_data,
        check=(lambda staged: verify(original, staged, overrides=input_shapes, samples=samples)) if check else None,
        input_shapes=input_shapes, seed=seed, latency_rounds=latency_rounds)
    settings = {"model": label, "drop": drop, "target_flops": target_flops, "seed": seed,
                "calib": None if calib is None else os.fspath(calib), "calib_batches": calib_batches,
                "calib_batch_size": calib_batch_size}
    scoring = {key: value for key, value in dropping.report.to_dict().items() if key not in ("blocks", "dropped")}
    scoring["achieved_flops_reduction"] = 1 - after.macs / before.macs if before.macs else 0.0
    return DropLayersResult(loaded, dropping.report.dropped, dropping.report.blocks, before, after, report, speed,
                            settings, scoring)


# ---------- sparsify-activations (passes/sparsify_activations.py) ----------


@dataclass
class SparsifyActivationsResult:
    model: ir.Model
    layers: list[Any]  # passes.sparsify_activations.LayerChoice, one per MLP, in graph order
    declined: list[dict]  # MLP candidates left dense, with the reason
    before: ModelStats
    after: ModelStats  # macs: as counted, plus the SparseMLP nodes' expected MACs (see ``macs``)
    verification: VerifyReport | None  # random inputs, against the dense model
    latency: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    data: str = ""  # what the thresholds were calibrated on
    calibration_fidelity: VerifyReport | None = None  # outputs vs dense on the calibration batches
    macs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **_outcome(self),
            "layers": [c.to_dict() for c in self.layers],
            "declined": self.declined,
            "data": self.data,
            "calibration_fidelity": self.calibration_fidelity.to_dict() if self.calibration_fidelity else None,
            "macs": self.macs,
        }


def sparsify_activations(
    model: ModelInput,
    output: str | os.PathLike | None = None,
    *,
    sparsity: float,
    where: str = "auto",
    wina: bool = False,
    mode: str = "threshold",
    calib: str | os.PathLike | None = None,
    calib_batches: int | None = None,
    calib_batch_size: int = 8,
    check: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    samples: int = 4,
    seed: int = 0,
    external_data: bool | None = None,
    latency_rounds: int = 0,
    progress: Progress | None = None,
) -> SparsifyActivationsResult:
    """Replace every MLP block by a SparseMLP node (TEAL/WINA activation sparsity), verify, save atomically.

    ``sparsity``: the share of activation entries to drop, in [0, 1]. ``where``: "input" (before the up
    and gate projections), "hidden" (before the down projection), "both", or "auto" (both for a plain
    ReLU MLP, hidden otherwise). ``wina``: score |v| times the norm of the weight row it multiplies.
    ``mode``: "threshold" (per-layer thresholds calibrated on ``calib``, or on ``samples`` random input
    sets without it: ``data`` says which) or "topk" (each row keeps its top (1 - sparsity) share).
    Fidelity: ``verification`` on random inputs as every pass; ``calibration_fidelity`` on the calibration
    batches. The outputs differ from the dense model's by design: they are reported, not checked.
    See passes/sparsify_activations.py.
    """
    from graphprune.blocks import node_macs
    from graphprune.passes.sparsify_activations import (
        SparsifyActivationsConfig,
        SparsifyActivationsPass,
        check_options,
    )

    check_options(sparsity, where, mode)
    if calib_batches is not None and calib_batches < 1:
        raise GraphpruneError(f"--calib-batches must be 1 or more: got {calib_batches}.")
    _check_output(model, output)
    step = progress or (lambda _: nullcontext())
    with step("Loading"):
        loaded, label, original, before = _load_counted(model, input_shapes)
        dense_macs = node_macs(ir.to_proto(loaded), input_shapes)
    config = SparsifyActivationsConfig(sparsity=sparsity, where=where, wina=wina, mode=mode,
                                       max_batches=calib_batches, input_shapes=input_shapes, samples=samples,
                                       seed=seed, progress=_counter(progress))
    if calib is not None:
        config.calibration = _calibration_set(loaded, calib, calib_batch_size, calib_batches, input_shapes)
    sparsifying = SparsifyActivationsPass(config)
    with step("Calibrating thresholds, inserting SparseMLP nodes, measuring sparsity"):
        sparsifying(loaded)
    report, after, speed = _write_checked(
        loaded, original, output, step, external_data=external_data,
        check=(lambda staged: verify(original, staged, overrides=input_shapes, samples=samples)) if check else None,
        input_shapes=input_shapes, seed=seed, latency_rounds=latency_rounds)
    macs = _sparse_mlp_macs(sparsifying.report.layers, dense_macs)
    after.macs += macs["expected_mlp"]
    settings = {"model": label, "sparsity": sparsity, "where": where, "wina": wina, "mode": mode, "seed": seed,
                "calib": None if calib is None else os.fspath(calib), "calib_batches": calib_batches,
                "calib_batch_size": calib_batch_size}
    return SparsifyActivationsResult(loaded, sparsifying.report.layers,
                                     [d.to_dict() for d in sparsifying.report.declined], before, after, report,
                                     speed, settings, sparsifying.report.data,
                                     sparsifying.report.calibration_fidelity, macs)


def _sparse_mlp_macs(layers: list[Any], dense: dict[str, int]) -> dict[str, Any]:
    """The MLPs' dense MACs and their expected MACs at the sparsity measured on the calibration data
    (graphprune.metrics does not count SparseMLP nodes, so these are added to the model's count)."""
    total = expected = 0.0
    for layer in layers:
        kept = {side.side: 1.0 - side.measured for side in layer.sides}
        for role, side in (("up", "input"), ("gate", "input"), ("down", "hidden")):
            node = layer.mlp.get(role)
            if node:
                total += dense.get(node, 0)
                expected += dense.get(node, 0) * kept.get(side, 1.0)
    return {"dense_mlp": int(total), "expected_mlp": round(expected),
            "basis": "MLP MACs times the kept share measured on the calibration data per layer and side; the "
                     "standard-ops body multiplies the rows any batch row keeps, so at batch > 1 it does more"}


# ---------- prune-experts (passes/prune_experts.py) ----------


@dataclass
class PruneExpertsResult:
    model: ir.Model
    layers: list[Any]  # passes.prune_experts.ExpertChoice, one per MoE layer, in graph order
    declined: list[dict]  # MoE nodes left as they are, with the reason
    before: ModelStats
    after: ModelStats
    verification: VerifyReport | None
    latency: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    data: str = ""  # what the experts were ranked on

    def to_dict(self) -> dict[str, Any]:
        return {
            **_outcome(self),
            "layers": [c.to_dict() for c in self.layers],
            "declined": self.declined,
            "data": self.data,
        }


def prune_experts(
    model: ModelInput,
    output: str | os.PathLike | None = None,
    *,
    experts_keep: int | None = None,
    ratio: float | None = None,
    calib: str | os.PathLike | None = None,
    calib_batches: int | None = None,
    calib_batch_size: int = 8,
    check: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    samples: int = 4,
    seed: int = 0,
    external_data: bool | None = None,
    latency_rounds: int = 0,
    progress: Progress | None = None,
) -> PruneExpertsResult:
    """Remove whole experts of every MoE layer, verify against the original, save atomically.

    ``experts_keep``: experts kept per MoE layer, or ``ratio``: the share of each layer's experts removed;
    exactly one. Experts are ranked by their summed gate weight on ``calib`` (calibration.load_calibration),
    or without it by the norm of their weights (``data`` says which). See passes/prune_experts.py.
    """
    from graphprune.passes.prune_experts import PruneExpertsConfig, PruneExpertsPass

    if (experts_keep is None) == (ratio is None):
        raise GraphpruneError("give how many experts to keep: --experts-keep N or --ratio SHARE (to remove), "
                              "one of them.")
    if calib_batches is not None and calib_batches < 1:
        raise GraphpruneError(f"--calib-batches must be 1 or more: got {calib_batches}.")
    _check_output(model, output)
    step = progress or (lambda _: nullcontext())
    with step("Loading"):
        loaded, label, original, before = _load_counted(model, input_shapes)
    config = PruneExpertsConfig(experts_keep=experts_keep, ratio=ratio, max_batches=calib_batches)
    if calib is not None:
        config.calibration = _calibration_set(loaded, calib, calib_batch_size, calib_batches, input_shapes)
    pruning = PruneExpertsPass(config)
    with step("Ranking experts and removing them"):
        pruning(loaded)
    # Verify the very file we publish (external data included), then rename it into place.
    report, after, speed = _write_checked(
        loaded, original, output, step, external_data=external_data,
        check=(lambda staged: verify(original, staged, overrides=input_shapes, samples=samples)) if check else None,
        input_shapes=input_shapes, seed=seed, latency_rounds=latency_rounds)
    settings = {"model": label, "experts_keep": experts_keep, "ratio": ratio, "seed": seed,
                "calib": None if calib is None else os.fspath(calib), "calib_batches": calib_batches,
                "calib_batch_size": calib_batch_size}
    return PruneExpertsResult(loaded, pruning.report.layers, pruning.report.declined, before, after, report, speed,
                              settings, pruning.report.data)


@dataclass
class PruneTokensResult:
    model: ir.Model
    stages: list[Any]  # passes.prune_tokens.StageReport, in layer order
    layers: int  # encoder layers found
    before: ModelStats
    after: ModelStats
    verification: VerifyReport | None  # comparable outputs only: see prune_tokens.compare_outputs
    latency: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **_outcome(self),
            "layers": self.layers,
            "stages": [s.to_dict() for s in self.stages],
        }


def verify_tokens(original: ModelInput, pruned: ModelInput, *, cls: bool = True, samples: int = 4,
                  input_shapes: dict[str, tuple[int, ...]] | None = None) -> VerifyReport:
    """ONNX checker, then both models on the same random inputs; outputs compared where comparable
    (passes.prune_tokens.compare_outputs: unchanged shapes in full, token-axis outputs by their CLS row)."""
    from graphprune.inputs import make_inputs
    from graphprune.passes.prune_tokens import compare_outputs
    from graphprune.runtime import load_structure, make_session, run_session
    from graphprune.verify import _aggregate, check_model, fidelity

    check_model(pruned)
    ref_session = make_session(original, label="the original model")
    new_session = make_session(pruned, label="the pruned model")
    structure = load_structure(original)
    per_sample = []
    for seed in range(max(samples, 1)):
        feeds = make_inputs(structure, overrides=input_shapes, seed=seed)
        ref, new = compare_outputs(run_session(ref_session, feeds, "the original model"),
                                   run_session(new_session, feeds, "the pruned model"), cls)
        if not ref:
            raise GraphpruneError("no output of the pruned model is comparable with the original's.")
        per_sample.append(fidelity(ref, new))
    return VerifyReport(samples=len(per_sample), outputs=_aggregate(per_sample))


def prune_tokens(
    model: ModelInput,
    output: str | os.PathLike | None = None,
    *,
    keep: list[tuple[int, float]] | list[str] | None = None,
    cls: bool = True,
    check: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    samples: int = 4,
    seed: int = 0,
    external_data: bool | None = None,
    latency_rounds: int = 0,
    progress: Progress | None = None,
) -> PruneTokensResult:
    """Keep the top tokens by attention received after chosen encoder layers (ViT-style), verify, save.

    ``keep``: stages, each ``(layer, keep_ratio)`` or ``"KEEP@LAYER"`` (``"0.7@3"``), layers counted from 0.
    ``cls``: token 0 is a CLS token (scored by its attention row, always kept); else tokens are scored by
    the attention all queries give them. Verification compares comparable outputs only (token-axis
    outputs by their CLS row). See passes/prune_tokens.py for the method.
    """
    from graphprune.passes.prune_tokens import PruneTokensConfig, PruneTokensPass, TokenStage, parse_stage

    stages = [parse_stage(s) if isinstance(s, str) else TokenStage(layer=int(s[0]), keep=float(s[1]))
              for s in (keep or [])]
    _check_output(model, output)
    step = progress or (lambda _: nullcontext())
    with step("Loading"):
        loaded, label, original, before = _load_counted(model, input_shapes)
    pruning = PruneTokensPass(PruneTokensConfig(stages=stages, cls=cls, input_shapes=input_shapes))
    with step("Cutting tokens"):
        pruning(loaded)
    # Verify the very file we publish (external data included), then rename it into place.
    report, after, speed = _write_checked(
        loaded, original, output, step, external_data=external_data,
        check=(lambda staged: verify_tokens(original, staged, cls=cls, samples=samples,
                                            input_shapes=input_shapes)) if check else None,
        input_shapes=input_shapes, seed=seed, latency_rounds=latency_rounds)
    settings = {"model": label, "keep": [s.to_dict() for s in stages], "cls": cls, "seed": seed}
    return PruneTokensResult(loaded, pruning.report.stages, pruning.report.layers, before, after, report, speed,
                             settings)
