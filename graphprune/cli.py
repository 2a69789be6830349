"""The `graphprune` command: analyze a model's prunable structure, or optimize (prune + verify) it."""

from __future__ import annotations

import fnmatch
import functools
import inspect
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import onnx
from rich.console import Console
from rich.table import Table

from graphprune import api
from graphprune.allocation import ALLOCATIONS
from graphprune.analysis.groups import DEFAULT_KINDS, PROTECTABLE
from graphprune.criteria import CRITERIA
from graphprune.errors import GraphpruneError
from graphprune.inputs import parse_shape_overrides, resolve_shapes
from graphprune.metrics import ModelStats, all_graphs, file_size
from graphprune.report import AnalysisReport
from graphprune.runtime import load_structure
from graphprune.verify import VerifyReport

# The API's defaults, so the CLI never drifts from them.
DEFAULTS = {name: p.default for name, p in inspect.signature(api.optimize).parameters.items()}
MEMBERS_SHOWN = 2
MEMBER_CHARS = 48
LATENCY_ROUNDS = 20


@dataclass
class _OutputMode:
    """What the running command prints: --quiet drops progress and tables; --json prints only the
    command's result (what --report writes) as JSON on stdout. Errors and notes on stderr always show."""

    quiet: bool = False
    json: bool = False
    result: dict[str, Any] | None = None


_MODE = _OutputMode()


def _stdout() -> Console:
    return Console(quiet=_MODE.quiet or _MODE.json)


def _stderr() -> Console:
    return Console(stderr=True)


def output_options(json_flag: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Adds --quiet (and --json unless the command has its own) to a command.

    With --json the command's result, handed over by ``emit``, is printed as JSON on stdout."""

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def run(*args: Any, quiet: bool = False, json_output: bool = False, **kwargs: Any) -> Any:
            previous = _OutputMode(**vars(_MODE))
            _MODE.quiet, _MODE.json, _MODE.result = quiet, json_output, None
            try:
                command(*args, **kwargs)
                if json_output:
                    click.echo(json.dumps(_MODE.result if _MODE.result is not None else {}, indent=2,
                                          default=str))
            finally:
                _MODE.quiet, _MODE.json, _MODE.result = previous.quiet, previous.json, previous.result

        run = click.option("-q", "--quiet", is_flag=True,
                           help="No progress and no tables; errors and notes still go to stderr.")(run)
        if json_flag:
            run = click.option("--json", "json_output", is_flag=True,
                               help="Print the result (what --report writes) as JSON on stdout, nothing else.")(run)
        return run

    return wrap


def emit(data: dict[str, Any], report_path: Path | None = None) -> None:
    """The command's machine-readable result: written to --report (JSON and HTML page) when asked, and
    printed by --json."""
    if report_path is not None:
        write_report(report_path, data)
    _MODE.result = data


class _Group(click.Group):
    """Turns every GraphpruneError into one line on stderr and exit code 2, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GraphpruneError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="graphprune", prog_name="graphprune")
def main() -> None:
    """Structured pruning for ONNX graphs: find coupled channel groups, remove units, verify."""


class _Status:
    """Progress on stderr: a spinner per long step, with the count of calibration batches or model runs
    done when the step reports them (``count``). Silent under --quiet and --json."""

    def __init__(self) -> None:
        self._status: Any = None
        self._text = ""

    @contextmanager
    def __call__(self, text: str) -> Iterator[None]:
        if _MODE.quiet or _MODE.json or self._status is not None:  # nested steps keep the outer spinner
            yield
            return
        self._text = text
        with _stderr().status(text) as status:
            self._status = status
            try:
                yield
            finally:
                self._status = None

    def count(self, done: int) -> None:
        if self._status is not None:
            self._status.update(f"{self._text} ({done} done)")


_step = _Status()


# ---------- validation ----------


def check_model_file(path: Path) -> onnx.ModelProto:
    """The model's structure (no weights); raises a one-sentence error for anything unusable."""
    if not path.exists():
        raise GraphpruneError(f"{path}: no such file; give the path of an .onnx model.")
    if not path.is_file():
        raise GraphpruneError(f"{path}: is not a file; give the path of an .onnx model.")
    structure = load_structure(path)
    # Protobuf parses an empty file as an empty message; every real model declares its IR version.
    if structure.ir_version == 0 or not structure.graph.ListFields():
        raise GraphpruneError(f"{path}: is not an ONNX model (no IR version or no graph).")
    if not structure.graph.node:
        raise GraphpruneError(f"{path}: the model's graph has no nodes; there is nothing to analyze or prune.")
    file_size(path)  # raises if a referenced external data file is missing
    return structure


def _note_unmatched_excludes(model: Path, structure: onnx.ModelProto, patterns: tuple[str, ...]) -> None:
    """A note on stderr for each --exclude pattern that names no node (a typo excludes nothing)."""
    names = [node.name for graph in all_graphs(structure.graph) for node in graph.node]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            click.echo(f"note: --exclude '{pattern}' matches no node name in {model}; it excludes nothing.",
                       err=True)


def _check_destination(path: Path, option: str, model: Path, others: tuple[Path, ...] = ()) -> None:
    if path.resolve() == model.resolve():
        raise GraphpruneError(f"{option} {path}: equals the input model; choose another file name.")
    if any(path.resolve() == other.resolve() for other in others):
        raise GraphpruneError(f"{option} {path}: is also the output model; choose another file name.")
    if path.is_dir():
        raise GraphpruneError(f"{option} {path}: is a folder; give a file name.")
    if not path.parent.is_dir():
        raise GraphpruneError(f"{option} {path}: the folder '{path.parent}' does not exist; create it first.")


def _check_range(option: str, value: float, low: float, high: float, high_open: bool) -> None:
    inside = low <= value < high if high_open else low <= value <= high
    if not inside:
        interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise GraphpruneError(f"{option} must be in {interval}: got {value:g}.")


def _check_at_least(option: str, value: int, low: int) -> None:
    if value < low:
        raise GraphpruneError(f"{option} must be {low} or more: got {value}.")


def _check_run_options(model: Path, output: Path | None, report_path: Path | None, samples: int,
                       input_shapes: tuple[str, ...], calib_batch_size: int = 1,
                       calib_batches: int | None = None, exclude: tuple[str, ...] = ()
                       ) -> dict[str, tuple[int, ...]] | None:
    """The checks every rewriting command makes before any work: counts, destinations, the model file
    and its --input-shape overrides (unknown input names and wrong ranks fail here); returns the shapes.
    No destinations are checked without ``output`` (a dry run writes nothing)."""
    _check_at_least("--samples", samples, 1)
    _check_at_least("--calib-batch-size", calib_batch_size, 1)
    if calib_batches is not None:
        _check_at_least("--calib-batches", calib_batches, 1)
    shapes = parse_shape_overrides(input_shapes) or None
    if output is not None:
        _check_destination(output, "--output", model)
        if report_path is not None:
            _check_report(report_path, model, (output,))
    with _step(f"Loading {model}"):
        structure = check_model_file(model)
        resolve_shapes(structure, shapes, strict=False)
    _note_unmatched_excludes(model, structure, exclude)
    return shapes


# ---------- rendering ----------


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:g} B"


