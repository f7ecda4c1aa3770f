"""Spec loading: every defect is a SpecError that points at it; case ids and seeds are stable keys."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from conftest import BrokenSpec, edit_spec

from conformance.errors import SpecError
from conformance.spec.case import TIERS, Case
from conformance.spec.load import OpSpec, load_spec, load_specs


def ids_and_seeds(spec: OpSpec) -> dict[str, int]:
    return {c.id: c.seed for c in spec.cases}


def test_spec_error_names_file_line_field_and_reason(broken_spec: BrokenSpec) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(broken_spec.path, broken_spec.memory_cap_mib * 2**20)
    err = info.value
    assert (err.file, err.line, err.field) == (str(broken_spec.path), broken_spec.line, broken_spec.field)
    assert broken_spec.reason in err.reason
    assert str(err).startswith(f"{broken_spec.path}:{broken_spec.line}:")


def test_missing_spec_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "absent.yaml")


def test_two_specs_of_the_same_op_are_refused(spec_dir: Path) -> None:
    twin = spec_dir / "twin.yaml"
    twin.write_bytes((spec_dir / "tiny_attention.yaml").read_bytes())
    with pytest.raises(SpecError, match="already declared") as info:
        load_specs([spec_dir / "tiny_attention.yaml", twin])
    assert info.value.file == str(twin)


def test_adding_a_family_keeps_existing_ids_and_seeds(spec_dir: Path) -> None:
    path = spec_dir / "tiny_attention.yaml"
    before = ids_and_seeds(load_spec(path))
    edit_spec(path, "families:\n", "families:\n  added:\n    base: {hq: 2, hkv: 2, d: 16, batch: 1, causal: false}\n"
              "    tiers:\n      smoke:\n        - {sq: 2, skv: 2, dtype: float32}\n")
    after = ids_and_seeds(load_spec(path))
    assert len(after) == len(before) + 1
    assert {k: after[k] for k in before} == before


def test_adding_a_grid_entry_keeps_existing_ids_and_seeds(spec_dir: Path) -> None:
    path = spec_dir / "tiny_attention.yaml"
    before = ids_and_seeds(load_spec(path))
    edit_spec(path, "{hq: 4, hkv: [4, 2], sq: 3", "{hq: 4, hkv: [1, 4, 2], sq: 3")
    edit_spec(path, "        - {mask: [right_pad, all_masked], dtype: float16}\n",
              "        - {mask: [right_pad, all_masked], dtype: float16}\n        - {mask: holes, dtype: float32}\n")
    after = ids_and_seeds(load_spec(path))
    assert len(after) == len(before) + 2
    assert {k: after[k] for k in before} == before


def test_changing_the_spec_seed_changes_seeds_but_not_ids(spec_dir: Path) -> None:
    path = spec_dir / "tiny_attention.yaml"
    before = ids_and_seeds(load_spec(path))
    edit_spec(path, "seed: 12345", "seed: 12346")
    after = ids_and_seeds(load_spec(path))
    assert after.keys() == before.keys()
    assert all(after[k] != before[k] for k in before)


def test_every_case_id_is_unique(repo_specs: list[OpSpec]) -> None:
    ids = [c.id for s in repo_specs for c in s.cases]
    assert len(ids) == len(set(ids))


def test_every_case_id_starts_with_its_op_and_family(repo_specs: list[OpSpec]) -> None:
    assert all(c.id.startswith(f"{c.op}/{c.family}/") for s in repo_specs for c in s.cases)


@pytest.mark.parametrize("lower, higher", list(itertools.pairwise(TIERS)))
def test_tiers_are_cumulative(repo_specs: list[OpSpec], lower: str, higher: str) -> None:
    for spec in repo_specs:
        low = {c.id for c in spec.cases_for_tier(lower)}
        high = {c.id for c in spec.cases_for_tier(higher)}
        assert low < high, f"{spec.path.name}: tier {lower} must be a strict subset of {higher}"


def test_a_case_declared_in_two_tiers_belongs_to_the_lower_one(spec_dir: Path) -> None:
    path = spec_dir / "tiny_attention.yaml"
    edit_spec(path, "        - {hq: 4, hkv: 1, sq: 7, skv: 7, dtype: float16}\n",
              "        - {hq: 4, hkv: 1, sq: 7, skv: 7, dtype: float16}\n"
              "        - {hq: 4, hkv: 2, sq: 3, skv: 5, dtype: float32}\n")
    tiers = {c.id: c.tier for c in load_spec(path).cases}
    assert tiers["attention/small/hq4-hkv2-d8-b2-sq3-skv5-fp32-causal"] == "smoke"


def test_kv_cache_split_points_are_s_past_plus_each_offset(spec_dir: Path) -> None:
    # tiny_kv_cache.yaml: family chunk has s_past 3, s_new 4 and split_offsets [0, 2]
    (case,) = [c for c in load_spec(spec_dir / "tiny_kv_cache.yaml").cases if c.family == "chunk"]
    assert (case.s_past, case.s_new, case.sq, case.skv, case.split_points) == (3, 4, 4, 7, (3, 5))


def test_explicit_scale_zero_is_kept(smoke_cases: dict[str, Case]) -> None:
    zero = [c for c in smoke_cases.values() if c.family == "scale" and c.scale == 0.0]
    assert zero
    assert all(c.effective_scale == 0.0 for c in zero)


def test_default_scale_is_one_over_sqrt_head_dim(smoke_cases: dict[str, Case]) -> None:
    defaults = [c for c in smoke_cases.values() if c.family == "head-dims"]
    assert all(c.scale is None and c.effective_scale == 1 / math.sqrt(c.d) for c in defaults)


def test_presets_resolve_to_the_contract_head_configuration(repo_specs: list[OpSpec]) -> None:
    # CONTRACT.md §1 model presets table: (Hq, Hkv, D); every preset is judged from the standard tier on
    preset_cases = [c for s in repo_specs for c in s.cases_for_tier("standard") if getattr(c, "preset", None)]
    contract = {"qwen3-8b": (32, 8, 128), "llama3.1-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128),
                "qwen2.5-0.5b": (14, 2, 64), "gemma2-9b": (16, 8, 256), "gpt-oss-20b": (64, 8, 64)}
    assert {c.preset for c in preset_cases} == contract.keys()
    assert all((c.hq, c.hkv, c.d) == contract[c.preset] for c in preset_cases)


def test_spec_without_cases_is_refused(spec_dir: Path) -> None:
    path = spec_dir / "empty.yaml"
    path.write_text("schema_version: 1\nop: attention\nseed: 1\npresets: presets.yaml\nfamilies: {}\n")
    with pytest.raises(SpecError, match="no cases") as info:
        load_spec(path)
    assert info.value.line == 5


def test_a_grid_that_expands_to_too_many_cases_is_refused_before_expanding(spec_dir: Path) -> None:
    path = spec_dir / "huge.yaml"
    axis = "[" + ", ".join(str(n) for n in range(1, 1001)) + "]"
    path.write_text("schema_version: 1\nop: attention\nseed: 1\npresets: presets.yaml\nfamilies:\n"
                    "  huge:\n    base: {hq: 1, hkv: 1, d: 8, dtype: float32, causal: true}\n"
                    f"    tiers:\n      smoke:\n        - {{batch: {axis}, sq: {axis}, skv: {axis}}}\n")
    with pytest.raises(SpecError, match=r"expands to 1000000000 cases") as info:
        load_spec(path)
    assert info.value.line == 10
    assert info.value.field == "families.huge.tiers.smoke[0]"
