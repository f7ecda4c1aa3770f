"""One golden case: every requested check (accuracy, each invariance transform, determinism, parity,
contract) through one :class:`~conformance.run.invoker.Invoker`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from conformance.backends.contract import one_line
from conformance.backends.registry import skip_reason
from conformance.errors import ConformanceError, GoldenError
from conformance.golden.format import DEFAULT_MAX_CASE_BYTES, GoldenCase, declared_bytes, read_golden
from conformance.golden.layouts import LayoutGolden, is_layout_path, read_layout_golden
from conformance.golden.manifest import case_id_of
from conformance.judge.invariance import determinism_reruns
from conformance.judge.records import Record
from conformance.judge.transforms import (
    OpCall,
    Variant,
    batch_variants,
    chunk_variants,
    padding_variants,
    prefill_decode_variants,
    split_variants,
)
from conformance.judge.verdicts import Verdict, judge_accuracy, judge_elementwise
from conformance.run.gradients import gradient_checks
from conformance.run.invoker import (
    BackendCallError,
    ContractViolation,
    Invoker,
    KernelSkipped,
    failed_call_verdicts,
)
from conformance.run.layout_case import run_layout_case
from conformance.run.profiling import NO_TIMER, PhaseTimer
from conformance.run.settings import RunSettings
from conformance.run.variants import compare_variants
from conformance.spec.checks import GRADIENT_CHECKS, LAYOUT_INVARIANCE_CHECKS


def run_case(invoker: Invoker, gc: GoldenCase, settings: RunSettings,
             compare_to: Invoker | None = None) -> list[Record]:
    """Every requested check on one golden case."""
    case = gc.case

    def rec(check: str, verdict: Verdict) -> Record:
        return Record(case.id, case.op, check, verdict.status, case.dtype, case.family, verdict.metrics,
                      verdict.message)
    # The checks that apply to a dense case: parity only against another backend, the gradient
    # checks only with gradients in the golden, the layout checks never (run/layout_case.py).
    requested = [c for c in settings.checks if (c != "parity" or compare_to is not None)
                 and (c not in GRADIENT_CHECKS or gc.gradient is not None) and c not in LAYOUT_INVARIANCE_CHECKS]
    reason = skip_reason(invoker.backend, case.op, case)
    if reason:
        return [rec(c, Verdict("skip", {}, reason)) for c in requested]

    invoker.violations = []
    call = invoker.to_device(OpCall(case.op, gc.inputs.q, gc.inputs.k, gc.inputs.v, gc.inputs.key_padding_mask,
                                    case.causal, case.scale, case.s_past or 0, case.window, case.softcap,
                                    gc.inputs.sinks))
    records: list[Record] = []
    try:
        out, lse = invoker(call)
    except KernelSkipped as exc:
        return [rec(c, Verdict("skip", {}, str(exc))) for c in requested]
    except (BackendCallError, ContractViolation) as exc:
        return [rec(c, v) for c, v in failed_call_verdicts(requested, exc)]

    out_host = invoker.to_host(out) if {"accuracy", "determinism", "parity"} & set(requested) else out
    if "accuracy" in requested:
        records.append(rec("accuracy", _accuracy(out_host, None if lse is None else invoker.to_host(lse), gc,
                                                 settings)))
    transforms: dict[str, Callable[[], Iterator[Variant]]] = {
        "batch": lambda: batch_variants(call),
        "split": lambda: split_variants(call, case),
        "prefill_decode": lambda: prefill_decode_variants(call),
        "chunk": lambda: chunk_variants(call),
        "padding": lambda: padding_variants(call),
    }
    for check, make in transforms.items():
        if check in requested:
            verdict = _invariance(invoker, check, list(make()), out, settings)
            if verdict is not None:
                records.append(rec(check, verdict))
    if "determinism" in requested:
        records.append(rec("determinism", _determinism(invoker, call, out, settings)))
    if "parity" in requested and compare_to is not None:
        records.append(rec("parity", _parity(compare_to, call, out_host, gc, settings)))
    if "contract" in requested:
        if invoker.violations:
            first = invoker.violations[0]
            more = f" (+{len(invoker.violations) - 1} more)" if len(invoker.violations) > 1 else ""
            records.append(rec("contract", Verdict("fail", {"violations": invoker.violations[:20]}, first + more)))
        else:
            records.append(rec("contract", Verdict("pass", {}, "shape, dtype, device, finite output, inputs "
                                                   "unchanged, no exception")))
    records += [rec(check, verdict) for check, verdict in gradient_checks(invoker, gc, settings, call).items()]
    return records


def _accuracy(out: torch.Tensor, lse: torch.Tensor | None, gc: GoldenCase, settings: RunSettings) -> Verdict:
    case = gc.case
    rule = settings.tolerances.accuracy_rule(settings.rule_set, case.op, case.dtype)
    verdict = judge_accuracy(out, gc.golden, rule, settings.tolerances.peak_relative.get(case.dtype),  # type: ignore[call-overload]
                             settings.rule_set)
    if lse is None:
        return verdict
    lse_rule = settings.tolerances.lse.get(case.dtype)  # type: ignore[call-overload]
    lv = judge_elementwise(lse, gc.golden.lse, lse_rule, "lse")
    metrics = {**verdict.metrics, "lse_max_abs_err": lv.metrics.get("max_abs_err")}
    if lv.status != "pass":
        return Verdict("fail", metrics, "; ".join(m for m in (verdict.message if verdict.status == "fail" else "",
                                                              lv.message) if m))
    return Verdict(verdict.status, metrics, verdict.message)


def _invariance(invoker: Invoker, check: str, variants: Sequence[Variant], out: torch.Tensor,
                settings: RunSettings) -> Verdict | None:
    if not variants:
        return None  # the check does not apply to this case
    needed = {v.call.op for v in variants}
    missing = [op for op in needed if not invoker.has(op)]
    if missing:
        return Verdict("skip", {}, f"needs {', '.join(missing)}, which backend {invoker.backend.name} lacks")
    return compare_variants(invoker, check, variants, out, settings.tolerances).verdict


def _determinism(invoker: Invoker, call: OpCall, out: torch.Tensor, settings: RunSettings) -> Verdict:
    reruns = determinism_reruns(settings.tolerances, settings.reruns)
    variants = [Variant(f"rerun {i} of {reruns}", call, _same, _same, {"rerun": i}) for i in range(1, reruns)]
    return compare_variants(invoker, "determinism", variants, out, settings.tolerances,
                            passed=Verdict("pass", {"reruns": reruns}, f"{reruns} runs bit-identical")).verdict


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _parity(other: Invoker, call: OpCall, out_host: torch.Tensor, gc: GoldenCase, settings: RunSettings) -> Verdict:
    case = gc.case
    reason = skip_reason(other.backend, case.op, case)
    if reason:
        return Verdict("skip", {}, f"{other.backend.name}: {reason}")
    try:
        theirs, _ = other(other.to_device(call))
    except KernelSkipped as exc:
        return Verdict("skip", {}, f"{other.backend.name}: {exc}")
    except (BackendCallError, ContractViolation) as exc:
        return Verdict("error", {}, f"{other.backend.name}: {exc}")
    rule_set = settings.tolerances.parity.rules
    rule = settings.tolerances.accuracy_rule(rule_set, case.op, case.dtype)
    v = judge_elementwise(out_host, other.to_host(theirs).to(torch.float64).numpy(), rule,
                          f"parity with {other.backend.name}", gc.golden.naive_error)
    return Verdict(v.status, {**v.metrics, "compared_to": other.backend.name}, v.message)


@dataclass
class CaseOutcome:
    """The records of one golden file; ``refused`` when the file was refused and nothing was judged."""

    records: list[Record]
    refused: bool = False
    profile: dict[str, Any] | None = None  # an --isolate worker's PhaseTimer.snapshot() of this case


def refused_outcome(path: Path, reason: str) -> CaseOutcome:
    """One error record for a golden file that was refused (``reason`` names file and dataset)."""
    return CaseOutcome([Record(case_id_of(path), "?", "accuracy", "error",
                               message=f"golden file refused, nothing judged: {reason}")], refused=True)


def case_error_record(case: dict[str, Any] | None, path: Path, settings: RunSettings, message: str,
                      metrics: dict[str, Any]) -> Record:
    """The one ``error`` record of a case that ended abnormally (a crash, a timeout, an exception the
    checks did not expect). ``case`` holds case_id, op, dtype and family once the golden was read.
    The record's check is ``contract`` (the call must return normally) when that check was asked for."""
    check = "contract" if "contract" in settings.checks else settings.checks[0]
    if case is None:
        return Record(case_id_of(path), "?", check, "error", metrics=metrics, message=message)
    return Record(case["case_id"], case["op"], check, "error", case["dtype"], case["family"], metrics, message)


