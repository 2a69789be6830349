"""Prune every zoo model (and the pretrained MobileNetV2) and compare realised ORT CPU speedup with FLOPs cut.

For each model and ratio: graphprune.api.optimize(..., check=True), params and MACs before/after, and ONNX
Runtime CPU latency of the dense model and all its pruned versions, timed interleaved in one compare_latency
call (medians). Reported per row:

  speedup        dense median latency / pruned median latency
  FLOPs red.     dense MACs / pruned MACs
  speedup/FLOPs  their plain ratio: the acceptance metric (median over models >= 0.8)
  (s-1)/(f-1)    share of the ideal time saving realised, a stricter view of the same thing
  pad16 red.     FLOPs reduction counting Conv channels as ORT's NCHWc kernels compute them (zero-padded to
                 the block size, 16 with AVX-512 and 8 with AVX2; see docs/round_to.md)
  spd(min)       speedup from the fastest round of each model, a check that noise did not make the median

Usage: .venv/bin/python tools/bench_zoo.py [--models a,b] [--exporter legacy] [--ratios 0.3,0.5]
       [--round-to N] [--batch 16] [--real-batch 1] [--threads 1] [--seconds 12] [--markdown PATH]
       [--profile MODEL,...]
The pretrained MobileNetV2 is the model named "mobilenet_v2_pretrained" (weights: tools/fetch_models.py).
About 2.5 minutes at the defaults on 2 cores (plus about 10 s per profiled model).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import onnx
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from graphprune import api
from graphprune.bench import cpu_name
from graphprune.cli import DEFAULTS
from graphprune.errors import GraphpruneError
from graphprune.inputs import input_specs, make_inputs
from graphprune.io import load_model
from graphprune.latency import compare_latency
from graphprune.metrics import count_macs
from graphprune.models import zoo

REAL = "mobilenet_v2_pretrained"
REAL_SPATIAL = (3, 224, 224)


def nchwc_block() -> int:
    """MLAS's NCHWc block size: 16 floats with AVX-512F, 8 otherwise (AVX2)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


@dataclass
class Case:
    name: str
    path: Path
    shapes: dict[str, tuple[int, ...]]
    prepared: onnx.ModelProto | None = None  # shapes folded as the pruner sees them (for counting only)


@dataclass
class Row:
    model: str
    ratio: float
    shape: str
    params: tuple[int, int] = (0, 0)
    macs: tuple[int, int] = (0, 0)
    padded: tuple[int, int] = (0, 0)
    dense_ms: float = math.nan
    pruned_ms: float = math.nan
    dense_min: float = math.nan
    pruned_min: float = math.nan
    rounds: int = 0
    cosine: float = math.nan
    error: str = ""
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.pruned_ms

    @property
    def speedup_min(self) -> float:
        return self.dense_min / self.pruned_min

    @property
    def flops_reduction(self) -> float:
        return self.macs[0] / self.macs[1] if self.macs[1] else math.nan

    @property
    def padded_reduction(self) -> float:
        return self.padded[0] / self.padded[1] if self.padded[1] else math.nan

    @property
    def efficiency(self) -> float:
        """speedup / FLOPs reduction: 1.0 when latency falls exactly as much as the MACs."""
        return self.speedup / self.flops_reduction

    @property
    def gain_share(self) -> float:
        """(speedup - 1) / (FLOPs reduction - 1): the share of the possible time saving realised."""
        f = self.flops_reduction
        return (self.speedup - 1) / (f - 1) if f > 1 else math.nan


@dataclass
class Bench:
    rows: list[Row] = field(default_factory=list)
    pruned: dict[tuple[str, float], onnx.ModelProto] = field(default_factory=dict)
    cases: dict[str, Case] = field(default_factory=dict)


# ---------- models and shapes ----------


def timing_shapes(path: Path, spatial: tuple[int, ...] | None, batch: int) -> dict[str, tuple[int, ...]]:
    """Batch for a symbolic leading dim; a static leading dim (dynamo zoo exports) is kept as it is."""
    shapes = {}
    for spec in input_specs(path):
        if spec.shape is None:
            raise GraphpruneError(f"{path}: input '{spec.name}' has no declared shape.")
        dims = list(spec.shape)
        if not isinstance(dims[0], int):
            dims[0] = batch
        if spatial is not None and len(spatial) == len(dims) - 1:
            dims[1:] = [d if isinstance(d, int) else s for d, s in zip(dims[1:], spatial, strict=True)]
        if not all(isinstance(d, int) for d in dims):
            raise GraphpruneError(f"{path}: input '{spec.name}' has dynamic dims besides the batch: {dims}.")
        shapes[spec.name] = tuple(int(d) for d in dims)
    return shapes


