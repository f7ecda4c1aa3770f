"""One call of a layout op (packed ``varlen_attention`` or paged ``paged_kv_attention``) and how it
is built from sequences: packing them (``cu_seqlens``) or laying their keys out in pages (block
table, ``seq_lens``, NaN in every slot no sequence owns). Built by indexing and copying the
sequences' own tensors, never by drawing new data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from conformance.spec.case import LAYOUT_OPS

VARLEN, PAGED = LAYOUT_OPS
#: Axis names of a layout output's rows [total_q, Hq, D] (the compared sequences' rows, in order).
LAYOUT_AXES = ("row", "h", "d")
UNUSED_SLOT_FILL = float("nan")  # what the unused page slots hold in a layout case's own call
LARGE_GARBAGE = 1.0e4  # other garbage for the unused slots: logits far beyond any real key's


@dataclass(frozen=True)
class Seq:
    """One sequence: ``q [sq, Hq, D]`` (its last ``sq`` positions), ``k, v [skv, Hkv, D]``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @property
    def sq(self) -> int:
        return self.q.shape[0]

    @property
    def skv(self) -> int:
        return self.k.shape[0]


@dataclass(frozen=True)
class LayoutCall:
    """One call of a layout op; ``tensors`` are its positional arguments after ``q`` in the order of
    docs/backends.md#layouts (varlen: k, v, cu_seqlens_q, cu_seqlens_k; paged: k_pages, v_pages,
    block_table, seq_lens, cu_seqlens_q). ``q_offsets`` are the sequences' query rows in ``q`` and in
    the output. ``window`` is the sliding window of every sequence (docs/backends.md#layouts), passed
    as ``window_size`` only when bounded, so a backend without the window keyword keeps working on
    plain calls."""

    op: str
    q: torch.Tensor
    tensors: tuple[torch.Tensor, ...]
    q_offsets: tuple[int, ...]
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    scale: float | None
    page_size: int | None = None
    window: tuple[int, int] = (-1, -1)

    @property
    def n(self) -> int:
        return len(self.q_offsets) - 1

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.q, *self.tensors)

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_seqlen_q": self.max_seqlen_q, "max_seqlen_k": self.max_seqlen_k,
                                  "causal": self.causal, "scale": self.scale}
        if self.window != (-1, -1):
            kwargs["window_size"] = self.window
        return kwargs

    def names(self) -> tuple[str, ...]:
        if self.op == VARLEN:
            return ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")
        return ("q", "k_pages", "v_pages", "block_table", "seq_lens", "cu_seqlens_q")

    def to(self, device: torch.device) -> LayoutCall:
        return replace(self, q=self.q.to(device), tensors=tuple(t.to(device) for t in self.tensors))

    def rows(self, out: torch.Tensor, i: int) -> torch.Tensor:
        """Sequence ``i``'s rows of an output ``[total_q, Hq, D]``."""
        return out[self.q_offsets[i]:self.q_offsets[i + 1]]


def _offsets(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def pack_call(seqs: Sequence[Seq], causal: bool, scale: float | None,
              window: tuple[int, int] = (-1, -1)) -> LayoutCall:
    """The sequences as one packed batch (``varlen_attention``), each with the sliding window ``window``."""
    cq, ck = _offsets([s.sq for s in seqs]), _offsets([s.skv for s in seqs])
    tensors = (torch.cat([s.k for s in seqs]), torch.cat([s.v for s in seqs]),
               torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32))
    return LayoutCall(VARLEN, torch.cat([s.q for s in seqs]), tensors, tuple(cq), max(s.sq for s in seqs),
                      max(s.skv for s in seqs), causal, scale, window=window)


