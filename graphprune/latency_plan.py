"""Latency-aware planning: prune until the model measured on a provider is ``S`` times faster.

1. **Table.** Each candidate group gets a few kept widths (``FRACTIONS`` of its size, rounded to the
   provider's preferred multiple, ``PROVIDER_MULTIPLES``). For every (group, width) the dense model with
   only that group pruned to that width is built and timed against the dense model, interleaved: the
   saving (median over rounds of the paired difference) is what pruning that group alone buys on this
   provider, layout changes, fusions and padding included (a conv cut from 64 to 56 channels on AVX-512
   saves nothing, see docs/round_to.md). Whole-model variants rather than isolated subgraphs: a subgraph
   cut out of the model gets inputs and outputs in plain layout, so the NCHWc reorders the real model
   does not have would be timed with it.
2. **Order.** Steps go in ascending order of importance lost per ms saved. Importance is the criterion's
   scores standardised as allocation.py does (``s / mean(s)`` of the group, times the MACs share a unit
   owns), so removing units that are below their group's par, in layers whose time falls most per MAC,
   goes first. A step may jump over widths that save nothing (a group goes 64 -> 48 when 56 buys nothing;
   the order still lists 56 between them, for the checks).
   When no step saves time by the table, the rest follow by least importance: the checks decide.
3. **Checks.** A plan is a prefix of that order. The first check builds the shortest prefix whose table
   prediction reaches ``S`` and times it against the dense model (median over rounds of the paired
   ratio). Per-layer savings do not add up (reorders appear or vanish, two groups share a conv whose work
   is C_out x C_in), so while no check has reached ``S``, the next prefix is the one whose prediction,
   scaled by the measured / predicted saving of the last check, reaches it. Once one has, the prefix is
   bisected between the longest that fell short and the shortest that reached ``S``, until they are
   adjacent or the measured speedup is within ``tolerance`` above ``S``: the plan removes no more than
   the measurements say ``S`` needs. A check counts as reaching ``S`` when it measures at least
   ``S x (1 + margin)`` twice, in fresh sessions (the lower of the two is kept): a fresh measurement of
   the same files differs by a percent or two, more when other processes come and go. With nothing left
   under the ``max_group_ratio`` caps, the best measured prefix is kept and the report says the target
   was not reached.
4. **Fallbacks.** When a round of 1-3 ends short of ``S``, another round runs with more to remove, its
   new table entries measured and its order and checks redone from the start (``max_checks`` each):
   first, if the unit kinds were left at their default, the conv-group units of grouped convs
   (``FALLBACK_KINDS``: their channels per conv group are often too few for the provider's grid, as in
   ResNeXt's 4 to 8); then every width below one block of the provider's multiple at step 1, for the
   groups that can go there (a conv that reads 8 channels cut to 2 is still a saving when 4 is the
   grid's floor; widths that are not multiples of 4 leave the fast conv paths in general, which is why
   they are a fallback and not the grid). The plan kept is that of the round that reached ``S``, else
   the best measured; ``rounds`` in the record says what each round added and measured.

Clock: with one intra-op thread on the CPU provider, ONNX Runtime runs the model on the calling thread,
so the timer reads that thread's CPU time: the latency on an idle core, whatever else the machine runs
(on a shared 2-core machine at load 9, wall-clock speedups of one pair of models ranged 1.32-2.10x over
three runs, thread CPU time 1.51-1.56x). Otherwise it reads the wall clock. The timer is injectable
(``Timer``), so the search can be tested without timing noise.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.allocation import CostModel
from graphprune.analysis import build_dim_graph
from graphprune.analysis.groups import find_groups
from graphprune.bench import PROVIDERS, check_available, parse_providers
from graphprune.criteria import score_group
from graphprune.errors import GraphpruneError, VerificationError
from graphprune.inputs import make_inputs
from graphprune.io import write_model
from graphprune.latency import _feeds_for, compare_latency
from graphprune.passes.prune_channels import PruneChannelsConfig, PruneChannelsPass
from graphprune.plan import GroupDecision, make_plan
from graphprune.report import summarise_groups
from graphprune.rewrite import apply_removal, interface_changes
from graphprune.runtime import ModelLike, first_line, make_session
from graphprune.verify import take_kept

# Provider -> (preferred channel multiple, finest multiple for groups no larger than the preferred one).
# cpu: MLAS's NCHWc convs pad channels to blocks of 16 (AVX-512) and leave that path below multiples
# of 4 (docs/round_to.md). The others are not measured: 8 is the common tensor-core/SIMD alignment.
PROVIDER_MULTIPLES: dict[str, tuple[int, int]] = {"cpu": (16, 4)}
DEFAULT_MULTIPLES = (8, 4)
FRACTIONS = (7 / 8, 3 / 4, 5 / 8, 1 / 2, 3 / 8, 1 / 4)  # candidate kept shares of a group
MAX_CHUNK = 8  # variants timed with the dense model in one interleaved run (kept near it in time)
# Unit kinds a plan adds when the default kinds fall short and the user did not choose the kinds.
FALLBACK_KINDS = ("conv-group",)

# (models, one feed dict per model, rounds) -> per model, its ms in each round (every round runs every
# model once). Savings and speedups are medians over rounds of paired differences and ratios: on a shared
# machine the load changes from round to round, and a model's neighbour in the same round saw the same.
Timer = Callable[[Sequence[ModelLike], Sequence[Mapping[str, np.ndarray]], int], list[list[float]]]


def provider_multiples(provider: str) -> tuple[int, int]:
    return PROVIDER_MULTIPLES.get(provider, DEFAULT_MULTIPLES)


def candidate_widths(size: int, multiple: int, fine: int, min_kept: int = 1) -> list[int]:
    """Kept widths to measure, descending, below ``size``: FRACTIONS of it rounded to ``multiple``.

    Groups no larger than ``multiple`` are rounded to ``fine`` instead (on CPU a 16-channel group may go
    to 12, 8 or 4: the table says whether that buys anything).
    """
    step = multiple if size > multiple else fine
    widths = set()
    for fraction in FRACTIONS:
        width = max(step, math.floor(fraction * size / step + 0.5) * step)
        if min_kept <= width < size:
            widths.add(width)
    return sorted(widths, reverse=True)


CLOCKS = ("wall", "thread-cpu")


def default_clock(provider: str, threads: int | None) -> str:
    """thread-cpu where the whole run is on the calling thread (CPU provider, one intra-op thread)."""
    return "thread-cpu" if provider == "cpu" and threads == 1 else "wall"


def ort_timer(providers: Sequence[str] | None = None, threads: int | None = None, clock: str = "wall") -> Timer:
    """The default timer: ONNX Runtime sessions on the given execution providers, runs interleaved with
    the first model of each round rotating (as latency.compare_latency), read on ``clock``."""
    if clock == "wall":
        def timer(models, feeds, rounds):
            results = compare_latency(list(models), list(feeds), rounds=rounds, warmup=3, threads=threads,
                                      providers=providers)
            return [r.samples_ms for r in results]

        return timer
    if clock != "thread-cpu":
        raise GraphpruneError(f"unknown clock '{clock}': use one of {', '.join(CLOCKS)}.")

    def cpu_timer(models, feeds, rounds):
        sessions = [make_session(m, providers=providers, threads=threads, label=f"model {i}")
                    for i, m in enumerate(models)]
        runs = [_feeds_for(s, f, f"model {i}") for i, (s, f) in enumerate(zip(sessions, feeds, strict=True))]

        def run(i: int) -> float:
            start = time.thread_time()
            try:
                sessions[i].run(None, runs[i])
            except Exception as exc:
                raise VerificationError(f"ONNX Runtime failed to run model {i}: {first_line(exc)}") from exc
            return (time.thread_time() - start) * 1000.0

        for i in range(len(sessions) * 3):  # warm-up
            run(i % len(sessions))
        times: list[list[float]] = [[] for _ in sessions]
        for r in range(rounds):
            for offset in range(len(sessions)):
                i = (r + offset) % len(sessions)
                times[i].append(run(i))
        return times

    return cpu_timer


@dataclass
class SpeedupTarget:
    """What ``SpeedupPass`` aims at and how it measures.

    ``table_seconds`` / ``check_seconds``: rough timing budgets of the table and of each whole-model
    check (rounds are derived from the dense latency); ``margin``: the search aims this much above ``S``
    (measurement noise); ``tolerance``: a measured speedup at most this much above that ends the search;
    ``max_checks``: whole-model checks at most, per round; ``clock``: "wall" or "thread-cpu" (None:
    default_clock). Fallback rounds (module doc, 4): ``units_given`` (the user chose the unit kinds)
    turns off the one that adds ``FALLBACK_KINDS``; ``finer_widths`` False turns off the one that
    measures widths below the provider's block.
    """

    speedup: float
    provider: str = "cpu"
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    seed: int = 0
    threads: int | None = None
    table_seconds: float = 20.0
    check_seconds: float = 4.0
    margin: float = 0.02
    tolerance: float = 0.05
    max_checks: int = 16
    clock: str | None = None
    timer: Timer | None = None
    units_given: bool = False
    finer_widths: bool = True


@dataclass
class GroupWidths:
    """One candidate group: its measured kept widths, the time each saves, the importance each loses."""

    decision: GroupDecision
    order: np.ndarray  # unit indices, weakest first
    widths: list[int]  # size first, then the measured candidates, descending
    saved_ms: list[float]  # per width (0 for the size)
    importance: list[float]  # per width: standardised importance removed to get there
    ms: dict[int, float] = field(default_factory=dict)  # measured median per candidate width
    at: int = 0  # index into widths of the current kept width
    lost: np.ndarray | None = None  # importance removed with the k weakest units, k = 0..size
    round_of: dict[int, int] = field(default_factory=dict)  # the round that measured each width

    @property
    def kept(self) -> int:
        return self.widths[self.at]

    def removed(self, at: int | None = None) -> np.ndarray:
        size = self.decision.group.size
        return np.sort(self.order[: size - self.widths[self.at if at is None else at]]).astype(np.int64)

    def add_widths(self, widths: Sequence[int], round_number: int) -> list[int]:
        """Insert the kept widths not there yet (their saving is measured next); returns them."""
        new = sorted(set(widths) - set(self.widths), reverse=True)
        saved = dict(zip(self.widths, self.saved_ms, strict=True))
        self.widths = sorted({*self.widths, *new}, reverse=True)
        self.saved_ms = [saved.get(w, 0.0) for w in self.widths]
        size = self.decision.group.size
        self.importance = [float(self.lost[size - w]) for w in self.widths]
        self.round_of.update(dict.fromkeys(new, round_number))
        self.at = 0
        return new


def next_step(candidates: Sequence[GroupWidths], eps: float = 1e-9) -> tuple[int, int, float] | None:
    """(candidate index, width index, importance per ms) of the cheapest step any group can take.

    A group may jump over widths: from its current width it goes to whichever smaller measured width
    gives the least importance lost per ms saved. Steps that save no time are never taken.
    """
    best = None
    for i, c in enumerate(candidates):
        for j in range(c.at + 1, len(c.widths)):
            saved = c.saved_ms[j] - c.saved_ms[c.at]
            if saved <= eps:
                continue
            key = (c.importance[j] - c.importance[c.at]) / saved
            if best is None or key < best[2]:
                best = (i, j, key)
    return best


def fallback_step(candidates: Sequence[GroupWidths]) -> tuple[int, int, float] | None:
    """When no step saves time by the table: the next width of the group that loses the least importance."""
    best = None
    for i, c in enumerate(candidates):
        if c.at + 1 < len(c.widths):
            lost = c.importance[c.at + 1] - c.importance[c.at]
            if best is None or lost < best[2]:
                best = (i, c.at + 1, lost)
    return None if best is None else (best[0], best[1], math.inf)


def greedy_order(candidates: Sequence[GroupWidths]) -> list[tuple[int, int, float]]:
    """Every step from the current widths to the last allowed, in the order the plan takes them:
    ``next_step`` while the table promises a saving, else ``fallback_step``. A jump over widths is
    spelt out one width at a time (same key), so that the checks can stop inside it: a table that sees
    little in 16 -> 8 but much in 16 -> 4 may be wrong about 8. The widths are left as found."""
    start = [c.at for c in candidates]
    order = []
    while (step := next_step(candidates) or fallback_step(candidates)) is not None:
        i, j, key = step
        order.extend((i, width, key) for width in range(candidates[i].at + 1, j + 1))
        candidates[i].at = j
    for c, at in zip(candidates, start, strict=True):
        c.at = at
    return order


def unit_importance(scores: np.ndarray, unit_cost: float) -> np.ndarray:
    """Importance of each unit, weakest first, standardised as allocation.py does (s / mean(s) x cost)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    mean = s.mean()
    return (s / mean if mean > 0 else s) * unit_cost


