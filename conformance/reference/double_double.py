"""Tier 2 of the exact reference: double-double arithmetic in torch (on the generation device).

Error-free transformations (TwoSum, Veltkamp split, TwoProd), double-double sums and products, dot
products from Ozaki-sliced exact matmuls (:func:`dd_dots`), ``exp`` of a double-double argument
with relative error ≤ 2^-88 (:func:`exp_dd`), and the tier-2 decision of output elements
(:func:`double_double_elements`): what it cannot prove correctly rounded goes on to the exact tier.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import mpmath
import numpy as np
import torch

from conformance.reference.exact_dots import gathered_keys, inexact_dots, lowest_bit_exponents
from conformance.reference.rounding import float32_neighbours
from conformance.spec.case import Case
from conformance.spec.inputs import visible

U = 2.0**-53  # unit roundoff of float64


def cascade(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cascaded summation: the running sum ``hi`` and the TwoSum errors accumulated in ``lo``;
    ``hi + lo`` is the sum with error ≤ u·|sum| + O(n·u²)·Σ|parts|."""
    hi, lo = parts[0], torch.zeros_like(parts[0])
    for part in parts[1:]:
        hi, e = two_sum(hi, part)
        lo += e
    return hi, lo


@dataclass
class Segment:
    """Undecided query rows of one KV head (``rows``: (bi, hi, gi, i) each), their visible keys."""

    bi: int
    hi: int
    rows: np.ndarray
    see: torch.Tensor  # bool [len(rows), kmax]
    kmax: int


