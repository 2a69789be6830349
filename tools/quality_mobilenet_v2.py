"""Quality without retraining on the pretrained MobileNetV2: criteria with and without bias compensation.

Calibration: the crops of the photos at even positions of the sorted photo list (named set
``photos-calib``); evaluation: the crops of the other photos (``photos-eval``), so no photo is on both
sides. Metric: agreement with the dense model (top-1: same argmax; top-5: dense argmax within the pruned
top 5) and the mean cosine of the logits. No ImageNet labels exist offline: this is fidelity, not accuracy.

Usage: .venv/bin/python tools/quality_mobilenet_v2.py [--ratios 0.2,0.3] [--round-to 16] [--markdown TABLE.md]
       .venv/bin/python tools/quality_mobilenet_v2.py --target-flops 0.35   # budget rows: allocations
       .venv/bin/python tools/quality_mobilenet_v2.py --reconstruction      # least-squares reconstruction rows
       .venv/bin/python tools/quality_mobilenet_v2.py --reconstruction --sequential  # + sequential rows
Results and their reading: docs/quality_mobilenet_v2.md.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from graphprune import api
from graphprune.calibration import photo_rows
from graphprune.models.imagenet_eval import run_onnx, topk_agreement
from graphprune.models.mobilenet_v2 import export_mobilenet_v2
from graphprune.models.photos import VIEWS, imagenet_batch

SHAPES = {"input": (1, 3, 224, 224)}
CALIB = "photos-calib"
# (criterion, calibration data given, bias compensation)
CONFIGS = [
    ("l2", False, False),
    ("l2", True, True),
    ("flap", True, False),
    ("flap", True, True),
    ("wanda-sp", True, False),
    ("wanda-sp", True, True),
    ("act-norm", True, False),
    ("act-norm", True, True),
]

# With --target-flops: (criterion, calibration + compensation, allocation); the first row is plain L2.
BUDGET_CONFIGS = [("l2", False, "uniform")] + [
    (criterion, True, allocation) for criterion in ("l2", "wanda-sp", "flap")
    for allocation in ("uniform", "global", "sensitivity")
]

# With --reconstruction: (criterion, calibration + compensation, reconstruction); the first row is plain L2.
# The "sequential" rows only with --sequential.
RECONSTRUCTION_CONFIGS = [("l2", False, False)] + [
    (criterion, True, reconstruct) for criterion in ("l2", "wanda-sp", "flap")
    for reconstruct in (False, True, "sequential")
]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def measure(ratios: list[float], round_to: int, target_flops: float | None = None,
            max_ratio: float = 0.9, reconstruction: bool = False,
            sequential: bool = False) -> tuple[list[dict], int, int]:
    dense = export_mobilenet_v2()
    rows = photo_rows("eval", len(VIEWS))
    batch = imagenet_batch(224, VIEWS)[rows]
    reference = run_onnx(dense, batch)
    results = []
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        runs = [(ratio, c, calibrated, compensate, "uniform") for ratio in ratios
                for c, calibrated, compensate in CONFIGS]
        if target_flops is not None:
            runs = [(None, c, calibrated, calibrated, allocation)
                    for c, calibrated, allocation in BUDGET_CONFIGS]
        rebuilt: dict[int, bool | str] = {}  # run index -> reconstruct option
        if reconstruction:  # reconstruction rows only (each with bias compensation of the other consumers)
            configs = [c for c in RECONSTRUCTION_CONFIGS if sequential or c[2] != "sequential"]
            rebuilt = {i: config[2] for i, config in enumerate(configs * len(ratios)) if config[2]}
            runs = [(ratio, c, calibrated, calibrated, "uniform") for ratio in ratios
                    for c, calibrated, _ in configs]
        for index, (ratio, criterion, calibrated, compensate, allocation) in enumerate(runs):
            reconstruct = rebuilt.get(index, False)
            path = Path(tmp) / "pruned.onnx"
            start = time.perf_counter()
            budget = {} if ratio is not None else {"target_flops": target_flops, "allocation": allocation,
                                                   "max_group_ratio": max_ratio}
            result = api.optimize(dense, path, ratio=ratio or 0.0, criterion=criterion, round_to=round_to,
                                  input_shapes=SHAPES, check=False, calib=CALIB if calibrated else None,
                                  compensate=compensate, reconstruct=reconstruct, **budget)
            seconds = time.perf_counter() - start
            logits = run_onnx(path, batch)
            agreement = topk_agreement(reference, logits, (1, 5))
            results.append({
                "ratio": ratio, "criterion": criterion, "compensate": compensate, "allocation": allocation,
                "reconstruct": reconstruct,
                "reconstruction": result.settings.get("reconstruction"),
                "used": ", ".join(result.settings["criteria_used"]),
                "macs": result.after.macs / result.before.macs - 1,
                "params": result.after.params / result.before.params - 1,
                "top1": agreement["top1"], "top5": agreement["top5"], "cosine": cosine(reference, logits),
                "seconds": seconds,
            })
            print(f"ratio {ratio} {allocation} {criterion:8s} comp={compensate!s:5s} rec={reconstruct!s:10s} "
                  f"top1 {agreement['top1']:.3f} top5 {agreement['top5']:.3f} cos {results[-1]['cosine']:.4f} ({seconds:.1f} s)",
                  file=sys.stderr)
    return results, len(batch), len(imagenet_batch(224, VIEWS)) - len(batch)


def markdown(results: list[dict], images: int) -> str:
    header = (f"| ratio | MACs | params | criterion | compensation | top-1 agree ({images}) | top-5 agree | "
              "logit cosine |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [_ratio(r), f"{100 * r['macs']:+.1f}%", f"{100 * r['params']:+.1f}%", r["used"],
                 _compensation(r), f"{100 * r['top1']:.1f}%", f"{100 * r['top5']:.1f}%",
                 f"{r['cosine']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _compensation(r: dict) -> str:
    if r.get("reconstruct") == "sequential":
        return "sequential reconstruction"
    if r.get("reconstruct"):
        return "reconstruction"
    return "bias" if r["compensate"] else "no"


def _ratio(r: dict) -> str:
    return f"{r['ratio']:g}" if r["ratio"] is not None else r["allocation"]


@click.command()
@click.option("--ratios", default="0.2,0.3", show_default=True, help="Comma-separated pruning ratios.")
@click.option("--round-to", type=int, default=16, show_default=True)
@click.option("--target-flops", type=float, default=None,
              help="Instead of ratios: this share of MACs removed, uniform vs global vs sensitivity allocation.")
@click.option("--max-ratio", type=float, default=0.9, show_default=True, help="Per-group cap for budgets.")
@click.option("--reconstruction", is_flag=True,
              help="Instead of the criteria rows: L2, wanda-sp and flap with bias compensation vs reconstruction.")
@click.option("--sequential", is_flag=True, help="With --reconstruction: add sequential reconstruction rows.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="Also write the table (markdown) to this file.")
def main(ratios: str, round_to: int, target_flops: float | None, max_ratio: float,
         markdown_path: Path | None, reconstruction: bool, sequential: bool) -> None:
    values = [float(r) for r in ratios.split(",") if r.strip()]
    results, images, calib_images = measure(values, round_to, target_flops, max_ratio, reconstruction,
                                             sequential)
    table = Table(title=f"MobileNetV2 (ImageNet weights): agreement with dense on {images} held-out photo "
                        f"crops (calibration: {calib_images} crops of other photos)")
    for name in ("ratio", "MACs", "params", "criterion", "comp.", "top-1", "top-5", "cosine"):
        table.add_column(name, justify="left" if name == "criterion" else "right")
    for r in results:
        table.add_row(_ratio(r), f"{100 * r['macs']:+.1f}%", f"{100 * r['params']:+.1f}%",
                      r["used"], _compensation(r), f"{100 * r['top1']:.1f}%",
                      f"{100 * r['top5']:.1f}%", f"{r['cosine']:.4f}")
    Console().print(table)
    if markdown_path is not None:
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
        markdown_path.write_text(f"<!-- generated by tools/quality_mobilenet_v2.py on {machine} -->\n"
                                 + markdown(results, images) + "\n")


if __name__ == "__main__":
    main()
