"""The property search: Hypothesis runs one :class:`~conformance.search.properties.Property`
at a time on a backend, within a number of examples and an optional wall-clock budget, and
shrinks a failure to its smallest case, written as a reproducer. Nothing here prints: results and
records are returned, and callers show them.
"""

from __future__ import annotations

import json
import time
import unittest
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
from hypothesis import HealthCheck, Phase, Verbosity, reject
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Flaky, Unsatisfiable

from conformance.environment import execution_target
from conformance.golden.reproducer import DEFAULT_REPRODUCER_DIR, ReproducerInfo, reproducer_path, write_reproducer
from conformance.judge.records import Record
from conformance.run.invoker import BackendCallError, ContractViolation, Invoker, NoBackward
from conformance.search.catalog import PROPERTIES, PROPERTY_NAMES
from conformance.search.properties import (
    Counterexample,
    Example,
    Property,
    PropertyContext,
    PropertySkipped,
    call_backend,
    evaluate,
    own_call,
)
from conformance.search.strategies import PROPERTY_FAMILY, Limits, SpecSpace, describe_shape, space_from_specs
from conformance.spec.load import OpSpec, default_spec_paths, load_specs
from conformance.spec.tolerances import Tolerances

DEFAULT_DATABASE_DIR = Path(".rlk-conform") / "hypothesis"


@dataclass(frozen=True)
class SearchProfile:
    """How big and how many: the tier whose specs span the space, the caps on it, the number of
    examples per property, and whether the search is derandomized (seed 0 unless one is given,
    no example database) or random with its failures kept in the database."""

    name: str
    tier: str
    limits: Limits
    max_examples: int
    derandomized: bool
    device: str | None  # preferred device for the backend; None = the backend's default
    description: str


PROFILES: dict[str, SearchProfile] = {
    "ci": SearchProfile("ci", "standard", Limits(max_batch=4, max_heads=14, max_sq=64, max_skv=200,
                                           max_out_elements=1 << 14, max_score_elements=1 << 18),
                  max_examples=50, derandomized=True, device=None,
                  description="fast and derandomized on the CPU: B <= 4, Hq <= 14, Skv <= 200"),
    # Score elements bound the exact reference's cost per example (its refinement runs on the CPU):
    # 2**24 keeps an example near a second, so the properties × 1000 examples fit a night.
    "nightly": SearchProfile("nightly", "full", Limits(max_batch=8, max_heads=32, max_sq=1024, max_skv=8192,
                                                 max_out_elements=1 << 20, max_score_elements=1 << 24),
                       max_examples=1000, derandomized=False, device="cuda",
                       description="thousands of random examples on the GPU, up to 8k keys; failures kept "
                                   "in the example database and tried first next time"),
}


class BudgetSpent(unittest.SkipTest):
    """Raised inside the Hypothesis test when the search's time budget is spent. Hypothesis re-raises
    skip exceptions (``unittest.SkipTest`` and pytest's) at once as control exceptions: the run stops
    with no failure, no shrinking and nothing written to the example database. It is raised only
    after the example's draws, so that the run never looks to Hypothesis as if the strategy had
    stopped drawing early (which it reports as flaky data generation)."""


class NoBackwardStop(unittest.SkipTest):
    """Raised inside the Hypothesis test when a gradient property meets a backend without a backward
    (:class:`~conformance.run.invoker.NoBackward`): no other example can do better, so the search
    ends at once with a ``skip`` record (a control exception, like :class:`BudgetSpent`)."""


# What ended a property's search (``stopped_by`` in its records).
STOP_MAX_EXAMPLES = "max-examples"  # the examples asked for were judged
STOP_TIME_BUDGET = "time-budget"  # the wall-clock budget was spent first
STOP_COUNTEREXAMPLE = "counterexample"  # a failure was found (then shrunk)
STOP_EXHAUSTED = "exhausted"  # Hypothesis ended earlier: too many declined examples, or none new left
STOP_NO_BACKWARD = "no-backward"  # a gradient property on a backend without a backward
# What ended the shrinking of a counterexample (``shrink_stopped_by``).
SHRINK_DONE = "hypothesis"  # Hypothesis's shrinker ended by itself (nothing smaller fails, or its own limits)
SHRINK_BUDGET = "time-budget"  # twice the budget had passed: the smallest failing example found so far


