"""What ``rlk-conform check`` does, as one library function: :func:`run_check` loads the backend and
the specs, searches every requested property (:mod:`conformance.search.engine`) and builds the
report. The CLI parses options, shows progress and prints; the pytest plugin and nightly lane call
the same search."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.backends.registry import default_backend, describe_backend, load_backend, report_backend
from conformance.environment import execution_target, numerical_settings
from conformance.errors import EXIT_FAILURE, EXIT_OK, UsageError
from conformance.golden.reproducer import DEFAULT_REPRODUCER_DIR
from conformance.judge.records import Record
from conformance.report.json import build_report
from conformance.run.settings import load_rules, tolerances_provenance
from conformance.search.catalog import parse_properties
from conformance.search.engine import (
    DEFAULT_DATABASE_DIR,
    PROFILES,
    PropertyResult,
    SearchProfile,
    SearchSettings,
    check_backend,
)
from conformance.search.strategies import space_from_specs
from conformance.spec.load import DEFAULT_MEMORY_CAP_BYTES, default_spec_paths, load_specs


@dataclass(frozen=True)
class CheckRequest:
    """The options of ``rlk-conform check`` (each documented in ``rlk-conform check --help``)."""

    backend: str | None = None
    profile: str = "ci"
    max_examples: int | None = None
    time_budget: float | None = None
    seed: int | None = None
    properties: str | None = None
    device: str | None = None
    specs: Sequence[Path] | None = None
    memory_cap_bytes: int = DEFAULT_MEMORY_CAP_BYTES
    rules: str = "default"
    tolerances: Path | None = None  # None: the shipped tolerances.yaml
    reruns: int | None = None
    database: Path | None = None
    reproducers: Path = DEFAULT_REPRODUCER_DIR
    filter: str = "*"


@dataclass
class CheckOutcome:
    """A finished search: the backend, the settings, one result per property and the report."""

    request: CheckRequest
    backend: Any
    profile: SearchProfile
    settings: SearchSettings
    names: tuple[str, ...]
    results: list[PropertyResult]
    report: dict[str, Any]

    @property
    def records(self) -> list[Record]:
        return [r for res in self.results for r in res.records]

    def summary_line(self) -> str:
        """``N properties held, N failed (…), N skipped`` and which ran out of time."""
        failing = [res.name for res in self.results if res.counterexample is not None]
        passed = [res.name for res in self.results if res.status == "pass"]
        line = (f"{len(passed)} properties held, {len(failing)} failed ({', '.join(failing) or 'none'}), "
                f"{len(self.names) - len(passed) - len(failing)} skipped")
        starved = [res.name for res in self.results if res.status == "skip" and res.stopped_by == "time-budget"]
        if starved:
            line += f" ({', '.join(starved)}: no example within the time budget)"
        return line

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.report["summary"]["verdict"] == "pass" else EXIT_FAILURE


def search_device(profile: SearchProfile, device: str | None) -> tuple[str | None, str]:
    """The backend's device (None = its default; a profile may prefer CUDA) and where the exact
    reference runs (the backend's CUDA device, else the CPU)."""
    import torch

    if device is None and profile.device == "cuda" and torch.cuda.is_available():
        device = "cuda"
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return device, device if on_cuda else "cpu"


def run_check(request: CheckRequest, on_start: Callable[[int, str], None] | None = None,
              on_property: Callable[[PropertyResult], None] | None = None) -> CheckOutcome:
    """Search ``request``'s properties on its backend. ``on_start(properties, backend name)`` is called
    once the backend is loaded, ``on_property`` as each property ends. Raises ConformanceError for bad
    input (an unknown property, rule set or backend, a broken spec)."""
    try:
        names = parse_properties(request.properties)
    except ValueError as exc:
        raise UsageError(f"--properties: {exc}") from None
    tol = load_rules(request.tolerances, request.rules)
    specs = load_specs(request.specs or default_spec_paths(), request.memory_cap_bytes)
    chosen = PROFILES[request.profile]
    try:
        space = space_from_specs(specs, chosen.tier, chosen.limits, request.filter)
    except ValueError as exc:
        raise UsageError(f"--filter {request.filter}: {exc}" if request.filter != "*" else str(exc)) from None
    device, reference_device = search_device(chosen, request.device)
    requested = request.backend or default_backend()
    impl = load_backend(requested, device)
    settings = SearchSettings(profile=chosen, max_examples=request.max_examples, seed=request.seed,
                              database_dir=request.database or DEFAULT_DATABASE_DIR,
                              reproducer_dir=request.reproducers, time_budget=request.time_budget,
                              case_filter=request.filter)
    if on_start is not None:
        on_start(len(names), impl.name)
    results = check_backend(impl, specs, tol, names, settings, request.rules, request.reruns, reference_device,
                            requested, on_property=on_property, space=space)
    meta = {
        "backend": report_backend(requested, describe_backend(impl)),
        "compare_to": None,
        "execution_target": execution_target(str(impl.device)),
        "goldens": None,
        "search": {"profile": chosen.name, "tier": chosen.tier, "filter": request.filter, "properties": list(names),
                   "max_examples": settings.examples, "time_budget_s": request.time_budget,
                   "seed": settings.effective_seed,
                   "database": None if settings.effective_seed is not None else str(settings.database_dir),
                   "reproducers": str(request.reproducers), "reference_device": reference_device,
                   "specs": {op: p.spec_file for op, p in space.provenance.items()}, "space": space.describe(),
                   "results": [res.summary() for res in results]},
        "settings": {**numerical_settings(), "checks": list(names), "rule_set": request.rules,
                     "reruns": request.reruns, **tolerances_provenance(request.tolerances)},
    }
    report = build_report([r for res in results for r in res.records], meta)
    return CheckOutcome(request, impl, chosen, settings, names, results, report)