def paged_call(seqs: Sequence[Seq], causal: bool, scale: float | None, page_size: int,
               order: Sequence[int] | None = None, fill: str = "nan", window: tuple[int, int] = (-1, -1)
               ) -> LayoutCall:
    """The sequences' keys in a paged KV cache (``paged_kv_attention``) of ``page_size``.

    The pool has every page the sequences need plus one page no sequence owns, which pads the rows of
    the block table; the unused tail of each last page and that spare page hold ``fill``: ``"nan"``
    (a layout case's own call), ``"large"`` (±1e4), ``"zeros"`` or ``"copies"`` (of real keys).
    ``order`` is a permutation of the pool: physical page ``order[j]`` holds logical page ``j``
    (sequences' pages in pack order, then the spare); None keeps them in order. ``window``: every
    sequence's sliding window."""
    counts = [-(-s.skv // page_size) for s in seqs]
    n_pages = sum(counts) + 1
    order = list(range(n_pages)) if order is None else [int(x) for x in order]
    if sorted(order) != list(range(n_pages)):
        raise ValueError(f"order must be a permutation of the {n_pages} pages")
    hkv, d = seqs[0].k.shape[1:]
    dtype = seqs[0].k.dtype
    k_pages = unused_fill(fill, (n_pages, page_size, hkv, d), dtype, torch.cat([s.k for s in seqs]))
    v_pages = unused_fill(fill, (n_pages, page_size, hkv, d), dtype, torch.cat([s.v for s in seqs]), flip=True)
    spare = order[-1]
    table = torch.full((len(seqs), max(counts)), spare, dtype=torch.int32)
    logical = 0
    for i, s in enumerate(seqs):
        for j in range(counts[i]):
            page = order[logical + j]
            table[i, j] = page
            rows = slice(j * page_size, min((j + 1) * page_size, s.skv))
            k_pages[page, : rows.stop - rows.start] = s.k[rows]
            v_pages[page, : rows.stop - rows.start] = s.v[rows]
        logical += counts[i]
    cq = _offsets([s.sq for s in seqs])
    tensors = (k_pages, v_pages, table, torch.tensor([s.skv for s in seqs], dtype=torch.int32),
               torch.tensor(cq, dtype=torch.int32))
    return LayoutCall(PAGED, torch.cat([s.q for s in seqs]), tensors, tuple(cq), max(s.sq for s in seqs),
                      max(s.skv for s in seqs), causal, scale, page_size, window)


def unused_fill(fill: str, shape: tuple[int, ...], dtype: torch.dtype, real: torch.Tensor,
                flip: bool = False) -> torch.Tensor:
    """A page pool whose every slot holds ``fill`` (see :func:`paged_call`); real keys overwrite theirs."""
    if fill == "nan":
        return torch.full(shape, UNUSED_SLOT_FILL, dtype=dtype)
    if fill == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if fill == "large":
        sign = torch.where(torch.arange(shape[-1]) % 2 == 0, 1.0, -1.0) * (-1.0 if flip else 1.0)
        return (LARGE_GARBAGE * sign).expand(shape).to(dtype).clone()
    if fill == "copies":
        n = shape[0] * shape[1]
        idx = torch.arange(n) % real.shape[0]
        return real[idx].reshape(shape).clone()
    raise ValueError(f"unknown page fill {fill!r}")


def layout_call(op: str, seqs: Sequence[Seq], causal: bool, scale: float | None, page_size: int | None = None,
                order: Sequence[int] | None = None, fill: str = "nan",
                window: tuple[int, int] = (-1, -1)) -> LayoutCall:
    """:func:`pack_call` or :func:`paged_call`, by op."""
    if op == VARLEN:
        return pack_call(seqs, causal, scale, window)
    if page_size is None:
        raise ValueError("a paged call needs a page size")
    return paged_call(seqs, causal, scale, page_size, order, fill, window)


def page_count(seqs: Sequence[Seq], page_size: int) -> int:
    """Pages of the pool :func:`paged_call` builds (the sequences' pages and the spare one)."""
    return sum(-(-s.skv // page_size) for s in seqs) + 1
