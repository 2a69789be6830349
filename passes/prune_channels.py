"""prune-channels and prune-heads: remove whole units from every coupled group.

Unit kinds (analysis/groups.py): conv channels and MLP neurons are "channel"; attention heads (KV
groups under grouped-query attention) are "head". prune-channels removes the kinds it is given,
both by default; prune-heads removes heads only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from graphprune.analysis import build_dim_graph
from graphprune.analysis.graph import DimGraph
from graphprune.analysis.groups import Group, find_groups
from graphprune.calibration import collect_stats
from graphprune.compensate import CompensationReport, compensate_bias
from graphprune.criteria import ACTIVATION_CRITERIA, GRAM_CRITERIA, stats_requests
from graphprune.errors import GraphpruneError
from graphprune.obs import collect_obs_blocks
from graphprune.passes.drop_layers import DropLayersPass
from graphprune.plan import PlanConfig, PrunePlan, excluded, make_plan
from graphprune.reconstruct import (
    DAMP,
    MAX_FEATURES,
    MAX_STAGES,
    ReconstructionReport,
    reconstruct_consumers,
    reconstruct_sequential,
    sequential_targets,
)
from graphprune.report import GroupSummary, summarise_groups
from graphprune.rewrite import apply_removal, cleanup, interface_changes
from graphprune.sensitivity import measure_sensitivity
from graphprune.staged import CACHE_BYTES
from graphprune.stat_match import MatchReport, check_mode, match_statistics, match_targets


@dataclass
class PruneChannelsConfig(PlanConfig):
    """Options of the pass; see PlanConfig for the budget and constraints.

    ``calibration``: re-iterable feed dicts (calibration.load_calibration); with it, activation
    statistics are collected for the activation criteria and for ``compensate`` (FLAP bias
    compensation of every consumer, compensate.py), and Gram matrices of the consumers' inputs for the
    obs criterion (obs.py). ``progress`` is called with batches done.
    ``reconstruct``: least-squares reconstruction of the consumers' kept weights and biases
    (reconstruct.py; needs ``calibration``), ridge ``reconstruct_damp`` relative to the Gram diagonal,
    consumers over ``reconstruct_max_features`` input features (channels × taps) skipped. A reconstructed
    consumer is not bias-compensated again. ``reconstruct`` True or "one-shot" fits every consumer on the
    dense model's activations; "sequential" fits them after slicing, in topological order, on the pruned
    model's own activations against the dense outputs, in at most ``reconstruct_stages`` stages (each one
    run of both models over the calibration set).
    """

    calibration: Iterable | None = None
    compensate: bool = False
    reconstruct: bool | str = False
    reconstruct_stages: int = MAX_STAGES
    reconstruct_damp: float = DAMP
    reconstruct_max_features: int = MAX_FEATURES
    # per-channel statistics matching after pruning (stat_match.py): "", "mean", "moments", "regression"
    match_stats: str = ""
    # staged passes (sequential reconstruction, statistics matching): values kept between stages per model
    # (staged.py; 0: each stage runs the model from its inputs)
    stage_cache_bytes: int = CACHE_BYTES
    progress: Callable[[int], None] | None = None
    # allocation "sensitivity": probe share and calibration batches (sensitivity.py)
    probe_ratio: float = 0.5
    sensitivity_batches: int = 4


class PruneChannelsPass(ir.passes.InPlacePass):
    name = "prune-channels"

    def __init__(self, config: PruneChannelsConfig | None = None) -> None:
        super().__init__()
        self.config = config or PruneChannelsConfig()
        self.plan: PrunePlan | None = None
        self.groups: list[Group] = []
        self.summaries: list[GroupSummary] = []
        self.declined: list[tuple[ir.Node, str]] = []
        # Graph inputs/outputs (KV caches) that shrank: the caller must allocate them smaller.
        self.resized: list[dict] = []
        self.stats: dict | None = None
        self.grams: dict | None = None  # obs: per Gram request, the per-group blocks (obs.collect_obs_blocks)
        self.compensation: CompensationReport | None = None
        self.sensitivity: dict[int, float] | None = None  # group root -> measured output change
        self.reconstruction: ReconstructionReport | None = None
        self.matching: MatchReport | None = None

    def collect_calibration(self, model: ir.Model, g: DimGraph) -> None:
        """The calibration statistics the criterion and compensation read (``self.stats``) and the Gram
        blocks of the obs criterion (``self.grams``), for the groups of the pruned kinds."""
        config = self.config
        calibration = getattr(config, "calibration", None)
        if calibration is None:
            return
        pruned = [gr for gr in self.groups if gr.prunable and gr.kind in config.kinds]
        progress = getattr(config, "progress", None)
        if config.criterion in ACTIVATION_CRITERIA or getattr(config, "compensate", False):
            self.stats = collect_stats(model, stats_requests(g, pruned), calibration, progress=progress)
        if config.criterion in GRAM_CRITERIA:
            self.grams = collect_obs_blocks(model, g, pruned, calibration, progress=progress)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = build_dim_graph(model)
        self.groups = find_groups(g)
        self.declined = g.declined
        config = self.config
        # A plain PlanConfig works too: no calibration, no compensation.
        calibration = getattr(config, "calibration", None)
        self.collect_calibration(model, g)
        if getattr(config, "allocation", "uniform") == "sensitivity":
            if calibration is None:
                raise GraphpruneError("allocation 'sensitivity' measures the output change of each group on "
                                      "calibration data: give --calib as well.")
            pruned = [gr for gr in self.groups if gr.prunable and gr.kind in config.kinds
                      and not excluded(gr, config.exclude)]
            self.sensitivity = measure_sensitivity(
                model, g, pruned, calibration, criterion=config.criterion, stats=self.stats, grams=self.grams,
                probe_ratio=config.probe_ratio, max_batches=config.sensitivity_batches, seed=config.seed,
                progress=getattr(config, "progress", None))
        self.plan = make_plan(g, self.groups, config, stats=self.stats, sensitivity=self.sensitivity,
                              grams=self.grams)
        # shares of the unpruned model
        self.summaries = summarise_groups(g, self.groups, self.plan, getattr(config, "input_shapes", None))
        self.resized = interface_changes(g, self.plan.removed)
        self.rewrite(model, g)
        return ir.passes.PassResult(model, modified=bool(self.plan.removed))

    def rewrite(self, model: ir.Model, g: DimGraph, dense: onnx.ModelProto | None = None) -> None:
        """Carry out ``self.plan``: reconstruction, bias compensation, slicing, then statistics matching.
        The widths are the plan's; everything but slicing changes weights only. ``dense``: the model as it
        was before any change, when the caller kept a copy (else one is made here, only where needed)."""
        config = self.config
        calibration = getattr(config, "calibration", None)
        compensate = getattr(config, "compensate", False)
        progress = getattr(config, "progress", None)
        cache_bytes = getattr(config, "stage_cache_bytes", CACHE_BYTES)
        reconstructed: set = set()
        mode = reconstruct_mode(getattr(config, "reconstruct", False))
        if mode and calibration is None:
            raise GraphpruneError("reconstruction needs calibration data: give --calib as well.")
        match_mode = getattr(config, "match_stats", "")
        if match_mode:
            check_mode(match_mode)
            if calibration is None:
                raise GraphpruneError("statistics matching needs calibration data: give --calib as well.")
        dense_model = None
        if self.plan.removed and (mode == "sequential" or match_mode):
            dense_model = ir.from_proto(dense or ir.to_proto(model))  # before compensation and slicing
        matching = []
        if match_mode and self.plan.removed:  # found before slicing, corrected after
            self.matching = MatchReport(match_mode)
            matching = match_targets(g, self.plan.removed, self.matching)
        sequential = None
        if mode == "one-shot":
            self.reconstruction, reconstructed = reconstruct_consumers(
                g, self.plan, calibration, damp=config.reconstruct_damp,
                max_features=config.reconstruct_max_features, progress=progress)
        elif mode == "sequential" and self.plan.removed:
            self.reconstruction, sequential = sequential_targets(
                g, self.plan, max_features=config.reconstruct_max_features)
            reconstructed = {(s.target.use.node, s.target.use.index) for s in sequential}
        if compensate and self.stats is not None:
            self.compensation = compensate_bias(g, self.plan, self.stats, skip=reconstructed)
        apply_removal(g, self.plan.removed)
        if sequential is not None:
            reconstruct_sequential(g, dense_model, sequential, self.reconstruction, calibration,
                                   damp=config.reconstruct_damp, max_stages=config.reconstruct_stages,
                                   cache_bytes=cache_bytes, progress=progress)
        if matching:
            match_statistics(g, dense_model, matching, self.matching, calibration, cache_bytes=cache_bytes,
                             progress=progress)
        if sequential or matching:
            cleanup(model)


RECONSTRUCT_MODES = ("one-shot", "sequential")


def reconstruct_mode(value: bool | str) -> str:
    """'' (off), 'one-shot' or 'sequential' from a ``reconstruct`` option (True means one-shot)."""
    if value is True:
        return "one-shot"
    if not value:
        return ""
    if value not in RECONSTRUCT_MODES:
        raise GraphpruneError(f"--reconstruct-mode: unknown mode '{value}'; choose from "
                              f"{', '.join(RECONSTRUCT_MODES)}.")
    return value


@dataclass
class PruneHeadsConfig(PlanConfig):
    kinds: tuple[str, ...] = ("head",)


class PruneHeadsPass(PruneChannelsPass):
    name = "prune-heads"

    def __init__(self, config: PruneHeadsConfig | None = None) -> None:
        super().__init__(config or PruneHeadsConfig())


PASSES = {"prune-channels": PruneChannelsPass, "prune-heads": PruneHeadsPass, "drop-layers": DropLayersPass}

from graphprune.passes.prune_experts import PruneExpertsPass

PASSES["prune-experts"] = PruneExpertsPass

from graphprune.passes.prune_tokens import PruneTokensPass

PASSES["prune-tokens"] = PruneTokensPass

from graphprune.passes.sparsify_activations import SparsifyActivationsPass

PASSES["sparsify-activations"] = SparsifyActivationsPass
