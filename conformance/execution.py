"""One device's share of ``rlk-conform run``: load the backend, stream the golden cases through it
(:func:`conformance.runner.run`) and, with ``--properties``, run the property search.

``rlk-conform run`` calls :func:`execute` once in its own process; with ``--devices`` every worker
process calls it on its device with its share of the cases (:mod:`conformance.devices`), so both
judge exactly the same way. A :class:`RunJob` is plain, picklable data for that reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .golden import DEFAULT_MAX_CASE_BYTES
from .judge import Record
from .profiling import NO_TIMER, PhaseTimer
from .runner import CaseOutcome, RunResult, RunSettings, run, stop_on_signals


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
    """``result`` of the run; ``info`` as the report names it: ``backend`` and ``compare_to`` (the
    report's objects), ``execution_target`` and ``numerical_settings``; ``restarts`` of the
    isolated worker (None without --isolate); ``property_records``: those of the property search,
    also the last records of ``result.records``."""

    result: RunResult
    info: dict[str, Any]
    restarts: int | None = None
    property_records: list[Record] = field(default_factory=list)


def backend_report_info(impl: Any, requested: str) -> dict[str, Any]:
    """The report's ``backend`` object for the loaded backend (or IsolatedBackend) ``impl``."""
    return {"requested": requested, "used": impl.name, "device": str(impl.device),
            "output_dtype": str(getattr(impl, "output_dtype", None) or "input dtype"),
            "returns_lse": bool(getattr(impl, "returns_lse", False)),
            "description": getattr(impl, "description", "")}


def execute(job: RunJob, timer: PhaseTimer = NO_TIMER, *,
            on_ready: Callable[[dict[str, Any]], None] | None = None,
            on_case: Callable[[str, list[Record]], None] | None = None,
            on_outcome: Callable[[Path, CaseOutcome], None] | None = None) -> JobResult:
    """Run ``job`` in this process. ``on_ready(info)`` is called once the backend is loaded (before
    any case), ``on_case``/``on_outcome`` as each case finishes (see :func:`conformance.runner.run`).
    A backend that cannot be loaded raises ConformanceError; SIGINT and SIGTERM during the cases stop
    the run, which returns every finished case (``result.complete`` False). The property search runs
    only after a complete run."""
    from .backends import load_backend
    from .environment import execution_target, numerical_settings
    from .isolation import IsolatedBackend

    with contextlib.ExitStack() as stack:
        if job.isolate:
            impl: Any = stack.enter_context(IsolatedBackend(job.backend, job.device, job.compare_to, job.timeout))
            other: Any = None
            other_meta = impl.compare_to_info
            target, numerics = impl.execution_target, impl.numerical_settings
        else:
            impl = load_backend(job.backend, job.device)
            other = load_backend(job.compare_to, job.device) if job.compare_to else None
            other_meta = None if other is None else {"name": other.name, "device": str(other.device)}
            target, numerics = execution_target(str(impl.device)), numerical_settings()
            timer.synchronize_with(impl.device)
        info = {"backend": backend_report_info(impl, job.backend),
                "compare_to": None if other_meta is None else {"requested": job.compare_to,
                                                               "used": other_meta["name"],
                                                               "device": other_meta["device"]},
                "execution_target": target, "numerical_settings": numerics}
        if on_ready is not None:
            on_ready(info)
        with stop_on_signals():
            result = run(impl, job.paths, job.settings, compare_to=other, on_case=on_case, on_outcome=on_outcome,
                         max_case_bytes=job.max_case_bytes, checksums=job.checksums, timer=timer)
        found: list[Record] = []
        if job.properties and result.complete:
            from .cli_check import property_records

            s = job.settings
            found = property_records(impl, job.backend, s.tolerances, s.rule_set, s.checks, s.reruns)
            result.records.extend(found)
        restarts = impl.restarts if job.isolate else None
    return JobResult(result, info, restarts, found)