def _change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before else "-"


def _speedup(ratio: float) -> str:
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def groups_table(report: AnalysisReport) -> Table:
    rows = []
    for s in report.groups:
        status = "[green]prunable[/]" if s.prunable else f"[yellow]blocked[/]: {s.reason}"
        if s.prunable and s.kind not in DEFAULT_KINDS:
            status += f" with --units {s.kind}"
        members = [_shorten(m, MEMBER_CHARS) for m in s.members[:MEMBERS_SHOWN]]
        if len(s.members) > MEMBERS_SHOWN:
            members.append(f"(+{len(s.members) - MEMBERS_SHOWN} more)")
        rows.append((str(s.id), str(s.size), s.kind, _pct(s.params_share), _pct(s.macs_share), status,
                     "\n".join(members)))
    table = Table(title=f"Groups of {report.model}",
                  caption="params / MACs: share of the weights / multiply-adds that a group's units touch")
    # Short columns never shrink below their content; status and members wrap on narrow screens.
    for k, name in enumerate(("id", "size", "kind", "params", "MACs")):
        width = max([len(name), *(len(row[k]) for row in rows)])
        table.add_column(name, justify="left" if name == "kind" else "right", min_width=width, no_wrap=True)
    table.add_column("status")
    table.add_column("first members")
    for row in rows:
        table.add_row(*row)
    return table


def declined_table(report: AnalysisReport) -> Table:
    table = Table(title="Declined nodes (their channels stay as they are)")
    for name in ("node", "op", "reason"):
        table.add_column(name)
    for row in report.declined:
        table.add_row(row["node"], row["op"], row["reason"])
    return table


def comparison_table(before: ModelStats, after: ModelStats, latency: dict[str, Any] | None) -> Table:
    table = Table(title="Dense vs pruned")
    for name, justify in (("", "left"), ("dense", "right"), ("pruned", "right"), ("change", "right")):
        table.add_column(name, justify=justify)
    table.add_row("params", f"{before.params:,}", f"{after.params:,}", _change(before.params, after.params))
    table.add_row("MACs", _count(before.macs), _count(after.macs), _change(before.macs, after.macs))
    table.add_row("file size", _bytes(before.file_bytes), _bytes(after.file_bytes),
                  _change(before.file_bytes, after.file_bytes))
    if latency is not None:
        dense, pruned = latency["dense"]["median_ms"], latency["pruned"]["median_ms"]
        table.add_row(f"latency (ORT CPU, median of {latency['rounds']})", f"{dense:.3f} ms",
                      f"{pruned:.3f} ms", _speedup(latency["speedup"]))
    return table


def fidelity_table(report: VerifyReport) -> Table:
    table = Table(title=f"Fidelity on {report.samples} random input set(s)")
    for name, justify in (("output", "left"), ("max abs error", "right"), ("relative L2", "right"),
                          ("cosine", "right"), ("top-1 agreement", "right")):
        table.add_column(name, justify=justify)
    for name, f in report.outputs.items():
        top1 = "-" if f.top1_agreement is None else _pct(f.top1_agreement)
        table.add_row(name, f"{f.max_abs_error:.3g}", f"{f.relative_l2:.3g}", f"{f.cosine:.5f}", top1)
    return table


# ---------- actions shared with tools/ ----------


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(path: Path, data: dict[str, Any]) -> None:
    """--report: the JSON and, beside it, its HTML page (html_report.report_paths), each written atomically.
    The page is rendered from the JSON as written, so `graphprune report` gives the same bytes."""
    from graphprune.html_report import render_html, report_paths
    from graphprune.io import write_text_atomic

    json_path, html_path = report_paths(path)
    write_json_atomic(json_path, data)
    write_text_atomic(html_path, render_html(json.loads(json.dumps(data))))


def _check_report(path: Path, model: Path, others: tuple[Path, ...]) -> None:
    """--report names two files, the JSON and the HTML page: check both destinations."""
    from graphprune.html_report import report_paths

    for target in report_paths(path):
        _check_destination(target, "--report", model, others)


def _print_pass_result(result: Any, what: Table, output: Path, report_path: Path | None) -> Console:
    """Write the JSON report if asked, then print what the pass did, the dense-vs-pruned table and the
    fidelity; returns the console for the pass's own notes."""
    emit({**result.to_dict(), "output": str(output)}, report_path)
    out = _stdout()
    out.print(what)
    out.print(comparison_table(result.before, result.after, result.latency))
    if result.verification is not None:
        out.print(fidelity_table(result.verification))
    return out


# ---------- commands ----------


@main.command()
@output_options(json_flag=False)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout, nothing else.")
def analyze(model: Path, as_json: bool) -> None:
    """List MODEL's channel groups and why any are blocked."""
    with _step(f"Analysing {model}"):
        check_model_file(model)
        report = api.analyze(model)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    out = _stdout()
    out.print(groups_table(report))
    if report.declined:
        out.print(declined_table(report))
    totals = report.to_dict()["totals"]
    out.print(f"Totals: {totals['groups']} groups, {totals['prunable_groups']} prunable with "
              f"{totals['prunable_units']} units in all; {len(report.declined)} declined nodes.")


@main.command()
@output_options()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Pruned model to write (required unless --dry-run).")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None,
              help="Run this YAML recipe instead of the pruning flags (as `graphprune run --recipe`).")
