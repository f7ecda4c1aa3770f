"""Hypothesis strategies built from the op specs (``specs/*.yaml``), not written per test.

:func:`space_from_specs` reads the cases one tier of the specs declares and collects the space
they describe: the union of every categorical value (dtypes, head dims, GQA groups, masks,
distributions, causal flags, scales), the range of every length (batch, Sq, Skv, S_past, S_new)
and the lengths the specs list on purpose (63, 65, 129, …), capped by a profile's :class:`Limits`
so the exact reference stays cheap. :func:`draw_case` then draws one :class:`~conformance.spec.Case`
from that space, every draw labelled, under the contract's constraints (``Hq = group · Hkv``,
``Sq = S_new`` for the KV-cache op) and a property's own needs (``sq <= skv``, ``hkv >= 2``, a mask).

A drawn case carries a seed drawn by Hypothesis, and its inputs are ``make_inputs(case)``: a
counterexample is fully described by its case, so a reproducer needs nothing else to replay it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from hypothesis import assume
from hypothesis import strategies as st

from conformance.golden.format import Provenance
from conformance.spec.case import DISTS, DTYPES, MASKS, OPS, Case, case_id, drawn_sinks
from conformance.spec.load import OpSpec

PROPERTY_FAMILY = "property"  # a drawn case's family is "property/<property name>"
MAX_SEED = 2**63 - 1  # case seeds are stored as uint64; spec seeds use 63 bits too
# Soft-caps drawn for a backend that declares softcap: tight (most logits capped) to loose (Gemma 2's 30 and 50).
SOFTCAPS = (1.0, 5.0, 30.0, 50.0)


@dataclass(frozen=True)
class Limits:
    """Caps a profile puts on the space the specs describe (the specs go up to 32k keys)."""

    max_batch: int
    max_heads: int  # Hq
    max_sq: int
    max_skv: int  # also caps S_past + S_new
    max_out_elements: int  # B·Hq·Sq·D: bounds the exact reference's output work
    max_score_elements: int  # B·Hq·Sq·Skv: bounds the float64 score matrix


@dataclass(frozen=True)
class SpecSpace:
    """The parameter space one tier of the specs describes, capped by :class:`Limits`.

    Categorical axes list every value the tier's cases use, simplest first (Hypothesis shrinks
    towards the first); ranges are ``(lowest, highest)`` over the tier's cases, the highest
    capped; ``*_hints`` are the lengths the specs name on purpose, drawn more often than others.
    """

    tier: str
    limits: Limits
    ops: tuple[str, ...]
    dtypes: tuple[str, ...]
    head_dims: tuple[int, ...]
    groups: tuple[int, ...]
    max_hkv: int
    masks: tuple[str, ...]
    dists: tuple[str, ...]
    causal: tuple[bool, ...]
    scales: tuple[float | None, ...]  # None = the default 1/sqrt(D)
    batch: tuple[int, int]
    sq: tuple[int, int]
    skv: tuple[int, int]
    s_past: tuple[int, int]
    s_new: tuple[int, int]
    skv_hints: tuple[int, ...]
    s_past_hints: tuple[int, ...]
    provenance: dict[str, Provenance]  # op → the spec file that describes it

    def describe(self) -> dict[str, object]:
        """The space as JSON-able data (reports, docs)."""
        out = dataclasses.asdict(self)
        out["provenance"] = {op: dataclasses.asdict(p) for op, p in self.provenance.items()}
        return out


def space_from_specs(specs: Sequence[OpSpec], tier: str, limits: Limits, pattern: str = "*") -> SpecSpace:
    """Collect the space the cases of ``tier`` (cumulative) whose id matches the glob ``pattern``
    describe, capped by ``limits``: a pattern such as ``*-d64-*-bf16-*`` keeps a search to the head
    dims and dtypes of those cases (a kernel whose every new configuration is a JIT compile).

    Raises ``ValueError`` when the specs declare no such case in ``tier``.
    """
    cases = [c for spec in specs for c in spec.cases_for_tier(tier) if fnmatchcase(c.id, pattern)]
    if not cases:
        matching = "" if pattern == "*" else f" whose id matches {pattern!r}"
        raise ValueError(f"the specs declare no case{matching} in tier {tier!r}")
    attention = [c for c in cases if c.op == "attention"]
    kv = [c for c in cases if c.op == "kv_cache_attention"]

    def ordered(values: set, order: Sequence) -> tuple:
        return tuple(v for v in order if v in values)

    def capped(values: list[int], cap: int, floor: int) -> tuple[int, int]:
        """The range of ``values`` within the profile's ``cap`` (a range wholly above it becomes the cap)."""
        if not values:
            return floor, floor
        lo = min(min(values), max(cap, floor))
        return lo, max(min(max(values), cap), lo)

    max_heads = limits.max_heads
    groups = sorted({c.group for c in cases if c.group <= max_heads})
    if not groups:
        raise ValueError(f"no GQA group of tier {tier!r} fits --max-heads {max_heads}")
    scales = sorted({c.scale for c in cases if c.scale is not None})
    skv_range = capped([c.skv for c in attention], limits.max_skv, 1)
    s_past_range = capped([c.s_past or 0 for c in kv], limits.max_skv - 1, 0)
    return SpecSpace(
        tier=tier,
        limits=limits,
        ops=ordered({c.op for c in cases}, OPS),
        dtypes=ordered({c.dtype for c in cases}, DTYPES),
        head_dims=tuple(sorted({c.d for c in cases})),
        groups=tuple(groups),
        max_hkv=max(1, min(max(c.hkv for c in cases), max_heads)),
        masks=ordered({c.mask for c in cases}, MASKS),
        dists=ordered({c.dist for c in cases}, DISTS),
        causal=tuple(v for v in (True, False) if any(c.causal == v for c in cases)),
        scales=(None, *scales) if any(c.scale is None for c in cases) else tuple(scales),
        batch=capped([c.batch for c in cases], limits.max_batch, 1),
        sq=capped([c.sq for c in attention], limits.max_sq, 1),
        skv=skv_range,
        s_past=s_past_range,
        s_new=capped([c.s_new or 1 for c in kv], min(limits.max_sq, limits.max_skv), 1),
        skv_hints=tuple(sorted({c.skv for c in attention if skv_range[0] <= c.skv <= skv_range[1]})),
        s_past_hints=tuple(sorted({c.s_past or 0 for c in kv if c.s_past is not None
                                   and c.s_past <= s_past_range[1]})),
        provenance={spec.op: Provenance(spec.path.name, spec.sha256, spec.seed) for spec in specs},
    )


