"""What ``rlk-conform run`` does, as one library function: :func:`run_goldens` checks the request,
selects the golden cases, runs them (in this process, isolated, or over several devices), applies the
known-failure list and builds the report. The CLI only parses options, shows progress, prints and
writes what this returns; the nightly lane and tests call the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance.backends.registry import default_backend
from conformance.errors import EXIT_FAILURE, EXIT_OK, ConformanceError, UsageError
from conformance.files import sha256_file
from conformance.golden.format import DEFAULT_MAX_CASE_BYTES
from conformance.golden.manifest import MANIFEST_NAME, manifest_checksums, read_manifest, select_cases
from conformance.jobs.devices import DevicesResult, devices_profile, golden_sizes, parse_devices, run_on_devices
from conformance.jobs.job import JobResult, RunJob, execute
from conformance.judge.known_failures import apply as apply_known_failures
from conformance.judge.known_failures import check_patterns, load_known_failures
from conformance.judge.records import Record
from conformance.locations import REGRESSION, find_goldens, regression_dir, shown
from conformance.report.json import build_report, with_profile
from conformance.run.loop import parse_shard
from conformance.run.profiling import NO_TIMER, PhaseTimer
from conformance.run.settings import RunSettings, load_rules, tolerances_provenance
from conformance.run.wire import Ready
from conformance.spec.checks import parse_checks


@dataclass(frozen=True)
class RunRequest:
    """The options of ``rlk-conform run`` (each documented in ``rlk-conform run --help``)."""

    backend: str | None = None  # None: cuda if available, else sdpa
    goldens: Path | None = None  # None: goldens/<tier>
    tier: str = "smoke"
    filter: str | None = None
    checks: str | None = None  # comma-separated; None: the default checks
    device: str | None = None
    devices: str | None = None
    compare_to: str | None = None
    rules: str = "default"
    tolerances: Path | None = None  # None: the shipped tolerances.yaml
    reruns: int | None = None
    shard: str | None = None
    isolate: bool = False
    timeout: float | None = None
    max_case_mib: int | None = None
    regression: bool | None = None  # None: with the default goldens only
    properties: bool = False
    known_failures: Path | None = None
    profile: bool = False


@dataclass
class GoldenRun:
    """A finished ``run``: the result, the report (without ``profile``), what the summary line needs."""

    request: RunRequest
    job: RunJob
    root: Path
    selected: int  # golden files selected
    outcome: JobResult
    report: dict[str, Any]
    unexpected_passes: list[Record] = field(default_factory=list)
    sources: list[tuple[Path, int]] = field(default_factory=list)  # (golden root, cases selected from it)

    def sources_text(self) -> str:
        """``150 cases from goldens/smoke`` or ``151 cases: 150 from goldens/smoke, 1 from goldens/regression``."""
        sources = [(root, n) for root, n in self.sources if n] or self.sources[:1]
        if len(sources) == 1:
            return f"{sources[0][1]} cases from {shown(sources[0][0])}"
        return f"{self.selected} cases: " + ", ".join(f"{n} from {shown(root)}" for root, n in sources)

    @property
    def records(self) -> list[Record]:
        return self.outcome.result.records

    @property
    def failures(self) -> list[str]:
        """One line per device worker that ended on its own before finishing its share."""
        return self.outcome.failures if isinstance(self.outcome, DevicesResult) else []

    @property
    def everything_refused(self) -> bool:
        result = self.outcome.result
        return bool(result.cases) and result.refused == result.cases

    def with_profile(self, timer: PhaseTimer) -> dict[str, Any]:
        """The report with ``profile`` (``--profile``): this process's timer, combined with the device
        workers' profiles for a ``--devices`` run."""
        own = timer.profile(self.outcome.result.cases)
        if isinstance(self.outcome, DevicesResult):
            own = devices_profile(own, self.outcome.waited_s, self.outcome.profiles)
        return with_profile(self.report, own.to_json())

    def summary_line(self) -> str:
        """``N passed, N failed, … over N cases`` with the known-failure and incompleteness notes."""
        summary, result = self.report["summary"], self.outcome.result
        counts = summary["by_status"]
        line = (f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, {counts['skip']} "
                f"skipped over {summary['cases']} cases")
        if summary["expected_failures"]:
            line += f"; {summary['expected_failures']} of the failures and errors are known failures"
        if self.failures:
            line += f"; incomplete: {result.cases} of {self.selected} cases finished"
        return line

    @property
    def passed(self) -> bool:
        return self.report["summary"]["verdict"] == "pass" and not self.failures

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_FAILURE


@dataclass(frozen=True)
class _Selection:
    root: Path
    roots: list[Path]
    paths: list[Path]
    per_root: list[int]  # cases selected from each root
    default: bool  # root is the default golden directory of the tier (no --goldens)


def select(request: RunRequest) -> _Selection:
    """The golden files a request runs: its golden directory (filtered, sharded) and the regression
    set (promoted reproducers) — by default only with the default goldens, always with
    ``--regression``, never with ``--no-regression``."""
    default = request.goldens is None
    root = find_goldens(request.tier) if default else request.goldens
    shard = parse_shard(request.shard) if request.shard else None
    paths = select_cases(root, request.filter, shard)
    roots, per_root = [root], [len(paths)]
    regression = (root.parent / REGRESSION if default else None) if request.regression is None else (
        regression_dir() if request.regression else None)
    if request.regression and regression is None:
        raise UsageError("--regression: no regression set found (promote a reproducer first: rlk-conform promote)")
    if regression is not None and (regression / MANIFEST_NAME).is_file() and regression.resolve() != root.resolve():
        extra = select_cases(regression, request.filter, shard)
        paths += extra
        roots.append(regression)
        per_root.append(len(extra))
    if not paths:
        raise ConformanceError(f"{root}: no golden case matches" + (f" --filter {request.filter!r}"
                                                                   if request.filter else "")
                               + (f" in shard {request.shard}" if request.shard else ""))
    return _Selection(root, roots, paths, per_root, default)


