"""The HTML page of a report: one self-contained file (inline CSS, SVG and script; nothing fetched).

``render_html(report)`` takes what a command's ``--report`` JSON holds (optimize, drop-layers,
prune-experts, prune-tokens, run --recipe, refit; ``analyze --json`` too) and shows each section only
when the report has its data. Charts are SVG drawn here (charts.py), so the page reads the same with
scripts off; the small inline script only makes tables sortable and marks the body
``data-rendered="1"``. The report itself is embedded as JSON, so ``load_report`` can read a page back.
Output is deterministic: the same report gives the same bytes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import yaml

from graphprune.charts import bar_chart, line_chart
from graphprune.errors import GraphpruneError

DATA_ID = "graphprune-report"
MAX_BARS = 400  # per-layer chart rows; the table below a chart lists every row
LONG = 160  # characters of a setting shown inline; longer ones fold

# Keys that tell what wrote a report (recipe step summaries lack the bulky ones, so test the light ones).
KINDS = (("recipe", ("recipe", "steps")), ("refit", ("reconstruction", "fidelity_after")),
         ("optimize", ("units_removed",)), ("drop-layers", ("dropped",)), ("prune-tokens", ("stages",)),
         ("prune-experts", ("layers", "data")), ("analyze", ("totals", "groups")),
         ("report", ("settings", "before", "after")))  # any other pass: the sections every pass has
TITLES = {"recipe": "run --recipe"}
# Top-level keys some section shows; any other key is listed raw under "Other data".
SHOWN = frozenset({"settings", "before", "after", "fidelity", "latency", "units_removed", "groups",
                   "allocation", "resized_interface", "output", "evaluation", "dropped", "blocks", "scoring",
                   "layers", "declined", "data", "stages", "recipe", "steps", "verified_with",
                   "reconstruction", "fidelity_before", "fidelity_after", "totals", "declined_nodes",
                   "model"})


def report_kind(report: Any) -> str | None:
    """The command that wrote ``report`` (a KINDS name), or None when it is no graphprune report."""
    if not isinstance(report, dict):
        return None
    return next((kind for kind, keys in KINDS if all(k in report for k in keys)), None)


def report_paths(path: Path) -> tuple[Path, Path]:
    """(JSON, HTML) for a ``--report`` PATH: the page beside the JSON, or the JSON beside a .html PATH."""
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        return path.with_suffix(".json"), path
    return path, path.with_suffix(".html") if suffix == ".json" else path.with_name(path.name + ".html")


def load_report(path: Path) -> dict[str, Any]:
    """A report from its JSON file, or from the data embedded in a page this module wrote."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GraphpruneError(f"{path}: no such file; give a report written by --report.") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise GraphpruneError(f"{path}: cannot read the report ({type(err).__name__}); "
                              "give a report written by --report.") from None
    if text.lstrip().startswith("<"):
        found = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', text, re.DOTALL)
        if found is None:
            raise GraphpruneError(f"{path}: is an HTML file without embedded report data; "
                                  "give the JSON report.")
        text = found.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise GraphpruneError(f"{path}: is not valid JSON (line {err.lineno}, column {err.colno}); "
                              "give a report written by --report.") from None
    if report_kind(data) is None:
        raise GraphpruneError(f"{path}: is not a graphprune report (none of the keys a --report file has); "
                              "give a file written by --report or `analyze --json`.")
    return data


# ---------- formatting: every text that reaches the page goes through escape() ----------


class Html(str):
    """Markup built here; table cells and sections take it as is, and escape any other str."""


def _isnum(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: Any) -> float:
    """A chart coordinate: the number, or 0 for anything else (missing, NaN, text)."""
    return float(x) if _isnum(x) and math.isfinite(x) else 0.0


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _dicts(x: Any) -> list[dict]:
    return [item for item in x if isinstance(item, dict)] if isinstance(x, list) else []


def _h(x: Any) -> str:
    return x if isinstance(x, Html) else escape(str(x))


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if _isnum(x) else str(x)


def _int(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else _num(x)


def _count(x: Any) -> str:
    if not _isnum(x):
        return _num(x)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:g}"


def _bytes(x: Any) -> str:
    if not _isnum(x):
        return _num(x)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x:g} B"


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if _isnum(x) else _num(x)


def _share(before: Any, after: Any) -> float | None:
    return after / before if _isnum(before) and _isnum(after) and before else None


