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
            "settings": self.settings,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "fidelity": self.verification.to_dict() if self.verification else None,
            "latency": self.latency,
            "units_removed": self.plan.units_removed,
            "groups": [g.to_dict() for g in self.groups],
            "allocation": self.allocation,
            "resized_interface": self.resized,
        }


Progress = Callable[[str], AbstractContextManager[Any]]


def _check_output(model: ModelInput, output: str | os.PathLike | None) -> None:
    if output is None:
        return
    out = Path(output)
    if isinstance(model, (str, os.PathLike)) and Path(model).resolve() == out.resolve():
        raise GraphpruneError(f"{out}: the output path equals the input; choose another file name.")
    if not out.parent.exists():
        raise GraphpruneError(f"{out}: the output folder '{out.parent}' does not exist; create it first.")


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
    protect: tuple[str, ...] = (),
) -> OptimizeResult:
    """Prune channels, verify against the original, and (if ``output`` is given) save atomically.

    ``units``: the unit kinds to remove ("channel", "head", "head-repeat", "head-dim", "conv-group").
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
    """
    if not 0.0 <= ratio < 1.0:
        raise GraphpruneError(f"--ratio must be in [0, 1): got {ratio}.")
    if round_to < 1:
        raise GraphpruneError(f"--round-to must be 1 or more: got {round_to}.")
    unknown = [u for u in units if u not in UNIT_KINDS]
    if unknown or not units:
        raise GraphpruneError(f"--units: unknown unit kind '{unknown[0] if unknown else ''}'; "
                              f"choose from {', '.join(UNIT_KINDS)}.")
    if compensate and calib is None:
        raise GraphpruneError("--compensate needs calibration data: give --calib as well.")
    reconstruct_mode(reconstruct)  # an unknown mode fails here
    if reconstruct and calib is None:
        raise GraphpruneError("--reconstruct needs calibration data: give --calib as well.")
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
        loaded, label, original = _load(model)
        # Counted on the prepared model: run-time shape arithmetic is folded there, so every conv's
        # extents are known (counting the raw file can miss layers, as in the legacy ShuffleNet export).
        before = model_stats(ir.to_proto(loaded), input_shapes)
        before.file_bytes = (file_size(original) if isinstance(original, (str, os.PathLike))
                             else original.ByteSize())
    config = PruneChannelsConfig(ratio=ratio, criterion=criterion, global_rank=global_rank, round_to=round_to,
                                 exclude=tuple(exclude), max_group_ratio=max_group_ratio, seed=seed,
                                 kinds=tuple(units), compensate=compensate, allocation=allocation,
                                 target_flops=target_flops, target_params=target_params, min_ratio=min_ratio,
                                 reconstruct=reconstruct, protect=tuple(protect))
    if calib is not None:
        names, ranks, dtypes = model_inputs(loaded)
        shapes = {**declared_shapes(loaded), **{k: tuple(v) for k, v in (input_shapes or {}).items()}}
        config.calibration = load_calibration(calib, names, calib_batch_size, ranks=ranks, dtypes=dtypes,
                                              max_batches=calib_batches, shapes=shapes)
    pruning = PruneChannelsPass(config)
    doing = (("collecting activation statistics, " if calib is not None else "")
             + ("measuring sensitivity, " if allocation == "sensitivity" else "") + "analysing and pruning")
    with step(doing[0].upper() + doing[1:]):
        pruning(loaded)
    if not any(group.prunable for group in pruning.groups):
        reasons = sorted({group.why_not for group in pruning.groups})[:3] or ["no weight groups"]
        if pruning.declined:
            node, why = pruning.declined[0]
            reasons.append(f"{len(pruning.declined)} node(s) declined, first {node.op_type} '{node.name}': {why}")
        raise GraphpruneError(f"{label}: nothing is prunable ({'; '.join(reasons)}); "
                              "run `graphprune analyze` to see every group and why.")
    speed = None
    with tempfile.TemporaryDirectory(dir=Path(output).parent if output else None, prefix=".graphprune-") as staging:
        # Verify the very file we will publish (external data included), then rename it into place.
        staged = Path(staging) / (Path(output).name if output else "pruned.onnx")
        with step("Writing the pruned model"):
            write_model(loaded, staged, external_data)
        report = None
        if check:
            with step("Verifying against the original"):
                report = verify(original, staged, overrides=input_shapes, samples=samples,
                                resized=pruning.resized)
        after = model_stats(staged, input_shapes)
        if latency_rounds:
            with step("Measuring latency (dense and pruned, interleaved)"):
                speed = dense_vs_pruned(original, staged, input_shapes, seed, latency_rounds, pruning.resized)
        if output is not None:
            publish(staged, Path(output))
    settings = {"model": label, "ratio": ratio, "criterion": criterion, "global": global_rank,
                "round_to": round_to, "exclude": list(exclude), "protect": list(protect), "units": list(units),
                "seed": seed,
                "calib": None if calib is None else os.fspath(calib), "compensate": compensate,
                "criteria_used": sorted({d.criterion for d in pruning.plan.decisions if d.criterion}),
                "compensation": pruning.compensation.to_dict() if pruning.compensation else None,
                "reconstruct": reconstruct,
                "reconstruction": pruning.reconstruction.to_dict() if pruning.reconstruction else None}
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
    names, ranks, dtypes = model_inputs(loaded)
    shapes = {**declared_shapes(loaded), **{k: tuple(v) for k, v in (input_shapes or {}).items()}}
    calibration = load_calibration(calib, names, calib_batch_size, ranks=ranks, dtypes=dtypes,
                                   max_batches=calib_batches, shapes=shapes)
    with step("Refitting linear layers on calibration data"):
        g = build_dim_graph(loaded)
        report, found = refit_targets(g, dense_loaded)
        if not found:
            raise GraphpruneError(f"{label}: no linear layer matches the dense model by name and width; refit "
                                  "needs a model derived from the dense one with node names kept.")
        reconstruct_sequential(g, dense_loaded, found, report, calibration,
                               damp=DAMP if damp is None else damp)
        cleanup(loaded)
    before = after = None
    with tempfile.TemporaryDirectory(dir=Path(output).parent if output else None, prefix=".graphprune-") as staging:
        staged = Path(staging) / (Path(output).name if output else "refit.onnx")
        write_model(loaded, staged, None)
        if check:
            with step("Verifying against the dense model"):
                before = verify(dense_original, original, overrides=input_shapes, samples=samples)
                after = verify(dense_original, staged, overrides=input_shapes, samples=samples)
        if output is not None:
            publish(staged, Path(output))
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
            "settings": self.settings,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "fidelity": self.verification.to_dict() if self.verification else None,
            "latency": self.latency,
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
        loaded, label, original = _load(model)
        before = model_stats(ir.to_proto(loaded), input_shapes)
        before.file_bytes = (file_size(original) if isinstance(original, (str, os.PathLike))
                             else original.ByteSize())
    config = DropLayersConfig(drop=drop, target_flops=target_flops, max_batches=calib_batches,
                              input_shapes=input_shapes, samples=samples, seed=seed)
    if calib is not None:
        names, ranks, dtypes = model_inputs(loaded)
        shapes = {**declared_shapes(loaded), **{k: tuple(v) for k, v in (input_shapes or {}).items()}}
        config.calibration = load_calibration(calib, names, calib_batch_size, ranks=ranks, dtypes=dtypes,
                                              max_batches=calib_batches, shapes=shapes)
    dropping = DropLayersPass(config)
    with step("Scoring residual blocks and dropping"):
        dropping(loaded)
    speed = None
    with tempfile.TemporaryDirectory(dir=Path(output).parent if output else None, prefix=".graphprune-") as staging:
        staged = Path(staging) / (Path(output).name if output else "pruned.onnx")
        with step("Writing the model"):
            write_model(loaded, staged, external_data)
        report = None
        if check:
            with step("Verifying against the original"):
                report = verify(original, staged, overrides=input_shapes, samples=samples)
        after = model_stats(staged, input_shapes)
        if latency_rounds:
            with step("Measuring latency (dense and pruned, interleaved)"):
                speed = dense_vs_pruned(original, staged, input_shapes, seed, latency_rounds)
        if output is not None:
            publish(staged, Path(output))
    settings = {"model": label, "drop": drop, "target_flops": target_flops, "seed": seed,
                "calib": None if calib is None else os.fspath(calib), "calib_batches": calib_batches,
                "calib_batch_size": calib_batch_size}
    scoring = {key: value for key, value in dropping.report.to_dict().items() if key not in ("blocks", "dropped")}
    scoring["achieved_flops_reduction"] = 1 - after.macs / before.macs if before.macs else 0.0
    return DropLayersResult(loaded, dropping.report.dropped, dropping.report.blocks, before, after, report, speed,
                            settings, scoring)
