"""The run: planted-defect backends are caught by the check meant for them; correct ones pass."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import expected_variant_skip, run_backend
from planted_backends import (
    BatchDependent,
    Correct,
    DeclinesFloat32,
    ImpreciseFp32Softmax,
    MutatesInput,
    NanOnMaskedRows,
    Nondeterministic,
    Raises,
    RowCountDependent,
    SkvDependent,
    SplitDependentMerge,
    TopLeftCausal,
    WrongDtype,
    WrongGqaMapping,
)

from conformance.golden.manifest import select_cases
from conformance.judge.records import Record
from conformance.run.settings import RunSettings
from conformance.spec.case import LAYOUT_OPS
from conformance.spec.checks import GRADIENT_CHECKS
from conformance.spec.tolerances import load_tolerances

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "goldens" / "smoke"
TOLERANCES = load_tolerances(ROOT / "specs" / "tolerances.yaml")


def run_on(backend, pattern: str, checks: tuple[str, ...] | None = None, **kw) -> list[Record]:
    settings = RunSettings(tolerances=TOLERANCES, reruns=3, **({"checks": checks} if checks else {}), **kw)
    return run_backend(backend, select_cases(SMOKE, pattern), settings).records


def failing(records: list[Record]) -> Counter[str]:
    return Counter(r.check for r in records if r.status in ("fail", "error"))


@pytest.fixture(scope="module")
def correct_records() -> list[Record]:
    return run_on(Correct(), "*")


def test_correct_backend_passes_every_check_on_every_smoke_case(correct_records):
    bad = [(r.case_id, r.check, r.message) for r in correct_records
           if r.status != "pass" and not expected_variant_skip(r) and r.op not in LAYOUT_OPS]
    assert bad == []


def test_a_backend_with_only_the_dense_ops_is_skipped_on_the_layouts_with_the_reason(correct_records):
    layouts = [r for r in correct_records if r.op in LAYOUT_OPS]
    assert layouts and {r.status for r in layouts} == {"skip"}
    assert all("does not implement" in r.message and r.op in r.message for r in layouts)


def test_correct_backend_produces_every_check_kind(correct_records):
    assert {r.check for r in correct_records if r.op not in LAYOUT_OPS} == {
        "accuracy", "batch", "split", "prefill_decode", "chunk", "padding", "determinism", "contract", *GRADIENT_CHECKS}


def test_top_left_causal_alignment_fails_accuracy_on_decode():
    records = run_on(TopLeftCausal(), "attention/decode/*", ("accuracy",))
    assert failing(records)["accuracy"] > 0
    assert all(r.status == "pass" for r in records if "skv1-" in r.case_id)  # Sq == Skv: no difference


def test_wrong_gqa_head_mapping_fails_accuracy_only_on_grouped_cases():
    records = run_on(WrongGqaMapping(), "attention/gqa/*", ("accuracy",))
    by_case = {r.case_id: r.status for r in records}
    assert by_case["attention/gqa/hq14-hkv2-d64-b1-sq17-skv17-bf16-causal"] == "fail"
    assert by_case["attention/gqa/hq8-hkv8-d64-b1-sq1-skv17-bf16-causal"] == "pass"  # MHA: same mapping
    assert by_case["attention/gqa/hq8-hkv1-d64-b1-sq17-skv17-bf16-causal"] == "pass"  # MQA: same mapping


def test_batch_dependent_reduction_fails_batch_invariance():
    records = run_on(BatchDependent(), "attention/padding/*", ("batch",))
    fails = [r for r in records if r.status == "fail"]
    assert fails and all(r.check == "batch" for r in fails)
    assert {"first_mismatch", "max_ulp_diff", "mismatched_elements"} <= fails[0].metrics.keys()


def test_split_dependent_merge_fails_split_invariance():
    records = run_on(SplitDependentMerge(), "kv_cache_attention/chunked-prefill/*", ("split",))
    assert failing(records)["split"] > 0


def test_key_length_dependent_result_fails_padding_invariance():
    records = run_on(SkvDependent(), "attention/dtypes/*", ("padding", "accuracy"))
    assert failing(records)["padding"] > 0
    assert failing(records)["accuracy"] == 0


def test_row_count_dependent_result_fails_chunk_and_prefill_decode():
    records = run_on(RowCountDependent(), "attention/head-dims/*", ("chunk", "prefill_decode"))
    assert failing(records)["chunk"] > 0
    assert failing(records)["prefill_decode"] > 0


def test_nondeterministic_backend_fails_determinism():
    records = run_on(Nondeterministic(), "attention/scale/*", ("determinism",))
    assert failing(records)["determinism"] > 0


def test_input_mutation_fails_contract():
    records = run_on(MutatesInput(), "attention/scale/*", ("contract",))
    assert all(r.status == "fail" for r in records)
    assert "modified its input 'q'" in records[0].message


def test_nan_on_fully_masked_rows_fails_contract_and_accuracy():
    records = run_on(NanOnMaskedRows(), "attention/padding/*allmasked*", ("contract", "accuracy"))
    assert failing(records)["contract"] > 0
    assert failing(records)["accuracy"] > 0
    assert any("NaN" in r.message for r in records if r.check == "accuracy")


def test_wrong_output_dtype_fails_contract_and_stops_the_case():
    records = run_on(WrongDtype(), "attention/scale/*", ("accuracy", "contract"))
    contract = [r for r in records if r.check == "contract"]
    assert contract and all(r.status == "fail" and "dtype" in r.message for r in contract)


def test_raising_backend_gives_error_records_not_failures_of_other_cases():
    records = run_on(Raises(), "attention/decode/*", ("accuracy", "contract"))
    errors = [r for r in records if r.status == "error"]
    assert errors and all("decode path not built" in r.message for r in errors)


def test_declined_cases_are_reported_skipped_with_the_reason():
    records = run_on(DeclinesFloat32(), "attention/dtypes/*", ("accuracy",))
    skipped = [r for r in records if r.status == "skip"]
    assert {r.dtype for r in skipped} == {"float32"}
    assert all(r.message == "no fp32 kernel" for r in skipped)
    assert all(r.status == "pass" for r in records if r.dtype != "float32")


def test_bf16_precision_inside_an_fp32_kernel_fails_fp32_accuracy():
    records = run_on(ImpreciseFp32Softmax(), "attention/dtypes/*", ("accuracy",))
    status = {r.dtype: r.status for r in records if r.dtype in ("float32", "bfloat16")}
    assert status == {"float32": "fail", "bfloat16": "pass"}


def test_parity_between_equal_backends_passes_and_against_a_defect_fails():
    assert all(r.status == "pass" for r in run_backend(Correct(), select_cases(SMOKE, "attention/gqa/*"), RunSettings(
        tolerances=TOLERANCES, checks=("parity",)), compare_to=Correct()).records)
    bad = run_backend(Correct(), select_cases(SMOKE, "attention/gqa/*"), RunSettings(tolerances=TOLERANCES,
              checks=("parity",)), compare_to=WrongGqaMapping()).records
    assert any(r.status == "fail" for r in bad)


def test_shards_partition_the_cases():
    every = select_cases(SMOKE)
    shards = [select_cases(SMOKE, shard=(i, 3)) for i in range(3)]
    assert sorted(p for s in shards for p in s) == sorted(every)
    assert all(s for s in shards)


def test_an_interrupt_raised_where_python_cannot_propagate_it_is_delivered_again(capfd: pytest.CaptureFixture) -> None:
    """A KeyboardInterrupt raised inside a weakref callback would be printed as an ignored traceback
    and lost; under stop_on_signals the signal comes again and stops the run where it can."""
    import time
    import weakref

    from conformance.processes import stop_on_signals

    class Thing:
        pass

    def callback(_: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), stop_on_signals():
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing  # the callback raises where the exception cannot propagate
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.01)
    assert ref() is None
    assert "Traceback" not in capfd.readouterr().err