@dataclass
class Round:
    """One pass of order and checks over the candidates of that round (module doc, 3 and 4)."""

    number: int
    fallback: str  # "" for the first round, else what it added: "conv-group units", "finer widths"
    added: list[dict[str, Any]]  # per group given something new: its id, kind and the widths added
    order: list[dict[str, Any]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # per candidate of the round, its kept width
    measured: float = 1.0
    steps: int = 0
    reached: bool = False
    stop: str = ""
    checks: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.number, "fallback": self.fallback or None, "added": self.added,
                "checks": self.checks, "steps": self.steps, "measured_speedup": self.measured,
                "target_reached": self.reached, "stop": self.stop}


@dataclass
class SpeedupSearch:
    """The latency plan's record: the table, every whole-model check, what was reached."""

    target: float
    provider: str
    multiple: int
    fine_multiple: int
    clock: str = "wall"
    dense_ms: float = 0.0
    table: list[dict[str, Any]] = field(default_factory=list)
    order: list[dict[str, Any]] = field(default_factory=list)  # the steps, as greedy_order gives them
    checks: list[dict[str, Any]] = field(default_factory=list)
    measured: float = 1.0  # the measured speedup of the plan chosen
    steps: int = 0  # the plan chosen: this many steps of ``order``
    reached: bool = False
    stop: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    units_given: bool = False
    rounds: list[Round] = field(default_factory=list)
    round: int = 1  # the round whose plan was chosen

    @property
    def fallbacks(self) -> list[str]:
        """What the fallback rounds that ran added, in order."""
        return [r.fallback for r in self.rounds if r.fallback]

    def to_dict(self) -> dict[str, Any]:
        return {"target_speedup": self.target, "measured_speedup": self.measured, "target_reached": self.reached,
                "provider": self.provider, "execution_provider": PROVIDERS[self.provider][0],
                "multiple": self.multiple, "fine_multiple": self.fine_multiple, "clock": self.clock,
                "dense_ms": self.dense_ms, "stop": self.stop, "seconds": self.seconds, "table": self.table,
                "units_given": self.units_given, "fallbacks": self.fallbacks, "round": self.round,
                "rounds": [r.to_dict() for r in self.rounds],
                "order": self.order, "steps": self.steps, "iterations": self.checks}


