"""`graphprune report`: render (again) the HTML page of a --report file."""

from __future__ import annotations

from pathlib import Path

import click

from graphprune.cli import _stdout, emit, main, output_options
from graphprune.errors import GraphpruneError
from graphprune.html_report import load_report, render_html, report_paths
from graphprune.io import write_text_atomic


@main.command("report")
@output_options()
@click.argument("report", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="HTML page to write. [default: REPORT with .html for .json]")
def report_command(report: Path, output: Path | None) -> None:
    """Write the self-contained HTML page of REPORT (a --report JSON file, `analyze --json` output, or a
    page written before, whose embedded data is read back)."""
    data = load_report(report)
    target = output or report_paths(report)[1]
    if target.resolve() == report.resolve():
        raise GraphpruneError(f"{report}: the page would overwrite the report; "
                              "give another file with -o OUT.html.")
    if target.is_dir():
        raise GraphpruneError(f"-o {target}: is a folder; give a file name.")
    if not target.parent.is_dir():
        raise GraphpruneError(f"-o {target}: the folder '{target.parent}' does not exist; create it first.")
    write_text_atomic(target, render_html(data))
    emit({"report": str(report), "html": str(target)})
    _stdout().print(f"Wrote {target}.", highlight=False)
