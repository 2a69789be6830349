"""`graphprune export-ort` and `graphprune quantize` (deploy.py), and `--target mobile` for other commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from graphprune import deploy
from graphprune.cli import (
    LATENCY_ROUNDS,
    _bytes,
    _change,
    _check_at_least,
    _check_destination,
    _check_run_options,
    _pct,
    _speedup,
    _stdout,
    _step,
    emit,
    evaluation_table,
    fidelity_table,
    main,
    output_options,
)
from graphprune.errors import GraphpruneError
from graphprune.inputs import parse_shape_overrides

TARGETS = ("mobile",)


def parse_fixed_dims(items: tuple[str, ...]) -> dict[str, int]:
    """["batch=1", ...] -> {"batch": 1}."""
    dims: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit():
            raise GraphpruneError(f"--fix-dim '{item}': write it as NAME=VALUE, for example batch=1.")
        dims[name.strip()] = int(value)
    return dims


def mobile_table(mobile: dict[str, Any]) -> Table:
    table = Table(title="ONNX Runtime mobile usability check",
                  caption="verdict: ORT's advice on trying this EP instead of the CPU EP (YES / MAYBE / NO)")
    for name, justify in (("EP", "left"), ("verdict", "left"), ("nodes", "right"), ("partitions", "right"),
                          ("fixed shapes", "left"), ("unsupported ops", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for ep, v in mobile["execution_providers"].items():
        ops = ", ".join(op.removeprefix("ai.onnx:") for op in v["unsupported_ops"]) or "-"
        table.add_row(ep, v["suitability"], f"{v['supported_nodes']}/{v['nodes']}", str(v["partitions"]),
                      v.get("with_fixed_shapes", "-"), ops)
    return table


def print_ort_export(result: deploy.OrtExportResult, output: Path) -> None:
    out = _stdout()
    shapes = "; ".join(f"{k}: {'x'.join(str(d) for d in v)}" for k, v in result.input_shapes.items())
    out.print(f"ORT format ({result.settings['optimization']}, {result.settings['style']}, "
              f"{result.settings['target_platform']}): {_bytes(result.onnx_bytes)} ONNX -> "
              f"{_bytes(result.ort_bytes)} .ort; inputs {shapes}.")
    if result.verification is not None:
        table = fidelity_table(result.verification)
        table.title = f"The .ort file against the ONNX model on {result.verification.samples} random input set(s)"
        out.print(table)
    mobile = result.mobile
    if "error" in mobile:
        out.print(f"[yellow]note:[/] the mobile usability check could not run: {mobile['error']}")
    elif mobile:
        out.print(mobile_table(mobile))
        if mobile["dynamic_inputs"]:
            out.print(f"Dynamic inputs: {', '.join(mobile['dynamic_inputs'])} (NNAPI needs static shapes).")
        out.print(f"Mobile: {mobile['recommendation']}")
    out.print(f"Wrote {output}.")


def export_for_target(target: str, output: Path, shapes: dict[str, tuple[int, ...]] | None,
                      fix: bool) -> deploy.OrtExportResult:
    """--target mobile: the .ort file beside the model just written (fixed at ``shapes`` if ``fix``)."""
    if target not in TARGETS:
        raise GraphpruneError(f"--target '{target}': choose from {', '.join(TARGETS)}.")
    return deploy.export_ort(output, output.with_suffix(".ort"), fix_shape=shapes if fix else None,
                             input_shapes=shapes, progress=_step)


def check_target(target: str | None, fix_shapes: bool, shapes: tuple[str, ...], model: Path, output: Path,
                 report: Path | None) -> None:
    """The checks of --target and --fix-shapes, before any work."""
    if target is None:
        if fix_shapes:
            raise GraphpruneError("--fix-shapes fixes the .ort file's input shapes: give --target mobile as well.")
        return
    if fix_shapes and not shapes:
        raise GraphpruneError("--fix-shapes makes the .ort file's inputs static at the --input-shape shapes: give "
                              "--input-shape NAME:DIMS as well.")
    _check_destination(output.with_suffix(".ort"), "--target mobile", model,
                       (output,) + ((report,) if report is not None else ()))


target_option = click.option(
    "--target", type=click.Choice(TARGETS), default=None,
    help="Also write OUTPUT's ORT-format file (OUTPUT with .ort) and run ONNX Runtime's mobile usability check.")
fix_shapes_option = click.option(
    "--fix-shapes", is_flag=True,
    help="With --target mobile: make the .ort file's inputs static at the --input-shape shapes (NNAPI needs "
         "static shapes). Without it dynamic dims stay dynamic.")


@main.command("export-ort")
@output_options(json_flag=False)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The .ort file to write.")
@click.option("--fix-shape", "fix_shape", multiple=True, metavar="NAME:DIMS",
              help="Make an input static, e.g. input:1x3x224x224 (repeatable). Without it (and --fix-dim) "
                   "dynamic dims stay dynamic.")
@click.option("--fix-dim", "fix_dim", multiple=True, metavar="NAME=VALUE",
              help="Make a symbolic dim static everywhere, e.g. batch=1 (repeatable).")
@click.option("--optimization", type=click.Choice(deploy.OPTIMIZATION_LEVELS), default="all", show_default=True,
              help="Graph optimisation level baked into the file.")
@click.option("--style", type=click.Choice(deploy.OPTIMIZATION_STYLES), default="fixed", show_default=True,
              help="fixed: optimisations applied now (CPU EP); runtime: saved and replayed at load time "
                   "(for NNAPI/CoreML).")
@click.option("--target-platform", type=click.Choice(deploy.TARGET_PLATFORMS), default="arm", show_default=True,
              help="arm keeps int8 QDQ kernels and leaves out x86-only layout optimisations.")
@click.option("--mobile-check/--no-mobile-check", default=True, show_default=True,
              help="Run ONNX Runtime's mobile usability check (NNAPI / CoreML partitions).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Shape of the random inputs the .ort file is checked on, for dims left dynamic (repeatable).")
@click.option("--samples", type=int, default=4, show_default=True, help="Random input sets for the check.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write a JSON report here and its HTML page beside it.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout, nothing else.")
def export_ort(model: Path, output: Path, fix_shape: tuple[str, ...], fix_dim: tuple[str, ...], optimization: str,
               style: str, target_platform: str, mobile_check: bool, input_shapes: tuple[str, ...], samples: int,
               report_path: Path | None, as_json: bool) -> None:
    """Write MODEL in ONNX Runtime's ORT format (ORT Mobile), check it against MODEL, judge mobile usability."""
    fixed = parse_shape_overrides(fix_shape) or None
    dims = parse_fixed_dims(fix_dim) or None
    shapes = _check_run_options(model, output, report_path, samples, input_shapes)
    result = deploy.export_ort(model, output, fix_shape=fixed, fix_dim=dims, optimization=optimization, style=style,
                               target_platform=target_platform, mobile_check=mobile_check, samples=samples,
                               input_shapes=shapes, progress=None if as_json else _step)
    emit(result.to_dict(), report_path)  # the report gets its HTML page too
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    print_ort_export(result, output)


