"""Known-failure lists: expected failures and skips of one backend, each with its reason.

A list is a YAML file (see docs/known-failures.md)::

    schema_version: 1
    backend: sdpa                  # the --backend name the list belongs to
    entries:
      - cases: "attention/scale/*-scalem0p25"    # glob over case ids
        checks: [accuracy, contract]             # optional: default every check
        expect: fail                             # fail (a fail or error record) | skip
        reason: "SDPA returns NaN for a negative scale"

An entry whose pattern matches no case of the golden set is an error (a stale list must not hide
anything); an expected failure that passes is reported as an unexpected pass.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conformance.errors import SpecError
from conformance.judge.records import Record
from conformance.spec.checks import CHECKS
from conformance.spec.load import pydantic_error
from conformance.spec.yamlsource import load_yaml

Strict = ConfigDict(extra="forbid", strict=True)


class KnownFailure(BaseModel):
    model_config = Strict
    cases: str = Field(min_length=1)
    checks: list[str] | None = None
    expect: Literal["fail", "skip"] = "fail"
    reason: str = Field(min_length=1)


class KnownFailureFile(BaseModel):
    model_config = Strict
    schema_version: Literal[1]
    backend: str
    entries: list[KnownFailure]


@dataclass(frozen=True)
class KnownFailures:
    path: Path
    backend: str
    entries: tuple[KnownFailure, ...]
    lines: tuple[int | None, ...]


@dataclass
class KnownFailureOutcome:
    expected: int = 0  # records that failed (or skipped) as the list says
    unexpected_passes: list[Record] | None = None


def load_known_failures(path: str | Path, backend: str) -> KnownFailures:
    """Validate a list; it must belong to ``backend``. Raises SpecError naming file, line and field."""
    doc = load_yaml(path)
    try:
        model = KnownFailureFile.model_validate(doc.data)
    except ValidationError as err:
        raise pydantic_error(doc, err) from None
    if model.backend != backend:
        raise SpecError(doc.path, doc.line_of(("backend",)), "backend",
                        f"this list is for backend {model.backend!r}, the run uses {backend!r}")
    for i, entry in enumerate(model.entries):
        bad = [c for c in entry.checks or () if c not in CHECKS]
        if bad:
            raise SpecError(doc.path, doc.line_of(("entries", i, "checks")), f"entries[{i}].checks",
                            f"unknown check(s) {', '.join(bad)}; choose from {', '.join(CHECKS)}")
    lines = tuple(doc.line_of(("entries", i)) for i in range(len(model.entries)))
    return KnownFailures(doc.path, model.backend, tuple(model.entries), lines)


def check_patterns(kf: KnownFailures, case_ids: Iterable[str]) -> None:
    """Every entry must match at least one case of the golden set."""
    ids = list(case_ids)
    for i, (entry, line) in enumerate(zip(kf.entries, kf.lines)):
        if not any(fnmatch.fnmatchcase(cid, entry.cases) for cid in ids):
            raise SpecError(kf.path, line, f"entries[{i}].cases",
                            f"pattern {entry.cases!r} matches no case of the golden set (stale entry?)")


def _entry_for(kf: KnownFailures, record: Record) -> KnownFailure | None:
    for entry in kf.entries:
        if fnmatch.fnmatchcase(record.case_id, entry.cases) and (entry.checks is None or record.check in entry.checks):
            return entry
    return None


def apply(kf: KnownFailures, records: Sequence[Record]) -> KnownFailureOutcome:
    """Mark each record the list expects (``record.expected`` = the reason) and collect the
    expected failures that passed."""
    outcome = KnownFailureOutcome(unexpected_passes=[])
    for record in records:
        entry = _entry_for(kf, record)
        if entry is None:
            continue
        wanted = ("fail", "error") if entry.expect == "fail" else ("skip",)
        if record.status in wanted:
            record.expected = entry.reason
            outcome.expected += 1
        elif entry.expect == "fail" and record.status == "pass":
            outcome.unexpected_passes.append(record)  # type: ignore[union-attr]
    return outcome