def tier2_batches(case: Case, kpm: torch.Tensor | None, rows: np.ndarray, limit: int | None = None,
                  device: torch.device | str = "cpu") -> Iterator[list[Segment]]:
    """Group the undecided rows into batches of segments (one KV head each) whose padded working set
    heads × max rows × max keys stays within ``limit`` (default TIER2_ELEMENTS); a head with more
    rows is cut up. The segments' visibility masks are built on ``device``."""
    limit = limit or TIER2_ELEMENTS
    batch: list[Segment] = []
    for bh in np.unique(rows[:, :2], axis=0):
        bi, hi = int(bh[0]), int(bh[1])
        head = rows[(rows[:, 0] == bi) & (rows[:, 1] == hi)]
        see_all = visible(case, None if kpm is None else kpm[bi:bi + 1], head[:, 3], device)[0]
        kmax = int(see_all.any(0).nonzero().max()) + 1
        per = max(1, limit // kmax)
        for r0 in range(0, len(head), per):
            seg = Segment(bi, hi, head[r0:r0 + per], see_all[r0:r0 + per, :kmax], kmax)
            grown = [*batch, seg]
            if batch and len(grown) * max(len(s.rows) for s in grown) * max(s.kmax for s in grown) > limit:
                yield batch
                grown = [seg]
            batch = grown
    if batch:
        yield batch


TIER2_ELEMENTS = 1 << 21  # (row, key) pairs per tier-2 chunk: bounds its working memory (~1 GiB)
# On a GPU, chunks 16× larger (~8 GiB of its memory at the peak): each chunk is a few hundred
# elementwise kernels, and smaller chunks leave the card waiting on their launches. On the H200 the
# 32k × 32k prefill's tier 2 took 2.9 s with 2^23, 1.6 s with 2^25 and 1.5 s with 2^26 (which
# reserves 14 GiB): docs/performance.md, "Fifth run".
CUDA_TIER2_ELEMENTS = 1 << 25


def tier2_limit(device: torch.device) -> int:
    """(row, key) pairs per tier-2 chunk on ``device``."""
    return CUDA_TIER2_ELEMENTS if device.type == "cuda" else TIER2_ELEMENTS


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def veltkamp_split(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = 134217729.0 * a  # 2**27 + 1 (Veltkamp)
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a: torch.Tensor, b: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    p = a * b
    ah, al = veltkamp_split(a)
    bh, bl = veltkamp_split(b if isinstance(b, torch.Tensor) else torch.full_like(a, b))
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def dd_sum(hi: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
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
        s, e = two_sum(hi[..., :h], hi[..., h:])
        hi, lo = two_sum(s, e + (lo[..., :h] + lo[..., h:]))
        levels += 1
    return hi[..., 0], lo[..., 0], levels


def scale_dd(case: Case) -> tuple[float, float]:
    if case.scale is not None:
        return case.scale, 0.0
    with mpmath.workprec(200):
        s = 1 / mpmath.sqrt(case.d)
        hi = float(s)
        return hi, float(s - hi)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e exactly, as float64, for integer tensors ``e`` in the normal range (built from the bits)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def ozaki_slices(x: torch.Tensor, beta: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the rows of ``x`` exactly (Ozaki): x = a·2^(e−β) + b·2^(e−2β) + rest, with integers
    |a| ≤ 2^β, |b| ≤ 2^(β−1), |rest| ≤ 2^(e−2β−1) and 2^e > max|row|. Returns (a, b, rest, e)."""
    e = torch.frexp(x.abs().amax(-1, keepdim=True)).exponent
    a = torch.round(x * pow2(beta - e))
    r1 = x - a * pow2(e - beta)  # exact: a·2^(e−β) is x rounded to that grid
    b = torch.round(r1 * pow2(2 * beta - e))
    return a, b, r1 - b * pow2(e - 2 * beta), e


def dd_dots(q: torch.Tensor, kt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dot products of the rows of ``q`` [..., R, D] with the columns of ``kt`` [..., D, n] as double-doubles:
    (hi, lo, bound on |hi + lo − exact dot|). Where the float64 dot product is exact
    (:func:`~conformance.reference.exact_dots.inexact_dots`: most pairs of bfloat16 and float16
    inputs) it is (q·k, 0) with bound 0; :func:`ozaki_dots` computes the columns (keys) with an inexact
    pair, or every column when more than a quarter have one."""
    plain = q @ kt
    q_bits = lowest_bit_exponents(q)
    k_bits = lowest_bit_exponents(kt.transpose(-1, -2)).transpose(-1, -2)
    inexact = inexact_dots(q.abs() @ kt.abs(), q_bits, k_bits)
    order = gathered_keys(inexact.any(-2))  # [..., c]: per leading index its keys with an inexact pair
    count = order.shape[-1]
    if 4 * count > kt.shape[-1]:
        return ozaki_dots(q, kt)
    zero = torch.zeros_like(plain)
    if count == 0:
        return plain, zero, zero
    kt = kt.expand(*plain.shape[:-2], *kt.shape[-2:])
    hi, lo, err = ozaki_dots(q, torch.gather(kt, -1, order.unsqueeze(-2).expand(*kt.shape[:-1], count)))
    at = order.unsqueeze(-2).expand(*plain.shape[:-1], count)
    return plain.scatter(-1, at, hi), zero.scatter(-1, at, lo), zero.scatter(-1, at, err)


def ozaki_dots(q: torch.Tensor, kt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dot products of the rows of ``q`` [..., R, D] with the columns of ``kt`` [..., D, n] as double-doubles,
    from matmuls: both sides are sliced (:func:`ozaki_slices`) so that the four products of leading
    slices are exact integer matmuls (D·2^(2β) ≤ 2^53); the remainders enter through two ordinary
    matmuls whose error is ~2^(-2β) smaller than the plain dot product's; the parts are added with
    TwoSum. Returns (hi, lo, bound on |hi + lo − exact dot|)."""
    d = q.shape[-1]
    beta = (53 - math.ceil(math.log2(max(d, 2)))) // 2
    qa, qb, qr, eq = ozaki_slices(q, beta)
    ka, kb, kr, ek = (x.transpose(-1, -2) for x in ozaki_slices(kt.transpose(-1, -2), beta))
    base = eq + ek  # [..., R, n] exponent of each (row, key) pair
    parts = [(qa @ ka) * pow2(base - 2 * beta), (qa @ kb) * pow2(base - 3 * beta),
             (qb @ ka) * pow2(base - 3 * beta), (qb @ kb) * pow2(base - 4 * beta),
             q @ kr + qr @ (kt - kr)]
    hi, lo = two_sum(*cascade(parts))
    total = sum(part.abs() for part in parts)
    # The two rounded matmuls: ≤ γ_2D·Σ(|q||kr| + |qr||k − kr|) ≤ 1.01·2D·u·D·(max|q|·max|kr| + max|qr|·max|k|);
    # the TwoSum chain: ≤ 8u²·Σ|parts|.
    q_max, qr_max = q.abs().amax(-1, keepdim=True), qr.abs().amax(-1, keepdim=True)
    k_max, kr_max = kt.abs().amax(-2, keepdim=True), kr.abs().amax(-2, keepdim=True)
    err = 1.01 * 2 * d * d * U * (q_max * kr_max + qr_max * k_max) + 8 * U * U * total
    return hi, lo, err


def dd_add(ah: torch.Tensor, al: torch.Tensor, bh: torch.Tensor | float,
            bl: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    s, e = two_sum(ah, bh if isinstance(bh, torch.Tensor) else torch.full_like(ah, bh))
    return two_sum(s, e + (al + bl))


def dd_mul(ah: torch.Tensor, al: torch.Tensor, bh: torch.Tensor,
            bl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p, e = two_prod(ah, bh)
    return two_sum(p, e + (ah * bl + al * bh))


def dd_constant(x: Fraction) -> tuple[float, float]:
    hi = float(x)
    return hi, float(x - Fraction(hi))


with mpmath.workprec(300):
    _, _man, _exp, _ = mpmath.log(2)._mpf_


_LN2 = Fraction(int(_man)) * Fraction(2) ** int(_exp)
_LN2_1 = float(Fraction(round(_LN2 * 2**40), 2**40))  # 40 bits: k·_LN2_1 is exact for |k| < 2^13
_LN2_2, _LN2_3 = dd_constant(_LN2 - Fraction(_LN2_1))
_EXP_TERMS = 15  # Taylor terms of expm1 on |r| ≤ 0.35/16: the first one left out is < 2^-120
_INV_FACTORIAL = [dd_constant(Fraction(1, math.factorial(n))) for n in range(_EXP_TERMS + 1)]
EXP_DD_ERROR = 2.0**-88  # relative error of exp_dd (analysis and measurement ~2^-97; margin kept)
# exp_dd's reduction x = (64·m + j)·ln2/64 + r, |r| ≤ ln2/128: ln2/64 in three parts, the first of
# 36 bits so that k·_L64_1 is exact for |k| < 2^16 (x ≥ −700 gives |k| ≤ 64 637); 2^(j/64) as
# double-doubles (rounded from 300-bit values: relative error ≤ 2^-106); 10 Taylor terms of expm1(r),
# the first one left out < 2^-108.
_L64 = _LN2 / 64
_L64_1 = float(Fraction(round(_L64 * 2**42), 2**42))
_L64_2, _L64_3 = dd_constant(_L64 - Fraction(_L64_1))
_TABLE_TERMS = 10


def _fraction(x: mpmath.mpf) -> Fraction:
    sign, man, exp, _ = x._mpf_
    return (-1 if sign else 1) * Fraction(int(man)) * Fraction(2) ** int(exp)


with mpmath.workprec(300):
    _TABLE = [dd_constant(_fraction(mpmath.power(2, mpmath.mpf(j) / 64))) for j in range(64)]


@functools.cache
def _exp_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2^(j/64) table's high and low parts on ``device`` (built once per device)."""
    return (torch.tensor([hi for hi, _ in _TABLE], dtype=torch.float64, device=device),
            torch.tensor([lo for _, lo in _TABLE], dtype=torch.float64, device=device))


def _reduced(x_hi: torch.Tensor, x_lo: torch.Tensor, k: torch.Tensor, c1: float, c2: float,
             c3: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hi + x_lo) − k·c as a double-double, c = c1 + c2 + c3 (c1 short enough that k·c1 is exact,
    and the subtraction from x_hi exact by Sterbenz)."""
    t = x_hi - k * c1
    p, pe = two_prod(k, c2)
    r_hi, r_lo = two_sum(t, -p)
    return two_sum(r_hi, r_lo - pe - k * c3 + x_lo)


def _expm1_series(r_hi: torch.Tensor, r_lo: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expm1(r) by its first ``terms`` Taylor terms in double-double (Horner)."""
    c_hi, c_lo = _INV_FACTORIAL[terms]
    f_hi, f_lo = torch.full_like(r_hi, c_hi), torch.full_like(r_hi, c_lo)
    for n in range(terms - 1, 0, -1):
        f_hi, f_lo = dd_mul(f_hi, f_lo, r_hi, r_lo)
        f_hi, f_lo = dd_add(f_hi, f_lo, *_INV_FACTORIAL[n])
    return dd_mul(f_hi, f_lo, r_hi, r_lo)


def _expm1_parts(x_hi: torch.Tensor, x_lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """exp(x) = (1 + f)·2^k for x ≥ −700: (f_hi, f_lo, k), f = expm1(r) with relative error ≤ 2^-88.

    x = k·ln2 + r with ln2 in three parts (k·ln2₁ exact, the subtraction exact by Sterbenz);
    expm1(r/16) by its Taylor series in double-double (Horner), then four doublings
    expm1(2a) = 2·expm1(a) + expm1(a)², which keep the relative error of expm1.
    """
    k = torch.round(x_hi / float(_LN2))
    r_hi, r_lo = _reduced(x_hi, x_lo, k, _LN2_1, _LN2_2, _LN2_3)
    f_hi, f_lo = _expm1_series(r_hi / 16, r_lo / 16, _EXP_TERMS)  # expm1(r/16); the division is exact
    for _ in range(4):
        sq_hi, sq_lo = dd_mul(f_hi, f_lo, f_hi, f_lo)
        f_hi, f_lo = dd_add(2 * f_hi, 2 * f_lo, sq_hi, sq_lo)
    return f_hi, f_lo, k


def exp_dd(x_hi: torch.Tensor, x_lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(x_hi + x_lo) as a double-double for x ≤ ~0: relative error ≤ EXP_DD_ERROR down to
    x = −650; below, where the trailing part is subnormal, and below x = −700, where the result is
    0, the absolute error is < 2^-1000, which the callers' bounds carry (the n·2^-1000 term).

    x = k·ln2/64 + r with k = 64·m + j (0 ≤ j < 64) and |r| ≤ ln2/128 (ln2/64 in three parts:
    k·ln2/64₁ exact, the subtraction exact by Sterbenz), so exp(x) = 2^m·2^(j/64)·(1 + expm1(r)):
    the tabulated 2^(j/64) as a double-double, expm1(r) by ten Taylor terms in double-double
    (Horner). Relative error: the table's ≤ 2^-106, the series' truncation < 2^-108, the reduction's
    and some twenty double-double operations' a few 2^-104 each: 2^-97 the worst of 5 000 arguments
    against 240-bit mpmath, the reduction's boundaries (r = ±ln2/128) included.
    """
    x_hi = x_hi.clamp(min=-700.0)
    k = torch.round(x_hi * float(1 / _L64))
    r_hi, r_lo = _reduced(x_hi, x_lo, k, _L64_1, _L64_2, _L64_3)
    f_hi, f_lo = _expm1_series(r_hi, r_lo, _TABLE_TERMS)
    ki = k.to(torch.int64)
    table_hi, table_lo = _exp_table(x_hi.device)
    t_hi, t_lo = table_hi[ki & 63], table_lo[ki & 63]
    g_hi, g_lo = dd_mul(t_hi, t_lo, f_hi, f_lo)
    e_hi, e_lo = dd_add(g_hi, g_lo, t_hi, t_lo)  # 2^(j/64)·(1 + expm1(r))
    scale = pow2(ki >> 6)
    under = x_hi <= -700.0
    return torch.where(under, 0.0, e_hi * scale), torch.where(under, 0.0, e_lo * scale)


TANH_DD_ERROR = 2.0**-82  # relative error of tanh_dd (analysis ~2^-85; margin kept)


def dd_div(ah: torch.Tensor, al: torch.Tensor, bh: torch.Tensor, bl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ah + al) / (bh + bl) as a double-double: one Newton correction, relative error ≤ 8u²."""
    q = ah / bh
    r_h, r_l = two_prod(q, bh)
    return two_sum(q, ((ah - r_h) - r_l + al - q * bl) / bh)


def tanh_dd(x_hi: torch.Tensor, x_lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tanh(x_hi + x_lo) as a double-double, relative error ≤ TANH_DD_ERROR, for any finite x.

    tanh|x| = −m / (2 + m) with m = expm1(−2|x|) ∈ (−1, 0]: no cancellation for small |x| (m is
    expm1 itself while k = 0, |2x| < ln2/2) and none for large (|m| ≥ 0.29 once k ≠ 0, where
    m = (1 + f)·2^k − 1 adds a relative 2.5·2^-88 at most); 2 + m ∈ (1, 2]. Beyond |x| = 350,
    m = −1 and the result 1 (relative error < 2^-1000). The sign of x is restored at the end.
    """
    neg = x_hi < 0
    a_hi, a_lo = torch.where(neg, -x_hi, x_hi), torch.where(neg, -x_lo, x_lo)
    y_hi, y_lo = (-2 * a_hi).clamp(min=-700.0), -2 * a_lo
    f_hi, f_lo, k = _expm1_parts(y_hi, y_lo)
    e_hi, e_lo = dd_add(f_hi, f_lo, 1.0, 0.0)
    scale = pow2(k.to(torch.int64))
    g_hi, g_lo = dd_add(e_hi * scale, e_lo * scale, -1.0, 0.0)
    m_hi, m_lo = torch.where(k == 0, f_hi, g_hi), torch.where(k == 0, f_lo, g_lo)
    under = y_hi <= -700.0
    m_hi, m_lo = torch.where(under, -1.0, m_hi), torch.where(under, 0.0, m_lo)
    d_hi, d_lo = dd_add(m_hi, m_lo, 2.0, 0.0)
    t_hi, t_lo = dd_div(-m_hi, -m_lo, d_hi, d_lo)
    return torch.where(neg, -t_hi, t_hi), torch.where(neg, -t_lo, t_lo)


def softcap_dd(s_hi: torch.Tensor, s_lo: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cap·tanh((s_hi + s_lo)/cap) as a double-double: absolute error ≤ TANH_DD_ERROR·|result| +
    16u²·|s| beyond the argument's own error (which passes unamplified, |tanh'| ≤ 1)."""
    c = torch.full_like(s_hi, cap)
    x_hi, x_lo = dd_div(s_hi, s_lo, c, torch.zeros_like(c))
    t_hi, t_lo = tanh_dd(x_hi, x_lo)
    return dd_mul(t_hi, t_lo, c, torch.zeros_like(c))


def dd_logits(q: torch.Tensor, k: torch.Tensor, case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits of the rows ``q`` [H, R, D] against the keys ``k`` [H, n, D] as double-doubles (hi, lo):
    :func:`dd_dots`, the scale, then :func:`softcap_dd` for a soft-capped case; with a bound on each
    one's absolute error (the scale's own double-double rounding, ≤ 4u²·|s|, left to the callers)."""
    kt = k.transpose(-1, -2).contiguous()
    dh, dl, dot_err = dd_dots(q, kt)
    sh, sl = scale_dd(case)
    s_hi, s_lo = two_prod(dh, sh)
    s_hi, s_lo = two_sum(s_hi, s_lo + dh * sl + dl * sh)
    logit_err = abs(case.effective_scale) * dot_err
    if case.softcap is not None:
        raw = s_hi.abs()
        s_hi, s_lo = softcap_dd(s_hi, s_lo, case.softcap)
        logit_err = logit_err + TANH_DD_ERROR * s_hi.abs() + 16 * U * U * raw
    return s_hi, s_lo, logit_err


def dd_weights(q: torch.Tensor, k: torch.Tensor, see: torch.Tensor, case: Case, precise: bool,
               sink: torch.Tensor | None = None,
               logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The softmax weights exp(s_j − m) of the rows ``q`` [H, R, D] against the keys ``k`` [H, n, D]
    (``see`` [H, R, n] the visible keys, m the row's largest double-double logit) as double-doubles
    (hi, lo), with a bound ``eps`` on the relative error of each weight; 0 where a key is not visible.

    The logits are double-double (:func:`dd_dots`, then the scale, then :func:`softcap_dd` for a
    soft-capped case); the weight is exp(x_hi)·(1 + x_lo) (relative error ≤ 3u + second order) or,
    with ``precise``, :func:`exp_dd` (≤ EXP_DD_ERROR). With ``sink`` [H, R, 1] (the rows' sink logits)
    the sink's weight is one more column, after the keys (a key of value 0; m covers it too).
    The tier-2 passes of the forward and of the backward take their weights from here; ``logits``
    (from :func:`dd_logits`) saves recomputing them.
    """
    s_hi, s_lo, logit_err = logits if logits is not None else dd_logits(q, k, case)
    if sink is not None:
        rows = (*s_hi.shape[:-1], 1)
        s_hi = torch.cat([s_hi, sink.expand(rows)], -1)
        s_lo = torch.cat([s_lo, torch.zeros(rows, dtype=s_lo.dtype, device=s_lo.device)], -1)
        logit_err = torch.cat([logit_err.expand_as(s_lo[..., :-1]), torch.zeros_like(s_lo[..., :1])], -1)
        see = torch.cat([see, torch.ones(rows, dtype=torch.bool, device=see.device)], -1)
    m = s_hi.masked_fill(~see, -math.inf).amax(-1, keepdim=True)
    x_hi, x_lo = two_sum(s_hi, -m.expand_as(s_hi))
    x_lo = x_lo + s_lo
    zero = torch.zeros_like(x_hi)
    x_hi, x_lo = torch.where(see, x_hi, zero), torch.where(see, x_lo, zero)
    if precise:
        p, p_lo = exp_dd(x_hi, x_lo)
        p, p_lo = torch.where(see, p, zero), torch.where(see, p_lo, zero)
        exp_err = EXP_DD_ERROR
    else:
        p, p_lo = torch.where(see, torch.exp(x_hi) * (1.0 + x_lo), zero), zero  # exp(x)·(1 + ε)
        exp_err = 3 * U  # exp (≤ 1 ulp) and the product
    # Relative error of each weight: the exp, then the double-double logit (second order).
    eps = torch.where(see, exp_err + logit_err + (5 * s_hi.abs() + 3 * x_hi.abs() + 3 * x_hi * x_hi) * U * U, zero)
    return p, p_lo, eps


def double_double_elements(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, see: torch.Tensor, er: np.ndarray,
                           ec: np.ndarray, case: Case, precise: bool = False,
                           sink: torch.Tensor | None = None, limit: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Tier 2 for the elements (row ``er[e]`` of the flattened [H·R] rows, column ``ec[e]``) of the
    query rows ``q`` [H, R, D] (float64, exact; H KV heads) against keys/values ``k``/``v``
    [H, n, D], ``see`` [H, R, n] the visible keys (padding rows see none).

    Logits are double-double (exact products, TwoSum over D), each weight exp(x_hi)·(1 + x_lo)
    has relative error ≤ eps_j (3u + second order), sums are double-double (:func:`dd_sum`) and
    the quotient gets one Newton correction. The first-order bound 2·Σ p_j·eps_j·|v_j − o| plus
    the second-order sum and division terms decides the float32 rounding of most elements.
    With ``precise`` the weights come from :func:`exp_dd` instead (relative error ≤ 2^-88 rather
    than 3u), which decides all but the elements within ~2^-80 of a rounding boundary.
    ``sink`` [H, R, 1]: the rows' sink logits (a weight in the denominator, value 0).
    The elements go in chunks of at most ``limit`` (default TIER2_ELEMENTS) gathered terms.
    Returns (float32 values, decided mask) per element.
    """
    p, p_lo, eps = dd_weights(q, k, see, case, precise, sink)
    den_h, den_l, _ = dd_sum(p, p_lo)
    n = p.shape[-1]  # the rows of all heads, flattened: er indexes them
    rows = (p.reshape(-1, n), p_lo.reshape(-1, n), eps.reshape(-1, n), den_h.reshape(-1), den_l.reshape(-1))
    per = max(1, (limit or TIER2_ELEMENTS) // n)
    vals, decided = np.zeros(len(er), dtype=np.float32), np.zeros(len(er), dtype=bool)
    for e0 in range(0, len(er), per):
        part = slice(e0, e0 + per)
        vals[part], decided[part] = _decide_elements(rows, v, q.shape[-2], er[part], ec[part], precise,
                                                     sink is not None)
    return vals, decided


def _decide_elements(rows: tuple[torch.Tensor, ...], v: torch.Tensor, r: int, er: np.ndarray, ec: np.ndarray,
                     precise: bool, with_sink: bool) -> tuple[np.ndarray, np.ndarray]:
    """The element stage of :func:`double_double_elements` for one chunk of elements: ``rows`` holds
    the weights p, p_lo, their relative errors and the denominators of the flattened rows (``r`` a head)."""
    p, p_lo, eps, den_h, den_l = rows
    n = p.shape[-1]
    er_t = torch.as_tensor(er, device=p.device)
    pe = p[er_t]
    vc = v[er_t // r, :, torch.as_tensor(ec, device=p.device)]  # [E, n]: each element's value column
    if with_sink:
        vc = torch.cat([vc, torch.zeros_like(vc[:, :1])], -1)  # the sink's value: 0
    ph, pl = two_prod(pe, vc)
    if precise:
        pl = pl + p_lo[er_t] * vc  # two roundings, ≤ 2u²·|p·v|: inside the second-order term below
    num_h, num_l, levels = dd_sum(ph, pl)
    dh_e, dl_e = den_h[er_t], den_l[er_t]
    o_h = num_h / dh_e
    r_h, r_l = two_prod(o_h, dh_e)  # double-double division: one Newton correction
    o_l = ((num_h - r_h) - r_l + num_l - o_h * dl_e) / dh_e
    pn = pe / dh_e[:, None]
    first = (pn * eps[er_t] * (vc - o_h[:, None]).abs()).sum(-1)
    second = (3 * levels + 14) * U * U * (o_h.abs() + (pn * vc.abs()).sum(-1))
    # ×(1 + 2^-20): the float64 evaluation of the bound itself rounds (relative n·u at most).
    bound = 2 * (first + second) * (1 + 2.0**-20) + n * 2.0**-1000 * vc.abs().amax(-1)
    o32, below, above, mid_lo, mid_hi = float32_neighbours(o_h)
    # o_h − mid is exact when the two are close (Sterbenz); then o_l is added.
    inside = ((o_h - mid_lo) + o_l > bound) & ((mid_hi - o_h) - o_l > bound)
    low = (o_h - mid_lo) + o_l < -bound
    high = (mid_hi - o_h) - o_l < -bound
    value = torch.where(inside, o32, torch.where(low, below, above))
    unseen = dh_e == 0  # a row that sees no key: its output is 0 by the contract
    value = torch.where(unseen, torch.zeros_like(value), value)
    return value.cpu().numpy(), (inside | low | high | unseen).cpu().numpy()