class SpeedupPass(PruneChannelsPass):
    """prune-channels with the removal decided by measured latency (see the module doc).

    The ``PlanConfig`` fields still apply: criterion, exclude, protect, kinds, seed, max_group_ratio
    (caps), min_ratio (every candidate group starts at least this far down); ``ratio``, ``round_to``,
    budgets and allocation are replaced by the latency plan. ``reference``: the model the speedup is
    measured against (the user's original file), the prepared dense model when None. Groups of
    ``FALLBACK_KINDS`` outside ``kinds`` are the conv-group fallback's candidates (module doc, 4), unless
    ``target.units_given``; those a round added become decisions of the plan.
    """

    name = "prune-channels-speedup"

    def __init__(self, config: PruneChannelsConfig, target: SpeedupTarget, reference: ModelLike | None = None):
        super().__init__(config)
        self.target = target
        self.reference = reference
        self.search: SpeedupSearch | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config = self.config
        dense = ir.to_proto(model)  # before anything changes: the variants are cut from it
        g = build_dim_graph(model)
        self.groups = find_groups(g)
        self.declined = g.declined
        self.collect_calibration(model, g)
        # make_plan at ratio 0 decides which groups are candidates (exclude, protect, kinds) and scores
        # nothing away; the scores are recomputed in its order with the same seed, so they are its own.
        probe = replace(config, ratio=0.0, target_flops=None, target_params=None, allocation="uniform",
                        global_rank=False, min_ratio=0.0)
        self.plan = make_plan(g, self.groups, probe, stats=self.stats, grams=self.grams)
        rng = np.random.default_rng(config.seed)
        scored = [(d, score_group(g, d.group, config.criterion, rng, self.stats, self.grams)[0])
                  for d in self.plan.decisions if d.criterion]
        fallback = self._fallback_candidates(g, probe, rng)
        self.search = plan_speedup(dense, self.reference, g, scored, self.target, config.max_group_ratio,
                                   config.min_ratio, fallback)
        added = {entry["group"] for r in self.search.rounds for entry in r.added}
        by_root = {d.group.root: d for d, _ in fallback if d.group.id in added}
        self.plan.decisions = [by_root.get(d.group.root, d) for d in self.plan.decisions]
        left_out = [group for group in self.groups if group.prunable and group.kind in FALLBACK_KINDS
                    and group.kind not in config.kinds]
        if not self.search.reached and self.target.units_given and left_out:
            self.search.stop += (f"; --units leaves out {left_out[0].kind} units, which {len(left_out)} "
                                 "group(s) of this model have")
        self.summaries = summarise_groups(g, self.groups, self.plan, self.target.input_shapes)
        self.resized = interface_changes(g, self.plan.removed)
        # Reconstruction, compensation and statistics matching change weights, not widths: the timed plan
        # holds for the model they write.
        self.rewrite(model, g, dense)
        return ir.passes.PassResult(model, modified=bool(self.plan.removed))

    def _fallback_candidates(self, g, probe, rng: np.random.Generator) -> list[tuple[GroupDecision, np.ndarray]]:
        """The groups of FALLBACK_KINDS that ``kinds`` leaves out, decided and scored as make_plan would
        (exclude and protect apply); none when the user chose the kinds."""
        extra = tuple(kind for kind in FALLBACK_KINDS if kind not in probe.kinds)
        groups = [d.group for d in self.plan.decisions if d.group.kind in extra and d.group.prunable]
        if self.target.units_given or not groups:
            return []
        plan = make_plan(g, groups, replace(probe, kinds=extra), stats=self.stats, grams=self.grams)
        return [(d, score_group(g, d.group, self.config.criterion, rng, self.stats, self.grams)[0])
                for d in plan.decisions if d.criterion]


