"""Property search: Hypothesis draws cases from the space the specs describe, runs a backend on
them under changed surroundings and shrinks every failure to the smallest case that still fails.

Each :class:`Property` has a name that is also its check name in reports (``conformance.spec.checks.CHECKS``),
a ``draw`` (a :class:`~conformance.spec.Case` from :mod:`conformance.strategies` plus the
property's own labelled draws, kept as JSON ``params``) and a ``check`` that calls the backend
and returns a verdict. Invariance properties compare the backend with itself bit for bit, unless
``specs/tolerances.yaml`` gives the check a non-zero tolerance; ``accuracy`` judges the backend
against the exact reference computed for the drawn case, with the run's accuracy rules.

A drawn case's inputs are ``make_inputs(case)``; every variant is built by slicing, concatenating
or overwriting those tensors (never by drawing new data for the same rows), so the case and the
params describe a counterexample completely: :func:`replay` re-runs it from a reproducer file.

Outcomes are :class:`~conformance.judge.Record` values, the same as ``rlk-conform run``'s: a passing
property gives one ``pass`` record per (op, dtype) it exercised; a failing one gives one ``fail``
(or ``error``) record for its smallest counterexample, whose reproducer is written to disk.

A search may have a wall-clock budget (:attr:`SearchSettings.time_budget`, ``check --time-budget``).
Hypothesis has no time limit of its own, so the test body checks the clock after drawing an example
(cheap: a few choices) and before making its inputs and calling the backend; once the budget is
spent it raises :class:`BudgetSpent`, a ``unittest.SkipTest``, which Hypothesis treats as a control
exception and re-raises at once, ending the run without a failure. Every record says how many
examples ran and what stopped the search (``examples_run``, ``stopped_by``). A counterexample found
within the budget is still shrunk, until twice the budget has passed; after that the shrinker's
remaining candidates are rejected, so it ends on the smallest failing example found so far.

The forward properties and what they share with the gradient and layout properties (the subject,
the example, the budget) live here (just over 500 lines); the gradient and layout properties are
their own modules.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from conformance.backends.registry import backend_ops, declared_variants, skip_reason
from conformance.golden.format import GoldenCase
from conformance.golden.reproducer import ReproducerInfo
from conformance.judge.invariance import determinism_reruns
from conformance.judge.transforms import OpCall, Variant
from conformance.judge.verdicts import Verdict
from conformance.reference.compute import Golden, compute_reference
from conformance.reference.gradient import GradientGolden, compute_gradient_reference
from conformance.run.case import run_case
from conformance.run.invoker import BackendCallError, ContractViolation, Invoker, KernelSkipped
from conformance.run.settings import RunSettings
from conformance.run.variants import compare_variants
from conformance.search.strategies import MAX_SEED, Needs, SpecSpace, companion_case, draw_case
from conformance.spec.case import Case
from conformance.spec.inputs import CaseInputs, make_inputs
from conformance.spec.tolerances import Tolerances

MAX_PADDING = 64  # masked keys per insertion point: enough to cross a 64-key tile
LARGE_VALUE = 1.0e4  # 'large' padding content: logits far beyond any real key's if it were not masked


@dataclass(frozen=True)
class Example:
    """One drawn example: the case (inputs = ``make_inputs(case)``) and the property's own draws."""

    prop: str
    case: Case
    params: dict[str, Any]


@dataclass
class Subject:
    """The case's inputs, and its exact forward (and, for a case with gradients, backward) reference
    once someone needs it (each computed at most once)."""

    case: Case
    inputs: CaseInputs
    golden: Golden | None = None
    gradient: GradientGolden | None = None

    def reference(self, device: str = "cpu") -> Golden:
        if self.golden is None:
            self.golden = compute_reference(self.case, self.inputs, device=device)
        return self.golden

    def gradient_reference(self, device: str = "cpu") -> GradientGolden:
        """The exact dQ, dK, dV for the case's ``grad_out`` (the case must have gradients)."""
        if self.gradient is None:
            assert self.inputs.grad_out is not None, f"{self.case.id} has no gradients"
            self.gradient = compute_gradient_reference(self.case, self.inputs, self.inputs.grad_out, device=device)
        return self.gradient


