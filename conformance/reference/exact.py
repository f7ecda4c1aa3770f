"""Tier 3 of the exact reference: exact integer logits, the rational case, and interval
arithmetic of doubling precision (Ziv's strategy) for what double-double cannot decide.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import mpmath
import numpy as np

from conformance.reference.rounding import round_fraction_to_f32
from conformance.spec.case import Case

EXACT_SHIFT = 149  # every float32 / bfloat16 / float16 value is an integer multiple of 2**-149


def exact_row(q: np.ndarray, k: np.ndarray, v: np.ndarray, case: Case, sink: float | None = None) -> list[np.float32]:
    """Tier 3 for one row: exact logits, rational degenerate results, else Ziv intervals.

    Keys of equal dot products have equal logits (soft-capping is monotone). When every group of
    equal logits has the same mean value the output is that mean, whatever the weights; with a sink
    (value 0 in the denominator) only a mean of 0 is exact. Everything else goes to intervals, with
    the soft-capped logits and the sink's weight in them."""
    if not len(k):  # a row that sees no key (only its sink, if any): 0 by the contract
        return [np.float32(0.0)] * v.shape[1]
    dots = exact_dots(q, k)
    scale = case.effective_scale
    groups: dict[int, list[int]] = {}
    for j, dot in enumerate(dots):
        groups.setdefault(0 if scale == 0 else dot, []).append(j)
    results = []
    for c in range(v.shape[1]):
        vc = [float(x) for x in v[:, c]]
        means = {sum((Fraction(vc[j]) for j in js), Fraction(0)) / len(js) for js in groups.values()}
        if len(means) == 1 and (sink is None or means == {Fraction(0)}):
            results.append(round_fraction_to_f32(means.pop()))  # all groups share their mean: exactly it
            continue
        results.append(ziv_intervals(dots, vc, case, sink))
    return results


def capped(iv: Any, x: Any, case: Case) -> Any:
    """The soft-capped logit cap·tanh(x/cap) in interval arithmetic (x itself without soft-capping):
    tanh(y) = 1 − 2/(exp(2y) + 1), each operation an enclosure (mpmath.iv has no tanh)."""
    if case.softcap is None:
        return x
    cap = iv.mpf(case.softcap)
    return cap * (1 - 2 / (iv.exp(2 * x / cap) + 1))


def exact_dots(q: np.ndarray, k: np.ndarray) -> list[int]:
    """Exact dot products as integers: value = dot · 2**(-2·EXACT_SHIFT)."""
    qi = np.array([int(x) for x in np.ldexp(q, EXACT_SHIFT)], dtype=object)
    ki = np.vectorize(int, otypes=[object])(np.ldexp(k, EXACT_SHIFT))
    return list(ki @ qi)


def rational_scale(case: Case) -> Fraction | None:
    if case.scale is not None:
        return Fraction(case.scale)
    root = math.isqrt(case.d)
    return Fraction(1, root) if root * root == case.d else None


def exact_lse(q: np.ndarray, k: np.ndarray, case: Case, sink: float | None = None) -> np.float32:
    """Correctly rounded float32 of log(Σ_j exp(s_j) + exp(sink)) (s_j = scale·q·k_j, soft-capped
    when the case is; no sink term without sinks). With one visible key and no sink it is the logit
    itself (rational when the scale is and the logit is not capped, or 0); with no key, the sink;
    otherwise transcendental, decided by intervals."""
    dots = exact_dots(q, k)
    rational = rational_scale(case)
    if not dots and sink is not None:
        return np.float32(sink)
    if len(dots) == 1 and sink is None and rational is not None and (case.softcap is None or dots[0] == 0):
        return round_fraction_to_f32(Fraction(dots[0], 2 ** (2 * EXACT_SHIFT)) * rational)
    def lse(iv: Any, logits: list[Any]) -> Any:
        logits = [capped(iv, x, case) for x in logits] + ([iv.mpf(sink)] if sink is not None else [])
        ref = iv.mpf(max(float(x.mid) for x in logits))
        total = iv.mpf(0)
        for x in logits:
            total += iv.exp(x - ref)
        return ref + iv.log(total)

    return decide_by_intervals(dots, case, lse, "a log-sum-exp")


def ziv_intervals(dots: list[int], vc: list[float], case: Case, sink: float | None = None) -> np.float32:
    def output(iv: Any, logits: list[Any]) -> Any:
        logits = [capped(iv, x, case) for x in logits]
        ref = max(float(x.mid) for x in logits)
        num = iv.mpf(0)
        den = iv.mpf(0)
        for x, val in zip(logits, vc):
            w = iv.exp(x - ref)
            num += w * iv.mpf(val)
            den += w
        if sink is not None:
            den += iv.exp(iv.mpf(sink) - ref)
        return num / den

    return decide_by_intervals(dots, case, output, "an output element")


def decide_by_intervals(dots: list[int], case: Case, value: Callable[[Any, list[Any]], Any],
                         what: str, max_prec: int = 8192) -> np.float32:
    """Ziv's strategy: evaluate ``value(iv, logits)`` in interval arithmetic at doubling precision
    (128 bits up to ``max_prec``) until both endpoints round to the same float32 (the exact value is
    then known to round there); ArithmeticError when ``max_prec`` bits do not decide it.
    The logits are ``scale · dot · 2**(-2·EXACT_SHIFT)`` from exact integer dots."""
    iv = mpmath.iv
    saved = iv.prec
    try:
        prec = 128
        while prec <= max_prec:
            iv.prec = prec
            scale = (1 / iv.sqrt(case.d)) if case.scale is None else iv.mpf(case.scale)
            logits = [iv.mpf(dot) * iv.mpf(2) ** (-2 * EXACT_SHIFT) * scale for dot in dots]
            lo, hi = value(iv, logits)._mpi_  # raw (sign, mantissa, exponent, bitcount) endpoints
            a = round_fraction_to_f32(raw_mpf_to_fraction(lo))
            if a == round_fraction_to_f32(raw_mpf_to_fraction(hi)):
                return a
            prec *= 2
    finally:
        iv.prec = saved
    raise ArithmeticError(f"{case.id}: could not decide the float32 rounding of {what}")


def raw_mpf_to_fraction(raw: tuple[int, int, int, int]) -> Fraction:
    sign, man, exp, _ = raw
    value = Fraction(int(man)) * (Fraction(2) ** int(exp))
    return -value if sign else value