@click.option("--dry-run", is_flag=True,
              help="Print the recipe the flags stand for (runnable by `graphprune run --recipe`) and exit.")
@click.option("--ratio", type=float, default=None,
              help="Share of units to remove, in [0, 1). Required unless --target-flops/--target-params.")
@click.option("--target-flops", type=float, default=None, metavar="SHARE",
              help="Share of the dense model's MACs to REMOVE, in [0, 1): 0.35 means -35% MACs. Units are "
                   "removed until the estimate reaches it; the achieved change is counted and reported.")
@click.option("--target-params", type=float, default=None, metavar="SHARE",
              help="Share of the dense model's parameters to REMOVE, in [0, 1) (0.35 = -35% params).")
@click.option("--target-speedup", type=float, default=None, metavar="S",
              help="Prune until the model measured on --provider runs S times faster (1.5 = 1.5x): per-layer "
                   "latency table, removal by importance lost per ms saved, whole-model checks.")
@click.option("--provider", default=DEFAULTS["provider"], show_default=True,
              help="With --target-speedup: the ONNX Runtime execution provider to time on (as for `bench`).")
@click.option("--threads", type=int, default=None,
              help="With --target-speedup: ONNX Runtime intra-op threads when timing; 1 on cpu reads the "
                   "thread's CPU time, which other processes do not disturb. [default: ORT's own]")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default=None,
              help="How removal is spread over groups: uniform (same share each), global (ranked together "
                   "on standardised scores, by importance per cost under a target), sensitivity (global, "
                   "weighted by each group's measured output change on --calib data). "
                   "[default: uniform; global with --global]")
@click.option("--min-ratio", type=float, default=DEFAULTS["min_ratio"], show_default=True,
              help="With --global, --allocation or a target: the least share any one group loses.")
@click.option("--criterion", type=click.Choice(CRITERIA), default=DEFAULTS["criterion"], show_default=True,
              help="Importance score; the lowest-scoring units are removed.")
@click.option("--global", "global_rank", is_flag=True, help="Rank units across groups instead of per group.")
@click.option("--max-group-ratio", "--max-ratio", "max_group_ratio", type=float,
              default=DEFAULTS["max_group_ratio"], show_default=True,
              help="With --global, --allocation or a target: the most any one group may lose, in (0, 1].")
@click.option("--round-to", type=int, default=DEFAULTS["round_to"], show_default=True,
              help="Round kept counts to a multiple of this (1: no rounding).")
@click.option("--units", default=",".join(DEFAULTS["units"]), show_default=True, metavar="KINDS",
              help="Unit kinds to remove, comma-separated: channel, head, head-repeat, head-dim, conv-group. "
                   "`--units head` is the prune-heads pass.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Leave groups touching a node whose name matches this glob (repeatable).")
@click.option("--protect", multiple=True, type=click.Choice(PROTECTABLE), metavar="ROLE",
              help="Leave every group of this role whole (repeatable): residual = channels that pass "
                   "through a residual sum (the stream all blocks of a stage share).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Concrete input shape, e.g. input:1x3x224x224 (repeatable).")
@click.option("--samples", type=int, default=DEFAULTS["samples"], show_default=True,
              help="Random input sets for verification.")
@click.option("--seed", type=click.IntRange(min=0), default=DEFAULTS["seed"], show_default=True,
              help="Seed for random criteria and inputs.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write a JSON report here and its HTML page beside it.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time dense vs pruned with ONNX Runtime on CPU.")
@click.option("--bench", "bench_providers", metavar="PROVIDERS", default=None,
              help="After writing, time dense vs pruned as `graphprune bench` does on these providers "
                   "(e.g. cpu,cuda) and put the numbers in the report.")
@click.option("--calib", metavar="SPEC",
              help="Calibration data: an .npz (arrays keyed by input name) or .npy file, a folder of them, "
                   "or a named set (photos). Read by wanda-sp, flap, act-norm and --compensate.")
@click.option("--compensate/--no-compensate", default=None,
              help="FLAP bias compensation: push the removed channels' calibration mean into the consumers' "
                   "biases. [default: on with --calib]")
@click.option("--reconstruct", is_flag=True,
              help="Least-squares reconstruction of the consumers' kept weights and biases on --calib data "
                   "(ridge-regularised; replaces --compensate for the consumers it reconstructs).")
@click.option("--reconstruct-mode", type=click.Choice(["one-shot", "sequential"]), default=None,
              help="one-shot: fit every consumer on the dense model's activations; sequential: fit them in "
                   "topological order on the pruned model's own activations (a few more calibration "
                   "passes). Implies --reconstruct. [default: one-shot]")
@click.option("--match-stats", type=click.Choice(["mean", "moments", "regression"]), default=None,
              help="After pruning, correct each affected conv/linear layer's output channels towards the "
                   "dense model's on --calib data: mean (bias only), moments (mean and spread, like "
                   "re-estimating BatchNorm) or regression (per-channel least squares).")
@click.option("--calib-batches", type=int, default=None, help="Use at most this many calibration batches.")
@click.option("--calib-batch-size", type=int, default=DEFAULTS["calib_batch_size"], show_default=True,
              help="Samples per calibration batch.")
@click.option("--eval", "evaluator_name", metavar="NAME",
              help="Evaluate dense and pruned on a real model's offline data and print both: "
                   "mobilenet_v2, minilm, ppocr_rec, magika, silero_vad.")
@click.option("--target", "deploy_target", type=click.Choice(["mobile"]), default=None,
              help="Also write OUTPUT's ORT-format file (OUTPUT with .ort) and run ONNX Runtime's mobile "
                   "usability check (graphprune export-ort).")
@click.option("--fix-shapes", is_flag=True,
              help="With --target mobile: make the .ort file's inputs static at the --input-shape shapes.")