def _change(before: Any, after: Any) -> str:
    share = _share(before, after)
    return "–" if share is None else f"{100 * (share - 1):+.1f}%"


def _ratio(before: Any, after: Any) -> str:
    share = _share(before, after)
    return "–" if share is None else f"{share:.3f}×"


def _value(x: Any) -> str:
    """A setting as plain text: lists joined, mappings as compact JSON, None as a dash."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, list):
        return ", ".join(_value(v) for v in x) or "[]"
    if isinstance(x, dict):
        return json.dumps(x, separators=(", ", ": "))
    return _num(x, 6) if _isnum(x) else str(x)


def _node_name(member: str) -> str:
    """The node of a group member 'value[axis] (Op 'node')', else the member itself."""
    found = re.search(r"\(\S+ '(.*)'\)$", member)
    return found.group(1) if found else member


def _clip(text: str, limit: int) -> str:
    """The end of long names (node paths end with what tells them apart)."""
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


@dataclass
class Cell:
    """A numeric table cell: right-aligned, sorted by ``sort`` (no key: sorts first)."""

    text: Any
    sort: float | None = None


def _n(x: Any, text: str | None = None) -> Cell:
    """A numeric cell: ``text`` shown (default: ``x`` formatted), sorted by ``x``."""
    return Cell(_num(x) if text is None else text, float(x) if _isnum(x) and math.isfinite(x) else None)


def _table(headers: list[str], rows: list[list[Any]], caption: str = "") -> str:
    body = []
    for row in rows:
        cells = []
        for cell in row:
            if isinstance(cell, Cell):
                key = "" if cell.sort is None else f' data-sort="{cell.sort!r}"'
                cells.append(f'<td class="num"{key}>{_h(cell.text)}</td>')
            else:
                cells.append(f"<td>{_h(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{_h(h)}</th>" for h in headers)
    cap = f"<caption>{_h(caption)}</caption>" if caption else ""
    return (f'<table class="sortable">{cap}<thead><tr>{head}</tr></thead><tbody>'
            + "".join(body) + "</tbody></table>")


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{_h(summary)}</summary>{body}</details>"


def _p(text: Any) -> str:
    return f"<p>{_h(text)}</p>"


def _json_block(value: Any) -> str:
    return f"<pre>{escape(json.dumps(value, indent=1))}</pre>"


# ---------- sections ----------


def _model(report: dict) -> str:
    model = _dict(report.get("settings")).get("model")
    for step in _dicts(report.get("steps")):
        model = model or _dict(_dict(step.get("summary")).get("settings")).get("model")
    return str(model or report.get("model") or "")


STATS = (("params", "params", _int), ("MACs", "macs", _count), ("file size", "file_bytes", _bytes))


def _speed(latency: Any) -> tuple[dict, dict] | None:
    """(dense, pruned) timings of a report's latency, when it has both."""
    latency = _dict(latency)
    dense, pruned = latency.get("dense"), latency.get("pruned")
    return (dense, pruned) if isinstance(dense, dict) and isinstance(pruned, dict) else None


def _cards(report: dict, kind: str) -> str:
    before, after = _dict(report.get("before")), _dict(report.get("after"))
    cards = [(label, _change(before[key], after[key]), f"{fmt(before[key])} → {fmt(after[key])}")
             for label, key, fmt in STATS if _isnum(before.get(key)) and _isnum(after.get(key))]
    speed, timings = _dict(report.get("latency")).get("speedup"), _speed(report.get("latency"))
    if _isnum(speed) and speed > 0 and timings:
        cards.append(("latency", f"{speed:.2f}× faster" if speed >= 1 else f"{1 / speed:.2f}× slower",
                      f"median {_num(timings[0].get('median_ms'))} → {_num(timings[1].get('median_ms'))} ms"))
    fidelity = _dict(report.get("fidelity") or report.get("fidelity_after"))
    if _isnum(fidelity.get("min_cosine")):
        cards.append(("fidelity (worst output)", f"cosine {fidelity['min_cosine']:.5f}",
                      f"relative L2 {_num(fidelity.get('worst_relative_l2'))}"))
    ev = _dict(report.get("evaluation"))
    key = ev.get("primary")
    if key is not None and key in _dict(ev.get("dense")):
        cards.append((f"{ev.get('evaluator', '')} {key}", _num(_dict(ev.get("pruned")).get(key)),
                      f"dense {_num(ev['dense'][key])}"))
    totals = _dict(report.get("totals"))
    if kind == "analyze" and totals:
        prunable = f"{_num(totals.get('prunable_groups'))} of {_num(totals.get('groups'))} prunable"
        units = (f"{_num(totals.get('prunable_units'))} units, "
                 f"{_pct(totals.get('prunable_params_share'))} of params")
        cards.append(("groups", prunable, units))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{_h(a)}</div><div class="big">{_h(b)}</div>'
        f'<div class="small">{_h(c)}</div></div>' for a, b, c in cards) + "</div>" if cards else ""


