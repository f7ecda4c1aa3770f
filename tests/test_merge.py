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


def test_overlapping_shards_are_refused_naming_the_file(tmp_path: Path) -> None:
    a = run_json(tmp_path, "a", "--backend", "naive", "--shard", "0/2")
    b = run_json(tmp_path, "b", "--backend", "naive", "--shard", "0/2")
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {b}: record ")
    assert not (tmp_path / "m.json").exists()


def test_reports_of_different_backends_are_refused(tmp_path: Path) -> None:
    a = run_json(tmp_path, "a", "--backend", "naive", "--shard", "0/2")
    b = run_json(tmp_path, "b", "--backend", "naive-fp32", "--shard", "1/2")
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 2 and "backend 'naive-fp32' differs" in result.stderr