def optimize(model: Path, output: Path, ratio: float | None, target_flops: float | None,
             target_params: float | None, target_speedup: float | None, provider: str, threads: int | None,
             allocation: str | None, min_ratio: float, criterion: str,
             global_rank: bool,
             max_group_ratio: float, round_to: int, units: str, exclude: tuple[str, ...],
             protect: tuple[str, ...], input_shapes: tuple[str, ...],
             samples: int, seed: int, report_path: Path | None, latency: bool, calib: str | None,
             compensate: bool | None, reconstruct: bool, reconstruct_mode: str | None,
             match_stats: str | None, calib_batches: int | None, calib_batch_size: int,
             evaluator_name: str | None, deploy_target: str | None, fix_shapes: bool,
             recipe_path: Path | None, dry_run: bool, bench_providers: str | None) -> None:
    """Prune MODEL, verify it against the original, write OUTPUT.

    The pruning flags are shorthand for a one-step recipe (`--dry-run` prints it); `--recipe` runs a
    recipe file instead."""
    from graphprune.cli_deploy import check_target, export_for_target, print_ort_export

    if recipe_path is not None:
        _reject_flags_beside_recipe()
        _run_recipe_file(model, recipe_path, output, dry_run, report_path)
        return
    if output is None and not dry_run:
        raise GraphpruneError("give the model to write: -o OUTPUT (or --dry-run to print the recipe the flags "
                              "stand for).")

    evaluator = None
    if evaluator_name is not None:
        from graphprune.models.evaluators import get_evaluator

        evaluator = get_evaluator(evaluator_name)  # an unknown name fails before any work
    targets = {"--target-flops": target_flops, "--target-params": target_params}
    for option, target in targets.items():
        if target is not None:
            _check_range(option, target, 0.0, 1.0, high_open=True)
    if target_speedup is not None:
        given = [o for o, v in (("--ratio", ratio), *targets.items()) if v is not None]
        if given:
            raise GraphpruneError(f"--target-speedup and {given[0]} both say how much to remove; give one of them.")
        if allocation is not None or global_rank:
            raise GraphpruneError("--target-speedup allocates by importance lost per measured ms itself; "
                                  "leave out --allocation and --global.")
    budgeted = any(t is not None for t in targets.values()) or target_speedup is not None
    if ratio is None and not budgeted:
        raise GraphpruneError("give --ratio (share of units to remove) or a budget "
                              "(--target-flops / --target-params / --target-speedup).")
    if ratio is not None and budgeted:
        raise GraphpruneError("--ratio and --target-flops/--target-params both say how much to remove; "
                              "give one of them.")
    if ratio is not None:
        _check_range("--ratio", ratio, 0.0, 1.0, high_open=True)
    allocation = allocation or ("global" if global_rank else "uniform")
    if allocation == "sensitivity" and calib is None:
        raise GraphpruneError("--allocation sensitivity measures each group's output change on calibration "
                              "data: give --calib as well.")
    if not 0.0 < max_group_ratio <= 1.0:
        raise GraphpruneError(f"--max-group-ratio must be in (0, 1]: got {max_group_ratio:g}.")
    _check_at_least("--round-to", round_to, 1)
    # The one prune-channels step these flags stand for: api.optimize's options, as a recipe gives them.
    options = {"ratio": DEFAULTS["ratio"] if ratio is None else ratio, "criterion": criterion,
               "global_rank": global_rank, "allocation": allocation, "target_flops": target_flops,
               "target_params": target_params, "min_ratio": min_ratio, "round_to": round_to, "exclude": exclude,
               "max_group_ratio": max_group_ratio, "seed": seed,
               # --units left out: the API's default itself, so that --target-speedup may add kinds.
               "units": tuple(u.strip() for u in units.split(",") if u.strip())
               if click.get_current_context().get_parameter_source("units") != click.core.ParameterSource.DEFAULT
               else DEFAULTS["units"], "calib": calib,
               "compensate": compensate, "calib_batches": calib_batches, "calib_batch_size": calib_batch_size,
               "reconstruct": reconstruct_mode or reconstruct, "match_stats": match_stats or "",
               "protect": protect,
               "target_speedup": target_speedup, "provider": provider, "threads": threads}
    if dry_run:  # the checks of a real run, but nothing written
        from graphprune.recipe import check_step

        shapes = _check_run_options(model, None, None, samples, input_shapes, calib_batch_size, calib_batches,
                                    exclude)
        recipe = flags_recipe(options, shapes, samples)
        check_step(recipe.steps[0], model, shapes)
        _print_recipe(recipe)
        return
    shapes = _check_run_options(model, output, report_path, samples, input_shapes, calib_batch_size,
                                calib_batches, exclude)
    check_target(deploy_target, fix_shapes, input_shapes, model, output, report_path)
    provider_names = _bench_providers(bench_providers)
    result = api.optimize(model, output, **options, input_shapes=shapes, samples=samples,
                          latency_rounds=LATENCY_ROUNDS if latency else 0, progress=_step)
    speed = result.latency
    evaluation = None
    if evaluator is not None:
        with _step(f"Evaluating dense and pruned ({evaluator.name})"):
            evaluation = evaluator.compare(model, output)
    mobile = export_for_target(deploy_target, output, shapes, fix_shapes) if deploy_target else None
    timing = None
    if provider_names:
        from graphprune.bench import bench

        with _step(f"Timing dense and pruned on {', '.join(provider_names)}"):
            timing = bench([model, output], provider_names, overrides=shapes, rounds=LATENCY_ROUNDS, seed=seed)
    emit({**result.to_dict(), "output": str(output), "evaluation": evaluation,
          **({"mobile_export": mobile.to_dict()} if mobile else {}),
          **({"bench": timing} if timing else {})}, report_path)
    _print_result(result, speed, output, report_path)
    _print_allocation(result.allocation, result.settings.get("latency_plan"))
    if evaluation is not None:
        _stdout().print(evaluation_table(evaluation))
    if mobile is not None:
        print_ort_export(mobile, output.with_suffix(".ort"))
    if timing is not None:
        print_bench(timing, True)


