"""What a first-time user reads: failure locations with named axes, NaN counted apart, ulp distances
that mean one step of the dtype, failure-pattern lines, the closing guidance of a failing run, contract
failures named as such by the property search, backends whose signature is wrong refused at load, and
one meaning per flag name."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import REPO, SMOKE_GOLDENS
from planted_backends import MutatesInput, WrongDtype
from typer.testing import CliRunner

from conformance.backends.registry import validate_backend
from conformance.cli.app import app
from conformance.errors import ConformanceError
from conformance.judge.invariance import bit_view, bitwise_mismatch, ulp_distance
from conformance.judge.records import Record
from conformance.report.console import failure_patterns, guidance
from conformance.search.engine import PROFILES, SearchSettings, check_backend
from conformance.spec.load import default_spec_paths, load_specs
from conformance.spec.tolerances import load_tolerances

TOLERANCES = load_tolerances(REPO / "specs" / "tolerances.yaml")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [5.96e-05, 1.0, -3.5e3, 1e-6])
def test_one_step_of_the_dtype_is_one_ulp_wherever_it_lies(dtype: torch.dtype, value: float) -> None:
    a = torch.tensor([value]).to(dtype)
    b = (bit_view(a) + 1).view(dtype)  # the neighbour one step further from zero
    assert ulp_distance(a.double().numpy(), b.double().numpy(), dtype)[0] == pytest.approx(1.0)


def test_a_sign_flip_of_the_smallest_subnormal_is_two_ulp() -> None:
    tiny = torch.tensor([float(np.finfo(np.float32).smallest_subnormal)], dtype=torch.float32)
    assert ulp_distance(tiny.double().numpy(), (-tiny).double().numpy(), torch.float32)[0] == 2.0


def test_nan_mismatches_are_counted_apart_and_axes_are_named() -> None:
    a = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    b = a.clone()
    b[0, 1, 2, 3] = float("nan")
    found = bitwise_mismatch(a, b)
    assert found is not None and found.count == 1 and found.nan == 1
    assert "all NaN against a number" in found.describe() and "(b, h, q, d) = (0, 1, 2, 3)" in found.describe()
    assert found.metrics()["first_mismatch_axes"] == ["b", "h", "q", "d"]
    b[0, 0, 0, 0] = torch.tensor(1.0, dtype=torch.bfloat16)
    found = bitwise_mismatch(a, b)
    assert found.count == 2 and found.nan == 1 and found.max_abs == 1.0 and "1 NaN against a number" in found.describe()


def _record(case_id: str, check: str, status: str) -> Record:
    return Record(case_id, case_id.split("/")[0], check, status, "bfloat16", case_id.split("/")[1])


def test_a_failure_pattern_names_the_parameter_that_separates_failing_cases() -> None:
    ids = [f"attention/dtypes/hq2-hkv2-d64-b1-sq65-skv65-bf16-{c}" for c in ("causal", "noncausal")]
    ids += [f"attention/chunked/hq4-hkv1-d64-b1-sq{s}-skv129-bf16-causal" for s in (2, 17)]
    records = [_record(i, "chunk", "fail" if "-causal" in i else "pass") for i in ids]
    assert failure_patterns(records) == ["all 3 failing chunk cases are causal; 0 of 1 non-causal fail"]
    assert failure_patterns([_record(ids[0], "chunk", "fail"), _record(ids[1], "chunk", "pass")]) == []


def test_a_failure_pattern_names_a_variant_the_failing_cases_share() -> None:
    # FlashInfer's paged prefill dropping the sinks (docs/results/2026-12-01-h200-flashinfer.md): the
    # failures span families, the sinks are what they share.
    failing = ["attention/sinks/hq4-hkv2-d64-b1-sq17-skv17-bf16-causal-sinks",
               "attention/variants-combined/hq8-hkv1-d64-b2-sq5-skv17-bf16-causal-win5.inf-softcap20p0-sinks",
               "kv_cache_attention/variants/hq4-hkv1-d64-b2-past17-new1-bf16-causal-sinks"]
    passing = ["attention/softcap/hq2-hkv1-d64-b1-sq17-skv17-bf16-causal-softcap1p0",
               "attention/window/hq2-hkv1-d64-b1-sq17-skv17-bf16-causal-win4.inf",
               "kv_cache_attention/variants/hq4-hkv1-d64-b2-past17-new4-bf16-causal-sinks"]
    records = [_record(i, "accuracy", "fail") for i in failing] + [_record(i, "accuracy", "pass") for i in passing]
    assert failure_patterns(records) == ["all 3 failing accuracy cases have attention sinks; 0 of 2 without sinks fail"]
    windowed = [_record(passing[1], "chunk", "fail"), _record(failing[1], "chunk", "fail"),
                _record(passing[0], "chunk", "pass")]
    assert failure_patterns(windowed) == [
        "all 2 failing chunk cases have a sliding window; 0 of 1 without a window fail"]


def test_guidance_names_the_kinds_of_failure_and_a_green_baseline() -> None:
    records = [_record("attention/dtypes/hq2-hkv2-d64-b1-sq65-skv65-bf16-causal", check, "fail")
               for check in ("chunk", "padding")]
    lines = guidance(records, "sdpa")
    assert lines[0].startswith("what failed: invariance 2 (chunk 1, padding 1)") and "not invariant" in lines[0]
    assert "rlk-conform run --backend reference" in lines[-1] and "--checks accuracy,contract" in lines[-1]
    assert guidance([_record("attention/x/y", "accuracy", "pass")], "sdpa") == []


def test_the_main_job_closes_with_guidance() -> None:
    result = CliRunner().invoke(app, ["run", "--backend", "sdpa-math", "--goldens", str(SMOKE_GOLDENS),
                                      "--filter", "attention/chunked/*"])
    assert result.exit_code == 1, result.output
    tail = result.stdout.rsplit("FAIL:", 1)[1]
    assert "what failed: invariance" in tail and "a run that passes: rlk-conform run --backend reference" in tail


@pytest.mark.parametrize("backend", [MutatesInput(), WrongDtype()], ids=["mutates-input", "wrong-dtype"])
def test_check_names_a_broken_contract_as_contract(backend: object, tmp_path) -> None:
    specs = load_specs(default_spec_paths())
    (result,) = check_backend(backend, specs, TOLERANCES, ("batch",), SearchSettings(
        profile=PROFILES["ci"], max_examples=5, reproducer_dir=tmp_path))
    (record,) = result.records
    assert record.check == "contract" and record.status == "fail", record
    assert record.metrics["property"] == "batch" and record.message.startswith("contract: ")


class _Shapes:
    name = "shapes"
    device = "cpu"


@pytest.mark.parametrize(("attention", "fragment"), [
    (lambda self, q, k, v, causal=True: q, "attention() has no parameter 'scale', 'key_padding_mask'"),
    (lambda self, q, k, *, causal, scale, key_padding_mask: q, "takes 2 positional argument(s) (q, k)"),
    (lambda self, q, k, v, *, causal, scale, key_padding_mask, window: q, "requires 'window'"),
])
def test_a_backend_with_the_wrong_signature_is_refused_at_load(attention: object, fragment: str) -> None:
    backend = type("Wrong", (_Shapes,), {"attention": attention})()
    with pytest.raises(ConformanceError, match=re.escape(fragment)):
        validate_backend(backend, "wrong")


def test_a_backend_taking_keywords_loosely_is_accepted() -> None:
    backend = type("Loose", (_Shapes,), {"attention": lambda self, *args, **kwargs: args[0]})()
    assert validate_backend(backend) is backend


def test_check_profile_is_the_search_profile_flag_and_the_old_spelling_says_so() -> None:
    result = CliRunner().invoke(app, ["check", "--backend", "reference", "--profile", "ci"])
    assert result.exit_code == 2
    assert "--search-profile ci" in result.stderr and "run's timing flag" in result.stderr


def test_the_markdown_summary_names_the_cpu_not_its_architecture(tmp_path) -> None:
    import platform

    from conformance.environment import cpu_name

    report = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["run", "--backend", "reference", "--goldens", str(SMOKE_GOLDENS), "--filter",
                                      "attention/gqa/hq8-*", "--checks", "accuracy", "--report-json", str(report)])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(app, ["report", str(report), "--summary-md", str(tmp_path / "s.md")]).exit_code == 0
    row = next(line for line in (tmp_path / "s.md").read_text().splitlines() if line.startswith("| reference |"))
    device = row.split("|")[2].strip()
    assert device == cpu_name() and device != platform.machine()
