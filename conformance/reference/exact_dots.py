"""Exact float64 dot products of low-precision inputs: where the rounding of ``q·k`` can be ruled out.

A bfloat16 or float16 value (or any float64) is a multiple of 2^E, E the exponent of its lowest set
bit; a dot product of two such vectors is a multiple of 2^(E_q + E_k) in every partial sum, so it is
exact in float64, in any order, when its magnitude stays below 2^(E_q + E_k + 53). Tier 1 drops the
dot product's rounding from its bound where that holds, and the double-double tier skips the
Ozaki-sliced products for those pairs (:func:`~conformance.reference.double_double.dd_dots`).
"""

from __future__ import annotations

import torch

NO_BITS = 4096  # the lowest-bit exponent given a zero value: it constrains nothing


def lowest_bit_exponents(x: torch.Tensor) -> torch.Tensor:
    """Per vector of the last dim of the float64 ``x``: the largest E with every element an integer
    multiple of 2^E (the exponent of the lowest set bit among them; ``NO_BITS`` for an all-zero
    vector), whatever the dtype the values came from. [..., d] -> [..., 1] int32."""
    mant, e = torch.frexp(x)  # x = mant·2^e, 0.5 <= |mant| < 1: mant·2^53 is an integer
    digits = (mant.abs() * 2.0**53).to(torch.int64)
    low = torch.frexp((digits & -digits).to(torch.float64)).exponent - 1  # its lowest set bit
    bits = e.to(torch.int32) - 53 + low.to(torch.int32)
    return torch.where(x != 0, bits, NO_BITS).amin(-1, keepdim=True)


def inexact_dots(adot: torch.Tensor, q_bits: torch.Tensor, k_bits: torch.Tensor) -> torch.Tensor:
    """Where a float64 dot product ``q·k_j`` may round ([b,h,r,n] bool); elsewhere it is exact in any
    order of summation, with or without FMA: each product is a multiple of 2^(E_q + E_k) (``q_bits``
    [b,h,r,1], ``k_bits`` [b,h,1,n]), so is every partial sum of any subset of them, and a multiple of
    that power of two below 2^(E_q + E_k + 53) is a float64. ``adot`` (the computed Σ_d |q_d k_jd|,
    within a factor 1 + d·u of the true one) below 2^(E_q + E_k + 52) bounds every partial sum so.
    The matmuls are IEEE float64 operations, as the rest of tier 1's bound assumes (a BLAS that
    emulated float64 with lower-precision slices would void both)."""
    # adot ≥ 0 is finite (float64 products of float32-range values cannot overflow). For a normal
    # adot = 1.f·2^(B − 1023), with B its biased exponent field, adot < 2^(E + 52) ⇔ B − 1023 < E + 52
    # ⇔ B ≤ E + 1074; for a subnormal or zero adot (B = 0) the test errs toward "inexact". An all-zero
    # vector's NO_BITS makes every one of its dot products exact (they are 0).
    return (adot.view(torch.int64) >> 52) > (q_bits + 1074) + k_bits


def gathered_keys(keys: torch.Tensor) -> torch.Tensor:
    """Indices [..., c] of the True entries of ``keys`` [..., n] in order, first, then False ones: c is
    the largest count over the leading dims (a stable sort), so each leading index gets all its own."""
    count = int(keys.sum(-1).max()) if keys.numel() else 0
    return torch.argsort((~keys).to(torch.int32), dim=-1, stable=True)[..., :count]