def evaluation_table(evaluation: dict[str, Any]) -> Table:
    table = Table(title=f"{evaluation['evaluator']}: {evaluation['metric']}")
    for name in ("metric", "dense", "pruned"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for key, dense in evaluation["dense"].items():
        pruned = evaluation["pruned"].get(key)
        if isinstance(dense, (int, float)) and isinstance(pruned, (int, float)):
            table.add_row(key, f"{dense:.4g}", f"{pruned:.4g}")
    for key, value in evaluation.get("agreement", {}).items():
        if isinstance(value, (int, float)):
            table.add_row(f"agreement: {key}", "", f"{value:.4g}")
    return table


def sensitivity_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Sensitivity (relative output change with half the group masked) and ratio chosen")
    for name in ("group", "size", "kind", "sensitivity", "removed"):
        table.add_column(name, justify="left" if name == "kind" else "right")
    for row in sorted(rows, key=lambda r: r["sensitivity"]):
        table.add_row(str(row["group"]), str(row["size"]), row["kind"], f"{row['sensitivity']:.4g}",
                      _pct(row["ratio"]))
    return table


def _print_allocation(budget: dict[str, Any] | None, latency_plan: dict[str, Any] | None) -> None:
    out = _stdout()
    if budget and budget["sensitivity"]:
        out.print(sensitivity_table(budget["sensitivity"]))
    for line in _budget_lines(budget, latency_plan):
        out.print(line)


def _budget_lines(budget: dict[str, Any] | None, latency_plan: dict[str, Any] | None = None) -> list[str]:
    """A pruning's --target-flops/--target-params budget lines and --target-speedup line (optimize's and
    each prune-channels step's of a recipe)."""
    lines = []
    for what, key in (("MACs", "flops"), ("params", "params")):
        target = budget[f"target_{key}"] if budget else None
        if target is not None:
            estimated, achieved = budget[f"estimated_{key}_reduction"], budget[f"achieved_{key}_reduction"]
            lines.append(f"Budget: {what} -{_pct(target)} requested, -{_pct(estimated)} estimated, "
                         f"-{_pct(achieved)} achieved ({budget['mode']} allocation).")
    if budget and not budget["target_reached"]:
        lines.append("[yellow]note:[/] the budget cannot be reached within --max-ratio and --round-to; "
                     "the plan removes all they allow.")
    if latency_plan is not None:
        from graphprune.latency_plan import summary

        lines.append(summary(latency_plan))
    return lines


def _print_result(result: api.OptimizeResult, speed: dict[str, Any] | None, output: Path,
                  report_path: Path | None) -> None:
    out = _stdout()
    pruned = [g for g in result.groups if g.removed]
    out.print(comparison_table(result.before, result.after, speed))
    if result.verification is not None:
        out.print(fidelity_table(result.verification))
    used = result.settings.get("criteria_used", [])
    asked = result.settings.get("criterion")
    if any(c != asked for c in used):
        hint = "." if result.settings.get("calib") else " (give --calib for the activation-aware form)."
        out.print(f"[yellow]note:[/] criterion {asked} used as: {', '.join(used)}{hint}")
    compensation = result.settings.get("compensation")
    if compensation:
        out.print(f"Bias compensation: {compensation['compensated']} consumer(s) compensated, "
                  f"{len(compensation['skipped'])} skipped.")
    reconstruction = result.settings.get("reconstruction")
    if reconstruction:
        errors = ""
        if reconstruction["reconstructed"]:
            sliced = reconstruction["mean_relative_error_sliced"]
            rebuilt = reconstruction["mean_relative_error_reconstructed"]
            errors = f" (mean relative calibration error: {sliced:.3g} sliced, {rebuilt:.3g} rebuilt)"
        mode = reconstruction.get("mode", "one-shot")
        out.print(f"Reconstruction ({mode}): {reconstruction['reconstructed']} consumer(s) reconstructed"
                  f"{errors}, {len(reconstruction['skipped'])} skipped.")
    matching = result.settings.get("stat_matching")
    if matching:
        errors = ""
        if matching["corrected"]:
            errors = (f" (mean relative calibration error: {matching['mean_relative_error_before']:.3g} before, "
                      f"{matching['mean_relative_error_after']:.3g} after)")
        out.print(f"Statistics matching ({matching['mode']}): {matching['corrected']} layer(s) corrected"
                  f"{errors}, {len(matching['skipped'])} skipped.")
    for change in result.resized:
        out.print(f"[yellow]note:[/] {change['value']} axis {change['axis']} shrinks from {change['before']} "
                  f"to {change['after']}: allocate the smaller cache when calling the pruned model.")
    out.print(f"Removed {result.plan.units_removed} units from {len(pruned)} of {len(result.groups)} groups; "
              f"wrote {output}" + (f" and {report_path}." if report_path else "."))


@main.command()
@output_options()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--dense", "dense", type=click.Path(path_type=Path), required=True,
              help="The dense model MODEL was derived from (node and value names kept).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Refitted model to write.")
@click.option("--calib", metavar="SPEC", required=True, help="Calibration data, as for `optimize --calib`.")
@click.option("--calib-batches", type=int, default=None, help="Use at most this many calibration batches.")
@click.option("--calib-batch-size", type=int, default=8, show_default=True, help="Samples per calibration batch.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Concrete input shape, e.g. input:1x3x224x224 (repeatable).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write a JSON report here and its HTML page beside it.")
def refit(model: Path, dense: Path, output: Path, calib: str, calib_batches: int | None, calib_batch_size: int,
          input_shapes: tuple[str, ...], report_path: Path | None) -> None:
    """Refit MODEL's linear layers towards DENSE on calibration data (after any pass or tool)."""
    _check_at_least("--calib-batch-size", calib_batch_size, 1)
    _check_destination(output, "--output", model, (dense,))
    if report_path is not None:
        _check_report(report_path, model, (output, dense))
    with _step(f"Loading {model} and {dense}"):
        check_model_file(model)
        check_model_file(dense)
    result = api.refit(model, dense, output, calib=calib, calib_batches=calib_batches,
                       calib_batch_size=calib_batch_size, input_shapes=parse_shape_overrides(input_shapes) or None,
                       progress=_step)
    out = _stdout()
    done = result.reconstruction
    if result.before is not None and result.after is not None:
        out.print(f"Fidelity to the dense model: relative L2 {result.before.worst_relative_l2:.4g} -> "
                  f"{result.after.worst_relative_l2:.4g}, cosine {result.before.min_cosine:.4f} -> "
                  f"{result.after.min_cosine:.4f}.")
    out.print(f"Refitted {done['reconstructed']} linear layer(s), {len(done['skipped'])} skipped; wrote {output}"
              + (f" and {report_path}." if report_path else "."))
    settings = {"model": str(model), "dense": str(dense), "calib": calib, "calib_batches": calib_batches,
                "calib_batch_size": calib_batch_size}
    emit({**result.to_dict(), "settings": settings, "output": str(output)}, report_path)


