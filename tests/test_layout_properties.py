"""The layout properties ``pack`` and ``page``: drawn compositions judged by the run's own layout checks,
planted layout defects found and shrunk to the smallest pack, correct layouts passing."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SPEC_DIR
from hypothesis import given, settings
from hypothesis import strategies as st
from planted_layouts import (
    LayoutCorrect,
    LayoutWindowCorrect,
    ReadsUnusedTail,
    SplitsFromPageSize,
    SplitsFromSequenceCount,
    TileFromPackMax,
    WindowedSplitsFromSequenceCount,
)
from property_planted import PropertyCorrect
from typer.testing import CliRunner

from conformance.cli.app import app
from conformance.errors import EXIT_FAILURE
from conformance.judge.records import Record
from conformance.search.engine import PROFILES, PropertyResult, SearchSettings, check_backend
from conformance.search.layout_strategies import (
    LENGTH_HINTS,
    block_table_order,
    compose_drawn,
    draw_model,
    draw_tokens,
    page_count_of,
)
from conformance.search.strategies import SpecSpace, space_from_specs
from conformance.spec.layouts import PackToken, parse_token
from conformance.spec.load import OpSpec
from conformance.spec.tolerances import load_tolerances

REPO = Path(__file__).resolve().parents[1]
TOLERANCES = load_tolerances(REPO / "specs" / "tolerances.yaml")
CI = PROFILES["ci"]


def search(backend: object, specs: list[OpSpec], names: tuple[str, ...], out: Path | None = None,
           max_examples: int | None = None) -> list[PropertyResult]:
    return check_backend(backend, specs, TOLERANCES, names,
                         SearchSettings(profile=CI, max_examples=max_examples, reproducer_dir=out))


def failure(result: PropertyResult) -> Record:
    assert result.status == "fail", [(r.status, r.message) for r in result.records]
    (record,) = result.records
    return record


def pack_of(record: Record) -> list[PackToken]:
    return [parse_token(t) for t in record.metrics["parameters"]["pack"].split("+")]


# --- drawing compositions ------------------------------------------------------------------------------


@settings(max_examples=40, database=None, derandomize=True, deadline=None)
@given(data=st.data())
def test_drawn_packs_stay_within_the_profile_and_compose_like_the_run(data: st.DataObject,
                                                                       repo_specs: list[OpSpec]) -> None:
    space: SpecSpace = space_from_specs(repo_specs, CI.tier, CI.limits)
    model = draw_model(data, space)
    tokens = draw_tokens(data, space, model)
    case = compose_drawn("pack", "varlen_attention", space.tier, model, tokens, seed=7)
    lim = CI.limits
    assert sum(t.count * model.hq * t.sq * model.d for t in tokens) <= lim.max_out_elements
    assert sum(t.count * model.hq * t.sq * t.skv for t in tokens) <= lim.max_score_elements
    assert all(1 <= t.sq <= t.skv <= lim.max_skv for t in tokens)
    assert case.batch == sum(t.count for t in tokens) and case.id.endswith(f"{case.pack_text}-seed7")
    assert len({(s.case_id, s.batch_index) for s in case.sequences}) == case.batch  # every sequence its own data


def test_lengths_are_drawn_beside_every_tile_edge() -> None:
    assert LENGTH_HINTS == (15, 16, 17, 63, 64, 65, 127, 128, 129)


@pytest.mark.parametrize("block_table", [{"kind": "reversed"}, {"kind": "rotated", "by": 3},
                                         {"kind": "shuffled", "seed": 5}], ids=lambda b: b["kind"])
def test_a_drawn_block_table_is_a_permutation_of_the_pool(block_table: dict) -> None:
    n = page_count_of([PackToken(2, 1, 17), PackToken(1, 5, 5)], page_size=5)
    assert n == 2 * 4 + 1 + 1
    order = block_table_order(block_table, n)
    assert sorted(order) == list(range(n)) and order != list(range(n))


# --- planted layout defects are found and shrunk ----------------------------------------------------------


def test_pack_finds_a_tile_size_chosen_from_the_longest_sequence(repo_specs: list[OpSpec], tmp_path: Path) -> None:
    (result,) = search(TileFromPackMax(), repo_specs, ("pack",), tmp_path)
    record = failure(result)
    tokens = pack_of(record)
    assert record.check == "pack" and "alone" in record.message
    # smallest: one sequence at the 64-key edge the defect switches on, and one short neighbour
    assert sum(t.count for t in tokens) == 2 and max(t.skv for t in tokens) == 64
    params = record.metrics["parameters"]
    assert f"'pack': '{params['pack']}'" in record.message and f"'seed': {params['seed']}" in record.message
    # the layout reproducer: its layout file, and the dense goldens it is composed of beside it
    assert result.reproducer is not None and result.reproducer.suffix == ".json"
    assert record.metrics["reproducer"] == str(result.reproducer)
    assert result.reproducer == tmp_path / "layout-tile-from-pack-max" / f"{record.case_id}.json"
    assert len(list(tmp_path.rglob("*.h5"))) == len(record.metrics["parameters"]["pack"].split("+"))


def test_pack_finds_a_split_count_chosen_from_the_number_of_sequences(repo_specs: list[OpSpec]) -> None:
    (result,) = search(SplitsFromSequenceCount(), repo_specs, ("pack",))
    record = failure(result)
    tokens = pack_of(record)
    assert record.check == "pack"
    assert sum(t.count for t in tokens) <= 3 and all(t.skv == 1 for t in tokens)


def test_page_finds_a_kernel_reading_the_unused_tail_of_the_last_page(repo_specs: list[OpSpec]) -> None:
    (result,) = search(ReadsUnusedTail(), repo_specs, ("page",))
    record = failure(result)
    (token,) = pack_of(record)
    params = record.metrics["parameters"]
    assert record.check == "page" and "unused page slots" in record.message
    assert token.count == 1 and token.skv % params["page_size"] != 0  # a last page with an unused tail
    assert params["block_table"] is not None and str(params["page_size"]) in record.message


def test_page_finds_a_split_chosen_from_the_page_size(repo_specs: list[OpSpec]) -> None:
    (result,) = search(SplitsFromPageSize(), repo_specs, ("page",))
    record = failure(result)
    assert record.check == "page" and "page size" in record.message
    assert sum(t.count for t in pack_of(record)) == 1  # shrunk to one sequence


def test_pack_draws_windows_for_a_backend_that_declares_them_and_finds_a_windowed_split(
        repo_specs: list[OpSpec]) -> None:
    (result,) = search(WindowedSplitsFromSequenceCount(), repo_specs, ("pack",))
    record = failure(result)
    params = record.metrics["parameters"]
    assert record.check == "pack" and params["window"][1] == 0 and "-win" in record.case_id
    assert f"'window': {params['window']}" in record.message
    assert sum(t.count for t in pack_of(record)) <= 3  # three in a call: the pack and its added neighbours
    # the same defect without a window declared is never drawn into one: the search holds
    plain = WindowedSplitsFromSequenceCount()
    plain.variants = ()
    assert all(r.status == "pass" for res in search(plain, repo_specs, ("pack",)) for r in res.records)


def test_windowed_layouts_drawn_for_a_correct_backend_pass(repo_specs: list[OpSpec]) -> None:
    for res in search(LayoutWindowCorrect(), repo_specs, ("pack", "page"), max_examples=8):
        assert all(r.status == "pass" for r in res.records), [r.message for r in res.records]


def test_check_on_the_command_line_reports_the_drawn_composition(tmp_path: Path) -> None:
    spec_args = ["--spec", str(SPEC_DIR / "attention.yaml"), "--spec", str(SPEC_DIR / "kv_cache_attention.yaml")]
    result = CliRunner().invoke(app, ["check", "--backend", "planted_layouts:ReadsUnusedTail", "--properties",
                                      "pack,page", "--reproducers", str(tmp_path), *spec_args])
    assert result.exit_code == EXIT_FAILURE, result.output
    assert "'pack': '1x" in result.output and "page_size" in result.output


# --- correct layouts pass; a backend without the op skips --------------------------------------------------


def test_a_correct_layout_backend_passes_pack_and_page_with_the_ci_profile(repo_specs: list[OpSpec]) -> None:
    results = search(LayoutCorrect(), repo_specs, ("pack", "page"), max_examples=8)
    assert [(res.name, res.status, res.stopped_by) for res in results] == [
        ("pack", "pass", "max-examples"), ("page", "pass", "max-examples")]
    assert {r.op for r in results[1].records} == {"paged_kv_attention"}


def test_a_backend_without_the_layout_ops_skips_both_with_the_reason(repo_specs: list[OpSpec]) -> None:
    results = search(PropertyCorrect(), repo_specs, ("pack", "page"))
    assert [(r.status, r.message) for res in results for r in res.records] == [
        ("skip", "needs one of varlen_attention or paged_kv_attention, which backend property-correct lacks"),
        ("skip", "needs paged_kv_attention, which backend property-correct lacks")]
