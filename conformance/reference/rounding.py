"""Exact rounding helpers: float32 rounding intervals and correct rounding of exact rationals."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

F32_OVERFLOW = Fraction(2**128 - 2**103)


def rounding_interval(o32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 midpoints between each float32 and its neighbours: the exact bounds of the real
    numbers that round (to nearest) to it. Midpoints of float32 values are exact in float64."""
    lo = np.nextafter(o32, np.float32(-np.inf))
    hi = np.nextafter(o32, np.float32(np.inf))
    c = o32.astype(np.float64)
    return (c + lo.astype(np.float64)) / 2, (c + hi.astype(np.float64)) / 2


def float32_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The float32 rounding ``o32`` of the float64 values ``x``, its neighbours ``below`` and
    ``above``, and the float64 midpoints ``mid_lo``, ``mid_hi`` between them (exact in float64):
    :func:`rounding_interval` in torch, on the tensor's device."""
    o32 = x.to(torch.float32)
    below = torch.nextafter(o32, torch.full_like(o32, -math.inf))
    above = torch.nextafter(o32, torch.full_like(o32, math.inf))
    return o32, below, above, (o32.double() + below.double()) / 2, (o32.double() + above.double()) / 2


def round_fraction_to_f32(r: Fraction) -> np.float32:
    """The float32 nearest to the exact rational ``r`` (ties to even). Exact, no double rounding."""
    # At or beyond the midpoint between the largest float32 and 2**128, nearest-even is infinity.
    if abs(r) >= F32_OVERFLOW:
        return np.float32(np.inf if r > 0 else -np.inf)
    # float(Fraction) is correctly rounded to float64; the float32 answer is that value's float32
    # rounding or one of its two neighbours, decided below in exact rational arithmetic.
    c = np.float32(float(r))
    cands = [np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))]
    best = None
    best_dist = None
    for t in cands:
        if not np.isfinite(t):
            continue
        dist = abs(r - Fraction(float(t)))
        if best is None or dist < best_dist or (
            dist == best_dist and int(np.array(t).view(np.uint32)) % 2 == 0
        ):
            best, best_dist = t, dist
    assert best is not None
    return np.float32(best)