def dropped_table(result: api.DropLayersResult) -> Table:
    table = Table(title="Residual blocks dropped (greedy, re-scored after each removal)",
                  caption="score: relative L2 change of the outputs vs dense with this and the blocks above gone")
    for name, justify in (("#", "right"), ("block", "left"), ("kind", "left"), ("MACs", "right"),
                          ("of dense", "right"), ("score", "right")):
        # Block names are long paths: fold them rather than cut off the layer number at their end.
        table.add_column(name, justify=justify, overflow="fold" if name == "block" else "ellipsis",
                         no_wrap=name != "block")
    dense = result.scoring.get("dense_macs") or 0
    for k, block in enumerate(result.dropped, 1):
        table.add_row(str(k), block.name, block.kind, _count(block.macs),
                      _pct(block.macs / dense) if dense else "-", f"{block.score:.4g}")
    return table


@main.command("drop-layers")
@output_options()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Model to write.")
@click.option("--drop", type=int, default=None, metavar="N", help="How many residual blocks to remove.")
@click.option("--target-flops", type=float, default=None, metavar="SHARE",
              help="Instead of --drop: the share of the dense MACs to REMOVE, in [0, 1) (0.3 = -30%); blocks "
                   "go until it is reached.")
@click.option("--calib", metavar="SPEC",
              help="Calibration data to score the blocks on, as for `optimize --calib`. Without it they are "
                   "scored on random inputs (the output says so).")
@click.option("--calib-batches", type=int, default=None, help="Use at most this many calibration batches.")
@click.option("--calib-batch-size", type=int, default=8, show_default=True, help="Samples per calibration batch.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Concrete input shape, e.g. input:1x3x224x224 (repeatable).")
@click.option("--samples", type=int, default=4, show_default=True,
              help="Random input sets for verification (and for scoring without --calib).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write a JSON report here and its HTML page beside it.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time dense vs pruned with ONNX Runtime on CPU.")
def drop_layers(model: Path, output: Path, drop: int | None, target_flops: float | None, calib: str | None,
                calib_batches: int | None, calib_batch_size: int, input_shapes: tuple[str, ...], samples: int,
                report_path: Path | None, latency: bool) -> None:
    """Remove whole residual sub-blocks of MODEL (FinerCut), verify, write OUTPUT."""
    if (drop is None) == (target_flops is None):
        raise GraphpruneError("give how much to drop: --drop N (blocks) or --target-flops SHARE, one of them.")
    if drop is not None:
        _check_at_least("--drop", drop, 0)
    if target_flops is not None:
        _check_range("--target-flops", target_flops, 0.0, 1.0, high_open=True)
    shapes = _check_run_options(model, output, report_path, samples, input_shapes, calib_batch_size,
                                calib_batches)
    result = api.drop_layers(model, output, drop=drop, target_flops=target_flops, calib=calib,
                             calib_batches=calib_batches, calib_batch_size=calib_batch_size, input_shapes=shapes,
                             samples=samples, latency_rounds=LATENCY_ROUNDS if latency else 0, progress=_step)
    out = _print_pass_result(result, dropped_table(result), output, report_path)
    scoring = result.scoring
    if calib is None:
        out.print(f"[yellow]note:[/] scored on {scoring['data']}.")
    if not scoring["target_reached"]:
        out.print("[yellow]note:[/] the budget was not reached: every block left was inside one already dropped.")
    out.print(f"Dropped {len(result.dropped)} of {len(result.blocks)} residual blocks; wrote {output}"
              + (f" and {report_path}." if report_path else "."))


def experts_table(result: api.PruneExpertsResult) -> Table:
    table = Table(title="Experts kept per MoE layer",
                  caption="score: summed gate weight on the calibration data, or the weights' L2 norm without it")
    for name, justify in (("layer", "left"), ("op", "left"), ("experts", "right"), ("k", "right"),
                          ("kept", "left"), ("removed", "left"), ("removed routes", "right"),
                          ("removed mass (max)", "right"), ("exact on calib", "left")):
        table.add_column(name, justify=justify, overflow="fold" if name == "layer" else "ellipsis")
    for c in result.layers:
        table.add_row(c.layer, c.op, f"{c.experts} → {len(c.kept)}", str(c.k), ",".join(map(str, c.kept)),
                      ",".join(map(str, c.removed)) or "-", "-" if c.frequency is None else str(c.removed_routes),
                      "-" if c.removed_mass_max is None else f"{c.removed_mass_max:.3g}",
                      "-" if c.exact is None else ("yes" if c.exact else "no"))
    return table


@main.command("prune-experts")
@output_options()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Model to write.")
@click.option("--experts-keep", type=int, default=None, metavar="N", help="Experts to keep in every MoE layer.")
@click.option("--ratio", type=float, default=None, metavar="SHARE",
              help="Instead of --experts-keep: the share of each MoE layer's experts to REMOVE, in [0, 1).")
@click.option("--calib", metavar="SPEC",
              help="Calibration data to rank experts by routing (summed gate weight), as for `optimize --calib`. "
                   "Without it experts are ranked by the norm of their weights (the output says so).")
