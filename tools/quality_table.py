"""Quality without retraining on the real models: one table, every evaluator, three FLOPs budgets.

Per real model (models/evaluators.py) and per budget (-20%, -35%, -50% MACs through
``api.optimize(target_flops=...)``; a plain channel ratio where the dense MACs count is 0), the evaluator's
primary metric for: L2 magnitude without data, and each calibrated criterion (wanda-sp, flap) with FLAP
bias compensation and with least-squares reconstruction; uniform allocation, and global ranking with
``--global``. Rows that fail (pruning declined, pruned model rejected by ONNX Runtime) are shown as such.

Calibration data per model, written to .npz files (or a named set) before the runs, disjoint from the
evaluation data where the data source allows it:

- silero_vad: the other speech of this machine, CPython's test clip Lib/test/audiotest.au (models/evaluators.py
  vad_other_speech; 8 kHz, resampled to 16 kHz), cut and fed as the evaluator does: ``input`` [n, 576]
  (samples), ``state`` [n, 2, 1, 128] (a stack of whole feeds, the states the dense model carries over
  the clip), ``sr`` a scalar. Without that clip: the first 64 chunks of pyannote's sample, which the
  evaluator also scores (it scores the whole sample), as the description then says.
- magika: files of this machine with the evaluator's extensions that the evaluator does not use.
- ppocr_rec: text lines rendered like the evaluator's, from different texts (ocr_texts seed 1) and
  different rendering noise (seed 2).
- mobilenet_v2: the named set ``photos-calib`` (the even photos); the evaluator scores the held-out odd
  photos (``photos-eval``).
- mobilenet_v2_natural (``--models mobilenet_v2_natural``, needs the GCompris photos of
  tools/fetch_models.py): the named set ``natural-calib`` (``photos-calib`` plus the even GCompris photos);
  the evaluator scores the held-out odd GCompris photos (``natural-eval``).
- minilm: single words and packed sentences of gensim's Pang & Lee test data (models/minilm.py
  write_calibration), none of them an evaluation text; the evaluation sets are word pairs and Lee documents.

Usage: .venv/bin/python tools/quality_table.py [--models silero_vad,magika,...] [--targets 0.2,0.35,0.5]
       [--global] [--budget 300] [--markdown docs/quality_table.md]
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from graphprune import api
from graphprune.models import evaluators as ev
from graphprune.models import real

# (label, criterion, compensation mode[, protect]) -- mode: "none" (no data), "bias" (FLAP bias
# compensation), "reconstruct" (least-squares reconstruction of the consumers, one-shot; bias compensation
# for the others), "sequential" (reconstruction fitted on the pruned model's own activations); protect:
# api.optimize's ``protect`` roles ("res" in the label: residual streams left whole); match:
# api.optimize's ``match_stats`` ("+mm" in the label: per-channel mean and spread matched to the dense
# model's after pruning, stat_match.py).
CONFIGS = [
    ("l2", "l2", "none"),
    ("wanda-sp+bias", "wanda-sp", "bias"),
    ("wanda-sp+rec", "wanda-sp", "reconstruct"),
    ("flap+bias", "flap", "bias"),
    ("flap+rec", "flap", "reconstruct"),
    ("obs+rec", "obs", "reconstruct"),
    ("wanda-sp+rec/res", "wanda-sp", "reconstruct", ("residual",)),
    ("obs+rec/res", "obs", "reconstruct", ("residual",)),
    ("obs+seq/res", "obs", "sequential", ("residual",)),
    ("wanda-sp+rec+mm", "wanda-sp", "reconstruct", (), "moments"),
    ("flap+rec+mm", "flap", "reconstruct", (), "moments"),
    ("obs+rec+mm", "obs", "reconstruct", (), "moments"),
    ("wanda-sp+rec+mm/res", "wanda-sp", "reconstruct", ("residual",), "moments"),
    ("obs+rec+mm/res", "obs", "reconstruct", ("residual",), "moments"),
]
DEFAULT_CONFIGS = ("l2", "wanda-sp+bias", "wanda-sp+rec", "flap+bias", "flap+rec", "obs+rec")
DEFAULT_MODELS = ("silero_vad", "magika", "ppocr_rec", "mobilenet_v2", "minilm")
# The key of Evaluator.agree shown after the primary metric: how far the pruned model follows the dense one.
AGREEMENT = {"silero_vad": "same_decision", "magika": "same_label", "ppocr_rec": "cer_to_dense",
             "mobilenet_v2": "top5", "mobilenet_v2_natural": "top5", "minilm": "cosine_to_dense"}


@dataclass
class ModelSpec:
    name: str
    calibration: Callable[[Path], tuple[str | None, str]]  # scratch dir -> (calib spec or None, description)
    input_shapes: dict[str, tuple[int, ...]] | None = None
    round_to: int = 8
    units: tuple[str, ...] | None = None  # None: api default


@dataclass
class Row:
    model: str
    target: float
    budget_kind: str  # "flops" or "ratio"
    config: str
    allocation: str
    value: float | None = None
    macs: float | None = None  # achieved relative change of MACs (negative)
    params: float | None = None
    seconds: float = 0.0
    error: str | None = None
    extra: dict = field(default_factory=dict)
    reached: bool | None = None  # the allocation's target_reached (None: no budget)


# ---------------------------------------------------------------------------------------- calibration


def _silero_calibration(scratch: Path, fallback_chunks: int = 64) -> tuple[str, str]:
    """Chunks of speech other than the evaluation audio, each with the state the dense model carries into it.

    The states come from running the dense model over the clip chunk by chunk as the evaluator does (not
    zeros: only the first chunk of a stream sees a zero state). Every chunk of the clip is used, the
    non-speech end included.
    """
    model = real.silero_vad_path()
    other = ev.vad_other_speech()
    if other is not None:
        audio, rate = ev.read_au(other)
        inputs, states = ev.vad_feeds(model, ev.resample(audio, rate))
        note = (f"{len(inputs)} chunks ({len(inputs) * ev.VAD_CHUNK / ev.VAD_RATE:.1f} s) of CPython's test clip "
                f"{other.name} (a voice; {rate} Hz mu-law resampled to 16 kHz, so nothing above "
                f"{rate // 2000} kHz), none of them evaluation audio")
    else:
        audio, _ = ev.vad_sample()
        inputs, states = ev.vad_feeds(model, audio[: fallback_chunks * ev.VAD_CHUNK])
        note = (f"the first {len(inputs)} chunks ({len(inputs) * ev.VAD_CHUNK / ev.VAD_RATE:.1f} s) of pyannote's "
                "sample: no other speech on this machine, and these chunks are evaluation audio too (the "
                "evaluator scores the whole sample)")
    path = scratch / "silero_calib.npz"
    np.savez(path, input=inputs, state=states, sr=np.array(ev.VAD_RATE, dtype=np.int64))
    return str(path), (note + "; fed as input (n, 576) samples, state (n, 2, 1, 128) stacked (the states the "
                       "dense model carries), sr a scalar")


def _magika_calibration(scratch: Path, count: int = 96) -> tuple[str, str]:
    """Files of the evaluator's roots and extensions that are not among the evaluator's files."""
    used = {path for path, _ in ev.magika_files()}
    labels = set(real.magika_labels())
    extensions = {ext for ext, label in ev.MAGIKA_EXTENSIONS.items() if label in labels}
    by_ext: dict[str, list[str]] = {}
    for root in ev._magika_roots():
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in ev._SKIP_DIRS]
            for name in files:
                ext = os.path.splitext(name)[1].lower()
                path = os.path.join(folder, name)
                if ext not in extensions or path in used:
                    continue
                try:
                    if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) < 64:
                        continue
                except OSError:
                    continue
                by_ext.setdefault(ext, []).append(path)
    per_ext = max(1, count // max(1, len(by_ext)))
    rng = np.random.default_rng(3)
    chosen: list[str] = []
    for ext in sorted(by_ext):
        paths = sorted(by_ext[ext])
        chosen += [paths[i] for i in sorted(rng.choice(len(paths), min(per_ext, len(paths)), replace=False))]
    features = np.array([real.magika_features(ev._magika_bytes(p)) for p in chosen], dtype=np.int32)
    name = _input_names(real.magika_path())[0]
    path = scratch / "magika_calib.npz"
    np.savez(path, **{name: features})
    return str(path), (f"{len(chosen)} files of this machine ({len(by_ext)} extensions), none of the "
                       f"evaluator's {len(used)}")


def _ppocr_calibration(scratch: Path, count: int = 32) -> tuple[str, str]:
    """Lines rendered like the evaluator's (models/evaluators.py: render_lines) from other texts and noise."""
    texts = ev.ocr_texts(count, seed=1)
    evaluation = set(ev.ocr_texts())
    images = ev.render_lines(texts, seed=2, font_offset=1)
    batch = ev._ocr_batch(images)
    name = _input_names(real.ppocr_rec_path())[0]
    path = scratch / "ppocr_calib.npz"
    np.savez(path, **{name: batch})
    shared = sum(t in evaluation for t in texts)
    return str(path), (f"{count} lines rendered from ocr_texts(seed=1) ({shared} texts also in the "
                       f"evaluation set), other noise, {batch.shape[3]} px wide")


