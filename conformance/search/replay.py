"""Replaying a reproducer: its property, re-run on a backend with the file's own inputs (a dense
reproducer's golden, or the member goldens of a layout reproducer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.errors import GoldenError
from conformance.golden.layout_reproducer import LayoutReproducer, read_any_reproducer
from conformance.golden.reproducer import Reproducer
from conformance.judge.records import Record
from conformance.judge.verdicts import Verdict
from conformance.run.invoker import Invoker
from conformance.search.catalog import PROPERTIES, PROPERTY_NAMES
from conformance.search.layout_properties import LAYOUT_PROPERTIES, page_order
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

LAYOUT_NAMES = tuple(p.name for p in LAYOUT_PROPERTIES)


@dataclass(frozen=True)
class ReplayResult:
    """A reproducer re-run on a backend: the file, read back, and the property's record now."""

    reproducer: Reproducer | LayoutReproducer
    record: Record

    @property
    def still_fails(self) -> bool:
        return self.record.status in ("fail", "error")


def replay(path: str | Path, backend: Any, tolerances: Tolerances, rule_set: str = "default",
           reruns: int | None = None, reference_device: str = "cpu") -> ReplayResult:
    """Re-run the property of reproducer ``path`` on ``backend`` with the file's own inputs and
    exact reference: a dense reproducer (``.h5``) or a layout one (``.json``: the same composition,
    pack order, page sizes and block table). Raises :class:`~conformance.errors.GoldenError` for an
    unreadable file or an unknown property."""
    rep = read_any_reproducer(path)
    prop = PROPERTIES.get(rep.info.property)
    if prop is None:
        raise GoldenError(Path(path), f"unknown property {rep.info.property!r} (this rlk-conform knows "
                          f"{', '.join(PROPERTY_NAMES)})", "reproducer")
    is_layout = isinstance(rep, LayoutReproducer)
    if is_layout != (prop.name in LAYOUT_NAMES):
        raise GoldenError(Path(path), f"property {prop.name!r} does not judge a "
                          f"{'layout' if is_layout else 'dense'} case (layout properties: {', '.join(LAYOUT_NAMES)})",
                          "reproducer")
    case = rep.case
    ctx = PropertyContext(Invoker(backend), tolerances, rule_set, reruns, reference_device)
    example = Example(prop.name, case, rep.info.parameters)  # type: ignore[arg-type]  # a LayoutCase reads like a Case
    subject: Any
    needs = prop.requires
    if isinstance(rep, LayoutReproducer):
        subject, needs = rep.layout, tuple(dict.fromkeys((*prop.requires, case.op)))
        try:
            page_order(example, subject)
        except ValueError as exc:
            raise GoldenError(Path(path), f"field 'reproducer.parameters': {exc}") from None
    else:
        subject = Subject(case, rep.golden.inputs, rep.golden.golden, rep.golden.gradient)
    missing = [op for op in needs if not ctx.invoker.has(op)]
    try:
        if missing:
            raise PropertySkipped(f"needs {', '.join(missing)}, which backend {ctx.backend.name} lacks")
        outcome = evaluate(prop, ctx, example, subject)
    except PropertySkipped as exc:
        outcome = PropertyOutcome(Verdict("skip", {}, str(exc)))
    metrics = {**outcome.verdict.metrics, "parameters": example.params, "shape": describe_shape(example.case),
               "reproducer": str(path)}
    record = Record(case.id, case.op, prop.name, outcome.verdict.status, case.dtype, case.family, metrics,
                    outcome.verdict.message)
    return ReplayResult(rep, record)