@click.option("--calib-batches", type=int, default=None, help="Use at most this many calibration batches.")
@click.option("--calib-batch-size", type=int, default=8, show_default=True, help="Samples per calibration batch.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Concrete input shape, e.g. x:128x1024 (repeatable).")
@click.option("--samples", type=int, default=4, show_default=True, help="Random input sets for verification.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write a JSON report here and its HTML page beside it.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time dense vs pruned with ONNX Runtime on CPU.")
def prune_experts(model: Path, output: Path, experts_keep: int | None, ratio: float | None, calib: str | None,
                  calib_batches: int | None, calib_batch_size: int, input_shapes: tuple[str, ...], samples: int,
                  report_path: Path | None, latency: bool) -> None:
    """Remove whole experts of MODEL's MoE layers (com.microsoft MoE / QMoE), verify, write OUTPUT."""
    if (experts_keep is None) == (ratio is None):
        raise GraphpruneError("give how many experts to keep: --experts-keep N or --ratio SHARE (to remove), "
                              "one of them.")
    if experts_keep is not None:
        _check_at_least("--experts-keep", experts_keep, 1)
    if ratio is not None:
        _check_range("--ratio", ratio, 0.0, 1.0, high_open=True)
    shapes = _check_run_options(model, output, report_path, samples, input_shapes, calib_batch_size,
                                calib_batches)
    result = api.prune_experts(model, output, experts_keep=experts_keep, ratio=ratio, calib=calib,
                               calib_batches=calib_batches, calib_batch_size=calib_batch_size, input_shapes=shapes,
                               samples=samples, latency_rounds=LATENCY_ROUNDS if latency else 0, progress=_step)
    out = _print_pass_result(result, experts_table(result), output, report_path)
    if calib is None:
        out.print(f"[yellow]note:[/] ranked {result.data}.")
    for declined in result.declined:
        out.print(f"[yellow]note:[/] {declined['node']} left as it is: {declined['reason']}.")
    before = sum(c.experts for c in result.layers)
    after = sum(len(c.kept) for c in result.layers)
    out.print(f"Kept {after} of {before} experts in {len(result.layers)} MoE layer(s); wrote {output}"
              + (f" and {report_path}." if report_path else "."))


def token_stages_table(result: api.PruneTokensResult) -> Table:
    table = Table(title=f"Token stages ({result.layers} encoder layers found)",
                  caption="score: attention received from CLS (summed over heads); CLS always kept")
    for name, justify in (("after layer", "right"), ("keep", "right"), ("tokens", "right"),
                          ("attention scored", "left"), ("Reshapes rewritten", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    for s in result.stages:
        table.add_row(str(s.layer), f"{s.keep:g}", f"{s.tokens_before} → {s.tokens_after}", s.softmax,
                      str(len(s.reshapes_rewritten)))
    return table


@main.command("prune-tokens")
@output_options()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Model to write.")
@click.option("--keep", "keep", multiple=True, required=True, metavar="KEEP@LAYER",
              help="A stage: keep this share of the tokens after encoder layer LAYER (from 0), e.g. 0.7@3 "
                   "(repeatable, one per stage).")
@click.option("--cls/--no-cls", default=True, show_default=True,
              help="Token 0 is a CLS token: score by its attention row and always keep it. --no-cls scores "
                   "by the attention all queries give.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Concrete input shape, e.g. pixel_values:1x3x224x224 (repeatable).")
@click.option("--samples", type=int, default=4, show_default=True, help="Random input sets for verification.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write a JSON report here and its HTML page beside it.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time dense vs pruned with ONNX Runtime on CPU.")
def prune_tokens(model: Path, output: Path, keep: tuple[str, ...], cls: bool, input_shapes: tuple[str, ...],
                 samples: int, report_path: Path | None, latency: bool) -> None:
    """Keep the top tokens by attention received after chosen encoder layers of MODEL, verify, write OUTPUT."""
    from graphprune.passes.prune_tokens import check_stages, parse_stage

    check_stages([parse_stage(k) for k in keep])
    shapes = _check_run_options(model, output, report_path, samples, input_shapes)
    result = api.prune_tokens(model, output, keep=list(keep), cls=cls, input_shapes=shapes, samples=samples,
                              latency_rounds=LATENCY_ROUNDS if latency else 0, progress=_step)
    out = _print_pass_result(result, token_stages_table(result), output, report_path)
    if result.verification is not None:
        out.print("[yellow]note:[/] outputs with a token axis are compared on "
                  + ("their CLS row (token 0)." if cls else "their mean over tokens."))
    out.print(f"Wrote {output}" + (f" and {report_path}." if report_path else "."))


# ---------- recipes (recipe.py) ----------


@main.command("run")
@output_options()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), required=True,
              help="YAML recipe: the passes to run in order (see docs/recipes.md and `graphprune passes`).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Model to write (required unless --dry-run).")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe (every option filled in) and exit.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write a JSON report here and its HTML page beside it.")
def run(model: Path, recipe_path: Path, output: Path | None, dry_run: bool, report_path: Path | None) -> None:
    """Run the passes of a recipe on MODEL, verify the result against MODEL once, write OUTPUT."""
    _run_recipe_file(model, recipe_path, output, dry_run, report_path)


def flags_recipe(options: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None, samples: int) -> Any:
    """The one-step recipe that `optimize`'s pruning flags stand for."""
    from graphprune.recipe import parse_recipe

    given = {key.replace("_", "-"): list(value) if isinstance(value, tuple) else value
             for key, value in options.items()}
    return parse_recipe({"input-shapes": {k: list(v) for k, v in shapes.items()} if shapes else None,
                         "samples": samples, "steps": [{"prune-channels": given}]}, "optimize flags")


def _print_recipe(recipe: Any) -> None:
    emit(recipe.to_dict())
    if not _MODE.json:
        click.echo(recipe.to_yaml(), nl=False)


