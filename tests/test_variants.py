"""The attention variants (sliding window, logit soft-capping, attention sinks): spec errors, the
fully-masked-row rule, planted defects caught, correct backends passing, unsupported variants skipped
with the reason, and the committed variant goldens against a 50-digit mpmath recomputation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_backend
from planted_variants import DEFECTS, PlantedVariants

from conformance.backends.builtin import ReferenceBackend
from conformance.backends.registry import load_backend, skip_reason
from conformance.errors import SpecError
from conformance.golden.format import case_path, read_golden
from conformance.golden.manifest import select_cases
from conformance.reference.crosscheck import crosscheck, sample_elements
from conformance.reference.gradient_crosscheck import crosscheck_gradients
from conformance.reference.rounding import rounding_interval
from conformance.run.settings import RunSettings
from conformance.spec.tolerances import load_tolerances

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "goldens" / "smoke"
TOLERANCES = load_tolerances(ROOT / "specs" / "tolerances.yaml")
VARIANT_GOLDENS = ("*-win*", "*softcap*", "*sinks*")


def variant_cases(pattern: str = "*") -> list[Path]:
    paths = {p for v in VARIANT_GOLDENS for p in select_cases(SMOKE, v)}
    return sorted(p for p in paths if p.match(pattern) or Path(str(p)).match(pattern))


def statuses(backend: object, paths: list[Path], checks: tuple[str, ...]) -> Counter[tuple[str, str]]:
    settings = RunSettings(tolerances=TOLERANCES, reruns=2, checks=checks)
    return Counter((r.check, r.status) for r in run_backend(backend, paths, settings).records)


# --- spec errors: one line naming file, line and field -----------------------------------------------

SPEC = """schema_version: 1
op: attention
seed: 1
presets: {presets}
families:
  f:
    base: {{hq: 2, hkv: 1, d: 8, batch: 1, sq: 3, skv: 3, dtype: float32, causal: true}}
    tiers:
      smoke:
        - {{{grid}}}
