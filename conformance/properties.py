"""Property search: Hypothesis draws cases from the space the specs describe, runs a backend on
them under changed surroundings and shrinks every failure to the smallest case that still fails.

Each :class:`Property` has a name that is also its check name in reports (``conformance.judge.CHECKS``),
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
"""

from __future__ import annotations

import itertools
import json
import time
import unittest
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hypothesis
import numpy as np
import torch
from hypothesis import HealthCheck, Phase, Verbosity, reject
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Flaky, Unsatisfiable

from .backends.registry import backend_ops, skip_reason
from .environment import execution_target
from .errors import GoldenError
from .golden import GoldenCase
from .inputs import CaseInputs, make_inputs
from .judge import Record, Verdict, bitwise_mismatch, judge_elementwise
from .reference import Golden, compute_reference
from .reproducer import (
    Reproducer,
    ReproducerInfo,
    read_reproducer,
    reproducer_path,
    write_reproducer,
)
from .runner import BackendCallError, ContractViolation, Invoker, KernelSkipped, RunSettings, run_case
from .spec import Case, OpSpec
from .strategies import (
    MAX_SEED,
    PROPERTY_FAMILY,
    Limits,
    Needs,
    SpecSpace,
    companion_case,
    describe_shape,
    draw_case,
    space_from_specs,
)
from .tolerances import Tolerances
from .transforms import OpCall, Variant

DEFAULT_DATABASE_DIR = Path(".rlk-conform") / "hypothesis"
MAX_PADDING = 64  # masked keys per insertion point: enough to cross a 64-key tile
LARGE_VALUE = 1.0e4  # 'large' padding content: logits far beyond any real key's if it were not masked


# --- profiles --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How big and how many: the tier whose specs span the space, the caps on it, the number of
    examples per property, and whether the search is derandomized (seed 0 unless one is given,
    no example database) or random with its failures kept in the database."""

    name: str
    tier: str
    limits: Limits
    max_examples: int
    derandomized: bool
    device: str | None  # preferred device for the backend; None = the backend's default
    description: str


PROFILES: dict[str, Profile] = {
    "ci": Profile("ci", "standard", Limits(max_batch=4, max_heads=14, max_sq=64, max_skv=200,
                                           max_out_elements=1 << 14, max_score_elements=1 << 18),
                  max_examples=50, derandomized=True, device=None,
                  description="fast and derandomized on the CPU: B <= 4, Hq <= 14, Skv <= 200"),
    # Score elements bound the exact reference's cost per example (its refinement runs on the CPU):
    # 2**24 keeps an example near a second, so 9 properties × 1000 examples fit a night.
    "nightly": Profile("nightly", "full", Limits(max_batch=8, max_heads=32, max_sq=1024, max_skv=8192,
                                                 max_out_elements=1 << 20, max_score_elements=1 << 24),
                       max_examples=1000, derandomized=False, device="cuda",
                       description="thousands of random examples on the GPU, up to 8k keys; failures kept "
                                   "in the example database and tried first next time"),
}


# --- examples and outcomes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One drawn example: the case (inputs = ``make_inputs(case)``) and the property's own draws."""

    prop: str
    case: Case
    params: dict[str, Any]


@dataclass
class Subject:
    """The case's inputs, and its exact reference once someone needs it (computed at most once)."""

    case: Case
    inputs: CaseInputs
    golden: Golden | None = None

    def reference(self, device: str = "cpu") -> Golden:
        if self.golden is None:
            self.golden = compute_reference(self.case, self.inputs, device=device)
        return self.golden


@dataclass
class Outcome:
    """A property's verdict on one example, with the outputs a reproducer stores."""

    verdict: Verdict
    baseline: torch.Tensor | None = None  # the backend's output for the case's own call
    variant: torch.Tensor | None = None  # the output of the call that differed
    variant_label: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict.status in ("fail", "error")


