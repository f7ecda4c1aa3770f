"""specs/tolerances.yaml: it loads, every cell resolves, and a broken file is a SpecError with a line."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import get_args

import pytest
from conftest import SPEC_DIR, edit_spec, line_of

from conformance.errors import SpecError
from conformance.spec.case import DTYPES, OPS
from conformance.spec.tolerances import InvarianceCheck, Tolerances, load_tolerances

TOLERANCES = SPEC_DIR / "tolerances.yaml"


@pytest.fixture(scope="module")
def tolerances() -> Tolerances:
    return load_tolerances(TOLERANCES)


@pytest.fixture
def tolerances_copy(tmp_path: Path) -> Path:
    return Path(shutil.copy(TOLERANCES, tmp_path / "tolerances.yaml"))


@pytest.mark.parametrize("rule_set, op, dtype", list(itertools.product(("default", "strict"), OPS, DTYPES)))
def test_every_accuracy_cell_resolves(tolerances: Tolerances, rule_set: str, op: str, dtype: str) -> None:
    assert tolerances.accuracy_rule(rule_set, op, dtype) is not None


@pytest.mark.parametrize("op, dtype", list(itertools.product(OPS, DTYPES)))
def test_strict_cells_bound_max_and_mean_naive_ratio(tolerances: Tolerances, op: str, dtype: str) -> None:
    rule = tolerances.accuracy_rule("strict", op, dtype)
    assert rule is not None
    assert rule.max_naive_ratio is not None and rule.mean_naive_ratio is not None


@pytest.mark.parametrize("check", get_args(InvarianceCheck))
def test_every_invariance_check_is_bitwise(tolerances: Tolerances, check: str) -> None:
    # CONTRACT.md §2, relation I: atol = rtol = 0
    rule = tolerances.invariance_rule(check)
    assert rule is not None and (rule.atol, rule.rtol) == (0.0, 0.0)


def test_lse_and_peak_relative_cover_every_dtype(tolerances: Tolerances) -> None:
    assert set(tolerances.lse) == set(DTYPES) == set(tolerances.peak_relative)


def test_parity_uses_a_defined_rule_set(tolerances: Tolerances) -> None:
    assert tolerances.parity.rules in tolerances.accuracy


def test_undefined_rule_set_resolves_to_none(tolerances: Tolerances) -> None:
    assert tolerances.accuracy_rule("no-such-rules", "attention", "float32") is None


def test_cell_missing_from_the_file_resolves_to_none(tolerances_copy: Path) -> None:
    text = tolerances_copy.read_text()
    start = text.index("  strict:")
    strict_fp16 = ("      float16:  {atol: 1.0e-3, rtol: 1.0e-3, naive_factor: 2.0, max_naive_ratio: 2.0, "
                   "mean_naive_ratio: 2.0}\n")
    assert text.count(strict_fp16) == 1 and text.index(strict_fp16) > start
    tolerances_copy.write_text(text.replace(strict_fp16, ""))
    loaded = load_tolerances(tolerances_copy)
    assert loaded.accuracy_rule("strict", "attention", "float16") is None
    assert loaded.accuracy_rule("strict", "attention", "bfloat16") is not None


def test_unknown_key_is_a_spec_error_at_its_line(tolerances_copy: Path) -> None:
    row = "bfloat16: {atol: 5.0e-2, rtol: 2.0e-2, naive_factor: 2.0}"
    anchor = "attention: &attention_default\n      float32:  {atol: 1.0e-4, rtol: 1.0e-4, naive_factor: 2.0}\n      "
    text = edit_spec(tolerances_copy, anchor + row, anchor + row.replace("}", ", atoll: 1.0}"))
    with pytest.raises(SpecError, match="unknown key") as info:
        load_tolerances(tolerances_copy)
    assert (info.value.file, info.value.line) == (str(tolerances_copy), line_of(text, "atoll"))
    assert info.value.field == "accuracy.default.attention.bfloat16.atoll"


def test_negative_threshold_is_a_spec_error_at_its_line(tolerances_copy: Path) -> None:
    text = edit_spec(tolerances_copy, "float32:  {atol: 1.0e-4, rtol: 1.0e-5}",
                     "float32:  {atol: -1.0e-4, rtol: 1.0e-5}")
    with pytest.raises(SpecError) as info:
        load_tolerances(tolerances_copy)
    assert info.value.line == line_of(text, "atol: -1.0e-4")
    assert info.value.field == "lse.float32.atol"


def test_parity_naming_an_undefined_rule_set_is_a_spec_error_with_a_line(tolerances_copy: Path) -> None:
    edit_spec(tolerances_copy, "rules: default", "rules: no-such-rules")
    with pytest.raises(SpecError, match="no-such-rules") as info:
        load_tolerances(tolerances_copy)
    assert info.value.file == str(tolerances_copy)
    assert isinstance(info.value.line, int)


def test_parity_naming_an_undefined_rule_set_points_at_parity_rules(tolerances_copy: Path) -> None:
    text = edit_spec(tolerances_copy, "rules: default", "rules: no-such-rules")
    with pytest.raises(SpecError) as info:
        load_tolerances(tolerances_copy)
    assert (info.value.line, info.value.field) == (line_of(text, "rules: no-such-rules"), "parity.rules")