"""


@pytest.mark.parametrize(("grid", "field", "fragment"), [
    ("window_left: -2", "window_left", "greater than or equal to -1"),
    ("softcap: 0.0", "softcap", "softcap must be a finite number > 0"),
    ("sinks: [1.0, 2.0, 3.0]", "sinks", "sinks lists 3 logits; the case has Hq=2"),
])
def test_a_bad_variant_parameter_is_a_spec_error_naming_the_field(tmp_path: Path, grid: str, field: str,
                                                                 fragment: str) -> None:
    from conformance.spec.load import load_spec

    spec = tmp_path / "attention.yaml"
    spec.write_text(SPEC.format(presets=ROOT / "conformance" / "spec" / "data" / "presets.yaml", grid=grid))
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    text = str(err.value)
    assert f"{spec}:10" in text and field in text and fragment in text and "\n" not in text


def test_a_bad_variant_parameter_exits_2_with_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from conformance.cli.app import app

    (tmp_path / "attention.yaml").write_text(SPEC.format(presets=ROOT / "conformance" / "spec" / "data" /
                                                         "presets.yaml", grid="softcap: -1.0"))
    result = CliRunner().invoke(app, ["specs", "--spec", str(tmp_path / "attention.yaml")])
    assert result.exit_code == 2 and "softcap" in result.output


# --- the rules -------------------------------------------------------------------------------------


def test_a_row_that_sees_no_key_but_a_sink_outputs_zero_and_the_sinks_logit_as_lse() -> None:
    q = torch.randn(1, 2, 3, 8)
    k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    sinks = torch.tensor([0.75, -2.5])
    out, lse = ReferenceBackend().attention(q, k, v, causal=True, scale=None, key_padding_mask=None, sinks=sinks)
    assert torch.equal(out[:, :, 0], torch.zeros(1, 2, 8))  # Sq > Skv: row 0 sees no key
    assert torch.equal(lse[0, :, 0], sinks)
    assert bool((out[:, :, 1:] != 0).any())


def test_softcap_is_applied_before_the_mask_and_the_window_is_bottom_right_aligned() -> None:
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    out, _ = ReferenceBackend().attention(q, k, v, causal=True, scale=None, key_padding_mask=None,
                                          window_size=(0, -1), softcap=1.0)
    # window 0: each row sees only its diagonal key (keys 4 and 5 for Sq=2, Skv=6), whatever the cap.
    assert torch.equal(out[0, 0], v[0, 0, 4:6].float())


# --- planted defects are caught, correct backends pass ---------------------------------------------

DEFECT_CASES = {
    "softcap_after_mask": "*softcap*",
    "window_left_off_by_one": "*-win*",
    "window_top_left": "attention/window/*sq9-skv33*",
    "sink_in_numerator": "*sinks*",
    "sink_ignored_when_fully_masked": "attention/sinks/*allmasked*",
    "sinks_dropped": "*sinks*",
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_planted_variant_defect_fails_the_accuracy_check(defect: str) -> None:
    paths = variant_cases(DEFECT_CASES[defect])
    assert paths
    found = statuses(PlantedVariants(defect), paths, ("accuracy",))
    assert found[("accuracy", "fail")] > 0, found


def test_a_correct_variant_backend_passes_accuracy_and_contract_on_every_variant_golden() -> None:
    found = statuses(PlantedVariants(), variant_cases(), ("accuracy", "contract"))
    assert set(found) == {("accuracy", "pass"), ("contract", "pass")}, found


def test_the_reference_backend_passes_every_check_on_the_variant_goldens() -> None:
    from conformance.spec.checks import GOLDEN_CHECKS

    found = statuses(ReferenceBackend(), variant_cases(), GOLDEN_CHECKS)
    assert {status for _, status in found} == {"pass"}, found
    assert ("gradient_accuracy", "pass") in found and ("split", "pass") in found


def test_naive_fp32_is_accurate_on_every_variant_golden() -> None:
    found = statuses(load_backend("naive-fp32"), variant_cases(), ("accuracy", "gradient_accuracy"))
    assert {status for _, status in found} == {"pass"}, found


# --- unsupported variants are skipped with the reason ------------------------------------------------


def test_sdpa_skips_softcap_and_sinks_with_the_reason_and_runs_windows() -> None:
    sdpa = load_backend("sdpa")
    cases = {p.stem: read_golden(p).case for p in variant_cases("attention/variants-combined/*")}
    for case in cases.values():
        assert "soft-cap" in (skip_reason(sdpa, case.op, case) or "")
    window = read_golden(variant_cases("attention/window/*sq9-skv33-bf16*")[0]).case
    assert skip_reason(sdpa, window.op, window) is None
    found = statuses(sdpa, variant_cases("attention/window/*"), ("accuracy",))
    assert set(found) == {("accuracy", "pass")}, found


class PlainOnly:
    name, device = "plain-only", "cpu"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):  # pragma: no cover - never called
        raise AssertionError("a variant case must not reach a backend that does not declare the variant")


def test_a_backend_without_the_variant_is_skipped_never_run_without_it() -> None:
    found = statuses(PlainOnly(), variant_cases("attention/sinks/*"), ("accuracy",))
    assert set(found) == {("accuracy", "skip")}
    case = read_golden(variant_cases("attention/sinks/*")[0]).case
    assert "does not support the attention variant(s) sinks" in (skip_reason(PlainOnly(), case.op, case) or "")


# --- the committed variant goldens against 50 digits --------------------------------------------------

CROSSCHECKED = [
    "attention/window/hq2-hkv1-d64-b1-sq9-skv33-fp32-causal-win8.inf",
    "attention/softcap/hq2-hkv1-d64-b1-sq17-skv17-bf16-causal-largelogits-softcap5p0",
    "attention/sinks/hq4-hkv2-d64-b2-sq9-skv5-bf16-causal-sinks",
    "attention/variants-combined/hq4-hkv2-d64-b2-sq17-skv17-fp32-causal-rightpad-win5.inf-softcap20p0-sinks",
    "kv_cache_attention/variants/hq4-hkv1-d64-b2-past17-new8-fp32-causal-win6.inf-softcap30p0-sinks",
]
GRAD_CROSSCHECKED = [
    "attention/grad-variants/hq4-hkv2-d64-b2-sq9-skv17-bf16-causal-rightpad-win3.inf-softcap5p0-sinks-grad",
    "attention/grad-variants/hq2-hkv1-d64-b1-sq9-skv17-bf16-causal-softcap1p0-grad",
    "kv_cache_attention/grad-variants/hq4-hkv2-d64-b1-past9-new8-bf16-causal-softcap5p0-sinks-grad",
]


def nearest_to_a_rounding_boundary(x64: np.ndarray, n: int) -> list[tuple[int, ...]]:
    lo, hi = rounding_interval(x64.astype(np.float32))
    distance = np.minimum(x64 - lo, hi - x64) / np.maximum(np.abs(x64), 1e-300)
    flat = np.argsort(distance, axis=None, kind="stable")[:n]
    return [tuple(int(i) for i in idx) for idx in zip(*np.unravel_index(flat, x64.shape))]


def float64_call(gc, *tensors):
    c = gc.case
    return PlantedVariants().attend64(*tensors, causal=c.causal, scale=c.scale,
                                      key_padding_mask=gc.inputs.key_padding_mask, window_size=c.window,
                                      softcap=c.softcap, sinks=gc.inputs.sinks)


@pytest.mark.parametrize("case_id", CROSSCHECKED)
def test_committed_variant_outputs_equal_the_mpmath_recomputation(case_id: str) -> None:
    gc = read_golden(case_path(SMOKE, case_id))
    out64, _ = float64_call(gc, gc.inputs.q, gc.inputs.k, gc.inputs.v)
    elements = sample_elements(gc.golden.out.shape, 10, seed=gc.case.seed) + nearest_to_a_rounding_boundary(
        out64.numpy(), 4)
    assert crosscheck(gc.case, gc.inputs, gc.golden.out, elements) == []


@pytest.mark.parametrize("case_id", GRAD_CROSSCHECKED)
def test_committed_variant_gradients_equal_the_mpmath_recomputation(case_id: str) -> None:
    gc = read_golden(case_path(SMOKE, case_id))
    assert gc.gradient is not None and gc.inputs.grad_out is not None
    leaves = [t.double().requires_grad_(True) for t in (gc.inputs.q, gc.inputs.k, gc.inputs.v)]
    out64, _ = float64_call(gc, *leaves)
    grads = torch.autograd.grad(out64, leaves, gc.inputs.grad_out.double())
    ref = {w: g.detach().numpy() for w, g in zip(("dq", "dk", "dv"), grads)}
    elements = {w: sample_elements(ref[w].shape, 6, seed=gc.case.seed) + nearest_to_a_rounding_boundary(ref[w], 4)
                for w in ref}
    assert crosscheck_gradients(gc.case, gc.inputs, gc.inputs.grad_out, gc.gradient, elements) == []