def _stats(report: dict) -> str:
    before, after = report.get("before"), report.get("after")
    if not isinstance(before, dict) or not isinstance(after, dict):
        return ""
    rows, bars = [], []

    def add(label: str, b: Any, a: Any, fmt: Any, bar: str | None) -> None:
        change, ratio = _n(_share(b, a), _change(b, a)), _n(_share(b, a), _ratio(b, a))
        rows.append([label, _n(b, fmt(b)), _n(a, fmt(a)), change, ratio])
        if bar:
            bars.append((bar, [_finite(_share(b, a))], f"{ratio.text} ({change.text})",
                         f"{label}: {fmt(b)} → {fmt(a)}"))

    for label, key, fmt in STATS:
        if key in before and key in after:
            add(label, before[key], after[key], fmt, label)
    caption = ""
    timings = _speed(report.get("latency"))
    if timings:
        dense, pruned = timings
        add("latency median (ms)", dense.get("median_ms"), pruned.get("median_ms"), _num, "latency")
        add("latency p90 (ms)", dense.get("p90_ms"), pruned.get("p90_ms"), _num, None)
        latency = report["latency"]
        shapes = "; ".join(f"{k} {'x'.join(map(str, v))}" for k, v in _dict(latency.get("inputs")).items()
                           if isinstance(v, list))
        caption = (f"Latency: ONNX Runtime on the CPU, dense and pruned interleaved, "
                   f"{_num(latency.get('rounds'))} rounds" + (f", inputs {shapes}" if shapes else "") + ".")
    if not rows:
        return ""
    top = max([1.0, *(values[0] for _, values, _, _ in bars)])
    chart = bar_chart("Pruned as a share of dense", bars, [("pruned", "pruned")], absolute=True,
                      scale_max=top, track=1.0)
    skipped = [f"{n} node(s) in the {which} model"
               for which, n in (("dense", before.get("macs_skipped_nodes")),
                                ("pruned", after.get("macs_skipped_nodes"))) if _isnum(n) and n]
    note = _p(f"Not counted in MACs (shapes unknown): {', '.join(skipped)}.") if skipped else ""
    return _table(["", "dense", "pruned", "change", "pruned / dense"], rows, caption) + chart + note


def _groups(report: dict) -> str:
    groups = _dicts(report.get("groups"))
    removed_units = report.get("units_removed")
    if not groups:  # a recipe step's summary leaves the groups out
        return _p(f"{removed_units} units removed.") if _isnum(removed_units) else ""
    decided = any("removed" in g for g in groups)
    bars, rows = [], []
    for g in groups:
        size = g.get("size") if _isnum(g.get("size")) else 0
        removed = len(g.get("removed") or [])
        share = removed / size if size else 0.0
        members = g.get("members") or []
        node = _node_name(str(members[0])) if members else ""
        status = "prunable" if g.get("prunable") else f"blocked: {g.get('reason', '')}"
        if g.get("prunable") and g.get("reason"):
            status += f" ({g['reason']})"
        if g.get("prunable") and decided:
            bars.append((f"#{g.get('id')} {_clip(node, 30)}", [size - removed, removed],
                         f"{size - removed}/{size} kept" + (f" (-{_pct(share)})" if removed else ""),
                         f"group {g.get('id')} ({g.get('kind')}, {size} units): {node}"))
        row = [_n(g.get("id")), g.get("kind", ""), _n(size)]
        if decided:
            row += [_n(size - removed), _n(removed), _n(share, _pct(share))]
        row += [_n(g.get("params_share"), _pct(g.get("params_share"))),
                _n(g.get("macs_share"), _pct(g.get("macs_share")))]
        if decided:
            row += [g.get("criterion") or "–", _n(g.get("sensitivity"))]
        rows.append([*row, status, node])
    headers = ["id", "kind", "size", *(["kept", "removed", "removed %"] if decided else []), "params", "MACs",
               *(["criterion", "sensitivity"] if decided else []), "status", "first member's node"]
    out = []
    if bars:
        more = f" (first {MAX_BARS} of {len(bars)})" if len(bars) > MAX_BARS else ""
        out.append(bar_chart(f"Units kept and removed per prunable group{more}", bars[:MAX_BARS],
                             [("kept", "kept"), ("removed", "removed")]))
    blocked = sum(not g.get("prunable") for g in groups)
    text = f"{len(groups)} groups, {len(groups) - blocked} prunable, {blocked} blocked (left whole)"
    if _isnum(removed_units):
        text += f"; {removed_units} units removed from {sum(bool(g.get('removed')) for g in groups)} groups"
    out.append(_p(text + "."))
    out.append(_details(f"All {len(groups)} groups", _table(
        headers, rows, "params / MACs: share of the weights / multiply-adds that a group's units touch")))
    declined = _dicts(report.get("declined_nodes"))
    if declined:
        out.append(_details(f"{len(declined)} declined node(s)", _table(
            ["node", "op", "reason"], [[d.get("node", ""), d.get("op", ""), d.get("reason", "")]
                                       for d in declined])))
    return "".join(out)


