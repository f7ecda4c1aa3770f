"""The rlk-conform command line: help, exit codes, one-line errors, and the generate/verify/specs commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from conftest import DEFECTS, REPO, SMOKE_GOLDENS, SPEC_DIR, TINY_SPECS, BrokenSpec, Defect, edit_spec, line_of
from typer.testing import CliRunner, Result

from conformance.cli.app import app
from conformance.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from conformance.golden.manifest import MANIFEST_NAME, read_manifest
from conformance.golden.verify import verify
from conformance.spec.load import default_spec_paths, load_spec

RLK_CONFORM = Path(sys.executable).with_name("rlk-conform")


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result: Result, prefix: str) -> None:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["verify", "--help"], ["specs", "--help"]],
                         ids=["root", "generate", "verify", "specs"])
def test_help_exits_zero(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == EXIT_OK
    assert "Usage:" in result.stdout


def test_version_prints_the_package_version() -> None:
    from conformance import __version__

    result = invoke("--version")
    assert (result.exit_code, result.stdout.strip()) == (EXIT_OK, f"rlk-conform {__version__}")


@pytest.mark.parametrize("args", [["generate", "--no-such-flag"], ["specs", "--tier", "nightly"], ["no-such-command"]],
                         ids=["unknown-flag", "unknown-tier", "unknown-command"])
def test_bad_usage_exits_two(args: list[str]) -> None:
    assert invoke(*args).exit_code == EXIT_BAD_INPUT


@pytest.mark.parametrize(("args", "expected"), [
    (["run", "--no-such-flag"], "error: rlk-conform run: No such option: --no-such-flag (see: rlk-conform run --help)"),
    (["run", "--backnd", "x"], "error: rlk-conform run: No such option: --backnd (Possible options: --backend)"),
    (["generate", "--jobs", "0"], "error: rlk-conform generate: Invalid value for '--jobs' / '-j'"),
    (["no-such-command"], "error: rlk-conform: No such command 'no-such-command'."),
    (["generate", "-j"], "error: rlk-conform"),
], ids=["unknown-flag", "misspelt-flag", "bad-value", "unknown-command", "missing-value"])
def test_the_command_lines_usage_errors_are_one_line_with_exit_code_two(
        args: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from conformance.cli import main

    as_installed_script(monkeypatch, ["rlk-conform", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error_text(captured.err, expected)


def test_the_bare_command_prints_its_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from conformance.cli import main

    as_installed_script(monkeypatch, ["rlk-conform"])
    with pytest.raises(SystemExit):
        main()
    captured = capsys.readouterr()
    assert "Usage: rlk-conform [OPTIONS] COMMAND" in captured.out + captured.err
    assert "generate" in captured.out + captured.err


def test_the_command_lines_exit_code_is_the_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    from conformance.cli import main

    as_installed_script(monkeypatch, ["rlk-conform", "--version"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == EXIT_OK


def as_installed_script(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    """Run main() as the installed ``rlk-conform`` script: its argv, and no ``python -m`` module as
    ``__main__`` (the command line names itself after the script then)."""
    import sys

    monkeypatch.setattr("sys.argv", argv)
    monkeypatch.setattr(sys.modules["__main__"], "__package__", "", raising=False)


def assert_one_line_error_text(stderr: str, prefix: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), lines[0]


def test_specs_ids_lists_the_smoke_cases_of_the_default_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the default spec paths are relative to the working directory
    specs = [load_spec(path) for path in default_spec_paths(SPEC_DIR)]
    expected = [c.id for s in specs for c in s.cases_for_tier("smoke")]
    expected += [c.id for s in specs for c in s.layouts_for_tier("smoke")]
    result = invoke("specs", "--tier", "smoke", "--ids")
    assert result.exit_code == EXIT_OK
    assert result.stdout.splitlines() == expected


def test_specs_ids_of_a_higher_tier_include_the_lower_tier(spec_dir: Path) -> None:
    spec = spec_dir / "tiny_attention.yaml"
    smoke = invoke("specs", "--spec", spec, "--tier", "smoke", "--ids").stdout.splitlines()
    standard = invoke("specs", "--spec", spec, "--tier", "standard", "--ids").stdout.splitlines()
    assert set(smoke) < set(standard)


# --- spec errors -----------------------------------------------------------------------------------


def test_spec_error_exits_two_with_one_error_line(broken_spec: BrokenSpec) -> None:
    result = invoke("specs", "--spec", broken_spec.path, "--memory-cap-mib", broken_spec.memory_cap_mib)
    assert result.exit_code == EXIT_BAD_INPUT
    assert_one_line_error(result, f"error: {broken_spec.path}:{broken_spec.line}:")


def test_generate_with_a_bad_spec_writes_nothing(broken_spec: BrokenSpec, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("generate", "--spec", broken_spec.path, "--out", out, "--jobs", "1", "--memory-cap-mib",
                    broken_spec.memory_cap_mib)
    assert result.exit_code == EXIT_BAD_INPUT
    assert not out.exists()


def test_generate_with_one_bad_spec_among_good_ones_writes_nothing(spec_dir: Path, tmp_path: Path) -> None:
    edit_spec(spec_dir / "tiny_kv_cache.yaml", "dtype: float32", "dtype: float64")
    out = tmp_path / "out"
    result = invoke("generate", "--spec", spec_dir / "tiny_attention.yaml", "--spec", spec_dir / "tiny_kv_cache.yaml",
                    "--out", out, "--jobs", "1")
    assert result.exit_code == EXIT_BAD_INPUT
    assert not out.exists()


@pytest.mark.parametrize("defect", [d for d in DEFECTS if d.name in ("duplicate-key", "over-memory-cap")],
                         ids=lambda d: d.name)
def test_installed_command_prints_one_error_line_without_traceback(defect: Defect, spec_dir: Path) -> None:
    path = spec_dir / defect.spec
    text = edit_spec(path, defect.old, defect.new)
    proc = subprocess.run([str(RLK_CONFORM), "specs", "--spec", str(path), "--memory-cap-mib",
                           str(defect.memory_cap_mib)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == EXIT_BAD_INPUT
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:{line_of(text, defect.marker)}:"), proc.stderr
    assert proc.stdout == ""


def test_missing_spec_file_exits_two(tmp_path: Path) -> None:
    result = invoke("specs", "--spec", tmp_path / "absent.yaml")
    assert result.exit_code == EXIT_BAD_INPUT
    assert_one_line_error(result, f"error: {tmp_path / 'absent.yaml'}: file not found")


# --- generate and verify ---------------------------------------------------------------------------


def test_generate_writes_goldens_that_verify(spec_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("generate", "--spec", spec_dir / TINY_SPECS[1], "--out", out, "--jobs", "1")
    assert result.exit_code == EXIT_OK, result.stderr
    assert len(read_manifest(out)["files"]) == len(load_spec(spec_dir / TINY_SPECS[1]).cases_for_tier("smoke"))
    assert verify(out).ok


def test_generate_filter_writes_only_the_matching_cases_and_their_manifest(spec_dir: Path, tmp_path: Path) -> None:
    spec = spec_dir / TINY_SPECS[0]
    ids = [c.id for c in load_spec(spec).cases_for_tier("smoke")]
    pattern = ids[0].rsplit("/", 1)[0] + "/*"  # the first case's family
    want = sorted(i for i in ids if i.startswith(pattern[:-1]))
    assert 0 < len(want) < len(ids)
    out = tmp_path / "out"
    result = invoke("generate", "--spec", spec, "--out", out, "--jobs", "1", "--filter", pattern)
    assert result.exit_code == EXIT_OK, result.stderr
    assert sorted(f["case_id"] for f in read_manifest(out)["files"]) == want
    assert verify(out).ok


def test_generate_filter_writes_only_the_layout_files_whose_goldens_it_wrote(tmp_path: Path) -> None:
    spec = SPEC_DIR / "kv_cache_attention.yaml"
    out = tmp_path / "out"
    result = invoke("generate", "--spec", spec, "--out", out, "--jobs", "1", "--filter",
                    "kv_cache_attention/layouts-decode/*")
    assert result.exit_code == EXIT_OK, result.stderr
    entries = read_manifest(out)["files"]
    dense = {e["case_id"] for e in entries if e["path"].endswith(".h5")}
    layouts = [e for e in entries if e["path"].endswith(".json")]
    assert dense and all(i.startswith("kv_cache_attention/layouts-decode/") for i in dense)
    assert layouts  # the family's own packs and pages are there ...
    for entry in layouts:  # ... and every one names only goldens of this directory
        members = {s["case_id"] for s in json.loads((out / entry["path"]).read_text())["sequences"]}
        assert members <= dense, entry["case_id"]
    assert verify(out).ok


@pytest.mark.parametrize(("extra", "message"), [([], "--filter needs --out DIR"),
                                                (["--out", "OUT"], "no case of tier 'smoke' matches")])
def test_generate_filter_errors_are_one_line_and_write_nothing(spec_dir: Path, tmp_path: Path, extra: list[str],
                                                              message: str) -> None:
    args = [str(tmp_path / "out") if a == "OUT" else a for a in extra]
    result = invoke("generate", "--spec", spec_dir / TINY_SPECS[0], "--filter", "no-such-case/*", *args)
    assert result.exit_code == EXIT_BAD_INPUT
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_verify_of_a_fresh_directory_exits_zero(tiny_goldens: Path) -> None:
    result = invoke("verify", tiny_goldens)
    assert result.exit_code == EXIT_OK
    assert "OK:" in result.stdout


def test_verify_of_a_modified_file_exits_one_and_names_it(golden_dir: Path) -> None:
    path = golden_dir / read_manifest(golden_dir)["files"][0]["path"]
    with h5py.File(path, "r+") as f:
        f["expected/out"][0, 0, 0, 0] += 1
    result = invoke("verify", golden_dir)
    assert result.exit_code == EXIT_FAILURE
    assert f"FAIL {path}: " in result.stdout


def test_verify_of_a_missing_file_exits_one_and_names_it(golden_dir: Path) -> None:
    path = golden_dir / read_manifest(golden_dir)["files"][0]["path"]
    path.unlink()
    result = invoke("verify", golden_dir)
    assert result.exit_code == EXIT_FAILURE
    assert f"FAIL {path}: listed in the manifest but missing" in result.stdout


def test_verify_of_an_unlisted_file_exits_one_and_names_it(golden_dir: Path) -> None:
    listed = golden_dir / read_manifest(golden_dir)["files"][0]["path"]
    extra = listed.with_name("extra.h5")
    shutil.copy(listed, extra)
    result = invoke("verify", golden_dir)
    assert result.exit_code == EXIT_FAILURE
    assert f"FAIL {extra}: file is not listed in the manifest" in result.stdout


def test_verify_without_a_manifest_exits_two_naming_it(tmp_path: Path) -> None:
    result = invoke("verify", tmp_path)
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.splitlines()[-1].startswith(f"error: {tmp_path / MANIFEST_NAME}: no manifest")


def test_verify_error_is_the_only_line_on_stderr(tmp_path: Path) -> None:
    result = invoke("verify", tmp_path)
    assert_one_line_error(result, f"error: {tmp_path / MANIFEST_NAME}: no manifest")


def test_generate_error_after_loading_the_specs_is_the_only_line_on_stderr(spec_dir: Path, tmp_path: Path) -> None:
    occupied = tmp_path / "out"
    occupied.write_text("a file where the output directory should go")
    result = invoke("generate", "--spec", spec_dir / TINY_SPECS[1], "--out", occupied, "--jobs", "1")
    assert result.exit_code == EXIT_BAD_INPUT
    assert_one_line_error(result, f"error: {occupied}: cannot create the output directory")


def test_verify_regenerate_of_a_fresh_directory_exits_zero(tiny_goldens: Path) -> None:
    result = invoke("verify", tiny_goldens, "--regenerate")
    assert result.exit_code == EXIT_OK
    assert "every one regenerated bit-identical" in result.stdout


# --- an installed rlk-conform works from any directory (no cwd-relative defaults) ---------------


def test_run_from_another_directory_finds_the_shipped_specs_tolerances_and_goldens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no specs/, no goldens/ here
    monkeypatch.delenv("RLK_GOLDENS", raising=False)
    result = CliRunner().invoke(app, ["run", "--backend", "reference", "--filter", "attention/gqa/*",
                                      "--checks", "accuracy", "--report-json", "r.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["goldens"]["default"] is True and Path(report["goldens"]["dir"]) == SMOKE_GOLDENS
    assert report["settings"]["tolerances_default"] is True
    specs = CliRunner().invoke(app, ["specs", "--ids"])
    assert specs.exit_code == 0 and "attention/gqa/hq14-hkv2-d64-b1-sq17-skv17-bf16-causal" in specs.stdout


def test_a_backend_module_in_the_current_directory_runs_as_the_docs_say(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_attention.py").write_text(
        "from conformance.backends.builtin import NaiveFp32Backend\n\n\n"
        "class MyAttention(NaiveFp32Backend):\n    name = 'my-attention'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(app, ["run", "--backend", "my_attention:MyAttention", "--filter", "attention/gqa/*",
                                      "--checks", "accuracy"])
    assert result.exit_code == 0, result.output
    assert "my-attention" in result.stdout


def test_missing_default_goldens_say_where_they_were_looked_for(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from conformance import locations

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLK_GOLDENS", str(tmp_path / "nowhere"))
    monkeypatch.setattr(locations, "source_checkout", lambda: None)  # as an installed wheel
    result = CliRunner().invoke(app, ["run", "--backend", "naive"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "no smoke goldens found" in line
    assert f"{tmp_path / 'nowhere' / 'smoke'} ($RLK_GOLDENS)" in line
    assert f"{tmp_path / 'goldens' / 'smoke'} (the current directory)" in line
    assert "rlk-conform generate --tier smoke" in line


def test_piped_output_is_not_cut_at_80_columns() -> None:
    done = subprocess.run([sys.executable, "-m", "conformance", "specs"], capture_output=True, text=True,
                          check=True, env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    row = next(line for line in done.stdout.splitlines() if "hq14-hkv2-d64-b1-sq17-skv17-bf16-causal" in line)
    assert "attention/gqa/hq14-hkv2-d64-b1-sq17-skv17-bf16-causal" in row  # the whole id on one line


def test_generate_names_goldens_its_specs_no_longer_declare(spec_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke("generate", "--spec", spec_dir / TINY_SPECS[1], "--out", out, "--jobs", "1").exit_code == EXIT_OK
    stray = out / "kv_cache_attention" / "gone" / "old-case.h5"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"")
    result = invoke("generate", "--spec", spec_dir / TINY_SPECS[1], "--out", out, "--jobs", "1")
    assert result.exit_code == EXIT_OK
    assert "1 golden file(s)" in result.stdout and "kv_cache_attention/gone/old-case.h5" in result.stdout
    assert stray.exists()  # never deleted: the user decides
