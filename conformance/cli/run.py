"""The ``run`` and ``merge`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conformance.cli.app import (
    DEFAULT_TOLERANCES,
    BackendOpt,
    DeviceOpt,
    JunitOpt,
    ReportJsonOpt,
    RerunsOpt,
    RulesOpt,
    Tier,
    TolerancesOpt,
    app,
    err,
    out,
    user_errors,
)
from conformance.cli.progress import progress_bar
from conformance.errors import EXIT_FAILURE, ConformanceError
from conformance.jobs.golden_run import GoldenRun, RunRequest, run_goldens
from conformance.spec.checks import CHECKS


@app.command()
@user_errors
def run(
    backend: BackendOpt = None,
    goldens: Annotated[Path | None, typer.Option(help="Golden directory. Default: <tier>/ of $RLK_GOLDENS, else of "
                                                 "the source checkout's goldens/, else of ./goldens.")] = None,
    tier: Annotated[Tier, typer.Option(help="Tier whose goldens to run (when --goldens is not given).")] = Tier.smoke,
    filter_: Annotated[str | None, typer.Option("--filter", help="Glob over case ids, e.g. 'attention/gqa/*'.")
                       ] = None,
    checks: Annotated[str | None, typer.Option(help="Comma-separated subset of: " + ", ".join(CHECKS) + ".")
                      ] = None,
    device: DeviceOpt = None,
    devices: Annotated[str | None, typer.Option(help="Split the cases over these devices, one worker process "
                                                "each, into one report, e.g. cuda:0,cuda:1.")] = None,
    compare_to: Annotated[str | None, typer.Option("--compare-to", help="Judge parity against this backend.")
                          ] = None,
    rules: RulesOpt = "default",
    tolerances: TolerancesOpt = DEFAULT_TOLERANCES,
    reruns: RerunsOpt = None,
    shard: Annotated[str | None, typer.Option(help="Run shard i of n (0-based), e.g. 0/4.")] = None,
    report_json: ReportJsonOpt = None,
    junit: JunitOpt = None,
    isolate: Annotated[bool, typer.Option("--isolate", help="Run the cases in a worker process, restarted after a "
                                          "crash: a segfault, exit or hang is an error record of its case.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.001, help="Seconds one case may take (its "
                                                  "golden and every check); implies --isolate.")] = None,
    max_case_mib: Annotated[int | None, typer.Option("--max-case-mib", min=1, help="Refuse golden files whose "
                                                     "declared tensors exceed this, before reading them. "
                                                     "Default: 4096.")] = None,
    regression: Annotated[bool | None, typer.Option("--regression/--no-regression", help="Also run the regression "
                                                    "set (promoted reproducers, rlk-conform promote). Default: "
                                                    "only with the default goldens, when the set exists.")
                          ] = None,
    properties: Annotated[bool, typer.Option("--properties", help="Also run the property search (ci profile) "
                                             "for the selected checks, as rlk-conform check does.")] = False,
    known_failures: Annotated[Path | None, typer.Option("--known-failures", help="YAML list of this backend's "
                                                        "expected failures and skips (docs/known-failures.md)."
                                                        )] = None,
    profile: Annotated[bool, typer.Option("--profile", help="Time each phase (read, transfer, backend, judge, "
                                          "report), peak RSS and the largest case: a table, and 'profile' in "
                                          "the JSON report.")] = False,
) -> None:
    """Run every golden case through a backend and judge accuracy, invariance, contract (and parity).

    Ctrl-C or SIGTERM stops the run: the summary and the reports of every finished case are still
    written (flagged complete: false) and the exit code is 130 or 143.
    """
    from conformance.run.profiling import PhaseTimer

    timer = PhaseTimer(enabled=profile)  # the profile's wall time starts here
    request = RunRequest(backend=backend, goldens=goldens, tier=tier.value, filter=filter_, checks=checks,
                         device=device, devices=devices, compare_to=compare_to, rules=rules, tolerances=tolerances,
                         reruns=reruns, shard=shard, isolate=isolate, timeout=timeout, max_case_mib=max_case_mib,
                         regression=regression, properties=properties, known_failures=known_failures,
                         profile=profile)
    failing = [0]
    # The bar starts once a backend is loaded, so that a loading error stays the only line on stderr.
    with progress_bar("run", eta=True) as bar:
        total = [0]

        def on_case(name: str, records: list) -> None:
            failing[0] += sum(r.status in ("fail", "error") for r in records)
            bar.advance(f"{failing[0]} failing")

        done = run_goldens(request, timer=timer, on_start=lambda n, name: total.__setitem__(0, n),
                           on_ready=lambda ready: bar.start(total[0], title=ready.backend["name"]), on_case=on_case)
    if isinstance(done, str):  # --devices, interrupted (by this signal) before any worker had loaded the backend
        err.print(f"interrupted by {done} before the backend was loaded", markup=False)
        raise typer.Exit(143 if done == "SIGTERM" else 130)
    _report(done, timer, report_json, junit)


def _report(done: GoldenRun, timer: object, report_json: Path | None, junit: Path | None) -> None:
    """Print the summary, write the reports, then the closing lines and the exit code."""
    from conformance.processes import deferred_signals
    from conformance.report.console import print_profile, print_reproducers, print_summary
    from conformance.report.json import write_json
    from conformance.report.junit import write_junit

    result, backend = done.outcome.result, done.report["backend"]
    used, where = backend["used"], backend["device"]
    with deferred_signals() as late:  # a second Ctrl-C must not cut a report in half
        with timer.phase("report"):  # type: ignore[attr-defined]
            finished = "" if result.cases == done.selected else f" ({result.cases} finished)"
            print_summary(out, result.records, f"rlk-conform run — backend {used} on {where}, "
                          f"{done.sources_text()}{finished}")
            if junit:
                write_junit(junit, result.records, f"rlk-conform.{used}")
        # taken just before the JSON file is written, which is the one thing the profile leaves out
        report = done.with_profile(timer) if done.request.profile else done.report  # type: ignore[arg-type]
        if report_json:
            write_json(report_json, report)
            out.print(f"JSON report: {report_json}")
        if junit:
            out.print(f"JUnit report: {junit}")
        if done.request.profile:
            print_profile(out, report["profile"], f"profile of the run ({result.cases} cases)")
    print_reproducers(out, done.outcome.property_records, done.job.backend)
    stopped_by = result.interrupted_by or (late[0] if late else None)
    if stopped_by:
        out.print(f"[bold red]INTERRUPTED[/] by {stopped_by}: {result.cases} of {done.selected} cases finished; "
                  "the reports hold every finished record" + ("" if result.complete else " and say complete: false"))
        raise typer.Exit(130 if stopped_by == "SIGINT" else 143)
    _closing_lines(done)


def _closing_lines(done: GoldenRun) -> None:
    from conformance.report.console import guidance

    result, unexpected = done.outcome.result, done.unexpected_passes
    for r in unexpected[:10]:
        out.print(f"[yellow]UNEXPECTED PASS[/] {r.check}: {r.case_id} (listed as a known failure in "
                  f"{done.request.known_failures}; narrow or remove the entry)", soft_wrap=True)
    if len(unexpected) > 10:
        out.print(f"[yellow]… and {len(unexpected) - 10} more unexpected passes[/] (all in the JSON report)")
    if result.refused:
        out.print(f"[bold red]{result.refused} golden file(s) refused as damaged[/] (not judged; "
                  f"rlk-conform verify {done.root} names each problem)")
    for line in done.failures:
        out.print(f"[bold red]INCOMPLETE[/]: {line}", soft_wrap=True)
    if done.everything_refused:
        raise ConformanceError(f"{done.root}: every selected golden file ({result.cases}) was refused as damaged, "
                               f"so nothing was judged; run 'rlk-conform verify {done.root}' to see why")
    if done.report["summary"]["executed"] == 0:
        out.print("[bold red]FAIL[/]: no check was executed (every record skipped) — nothing was verified")
        raise typer.Exit(EXIT_FAILURE)
    if not done.passed:
        out.print(f"[bold red]FAIL[/]: {done.summary_line()}")
        for line in guidance(result.records, done.job.backend):
            out.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_FAILURE)
    out.print(f"[bold green]PASS[/]: {done.summary_line()}")


@app.command("merge")
@user_errors
def merge_cmd(
    results: Annotated[list[Path], typer.Argument(metavar="RESULT.json", help="JSON reports of the shards "
                                                  "(rlk-conform run --shard i/n --report-json).")],
    out_json: Annotated[Path, typer.Option("--out", help="Write the merged JSON report here.")],
    junit: Annotated[Path | None, typer.Option(help="Also write a merged JUnit XML report here.")] = None,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Merge even when shards are missing: the "
                                                "report says complete: false and lists them in missing_shards."
                                                )] = False,
) -> None:
    """Merge the JSON reports of the shards of one run into one report (summary recomputed; the
    profiles of shards run with --profile are summed).

    Every shard i/n of one run must be there exactly once (same backend, golden set and settings).
    Exit 0 when the merged run passes, 1 when it has failures, errors, no executed check or (with
    --allow-partial) missing shards, 2 when the reports cannot be merged (a missing or repeated
    shard, another backend, golden set or settings, overlapping records, bad files)."""
    from conformance.report.console import print_profile, print_summary
    from conformance.report.json import load_report, merge_reports, records_of, write_json
    from conformance.report.junit import write_junit

    merged = merge_reports([load_report(path) for path in results], [str(p) for p in results], allow_partial)
    write_json(out_json, merged)
    records = records_of(merged)
    print_summary(out, records, f"merged report of {len(results)} shards → {out_json}")
    if junit:
        write_junit(junit, records, f"rlk-conform.{merged['backend'].get('used')}")
    if merged.get("profile"):
        print_profile(out, merged["profile"], f"profile of the {len(results)} shards (summed)")
    summary = merged["summary"]
    passed = summary["verdict"] == "pass" and merged["complete"]
    out.print(f"{'PASS' if passed else 'FAIL'}: {summary['by_status']['pass']} passed, "
              f"{summary['by_status']['fail']} failed, {summary['by_status']['error']} errors, "
              f"{summary['by_status']['skip']} skipped over {summary['cases']} cases"
              + ("" if merged["complete"] else (f" (missing shards: {', '.join(merged['missing_shards'])})"
                                                 if merged.get("missing_shards") else " (a shard was incomplete)")),
              markup=False, highlight=False, soft_wrap=True)
    if not passed:
        raise typer.Exit(EXIT_FAILURE)