@dataclass
class PropertyOutcome:
    """A property's verdict on one example, with the outputs a reproducer stores."""

    verdict: Verdict
    baseline: torch.Tensor | None = None  # the backend's output for the case's own call
    variant: torch.Tensor | None = None  # the output of the call that differed
    variant_label: str = ""
    check: str | None = None  # "contract" (or "gradient_contract") when the op contract broke

    @property
    def failed(self) -> bool:
        return self.verdict.status in ("fail", "error")


class PropertySkipped(Exception):
    """The backend declines this example (``supports`` or ``KernelUnavailable``); another is drawn."""


class Counterexample(Exception):
    """Raised inside the Hypothesis test so that it shrinks; carries everything a reproducer needs."""

    def __init__(self, example: Example, subject: Subject, outcome: PropertyOutcome) -> None:
        super().__init__(outcome.verdict.message)
        self.example = example
        self.subject = subject
        self.outcome = outcome


@dataclass
class PropertyContext:
    """The backend under test (through the run's :class:`~conformance.runner.Invoker`, which checks
    the op contract on every call) and the rules that judge it."""

    invoker: Invoker
    tolerances: Tolerances
    rule_set: str = "default"
    reruns: int | None = None  # determinism reruns; default from tolerances.yaml
    reference_device: str = "cpu"  # where the exact reference's float64 stage runs
    backend_spec: str | None = None  # how the backend was named (--backend); reproducers record it

    @property
    def backend(self) -> Any:
        return self.invoker.backend

    @property
    def ops(self) -> tuple[str, ...]:
        return backend_ops(self.backend)

    @property
    def variants(self) -> tuple[str, ...]:
        """The attention variants the backend declares: drawn cases use only these (no search is wasted on skips)."""
        return declared_variants(self.backend)

    def determinism_reruns(self) -> int:
        return determinism_reruns(self.tolerances, self.reruns)


def dense_subject(example: Example, ctx: PropertyContext) -> Subject:
    """What a dense property judges: the drawn case's inputs (its reference computed when needed)."""
    return Subject(example.case, make_inputs(example.case))


#: Writes a counterexample as a reproducer file in a directory and returns its path:
#: ``(counterexample, context, what failed, directory, search space) -> path``.
ReproducerWriter = Callable[["Counterexample", "PropertyContext", ReproducerInfo, Path, SpecSpace], Path]


@dataclass(frozen=True)
class Property:
    """One property: its check name, what passing means, the ops it needs, and how to draw and check it.

    A layout property (:mod:`conformance.search.layout_properties`) draws a layout case and judges a
    subject of its own (``subject``); it needs any one of ``requires_any`` and writes its counterexample
    with a writer of its own (``write_reproducer``: a layout reproducer instead of a dense golden file)."""

    name: str
    summary: str
    requires: tuple[str, ...]  # ops the backend must implement for the property to apply at all
    draw: Callable[[st.DataObject, SpecSpace, PropertyContext], Example]
    check: Callable[[PropertyContext, Example, Any], PropertyOutcome]
    backward: bool = False  # judges gradients: a backend without a backward skips it at the first example
    requires_any: tuple[str, ...] = ()  # the property applies when the backend has at least one of these ops
    subject: Callable[[Example, PropertyContext], Any] = dense_subject  # what ``check`` judges
    write_reproducer: ReproducerWriter | None = None  # None: the dense reproducer (search.engine)


def own_call(subject: Subject) -> OpCall:
    """The case's own call: its op on its inputs."""
    c, x = subject.case, subject.inputs
    return OpCall(c.op, x.q, x.k, x.v, x.key_padding_mask, c.causal, c.scale, c.s_past or 0, c.window, c.softcap,
                  x.sinks)


def rows_call(call: OpCall, r0: int, r1: int, op: str) -> OpCall:
    """The call that computes query rows ``r0:r1`` of ``call`` on their own, as ``op``.

    Causal: only the keys those rows may see (``:r1 + Skv - Sq``); bottom-right alignment keeps
    every row's window. For the KV-cache op the rows' own positions are the new tokens. Not causal:
    every key, the last ``r1 - r0`` of them as new tokens. Needs ``Sq <= Skv`` (every row has a
    position among the keys).
    """
    sq = call.q.shape[2]
    last = r1 + call.skv - sq if call.causal else call.skv
    mask = None if call.key_padding_mask is None else call.key_padding_mask[:, :last]
    s_past = last - (r1 - r0) if op == "kv_cache_attention" else 0
    return OpCall(op, call.q[:, :, r0:r1], call.k[:, :, :last], call.v[:, :, :last], mask, call.causal, call.scale,
                  s_past=s_past, **call.variants())


