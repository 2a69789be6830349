"""prune-experts on a moderately sized MoE: dense vs experts kept, structure, size, latency, fidelity.

Usage: .venv/bin/python tools/prune_experts_moe.py [--form ort|mixtral|both] [--keep 6,4,2] [--rounds 30]
                                                   [--threads 1] [--markdown FILE]

Models (random weights, models/moe.py; fidelity is to the dense model only, never accuracy):
- ``ort``: one com.microsoft MoE layer, E=8, k=2, D=1024, hidden 2816, relu, biases, normalize_routing_weights=1,
  T=128 tokens;
- ``mixtral``: transformers' MixtralModel (2 layers, D=256, hidden 512, E=8, k=2, 4 heads / 2 KV heads),
  exported written out with experts_implementation='batched_mm', 1 x 128 tokens.

Experts are ranked on calibration data (standard normal token rows / random token ids, 512 tokens) by summed
gate weight; fidelity is measured on other data of the same kind (relative L2 and mean per-token cosine
to the dense outputs). Latency: ONNX Runtime CPU, every model of a form timed interleaved in one
compare_latency run (graphprune.latency), medians.
"""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import click
import numpy as np
import onnxruntime

from graphprune import api
from graphprune.latency import compare_latency
from graphprune.models import moe

TOKENS = 128


def _fidelity(dense: np.ndarray, pruned: np.ndarray) -> tuple[float, float]:
    a, b = dense.reshape(-1, dense.shape[-1]).astype(np.float64), pruned.reshape(-1, dense.shape[-1]).astype(np.float64)
    rel = float(np.linalg.norm(b - a) / np.linalg.norm(a))
    cos = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))
    return rel, cos


def _run(path: Path, feeds: dict, threads: int) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _form(name: str, folder: Path) -> tuple[Path, Path, dict, dict]:
    """(dense model, calibration file, evaluation feeds, latency feeds)."""
    dense = folder / f"{name}.onnx"
    calib = folder / f"{name}-calib.npz"
    if name == "ort":
        import onnx

        onnx.save(moe.ort_moe(hidden=1024, inter=2816, experts=8, k=2, normalize=1, bias=True, seed=0), dense)
        np.savez(calib, x=moe.tokens_like(1024, 512, seed=1))
        evaluation = {"x": moe.tokens_like(1024, 512, seed=2)}
        timing = {"x": moe.tokens_like(1024, TOKENS, seed=3)}
    else:
        moe.export_mixtral(dense, hidden=256, inter=512, experts=8, k=2, layers=2, heads=4, kv_heads=2,
                           vocab=1000, tokens=16)
        np.savez(calib, **moe.token_ids(4, TOKENS, vocab=1000, seed=1))
        evaluation = moe.token_ids(4, TOKENS, vocab=1000, seed=2)
        timing = moe.token_ids(1, TOKENS, vocab=1000, seed=3)
    return dense, calib, evaluation, timing


def measure(name: str, keeps: list[int], rounds: int, threads: int, folder: Path) -> list[dict]:
    dense, calib, evaluation, timing = _form(name, folder)
    rows, models = [], [dense]
    reference = _run(dense, evaluation, threads)
    for keep in keeps:
        out = folder / f"{name}-keep{keep}.onnx"
        result = api.prune_experts(dense, out, experts_keep=keep, calib=calib, calib_batch_size=128 if name == "ort"
                                   else 1)
        rel, cos = _fidelity(reference, _run(out, evaluation, threads))
        layer = result.layers[0]
        rows.append({"form": name, "config": f"keep {keep}", "experts": ", ".join(
                         f"{c.experts}→{len(c.kept)}" for c in result.layers),
                     "params": result.after.params, "file": os.path.getsize(out), "rel_l2": rel, "cos": cos,
                     "removed_routes": sum(c.removed_routes for c in result.layers),
                     "routes": sum(c.tokens * c.k for c in result.layers), "kept": layer.kept,
                     "frequency": layer.frequency, "before_params": result.before.params})
        models.append(out)
    latency = compare_latency(models, timing, rounds=rounds, warmup=3, threads=threads)
    dense_row = {"form": name, "config": "dense", "experts": ", ".join("8" for _ in rows[0]["experts"].split(", ")),
                 "params": rows[0]["before_params"], "file": os.path.getsize(dense), "rel_l2": 0.0, "cos": 1.0,
                 "removed_routes": 0, "routes": rows[0]["routes"], "kept": None, "frequency": None}
    rows = [dense_row, *rows]
    for row, result in zip(rows, latency, strict=True):
        row["latency_ms"] = result.median_ms
        row["speedup"] = latency[0].median_ms / result.median_ms
    return rows


def markdown(rows: list[dict]) -> str:
    header = ("| form | config | experts per layer | params | file | latency (median) | speedup | routes to removed "
              "experts (calib) | rel L2 to dense | cosine to dense |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['form']} | {r['config']} | {r['experts']} | {r['params'] / 1e6:.2f} M | "
                     f"{r['file'] / 2**20:.1f} MiB | {r['latency_ms']:.2f} ms | {r['speedup']:.2f}x | "
                     f"{r['removed_routes'] / max(r['routes'], 1):.1%} | {r['rel_l2']:.3f} | {r['cos']:.3f} |")
    return "\n".join(lines)


@click.command()
@click.option("--form", type=click.Choice(["ort", "mixtral", "both"]), default="both", show_default=True)
@click.option("--keep", default="6,4,2", show_default=True, help="Experts kept per layer, comma-separated.")
@click.option("--rounds", type=int, default=30, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path))
def main(form: str, keep: str, rounds: int, threads: int, markdown_path: Path | None) -> None:
    keeps = [int(k) for k in keep.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="prune-experts-") as folder:
        for name in (["ort", "mixtral"] if form == "both" else [form]):
            rows += measure(name, keeps, rounds, threads, Path(folder))
            for row in rows:
                if row["form"] == name and row["frequency"] is not None:
                    print(name, row["config"], "kept", row["kept"], "first-layer frequency",
                          [round(f, 3) for f in row["frequency"]])
    table = markdown(rows)
    note = (f"\n\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, onnxruntime "
            f"{onnxruntime.__version__}, {threads} intra-op thread(s), {rounds} interleaved rounds.")
    print(table + note)
    if markdown_path is not None:
        markdown_path.write_text(table + note + "\n")


if __name__ == "__main__":
    main()
