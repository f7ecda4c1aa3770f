"""The pytest plugin: ``pytest --rlk-backend X`` turns golden cases and properties into tests with
readable ids, under pytest-xdist and with --junitxml; without the option it adds nothing."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import SMOKE_GOLDENS, SPEC_DIR

from conformance.pytest_plugin import worker_device

pytest_plugins = ("pytester",)

TESTS = Path(__file__).resolve().parent
GQA_CASE = "attention/gqa/hq14-hkv2-d64-b1-sq17-skv17-bf16-causal"


@pytest.fixture
def rlk(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """Run pytest in a subprocess (the plugin comes from its pytest11 entry point) with the repo's
    specs and goldens and tests/ importable (for the planted backends)."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))

    def run(backend: str, *args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--rlk-backend={backend}", f"--rlk-goldens={SMOKE_GOLDENS}",
            f"--rlk-specs={SPEC_DIR}", f"--rlk-tolerances={SPEC_DIR / 'tolerances.yaml'}", "--rlk-max-examples=3",
            f"--rootdir={pytester.path}", *args)

    return run


def test_golden_cases_and_properties_are_tests_with_readable_ids(rlk, pytester: pytest.Pytester) -> None:
    result = rlk("reference", "-v", "-k", "hq14-hkv2-d64-b1-sq17 or gqa]", "--junitxml=out.xml")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"*rlk-conform::golden[[]{GQA_CASE}[]] PASSED*",
                                 "*rlk-conform::property[[]gqa[]] PASSED*"])
    cases = {(tc.get("classname"), tc.get("name")) for tc in ET.parse(pytester.path / "out.xml").iter("testcase")}
    assert ("rlk-conform", f"golden[{GQA_CASE}]") in cases and ("rlk-conform", "property[gqa]") in cases


def test_tests_spread_over_xdist_workers(rlk) -> None:
    result = rlk("reference", "-n", "2", "--rlk-goldens=none", "-k", "(batch or split or determinism) and not gradient")
    result.assert_outcomes(passed=3)  # three forward properties over two workers
    result.stdout.fnmatch_lines(["*created: 2/2 workers*"])


def test_a_failing_property_names_its_smallest_case_and_reproducer(rlk, pytester: pytest.Pytester) -> None:
    result = rlk("property_planted:NanLeaksFromPadding", "--rlk-goldens=none", "--rlk-properties=nan_padding",
                 "--rlk-max-examples=50", "--junitxml=out.xml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*FAIL nan_padding*", "*smallest failing case:*", "*reproducer: *reproducers*",
                                 "*replay: rlk-conform replay * --backend property_planted:NanLeaksFromPadding*"])
    assert list((pytester.path / "reproducers").rglob("*.h5"))
    props = {p.get("name") for p in ET.parse(pytester.path / "out.xml").iter("property")}
    assert props == {"backend", "reproducer"}


def test_an_unknown_backend_fails_each_test_with_the_reason(rlk) -> None:
    result = rlk("no-such-backend", "--rlk-goldens=none", "--rlk-properties=batch")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*--rlk-backend no-such-backend: unknown backend*"])


def test_without_a_backend_the_plugin_adds_nothing(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert "--rlk-backend" in pytester.runpytest_subprocess("--help").stdout.str()


@pytest.mark.parametrize(("device", "worker", "gpus", "expected"), [
    (None, "gw3", 2, "cuda:1"), ("cuda", "gw0", 4, "cuda:0"), ("cuda:2", "gw1", 4, "cuda:2"),
    ("cpu", "gw1", 4, "cpu"), ("cuda", None, 4, "cuda"), ("cuda", "gw1", 1, "cuda")])
def test_each_xdist_worker_gets_its_own_gpu(device: str | None, worker: str | None, gpus: int,
                                            expected: str | None) -> None:
    assert worker_device(device, worker, gpus) == expected


def test_rlk_only_runs_the_golden_cases_and_nothing_else(pytester: pytest.Pytester,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """From a directory with its own test suite, --rlk-only deselects that suite; the default goldens
    and specs are found without any path option (the cwd is the test's temporary directory)."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.delenv("RLK_GOLDENS", raising=False)
    pytester.makepyfile(test_own_suite="def test_of_the_project():\n    assert False\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--rlk-backend=reference", "--rlk-only",
                                           "--rlk-properties=none", "-k", "hq14-hkv2-d64-b1-sq17")
    result.assert_outcomes(passed=1, deselected=None)
    result.stdout.fnmatch_lines(["*1 passed, * deselected*"])
    assert "test_of_the_project" not in result.stdout.str()


def test_the_plugin_finds_the_default_goldens_from_any_directory(pytester: pytest.Pytester,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.delenv("RLK_GOLDENS", raising=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--rlk-backend=reference",
                                           "--rlk-properties=none", "--collect-only", "-q")
    result.stdout.fnmatch_lines([f"*rlk-conform::golden[[]{GQA_CASE}[]]*"])