def judge_case(invoker: Invoker, gc: GoldenCase | LayoutGolden, settings: RunSettings,
               compare_to: Invoker | None = None) -> list[Record]:
    """:func:`run_case` (or, for a packed or paged layout, :func:`~conformance.run.layout_case.run_layout_case`),
    except that an unexpected exception (a backend's ``supports`` raising, say) becomes one error
    record of this case instead of ending the run. ConformanceError propagates."""
    try:
        if isinstance(gc, LayoutGolden):
            return run_layout_case(invoker, gc, settings)
        return run_case(invoker, gc, settings, compare_to)
    except ConformanceError:
        raise
    except Exception as exc:
        case = {"case_id": gc.case.id, "op": gc.case.op, "dtype": gc.case.dtype, "family": gc.case.family}
        return [case_error_record(case, gc.path, settings, f"the case could not be judged: {type(exc).__name__}: "
                                  f"{one_line(str(exc))}", {})]


def read_case(path: Path, max_case_bytes: int = DEFAULT_MAX_CASE_BYTES, sha256: str | None = None
              ) -> GoldenCase | LayoutGolden:
    """A golden file (``.h5``) or a layout file (``.json``, with the dense goldens it names), with every
    guard of :func:`read_golden`; GoldenError when it is refused."""
    if is_layout_path(path):
        return read_layout_golden(path, max_case_bytes, expected_sha256=sha256)
    return read_golden(path, max_bytes=max_case_bytes, expected_sha256=sha256)