def _blocks(report: dict) -> str:
    dropped = _dicts(report.get("dropped"))
    blocks = _dicts(report.get("blocks")) or dropped  # a recipe step's summary lists only the dropped
    if not blocks:
        return ""
    gone = {d.get("add"): (k, d) for k, d in enumerate(dropped, 1)}
    dense = _dict(report.get("scoring")).get("dense_macs")
    bars, rows = [], []
    for b in blocks:
        order, d = gone.get(b.get("add"), (None, None))
        macs = _finite(b.get("macs"))
        bars.append((_clip(str(b.get("name", "")), 36), [0.0, macs] if order else [macs, 0.0],
                     f"{_count(macs)} MACs" + (f", dropped #{order}" if order else ""),
                     f"{b.get('name')} ({b.get('add')})"))
        share = _share(dense, b.get("macs"))
        rows.append([b.get("name", ""), b.get("kind", ""), _n(b.get("macs"), _count(b.get("macs"))),
                     _n(share, _pct(share)), "dropped" if order else "kept", _n(order, str(order or "–")),
                     _n(_dict(d).get("score"))])
    title = (f"Residual blocks by MACs: {len(dropped)} of {len(blocks)} dropped" if report.get("blocks")
             else f"Residual blocks dropped: {len(dropped)}")
    chart = bar_chart(title, bars[:MAX_BARS], [("kept", "kept"), ("dropped", "removed")], absolute=True)
    table = _table(["block", "kind", "MACs", "of dense", "status", "order", "score"], rows,
                   "score: relative L2 change of the outputs vs dense with this block and the ones "
                   "before it gone")
    return chart + _details(f"All {len(blocks)} blocks", table)


def _experts(report: dict) -> str:
    layers = _dicts(report.get("layers"))
    if not layers:
        return ""
    bars, rows = [], []
    for c in layers:
        kept, removed = len(c.get("kept") or []), len(c.get("removed") or [])
        bars.append((_clip(str(c.get("layer", "")), 36), [kept, removed],
                     f"{kept}/{kept + removed} experts kept",
                     f"{c.get('layer')} ({c.get('op')}, top-{c.get('k')})"))
        exact = c.get("exact_on_calibration")
        rows.append([c.get("layer", ""), c.get("op", ""), _n(c.get("experts")), _n(c.get("k")),
                     _value(c.get("kept")), _value(c.get("removed")) if removed else "–",
                     _n(c.get("removed_routes")), _n(c.get("removed_mass_max")),
                     "–" if exact is None else ("yes" if exact else "no")])
    chart = bar_chart("Experts kept and removed per MoE layer", bars[:MAX_BARS],
                      [("kept", "kept"), ("removed", "removed")])
    return chart + _table(["layer", "op", "experts", "k", "kept", "removed", "removed routes",
                           "removed mass (max)", "exact on calib"], rows)


