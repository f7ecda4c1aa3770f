"""The packed and paged layouts of the two ops (docs/backends.md#layouts), and the one adapter that
serves them with a backend's dense ``attention``.

::

    varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k, causal, scale
                     [, window_size]) -> out
    paged_kv_attention(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, *, max_seqlen_q, max_seqlen_k,
                       causal, scale[, window_size]) -> out

Sequence ``i`` of a pack has the query rows ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` (``q [total_q,
Hq, D]``, ``out`` the same shape) and, packed, the keys ``k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]``
(``k, v [total_k, Hkv, D]``); paged, the keys of its first ``seq_lens[i]`` positions, position ``p``
at ``k_pages[block_table[i, p // page_size], p % page_size]`` (``k_pages, v_pages [num_pages,
page_size, Hkv, D]``, ``block_table [B, max_pages]`` int32, ``seq_lens [B]`` int32). Its queries are
its last positions and causal is bottom-right per sequence, exactly the dense op's rule. The
``cu_seqlens_*`` are int32 ``[B + 1]`` starting at 0. Slots past a sequence's length (the unused tail
of its last page, pages no sequence owns) may hold anything, NaN included, and must not be read.
``window_size=(left, right)`` is the dense op's sliding window, per sequence, relative to that
sequence's bottom-right diagonal; the harness passes it only for a case with a bounded window and
only to a backend that declares ``"window"`` in its ``variants`` (the others skip such cases).

:class:`DenseLayouts` gives any backend with a dense ``attention`` both layouts: it unpacks (or
gathers the pages of) each sequence and calls ``attention`` on it alone, batch 1, with the window
passed on (a window case runs only when the backend's ``variants`` declare it). Every built-in
backend has it; the real packed and paged kernels (``varlen.py``, ``flex_layouts.py``,
``flashinfer.py``) implement the layouts themselves.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

#: The positional arguments and keywords of the layout ops (signatures are checked at load).
LAYOUT_POSITIONAL = {
    "varlen_attention": ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"),
    "paged_kv_attention": ("q", "k_pages", "v_pages", "block_table", "seq_lens", "cu_seqlens_q"),
}
LAYOUT_KEYWORDS = ("max_seqlen_q", "max_seqlen_k", "causal", "scale")


def check_offsets(name: str, cu: torch.Tensor, total: int) -> list[int]:
    """``cu`` as a Python list after checking it is int32 ``[B + 1]``, from 0, non-decreasing, ending at
    ``total``; ValueError naming ``name`` otherwise."""
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be int32 [B + 1], got {cu.dtype} {tuple(cu.shape)}")
    offsets = [int(x) for x in cu.tolist()]
    if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in itertools.pairwise(offsets)):
        raise ValueError(f"{name} must rise from 0 to {total}, got {offsets}")
    return offsets


def unpack_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The sequences of a packed batch as ``(q [sq, Hq, D], k [skv, Hkv, D], v)`` views."""
    cq = check_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    ck = check_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq) - 1} sequences, cu_seqlens_k {len(ck) - 1}")
    return [(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]) for i in range(len(cq) - 1)]


def gather_pages(pages: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions of one sequence, ``[length, Hkv, D]``, from ``pages [num_pages,
    page_size, Hkv, D]`` through its block-table row: only the slots it owns are read."""
    page_size = pages.shape[1]
    n = -(-length // page_size)
    if n > table_row.numel():
        raise ValueError(f"seq_len {length} needs {n} pages of {page_size}, the block table has {table_row.numel()}")
    return pages[table_row[:n].long()].reshape(n * page_size, *pages.shape[2:])[:length]


def check_paged(q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor
                ) -> tuple[list[int], list[int]]:
    """The query offsets and the sequence lengths of a paged call, checked against each other and the
    block table (ValueError naming what disagrees)."""
    if block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise ValueError(f"block_table must be int32 [B, max_pages], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    cq = check_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    lens = [int(x) for x in seq_lens.tolist()]
    if len(lens) != len(cq) - 1 or block_table.shape[0] != len(lens):
        raise ValueError(f"seq_lens has {len(lens)} entries, block_table {block_table.shape[0]} rows, cu_seqlens_q "
                         f"{len(cq) - 1} sequences; they must agree")
    return cq, lens


def unpack_paged(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The sequences of a paged batch as ``(q [sq, Hq, D], k [seq_len, Hkv, D], v)``, keys gathered."""
    cq, lens = check_paged(q, block_table, seq_lens, cu_seqlens_q)
    out = []
    for i, n in enumerate(lens):
        if cq[i + 1] - cq[i] > n:
            raise ValueError(f"sequence {i} has {cq[i + 1] - cq[i]} queries but seq_len {n}; its queries are its last "
                             "positions")
        out.append((q[cq[i]:cq[i + 1]], gather_pages(k_pages, block_table[i], n),
                    gather_pages(v_pages, block_table[i], n)))
    return out


def dense_output(result: Any) -> torch.Tensor:
    """The output of a dense op's result (``out``, or ``(out, lse)`` from a backend that returns the lse)."""
    return result[0] if isinstance(result, tuple) else result


def attend_each(attention: Any, sequences: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, causal: bool,
                scale: float | None, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """``out [total_q, Hq, D]``: every sequence through the dense ``attention`` on its own (batch 1,
    heads before sequence), in pack order. ``window_size`` is passed only when bounded, as the harness
    passes it to a dense call: a dense op without the keyword keeps serving plain layout calls."""
    variant = {} if tuple(window_size) == (-1, -1) else {"window_size": tuple(window_size)}
    outs = []
    for sq, sk, sv in sequences:
        o = dense_output(attention(sq.transpose(0, 1)[None].contiguous(), sk.transpose(0, 1)[None].contiguous(),
                                   sv.transpose(0, 1)[None].contiguous(), causal=causal, scale=scale,
                                   key_padding_mask=None, **variant))
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0).contiguous()


class DenseLayouts:
    """Both layouts through the backend's own dense ``attention``: each sequence unpacked (or its pages
    gathered) and computed alone. Shared by every built-in backend, so the CPU lane runs every
    layout check; a correct, batch-invariant dense backend passes them all."""

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                         scale: float | None = None, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
        """docs/backends.md#layouts: a packed batch, one dense ``attention`` call per sequence."""
        sequences = unpack_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)
        return attend_each(self.attention, sequences, causal=causal, scale=scale,  # type: ignore[attr-defined]
                           window_size=window_size)

    def paged_kv_attention(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           scale: float | None = None, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
        """docs/backends.md#layouts: a paged KV cache, each sequence's pages gathered, one dense call each."""
        sequences = unpack_paged(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q)
        return attend_each(self.attention, sequences, causal=causal, scale=scale,  # type: ignore[attr-defined]
                           window_size=window_size)
