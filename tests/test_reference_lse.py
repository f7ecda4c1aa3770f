"""The stored log-sum-exp is correctly rounded too, and the error scale is a stable upper grid value."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest
from conftest import build_case

from conformance.reference.compute import compute_reference, round_up_significant
from conformance.reference.exact import raw_mpf_to_fraction
from conformance.reference.rounding import round_fraction_to_f32
from conformance.spec.inputs import make_inputs, visible


def exact_lse(case, inputs, b, h, i) -> np.float32:
    """50-digit log Σ exp(logits) of one row, rounded exactly to float32; -inf for a row that sees nothing."""
    mpmath.mp.dps = 50
    kvh = h // case.group
    mask = inputs.key_padding_mask
    see = visible(case, None if mask is None else mask[b:b + 1], slice(i, i + 1))[0, 0].numpy()
    keys = np.flatnonzero(see)
    if keys.size == 0:
        return np.float32(-np.inf)
    q = inputs.q[b, h, i].double().numpy()
    k = inputs.k[b, kvh].double().numpy()
    scale = 1 / mpmath.sqrt(case.d) if case.scale is None else mpmath.mpf(case.scale)
    logits = [scale * mpmath.fsum(mpmath.mpf(float(x)) * mpmath.mpf(float(y)) for x, y in zip(q, k[j]))
              for j in keys]
    top = max(logits)
    value = top + mpmath.log(mpmath.fsum(mpmath.exp(x - top) for x in logits))
    return round_fraction_to_f32(raw_mpf_to_fraction(value._mpf_)) if value != 0 else np.float32(0)


@pytest.mark.parametrize("dist", ["normal", "large_logits", "near_ties"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lse_of_every_row_is_the_correctly_rounded_exact_value(dist, dtype):
    case = build_case(hq=4, hkv=2, d=64, sq=9, skv=23, batch=2, dtype=dtype, dist=dist, mask="holes")
    inputs = make_inputs(case)
    golden = compute_reference(case, inputs)
    for b, h, i in np.ndindex(*golden.lse.shape):
        assert golden.lse[b, h, i] == exact_lse(case, inputs, b, h, i), (b, h, i)


def test_lse_of_a_single_visible_key_with_a_rational_scale_is_that_logit_exactly():
    # One visible key: lse is the logit itself, a rational that may need exact rounding.
    case = build_case(hq=1, hkv=1, sq=1, skv=1, d=64, batch=1, dtype="float32", scale=0.125)
    inputs = make_inputs(case)
    golden = compute_reference(case, inputs)
    dot = sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(inputs.q[0, 0, 0].double().tolist(),
                                                                       inputs.k[0, 0, 0].double().tolist()))
    assert golden.lse[0, 0, 0] == round_fraction_to_f32(dot * Fraction(1, 8))


def test_fully_masked_rows_have_lse_minus_infinity():
    case = build_case(hq=2, hkv=1, sq=5, skv=3, batch=1, dtype="bfloat16", causal=True)
    golden = compute_reference(case, make_inputs(case))
    assert np.all(golden.lse[0, :, :2] == -np.inf)
    assert np.all(np.isfinite(golden.lse[0, :, 2:]))


def test_error_scale_rounds_up_to_twelve_significant_bits():
    x = np.array([0.0, 1.0, 1.0 + 2.0**-20, 3.141592653589793, 1e-300, 7.5e5])
    y = round_up_significant(x, 12)
    assert np.all(y >= x)
    assert np.all(y <= x * (1 + 2.0**-11))
    mant, _ = np.frexp(y)
    assert np.all(np.ldexp(mant, 12) == np.round(np.ldexp(mant, 12)))