def _stages(report: dict) -> str:
    stages = _dicts(report.get("stages"))
    if not stages:
        return ""
    bars, rows = [], []
    for s in stages:
        before, after = _finite(s.get("tokens_before")), _finite(s.get("tokens_after"))
        bars.append((f"after layer {s.get('layer')}", [after, before - after],
                     f"{after:g}/{before:g} tokens kept",
                     f"keep {s.get('keep')} after layer {s.get('layer')} ({s.get('softmax')})"))
        rows.append([_n(s.get("layer")), _n(s.get("keep")), _n(s.get("tokens_before")),
                     _n(s.get("tokens_after")), s.get("softmax", ""),
                     _n(len(s.get("reshapes_rewritten") or []))])
    layers = report.get("layers")
    title = "Tokens kept and removed per stage" + (f" ({layers} encoder layers)" if _isnum(layers) else "")
    return (bar_chart(title, bars, [("kept", "kept"), ("removed", "removed")])
            + _table(["after layer", "keep", "tokens before", "tokens after", "attention scored",
                      "Reshapes rewritten"], rows))


PER_LAYER = {"optimize": _groups, "analyze": _groups, "drop-layers": _blocks, "prune-experts": _experts,
             "prune-tokens": _stages}


def _per_layer(report: dict, kind: str) -> str:
    return PER_LAYER[kind](report) if kind in PER_LAYER else ""


def _allocation(report: dict) -> str:
    budget = report.get("allocation")
    if not isinstance(budget, dict):
        return ""
    rows = []
    for what, key in (("MACs", "flops"), ("params", "params")):
        values = [budget.get(k) for k in (f"target_{key}", f"estimated_{key}_reduction",
                                          f"achieved_{key}_reduction")]
        if any(v is not None for v in values):
            rows.append([what, *(_n(v, "–" if v is None else f"-{_pct(v)}") for v in values)])
    text = f"Allocation: {budget.get('mode', '?')}"
    if budget.get("uniform_ratio") is not None:
        text += f", uniform ratio {_num(budget['uniform_ratio'])}"
    if budget.get("target_reached") is False:
        text += ("; the budget cannot be reached within --max-ratio and --round-to "
                 "(the plan removes all they allow)")
    return _p(text + ".") + (_table(["budget", "requested", "estimated", "achieved"], rows) if rows else "")


def _sensitivity(report: dict) -> str:
    rows = _dicts(_dict(report.get("allocation")).get("sensitivity")) or [
        {"group": g.get("id"), "size": g.get("size"), "kind": g.get("kind"),
         "sensitivity": g.get("sensitivity"), "ratio": g.get("ratio")} for g in _dicts(report.get("groups"))]
    rows = sorted((r for r in rows if _isnum(r.get("sensitivity"))), key=lambda r: r["sensitivity"])
    if not rows:
        return ""
    top = max(_finite(r["sensitivity"]) for r in rows) or 1.0
    tips = [f"group {r.get('group')} ({r.get('kind')}, {r.get('size')} units): sensitivity "
            f"{_num(r['sensitivity'])}, removed {_pct(r.get('ratio'))}" for r in rows]
    chart = line_chart("Sensitivity per group (ascending) and share removed",
                       [f"#{r.get('group')}" for r in rows],
                       [("sensitivity", "s1", [_finite(r["sensitivity"]) for r in rows], "left"),
                        ("removed", "s2", [_finite(r.get("ratio")) for r in rows], "right")],
                       left=(top, "num"), right=(1.0, "pct"), tips=tips)
    table = _table(["group", "size", "kind", "sensitivity", "removed"],
                   [[_n(r.get("group")), _n(r.get("size")), r.get("kind", ""), _n(r["sensitivity"]),
                     _n(r.get("ratio"), _pct(r.get("ratio")))] for r in rows],
                   "sensitivity: relative L2 change of the outputs with the group's weakest half masked")
    return chart + _details(f"All {len(rows)} groups", table)


def _fidelity_table(fidelity: dict, title: str) -> str:
    rows = []
    for name, f in _dict(fidelity.get("outputs")).items():
        if isinstance(f, dict):
            top1 = f.get("top1_agreement")
            rows.append([name, _n(f.get("max_abs_error")), _n(f.get("relative_l2")),
                         _n(f.get("cosine"), _num(f.get("cosine"), 6)),
                         _n(top1, "–" if top1 is None else _pct(top1))])
    return _table(["output", "max abs error", "relative L2", "cosine", "top-1 agreement"], rows,
                  f"{title} on {_num(fidelity.get('samples'))} random input set(s)")


