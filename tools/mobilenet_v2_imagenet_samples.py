"""MobileNetV2 at -35% MACs on foolbox's 20 labelled ImageNet photos and on the 96 held-out photo crops.

Each configuration is pruned once with ``api.optimize(target_flops=0.35, round_to=8, ...)``, calibrated on
``photos-calib`` (100 crops of the even photos) where it uses data, and the one pruned model is scored on:

- the 20 foolbox ImageNet samples (evaluator ``mobilenet_v2_imagenet``): true top-1/top-5 accuracy against
  their labels, top-1/top-5 agreement with the dense model and the mean logit cosine. These 20 images are
  evaluation data only: no configuration calibrates on them. One image is 5 points.
- the 96 ``photos-eval`` crops (evaluator ``mobilenet_v2``): top-1/top-5 agreement with the dense model and
  the mean logit cosine (no labels there).

Results go to a JSON-lines file, one line per configuration, so configurations can run one at a time
(each run appends); ``--markdown`` prints the table of every line in the file.

Usage: .venv/bin/python tools/mobilenet_v2_imagenet_samples.py --configs l2,wanda-rec-res-uniform
           --out /tmp/mnv2_imagenet.jsonl
       .venv/bin/python tools/mobilenet_v2_imagenet_samples.py --out /tmp/mnv2_imagenet.jsonl --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from graphprune import api
from graphprune.models import evaluators as ev
from graphprune.models.similarity_eval import cosine_to

# name -> (description, optimize keyword arguments beyond the shared ones)
CONFIGS: dict[str, tuple[str, dict]] = {
    "l2": ("l2, no data, uniform", {"criterion": "l2"}),
    "l2-global": ("l2, no data, global", {"criterion": "l2", "allocation": "global"}),
    "wanda-rec-res-uniform": ("wanda-sp + reconstruction, residual protected, uniform",
                              {"criterion": "wanda-sp", "reconstruct": True, "protect": ("residual",)}),
    "wanda-rec-res-global": ("wanda-sp + reconstruction, residual protected, global",
                             {"criterion": "wanda-sp", "reconstruct": True, "protect": ("residual",),
                              "allocation": "global"}),
    "wanda-seq-res-global": ("wanda-sp + sequential reconstruction, residual protected, global",
                             {"criterion": "wanda-sp", "reconstruct": "sequential", "protect": ("residual",),
                              "allocation": "global"}),
    "obs-rec-res-uniform": ("obs + reconstruction, residual protected, uniform",
                            {"criterion": "obs", "reconstruct": True, "protect": ("residual",)}),
    # Beyond the list: the rest of the {wanda-sp, obs} x {one-shot, sequential} x allocation grid.
    "wanda-seq-res-uniform": ("wanda-sp + sequential reconstruction, residual protected, uniform",
                              {"criterion": "wanda-sp", "reconstruct": "sequential", "protect": ("residual",)}),
    "obs-rec-res-global": ("obs + reconstruction, residual protected, global",
                           {"criterion": "obs", "reconstruct": True, "protect": ("residual",),
                            "allocation": "global"}),
    "obs-seq-res-uniform": ("obs + sequential reconstruction, residual protected, uniform",
                            {"criterion": "obs", "reconstruct": "sequential", "protect": ("residual",)}),
    "obs-seq-res-global": ("obs + sequential reconstruction, residual protected, global",
                           {"criterion": "obs", "reconstruct": "sequential", "protect": ("residual",),
                            "allocation": "global"}),
}
SHARED = {"target_flops": 0.35, "round_to": 8, "input_shapes": {"input": (1, 3, 224, 224)}, "check": False}
CALIB = "photos-calib"


def _scores(evaluator: ev.Evaluator, dense_logits: np.ndarray, model: str) -> dict:
    metrics, logits = evaluator.run(model)
    return {"metrics": metrics, "agreement": evaluator.agree(dense_logits, logits),
            "cosine": cosine_to(dense_logits.astype(np.float64), logits.astype(np.float64))}


def measure(names: list[str], out: Path) -> None:
    imagenet, photos = ev.get_evaluator("mobilenet_v2_imagenet"), ev.get_evaluator("mobilenet_v2")
    for evaluator in (imagenet, photos):
        if not evaluator.available():
            sys.exit(f"{evaluator.name}: wheels not fetched; run `python tools/fetch_models.py`")
    dense = os.fspath(imagenet.dense_model())
    dense_runs = {e.name: e.run(dense) for e in (imagenet, photos)}
    with tempfile.TemporaryDirectory(prefix="mnv2-imagenet-") as scratch:
        pruned = os.path.join(scratch, "pruned.onnx")
        for name in names:
            description, options = CONFIGS[name]
            kwargs = {**SHARED, **options}
            if "reconstruct" in options or options["criterion"] != "l2":
                kwargs.update(calib=CALIB, compensate=True)
            start = time.perf_counter()
            result = api.optimize(dense, pruned, **kwargs)
            seconds = time.perf_counter() - start
            row = {"config": name, "description": description, "seconds": seconds,
                   "macs": result.after.macs / result.before.macs - 1,
                   "params": result.after.params / result.before.params - 1,
                   "calib": kwargs.get("calib"), "load": os.getloadavg()[0]}
            for evaluator in (imagenet, photos):
                dense_metrics, dense_logits = dense_runs[evaluator.name]
                row[evaluator.name] = {"dense": dense_metrics, **_scores(evaluator, dense_logits, pruned)}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            im, ph = row["mobilenet_v2_imagenet"], row["mobilenet_v2"]
            print(f"{name}: imagenet acc {im['metrics']['top1']:.2f}/{im['metrics']['top5']:.2f} "
                  f"agree {im['agreement']['top1']:.2f}/{im['agreement']['top5']:.2f} cos {im['cosine']:.3f}; "
                  f"photos agree {ph['agreement']['top1']:.3f}/{ph['agreement']['top5']:.3f} cos {ph['cosine']:.3f}; "
                  f"MACs {100 * row['macs']:+.1f}% ({seconds:.0f} s)", flush=True)


def markdown(out: Path) -> str:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if not rows:
        return "no results\n"
    dense = rows[0]["mobilenet_v2_imagenet"]["dense"]
    lines = [f"Dense on the 20 ImageNet samples: top-1 {dense['top1']:.2f}, top-5 {dense['top5']:.2f}.", "",
             ("| configuration | MACs | params | ImageNet-20 top-1 acc | top-5 acc | top-1 agree | top-5 agree "
              "| cosine | photos-eval (96) top-1 agree | top-5 agree | cosine | s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        im, ph = r["mobilenet_v2_imagenet"], r["mobilenet_v2"]
        lines.append(
            f"| {r['description']} | {100 * r['macs']:+.1f}% | {100 * r['params']:+.1f}% "
            f"| {im['metrics']['top1']:.2f} | {im['metrics']['top5']:.2f} | {im['agreement']['top1']:.2f} "
            f"| {im['agreement']['top5']:.2f} | {im['cosine']:.3f} | {ph['agreement']['top1']:.3f} "
            f"| {ph['agreement']['top5']:.3f} | {ph['cosine']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines results file (appended to)")
    parser.add_argument("--markdown", action="store_true", help="print the table of every result in --out")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}; use: {', '.join(CONFIGS)}")
    if names:
        print(f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
        measure(names, args.out)
    if args.markdown:
        print(markdown(args.out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