@dataclass(frozen=True)
class SearchSettings:
    """How to search: the profile, the examples per property, the seed, where the example
    database and the reproducers go, and an optional wall-clock budget per property."""

    profile: SearchProfile = PROFILES["ci"]
    max_examples: int | None = None  # None = the profile's
    seed: int | None = None  # None = 0 for a derandomized profile, else random (with the database)
    database_dir: Path | None = None  # used only by unseeded searches
    reproducer_dir: Path | None = None  # where reproducers go (the CLI: reproducers/); None = none written
    # Seconds per property: no new example starts after it (one in flight finishes); shrinking a
    # counterexample found in time goes on until twice the budget. None = no limit but max_examples.
    time_budget: float | None = None
    case_filter: str = "*"  # glob over the tier's case ids: the space is what the matching cases describe

    @property
    def effective_seed(self) -> int | None:
        if self.seed is not None:
            return self.seed
        return 0 if self.profile.derandomized else None

    @property
    def examples(self) -> int:
        return self.max_examples or self.profile.max_examples


@dataclass
class PropertyResult:
    """The records of one property's search, and its shrunk counterexample when it failed.

    ``examples`` counts every example the backend was given (declined and shrinking ones included);
    ``examples_run`` the examples the search judged (pass or fail) before any shrinking;
    ``stopped_by`` what ended the search (``STOP_*``; None when the property does not apply)."""

    name: str
    records: list[Record]
    examples: int
    counterexample: Counterexample | None = None
    reproducer: Path | None = None
    flaky: bool = False
    examples_run: int = 0
    examples_declined: int = 0
    stopped_by: str | None = None
    elapsed_s: float = 0.0
    shrink_examples: int = 0
    shrink_stopped_by: str | None = None  # SHRINK_*, for a counterexample

    @property
    def status(self) -> str:
        """``fail``/``error`` for a counterexample, ``pass`` when an example held, else ``skip``."""
        if self.counterexample is not None:
            return self.records[0].status if self.records else "fail"
        return "pass" if any(r.status == "pass" for r in self.records) else "skip"

    def summary(self) -> dict[str, Any]:
        """The search's own figures (the JSON report's ``search.results``)."""
        return {"property": self.name, "status": self.status, "examples_run": self.examples_run,
                "examples_declined": self.examples_declined, "stopped_by": self.stopped_by,
                "elapsed_s": round(self.elapsed_s, 3), "shrink_examples": self.shrink_examples,
                "shrink_stopped_by": self.shrink_stopped_by,
                "reproducer": None if self.reproducer is None else str(self.reproducer)}


@dataclass
class _Tally:
    examples: int = 0  # examples the backend was given, declined and shrinking ones included
    run: int = 0  # examples judged before the first failure (that one included)
    shrink_runs: int = 0  # examples judged while shrinking
    passed: Counter[tuple[str, str]] = field(default_factory=Counter)
    margins: dict[tuple[str, str], float] = field(default_factory=dict)  # worst accuracy margin per cell
    skipped: Counter[str] = field(default_factory=Counter)
    last_failure: Counterexample | None = None
    failing: set[tuple[Any, ...]] = field(default_factory=set)  # every failing example seen (_key)
    shrink_cut: bool = False  # the shrink deadline rejected a candidate


def _key(example: Example) -> tuple[Any, ...]:
    return (example.prop, example.case, json.dumps(example.params, sort_keys=True, default=str))


def _seconds(x: float) -> str:
    return f"{x:g} s"


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "backend"


def hypothesis_settings(settings: SearchSettings, prop: str, backend_name: str) -> hypothesis.settings:
    """Hypothesis settings of one search. Unseeded searches keep their failing examples in
    ``<database_dir>/<backend>/<property>`` and try them first next time."""
    database = None
    if settings.effective_seed is None and settings.database_dir is not None:
        database = DirectoryBasedExampleDatabase(str(settings.database_dir / _safe_name(backend_name) / prop))
    # No 'explain' phase: it re-runs the shrunk example many times only to annotate a report.
    phases = [p for p in Phase if p is not Phase.explain]
    return hypothesis.settings(max_examples=settings.examples, deadline=None, database=database, phases=phases,
                               derandomize=False, suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
                               report_multiple_bugs=False, print_blob=False)


