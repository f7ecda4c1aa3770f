"""Property search: strategies built from the specs, properties that hold for correct backends, and
planted defects hidden outside the smoke goldens that the search finds and shrinks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import SMOKE_GOLDENS, expected_variant_skip, run_backend
from hypothesis import given, settings
from hypothesis import strategies as st
from property_planted import (
    PLANTED,
    GroupOfSevenCrossHead,
    NanLeaksFromPadding,
    PropertyCorrect,
    SplitKvOnLargeBatch,
    TileTailOffByOne,
)

from conformance.cli.search import PROPERTY_HELP
from conformance.golden.format import read_golden
from conformance.golden.manifest import select_cases
from conformance.golden.reproducer import read_reproducer
from conformance.judge.records import Record
from conformance.run.invoker import Invoker
from conformance.run.settings import RunSettings
from conformance.search.catalog import PROPERTIES, PROPERTY_NAMES, parse_properties
from conformance.search.engine import PROFILES, PropertyResult, SearchSettings, check_backend
from conformance.search.properties import (
    Example,
    PropertyContext,
    Subject,
    insert_masked_keys,
    own_call,
    padding_limit,
    rows_call,
)
from conformance.search.replay import replay
from conformance.search.strategies import Needs, SpecSpace, draw_case, make_case, space_from_specs
from conformance.spec.case import DTYPES, LAYOUT_OPS, MASKS, Case
from conformance.spec.checks import CHECKS, GRADIENT_CHECKS, LAYOUT_INVARIANCE_CHECKS
from conformance.spec.inputs import make_inputs
from conformance.spec.load import OpSpec
from conformance.spec.tolerances import load_tolerances

REPO = Path(__file__).resolve().parents[1]
TOLERANCES = load_tolerances(REPO / "specs" / "tolerances.yaml")
CI = PROFILES["ci"]


@pytest.fixture(scope="module")
def ci_space(repo_specs: list[OpSpec]) -> SpecSpace:
    return space_from_specs(repo_specs, CI.tier, CI.limits)


def search(backend: object, specs: list[OpSpec], names: tuple[str, ...], out: Path | None,
           max_examples: int | None = None, seed: int | None = None) -> list[PropertyResult]:
    settings = SearchSettings(profile=CI, max_examples=max_examples, seed=seed, reproducer_dir=out)
    return check_backend(backend, specs, TOLERANCES, names, settings)


# --- strategies --------------------------------------------------------------------------------------


def test_the_space_is_every_value_the_specs_use_capped_by_the_profile(ci_space: SpecSpace) -> None:
    assert ci_space.dtypes == DTYPES
    assert ci_space.masks == MASKS
    assert ci_space.head_dims == (64, 80, 96, 128, 256)
    assert 7 in ci_space.groups and max(ci_space.groups) <= CI.limits.max_heads
    assert ci_space.skv == (1, CI.limits.max_skv)
    assert ci_space.batch == (1, CI.limits.max_batch)
    assert ci_space.scales[0] is None and 0.0 in ci_space.scales
    assert {63, 65, 127, 129} <= set(ci_space.skv_hints)  # lengths the specs name on purpose


def test_a_filter_keeps_the_space_to_the_matching_cases(repo_specs: list[OpSpec]) -> None:
    space = space_from_specs(repo_specs, CI.tier, CI.limits, "*-d64-*-bf16-*")
    assert space.dtypes == ("bfloat16",) and space.head_dims == (64,)
    with pytest.raises(ValueError, match="matches 'nothing-\\*'"):
        space_from_specs(repo_specs, CI.tier, CI.limits, "nothing-*")


class RecordingCorrect(PropertyCorrect):
    """Correct; remembers the dtype and head dim of every call."""

    def __init__(self) -> None:
        self.seen: set[tuple[torch.dtype, int]] = set()

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        self.seen.add((q.dtype, q.shape[-1]))
        return super().attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)


def test_a_filtered_search_draws_only_the_matching_dtypes_and_head_dims(repo_specs: list[OpSpec]) -> None:
    backend = RecordingCorrect()
    settings = SearchSettings(profile=CI, max_examples=12, case_filter="*-d128-*-fp16-*")
    [result] = check_backend(backend, repo_specs, TOLERANCES, ("accuracy",), settings)
    assert result.status == "pass"
    assert backend.seen == {(torch.float16, 128)}


def test_check_with_a_filter_matching_no_case_is_a_one_line_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from conformance.cli.app import app

    result = CliRunner().invoke(app, ["check", "--backend", "reference", "--filter", "nothing-*",
                                      "--reproducers", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--filter nothing-*" in lines[0] and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


@dataclass(frozen=True)
class NeedsCase:
    needs: Needs
    holds: Callable[[Case], bool]


NEEDS = [
    NeedsCase(Needs(), lambda c: True),
    NeedsCase(Needs(min_batch=2), lambda c: c.batch >= 2),
    NeedsCase(Needs(ops=("kv_cache_attention",), min_sq=2), lambda c: c.op == "kv_cache_attention" and c.sq >= 2),
    NeedsCase(Needs(min_sq=2, sq_le_skv=True), lambda c: 2 <= c.sq <= c.skv),
    NeedsCase(Needs(min_hkv=2), lambda c: c.hkv >= 2),
    NeedsCase(Needs(masks=("right_pad", "holes")), lambda c: c.mask in ("right_pad", "holes")),
]


@settings(max_examples=60, database=None, derandomize=True, deadline=None)
@given(data=st.data())
def test_drawn_cases_keep_the_contract_the_profile_and_the_property_needs(data: st.DataObject,
                                                                          repo_specs: list[OpSpec]) -> None:
    space = space_from_specs(repo_specs, CI.tier, CI.limits)
    need = data.draw(st.sampled_from(NEEDS), label="needs")
    case = draw_case(data, space, "test", need.needs)
    lim = CI.limits
    assert case.hq % case.hkv == 0 and case.hq <= lim.max_heads
    assert case.batch <= lim.max_batch and case.skv <= lim.max_skv
    assert case.batch * case.hq * case.sq * case.d <= lim.max_out_elements
    assert case.batch * case.hq * case.sq * case.skv <= lim.max_score_elements
    if case.op == "kv_cache_attention":
        assert case.s_past is not None and case.sq == case.skv - case.s_past and case.split_points == (case.s_past,)
    assert case.family == "property/test" and case.id.endswith(f"-seed{case.seed}")
    assert need.holds(case)


def test_a_drawn_case_is_a_golden_case_readable_back(tmp_path: Path) -> None:
    from conformance.golden.format import Provenance, write_golden
    from conformance.reference.compute import compute_reference

    case = make_case("batch", op="kv_cache_attention", batch=2, hq=4, hkv=2, d=64, sq=3, skv=20, dtype="bfloat16",
                     causal=True, scale=0.5, mask="holes", dist="near_ties", seed=2**63 - 5, s_past=17)
    inputs = make_inputs(case)
    path = tmp_path / f"{case.id}.h5"
    write_golden(path, case, inputs, compute_reference(case, inputs), Provenance("kv_cache_attention.yaml", "0", 1))
    assert read_golden(path).case == case


def test_every_property_is_a_check_of_the_report() -> None:
    assert set(PROPERTY_NAMES) <= set(CHECKS)
    assert ", ".join(PROPERTY_NAMES) + " (default: all)" == PROPERTY_HELP  # check --help lists each once
    assert CHECKS[:11] == ("accuracy", "batch", "split", "prefill_decode", "chunk", "padding",
                           "determinism", "contract", "parity", "gqa", "nan_padding")  # appended, never reordered
    assert CHECKS[11:11 + len(GRADIENT_CHECKS)] == GRADIENT_CHECKS
    assert CHECKS[11 + len(GRADIENT_CHECKS):] == LAYOUT_INVARIANCE_CHECKS == ("pack", "page")


def test_properties_are_chosen_by_name() -> None:
    assert parse_properties(None) == PROPERTY_NAMES == parse_properties("all")
    assert parse_properties("gqa, batch,gqa") == ("gqa", "batch")
    with pytest.raises(ValueError, match="unknown property nosuch; choose from accuracy"):
        parse_properties("batch,nosuch")


# --- the transformations -------------------------------------------------------------------------------


def small_case(op: str = "attention", causal: bool = True, sq: int = 3, skv: int = 7, mask: str = "none") -> Case:
    return make_case("t", op=op, batch=2, hq=4, hkv=2, d=64, sq=sq, skv=skv, dtype="float32", causal=causal,
                     scale=None, mask=mask, dist="normal", seed=3, s_past=skv - sq if op != "attention" else None)


@pytest.mark.parametrize("op", ["attention", "kv_cache_attention"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_a_block_of_rows_alone_sees_exactly_the_keys_it_saw(op: str, causal: bool) -> None:
    case = small_case(causal=causal, sq=5, skv=9, mask="holes")
    subject = Subject(case, make_inputs(case))
    backend = PropertyCorrect()
    full = backend.attention(*(subject.inputs.q, subject.inputs.k, subject.inputs.v), causal=causal, scale=None,
                             key_padding_mask=subject.inputs.key_padding_mask)
    for r0, r1 in [(0, 1), (1, 4), (4, 5), (0, 5)]:
        call = rows_call(own_call(subject), r0, r1, op)
        k, v = call.k, call.v
        if op == "kv_cache_attention":
            part = backend.kv_cache_attention(call.q, k[:, :, :call.s_past], v[:, :, :call.s_past],
                                              k[:, :, call.s_past:], v[:, :, call.s_past:], causal=causal, scale=None,
                                              key_padding_mask=call.key_padding_mask)
        else:
            part = backend.attention(call.q, k, v, causal=causal, scale=None, key_padding_mask=call.key_padding_mask)
        assert torch.equal(part, full[:, :, r0:r1])


def test_masked_keys_go_only_where_no_window_changes() -> None:
    assert padding_limit(small_case(causal=False)) == 7  # anywhere, appended included
    assert padding_limit(small_case(causal=True, sq=3, skv=7)) == 5  # keys 0..4 are seen by every row
    assert padding_limit(small_case(causal=True, sq=9, skv=7)) == 0  # only prepended
    assert padding_limit(small_case(op="kv_cache_attention", causal=False)) == 4  # inside the cache


def test_inserted_masked_keys_leave_every_real_key_in_order() -> None:
    case = small_case(skv=5)
    call = own_call(Subject(case, make_inputs(case)))
    extra = torch.full((2, 2, 3, 64), 7.0)
    padded = insert_masked_keys(call, [[4, 1], [1, 2]], extra, extra)
    real = padded.key_padding_mask[0]
    assert real.tolist() == [True, False, False, True, True, True, False, True]
    assert torch.equal(padded.k[:, :, real], call.k)


# --- correct backends pass, planted defects are found -------------------------------------------------


def test_a_correct_backend_passes_every_property_with_the_ci_profile(repo_specs: list[OpSpec],
                                                                     tmp_path: Path) -> None:
    results = search(PropertyCorrect(), repo_specs, PROPERTY_NAMES, tmp_path, max_examples=15)
    forward = [res for res in results if res.name not in (*GRADIENT_CHECKS, *LAYOUT_INVARIANCE_CHECKS)]
    bad = [(r.check, r.message) for res in forward for r in res.records if r.status != "pass"]
    assert bad == []
    assert [res.name for res in results if res.records] == list(PROPERTY_NAMES)
    declined = [r for res in results if res.name in GRADIENT_CHECKS for r in res.records]
    assert declined and all(r.status == "skip" and "forward-only" in r.message for r in declined)
    no_layouts = [r for res in results if res.name in LAYOUT_INVARIANCE_CHECKS for r in res.records]
    assert no_layouts and all(r.status == "skip" and "property-correct lacks" in r.message for r in no_layouts)
    assert not any(tmp_path.iterdir())  # no reproducer without a failure


def test_a_property_needing_the_kv_op_is_skipped_with_the_reason(repo_specs: list[OpSpec]) -> None:
    class AttentionOnly:
        name = "attention-only"
        device = "cpu"
        attention = PropertyCorrect.attention

    (result,) = search(AttentionOnly(), repo_specs, ("split",), None)
    assert [(r.status, r.message) for r in result.records] == [
        ("skip", "needs kv_cache_attention, which backend attention-only lacks")]


@pytest.mark.parametrize("planted", PLANTED, ids=lambda cls: cls.name)
def test_planted_defects_pass_every_check_of_the_smoke_golden_run(planted: type) -> None:
    records = run_backend(planted(), select_cases(SMOKE_GOLDENS), RunSettings(tolerances=TOLERANCES, reruns=2)).records
    assert [(r.case_id, r.check) for r in records if r.status != "pass" and r.check not in GRADIENT_CHECKS
            and not expected_variant_skip(r) and r.op not in LAYOUT_OPS] == []  # layouts: dense-only backends
    assert {r.status for r in records if r.check in GRADIENT_CHECKS} == {"skip"}  # forward-only backends


def test_the_gqa_defect_is_live_in_smoke_cases_that_run_cannot_see_it_in() -> None:
    gc = read_golden(SMOKE_GOLDENS / "attention/gqa/hq14-hkv2-d64-b1-sq17-skv17-bf16-causal.h5")
    x = gc.inputs
    args = (x.q, x.k, x.v)
    kw = {"causal": True, "scale": None, "key_padding_mask": None}
    assert not torch.equal(GroupOfSevenCrossHead().attention(*args, **kw), PropertyCorrect().attention(*args, **kw))


@dataclass(frozen=True)
class Planted:
    backend: type
    prop: str
    smallest: Callable[[Case], bool]  # what the shrunk case must look like


PLANTED_FINDS = [
    Planted(TileTailOffByOne, "accuracy", lambda c: c.skv == 137 and c.batch == 1 and c.hq == 1),
    Planted(TileTailOffByOne, "padding", lambda c: c.skv <= 137 and c.batch == 1 and c.hq == 1),
    Planted(GroupOfSevenCrossHead, "gqa", lambda c: (c.hq, c.hkv, c.batch, c.sq, c.skv) == (14, 2, 1, 1, 1)),
    Planted(SplitKvOnLargeBatch, "batch", lambda c: (c.batch, c.hq, c.sq, c.skv) == (3, 8, 1, 1)),
    Planted(NanLeaksFromPadding, "nan_padding", lambda c: c.mask != "none" and c.batch == 1 and c.skv <= 2),
]


@pytest.mark.parametrize("planted", PLANTED_FINDS, ids=lambda p: f"{p.backend.name}-{p.prop}")
def test_a_planted_defect_is_found_shrunk_and_its_reproducer_replays(planted: Planted, repo_specs: list[OpSpec],
                                                                     tmp_path: Path) -> None:
    (result,) = search(planted.backend(), repo_specs, (planted.prop,), tmp_path, max_examples=200)
    assert result.counterexample is not None, result.records
    (record,) = result.records
    case = result.counterexample.example.case
    assert (record.check, record.status, record.case_id) == (planted.prop, "fail", case.id)
    assert planted.smallest(case), record.message
    assert record.metrics["reproducer"] == str(result.reproducer) and result.reproducer.is_file()
    rep = read_reproducer(result.reproducer)
    assert (rep.case, rep.info.property, rep.info.backend) == (case, planted.prop, planted.backend.name)
    assert replay(result.reproducer, planted.backend(), TOLERANCES).still_fails
    assert replay(result.reproducer, PropertyCorrect(), TOLERANCES).record.status == "pass"


def test_the_ci_search_is_derandomized(repo_specs: list[OpSpec]) -> None:
    first, second = (search(NanLeaksFromPadding(), repo_specs, ("nan_padding",), None)[0] for _ in range(2))
    assert first.counterexample is not None and second.counterexample is not None
    assert first.counterexample.example == second.counterexample.example


def test_a_failure_record_names_the_smallest_case_and_its_parameters(repo_specs: list[OpSpec]) -> None:
    (result,) = search(NanLeaksFromPadding(), repo_specs, ("nan_padding",), None)
    record: Record = result.records[0]
    assert "smallest failing case: " in record.message and "poison" in record.message
    assert record.metrics["parameters"] == result.counterexample.example.params
    assert record.family == "property/nan_padding" and "reproducer" not in record.metrics


def test_accuracy_is_judged_against_the_exact_reference_of_the_drawn_case() -> None:
    case = make_case("accuracy", op="attention", batch=1, hq=2, hkv=1, d=64, sq=2, skv=140, dtype="float32",
                     causal=False, scale=None, mask="none", dist="normal", seed=1)
    subject = Subject(case, make_inputs(case))
    for backend, status in ((TileTailOffByOne(), "fail"), (PropertyCorrect(), "pass")):
        ctx = PropertyContext(Invoker(backend), TOLERANCES)
        outcome = PROPERTIES["accuracy"].check(ctx, Example("accuracy", case, {}), subject)
        assert outcome.verdict.status == status, outcome.verdict.message
    assert subject.golden is not None  # computed once, shared by both judgments


# --- the time budget -----------------------------------------------------------------------------------


def budgeted(backend: object, specs: list[OpSpec], prop: str, budget: float, max_examples: int = 100_000,
             out: Path | None = None) -> PropertyResult:
    settings = SearchSettings(profile=CI, max_examples=max_examples, reproducer_dir=out, time_budget=budget)
    (result,) = check_backend(backend, specs, TOLERANCES, (prop,), settings)
    return result


def test_a_time_budget_stops_the_search_and_every_record_says_how_many_examples_ran(
        repo_specs: list[OpSpec]) -> None:
    result = budgeted(PropertyCorrect(), repo_specs, "gqa", budget=1.0)
    assert result.stopped_by == "time-budget"
    assert 0 < result.examples_run < 100_000
    assert result.elapsed_s < 30  # the budget, plus the one example in flight (generous: a shared 2-core machine)
    assert result.records and {r.status for r in result.records} == {"pass"}
    for r in result.records:
        assert (r.metrics["examples_run"], r.metrics["stopped_by"]) == (result.examples_run, "time-budget")
        assert r.metrics["time_budget_s"] == 1.0
        assert f"stopped by its 1 s time budget after {result.examples_run} examples" in r.message
    assert sum(r.metrics["examples_of_cell"] for r in result.records) == result.examples_run
    assert result.summary()["stopped_by"] == "time-budget" and result.summary()["status"] == "pass"


def test_a_budget_that_is_not_reached_leaves_the_search_to_max_examples(repo_specs: list[OpSpec]) -> None:
    result = budgeted(PropertyCorrect(), repo_specs, "gqa", budget=600.0, max_examples=4)
    assert (result.stopped_by, result.examples_run) == ("max-examples", 4)
    assert {(r.status, r.metrics["stopped_by"], r.metrics["examples_run"]) for r in result.records} == {
        ("pass", "max-examples", 4)}
    plain = search(PropertyCorrect(), repo_specs, ("gqa",), None, max_examples=4)[0]
    assert (plain.stopped_by, plain.examples_run) == ("max-examples", 4)  # no budget: the same examples


def test_a_property_that_ran_no_example_within_its_budget_is_not_passed(repo_specs: list[OpSpec]) -> None:
    result = budgeted(PropertyCorrect(), repo_specs, "batch", budget=0.0)
    assert (result.status, result.examples_run, result.stopped_by) == ("skip", 0, "time-budget")
    (record,) = result.records
    assert record.status == "skip" and record.status != "pass"
    assert record.message == "time budget of 0 s spent before any example ran"
    assert (record.metrics["examples_run"], record.metrics["stopped_by"]) == (0, "time-budget")


def test_a_counterexample_found_within_the_budget_is_shrunk_as_without_one(repo_specs: list[OpSpec]) -> None:
    free = search(NanLeaksFromPadding(), repo_specs, ("nan_padding",), None)[0]
    result = budgeted(NanLeaksFromPadding(), repo_specs, "nan_padding", budget=300.0, max_examples=CI.max_examples)
    assert result.counterexample is not None and free.counterexample is not None
    assert result.counterexample.example == free.counterexample.example  # the same smallest case
    assert (result.stopped_by, result.shrink_stopped_by) == ("counterexample", "hypothesis")
    (record,) = result.records
    assert (record.status, record.metrics["stopped_by"], record.metrics["shrink_stopped_by"]) == (
        "fail", "counterexample", "hypothesis")
    assert record.metrics["examples_run"] == result.examples_run >= 1
    assert record.metrics["shrink_examples"] == result.shrink_examples > 0


class SlowNanLeak(NanLeaksFromPadding):
    """The NaN defect, 50 ms a call: shrinking cannot finish within twice a one-second budget."""

    name = "planted-slow-nan-padding"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        import time

        time.sleep(0.05)
        return super().attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)


def test_shrinking_stops_at_twice_the_budget_on_a_real_counterexample(repo_specs: list[OpSpec],
                                                                        tmp_path: Path) -> None:
    result = budgeted(SlowNanLeak(), repo_specs, "nan_padding", budget=1.0, out=tmp_path)
    assert result.counterexample is not None, result.records
    assert (result.stopped_by, result.shrink_stopped_by) == ("counterexample", "time-budget")
    assert result.elapsed_s < 30  # twice the budget, then the rejected candidates and one replay
    (record,) = result.records
    assert record.status == "fail" and record.metrics["shrink_stopped_by"] == "time-budget"
    assert "smallest failing case found before the time budget stopped shrinking" in record.message
    assert replay(result.reproducer, NanLeaksFromPadding(), TOLERANCES).still_fails  # still a real failure


# --- the attention variants are drawn for a backend that declares them --------------------------------


def test_naive_fp32_passes_the_accuracy_search_with_variants_drawn(repo_specs: list[OpSpec], tmp_path: Path) -> None:
    from conformance.backends.registry import load_backend

    results = search(load_backend("naive-fp32"), repo_specs, ("accuracy",), tmp_path, max_examples=12)
    bad = [(r.check, r.message) for res in results for r in res.records if r.status != "pass"]
    assert bad == []


def test_a_planted_variant_defect_is_found_by_the_accuracy_search(repo_specs: list[OpSpec], tmp_path: Path) -> None:
    from planted_variants import PlantedVariants

    (result,) = search(PlantedVariants("softcap_after_mask"), repo_specs, ("accuracy",), tmp_path, max_examples=100)
    assert result.counterexample is not None, result.records
    case = result.counterexample.example.case
    assert case.softcap is not None and "softcap" in case.id and result.records[0].status == "fail"
    assert replay(result.reproducer, PlantedVariants(), TOLERANCES).record.status == "pass"