def _mobilenet_calibration(_: Path) -> tuple[str, str]:
    from graphprune.calibration import photo_rows
    from graphprune.models.photos import VIEWS

    calib, held_out = len(photo_rows("calib", len(VIEWS))), len(photo_rows("eval", len(VIEWS)))
    return "photos-calib", (f"named set photos-calib ({calib} crops of the even photos); the evaluator scores "
                            f"the {held_out} crops of the odd photos, none of them calibration data")


def _mobilenet_natural_calibration(_: Path) -> tuple[str, str]:
    from graphprune.calibration import DATASETS

    calib = sum(len(f["input"]) for f in DATASETS["natural-calib"](["input"], 256))
    held_out = sum(len(f["input"]) for f in DATASETS["natural-eval"](["input"], 256))
    return "natural-calib", (f"named set natural-calib ({calib} crops: photos-calib and the even GCompris "
                             f"photos); the evaluator scores the {held_out} crops of the odd GCompris photos, "
                             "none of them calibration data")


def _minilm_calibration(scratch: Path) -> tuple[str, str]:
    from graphprune.models import minilm

    banned = set(ev._similarity_benchmark().texts)
    folder, description = minilm.write_calibration(scratch / "minilm_calib", banned)
    return str(folder), description


def _input_names(model: Path) -> list[str]:
    import onnx

    graph = onnx.load(os.fspath(model), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


SPECS = {
    "silero_vad": ModelSpec("silero_vad", _silero_calibration),
    "magika": ModelSpec("magika", _magika_calibration),
    "ppocr_rec": ModelSpec("ppocr_rec", _ppocr_calibration, {"x": (1, 3, 48, 320)}),
    "mobilenet_v2": ModelSpec("mobilenet_v2", _mobilenet_calibration, {"input": (1, 3, 224, 224)}),
    "minilm": ModelSpec("minilm", _minilm_calibration),
    "mobilenet_v2_natural": ModelSpec("mobilenet_v2_natural", _mobilenet_natural_calibration,
                                      {"input": (1, 3, 224, 224)}),
}


# ---------------------------------------------------------------------------------------- measuring


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"/\S*/", "", str(exc).strip())  # scratch paths differ between runs
    lines = text.splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def measure_model(name: str, targets: list[float], allocations: list[str], budget_s: float,
                  scratch: Path, configs: list[tuple] | None = None,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Dense metric, calibration description and one Row per (target, allocation, config)."""
    spec = SPECS[name]
    evaluator = ev.get_evaluator(name)
    start_model = time.perf_counter()
    dense = evaluator.dense_model()
    dense_metrics, dense_pred = evaluator.run(os.fspath(dense))
    dense_value = dense_metrics[evaluator.primary]
    calib, calib_note = spec.calibration(scratch)
    result = {"name": name, "primary": evaluator.primary, "agreement": AGREEMENT.get(name), "higher": evaluator.higher_is_better,
              "metric": evaluator.metric, "dense": dense_value, "calib": calib_note, "rows": [],
              "budget_kind": None}
    pruned = scratch / f"{name}.pruned.onnx"
    budget_kind = "flops"
    for target in targets:
        for allocation in allocations:
            for label, criterion, mode, *more in configs or CONFIGS:
                row = Row(name, target, budget_kind, label, allocation)
                result["rows"].append(row)
                if mode != "none" and calib is None:
                    row.error = "no calibration data"
                    continue
                if time.perf_counter() - start_model > budget_s:
                    row.error = "skipped (time budget)"
                    continue
                kwargs = {"criterion": criterion, "round_to": spec.round_to, "input_shapes": spec.input_shapes,
                          "check": False, "allocation": allocation, "calib": calib if mode != "none" else None,
                          "compensate": mode != "none" if calib is not None else None,
                          "reconstruct": {"reconstruct": True, "sequential": "sequential"}.get(mode, False),
                          "protect": more[0] if more else (), "match_stats": more[1] if len(more) > 1 else ""}
                if spec.units is not None:
                    kwargs["units"] = spec.units
                t0 = time.perf_counter()
                try:
                    if budget_kind == "flops":
                        out = api.optimize(dense, pruned, target_flops=target, **kwargs)
                        if not out.before.macs:  # nothing to budget: fall back to channel ratios
                            budget_kind = row.budget_kind = "ratio"
                    if budget_kind == "ratio":
                        out = api.optimize(dense, pruned, ratio=target, **kwargs)
                    row.macs = out.after.macs / out.before.macs - 1 if out.before.macs else None
                    row.params = out.after.params / out.before.params - 1
                    row.reached = out.allocation["target_reached"] if out.allocation else None
                    metrics, predictions = evaluator.run(os.fspath(pruned))
                    row.value = metrics[evaluator.primary]
                    row.extra = evaluator.agree(dense_pred, predictions)
                except Exception as exc:  # noqa: BLE001 -- a failing configuration is a result too
                    row.error = _first_line(exc)
                row.seconds = time.perf_counter() - t0
                shown = f"{row.value:.4f}" if row.value is not None else row.error
                macs = f"{100 * row.macs:+.1f}%" if row.macs is not None else "-"
                params = f"{100 * row.params:+.1f}%" if row.params is not None else "-"
                missed = ", target not reached" if row.reached is False else ""
                log(f"{name} {target:g} {allocation} {label}: {shown} (MACs {macs}, params {params}{missed}, "
                    f"{row.seconds:.1f} s)")
    result["budget_kind"] = budget_kind
    result["seconds"] = time.perf_counter() - start_model
    return result


# ---------------------------------------------------------------------------------------- output


UNREACHED = "†"
UNREACHED_NOTE = (f"{UNREACHED}: the MACs target was not reached within the per-group cap and rounding "
                  "(allocation target_reached false); the plan removes all they allow.")


def _cell(row: Row, agreement: str | None) -> str:
    if row.value is None:
        return "fail" if row.error and not row.error.startswith(("skipped", "no calib")) else "–"
    macs = f" ({100 * row.macs:+.0f}%)" if row.macs is not None and row.budget_kind == "flops" else ""
    agree = f" / {row.extra[agreement]:.3f}" if agreement in row.extra else ""
    return f"{row.value:.3f}{agree}{macs}{UNREACHED if row.reached is False else ''}"


def _grid(result: dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    configs = list(dict.fromkeys(r.config for r in result["rows"]))
    keys = list(dict.fromkeys((r.target, r.allocation) for r in result["rows"]))
    lines = []
    for target, allocation in keys:
        cells = {r.config: _cell(r, result.get("agreement")) for r in result["rows"] if (r.target, r.allocation) == (target, allocation)}
        kind = result["budget_kind"]
        what = f"−{target:.0%} MACs" if kind == "flops" else f"ratio {target:g}"
        lines.append((f"{what}, {allocation}", [cells.get(c, "") for c in configs]))
    return configs, lines


def print_tables(results: list[dict]) -> None:
    console = Console(width=150)
    for result in results:
        configs, lines = _grid(result)
        arrow = "↑" if result["higher"] else "↓"
        table = Table(title=f"{result['name']}: {result['primary']} {arrow} (dense {result['dense']:.3f})"
                            f" / {result['agreement']} with dense")
        table.add_column("budget")
        for c in configs:
            table.add_column(c, justify="right")
        for label, cells in lines:
            table.add_row(label, *cells)
        console.print(table)
        console.print(f"  calibration: {result['calib']}")
        if any(r.reached is False for r in result["rows"]):
            console.print(f"  {UNREACHED_NOTE}")
        for r in result["rows"]:
            if r.error and not r.error.startswith(("skipped", "no calib")):
                console.print(f"  [red]{r.target:g} {r.allocation} {r.config}[/red]: {r.error}")


def markdown(results: list[dict], command: str, wall: float) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    out = ["# Quality table: real models, pruned without retraining", "",
           (f"Generated by `{command}` on {machine}, {datetime.date.today().isoformat()} "
           f"({wall / 60:.1f} min). Each cell: the evaluator's primary metric of the pruned model and, in "
           "brackets, the MACs change achieved (budgets are `api.optimize(target_flops=...)`, rounded to "
           "multiples of 8 channels). `fail`: the configuration raised or the pruned model did not run "
           "(first error below the table); `–`: not run (no calibration data or time budget). "
           "`+bias`: FLAP bias compensation; `+rec`: least-squares reconstruction of the consumers."), ""]
    for result in results:
        configs, lines = _grid(result)
        arrow = "higher is better" if result["higher"] else "lower is better"
        out += [f"## {result['name']}", "",
                (f"{result['metric']}; `{result['primary']}`, {arrow}; dense **{result['dense']:.3f}**; after the "
                 f"slash: `{result['agreement']}` (agreement with the dense model's predictions). "
                 f"Calibration: {result['calib']}. ({result['seconds']:.0f} s)"), "",
                "| budget | " + " | ".join(configs) + " |", "|---" * (len(configs) + 1) + "|"]
        out += ["| " + label + " | " + " | ".join(cells) + " |" for label, cells in lines]
        if any(r.reached is False for r in result["rows"]):
            out += ["", UNREACHED_NOTE]
        errors = {}
        for r in result["rows"]:
            if r.error and not r.error.startswith(("skipped", "no calib")):
                errors.setdefault(r.error, []).append(f"{r.target:g}/{r.allocation}/{r.config}")
        if errors:
            out.append("")
            out += [f"- fail ({'all rows' if len(where) == len(result['rows']) else ', '.join(where)}): `{error}`"
                    for error, where in errors.items()]
        out.append("")
    return "\n".join(out)


@click.command()
@click.option("--models", default=",".join(DEFAULT_MODELS), show_default=True)
@click.option("--targets", default="0.2,0.35,0.5", show_default=True, help="Shares of MACs to remove.")
@click.option("--global", "global_rank", is_flag=True, help="Also rows with global allocation.")
@click.option("--budget", type=float, default=300.0, show_default=True,
              help="Seconds per model; configurations past it are skipped.")
@click.option("--configs", default=",".join(DEFAULT_CONFIGS), show_default=True,
              help="Comma-separated subset of " + ",".join(c[0] for c in CONFIGS))
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None)
@click.option("--reading", type=click.Path(exists=True, path_type=Path), default=None,
              help="Markdown text appended to --markdown as the reading of the table.")
def main(models: str, targets: str, global_rank: bool, budget: float, configs: str | None,
         markdown_path: Path | None, reading: Path | None) -> None:
    start = time.perf_counter()
    values = [float(t) for t in targets.split(",") if t.strip()]
    allocations = ["uniform", "global"] if global_rank else ["uniform"]
    chosen = [c for c in CONFIGS if c[0] in configs.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="quality-table-") as scratch:
        for name in [m.strip() for m in models.split(",") if m.strip()]:
            evaluator = ev.get_evaluator(name)
            if not evaluator.available():
                print(f"{name}: skipped, wheels not fetched", file=sys.stderr)
                continue
            results.append(measure_model(name, values, allocations, budget, Path(scratch), chosen))
            print_tables(results[-1:])
    if markdown_path is not None:
        command = "python tools/quality_table.py " + " ".join(sys.argv[1:])
        text = markdown(results, command, time.perf_counter() - start)
        if reading is not None:
            text += "\n" + reading.read_text()
        markdown_path.write_text(text)


if __name__ == "__main__":
    main()
