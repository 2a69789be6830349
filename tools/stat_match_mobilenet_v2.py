"""One MobileNetV2 configuration at -35% MACs, with or without statistics matching, scored on held-out crops.

Prunes the pretrained MobileNetV2 with ``api.optimize(target_flops=0.35, round_to=8, calib=...)`` and the
options given, then prints one JSON line: the options, top-1/top-5 agreement with the dense model and the
mean logit cosine on the held-out crops (``--held-out``: the 96 ``photos-eval`` crops, or the 252
``natural-eval`` crops, which need tools/fetch_models.py), and the seconds taken. The rows of
docs/stat_match.md came from this tool.

Usage: .venv/bin/python tools/stat_match_mobilenet_v2.py --criterion wanda-sp --reconstruct one-shot \\
           --match-stats moments --protect residual --allocation global [--calib FILE] [--max-ratio 0.4]
       .venv/bin/python tools/stat_match_mobilenet_v2.py --calib natural-calib --held-out natural-eval
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from graphprune import api
from graphprune.calibration import DATASETS
from graphprune.models.imagenet_eval import run_onnx, topk_agreement
from graphprune.models.mobilenet_v2 import export_mobilenet_v2


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@click.command()
@click.option("--criterion", default="wanda-sp", show_default=True)
@click.option("--reconstruct", type=click.Choice(["none", "one-shot", "sequential"]), default="one-shot",
              show_default=True)
@click.option("--match-stats", type=click.Choice(["none", "mean", "moments", "regression"]), default="moments",
              show_default=True)
@click.option("--protect", default="residual", show_default=True, help="Comma-separated roles, or 'none'.")
@click.option("--allocation", default="global", show_default=True)
@click.option("--calib", default="photos-calib", show_default=True, help="Named set or .npz file.")
@click.option("--max-ratio", type=float, default=0.9, show_default=True)
@click.option("--exclude", multiple=True, help="Node-name patterns left whole.")
@click.option("--held-out", type=click.Choice(["photos-eval", "natural-eval"]), default="photos-eval",
              show_default=True, help="The named set scored (never a calibration set).")
def main(criterion: str, reconstruct: str, match_stats: str, protect: str, allocation: str, calib: str,
         max_ratio: float, exclude: tuple[str, ...], held_out: str) -> None:
    dense = export_mobilenet_v2()
    batch = np.concatenate([feeds["input"] for feeds in DATASETS[held_out](["input"], 64)])
    reference = run_onnx(dense, batch)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stat-match-") as tmp:
        out = Path(tmp) / "pruned.onnx"
        result = api.optimize(dense, out, criterion=criterion, target_flops=0.35, round_to=8, calib=calib,
                              reconstruct={"none": False, "one-shot": True}.get(reconstruct, reconstruct),
                              match_stats="" if match_stats == "none" else match_stats,
                              protect=() if protect == "none" else tuple(protect.split(",")),
                              allocation=allocation, max_group_ratio=max_ratio, exclude=exclude,
                              input_shapes={"input": (1, 3, 224, 224)})
        pruned = run_onnx(out, batch)
    agreement = topk_agreement(reference, pruned)
    print(json.dumps({"criterion": criterion, "reconstruct": reconstruct, "match_stats": match_stats,
                      "protect": protect, "allocation": allocation, "calib": calib, "max_ratio": max_ratio,
                      "exclude": list(exclude), "held_out": held_out, "top1": round(agreement["top1"], 4),
                      "top5": round(agreement["top5"], 4), "cosine": round(cosine(reference, pruned), 4),
                      "macs": round(result.after.macs / result.before.macs - 1, 4),
                      "seconds": round(time.perf_counter() - start)}))


if __name__ == "__main__":
    main()
