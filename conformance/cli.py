"""The ``rlk-conform`` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import __version__
from .errors import EXIT_FAILURE, ConformanceError
from .judge import CHECKS
from .spec import DEFAULT_MEMORY_CAP_BYTES, TIERS, OpSpec, default_spec_paths, load_specs

app = typer.Typer(
    name="rlk-conform",
    help="Numerical conformance harness and exact golden-data generator for attention kernels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class Tier(str, Enum):
    smoke = "smoke"
    standard = "standard"
    full = "full"


def user_errors(fn: F) -> F:
    """Turn user-facing errors into one line on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConformanceError as exc:
            err.print(f"error: {exc}", markup=False, highlight=False, emoji=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def verify_progress(label: str) -> Iterator[tuple[Callable[[int], None], Callable[[str, bool], None]]]:
    """A per-file bar that appears only once the library has validated its input and calls
    ``on_start(total)`` (so an error before that stays the only line on stderr)."""
    progress = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=False)
    task = progress.add_task("", total=0)

    def on_start(n: int) -> None:
        progress.update(task, total=n)
        progress.start()

    def on_done(case_id: str, ok: bool) -> None:
        progress.update(task, advance=1, description=case_id)

    try:
        yield on_start, on_done
    finally:
        if progress.live.is_started:
            progress.stop()


