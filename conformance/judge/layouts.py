"""Invariance transforms of the packed and paged layouts: each rewrites a layout case's sequences
(by indexing and copying, never by drawing new data) into calls whose rows must equal rows of the
case's own output bit for bit.

- ``pack``: a sequence alone, the pack reversed (every sequence elsewhere), the pack after its own
  reverse (new neighbours, new positions);
- ``page``: every other page size of the family, a permuted block table, other garbage (±1e4,
  copies of real keys) in the slots no sequence owns instead of NaN;
- ``split``: each sequence with fewer query rows and a longer cached prefix (half of its queries,
  then only the last);
- ``prefill_decode``: across layouts: a packed case's rows decoded one token each from a paged
  cache, and a paged case's rows as rows of the packed prefill of its whole sequences.

Every variant keeps the case's sliding window: each rewrite keeps every remaining row's bottom-right
diagonal, so the window selects the same keys (the one that cannot, a non-causal decode, is left out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch

from conformance.judge.layout_calls import PAGED, VARLEN, LayoutCall, Seq, layout_call, page_count
from conformance.judge.transforms import Variant

DECODE_PAGE_SIZE = 16  # page size of the paged decodes that reproduce a packed case's rows


def _cat_rows(call: LayoutCall, out: torch.Tensor, order: Sequence[int],
              skip: Sequence[int] | None = None) -> torch.Tensor:
    """Rows of sequences ``order`` (each from row ``skip[i]`` on) of ``out``, concatenated."""
    return torch.cat([call.rows(out, i)[(skip[k] if skip else 0):] for k, i in enumerate(order)])


def sampled_sequences(seqs: Sequence[Seq], limit: int = 4) -> list[int]:
    """The sequences judged alone: the longest, the shortest, the first and the last (each once)."""
    n = len(seqs)
    longest = max(range(n), key=lambda i: (seqs[i].skv, seqs[i].sq, -i))
    shortest = min(range(n), key=lambda i: (seqs[i].skv, seqs[i].sq, i))
    return list(dict.fromkeys([longest, shortest, 0, n - 1]))[:limit]


def pack_variants(base: LayoutCall, seqs: Sequence[Seq]) -> Iterator[Variant]:
    """Each sampled sequence alone, the pack reversed, and the pack after its reverse (2n sequences)."""
    n = len(seqs)

    def same_kind(others: Sequence[Seq]) -> LayoutCall:
        return layout_call(base.op, others, base.causal, base.scale, base.page_size, window=base.window)

    for i in sampled_sequences(seqs):
        alone = same_kind([seqs[i]])
        yield Variant(f"sequence {i} alone (pack of 1 of {n})", alone, lambda o: o,
                      lambda o, i=i: base.rows(o, i), {"variant": f"sequence {i} alone", "sequence": i})
    if n > 1:
        rev = same_kind(list(reversed(seqs)))
        yield Variant(f"pack of {n} reversed", rev, lambda o, rev=rev: _cat_rows(rev, o, range(n - 1, -1, -1)),
                      lambda o: o)
    doubled = same_kind([*reversed(seqs), *seqs])
    yield Variant(f"pack of {2 * n} (its reverse, then the pack)", doubled,
                  lambda o, c=doubled: _cat_rows(c, o, range(n, 2 * n)), lambda o: o)


def page_variants(base: LayoutCall, seqs: Sequence[Seq], page_sizes: Sequence[int], seed: int,
                  order: Sequence[int] | None = None) -> Iterator[Variant]:
    """Every other page size, a permuted block table, and other garbage in the unused slots. The
    permutation is ``order`` (of the pool's pages, see :func:`paged_call`), else drawn from ``seed``."""
    if base.op != PAGED or base.page_size is None:
        return
    for size in page_sizes:
        if size != base.page_size:
            yield Variant(f"page size {size} instead of {base.page_size}",
                          layout_call(PAGED, seqs, base.causal, base.scale, size, window=base.window),
                          lambda o: o, lambda o: o)
    if order is None:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(page_count(seqs, base.page_size), generator=g).tolist()
    yield Variant("block table permuted (pages scattered over the pool)",
                  layout_call(PAGED, seqs, base.causal, base.scale, base.page_size, order, window=base.window),
                  lambda o: o, lambda o: o)
    for fill, what in (("large", "±1e4"), ("copies", "copies of real keys")):
        yield Variant(f"unused page slots hold {what} instead of NaN",
                      layout_call(PAGED, seqs, base.causal, base.scale, base.page_size, fill=fill,
                                  window=base.window),
                      lambda o: o, lambda o: o)


def split_variants(base: LayoutCall, seqs: Sequence[Seq]) -> Iterator[Variant]:
    """Each sequence with its first query rows moved into the cached prefix: half of them, then all but
    the last; the remaining rows must not change."""
    rules: tuple[tuple[str, Callable[[int], int]], ...] = (
        ("half of each sequence's queries", lambda sq: sq // 2), ("only each sequence's last query", lambda sq: sq - 1))
    seen: set[tuple[int, ...]] = set()
    for label, rule in rules:
        skip = [rule(s.sq) for s in seqs]
        if not any(skip) or tuple(skip) in seen:
            continue
        seen.add(tuple(skip))
        moved = [replace(s, q=s.q[o:]) for s, o in zip(seqs, skip)]
        call = layout_call(base.op, moved, base.causal, base.scale, base.page_size, window=base.window)
        yield Variant(f"split moved: {label} (the rest cached)", call,
                      lambda o, c=call: _cat_rows(c, o, range(len(seqs))),
                      lambda o, skip=skip: _cat_rows(base, o, range(len(seqs)), skip))


def prefill_decode_variants(base: LayoutCall, seqs: Sequence[Seq]) -> Iterator[Variant]:
    """Across layouts. A packed case: its last rows, then its middle rows, decoded one token per
    sequence from a paged cache. A paged case: its rows as the last rows of the packed prefill of each
    whole sequence (the earlier positions' queries are copies of its own rows: only their keys matter)."""
    n = len(seqs)
    if base.op == VARLEN:
        if not base.causal and base.window != (-1, -1):
            return  # a non-causal decode keeps every key, so its row's diagonal (and window) would move
        picks = (("last", lambda sq: sq - 1), ("middle", lambda sq: sq // 2))
        seen: set[tuple[int, ...]] = set()
        for label, pick in picks:
            rows = [pick(s.sq) for s in seqs]
            if tuple(rows) in seen:
                continue
            seen.add(tuple(rows))
            decodes = []
            for s, r in zip(seqs, rows):
                last = r + s.skv - s.sq + 1 if base.causal else s.skv
                decodes.append(Seq(s.q[r:r + 1], s.k[:last], s.v[:last]))
            call = layout_call(PAGED, decodes, base.causal, base.scale, DECODE_PAGE_SIZE, window=base.window)
            yield Variant(f"each sequence's {label} row as a one-token decode from a paged cache "
                          f"(page size {DECODE_PAGE_SIZE})", call, lambda o: o,
                          lambda o, rows=rows: torch.cat([base.rows(o, i)[r:r + 1] for i, r in enumerate(rows)]))
        return
    filled = []
    for s in seqs:
        extra = s.skv - s.sq
        filler = s.q[torch.arange(extra) % s.sq]
        filled.append(Seq(torch.cat([filler, s.q]), s.k, s.v))
    call = layout_call(VARLEN, filled, base.causal, base.scale, window=base.window)
    skip = [s.skv - s.sq for s in seqs]
    yield Variant("the rows as the last rows of the packed prefill of each whole sequence", call,
                  lambda o, c=call, skip=skip: _cat_rows(c, o, range(n), skip), lambda o: o)


def determinism_variants(base: LayoutCall, reruns: int) -> Iterator[Variant]:
    for i in range(1, reruns):
        yield Variant(f"rerun {i} of {reruns}", base, lambda o: o, lambda o: o, {"rerun": i})