def plan(request: RunRequest) -> tuple[RunJob, _Selection, list[str] | None, Any]:
    """Check every option before anything runs and build the job: (job, selection, devices, known
    failures). Raises ConformanceError (exit 2) naming the option, file or field at fault."""
    device_list = None
    if request.devices is not None:
        if request.device is not None:
            raise UsageError("--devices cannot be combined with --device: list every device in --devices")
        if request.shard is not None:
            raise UsageError("--devices cannot be combined with --shard: --devices splits the selected cases itself")
        device_list = parse_devices(request.devices)
    tol = load_rules(request.tolerances, request.rules)
    wanted = parse_checks(request.checks)
    if request.compare_to and "parity" not in wanted:
        wanted = (*wanted, "parity")
    selection = select(request)
    if request.properties and (request.isolate or request.timeout is not None):
        raise UsageError("--properties searches in this process; it cannot be combined with --isolate/--timeout")
    requested = request.backend or default_backend()
    known = None
    if request.known_failures is not None:  # validated before any case runs: a stale list is an error
        known = load_known_failures(request.known_failures, requested)
        check_patterns(known, [e["case_id"] for root in selection.roots for e in read_manifest(root)["files"]])
    max_case_bytes = DEFAULT_MAX_CASE_BYTES if request.max_case_mib is None else request.max_case_mib * 2**20
    job = RunJob(backend=requested, device=request.device, compare_to=request.compare_to,
                 settings=RunSettings(tolerances=tol, checks=wanted, rule_set=request.rules, reruns=request.reruns),
                 paths=tuple(selection.paths), checksums=manifest_checksums(selection.root),
                 max_case_bytes=max_case_bytes, isolate=request.isolate or request.timeout is not None,
                 timeout=request.timeout, properties=request.properties, profile=request.profile)
    return job, selection, device_list, known


def run_goldens(request: RunRequest, *, timer: PhaseTimer = NO_TIMER,
                on_start: Callable[[int, str], None] | None = None,
                on_ready: Callable[[Ready], None] | None = None,
                on_case: Callable[[str, list[Record]], None] | None = None) -> GoldenRun | str:
    """Run ``request``. ``on_start(cases, backend)`` is called once every option checked out, before
    the backend loads; ``on_ready`` once it has loaded (each device's, with ``--devices``);
    ``on_case(file name, records)`` as each case finishes. Returns the name of the signal instead when
    a ``--devices`` run was interrupted before any worker had loaded the backend. Raises
    ConformanceError for bad input."""
    job, selection, device_list, known = plan(request)
    if on_start is not None:
        on_start(len(job.paths), job.backend)
    outcome: JobResult
    if device_list is None:
        outcome = execute(job, timer, on_ready=on_ready, on_case=on_case)
    else:
        outcome = run_on_devices(job, device_list, golden_sizes(job.paths, selection.roots), on_ready=on_ready,
                                 on_case=on_case)
    if outcome.info is None:
        return outcome.result.interrupted_by or "SIGINT"
    meta = _metadata(request, job, selection, outcome, device_list)
    unexpected: list[Record] = []
    if known is not None:
        applied = apply_known_failures(known, outcome.result.records)
        unexpected = applied.unexpected_passes or []
        meta["known_failures"] = {"file": str(request.known_failures), "expected": applied.expected,
                                  "unexpected_passes": [f"{r.check}: {r.case_id}" for r in unexpected]}
    with timer.phase("report"):
        report = build_report(outcome.result.records, meta, complete=outcome.result.complete)
    return GoldenRun(request, job, selection.root, len(job.paths), outcome, report, unexpected,
                     list(zip(selection.roots, selection.per_root)))


def _metadata(request: RunRequest, job: RunJob, selection: _Selection, outcome: JobResult,
              device_list: Sequence[str] | None) -> dict[str, Any]:
    """The report's head: backend, compare_to, target, golden set, settings (docs/report-format.md)."""
    info, result = outcome.info, outcome.result
    backend_meta, target = dict(info["backend"]), dict(info["execution_target"])
    split = outcome if isinstance(outcome, DevicesResult) else None
    if split is not None:
        backend_meta["device"] = target["device"] = ",".join(d["device"] for d in split.devices)
    root = selection.root
    manifest = read_manifest(root)
    settings = job.settings
    meta: dict[str, Any] = {
        "backend": backend_meta,
        "compare_to": info["compare_to"],
        "execution_target": target,
        "goldens": {"dir": str(root), "tier": manifest.get("tier"), "dataset_sha256": manifest.get("dataset_sha256"),
                    "manifest_sha256": sha256_file(root / MANIFEST_NAME), "cases_selected": len(job.paths),
                    "default": selection.default,
                    "roots": [{"dir": str(r), "cases": n} for r, n in zip(selection.roots, selection.per_root)]},
        "settings": {**info["numerical_settings"], "checks": list(settings.checks), "rule_set": settings.rule_set,
                     "filter": request.filter, "shard": request.shard, "reruns": request.reruns,
                     **tolerances_provenance(request.tolerances), "isolate": job.isolate, "timeout_s": job.timeout,
                     "max_case_mib": job.max_case_bytes // 2**20},
    }
    if split is not None:
        meta["devices"] = split.devices
    if job.isolate:
        meta["isolation"] = {"worker_restarts": outcome.restarts, "timeout_s": job.timeout}
    if result.interrupted_by:
        meta["interrupted_by"] = result.interrupted_by
    return meta
