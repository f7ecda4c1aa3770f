"""Reproducers and the regression set through the command line: check writes them, replay re-runs
them, promote freezes them into goldens/regression, and run includes that set."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import h5py
import pytest
import torch
from conftest import SMOKE_CASES, SMOKE_GOLDENS, SPEC_DIR
from typer.testing import CliRunner, Result

from conformance.cli.app import app
from conformance.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, GoldenError
from conformance.golden.format import read_golden
from conformance.golden.manifest import read_manifest
from conformance.golden.reproducer import promote, read_reproducer
from conformance.golden.verify import verify
from conformance.search.catalog import PROPERTY_NAMES

SPEC_ARGS = ("--spec", SPEC_DIR / "attention.yaml", "--spec", SPEC_DIR / "kv_cache_attention.yaml",
             "--tolerances", SPEC_DIR / "tolerances.yaml")
NAN_LEAK = "property_planted:NanLeaksFromPadding"
CORRECT = "property_planted:PropertyCorrect"


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def nan_reproducer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reproducer `check` writes for the NaN-leaking backend (shared; copy it before changing it)."""
    out = tmp_path_factory.mktemp("reproducers")
    result = invoke("check", "--backend", NAN_LEAK, "--properties", "nan_padding", "--reproducers", out, *SPEC_ARGS)
    assert result.exit_code == EXIT_FAILURE, result.output
    (path,) = out.rglob("*.h5")
    return path


def test_check_passes_the_reference_backend_with_the_ci_profile(tmp_path: Path) -> None:
    result = invoke("check", "--backend", "reference", "--search-profile", "ci", "--max-examples", "3",
                    "--reproducers", tmp_path, "--report-json", tmp_path / "r.json", *SPEC_ARGS)
    assert result.exit_code == EXIT_OK, result.output
    assert f"PASS: {len(PROPERTY_NAMES)} properties held, 0 failed (none), 0 skipped" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["verdict"] == "pass"
    assert report["search"]["profile"] == "ci" and report["search"]["seed"] == 0
    assert {r["check"] for r in report["records"]} == set(PROPERTY_NAMES)


def test_check_reports_a_failure_with_its_reproducer_json_and_junit(tmp_path: Path) -> None:
    result = invoke("check", "--backend", NAN_LEAK, "--properties", "nan_padding,determinism", "--reproducers",
                    tmp_path / "rep", "--report-json", tmp_path / "r.json", "--junit", tmp_path / "j.xml",
                    *SPEC_ARGS)
    assert result.exit_code == EXIT_FAILURE
    assert "FAIL: 1 properties held, 1 failed (nan_padding), 0 skipped" in result.stdout
    (path,) = (tmp_path / "rep").rglob("*.h5")
    assert f"replay: rlk-conform replay {path} --backend {NAN_LEAK}" in " ".join(result.stdout.split())
    failing = [r for r in json.loads((tmp_path / "r.json").read_text())["records"] if r["status"] == "fail"]
    assert [(r["check"], r["metrics"]["reproducer"]) for r in failing] == [("nan_padding", str(path))]
    names = {tc.get("classname") for tc in ET.parse(tmp_path / "j.xml").iter("testcase")}
    assert "rlk-conform.planted-nan-padding.kv_cache_attention.nan_padding" in names or any(
        n.endswith(".nan_padding") for n in names)


@pytest.mark.parametrize("args", [["--properties", "nosuch"], ["--search-profile", "weekly"], ["--max-examples", "0"]],
                         ids=["unknown-property", "unknown-profile", "no-examples"])
def test_check_refuses_bad_options_with_exit_two(args: list[str]) -> None:
    result = invoke("check", "--backend", "reference", *args, *SPEC_ARGS)
    assert result.exit_code == EXIT_BAD_INPUT


def test_a_reproducer_is_a_golden_file_with_the_failure_beside_it(nan_reproducer: Path) -> None:
    gc = read_golden(nan_reproducer)  # the golden reader accepts it as it is
    rep = read_reproducer(nan_reproducer)
    assert rep.case == gc.case and rep.case.family == "property/nan_padding"
    info = rep.info
    assert (info.property, info.backend, info.status, info.profile) == ("nan_padding", "planted-nan-padding",
                                                                        "fail", "ci")
    assert info.hypothesis_seed == 0 and "poison" in info.parameters
    assert info.execution_target["device"] == "cpu" and "torch" in info.execution_target
    assert rep.backend_out is not None and tuple(rep.backend_out.shape) == (gc.case.batch, gc.case.hq, gc.case.sq,
                                                                          gc.case.d)
    assert rep.variant_out is not None and torch.isnan(rep.variant_out).any()
    with h5py.File(nan_reproducer, "r") as f:
        assert f["reproducer"].attrs["format"] == b"rlk-conform-reproducer"


def test_a_plain_golden_is_not_a_reproducer() -> None:
    with pytest.raises(GoldenError, match="no /reproducer group"):
        read_reproducer(SMOKE_GOLDENS / "attention/gqa/hq8-hkv1-d64-b1-sq17-skv17-bf16-causal.h5")


