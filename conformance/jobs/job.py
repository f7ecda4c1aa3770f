"""One device's share of ``rlk-conform run``: load the backend, stream the golden cases through it
(:func:`conformance.run.loop.run`) and, with ``--properties``, run the property search.

``rlk-conform run`` calls :func:`execute` once in its own process; with ``--devices`` every worker
process calls it on its device with its share of the cases (:mod:`conformance.jobs.devices`), so
both judge exactly the same way. A :class:`RunJob` is plain, picklable data for that reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance.backends.registry import describe_backend, load_backend, report_backend
from conformance.environment import execution_target, numerical_settings
from conformance.golden.format import DEFAULT_MAX_CASE_BYTES
from conformance.judge.records import Record
from conformance.processes import stop_on_signals
from conformance.run.case import CaseOutcome, in_process_judge
from conformance.run.isolation import IsolatedBackend
from conformance.run.loop import RunResult, run
from conformance.run.profiling import NO_TIMER, PhaseTimer
from conformance.run.settings import RunSettings
from conformance.run.wire import Ready
from conformance.search.engine import property_records


@dataclass(frozen=True)
class RunJob:
    """What one process runs: the backend spec and device, the settings and the golden files."""

    backend: str  # registered name or package.module:attr
    device: str | None
    compare_to: str | None
    settings: RunSettings
    paths: tuple[Path, ...]
    checksums: Mapping[Path, str] = field(default_factory=dict)  # manifest SHA-256 per golden file
    max_case_bytes: int = DEFAULT_MAX_CASE_BYTES
    isolate: bool = False  # judge the cases in a restartable worker (--isolate / --timeout)
    timeout: float | None = None
    properties: bool = False  # also run the property search (--properties)
    profile: bool = False  # --profile


@dataclass
class JobResult:
    """``result`` of the run; ``info`` as the report names it (:func:`job_info`): ``backend`` and
    ``compare_to`` (the report's objects), ``execution_target`` and ``numerical_settings``;
    ``restarts`` of the isolated worker (None without --isolate); ``property_records``: those of the
    property search, also the last records of ``result.records``."""

    result: RunResult
    info: dict[str, Any]
    restarts: int | None = None
    property_records: list[Record] = field(default_factory=list)


def job_info(job: RunJob, ready: Ready) -> dict[str, Any]:
    """The report's ``backend``, ``compare_to``, ``execution_target`` and ``numerical_settings`` of a job
    whose backend(s) loaded as ``ready`` says (in this process or in a worker)."""
    other = ready.compare_to
    return {"backend": report_backend(job.backend, ready.backend),
            "compare_to": None if other is None else {"requested": job.compare_to, "used": other["name"],
                                                      "device": other["device"]},
            "execution_target": ready.execution_target, "numerical_settings": ready.numerical_settings}


def execute(job: RunJob, timer: PhaseTimer = NO_TIMER, *,
            on_ready: Callable[[Ready], None] | None = None,
            on_case: Callable[[str, list[Record]], None] | None = None,
            on_outcome: Callable[[Path, CaseOutcome], None] | None = None,
            on_property: Callable[[Any], None] | None = None) -> JobResult:
    """Run ``job`` in this process. ``on_ready`` is called once the backend is loaded (before any
    case), ``on_case``/``on_outcome`` as each case finishes (see :func:`conformance.run.loop.run`),
    ``on_property`` as each property of ``--properties`` is searched. A backend that cannot be loaded
    raises ConformanceError; SIGINT and SIGTERM during the cases stop the run, which returns every
    finished case (``result.complete`` False). The property search runs only after a complete run."""
    with contextlib.ExitStack() as stack:
        if job.isolate:
            isolated = stack.enter_context(IsolatedBackend(job.backend, job.device, job.compare_to, job.timeout))
            assert isolated.ready is not None
            ready = isolated.ready
            judge = isolated.case_judge(job.settings, timer, job.max_case_bytes, job.checksums)
            backend = None
        else:
            backend = load_backend(job.backend, job.device)
            other = load_backend(job.compare_to, job.device) if job.compare_to else None
            ready = Ready(describe_backend(backend), None if other is None else describe_backend(other),
                          execution_target(str(backend.device)), numerical_settings())
            timer.synchronize_with(backend.device)
            judge = in_process_judge(backend, job.settings, other, timer=timer, max_case_bytes=job.max_case_bytes,
                                     checksums=job.checksums)
        if on_ready is not None:
            on_ready(ready)
        with stop_on_signals():
            result = run(job.paths, judge, on_case=on_case, on_outcome=on_outcome)
        found: list[Record] = []
        if job.properties and result.complete and backend is not None:  # --properties excludes --isolate
            s = job.settings
            found = property_records(backend, job.backend, s.tolerances, s.rule_set, s.checks, s.reruns,
                                     on_property=on_property)
            result.records.extend(found)
        restarts = isolated.restarts if job.isolate else None
    return JobResult(result, job_info(job, ready), restarts, found)