def check_target(speedup: float, provider: str) -> str:
    """The provider's short name, after checking the target and that the provider is installed."""
    if not speedup > 1.0:
        raise GraphpruneError(f"--target-speedup must be more than 1 (1.5 = 1.5x faster): got {speedup:g}.")
    names = parse_providers(provider)
    if len(names) != 1:
        raise GraphpruneError(f"--provider takes one provider for --target-speedup: got {', '.join(names)}.")
    check_available(names)
    return names[0]


def summary(record: Mapping[str, Any]) -> str:
    """One line for the CLI: requested and measured speedup, how many checks, the fallback rounds that ran,
    and whether it was reached."""
    checks = len(record["iterations"])
    line = (f"Target speedup: {record['target_speedup']:.2f}x requested, {record['measured_speedup']:.2f}x "
            f"measured on {record['provider']} ({checks} whole-model check(s), "
            f"{record['seconds'].get('total', 0.0):.0f} s of planning).")
    rounds = record.get("rounds", [])
    if len(rounds) > 1:
        line += (f" Fallback: the default round measured {rounds[0]['measured_speedup']:.2f}x at best; "
                 + "; ".join(f"round {r['round']} added {r['fallback']} ({r['measured_speedup']:.2f}x)"
                             for r in rounds[1:]) + ".")
    if not record["target_reached"]:
        line += f" [yellow]Not reached:[/] {record['stop']}."
    return line