def _fidelity(report: dict) -> str:
    tables = (("fidelity", "Pruned vs original"), ("fidelity_before", "Given model vs dense"),
              ("fidelity_after", "Refitted model vs dense"))
    out = [_fidelity_table(report[key], title) for key, title in tables if isinstance(report.get(key), dict)]
    if out and (report.get("verified_with") == "verify_tokens" or report.get("stages")):
        out.append(_p("Cutting tokens changes some outputs' length: outputs with a token axis are compared "
                      "on their CLS row (or their mean over tokens without CLS)."))
    return "".join(out)


def _evaluation(report: dict) -> str:
    ev = _dict(report.get("evaluation"))
    if not isinstance(ev.get("dense"), dict):
        return ""
    pruned = _dict(ev.get("pruned"))
    rows = [[key, _n(d), _n(pruned.get(key)), _n(_share(d, pruned.get(key)), _change(d, pruned.get(key)))]
            for key, d in ev["dense"].items() if _isnum(d)]
    rows += [[f"agreement: {key}", "", _n(v), ""]
             for key, v in _dict(ev.get("agreement")).items() if _isnum(v)]
    better = {True: ", higher is better", False: ", lower is better"}.get(ev.get("higher_is_better"), "")
    caption = f"{ev.get('evaluator', '')}: {ev.get('metric', '')}"
    if ev.get("primary"):
        caption += f" (primary: {ev['primary']}{better})"
    return _table(["metric", "dense", "pruned", "change"], rows, caption)


def _reconstruction(report: dict) -> str:
    settings = _dict(report.get("settings"))
    out = []
    rec = _dict(report.get("reconstruction") or settings.get("reconstruction"))
    if rec:
        before, after = rec.get("mean_relative_error_sliced"), rec.get("mean_relative_error_reconstructed")
        out.append(_table(
            ["mode", "layers fitted", "skipped", "calibration passes", "mean rel. error before",
             "mean rel. error after", "after / before"],
            [[rec.get("mode", ""), _n(rec.get("reconstructed")), _n(len(rec.get("skipped") or [])),
              _n(rec.get("calibration_passes")), _n(before), _n(after), _n(_share(before, after),
                                                                          _ratio(before, after))]],
            "Least-squares reconstruction: the layers' relative error on the calibration data, sliced "
            "(or as given) and refitted"))
        if _isnum(before) and _isnum(after):
            out.append(bar_chart("Mean relative calibration error", [
                ("before", [_finite(before)], _num(before), "sliced / given weights"),
                ("after", [_finite(after)], _num(after), "refitted weights")], [("error", "pruned")],
                absolute=True))
        out.append(_skipped(rec.get("skipped"), "layer(s) skipped"))
    comp = settings.get("compensation")
    if isinstance(comp, dict):
        out.append(_p(f"Bias compensation: {_num(comp.get('compensated'))} consumer(s) compensated, "
                      f"{len(comp.get('skipped') or [])} skipped."))
        out.append(_skipped(comp.get("skipped"), "consumer(s) not compensated"))
    match = settings.get("stat_matching")
    if isinstance(match, dict):
        before, after = match.get("mean_relative_error_before"), match.get("mean_relative_error_after")
        out.append(_table(
            ["mode", "layers corrected", "skipped", "calibration passes", "mean rel. error before",
             "mean rel. error after"],
            [[match.get("mode", ""), _n(match.get("corrected")), _n(len(match.get("skipped") or [])),
              _n(match.get("calibration_passes")), _n(before), _n(after)]],
            "Statistics matching: each corrected layer's output channels against the dense model's on the "
            "calibration data"))
        out.append(_skipped(match.get("skipped"), "layer(s) not corrected"))
    return "".join(out)


def _skipped(items: Any, what: str) -> str:
    items = _dicts(items)
    if not items:
        return ""
    return _details(f"{len(items)} {what}", _table(
        ["node", "reason"], [[i.get("node", ""), i.get("reason", "")] for i in items]))


def _settings(report: dict, kind: str) -> str:
    if kind == "recipe" and isinstance(report.get("recipe"), dict):
        text = yaml.safe_dump(report["recipe"], sort_keys=False, default_flow_style=False, allow_unicode=True)
        return f"<pre>{escape(text)}</pre>"
    settings = report.get("settings")
    if not isinstance(settings, dict):
        return ""
    shown = {k: v for k, v in settings.items() if k not in ("compensation", "reconstruction", "stat_matching")}
    if report.get("output"):
        shown["output"] = report["output"]
    rows = []
    for key, value in shown.items():
        text = _value(value)
        rows.append([key.replace("_", "-"),
                     text if len(text) <= LONG else Html(_details(f"{text[:60]}…", _json_block(value)))])
    return _table(["setting", "value"], rows)


