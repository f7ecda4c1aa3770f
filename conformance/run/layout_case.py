"""One packed or paged layout case (conformance.spec.layouts): every requested check through one
:class:`~conformance.run.invoker.Invoker` — accuracy of every sequence against its dense golden,
``pack``, ``page``, ``split`` and ``prefill_decode`` across layouts, ``determinism`` and the op
contract. Checks that do not apply to a layout (batch, chunk, padding, gradients) give no record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from conformance.backends.registry import skip_reason
from conformance.golden.layouts import LayoutGolden
from conformance.judge.invariance import determinism_reruns
from conformance.judge.layout_calls import LayoutCall, Seq, layout_call
from conformance.judge.layouts import (
    determinism_variants,
    pack_variants,
    page_variants,
    prefill_decode_variants,
    split_variants,
)
from conformance.judge.records import Record
from conformance.judge.transforms import Variant
from conformance.judge.verdicts import Verdict, judge_accuracy
from conformance.reference.compute import Golden
from conformance.run.invoker import (
    BackendCallError,
    ContractViolation,
    Invoker,
    KernelSkipped,
    failed_call_verdicts,
)
from conformance.run.settings import RunSettings
from conformance.run.variants import compare_variants
from conformance.spec.layouts import LayoutCase
from conformance.spec.tolerances import Tolerances

#: The dense op whose accuracy rules judge the layouts (the same math: tolerances.yaml's attention rows).
RULES_OP = "attention"
LAYOUT_CHECKS = ("accuracy", "pack", "page", "split", "prefill_decode", "determinism", "contract")


def layout_sequences(lg: LayoutGolden) -> list[Seq]:
    return [Seq(s.q, s.k, s.v) for s in lg.sequences]


def run_layout_case(invoker: Invoker, lg: LayoutGolden, settings: RunSettings,
                    page_order: Sequence[int] | None = None) -> list[Record]:
    """Every requested check that applies to a layout case, in ``settings.checks`` order. ``page_order``
    is the ``page`` check's block-table permutation (None: drawn from the case's seed)."""
    case = lg.case

    def rec(check: str, verdict: Verdict) -> Record:
        return Record(case.id, case.op, check, verdict.status, case.dtype, case.family, verdict.metrics,
                      verdict.message)

    requested = [c for c in settings.checks if c in LAYOUT_CHECKS and (c != "page" or case.page_size is not None)]
    reason = skip_reason(invoker.backend, case.op, case)
    if reason:
        return [rec(c, Verdict("skip", {}, reason)) for c in requested]
    seqs = layout_sequences(lg)
    invoker.violations = []
    call = layout_call(case.op, seqs, case.causal, case.scale, case.page_size, window=case.window)
    device_call = invoker.to_device(call)
    try:
        out, _ = invoker(device_call)
    except KernelSkipped as exc:
        return [rec(c, Verdict("skip", {}, str(exc))) for c in requested]
    except (BackendCallError, ContractViolation) as exc:
        return [rec(c, v) for c, v in failed_call_verdicts(requested, exc)]
    records: list[Record] = []
    if "accuracy" in requested:
        records.append(rec("accuracy", layout_accuracy(call, invoker.to_host(out), [s.golden for s in lg.sequences],
                                                       case, settings.tolerances, settings.rule_set)))
    transforms: dict[str, Callable[[], Iterator[Variant]]] = {
        "pack": lambda: pack_variants(call, seqs),
        "page": lambda: page_variants(call, seqs, case.page_sizes, case.seed, page_order),
        "split": lambda: split_variants(call, seqs),
        "prefill_decode": lambda: prefill_decode_variants(call, seqs),
        "determinism": lambda: determinism_variants(call, determinism_reruns(settings.tolerances, settings.reruns)),
    }
    for check, make in transforms.items():
        if check in requested:
            verdict = layout_invariance(invoker, check, list(make()), out, settings.tolerances, case)
            if verdict is not None:
                records.append(rec(check, verdict))
    if "contract" in requested:
        if invoker.violations:
            more = f" (+{len(invoker.violations) - 1} more)" if len(invoker.violations) > 1 else ""
            records.append(rec("contract", Verdict("fail", {"violations": invoker.violations[:20]},
                                                   invoker.violations[0] + more)))
        else:
            records.append(rec("contract", Verdict("pass", {}, "shape, dtype, device, finite output, inputs "
                                                   "unchanged, no exception")))
    return records


def layout_invariance(invoker: Invoker, check: str, variants: Sequence[Variant], out: torch.Tensor,
                      tolerances: Tolerances, case: LayoutCase) -> Verdict | None:
    """The variants against the case's own output (:func:`~conformance.run.case.compare_variants`);
    None when the check does not apply, ``skip`` naming the layout op a variant needs and the backend
    lacks, or its reason when the backend's ``supports`` declines that op for this case."""
    if not variants:
        return None
    missing = sorted({v.call.op for v in variants if not invoker.has(v.call.op)})
    if missing:
        return Verdict("skip", {}, f"needs {', '.join(missing)}, which backend {invoker.backend.name} lacks")
    declined = sorted({r for op in {v.call.op for v in variants} if op != case.op
                       and (r := skip_reason(invoker.backend, op, case))})
    if declined:
        return Verdict("skip", {}, "; ".join(declined))
    verdict = compare_variants(invoker, check, variants, out, tolerances).verdict
    if check == "determinism" and verdict.status == "pass":
        return Verdict("pass", {"reruns": len(variants) + 1}, f"{len(variants) + 1} runs bit-identical")
    return verdict


def layout_accuracy(call: LayoutCall, out: torch.Tensor, goldens: Sequence[Golden], case: LayoutCase,
                    tolerances: Tolerances, rule_set: str) -> Verdict:
    """Every sequence's rows against its dense golden, with the attention op's rule for the dtype. The
    first failing sequence fails the check (named, with its source golden); a pass reports the worst
    sequence's metrics."""
    rule = tolerances.accuracy_rule(rule_set, RULES_OP, case.dtype)  # type: ignore[arg-type]
    peak = tolerances.peak_relative.get(case.dtype)  # type: ignore[call-overload]
    worst: Verdict | None = None
    for i, golden in enumerate(goldens):
        rows = call.rows(out, i).transpose(0, 1)[None]  # [1, Hq, sq, D], the golden's layout
        verdict = judge_accuracy(rows, golden, rule, peak, rule_set)
        ref = case.sequences[i]
        where = {"sequence": i, "source": ref.case_id, "source_batch_entry": ref.batch_index}
        if verdict.status != "pass":
            return Verdict(verdict.status, {**verdict.metrics, **where},
                           f"sequence {i} (Sq={ref.sq}, Skv={ref.skv}, from {ref.case_id} entry {ref.batch_index}): "
                           f"{verdict.message}")
        ratio = float(verdict.metrics.get("threshold_ratio", 0.0) or 0.0)
        if worst is None or ratio > float(worst.metrics.get("threshold_ratio", 0.0) or 0.0):
            worst = Verdict("pass", {**verdict.metrics, **where}, verdict.message)
    assert worst is not None
    return Verdict("pass", {**worst.metrics, "sequences": len(goldens)},
                   f"{len(goldens)} sequences; worst: sequence {worst.metrics['sequence']}, {worst.message}")
