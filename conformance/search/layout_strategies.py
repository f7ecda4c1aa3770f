"""Hypothesis strategies of the packed and paged layouts: a pack composition (how many sequences, their
query and key lengths, their order), a page size and a block-table permutation, drawn over the model
axes of the specs' space (:class:`~conformance.search.strategies.SpecSpace`).

A composition is a tuple of pack tokens (``1x129+7x17``, :mod:`conformance.spec.layouts`), composed as
``rlk-conform run`` composes a layout case: each token's sequences are batch entries of a dense case of
that ``(sq, skv)`` (:func:`member_cases`, made with the drawn seed), so the layout case's exact outputs
are those cases' references. Lengths are drawn anywhere up to the profile's key cap and more often on
both sides of the 16-, 64- and 128-row tile edges; one long sequence may be put among many short ones.
A backend that declares the sliding window also gets causal packs with a window (every sequence
the same ``(left, 0)``, left anywhere up to the key cap or beside a tile edge), as the specs'
``layouts-window`` families compose them. Hypothesis shrinks towards fewer tokens, one sequence per
token, shorter lengths, prefills, no window, the first page size and the reversed block table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from hypothesis import assume
from hypothesis import strategies as st

from conformance.search.strategies import MAX_SEED, PROPERTY_FAMILY, SpecSpace, make_case
from conformance.spec.case import Case
from conformance.spec.layouts import PAGED, LayoutCase, PackToken, compose

TILE_EDGES = (16, 64, 128)
LENGTH_HINTS = tuple(e + step for e in TILE_EDGES for step in (-1, 0, 1))  # 15, 16, 17, 63, …, 129
MAX_TOKENS = 4  # pack tokens besides the long sequence
MAX_COUNT = 8  # sequences of one token
SHORT_MAX = 33  # the short sequences' longest keys when one long sequence is among them
PAGE_SIZES = (16, 1, 5)  # the specs' page sizes, simplest first; 5 is not a power of two
MAX_PAGE_SIZE = 48
MAX_OTHER_PAGE_SIZES = 2  # page sizes the ``page`` check also lays the pack out in
BLOCK_TABLES = ("reversed", "rotated", "shuffled")


@dataclass(frozen=True)
class LayoutModel:
    """What every sequence of a layout case shares (``conformance.spec.layouts.layout_group``)."""

    hq: int
    hkv: int
    d: int
    dtype: str
    causal: bool
    scale: float | None
    dist: str
    window: tuple[int, int] = (-1, -1)

    @staticmethod
    def of(case: LayoutCase) -> LayoutModel:
        return LayoutModel(case.hq, case.hkv, case.d, case.dtype, case.causal, case.scale, case.dist,
                           tuple(case.window))  # type: ignore[arg-type]


def draw_model(data: st.DataObject, space: SpecSpace, variants: Sequence[str] = ()) -> LayoutModel:
    """Heads, head dim, dtype, causal flag, scale and distribution from the specs' space (no mask: the
    layouts have none), and a causal sliding window when ``variants`` (the backend's) has ``window``."""
    dtype = data.draw(st.sampled_from(space.dtypes), label="dtype")
    d = data.draw(st.sampled_from(space.head_dims), label="head_dim")
    group = data.draw(st.sampled_from(space.groups), label="gqa group")
    hkv = data.draw(st.integers(1, max(1, min(space.max_hkv, space.limits.max_heads // group))), label="hkv")
    causal = data.draw(st.sampled_from(space.causal), label="causal")
    scale = data.draw(st.sampled_from(space.scales), label="scale")
    dist = data.draw(st.sampled_from(space.dists), label="value distribution")
    window = (-1, -1)
    if "window" in variants and causal and data.draw(st.booleans(), label="sliding window"):
        window = (_length(data, "window left", 0, max_keys(space)), 0)
    return LayoutModel(group * hkv, hkv, d, dtype, causal, scale, dist, window)


def max_keys(space: SpecSpace) -> int:
    """The longest sequence a drawn pack may have: the specs' longest keys within the profile's cap."""
    return max(1, min(space.skv[1], space.limits.max_skv))


def _length(data: st.DataObject, label: str, lo: int, hi: int) -> int:
    """Keys of a sequence in [lo, hi]: any, or one beside a tile edge."""
    picks = [h for h in LENGTH_HINTS if lo <= h <= hi]
    strategy = st.integers(lo, hi)
    if picks:
        strategy = st.one_of(strategy, st.sampled_from(picks))
    return data.draw(strategy, label=label)


def _queries(data: st.DataObject, label: str, skv: int) -> int:
    """Query rows of a sequence of ``skv`` keys (its last positions): a prefill, a decode or a chunk."""
    kind = data.draw(st.sampled_from(("prefill", "decode", "chunk")), label=f"{label} queries")
    if kind == "prefill" or skv == 1:
        return skv
    return 1 if kind == "decode" else data.draw(st.integers(1, skv), label=f"{label} query rows")


def draw_tokens(data: st.DataObject, space: SpecSpace, model: LayoutModel) -> tuple[PackToken, ...]:
    """A pack composition within the profile's budgets (``B·Hq·Sq·D`` and ``B·Hq·Sq·Skv`` summed over the
    sequences). Tokens whose sequences no longer fit lose sequences; the pack has at least one."""
    lim = space.limits
    max_len = max_keys(space)
    rows_left = lim.max_out_elements // (model.hq * model.d)
    scores_left = lim.max_score_elements // model.hq
    with_long = data.draw(st.booleans(), label="one long sequence among short ones")
    short_max = min(SHORT_MAX, max_len) if with_long else max_len
    n = data.draw(st.integers(1, MAX_TOKENS), label="pack tokens")
    drawn = []
    for i in range(n):
        skv = _length(data, f"token {i} keys", 1, short_max)
        sq = _queries(data, f"token {i}", skv)
        count = data.draw(st.integers(1, MAX_COUNT), label=f"token {i} sequences")
        drawn.append(PackToken(count, sq, skv))
    if with_long and max_len > short_max:
        skv = _length(data, "long sequence keys", short_max + 1, max_len)
        token = PackToken(1, _queries(data, "long sequence", skv), skv)
        drawn.insert(data.draw(st.integers(0, n), label="long sequence place"), token)
    tokens = []
    for token in drawn:  # the budgets keep the exact reference cheap; what does not fit is left out
        count = min(token.count, rows_left // token.sq, scores_left // (token.sq * token.skv))
        if count > 0:
            tokens.append(replace(token, count=count))
            rows_left -= count * token.sq
            scores_left -= count * token.sq * token.skv
    assume(tokens)
    return tuple(tokens)


def _page_sizes() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(PAGE_SIZES), st.integers(2, MAX_PAGE_SIZE))


def draw_page_size(data: st.DataObject) -> int:
    return data.draw(_page_sizes(), label="page size")


def draw_other_page_sizes(data: st.DataObject, page_size: int) -> tuple[int, ...]:
    """The page sizes the ``page`` check also lays the pack out in (none, one or two)."""
    drawn = data.draw(st.lists(_page_sizes(), max_size=MAX_OTHER_PAGE_SIZES, unique=True), label="other page sizes")
    return tuple(p for p in drawn if p != page_size)


def draw_block_table(data: st.DataObject, n_pages: int) -> dict[str, Any]:
    """How the ``page`` check permutes the pool's ``n_pages`` pages: reversed, rotated or shuffled (seeded)."""
    kind = data.draw(st.sampled_from(BLOCK_TABLES), label="block table permutation")
    if kind == "rotated":
        return {"kind": kind, "by": data.draw(st.integers(1, max(1, n_pages - 1)), label="rotated by")}
    if kind == "shuffled":
        return {"kind": kind, "seed": data.draw(st.integers(0, 2**32 - 1), label="shuffle seed")}
    return {"kind": kind}


def block_table_order(block_table: dict[str, Any], n_pages: int) -> list[int]:
    """The permutation of :func:`draw_block_table`: physical page ``order[j]`` holds logical page ``j``."""
    kind = block_table["kind"]
    if kind == "reversed":
        return list(range(n_pages - 1, -1, -1))
    if kind == "rotated":
        by = int(block_table["by"]) % n_pages
        return [(j + by) % n_pages for j in range(n_pages)]
    if kind == "shuffled":
        return torch.randperm(n_pages, generator=torch.Generator().manual_seed(int(block_table["seed"]))).tolist()
    raise ValueError(f"unknown block table permutation {kind!r}; choose from {', '.join(BLOCK_TABLES)}")


def page_count_of(tokens: Sequence[PackToken], page_size: int) -> int:
    """Pages of the pool a paged call of ``tokens`` has (``judge.layout_calls.page_count``)."""
    return sum(t.count * -(-t.skv // page_size) for t in tokens) + 1


def member_cases(name: str, tier: str, model: LayoutModel, tokens: Sequence[PackToken],
                 seed: int) -> dict[tuple[int, int], Case]:
    """The dense cases a composition's sequences come from: one per ``(sq, skv)``, with a batch entry for
    each of its sequences, seeded from ``seed`` (the n-th shape: ``seed + n``)."""
    counts: dict[tuple[int, int], int] = {}
    for t in tokens:
        counts[(t.sq, t.skv)] = counts.get((t.sq, t.skv), 0) + t.count
    return {(sq, skv): make_case(f"{name}-member", op="attention", batch=b, hq=model.hq, hkv=model.hkv, d=model.d,
                                 sq=sq, skv=skv, dtype=model.dtype, causal=model.causal, scale=model.scale,
                                 mask="none", dist=model.dist, seed=(seed + i) % (MAX_SEED + 1), tier=tier,
                                 window=model.window)
            for i, ((sq, skv), b) in enumerate(counts.items())}


def compose_drawn(name: str, op: str, tier: str, model: LayoutModel, tokens: tuple[PackToken, ...], seed: int,
                  page_size: int | None = None, page_sizes: tuple[int, ...] = ()) -> LayoutCase:
    """The layout case of a drawn composition, composed as the run composes one (family
    ``property/<name>``, the seed appended to its id as a drawn dense case's is)."""
    members = member_cases(name, tier, model, tokens, seed)
    case = compose(op, f"{PROPERTY_FAMILY}/{name}", tier, tokens, members, seed,
                   page_size if op == PAGED else None, page_sizes if op == PAGED else ())
    return replace(case, id=f"{case.id}-seed{seed}")