def search_property(prop: Property, ctx: PropertyContext, space: SpecSpace, settings: SearchSettings) -> PropertyResult:
    """Search ``prop`` on ``ctx``'s backend; a failure is shrunk, recorded and written as a reproducer."""
    missing = [op for op in prop.requires if not ctx.invoker.has(op)]
    if prop.requires_any and not any(ctx.invoker.has(op) for op in prop.requires_any):
        missing.append(f"one of {' or '.join(prop.requires_any)}")
    if missing:
        msg = f"needs {', '.join(missing)}, which backend {ctx.backend.name} lacks"
        return PropertyResult(prop.name, [_summary_record(prop, "", "", "skip", {}, msg)], 0)
    tally = _Tally()
    budget = settings.time_budget
    start = time.monotonic()
    deadline = None if budget is None else start + budget
    shrink_deadline = None if budget is None else start + 2 * budget

    def body(data: st.DataObject) -> None:
        example = prop.draw(data, space, ctx)  # cheap: choices only, no tensors
        searching = tally.last_failure is None
        if deadline is not None:
            now = time.monotonic()
            if searching and now >= deadline:
                raise BudgetSpent(f"time budget of {_seconds(budget)} spent")
            if not searching and now >= shrink_deadline and _key(example) not in tally.failing:
                tally.shrink_cut = True  # only failures already seen may run (Hypothesis replays its smallest)
                reject()
        subject = prop.subject(example, ctx)
        tally.examples += 1
        try:
            outcome = evaluate(prop, ctx, example, subject)
        except PropertySkipped as exc:
            if prop.backward and isinstance(exc.__cause__, NoBackward):
                raise NoBackwardStop(str(exc)) from exc
            tally.skipped[str(exc)] += 1
            reject()
        if searching:
            tally.run += 1
        else:
            tally.shrink_runs += 1
        if outcome.failed:
            tally.last_failure = Counterexample(example, subject, outcome)
            tally.failing.add(_key(example))
            raise tally.last_failure
        cell = (example.case.op, example.case.dtype)
        tally.passed[cell] += 1
        margin = outcome.verdict.metrics.get("margin")
        if margin is not None:
            tally.margins[cell] = min(tally.margins.get(cell, float("inf")), float(margin))

    test = hypothesis_settings(settings, prop.name, ctx.backend.name)(hypothesis.given(data=st.data())(body))
    seed = settings.effective_seed
    if seed is not None:
        test = hypothesis.seed(seed)(test)
    found: Counterexample | None = None
    flaky = False
    spent = False
    no_backward: str | None = None
    try:
        test()
    except NoBackwardStop as exc:
        no_backward = str(exc)
    except BudgetSpent:
        spent = True
    except Counterexample as exc:
        found = exc
    except Flaky:
        found, flaky = tally.last_failure, True
    except Unsatisfiable:
        pass
    if found is not None:
        stopped_by = STOP_COUNTEREXAMPLE
    elif no_backward is not None:
        stopped_by = STOP_NO_BACKWARD
    elif spent:
        stopped_by = STOP_TIME_BUDGET
    else:
        stopped_by = STOP_MAX_EXAMPLES if tally.run >= settings.examples else STOP_EXHAUSTED
    result = PropertyResult(prop.name, [], tally.examples, found, flaky=flaky, examples_run=tally.run,
                            examples_declined=sum(tally.skipped.values()), stopped_by=stopped_by,
                            elapsed_s=time.monotonic() - start, shrink_examples=tally.shrink_runs,
                            shrink_stopped_by=None if found is None else
                            (SHRINK_BUDGET if tally.shrink_cut else SHRINK_DONE))
    meta = {"examples": tally.examples, "examples_run": result.examples_run,
            "examples_declined": result.examples_declined, "stopped_by": stopped_by, "time_budget_s": budget,
            "profile": settings.profile.name, "seed": seed}
    if found is not None:
        result.reproducer = _write(prop, found, ctx, settings, space) if settings.reproducer_dir is not None else None
        result.records = [_failure_record(found, result, settings, meta)]
    elif no_backward is not None:
        result.records = [_summary_record(prop, "", "", "skip", meta, no_backward)]
    elif tally.passed:
        cut = (f" (search stopped by its {_seconds(budget)} time budget after {tally.run} examples)"
               if spent and budget is not None else "")
        result.records = [_summary_record(prop, op, dtype, "pass", {**meta, "examples_of_cell": n,
                                          **({"margin": tally.margins[(op, dtype)]} if (op, dtype) in tally.margins
                                             else {})}, f"{n} examples{cut}: {prop.summary}")
                          for (op, dtype), n in sorted(tally.passed.items())]
    else:  # nothing was judged: never a pass
        reasons = "; ".join(f"{n}× {r}" for r, n in tally.skipped.most_common(3))
        if spent and budget is not None:
            msg = f"time budget of {_seconds(budget)} spent before any example ran" + (
                f" ({result.examples_declined} declined: {reasons})" if reasons else "")
        else:
            msg = f"every example skipped: {reasons or 'no example could be drawn'}"
        result.records = [_summary_record(prop, "", "", "skip", meta, msg)]
    return result


def _summary_record(prop: Property, op: str, dtype: str, status: Any, metrics: dict[str, Any], msg: str) -> Record:
    case_id = f"{op or '*'}/{PROPERTY_FAMILY}/{prop.name}"
    return Record(case_id, op or "*", prop.name, status, dtype, f"{PROPERTY_FAMILY}/{prop.name}", metrics, msg)