def _notes(report: dict) -> str:
    notes = [f"{c.get('value')} axis {c.get('axis')} shrinks from {c.get('before')} to {c.get('after')}: "
             "allocate the smaller cache when calling the pruned model."
             for c in _dicts(report.get("resized_interface"))]
    settings = _dict(report.get("settings"))
    used, asked = settings.get("criteria_used") or [], settings.get("criterion")
    if any(c != asked for c in used):
        notes.append(f"Criterion {asked} was used as: {', '.join(map(str, used))}.")
    scoring = _dict(report.get("scoring"))
    if scoring.get("data"):
        notes.append(f"Blocks scored on {scoring['data']}.")
    if scoring.get("target_reached") is False:
        notes.append("The budget was not reached: every block left was inside one already dropped.")
    if _isnum(scoring.get("achieved_flops_reduction")):
        notes.append(f"MACs removed: {_pct(scoring['achieved_flops_reduction'])} "
                     "(counted on the pruned model).")
    if report.get("data") and "layers" in report:
        notes.append(f"Experts ranked {report['data']}.")
    notes += [f"{d.get('node')} left as it is: {d.get('reason')}." for d in _dicts(report.get("declined"))]
    return "<ul>" + "".join(f"<li>{_h(n)}</li>" for n in notes) + "</ul>" if notes else ""


def _other(report: dict) -> str:
    """Keys no section knows (a newer pass's additions), as JSON, so nothing in the report is hidden."""
    return "".join(_details(key, _json_block(value))
                   for key, value in report.items() if key not in SHOWN and value is not None)


def _steps(report: dict) -> str:
    steps = _dicts(report.get("steps"))
    if not steps:
        return ""
    dense = _dict(report.get("before"))
    names, macs, params, rows = ["dense"], [1.0], [1.0], []
    for k, step in enumerate(steps, 1):
        after = _dict(_dict(step.get("summary")).get("after"))
        names.append(f"{k}. {step.get('step')}")
        # A step that counts nothing (refit) leaves the previous step's share.
        macs.append(_finite(_share(dense.get("macs"), after.get("macs"))) if "macs" in after else macs[-1])
        params.append(_finite(_share(dense.get("params"), after.get("params")))
                      if "params" in after else params[-1])
        rows.append([_n(k), step.get("step", ""), _n(after.get("macs"), _count(after.get("macs"))),
                     _n(macs[-1], _pct(macs[-1])), _n(after.get("params"), _int(after.get("params"))),
                     _n(params[-1], _pct(params[-1]))])
    out = [line_chart("MACs and params after each step, as a share of dense", names,
                      [("MACs", "s1", macs, "left"), ("params", "s2", params, "left")], left=(1.0, "pct")),
           _table(["#", "step", "MACs after", "of dense", "params after", "of dense"], rows)]
    for k, step in enumerate(steps, 1):
        summary = _dict(step.get("summary"))
        body = (_per_layer(summary, report_kind(summary) or "") + _allocation(summary)
                + _reconstruction(summary) + _notes(summary))
        options = [[option, _value(value)] for option, value in _dict(step.get("options")).items()]
        out.append(f"<h3>{k}. {_h(step.get('step', ''))}</h3>{body}"
                   + _details("options", _table(["option", "value"], options)))
    return "".join(out)


# ---------- the page ----------