@dataclass(frozen=True)
class Needs:
    """What a property needs of a drawn case, on top of the contract."""

    ops: tuple[str, ...] = OPS
    min_batch: int = 1
    min_hkv: int = 1
    min_sq: int = 1  # also S_new for the KV-cache op
    sq_le_skv: bool = False  # every query row has a position among the keys (prefill, decode, chunks)
    masks: tuple[str, ...] | None = None  # None = every mask of the space
    grad: bool = False  # the case has gradients: make_inputs gives it a seeded grad_out
    variants: tuple[str, ...] = ()  # the attention variants the backend declares: only these are drawn


def _length(data: st.DataObject, label: str, lo: int, hi: int, hints: Sequence[int]) -> int:
    """A length in [lo, hi]: one the specs name on purpose (tile edges) or any other."""
    picks = [h for h in hints if lo <= h <= hi]
    strategy = st.integers(lo, hi)
    if picks:
        strategy = st.one_of(strategy, st.sampled_from(picks))
    return data.draw(strategy, label=label)


def draw_case(data: st.DataObject, space: SpecSpace, name: str, needs: Needs = Needs()) -> Case:
    """Draw one case of property ``name`` from ``space`` (every draw labelled).

    Contract constraints hold by construction: ``hq = group · hkv`` with ``hq <= max_heads``; for
    the KV-cache op ``sq = s_new`` and ``skv = s_past + s_new``. Sizes respect the profile's element
    budgets. Draws that cannot meet ``needs`` in this space are rejected (``hypothesis.assume``).
    """
    lim = space.limits
    ops = [op for op in space.ops if op in needs.ops]
    assume(ops)
    op = data.draw(st.sampled_from(ops), label="op")
    dtype = data.draw(st.sampled_from(space.dtypes), label="dtype")
    d = data.draw(st.sampled_from(space.head_dims), label="head_dim")
    groups = [g for g in space.groups if g * needs.min_hkv <= lim.max_heads]
    assume(groups and space.max_hkv >= needs.min_hkv)
    group = data.draw(st.sampled_from(groups), label="gqa group")
    hkv_hi = min(space.max_hkv, lim.max_heads // group)
    assume(hkv_hi >= needs.min_hkv)
    hkv = data.draw(st.integers(needs.min_hkv, hkv_hi), label="hkv")
    hq = group * hkv
    causal = data.draw(st.sampled_from(space.causal), label="causal")
    scale = data.draw(st.sampled_from(space.scales), label="scale")
    masks = space.masks if needs.masks is None else tuple(m for m in space.masks if m in needs.masks)
    assume(masks)
    mask = data.draw(st.sampled_from(masks), label="key_padding_mask")
    dist = data.draw(st.sampled_from(space.dists), label="value distribution")
    row_width = hq * d
    batch_hi = min(space.batch[1], lim.max_out_elements // (row_width * needs.min_sq))
    assume(batch_hi >= max(space.batch[0], needs.min_batch))
    batch = data.draw(st.integers(max(space.batch[0], needs.min_batch), batch_hi), label="batch")
    rows_hi = lim.max_out_elements // (batch * row_width)  # query rows the output budget allows
    s_past: int | None = None
    if op == "attention":
        skv_lo = max(space.skv[0], needs.min_sq if needs.sq_le_skv else 1)
        assume(skv_lo <= space.skv[1])
        skv = _length(data, "skv", skv_lo, space.skv[1], space.skv_hints)
        sq_hi = min(space.sq[1], rows_hi, lim.max_score_elements // (batch * hq * skv))
        if needs.sq_le_skv:
            sq_hi = min(sq_hi, skv)
        sq_lo = max(space.sq[0], needs.min_sq)
        assume(sq_hi >= sq_lo)
        sq = data.draw(st.integers(sq_lo, sq_hi), label="sq")
    else:
        new_lo = max(space.s_new[0], needs.min_sq)
        new_hi = min(space.s_new[1], rows_hi, lim.max_skv)
        assume(new_hi >= new_lo)
        sq = data.draw(st.integers(new_lo, new_hi), label="s_new")
        past_hi = min(space.s_past[1], lim.max_skv - sq, lim.max_score_elements // (batch * hq * sq) - sq)
        assume(past_hi >= 0)
        s_past = _length(data, "s_past", 0, past_hi, space.s_past_hints)
        skv = s_past + sq
    seed = data.draw(st.integers(0, MAX_SEED), label="input seed")
    window, softcap, sinks = _draw_variants(data, needs.variants, causal, skv)
    return make_case(name, op=op, batch=batch, hq=hq, hkv=hkv, d=d, sq=sq, skv=skv, dtype=dtype, causal=causal,
                     scale=scale, mask=mask, dist=dist, seed=seed, s_past=s_past, tier=space.tier, grad=needs.grad,
                     window=window, softcap=softcap, sinks=drawn_sinks(seed, hq) if sinks else None)


def _draw_variants(data: st.DataObject, declared: Sequence[str], causal: bool,
                   skv: int) -> tuple[tuple[int, int], float | None, bool]:
    """(window, softcap, with sinks) of a drawn case, each only when the backend declares it (every draw
    shrinks to "off"). A window only for causal cases: left in [0, Skv] or unbounded, right 0 or unbounded."""
    window = (-1, -1)
    if "window" in declared and causal and data.draw(st.booleans(), label="sliding window"):
        window = (data.draw(st.one_of(st.just(-1), st.integers(0, skv)), label="window left"),
                  data.draw(st.sampled_from([-1, 0]), label="window right"))
    softcap = data.draw(st.one_of(st.none(), st.sampled_from(SOFTCAPS)), label="softcap") if "softcap" in declared \
        else None
    sinks = "sinks" in declared and data.draw(st.booleans(), label="sinks (seeded, one per query head)")
    return window, softcap, sinks


def make_case(name: str, *, op: str, batch: int, hq: int, hkv: int, d: int, sq: int, skv: int, dtype: str,
              causal: bool, scale: float | None, mask: str, dist: str, seed: int, s_past: int | None = None,
              split_points: tuple[int, ...] = (), tier: str = "standard", grad: bool = False,
              window: tuple[int, int] = (-1, -1), softcap: float | None = None,
              sinks: tuple[float, ...] | None = None) -> Case:
    """A case of family ``property/<name>`` whose id spells out every parameter and the seed
    (sinks, when given, are the seeded ``drawn_sinks(seed, hq)``, tagged ``sinks`` as a spec's).

    The id follows the spec's pattern (docs/golden-format.md) with ``-seed<seed>`` appended: the
    seed is drawn, not derived from the id, so it must be part of the key.
    """
    if op == "kv_cache_attention" and not split_points:
        split_points = (s_past or 0,)
    family = f"{PROPERTY_FAMILY}/{name}"
    cid = case_id(op, family, model=f"hq{hq}-hkv{hkv}-d{d}", batch=batch, sq=sq, skv=skv, s_past=s_past, dtype=dtype,
                  causal=causal, mask=mask, dist=dist, scale=scale, seed=seed, grad=grad, window=window,
                  softcap=softcap, sinks=sinks)
    return Case(id=cid, op=op, family=family, tier=tier,
                batch=batch, hq=hq, hkv=hkv, d=d, sq=sq, skv=skv, dtype=dtype, causal=causal, scale=scale,
                mask=mask, dist=dist, seed=seed, s_past=s_past, split_points=split_points, grad=grad,
                window=window, softcap=softcap, sinks=sinks)


def companion_case(case: Case, seed: int, skv: int | None = None) -> Case:
    """Another sequence like ``case`` (same heads, head dim, dtype, distribution), drawn from ``seed``:
    new content for padded slots or replaced KV heads. ``skv`` sets its key length; no mask."""
    return make_case(case.family.removeprefix(f"{PROPERTY_FAMILY}/") + "-companion", op="attention",
                     batch=case.batch, hq=case.hq, hkv=case.hkv, d=case.d, sq=case.sq,
                     skv=case.skv if skv is None else skv, dtype=case.dtype, causal=case.causal, scale=case.scale,
                     mask="none", dist=case.dist, seed=seed, tier=case.tier)


def describe_shape(case: Case) -> str:
    """One line naming a case's shape, for messages: ``attention B=3 Hq/Hkv=8/1 D=64 Sq=1 Skv=17 bfloat16 …``."""
    keys = f"Skv={case.skv}" if case.s_past is None else f"S_past={case.s_past} S_new={case.s_new}"
    scale = "" if case.scale is None else f" scale={case.scale}"
    return (f"{case.op} B={case.batch} Hq/Hkv={case.hq}/{case.hkv} D={case.d} Sq={case.sq} {keys} {case.dtype} "
            f"{'causal' if case.causal else 'non-causal'} mask={case.mask} dist={case.dist}{scale} seed={case.seed}")
