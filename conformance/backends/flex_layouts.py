"""FlexAttention (compiled) for the packed and paged layouts (docs/backends.md#layouts), one flex call
per op call, compiled once per shape family.

**Packed.** The pack runs as one batch of 1: ``q [1, Hq, TQ, D]``, ``k, v [1, Hkv, TK, D]``. Each
sequence's query rows and key rows start on a fresh 128-row tile (``SPARSE_BLOCK``, FlexAttention's
block-mask tile) and the totals are rounded up to powers of two, at least one tile
(:func:`flex.bucket`); the buffers are zero-initialised and only the real tokens are copied in, so a
padded slot holds 0, never NaN. A ``mask_mod`` over captured per-token tensors (:func:`document_mask_mod`)
gives the visibility: ``seq_q[i] == seq_k[j] >= 0`` (padded tokens belong to no sequence) and, when
causal, ``kpos[j] <= qpos[i]``, where ``kpos`` is a key's position in its sequence and ``qpos`` the
query's position counted from its sequence's end, ``i + len_k - len_q`` (the bottom-right rule of the
dense op). A sliding window ``(left, right)`` bounds the same difference: ``lo <= kpos[j] - qpos[i] <=
hi`` with ``lo = -left`` and ``hi = right`` (causal: ``hi = 0``; :func:`relative_bounds`, from
:func:`flex.key_bounds`), per sequence and bottom-right aligned in each because ``qpos`` is. ``lo``
and ``hi`` are captured 0-d tensors (an unbounded side a bound no key reaches), so causal,
non-causal and windowed calls share code.

**Paged.** The keys are copied, once, by torch index ops on the device from the page pool into the
same zero-initialised, tile-aligned bucket buffer: position ``p`` of sequence ``i`` from slot
``block_table[i, p // page_size] * page_size + p % page_size`` of the flattened pool. Only the slots
a sequence owns are read (an unused slot, NaN in the harness's calls, is never touched), nothing is
gathered on the host, and from there the call is exactly the packed one: a paged call and the packed
call of the same sequences run the same compiled code on the same buffer. Two alternatives were not
taken. (a) Flex over the physical pool flattened to ``[1, Hkv, num_pages * page_size, D]`` with the
mask mapping each slot to (sequence, position) through the inverse of the block table sums each
row's keys in *physical* order, so the result would change with the page size and with a permuted
block table (the harness's bitwise ``page`` check), and on the CPU masked slots inside a partially
visible tile still enter ``P @ V`` with weight 0, where a NaN value gives ``0 * NaN = NaN``; with
page sizes 1 and 5 the unused tail slots share tiles with real keys, so skipping whole tiles cannot
keep them out. (b) ``torch.nn.attention.experimental._paged_attention.PagedAttention`` is that same
physical-order flex call plus a page allocator that owns and writes the cache; it does not take a
caller's block table as it is.

**Per-tile block mask.** A q tile holds rows of one sequence (or padding), a KV tile keys of one
sequence: the tile pair is *partial* when the sequences agree and (causal) its first key is at or
before its last row's ``qpos``, and *full* when both tiles are all real tokens and (causal) its last
key is at or before its first row's ``qpos``. Computed from ``[tiles, 128]`` views, never a
``[TQ, TK]`` mask. Tiles of other sequences and of padding are empty, so every row sums exactly the
tiles of its own sequence, in the same tile positions whatever its neighbours in the pack: with the
CPU template's split sizes equal to the block size, a sequence's bits do not depend on the pack.

**Buckets and compiles.** A compile is keyed by (device, dtype, TQ, TK, Hq, Hkv, D, scale), never by
the pack's composition; the tile alignment costs at most one tile per sequence and side (a
one-token decode occupies a 128-row q tile whose padded rows are empty: cheap in the block mask,
computed in the kernel). Compile failures are :class:`flex.FlexCompileError`, remembered per bucket;
dynamo's silent fallbacks are errors (:func:`flex.no_silent_fallback`). Rows that see no key output 0
(FlexAttention's own rule). Forward only: there is no layout backward op, and FlexAttention has no
backward on the CPU. Of the variants only the window composes with the layouts (``variants``);
soft-capping and sinks do not.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from conformance.spec.case import Case

from .contract import AD_HOC_FAMILY, BackendUnavailable, one_line
from .flex import (
    SPARSE_BLOCK,
    FlexCompileError,
    MaskMod,
    _ordered,
    bucket,
    compiled_flex_attention,
    flex_unavailable_reason,
    key_bounds,
    no_silent_fallback,
)
from .layouts import check_offsets, check_paged

# (device, dtype, TQ, TK, Hq, Hkv, D, scale)
LayoutBucketKey = tuple[str, torch.dtype, int, int, int, int, int, "float | None"]
# Buckets whose compile (or compiled run) failed, with the error text: later calls fail at once.
_FAILED: dict[LayoutBucketKey, str] = {}


def relative_bounds(causal: bool, window: tuple[int, int], size: int) -> tuple[int, int]:
    """``(lo, hi)``: a query at position ``qpos`` (counted from its sequence's end) sees the key at
    ``kpos`` of its sequence iff ``lo <= kpos - qpos <= hi`` (causal and window). These are
    :func:`flex.key_bounds` of a square ``size`` case (diagonal offset 0, since ``qpos`` already holds
    it); an unbounded side is ``∓size``, which no pair of positions below ``size`` reaches."""
    square = Case(id="", op="attention", family=AD_HOC_FAMILY, tier="smoke", batch=1, hq=1, hkv=1, d=1, sq=size,
                  skv=size, dtype="float32", causal=causal, scale=None, mask="none", dist="normal", seed=0,
                  window=(int(window[0]), int(window[1])))
    return key_bounds(square, size)


def document_mask_mod(seq_q: torch.Tensor, seq_k: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
                      lo: torch.Tensor, hi: torch.Tensor) -> MaskMod:
    """Row ``i`` sees key ``j`` iff both are tokens of the same sequence (``seq_k[j] >= 0``; padding is
    ``-1`` for queries, ``-2`` for keys) and ``lo <= kpos[j] - qpos[i] <= hi`` (0-d int64,
    :func:`relative_bounds`: causal and window). ``seq_*`` and ``*pos`` int64 ``[TQ]`` / ``[TK]``; every
    call returns a function with the same code."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        rel = kpos[kv_idx] - qpos[q_idx]
        return (seq_q[q_idx] == seq_k[kv_idx]) & (rel >= lo) & (rel <= hi)

    return mask_mod


def _placement(lens: torch.Tensor, offsets: torch.Tensor, pad: int, size: int) -> tuple[torch.Tensor, ...]:
    """For tokens packed by ``offsets`` (int64 ``[B + 1]``, lengths ``lens``): each token's sequence, its
    position in it, and its row in a buffer of ``size`` rows where every sequence starts on a tile;
    plus the buffer's per-row sequence (``pad`` for padding) and position (0 for padding)."""
    dev, b = lens.device, lens.numel()
    seq = torch.repeat_interleave(torch.arange(b, device=dev), lens)
    pos = torch.arange(int(offsets[-1]), device=dev) - offsets[seq]
    tiles = (lens + SPARSE_BLOCK - 1) // SPARSE_BLOCK * SPARSE_BLOCK
    start = torch.nn.functional.pad(tiles.cumsum(0), (1, 0))[:-1]
    row = start[seq] + pos
    seq_of_row = torch.full((size,), pad, dtype=torch.int64, device=dev).index_copy(0, row, seq)
    pos_of_row = torch.zeros(size, dtype=torch.int64, device=dev).index_copy(0, row, pos)
    return seq, pos, row, seq_of_row, pos_of_row


def _tile_stats(seq_of_row: torch.Tensor, pos_of_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per tile of rows: its sequence (that of its first row), whether every row is real, and the first
    and last real position (tiles are aligned: a tile's real rows are its first ones, ascending)."""
    s = seq_of_row.view(-1, SPARSE_BLOCK)
    p = pos_of_row.view(-1, SPARSE_BLOCK)
    real = s >= 0
    last = (real.sum(-1) - 1).clamp(min=0)
    return s[:, 0], real.all(-1), p[:, 0], p.gather(1, last[:, None])[:, 0]


def document_block_mask(seq_q: torch.Tensor, qpos: torch.Tensor, seq_k: torch.Tensor, kpos: torch.Tensor,
                        causal: bool, window: tuple[int, int] = (-1, -1)) -> Any:
    """The ``BlockMask`` of :func:`document_mask_mod` per 128 x 128 tile (module docstring). Positions in
    a tile are consecutive, so a tile pair is *partial* when some ``kpos - qpos`` lies in ``[lo, hi]``
    (its first key at most its last row's ``qpos + hi``, its last key at least its first row's
    ``qpos + lo``) and *full* when every one does; tiles wholly outside a window are empty."""
    from torch.nn.attention.flex_attention import BlockMask

    lo, hi = relative_bounds(causal, window, max(seq_q.numel(), seq_k.numel()))
    tq, q_full, q_first, q_last = _tile_stats(seq_q, qpos)
    tk, k_full, k_first, k_last = _tile_stats(seq_k, kpos)
    same = (tq[:, None] == tk[None, :]) & (tk >= 0)[None, :]
    some = same & (k_first[None, :] <= q_last[:, None] + hi) & (k_last[None, :] >= q_first[:, None] + lo)
    full = (same & q_full[:, None] & k_full[None, :] & (k_last[None, :] <= q_first[:, None] + hi)
            & (k_first[None, :] >= q_last[:, None] + lo))
    kv_num, kv_idx = _ordered((some & ~full)[None, None])
    full_num, full_idx = _ordered(full[None, None])
    dev = seq_q.device
    mask_mod = document_mask_mod(seq_q, seq_k, qpos, kpos, torch.tensor(lo, dtype=torch.int64, device=dev),
                                 torch.tensor(hi, dtype=torch.int64, device=dev))
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(SPARSE_BLOCK, SPARSE_BLOCK),
                                    mask_mod=mask_mod, seq_lengths=(seq_q.numel(), seq_k.numel()))


def aligned_size(lens: list[int]) -> int:
    """The bucketed rows of a tile-aligned pack: the power of two at or above the sum of whole tiles."""
    return bucket(sum(-(-n // SPARSE_BLOCK) for n in lens) * SPARSE_BLOCK, SPARSE_BLOCK)


def flex_document_attention(q: torch.Tensor, keys: Any, cq: list[int], ck: list[int], *, causal: bool,
                            scale: float | None, hkv: int, window: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """``out [total_q, Hq, D]`` for the sequences ``cq``/``ck`` (host offsets), each with the sliding
    ``window``; ``keys(row)`` fills the zero key and value buffers ``[1, Hkv, TK, D]`` at the buffer
    rows ``row`` of the packed key tokens."""
    dev, hq, d = q.device, q.shape[1], q.shape[2]
    lq = [b - a for a, b in itertools.pairwise(cq)]
    lk = [b - a for a, b in itertools.pairwise(ck)]
    if any(x > y for x, y in zip(lq, lk, strict=True)):
        raise ValueError(f"a sequence has more queries than keys (query lengths {lq}, key lengths {lk}); its "
                         "queries are its last positions")
    tq_size, tk_size = aligned_size(lq), aligned_size(lk)
    key: LayoutBucketKey = (str(dev), q.dtype, tq_size, tk_size, hq, hkv, d, scale)
    if key in _FAILED:
        raise FlexCompileError(_FAILED[key])
    lens_q = torch.tensor(lq, dtype=torch.int64, device=dev)
    lens_k = torch.tensor(lk, dtype=torch.int64, device=dev)
    seq, _, qrow, seq_q, qpos = _placement(lens_q, torch.tensor(cq, dtype=torch.int64, device=dev), -1, tq_size)
    qpos = qpos + torch.zeros_like(qpos).index_copy(0, qrow, (lens_k - lens_q)[seq])  # from the sequence's end
    _, _, krow, seq_k, kpos = _placement(lens_k, torch.tensor(ck, dtype=torch.int64, device=dev), -2, tk_size)
    block_mask = document_block_mask(seq_q, qpos, seq_k, kpos, causal, window)
    qb = q.new_zeros(1, hq, tq_size, d)
    qb[0].index_copy_(1, qrow, q.transpose(0, 1))
    kb, vb = keys(krow, tk_size)
    grad = torch.is_grad_enabled() and dev.type != "cpu"
    try:
        with no_silent_fallback(), torch.set_grad_enabled(grad):
            out = compiled_flex_attention()(qb, kb, vb, block_mask=block_mask, scale=scale, enable_gqa=hq != hkv)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        _FAILED[key] = (f"flex-layouts: torch {torch.__version__} cannot run compiled FlexAttention on {dev} for "
                        f"{q.dtype} Hq={hq} Hkv={hkv} TQ={tq_size} TK={tk_size} D={d}: "
                        f"{type(exc).__name__}: {one_line(str(exc))[:400]}")
        raise FlexCompileError(_FAILED[key]) from exc
    return out[0].index_select(1, qrow).transpose(0, 1).contiguous()


class FlexLayoutsBackend:
    """Both layouts through one compiled FlexAttention call over the tile-aligned pack (no dense ops)."""

    name = "flex-layouts"
    description = ("torch FlexAttention (torch.compile'd) over the packed tokens as one batch, document mask_mod; "
                   "paged keys copied from the owned slots on the device")
    variants = ("window",)  # the window bounds the mask_mod and the block mask; softcap and sinks do not compose

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        reason = flex_unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailable(reason)

    def supports(self, op: str, case: Any) -> bool | str:
        if op not in ("varlen_attention", "paged_kv_attention"):
            return f"flex-layouts implements the packed and paged layouts only, not {op}"
        return True

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                         scale: float | None = None, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
        cq = check_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0])
        ck = check_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0])
        if len(cq) != len(ck):
            raise ValueError(f"cu_seqlens_q has {len(cq) - 1} sequences, cu_seqlens_k {len(ck) - 1}")

        def keys(row: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(t.new_zeros(1, t.shape[1], size, t.shape[2]).index_copy_(2, row, t.transpose(0, 1)[None])
                         for t in (k, v))  # type: ignore[return-value]

        return flex_document_attention(q, keys, cq, ck, causal=causal, scale=scale, hkv=k.shape[1],
                                       window=window_size)

    def paged_kv_attention(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           scale: float | None = None, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
        cq, lens = check_paged(q, block_table, seq_lens, cu_seqlens_q)
        page_size = k_pages.shape[1]
        if any(-(-n // page_size) > block_table.shape[1] for n in lens):
            raise ValueError(f"seq_lens {lens} need more pages of {page_size} than the block table's "
                             f"{block_table.shape[1]}")
        ck = [0]
        for n in lens:
            ck.append(ck[-1] + n)
        dev = q.device
        lens_k = torch.tensor(lens, dtype=torch.int64, device=dev)

        def keys(row: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
            seq = torch.repeat_interleave(torch.arange(len(lens), device=dev), lens_k)
            pos = torch.arange(ck[-1], device=dev) - torch.tensor(ck[:-1], dtype=torch.int64, device=dev)[seq]
            slot = block_table.to(dev).long()[seq, pos // page_size] * page_size + pos % page_size
            out = []
            for pages in (k_pages, v_pages):
                pool = pages.reshape(-1, *pages.shape[2:])  # [num_pages * page_size, Hkv, D]
                owned = pool.index_select(0, slot)  # only the slots a sequence owns
                out.append(pages.new_zeros(1, pages.shape[2], size, pages.shape[3])
                           .index_copy_(2, row, owned.transpose(0, 1)[None]))
            return out[0], out[1]

        return flex_document_attention(q, keys, cq, ck, causal=causal, scale=scale, hkv=k_pages.shape[2],
                                       window=window_size)


__all__ = ["FlexLayoutsBackend", "document_block_mask", "document_mask_mod", "flex_document_attention"]
