"""The gradient judgments: each planted backward defect is caught by the check named for it, in a
golden run over the smoke goldens and in the property search; correct backwards pass both."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SMOKE_GOLDENS, expected_variant_skip, run_backend
from planted_gradients import (
    BatchDependentBackward,
    CausalIgnoredInBackward,
    DkWithoutScale,
    ForwardOnly,
    GqaReductionWrong,
    GradCorrect,
    MutatesGradOut,
    NanLeaksIntoDq,
    NanOnMaskedRowsBackward,
    NondeterministicDkAccumulation,
    PaddedKeysNonzeroDk,
    SplitDependentBackward,
)

from conformance.backends.registry import load_backend
from conformance.golden.manifest import select_cases
from conformance.golden.reproducer import read_reproducer
from conformance.judge.records import Record
from conformance.locations import default_tolerances
from conformance.run.settings import RunSettings
from conformance.search.engine import PROFILES, STOP_NO_BACKWARD, SearchSettings, check_backend
from conformance.search.replay import replay
from conformance.spec.case import Case
from conformance.spec.checks import GRADIENT_CHECKS
from conformance.spec.load import default_spec_paths, load_specs
from conformance.spec.tolerances import load_tolerances

TOLERANCES = load_tolerances(default_tolerances())
GRADIENT_PROPERTIES = ("gradient_accuracy", "gradient_batch", "gradient_split", "gradient_padding",
                       "gradient_determinism")


def run_on(backend: object, pattern: str, checks: tuple[str, ...] = GRADIENT_CHECKS) -> list[Record]:
    settings = RunSettings(tolerances=TOLERANCES, reruns=3, checks=checks)
    return run_backend(backend, select_cases(SMOKE_GOLDENS, pattern), settings).records


def statuses(records: list[Record], check: str) -> dict[str, str]:
    return {r.case_id: r.status for r in records if r.check == check}


def failing(records: list[Record]) -> Counter[str]:
    return Counter(r.check for r in records if r.status in ("fail", "error"))


@pytest.fixture(scope="module")
def specs():
    return load_specs(default_spec_paths())


def search(backend: object, specs, prop: str, out: Path | None, examples: int = 40):
    settings = SearchSettings(profile=PROFILES["ci"], max_examples=examples, reproducer_dir=out)
    (result,) = check_backend(backend, specs, TOLERANCES, (prop,), settings)
    return result


# --- correct backwards ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [GradCorrect(), load_backend("reference")], ids=lambda b: b.name)
def test_a_correct_backward_passes_every_gradient_check_on_every_smoke_case(backend: object) -> None:
    records = run_on(backend, "*grad*")
    assert {r.check for r in records} == set(GRADIENT_CHECKS)
    assert [(r.case_id, r.check, r.message) for r in records
            if r.status != "pass" and not expected_variant_skip(r)] == []


@pytest.mark.parametrize("name", ["naive-fp32", "sdpa-math", "naive"])
def test_autograd_backends_show_no_false_accuracy_or_contract_failure(name: str) -> None:
    records = run_on(load_backend(name), "*grad*", ("gradient_accuracy", "gradient_contract"))
    assert records and [(r.case_id, r.check, r.message) for r in records
                        if r.status != "pass" and not expected_variant_skip(r)] == []


def test_a_backend_without_a_backward_skips_every_gradient_check_with_the_reason(specs) -> None:
    records = run_on(ForwardOnly(), "attention/grad-dtypes/*")
    assert records and {r.status for r in records} == {"skip"}
    assert all("has no backward" in r.message for r in records)
    result = search(ForwardOnly(), specs, "gradient_batch", None)
    assert [r.status for r in result.records] == ["skip"] and result.stopped_by == STOP_NO_BACKWARD
    assert result.examples == 1  # the search ends at the first example


def test_a_declined_backward_is_skipped_not_passed() -> None:
    class DeclinesBackward(GradCorrect):
        name = "declines-backward"

        def supports(self, op, case):
            return "no backward kernel for this head dim" if op.endswith("_backward") and case.d == 256 else True

    records = run_on(DeclinesBackward(), "attention/grad-head-dims/*")
    assert statuses(records, "gradient_accuracy") == {
        "attention/grad-head-dims/hq2-hkv1-d128-b1-sq17-skv17-bf16-causal-grad": "pass",
        "attention/grad-head-dims/hq2-hkv1-d256-b1-sq17-skv17-bf16-causal-grad": "skip"}


# --- planted defects in a golden run --------------------------------------------------------------


def test_dk_without_the_scale_fails_gradient_accuracy_naming_dk() -> None:
    records = run_on(DkWithoutScale(), "attention/grad-dtypes/*", ("gradient_accuracy",))
    bad = [r for r in records if r.status == "fail"]
    assert len(bad) == len(records) and all(r.message.startswith("dk:") for r in bad)


def test_the_causal_mask_ignored_in_the_backward_fails_only_causal_cases() -> None:
    by_case = statuses(run_on(CausalIgnoredInBackward(), "attention/grad-dtypes/*", ("gradient_accuracy",)),
                       "gradient_accuracy")
    assert {s for c, s in by_case.items() if "-causal" in c and "-sq1-" not in c} == {"fail"}
    assert {s for c, s in by_case.items() if "noncausal" in c or "-sq1-" in c} == {"pass"}  # decode sees every key


def test_padded_keys_with_a_tiny_nonzero_dk_fail_gradient_padding_only() -> None:
    records = run_on(PaddedKeysNonzeroDk(), "attention/grad-masked/*")
    fails = failing(records)
    assert set(fails) == {"gradient_padding"}
    msg = next(r.message for r in records if r.check == "gradient_padding" and r.status == "fail")
    assert "dk of a masked key is 9.98402083170343e-31, not 0" in msg  # 1e-30 in bfloat16


def test_nan_from_a_padded_slot_leaking_into_dq_fails_gradient_padding_only() -> None:
    records = run_on(NanLeaksIntoDq(), "attention/grad-masked/*")
    assert set(failing(records)) == {"gradient_padding"}
    bad = [r for r in records if r.status == "fail"]
    assert all("NaN in the padded keys and values" in r.message and r.metrics["tensor"] == "dq" for r in bad)


def test_a_dk_accumulation_order_that_changes_per_call_fails_gradient_determinism() -> None:
    records = run_on(NondeterministicDkAccumulation(), "attention/grad-gqa/*", ("gradient_determinism",))
    by_case = statuses(records, "gradient_determinism")
    assert by_case["attention/grad-gqa/hq7-hkv1-d64-b1-sq9-skv17-fp32-causal-grad"] == "fail"
    assert by_case["attention/grad-gqa/hq8-hkv8-d64-b1-sq9-skv17-bf16-causal-grad"] == "pass"  # MHA: one part


def test_a_gqa_reduction_over_the_wrong_heads_fails_gradient_accuracy_on_grouped_cases_only() -> None:
    by_case = statuses(run_on(GqaReductionWrong(), "attention/grad-gqa/*", ("gradient_accuracy",)),
                       "gradient_accuracy")
    assert by_case["attention/grad-gqa/hq8-hkv2-d64-b1-sq9-skv17-bf16-causal-grad"] == "fail"
    assert by_case["attention/grad-gqa/hq8-hkv8-d64-b1-sq9-skv17-bf16-causal-grad"] == "pass"  # MHA
    assert by_case["attention/grad-gqa/hq8-hkv1-d64-b1-sq9-skv17-bf16-causal-grad"] == "pass"  # MQA: one KV head


def test_a_batch_dependent_backward_fails_gradient_batch_only() -> None:
    records = run_on(BatchDependentBackward(), "attention/grad-masked/*")
    assert set(failing(records)) == {"gradient_batch"}
    assert all(r.metrics["tensor"] == "dq" for r in records if r.status == "fail")


def test_nan_on_fully_masked_rows_fails_gradient_contract() -> None:
    records = run_on(NanOnMaskedRowsBackward(), "attention/grad-masked/*allmasked*")
    bad = [r for r in records if r.check == "gradient_contract"]
    assert bad and {r.status for r in bad} == {"fail"}
    assert all("dq has" in r.message and "NaN/Inf elements where the exact gradient is finite" in r.message
               for r in bad)


def test_a_split_dependent_kv_cache_backward_fails_gradient_split_on_odd_caches() -> None:
    by_case = statuses(run_on(SplitDependentBackward(), "kv_cache_attention/grad-*", ("gradient_split",)),
                       "gradient_split")
    assert by_case["kv_cache_attention/grad-decode/hq4-hkv1-d64-b2-past31-new1-bf16-causal-grad"] == "fail"
    assert by_case["kv_cache_attention/grad-chunked-prefill/hq4-hkv1-d64-b2-past9-new8-fp32-causal-grad"] == "fail"
    assert by_case["kv_cache_attention/grad-decode/hq4-hkv1-d64-b2-past0-new1-bf16-causal-grad"] == "pass"
    assert by_case["kv_cache_attention/grad-decode/hq4-hkv1-d64-b2-past0-new1-fp32-causal-grad"] == "pass"


def test_a_backward_that_writes_into_grad_out_fails_gradient_contract() -> None:
    records = run_on(MutatesGradOut(), "attention/grad-dtypes/*", ("gradient_contract",))
    assert {r.status for r in records} == {"fail"}
    assert all("modified its input 'grad_out'" in r.message for r in records)


# --- planted defects in the property search -------------------------------------------------------


@dataclass(frozen=True)
class Planted:
    backend: type
    prop: str
    check: str  # the record's check (a contract failure is named so)
    smallest: Callable[[Case, dict], bool]


PLANTED = [
    Planted(DkWithoutScale, "gradient_accuracy", "gradient_accuracy", lambda c, p: True),
    Planted(CausalIgnoredInBackward, "gradient_accuracy", "gradient_accuracy", lambda c, p: c.causal),
    Planted(GqaReductionWrong, "gradient_accuracy", "gradient_accuracy", lambda c, p: c.hkv > 1 and c.group > 1),
    Planted(NanOnMaskedRowsBackward, "gradient_accuracy", "gradient_contract", lambda c, p: True),
    Planted(PaddedKeysNonzeroDk, "gradient_padding", "gradient_padding", lambda c, p: True),
    Planted(NanLeaksIntoDq, "gradient_padding", "gradient_padding", lambda c, p: p["content"] == "nan"),
    Planted(BatchDependentBackward, "gradient_batch", "gradient_batch", lambda c, p: c.batch == 2),
    Planted(SplitDependentBackward, "gradient_split", "gradient_split", lambda c, p: True),
    Planted(NondeterministicDkAccumulation, "gradient_determinism", "gradient_determinism",
            lambda c, p: c.group > 1),
    Planted(MutatesGradOut, "gradient_determinism", "gradient_contract", lambda c, p: True),
]


@pytest.mark.parametrize("planted", PLANTED, ids=lambda p: p.backend.name)
def test_the_search_finds_each_planted_defect_and_its_reproducer_replays(planted: Planted, specs,
                                                                         tmp_path: Path) -> None:
    result = search(planted.backend(), specs, planted.prop, tmp_path)
    (record,) = result.records
    assert (record.check, record.status) == (planted.check, "fail"), record.message
    case = result.counterexample.example.case
    assert case.grad and planted.smallest(case, result.counterexample.example.params), case.id
    rep = read_reproducer(result.reproducer)
    assert rep.golden.gradient is not None and rep.golden.inputs.grad_out is not None
    again = replay(result.reproducer, planted.backend(), TOLERANCES)
    assert again.still_fails, again.record.message
    assert replay(result.reproducer, GradCorrect(), TOLERANCES).record.status == "pass"


@pytest.mark.parametrize("prop", GRADIENT_PROPERTIES)
def test_a_correct_backward_passes_every_gradient_property(prop: str, specs) -> None:
    result = search(GradCorrect(), specs, prop, None, examples=15)
    assert result.records and {r.status for r in result.records} == {"pass"}, [r.message for r in result.records]


def test_gradient_variants_pick_their_parts_of_gradients_on_another_device() -> None:
    # The variants are built on the backend's device and compared on host copies of the gradients:
    # their batch indices must index tensors on any device (a CUDA run once failed here). "meta" stands in
    # for a GPU: indexing a CPU tensor with a meta index raises as with a CUDA one.
    import torch

    from conformance.judge.gradient_transforms import gradient_batch_variants, gradient_padding_variants
    from conformance.judge.transforms import OpCall

    b, h, s, d = 3, 2, 5, 4
    call = OpCall("attention", torch.empty(b, h, s, d, device="meta"), torch.empty(b, h, s, d, device="meta"),
                  torch.empty(b, h, s, d, device="meta"), None, True, None)
    grads = tuple(torch.arange(b * h * s * d, dtype=torch.float32).reshape(b, h, s, d) + i for i in range(3))
    doubled = tuple(torch.cat([g, g.flip(0)]) for g in grads)
    variants = list(gradient_batch_variants(call, torch.empty(b, h, s, d, device="meta")))
    variants += list(gradient_padding_variants(call, torch.empty(b, h, s, d, device="meta")))
    assert len(variants) == b + 3
    for v in variants:
        got = doubled if v.call.q.shape[0] == 2 * b else grads
        for part in (*v.taken(got), *v.expected(grads)):
            assert part.device.type == "cpu"
    reversed_ = next(v for v in variants if "reversed" in v.label)
    assert all(torch.equal(t, e.flip(0)) for t, e in zip(reversed_.taken(grads), grads))