def test_replay_says_whether_the_failure_is_still_there(nan_reproducer: Path) -> None:
    still = invoke("replay", nan_reproducer)  # the backend the reproducer names
    assert still.exit_code == EXIT_FAILURE, still.output
    assert "STILL FAILS: nan_padding on planted-nan-padding" in still.stdout
    assert "recorded   fail on planted-nan-padding" in still.stdout
    fixed = invoke("replay", nan_reproducer, "--backend", CORRECT)
    assert fixed.exit_code == EXIT_OK, fixed.output
    assert "PASSES NOW: nan_padding holds on property-correct" in fixed.stdout


def test_promote_adds_the_case_to_a_regression_set_that_verifies(nan_reproducer: Path, tmp_path: Path) -> None:
    target = tmp_path / "regression"
    result = invoke("promote", nan_reproducer, "--to", target)
    assert result.exit_code == EXIT_OK, result.output
    case = read_reproducer(nan_reproducer).case
    manifest = read_manifest(target)
    assert [e["case_id"] for e in manifest["files"]] == [case.id] and manifest["tier"] == "regression"
    with h5py.File(target / f"{case.id}.h5", "r") as f:
        assert "reproducer" not in f
    assert verify(target, regenerate=True).ok  # the frozen case regenerates bit for bit from its attributes
    again = promote(nan_reproducer, target)
    assert again.replaced and again.cases == 1


@pytest.fixture(scope="module")
def tile_tail_reproducer(repo_specs, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from property_planted import TileTailOffByOne

    from conformance.search.engine import PROFILES, SearchSettings, check_backend
    from conformance.spec.tolerances import load_tolerances

    tol = load_tolerances(SPEC_DIR / "tolerances.yaml")
    (found,) = check_backend(TileTailOffByOne(), repo_specs, tol, ("accuracy",), SearchSettings(
        profile=PROFILES["ci"], max_examples=200, reproducer_dir=tmp_path_factory.mktemp("rep")))
    return found


def test_the_regression_set_joins_only_the_default_goldens(tile_tail_reproducer: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """goldens/regression of the default golden root joins a run of the default goldens, and the
    header says how many cases each directory gave; with --goldens it joins only when asked."""
    from property_planted import TileTailOffByOne

    root = tmp_path / "golden-root"
    shutil.copytree(SMOKE_GOLDENS, root / "smoke")
    promote(tile_tail_reproducer.reproducer, root / "regression")
    monkeypatch.setenv("RLK_GOLDENS", str(root))
    monkeypatch.chdir(tmp_path)
    case_id = tile_tail_reproducer.counterexample.example.case.id
    backend = ("--backend", TileTailOffByOne.__module__ + ":TileTailOffByOne", "--checks", "accuracy")
    default = invoke("run", *backend, "--filter", "attention/gqa/*")
    assert default.exit_code == EXIT_OK, default.output  # the regression case does not match the filter
    assert "cases: " not in default.stdout
    with_regression = invoke("run", *backend, "--filter", "*/property/*")
    assert with_regression.exit_code == EXIT_FAILURE, with_regression.output
    assert case_id in with_regression.stdout and "1 cases from golden-root/regression" in with_regression.stdout
    both = invoke("run", *backend)
    header = f"{SMOKE_CASES + 1} cases: {SMOKE_CASES} from golden-root/smoke, 1 from golden-root/regression"
    assert header in both.stdout
    assert invoke("run", *backend, "--filter", "*/property/*", "--no-regression").exit_code == EXIT_BAD_INPUT
    explicit = ("--goldens", str(root / "smoke"), "--filter", "*/property/*")
    assert invoke("run", *backend, *explicit).exit_code == EXIT_BAD_INPUT  # no smoke case matches the filter
    assert invoke("run", *backend, *explicit, "--regression").exit_code == EXIT_FAILURE


def test_regression_without_a_regression_set_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setenv("RLK_GOLDENS", str(tmp_path / "empty-root"))
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "--backend", "naive", "--goldens", str(SMOKE_GOLDENS), "--regression")
    assert result.exit_code == EXIT_BAD_INPUT and "no regression set found" in result.stderr


def test_run_properties_adds_the_property_records_to_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    shutil.copytree(SPEC_DIR, tmp_path / "specs")
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "--backend", NAN_LEAK, "--goldens", SMOKE_GOLDENS, "--filter", "attention/gqa/*",
                    "--checks", "accuracy,nan_padding", "--properties", "--report-json", "r.json")
    assert result.exit_code == EXIT_FAILURE, result.output
    records = json.loads(Path("r.json").read_text())["records"]
    assert {r["check"] for r in records} == {"accuracy", "nan_padding"}
    assert [r["status"] for r in records if r["check"] == "nan_padding"] == ["fail"]
    assert all(r["status"] == "pass" for r in records if r["check"] == "accuracy")
    assert list(Path("reproducers").rglob("*.h5"))