def read_and_judge(path: Path, invoker: Invoker, settings: RunSettings, compare_to: Invoker | None = None,
                   timer: PhaseTimer = NO_TIMER, max_case_bytes: int = DEFAULT_MAX_CASE_BYTES,
                   sha256: str | None = None) -> CaseOutcome:
    """One golden or layout file: read it (refused when :func:`read_case` refuses it), then :func:`judge_case`."""
    with timer.phase("read"):
        try:
            gc = read_case(path, max_case_bytes, sha256)
        except GoldenError as exc:
            return refused_outcome(path, str(exc))
    if isinstance(gc, GoldenCase):
        timer.note_case(gc.case.id, declared_bytes(gc.case))
    with timer.phase("judge"):
        return CaseOutcome(judge_case(invoker, gc, settings, compare_to))


CaseJudge = Callable[[Path], CaseOutcome]  # one golden file → its records (the run loop's only view of judging)


def in_process_judge(backend: Any, settings: RunSettings, compare_to: Any | None = None, *,
                     timer: PhaseTimer = NO_TIMER, max_case_bytes: int = DEFAULT_MAX_CASE_BYTES,
                     checksums: Mapping[Path, str] | None = None) -> CaseJudge:
    """The per-case judge of a backend object in this process: :func:`read_and_judge` with one
    :class:`~conformance.run.invoker.Invoker` per backend (``compare_to``: parity). A golden that
    :func:`read_golden` refuses — damaged, over ``max_case_bytes``, or not matching its entry in
    ``checksums`` (the manifest's file SHA-256) — is one error record. An enabled ``timer``
    (``--profile``) is charged ``read``, ``judge`` and, within it, ``backend`` and ``transfer``."""
    invoker = Invoker(backend, timer)
    other = Invoker(compare_to, timer) if compare_to is not None else None
    sums = checksums or {}

    def judge(path: Path) -> CaseOutcome:
        return read_and_judge(path, invoker, settings, other, timer, max_case_bytes, sums.get(path))

    return judge