def load_case(name: str, exporter: str, batch: int, real_batch: int) -> Case:
    if name == REAL:
        from graphprune.models.mobilenet_v2 import export_mobilenet_v2

        path = export_mobilenet_v2(exporter)
        return Case(name, path, timing_shapes(path, REAL_SPATIAL, real_batch))
    path = zoo.export(name, exporter)
    return Case(name, path, timing_shapes(path, zoo.ZOO[name].input_shape[1:], batch))


# ---------- Conv census: what ORT's kernels really compute ----------


@dataclass
class ConvInfo:
    name: str
    kind: str  # "dw" (depthwise), "1x1", "kxk" (any other dense kernel), "grouped"
    cin: int
    cout: int
    macs: int
    padded_macs: int  # MACs with the channels ORT's NCHWc path computes (zero-padded to the block)
    nchwc: bool  # whether the channel counts allow ORT's NCHWc path (observed rule, docs/round_to.md)


def _ceil(c: int, m: int) -> int:
    return -(-c // m) * m


def conv_census(model: Path | onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                block: int) -> list[ConvInfo]:
    """Every Conv of the top-level graph with its MACs at the given input shapes.

    NCHWc rule observed with ORT 1.32 (tools/bench_round_to.py): a dense Conv runs NCHWc when C_in < block
    or C_in % 4 == 0, with C_out (and C_in >= block) zero-padded up to the block; a depthwise Conv when
    C % 4 == 0, padded likewise; other grouped convs stay NCHW here.
    """
    proto = onnx.load(os.fspath(model)) if isinstance(model, Path) else onnx.ModelProto.FromString(
        model.SerializeToString())
    for vi in proto.graph.input:
        if vi.name in shapes:
            for d, value in zip(vi.type.tensor_type.shape.dim, shapes[vi.name], strict=True):
                d.Clear()
                d.dim_value = value
    inferred = onnx.shape_inference.infer_shapes(proto)
    out_shape = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
                 for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    weights = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    convs = []
    for index, node in enumerate(proto.graph.node):
        y = out_shape.get(node.output[0])
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights or not y or not all(y):
            continue
        w = weights[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        cout, cin, kernel = w[0], w[1] * group, math.prod(w[2:])
        positions = math.prod(y) // cout  # batch x output spatial
        macs = positions * cout * w[1] * kernel
        if group == 1:
            kind = "1x1" if kernel == 1 else "kxk"
            nchwc = cin < block or cin % 4 == 0
            padded = positions * _ceil(cout, block) * (cin if cin < block else _ceil(cin, block)) * kernel
        elif group == cin == cout and w[1] == 1:
            kind, nchwc = "dw", cin % 4 == 0
            padded = positions * _ceil(cout, block) * kernel
        else:
            kind, nchwc, padded = "grouped", False, macs
        convs.append(ConvInfo(node.name or f"Conv#{index}", kind, cin, cout, macs,
                              padded if nchwc else macs, nchwc))
    return convs


def padded_total(model: Path | onnx.ModelProto, shapes: dict[str, tuple[int, ...]], block: int) -> int:
    """All MACs (count_macs), with each Conv counted at its NCHWc-padded channel counts."""
    convs = conv_census(model, shapes, block)
    return count_macs(model, shapes).total + sum(c.padded_macs - c.macs for c in convs)


# ---------- benchmark ----------


def bench_model(case: Case, ratios: list[float], round_to: int, criterion: str, threads: int,
                seconds: float, min_rounds: int, bench: Bench, note: Callable[[str], None]) -> None:
    shape = ", ".join("x".join(map(str, s)) for s in case.shapes.values())
    block = nchwc_block()
    # Count the dense model after the same shape folding the pruned one went through: count_macs on the
    # raw export can miss convs behind shape arithmetic it cannot infer (see `note`).
    case.prepared = ir.to_proto(load_model(case.path))
    dense_macs = count_macs(case.prepared, case.shapes)
    dense_padded = padded_total(case.prepared, case.shapes, block)
    rows, models = [], []
    for ratio in ratios:
        row = Row(case.name, ratio, shape)
        rows.append(row)
        note(f"{case.name}: pruning at {ratio:g} (check=True)")
        try:
            result = api.optimize(case.path, ratio=ratio, criterion=criterion, round_to=round_to,
                                  input_shapes=case.shapes, check=True)
        except GraphpruneError as err:
            row.error = str(err).splitlines()[0]
            continue
        proto = ir.to_proto(result.model)
        proto.graph.name = f"{case.name}-r{ratio:g}"
        row.params = (result.before.params, result.after.params)
        row.macs = (dense_macs.total, result.after.macs)
        if result.before.macs != dense_macs.total:
            row.note = (f"api.optimize reports {result.before.macs / 1e6:.1f} dense MMACs "
                        f"({result.before.macs_skipped_nodes} nodes skipped by count_macs on the raw export); "
                        f"{dense_macs.total / 1e6:.1f} after shape folding, used here")
        row.padded = (dense_padded, padded_total(proto, case.shapes, block))
        if result.verification is not None:
            row.cosine = result.verification.min_cosine
        bench.pruned[(case.name, ratio)] = proto
        models.append((row, proto))
    if models:
        inputs = make_inputs(case.path, overrides=case.shapes, seed=0)
        all_models = [case.path, *(p for _, p in models)]
        note(f"{case.name}: timing {len(all_models)} models interleaved")
        probe = compare_latency(all_models, inputs, rounds=3, warmup=1, threads=threads)
        per_round = sum(t.median_ms for t in probe) / 1000.0
        rounds = int(max(min_rounds, min(5000, seconds / max(per_round, 1e-6))))
        timings = compare_latency(all_models, inputs, rounds=rounds, warmup=5, threads=threads)
        dense = timings[0]
        for (row, _), t in zip(models, timings[1:], strict=True):
            row.dense_ms, row.pruned_ms, row.rounds = dense.median_ms, t.median_ms, rounds
            row.dense_min, row.pruned_min = dense.min_ms, t.min_ms
    bench.rows.extend(rows)
    bench.cases[case.name] = case


def medians(rows: list[Row], ratio: float) -> dict[str, float]:
    ok = [r for r in rows if r.ratio == ratio and not r.error]
    if not ok:
        return {}
    return {
        "n": len(ok),
        "speedup": statistics.median(r.speedup for r in ok),
        "flops_reduction": statistics.median(r.flops_reduction for r in ok),
        "padded_reduction": statistics.median(r.padded_reduction for r in ok),
        "efficiency": statistics.median(r.efficiency for r in ok),
        "gain_share": statistics.median(r.gain_share for r in ok if not math.isnan(r.gain_share)),
        "speedup_min": statistics.median(r.speedup_min for r in ok),
        "dense_ms": statistics.median(r.dense_ms for r in ok),
    }


# ---------- per-op profile ----------


def _kind_of(node: onnx.NodeProto, dims: dict[str, list[int]]) -> str:
    prefix = "nchwc." if node.domain == "com.microsoft.nchwc" else "ms." if node.domain == "com.microsoft" else ""
    kind = f"{prefix}{node.op_type}"
    if node.op_type in ("Conv", "FusedConv") and len(node.input) > 1 and node.input[1] in dims:
        w = dims[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        shape = "dw" if group > 1 and w[1] == 1 else "grouped" if group > 1 else (
            "1x1" if math.prod(w[2:]) == 1 else "kxk")
        kind += f" ({shape})"
    return kind


def op_profile(model: Path | onnx.ModelProto, inputs: dict[str, np.ndarray], threads: int,
               runs: int) -> dict[str, float]:
    """Kernel time (ms) per op kind from ORT's profiler: each node's median over `runs` runs, summed per
    kind. Kinds come from the optimised graph, so NCHWc kernels ("nchwc.Conv") are told apart."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        source = os.fspath(model) if isinstance(model, Path) else model.SerializeToString()
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        feeds = {i.name: inputs[i.name] for i in session.get_inputs()}
        for _ in range(runs + 3):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
        optimised = onnx.load(options.optimized_model_filepath)
    dims = {t.name: list(t.dims) for t in optimised.graph.initializer}
    kinds = {n.name: _kind_of(n, dims) for n in optimised.graph.node}
    per_node: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_node[event["name"][: -len("_kernel_time")]].append(event["dur"] / 1000.0)
    totals: dict[str, float] = defaultdict(float)
    for node, durations in per_node.items():
        totals[kinds.get(node, "?")] += statistics.median(durations[3:] or durations)
    return dict(totals)


def profile_report(console: Console, bench: Bench, names: list[str], ratio: float, threads: int,
                   runs: int) -> list[str]:
    lines: list[str] = []
    block = nchwc_block()
    for name in names:
        case = bench.cases.get(name)
        pruned = bench.pruned.get((name, ratio))
        if case is None or pruned is None:
            console.print(f"[yellow]no pruned {name} at ratio {ratio:g} to profile[/yellow]")
            continue
        inputs = make_inputs(case.path, overrides=case.shapes, seed=0)
        dense_ops = op_profile(case.path, inputs, threads, runs)  # time the real export
        pruned_ops = op_profile(pruned, inputs, threads, runs)
        title = (f"{name} ({', '.join('x'.join(map(str, s)) for s in case.shapes.values())}): per-op kernel "
                 f"time, ORT profiler, median of {runs} runs, {threads} thread(s), dense vs pruned at {ratio:g}")
        headers = ("op kind", "dense ms", "share", "pruned ms", "share", "dense/pruned")
        table = Table(title=title)
        for col in headers:
            table.add_column(col, justify="right")
        md = [f"#### {title}", "", "| " + " | ".join(headers) + " |", "|---|---:|---:|---:|---:|---:|"]
        d_total, p_total = sum(dense_ops.values()), sum(pruned_ops.values())
        for kind in sorted(set(dense_ops) | set(pruned_ops), key=lambda k: -dense_ops.get(k, 0.0)):
            d, p = dense_ops.get(kind, 0.0), pruned_ops.get(kind, 0.0)
            cells = (kind, f"{d:.3f}", f"{d / d_total:.0%}", f"{p:.3f}", f"{p / p_total:.0%}",
                     f"{d / p:.2f}" if p else "-")
            table.add_row(*cells)
            md.append("| " + " | ".join(cells) + " |")
        cells = ("total (kernels)", f"{d_total:.3f}", "", f"{p_total:.3f}", "", f"{d_total / p_total:.2f}")
        table.add_row(*cells, style="bold")
        md.append("| " + " | ".join(cells) + " |")
        console.print(table)
        md += ["", *conv_kind_lines(case, pruned, block, console)]
        lines += [*md, ""]
    return lines


def conv_kind_lines(case: Case, pruned: onnx.ModelProto, block: int, console: Console) -> list[str]:
    """Conv MACs per kind, dense vs pruned, real and NCHWc-padded, and the share on the NCHWc path."""
    dense = conv_census(case.prepared or case.path, case.shapes, block)
    thin = conv_census(pruned, case.shapes, block)
    headers = ("conv kind", "dense MMACs", "pruned MMACs", "MAC red.", "dense padded", "pruned padded",
               "padded red.", "pruned MACs on NCHWc path", "pruned convs with C_out % 16")
    table = Table(title=f"{case.name}: Conv MACs by kind (padded = channels rounded up to {block})")
    for col in headers:
        table.add_column(col, justify="right")
    md = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    for kind in ("kxk", "1x1", "dw", "grouped", "all"):
        d = [c for c in dense if kind in (c.kind, "all")]
        p = [c for c in thin if kind in (c.kind, "all")]
        if not d:
            continue
        dm, pm = sum(c.macs for c in d), sum(c.macs for c in p)
        dp, pp = sum(c.padded_macs for c in d), sum(c.padded_macs for c in p)
        on_path = sum(c.macs for c in p if c.nchwc) / pm if pm else math.nan
        aligned = sum(1 for c in p if c.cout % block == 0)
        cells = (kind, f"{dm / 1e6:.1f}", f"{pm / 1e6:.1f}", f"{dm / pm:.2f}x" if pm else "-",
                 f"{dp / 1e6:.1f}", f"{pp / 1e6:.1f}", f"{dp / pp:.2f}x" if pp else "-",
                 f"{on_path:.0%}", f"{aligned}/{len(p)}")
        table.add_row(*cells, style="bold" if kind == "all" else None)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    return md


# ---------- output ----------


def _f(x: float, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


HEADERS = ("model", "ratio", "input", "params dense→pruned", "MMACs dense→pruned", "dense ms", "pruned ms",
           "rounds", "speedup", "FLOPs red.", "speedup/FLOPs", "(s-1)/(f-1)", f"pad{nchwc_block()} red.", "spd(min)",
           "min cos")


def row_cells(r: Row) -> list[str]:
    if r.error:
        return [r.model, f"{r.ratio:g}", r.shape, r.error, *[""] * (len(HEADERS) - 4)]
    return [
        r.model, f"{r.ratio:g}", r.shape,
        f"{r.params[0] / 1e3:.1f}k→{r.params[1] / 1e3:.1f}k",
        f"{r.macs[0] / 1e6:.1f}→{r.macs[1] / 1e6:.1f}",
        f"{r.dense_ms:.3f}", f"{r.pruned_ms:.3f}", str(r.rounds),
        f"{r.speedup:.2f}x", f"{r.flops_reduction:.2f}x", _f(r.efficiency), _f(r.gain_share),
        f"{r.padded_reduction:.2f}x", f"{r.speedup_min:.2f}x", _f(r.cosine, ".3f"),
    ]


def median_cells(rows: list[Row], ratio: float, label: str) -> list[str] | None:
    m = medians(rows, ratio)
    if not m:
        return None
    return [label, f"{ratio:g}", f"n={m['n']}", "", "", f"{m['dense_ms']:.3f}", "", "",
            f"{m['speedup']:.2f}x", f"{m['flops_reduction']:.2f}x", _f(m["efficiency"]), _f(m["gain_share"]),
            f"{m['padded_reduction']:.2f}x", f"{m['speedup_min']:.2f}x", ""]


def print_table(console: Console, bench: Bench, ratios: list[float], title: str) -> None:
    table = Table(title=title)
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("model", "input") else "right")
    for ratio in ratios:
        for r in (r for r in bench.rows if r.ratio == ratio):
            table.add_row(*row_cells(r), style="red" if r.error else None)
        cells = median_cells(bench.rows, ratio, "MEDIAN (all models)")
        if cells:
            table.add_row(*cells, style="bold", end_section=True)
    console.print(table)


def markdown_table(bench: Bench, ratios: list[float]) -> list[str]:
    lines = ["| " + " | ".join(HEADERS) + " |",
             "|" + "|".join("---" if h in ("model", "input") else "---:" for h in HEADERS) + "|"]
    for ratio in ratios:
        for r in (r for r in bench.rows if r.ratio == ratio):
            lines.append("| " + " | ".join(row_cells(r)) + " |")
        cells = median_cells(bench.rows, ratio, "**median (all models)**")
        if cells:
            lines.append("| " + " | ".join(f"**{c}**" if c and i >= 8 else c for i, c in enumerate(cells)) + " |")
    return lines


def machine(threads: int) -> str:
    import onnxruntime as ort

    cpu = cpu_name()
    isa = "AVX-512F" if nchwc_block() == 16 else "no AVX-512"
    return (f"CPU: {cpu} ({isa}), {os.cpu_count()} logical CPUs; onnxruntime {ort.__version__} "
            f"(CPUExecutionProvider, graph optimisation level 'all'); {threads} intra-op thread(s); "
            f"date {datetime.datetime.now():%Y-%m-%d %H:%M}")


LEGEND = ("speedup = dense median / pruned median latency (interleaved); FLOPs red. = dense MACs / pruned MACs; "
          "speedup/FLOPs = their plain ratio (the acceptance metric); (s-1)/(f-1) = share of the ideal time "
          f"saving realised; pad{nchwc_block()} red. = FLOPs reduction with Conv channels padded as ORT's "
          "NCHWc kernels compute them; spd(min) = speedup from each model's fastest round; min cos = worst cosine between "
          "dense and pruned outputs (no fine-tuning).")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


@click.command()
@click.option("--models", default="", help=f"Comma-separated subset of: {', '.join([*zoo.ZOO, REAL])}.")
@click.option("--exporter", type=click.Choice(zoo.EXPORTERS), default="legacy", show_default=True)
@click.option("--ratios", default="0.3,0.5", show_default=True, help="Comma-separated pruning ratios.")
@click.option("--round-to", type=int, default=DEFAULTS["round_to"], show_default=True)
@click.option("--criterion", default=DEFAULTS["criterion"], show_default=True)
@click.option("--batch", type=int, default=16, show_default=True,
              help="Batch for zoo models with a dynamic batch (their spatial size is fixed by the export).")
@click.option("--real-batch", type=int, default=1, show_default=True,
              help=f"Batch for {REAL} (input Bx3x224x224).")
@click.option("--threads", type=int, default=1, show_default=True, help="ORT intra-op threads.")
@click.option("--seconds", type=float, default=12.0, show_default=True,
              help="Timing budget per model (all its versions interleaved); sets the round count.")
@click.option("--min-rounds", type=int, default=30, show_default=True)
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="Also write the table (and profiles) as markdown to this file.")
@click.option("--profile", default="", help="Comma-separated models to profile per op (ORT profiler).")
@click.option("--profile-ratio", type=float, default=None, help="Ratio to profile [default: the largest].")
@click.option("--profile-runs", type=int, default=50, show_default=True)
def main(models: str, exporter: str, ratios: str, round_to: int, criterion: str, batch: int, real_batch: int,
         threads: int, seconds: float, min_rounds: int, markdown_path: Path | None, profile: str,
         profile_ratio: float | None, profile_runs: int) -> None:
    names = [m.strip() for m in models.split(",") if m.strip()] or [*zoo.ZOO, REAL]
    unknown = [n for n in names if n not in zoo.ZOO and n != REAL]
    if unknown:
        raise click.BadParameter(f"unknown model(s): {', '.join(unknown)}", param_hint="--models")
    ratio_list = _floats(ratios)
    console = Console() if sys.stdout.isatty() else Console(width=240)
    status = Console(stderr=True)
    bench = Bench()
    header = machine(threads)
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.perf_counter()
    with status.status("starting") as spinner:
        for name in names:
            spinner.update(f"{name}: exporting ({exporter})")
            try:
                case = load_case(name, exporter, batch, real_batch)
            except (GraphpruneError, OSError, RuntimeError) as err:
                bench.rows += [Row(name, r, "?", error=f"export failed: {str(err).splitlines()[0]}")
                               for r in ratio_list]
                continue
            bench_model(case, ratio_list, round_to, criterion, threads, seconds, min_rounds, bench,
                        spinner.update)
    elapsed = time.perf_counter() - start
    header += f"; load average {load_start} at start, " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + " at end"
    command = " ".join(["tools/bench_zoo.py", *sys.argv[1:]])
    title = (f"graphprune zoo: ORT CPU speedup vs FLOPs reduction ({exporter} export, round-to {round_to}, "
             f"criterion {criterion}, {threads} thread(s))")
    console.print(header)
    print_table(console, bench, ratio_list, title)
    console.print(LEGEND + f" {elapsed:.0f} s.")
    notes = sorted({f"{r.model}: {r.note}" for r in bench.rows if r.note})
    for n in notes:
        console.print(f"note: {n}")
    profile_lines: list[str] = []
    to_profile = [p.strip() for p in profile.split(",") if p.strip()]
    if to_profile:
        pr = profile_ratio if profile_ratio is not None else max(ratio_list)
        with status.status("profiling"):
            profile_lines = profile_report(console, bench, to_profile, pr, threads, profile_runs)
    if markdown_path is not None:
        text = [header, "", f"Command: `{command}` ({elapsed:.0f} s)", "", f"**{title}**", "",
                *markdown_table(bench, ratio_list), "", LEGEND, ""]
        if notes:
            text += ["Notes:", "", *(f"- {n}" for n in notes), ""]
        if profile_lines:
            text += ["### Per-op profiles", "", *profile_lines]
        markdown_path.write_text("\n".join(text) + "\n")
        console.print(f"wrote {markdown_path}")


if __name__ == "__main__":
    main()
