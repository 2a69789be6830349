"""`optimize --target-speedup S` on every CNN of the zoo, re-measured independently on ONNX Runtime.

For each zoo model (legacy export): graphprune.api.optimize(..., target_speedup=S, provider=P), which
measures a per-layer latency table, plans by importance lost per ms saved and checks the whole model until
the measured speedup reaches S (graphprune/latency_plan.py). The written model is then timed again against
the dense file with graphprune.bench.bench (its own sessions, interleaved runs), ``--repeats`` times; the
median of those speedups is the "re-measured" column. Columns:

  requested      S
  planned        the speedup the plan's last whole-model check measured (inside optimize)
  re-measured    median over repeats of graphprune.bench's speedup (dense median / pruned median)
  range          lowest and highest of the repeats
  paired         median over repeats of the median per-round ratio dense / pruned (the two run one after
                 the other in every round, so load that changes between rounds cancels)
  cpu-time       with --threads 1 on cpu: the same paired ratio on the thread CPU time of fresh sessions
                 (latency_plan.ort_timer, the clock the plan reads there): immune to other processes
  MACs, params   dense -> pruned change
  checks         whole-model checks the plan needed; table = widths timed
  plan s         planning time (table + checks), seconds

  fallbacks      the fallback rounds the plan ran (latency_plan.py, 4), each with what it measured;
                 "-" when the first round reached S

Usage: .venv/bin/python tools/target_speedup_zoo.py [--models a,b] [--speedup 1.5] [--provider cpu]
       [--batch 16] [--threads 1] [--units KINDS] [--rounds 300] [--repeats 3] [--markdown PATH]
       [--json PATH]
Without --units, optimize's default unit kinds are used as the CLI's are (the plan may add conv-group
units); with it, the kinds given, and no others.
About 10 minutes for the 14 models on 2 cores at the defaults.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from graphprune import api
from graphprune.bench import bench, cpu_name
from graphprune.inputs import make_inputs
from graphprune.latency_plan import ort_timer
from graphprune.models import zoo


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine(provider: str, threads: int | None) -> str:
    import onnxruntime as ort

    cpu = cpu_name()
    return (f"CPU: {cpu}, {os.cpu_count()} logical CPUs; onnxruntime {ort.__version__}, provider {provider}; "
            f"{threads or 'default'} intra-op thread(s); date {datetime.datetime.now():%Y-%m-%d %H:%M}")


def run_model(name: str, speedup: float, provider: str, batch: int, threads: int | None, rounds: int,
              repeats: int, folder: Path, units: tuple[str, ...] | None) -> dict[str, Any]:
    path = zoo.export(name)
    shapes = {"input": (batch, *zoo.ZOO[name].input_shape[1:])}
    out = folder / f"{name}-x{speedup:g}.onnx"
    started = time.perf_counter()
    result = api.optimize(path, out, target_speedup=speedup, provider=provider, threads=threads,
                          input_shapes=shapes, **({} if units is None else {"units": units}))
    seconds = time.perf_counter() - started
    record = result.settings["latency_plan"]
    speedups, paired = [], []
    for repeat in range(repeats):
        timing = bench([path, out], provider, overrides=shapes, rounds=rounds, threads=threads, seed=repeat,
                       samples=True)["providers"][0]
        speedups.append(timing["speedup"][0])
        dense, pruned = (np.asarray(m["samples_ms"]) for m in timing["models"])
        paired.append(float(np.median(dense / pruned)))
    cpu_time = None
    if provider == "cpu" and threads == 1:
        timer = ort_timer(["CPUExecutionProvider"], 1, "thread-cpu")
        feeds = make_inputs(onnx.load(path), overrides=shapes)
        dense, pruned = (np.asarray(t) for t in timer([path, out], [feeds, feeds], rounds))
        cpu_time = float(np.median(dense / pruned))
    table_widths = sum(len(row["widths"]) for row in record["table"])
    return {"model": name, "input": "x".join(map(str, shapes["input"])), "requested": speedup,
            "planned": record["measured_speedup"], "reached": record["target_reached"], "stop": record["stop"],
            "remeasured": statistics.median(speedups), "repeats": speedups,
            "paired": statistics.median(paired), "paired_repeats": paired, "cpu_time": cpu_time,
            "macs": (result.before.macs, result.after.macs), "params": (result.before.params, result.after.params),
            "checks": len(record["iterations"]), "widths_timed": table_widths,
            "fallbacks": [f"{r['fallback']} {r['measured_speedup']:.2f}x" for r in record["rounds"][1:]],
            "first_round": record["rounds"][0]["measured_speedup"],
            "plan_seconds": record["seconds"].get("total", 0.0), "optimize_seconds": seconds,
            "iterations": [{k: it[k] for k in ("predicted_speedup", "measured_speedup", "kept")}
                           for it in record["iterations"]]}


def _change(before: float, after: float) -> str:
    return f"{(after / before - 1) * 100:+.0f}%" if before else "-"


def rows_for(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        low, high = min(r["repeats"]), max(r["repeats"])
        macs = f"{r['macs'][0] / 1e6:.1f}M -> {r['macs'][1] / 1e6:.1f}M ({_change(*r['macs'])})"
        params = f"{r['params'][0] / 1e3:.1f}k -> {r['params'][1] / 1e3:.1f}k ({_change(*r['params'])})"
        remeasured = f"{r['remeasured']:.2f}x"
        rows.append([r["model"], r["input"], f"{r['requested']:.2f}x", f"{r['planned']:.2f}x",
                     f"**{remeasured}**" if r["remeasured"] >= r["requested"] else remeasured,
                     f"{low:.2f}-{high:.2f}", f"{r['paired']:.2f}x",
                     "-" if r["cpu_time"] is None else f"{r['cpu_time']:.2f}x", macs, params,
                     f"{r['checks']} ({r['widths_timed']})", f"{r['plan_seconds']:.0f}",
                     "yes" if r["reached"] else "no",
                     f"first {r['first_round']:.2f}x; " + ", ".join(r["fallbacks"]) if r["fallbacks"] else "-"])
    return rows


HEADERS = ["model", "input", "requested", "planned", "re-measured", "range", "paired", "cpu-time", "MACs",
           "params", "checks (table)", "plan s", "reached in plan", "fallbacks"]


def markdown(results: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| " + " | ".join(HEADERS) + " |",
             "|" + "|".join("---" if i in (0, 1, 12, 13) else "---:" for i in range(len(HEADERS))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows_for(results)]
    lines += ["", *notes(results)]
    return "\n".join(lines) + "\n"


def notes(results: list[dict[str, Any]]) -> list[str]:
    return [f"- {r['model']}: not reached in the plan ({r['stop']})." for r in results if not r["reached"]]


@click.command()
@click.option("--models", default=",".join(zoo.names()), show_default=True, help="Comma-separated zoo names.")
@click.option("--speedup", type=float, default=1.5, show_default=True)
@click.option("--provider", default="cpu", show_default=True)
@click.option("--batch", type=int, default=16, show_default=True,
              help="Batch of the timed inputs (the zoo's spatial sizes are fixed by the export).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="ONNX Runtime intra-op threads, for planning and re-measuring (0: ORT's default).")
@click.option("--units", default=None,
              help="Unit kinds to remove, as for `optimize --units`. [default: optimize's]")
@click.option("--rounds", type=int, default=300, show_default=True, help="Rounds of each re-measurement.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Independent re-measurements.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), help="Write the table here.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write every figure here.")
def main(models: str, speedup: float, provider: str, batch: int, threads: int, units: str | None, rounds: int,
         repeats: int, markdown_path: Path | None, json_path: Path | None) -> None:
    names = [m.strip() for m in models.split(",") if m.strip()]
    threads_used = threads or None
    header = machine(provider, threads_used) + f"; load average {load_average()} at start"
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="target-speedup-") as folder:
        for name in names:
            results.append(run_model(name, speedup, provider, batch, threads_used, rounds, repeats, Path(folder),
                                     None if units is None else tuple(u.strip() for u in units.split(",")
                                                                      if u.strip())))
            r = results[-1]
            Console(stderr=True).print(f"{name}: planned {r['planned']:.2f}x, re-measured {r['remeasured']:.2f}x "
                                       f"({r['plan_seconds']:.0f} s); load {load_average()}")
    header += (f", {load_average()} at end; {time.perf_counter() - started:.0f} s in all. Command: "
               f"`tools/target_speedup_zoo.py --speedup {speedup:g} --provider {provider} --batch {batch} "
               f"--threads {threads}{'' if units is None else f' --units {units}'} --rounds {rounds} "
               f"--repeats {repeats}`")
    table = Table(title=f"--target-speedup {speedup:g} on the zoo ({provider}, batch {batch})")
    for column in HEADERS:
        table.add_column(column, justify="left" if column in ("model", "input", "reached in plan", "fallbacks")
                         else "right")
    for row in rows_for(results):
        table.add_row(*[cell.replace("**", "") for cell in row])
    Console().print(table)
    Console().print(header)
    for line in notes(results):
        Console().print(line)
    reached = sum(r["remeasured"] >= r["requested"] for r in results)
    Console().print(f"Re-measured at or above {speedup:g}x: {reached} of {len(results)}.")
    if markdown_path:
        markdown_path.write_text(markdown(results, header))
    if json_path:
        json_path.write_text(json.dumps({"header": header, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
