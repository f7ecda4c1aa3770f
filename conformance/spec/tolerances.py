"""``specs/tolerances.yaml``: the schema of every threshold, and lookup that fails closed."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conformance.errors import SpecError
from conformance.spec.case import DTYPES, OPS
from conformance.spec.checks import GRADIENT_INVARIANCE_CHECKS, INVARIANCE_CHECKS
from conformance.spec.load import pydantic_error
from conformance.spec.yamlsource import load_yaml

Strict = ConfigDict(extra="forbid", strict=True)
DtypeName = Literal[DTYPES]
OpName = Literal[OPS]
InvarianceCheck = Literal[(*INVARIANCE_CHECKS, *GRADIENT_INVARIANCE_CHECKS)]


class AccuracyRule(BaseModel):
    model_config = Strict
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)
    naive_factor: float = Field(ge=0)
    max_naive_ratio: float | None = Field(default=None, gt=0)
    mean_naive_ratio: float | None = Field(default=None, gt=0)


class ElementRule(BaseModel):
    model_config = Strict
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)


class InvarianceRule(ElementRule):
    reruns: int | None = Field(default=None, ge=2, le=1000)


class ParitySettings(BaseModel):
    model_config = Strict
    rules: str


class Tolerances(BaseModel):
    model_config = Strict
    schema_version: Literal[1]
    accuracy: dict[str, dict[OpName, dict[DtypeName, AccuracyRule]]]
    lse: dict[DtypeName, ElementRule]
    peak_relative: dict[DtypeName, float]
    invariance: dict[InvarianceCheck, InvarianceRule]
    parity: ParitySettings
    # The gradients' accuracy table, rule set → op → dtype (a file without it judges no gradient: every
    # gradient_accuracy record fails closed).
    gradient_accuracy: dict[str, dict[OpName, dict[DtypeName, AccuracyRule]]] = Field(default_factory=dict)

    def accuracy_rule(self, rule_set: str, op: str, dtype: str) -> AccuracyRule | None:
        """The rule for one cell, or None: callers must fail closed on None."""
        return self.accuracy.get(rule_set, {}).get(op, {}).get(dtype)  # type: ignore[call-overload]

    def gradient_rule(self, rule_set: str, op: str, dtype: str) -> AccuracyRule | None:
        """The gradient accuracy rule for one cell, or None: callers must fail closed on None."""
        return self.gradient_accuracy.get(rule_set, {}).get(op, {}).get(dtype)  # type: ignore[call-overload]

    def invariance_rule(self, check: str) -> InvarianceRule | None:
        return self.invariance.get(check)  # type: ignore[call-overload]


def load_tolerances(path: str | Path) -> Tolerances:
    doc = load_yaml(path)
    try:
        tol = Tolerances.model_validate(doc.data)
    except ValidationError as err:
        raise pydantic_error(doc, err) from None
    if tol.parity.rules not in tol.accuracy:
        raise SpecError(path, doc.line_of(("parity", "rules")), "parity.rules",
                        f"names rule set {tol.parity.rules!r}, which 'accuracy' does not define "
                        f"(defined: {', '.join(sorted(tol.accuracy))})")
    return tol