def render_html(report: dict[str, Any]) -> str:
    """The self-contained HTML page of a report (see the module docstring)."""
    kind = report_kind(report) or "report"
    title = TITLES.get(kind, kind)
    model, output = _model(report), str(report.get("output") or "")
    sections = [(sid, heading, body) for sid, heading, body in (
        ("size", "Size and speed", _stats(report)),
        ("steps", "Steps", _steps(report) if kind == "recipe" else ""),
        ("layers", "Per layer", _per_layer(report, kind)),
        ("budget", "Budget", _allocation(report)),
        ("sensitivity", "Sensitivity", _sensitivity(report)),
        ("fidelity", "Fidelity (verification)", _fidelity(report)),
        ("evaluation", "Evaluation", _evaluation(report)),
        ("reconstruction", "Reconstruction and compensation", _reconstruction(report)),
        ("settings", "Recipe" if kind == "recipe" else "Settings", _settings(report, kind)),
        ("notes", "Notes", _notes(report)),
        ("other", "Other data", _other(report)),
    ) if body]
    where = " → ".join(escape(x) for x in (model, output) if x)
    summary = (f'<section id="summary"><h2>Summary</h2><p class="where">{where}</p>'
               f"{_cards(report, kind)}</section>")
    nav = "".join(f'<a href="#{sid}">{escape(heading)}</a>' for sid, heading, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{escape(heading)}</h2>{content}</section>'
                   for sid, heading, content in sections)
    # "<" escaped so no text in the data can close the script element.
    data = json.dumps(report, separators=(",", ":")).replace("<", "\\u003c")
    name = Path(model).name if model else kind
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>graphprune {escape(title)}: {escape(name)}</title><style>{CSS}</style></head>"
            f'<body data-kind="{escape(kind)}"><header><h1>graphprune {escape(title)}</h1>'
            f"<nav>{nav}</nav></header><main>{summary}{body}</main>"
            f'<script type="application/json" id="{DATA_ID}">{data}</script><script>{SCRIPT}</script>'
            "</body></html>\n")


CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#fff;--soft:#f6f8fa;--kept:#4e79a7;
--removed:#e15759;--s1:#4e79a7;--s2:#f28e2b}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg)}
header{background:var(--soft);border-bottom:1px solid var(--line);padding:12px 24px}
h1{font-size:20px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:20px 0 6px}
nav a{margin-right:14px;color:var(--kept);text-decoration:none}nav a:hover{text-decoration:underline}
main{max-width:1080px;margin:0 auto;padding:0 24px 40px}
.where{color:var(--muted);word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid var(--line);border-radius:6px;padding:8px 12px;min-width:170px;background:var(--soft)}
.card .label,.card .small{color:var(--muted);font-size:12px}.card .big{font-size:19px;font-weight:600}
table{border-collapse:collapse;margin:8px 0 12px;font-variant-numeric:tabular-nums}
caption{caption-side:bottom;text-align:left;color:var(--muted);font-size:12px;padding-top:4px}
th,td{border-bottom:1px solid var(--line);padding:3px 10px;text-align:left;vertical-align:top}
th{background:var(--soft);cursor:pointer;user-select:none;white-space:nowrap}
td.num{text-align:right;white-space:nowrap}
tbody tr:nth-child(even){background:#fafbfc}
details{margin:6px 0 12px}summary{cursor:pointer;color:var(--kept)}
pre{background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:10px;overflow:auto}
svg.chart{display:block;max-width:100%;height:auto;margin:8px 0}
svg.chart text{font:11px system-ui,sans-serif;fill:var(--fg)}
svg.chart .title{font-weight:600;font-size:12px}
svg.chart .axis{stroke:var(--line)}svg.chart .track{fill:#eef1f4}
svg.chart .kept,svg.chart .pruned{fill:var(--kept)}svg.chart .removed{fill:var(--removed)}
svg.chart .s1:not(polyline){fill:var(--s1)}svg.chart .s2:not(polyline){fill:var(--s2)}
svg.chart polyline{fill:none;stroke-width:2}
svg.chart polyline.s1{stroke:var(--s1)}svg.chart polyline.s2{stroke:var(--s2)}
"""

# Sorting by a header click: numeric cells by their data-sort key, others by text. The marker at the end
# tells a browser test that the script ran.
SCRIPT = """
(function(){
function key(row,i){var c=row.cells[i];if(!c)return "";
if(c.classList.contains("num"))return c.dataset.sort===undefined?-Infinity:parseFloat(c.dataset.sort);
return c.textContent;}
document.querySelectorAll("table.sortable th").forEach(function(th){
th.addEventListener("click",function(){
var body=th.closest("table").tBodies[0],i=th.cellIndex,up=th.dataset.dir!=="up";
th.dataset.dir=up?"up":"down";
Array.from(body.rows).sort(function(a,b){var x=key(a,i),y=key(b,i);
var d=typeof x==="number"&&typeof y==="number"?(x>y)-(x<y):String(x).localeCompare(String(y));
return up?d:-d;}).forEach(function(r){body.appendChild(r);});});});
document.body.dataset.charts=String(document.querySelectorAll("svg.chart").length);
document.body.dataset.rendered="1";
})();
"""
