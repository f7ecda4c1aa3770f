"""What a run judges and with which rules: the checks, the rule set of tolerances.yaml and the
determinism reruns; :func:`load_rules` is the one place a ``--rules`` choice is checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.errors import UsageError
from conformance.files import sha256_file
from conformance.locations import default_tolerances
from conformance.spec.checks import DEFAULT_CHECKS
from conformance.spec.tolerances import Tolerances, load_tolerances


@dataclass(frozen=True)
class RunSettings:
    tolerances: Tolerances
    checks: tuple[str, ...] = DEFAULT_CHECKS
    rule_set: str = "default"
    reruns: int | None = None  # determinism reruns; default from tolerances.yaml


def load_rules(path: str | Path | None, rule_set: str, option: str = "--rules") -> Tolerances:
    """The tolerances of ``path`` (None: the shipped tolerances.yaml), which must define the accuracy
    rule set ``rule_set``. Raises SpecError for a bad file and UsageError (naming ``option``) for a
    rule set it lacks."""
    path = path if path is not None else default_tolerances()
    tol = load_tolerances(path)
    if rule_set not in tol.accuracy:
        raise UsageError(f"{option} {rule_set!r}: {path} defines {', '.join(sorted(tol.accuracy))}")
    return tol


def tolerances_provenance(path: Path | None) -> dict[str, Any]:
    """The report's ``tolerances_file``, ``tolerances_sha256`` and ``tolerances_default`` (True when
    the shipped tolerances.yaml judged the run) for a ``--tolerances`` value (None: the default)."""
    resolved = path if path is not None else default_tolerances()
    return {"tolerances_file": str(resolved), "tolerances_sha256": sha256_file(resolved),
            "tolerances_default": path is None}
