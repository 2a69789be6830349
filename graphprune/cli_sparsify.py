"""`graphprune sparsify-activations`: MLP blocks become SparseMLP nodes (TEAL / WINA activation sparsity)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from graphprune import api
from graphprune.cli import (
    LATENCY_ROUNDS,
    _check_run_options,
    _pct,
    _print_pass_result,
    _step,
    fidelity_table,
    main,
    output_options,
)
from graphprune.passes.sparsify_activations import MODES, WHERE, check_options


def layers_table(result: api.SparsifyActivationsResult) -> Table:
    mode = result.settings["mode"] + (" (WINA scores)" if result.settings["wina"] else "")
    table = Table(title=f"MLP blocks made sparse: {mode}, target {_pct(result.settings['sparsity'])}",
                  caption="measured: share of entries dropped on the calibration data; already zero: before any "
                          "selection")
    for name, justify in (("block", "left"), ("activation", "left"), ("side", "left"), ("width", "right"),
                          ("threshold / k", "right"), ("measured", "right"), ("already zero", "right")):
        table.add_column(name, justify=justify, overflow="fold" if name == "block" else "ellipsis")
    for layer in result.layers:
        activation = layer.mlp["activation"] + (" (gated)" if layer.mlp["gated"] else "")
        for k, side in enumerate(layer.sides):
            limit = f"{side.threshold:.4g}" if side.threshold is not None else f"k={side.k}"
            table.add_row(layer.node if k == 0 else "", activation if k == 0 else "", side.side, str(side.width),
                          limit, _pct(side.measured), _pct(side.already_zero))
    return table


@main.command("sparsify-activations")
@output_options()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Model to write.")
@click.option("--sparsity", type=float, required=True, metavar="SHARE",
              help="Share of the MLP activations to drop, in [0, 1] (0.5: half the entries are zeroed).")
@click.option("--where", type=str, default="auto", show_default=True, metavar="|".join(WHERE),
              help="Which matmul inputs to sparsify: the MLP input, its hidden activation, both; auto: both "
                   "for a plain ReLU MLP, hidden otherwise.")
@click.option("--wina", is_flag=True, help="Score each entry by |v| times the norm of the weight row it multiplies.")
@click.option("--mode", type=str, default="threshold", show_default=True, metavar="|".join(MODES),
              help="threshold: per-layer thresholds calibrated to the target (TEAL); topk: each row keeps "
                   "its top (1 - SHARE) entries.")
@click.option("--calib", metavar="SPEC",
              help="Calibration data for the thresholds, as for `optimize --calib`. Without it they are "
                   "calibrated on random inputs (the output says so).")
@click.option("--calib-batches", type=int, default=None, help="Use at most this many calibration batches.")
@click.option("--calib-batch-size", type=int, default=8, show_default=True, help="Samples per calibration batch.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Concrete input shape, e.g. input_ids:1x128 (repeatable).")
@click.option("--samples", type=int, default=4, show_default=True,
              help="Random input sets for verification (and for calibration without --calib).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for random inputs and score sampling.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write a JSON report here and its HTML page beside it.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time dense vs sparse with ONNX Runtime on CPU.")
def sparsify_activations(model: Path, output: Path, sparsity: float, where: str, wina: bool, mode: str,
                         calib: str | None, calib_batches: int | None, calib_batch_size: int,
                         input_shapes: tuple[str, ...], samples: int, seed: int, report_path: Path | None,
                         latency: bool) -> None:
    """Replace MODEL's MLP blocks by SparseMLP nodes with calibrated activation thresholds, verify, write
    OUTPUT."""
    check_options(sparsity, where, mode)
    shapes = _check_run_options(model, output, report_path, samples, input_shapes, calib_batch_size,
                                calib_batches)
    result = api.sparsify_activations(model, output, sparsity=sparsity, where=where, wina=wina, mode=mode,
                                      calib=calib, calib_batches=calib_batches, calib_batch_size=calib_batch_size,
                                      input_shapes=shapes, samples=samples, seed=seed,
                                      latency_rounds=LATENCY_ROUNDS if latency else 0, progress=_step)
    out = _print_pass_result(result, layers_table(result), output, report_path)
    if result.calibration_fidelity is not None:
        table = fidelity_table(result.calibration_fidelity)
        data = "calibration batch(es)" if calib is not None else "random input set(s) the thresholds came from"
        table.title = f"Fidelity on the {result.calibration_fidelity.samples} {data}"
        out.print(table)
    if calib is None:
        out.print(f"[yellow]note:[/] thresholds calibrated on {result.data}.")
    for declined in result.declined:
        out.print(f"[yellow]note:[/] '{declined['down']}' left dense: {declined['reason']}.", highlight=False)
    out.print("[yellow]note:[/] MACs after count each SparseMLP at its measured sparsity; its standard-ops body "
              "gains speed only at high sparsity and batch 1 (docs/sparse_mlp.md).")
    out.print(f"Made {len(result.layers)} MLP block(s) sparse; wrote {output}"
              + (f" and {report_path}." if report_path else "."))
