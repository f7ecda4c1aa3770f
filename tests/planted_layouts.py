"""Backends for the layout checks' own tests: one correct, and each of the others with one planted
layout defect of the kind users hit (issue 14), each caught by the check named in its docstring.

The correct one is the shared dense adapter (``DenseLayouts``) over :class:`planted_backends.Correct`
(float64 per (batch, head), rounded once): accurate and invariant by construction.
"""

from __future__ import annotations

import torch
from planted_backends import Correct, attend64
from planted_gradients import ulp_up
from planted_variants import PlantedVariants

from conformance.backends.builtin import NaiveFp32Backend
from conformance.backends.layouts import DenseLayouts, check_offsets, gather_pages, unpack_paged, unpack_varlen


def attend_sequences(sequences, causal, scale, nudge: bool = False) -> torch.Tensor:
    """``out [total_q, Hq, D]``: each ``(q [sq, Hq, D], k, v)`` by :func:`attend64`; ``nudge`` moves every
    element one ulp of its dtype up (another reduction order's last bit, well inside every tolerance)."""
    outs = []
    for q, k, v in sequences:
        o = attend64(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal, scale, None)
        o = o.to(q.dtype)
        outs.append((ulp_up(o) if nudge else o)[0].transpose(0, 1))
    return torch.cat(outs).contiguous()


class LayoutCorrect(DenseLayouts, Correct):
    name = "layout-correct"


class TileFromPackMax(LayoutCorrect):
    """The tile size is chosen from the pack's longest sequence (FlashInfer #2424: cta_tile_q 64 when
    batched, 128 alone), so a sequence's bits depend on its neighbours: ``pack``."""

    name = "layout-tile-from-pack-max"

    def varlen_attention(self, q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k, causal, scale):
        return attend_sequences(unpack_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k), causal, scale, max_seqlen_k >= 64)

    def paged_kv_attention(self, q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, *, max_seqlen_q,
                           max_seqlen_k, causal, scale):
        return attend_sequences(unpack_paged(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q), causal, scale,
                                max_seqlen_k >= 64)


class SplitsFromSequenceCount(LayoutCorrect):
    """The split-KV count is chosen from the number of sequences (vLLM #58131, SGLang #26412): ``pack``."""

    name = "layout-splits-from-count"

    def varlen_attention(self, q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k, causal, scale):
        return attend_sequences(unpack_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k), causal, scale,
                                cu_seqlens_q.numel() - 1 >= 3)

    def paged_kv_attention(self, q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, *, max_seqlen_q,
                           max_seqlen_k, causal, scale):
        return attend_sequences(unpack_paged(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q), causal, scale,
                                seq_lens.numel() >= 3)


class ReadsUnusedTail(LayoutCorrect):
    """Loads whole last pages and gives their unused tail weight 0, so ``0 · NaN`` leaks: ``page``."""

    name = "layout-reads-unused-tail"

    def paged_kv_attention(self, q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, *, max_seqlen_q,
                           max_seqlen_k, causal, scale):
        out = attend_sequences(unpack_paged(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q), causal, scale)
        cq = check_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0])
        p = k_pages.shape[1]
        for i, n in enumerate(seq_lens.tolist()):
            whole = gather_pages(v_pages, block_table[i], -(-n // p) * p)  # the tail slots included
            leak = (whole[n:].double().sum() * 0).to(out.dtype)
            out[cq[i]:cq[i + 1]] += leak
        return out


class BlockTableOffByOne(LayoutCorrect):
    """When seq_len is a multiple of the page size its last page counts as empty (SGLang #22819): ``accuracy``."""

    name = "layout-block-table-off-by-one"

    def paged_kv_attention(self, q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, *, max_seqlen_q,
                           max_seqlen_k, causal, scale):
        p = k_pages.shape[1]
        used = torch.tensor([(-(-n // p) - 1) * p + n % p for n in seq_lens.tolist()], dtype=torch.int32)
        keep = used >= torch.diff(cu_seqlens_q)  # a sequence left with fewer keys than queries keeps them all
        used = torch.where(keep, used, seq_lens)
        return attend_sequences(unpack_paged(q, k_pages, v_pages, block_table, used, cu_seqlens_q), causal, scale)


class AttendsIntoNeighbour(LayoutCorrect):
    """cu_seqlens_k misread: each sequence's keys run one key into the next sequence's: ``accuracy``, ``pack``."""

    name = "layout-attends-into-neighbour"

    def varlen_attention(self, q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k, causal, scale):
        ck = check_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0])
        ends = [min(e + 1, k.shape[0]) for e in ck[1:]]
        sequences = [(sq, k[a:b], v[a:b]) for (sq, _, _), a, b in
                     zip(unpack_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k), ck, ends)]
        return attend_sequences(sequences, causal, scale)


class LayoutWindowCorrect(DenseLayouts, PlantedVariants):
    """The dense adapter over the correct float64 variants backend (window declared): accurate and
    invariant on windowed layout cases by construction."""

    @property
    def name(self) -> str:
        return "layout-window-correct"


class WindowIgnoredWhenPacked(NaiveFp32Backend):
    """Declares the window and honours it in the dense ops and the paged layout, but the packed call
    drops ``window_size`` (a varlen path that forgets to forward the window): ``accuracy``."""

    name = "layout-window-ignored-when-packed"

    def varlen_attention(self, q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k, causal=True,
                         scale=None, window_size=(-1, -1)):
        return super().varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                        max_seqlen_k=max_seqlen_k, causal=causal, scale=scale)


class SplitsFromPageSize(LayoutCorrect):
    """The KV split follows the page size (what FlashInfer 0.7.2's paged decode showed on an H200: the
    same logical cache in pages of 1, 5, 7 or 16 keys gives other bits), so a sequence's bits depend on
    how its cache is paged: ``page``. Pages of 16 keys or more take the other reduction order."""

    name = "layout-splits-from-page-size"

    def paged_kv_attention(self, q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, *, max_seqlen_q,
                           max_seqlen_k, causal, scale):
        return attend_sequences(unpack_paged(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q), causal, scale,
                                k_pages.shape[1] >= 16)


class WindowedSplitsFromSequenceCount(LayoutWindowCorrect):
    """On the sliding-window path only, the split count follows the number of sequences (SGLang #26412:
    the fixed split size dropped on that path), so a windowed sequence's bits depend on its pack:
    ``pack``, found only by a search that draws windows."""

    @property
    def name(self) -> str:
        return "layout-windowed-splits-from-count"

    def varlen_attention(self, q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k, causal=True,
                         scale=None, window_size=(-1, -1)):
        out = super().varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                       max_seqlen_k=max_seqlen_k, causal=causal, scale=scale, window_size=window_size)
        return ulp_up(out) if tuple(window_size) != (-1, -1) and cu_seqlens_q.numel() - 1 >= 3 else out

    def paged_kv_attention(self, q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, *, max_seqlen_q,
                           max_seqlen_k, causal=True, scale=None, window_size=(-1, -1)):
        out = super().paged_kv_attention(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q,
                                         max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal,
                                         scale=scale, window_size=window_size)
        return ulp_up(out) if tuple(window_size) != (-1, -1) and seq_lens.numel() >= 3 else out
