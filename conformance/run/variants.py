"""Comparing a backend with itself: a set of variant calls against the case's own output, the one
loop every invariance check of a golden run and every invariance property uses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from conformance.judge.invariance import compare_outputs
from conformance.judge.layout_calls import LAYOUT_AXES, LayoutCall
from conformance.judge.transforms import Variant
from conformance.judge.verdicts import OUTPUT_AXES, Verdict
from conformance.run.invoker import BackendCallError, ContractViolation, Invoker, KernelSkipped
from conformance.spec.tolerances import Tolerances


@dataclass
class VariantsOutcome:
    """How a set of variants compared with the case's own output: the verdict and, for the variant
    that differed or could not be called, its label, its output and the exception."""

    verdict: Verdict
    label: str = ""
    output: torch.Tensor | None = None
    exception: Exception | None = None


def compare_variants(invoker: Invoker, check: str, variants: Iterable[Variant], base: torch.Tensor,
                     tolerances: Tolerances, passed: Verdict | None = None) -> VariantsOutcome:
    """Call each variant through ``invoker`` and compare the rows it must reproduce with ``base`` (the
    case's own output) by :func:`~conformance.judge.invariance.compare_outputs`; the first that
    differs fails the check. A variant the backend declines (KernelUnavailable) gives a ``skip``
    verdict, one it cannot answer (an exception, a contract violation) an ``error`` verdict; both keep
    the exception. All equal: ``passed``, by default ``{n} variants bit-identical``."""
    n = 0
    for variant in variants:
        n += 1
        label = variant.label
        try:
            got, _ = invoker(invoker.to_device(variant.call))
        except KernelSkipped as exc:
            return VariantsOutcome(Verdict("skip", {"variant": label}, f"{label}: {exc}"), label, exception=exc)
        except (BackendCallError, ContractViolation) as exc:
            return VariantsOutcome(Verdict("error", {"variant": label}, f"{label}: {exc}"), label, exception=exc)
        axes = LAYOUT_AXES if isinstance(variant.call, LayoutCall) else OUTPUT_AXES
        verdict = compare_outputs(tolerances, check, label, invoker.to_host(variant.taken(got)),
                                  invoker.to_host(variant.expected(base)), variant.metrics, axes)
        if verdict is not None:
            return VariantsOutcome(verdict, label, got)
    return VariantsOutcome(passed or Verdict("pass", {"variants": n}, f"{n} variants bit-identical"))
