"""Invariance transforms: rewrite one golden case's inputs by slicing and concatenating (never by
drawing new data) into calls whose outputs must equal rows of the original output bit for bit.

Each transform yields :class:`Variant` values: the call to make, and which rows of the case's own
output (``expected``) the variant's output (``taken``) must reproduce.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from conformance.judge.layout_calls import LayoutCall
from conformance.spec.case import Case


@dataclass(frozen=True)
class OpCall:
    """One call of an op. ``k``/``v`` hold all keys; for the KV-cache op the first ``s_past`` are the cache.
    ``window``, ``softcap`` and ``sinks`` are the attention variants (CONTRACT terms in docs/backends.md)."""

    op: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None
    causal: bool
    scale: float | None
    s_past: int = 0
    window: tuple[int, int] = (-1, -1)
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # float32 [Hq]

    @property
    def skv(self) -> int:
        return self.k.shape[2]

    def variant_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the variants this call uses (none for a plain call, so that a
        backend without the variant keywords keeps working on plain cases)."""
        kwargs: dict[str, Any] = {}
        if self.window != (-1, -1):
            kwargs["window_size"] = self.window
        if self.softcap is not None:
            kwargs["softcap"] = self.softcap
        if self.sinks is not None:
            kwargs["sinks"] = self.sinks
        return kwargs

    def variants(self) -> dict[str, Any]:
        """The variant fields, to carry into another call of the same case."""
        return {"window": self.window, "softcap": self.softcap, "sinks": self.sinks}


@dataclass(frozen=True)
class Variant:
    label: str
    call: OpCall | LayoutCall  # a dense op's call, or a packed or paged layout's
    taken: Callable[[torch.Tensor], torch.Tensor]  # variant output → rows to compare
    expected: Callable[[torch.Tensor], torch.Tensor]  # original output → the same rows
    metrics: dict[str, Any] | None = None  # what a failure's metrics name the variant by; None: {"variant": label}


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _mask_rows(mask: torch.Tensor | None, idx: torch.Tensor | slice) -> torch.Tensor | None:
    return None if mask is None else mask[idx]


def batch_variants(call: OpCall, max_alone: int = 8) -> Iterator[Variant]:
    """Each row alone (batch 1), the batch reversed, and the batch followed by its reverse (2B rows:
    every row with new neighbours at a new position)."""
    b = call.q.shape[0]
    for i in range(min(b, max_alone)):
        sl = slice(i, i + 1)
        alone = replace(call, q=call.q[sl], k=call.k[sl], v=call.v[sl], key_padding_mask=_mask_rows(
            call.key_padding_mask, sl))
        yield Variant(f"row {i} alone (batch 1 of {b})", alone, _same, lambda o, sl=sl: o[sl])
    if b > 1:
        rev = torch.arange(b - 1, -1, -1, device=call.q.device)
        perm = replace(call, q=call.q[rev], k=call.k[rev], v=call.v[rev],
                       key_padding_mask=_mask_rows(call.key_padding_mask, rev))
        yield Variant(f"batch of {b} reversed", perm, lambda o, rev=rev: o[rev], _same)
    both = torch.cat([torch.arange(b, device=call.q.device), torch.arange(b - 1, -1, -1, device=call.q.device)])
    doubled = replace(call, q=call.q[both], k=call.k[both], v=call.v[both],
                      key_padding_mask=_mask_rows(call.key_padding_mask, both))
    yield Variant(f"batch of {2 * b} (batch then its reverse)", doubled, lambda o, b=b: o[:b], _same)


def split_variants(call: OpCall, case: Case) -> Iterator[Variant]:
    """KV-cache op at each other split point: positions p.. are new, the rest cached; the rows of
    the new queries must equal the matching rows of the original call."""
    if call.op != "kv_cache_attention":
        return
    for p in case.split_points:
        if p == call.s_past:
            continue
        first = p - call.s_past  # row of the original q at position p
        moved = replace(call, q=call.q[:, :, first:], s_past=p)
        yield Variant(f"split at S_past={p}", moved, _same, lambda o, first=first: o[:, :, first:])


