"""Tier 1 of the exact reference: float64 attention of a block of rows with a rigorous
first-order bound of its own error, and the naive same-dtype model the goldens store the error of.
"""

from __future__ import annotations

import math

import torch

from conformance.reference.double_double import U, cascade
from conformance.reference.exact_dots import gathered_keys, inexact_dots, lowest_bit_exponents
from conformance.reference.rounding import float32_neighbours
from conformance.spec.inputs import TORCH_DTYPES

# Score-matrix elements per block: bounds the working memory for long contexts (about 10 float64
# temporaries of this size: ~320 MiB on CPU; ~2.5 GiB of GPU memory, where larger blocks keep it busy).
BLOCK_ELEMENTS = 1 << 22
CUDA_BLOCK_ELEMENTS = 1 << 25


def round_like_dtype(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round float64 values to ``dtype`` (nearest-even, via float32 as torch casts) and back to float64."""
    if dtype == "float32":
        return x.to(torch.float32).to(torch.float64)
    return x.to(torch.float32).to(TORCH_DTYPES[dtype]).to(torch.float64)


# Extra logit error (in units of u·w_j, w_j ≥ |s_j|) of soft-capping cap·tanh(s/cap): the division
# (u), tanh (≤ 4 ulp of |t|, conservatively: libm's and SLEEF's tanh are within 1-2 ulp, not correctly
# rounded) and the product (u); the argument's error passes through unamplified (|tanh'| ≤ 1).
SOFTCAP_LOGIT_TERMS = 6


def softcap64(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Tier 1's soft-capped logits ``cap·tanh(s/cap)`` (``s`` itself when ``softcap`` is None)."""
    return s if softcap is None else torch.tanh(s / softcap).mul_(softcap)


def with_sink_key(sink: torch.Tensor, vis: torch.Tensor, *keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The sink as one more key, after the real ones: visible to every row (``vis`` [b,1|h,r,n] gets a
    True column, broadcast to ``sink``'s rows) and 0 in each of ``keys`` ([b,h,n,x] tensors: k, v and
    their derived operands). Its logit is the sink itself (set by the caller): a key with value 0
    adds exp(sink − m) to the denominator and nothing to the numerator, which is the sink's rule."""
    shape = (*vis.shape[:-1], 1)
    vis = torch.cat([vis, torch.ones(shape, dtype=torch.bool, device=vis.device)], -1)
    return (vis, *(torch.cat([x, x.new_zeros(*x.shape[:-2], 1, x.shape[-1])], -2) for x in keys))


def float64_block(q: torch.Tensor, k: torch.Tensor, kabs: torch.Tensor, v: torch.Tensor, vx: torch.Tensor,
                   vmax: torch.Tensor, vis: torch.Tensor, scale: float, dtype: str, softcap: float | None = None,
                   sink: torch.Tensor | None = None, k_bits: torch.Tensor | None = None,
                   all_visible: bool | None = None) -> dict[str, torch.Tensor]:
    """Float64 attention of one block with its error bound. q [b,h,r,d], k/v [b,h,n,d], ``kabs`` |k|,
    ``vx`` [v, |v|, 1] [b,h,n,2d+1], ``vmax`` [b,h,1,d] ≥ max|v| over the keys, vis [b,1,r,n];
    ``softcap`` caps the scaled logits, ``sink`` [1,h,r,1] the rows' sink logits (a key of value 0);
    ``k_bits`` [b,h,1,n], the keys' :func:`lowest_bit_exponents`: with it, the logits whose dot products
    are exact (:func:`inexact_dots`: most of them for bfloat16 and float16 inputs) drop the dot
    product's d·u from their error. ``all_visible``: whether ``vis`` is all True, when the caller knows
    (:func:`conformance.spec.inputs.block_sees_every_key`; it saves a device synchronisation), else
    asked of ``vis``."""
    d = q.shape[-1]
    naive_vis = vis
    dots = q @ k.transpose(-1, -2)  # products are exact; only the sum rounds
    s = softcap64(dots * scale, softcap)
    adot = q.abs() @ kabs.transpose(-1, -2)
    inexact = None if k_bits is None else inexact_dots(adot, lowest_bit_exponents(q), k_bits)
    w = adot.mul_(abs(scale))  # |scale|·Σ_d |q_d k_jd| ≥ |s_j|
    if sink is not None:
        rows = (*q.shape[:-1], 1)
        vis, vx = with_sink_key(sink, vis.expand(*q.shape[:-1], vis.shape[-1]), vx)
        vx[..., -1, -1] = 1.0  # the ones column: the sink's weight joins Σp
        s = torch.cat([s, sink.expand(rows)], -1)
        w = torch.cat([w, sink.abs().expand(rows)], -1)  # ≥ |sink|, which the shift's rounding sees
        if inexact is not None:  # the sink's logit is given, not computed
            inexact = torch.cat([inexact, torch.zeros(rows, dtype=torch.bool, device=inexact.device)], -1)
    n = s.shape[-1]
    # No mask to apply (non-causal or decode blocks without padding); the sink's column is always
    # visible, so this is also whether the naive model's ``naive_vis`` hides a key.
    if all_visible is None:
        all_visible = bool(vis.all())
    s_masked = s if all_visible else s.masked_fill_(~vis, -math.inf)
    m = s_masked.amax(-1, keepdim=True)
    seen = torch.isfinite(m)
    m = torch.where(seen, m, torch.zeros_like(m))
    p = torch.exp(s_masked - m)
    kb, sums = blocked_sums(p, vx)
    pv, l_sum = sums[..., :2 * d], sums[..., 2 * d:]
    l_safe = torch.where(seen, l_sum, torch.ones_like(l_sum))
    out = pv[..., :d] / l_safe
    mean_abs_v = pv[..., d:] / l_safe  # Σ_j p_j |v_j|
    pw = w.mul_(p)
    pw_sums = (pw @ vx[..., d:]) / l_safe
    pw_v, pw_sum = pw_sums[..., :d], pw_sums[..., d:]  # Σ_j p_j w_j |v_j| and Σ_j p_j w_j
    ao = out.abs()
    sensitivity = pw_v + ao * pw_sum  # ≥ Σ_j p_j w_j |v_j − o|
    error_scale = sensitivity + mean_abs_v
    # Rigorous first-order bound of this block's float64 error: logit error (d+3)·u·w_j from the
    # dot product and the scale (+ SOFTCAP_LOGIT_TERMS·u·w_j soft-capped), u·|s_j−m| from the shift,
    # ≤4u from exp; kb+1 roundings in the blocked sums (see blocked_sums) and the division. With
    # ``k_bits`` the d·u·w_j of the dot product counts only where it may round: the sums over j of
    # the logits' terms are split, (4 + softcap)·Σ_j p_j w_j |v_j − o| + d·Σ_{j inexact} p_j w_j |v_j − o|.
    capped = SOFTCAP_LOGIT_TERMS if softcap is not None else 0
    if inexact is None:
        logit_error, logit_lse = (d + 4 + capped) * sensitivity, (d + 4 + capped) * pw_sum
    elif not bool(inexact.any()):
        logit_error, logit_lse = (4 + capped) * sensitivity, (4 + capped) * pw_sum
    else:
        pwi_sums = inexact_weighted_sums(pw, inexact, vx[..., d:]) / l_safe
        pwi_v, pwi_sum = pwi_sums[..., :d], pwi_sums[..., d:]
        logit_error = (4 + capped) * sensitivity + d * (pwi_v + ao * pwi_sum)
        logit_lse = (4 + capped) * pw_sum + d * pwi_sum
    total = logit_error + (m.abs() + 4) * (mean_abs_v + ao) + (kb + 3) * (mean_abs_v + ao)
    bound = 2 * U * total + n * 2.0**-1000 * vmax
    # The log-sum-exp m + log(l): relative error of l from the logits, exp and the sums, then log and +.
    lse = m + torch.log(l_safe)
    lse_bound = 2 * U * (logit_lse + m.abs() + kb + 8 + lse.abs() + torch.log(l_safe).abs())

    naive = naive_same_dtype(dots, None if all_visible else naive_vis, scale, v, dtype, softcap, sink)
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


def inexact_weighted_sums(pw: torch.Tensor, inexact: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(pw * inexact) @ x`` for the nonnegative ``pw`` [b,h,r,n] and ``x`` [b,h|1,n,c]: the bound's
    sums over the logits whose dot products may round. Those are few and gather in a few keys (a key
    with a very small element, against a row with one), so when at most a quarter of the keys has an
    inexact dot in any row, only those keys' columns are multiplied (the others add exact zeros)."""
    order = gathered_keys(inexact.any(-2))  # [b,h,c]: per (b, h) its keys with an inexact dot, first
    count = order.shape[-1]
    if 4 * count > pw.shape[-1]:
        return (pw * inexact) @ x
    rows = order.unsqueeze(-2).expand(*pw.shape[:-1], count)
    weights = torch.gather(pw, -1, rows) * torch.gather(inexact, -1, rows)
    cols = order.unsqueeze(-1).expand(*order.shape, x.shape[-1])
    return weights @ torch.gather(x.expand(*pw.shape[:2], *x.shape[-2:]), -2, cols)


def tier1_decision(out: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 rounding of the float64 values ``out`` and where their error ``bound`` leaves it
    open: an element is decided when ``out ± bound`` lies strictly between the midpoints to its float32
    neighbours (float32 midpoints are exact in float64). Elementwise, on the tensors' device."""
    o32, _, _, mid_lo, mid_hi = float32_neighbours(out)
    return o32, ~((out - bound > mid_lo) & (out + bound < mid_hi))


SUM_BLOCK = 64  # keys per matmul of the blocked sums
CASCADE_BLOCKS = 16  # up to this many blocks, TwoSum adds the partials; beyond, a pairwise tree


def blocked_sums(p: torch.Tensor, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``p @ x`` with a small, known rounding error (``x`` carries a ones column for ``Σp``).

    Returns ``(r, p @ x)`` with error ≤ (r + 1)·u·Σ|terms| (first order), instead of n·u for one long
    sum. Keys are cut into blocks of ``SUM_BLOCK`` (64); each block is one matmul, error ≤ 64·u·Σ|terms|.
    Up to 16 blocks (1024 keys) the partials are added with TwoSum, whose own error is second order:
    r = 64. With more blocks the partials come from one batched matmul and are added by a fixed
    pairwise tree of L levels, each level one rounding: r = 64 + L − 1 (72 at 32k keys; with 256-key
    blocks it was 263, and with 16 blocks of 2048 keys, 2048). The bound's sum term is the largest
    of tier 1's once the dot products are exact (:func:`inexact_dots`): 64-key blocks leave 2-3×
    fewer elements to tier 2 than 256-key ones (``benchmarks/tier1_decisions.py``).
    """
    n = p.shape[-1]
    kb = SUM_BLOCK
    if n <= kb * CASCADE_BLOCKS:
        parts = [p[..., j:j + kb] @ x[..., j:j + kb, :] for j in range(0, n, kb)]
        hi, lo = cascade(parts)
        return block_roundings(n), hi + lo
    full = n // kb * kb
    # [..., r, nb, kb] → [..., nb, r, kb] @ [..., nb, kb, c]: one matmul per block, batched.
    parts = p[..., :full].unflatten(-1, (-1, kb)).movedim(-2, -3) @ x[..., :full, :].unflatten(-2, (-1, kb))
    tail = (p[..., full:] @ x[..., full:, :]).unsqueeze(-3) if full < n else None  # the last, shorter block
    return block_roundings(n), pairwise_sum(parts, -3, tail).squeeze(-3)


def block_roundings(m: int) -> int:
    """The ``r`` :func:`blocked_sums` states for ``m`` terms: ``SUM_BLOCK`` up to ``CASCADE_BLOCKS``
    blocks, else ``SUM_BLOCK`` + L − 1 for the L levels of the pairwise tree over ⌈m / SUM_BLOCK⌉ partials."""
    kb = SUM_BLOCK
    return kb if m <= kb * CASCADE_BLOCKS else kb + (-(-m // kb) - 1).bit_length() - 1


def sum_roundings(m: int) -> int:
    """:func:`block_roundings`, at most ``m`` (one block of m < 64 terms rounds m − 1 times): the error
    of :func:`blocked_sums` over ``m`` terms is ≤ (r + 1)·u·Σ|terms|."""
    return min(block_roundings(m), m)


def pairwise_sum(x: torch.Tensor, dim: int = -1, tail: torch.Tensor | None = None) -> torch.Tensor:
    """``x.sum(dim, keepdim=True)`` by a fixed pairwise tree of elementwise additions: every addition
    is one IEEE rounding in a fixed order, so the bits are the same on every device and thread count,
    unlike a reduction kernel's. For the naive model's sums whose rounding to the case dtype is
    sensitive to the last float64 bit, and for the blocked sums' partials (``dim`` -3).

    Each level adds elements 2i and 2i + 1; an odd last element gets + 0.0: the additions of zero
    padding to a power of two, without the padded copy. ``tail`` (size 1 along ``dim``) is one more
    element after ``x``'s, joined at the first level instead of by a copy of ``x``."""
    dim = dim % x.dim()
    if x.shape[dim] == 0:  # no element: the sum of the zero padding (or the tail alone)
        return tail if tail is not None else x.new_zeros(*x.shape[:dim], 1, *x.shape[dim + 1:])
    while x.shape[dim] + (tail is not None) > 1:
        n = x.shape[dim]
        half, odd = n // 2, n % 2 == 1
        extra = odd or tail is not None  # one element left over: x's last, the tail, or their sum
        level = x.new_empty(*x.shape[:dim], half + extra, *x.shape[dim + 1:])
        pairs = x.narrow(dim, 0, 2 * half).unflatten(dim, (half, 2))
        torch.add(pairs.select(dim + 1, 0), pairs.select(dim + 1, 1), out=level.narrow(dim, 0, half))
        if extra:
            first = x.narrow(dim, n - 1, 1) if odd else tail
            second = tail if odd and tail is not None else 0.0
            torch.add(first, second, out=level.narrow(dim, half, 1))
        x, tail = level, None
    return x


def naive_same_dtype(dots: torch.Tensor, vis: torch.Tensor | None, scale: float, v: torch.Tensor,
                      dtype: str, softcap: float | None = None, sink: torch.Tensor | None = None) -> torch.Tensor:
    """The seed's naive attention in the case dtype, modelled deterministically: scores, scaled
    scores, softmax probabilities and the output are each rounded to the dtype (accumulation inside
    a stage in float32 or better, as PyTorch does on CPU and CUDA). Fully masked rows give 0.
    ``vis`` None means every key is visible."""
    return round_like_dtype(naive_probs(dots, vis, scale, dtype, softcap, sink)[0] @ v, dtype)


def naive_probs(dots: torch.Tensor, vis: torch.Tensor | None, scale: float, dtype: str, softcap: float | None = None,
                sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The naive path's softmax probabilities (rounded to ``dtype``) from the exact ``dots``; 0 where
    a key is not visible and on rows that see no key. The backward's naive model starts from them.

    Soft-capping rounds s/cap, tanh and the product to the dtype; the sink (rounded to the dtype)
    is one more score column, dropped after the softmax. Returns the probabilities of the real keys
    and, soft-capped, the derivative 1 − tanh² rounded to the dtype (else None)."""
    scores = round_like_dtype(round_like_dtype(dots, dtype).mul_(scale), dtype)
    dcap = None
    if softcap is not None:
        t = round_like_dtype(torch.tanh(round_like_dtype(scores / softcap, dtype)), dtype)
        dcap = round_like_dtype(1 - round_like_dtype(t * t, dtype), dtype)
        scores = round_like_dtype(t * softcap, dtype)
    if vis is not None:
        scores.masked_fill_(~vis, -math.inf)
    n = scores.shape[-1]
    if sink is not None:
        scores = torch.cat([scores, round_like_dtype(sink, dtype).expand(*scores.shape[:-1], 1)], -1)
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp_(scores.sub_(m))
    denom = e.sum(-1, keepdim=True)
    probs = round_like_dtype(e.div_(torch.where(denom > 0, denom, torch.ones_like(denom))), dtype)
    return probs[..., :n], dcap
