"""The ``report`` and ``release`` commands (registered on :data:`conformance.cli.app`), and the
bundle branch of ``verify``. Thin: they parse options and call :mod:`.html_report` / :mod:`.release`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .cli import Tier, app, out, print_verification, user_errors, verify_progress
from .errors import EXIT_FAILURE


@app.command("merge")
@user_errors
def merge_cmd(
    results: Annotated[list[Path], typer.Argument(metavar="RESULT.json", help="JSON reports of the shards "
                                                  "(rlk-conform run --shard i/n --report-json).")],
    out_json: Annotated[Path, typer.Option("--out", help="Write the merged JSON report here.")],
    junit: Annotated[Path | None, typer.Option(help="Also write a merged JUnit XML report here.")] = None,
) -> None:
    """Merge the JSON reports of the shards of one run into one report (summary recomputed; the
    profiles of shards run with --profile are summed).

    Exit 0 when the merged run passes, 1 when it has failures, errors or no executed check, 2 when
    the reports cannot be merged (another backend or golden set, overlapping shards, bad files)."""
    from .errors import ConformanceError
    from .html_report import load_report
    from .report import MergeError, merge_reports, print_summary, write_json, write_junit

    reports = [load_report(path) for path in results]
    try:
        merged = merge_reports(reports, [str(p) for p in results])
    except MergeError as exc:
        raise ConformanceError(str(exc)) from None
    write_json(out_json, merged)
    from .judge import Record

    records = [Record(r["case_id"], r["op"], r["check"], r["status"], r["dtype"], r["family"], r["metrics"],
                      r["message"], r.get("expected")) for r in merged["records"]]
    print_summary(out, records, f"merged report of {len(results)} shards → {out_json}")
    if junit:
        write_junit(junit, records, f"rlk-conform.{merged['backend'].get('used')}")
    if merged.get("profile"):
        from .profiling import print_profile

        print_profile(out, merged["profile"], f"profile of the {len(results)} shards (summed)")
    summary = merged["summary"]
    out.print(f"{'PASS' if summary['verdict'] == 'pass' else 'FAIL'}: {summary['by_status']['pass']} passed, "
              f"{summary['by_status']['fail']} failed, {summary['by_status']['error']} errors, "
              f"{summary['by_status']['skip']} skipped over {summary['cases']} cases"
              + ("" if merged["complete"] else " (a shard was incomplete)"), markup=False, highlight=False)
    if summary["verdict"] != "pass":
        raise typer.Exit(EXIT_FAILURE)


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
    from .html_report import load_preset_dims, load_runs, render_html, render_markdown, write_text
    from .judge import Record
    from .report import print_summary

    runs = load_runs(results)
    if html_out is None and summary_md is None:
        for run in runs:
            records = [Record(r["case_id"], r.get("op") or "", r.get("check") or "", r["status"],
                              r.get("dtype") or "", r.get("family") or "", r.get("metrics") or {},
                              r.get("message") or "", r.get("expected")) for r in run.records]
            print_summary(out, records, f"{run.label} — {run.target.get('device_name') or ''} ({run.path})")
        return
    if html_out is not None:
        write_text(html_out, render_html(runs, load_preset_dims(presets), worst=worst))
        out.print(f"HTML report: {html_out}", markup=False, highlight=False)
    if summary_md is not None:
        write_text(summary_md, render_markdown(runs))
        out.print(f"Markdown summary: {summary_md}", markup=False, highlight=False)


@app.command("release")
@user_errors
def release_cmd(
    tier: Annotated[Tier, typer.Option(help="Tier to release.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Bundle directory to create (new or empty).")],
    goldens: Annotated[Path | None, typer.Option(help="Golden directory of that tier. Default: goldens/<tier>.")
                       ] = None,
    specs: Annotated[Path, typer.Option(help="Spec directory the goldens were generated from (its *.yaml "
                                        "ship in the bundle).")] = Path("specs"),
) -> None:
    """Write a vendor bundle: goldens, manifest, specs and tolerances, format docs, must-pass lists,
    a vendor README and one checksum of the whole bundle. Check it with: rlk-conform verify OUT."""
    from .release import build_release

    summary = build_release(tier.value, out_dir, goldens, spec_dir=specs)
    table = Table(title=f"release '{tier.value}' → {out_dir}", show_header=False)
    table.add_row("cases", str(summary.cases))
    table.add_row("files", f"{summary.files} ({summary.bytes / 2**20:.1f} MiB)")
    table.add_row("must-pass lists", ", ".join(f"{k} ({n})" for k, n in summary.mustpass.items()))
    table.add_row("dataset SHA-256", summary.dataset_sha256)
    table.add_row("bundle SHA-256", summary.bundle_sha256)
    out.print(table)
    out.print(f"verify with: rlk-conform verify {out_dir}", markup=False, highlight=False)


def verify_bundle_command(directory: Path, regenerate: bool, device: str) -> None:
    """``rlk-conform verify DIR`` when DIR is a bundle: print the outcome; exit 1 on any problem."""
    from .release import verify_bundle

    with verify_progress("verify goldens") as (on_start, on_done):
        result = verify_bundle(directory, regenerate=regenerate, device=device, on_start=on_start, on_done=on_done)
    table = Table(title=f"verify bundle {directory}", show_header=False)
    table.add_row("bundle files checked", str(result.files_checked))
    table.add_row("bundle SHA-256", str(result.bundle.get("bundle_sha256")))
    table.add_row("golden files checked", str(result.goldens.checked if result.goldens else 0))
    if regenerate and result.goldens:
        table.add_row("regenerated", str(result.goldens.regenerated))
    print_verification(table, result.problems)
    out.print(f"OK: bundle verified: {result.files_checked} files, bundle SHA-256 {result.bundle['bundle_sha256']}, "
              f"{result.goldens.checked if result.goldens else 0} golden files", markup=False, highlight=False)