def quantize_table(result: deploy.QuantizeResult) -> Table:
    table = Table(title=f"Float vs quantized ({result.settings['mode']})")
    for name, justify in (("", "left"), ("float", "right"), ("quantized", "right"), ("change", "right")):
        table.add_column(name, justify=justify)
    table.add_row("file size", _bytes(result.before.file_bytes), _bytes(result.after.file_bytes),
                  _change(result.before.file_bytes, result.after.file_bytes))
    weights = result.weights
    total = weights["int8"] + weights["float"]
    table.add_row("weights in int8", "0", f"{weights['int8']:,}", _pct(weights["int8"] / total) if total else "-")
    if result.latency is not None:
        dense, quantized = result.latency["dense"]["median_ms"], result.latency["pruned"]["median_ms"]
        table.add_row(f"latency (ORT CPU, median of {result.latency['rounds']})", f"{dense:.3f} ms",
                      f"{quantized:.3f} ms", _speedup(result.latency["speedup"]))
    return table


@main.command()
@output_options()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Quantized model to write.")
@click.option("--mode", type=click.Choice(deploy.MODES), default="dynamic", show_default=True,
              help="dynamic: int8 weights, activations quantized at run time (no data); qdq: static "
                   "QuantizeLinear/DequantizeLinear pairs with activation ranges from --calib.")
@click.option("--calib", metavar="SPEC",
              help="Calibration data for --mode qdq (required there), as for `optimize --calib`: an .npz/.npy "
                   "file, a folder of them, or a named set (photos-calib).")
@click.option("--calib-batches", type=int, default=None, help="Use at most this many calibration batches.")
@click.option("--calib-batch-size", type=int, default=8, show_default=True, help="Samples per calibration batch.")
@click.option("--calibrate-method", type=click.Choice(list(deploy.CALIBRATION_METHODS)), default="minmax",
              show_default=True, help="How --mode qdq turns calibration activations into ranges.")
