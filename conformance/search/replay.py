"""Replaying a reproducer: its property, re-run on a backend with the file's own inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.errors import GoldenError
from conformance.golden.reproducer import Reproducer, read_reproducer
from conformance.judge.records import Record
from conformance.judge.verdicts import Verdict
from conformance.run.invoker import Invoker
from conformance.search.catalog import PROPERTIES, PROPERTY_NAMES
from conformance.search.properties import (
    Example,
    PropertyContext,
    PropertyOutcome,
    PropertySkipped,
    Subject,
    evaluate,
)
from conformance.search.strategies import describe_shape
from conformance.spec.tolerances import Tolerances


@dataclass(frozen=True)
class ReplayResult:
    """A reproducer re-run on a backend: the file, read back, and the property's record now."""

    reproducer: Reproducer
    record: Record

    @property
    def still_fails(self) -> bool:
        return self.record.status in ("fail", "error")


def replay(path: str | Path, backend: Any, tolerances: Tolerances, rule_set: str = "default",
           reruns: int | None = None, reference_device: str = "cpu") -> ReplayResult:
    """Re-run the property of reproducer ``path`` on ``backend`` with the file's own inputs and
    exact reference. Raises :class:`~conformance.errors.GoldenError` for an unreadable file or an
    unknown property."""
    rep = read_reproducer(path)
    prop = PROPERTIES.get(rep.info.property)
    if prop is None:
        raise GoldenError(Path(path), f"unknown property {rep.info.property!r} (this rlk-conform knows "
                          f"{', '.join(PROPERTY_NAMES)})", "reproducer")
    case = rep.case
    ctx = PropertyContext(Invoker(backend), tolerances, rule_set, reruns, reference_device)
    example = Example(prop.name, case, rep.info.parameters)
    subject = Subject(case, rep.golden.inputs, rep.golden.golden, rep.golden.gradient)
    missing = [op for op in prop.requires if op not in ctx.ops]
    try:
        if missing:
            raise PropertySkipped(f"needs {', '.join(missing)}, which backend {ctx.backend.name} lacks")
        outcome = evaluate(prop, ctx, example, subject)
    except PropertySkipped as exc:
        outcome = PropertyOutcome(Verdict("skip", {}, str(exc)))
    metrics = {**outcome.verdict.metrics, "parameters": example.params, "shape": describe_shape(case),
               "reproducer": str(path)}
    record = Record(case.id, case.op, prop.name, outcome.verdict.status, case.dtype, case.family, metrics,
                    outcome.verdict.message)
    return ReplayResult(rep, record)
