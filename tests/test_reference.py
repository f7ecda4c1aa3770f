"""The exact reference: agreement with a float64 formula, closed forms, and correct rounding.

Correct rounding is checked against :mod:`conformance.crosscheck` (a 50-digit mpmath recomputation
that shares no code with the reference) on seeded cases and on inputs built to land on, or within
1e-30 of, a float32 rounding boundary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import build_case, build_inputs, float64_attention, visible_keys

from conformance.reference import compute, double_double
from conformance.reference.compute import Golden, compute_reference
from conformance.reference.crosscheck import crosscheck, exact_element, sample_elements
from conformance.reference.rounding import round_fraction_to_f32, rounding_interval
from conformance.spec.case import Case
from conformance.spec.inputs import TORCH_DTYPES, CaseInputs, make_inputs

F32_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)


def bits(x: np.ndarray | np.float32) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def up(x: float | np.float32) -> np.float32:
    return np.nextafter(np.float32(x), np.float32(np.inf))


def down(x: float | np.float32) -> np.float32:
    return np.nextafter(np.float32(x), np.float32(-np.inf))


@functools.cache
def seeded_golden(case: Case) -> tuple[CaseInputs, Golden]:
    inputs = make_inputs(case)
    return inputs, compute_reference(case, inputs)


# --- against an independent float64 formula ------------------------------------------------------

FORMULA_CASES = {
    "mha": build_case(batch=2, hq=4, hkv=4, d=16, sq=6, skv=6),
    "gqa-group4": build_case(hq=8, hkv=2, d=16, sq=5, skv=9, dtype="bfloat16", causal=False),
    "gqa-group7": build_case(hq=14, hkv=2, d=8, sq=4, skv=4, dtype="float16"),
    "gqa-group7-mqa": build_case(hq=7, hkv=1, d=8, sq=3, skv=6, dtype="bfloat16"),
    "mqa-decode": build_case(batch=2, hq=4, hkv=1, d=32, sq=1, skv=11, dtype="bfloat16"),
    "causal-sq-lt-skv": build_case(d=16, sq=3, skv=12),
    "causal-sq-gt-skv": build_case(batch=2, d=16, sq=9, skv=4, dtype="bfloat16"),
    "noncausal-sq-gt-skv": build_case(batch=2, d=16, sq=9, skv=4, causal=False),
    "right-pad": build_case(batch=3, sq=5, skv=7, mask="right_pad"),
    "left-pad": build_case(batch=3, sq=5, skv=7, mask="left_pad", dtype="float16"),
    "holes": build_case(batch=3, sq=5, skv=7, mask="holes", causal=False, dtype="bfloat16"),
    "all-masked": build_case(batch=3, sq=5, skv=7, mask="all_masked"),
    "large-logits": build_case(d=32, sq=8, skv=8, dist="large_logits", dtype="bfloat16"),
    "near-ties": build_case(d=32, sq=8, skv=8, dist="near_ties"),
    "uniform": build_case(d=32, sq=8, skv=8, dist="uniform", dtype="float16"),
    "explicit-negative-scale": build_case(sq=4, skv=6, scale=-0.25, causal=False),
    "kv-cache": build_case(op="kv_cache_attention", batch=2, hq=4, hkv=2, sq=3, skv=8, mask="holes"),
}


@pytest.mark.parametrize("case", FORMULA_CASES.values(), ids=FORMULA_CASES.keys())
def test_out_is_within_one_ulp_of_the_float64_formula(case: Case) -> None:
    inputs, golden = seeded_golden(case)
    out64, _ = float64_attention(case, inputs)
    ulp = np.spacing(np.abs(out64).astype(np.float32)).astype(np.float64)
    assert golden.out.dtype == np.float32 and golden.out.shape == out64.shape
    assert np.all(np.abs(golden.out - out64) <= ulp)


@pytest.mark.parametrize("case", FORMULA_CASES.values(), ids=FORMULA_CASES.keys())
def test_lse_is_close_to_the_float64_formula(case: Case) -> None:
    inputs, golden = seeded_golden(case)
    _, lse64 = float64_attention(case, inputs)
    np.testing.assert_allclose(golden.lse, lse64, rtol=2.0**-23, atol=1e-12)


# --- closed forms ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scale_zero_gives_the_exact_mean_of_the_visible_values(dtype: str) -> None:
    case = build_case(batch=2, hq=4, hkv=2, d=8, sq=4, skv=7, dtype=dtype, scale=0.0, mask="holes")
    inputs, golden = seeded_golden(case)
    see = visible_keys(case, inputs.key_padding_mask)
    v = inputs.v.double().numpy()
    expected = np.zeros(golden.out.shape, dtype=np.float32)
    for b, h, i, d in np.ndindex(*golden.out.shape):
        keys = np.flatnonzero(see[b, 0, i].numpy())
        if len(keys):
            mean = sum(Fraction(float(x)) for x in v[b, h // case.group, keys, d]) / len(keys)
            expected[b, h, i, d] = round_fraction_to_f32(mean)
    assert np.array_equal(bits(golden.out), bits(expected))


def test_causal_decode_equals_noncausal_decode_bitwise() -> None:
    causal = build_case(batch=2, hq=4, hkv=2, d=16, sq=1, skv=13, dtype="bfloat16", mask="left_pad")
    noncausal = dataclasses.replace(causal, causal=False)
    _, a = seeded_golden(causal)
    _, b = seeded_golden(noncausal)
    for name in ("out", "lse", "error_scale", "naive_error"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name


FULLY_MASKED = {
    # case, the (batch, row) pairs that see no key
    "all-masked-padding": (build_case(batch=4, sq=3, skv=5, mask="all_masked", causal=False),
                           np.s_[0::2, :, :]),
    "causal-sq-gt-skv-leading-rows": (build_case(batch=2, sq=7, skv=3), np.s_[:, :, :4]),
    "kv-cache-all-masked": (build_case(op="kv_cache_attention", batch=2, sq=2, skv=6, mask="all_masked"),
                            np.s_[0::2, :, :]),
}


@pytest.mark.parametrize("case, rows", FULLY_MASKED.values(), ids=FULLY_MASKED.keys())
def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_error_scale(case: Case, rows: tuple) -> None:
    _, golden = seeded_golden(case)
    assert golden.out[rows].size > 0
    assert np.all(bits(golden.out[rows]) == 0)  # +0.0, never NaN or -0.0
    assert np.all(golden.lse[rows] == -np.inf)
    assert np.all(golden.error_scale[rows] == 0.0)


@pytest.mark.parametrize("case, rows", FULLY_MASKED.values(), ids=FULLY_MASKED.keys())
def test_rows_that_see_a_key_are_not_zeroed(case: Case, rows: tuple) -> None:
    _, golden = seeded_golden(case)
    seen = np.ones(golden.lse.shape, dtype=bool)
    seen[rows] = False
    assert np.all(np.isfinite(golden.lse[seen]))
    assert np.all(np.any(golden.out != 0, axis=-1)[seen])


def test_first_causal_row_of_a_prefill_returns_the_first_value_exactly() -> None:
    case = build_case(batch=2, hq=4, hkv=2, d=16, sq=5, skv=5, dtype="bfloat16")  # row 0 sees key 0 only
    inputs, golden = seeded_golden(case)
    v0 = inputs.v[:, :, 0].float().repeat_interleave(case.group, dim=1).numpy()
    assert np.array_equal(bits(golden.out[:, :, 0]), bits(v0))


def test_decode_against_one_key_returns_its_value_exactly() -> None:
    case = build_case(hq=4, hkv=2, d=16, sq=1, skv=1, dtype="float16", causal=False)
    inputs, golden = seeded_golden(case)
    v0 = inputs.v[:, :, 0].float().repeat_interleave(case.group, dim=1).numpy()
    assert np.array_equal(bits(golden.out[:, :, 0]), bits(v0))


def test_padding_that_keeps_one_key_returns_its_value_exactly() -> None:
    case = build_case(hq=2, hkv=1, d=8, sq=3, skv=5, causal=False)
    seeded = make_inputs(case)
    inputs = dataclasses.replace(seeded, key_padding_mask=torch.tensor([[False, False, True, False, False]]))
    golden = compute_reference(case, inputs)
    v2 = inputs.v[0, 0, 2].numpy()
    assert np.array_equal(bits(golden.out), bits(np.broadcast_to(v2, golden.out.shape)))


def test_query_head_h_reads_kv_head_h_div_group() -> None:
    # CONTRACT.md: repeat_interleave mapping. Each KV head's values are its own index + 1.
    case = build_case(hq=6, hkv=3, d=4, sq=2, skv=3, causal=False)
    v = np.broadcast_to(np.arange(1.0, 4.0)[None, :, None, None], (1, 3, 3, 4))
    inputs = build_inputs(case, q=np.full((1, 6, 2, 4), 0.5), k=np.full((1, 3, 3, 4), 0.25), v=v)
    golden = compute_reference(case, inputs)
    assert np.array_equal(golden.out[0, :, 0, 0], np.array([1, 1, 2, 2, 3, 3], dtype=np.float32))


def test_reference_leaves_its_inputs_unchanged() -> None:
    case = build_case(batch=2, hq=4, hkv=2, sq=4, skv=6, dtype="bfloat16", mask="holes")
    inputs = make_inputs(case)
    before = [t.clone() for t in (inputs.q, inputs.k, inputs.v, inputs.key_padding_mask)]
    compute_reference(case, inputs)
    after = (inputs.q, inputs.k, inputs.v, inputs.key_padding_mask)
    assert all(torch.equal(x, y) for x, y in zip(before, after))


# --- correct rounding against the mpmath recomputation --------------------------------------------

SMOKE_CROSSCHECK = [
    "attention/distributions/hq2-hkv2-d64-b1-sq33-skv33-bf16-causal-largelogits",
    "attention/distributions/hq2-hkv2-d64-b1-sq33-skv33-fp16-causal-largelogits",
    "attention/distributions/hq2-hkv2-d64-b1-sq33-skv33-fp32-causal-largelogits",
    "attention/distributions/hq2-hkv2-d64-b1-sq33-skv33-bf16-causal-neartie",
    "attention/distributions/hq2-hkv2-d64-b1-sq33-skv33-fp16-causal-neartie",
    "attention/distributions/hq2-hkv2-d64-b1-sq33-skv33-fp32-causal-neartie",
    "attention/distributions/hq2-hkv2-d64-b1-sq1-skv129-bf16-causal-neartie",
    "attention/dtypes/hq2-hkv2-d64-b1-sq65-skv65-fp32-noncausal",
    "attention/padding/hq2-hkv1-d64-b2-sq17-skv17-fp16-causal-holes",
    "attention/presets/qwen2.5-7b-b1-sq5-skv17-bf16-causal",
    "kv_cache_attention/distributions/hq2-hkv1-d64-b1-past63-new2-fp32-causal-neartie",
]


def nearest_to_a_rounding_boundary(out64: np.ndarray, n: int) -> list[tuple[int, int, int, int]]:
    """The ``n`` elements whose float64 value lies relatively closest to a float32 midpoint."""
    lo, hi = rounding_interval(out64.astype(np.float32))
    distance = np.minimum(out64 - lo, hi - out64) / np.maximum(np.abs(out64), 1e-300)
    flat = np.argsort(distance, axis=None, kind="stable")[:n]
    return [tuple(int(x) for x in idx) for idx in zip(*np.unravel_index(flat, out64.shape))]


@pytest.mark.parametrize("case_id", SMOKE_CROSSCHECK)
def test_smoke_case_elements_are_correctly_rounded(smoke_cases: dict[str, Case], case_id: str) -> None:
    case = smoke_cases[case_id]
    inputs, golden = seeded_golden(case)
    out64, _ = float64_attention(case, inputs)
    elements = sample_elements(golden.out.shape, 12, seed=case.seed) + nearest_to_a_rounding_boundary(out64, 4)
    assert crosscheck(case, inputs, golden.out, elements) == []


# Two visible keys whose values' mean is exactly a float32 midpoint, per head-dim column:
# (v0, v1, the float32 that ties-to-even selects, the float32 on v2's side of the midpoint).
MIDPOINTS = [
    (1.0, up(1.0), 1.0, up(1.0)),  # 1 + 2**-24: even neighbour below; v2 lies above
    (up(1.0), up(up(1.0)), up(up(1.0)), up(1.0)),  # 1 + 3·2**-24: even neighbour above; v2 lies below
    (-1.0, -up(1.0), -1.0, -up(1.0)),  # negative tie; v2 lies below (more negative)
    (0.0, F32_TINY, 0.0, F32_TINY),  # half the smallest subnormal: ties to +0.0; v2 lies above
]
THIRD_VALUE = [3.0, 0.5, -3.0, 3 * F32_TINY]  # v2 per column, on the side named above


def midpoint_case(scale: float, skv: int) -> Case:
    return build_case(hq=1, hkv=1, d=len(MIDPOINTS), sq=1, skv=skv, scale=scale, causal=False)


def exact_midpoint_inputs() -> tuple[Case, CaseInputs]:
    """scale 0.0: both weights are 1, the output is exactly (v0 + v1) / 2."""
    case = midpoint_case(0.0, 2)
    v = [[[[m[0] for m in MIDPOINTS], [m[1] for m in MIDPOINTS]]]]
    return case, build_inputs(case, q=np.ones((1, 1, 1, 4)), k=np.zeros((1, 1, 2, 4)), v=v)


def near_midpoint_inputs(gap: float) -> tuple[Case, CaseInputs]:
    """Logits 0, 0, -gap (scale 1): the output is (v0 + v1 + e·v2) / (2 + e) with e = exp(-gap), i.e.
    the midpoint moved by ~e/2 (relative) towards v2."""
    case = midpoint_case(1.0, 3)
    k = np.zeros((1, 1, 3, 4))
    k[0, 0, 2, 0] = -gap
    v = [[[[m[0] for m in MIDPOINTS], [m[1] for m in MIDPOINTS], THIRD_VALUE]]]
    return case, build_inputs(case, q=np.eye(1, 4)[None, None], k=k, v=v)


BoundaryInputs = Callable[[], tuple[Case, CaseInputs]]
BOUNDARY_INPUTS: dict[str, BoundaryInputs] = {
    "exact-midpoint": exact_midpoint_inputs,
    "1e-18-from-midpoint": functools.partial(near_midpoint_inputs, 40.0),  # exp(-40)/2 ≈ 2e-18
    "1e-31-from-midpoint": functools.partial(near_midpoint_inputs, 70.0),  # exp(-70)/2 ≈ 2e-31
    "1e-44-from-midpoint": functools.partial(near_midpoint_inputs, 100.0),  # exp(-100)/2 ≈ 2e-44
}


def test_exact_midpoint_rounds_ties_to_even() -> None:
    case, inputs = exact_midpoint_inputs()
    golden = compute_reference(case, inputs)
    assert np.array_equal(bits(golden.out[0, 0, 0]), bits(np.array([m[2] for m in MIDPOINTS])))


@pytest.mark.parametrize("gap", [40.0, 70.0, 100.0])
def test_near_midpoint_rounds_towards_the_third_value(gap: float) -> None:
    case, inputs = near_midpoint_inputs(gap)
    golden = compute_reference(case, inputs)
    assert np.array_equal(bits(golden.out[0, 0, 0]), bits(np.array([m[3] for m in MIDPOINTS])))


@pytest.mark.parametrize("make", BOUNDARY_INPUTS.values(), ids=BOUNDARY_INPUTS.keys())
def test_boundary_elements_equal_the_mpmath_recomputation(make: BoundaryInputs) -> None:
    case, inputs = make()
    golden = compute_reference(case, inputs)
    expected = [exact_element(case, inputs, 0, 0, 0, d) for d in range(case.d)]
    assert np.array_equal(bits(golden.out[0, 0, 0]), bits(np.array(expected)))


@pytest.mark.parametrize("make", BOUNDARY_INPUTS.values(), ids=BOUNDARY_INPUTS.keys())
def test_boundary_elements_are_decided_by_the_refinement_tiers(make: BoundaryInputs) -> None:
    case, inputs = make()
    stats = compute_reference(case, inputs).stats
    assert stats.double_double + stats.exact > 0


def test_exact_midpoints_reach_the_exact_tier() -> None:
    case, inputs = exact_midpoint_inputs()
    assert compute_reference(case, inputs).stats.exact == case.d


# --- round_fraction_to_f32 -------------------------------------------------------------------------

MIN_NORMAL = np.float32(np.finfo(np.float32).tiny)
MAX_SUBNORMAL = down(MIN_NORMAL)

EXACT_ROUNDINGS = {
    # rational → the float32 that round-to-nearest-even gives, worked out by hand
    "tie-to-even-below": (1 + Fraction(1, 2**24), np.float32(1.0)),
    "tie-to-even-above": (1 + Fraction(3, 2**24), up(up(1.0))),
    "just-above-a-tie": (1 + Fraction(1, 2**24) + Fraction(1, 2**80), up(1.0)),
    "just-below-a-tie": (1 + Fraction(3, 2**24) - Fraction(1, 2**80), up(1.0)),
    "negative-tie": (-(1 + Fraction(1, 2**24)), np.float32(-1.0)),
    "negative-just-below-a-tie": (-(1 + Fraction(1, 2**24)) - Fraction(1, 2**90), -up(1.0)),
    "half-smallest-subnormal": (Fraction(1, 2**150), np.float32(0.0)),
    "negative-half-smallest-subnormal": (-Fraction(1, 2**150), np.float32(-0.0)),
    "above-half-smallest-subnormal": (Fraction(1, 2**150) + Fraction(1, 2**300), F32_TINY),
    "subnormal-tie-to-even": (Fraction(3, 2**150), 2 * F32_TINY),
    "subnormal-normal-boundary-tie": ((Fraction(float(MAX_SUBNORMAL)) + Fraction(float(MIN_NORMAL))) / 2,
                                      MIN_NORMAL),
    "one-third": (Fraction(1, 3), np.float32(11184811 * 2.0**-25)),
    "zero": (Fraction(0), np.float32(0.0)),
}


@pytest.mark.parametrize("value, expected", EXACT_ROUNDINGS.values(), ids=EXACT_ROUNDINGS.keys())
def test_round_fraction_to_f32_rounds_to_nearest_even(value: Fraction, expected: np.float32) -> None:
    assert bits(round_fraction_to_f32(value)) == bits(expected)


def test_round_fraction_to_f32_keeps_exact_float32_values() -> None:
    rng = np.random.Generator(np.random.PCG64(7))
    values = rng.integers(0, 2**32, size=2000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = values[np.isfinite(values)]
    got = np.array([round_fraction_to_f32(Fraction(float(x))) for x in values], dtype=np.float32)
    assert np.array_equal(bits(got), bits(values))


def test_round_fraction_to_f32_agrees_with_numpy_on_float64_values() -> None:
    # numpy's float64 → float32 cast is a single correct rounding (ties to even)
    rng = np.random.Generator(np.random.PCG64(11))
    mantissa = rng.uniform(1.0, 2.0, size=3000) * rng.choice([-1.0, 1.0], size=3000)
    values = np.ldexp(mantissa, rng.integers(-160, 127, size=3000))
    got = np.array([round_fraction_to_f32(Fraction(float(x))) for x in values], dtype=np.float32)
    assert np.array_equal(bits(got), bits(values.astype(np.float32)))


def test_round_fraction_to_f32_agrees_with_numpy_on_exact_midpoints() -> None:
    rng = np.random.Generator(np.random.PCG64(13))
    f32 = rng.integers(0, 0x7F7FFFFF, size=2000, dtype=np.uint32).view(np.float32)
    midpoints = (f32.astype(np.float64) + up(f32).astype(np.float64)) / 2  # exact in float64
    midpoints = np.concatenate([midpoints, -midpoints])
    got = np.array([round_fraction_to_f32(Fraction(float(x))) for x in midpoints], dtype=np.float32)
    assert np.array_equal(bits(got), bits(midpoints.astype(np.float32)))


# --- the refinement tiers decide whatever the float64 tier hands them ------------------------------

TIER_CASES = {name: FORMULA_CASES[name] for name in ("gqa-group4", "causal-sq-gt-skv", "left-pad", "holes",
                                                     "large-logits", "near-ties", "explicit-negative-scale",
                                                     "kv-cache")}


def _undecided_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the float64 tier decide nothing: its bound becomes larger than any float32 spacing."""
    original = compute.float64_block

    def block(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        res = original(*args, **kwargs)
        res["bound"] = res["bound"] + 1e-3 * (res["out"].abs() + 1)
        return res

    monkeypatch.setattr(compute, "float64_block", block)


def _replace_tier2(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., tuple[np.ndarray, np.ndarray]]) -> None:
    """Tier 2's element decision replaced where it is called: by compute, for both of its passes (the
    first and the double-double exp pass), and inside double_double."""
    monkeypatch.setattr(compute, "double_double_elements", fn)
    monkeypatch.setattr(double_double, "double_double_elements", fn)


