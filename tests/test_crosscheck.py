"""conformance.crosscheck: the 50-digit recomputation itself, on inputs whose answers are known."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest
from conftest import build_case, build_inputs

from conformance.reference.compute import compute_reference
from conformance.reference.crosscheck import ElementMismatch, crosscheck, exact_element, sample_elements
from conformance.reference.rounding import round_fraction_to_f32
from conformance.spec.case import Case
from conformance.spec.inputs import CaseInputs, make_inputs

SmallGolden = tuple[Case, CaseInputs, np.ndarray]
VALUES = np.array([[1.0, -2.0], [0.5, 3.0], [0.25, -0.75], [7.0, 1.5]])  # v[key, column] of the hand cases


def scale_zero_inputs(case_kwargs: dict, mask: list[bool] | None = None) -> tuple[Case, CaseInputs]:
    """scale 0.0 (every visible key weighs the same) with VALUES as v, d = 2, one head."""
    case = build_case(hq=1, hkv=1, d=2, skv=4, scale=0.0, **case_kwargs)
    inputs = build_inputs(case, q=np.ones((1, 1, case.sq, 2)), k=np.ones((1, 1, 4, 2)), v=VALUES[None, None],
                          key_padding_mask=None if mask is None else [mask])
    return case, inputs


def rounded_mean(keys: list[int], column: int) -> np.float32:
    return round_fraction_to_f32(sum(Fraction(VALUES[j, column]) for j in keys) / len(keys))


# --- sample_elements -------------------------------------------------------------------------------


def test_sample_elements_is_deterministic() -> None:
    assert sample_elements((2, 3, 5, 7), 20, seed=4) == sample_elements((2, 3, 5, 7), 20, seed=4)


def test_sample_elements_are_distinct_indices_inside_the_shape() -> None:
    shape = (2, 3, 5, 7)
    elements = sample_elements(shape, 50, seed=1)
    assert len(elements) == len(set(elements)) == 50
    assert all(len(e) == 4 and all(0 <= x < n for x, n in zip(e, shape)) for e in elements)


def test_sample_elements_of_more_than_the_array_gives_every_element() -> None:
    assert sorted(sample_elements((1, 2, 2, 2), 100, seed=0)) == list(np.ndindex(1, 2, 2, 2))


def test_sample_elements_depends_on_the_seed() -> None:
    assert sample_elements((4, 4, 16, 64), 10, seed=1) != sample_elements((4, 4, 16, 64), 10, seed=2)


# --- exact_element ---------------------------------------------------------------------------------


def test_exact_element_at_scale_zero_is_the_rounded_mean_of_visible_values() -> None:
    case, inputs = scale_zero_inputs({"sq": 1, "causal": False})
    assert [exact_element(case, inputs, 0, 0, 0, d) for d in (0, 1)] == [rounded_mean([0, 1, 2, 3], d)
                                                                          for d in (0, 1)]


def test_exact_element_applies_the_bottom_right_causal_rule() -> None:
    case, inputs = scale_zero_inputs({"sq": 2, "causal": True})  # row 0 sees keys 0..2, row 1 all four
    assert exact_element(case, inputs, 0, 0, 0, 1) == rounded_mean([0, 1, 2], 1)
    assert exact_element(case, inputs, 0, 0, 1, 1) == rounded_mean([0, 1, 2, 3], 1)


def test_exact_element_applies_the_key_padding_mask() -> None:
    case, inputs = scale_zero_inputs({"sq": 1, "causal": False}, mask=[True, False, False, True])
    assert exact_element(case, inputs, 0, 0, 0, 0) == rounded_mean([0, 3], 0)


def test_exact_element_of_a_fully_masked_row_is_zero() -> None:
    case, inputs = scale_zero_inputs({"sq": 6, "causal": True})  # Sq > Skv: rows 0 and 1 see no key
    assert [exact_element(case, inputs, 0, 0, i, 0) for i in (0, 1)] == [0.0, 0.0]
    assert exact_element(case, inputs, 0, 0, 2, 0) == np.float32(VALUES[0, 0])


def test_exact_element_reads_kv_head_h_div_group() -> None:
    case = build_case(hq=6, hkv=3, d=2, sq=1, skv=2, causal=False)
    v = np.broadcast_to(np.arange(1.0, 4.0)[None, :, None, None], (1, 3, 2, 2))
    inputs = build_inputs(case, q=np.ones((1, 6, 1, 2)), k=np.ones((1, 3, 2, 2)), v=v)
    assert [exact_element(case, inputs, 0, h, 0, 0) for h in range(6)] == [1, 1, 2, 2, 3, 3]


def test_exact_element_default_scale_is_one_over_sqrt_head_dim() -> None:
    default = build_case(hq=2, hkv=1, d=16, sq=2, skv=9, seed=3)
    explicit = build_case(hq=2, hkv=1, d=16, sq=2, skv=9, seed=3, scale=0.25)  # 1/sqrt(16), exactly
    inputs = make_inputs(default)
    assert [exact_element(default, inputs, 0, 1, 1, d) for d in range(4)] == \
           [exact_element(explicit, inputs, 0, 1, 1, d) for d in range(4)]


def test_exact_element_is_stable_with_more_digits() -> None:
    case = build_case(hq=2, hkv=1, d=32, sq=4, skv=9, dist="near_ties", seed=5)
    inputs = make_inputs(case)
    elements = sample_elements((1, 2, 4, 32), 6, seed=5)
    assert [exact_element(case, inputs, *e) for e in elements] == \
           [exact_element(case, inputs, *e, digits=80) for e in elements]


def test_exact_element_refuses_an_index_outside_the_output() -> None:
    case, inputs = scale_zero_inputs({"sq": 1, "causal": False})
    with pytest.raises(IndexError):
        exact_element(case, inputs, 0, 0, 0, 2)
    with pytest.raises(IndexError):
        exact_element(case, inputs, 0, -1, 0, 0)


# --- crosscheck ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_golden() -> SmallGolden:
    case = build_case(batch=2, hq=4, hkv=2, d=8, sq=3, skv=6, dtype="bfloat16", mask="holes", seed=9)
    inputs = make_inputs(case)
    return case, inputs, compute_reference(case, inputs).out


def test_crosscheck_of_a_correct_golden_finds_nothing(small_golden: SmallGolden) -> None:
    case, inputs, out = small_golden
    assert crosscheck(case, inputs, out, np.ndindex(*out.shape)) == []


def test_crosscheck_reports_a_one_ulp_change(small_golden: SmallGolden) -> None:
    case, inputs, out = small_golden
    changed = out.copy()
    changed[1, 2, 0, 5] = np.nextafter(out[1, 2, 0, 5], np.float32(np.inf))
    mismatches = crosscheck(case, inputs, changed, [(0, 0, 0, 0), (1, 2, 0, 5), (1, 3, 2, 7)])
    assert mismatches == [ElementMismatch((1, 2, 0, 5), float(changed[1, 2, 0, 5]), float(out[1, 2, 0, 5]))]


def test_crosscheck_reports_mismatches_in_index_order(small_golden: SmallGolden) -> None:
    case, inputs, out = small_golden
    changed = out + np.float32(1.0)
    elements = [(1, 0, 2, 1), (0, 3, 0, 0), (1, 0, 0, 4)]
    assert [m.index for m in crosscheck(case, inputs, changed, elements)] == sorted(elements)


def test_crosscheck_reports_nan(small_golden: SmallGolden) -> None:
    case, inputs, out = small_golden
    changed = out.copy()
    changed[0, 1, 1, 1] = np.nan
    assert [m.index for m in crosscheck(case, inputs, changed, [(0, 1, 1, 1)])] == [(0, 1, 1, 1)]


def test_crosscheck_computes_each_rows_weights_once(small_golden: SmallGolden, monkeypatch: pytest.MonkeyPatch) -> None:
    case, inputs, out = small_golden
    calls = []
    real_exp = mpmath.exp
    monkeypatch.setattr(mpmath, "exp", lambda x: calls.append(x) or real_exp(x))
    crosscheck(case, inputs, out, [(1, 1, 2, d) for d in range(case.d)])
    visible = int(inputs.key_padding_mask[1].sum())  # row 2 is the last row: the causal rule hides nothing
    assert len(calls) == visible
