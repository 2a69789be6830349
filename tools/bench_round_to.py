"""Which channel multiple do ONNX Runtime's CPU kernels like? Evidence for the default of --round-to.

Builds small ONNX models with onnx.helper (single Conv 3x3 / 1x1 / depthwise 3x3, MatMul and Gemm, and
two few-layer blocks), sweeps the channel count, and times every model of a sweep interleaved in one
compare_latency call (ORT CPU, default graph optimisations, medians). For each point it also records the
channel count ORT's NCHWc layout transformer really computes (it zero-pads channels to its block size).

Usage: .venv/bin/python tools/bench_round_to.py [--threads 1] [--seconds 45] [--sweeps a,b] [--markdown PATH]
(at most 9 sweeps x --seconds; about 5 minutes at the defaults on 2 cores)
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from graphprune.latency import compare_latency
from graphprune.metrics import count_macs

MULTIPLES = (1, 4, 8, 16, 32)
OPSET = 17


# ---------- model builders ----------


class Builder:
    """Accumulates nodes and initializers; every tensor name carries a prefix so feeds never collide."""

    def __init__(self, prefix: str, seed: int) -> None:
        self.prefix, self.nodes, self.inits = prefix, [], []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{self.prefix}_{base}{self.count}"

    def weight(self, shape: tuple[int, ...]) -> str:
        fan_in = math.prod(shape[1:]) or 1
        value = (self.rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def conv(self, x: str, cin: int, cout: int, kernel: int, group: int = 1, relu: bool = False) -> str:
        w, b, y = self.weight((cout, cin // group, kernel, kernel)), self.weight((cout,)), self.name("y")
        pads = [kernel // 2] * 4
        self.nodes.append(helper.make_node("Conv", [x, w, b], [y], pads=pads, group=group, name=y))
        if relu:
            out = self.name("r")
            self.nodes.append(helper.make_node("Relu", [y], [out], name=out))
            y = out
        return y

    def model(self, x: str, x_shape: list[int], y: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.prefix,
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model


def conv_model(kind: str, hw: int) -> Callable[[int, str], tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    """kind: conv3x3, conv1x1, dw3x3 (single layer, C_in = C_out = c), chain3x3 (three 3x3 + ReLU)."""

    def build(c: int, prefix: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        b = Builder(prefix, seed=c)
        x = f"{prefix}_x"
        if kind == "conv3x3":
            y = b.conv(x, c, c, 3)
        elif kind == "conv1x1":
            y = b.conv(x, c, c, 1)
        elif kind == "dw3x3":
            y = b.conv(x, c, c, 3, group=c)
        elif kind == "chain3x3":
            y = x
            for _ in range(3):
                y = b.conv(y, c, c, 3, relu=True)
        else:
            raise ValueError(kind)
        shape = [1, c, hw, hw]
        return b.model(x, shape, y), {x: _data(shape, c)}

    return build


def inverted_residual(cio: int, hw: int) -> Callable[[int, str], tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    """MobileNetV2-style block: 1x1 expand cio->c, ReLU, dw 3x3 on c, ReLU, 1x1 project c->cio; c swept."""

    def build(c: int, prefix: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        b = Builder(prefix, seed=c)
        x = f"{prefix}_x"
        y = b.conv(x, cio, c, 1, relu=True)
        y = b.conv(y, c, c, 3, group=c, relu=True)
        y = b.conv(y, c, cio, 1)
        shape = [1, cio, hw, hw]
        return b.model(x, shape, y), {x: _data(shape, c)}

    return build


def matmul_model(op: str, m: int) -> Callable[[int, str], tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    """[m, K] x [K, N] with K = N = c and a constant weight: MatMul (as in transformers) or Gemm transB=1
    (as torch.nn.Linear exports)."""

    def build(c: int, prefix: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        b = Builder(prefix, seed=c)
        x, y = f"{prefix}_x", b.name("y")
        if op == "matmul":
            w = b.weight((c, c))
            b.nodes.append(helper.make_node("MatMul", [x, w], [y], name=y))
        else:
            w, bias = b.weight((c, c)), b.weight((c,))
            b.nodes.append(helper.make_node("Gemm", [x, w, bias], [y], transB=1, name=y))
        shape = [m, c]
        return b.model(x, shape, y), {x: _data(shape, c)}

    return build


def _data(shape: list[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@dataclass
class Sweep:
    name: str
    description: str
    build: Callable[[int, str], tuple[onnx.ModelProto, dict[str, np.ndarray]]]
    channels: list[int]


def _span(lo: int, hi: int, step: int) -> list[int]:
    return list(range(lo, hi + 1, step))


SWEEPS = [
    Sweep("conv3x3@28", "Conv 3x3, C->C, 28x28", conv_model("conv3x3", 28), _span(48, 72, 1)),
    Sweep("conv3x3@56", "Conv 3x3, C->C, 56x56", conv_model("conv3x3", 56), _span(96, 136, 2)),
    Sweep("conv1x1@56", "Conv 1x1, C->C, 56x56", conv_model("conv1x1", 56), _span(48, 72, 1)),
    Sweep("conv1x1@28", "Conv 1x1, C->C, 28x28", conv_model("conv1x1", 28), _span(96, 136, 2)),
    Sweep("dw3x3@56", "depthwise Conv 3x3 (group=C), 56x56", conv_model("dw3x3", 56), _span(96, 136, 2)),
    Sweep("chain3x3@28", "3 x (Conv 3x3 + ReLU), C->C, 28x28", conv_model("chain3x3", 28), _span(48, 72, 1)),
    Sweep("invres@28", "1x1 32->C, dw 3x3 C, 1x1 C->32 (+ReLU), 28x28", inverted_residual(32, 28),
          _span(96, 136, 2)),
    Sweep("matmul", "MatMul [256,K]x[K,N], K=N=C", matmul_model("matmul", 256), _span(96, 136, 2)),
    Sweep("gemm", "Gemm transB [64,K]x[N,K]^T + bias, K=N=C", matmul_model("gemm", 64), _span(96, 136, 2)),
]


# ---------- measurement ----------


@dataclass
class Point:
    channels: int
    macs: int
    median_ms: float
    min_ms: float
    p90_ms: float
    computed: str = ""  # what ORT runs: "nchwc:64" when the NCHWc transformer pads 60 channels to 64

    def ms(self, stat: str = "median") -> float:
        return self.min_ms if stat == "min" else self.median_ms

    def ns_per_mac(self, stat: str = "median") -> float:
        return self.ms(stat) * 1e6 / self.macs


@dataclass
class SweepResult:
    sweep: Sweep
    points: list[Point] = field(default_factory=list)
    seconds: float = 0.0
    rounds: int = 0


def kernel_path(model: onnx.ModelProto, threads: int) -> str:
    """The optimised graph's NCHWc conv channel counts (after zero-padding), or the op types if none."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="round-to-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        opt = onnx.load(options.optimized_model_filepath)
    dims = {t.name: list(t.dims) for t in opt.graph.initializer}
    padded = []
    for node in opt.graph.node:
        if node.domain == "com.microsoft.nchwc" and node.op_type == "Conv":
            padded.append(str(dims.get(node.input[1], ["?"])[0]))
    if padded:
        return "nchwc:" + "/".join(padded)
    ops = sorted({n.op_type for n in opt.graph.node if n.op_type not in ("Relu",)})
    return ",".join(ops)