class PropertySkipped(Exception):
    """The backend declines this example (``supports`` or ``KernelUnavailable``); another is drawn."""


class BudgetSpent(unittest.SkipTest):
    """Raised inside the Hypothesis test when the search's time budget is spent. Hypothesis re-raises
    skip exceptions (``unittest.SkipTest`` and pytest's) at once as control exceptions: the run stops
    with no failure, no shrinking and nothing written to the example database. It is raised only
    after the example's draws, so that the run never looks to Hypothesis as if the strategy had
    stopped drawing early (which it reports as flaky data generation)."""


class Counterexample(Exception):
    """Raised inside the Hypothesis test so that it shrinks; carries everything a reproducer needs."""

    def __init__(self, example: Example, subject: Subject, outcome: Outcome) -> None:
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

    def determinism_reruns(self) -> int:
        rule = self.tolerances.invariance_rule("determinism")
        return self.reruns or (rule.reruns if rule is not None and rule.reruns else 5)


@dataclass(frozen=True)
class Property:
    """One property: its check name, what passing means, the ops it needs, and how to draw and check it."""

    name: str
    summary: str
    requires: tuple[str, ...]  # ops the backend must implement for the property to apply at all
    draw: Callable[[st.DataObject, SpecSpace, PropertyContext], Example]
    check: Callable[[PropertyContext, Example, Subject], Outcome]


# --- calls and comparisons -------------------------------------------------------------------------


def own_call(subject: Subject) -> OpCall:
    """The case's own call: its op on its inputs."""
    c, x = subject.case, subject.inputs
    return OpCall(c.op, x.q, x.k, x.v, x.key_padding_mask, c.causal, c.scale, c.s_past or 0)


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
                  s_past=s_past)


def _call(ctx: PropertyContext, call: OpCall) -> torch.Tensor:
    try:
        out, _ = ctx.invoker(ctx.invoker.to_device(call))
    except KernelSkipped as exc:
        raise PropertySkipped(str(exc)) from exc
    return out


def _call_failed(exc: Exception, label: str) -> Outcome:
    status = "error" if isinstance(exc, BackendCallError) else "fail"
    return Outcome(Verdict(status, {"variant": label}, f"{label}: {exc}"), variant_label=label)


def compare(ctx: PropertyContext, check: str, label: str, got: torch.Tensor, want: torch.Tensor) -> Verdict | None:
    """None when ``got`` equals ``want``: bit for bit (judge.bitwise_mismatch), or within the check's
    tolerance when tolerances.yaml gives it a non-zero one. A failing verdict names the variant."""
    rule = ctx.tolerances.invariance_rule(check)
    if rule is not None and (rule.atol > 0 or rule.rtol > 0):
        v = judge_elementwise(got, want.detach().to("cpu", torch.float64).numpy(), rule, label)
        return None if v.status == "pass" else Verdict("fail", {"variant": label, **v.metrics}, v.message)
    mismatch = bitwise_mismatch(got, want)
    if mismatch is None:
        return None
    return Verdict("fail", {"variant": label, **mismatch.metrics()}, f"{label}: {mismatch.describe()}")