def _failure_record(found: Counterexample, result: PropertyResult, settings: SearchSettings,
                    meta: dict[str, Any]) -> Record:
    case, verdict = found.example.case, found.outcome.verdict
    metrics = {**verdict.metrics, "parameters": found.example.params, "shape": describe_shape(case), **meta,
               "shrink_examples": result.shrink_examples, "shrink_stopped_by": result.shrink_stopped_by}
    if result.reproducer is not None:
        metrics["reproducer"] = str(result.reproducer)
    flaky = "flaky (failed, then passed when replayed): " if result.flaky else ""
    smallest = ("smallest failing case found before the time budget stopped shrinking"
                if result.shrink_stopped_by == SHRINK_BUDGET else "smallest failing case")
    message = f"{flaky}{verdict.message} — {smallest}: {describe_shape(case)}; {found.example.params}"
    check = found.outcome.check or result.name  # a broken op contract is reported as "contract"
    if check != result.name:
        metrics["property"] = result.name
    return Record(case.id, case.op, check, verdict.status, case.dtype, case.family, metrics, message)


def _write(prop: Property, found: Counterexample, ctx: PropertyContext, settings: SearchSettings,
           space: SpecSpace) -> Path:
    """Write the counterexample's reproducer and return its path: the property's own writer (a layout
    reproducer), else a dense one (golden format + /reproducer)."""
    case, outcome = found.example.case, found.outcome
    device = str(ctx.backend.device)
    info = ReproducerInfo(property=found.example.prop, parameters=found.example.params,
                          hypothesis_seed=settings.effective_seed, profile=settings.profile.name,
                          backend=ctx.backend.name, backend_spec=ctx.backend_spec or ctx.backend.name,
                          backend_device=device, execution_target=execution_target(device),
                          status=outcome.verdict.status, message=outcome.verdict.message,
                          variant=outcome.variant_label)
    assert settings.reproducer_dir is not None
    if prop.write_reproducer is not None:
        return prop.write_reproducer(found, ctx, info, settings.reproducer_dir, space)
    baseline = outcome.baseline
    if baseline is None:
        try:
            baseline = call_backend(ctx, own_call(found.subject))
        except (BackendCallError, ContractViolation, PropertySkipped):
            baseline = None  # the backend cannot produce it; the message says why
    path = reproducer_path(settings.reproducer_dir, ctx.backend.name, case.id)
    golden = found.subject.reference(ctx.reference_device)
    gradient = found.subject.gradient_reference(ctx.reference_device) if case.grad else None
    return write_reproducer(path, case, found.subject.inputs, golden, space.provenance[case.op], info, baseline,
                            outcome.variant, gradient)


def check_backend(backend: Any, specs: Sequence[OpSpec], tolerances: Tolerances, names: Sequence[str] = PROPERTY_NAMES,
                  settings: SearchSettings = SearchSettings(), rule_set: str = "default", reruns: int | None = None,
                  reference_device: str = "cpu", backend_spec: str | None = None,
                  on_property: Callable[[PropertyResult], None] | None = None,
                  space: SpecSpace | None = None) -> list[PropertyResult]:
    """Search every property in ``names`` on ``backend`` over the space of ``specs`` at the
    profile's tier (``space``, when the caller has built it already). Returns one result per property,
    in order; ``on_property`` sees each as it ends. ``backend_spec`` is how the backend was named
    (recorded in reproducers for ``replay``)."""
    if space is None:
        space = space_from_specs(specs, settings.profile.tier, settings.profile.limits, settings.case_filter)
    ctx = PropertyContext(Invoker(backend), tolerances, rule_set, reruns, reference_device, backend_spec)
    results = []
    for name in names:
        result = search_property(PROPERTIES[name], ctx, space, settings)
        results.append(result)
        if on_property:
            on_property(result)
    return results


def property_records(backend: Any, backend_spec: str, tolerances: Tolerances, rule_set: str, checks: Sequence[str],
                     reruns: int | None, on_property: Callable[[PropertyResult], None] | None = None,
                     reproducer_dir: Path = DEFAULT_REPRODUCER_DIR) -> list[Record]:
    """``rlk-conform run --properties``: the properties among ``checks``, ci profile, over the default
    specs, reproducers in ``reproducer_dir``; the records join the run's (a failure's record names its
    reproducer in ``metrics["reproducer"]``). Prints nothing."""
    names = tuple(n for n in PROPERTY_NAMES if n in checks)
    if not names:
        return []
    settings = SearchSettings(profile=PROFILES["ci"], reproducer_dir=reproducer_dir)
    specs = load_specs(default_spec_paths())
    results = check_backend(backend, specs, tolerances, names, settings, rule_set, reruns, "cpu", backend_spec,
                            on_property=on_property)
    return [r for res in results for r in res.records]
