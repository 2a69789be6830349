"""prune-channels and prune-heads: remove whole units from every coupled group.

Unit kinds (analysis/groups.py): conv channels and MLP neurons are "channel"; attention heads (KV
groups under grouped-query attention) are "head". prune-channels removes the kinds it is given,
both by default; prune-heads removes heads only.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from graphprune.analysis import build_dim_graph
from graphprune.analysis.groups import Group, find_groups
from graphprune.plan import PlanConfig, PrunePlan, make_plan
from graphprune.report import GroupSummary, summarise_groups
from graphprune.rewrite import apply_removal, interface_changes


@dataclass
class PruneChannelsConfig(PlanConfig):
    """Options of the pass; see PlanConfig for the budget and constraints."""


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

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = build_dim_graph(model)
        self.groups = find_groups(g)
        self.declined = g.declined
        self.plan = make_plan(g, self.groups, self.config)
        self.summaries = summarise_groups(g, self.groups, self.plan)  # shares of the unpruned model
        self.resized = interface_changes(g, self.plan.removed)
        apply_removal(g, self.plan.removed)
        return ir.passes.PassResult(model, modified=bool(self.plan.removed))


@dataclass
class PruneHeadsConfig(PlanConfig):
    kinds: tuple[str, ...] = ("head",)


class PruneHeadsPass(PruneChannelsPass):
    name = "prune-heads"

    def __init__(self, config: PruneHeadsConfig | None = None) -> None:
        super().__init__(config or PruneHeadsConfig())


PASSES = {"prune-channels": PruneChannelsPass, "prune-heads": PruneHeadsPass}