def _reject_flags_beside_recipe() -> None:
    """`optimize --recipe` takes its passes from the file: a pruning flag beside it would be ignored."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    runner = {"model", "output", "recipe_path", "dry_run", "report_path", "quiet", "json_output"}
    for param in ctx.command.params:
        if param.name not in runner and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            raise GraphpruneError(f"--recipe takes every option from the recipe file; leave out "
                                  f"{param.opts[0]} (beside --recipe only -o, --report, --json and --quiet apply).")


def _run_recipe_file(model: Path, recipe_path: Path, output: Path | None, dry_run: bool,
                     report_path: Path | None) -> None:
    from graphprune.recipe import check_recipe, load_recipe, run_recipe

    recipe = load_recipe(recipe_path)
    if dry_run:
        check_model_file(model)
        check_recipe(recipe, model)  # as run_recipe does before its first step
        _print_recipe(recipe)
        return
    if output is None:
        raise GraphpruneError("give the model to write: -o OUTPUT (or --dry-run to only print the recipe).")
    _check_destination(output, "--output", model, (recipe_path,))
    if report_path is not None:
        _check_report(report_path, model, (output, recipe_path))
    with _step(f"Loading {model}"):
        check_model_file(model)
    result = run_recipe(model, recipe, output, progress=_step)
    emit({**result.to_dict(), "output": str(output)}, report_path)
    out = _stdout()
    table = Table(title=f"Recipe {recipe_path}")
    for name, justify in (("#", "right"), ("step", "left"), ("MACs after", "right"), ("params after", "right")):
        table.add_column(name, justify=justify)
    for k, done in enumerate(result.steps, 1):
        after = done["summary"].get("after") or {}
        table.add_row(str(k), done["step"], _count(after["macs"]) if "macs" in after else "-",
                      _count(after["params"]) if "params" in after else "-")
    out.print(table)
    for k, done in enumerate(result.steps, 1):
        if done["step"] == "prune-channels":  # its budget and speedup target, as optimize prints them
            summary = done["summary"]
            plan = summary.get("settings", {}).get("latency_plan")
            for line in _budget_lines(summary.get("allocation"), plan):
                out.print(f"Step {k} ({done['step']}): {line}")
    out.print(comparison_table(result.before, result.after, None))
    if result.verification is not None:
        out.print(fidelity_table(result.verification))
    out.print(f"Ran {len(result.steps)} step(s), verified against {model}; wrote {output}"
              + (f" and {report_path}." if report_path else "."))


@main.command("passes")
@output_options()
def passes() -> None:
    """List the steps a recipe can use, with their options and defaults."""
    from graphprune.recipe import PASSES_API, RECIPE_KEYS

    out = _stdout()
    for name, spec in PASSES_API.items():
        table = Table(title=f"{name}: {spec.summary}", title_justify="left")
        table.add_column("option", justify="left", no_wrap=True)
        table.add_column("default", justify="left", overflow="fold")
        for option, default in spec.options().items():
            shown = default if isinstance(default, str) else json.dumps(list(default) if isinstance(default, tuple)
                                                                         else default)
            table.add_row(option.replace("_", "-"), shown)
        for option, value in spec.fixed.items():
            table.add_row(option.replace("_", "-"), f"{json.dumps(list(value))} (fixed)")
        out.print(table)
    out.print("Recipe-level keys: " + "; ".join(f"{k.replace('_', '-')}: {v}" for k, v in RECIPE_KEYS.items()))
    emit({"steps": {name: {"summary": spec.summary,
                           "options": {k.replace("_", "-"): _plain_value(v) for k, v in spec.options().items()},
                           "fixed": {k.replace("_", "-"): _plain_value(v) for k, v in spec.fixed.items()}}
                    for name, spec in PASSES_API.items()},
          "recipe_keys": {k.replace("_", "-"): v for k, v in RECIPE_KEYS.items()}})


def _plain_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@main.command("bench")
@output_options(json_flag=False)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("other", type=click.Path(path_type=Path), required=False)
@click.option("--providers", default="cpu", show_default=True, metavar="NAMES",
              help="Comma-separated execution providers: cpu, cuda, tensorrt, openvino, qnn, directml, ...")
@click.option("--batch", type=int, default=None, help="Batch size: fills each input's first symbolic dim.")
@click.option("--seq", type=int, default=None, help="Sequence length: fills each input's second symbolic dim.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
              help="Concrete shape of an input, e.g. input:1x3x224x224 (wins over --batch/--seq); repeatable.")
@click.option("--rounds", type=int, default=LATENCY_ROUNDS, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed runs per model first.")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: ONNX Runtime's).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout, nothing else.")
def bench_command(model: Path, other: Path | None, providers: str, batch: int | None, seq: int | None,
                  input_shapes: tuple[str, ...], rounds: int, warmup: int, threads: int | None, seed: int,
                  as_json: bool) -> None:
    """Latency and throughput of MODEL (and OTHER, interleaved run by run) per execution provider."""
    from graphprune.bench import bench, check_available, parse_providers

    names = parse_providers(providers)
    check_available(names)
    _check_at_least("--rounds", rounds, 1)
    _check_at_least("--warmup", warmup, 0)
    for option, value in (("--batch", batch), ("--seq", seq), ("--threads", threads)):
        if value is not None:
            _check_at_least(option, value, 1)
    overrides = parse_shape_overrides(input_shapes) if input_shapes else None
    paths = [model] + ([other] if other is not None else [])
    for path in paths:
        check_model_file(path)
    if as_json:
        result = bench(paths, names, batch, seq, overrides, rounds, warmup, threads, seed)
        click.echo(json.dumps(result, indent=2))
        return
    with _step(f"Timing {len(paths)} model(s) on {', '.join(names)}"):
        result = bench(paths, names, batch, seq, overrides, rounds, warmup, threads, seed)
    print_bench(result, other is not None)


def _bench_providers(names: str | None) -> list[str]:
    """--bench's providers, checked before any work (a provider not installed is an error now)."""
    if names is None:
        return []
    from graphprune.bench import check_available, parse_providers

    parsed = parse_providers(names)
    check_available(parsed)
    return parsed


def print_bench(result: dict[str, Any], compared: bool) -> None:
    """The tables of graphprune.bench.bench's result, one per provider."""
    out = _stdout()
    for entry in result["providers"]:
        table = Table(title=f"{entry['provider']} ({entry['execution_provider']}), batch {result['batch']}, "
                            f"{result['rounds']} rounds")
        for column in ("model", "median ms", "p10", "p90", "min", "items/s", "speedup"):
            table.add_column(column, justify="left" if column == "model" else "right")
        speedups = [None, *entry["speedup"]]
        for row, speedup in zip(entry["models"], speedups, strict=True):
            table.add_row(row["model"], f"{row['median_ms']:.3f}", f"{row['p10_ms']:.3f}", f"{row['p90_ms']:.3f}",
                          f"{row['min_ms']:.3f}", f"{row['throughput']:.1f}",
                          "1.00x" if speedup is None and compared else
                          (f"{speedup:.2f}x" if speedup is not None else "-"))
        out.print(table)
    shapes = "; ".join(f"{k}={'x'.join(map(str, v))}" for k, v in next(iter(result["inputs"].values())).items())
    out.print(f"Inputs: {shapes}" + (". Speedup = MODEL median / OTHER median, same run." if compared else "."))


from graphprune import (
    cli_deploy,  # noqa: F401  (registers its commands)
    cli_report,  # noqa: F401  (registers its commands)
    cli_sparsify,  # noqa: F401  (registers its commands)
)
