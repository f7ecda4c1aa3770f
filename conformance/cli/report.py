"""The ``report`` command: HTML, Markdown or console views of finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conformance.cli.app import app, out, user_errors


@app.command("report")
@user_errors
def report_cmd(
    results: Annotated[list[Path], typer.Argument(metavar="RESULT.json", help="JSON reports written by "
                                                  "rlk-conform run --report-json.")],
    html_out: Annotated[Path | None, typer.Option("--html", help="Write one self-contained HTML page here.")
                        ] = None,
    summary_md: Annotated[Path | None, typer.Option("--summary-md", help="Write a short Markdown summary here "
                                                    "(for docs/results/).")] = None,
    presets: Annotated[Path | None, typer.Option(help="presets.yaml naming each preset's head dim (for the "
                                                 "error-vs-D plot). Default: specs/presets.yaml.")] = None,
    worst: Annotated[int, typer.Option(min=1, help="Worst cases listed per backend in the HTML page.")] = 20,
) -> None:
    """Render run reports: an offline HTML page, a Markdown summary, or (neither given) the console table.

    Several files are shown side by side. Exit 0 once written; 2 if a file is unreadable, not an
    rlk-conform report, or of another schema version (the error names the file)."""
    from conformance.files import write_text
    from conformance.report.console import print_summary
    from conformance.report.html import render_html
    from conformance.report.json import records_of
    from conformance.report.markdown import render_markdown
    from conformance.report.runs import load_preset_dims, load_runs

    runs = load_runs(results)
    if html_out is None and summary_md is None:
        for run in runs:
            title = f"{run.label} — {run.target.get('device_name') or ''} ({run.path})"
            print_summary(out, records_of(run.report), title)
        return
    if html_out is not None:
        write_text(html_out, render_html(runs, load_preset_dims(presets), worst=worst))
        out.print(f"HTML report: {html_out}", markup=False, highlight=False)
    if summary_md is not None:
        write_text(summary_md, render_markdown(runs))
        out.print(f"Markdown summary: {summary_md}", markup=False, highlight=False)
