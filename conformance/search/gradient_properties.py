"""The gradient properties: the golden run's gradient judgments, searched over the specs' space.

Each draws a case with gradients (its inputs carry the seeded upstream gradient ``grad_out``),
computes the backend's dQ, dK, dV (its ``<op>_backward`` or autograd, through the run's
:meth:`~conformance.run.invoker.Invoker.gradients`) and judges them as ``rlk-conform run`` does:

- ``gradient_accuracy``: against the exact gradients of the drawn case, with the run's rules;
- ``gradient_batch``: a sample's gradients alone, permuted or among fewer neighbours equal its slice
  of the batched gradients;
- ``gradient_padding``: masked keys inserted where no row's window changes (their slots holding
  copies, zeros, other data, huge values or NaN) leave dQ and the real keys' dK, dV unchanged and
  get dK = dV = 0 exactly — NaN in a padded slot leaks into no gradient;
- ``gradient_split``: the KV-cache op's ``cat(dk_cache, dk_new)``, ``cat(dv_cache, dv_new)`` and dQ at
  any two split points equal the one-shot attention op's;
- ``gradient_determinism``: reruns give the same bits.

A backend without a backward ends a gradient property's search at its first example with a
``skip`` (:class:`NoBackward`), never a pass. Failures are shrunk and written as reproducers like
the forward's; a reproducer of a gradient property holds the exact gradients too, so ``replay`` and
``promote`` work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from conformance.backends.registry import backward_skip_reason
from conformance.judge.gradient_transforms import GRAD_NAMES, Grads, GradVariant, gradient_split_variants
from conformance.judge.verdicts import GRADIENT_AXES, Verdict, at, judge_gradient_accuracy
from conformance.run.gradients import compare_gradient_variants
from conformance.run.invoker import BackendCallError, ContractViolation, KernelSkipped
from conformance.search.properties import (
    MAX_PADDING,
    Example,
    Property,
    PropertyContext,
    PropertyOutcome,
    PropertySkipped,
    Subject,
    insert_masked_keys,
    own_call,
    padding_content,
    padding_limit,
)
from conformance.search.strategies import MAX_SEED, Needs, SpecSpace, draw_case

PADDING_CONTENTS = ("copies", "zeros", "reseeded", "large", "nan")


def own_gradients(ctx: PropertyContext, subject: Subject) -> Grads:
    """The backend's dQ, dK, dV of the case's own call for its ``grad_out`` (on the backend's device).
    Raises :class:`PropertySkipped` when the backend declines (its ``supports("<op>_backward", case)``
    or a KernelUnavailable; NoBackward as the cause when it has no backward at all)."""
    inv = ctx.invoker
    assert subject.inputs.grad_out is not None, f"{subject.case.id} has no gradients"
    reason = backward_skip_reason(ctx.backend, subject.case.op, subject.case)
    if reason:
        raise PropertySkipped(reason)
    try:
        return inv.gradients(inv.to_device(own_call(subject)), inv.to_device_tensor(subject.inputs.grad_out))
    except KernelSkipped as exc:
        raise PropertySkipped(str(exc)) from exc


def _backward_failed(exc: Exception, label: str) -> PropertyOutcome:
    """A backward that raised (``error``) or broke the backward's contract (``gradient_contract``)."""
    if isinstance(exc, ContractViolation):
        return PropertyOutcome(Verdict("fail", {"variant": label}, f"gradient_contract: {label}: {exc}"),
                               variant_label=label, check="gradient_contract")
    return PropertyOutcome(Verdict("error", {"variant": label}, f"{label}: {exc}"), variant_label=label)


def gradient_invariance(ctx: PropertyContext, check: str, subject: Subject, variants: Iterable[GradVariant],
                        passed: str) -> PropertyOutcome:
    """The case's own gradients, then each variant's (the run's own
    :func:`~conformance.run.gradients.compare_gradient_variants`); the first that differs fails. A
    failure's reproducer keeps both versions of the tensor that differed."""
    try:
        base = own_gradients(ctx, subject)
    except (BackendCallError, ContractViolation) as exc:
        return _backward_failed(exc, "the backward of the case's own call")
    compared = compare_gradient_variants(ctx.invoker, check, variants, base, ctx.tolerances)
    if isinstance(compared.exception, KernelSkipped):
        raise PropertySkipped(str(compared.exception)) from compared.exception
    if compared.exception is not None:
        return _backward_failed(compared.exception, compared.label)
    if compared.verdict.status != "pass":
        return PropertyOutcome(compared.verdict, compared.want, compared.got, compared.label)
    return PropertyOutcome(Verdict("pass", compared.verdict.metrics, passed), ctx.invoker.to_host(base[0]))


def _same(g: Grads) -> Grads:
    return g


def _grad_out(subject: Subject) -> torch.Tensor:
    assert subject.inputs.grad_out is not None
    return subject.inputs.grad_out


def _draw_accuracy(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    return Example("gradient_accuracy", draw_case(data, space, "gradient_accuracy",
                                                        Needs(ops=ctx.ops, variants=ctx.variants, grad=True)),
                   {})


def _check_accuracy(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """The run's gradient judgment against the exact dQ, dK, dV of the drawn case."""
    case = ex.case
    try:
        grads = own_gradients(ctx, subject)
    except (BackendCallError, ContractViolation) as exc:
        return _backward_failed(exc, "the backward of the case's own call")
    host = tuple(ctx.invoker.to_host(g) for g in grads)
    exact = subject.gradient_reference(ctx.reference_device)
    for name, got in zip(GRAD_NAMES, host):  # the run's gradient_contract: finite where the exact one is
        bad = ~torch.isfinite(got.to(torch.float64)) & torch.from_numpy(np.isfinite(getattr(exact, name)))
        if bool(bad.any()):
            first = tuple(int(i) for i in torch.nonzero(bad)[0])
            msg = (f"gradient_contract: {name} has {int(bad.sum())} NaN/Inf elements where the exact gradient is "
                   f"finite; first at {at(first, GRADIENT_AXES[name])}")
            return PropertyOutcome(Verdict("fail", {"tensor": name, "nonfinite": int(bad.sum())}, msg), got,
                                   variant_label=name, check="gradient_contract")
    rule = ctx.tolerances.gradient_rule(ctx.rule_set, case.op, case.dtype)
    with np.errstate(invalid="ignore"):
        verdict = judge_gradient_accuracy(host, exact, rule, ctx.rule_set)
    worst = max(GRAD_NAMES, key=lambda n: verdict.metrics.get(n, {}).get("threshold_ratio", 0.0))
    return PropertyOutcome(verdict, host[GRAD_NAMES.index(worst)], variant_label=worst)


def _draw_batch(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "gradient_batch", Needs(ops=ctx.ops, variants=ctx.variants, min_batch=2, grad=True))
    order = data.draw(st.permutations(range(case.batch)), label="batch order")
    keep = data.draw(st.integers(1, case.batch), label="samples in the other batch")
    return Example("gradient_batch", case, {"rows": list(order[:keep])})


def _check_batch(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """The case's samples in another batch (alone, permuted, among fewer neighbours), each with its own
    slice of ``grad_out``: their dQ, dK, dV must equal their slices of the batched gradients."""
    rows = [int(r) for r in ex.params["rows"]]
    call, grad_out = own_call(subject), _grad_out(subject)
    idx = torch.tensor(rows)
    other = replace(call, q=call.q[idx], k=call.k[idx], v=call.v[idx],
                    key_padding_mask=None if call.key_padding_mask is None else call.key_padding_mask[idx])
    label = (f"sample {rows[0]} alone (batch 1 of {ex.case.batch})" if len(rows) == 1
             else f"samples {rows} as a batch of {len(rows)} (of {ex.case.batch})")
    variant = GradVariant(label, other, grad_out[idx], _same, lambda g: (g[0][idx], g[1][idx], g[2][idx]))
    return gradient_invariance(ctx, "gradient_batch", subject, [variant],
                               "each sample's gradients bit-identical in another batch")


def _draw_padding(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "gradient_padding", Needs(ops=ctx.ops, variants=ctx.variants, grad=True))
    layout = data.draw(st.lists(st.tuples(st.integers(0, padding_limit(case)), st.integers(1, MAX_PADDING)),
                                min_size=1, max_size=2), label="padding layout [(position, masked keys)]")
    content = data.draw(st.sampled_from(PADDING_CONTENTS), label="padded slot content")
    seed = data.draw(st.integers(0, MAX_SEED), label="padded slot seed") if content == "reseeded" else 0
    return Example("gradient_padding", case, {"layout": [list(x) for x in layout], "content": content,
                                              "content_seed": seed})


def inserted_keys(layout: Iterable[Iterable[int]], skv: int) -> torch.Tensor:
    """Bool [Skv + inserted] of the positions :func:`insert_masked_keys` gives the inserted keys."""
    marks: list[bool] = []
    prev = 0
    for pos, count in sorted((int(p), int(c)) for p, c in layout):
        marks += [False] * (pos - prev) + [True] * count
        prev = pos
    return torch.tensor(marks + [False] * (skv - prev), dtype=torch.bool)


def _check_padding(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """Masked keys inserted where no row's window changes: dQ and the real keys' dK, dV unchanged
    bit for bit, and the inserted keys' dK, dV exactly 0 (NaN content included)."""
    case, layout, content = ex.case, ex.params["layout"], ex.params["content"]
    n = sum(int(c) for _, c in layout)
    if content == "nan":
        shape = (case.batch, case.hkv, n, case.d)
        extra_k = extra_v = torch.full(shape, float("nan"), dtype=subject.inputs.k.dtype)
    else:
        extra_k, extra_v = padding_content(case, subject.inputs, content, int(ex.params["content_seed"]), n)
    padded = insert_masked_keys(own_call(subject), layout, extra_k, extra_v)
    added = inserted_keys(layout, case.skv)
    real = torch.nonzero(~added).flatten()
    where = ", ".join(f"{c} at key {p}" for p, c in sorted(layout))
    variant = GradVariant(f"{n} masked keys ({content}) inserted: {where}", padded, _grad_out(subject),
                          lambda g: (g[0], g[1][:, :, real], g[2][:, :, real]), _same,
                          zero_keys=added[None].expand(case.batch, -1).numpy())
    return gradient_invariance(ctx, "gradient_padding", subject, [variant],
                               "masked keys changed no gradient and got dK = dV = 0")


def _draw_split(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "gradient_split",
                     Needs(ops=("kv_cache_attention",), variants=ctx.variants, min_sq=2, grad=True))
    offset = data.draw(st.integers(1, case.sq - 1), label="second split point (offset into the new tokens)")
    p1 = case.s_past or 0
    return Example("gradient_split", replace(case, split_points=(p1, p1 + offset)),
                   {"split_points": [p1, p1 + offset]})


def _check_split(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """The KV-cache op at both split points against the one-shot attention op of the same query rows:
    dQ, ``cat(dk_cache, dk_new)`` and ``cat(dv_cache, dv_new)`` bit-identical."""
    points = tuple(int(p) for p in ex.params["split_points"])
    case = replace(ex.case, split_points=points)
    variants = gradient_split_variants(own_call(subject), _grad_out(subject), case)
    return gradient_invariance(ctx, "gradient_split", subject, variants,
                               "the KV-cache gradients equal the one-shot ones at both split points")


def _draw_determinism(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "gradient_determinism", Needs(ops=ctx.ops, variants=ctx.variants, grad=True))
    return Example("gradient_determinism", case, {"reruns": ctx.determinism_reruns()})


def _check_determinism(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """The same backward, again and again: the same bits every time."""
    reruns = max(2, int(ex.params.get("reruns", ctx.determinism_reruns())))
    call, grad_out = own_call(subject), _grad_out(subject)
    variants = (GradVariant(f"backward rerun {i} of {reruns}", call, grad_out, _same, _same) for i in range(1, reruns))
    return gradient_invariance(ctx, "gradient_determinism", subject, variants, f"{reruns} backward runs bit-identical")


def _property(name: str, summary: str, requires: tuple[str, ...], draw: Any, check: Any) -> Property:
    return Property(name, summary, requires, draw, check, backward=True)


#: The gradient properties, in report order.
GRADIENT_PROPERTIES: tuple[Property, ...] = (
    _property("gradient_accuracy", "dQ, dK, dV within tolerances.yaml of the exact gradients of the drawn case",
              (), _draw_accuracy, _check_accuracy),
    _property("gradient_batch", "a sample's gradients alone, permuted or among other samples equal its slice of "
              "the batch's", (), _draw_batch, _check_batch),
    _property("gradient_split", "the KV-cache op's gradients at any two split points equal the one-shot op's",
              ("kv_cache_attention", "attention"), _draw_split, _check_split),
    _property("gradient_padding", "masked keys inserted anywhere (NaN content included) change no gradient and get "
              "dK = dV = 0", (), _draw_padding, _check_padding),
    _property("gradient_determinism", "backward reruns give the same bits", (), _draw_determinism,
              _check_determinism),
)
