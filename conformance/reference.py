"""The exact reference: CONTRACT.md attention, every output element correctly rounded once to float32.

Three tiers decide each element's float32 value; each tier hands on only what it cannot prove:

1. **float64** (all elements, torch matmuls, CPU or CUDA). Besides the output it computes a
   rigorous first-order bound on its own error (dot products, the scale, exp, the sums and the
   division). An element whose float64 value lies farther than that bound from both float32
   rounding boundaries (the midpoints to its neighbours) is already correctly rounded.
2. **double-double** (numpy, per undecided element): exact products, double-double dot products,
   logits and sums (``math.fsum``), exp with a double-double argument; its bound is ~1e-16·Σp|v−o|.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import mpmath
import numpy as np
import torch

from .inputs import TORCH_DTYPES, CaseInputs, visible
from .rounding import round_fraction_to_f32, rounding_interval
from .spec import Case

U = 2.0**-53  # unit roundoff of float64
# Score-matrix elements per block: bounds the working memory for long contexts (about 10 float64
# temporaries of this size: ~320 MiB on CPU; ~2.5 GiB of GPU memory, where larger blocks keep it busy).
BLOCK_ELEMENTS = 1 << 22
CUDA_BLOCK_ELEMENTS = 1 << 25
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


def round_like_dtype(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round float64 values to ``dtype`` (nearest-even, via float32 as torch casts) and back to float64."""
    if dtype == "float32":
        return x.to(torch.float32).to(torch.float64)
    return x.to(torch.float32).to(TORCH_DTYPES[dtype]).to(torch.float64)


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
    b, hq, hkv, g, sq, skv, d = case.batch, case.hq, case.hkv, case.group, case.sq, case.skv, case.d
    scale = case.effective_scale
    q64 = inputs.q.to(dev, torch.float64).reshape(b, hkv, g, sq, d)
    k64 = inputs.k.to(dev, torch.float64)
    v64 = inputs.v.to(dev, torch.float64)
    kpm = None if inputs.key_padding_mask is None else inputs.key_padding_mask.to(dev)
    # Per-case operands of every block: [v, |v|, 1] for the blocked sums, |k|, and max|v| per column.
    vx = torch.cat([v64, v64.abs(), torch.ones_like(v64[..., :1])], dim=-1)
    kabs = k64.abs()
    vmax = vx[..., d:2 * d].amax(-2, keepdim=True)

    out64 = torch.zeros(b, hkv, g, sq, d, dtype=torch.float64)
    bound = torch.zeros_like(out64)
    lse = torch.full((b, hkv, g, sq), -math.inf, dtype=torch.float64)
    lse_bound = torch.zeros(b, hkv, g, sq, dtype=torch.float64)
    err_scale = torch.zeros(b, hkv, g, sq, dtype=torch.float64)
    naive = torch.zeros_like(out64)
    flops = 0

    block = CUDA_BLOCK_ELEMENTS if dev.type == "cuda" else BLOCK_ELEMENTS
    rows_per_block = max(1, block // max(1, b * hq * skv))
    for i0 in range(0, sq, rows_per_block):
        i1 = min(sq, i0 + rows_per_block)
        n = i1 - i0
        # Keys beyond the last one any row of this block may see are skipped (causal blocks).
        kmax = min(skv, i1 - 1 + skv - sq + 1) if case.causal else skv
        if kmax <= 0:
            continue  # every row of the block is fully masked: zeros, lse = -inf
        vis = visible(case, kpm, slice(i0, i1))[..., :kmax].to(dev)
        vis = vis[:, None, None].expand(b, 1, g, n, kmax).reshape(b, 1, g * n, kmax)
        flops += int(vis.expand(b, hkv, g * n, kmax).sum()) * 4 * d
        q = q64[:, :, :, i0:i1].reshape(b, hkv, g * n, d)
        res = _float64_block(q, k64[:, :, :kmax], kabs[:, :, :kmax], v64[:, :, :kmax], vx[:, :, :kmax], vmax, vis,
                             scale, case.dtype)
        shape5 = (b, hkv, g, n)
        out64[:, :, :, i0:i1] = res["out"].reshape(*shape5, d).cpu()
        bound[:, :, :, i0:i1] = res["bound"].reshape(*shape5, d).cpu()
        lse[:, :, :, i0:i1] = res["lse"].reshape(shape5).cpu()
        lse_bound[:, :, :, i0:i1] = res["lse_bound"].reshape(shape5).cpu()
        err_scale[:, :, :, i0:i1] = res["error_scale"].reshape(shape5).cpu()
        naive[:, :, :, i0:i1] = res["naive"].reshape(*shape5, d).cpu()

    out = out64.numpy()
    out32 = out.astype(np.float32)
    mid_lo, mid_hi = rounding_interval(out32)
    bnd = bound.numpy()
    undecided = ~((out - bnd > mid_lo) & (out + bnd < mid_hi))
    stats = RefinementStats(float64=int(out.size - undecided.sum()))
    if undecided.any():
        _refine(case, inputs, (q64, k64, v64), out32, undecided, stats)
    lse32 = _certified_lse(case, inputs, lse.numpy(), lse_bound.numpy())
    to4 = (b, hq, sq)
    # Against the correctly rounded output the difference is exact: no float64 noise is stored.
    naive_error = np.abs(naive.numpy() - out32.astype(np.float64)).max(-1)
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


def _certified_lse(case: Case, inputs: CaseInputs, lse64: np.ndarray, bound: np.ndarray) -> np.ndarray:
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
            lse32[bi, hi, gi, i] = _exact_lse(q[bi, hi, gi, i], k[bi, hi, np.flatnonzero(see)], case)
    return lse32


def _float64_block(q: torch.Tensor, k: torch.Tensor, kabs: torch.Tensor, v: torch.Tensor, vx: torch.Tensor,
                   vmax: torch.Tensor, vis: torch.Tensor, scale: float, dtype: str) -> dict[str, torch.Tensor]:
    """Float64 attention of one block with its error bound. q [b,h,r,d], k/v [b,h,n,d], ``kabs`` |k|,
    ``vx`` [v, |v|, 1] [b,h,n,2d+1], ``vmax`` [b,h,1,d] ≥ max|v| over the keys, vis [b,1,r,n]."""
    d, n = q.shape[-1], k.shape[-2]
    all_visible = bool(vis.all())  # no mask to apply (non-causal or decode blocks without padding)
    dots = q @ k.transpose(-1, -2)  # products are exact; only the sum rounds
    s = dots * scale
    s_masked = s if all_visible else s.masked_fill_(~vis, -math.inf)
    m = s_masked.amax(-1, keepdim=True)
    seen = torch.isfinite(m)
    m = torch.where(seen, m, torch.zeros_like(m))
    p = torch.exp(s_masked - m)
    kb, sums = _blocked_sums(p, vx)
    pv, l_sum = sums[..., :2 * d], sums[..., 2 * d:]
    l_safe = torch.where(seen, l_sum, torch.ones_like(l_sum))
    out = pv[..., :d] / l_safe
    mean_abs_v = pv[..., d:] / l_safe  # Σ_j p_j |v_j|
    w = abs(scale) * (q.abs() @ kabs.transpose(-1, -2))  # |scale|·Σ_d |q_d k_jd| ≥ |s_j|
    pw = w.mul_(p)
    pw_sums = (pw @ vx[..., d:]) / l_safe
    pw_v, pw_sum = pw_sums[..., :d], pw_sums[..., d:]  # Σ_j p_j w_j |v_j| and Σ_j p_j w_j
    ao = out.abs()
    sensitivity = pw_v + ao * pw_sum  # ≥ Σ_j p_j w_j |v_j − o|
    error_scale = sensitivity + mean_abs_v
    # Rigorous first-order bound of this block's float64 error: logit error (d+3)·u·w_j from the
    # dot product and the scale, u·|s_j−m| from the shift, ≤4u from exp; kb+2 roundings in the
    # blocked sums (see _blocked_sums) and the division.
    total = (d + 4) * sensitivity + (m.abs() + 4) * (mean_abs_v + ao) + (kb + 3) * (mean_abs_v + ao)
    bound = 2 * U * total + n * 2.0**-1000 * vmax
    # The log-sum-exp m + log(l): relative error of l from the logits, exp and the sums, then log and +.
    lse = m + torch.log(l_safe)
    lse_bound = 2 * U * ((d + 4) * pw_sum + m.abs() + kb + 8 + lse.abs() + torch.log(l_safe).abs())

    naive = _naive_same_dtype(dots, None if all_visible else vis, scale, v, dtype)
    seen_rows = seen.squeeze(-1)
    zero = torch.zeros_like(out)
    return {
        "out": torch.where(seen, out, zero),
        "bound": torch.where(seen, bound, zero),
        "lse": torch.where(seen_rows, lse.squeeze(-1), torch.full_like(lse.squeeze(-1), -math.inf)),
        "lse_bound": torch.where(seen_rows, lse_bound.squeeze(-1), torch.zeros_like(lse_bound.squeeze(-1))),
        "error_scale": torch.where(seen_rows, error_scale.amax(-1), torch.zeros_like(error_scale[..., 0])),
        "naive": torch.where(seen, naive, zero),
    }


def _blocked_sums(p: torch.Tensor, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``p @ x`` with a small, known rounding error (``x`` carries a ones column for ``Σp``).

    Keys are cut into blocks of ``kb`` (≥ 256, at most 16 blocks); each block is one matmul (error
    ≤ kb·u·Σ|terms|) and the block partials are added with TwoSum, whose own error is second order.
    The total error is ≤ (kb + 1)·u·Σ|terms| instead of n·u for one long sum. Returns kb, p@x.
    """
    n = p.shape[-1]
    kb = max(256, -(-n // 16))
    parts = [p[..., j:j + kb] @ x[..., j:j + kb, :] for j in range(0, n, kb)]
    hi, lo = _cascade(parts)
    return kb, hi + lo


def _cascade(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cascaded summation: the running sum ``hi`` and the TwoSum errors accumulated in ``lo``;
    ``hi + lo`` is the sum with error ≤ u·|sum| + O(n·u²)·Σ|parts|."""
    hi, lo = parts[0], torch.zeros_like(parts[0])
    for part in parts[1:]:
        hi, e = _two_sum(hi, part)
        lo += e
    return hi, lo


def _naive_same_dtype(dots: torch.Tensor, vis: torch.Tensor | None, scale: float, v: torch.Tensor,
                      dtype: str) -> torch.Tensor:
    """The seed's naive attention in the case dtype, modelled deterministically: scores, scaled
    scores, softmax probabilities and the output are each rounded to the dtype (accumulation inside
    a stage in float32 or better, as PyTorch does on CPU and CUDA). Fully masked rows give 0.
    ``vis`` None means every key is visible."""
    scores = round_like_dtype(round_like_dtype(dots, dtype).mul_(scale), dtype)
    if vis is not None:
        scores.masked_fill_(~vis, -math.inf)
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp_(scores.sub_(m))
    denom = e.sum(-1, keepdim=True)
    probs = round_like_dtype(e.div_(torch.where(denom > 0, denom, torch.ones_like(denom))), dtype)
    return round_like_dtype(probs @ v, dtype)


# --- tiers 2 and 3 ---------------------------------------------------------------------------------


def _refine(case: Case, inputs: CaseInputs, qkv64: tuple[torch.Tensor, ...], out32: np.ndarray,
            undecided: np.ndarray, stats: RefinementStats) -> None:
    """Decide every undecided element of ``out32`` ([b, hkv, g, sq, d]) in place: tier 2 for all
    of them (vectorised over rows and over KV heads, on the device of ``qkv64``: q [b, hkv, g, sq, d]
    and k, v in float64, so that a GPU gets a few large kernels per case, not a few per head), then
    tier 3 for the few tier 2 leaves open."""
    b, hkv, g, sq, d = out32.shape
    q, k, v = qkv64
    kpm = inputs.key_padding_mask
    rows = np.argwhere(undecided.any(-1))  # (bi, hi, gi, i), sorted: rows of one KV head are adjacent
    left: dict[tuple[int, ...], list[int]] = {}
    for batch in _tier2_batches(case, kpm, rows):
        heads = len(batch)
        r_max = max(len(seg.rows) for seg in batch)
        n = max(seg.kmax for seg in batch)
        bi_t = torch.as_tensor([seg.bi for seg in batch], device=q.device)
        hi_t = torch.as_tensor([seg.hi for seg in batch], device=q.device)
        qb = q.new_zeros(heads, r_max, d)
        see = torch.zeros(heads, r_max, n, dtype=torch.bool)
        er_parts, ec_parts, where = [], [], []
        for j, seg in enumerate(batch):
            qb[j, :len(seg.rows)] = q[seg.bi, seg.hi, seg.rows[:, 2], seg.rows[:, 3]]
            see[j, :len(seg.rows), :seg.kmax] = seg.see
            er, ec = np.nonzero(undecided[seg.bi, seg.hi, seg.rows[:, 2], seg.rows[:, 3]])
            er_parts.append(j * r_max + er)
            ec_parts.append(ec)
            where.append(np.stack([np.full(len(er), seg.bi), np.full(len(er), seg.hi), seg.rows[er, 2],
                                   seg.rows[er, 3], ec], axis=1))
        er, ec, at = np.concatenate(er_parts), np.concatenate(ec_parts), np.concatenate(where)
        kb, vb, see = k[bi_t, hi_t, :n], v[bi_t, hi_t, :n], see.to(q.device)
        vals, decided = _double_double(qb, kb, vb, see, er, ec, case)
        if not decided.all():  # the rows with something left, again with the double-double exp
            sub = ~decided
            vals[sub], decided[sub] = _precise_rows(qb, kb, vb, see, er[sub], ec[sub], case)
        out32[tuple(at[decided].T)] = vals[decided]
        stats.double_double += int(decided.sum())
        for bi, hi, gi, i, c in at[~decided]:
            left.setdefault((int(bi), int(hi), int(gi), int(i)), []).append(int(c))
    if left:
        qn = inputs.q.to(torch.float64).reshape(b, hkv, g, sq, d).numpy()
        kn = inputs.k.to(torch.float64).numpy()
        vn = inputs.v.to(torch.float64).numpy()
        for (bi, hi, gi, i), cols in left.items():
            see = visible(case, None if kpm is None else kpm[bi:bi + 1], np.array([i]))[0, 0]
            keys = see.nonzero().flatten().numpy()
            exact = _exact_row(qn[bi, hi, gi, i], kn[bi, hi, keys], vn[bi, hi][keys][:, cols], case)
            for c, val in zip(cols, exact):
                out32[bi, hi, gi, i, c] = val
                stats.exact += 1


@dataclass
class _Segment:
    """Undecided query rows of one KV head (``rows``: (bi, hi, gi, i) each), their visible keys."""

    bi: int
    hi: int
    rows: np.ndarray
    see: torch.Tensor  # bool [len(rows), kmax]
    kmax: int


def _tier2_batches(case: Case, kpm: torch.Tensor | None, rows: np.ndarray) -> Iterator[list[_Segment]]:
    """Group the undecided rows into batches of segments (one KV head each) whose padded working set
    heads × max rows × max keys stays within TIER2_ELEMENTS; a head with more rows is cut up."""
    batch: list[_Segment] = []
    for bh in np.unique(rows[:, :2], axis=0):
        bi, hi = int(bh[0]), int(bh[1])
        head = rows[(rows[:, 0] == bi) & (rows[:, 1] == hi)]
        see_all = visible(case, None if kpm is None else kpm[bi:bi + 1], head[:, 3])[0]
        kmax = int(see_all.any(0).nonzero().max()) + 1
        per = max(1, TIER2_ELEMENTS // kmax)
        for r0 in range(0, len(head), per):
            seg = _Segment(bi, hi, head[r0:r0 + per], see_all[r0:r0 + per, :kmax], kmax)
            grown = [*batch, seg]
            if batch and len(grown) * max(len(s.rows) for s in grown) * max(s.kmax for s in grown) > TIER2_ELEMENTS:
                yield batch
                grown = [seg]
            batch = grown
    if batch:
        yield batch


def _precise_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, see: torch.Tensor, er: np.ndarray,
                  ec: np.ndarray, case: Case) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_double_double` with the double-double exp for the elements (flat row ``er``, column
    ``ec``) of a batch laid out as q [H, R, D], k/v [H, n, D], see [H, R, n]: each of their rows
    becomes a head of its own (its keys gathered), in groups that keep the gathered keys bounded."""
    heads, r_max, d = q.shape
    n = k.shape[1]
    rows = np.unique(er)
    vals = np.zeros(len(er), dtype=np.float32)
    decided = np.zeros(len(er), dtype=bool)
    per = max(1, TIER2_ELEMENTS * 4 // (n * d))
    for r0 in range(0, len(rows), per):
        group = rows[r0:r0 + per]
        idx = torch.as_tensor(group, device=q.device)
        slot = np.full(heads * r_max, -1)
        slot[group] = np.arange(len(group))
        mine = slot[er] >= 0
        head_of = idx // r_max
        vals[mine], decided[mine] = _double_double(q.reshape(-1, d)[idx][:, None], k[head_of], v[head_of],
                                                   see.reshape(-1, n)[idx][:, None], slot[er[mine]], ec[mine], case,
                                                   precise=True)
    return vals, decided


TIER2_ELEMENTS = 1 << 21  # (row, key) pairs per tier-2 chunk: bounds its working memory


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = 134217729.0 * a  # 2**27 + 1 (Veltkamp)
    hi = c - (c - a)
    return hi, a - hi


def _two_prod(a: torch.Tensor, b: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b if isinstance(b, torch.Tensor) else torch.full_like(a, b))
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _dd_sum(hi: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Double-double sum over the last axis by a pairwise tree; returns (hi, lo, levels). Each node
    adds two double-doubles with TwoSum on the leading parts and a final TwoSum (both exact) and
    two roundings of the trailing parts, an error ≤ 3u²·Σ|terms below it|; so the whole error is
    ≤ 3·levels·u²·Σ|terms| (the terms being the exact leaf values)."""
    levels = 0
    while hi.shape[-1] > 1:
        if hi.shape[-1] % 2:
            hi = torch.nn.functional.pad(hi, (0, 1))
            lo = torch.nn.functional.pad(lo, (0, 1))
        h = hi.shape[-1] // 2
        s, e = _two_sum(hi[..., :h], hi[..., h:])
        hi, lo = _two_sum(s, e + (lo[..., :h] + lo[..., h:]))
        levels += 1
    return hi[..., 0], lo[..., 0], levels


def _scale_dd(case: Case) -> tuple[float, float]:
    if case.scale is not None:
        return case.scale, 0.0
    with mpmath.workprec(200):
        s = 1 / mpmath.sqrt(case.d)
        hi = float(s)
        return hi, float(s - hi)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e exactly, as float64, for integer tensors ``e`` in the normal range (built from the bits)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def _slices(x: torch.Tensor, beta: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the rows of ``x`` exactly (Ozaki): x = a·2^(e−β) + b·2^(e−2β) + rest, with integers
    |a| ≤ 2^β, |b| ≤ 2^(β−1), |rest| ≤ 2^(e−2β−1) and 2^e > max|row|. Returns (a, b, rest, e)."""
    e = torch.frexp(x.abs().amax(-1, keepdim=True)).exponent
    a = torch.round(x * _pow2(beta - e))
    r1 = x - a * _pow2(e - beta)  # exact: a·2^(e−β) is x rounded to that grid
    b = torch.round(r1 * _pow2(2 * beta - e))
    return a, b, r1 - b * _pow2(e - 2 * beta), e


def _dd_dots(q: torch.Tensor, kt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dot products of the rows of ``q`` [..., R, D] with the columns of ``kt`` [..., D, n] as double-doubles,
    from matmuls: both sides are sliced (:func:`_slices`) so that the four products of leading
    slices are exact integer matmuls (D·2^(2β) ≤ 2^53); the remainders enter through two ordinary
    matmuls whose error is ~2^(-2β) smaller than the plain dot product's; the parts are added with
    TwoSum. Returns (hi, lo, bound on |hi + lo − exact dot|)."""
    d = q.shape[-1]
    beta = (53 - math.ceil(math.log2(max(d, 2)))) // 2
    qa, qb, qr, eq = _slices(q, beta)
    ka, kb, kr, ek = (x.transpose(-1, -2) for x in _slices(kt.transpose(-1, -2), beta))
    base = eq + ek  # [..., R, n] exponent of each (row, key) pair
    parts = [(qa @ ka) * _pow2(base - 2 * beta), (qa @ kb) * _pow2(base - 3 * beta),
             (qb @ ka) * _pow2(base - 3 * beta), (qb @ kb) * _pow2(base - 4 * beta),
             q @ kr + qr @ (kt - kr)]
    hi, lo = _two_sum(*_cascade(parts))
    total = sum(part.abs() for part in parts)
    # The two rounded matmuls: ≤ γ_2D·Σ(|q||kr| + |qr||k − kr|) ≤ 1.01·2D·u·D·(max|q|·max|kr| + max|qr|·max|k|);
    # the TwoSum chain: ≤ 8u²·Σ|parts|.
    q_max, qr_max = q.abs().amax(-1, keepdim=True), qr.abs().amax(-1, keepdim=True)
    k_max, kr_max = kt.abs().amax(-2, keepdim=True), kr.abs().amax(-2, keepdim=True)
    err = 1.01 * 2 * d * d * U * (q_max * kr_max + qr_max * k_max) + 8 * U * U * total
    return hi, lo, err


def _dd_add(ah: torch.Tensor, al: torch.Tensor, bh: torch.Tensor | float,
            bl: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    s, e = _two_sum(ah, bh if isinstance(bh, torch.Tensor) else torch.full_like(ah, bh))
    return _two_sum(s, e + (al + bl))


def _dd_mul(ah: torch.Tensor, al: torch.Tensor, bh: torch.Tensor,
            bl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p, e = _two_prod(ah, bh)
    return _two_sum(p, e + (ah * bl + al * bh))


def _dd_constant(x: Fraction) -> tuple[float, float]:
    hi = float(x)
    return hi, float(x - Fraction(hi))


with mpmath.workprec(300):
    _, _man, _exp, _ = mpmath.log(2)._mpf_
_LN2 = Fraction(int(_man)) * Fraction(2) ** int(_exp)
_LN2_1 = float(Fraction(round(_LN2 * 2**40), 2**40))  # 40 bits: k·_LN2_1 is exact for |k| < 2^13
_LN2_2, _LN2_3 = _dd_constant(_LN2 - Fraction(_LN2_1))
_EXP_TERMS = 15  # Taylor terms of expm1 on |r| ≤ 0.35/16: the first one left out is < 2^-120
_INV_FACTORIAL = [_dd_constant(Fraction(1, math.factorial(n))) for n in range(_EXP_TERMS + 1)]
EXP_DD_ERROR = 2.0**-88  # relative error of _exp_dd (analysis ~2^-93; margin kept)


def _exp_dd(x_hi: torch.Tensor, x_lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(x_hi + x_lo) as a double-double for x ≤ ~0: relative error ≤ EXP_DD_ERROR down to
    x = −650; below, where the trailing part is subnormal, and below x = −700, where the result is
    0, the absolute error is < 2^-1000, which the callers' bounds carry (the n·2^-1000 term).

    x = k·ln2 + r with ln2 in three parts (k·ln2₁ exact, the subtraction exact by Sterbenz);
    expm1(r/16) by its Taylor series in double-double (Horner), then four doublings
    expm1(2a) = 2·expm1(a) + expm1(a)², which keep the relative error of expm1; 1 + expm1; ·2^k.
    """
    x_hi = x_hi.clamp(min=-700.0)
    k = torch.round(x_hi / float(_LN2))
    t = x_hi - k * _LN2_1
    p, pe = _two_prod(k, _LN2_2)
    r_hi, r_lo = _two_sum(t, -p)
    r_hi, r_lo = _two_sum(r_hi, r_lo - pe - k * _LN2_3 + x_lo)
    r_hi, r_lo = r_hi / 16, r_lo / 16  # exact
    c_hi, c_lo = _INV_FACTORIAL[_EXP_TERMS]
    f_hi, f_lo = torch.full_like(r_hi, c_hi), torch.full_like(r_hi, c_lo)
    for n in range(_EXP_TERMS - 1, 0, -1):
        f_hi, f_lo = _dd_mul(f_hi, f_lo, r_hi, r_lo)
        f_hi, f_lo = _dd_add(f_hi, f_lo, *_INV_FACTORIAL[n])
    f_hi, f_lo = _dd_mul(f_hi, f_lo, r_hi, r_lo)  # expm1(r/16)
    for _ in range(4):
        sq_hi, sq_lo = _dd_mul(f_hi, f_lo, f_hi, f_lo)
        f_hi, f_lo = _dd_add(2 * f_hi, 2 * f_lo, sq_hi, sq_lo)
    e_hi, e_lo = _dd_add(f_hi, f_lo, 1.0, 0.0)
    scale = _pow2(k.to(torch.int64))
    under = x_hi <= -700.0
    return torch.where(under, 0.0, e_hi * scale), torch.where(under, 0.0, e_lo * scale)


def _double_double(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, see: torch.Tensor, er: np.ndarray,
                   ec: np.ndarray, case: Case, precise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Tier 2 for the elements (row ``er[e]`` of the flattened [H·R] rows, column ``ec[e]``) of the
    query rows ``q`` [H, R, D] (float64, exact; H KV heads) against keys/values ``k``/``v``
    [H, n, D], ``see`` [H, R, n] the visible keys (padding rows see none).

    Logits are double-double (exact products, TwoSum over D), each weight exp(x_hi)·(1 + x_lo)
    has relative error ≤ eps_j (3u + second order), sums are double-double (:func:`_dd_sum`) and
    the quotient gets one Newton correction. The first-order bound 2·Σ p_j·eps_j·|v_j − o| plus
    the second-order sum and division terms decides the float32 rounding of most elements.
    With ``precise`` the weights come from :func:`_exp_dd` instead (relative error ≤ 2^-88 rather
    than 3u), which decides all but the elements within ~2^-80 of a rounding boundary.
    Returns (float32 values, decided mask) per element.
    """
    kt = k.transpose(-1, -2).contiguous()
    dh, dl, dot_err = _dd_dots(q, kt)
    sh, sl = _scale_dd(case)
    s_hi, s_lo = _two_prod(dh, sh)
    s_hi, s_lo = _two_sum(s_hi, s_lo + dh * sl + dl * sh)
    m = s_hi.masked_fill(~see, -math.inf).amax(-1, keepdim=True)
    x_hi, x_lo = _two_sum(s_hi, -m.expand_as(s_hi))
    x_lo = x_lo + s_lo
    zero = torch.zeros_like(x_hi)
    x_hi, x_lo = torch.where(see, x_hi, zero), torch.where(see, x_lo, zero)
    if precise:
        p, p_lo = _exp_dd(x_hi, x_lo)
        p, p_lo = torch.where(see, p, zero), torch.where(see, p_lo, zero)
        exp_err = EXP_DD_ERROR
    else:
        p, p_lo = torch.where(see, torch.exp(x_hi) * (1.0 + x_lo), zero), zero  # exp(x)·(1 + ε)
        exp_err = 3 * U  # exp (≤ 1 ulp) and the product
    den_h, den_l, _ = _dd_sum(p, p_lo)
    # Relative error of each weight: the exp, then the double-double logit (second order).
    eps = torch.where(see, exp_err + abs(case.effective_scale) * dot_err
                      + (5 * s_hi.abs() + 3 * x_hi.abs() + 3 * x_hi * x_hi) * U * U, zero)
    n = k.shape[-2]  # the rows of all heads, flattened: er indexes them
    p, p_lo, eps = p.reshape(-1, n), p_lo.reshape(-1, n), eps.reshape(-1, n)
    den_h, den_l = den_h.reshape(-1), den_l.reshape(-1)
    er_t = torch.as_tensor(er, device=q.device)
    pe = p[er_t]
    vc = v[er_t // q.shape[-2], :, torch.as_tensor(ec, device=q.device)]  # [E, n]: each element's value column
    ph, pl = _two_prod(pe, vc)
    if precise:
        pl = pl + p_lo[er_t] * vc  # two roundings, ≤ 2u²·|p·v|: inside the second-order term below
    num_h, num_l, levels = _dd_sum(ph, pl)
    dh_e, dl_e = den_h[er_t], den_l[er_t]
    o_h = num_h / dh_e
    r_h, r_l = _two_prod(o_h, dh_e)  # double-double division: one Newton correction
    o_l = ((num_h - r_h) - r_l + num_l - o_h * dl_e) / dh_e
    pn = pe / dh_e[:, None]
    first = (pn * eps[er_t] * (vc - o_h[:, None]).abs()).sum(-1)
    second = (3 * levels + 14) * U * U * (o_h.abs() + (pn * vc.abs()).sum(-1))
    # ×(1 + 2^-20): the float64 evaluation of the bound itself rounds (relative n·u at most).
    bound = 2 * (first + second) * (1 + 2.0**-20) + n * 2.0**-1000 * vc.abs().amax(-1)
    o32 = o_h.to(torch.float32)
    below = torch.nextafter(o32, torch.full_like(o32, -math.inf))
    above = torch.nextafter(o32, torch.full_like(o32, math.inf))
    mid_lo = (o32.double() + below.double()) / 2  # float32 midpoints are exact in float64
    mid_hi = (o32.double() + above.double()) / 2
    # o_h − mid is exact when the two are close (Sterbenz); then o_l is added.
    inside = ((o_h - mid_lo) + o_l > bound) & ((mid_hi - o_h) - o_l > bound)
    low = (o_h - mid_lo) + o_l < -bound
    high = (mid_hi - o_h) - o_l < -bound
    value = torch.where(inside, o32, torch.where(low, below, above))
    unseen = dh_e == 0  # a row that sees no key: its output is 0 by the contract
    value = torch.where(unseen, torch.zeros_like(value), value)
    return value.cpu().numpy(), (inside | low | high | unseen).cpu().numpy()


EXACT_SHIFT = 149  # every float32 / bfloat16 / float16 value is an integer multiple of 2**-149


def _exact_row(q: np.ndarray, k: np.ndarray, v: np.ndarray, case: Case) -> list[np.float32]:
    """Tier 3 for one row: exact logits, rational degenerate results, else Ziv intervals."""
    dots = _exact_dots(q, k)
    scale = case.effective_scale
    groups: dict[int, list[int]] = {}
    for j, dot in enumerate(dots):
        groups.setdefault(0 if scale == 0 else dot, []).append(j)
    results = []
    for c in range(v.shape[1]):
        vc = [float(x) for x in v[:, c]]
        means = {sum((Fraction(vc[j]) for j in js), Fraction(0)) / len(js) for js in groups.values()}
        if len(means) == 1:  # all groups share their mean: the output is exactly that rational
            results.append(round_fraction_to_f32(means.pop()))
            continue
        results.append(_ziv_intervals(dots, vc, case))
    return results


def _exact_dots(q: np.ndarray, k: np.ndarray) -> list[int]:
    """Exact dot products as integers: value = dot · 2**(-2·EXACT_SHIFT)."""
    qi = np.array([int(x) for x in np.ldexp(q, EXACT_SHIFT)], dtype=object)
    ki = np.vectorize(int, otypes=[object])(np.ldexp(k, EXACT_SHIFT))
    return list(ki @ qi)


def _rational_scale(case: Case) -> Fraction | None:
    if case.scale is not None:
        return Fraction(case.scale)
    root = math.isqrt(case.d)
    return Fraction(1, root) if root * root == case.d else None


def _exact_lse(q: np.ndarray, k: np.ndarray, case: Case) -> np.float32:
    """Correctly rounded float32 of log Σ_j exp(scale·q·k_j). With one visible key it is the
    logit itself (rational when the scale is); otherwise transcendental, decided by intervals."""
    dots = _exact_dots(q, k)
    rational = _rational_scale(case)
    if len(dots) == 1 and rational is not None:
        return round_fraction_to_f32(Fraction(dots[0], 2 ** (2 * EXACT_SHIFT)) * rational)
    def lse(iv: Any, logits: list[Any]) -> Any:
        ref = iv.mpf(max(float(x.mid) for x in logits))
        total = iv.mpf(0)
        for x in logits:
            total += iv.exp(x - ref)
        return ref + iv.log(total)

    return _decide_by_intervals(dots, case, lse, "a log-sum-exp")


def _ziv_intervals(dots: list[int], vc: list[float], case: Case) -> np.float32:
    def output(iv: Any, logits: list[Any]) -> Any:
        ref = max(float(x.mid) for x in logits)
        num = iv.mpf(0)
        den = iv.mpf(0)
        for x, val in zip(logits, vc):
            w = iv.exp(x - ref)
            num += w * iv.mpf(val)
            den += w
        return num / den

    return _decide_by_intervals(dots, case, output, "an output element")


def _decide_by_intervals(dots: list[int], case: Case, value: Callable[[Any, list[Any]], Any],
                         what: str) -> np.float32:
    """Ziv's strategy: evaluate ``value(iv, logits)`` in interval arithmetic at doubling precision
    until both endpoints round to the same float32 (the exact value is then known to round there).
    The logits are ``scale · dot · 2**(-2·EXACT_SHIFT)`` from exact integer dots."""
    iv = mpmath.iv
    saved = iv.prec
    try:
        prec = 128
        while prec <= 8192:
            iv.prec = prec
            scale = (1 / iv.sqrt(case.d)) if case.scale is None else iv.mpf(case.scale)
            logits = [iv.mpf(dot) * iv.mpf(2) ** (-2 * EXACT_SHIFT) * scale for dot in dots]
            lo, hi = value(iv, logits)._mpi_  # raw (sign, mantissa, exponent, bitcount) endpoints
            a = round_fraction_to_f32(_raw_mpf_to_fraction(lo))
            if a == round_fraction_to_f32(_raw_mpf_to_fraction(hi)):
                return a
            prec *= 2
    finally:
        iv.prec = saved
    raise ArithmeticError(f"{case.id}: could not decide the float32 rounding of {what}")


def _raw_mpf_to_fraction(raw: tuple[int, int, int, int]) -> Fraction:
    sign, man, exp, _ = raw
    value = Fraction(int(man)) * (Fraction(2) ** int(exp))
    return -value if sign else value
