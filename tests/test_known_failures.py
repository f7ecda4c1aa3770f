"""Known-failure lists: expected failures keep a run green, stale entries are errors, passes are reported."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_backend
from planted_backends import Correct, WrongGqaMapping
from typer.testing import CliRunner

from conformance.cli.app import app
from conformance.errors import SpecError
from conformance.golden.manifest import select_cases
from conformance.judge.known_failures import apply, check_patterns, load_known_failures
from conformance.report.json import summarize
from conformance.run.settings import RunSettings
from conformance.spec.tolerances import load_tolerances

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "goldens" / "smoke"
TOLERANCES = load_tolerances(ROOT / "specs" / "tolerances.yaml")
GQA_CASES = "attention/gqa/*"


def write_list(tmp_path: Path, backend: str, entries: str) -> Path:
    path = tmp_path / "known.yaml"
    path.write_text(f"schema_version: 1\nbackend: {backend}\nentries:\n{entries}")
    return path


def gqa_records(backend):
    return run_backend(backend, select_cases(SMOKE, "attention/gqa/*"), RunSettings(tolerances=TOLERANCES,
                                                                              checks=("accuracy",))).records


def test_listed_failures_are_marked_expected_and_the_verdict_passes(tmp_path: Path) -> None:
    path = write_list(tmp_path, "planted", f'  - cases: "{GQA_CASES}"\n    checks: [accuracy]\n'
                      '    reason: "reads KV head h % Hkv"\n')
    records = gqa_records(WrongGqaMapping())
    assert summarize(records)["verdict"] == "fail"
    outcome = apply(load_known_failures(path, "planted"), records)
    failing = [r for r in records if r.status == "fail"]
    assert failing and all(r.expected == "reads KV head h % Hkv" for r in failing)
    assert outcome.expected == len(failing)
    summary = summarize(records)
    assert summary["verdict"] == "pass" and summary["expected_failures"] == len(failing)


def test_an_unlisted_failure_still_fails_the_run(tmp_path: Path) -> None:
    path = write_list(tmp_path, "planted", '  - cases: "attention/gqa/hq14-hkv1-*"\n    reason: "only one"\n')
    records = gqa_records(WrongGqaMapping())
    apply(load_known_failures(path, "planted"), records)
    assert summarize(records)["verdict"] == "fail"
    assert any(r.status == "fail" and r.expected is None for r in records)


def test_an_expected_failure_that_passes_is_reported_as_an_unexpected_pass(tmp_path: Path) -> None:
    path = write_list(tmp_path, "planted", f'  - cases: "{GQA_CASES}"\n    reason: "was broken"\n')
    outcome = apply(load_known_failures(path, "planted"), gqa_records(Correct()))
    assert outcome.unexpected_passes and {r.check for r in outcome.unexpected_passes} == {"accuracy"}


def test_a_pattern_that_matches_no_case_is_an_error_naming_its_line(tmp_path: Path) -> None:
    path = write_list(tmp_path, "planted", '  - cases: "attention/gqa/*"\n    reason: "fine"\n'
                      '  - cases: "attention/no-such-family/*"\n    reason: "stale"\n')
    kf = load_known_failures(path, "planted")
    with pytest.raises(SpecError, match="matches no case") as info:
        check_patterns(kf, [p.relative_to(SMOKE).with_suffix("").as_posix() for p in select_cases(SMOKE)])
    assert info.value.line == 6 and info.value.field == "entries[1].cases"


def test_a_list_for_another_backend_is_refused(tmp_path: Path) -> None:
    path = write_list(tmp_path, "sdpa", '  - cases: "*"\n    reason: "x"\n')
    with pytest.raises(SpecError, match="for backend 'sdpa'"):
        load_known_failures(path, "naive")


def test_an_unknown_check_name_is_refused_with_its_line(tmp_path: Path) -> None:
    path = write_list(tmp_path, "naive", '  - cases: "*"\n    checks: [acuracy]\n    reason: "x"\n')
    with pytest.raises(SpecError, match="unknown check") as info:
        load_known_failures(path, "naive")
    assert info.value.line == 5


def test_cli_run_with_a_stale_list_exits_2_with_one_line_before_running(tmp_path: Path) -> None:
    path = write_list(tmp_path, "reference", '  - cases: "attention/nothing/*"\n    reason: "stale"\n')
    result = CliRunner().invoke(app, ["run", "--backend", "reference", "--filter", "attention/gqa/*",
                                      "--known-failures", str(path), "--goldens", str(SMOKE),
                                      "--tolerances", str(ROOT / "specs" / "tolerances.yaml")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}:4: entries[0].cases: pattern 'attention/nothing/*' matches no case of the golden set "
        "(stale entry?)"]


def test_cli_run_with_every_failure_listed_exits_0_and_says_so(tmp_path: Path) -> None:
    path = write_list(tmp_path, "naive", '  - cases: "*-fp32-*"\n    checks: [split, prefill_decode, chunk, padding]\n'
                      '    reason: "fp32 blocking depends on the call shape"\n')
    result = CliRunner().invoke(app, ["run", "--backend", "naive", "--filter", "kv_cache_attention/chunked-prefill/*",
                                      "--known-failures", str(path), "--goldens", str(SMOKE),
                                      "--tolerances", str(ROOT / "specs" / "tolerances.yaml"),
                                      "--checks", "accuracy,split,chunk"])
    assert result.exit_code == 0, result.stdout
    assert "known failures" in result.stdout
