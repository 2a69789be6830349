"""A real pretrained model outside the quality table, pruned with calibration data drawn the same way.

PaddleOCR's text-direction classifier (``ch_ppocr_mobile_v2.0_cls_infer.onnx`` from the rapidocr-onnxruntime
wheel: a small MobileNetV3 that tells upright text lines from lines turned by 180 degrees) is in no
evaluator, no zoo and no earlier table. Its data are drawn the way the ``ppocr_rec`` rows draw theirs:

- evaluation: 96 lines of ``evaluators.ocr_texts(seed=10)`` rendered with ``render_lines(seed=11)``, every
  second one turned by 180 degrees (label 1); metric: accuracy against that label, and the share of lines
  where the pruned model picks the dense model's class;
- calibration: 64 other lines (``ocr_texts(seed=20)``, ``render_lines(seed=21, font_offset=1)``), half of
  them turned, written to an .npz; no evaluation line is among them.

Preprocessing follows PaddleOCR's classifier: height 48 keeping the aspect ratio, at most 192 wide (wider
lines are squeezed), [-1, 1], zero padding on the right.

For each MACs budget the tool prunes with ``l2`` and no data, then with the calibrated configurations, and
prints one table (and ``--markdown FILE``).

Usage: .venv/bin/python tools/unseen_model_cls.py [--targets 0.2,0.35,0.5] [--round-to 8] [--markdown FILE]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from graphprune import api
from graphprune.models import evaluators as ev
from graphprune.models import real
from graphprune.models.imagenet_eval import run_onnx

WIDTH = 192  # the classifier's input width; the height is PP-OCR's (evaluators.OCR_HEIGHT, 48)
# (label, api.optimize options); every calibrated row gets calib=<the .npz>.
CONFIGS = [
    ("l2 (no data)", {"criterion": "l2"}),
    ("wanda-sp+rec", {"criterion": "wanda-sp", "reconstruct": True}),
    ("flap+rec", {"criterion": "flap", "reconstruct": True}),
    ("wanda-sp+rec+mm", {"criterion": "wanda-sp", "reconstruct": True, "match_stats": "moments"}),
    ("wanda-sp+rec+mm/res", {"criterion": "wanda-sp", "reconstruct": True, "match_stats": "moments",
                             "protect": ("residual",)}),
]


def lines(count: int, text_seed: int, render_seed: int, font_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[count, 3, 48, 192] lines, every second one turned by 180 degrees, and the labels (1: turned)."""
    images = list(ev.render_lines(ev.ocr_texts(count, seed=text_seed), seed=render_seed, font_offset=font_offset))
    labels = np.arange(count) % 2
    images = [np.ascontiguousarray(img[::-1, ::-1]) if label else img for img, label in zip(images, labels)]
    return ev._ocr_batch(images, WIDTH, squeeze=True), labels


@click.command()
@click.option("--targets", default="0.2,0.35,0.5", show_default=True, help="Shares of MACs to remove.")
@click.option("--round-to", type=int, default=8, show_default=True)
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None)
def main(targets: str, round_to: int, markdown_path: Path | None) -> None:
    dense = real.ppocr_cls_path()
    x_eval, labels = lines(96, 10, 11)
    x_calib, _ = lines(64, 20, 21, font_offset=1)
    shapes = {"x": (1, 3, ev.OCR_HEIGHT, WIDTH)}
    dense_pred = run_onnx(dense, x_eval).argmax(1)
    dense_acc = float((dense_pred == labels).mean())
    rows = []
    with tempfile.TemporaryDirectory(prefix="unseen-cls-") as scratch:
        calib = Path(scratch) / "calib.npz"
        np.savez(calib, x=x_calib)
        out = Path(scratch) / "pruned.onnx"
        for target in [float(t) for t in targets.split(",")]:
            for label, options in CONFIGS:
                data = {} if options["criterion"] == "l2" else {"calib": calib}
                start = time.perf_counter()
                result = api.optimize(dense, out, target_flops=target, round_to=round_to, input_shapes=shapes, check=False,
                                      **data, **options)
                pred = run_onnx(os.fspath(out), x_eval).argmax(1)
                rows.append((target, label, float((pred == labels).mean()), float((pred == dense_pred).mean()),
                             result.after.macs / result.before.macs - 1, time.perf_counter() - start))
                print(f"{target:g} {label}: accuracy {rows[-1][2]:.3f}, agreement {rows[-1][3]:.3f}, "
                      f"MACs {100 * rows[-1][4]:+.1f}% ({rows[-1][5]:.1f} s)", flush=True)
    table = Table(title=f"ch_ppocr_mobile_v2.0_cls: 180-degree accuracy (dense {dense_acc:.3f}) / agreement")
    for column in ("budget", "configuration", "accuracy", "agreement with dense", "MACs", "s"):
        table.add_column(column)
    for target, label, acc, agree, macs, seconds in rows:
        table.add_row(f"−{target:.0%} MACs", label, f"{acc:.3f}", f"{agree:.3f}", f"{100 * macs:+.1f}%",
                      f"{seconds:.0f}")
    Console(width=140).print(table)
    if markdown_path is not None:
        heading = (f"Dense accuracy {dense_acc:.3f} on 96 held-out lines (half turned by 180 degrees); "
                   f"round-to {round_to}.")
        text = [heading, "",
                "| budget | configuration | accuracy | agreement with dense | MACs | s |", "|---|---|---|---|---|---|"]
        text += [f"| −{t:.0%} MACs | {label} | {a:.3f} | {g:.3f} | {100 * m:+.1f}% | {s:.0f} |"
                 for t, label, a, g, m, s in rows]
        markdown_path.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