def invariance(ctx: PropertyContext, check: str, subject: Subject, variants: Iterable[Variant],
               passed: str) -> Outcome:
    """Run the case's own call, then each variant; the first variant whose rows differ fails."""
    try:
        base = _call(ctx, own_call(subject))
    except (BackendCallError, ContractViolation) as exc:
        return _call_failed(exc, "the case's own call")
    n = 0
    for variant in variants:
        n += 1
        try:
            got = _call(ctx, variant.call)
        except (BackendCallError, ContractViolation) as exc:
            failed = _call_failed(exc, variant.label)
            failed.baseline = base
            return failed
        verdict = compare(ctx, check, variant.label, variant.taken(got), variant.expected(base))
        if verdict is not None:
            return Outcome(verdict, base, got, variant.label)
    return Outcome(Verdict("pass", {"variants": n}, passed), base)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _rows(r0: int, r1: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda out: out[:, :, r0:r1]


# --- the properties ----------------------------------------------------------------------------------


def _draw_accuracy(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    return Example("accuracy", draw_case(data, space, "accuracy", Needs(ops=ctx.ops)), {})


def _check_accuracy(ctx: PropertyContext, ex: Example, subject: Subject) -> Outcome:
    """The run's own accuracy judgment (``run_case``) against the exact reference of the drawn case."""
    golden = subject.reference(ctx.reference_device)
    gc = GoldenCase(path=Path(f"{ex.case.id}.h5"), case=ex.case, inputs=subject.inputs, golden=golden, attrs={})
    settings = RunSettings(tolerances=ctx.tolerances, checks=("accuracy",), rule_set=ctx.rule_set)
    with np.errstate(invalid="ignore"):  # judge_elementwise subtracts -inf from -inf for fully masked rows
        (record,) = run_case(ctx.invoker, gc, settings)
    if record.status == "skip":
        raise PropertySkipped(record.message)
    return Outcome(Verdict(record.status, record.metrics, record.message))


def _draw_batch(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "batch", Needs(ops=ctx.ops, min_batch=2))
    order = data.draw(st.permutations(range(case.batch)), label="batch order")
    keep = data.draw(st.integers(1, case.batch), label="rows in the other batch")
    return Example("batch", case, {"rows": list(order[:keep])})


def _check_batch(ctx: PropertyContext, ex: Example, subject: Subject) -> Outcome:
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
    case = draw_case(data, space, "split", Needs(ops=("kv_cache_attention",), min_sq=2))
    offset = data.draw(st.integers(1, case.sq - 1), label="second split point (offset into the new tokens)")
    p1 = case.s_past or 0
    return Example("split", replace(case, split_points=(p1, p1 + offset)), {"split_points": [p1, p1 + offset]})


def _check_split(ctx: PropertyContext, ex: Example, subject: Subject) -> Outcome:
    """KV-cache op at two split points: the rows both calls compute must be bit-identical."""
    p1, p2 = (int(p) for p in ex.params["split_points"])
    call = own_call(subject)
    off = p2 - p1
    moved = replace(call, q=call.q[:, :, off:], s_past=p2)
    variant = Variant(f"split at S_past={p2} instead of {p1}", moved, _same, _rows(off, call.q.shape[2]))
    return invariance(ctx, "split", subject, [variant], "both split points bit-identical")


def _draw_prefill_decode(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "prefill_decode", Needs(ops=ctx.ops, sq_le_skv=True))
    mode = data.draw(st.sampled_from(["one row", "token by token"]), label="decode")
    one = mode == "one row"
    rows = [data.draw(st.integers(0, case.sq - 1), label="decoded row")] if one else list(range(case.sq))
    return Example("prefill_decode", case, {"mode": mode, "rows": rows})


def _check_prefill_decode(ctx: PropertyContext, ex: Example, subject: Subject) -> Outcome:
    """Rows of the case as single-token KV-cache decodes of their own positions."""
    call = own_call(subject)
    variants = (Variant(f"row {r} of {ex.case.sq} as a one-token decode", rows_call(call, r, r + 1,
                        "kv_cache_attention"), _same, _rows(r, r + 1)) for r in ex.params["rows"])
    return invariance(ctx, "prefill_decode", subject, variants, "decoded rows bit-identical to the prefill")


def _draw_chunk(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "chunk", Needs(ops=ctx.ops, min_sq=2, sq_le_skv=True))
    cuts = data.draw(st.sets(st.integers(1, case.sq - 1), min_size=1, max_size=min(8, case.sq - 1)),
                     label="chunk boundaries")
    op = data.draw(st.sampled_from(sorted(ctx.ops, reverse=True)), label="chunk op")
    return Example("chunk", case, {"boundaries": [0, *sorted(cuts), case.sq], "op": op})


def _check_chunk(ctx: PropertyContext, ex: Example, subject: Subject) -> Outcome:
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
        return case.s_past or 0
    if not case.causal:
        return case.skv
    return min(case.skv, max(0, case.skv - case.sq + 1))


def _draw_padding(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "padding", Needs(ops=ctx.ops))
    layout = data.draw(st.lists(st.tuples(st.integers(0, padding_limit(case)), st.integers(1, MAX_PADDING)),
                                min_size=1, max_size=2), label="padding layout [(position, masked keys)]")
    content = data.draw(st.sampled_from(["copies", "zeros", "reseeded", "large"]), label="padded slot content")
    seed = data.draw(st.integers(0, MAX_SEED), label="padded slot seed") if content == "reseeded" else 0
    return Example("padding", case, {"layout": [list(x) for x in layout], "content": content, "content_seed": seed})


def _padding_content(case: Case, inputs: CaseInputs, content: str, seed: int, n: int) -> tuple[torch.Tensor, ...]:
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


def _check_padding(ctx: PropertyContext, ex: Example, subject: Subject) -> Outcome:
    """Masked keys inserted where no row's window changes (appended to the keys or the cache,
    prepended, between): the output must not change at all."""
    layout = ex.params["layout"]
    n = sum(int(c) for _, c in layout)
    extra_k, extra_v = _padding_content(ex.case, subject.inputs, ex.params["content"],
                                        int(ex.params["content_seed"]), n)
    padded = insert_masked_keys(own_call(subject), layout, extra_k, extra_v)
    where = ", ".join(f"{c} at key {p}" for p, c in sorted(layout))
    variant = Variant(f"{n} masked keys ({ex.params['content']}) inserted: {where}", padded, _same, _same)
    return invariance(ctx, "padding", subject, [variant], "masked keys changed nothing")


PADDED_MASKS = ("right_pad", "left_pad", "holes", "all_masked")


def _draw_nan_padding(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "nan_padding", Needs(ops=ctx.ops, masks=PADDED_MASKS))
    poison = data.draw(st.sampled_from(["keys and values", "values", "keys"]), label="NaN written into")
    return Example("nan_padding", case, {"poison": poison})


def _check_nan_padding(ctx: PropertyContext, ex: Example, subject: Subject) -> Outcome:
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
    case = draw_case(data, space, "determinism", Needs(ops=ctx.ops))
    return Example("determinism", case, {"reruns": ctx.determinism_reruns()})


def _check_determinism(ctx: PropertyContext, ex: Example, subject: Subject) -> Outcome:
    """The same call, again and again: the same bits every time."""
    reruns = max(2, int(ex.params.get("reruns", ctx.determinism_reruns())))
    call = own_call(subject)
    variants = (Variant(f"rerun {i} of {reruns}", call, _same, _same) for i in range(1, reruns))
    return invariance(ctx, "determinism", subject, variants, f"{reruns} runs bit-identical")


def _draw_gqa(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    case = draw_case(data, space, "gqa", Needs(ops=ctx.ops, min_hkv=2))
    kept = data.draw(st.integers(0, case.hkv - 1), label="kept KV head")
    others = data.draw(st.sampled_from(["reseeded", "zeros", "nan"]), label="content of the other KV heads")
    seed = data.draw(st.integers(0, MAX_SEED), label="other KV heads seed") if others == "reseeded" else 0
    return Example("gqa", case, {"kv_head": kept, "others": others, "content_seed": seed})


def _check_gqa(ctx: PropertyContext, ex: Example, subject: Subject) -> Outcome:
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


PROPERTIES: dict[str, Property] = {p.name: p for p in (
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
)}
PROPERTY_NAMES = tuple(PROPERTIES)


def parse_properties(text: str | None) -> tuple[str, ...]:
    """``"batch,split"`` → the named properties; None, empty or ``all`` → every one. Raises
    ``ValueError`` naming the unknown names and the known ones."""
    if text is None or text.strip() in ("", "all"):
        return PROPERTY_NAMES
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in PROPERTIES]
    if unknown or not names:
        raise ValueError(f"unknown propert{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(PROPERTY_NAMES)} or all")
    return names


def evaluate(prop: Property, ctx: PropertyContext, example: Example, subject: Subject) -> Outcome:
    """Check one example. Raises :class:`PropertySkipped` when the backend declines it."""
    reason = skip_reason(ctx.backend, example.case.op, example.case)
    if reason:
        raise PropertySkipped(reason)
    ctx.invoker.violations = []
    return prop.check(ctx, example, subject)


# --- the search ------------------------------------------------------------------------------------

# What ended a property's search (``stopped_by`` in its records).
STOP_MAX_EXAMPLES = "max-examples"  # the examples asked for were judged
STOP_TIME_BUDGET = "time-budget"  # the wall-clock budget was spent first
STOP_COUNTEREXAMPLE = "counterexample"  # a failure was found (then shrunk)
STOP_EXHAUSTED = "exhausted"  # Hypothesis ended earlier: too many declined examples, or none new left
# What ended the shrinking of a counterexample (``shrink_stopped_by``).
SHRINK_DONE = "hypothesis"  # Hypothesis's shrinker ended by itself (nothing smaller fails, or its own limits)
SHRINK_BUDGET = "time-budget"  # twice the budget had passed: the smallest failing example found so far


@dataclass(frozen=True)
class SearchSettings:
    """How to search: the profile, the examples per property, the seed, where the example
    database and the reproducers go, and an optional wall-clock budget per property."""

    profile: Profile = PROFILES["ci"]
    max_examples: int | None = None  # None = the profile's
    seed: int | None = None  # None = 0 for a derandomized profile, else random (with the database)
    database_dir: Path | None = None  # used only by unseeded searches
    reproducer_dir: Path | None = None  # where reproducers go (the CLI: reproducers/); None = none written
    # Seconds per property: no new example starts after it (one in flight finishes); shrinking a
    # counterexample found in time goes on until twice the budget. None = no limit but max_examples.
    time_budget: float | None = None

    @property
    def effective_seed(self) -> int | None:
        if self.seed is not None:
            return self.seed
        return 0 if self.profile.derandomized else None

    @property
    def examples(self) -> int:
        return self.max_examples or self.profile.max_examples


@dataclass
class PropertyResult:
    """The records of one property's search, and its shrunk counterexample when it failed.

    ``examples`` counts every example the backend was given (declined and shrinking ones included);
    ``examples_run`` the examples the search judged (pass or fail) before any shrinking;
    ``stopped_by`` what ended the search (``STOP_*``; None when the property does not apply)."""

    name: str
    records: list[Record]
    examples: int
    counterexample: Counterexample | None = None
    reproducer: Path | None = None
    flaky: bool = False
    examples_run: int = 0
    examples_declined: int = 0
    stopped_by: str | None = None
    elapsed_s: float = 0.0
    shrink_examples: int = 0
    shrink_stopped_by: str | None = None  # SHRINK_*, for a counterexample

    @property
    def status(self) -> str:
        """``fail``/``error`` for a counterexample, ``pass`` when an example held, else ``skip``."""
        if self.counterexample is not None:
            return self.records[0].status if self.records else "fail"
        return "pass" if any(r.status == "pass" for r in self.records) else "skip"

    def summary(self) -> dict[str, Any]:
        """The search's own figures (the JSON report's ``search.results``)."""
        return {"property": self.name, "status": self.status, "examples_run": self.examples_run,
                "examples_declined": self.examples_declined, "stopped_by": self.stopped_by,
                "elapsed_s": round(self.elapsed_s, 3), "shrink_examples": self.shrink_examples,
                "shrink_stopped_by": self.shrink_stopped_by,
                "reproducer": None if self.reproducer is None else str(self.reproducer)}


@dataclass
class _Tally:
    examples: int = 0  # examples the backend was given, declined and shrinking ones included
    run: int = 0  # examples judged before the first failure (that one included)
    shrink_runs: int = 0  # examples judged while shrinking
    passed: Counter[tuple[str, str]] = field(default_factory=Counter)
    margins: dict[tuple[str, str], float] = field(default_factory=dict)  # worst accuracy margin per cell
    skipped: Counter[str] = field(default_factory=Counter)
    last_failure: Counterexample | None = None
    failing: set[tuple[Any, ...]] = field(default_factory=set)  # every failing example seen (_key)
    shrink_cut: bool = False  # the shrink deadline rejected a candidate


def _key(example: Example) -> tuple[Any, ...]:
    return (example.prop, example.case, json.dumps(example.params, sort_keys=True, default=str))


def _seconds(x: float) -> str:
    return f"{x:g} s"


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "backend"


def hypothesis_settings(settings: SearchSettings, prop: str, backend_name: str) -> hypothesis.settings:
    """Hypothesis settings of one search. Unseeded searches keep their failing examples in
    ``<database_dir>/<backend>/<property>`` and try them first next time."""
    database = None
    if settings.effective_seed is None and settings.database_dir is not None:
        database = DirectoryBasedExampleDatabase(str(settings.database_dir / _safe_name(backend_name) / prop))
    # No 'explain' phase: it re-runs the shrunk example many times only to annotate a report.
    phases = [p for p in Phase if p is not Phase.explain]
    return hypothesis.settings(max_examples=settings.examples, deadline=None, database=database, phases=phases,
                               derandomize=False, suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
                               report_multiple_bugs=False, print_blob=False)


def search_property(prop: Property, ctx: PropertyContext, space: SpecSpace, settings: SearchSettings) -> PropertyResult:
    """Search ``prop`` on ``ctx``'s backend; a failure is shrunk, recorded and written as a reproducer."""
    missing = [op for op in prop.requires if op not in ctx.ops]
    if missing:
        msg = f"needs {', '.join(missing)}, which backend {ctx.backend.name} lacks"
        return PropertyResult(prop.name, [_summary_record(prop, "", "", "skip", {}, msg)], 0)
    tally = _Tally()
    budget = settings.time_budget
    start = time.monotonic()
    deadline = None if budget is None else start + budget
    shrink_deadline = None if budget is None else start + 2 * budget

    def body(data: st.DataObject) -> None:
        example = prop.draw(data, space, ctx)  # cheap: choices only, no tensors
        searching = tally.last_failure is None
        if deadline is not None:
            now = time.monotonic()
            if searching and now >= deadline:
                raise BudgetSpent(f"time budget of {_seconds(budget)} spent")
            if not searching and now >= shrink_deadline and _key(example) not in tally.failing:
                tally.shrink_cut = True  # only failures already seen may run (Hypothesis replays its smallest)
                reject()
        subject = Subject(example.case, make_inputs(example.case))
        tally.examples += 1
        try:
            outcome = evaluate(prop, ctx, example, subject)
        except PropertySkipped as exc:
            tally.skipped[str(exc)] += 1
            reject()
        if searching:
            tally.run += 1
        else:
            tally.shrink_runs += 1
        if outcome.failed:
            tally.last_failure = Counterexample(example, subject, outcome)
            tally.failing.add(_key(example))
            raise tally.last_failure
        cell = (example.case.op, example.case.dtype)
        tally.passed[cell] += 1
        margin = outcome.verdict.metrics.get("margin")
        if margin is not None:
            tally.margins[cell] = min(tally.margins.get(cell, float("inf")), float(margin))

    test = hypothesis_settings(settings, prop.name, ctx.backend.name)(hypothesis.given(data=st.data())(body))
    seed = settings.effective_seed
    if seed is not None:
        test = hypothesis.seed(seed)(test)
    found: Counterexample | None = None
    flaky = False
    spent = False
    try:
        test()
    except BudgetSpent:
        spent = True
    except Counterexample as exc:
        found = exc
    except Flaky:
        found, flaky = tally.last_failure, True
    except Unsatisfiable:
        pass
    if found is not None:
        stopped_by = STOP_COUNTEREXAMPLE
    elif spent:
        stopped_by = STOP_TIME_BUDGET
    else:
        stopped_by = STOP_MAX_EXAMPLES if tally.run >= settings.examples else STOP_EXHAUSTED
    result = PropertyResult(prop.name, [], tally.examples, found, flaky=flaky, examples_run=tally.run,
                            examples_declined=sum(tally.skipped.values()), stopped_by=stopped_by,
                            elapsed_s=time.monotonic() - start, shrink_examples=tally.shrink_runs,
                            shrink_stopped_by=None if found is None else
                            (SHRINK_BUDGET if tally.shrink_cut else SHRINK_DONE))
    meta = {"examples": tally.examples, "examples_run": result.examples_run,
            "examples_declined": result.examples_declined, "stopped_by": stopped_by, "time_budget_s": budget,
            "profile": settings.profile.name, "seed": seed}
    if found is not None:
        result.reproducer = _write(found, ctx, settings, space) if settings.reproducer_dir is not None else None
        result.records = [_failure_record(found, result, settings, meta)]
    elif tally.passed:
        cut = (f" (search stopped by its {_seconds(budget)} time budget after {tally.run} examples)"
               if spent and budget is not None else "")
        result.records = [_summary_record(prop, op, dtype, "pass", {**meta, "examples_of_cell": n,
                                          **({"margin": tally.margins[(op, dtype)]} if (op, dtype) in tally.margins
                                             else {})}, f"{n} examples{cut}: {prop.summary}")
                          for (op, dtype), n in sorted(tally.passed.items())]
    else:  # nothing was judged: never a pass
        reasons = "; ".join(f"{n}× {r}" for r, n in tally.skipped.most_common(3))
        if spent and budget is not None:
            msg = f"time budget of {_seconds(budget)} spent before any example ran" + (
                f" ({result.examples_declined} declined: {reasons})" if reasons else "")
        else:
            msg = f"every example skipped: {reasons or 'no example could be drawn'}"
        result.records = [_summary_record(prop, "", "", "skip", meta, msg)]
    return result


def _summary_record(prop: Property, op: str, dtype: str, status: Any, metrics: dict[str, Any], msg: str) -> Record:
    case_id = f"{op or '*'}/{PROPERTY_FAMILY}/{prop.name}"
    return Record(case_id, op or "*", prop.name, status, dtype, f"{PROPERTY_FAMILY}/{prop.name}", metrics, msg)


def _failure_record(found: Counterexample, result: PropertyResult, settings: SearchSettings,
                    meta: dict[str, Any]) -> Record:
    case, verdict = found.example.case, found.outcome.verdict
    metrics = {**verdict.metrics, "parameters": found.example.params, "shape": describe_shape(case), **meta,
               "shrink_examples": result.shrink_examples, "shrink_stopped_by": result.shrink_stopped_by}
    if result.reproducer is not None:
        metrics["reproducer"] = str(result.reproducer)
    flaky = "flaky (failed, then passed when replayed): " if result.flaky else ""
    smallest = ("smallest failing case found before the time budget stopped shrinking"
                if result.shrink_stopped_by == SHRINK_BUDGET else "smallest failing case")
    message = f"{flaky}{verdict.message} — {smallest}: {describe_shape(case)}; {found.example.params}"
    return Record(case.id, case.op, result.name, verdict.status, case.dtype, case.family, metrics, message)


def _write(found: Counterexample, ctx: PropertyContext, settings: SearchSettings, space: SpecSpace) -> Path:
    """Write the counterexample's reproducer (golden format + /reproducer) and return its path."""
    case, outcome = found.example.case, found.outcome
    baseline = outcome.baseline
    if baseline is None:
        try:
            baseline = _call(ctx, own_call(found.subject))
        except (BackendCallError, ContractViolation, PropertySkipped):
            baseline = None  # the backend cannot produce it; the message says why
    device = str(ctx.backend.device)
    info = ReproducerInfo(property=found.example.prop, parameters=found.example.params,
                          hypothesis_seed=settings.effective_seed, profile=settings.profile.name,
                          backend=ctx.backend.name, backend_spec=ctx.backend_spec or ctx.backend.name,
                          backend_device=device, execution_target=execution_target(device),
                          status=outcome.verdict.status, message=outcome.verdict.message,
                          variant=outcome.variant_label)
    assert settings.reproducer_dir is not None
    path = reproducer_path(settings.reproducer_dir, ctx.backend.name, case.id)
    golden = found.subject.reference(ctx.reference_device)
    return write_reproducer(path, case, found.subject.inputs, golden, space.provenance[case.op], info, baseline,
                            outcome.variant)


def check_backend(backend: Any, specs: Sequence[OpSpec], tolerances: Tolerances, names: Sequence[str] = PROPERTY_NAMES,
                  settings: SearchSettings = SearchSettings(), rule_set: str = "default", reruns: int | None = None,
                  reference_device: str = "cpu", backend_spec: str | None = None,
                  on_property: Callable[[PropertyResult], None] | None = None) -> list[PropertyResult]:
    """Search every property in ``names`` on ``backend`` over the space of ``specs`` at the
    profile's tier. Returns one result per property, in order; ``on_property`` sees each as it ends.
    ``backend_spec`` is how the backend was named (recorded in reproducers for ``replay``)."""
    space = space_from_specs(specs, settings.profile.tier, settings.profile.limits)
    ctx = PropertyContext(Invoker(backend), tolerances, rule_set, reruns, reference_device, backend_spec)
    results = []
    for name in names:
        result = search_property(PROPERTIES[name], ctx, space, settings)
        results.append(result)
        if on_property:
            on_property(result)
    return results


@dataclass(frozen=True)
class ReplayResult:
    """A reproducer re-run on a backend: the file, read back, and the property's record now."""

    reproducer: Reproducer
    record: Record

    @property
    def still_fails(self) -> bool:
        return self.record.status in ("fail", "error")


def replay(path: str | Path, backend: Any, tolerances: Tolerances, rule_set: str = "default",
           reruns: int | None = None, reference_device: str = "cpu") -> ReplayResult:
    """Re-run the property of reproducer ``path`` on ``backend`` with the file's own inputs and
    exact reference. Raises :class:`~conformance.errors.GoldenError` for an unreadable file or an
    unknown property."""
    rep = read_reproducer(path)
    prop = PROPERTIES.get(rep.info.property)
    if prop is None:
        raise GoldenError(Path(path), f"unknown property {rep.info.property!r} (this rlk-conform knows "
                          f"{', '.join(PROPERTY_NAMES)})", "reproducer")
    case = rep.case
    ctx = PropertyContext(Invoker(backend), tolerances, rule_set, reruns, reference_device)
    example = Example(prop.name, case, rep.info.parameters)
    subject = Subject(case, rep.golden.inputs, rep.golden.golden)
    missing = [op for op in prop.requires if op not in ctx.ops]
    try:
        if missing:
            raise PropertySkipped(f"needs {', '.join(missing)}, which backend {ctx.backend.name} lacks")
        outcome = evaluate(prop, ctx, example, subject)
    except PropertySkipped as exc:
        outcome = Outcome(Verdict("skip", {}, str(exc)))
    metrics = {**outcome.verdict.metrics, "parameters": example.params, "shape": describe_shape(case),
               "reproducer": str(path)}
    record = Record(case.id, case.op, prop.name, outcome.verdict.status, case.dtype, case.family, metrics,
                    outcome.verdict.message)
    return ReplayResult(rep, record)