def _decode_call(call: OpCall, row: int) -> OpCall:
    """Single-token KV-cache decode reproducing query ``row`` of ``call``."""
    sq = call.q.shape[2]
    pos = row + call.skv - sq  # the row's position among the keys (bottom-right alignment)
    # Causal: keys 0..pos are visible and key pos is the new token. Otherwise every key is
    # visible and the last one plays the new token.
    last = pos + 1 if call.causal else call.skv
    mask = None if call.key_padding_mask is None else call.key_padding_mask[:, :last]
    return OpCall("kv_cache_attention", call.q[:, :, row:row + 1], call.k[:, :, :last], call.v[:, :, :last], mask,
                  call.causal, call.scale, s_past=last - 1, **call.variants())


def sampled_rows(sq: int, limit: int = 4) -> list[int]:
    rows = sorted({0, 1, sq // 2, sq - 2, sq - 1} & set(range(sq)))
    return rows if len(rows) <= limit else [rows[0], rows[len(rows) // 3], rows[2 * len(rows) // 3], rows[-1]]


def prefill_decode_variants(call: OpCall) -> Iterator[Variant]:
    """Rows of a prefill (or chunk) call against single-token KV-cache decode of the same positions."""
    sq = call.q.shape[2]
    if sq > call.skv or (call.op == "kv_cache_attention" and sq == 1):
        return
    if not call.causal and call.window != (-1, -1):
        return  # the non-causal decode makes the row the last position: a window would move with it
    for row in sampled_rows(sq):
        yield Variant(f"row {row} as a one-token decode", _decode_call(call, row), _same,
                      lambda o, row=row: o[:, :, row:row + 1])


def chunk_boundaries(sq: int) -> list[int]:
    return sorted({0, sq // 3, (2 * sq) // 3, sq})


def chunk_variants(call: OpCall) -> Iterator[Variant]:
    """Chunked prefill: the query rows in three chunks, each seeing exactly the keys it saw in one shot."""
    sq = call.q.shape[2]
    if sq < 2 or sq > call.skv or (call.op == "kv_cache_attention" and not call.causal):
        return
    if not call.causal and call.window != (-1, -1):
        return  # a non-causal chunk keeps every key and so moves its rows' diagonal (and window)
    bounds = chunk_boundaries(sq)
    for c0, c1 in itertools.pairwise(bounds):
        if c1 <= c0:
            continue
        rows = call.q[:, :, c0:c1]
        if call.causal:
            last = c1 + call.skv - sq  # bottom-right: the chunk's last row sees keys < last
            mask = None if call.key_padding_mask is None else call.key_padding_mask[:, :last]
            if call.op == "kv_cache_attention":
                chunk = OpCall(call.op, rows, call.k[:, :, :last], call.v[:, :, :last], mask, True, call.scale,
                               s_past=c0 + call.skv - sq, **call.variants())
            else:
                chunk = OpCall(call.op, rows, call.k[:, :, :last], call.v[:, :, :last], mask, True, call.scale,
                               **call.variants())
        else:
            chunk = replace(call, q=rows)
        yield Variant(f"chunk rows {c0}:{c1} of {sq}", chunk, _same, lambda o, c0=c0, c1=c1: o[:, :, c0:c1])


def padding_variants(call: OpCall, extra: int = 7) -> Iterator[Variant]:
    """Masked keys added around the real ones: prepended (every op; the bottom-right causal window
    keeps the same real keys) and, without the causal mask, appended to the attention op's keys.
    The extra keys and values are copies of existing ones, so real data sits in the padded slots."""
    n = min(extra, call.skv)
    b = call.q.shape[0]
    pad_mask = torch.zeros(b, n, dtype=torch.bool, device=call.q.device)
    mask = call.key_padding_mask if call.key_padding_mask is not None else torch.ones(
        b, call.skv, dtype=torch.bool, device=call.q.device)
    ek, ev = call.k[:, :, :n], call.v[:, :, :n]
    pre = replace(call, k=torch.cat([ek, call.k], 2), v=torch.cat([ev, call.v], 2),
                  key_padding_mask=torch.cat([pad_mask, mask], 1),
                  s_past=call.s_past + n if call.op == "kv_cache_attention" else 0)
    yield Variant(f"{n} masked keys prepended", pre, _same, _same)
    if call.op == "attention" and not call.causal and call.window == (-1, -1):  # appended keys move the diagonal
        post = replace(call, k=torch.cat([call.k, ek], 2), v=torch.cat([call.v, ev], 2),
                       key_padding_mask=torch.cat([mask, pad_mask], 1))
        yield Variant(f"{n} masked keys appended", post, _same, _same)