def _version(value: bool) -> None:
    if value:
        out.print(f"rlk-conform {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Numerical conformance harness and exact golden-data generator for attention kernels."""


SpecOpt = Annotated[list[Path] | None, typer.Option("--spec", help="Op spec file (repeatable). Default: "
                                                    "specs/attention.yaml and specs/kv_cache_attention.yaml.")]
CapOpt = Annotated[int, typer.Option("--memory-cap-mib", min=1, help="Refuse cases whose tensors exceed this.")]


def _load(spec: list[Path] | None, memory_cap_mib: int) -> list[OpSpec]:
    paths = spec or default_spec_paths(Path("specs"))
    return load_specs(paths, memory_cap_mib * 2**20)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@app.command()
@user_errors
def generate(
    spec: SpecOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output directory. Default: goldens/<tier>.")] = None,
    tier: Annotated[Tier, typer.Option(help="Tier to generate (tiers are cumulative).")] = Tier.smoke,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Worker processes (default: one per core).")
                    ] = os.cpu_count() or 1,
    device: Annotated[str, typer.Option(help="Where the float64 stage runs: cpu or cuda[:N].")] = "cpu",
    memory_cap_mib: CapOpt = DEFAULT_MEMORY_CAP_BYTES // 2**20,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the complete goldens an interrupted run left "
                                         "(checked, same spec and generator) and compute only the rest.")] = False,
) -> None:
    """Generate correctly rounded fp32 golden files for every case of a tier, then the manifest."""
    from .generate import generate as run_generate

    specs = _load(spec, memory_cap_mib)
    target = out_dir or Path("goldens") / tier.value
    # The bar starts only once the library has validated everything (errors stay one line).
    progress = Progress(TextColumn("[bold]generate[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("cases · {task.fields[written]}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=err, transient=False)
    task = progress.add_task(tier.value, total=0, written="0 B")
    written = [0]

    def on_start(job_list: list[Any]) -> None:
        progress.update(task, total=len(job_list))
        progress.start()

    def on_done(job: Any, res: Any) -> None:
        written[0] += res.bytes
        progress.update(task, advance=1, written=_fmt_bytes(written[0]))

    try:
        summary = run_generate(specs, tier.value, target, n_workers=jobs, device=device, on_start=on_start,
                               on_done=on_done, resume=resume)
    finally:
        if progress.live.is_started:
            progress.stop()
    gflops = summary.flops / summary.seconds / 1e9 if summary.seconds else 0.0
    refined_dd = sum(r.refined_double_double for r in summary.results)
    refined_exact = sum(r.refined_exact for r in summary.results)
    table = Table(title=f"generated tier '{tier.value}' → {target}", show_header=False)
    table.add_row("cases", str(len(summary.results)) + (f" ({summary.reused} kept from the interrupted run)"
                                                        if resume else ""))
    table.add_row("bytes", _fmt_bytes(summary.bytes))
    table.add_row("wall time", f"{summary.seconds:.1f} s ({jobs} job{'s' if jobs > 1 else ''}, {device})")
    table.add_row("float64 work", f"{summary.flops / 1e9:.2f} GFLOP (mask-remaining) at {gflops:.2f} GFLOP/s")
    table.add_row("refined elements", f"{refined_dd} double-double, {refined_exact} exact (cases computed in this run)")
    table.add_row("manifest", str(summary.manifest))
    out.print(table)


@app.command()
@user_errors
def verify(
    directory: Annotated[Path, typer.Argument(help="Golden directory holding manifest.json.")] = Path("goldens/smoke"),
    regenerate: Annotated[bool, typer.Option(help="Recompute every case and require identical bytes.")] = False,
    device: Annotated[str, typer.Option(help="Where regeneration's float64 stage runs.")] = "cpu",
) -> None:
    """Check a golden directory: manifest checksums, schema, per-dataset SHA-256 (and regeneration).
    A release bundle (a directory with bundle.json) is verified end to end: every file, then its goldens."""
    from .release import is_bundle

    if is_bundle(directory):
        from .cli_report import verify_bundle_command

        return verify_bundle_command(directory, regenerate=regenerate, device=device)
    from .verify import verify as run_verify

    with verify_progress("verify") as (on_start, on_done):
        result = run_verify(directory, regenerate=regenerate, device=device, on_start=on_start, on_done=on_done)
    table = Table(title=f"verify {directory}", show_header=False)
    table.add_row("files checked", str(result.checked))
    if regenerate:
        failed = {p.path for p in result.problems}
        table.add_row("regenerated", f"{result.regenerated} ({result.regenerated - len(failed)} bit-identical)")
    table.add_row("dataset SHA-256", str(result.manifest.get("dataset_sha256")))
    print_verification(table, result.problems)
    out.print(f"OK: {result.checked} golden files verified" + (", every one regenerated bit-identical"
                                                                if regenerate else ""))


def print_verification(table: Table, problems: list[Any]) -> None:
    """The summary table of a verification, then each problem on its own ``FAIL`` line; exit 1 if
    there were any (the caller prints its ``OK`` line otherwise)."""
    table.add_row("problems", str(len(problems)))
    out.print(table)
    for p in problems:
        out.print(f"FAIL {p}", markup=False, highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(EXIT_FAILURE)


@app.command("specs")
@user_errors
def list_specs(
    spec: SpecOpt = None,
    tier: Annotated[Tier, typer.Option(help="List the cases of this tier.")] = Tier.smoke,
    ids_only: Annotated[bool, typer.Option("--ids", help="Print case ids only, one per line.")] = False,
    memory_cap_mib: CapOpt = DEFAULT_MEMORY_CAP_BYTES // 2**20,
) -> None:
    """Validate the specs and list the cases of a tier."""
    specs = _load(spec, memory_cap_mib)
    cases = [c for s in specs for c in s.cases_for_tier(tier.value)]
    if ids_only:
        for c in cases:
            out.print(c.id, markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=f"{len(cases)} cases in tier '{tier.value}'")
    for col in ("case id", "B", "Hq/Hkv", "D", "Sq", "Skv", "dtype", "tier"):
        table.add_column(col, overflow="fold")
    for c in cases:
        table.add_row(c.id, str(c.batch), f"{c.hq}/{c.hkv}", str(c.d), str(c.sq), str(c.skv), c.dtype, c.tier)
    out.print(table)
    total = sum(c.tensor_bytes for c in cases)
    out.print(f"{len(cases)} cases, {_fmt_bytes(total)} of tensors; tiers are cumulative ({' ⊂ '.join(TIERS)})")


def _best_backend() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "sdpa"


@app.command()
@user_errors
def run(
    backend: Annotated[str | None, typer.Option(help="Registered name or package.module:attr. Default: cuda if "
                                                "available, else sdpa on the CPU.")] = None,
    goldens: Annotated[Path | None, typer.Option(help="Golden directory. Default: goldens/<tier>.")] = None,
    tier: Annotated[Tier, typer.Option(help="Tier whose goldens to run (when --goldens is not given).")] = Tier.smoke,
    filter_: Annotated[str | None, typer.Option("--filter", help="Glob over case ids, e.g. 'attention/gqa/*'.")
                       ] = None,
    checks: Annotated[str | None, typer.Option(help="Comma-separated subset of: " + ", ".join(CHECKS) + ".")
                      ] = None,
    device: Annotated[str | None, typer.Option(help="Torch device for the backend, e.g. cpu, cuda:1.")] = None,
    devices: Annotated[str | None, typer.Option(help="Split the cases over these devices, one worker process "
                                                "each, into one report, e.g. cuda:0,cuda:1.")] = None,
    compare_to: Annotated[str | None, typer.Option("--compare-to", help="Judge parity against this backend.")
                          ] = None,
    rules: Annotated[str, typer.Option(help="Accuracy rule set of tolerances.yaml: default or strict.")] = "default",
    tolerances: Annotated[Path, typer.Option(help="Threshold file.")] = Path("specs/tolerances.yaml"),
    reruns: Annotated[int | None, typer.Option(min=2, help="Determinism reruns (default: tolerances.yaml).")] = None,
    shard: Annotated[str | None, typer.Option(help="Run shard i of n (0-based), e.g. 0/4.")] = None,
    report_json: Annotated[Path | None, typer.Option("--report-json", help="Write the JSON report here.")] = None,
    junit: Annotated[Path | None, typer.Option(help="Write a JUnit XML report here.")] = None,
    isolate: Annotated[bool, typer.Option("--isolate", help="Run the cases in a worker process, restarted after a "
                                          "crash: a segfault, exit or hang is an error record of its case.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.001, help="Seconds one case may take (its "
                                                  "golden and every check); implies --isolate.")] = None,
    max_case_mib: Annotated[int | None, typer.Option("--max-case-mib", min=1, help="Refuse golden files whose "
                                                     "declared tensors exceed this, before reading them. "
                                                     "Default: 4096.")] = None,
    regression: Annotated[bool, typer.Option(help="Also run goldens/regression (promoted reproducers, "
                                             "rlk-conform promote) when it exists.")] = True,
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
    from .devices import DevicesResult, devices_profile, golden_sizes, parse_devices, run_on_devices
    from .execution import RunJob, execute
    from .golden import DEFAULT_MAX_CASE_BYTES, read_manifest, sha256_file
    from .profiling import PhaseTimer, print_profile
    from .report import build_report, print_summary, with_profile, write_json, write_junit
    from .runner import DEFAULT_CHECKS, RunSettings, deferred_signals, manifest_checksums, parse_shard, select_cases
    from .tolerances import load_tolerances

    timer = PhaseTimer(enabled=profile)  # the profile's wall time starts here
    device_list = None
    if devices is not None:  # checked before anything is read or started
        if device is not None:
            raise ConformanceError("--devices cannot be combined with --device: list every device in --devices")
        if shard is not None:
            raise ConformanceError("--devices cannot be combined with --shard: --devices splits the selected cases "
                                   "itself")
        device_list = parse_devices(devices)
    tol = load_tolerances(tolerances)
    if rules not in tol.accuracy:
        raise ConformanceError(f"--rules {rules!r}: {tolerances} defines {', '.join(sorted(tol.accuracy))}")
    wanted = tuple(DEFAULT_CHECKS) if checks is None else tuple(c.strip() for c in checks.split(",") if c.strip())
    unknown = [c for c in wanted if c not in CHECKS]
    if unknown or not wanted:
        raise ConformanceError(f"--checks: unknown check(s) {', '.join(unknown) or '(none given)'}; "
                               f"choose from {', '.join(CHECKS)}")
    if compare_to and "parity" not in wanted:
        wanted = (*wanted, "parity")
    root = goldens or Path("goldens") / tier.value
    shard_t = parse_shard(shard) if shard else None
    paths = select_cases(root, filter_, shard_t)
    roots = [root]
    from .reproducer import DEFAULT_REGRESSION_DIR as regression_root  # goldens/regression (rlk-conform promote)

    if regression and (regression_root / "manifest.json").is_file() and regression_root.resolve() != root.resolve():
        paths += select_cases(regression_root, filter_, shard_t)
        roots.append(regression_root)
    if properties and (isolate or timeout is not None):
        raise ConformanceError("--properties searches in this process; it cannot be combined with --isolate/--timeout")
    if not paths:
        raise ConformanceError(f"{root}: no golden case matches" + (f" --filter {filter_!r}" if filter_ else "")
                               + (f" in shard {shard}" if shard else ""))
    requested = backend or _best_backend()
    known = None
    if known_failures is not None:  # validated before any case runs: a stale list is an error
        from .known_failures import check_patterns, load_known_failures

        known = load_known_failures(known_failures, requested)
        case_ids = [e["case_id"] for e in read_manifest(root)["files"]]
        if regression and (regression_root / "manifest.json").is_file():
            case_ids += [e["case_id"] for e in read_manifest(regression_root)["files"]]
        check_patterns(known, case_ids)
    isolate = isolate or timeout is not None  # only killing its process stops a hung kernel
    max_case_bytes = DEFAULT_MAX_CASE_BYTES if max_case_mib is None else max_case_mib * 2**20
    manifest = read_manifest(root)
    job = RunJob(backend=requested, device=device, compare_to=compare_to,
                 settings=RunSettings(tolerances=tol, checks=wanted, rule_set=rules, reruns=reruns),
                 paths=tuple(paths), checksums=manifest_checksums(root), max_case_bytes=max_case_bytes,
                 isolate=isolate, timeout=timeout, properties=properties, profile=profile)
    # The bar starts once a backend is loaded, so that a loading error stays the only line on stderr.
    progress = Progress(TextColumn("[bold]run[/] {task.fields[backend]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=err, transient=False)
    task = progress.add_task("", total=len(paths), backend=requested)
    failed = [0]

    def on_ready(info: dict[str, Any]) -> None:
        if not progress.live.is_started:
            progress.update(task, backend=info["backend"]["used"])
            progress.start()

    def on_case(name: str, recs: list[Any]) -> None:
        failed[0] += sum(r.status in ("fail", "error") for r in recs)
        progress.update(task, advance=1, description=f"{failed[0]} failing")

    try:
        if device_list is None:
            outcome = execute(job, timer, on_ready=on_ready, on_case=on_case)
        else:
            outcome = run_on_devices(job, device_list, golden_sizes(paths, roots), on_ready=on_ready,
                                     on_case=on_case)
    finally:
        if progress.live.is_started:
            progress.stop()
    result, info = outcome.result, outcome.info
    split = outcome if isinstance(outcome, DevicesResult) else None  # a --devices run
    if info is None:  # --devices, interrupted before any worker had loaded the backend
        err.print(f"interrupted by {result.interrupted_by} before the backend was loaded", markup=False)
        raise typer.Exit(143 if result.interrupted_by == "SIGTERM" else 130)
    backend_meta, target = dict(info["backend"]), dict(info["execution_target"])
    if split is not None:
        backend_meta["device"] = target["device"] = ",".join(d["device"] for d in split.devices)
    meta: dict[str, Any] = {
        "backend": backend_meta,
        "compare_to": info["compare_to"],
        "execution_target": target,
        "goldens": {"dir": str(root), "tier": manifest.get("tier"), "dataset_sha256": manifest.get("dataset_sha256"),
                    "manifest_sha256": sha256_file(root / "manifest.json"), "cases_selected": len(paths)},
        "settings": {**info["numerical_settings"], "checks": list(wanted), "rule_set": rules, "filter": filter_,
                     "shard": shard, "reruns": reruns, "tolerances_file": str(tolerances),
                     "tolerances_sha256": sha256_file(tolerances), "isolate": isolate, "timeout_s": timeout,
                     "max_case_mib": max_case_bytes // 2**20},
    }
    if split is not None:
        meta["devices"] = split.devices
    if isolate:
        meta["isolation"] = {"worker_restarts": outcome.restarts, "timeout_s": timeout}
    if result.interrupted_by:
        meta["interrupted_by"] = result.interrupted_by
    failures = split.failures if split is not None else []
    unexpected_passes: list[Any] = []
    if known:
        from .known_failures import apply as apply_known

        applied = apply_known(known, result.records)
        unexpected_passes = applied.unexpected_passes or []
        meta["known_failures"] = {"file": str(known_failures), "expected": applied.expected,
                                  "unexpected_passes": [f"{r.check}: {r.case_id}" for r in unexpected_passes]}
    used, where = backend_meta["used"], backend_meta["device"]
    with deferred_signals() as late:  # a second Ctrl-C must not cut a report in half
        with timer.phase("report"):
            report = build_report(result.records, meta, complete=result.complete)
            print_summary(out, result.records, f"rlk-conform run — backend {used} on {where}, "
                          f"{result.cases} cases from {root}")
            if junit:
                write_junit(junit, result.records, f"rlk-conform.{used}")
        if profile:  # taken just before the JSON file is written, which is the one thing it leaves out
            own = timer.profile(result.cases)
            if split is not None:
                own = devices_profile(own, split.waited_s, split.profiles)
            report = with_profile(report, own.to_json())
        if report_json:
            write_json(report_json, report)
            out.print(f"JSON report: {report_json}")
        if junit:
            out.print(f"JUnit report: {junit}")
        if profile:
            print_profile(out, report["profile"], f"profile of the run ({result.cases} cases)")
    stopped_by = result.interrupted_by or (late[0] if late else None)
    if stopped_by:
        out.print(f"[bold red]INTERRUPTED[/] by {stopped_by}: {result.cases} of {len(paths)} cases finished; "
                  "the reports hold every finished record" + ("" if result.complete else
                                                              " and say complete: false"))
        raise typer.Exit(130 if stopped_by == "SIGINT" else 143)
    for r in unexpected_passes[:10]:
        out.print(f"[yellow]UNEXPECTED PASS[/] {r.check}: {r.case_id} (listed as a known failure in "
                  f"{known_failures}; narrow or remove the entry)", soft_wrap=True)
    if len(unexpected_passes) > 10:
        out.print(f"[yellow]… and {len(unexpected_passes) - 10} more unexpected passes[/] (all in the JSON report)")
    if result.refused:
        out.print(f"[bold red]{result.refused} golden file(s) refused as damaged[/] (not judged; "
                  f"rlk-conform verify {root} names each problem)")
    for line in failures:
        out.print(f"[bold red]INCOMPLETE[/]: {line}", soft_wrap=True)
    if result.cases and result.refused == result.cases:
        raise ConformanceError(f"{root}: every selected golden file ({result.cases}) was refused as damaged, so "
                               f"nothing was judged; run 'rlk-conform verify {root}' to see why")
    summary = report["summary"]
    if summary["executed"] == 0:
        out.print("[bold red]FAIL[/]: no check was executed (every record skipped) — nothing was verified")
        raise typer.Exit(EXIT_FAILURE)
    counts = summary["by_status"]
    line = (f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, {counts['skip']} skipped "
            f"over {summary['cases']} cases")
    if summary["expected_failures"]:
        line += f"; {summary['expected_failures']} of the failures and errors are known failures"
    if failures:
        line += f"; incomplete: {result.cases} of {len(paths)} cases finished"
    if summary["verdict"] != "pass" or failures:
        out.print(f"[bold red]FAIL[/]: {line}")
        raise typer.Exit(EXIT_FAILURE)
    out.print(f"[bold green]PASS[/]: {line}")


@app.command("backends")
@user_errors
def list_backends_cmd() -> None:
    """List every registered backend with its availability (and why not, when unavailable)."""
    from .backends import list_backends

    table = Table(title="backends (use --backend NAME, or --backend package.module:attr)")
    for col in ("name", "available", "device", "description / reason"):
        table.add_column(col, overflow="fold")
    for info in list_backends():
        table.add_row(info.name, "[green]yes[/]" if info.available else "[red]no[/]", getattr(info, "device", ""),
                      info.description if info.available else (info.reason or ""))
    out.print(table)


def main() -> None:
    app()


from . import cli_check  # noqa: E402,F401,I001  (registers check, replay, promote)
from . import cli_report  # noqa: E402,F401  (registers report, release)

if __name__ == "__main__":
    # Run as a script this file is `__main__`, not `conformance.cli`, where every command is
    # registered: delegate to the package module.
    from conformance.cli import main as package_main

    package_main()