def run_sweep(sweep: Sweep, seconds: float, min_rounds: int, max_rounds: int, threads: int) -> SweepResult:
    """Time the sweep's models interleaved; the round count is chosen to fill about `seconds`."""
    start = time.perf_counter()
    models, feeds = [], {}
    for c in sweep.channels:
        model, feed = sweep.build(c, f"c{c}")
        models.append(model)
        feeds.update(feed)
    probe = compare_latency(models, feeds, rounds=3, warmup=1, threads=threads)
    per_round = sum(t.median_ms for t in probe) / 1000.0
    rounds = int(min(max_rounds, max(min_rounds, seconds / max(per_round, 1e-6))))
    timings = compare_latency(models, feeds, rounds=rounds, warmup=3, threads=threads)
    result = SweepResult(sweep, rounds=rounds)
    for c, model, t in zip(sweep.channels, models, timings, strict=True):
        macs = count_macs(model).total
        result.points.append(Point(c, macs, t.median_ms, t.min_ms, t.p90_ms, kernel_path(model, threads)))
    result.seconds = time.perf_counter() - start
    return result


# ---------- summaries ----------


def _ceil(c: int, m: int) -> int:
    return -(-c // m) * m


def summary_rows(results: list[SweepResult], stat: str = "median") -> list[dict[str, float | int | str]]:
    """Per candidate multiple m, over all sweeps:

    - norm ns/MAC of multiples vs non-multiples, each point divided by its sweep's median ns/MAC;
    - round-up cost: median latency(ceil_m(c)) / latency(c) over non-multiples c whose ceil was measured
      (<= 1.00 means rounding up to m is free: more channels kept at no latency cost);
    - round-down gain: median latency(floor_m(c)) / latency(c) (< 1.00: rounding down saves time).
    """
    rows = []
    for m in MULTIPLES:
        mult, other, up, down = [], [], [], []
        for r in results:
            ref = statistics.median(p.ns_per_mac(stat) for p in r.points)
            by_c = {p.channels: p for p in r.points}
            for p in r.points:
                (mult if p.channels % m == 0 else other).append(p.ns_per_mac(stat) / ref)
                if p.channels % m:
                    hi, lo = _ceil(p.channels, m), p.channels // m * m
                    if hi in by_c:
                        up.append(by_c[hi].ms(stat) / p.ms(stat))
                    if lo in by_c:
                        down.append(by_c[lo].ms(stat) / p.ms(stat))
        a = statistics.mean(mult) if mult else float("nan")
        b = statistics.mean(other) if other else float("nan")
        rows.append({
            "multiple": m, "n_mult": len(mult), "mult": a, "n_other": len(other), "other": b,
            "ratio": b / a if mult and other else float("nan"),
            "up": statistics.median(up) if up else float("nan"), "n_up": len(up),
            "down": statistics.median(down) if down else float("nan"), "n_down": len(down),
        })
    return rows


def eight_vs_sixteen(results: list[SweepResult], stat: str = "median") -> list[tuple[str, int, float, float]]:
    """For C = 16k + 8 (a multiple of 8 that is not one of 16): latency(C) / latency(C + 8), near 1 when C
    costs as much as the next multiple of 16, and latency(C - 8) / latency(C), the time left by rounding to
    16 instead. Per sweep: (name, count, median of the first, median of the second)."""
    rows = []
    for r in results:
        by_c = {p.channels: p for p in r.points}
        up = [by_c[c].ms(stat) / by_c[c + 8].ms(stat) for c in by_c if c % 16 == 8 and c + 8 in by_c]
        down = [by_c[c - 8].ms(stat) / by_c[c].ms(stat) for c in by_c if c % 16 == 8 and c - 8 in by_c]
        if up or down:
            rows.append((r.sweep.name, max(len(up), len(down)),
                         statistics.median(up) if up else float("nan"),
                         statistics.median(down) if down else float("nan")))
    return rows


def per_sweep_rows(results: list[SweepResult], stat: str = "median") -> list[tuple[str, dict[int, float]]]:
    """ns/MAC of multiples of m relative to non-multiples of m, per sweep (> 1: non-multiples are slower)."""
    rows = []
    for r in results:
        ratios = {}
        for m in MULTIPLES[1:]:
            mult = [p.ns_per_mac(stat) for p in r.points if p.channels % m == 0]
            other = [p.ns_per_mac(stat) for p in r.points if p.channels % m]
            ratios[m] = statistics.mean(other) / statistics.mean(mult) if mult and other else float("nan")
        rows.append((r.sweep.name, ratios))
    return rows


# ---------- output ----------


def machine(threads: int) -> dict[str, str]:
    import onnxruntime as ort

    cpu, flags, family, model_no = "unknown", set(), "?", "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and cpu == "unknown":
                cpu = value
            elif key == "cpu family" and family == "?":
                family = value
            elif key == "model" and model_no == "?":
                model_no = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = "AVX-512F" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    return {
        "cpu": f"{cpu} (family {family}, model {model_no}, {isa}), {os.cpu_count()} logical CPUs",
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "threads": f"{threads} intra-op thread(s)",
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


STATS = ("median", "min")
EXPLAIN = ("ns/MAC is normalised to each sweep's median ns/MAC before averaging. round-up cost = median "
           "latency(ceil_m(C)) / latency(C) over the non-multiples C (<= 1: rounding up to m keeps more "
           "channels at no latency cost); round-down time = median latency(floor_m(C)) / latency(C) "
           "(< 1: rounding down to m saves time).")

EIGHT = ("lat(C) / lat(C+8) near 1.00: a count that is a multiple of 8 but not of 16 costs as much as the next "
         "multiple of 16 (8 more channels kept for free); lat(C-8) / lat(C): the time left when rounding to 16 "
         "instead (below 1.00: a real saving).")


def print_results(console: Console, results: list[SweepResult], info: dict[str, str]) -> None:
    console.print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    for r in results:
        table = Table(title=f"{r.sweep.name}: {r.sweep.description} ({r.rounds} rounds, {r.seconds:.0f} s)")
        for col in ("C", "MMACs", "median ms", "min ms", "p90 ms", "ns/MAC", "vs sweep median",
                    "ORT computes"):
            table.add_column(col, justify="right")
        ref = statistics.median(p.ns_per_mac() for p in r.points)
        for p in r.points:
            style = "bold" if p.channels % 16 == 0 else ("" if p.channels % 4 == 0 else "dim")
            table.add_row(str(p.channels), f"{p.macs / 1e6:.1f}", f"{p.median_ms:.3f}", f"{p.min_ms:.3f}",
                          f"{p.p90_ms:.3f}", f"{p.ns_per_mac():.4f}", f"{p.ns_per_mac() / ref:.3f}", p.computed,
                          style=style)
        console.print(table)
    for stat in STATS:
        per = Table(title=f"Per sweep ({stat} latency): mean ns/MAC of non-multiples / multiples of m "
                          "(> 1: non-multiples slower)")
        per.add_column("sweep")
        for m in MULTIPLES[1:]:
            per.add_column(f"m={m}", justify="right")
        for name, ratios in per_sweep_rows(results, stat):
            per.add_row(name, *(_fmt(ratios[m]) for m in MULTIPLES[1:]))
        console.print(per)
        summ = Table(title=f"Summary over all sweeps ({stat} latency)")
        for col in ("multiple m", "multiples: n, ns/MAC", "others: n, ns/MAC", "others / multiples",
                    "round-up cost", "round-down time"):
            summ.add_column(col, justify="right")
        for row in summary_rows(results, stat):
            summ.add_row(str(row["multiple"]), f"{row['n_mult']}, {_fmt(row['mult'])}",
                         f"{row['n_other']}, {_fmt(row['other'])}", _fmt(row["ratio"]),
                         f"{_fmt(row['up'])} (n={row['n_up']})", f"{_fmt(row['down'])} (n={row['n_down']})")
        console.print(summ)
    console.print(EXPLAIN)
    e16 = Table(title="Channel counts 16k+8 (multiples of 8, not of 16), median latency")
    for col in ("sweep", "n", "lat(C) / lat(C+8)", "lat(C-8) / lat(C)"):
        e16.add_column(col, justify="right")
    for name, n, up, down in eight_vs_sixteen(results):
        e16.add_row(name, str(n), _fmt(up), _fmt(down))
    console.print(e16)
    console.print(EIGHT)


def markdown(results: list[SweepResult], info: dict[str, str], command: str) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += [f"| command | `{command}` |", "", EXPLAIN, ""]
    for stat in STATS:
        lines += [f"### Summary over all sweeps ({stat} latency)", "",
                  ("| multiple m | multiples (n) | ns/MAC, multiples | non-multiples (n) | "
                   "ns/MAC, non-multiples | non-mult / mult | round-up cost | round-down time |"),
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in summary_rows(results, stat):
            lines.append(f"| {row['multiple']} | {row['n_mult']} | {_fmt(row['mult'])} | {row['n_other']} | "
                         f"{_fmt(row['other'])} | {_fmt(row['ratio'])} | {_fmt(row['up'])} | "
                         f"{_fmt(row['down'])} |")
        lines += ["", f"Per sweep ({stat} latency): mean ns/MAC of non-multiples / multiples of m", "",
                  "| sweep | " + " | ".join(f"m={m}" for m in MULTIPLES[1:]) + " |",
                  "|---|" + "---:|" * (len(MULTIPLES) - 1)]
        for name, ratios in per_sweep_rows(results, stat):
            lines.append(f"| {name} | " + " | ".join(_fmt(ratios[m]) for m in MULTIPLES[1:]) + " |")
        lines.append("")
    lines += ["### Channel counts 16k+8 (multiples of 8, not of 16), median latency", "", EIGHT, "",
              "| sweep | n | lat(C) / lat(C+8) | lat(C-8) / lat(C) |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {n} | {_fmt(up)} | {_fmt(down)} |" for name, n, up, down in eight_vs_sixteen(results)]
    lines.append("")
    for r in results:
        ref = statistics.median(p.ns_per_mac() for p in r.points)
        lines += [f"### {r.sweep.name}: {r.sweep.description} ({r.rounds} rounds)", "",
                  "| C | MMACs | median ms | min ms | p90 ms | ns/MAC | vs sweep median | ORT computes |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for p in r.points:
            c = f"**{p.channels}**" if p.channels % 16 == 0 else str(p.channels)
            lines.append(f"| {c} | {p.macs / 1e6:.1f} | {p.median_ms:.3f} | {p.min_ms:.3f} | {p.p90_ms:.3f} | "
                         f"{p.ns_per_mac():.4f} | {p.ns_per_mac() / ref:.3f} | {p.computed} |")
        lines.append("")
    return "\n".join(lines)


@click.command()
@click.option("--threads", type=int, default=1, show_default=True, help="ORT intra-op threads.")
@click.option("--seconds", type=float, default=45.0, show_default=True,
              help="Timing budget per sweep; the interleaved round count is chosen to fill it.")
@click.option("--min-rounds", type=int, default=30, show_default=True)
@click.option("--max-rounds", type=int, default=3000, show_default=True)
@click.option("--sweeps", default="", help=f"Comma-separated subset of: {', '.join(s.name for s in SWEEPS)}.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="Also write the tables as markdown to this file.")
def main(threads: int, seconds: float, min_rounds: int, max_rounds: int, sweeps: str,
         markdown_path: Path | None) -> None:
    wanted = [s.strip() for s in sweeps.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {s.name for s in SWEEPS})
    if unknown:
        raise click.BadParameter(f"unknown sweep(s): {', '.join(unknown)}", param_hint="--sweeps")
    chosen = [s for s in SWEEPS if not wanted or s.name in wanted]
    console, status = Console(), Console(stderr=True)
    info = machine(threads)
    info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    for sweep in chosen:
        with status.status(f"{sweep.name}: {len(sweep.channels)} models, about {seconds:.0f} s"):
            results.append(run_sweep(sweep, seconds, min_rounds, max_rounds, threads))
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print_results(console, results, info)
    if markdown_path is not None:
        command = " ".join(["tools/bench_round_to.py", *sys.argv[1:]])
        markdown_path.write_text(markdown(results, info, command))
        console.print(f"wrote {markdown_path}")


if __name__ == "__main__":
    main()