@click.option("--per-channel", is_flag=True, help="One scale per output channel of each weight.")
@click.option("--weight-type", type=click.Choice(list(deploy.QUANT_TYPES)), default="int8", show_default=True)
@click.option("--activation-type", type=click.Choice(list(deploy.QUANT_TYPES)), default="uint8", show_default=True,
              help="Activations' type with --mode qdq (dynamic mode always uses uint8).")
@click.option("--reduce-range", is_flag=True, help="7-bit weights (for x86 CPUs without VNNI).")
@click.option("--op-types", default="", metavar="OPS", help="Quantize only these op types, comma-separated.")
@click.option("--exclude", multiple=True, metavar="NODE", help="Leave this node in float (repeatable).")
@click.option("--preprocess/--no-preprocess", default=True, show_default=True,
              help="ONNX Runtime's quant_pre_process first (shape inference, basic optimisation).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Concrete input shape, e.g. input:1x3x224x224 (repeatable).")
@click.option("--samples", type=int, default=4, show_default=True,
              help="Random input sets (and calibration batches) for verification.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write a JSON report here and its HTML page beside it.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time float vs quantized with ONNX Runtime on CPU.")
@click.option("--eval", "evaluator_name", metavar="NAME",
              help="Evaluate MODEL and the quantized model on a real model's offline data (mobilenet_v2, ...).")
@target_option
@fix_shapes_option
def quantize(model: Path, output: Path, mode: str, calib: str | None, calib_batches: int | None,
             calib_batch_size: int, calibrate_method: str, per_channel: bool, weight_type: str, activation_type: str,
             reduce_range: bool, op_types: str, exclude: tuple[str, ...], preprocess: bool,
             input_shapes: tuple[str, ...], samples: int, seed: int, report_path: Path | None, latency: bool,
             evaluator_name: str | None, target: str | None, fix_shapes: bool) -> None:
    """Quantize MODEL to int8 with ONNX Runtime (dynamic, or static QDQ on calibration data), verify, write OUTPUT."""
    evaluator = None
    if evaluator_name is not None:
        from graphprune.models.evaluators import get_evaluator

        evaluator = get_evaluator(evaluator_name)  # an unknown name fails before any work
    if mode == "qdq" and calib is None:
        raise GraphpruneError("--mode qdq quantizes activations with ranges measured on calibration data: give "
                              "--calib SPEC (an .npz/.npy file, a folder of them, or a named set such as "
                              "photos-calib), or use --mode dynamic.")
    _check_at_least("--samples", samples, 1)
    shapes = _check_run_options(model, output, report_path, samples, input_shapes, calib_batch_size, calib_batches)
    check_target(target, fix_shapes, input_shapes, model, output, report_path)
    result = deploy.quantize(model, output, mode=mode, calib=calib, calib_batches=calib_batches,
                             calib_batch_size=calib_batch_size, calibrate_method=calibrate_method,
                             per_channel=per_channel, weight_type=weight_type, activation_type=activation_type,
                             reduce_range=reduce_range, op_types=tuple(o.strip() for o in op_types.split(",")
                                                                       if o.strip()),
                             exclude=exclude, preprocess=preprocess, input_shapes=shapes, samples=samples, seed=seed,
                             latency_rounds=LATENCY_ROUNDS if latency else 0, progress=_step)
    evaluation = None
    if evaluator is not None:
        with _step(f"Evaluating float and quantized ({evaluator.name})"):
            evaluation = evaluator.compare(model, output)
    mobile = export_for_target(target, output, shapes, fix_shapes) if target else None
    emit({**result.to_dict(), "output": str(output), "evaluation": evaluation,
          "mobile_export": mobile.to_dict() if mobile else None}, report_path)
    out = _stdout()
    out.print(quantize_table(result))
    if result.verification is not None:
        out.print(fidelity_table(result.verification))
    if result.calib_verification is not None:
        table = fidelity_table(result.calib_verification)
        table.title = f"Fidelity on {result.calib_verification.samples} calibration batch(es)"
        out.print(table)
    if evaluation is not None:
        out.print(evaluation_table(evaluation))
    if mode == "dynamic" and calib is not None:
        out.print("[yellow]note:[/] --calib is not used by --mode dynamic.")
    nodes = ", ".join(f"{count} {op}" for op, count in result.nodes.items()) or "none"
    out.print(f"Quantization nodes: {nodes}; preprocessing: {result.settings['preprocess']}. Wrote {output}"
              + (f" and {report_path}." if report_path else "."))
    if mobile is not None:
        print_ort_export(mobile, output.with_suffix(".ort"))