def plan_speedup(dense: onnx.ModelProto, reference: ModelLike | None, g, scored: Sequence[tuple[GroupDecision,
                 np.ndarray]], target: SpeedupTarget, max_group_ratio: float = 0.9, min_ratio: float = 0.0,
                 fallback: Sequence[tuple[GroupDecision, np.ndarray]] = ()) -> SpeedupSearch:
    """Measure the table, run the greedy with whole-model checks, set each decision's ``removed``.

    ``fallback``: scored decisions that only the conv-group fallback round takes (module doc, 4)."""
    multiple, fine = provider_multiples(target.provider)
    clock = target.clock or default_clock(target.provider, target.threads)
    search = SpeedupSearch(target.speedup, target.provider, multiple, fine, clock, units_given=target.units_given)
    timer = target.timer or ort_timer(_provider_chain(target.provider), target.threads, clock)
    feeds = make_inputs(dense, overrides=target.input_shapes, seed=target.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphprune-speedup-") as folder:
        variants = _Variants(dense, feeds, folder)
        reference = variants.dense_path if reference is None else reference
        _plan(variants, reference, g, scored, fallback, target, max_group_ratio, min_ratio, timer, search)
    search.seconds["total"] = time.perf_counter() - started
    return search


def _plan(variants: _Variants, reference: ModelLike, g, scored, fallback, target: SpeedupTarget,
          max_group_ratio: float, min_ratio: float, timer: Timer, search: SpeedupSearch) -> None:
    """The candidates' widths and importance, the table, the rounds of search (the fallbacks while the
    target is not reached); sets each decision's ``removed``."""
    multiple, fine, feeds = search.multiple, search.fine_multiple, variants.feeds
    started = time.perf_counter()
    dense_ms = float(np.median(timer([reference], [feeds], 10)[0]))
    cost = CostModel(g, [d.group for d, _ in [*scored, *fallback]], target.input_shapes)

    def candidate(i: int, d: GroupDecision, scores: np.ndarray) -> GroupWidths:
        unit_cost = (cost.unit_macs[i] / cost.total_macs if cost.total_macs and cost.unit_macs[i] > 0
                     else cost.unit_params[i] / max(cost.total_params, 1.0))
        lost = np.concatenate([[0.0], np.cumsum(unit_importance(scores, unit_cost))])
        return GroupWidths(d, np.argsort(scores, kind="stable"), [d.group.size], [0.0], [0.0], lost=lost)

    def widths(c: GroupWidths, step: int, fine_step: int) -> list[int]:
        size = c.decision.group.size
        return candidate_widths(size, step, fine_step, max(1, math.ceil((1.0 - max_group_ratio) * size - 1e-9)))

    def grid(c: GroupWidths) -> list[int]:
        # Heads are whole blocks of work already: never rounded (as plan.make_plan).
        blocks = c.decision.group.kind in ("head", "head-repeat")
        return widths(c, 1 if blocks else multiple, 1 if blocks else fine)

    candidates = [candidate(i, d, scores) for i, (d, scores) in enumerate(scored)]
    jobs = [(c, w) for c in candidates for w in c.add_widths(grid(c), 1)]
    table_rounds = _rounds(target.table_seconds, len(jobs) + max(1, math.ceil(len(jobs) / MAX_CHUNK)), dense_ms,
                           15, 300)
    search.seconds["table_rounds"] = table_rounds
    search.dense_ms = _measure_table(variants, jobs, timer, table_rounds)
    search.seconds["table"] = time.perf_counter() - started
    rounds = [_search(variants, reference, candidates, timer, target, search, Round(1, "", []), min_ratio)]

    def fallback_round(name: str, added: list[list[int]]) -> None:
        """Measure the widths just added (``added``: per candidate) with the first table's rounds (the same
        precision), and search again from the start."""
        began = time.perf_counter()
        jobs = [(c, w) for c, new in zip(candidates, added, strict=True) for w in new]
        _measure_table(variants, jobs, timer, table_rounds)
        search.seconds[f"table_round{len(rounds) + 1}"] = time.perf_counter() - began
        entries = [{"group": c.decision.group.id, "kind": c.decision.group.kind, "widths": new}
                   for c, new in zip(candidates, added, strict=True) if new]
        rounds.append(_search(variants, reference, candidates, timer, target, search,
                              Round(len(rounds) + 1, name, entries), min_ratio))

    extra = [candidate(len(scored) + i, d, scores) for i, (d, scores) in enumerate(fallback)]
    if not rounds[-1].reached and extra:
        added = [[] for _ in candidates] + [c.add_widths(grid(c), len(rounds) + 1) for c in extra]
        candidates.extend(extra)
        if any(added):
            fallback_round(f"{'/'.join(sorted({c.decision.group.kind for c in extra}))} units", added)
    if not rounds[-1].reached and target.finer_widths:
        # Below one block the provider's multiple says nothing about padding: every width, step 1.
        added = [c.add_widths([w for w in widths(c, 1, 1) if w < multiple], len(rounds) + 1) for c in candidates]
        if any(added):
            fallback_round("finer widths", added)
    chosen = rounds[-1] if rounds[-1].reached else max(rounds, key=lambda r: r.measured)
    for i, c in enumerate(candidates):
        c.at = c.widths.index(chosen.kept[i] if i < len(chosen.kept) else c.decision.group.size)
    search.rounds, search.round = rounds, chosen.number
    search.order, search.steps = chosen.order, chosen.steps
    search.measured, search.reached, search.stop = chosen.measured, chosen.reached, chosen.stop
    if not chosen.reached and search.fallbacks:
        search.stop += f" (fallback rounds tried: {', '.join(search.fallbacks)})"
    search.table = [{"group": c.decision.group.id, "size": c.decision.group.size, "kind": c.decision.group.kind,
                     "widths": [{"kept": w, "ms": c.ms[w], "saved_ms": saved, "importance": imp,
                                 "round": c.round_of[w]}
                                for w, saved, imp in zip(c.widths[1:], c.saved_ms[1:], c.importance[1:],
                                                         strict=True)]}
                    for c in candidates]
    for c in candidates:
        d = c.decision
        d.removed = c.removed()
        if len(c.widths) == 1:
            d.skipped = f"no kept width below {d.group.size} on the {target.provider} grid"
        else:
            d.skipped = "" if len(d.removed) else "not needed for the target, or no measured saving"


def _provider_chain(provider: str) -> list[str]:
    ep = PROVIDERS[provider][0]
    return [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]


class _Variants:
    """Pruned copies of the dense model, written to files as ``optimize`` writes its output (io.write_model
    leaves out intermediate shapes, and ONNX Runtime fuses differently with them: a zoo YOLO pruned in
    memory ran 7% faster than the same model as written), so what is timed is what is published."""

    def __init__(self, dense: onnx.ModelProto, feeds: Mapping[str, np.ndarray], folder: str):
        self.dense, self.feeds, self.folder = dense, feeds, Path(folder)
        self.count = 0
        self.dense_path, _ = self.build({})

    def build(self, removed: Mapping[int, np.ndarray]) -> tuple[Path, Mapping[str, np.ndarray]]:
        """The dense model with ``removed`` cut out (no compensation: it does not change the time), and
        its feeds."""
        model = ir.from_proto(self.dense)
        g = build_dim_graph(model)
        removed = {root: units for root, units in removed.items() if len(units)}
        resized = interface_changes(g, removed)
        apply_removal(g, removed)
        path = self.folder / f"variant{self.count}.onnx"
        self.count += 1
        write_model(model, path)
        return path, take_kept(self.feeds, resized)


def _rounds(seconds: float, models_per_round: int, ms: float, low: int, high: int) -> int:
    return int(min(high, max(low, seconds * 1000.0 / max(models_per_round * ms, 1e-6))))


def _measure_table(variants: _Variants, jobs: Sequence[tuple[GroupWidths, int]], timer: Timer,
                   rounds: int) -> float:
    """Fill each job's ``saved_ms`` (dense median minus variant median, same interleaved run) and ``ms``;
    returns the dense median over every run (the dense model alone when there is no job)."""
    chunks = [jobs[k:k + MAX_CHUNK] for k in range(0, len(jobs), MAX_CHUNK)] or [[]]
    dense_runs = []
    for chunk in chunks:
        built = [variants.build({c.decision.group.root: c.removed(c.widths.index(w))}) for c, w in chunk]
        times = np.asarray(timer([variants.dense_path, *[m for m, _ in built]],
                                 [variants.feeds, *[f for _, f in built]], rounds))
        dense_runs.extend(times[0])
        for (c, w), ms in zip(chunk, times[1:], strict=True):
            c.ms[w] = float(np.median(ms))
            c.saved_ms[c.widths.index(w)] = float(np.median(times[0] - ms))
    return float(np.median(dense_runs))


def _search(variants: _Variants, reference: ModelLike, candidates: list[GroupWidths], timer: Timer,
            target: SpeedupTarget, search: SpeedupSearch, current: Round, min_ratio: float) -> Round:
    """One round: from the starting widths (``min_ratio`` down), check prefixes of the greedy order:
    corrected guesses until one reaches S, then bisection. Fills and returns ``current``; the candidates
    are left at the starting widths."""
    start = [max((j for j, w in enumerate(c.widths) if w <= (1.0 - min_ratio) * c.decision.group.size + 1e-9),
                 default=0) if min_ratio > 0 else 0 for c in candidates]
    for c, at in zip(candidates, start, strict=True):
        c.at = at
    order = greedy_order(candidates)

    def set_prefix(k: int) -> None:
        for c, at in zip(candidates, start, strict=True):
            c.at = at
        for i, j, _ in order[:k]:
            candidates[i].at = j

    for i, j, key in order:
        c = candidates[i]
        current.order.append({"group": c.decision.group.id, "from": c.kept, "to": c.widths[j],
                              "importance_per_ms": key if math.isfinite(key) else None})
        c.at = j
    predicted = [0.0] * (len(order) + 1)  # share of the dense time each prefix saves, by the table
    for k in range(len(order) + 1):
        set_prefix(k)
        predicted[k] = sum(c.saved_ms[c.at] for c in candidates) / search.dense_ms
    set_prefix(0)
    current.kept = [c.kept for c in candidates]
    if not order:
        current.stop = "no group has a kept width below its size under the caps and the provider's multiples"
        return current

    def guess(lowest: int, factor: float) -> int:
        aim = 1.0 - 1.0 / goal
        return next((k for k in range(lowest, len(order) + 1) if predicted[k] * factor >= aim), len(order))

    def check(k: int, confirming: bool = False) -> float:
        current.checks += 1
        return _check(variants, reference, candidates, timer, target, search, k, predicted[k], current.number,
                      confirming)

    goal = target.speedup * (1.0 + target.margin)
    measured: dict[int, float] = {}
    short, reached = -1, None  # longest prefix measured below S, shortest measured at or above it
    k = guess(0, 1.0)
    while current.checks < target.max_checks:
        set_prefix(k)
        measured[k] = check(k)
        if measured[k] >= goal and current.checks < target.max_checks:
            # A plan counts as reaching S only if a second check, in fresh sessions, agrees.
            measured[k] = min(measured[k], check(k, True))
        if measured[k] >= goal:
            reached = k if reached is None else min(reached, k)
        else:
            short = max(short, k)
        if reached is not None:
            if reached - short <= 1 or measured[reached] <= goal * (1.0 + target.tolerance):
                break
            k = (short + reached + 1) // 2
        elif short >= len(order):
            break
        else:
            # Non-additivity: scale the table's savings by what the last check realised of them.
            done = 1.0 - 1.0 / measured[k]
            factor = min(2.0, max(0.2, done / predicted[k])) if predicted[k] > 0 else 1.0
            k = guess(short + 1, factor)
    chosen = reached if reached is not None else max(measured, key=measured.get)
    set_prefix(chosen)
    current.kept = [c.kept for c in candidates]
    current.measured, current.reached, current.steps = measured[chosen], measured[chosen] >= target.speedup, chosen
    set_prefix(0)
    if current.reached:
        current.stop = "measured speedup reached the target"
    elif short >= len(order):
        current.stop = ("nothing left to remove under --max-ratio and the provider's widths; the best plan "
                        "measured is kept")
    else:
        current.stop = (f"stopped after {target.max_checks} whole-model checks; the best plan measured is kept")
    return current


def _check(variants: _Variants, reference: ModelLike, candidates: list[GroupWidths], timer: Timer,
           target: SpeedupTarget, search: SpeedupSearch, steps: int, predicted: float, round_number: int = 1,
           confirming: bool = False) -> float:
    """Build the plan the candidates' widths describe and time it against the reference; records it."""
    removed = {c.decision.group.root: c.removed() for c in candidates}
    model, pruned_feeds = variants.build(removed)
    rounds = _rounds(target.check_seconds, 2, search.dense_ms, 30, 2000)
    dense_runs, pruned_runs = np.asarray(timer([reference, model], [variants.feeds, pruned_feeds], rounds))
    measured = float(np.median(dense_runs / pruned_runs))
    search.checks.append({"iteration": len(search.checks) + 1, "round": round_number, "steps": steps,
                          "confirmation": confirming, "kept": {c.decision.group.id: c.kept for c in candidates},
                          "predicted_speedup": 1.0 / (1.0 - predicted) if predicted < 1.0 else None,
                          "measured_speedup": measured, "dense_ms": float(np.median(dense_runs)),
                          "pruned_ms": float(np.median(pruned_runs)), "rounds": rounds})
    return measured
