"""An independent check of the golden: output elements recomputed directly with mpmath.

Nothing here is shared with :mod:`conformance.reference` (no float64 stage, no error bounds, no
refinement tiers): each element is the textbook formula of CONTRACT.md evaluated at ``digits``
decimal digits and rounded once to float32. At 50 digits the result sits ~1e-50 (relative) from
the exact value, far closer than any float32 rounding boundary a real case comes near; a result
that is exactly a rounding boundary (a rational output such as the mean of two values) is
computed exactly at that precision and rounded ties-to-even.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import mpmath
import numpy as np

from conformance.reference.rounding import round_fraction_to_f32
from conformance.spec.case import Case
from conformance.spec.inputs import CaseInputs, visible

Index = tuple[int, int, int, int]


@dataclass(frozen=True)
class ElementMismatch:
    """One output element whose stored value is not the correctly rounded exact value."""

    index: Index  # (batch, query head, query row, head-dim column)
    stored: float
    expected: float


def exact_element(case: Case, inputs: CaseInputs, b: int, h: int, i: int, d: int, digits: int = 50) -> np.float32:
    """Correctly rounded float32 of output element ``out[b, h, i, d]`` of ``case`` on ``inputs``.

    ``h`` is the query head (it reads KV head ``h // group``); ``i`` the query row. For the
    KV-cache op ``inputs.k``/``inputs.v`` already hold cache then new keys. A row that sees no key
    gives 0.0. Raises IndexError for an index outside ``[batch, hq, sq, d]``.
    """
    return _exact_row(case, inputs, b, h, i, [d], digits)[0]


def crosscheck(case: Case, inputs: CaseInputs, out: np.ndarray, elements: Iterable[Index],
               digits: int = 50) -> list[ElementMismatch]:
    """Compare ``out`` ([batch, hq, sq, d] float32) with :func:`exact_element` at ``elements``.

    Returns the mismatches in index order (empty when every element is correctly rounded). Values
    compare as numbers: +0.0 equals -0.0, a NaN never matches. Each row's weights are computed once
    however many of its columns are asked.
    """
    by_row: dict[tuple[int, int, int], list[int]] = {}
    for b, h, i, d in sorted({tuple(int(x) for x in e) for e in elements}):
        by_row.setdefault((b, h, i), []).append(d)
    mismatches = []
    for (b, h, i), cols in by_row.items():
        for d, expected in zip(cols, _exact_row(case, inputs, b, h, i, cols, digits)):
            stored = np.float32(out[b, h, i, d])
            if stored != expected:  # a NaN never matches
                mismatches.append(ElementMismatch((b, h, i, d), float(stored), float(expected)))
    return mismatches


def sample_elements(shape: Sequence[int], n: int, seed: int) -> list[Index]:
    """``min(n, size)`` distinct indices into an array of ``shape``, sorted; the same for the same seed."""
    size = int(np.prod(shape))
    rng = np.random.Generator(np.random.PCG64(seed))
    flat = np.sort(rng.choice(size, size=min(n, size), replace=False))
    return [tuple(int(x) for x in idx) for idx in zip(*np.unravel_index(flat, tuple(shape)))]


def _exact_row(case: Case, inputs: CaseInputs, b: int, h: int, i: int, cols: Sequence[int],
               digits: int) -> list[np.float32]:
    """Correctly rounded float32 outputs of row (b, h, i) at head-dim columns ``cols``."""
    for name, value, bound in (("batch", b, case.batch), ("head", h, case.hq), ("row", i, case.sq)):
        if not 0 <= value < bound:
            raise IndexError(f"{case.id}: {name} index {value} is outside [0, {bound})")
    for d in cols:
        if not 0 <= d < case.d:
            raise IndexError(f"{case.id}: column index {d} is outside [0, {case.d})")
    kpm = None if inputs.key_padding_mask is None else inputs.key_padding_mask[b:b + 1]
    keys = [int(j) for j in visible(case, kpm, slice(i, i + 1))[0, 0].nonzero().flatten()]
    if not keys:
        return [np.float32(0.0)] * len(cols)  # CONTRACT.md: a fully masked row outputs exactly 0
    kv_head = h // case.group
    # float64 holds every float32/bfloat16/float16 value exactly, so mpf(x) is the input's exact value.
    q = inputs.q[b, h, i].double().tolist()
    k = inputs.k[b, kv_head].double()
    v = inputs.v[b, kv_head].double()
    with mpmath.workdps(digits):
        scale = 1 / mpmath.sqrt(case.d) if case.scale is None else mpmath.mpf(case.scale)
        logits = [scale * mpmath.fsum(mpmath.mpf(x) * mpmath.mpf(y) for x, y in zip(q, k[j].tolist()))
                  for j in keys]
        if case.softcap is not None:  # cap·tanh(s/cap) of the scaled logits
            logits = [case.softcap * mpmath.tanh(s / case.softcap) for s in logits]
        sink = None if case.sinks is None else mpmath.mpf(case.sinks[h])
        top = max(logits) if sink is None else max(max(logits), sink)
        weights = [mpmath.exp(s - top) for s in logits]
        # A sink joins the denominator only (it has no value).
        denominator = mpmath.fsum(weights + ([mpmath.exp(sink - top)] if sink is not None else []))
        results = []
        for d in cols:
            values = v[keys, d].tolist()
            o = mpmath.fsum(w * mpmath.mpf(x) for w, x in zip(weights, values)) / denominator
            results.append(round_fraction_to_f32(_mpf_to_fraction(o)))
    return results


def _mpf_to_fraction(x: mpmath.mpf) -> Fraction:
    """The exact binary value of ``x`` from its raw ``(sign, mantissa, exponent, bitcount)`` tuple."""
    sign, man, exp, _ = x._mpf_
    value = Fraction(int(man)) * Fraction(2) ** int(exp)
    return -value if sign else value
