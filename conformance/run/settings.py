"""What a run judges and with which rules: the checks, the rule set of tolerances.yaml and the
determinism reruns; :func:`load_rules` is the one place a ``--rules`` choice is checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conformance.errors import UsageError
from conformance.spec.checks import DEFAULT_CHECKS
from conformance.spec.tolerances import Tolerances, load_tolerances


@dataclass(frozen=True)
class RunSettings:
    tolerances: Tolerances
    checks: tuple[str, ...] = DEFAULT_CHECKS
    rule_set: str = "default"
    reruns: int | None = None  # determinism reruns; default from tolerances.yaml


def load_rules(path: str | Path, rule_set: str, option: str = "--rules") -> Tolerances:
    """The tolerances of ``path``, which must define the accuracy rule set ``rule_set``. Raises
    SpecError for a bad file and UsageError (naming ``option``) for a rule set it lacks."""
    tol = load_tolerances(path)
    if rule_set not in tol.accuracy:
        raise UsageError(f"{option} {rule_set!r}: {path} defines {', '.join(sorted(tol.accuracy))}")
    return tol
