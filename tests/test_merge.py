"""`rlk-conform merge`: the shards of one run combine into the report of the whole run."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conformance.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--goldens", str(ROOT / "goldens" / "smoke"), "--tolerances", str(ROOT / "specs" / "tolerances.yaml"),
          "--filter", "attention/gqa/*", "--checks", "accuracy,batch", "--no-regression"]


def run_json(tmp_path: Path, name: str, *args: str) -> Path:
    path = tmp_path / f"{name}.json"
    result = CliRunner().invoke(app, ["run", *COMMON, *args, "--report-json", str(path)])
    assert result.exit_code in (0, 1), result.output
    return path


def test_merged_shards_equal_the_unsharded_run(tmp_path: Path) -> None:
    whole = json.loads(run_json(tmp_path, "whole", "--backend", "naive").read_text())
    shards = [run_json(tmp_path, f"s{i}", "--backend", "naive", "--shard", f"{i}/3") for i in range(3)]
    merged_path = tmp_path / "merged.json"
    result = CliRunner().invoke(app, ["merge", *map(str, shards), "--out", str(merged_path),
                                      "--junit", str(tmp_path / "merged.xml")])
    assert result.exit_code == (0 if whole["summary"]["verdict"] == "pass" else 1), result.output
    merged = json.loads(merged_path.read_text())
    key = lambda r: (r["case_id"], r["check"])  # noqa: E731
    assert sorted(merged["records"], key=key) == sorted(whole["records"], key=key)
    assert merged["summary"] == whole["summary"]
    assert [m["shard"] for m in merged["merged_from"]] == ["0/3", "1/3", "2/3"]
    assert (tmp_path / "merged.xml").is_file()


def test_a_shard_given_twice_is_refused_naming_both_files(tmp_path: Path) -> None:
    a = run_json(tmp_path, "a", "--backend", "naive", "--shard", "0/2")
    b = run_json(tmp_path, "b", "--backend", "naive", "--shard", "0/2")
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {b}: shard 0/2 is given twice ({a} and {b})"
    assert not (tmp_path / "m.json").exists()


def test_a_missing_shard_is_refused_naming_it(tmp_path: Path) -> None:
    shards = [run_json(tmp_path, f"s{i}", "--backend", "naive", "--shard", f"{i}/4") for i in (0, 2)]
    result = CliRunner().invoke(app, ["merge", *map(str, shards), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 2
    assert "missing shard(s) 1/4, 3/4 of 4 (have 0/4, 2/4)" in result.stderr and "--allow-partial" in result.stderr
    assert not (tmp_path / "m.json").exists()


def test_one_shard_alone_is_not_a_whole_run(tmp_path: Path) -> None:
    only = run_json(tmp_path, "s0", "--backend", "naive", "--shard", "0/4")
    result = CliRunner().invoke(app, ["merge", str(only), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 2 and "missing shard(s) 1/4, 2/4, 3/4" in result.stderr


def test_allow_partial_merges_and_says_what_is_missing(tmp_path: Path) -> None:
    shards = [run_json(tmp_path, f"s{i}", "--backend", "naive", "--shard", f"{i}/4") for i in (0, 2)]
    out = tmp_path / "m.json"
    result = CliRunner().invoke(app, ["merge", *map(str, shards), "--out", str(out), "--allow-partial"])
    assert result.exit_code == 1, result.output  # never green: the run is incomplete
    merged = json.loads(out.read_text())
    assert merged["complete"] is False and merged["missing_shards"] == ["1/4", "3/4"]
    assert "missing shards: 1/4, 3/4" in result.stdout


def test_shards_of_runs_with_other_settings_are_refused(tmp_path: Path) -> None:
    a = run_json(tmp_path, "a", "--backend", "naive", "--shard", "0/2")
    b = run_json(tmp_path, "b", "--backend", "naive", "--shard", "1/2", "--rules", "strict")
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 2 and "settings.rule_set 'strict' differs from 'default'" in result.stderr


def test_reports_of_different_backends_are_refused(tmp_path: Path) -> None:
    a = run_json(tmp_path, "a", "--backend", "naive", "--shard", "0/2")
    b = run_json(tmp_path, "b", "--backend", "naive-fp32", "--shard", "1/2")
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 2 and "backend 'naive-fp32' differs" in result.stderr
