"""The exact reference: CONTRACT.md attention, every output element correctly rounded once to float32.

Three tiers decide each element's float32 value; each tier hands on only what it cannot prove:

1. **float64** (all elements, torch matmuls, CPU or CUDA). Besides the output it computes a
   rigorous first-order bound on its own error (dot products, the scale, exp, the sums and the
   division). An element whose float64 value lies farther than that bound from both float32
   rounding boundaries (the midpoints to its neighbours) is already correctly rounded. The decision
   runs on the generation device; only float32 values and the undecided mask come back.
2. **double-double** (torch, on the generation device, the undecided elements' rows in batches of
   a bounded number of (row, key) pairs: :mod:`conformance.reference.double_double`): Ozaki-sliced
   dot products, double-double logits, weights and pairwise sums; a first pass with exp(x_hi)·(1 +
   x_lo) (bound ~1e-16·Σp|v−o|), then one pass with the double-double exp (relative error ≤ 2^-88)
   over everything the first left.
3. **exact** (Python integers, fractions and ``mpmath.iv`` interval arithmetic): logits as exact
   integers; if every group of equal logits has the same mean value the output is that rational
   number, rounded exactly (ties to even); otherwise (Lindemann–Weierstrass) it is transcendental,
   never a rounding boundary, and intervals of growing precision decide it.

Per row it also returns the log-sum-exp, a first-order error scale and the error of the naive
same-dtype computation (see docs/golden-format.md for the formulas).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from conformance.reference.double_double import double_double_elements, tier2_batches, tier2_limit
from conformance.reference.exact import exact_lse, exact_row
from conformance.reference.exact_dots import lowest_bit_exponents
from conformance.reference.float64 import (
    BLOCK_ELEMENTS,
    CUDA_BLOCK_ELEMENTS,
    float64_block,
    tier1_decision,
)
from conformance.reference.rounding import rounding_interval
from conformance.spec.case import Case
from conformance.spec.inputs import CaseInputs, block_sees_every_key, key_limit, leading_keys_kept, visible

ALGORITHM = "exact-attention/1"


@dataclass
class RefinementStats:
    """How many output elements each tier decided."""

    float64: int = 0
    double_double: int = 0
    exact: int = 0


@dataclass
class Golden:
    out: np.ndarray  # float32 [B, Hq, Sq, D], correctly rounded
    lse: np.ndarray  # float32 [B, Hq, Sq], -inf for rows that see no key
    error_scale: np.ndarray  # float64 [B, Hq, Sq]
    naive_error: np.ndarray  # float64 [B, Hq, Sq]
    flops: int  # 4·D per (row, visible key) pair: the arithmetic the mask leaves
    stats: RefinementStats = field(default_factory=RefinementStats)


def row_blocks(case: Case, block_elements: int) -> Iterator[tuple[int, int, int]]:
    """``(i0, i1, kmax)`` of the blocks of query rows the float64 stages work on: about
    ``block_elements`` scores a block over the batch and heads; ``kmax`` keys are all any row of the
    block may see (the keys beyond are skipped in causal and window blocks; <= 0: it sees nothing)."""
    rows = max(1, block_elements // max(1, case.batch * case.hq * case.skv))
    for i0 in range(0, case.sq, rows):
        i1 = min(case.sq, i0 + rows)
        yield i0, i1, key_limit(case, i1)


def compute_reference(case: Case, inputs: CaseInputs, device: str | torch.device = "cpu") -> Golden:
    """Compute the golden of ``case`` from its ``inputs`` (see the module docstring).

    On CPU the float64 stage runs on one thread: torch's reductions split differently with the
    thread count, and the stored float64 statistics must not depend on it (parallelism comes from
    ``generate --jobs``).
    """
    if torch.device(device).type == "cpu":
        with single_thread():
            return _compute(case, inputs, torch.device(device))
    return _compute(case, inputs, torch.device(device))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _compute(case: Case, inputs: CaseInputs, dev: torch.device) -> Golden:
    b, hq, hkv, g, sq, d = case.batch, case.hq, case.hkv, case.group, case.sq, case.d
    scale = case.effective_scale
    q64 = inputs.q.to(dev, torch.float64).reshape(b, hkv, g, sq, d)
    k64 = inputs.k.to(dev, torch.float64)
    v64 = inputs.v.to(dev, torch.float64)
    kpm = None if inputs.key_padding_mask is None else inputs.key_padding_mask.to(dev)
    # Per-case operands of every block: [v, |v|, 1] for the blocked sums, |k|, and max|v| per column.
    vx = torch.cat([v64, v64.abs(), torch.ones_like(v64[..., :1])], dim=-1)
    kabs = k64.abs()
    k_bits = lowest_bit_exponents(k64).transpose(-1, -2)  # [b, hkv, 1, skv]
    vmax = vx[..., d:2 * d].amax(-2, keepdim=True)
    # Sinks: one logit per query head, as the rows of a KV head's group see them ([1, hkv, g, 1, 1]).
    sinks = None if inputs.sinks is None else inputs.sinks.to(dev, torch.float64).reshape(1, hkv, g, 1, 1)

    # Tier 1 decides on the generation device; only its float32 values and what it left undecided come
    # back. The naive model's values are rounded to the case dtype, so float32 holds them exactly. The
    # blocks' results stay on the device until the last block (one copy back, and the device is not
    # asked anything between blocks that the case's geometry answers: the flops add up there too).
    out32_t = torch.zeros(b, hkv, g, sq, d, dtype=torch.float32, device=dev)
    undecided_t = torch.zeros(b, hkv, g, sq, d, dtype=torch.bool, device=dev)
    naive = torch.zeros_like(out32_t)
    lse = torch.full((b, hkv, g, sq), -math.inf, dtype=torch.float64, device=dev)
    lse_bound = torch.zeros(b, hkv, g, sq, dtype=torch.float64, device=dev)
    err_scale = torch.zeros(b, hkv, g, sq, dtype=torch.float64, device=dev)
    visible_pairs = torch.zeros((), dtype=torch.int64, device=dev)
    kept = leading_keys_kept(case, inputs.key_padding_mask)

    for i0, i1, kmax in row_blocks(case, CUDA_BLOCK_ELEMENTS if dev.type == "cuda" else BLOCK_ELEMENTS):
        n = i1 - i0
        if kmax <= 0:  # every row of the block is fully masked: zeros, lse = -inf (or the row's sink)
            if sinks is not None:
                lse[:, :, :, i0:i1] = sinks[..., 0].expand(b, hkv, g, n)
            continue
        vis = visible(case, kpm, slice(i0, i1), dev)[..., :kmax]
        vis = vis[:, None, None].expand(b, 1, g, n, kmax).reshape(b, 1, g * n, kmax)
        visible_pairs += vis.sum() * hkv
        q = q64[:, :, :, i0:i1].reshape(b, hkv, g * n, d)
        sink = None if sinks is None else sinks.expand(1, hkv, g, n, 1).reshape(1, hkv, g * n, 1)
        res = float64_block(q, k64[:, :, :kmax], kabs[:, :, :kmax], v64[:, :, :kmax], vx[:, :, :kmax], vmax, vis,
                             scale, case.dtype, case.softcap, sink, k_bits[..., :kmax],
                             all_visible=block_sees_every_key(case, kept, i0, i1, kmax))
        shape5 = (b, hkv, g, n)
        o32, open_ = tier1_decision(res["out"], res["bound"])
        out32_t[:, :, :, i0:i1] = o32.reshape(*shape5, d)
        undecided_t[:, :, :, i0:i1] = open_.reshape(*shape5, d)
        lse[:, :, :, i0:i1] = res["lse"].reshape(shape5)
        lse_bound[:, :, :, i0:i1] = res["lse_bound"].reshape(shape5)
        err_scale[:, :, :, i0:i1] = res["error_scale"].reshape(shape5)
        naive[:, :, :, i0:i1] = res["naive"].to(torch.float32).reshape(*shape5, d)

    flops = int(visible_pairs) * 4 * d
    out32_t, undecided_t, naive, lse, lse_bound, err_scale = (
        t.cpu() for t in (out32_t, undecided_t, naive, lse, lse_bound, err_scale))
    out32, undecided = out32_t.numpy(), undecided_t.numpy()
    if case.sinks is not None:  # a row that sees only its sink outputs exactly 0: nothing to refine
        seen_rows = visible(case, inputs.key_padding_mask).any(-1)[:, None, None, :, None].numpy()
        undecided &= seen_rows
        out32 = np.where(seen_rows, out32, np.float32(0))
    stats = RefinementStats(float64=int(out32.size - undecided.sum()))
    if undecided.any():
        refine(case, inputs, (q64, k64, v64), out32, undecided, stats)
    lse32 = certified_lse(case, inputs, lse.numpy(), lse_bound.numpy())
    to4 = (b, hq, sq)
    # Against the correctly rounded output the difference is exact: no float64 noise is stored.
    naive_error = np.abs(naive.numpy().astype(np.float64) - out32.astype(np.float64)).max(-1)
    return Golden(
        out=out32.reshape(b, hq, sq, d),
        lse=lse32.reshape(to4),
        error_scale=round_up_significant(err_scale.numpy(), ERROR_SCALE_BITS).reshape(to4),
        naive_error=naive_error.reshape(to4),
        flops=flops,
        stats=stats,
    )


ERROR_SCALE_BITS = 12


def round_up_significant(x: np.ndarray, bits: int) -> np.ndarray:
    """Round non-negative values up to ``bits`` significant bits. A scale needs no more, and the
    coarse grid keeps the stored value independent of last-bit float64 noise (threads, devices)."""
    mant, exp = np.frexp(x)
    return np.ldexp(np.ceil(np.ldexp(mant, bits)), exp - bits)


def certified_lse(case: Case, inputs: CaseInputs, lse64: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """float32 log-sum-exp, correctly rounded: float64 where its bound decides, else exact."""
    lse32 = lse64.astype(np.float32)
    finite = np.isfinite(lse64)
    mid_lo, mid_hi = rounding_interval(np.where(finite, lse32, np.float32(0)))
    undecided = finite & ~((lse64 - bound > mid_lo) & (lse64 + bound < mid_hi))
    if undecided.any():
        b, hkv, g, sq = lse64.shape
        q = inputs.q.to(torch.float64).reshape(b, hkv, g, sq, case.d).numpy()
        k = inputs.k.to(torch.float64).numpy()
        kpm = inputs.key_padding_mask
        for bi, hi, gi, i in np.argwhere(undecided):
            see = visible(case, None if kpm is None else kpm[bi:bi + 1], slice(int(i), int(i) + 1))[0, 0].numpy()
            lse32[bi, hi, gi, i] = exact_lse(q[bi, hi, gi, i], k[bi, hi, np.flatnonzero(see)], case,
                                             row_sink(case, hi * g + gi))
    return lse32


def row_sink(case: Case, head: int) -> float | None:
    """The sink logit of query head ``head`` (None without sinks)."""
    return None if case.sinks is None else case.sinks[int(head)]


def _tier2_pass(case: Case, kpm: torch.Tensor | None, qkv64: tuple[torch.Tensor, ...], sinks: torch.Tensor | None,
                undecided: np.ndarray, out32: np.ndarray, precise: bool, stats: RefinementStats) -> np.ndarray:
    """One tier-2 pass over the ``undecided`` elements (bool [b, hkv, g, sq, d]): their rows in batches
    of at most the device's tier-2 limit of (row, key) pairs; what it decides goes into ``out32``.
    Returns the (bi, hi, gi, i, c) of the elements it left open."""
    q, k, v = qkv64
    d = q.shape[-1]
    rows = np.argwhere(undecided.any(-1))  # (bi, hi, gi, i), sorted: rows of one KV head are adjacent
    limit = tier2_limit(q.device)
    open_: list[np.ndarray] = [np.zeros((0, 5), dtype=np.int64)]
    for batch in tier2_batches(case, kpm, rows, limit, q.device):
        heads = len(batch)
        r_max = max(len(seg.rows) for seg in batch)
        n = max(seg.kmax for seg in batch)
        bi_t = torch.as_tensor([seg.bi for seg in batch], device=q.device)
        hi_t = torch.as_tensor([seg.hi for seg in batch], device=q.device)
        qb = q.new_zeros(heads, r_max, d)
        see = torch.zeros(heads, r_max, n, dtype=torch.bool, device=q.device)
        sink = None if sinks is None else torch.zeros(heads, r_max, 1, dtype=torch.float64)
        er_parts, ec_parts, where = [], [], []
        for j, seg in enumerate(batch):
            qb[j, :len(seg.rows)] = q[seg.bi, seg.hi, seg.rows[:, 2], seg.rows[:, 3]]
            if sink is not None and sinks is not None:
                sink[j, :len(seg.rows), 0] = sinks[seg.hi, torch.as_tensor(seg.rows[:, 2])]
            see[j, :len(seg.rows), :seg.kmax] = seg.see
            er, ec = np.nonzero(undecided[seg.bi, seg.hi, seg.rows[:, 2], seg.rows[:, 3]])
            er_parts.append(j * r_max + er)
            ec_parts.append(ec)
            where.append(np.stack([np.full(len(er), seg.bi), np.full(len(er), seg.hi), seg.rows[er, 2],
                                   seg.rows[er, 3], ec], axis=1))
        er, ec, at = np.concatenate(er_parts), np.concatenate(ec_parts), np.concatenate(where)
        kb, vb = k[bi_t, hi_t, :n], v[bi_t, hi_t, :n]
        sink = None if sink is None else sink.to(q.device)
        vals, decided = double_double_elements(qb, kb, vb, see, er, ec, case, precise=precise, sink=sink,
                                               limit=limit)
        out32[tuple(at[decided].T)] = vals[decided]
        stats.double_double += int(decided.sum())
        open_.append(at[~decided])
    return np.concatenate(open_)


def refine(case: Case, inputs: CaseInputs, qkv64: tuple[torch.Tensor, ...], out32: np.ndarray,
           undecided: np.ndarray, stats: RefinementStats) -> None:
    """Decide every undecided element of ``out32`` ([b, hkv, g, sq, d]) in place: tier 2 for all
    of them (vectorised over rows and over KV heads, on the device of ``qkv64``: q [b, hkv, g, sq, d]
    and k, v in float64, so that a GPU gets a few large kernels per case, not a few per head), then
    tier 2 with the double-double exp for all the elements its first pass left, packed anew, then
    tier 3 for the few that are still open."""
    b, hkv, g, sq, d = out32.shape
    kpm = inputs.key_padding_mask
    sinks = None if inputs.sinks is None else inputs.sinks.to(torch.float64).reshape(hkv, g)
    at = _tier2_pass(case, kpm, qkv64, sinks, undecided, out32, False, stats)
    if len(at):
        again = np.zeros_like(undecided)
        again[tuple(at.T)] = True
        at = _tier2_pass(case, kpm, qkv64, sinks, again, out32, True, stats)
    left: dict[tuple[int, ...], list[int]] = {}
    for bi, hi, gi, i, c in at:
        left.setdefault((int(bi), int(hi), int(gi), int(i)), []).append(int(c))
    if left:
        qn = inputs.q.to(torch.float64).reshape(b, hkv, g, sq, d).numpy()
        kn = inputs.k.to(torch.float64).numpy()
        vn = inputs.v.to(torch.float64).numpy()
        for (bi, hi, gi, i), cols in left.items():
            see = visible(case, None if kpm is None else kpm[bi:bi + 1], np.array([i]))[0, 0]
            keys = see.nonzero().flatten().numpy()
            exact = exact_row(qn[bi, hi, gi, i], kn[bi, hi, keys], vn[bi, hi][keys][:, cols], case,
                              row_sink(case, hi * g + gi))
            for c, val in zip(cols, exact):
                out32[bi, hi, gi, i, c] = val
                stats.exact += 1