@pytest.mark.parametrize("case", TIER_CASES.values(), ids=TIER_CASES.keys())
def test_double_double_tier_gives_the_same_bits_when_it_decides_every_element(
        case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, golden = seeded_golden(case)
    _undecided_everywhere(monkeypatch)
    forced = compute_reference(case, inputs)
    assert forced.stats.float64 < golden.out.size // 4  # the tiers below really did the work
    assert forced.stats.double_double > 0
    assert np.array_equal(bits(forced.out), bits(golden.out))


@pytest.mark.parametrize("name", ["gqa-group7-mqa", "left-pad"])
def test_exact_tier_gives_the_same_bits_when_it_decides_every_element(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case = FORMULA_CASES[name]
    inputs, golden = seeded_golden(case)
    _undecided_everywhere(monkeypatch)
    original = double_double.double_double_elements

    def undecided(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        values, decided = original(*args, **kwargs)
        return values, np.zeros_like(decided)

    _replace_tier2(monkeypatch, undecided)
    forced = compute_reference(case, inputs)
    assert forced.stats.exact > 0 and forced.stats.double_double == 0
    assert np.array_equal(bits(forced.out), bits(golden.out))


def _only_the_precise_pass_decides(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Tier 2's first pass decides nothing, so its double-double exp pass decides every element;
    returns the count of the exp pass's calls (``calls["precise"]``), kept up to date."""
    original = double_double.double_double_elements
    calls = {"precise": 0}

    def only_precise(*args: object, precise: bool = False, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        values, decided = original(*args, precise=precise, **kwargs)
        if not precise:
            return values, np.zeros_like(decided)
        calls["precise"] += 1
        return values, decided

    _replace_tier2(monkeypatch, only_precise)
    return calls


@pytest.mark.parametrize("case", TIER_CASES.values(), ids=TIER_CASES.keys())
def test_double_double_exp_pass_gives_the_same_bits_when_it_decides_every_element(
        case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, golden = seeded_golden(case)
    _undecided_everywhere(monkeypatch)
    calls = _only_the_precise_pass_decides(monkeypatch)
    forced = compute_reference(case, inputs)
    assert calls["precise"] > 0 and forced.stats.double_double > 0
    assert np.array_equal(bits(forced.out), bits(golden.out))


def test_double_double_exp_is_accurate_to_2_to_the_minus_88() -> None:
    import mpmath

    rng = np.random.Generator(np.random.PCG64(3))
    # the reduction's boundaries: x = (k ± 1/2)·ln2/64, where |r| is largest and j wraps around
    k = rng.integers(-60000, 1, 100)
    edges = np.concatenate([(k + 0.5), (k - 0.5), k]) * (np.log(2) / 64)
    x = np.concatenate([-rng.exponential(4.0, 400), -rng.uniform(0, 650, 200), [0.0, -0.5 * np.log(2), -np.log(2)],
                        edges[edges > -650], np.nextafter(edges[edges > -650], 0.0)])
    x_lo = rng.uniform(-1, 1, x.size) * np.abs(x) * 2.0**-53
    hi, lo = double_double.exp_dd(torch.from_numpy(x), torch.from_numpy(x_lo))
    with mpmath.workprec(240):
        worst = max(abs((mpmath.mpf(float(h)) + mpmath.mpf(float(lw))) / mpmath.exp(mpmath.mpf(a) + mpmath.mpf(b)) - 1)
                    for h, lw, a, b in zip(hi.tolist(), lo.tolist(), x, x_lo))
    assert worst <= double_double.EXP_DD_ERROR


@pytest.mark.parametrize("name", ["gqa-group4", "holes", "near-ties"])
def test_tier2_in_tiny_chunks_gives_the_same_bits(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both tier-2 passes cut into chunks far smaller than a row (batches of a few rows, chunks of a
    few elements) decide exactly what large chunks decide."""
    case = FORMULA_CASES[name]
    inputs, golden = seeded_golden(case)
    _undecided_everywhere(monkeypatch)
    calls = _only_the_precise_pass_decides(monkeypatch)
    whole = compute_reference(case, inputs)
    one_call = calls["precise"]
    monkeypatch.setattr(double_double, "TIER2_ELEMENTS", 37)
    chunked = compute_reference(case, inputs)
    assert calls["precise"] - one_call >= 3 * one_call  # the small limit really cut the work up
    assert np.array_equal(bits(chunked.out), bits(golden.out))
    assert (chunked.stats.double_double, chunked.stats.exact) == (whole.stats.double_double, whole.stats.exact)


@pytest.mark.parametrize("n", [300, 1024, 1025, 4097, 9000])
def test_blocked_sums_error_is_within_its_stated_bound(n: int) -> None:
    from fractions import Fraction

    from conformance.reference.float64 import CASCADE_BLOCKS, SUM_BLOCK, blocked_sums

    rng = np.random.Generator(np.random.PCG64(n))
    p = torch.from_numpy(rng.random((3, n)) ** 4)  # weights in [0, 1], many small
    x = torch.from_numpy(np.stack([rng.standard_normal(n) * np.exp(rng.standard_normal(n) * 3), np.ones(n)], 1))
    r, got = blocked_sums(p, x)
    kb = SUM_BLOCK
    assert r == (kb if n <= kb * CASCADE_BLOCKS else kb + (-(-n // kb) - 1).bit_length() - 1)
    for i in range(3):
        for c in range(2):
            terms = [Fraction(float(a)) * Fraction(float(b)) for a, b in zip(p[i], x[:, c])]
            exact, mag = sum(terms), sum(abs(t) for t in terms)
            bound = (r + 1) * Fraction(2) ** -53 * mag * (1 + Fraction(1, 1000))
            assert abs(Fraction(float(got[i, c])) - exact) <= bound


# --- exact dot products: where tier 1 drops the dot product's rounding from its bound ----------------


def _wide_inputs(dtype: str, rows: int, d: int, seed: int) -> torch.Tensor:
    """Values of ``dtype`` with a wide exponent spread (some tiny), as float64."""
    rng = np.random.Generator(np.random.PCG64(seed))
    x = rng.standard_normal((rows, d)) * np.exp2(rng.integers(-40, 4, (rows, d)) * (rng.random((rows, d)) < 0.05))
    return torch.from_numpy(x).to(TORCH_DTYPES[dtype]).to(torch.float64)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dot_products_called_exact_are_exact_in_every_order_of_summation(dtype: str) -> None:
    from conformance.reference.exact_dots import inexact_dots, lowest_bit_exponents

    q, k = _wide_inputs(dtype, 24, 64, 1), _wide_inputs(dtype, 40, 64, 2)
    adot = q.abs() @ k.abs().T
    inexact = inexact_dots(adot, lowest_bit_exponents(q), lowest_bit_exponents(k).T)
    if dtype != "float32":
        assert 0 < int(inexact.sum()) < inexact.numel()  # both kinds occur in these inputs
    matmul = q @ k.T
    rng = np.random.Generator(np.random.PCG64(3))
    for i, j in zip(*np.nonzero(~inexact.numpy())):
        products = [float(a) * float(b) for a, b in zip(q[i], k[j])]  # exact: 2p ≤ 48 bits
        exact = sum(Fraction(t) for t in products)
        orders = [products, products[::-1], [products[t] for t in rng.permutation(len(products))]]
        for terms in orders:
            total = 0.0
            for t in terms:
                total += t
            assert Fraction(total) == exact
        assert Fraction(float(matmul[i, j])) == exact


def _zero_padded_tree(x: torch.Tensor) -> torch.Tensor:
    """The pairwise tree over the last dim as zero padding to a power of two defines it."""
    n = x.shape[-1]
    x = torch.nn.functional.pad(x, (0, (1 << max(n - 1, 0).bit_length()) - n))
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 33, 100])
@pytest.mark.parametrize("with_tail", [False, True])
def test_pairwise_sum_along_any_dim_with_a_tail_adds_as_zero_padding_does(n: int, with_tail: bool) -> None:
    from conformance.reference.float64 import pairwise_sum

    rng = np.random.Generator(np.random.PCG64(n))
    x = torch.from_numpy(rng.standard_normal((2, n, 3, 4)) * np.exp2(rng.integers(-30, 30, (2, n, 3, 4))))
    x[0, :, 0, 0] = -0.0  # signed zeros: x + 0.0 turns -0 into +0, as the padding's additions do
    tail = torch.from_numpy(rng.standard_normal((2, 1, 3, 4))) if with_tail else None
    got = pairwise_sum(x, -3, tail)
    joined = torch.cat([x, tail], 1) if with_tail else x
    want = _zero_padded_tree(joined.movedim(1, -1)).movedim(-1, 1)
    assert got.shape == (2, 1, 3, 4)
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))  # bit for bit, signs of zeros included


def test_inexact_dots_is_the_power_of_two_test_it_states() -> None:
    """adot ≥ 2^(E_q + E_k + 52) exactly, by the exponent field, for values on both sides of it."""
    from conformance.reference.exact_dots import NO_BITS, inexact_dots

    rng = np.random.Generator(np.random.PCG64(7))
    q_bits = torch.from_numpy(rng.integers(-160, 20, (6, 1))).to(torch.int32)
    k_bits = torch.from_numpy(rng.integers(-160, 20, (1, 9))).to(torch.int32)
    q_bits[0, 0], k_bits[0, 0] = NO_BITS, NO_BITS  # all-zero vectors
    limit = torch.ldexp(torch.ones(6, 9, dtype=torch.float64), (q_bits + k_bits + 52).to(torch.float64))
    for factor in (0.5, np.nextafter(1.0, 0.0), 1.0, np.nextafter(1.0, 2.0), 3.0):
        adot = limit * factor
        adot[torch.isinf(adot)] = 1e300  # a zero vector's dots: any finite adot is below 2^(4096 + ...)
        want = torch.ldexp(adot, -(q_bits + k_bits).to(torch.float64)) >= 2.0**52
        assert torch.equal(inexact_dots(adot, q_bits, k_bits), want)
    assert not bool(inexact_dots(torch.zeros(6, 9, dtype=torch.float64), q_bits, k_bits).any())


@pytest.mark.parametrize("density", [0.002, 0.6])
def test_inexact_weighted_sums_are_the_masked_product(density: float) -> None:
    """Few inexact keys (gathered per batch entry and head) or many (the dense product): the same
    sums, each (b, h) with its own keys, the values broadcast over the heads."""
    from conformance.reference.float64 import inexact_weighted_sums

    rng = np.random.Generator(np.random.PCG64(11))
    pw = torch.from_numpy(rng.random((2, 3, 40, 700)))
    inexact = torch.from_numpy(rng.random((2, 3, 40, 700)) < density)
    inexact[1, 2] = False  # a head with no inexact dot at all
    inexact[0, 1, :, 5] = True  # a key inexact in every row
    x = torch.from_numpy(rng.random((2, 1, 700, 9)))
    got = inexact_weighted_sums(pw, inexact, x)
    want = (pw * inexact) @ x
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-13, atol=0.0)
    assert torch.equal(got[1, 2], torch.zeros_like(got[1, 2]))


@pytest.mark.parametrize("n", [1, 63, 64, 1024, 1025, 4097, 32768])
def test_sum_roundings_is_the_r_blocked_sums_returns(n: int) -> None:
    from conformance.reference.float64 import blocked_sums, sum_roundings

    r, _ = blocked_sums(torch.ones(1, n, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64))
    assert sum_roundings(n) == min(r, n)


def test_lowest_bit_exponents_are_those_of_the_lowest_set_bit() -> None:
    from conformance.reference.exact_dots import NO_BITS, lowest_bit_exponents

    x = torch.tensor([[1.0, 0.75, -6.0], [2.0**-30 * 5, 0.0, 3.0], [0.0, 0.0, 0.0], [2.0**-1074, 1.0, 2.0]],
                     dtype=torch.float64)
    assert lowest_bit_exponents(x).flatten().tolist() == [-2, -30, NO_BITS, -1074]


def test_a_dot_product_whose_sum_needs_more_than_53_bits_is_inexact() -> None:
    from conformance.reference.exact_dots import inexact_dots, lowest_bit_exponents

    k = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    # 1 + 2^-40 is a float64 (every product a multiple of 2^-40, the sum below 2^(−40 + 52)); 1 + 2^-60 is not
    for tiny, expected in ((2.0**-40, False), (2.0**-60, True)):
        q = torch.tensor([[1.0, tiny]], dtype=torch.float64)
        adot = q.abs() @ k.abs().T
        flag = inexact_dots(adot, lowest_bit_exponents(q), lowest_bit_exponents(k).T)
        assert bool(flag[0, 0]) is expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_double_double_dots_are_within_their_bound_exact_pairs_with_bound_zero(dtype: str) -> None:
    """dd_dots against exact rational dot products: every pair within its bound; the pairs the
    lowest-bit test calls exact come back as (q·k, 0) with bound 0, the others from the Ozaki slices
    (gathered keys for bfloat16's few inexact ones, every key for float32's many)."""
    from conformance.reference.double_double import dd_dots, ozaki_dots
    from conformance.reference.exact_dots import inexact_dots, lowest_bit_exponents

    q, k = _wide_inputs(dtype, 12, 32, 21)[None], _wide_inputs(dtype, 50, 32, 22)[None]
    k = torch.cat([k, _wide_inputs(dtype, 1, 32, 23)[None] * 2.0**-30], 1)  # one key far below the others
    kt = k.transpose(-1, -2)
    hi, lo, err = dd_dots(q, kt)
    inexact = inexact_dots(q.abs() @ kt.abs(), lowest_bit_exponents(q), lowest_bit_exponents(k).transpose(-1, -2))
    assert 0 < int(inexact.sum()) < inexact.numel() if dtype == "bfloat16" else bool(inexact.any())
    for i in range(q.shape[1]):
        for j in range(k.shape[1]):
            exact = sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(q[0, i], k[0, j]))
            got = Fraction(float(hi[0, i, j])) + Fraction(float(lo[0, i, j]))
            assert abs(got - exact) <= Fraction(float(err[0, i, j]))
            if not inexact[0, i, j] and dtype == "bfloat16" and not inexact[0, :, j].any():
                assert (float(lo[0, i, j]), float(err[0, i, j])) == (0.0, 0.0) and got == exact
    o_hi, o_lo, o_err = ozaki_dots(q, kt)  # the slices alone: the same sums, within both bounds
    assert torch.all((hi + lo - (o_hi + o_lo)).abs() <= err + o_err)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tier1_bound_with_exact_dots_holds_against_a_50_digit_recomputation(dtype: str) -> None:
    """Wide-spread inputs, so that some logits' dot products round and most do not: |out − exact| stays
    within tier 1's bound for every element of the block."""
    import mpmath

    from conformance.reference.exact_dots import lowest_bit_exponents
    from conformance.reference.float64 import float64_block

    rows, n, d, scale = 4, 96, 64, 0.125
    q, k, v = _wide_inputs(dtype, rows, d, 4), _wide_inputs(dtype, n, d, 5), _wide_inputs(dtype, n, d, 6)
    q4, k4, v4 = q[None, None], k[None, None], v[None, None]
    vx = torch.cat([v4, v4.abs(), torch.ones_like(v4[..., :1])], -1)
    vis = torch.ones(1, 1, rows, n, dtype=torch.bool)
    k_bits = lowest_bit_exponents(k4).transpose(-1, -2)
    res = float64_block(q4, k4, k4.abs(), v4, vx, v4.abs().amax(-2, keepdim=True), vis, scale, dtype,
                        k_bits=k_bits)
    mpmath.mp.dps = 50
    for i in range(rows):
        logits = [mpmath.fsum(mpmath.mpf(float(a)) * mpmath.mpf(float(b)) for a, b in zip(q[i], k[j])) * scale
                  for j in range(n)]
        m = max(logits)
        weights = [mpmath.exp(x - m) for x in logits]
        total = mpmath.fsum(weights)
        for c in range(d):
            exact = mpmath.fsum(w * mpmath.mpf(float(v[j, c])) for j, w in enumerate(weights)) / total
            err = abs(mpmath.mpf(float(res["out"][0, 0, i, c])) - exact)
            assert err <= mpmath.mpf(float(res["bound"][0, 0, i, c])), (i, c)
