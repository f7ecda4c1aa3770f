"""The exact backward: agreement with float64 autograd, correct rounding, tiers, structure, naive model.

Correct rounding is checked against :mod:`conformance.gradient_crosscheck` (a 50-digit mpmath
recomputation that shares no code with the reference), on sampled elements and on the elements
whose float64 value lies nearest a float32 rounding boundary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from conftest import SMOKE_GOLDENS, build_case, build_inputs, visible_keys

from conformance.golden.format import case_path, read_golden
from conformance.reference import gradient, gradient_double_double, gradient_exact, gradient_float64
from conformance.reference.crosscheck import sample_elements
from conformance.reference.gradient import GradientGolden, compute_gradient_reference
from conformance.reference.gradient_crosscheck import (
    crosscheck_gradients,
    exact_gradient_element,
    exact_gradient_values,
)
from conformance.reference.rounding import round_fraction_to_f32, rounding_interval
from conformance.spec.case import Case
from conformance.spec.inputs import CaseInputs, make_grad_out, make_inputs, round_to_dtype

KINDS = ("dq", "dk", "dv")


def bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def same_bits(a: GradientGolden, b: GradientGolden) -> bool:
    return all(np.array_equal(bits(getattr(a, w)), bits(getattr(b, w))) for w in KINDS)


@functools.cache
def seeded(case: Case) -> tuple[CaseInputs, torch.Tensor, GradientGolden]:
    inputs = make_inputs(case)
    grad_out = make_grad_out(case)
    return inputs, grad_out, compute_gradient_reference(case, inputs, grad_out)


def float64_gradients(case: Case, inputs: CaseInputs, grad_out: torch.Tensor) -> dict[str, np.ndarray]:
    """torch.autograd of the textbook formula in float64 (rows that see no key give 0), and per element
    the magnitude of the terms summed: dq_T, dk_T, dv_T."""
    q = inputs.q.double().requires_grad_()
    k = inputs.k.double().requires_grad_()
    v = inputs.v.double().requires_grad_()
    kk, vv = k.repeat_interleave(case.group, dim=1), v.repeat_interleave(case.group, dim=1)
    see = visible_keys(case, inputs.key_padding_mask)
    has_key = see.any(-1, keepdim=True)
    scale = 1.0 / math.sqrt(case.d) if case.scale is None else case.scale
    scores = ((q @ kk.transpose(-1, -2)) * scale).masked_fill(~(see | ~has_key), -math.inf)
    p = torch.softmax(scores, dim=-1) * has_key
    (p @ vv).backward(grad_out.double())
    with torch.no_grad():
        dp = grad_out.double() @ vv.transpose(-1, -2)
        d = (p * dp).sum(-1, keepdim=True)
        mag = p * (dp.abs() + d.abs())
        group = (case.batch, case.hkv, case.group, case.skv, case.d)
        return {
            "dq": q.grad.numpy(), "dk": k.grad.numpy(), "dv": v.grad.numpy(),
            "dq_T": (abs(scale) * mag @ kk.abs()).numpy(),
            "dk_T": (abs(scale) * mag.transpose(-1, -2) @ q.abs()).reshape(group).sum(2).numpy(),
            "dv_T": (p.transpose(-1, -2) @ grad_out.double().abs()).reshape(group).sum(2).numpy(),
        }


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
    "scale-zero": build_case(batch=2, hq=4, hkv=2, d=8, sq=4, skv=7, scale=0.0, mask="holes"),
    "negative-scale": build_case(sq=4, skv=6, scale=-0.25, causal=False),
    "large-logits": build_case(d=32, sq=8, skv=8, dist="large_logits", dtype="bfloat16"),
    "near-ties": build_case(d=32, sq=8, skv=8, dist="near_ties"),
    "uniform": build_case(d=32, sq=8, skv=8, dist="uniform", dtype="float16"),
    "d256": build_case(hq=2, hkv=1, d=256, sq=5, skv=7, dtype="bfloat16"),
    "kv-cache": build_case(op="kv_cache_attention", batch=2, hq=4, hkv=2, sq=3, skv=8, mask="holes"),
}


@pytest.mark.parametrize("case", FORMULA_CASES.values(), ids=FORMULA_CASES.keys())
def test_gradients_are_within_one_ulp_of_float64_autograd(case: Case) -> None:
    inputs, grad_out, golden = seeded(case)
    ref = float64_gradients(case, inputs, grad_out)
    for w in KINDS:
        got, want = getattr(golden, w), ref[w]
        assert got.dtype == np.float32 and got.shape == want.shape, w
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        # float64 autograd itself is only accurate to ~1e-16 of the terms it sums (dP − D cancels).
        assert np.all(np.abs(got - want) <= ulp + 1e-10 * ref[f"{w}_T"]), w


# --- correct rounding against the mpmath recomputation --------------------------------------------

CROSSCHECK_CASES = {
    "mha-causal-fp32": build_case(hq=2, hkv=2, d=32, sq=9, skv=9, seed=3),
    "gqa4-noncausal-bf16": build_case(hq=4, hkv=1, d=16, sq=5, skv=9, dtype="bfloat16", causal=False, seed=4),
    "gqa7-fp16-holes": build_case(hq=7, hkv=1, d=16, sq=4, skv=7, dtype="float16", mask="holes", seed=5),
    "chunk-left-pad": build_case(batch=2, d=16, sq=3, skv=10, mask="left_pad", seed=6),
    "sq-gt-skv-bf16": build_case(batch=2, d=16, sq=7, skv=4, dtype="bfloat16", seed=7),
    "decode-bf16": build_case(hq=4, hkv=2, d=64, sq=1, skv=17, dtype="bfloat16", seed=8),
    "large-logits-bf16": build_case(d=32, sq=9, skv=9, dist="large_logits", dtype="bfloat16", seed=9),
    "large-logits-fp32": build_case(d=32, sq=9, skv=9, dist="large_logits", seed=10),
    "near-ties-fp32": build_case(d=32, sq=9, skv=9, dist="near_ties", seed=11),
    "near-ties-bf16": build_case(hq=4, hkv=2, d=16, sq=9, skv=9, dist="near_ties", dtype="bfloat16", seed=12),
    "negative-scale-uniform": build_case(d=16, sq=5, skv=8, scale=-0.5, dist="uniform", causal=False, seed=13),
    "kv-cache-fp32": build_case(op="kv_cache_attention", hq=4, hkv=2, d=16, sq=3, skv=11, seed=14),
    "kv-cache-bf16-right-pad": build_case(op="kv_cache_attention", batch=2, hq=2, hkv=1, d=16, sq=4, skv=9,
                                          dtype="bfloat16", mask="right_pad", seed=15),
    "smoke-size-bf16": build_case(hq=4, hkv=2, d=64, sq=33, skv=33, dtype="bfloat16", seed=16),
    "smoke-size-fp16-holes": build_case(hq=2, hkv=1, d=64, sq=17, skv=17, dtype="float16", mask="holes", seed=17),
    "qwen2.5-7b-group7-bf16": build_case(hq=7, hkv=1, d=128, sq=5, skv=17, dtype="bfloat16", seed=18),
    "d256-fp32": build_case(hq=2, hkv=1, d=256, sq=4, skv=6, seed=19),
}


def nearest_to_a_rounding_boundary(x64: np.ndarray, n: int) -> list[tuple[int, ...]]:
    """The ``n`` elements whose float64 value lies relatively closest to a float32 midpoint."""
    lo, hi = rounding_interval(x64.astype(np.float32))
    distance = np.minimum(x64 - lo, hi - x64) / np.maximum(np.abs(x64), 1e-300)
    flat = np.argsort(distance, axis=None, kind="stable")[:n]
    return [tuple(int(i) for i in idx) for idx in zip(*np.unravel_index(flat, x64.shape))]


@pytest.mark.parametrize("case", CROSSCHECK_CASES.values(), ids=CROSSCHECK_CASES.keys())
def test_elements_equal_the_mpmath_recomputation(case: Case) -> None:
    inputs, grad_out, golden = seeded(case)
    ref = float64_gradients(case, inputs, grad_out)
    elements = {w: sample_elements(ref[w].shape, 10, seed=case.seed) + nearest_to_a_rounding_boundary(ref[w], 6)
                for w in KINDS}
    assert crosscheck_gradients(case, inputs, grad_out, golden, elements) == []


#: Committed smoke goldens with gradients whose stored gradients are crosschecked (every family of
#: the smoke tier's gradient cases: dtypes, GQA groups 7/4/MQA/MHA, head dims, masks incl. rows that
#: see no key, distributions, scales, presets, decode, chunked prefill and the KV-cache op).
SMOKE_GRAD_CROSSCHECK = [
    "attention/grad-dtypes/hq2-hkv1-d64-b1-sq17-skv17-fp16-noncausal-grad",
    "attention/grad-dtypes/hq2-hkv1-d64-b1-sq9-skv33-fp32-causal-grad",
    "attention/grad-gqa/hq7-hkv1-d64-b1-sq9-skv17-fp32-causal-grad",
    "attention/grad-gqa/hq8-hkv2-d64-b1-sq9-skv17-bf16-causal-grad",
    "attention/grad-head-dims/hq2-hkv1-d256-b1-sq17-skv17-bf16-causal-grad",
    "attention/grad-masked/hq2-hkv1-d64-b2-sq9-skv17-bf16-causal-allmasked-grad",
    "attention/grad-masked/hq2-hkv1-d64-b2-sq9-skv17-fp32-noncausal-rightpad-grad",
    "attention/grad-masked/hq2-hkv1-d64-b2-sq9-skv5-fp32-causal-grad",
    "attention/grad-distributions/hq2-hkv1-d64-b1-sq17-skv33-fp32-causal-largelogits-grad",
    "attention/grad-distributions/hq2-hkv1-d64-b1-sq17-skv33-bf16-causal-neartie-grad",
    "attention/grad-distributions/hq2-hkv1-d64-b1-sq17-skv33-fp32-causal-scalem0p25-grad",
    "attention/grad-presets/qwen2.5-7b-b1-sq5-skv5-bf16-causal-grad",
    "kv_cache_attention/grad-chunked-prefill/hq4-hkv2-d64-b2-past17-new8-bf16-causal-grad",
    "kv_cache_attention/grad-decode/hq4-hkv1-d64-b2-past17-new1-bf16-causal-holes-grad",
]


@pytest.mark.parametrize("case_id", SMOKE_GRAD_CROSSCHECK)
def test_committed_smoke_gradients_equal_the_mpmath_recomputation(case_id: str) -> None:
    # Read from the committed file (not recomputed): what vendors download is what is checked.
    gc = read_golden(case_path(SMOKE_GOLDENS, case_id))
    assert gc.gradient is not None and gc.inputs.grad_out is not None
    assert torch.equal(gc.inputs.grad_out, make_grad_out(gc.case))  # the stored dO is the seeded one
    ref = float64_gradients(gc.case, gc.inputs, gc.inputs.grad_out)
    elements = {w: sample_elements(ref[w].shape, 8, seed=gc.case.seed) + nearest_to_a_rounding_boundary(ref[w], 4)
                for w in KINDS}
    assert crosscheck_gradients(gc.case, gc.inputs, gc.inputs.grad_out, gc.gradient, elements) == []


def test_crosscheck_finds_a_wrong_element() -> None:
    case = CROSSCHECK_CASES["mha-causal-fp32"]
    inputs, grad_out, golden = seeded(case)
    broken = dataclasses.replace(golden, dk=golden.dk.copy())
    broken.dk[0, 1, 2, 3] = np.nextafter(broken.dk[0, 1, 2, 3], np.float32(np.inf))
    found = crosscheck_gradients(case, inputs, grad_out, broken, {"dk": [(0, 1, 2, 3), (0, 1, 2, 4)]})
    assert [(m.which, m.index) for m in found] == [("dk", (0, 1, 2, 3))]


def test_exact_midpoint_of_dv_rounds_ties_to_even() -> None:
    # One key seen by two rows with P = 1: dV = dO_0 + dO_1 = 1 + 2^-24 exactly, the midpoint between 1
    # and its successor; ties-to-even gives 1.0. The tiers must hand it to exact rational rounding.
    case = build_case(hq=1, hkv=1, d=1, sq=2, skv=1, causal=False)
    inputs = build_inputs(case, q=[[[[1.0], [2.0]]]], k=[[[[0.5]]]], v=[[[[3.0]]]])
    grad_out = torch.tensor([[[[1.0], [2.0**-24]]]], dtype=torch.float32)
    golden = compute_gradient_reference(case, inputs, grad_out)
    assert bits(golden.dv[0, 0, 0, 0]) == bits(np.float32(1.0))
    assert golden.stats.exact == 1
    assert exact_gradient_element(case, inputs, grad_out, "dv", (0, 0, 0, 0)) == np.float32(1.0)


@pytest.mark.parametrize("gap", [40.0, 80.0])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_element_just_off_a_midpoint_rounds_to_its_side(gap: float, sign: float) -> None:
    # Rows 0 and 1 (q = 0) see both keys with P = 1/2, row 2 sees key 1 with weight ~exp(-gap), so
    # dV_0 = (a + b)/2 + c·P_20 = 2 + 3·2^-23 − ε (times sign), ε ≈ exp(-gap): just inside the midpoint
    # whose tie would go to the even 2 + 2^-21. Correct rounding gives 2 + 2^-22.
    case = build_case(hq=1, hkv=1, d=1, sq=3, skv=2, causal=False)
    inputs = build_inputs(case, q=[[[[0.0], [0.0], [1.0]]]], k=[[[[0.0], [-gap]]]], v=[[[[3.0], [5.0]]]])
    a, b = 1 + 2.0**-22, 1 + 2.0**-21
    grad_out = torch.tensor([[[[sign * a], [sign * b], [sign * 1.0]]]], dtype=torch.float32)
    golden = compute_gradient_reference(case, inputs, grad_out)
    expected = np.float32(sign * (2 + 2.0**-22))
    assert bits(golden.dv[0, 0, 0, 0]) == bits(expected)
    assert exact_gradient_element(case, inputs, grad_out, "dv", (0, 0, 0, 0)) == expected
    assert golden.stats.double_double + golden.stats.exact > 0


def test_dq_exact_midpoint_is_rational_and_rounds_ties_to_even() -> None:
    # Row 0 has q = 0 (equal logits, P = 1/2): dQ = scale·(dP_0 − dP_1)(k_0 − k_1)/4 = (1 + 2^-24)/4, the
    # midpoint between 0.25 and its successor; ties-to-even gives 0.25. Row 1's dQ is transcendental.
    case = build_case(hq=1, hkv=1, d=1, sq=2, skv=2, causal=False, scale=1.0)
    inputs = build_inputs(case, q=[[[[0.0], [0.5]]]], k=[[[[1.0], [0.0]]]], v=[[[[1 + 2.0**-23], [2.0**-24]]]])
    grad_out = torch.tensor([[[[1.0], [1.0]]]], dtype=torch.float32)
    golden = compute_gradient_reference(case, inputs, grad_out)
    assert bits(golden.dq[0, 0, 0, 0]) == bits(np.float32(0.25))
    assert golden.stats.exact >= 1
    elements = {w: list(np.ndindex(*getattr(golden, w).shape)) for w in KINDS}
    assert crosscheck_gradients(case, inputs, grad_out, golden, elements) == []


def test_constant_values_give_exact_zero_dq_and_dk_through_the_exact_tier() -> None:
    # v is the same for every key: dP is constant along each row, dS ≡ 0 (a formal identity, not a
    # structural zero), so dQ = dK = +0.0 exactly although the logits differ; dV is unaffected.
    case = build_case(batch=2, hq=4, hkv=2, d=8, sq=4, skv=6, dtype="bfloat16", seed=41)
    seeded_inputs = make_inputs(case)
    inputs = dataclasses.replace(seeded_inputs, v=seeded_inputs.v[:, :, :1].expand_as(seeded_inputs.v).clone())
    grad_out = make_grad_out(case)
    golden = compute_gradient_reference(case, inputs, grad_out)
    assert np.all(bits(golden.dq) == 0) and np.all(bits(golden.dk) == 0)
    assert golden.stats.exact > 0  # tiers 1 and 2 cannot prove an exact zero
    assert crosscheck_gradients(case, inputs, grad_out, golden, {"dv": sample_elements(golden.dv.shape, 12, 2)}) == []


def test_the_intervals_give_way_to_the_formal_check_when_they_cannot_converge(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # With many logit groups the intervals go first; an exact zero or midpoint never converges, and
    # the formal check must then take over (here forced for every row).
    monkeypatch.setattr(gradient_exact, "FORMAL_GROUPS", 0)
    case = build_case(hq=1, hkv=1, d=2, sq=3, skv=3, causal=False, seed=42)
    seeded_inputs = make_inputs(case)
    inputs = dataclasses.replace(seeded_inputs, v=seeded_inputs.v[:, :, :1].expand_as(seeded_inputs.v).clone())
    golden = compute_gradient_reference(case, inputs, make_grad_out(case))
    assert np.all(bits(golden.dq) == 0) and golden.stats.exact >= golden.dq.size
    midpoint = build_case(hq=1, hkv=1, d=1, sq=2, skv=2, causal=False, scale=1.0)
    inputs = build_inputs(midpoint, q=[[[[0.0], [0.5]]]], k=[[[[1.0], [0.0]]]], v=[[[[1 + 2.0**-23], [2.0**-24]]]])
    golden = compute_gradient_reference(midpoint, inputs, torch.tensor([[[[1.0], [1.0]]]]))
    assert bits(golden.dq[0, 0, 0, 0]) == bits(np.float32(0.25))


# --- each tier's bound covers its actual error -----------------------------------------------------

BOUND_CASES = {name: FORMULA_CASES[name] for name in ("gqa-group4", "left-pad", "large-logits", "near-ties",
                                                      "negative-scale", "kv-cache")}
BOUND_CASES["large-logits-fp32-noncausal"] = build_case(hq=2, hkv=1, d=16, sq=6, skv=6, dist="large_logits",
                                                        causal=False, seed=51)
# The variants' tier 2: soft-capping multiplies dS by 1 − tanh², a sink is one more weight in each row.
BOUND_CASES["softcap"] = dataclasses.replace(
    build_case(hq=4, hkv=2, d=16, sq=6, skv=9, dtype="bfloat16", dist="large_logits", seed=61), softcap=5.0)
BOUND_CASES["sinks"] = dataclasses.replace(build_case(hq=4, hkv=2, d=16, sq=5, skv=7, mask="holes", seed=62),
                                           sinks=(0.5, -1.0, 2.0, 0.0))
BOUND_CASES["softcap-sinks-window"] = dataclasses.replace(
    build_case(hq=2, hkv=1, d=16, sq=8, skv=8, dtype="bfloat16", seed=63), softcap=2.0, sinks=(1.5, -0.5),
    window=(3, -1))


def _query_index(which: str, index: tuple[int, ...], group: int) -> tuple[int, int, int, int]:
    """A tier's internal index ([b, hkv, g, sq, d] for dq) as the golden's."""
    if which == "dq":
        b, h, gi, i, c = index
        return b, h * group + gi, i, c
    return tuple(index)  # type: ignore[return-value]


@pytest.mark.parametrize("case", BOUND_CASES.values(), ids=BOUND_CASES.keys())
def test_each_tier_bound_covers_its_actual_error(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, grad_out, _ = seeded(case)
    tier1: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    tier2: list[tuple[str, bool, np.ndarray, tuple[torch.Tensor, ...]]] = []
    decide64, decide_dd, original_tier2 = gradient.decide_float64, gradient_double_double._decide_dd, gradient.tier2

    def spy64(value: torch.Tensor, bound: torch.Tensor, zero: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        held = [torch.as_tensor(x).cpu().expand_as(torch.as_tensor(value)).numpy().copy() for x in (value, bound, zero)]
        tier1.append((held[0], held[1], held[2]))
        return decide64(value, bound, zero)

    def spy_tier2(case_: Case, ops: object, elements: dict, precise: bool, prior: object = None) -> tuple:
        calls: list[tuple[torch.Tensor, ...]] = []

        def spy_dd(hi: torch.Tensor, lo: torch.Tensor, bound: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            calls.append((hi.clone(), lo.clone(), bound.clone()))
            return decide_dd(hi, lo, bound)

        monkeypatch.setattr(gradient_double_double, "_decide_dd", spy_dd)
        try:
            values, decided, chunks = original_tier2(case_, ops, elements, precise, prior)
        finally:
            monkeypatch.setattr(gradient_double_double, "_decide_dd", decide_dd)
        for w, call in zip(KINDS, calls):
            tier2.append((w, precise, elements[w], call))
        return values, decided, chunks

    monkeypatch.setattr(gradient, "decide_float64", spy64)
    compute_gradient_reference(case, inputs, grad_out)  # tier 1 with its real bounds
    monkeypatch.setattr(gradient, "tier2", spy_tier2)
    _undecided_everywhere(monkeypatch)  # then every element through tier 2 ...
    _tier2_decides(monkeypatch, (True,))  # ... and both of its passes, the second on every chunk
    monkeypatch.setattr(gradient_double_double, "_select_chunks",
                        lambda case, name, prior: torch.ones_like(prior[0], dtype=torch.bool))
    compute_gradient_reference(case, inputs, grad_out)
    assert {(w, p) for w, p, _, _ in tier2} == {(w, p) for w in KINDS for p in (False, True)}

    checks = []  # (kind, golden index, computed value, bound)
    with mpmath.workdps(80):  # holds every double-double exactly
        for w, (value, bound, zero) in zip(KINDS, tier1[:3]):
            for index in zip(*np.nonzero(~zero)):
                checks.append((w, _query_index(w, index, case.group), mpmath.mpf(float(value[index])),
                               float(bound[index])))
        for w, _, elements, (hi, lo, bound) in tier2:
            for index, h, lw, b in zip(elements, hi.tolist(), lo.tolist(), bound.tolist()):
                checks.append((w, _query_index(w, tuple(int(x) for x in index), case.group),
                               mpmath.mpf(h) + mpmath.mpf(lw), b))
    wanted: dict[str, set] = {w: set() for w in KINDS}
    for w, index, _, _ in checks:
        wanted[w].add(index)
    exact = exact_gradient_values(case, inputs, grad_out, wanted)
    with mpmath.workdps(80):
        bad = [(w, index, float(value), float(exact[(w, *index)]), bound) for w, index, value, bound in checks
               if not abs(value - exact[(w, *index)]) <= mpmath.mpf(bound)]
    assert bad == []
    # the double-double exp pass is far more precise than float64: ≤ 2^-60 of the terms' magnitude
    _, _, golden = seeded(case)
    for w, precise, elements, (_, _, bound) in tier2:
        if precise and len(elements):
            rows = np.array([_query_index(w, tuple(int(x) for x in e), case.group)[:3] for e in elements])
            magnitude = getattr(golden, f"{w}_error_scale")[tuple(rows.T)]
            assert np.all(bound.numpy() <= 2.0**-60 * magnitude + 1e-290), w


def test_float64_decision_needs_the_sign_of_a_zero_result() -> None:
    value = np.array([-1e-60, 1e-60, 1e-60, 0.0, 0.0, 1.0 + 2.0**-24, 1.0 + 2.0**-24 + 2.0**-40])
    bound = np.array([1e-70, 1e-70, 1e-50, 0.0, 0.0, 0.0, 2.0**-41])
    zero = np.array([False, False, False, False, True, False, False])
    v32, undecided = gradient_float64.decide_float64(value, bound, zero)
    assert undecided.tolist() == [False, False, True, True, False, True, False]
    assert bits(v32[[0, 1, 4, 6]]).tolist() == [0x80000000, 0, 0, bits(np.float32(1 + 2.0**-23))]


def test_double_double_decision_uses_the_low_part_and_the_sign_of_zero() -> None:
    mid = 1.0 + 2.0**-24  # ties to even would give 1.0
    hi = torch.tensor([mid, mid, mid, -1e-60, 1e-60, 1e-60, 0.0], dtype=torch.float64)
    lo = torch.tensor([2.0**-80, -(2.0**-80), 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    bound = torch.tensor([2.0**-90, 2.0**-90, 2.0**-90, 1e-70, 1e-70, 1e-50, 1e-70], dtype=torch.float64)
    values, decided = gradient_double_double._decide_dd(hi, lo, bound)
    assert decided.tolist() == [True, True, False, True, True, False, False]
    assert bits(values[:2]).tolist() == [bits(np.float32(1 + 2.0**-23)), bits(np.float32(1.0))]
    assert bits(values[3:5]).tolist() == [0x80000000, 0]


# --- every tier gives the same bits -----------------------------------------------------------------

TIER_CASES = {name: FORMULA_CASES[name] for name in ("gqa-group4", "causal-sq-gt-skv", "left-pad", "holes",
                                                     "large-logits", "near-ties", "negative-scale",
                                                     "scale-zero", "kv-cache")}
TIER_CASES.update({name: BOUND_CASES[name] for name in ("softcap", "sinks", "softcap-sinks-window")})
EXACT_CASES = {
    "gqa-left-pad": build_case(batch=2, hq=2, hkv=1, d=4, sq=3, skv=5, mask="left_pad"),
    "bf16-sq-gt-skv": build_case(hq=2, hkv=1, d=4, sq=4, skv=3, dtype="bfloat16"),
    "scale-zero-holes": build_case(batch=2, hq=2, hkv=1, d=4, sq=3, skv=4, scale=0.0, mask="holes", causal=False),
    "large-logits": build_case(hq=2, hkv=1, d=8, sq=3, skv=4, dist="large_logits"),
    "softcap-sinks": dataclasses.replace(build_case(hq=2, hkv=1, d=4, sq=3, skv=4, dtype="bfloat16"), softcap=3.0,
                                         sinks=(0.5, -0.5)),
}


def _undecided_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the float64 tier decide nothing but the structural zeros: bounds beyond any float32 spacing."""
    original = gradient.backward_block

    def block(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        res = original(*args, **kwargs)
        for w in KINDS:
            res[f"{w}_bound"] = res[f"{w}_bound"] + 1e-3 * (res[w].abs() + 1)
        return res

    monkeypatch.setattr(gradient, "backward_block", block)


def _tier2_decides(monkeypatch: pytest.MonkeyPatch, passes: tuple[bool, ...]) -> dict[str, int]:
    """Let tier 2 keep only the decisions of the passes in ``passes`` (False: cheap exp, True: precise)."""
    original = gradient.tier2
    calls = {"cheap": 0, "precise": 0}

    def tier2(case: Case, ops: object, elements: dict, precise: bool, prior: object = None) -> tuple:
        values, decided, chunks = original(case, ops, elements, precise, prior)
        calls["precise" if precise else "cheap"] += 1
        if precise not in passes:
            decided = {w: np.zeros_like(x) for w, x in decided.items()}
        return values, decided, chunks

    monkeypatch.setattr(gradient, "tier2", tier2)
    return calls


@pytest.mark.parametrize("case", TIER_CASES.values(), ids=TIER_CASES.keys())
def test_double_double_tier_gives_the_same_bits_when_it_decides_every_element(
        case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, grad_out, golden = seeded(case)
    _undecided_everywhere(monkeypatch)
    forced = compute_gradient_reference(case, inputs, grad_out)
    total = sum(getattr(golden, w).size for w in KINDS)
    assert forced.stats.double_double > 0 and forced.stats.exact <= golden.stats.exact + total // 20
    nonzero = sum(int(np.count_nonzero(getattr(golden, w))) for w in KINDS)
    assert forced.stats.double_double + forced.stats.exact >= nonzero  # only structural zeros stayed in tier 1
    assert same_bits(forced, golden)


@pytest.mark.parametrize("case", TIER_CASES.values(), ids=TIER_CASES.keys())
def test_double_double_exp_pass_gives_the_same_bits_when_it_decides_every_element(
        case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, grad_out, golden = seeded(case)
    _undecided_everywhere(monkeypatch)
    calls = _tier2_decides(monkeypatch, (True,))
    forced = compute_gradient_reference(case, inputs, grad_out)
    assert calls["precise"] == 1 and forced.stats.double_double > 0
    assert same_bits(forced, golden)


@pytest.mark.parametrize("case", EXACT_CASES.values(), ids=EXACT_CASES.keys())
def test_exact_tier_gives_the_same_bits_when_it_decides_every_element(
        case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, grad_out, golden = seeded(case)
    _undecided_everywhere(monkeypatch)
    _tier2_decides(monkeypatch, ())
    forced = compute_gradient_reference(case, inputs, grad_out)
    assert forced.stats.double_double == 0 and forced.stats.exact > 0
    assert forced.stats.exact + forced.stats.float64 == sum(getattr(golden, w).size for w in KINDS)
    assert same_bits(forced, golden)


def test_exact_tier_agrees_with_mpmath_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    case = EXACT_CASES["gqa-left-pad"]
    inputs, grad_out, _ = seeded(case)
    _undecided_everywhere(monkeypatch)
    _tier2_decides(monkeypatch, ())
    forced = compute_gradient_reference(case, inputs, grad_out)
    elements = {w: list(np.ndindex(*getattr(forced, w).shape)) for w in KINDS}
    assert crosscheck_gradients(case, inputs, grad_out, forced, elements) == []


def test_an_undetectable_exact_zero_raises_instead_of_guessing_a_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two rows with the same q and opposite dO: their dK contributions cancel exactly, each being
    # transcendental. The exact tier must not return a zero of arbitrary sign.
    case = build_case(hq=1, hkv=1, d=2, sq=2, skv=2, causal=False)
    inputs = build_inputs(case, q=[[[[1.0, 0.5], [1.0, 0.5]]]], k=[[[[0.25, 1.0], [-0.5, 0.75]]]],
                          v=[[[[1.0, 2.0], [-1.0, 0.5]]]])
    grad_out = torch.tensor([[[[1.0, -2.0], [-1.0, 2.0]]]], dtype=torch.float32)
    _undecided_everywhere(monkeypatch)
    _tier2_decides(monkeypatch, ())
    with pytest.raises(ArithmeticError, match=case.id):
        compute_gradient_reference(case, inputs, grad_out)


# --- structure ----------------------------------------------------------------------------------------

FULLY_MASKED = {
    "all-masked-padding": (build_case(batch=4, sq=3, skv=5, mask="all_masked", causal=False), np.s_[0::2, :, :]),
    "causal-sq-gt-skv-leading-rows": (build_case(batch=2, sq=7, skv=3), np.s_[:, :, :4]),
    "kv-cache-all-masked": (build_case(op="kv_cache_attention", batch=2, sq=2, skv=6, mask="all_masked"),
                            np.s_[0::2, :, :]),
}


@pytest.mark.parametrize("case, rows", FULLY_MASKED.values(), ids=FULLY_MASKED.keys())
def test_fully_masked_rows_have_zero_dq_naive_error_and_error_scale(case: Case, rows: tuple) -> None:
    _, _, golden = seeded(case)
    assert golden.dq[rows].size > 0
    assert np.all(bits(golden.dq[rows]) == 0)  # +0.0, never NaN or -0.0
    assert np.all(golden.dq_naive_error[rows] == 0) and np.all(golden.dq_error_scale[rows] == 0)


def test_fully_masked_rows_add_nothing_to_dk_and_dv() -> None:
    case, rows = FULLY_MASKED["causal-sq-gt-skv-leading-rows"]
    inputs, grad_out, golden = seeded(case)
    changed = grad_out.clone()
    changed[rows] = torch.randn(changed[rows].shape).to(changed.dtype)  # rows that see nothing
    other = compute_gradient_reference(case, inputs, changed)
    assert same_bits(other, golden)
    _, _, masked = seeded(FULLY_MASKED["all-masked-padding"][0])
    assert np.all(bits(masked.dk[0::2]) == 0) and np.all(bits(masked.dv[0::2]) == 0)


@pytest.mark.parametrize("name", ["right-pad", "left-pad", "holes", "kv-cache"])
def test_padded_keys_get_exactly_zero_dk_and_dv(name: str) -> None:
    case = FORMULA_CASES[name]
    inputs, grad_out, golden = seeded(case)
    padded = ~inputs.key_padding_mask.numpy()
    assert padded.any()
    for w in ("dk", "dv"):
        assert np.all(bits(getattr(golden, w).transpose(0, 2, 1, 3)[padded]) == 0)
        assert np.all(getattr(golden, f"{w}_error_scale").transpose(0, 2, 1)[padded] == 0)
    # whatever the padded slots hold
    k, v = inputs.k.clone(), inputs.v.clone()
    slots = torch.from_numpy(padded)[:, None, :, None].expand_as(k)
    k[slots], v[slots] = 3.0, -7.0
    other = compute_gradient_reference(case, dataclasses.replace(inputs, k=k, v=v), grad_out)
    assert same_bits(other, golden)


def test_first_causal_row_of_a_prefill_has_exactly_zero_dq() -> None:
    case = build_case(batch=2, hq=4, hkv=2, d=16, sq=5, skv=5, dtype="bfloat16")  # row 0 sees key 0 only
    _, _, golden = seeded(case)
    assert np.all(bits(golden.dq[:, :, 0]) == 0)
    assert np.all(golden.dq[:, :, 1:].any(-1))


def test_scale_zero_gives_zero_dq_dk_and_the_exact_mean_based_dv() -> None:
    case = FORMULA_CASES["scale-zero"]
    inputs, grad_out, golden = seeded(case)
    assert np.all(bits(golden.dq) == 0) and np.all(bits(golden.dk) == 0)
    see = visible_keys(case, inputs.key_padding_mask)[:, 0].numpy()  # [b, sq, skv]
    do = grad_out.double().numpy()
    expected = np.zeros(golden.dv.shape, dtype=np.float32)
    for b, h, j, c in np.ndindex(*golden.dv.shape):
        total = Fraction(0)
        for hq in range(h * case.group, (h + 1) * case.group):
            for i in np.flatnonzero(see[b, :, j]):
                total += Fraction(float(do[b, hq, i, c])) / int(see[b, i].sum())
        expected[b, h, j, c] = round_fraction_to_f32(total)
    assert np.array_equal(bits(golden.dv), bits(expected))


def test_gqa_rows_equal_the_expanded_mha_and_dk_dv_sum_the_group() -> None:
    case = build_case(hq=6, hkv=2, d=16, sq=5, skv=7, dtype="bfloat16", causal=False, seed=21)
    inputs, grad_out, golden = seeded(case)
    mha = dataclasses.replace(case, id=case.id + "-mha", hkv=case.hq)
    expanded = dataclasses.replace(inputs, k=inputs.k.repeat_interleave(3, dim=1),
                                   v=inputs.v.repeat_interleave(3, dim=1))
    per_head = compute_gradient_reference(mha, expanded, grad_out)
    assert np.array_equal(bits(golden.dq), bits(per_head.dq))  # the same rows, bit for bit
    for w in ("dk", "dv"):
        parts = getattr(per_head, w).astype(np.float64).reshape(1, 2, 3, 7, 16)
        got = getattr(golden, w).astype(np.float64)
        # each rounded part and the rounded sum are off by at most half a spacing each
        slack = 0.5 * (np.spacing(np.abs(parts).astype(np.float32)).sum(2) + np.spacing(np.abs(got).astype(np.float32)))
        assert np.all(np.abs(got - parts.sum(2)) <= slack)
    # and exactly, element by element, against the recomputation
    assert crosscheck_gradients(case, inputs, grad_out, golden, {"dk": sample_elements(golden.dk.shape, 6, 1)}) == []


def test_kv_cache_gradients_are_those_of_the_concatenated_attention() -> None:
    case = FORMULA_CASES["kv-cache"]
    inputs, grad_out, golden = seeded(case)
    plain = dataclasses.replace(case, id=case.id.replace("kv_cache_attention", "attention"), op="attention",
                                s_past=None, split_points=())
    other = compute_gradient_reference(plain, inputs, grad_out)
    assert same_bits(other, golden)
    dk_cache, dk_new = golden.dk[:, :, :case.s_past], golden.dk[:, :, case.s_past:]
    assert dk_cache.shape[2] == case.s_past and dk_new.shape[2] == case.sq


def test_gradients_do_not_depend_on_the_thread_count() -> None:
    case = build_case(batch=2, hq=8, hkv=2, d=64, sq=33, skv=33, dtype="bfloat16", mask="holes")
    inputs, grad_out = make_inputs(case), make_grad_out(case)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(compute_gradient_reference(case, inputs, grad_out))
    finally:
        torch.set_num_threads(before)
    for field in dataclasses.fields(GradientGolden):
        a, b = getattr(results[0], field.name), getattr(results[1], field.name)
        if isinstance(a, np.ndarray):
            assert a.tobytes() == b.tobytes(), field.name
    assert results[0].flops == results[1].flops


def test_blocked_rows_give_the_same_bytes_as_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    case = build_case(hq=4, hkv=2, d=16, sq=13, skv=13, dtype="bfloat16")
    inputs, grad_out, golden = seeded(case)
    monkeypatch.setattr(gradient, "GRAD_BLOCK_ELEMENTS", 4 * 13 * 3)  # three rows per block
    blocked = compute_gradient_reference(case, inputs, grad_out)
    assert same_bits(blocked, golden)
    np.testing.assert_allclose(blocked.dk_error_scale, golden.dk_error_scale, rtol=2.0**-11)


def test_inputs_are_unchanged_and_bad_gradients_are_refused() -> None:
    case = FORMULA_CASES["holes"]
    inputs, grad_out, _ = seeded(case)
    before = [t.clone() for t in (inputs.q, inputs.k, inputs.v, inputs.key_padding_mask, grad_out)]
    compute_gradient_reference(case, inputs, grad_out)
    after = (inputs.q, inputs.k, inputs.v, inputs.key_padding_mask, grad_out)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    with pytest.raises(ValueError, match="shape"):
        compute_gradient_reference(case, inputs, grad_out[:, :, :-1])
    with pytest.raises(ValueError, match="float32"):
        compute_gradient_reference(case, inputs, grad_out.double() + 1e-12)
    with pytest.raises(ValueError, match="finite"):
        compute_gradient_reference(case, inputs, torch.full_like(grad_out, math.nan))


def test_make_grad_out_is_the_documented_draw() -> None:
    case = FORMULA_CASES["gqa-group4"]
    grad_out = make_grad_out(case)
    rng = np.random.Generator(np.random.PCG64([case.seed, 1]))
    expected = round_to_dtype(rng.standard_normal((case.batch, case.hq, case.sq, case.d)), case.dtype)
    assert grad_out.dtype == torch.bfloat16 and torch.equal(grad_out, expected)
    assert not torch.equal(grad_out, make_inputs(case).q)


# --- statistics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mha", "gqa-group4", "left-pad", "causal-sq-gt-skv"])
def test_flops_count_ten_d_per_visible_row_key_pair(name: str) -> None:
    case = FORMULA_CASES[name]
    inputs, _, golden = seeded(case)
    pairs = int(visible_keys(case, inputs.key_padding_mask).sum()) * case.hq
    assert golden.flops == 10 * case.d * pairs


@pytest.mark.parametrize("name", ["mha", "large-logits", "near-ties", "kv-cache"])
def test_error_scales_bound_the_gradients_and_sit_on_the_12_bit_grid(name: str) -> None:
    case = FORMULA_CASES[name]
    _, _, golden = seeded(case)
    for w in KINDS:
        scale = getattr(golden, f"{w}_error_scale")
        assert scale.dtype == np.float64 and scale.shape == getattr(golden, w).shape[:-1]
        assert np.all(scale >= np.abs(getattr(golden, w)).max(-1) * (1 - 2.0**-20))
        mant, _ = np.frexp(scale)
        assert np.all(np.ldexp(mant, 12) == np.round(np.ldexp(mant, 12)))


def naive_bf16_autograd(case: Case, inputs: CaseInputs, grad_out: torch.Tensor) -> dict[str, np.ndarray]:
    """Real torch autograd of the naive formula in bfloat16 (fully masked rows zeroed)."""
    q, k, v = (t.clone().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    kk, vv = k.repeat_interleave(case.group, dim=1), v.repeat_interleave(case.group, dim=1)
    see = visible_keys(case, inputs.key_padding_mask)
    has_key = see.any(-1, keepdim=True)
    scores = (q @ kk.transpose(-1, -2)) * case.effective_scale
    probs = torch.softmax(scores.masked_fill(~(see | ~has_key), -math.inf), dim=-1) * has_key
    (probs @ vv).backward(grad_out)
    return {"dq": q.grad.double().numpy(), "dk": k.grad.double().numpy(), "dv": v.grad.double().numpy()}


def test_naive_error_is_of_the_size_of_real_bf16_autograd() -> None:
    case = build_case(batch=2, hq=4, hkv=2, d=64, sq=33, skv=33, dtype="bfloat16", seed=31)
    inputs, grad_out, golden = seeded(case)
    real = naive_bf16_autograd(case, inputs, grad_out)
    for w in KINDS:
        modelled = getattr(golden, f"{w}_naive_error")
        measured = np.abs(real[w] - getattr(golden, w)).max(-1)
        assert modelled.max() > 0
        assert 0.25 <= modelled.max() / measured.max() <= 4, w
        assert 0.25 <= modelled.mean() / measured.mean() <= 4, w


def test_naive_error_is_zero_for_rows_and_keys_that_see_nothing() -> None:
    case, rows = FULLY_MASKED["all-masked-padding"]
    _, _, golden = seeded(dataclasses.replace(case, dtype="bfloat16", id=case.id + "-bf16"))
    assert np.all(golden.dq_naive_error[rows] == 0)
    assert np.all(golden.dk_naive_error[0::2] == 0) and np.all(golden.dv_naive_error[0::2] == 0)
    assert golden.dq_naive_error[1::2].max() > 0


@pytest.mark.parametrize("name", ["large-logits-bf16", "large-logits-fp32"])
def test_a_dominant_key_costs_no_refinement(name: str) -> None:
    # With one key dominating a row, dP − D cancels to ~P_second·dP; taken relative to the dominant
    # key's dP (the reference shift) it does not, and tier 1 decides (almost) everything.
    golden = seeded(CROSSCHECK_CASES[name])[2]
    total = sum(getattr(golden, w).size for w in KINDS)
    assert golden.stats.exact == 0 and golden.stats.double_double <= total // 50


def test_seeded_cases_exercise_the_refinement_tiers() -> None:
    refined = sum(seeded(case)[2].stats.double_double + seeded(case)[2].stats.exact
                  for case in CROSSCHECK_CASES.values())
    assert refined > 0  # without forcing, some elements of these cases need tier 2


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33])
def test_the_naive_models_pairwise_sum_is_a_fixed_tree_of_single_roundings(n: int) -> None:
    # The bits of the naive backward's rowsum must not depend on a reduction kernel (CPU and CUDA
    # generation once differed in a large-logits case's naive error): a fixed pairwise tree in float64.
    from conformance.reference.float64 import pairwise_sum

    x = torch.randn(5, n, dtype=torch.float64) * torch.logspace(-8, 8, n, dtype=torch.float64)
    for row, got in zip(x.tolist(), pairwise_sum(x)[:, 0].tolist()):
        level = row + [0.0] * ((1 << max(n - 1, 0).bit_length()) - n)
        while len(level) > 1:
            level = [level[i] + level[i + 1] for i in range(0, len(level), 2)]
        assert got == level[0]