def call_backend(ctx: PropertyContext, call: OpCall) -> torch.Tensor:
    try:
        out, _ = ctx.invoker(ctx.invoker.to_device(call))
    except KernelSkipped as exc:
        raise PropertySkipped(str(exc)) from exc
    return out


def _call_failed(exc: Exception, label: str) -> PropertyOutcome:
    """A call that raised (``error``) or returned what the op contract forbids (a ``contract`` failure)."""
    if isinstance(exc, ContractViolation):
        return PropertyOutcome(Verdict("fail", {"variant": label}, f"contract: {label}: {exc}"), variant_label=label,
                               check="contract")
    return PropertyOutcome(Verdict("error", {"variant": label}, f"{label}: {exc}"), variant_label=label)


def invariance(ctx: PropertyContext, check: str, subject: Subject, variants: Iterable[Variant],
               passed: str) -> PropertyOutcome:
    """Run the case's own call, then each variant (the run's own :func:`~conformance.run.case.compare_variants`);
    the first variant whose rows differ fails."""
    try:
        base = call_backend(ctx, own_call(subject))
    except (BackendCallError, ContractViolation) as exc:
        return _call_failed(exc, "the case's own call")
    compared = compare_variants(ctx.invoker, check, variants, base, ctx.tolerances)
    if isinstance(compared.exception, KernelSkipped):
        raise PropertySkipped(str(compared.exception)) from compared.exception
    if compared.exception is not None:
        failed = _call_failed(compared.exception, compared.label)
        failed.baseline = base
        return failed
    if compared.verdict.status != "pass":
        return PropertyOutcome(compared.verdict, base, compared.output, compared.label)
    return PropertyOutcome(Verdict("pass", compared.verdict.metrics, passed), base)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _rows(r0: int, r1: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda out: out[:, :, r0:r1]


def _draw_accuracy(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    return Example("accuracy", draw_case(data, space, "accuracy", Needs(ops=ctx.ops, variants=ctx.variants)), {})


def _check_accuracy(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """The run's own accuracy judgment (``run_case``) against the exact reference of the drawn case."""
    golden = subject.reference(ctx.reference_device)
    gc = GoldenCase(path=Path(f"{ex.case.id}.h5"), case=ex.case, inputs=subject.inputs, golden=golden, attrs={})
    settings = RunSettings(tolerances=ctx.tolerances, checks=("accuracy",), rule_set=ctx.rule_set)
    with np.errstate(invalid="ignore"):  # judge_elementwise subtracts -inf from -inf for fully masked rows
        (record,) = run_case(ctx.invoker, gc, settings)
    if record.status == "skip":
        raise PropertySkipped(record.message)
    return PropertyOutcome(Verdict(record.status, record.metrics, record.message))


def _draw_batch(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "batch", Needs(ops=ctx.ops, variants=ctx.variants, min_batch=2))
    order = data.draw(st.permutations(range(case.batch)), label="batch order")
    keep = data.draw(st.integers(1, case.batch), label="rows in the other batch")
    return Example("batch", case, {"rows": list(order[:keep])})


def _check_batch(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """The case's rows (sequences of other lengths and content) in another batch: alone, permuted,
    or among fewer neighbours. Each row must equal its own row of the full batch."""
    rows = [int(r) for r in ex.params["rows"]]
    call = own_call(subject)
    idx = torch.tensor(rows)
    other = replace(call, q=call.q[idx], k=call.k[idx], v=call.v[idx],
                    key_padding_mask=None if call.key_padding_mask is None else call.key_padding_mask[idx])
    label = (f"row {rows[0]} alone (batch 1 of {ex.case.batch})" if len(rows) == 1
             else f"rows {rows} as a batch of {len(rows)} (of {ex.case.batch})")
    variant = Variant(label, other, _same, lambda out: out[idx])
    return invariance(ctx, "batch", subject, [variant], "each row bit-identical in another batch")


def _draw_split(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "split", Needs(ops=("kv_cache_attention",), variants=ctx.variants, min_sq=2))
    offset = data.draw(st.integers(1, case.sq - 1), label="second split point (offset into the new tokens)")
    p1 = case.s_past or 0
    return Example("split", replace(case, split_points=(p1, p1 + offset)), {"split_points": [p1, p1 + offset]})


def _check_split(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """KV-cache op at two split points: the rows both calls compute must be bit-identical."""
    p1, p2 = (int(p) for p in ex.params["split_points"])
    call = own_call(subject)
    off = p2 - p1
    moved = replace(call, q=call.q[:, :, off:], s_past=p2)
    variant = Variant(f"split at S_past={p2} instead of {p1}", moved, _same, _rows(off, call.q.shape[2]))
    return invariance(ctx, "split", subject, [variant], "both split points bit-identical")


def _draw_prefill_decode(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "prefill_decode", Needs(ops=ctx.ops, variants=ctx.variants, sq_le_skv=True))
    mode = data.draw(st.sampled_from(["one row", "token by token"]), label="decode")
    one = mode == "one row"
    rows = [data.draw(st.integers(0, case.sq - 1), label="decoded row")] if one else list(range(case.sq))
    return Example("prefill_decode", case, {"mode": mode, "rows": rows})


def _check_prefill_decode(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """Rows of the case as single-token KV-cache decodes of their own positions."""
    call = own_call(subject)
    variants = (Variant(f"row {r} of {ex.case.sq} as a one-token decode", rows_call(call, r, r + 1,
                        "kv_cache_attention"), _same, _rows(r, r + 1)) for r in ex.params["rows"])
    return invariance(ctx, "prefill_decode", subject, variants, "decoded rows bit-identical to the prefill")


def _draw_chunk(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "chunk", Needs(ops=ctx.ops, variants=ctx.variants, min_sq=2, sq_le_skv=True))
    cuts = data.draw(st.sets(st.integers(1, case.sq - 1), min_size=1, max_size=min(8, case.sq - 1)),
                     label="chunk boundaries")
    op = data.draw(st.sampled_from(sorted(ctx.ops, reverse=True)), label="chunk op")
    return Example("chunk", case, {"boundaries": [0, *sorted(cuts), case.sq], "op": op})


def _check_chunk(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """Chunked prefill: each chunk of query rows alone, seeing the keys it sees in one shot."""
    call = own_call(subject)
    bounds = [int(b) for b in ex.params["boundaries"]]
    op = ex.params["op"]
    variants = (Variant(f"chunk rows {c0}:{c1} of {ex.case.sq} ({op})", rows_call(call, c0, c1, op), _same,
                        _rows(c0, c1)) for c0, c1 in itertools.pairwise(bounds))
    return invariance(ctx, "chunk", subject, variants, "every chunk bit-identical to the one-shot rows")


def padding_limit(case: Case) -> int:
    """The last position before which masked keys may be inserted without changing any row's window:
    anywhere without the causal rule; under it (bottom-right) only before keys every row sees;
    for the KV-cache op only inside the cache (the new tokens stay last)."""
    if case.op == "kv_cache_attention":
        limit = case.s_past or 0
    elif not case.causal:
        limit = case.skv
    else:
        limit = min(case.skv, max(0, case.skv - case.sq + 1))
    if case.window[0] >= 0:  # a left window counts key positions: only before every row's window
        limit = min(limit, max(0, case.skv - case.sq - case.window[0]))
    return limit


def _draw_padding(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "padding", Needs(ops=ctx.ops, variants=ctx.variants))
    layout = data.draw(st.lists(st.tuples(st.integers(0, padding_limit(case)), st.integers(1, MAX_PADDING)),
                                min_size=1, max_size=2), label="padding layout [(position, masked keys)]")
    content = data.draw(st.sampled_from(["copies", "zeros", "reseeded", "large"]), label="padded slot content")
    seed = data.draw(st.integers(0, MAX_SEED), label="padded slot seed") if content == "reseeded" else 0
    return Example("padding", case, {"layout": [list(x) for x in layout], "content": content, "content_seed": seed})


def padding_content(case: Case, inputs: CaseInputs, content: str, seed: int, n: int) -> tuple[torch.Tensor, ...]:
    shape = (case.batch, case.hkv, n, case.d)
    if content == "copies":
        idx = torch.arange(n) % case.skv
        return inputs.k[:, :, idx], inputs.v[:, :, idx]
    if content == "zeros":
        return torch.zeros(shape, dtype=inputs.k.dtype), torch.zeros(shape, dtype=inputs.v.dtype)
    if content == "large":
        sign = torch.where(torch.arange(case.d) % 2 == 0, 1.0, -1.0)
        big = (LARGE_VALUE * sign).expand(shape).to(inputs.k.dtype)
        return big, big.flip(-1)
    other = make_inputs(companion_case(case, seed, skv=n))
    return other.k, other.v


def insert_masked_keys(call: OpCall, layout: Sequence[Sequence[int]], extra_k: torch.Tensor,
                       extra_v: torch.Tensor) -> OpCall:
    """``call`` with masked keys inserted: ``layout`` lists (position, count) in original key
    positions; the inserted keys take their content from ``extra_k``/``extra_v`` in order."""
    b, skv = call.q.shape[0], call.skv
    mask = call.key_padding_mask if call.key_padding_mask is not None else torch.ones(b, skv, dtype=torch.bool)
    ks, vs, ms = [], [], []
    prev = used = 0
    for pos, count in sorted((int(p), int(c)) for p, c in layout):
        ks += [call.k[:, :, prev:pos], extra_k[:, :, used:used + count]]
        vs += [call.v[:, :, prev:pos], extra_v[:, :, used:used + count]]
        ms += [mask[:, prev:pos], torch.zeros(b, count, dtype=torch.bool)]
        prev, used = pos, used + count
    ks.append(call.k[:, :, prev:])
    vs.append(call.v[:, :, prev:])
    ms.append(mask[:, prev:])
    s_past = call.s_past + used if call.op == "kv_cache_attention" else 0
    return replace(call, k=torch.cat(ks, 2), v=torch.cat(vs, 2), key_padding_mask=torch.cat(ms, 1), s_past=s_past)


def _check_padding(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """Masked keys inserted where no row's window changes (appended to the keys or the cache,
    prepended, between): the output must not change at all."""
    layout = ex.params["layout"]
    n = sum(int(c) for _, c in layout)
    extra_k, extra_v = padding_content(ex.case, subject.inputs, ex.params["content"],
                                        int(ex.params["content_seed"]), n)
    padded = insert_masked_keys(own_call(subject), layout, extra_k, extra_v)
    where = ", ".join(f"{c} at key {p}" for p, c in sorted(layout))
    variant = Variant(f"{n} masked keys ({ex.params['content']}) inserted: {where}", padded, _same, _same)
    return invariance(ctx, "padding", subject, [variant], "masked keys changed nothing")


PADDED_MASKS = ("right_pad", "left_pad", "holes", "all_masked")


def _draw_nan_padding(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "nan_padding", Needs(ops=ctx.ops, variants=ctx.variants, masks=PADDED_MASKS))
    poison = data.draw(st.sampled_from(["keys and values", "values", "keys"]), label="NaN written into")
    return Example("nan_padding", case, {"poison": poison})


def _check_nan_padding(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """NaN written into every padded (masked-out) key and/or value slot: no output may change."""
    call = own_call(subject)
    if call.key_padding_mask is None:  # drawn cases always have one; a hand-made reproducer may not
        raise PropertySkipped("nan_padding needs a case with a key_padding_mask")
    padded = ~call.key_padding_mask[:, None, :, None].expand_as(call.k)
    poison = ex.params["poison"]
    k = call.k.masked_fill(padded, float("nan")) if poison in ("keys and values", "keys") else call.k
    v = call.v.masked_fill(padded, float("nan")) if poison in ("keys and values", "values") else call.v
    label = f"NaN in the padded {poison} ({int((~call.key_padding_mask).sum())} slots)"
    variant = Variant(label, replace(call, k=k, v=v), _same, _same)
    return invariance(ctx, "nan_padding", subject, [variant], "no NaN leaked from padded slots")


def _draw_determinism(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "determinism", Needs(ops=ctx.ops, variants=ctx.variants))
    return Example("determinism", case, {"reruns": ctx.determinism_reruns()})


def _check_determinism(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """The same call, again and again: the same bits every time."""
    reruns = max(2, int(ex.params.get("reruns", ctx.determinism_reruns())))
    call = own_call(subject)
    variants = (Variant(f"rerun {i} of {reruns}", call, _same, _same) for i in range(1, reruns))
    return invariance(ctx, "determinism", subject, variants, f"{reruns} runs bit-identical")


def _draw_gqa(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "gqa", Needs(ops=ctx.ops, variants=ctx.variants, min_hkv=2))
    kept = data.draw(st.integers(0, case.hkv - 1), label="kept KV head")
    others = data.draw(st.sampled_from(["reseeded", "zeros", "nan"]), label="content of the other KV heads")
    seed = data.draw(st.integers(0, MAX_SEED), label="other KV heads seed") if others == "reseeded" else 0
    return Example("gqa", case, {"kv_head": kept, "others": others, "content_seed": seed})


def _check_gqa(ctx: PropertyContext, ex: Example, subject: Subject) -> PropertyOutcome:
    """Every KV head but one replaced: the query heads of the kept one (``h // group == kv_head``)
    must not change."""
    case, call = ex.case, own_call(subject)
    kept = int(ex.params["kv_head"])
    others = [h for h in range(case.hkv) if h != kept]
    content = ex.params["others"]
    k, v = call.k.clone(), call.v.clone()
    if content == "reseeded":
        fresh = make_inputs(companion_case(case, int(ex.params["content_seed"])))
        k[:, others], v[:, others] = fresh.k[:, others], fresh.v[:, others]
    else:
        k[:, others] = v[:, others] = 0.0 if content == "zeros" else float("nan")
    g = case.group
    heads = slice(kept * g, (kept + 1) * g)
    label = f"KV heads other than {kept} set to {content}; query heads {kept * g}..{(kept + 1) * g - 1} compared"
    variant = Variant(label, replace(call, k=k, v=v), lambda out: out[:, heads], lambda out: out[:, heads])
    return invariance(ctx, "gqa", subject, [variant], "query heads read only their own KV head")


#: The forward properties, in report order (conformance.search.catalog adds the gradient ones).
FORWARD_PROPERTIES: tuple[Property, ...] = (
    Property("accuracy", "within tolerances.yaml of the exact reference of the drawn case", (),
             _draw_accuracy, _check_accuracy),
    Property("batch", "a row alone, permuted or among other rows equals its row of the batch", (),
             _draw_batch, _check_batch),
    Property("split", "the KV-cache op gives the same bits at any two split points", ("kv_cache_attention",),
             _draw_split, _check_split),
    Property("prefill_decode", "a prefill row equals the KV-cache decode of its position; token-by-token "
             "decode equals prefill", ("kv_cache_attention",), _draw_prefill_decode, _check_prefill_decode),
    Property("chunk", "chunked prefill equals one shot, for any chunking", (), _draw_chunk, _check_chunk),
    Property("padding", "masked keys inserted anywhere the windows allow change nothing", (),
             _draw_padding, _check_padding),
    Property("determinism", "reruns give the same bits", (), _draw_determinism, _check_determinism),
    Property("gqa", "a query head's output depends only on its own KV head", (), _draw_gqa, _check_gqa),
    Property("nan_padding", "NaN in padded key/value slots never leaks into any output", (),
             _draw_nan_padding, _check_nan_padding),
)


def evaluate(prop: Property, ctx: PropertyContext, example: Example, subject: Subject) -> PropertyOutcome:
    """Check one example. Raises :class:`PropertySkipped` when the backend declines it."""
    reason = skip_reason(ctx.backend, example.case.op, example.case)
    if reason:
        raise PropertySkipped(reason)
    ctx.invoker.violations = []
    outcome = prop.check(ctx, example, subject)
    # A modified input breaks the op contract, not the property (a NaN output is the property's to judge).
    broken = [v for v in ctx.invoker.violations if "modified its input" in v]
    if broken and outcome.check is None:
        first = broken[0]
        more = f" (+{len(broken) - 1} more)" if len(broken) > 1 else ""
        metrics = {"violations": broken[:20], "property": prop.name}
        check = "gradient_contract" if first.startswith("the backward") else "contract"
        return replace(outcome, verdict=Verdict("fail", metrics, f"{check}: {first}{more} (while checking "
                                                f"{prop.name})"), check=check)
    return outcome
