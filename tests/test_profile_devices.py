"""`rlk-conform run --profile` (time per phase, peak RSS, largest case) and `run --devices` (one
worker process per device, one report equal to a one-process run's)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
from conftest import SMOKE_ATTENTION_CASES, SMOKE_CASES
from typer.testing import CliRunner, Result

from conformance.cli.app import app
from conformance.errors import ConformanceError
from conformance.golden.format import declared_bytes, read_golden
from conformance.golden.manifest import select_cases
from conformance.jobs.devices import balance, golden_sizes, parse_devices
from conformance.run.profiling import PHASES, PhaseTimer, RunProfile, merge_profiles
from conformance.spec.checks import GOLDEN_CHECKS, GRADIENT_CHECKS

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "goldens" / "smoke"
ROBUSTNESS = ROOT / "tests" / "robustness"
COMMON = ["--goldens", str(SMOKE), "--tolerances", str(ROOT / "specs" / "tolerances.yaml"), "--no-regression"]
GQA = ["--filter", "attention/gqa/*", "--checks", "accuracy,batch,determinism,contract"]
GQA_CASES = len(select_cases(SMOKE, "attention/gqa/*"))  # the committed smoke tier's (tests count, never hard-code)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, ["run", *COMMON, *map(str, args)])


def run_report(tmp_path: Path, name: str, *args: str | Path) -> tuple[Result, dict]:
    path = tmp_path / f"{name}.json"
    result = invoke(*args, "--report-json", path, "--junit", tmp_path / f"{name}.xml")
    assert result.exit_code in (0, 1), result.output
    return result, json.loads(path.read_text())


def check_profile(profile: dict, cases: int) -> None:
    assert set(profile) >= {"wall_s", "process_s", "phases_s", "cases", "peak_rss_mib", "largest_case_bytes",
                            "largest_case_id"}
    assert set(profile["phases_s"]) == {*PHASES, "other"}
    assert all(v >= 0 for v in profile["phases_s"].values())
    named = sum(profile["phases_s"][p] for p in PHASES)
    assert named <= profile["process_s"] + 1e-5
    assert sum(profile["phases_s"].values()) == pytest.approx(profile["process_s"], abs=1e-5)
    assert profile["cases"] == cases
    assert profile["wall_s"] > 0 and profile["peak_rss_mib"] > 0
    assert profile["phases_s"]["read"] > 0 and profile["phases_s"]["backend"] > 0
    assert profile["phases_s"]["judge"] > 0 and profile["phases_s"]["report"] > 0


# --- --profile -------------------------------------------------------------------------------------


def test_profile_phases_are_non_negative_and_add_up_to_the_wall_time(tmp_path: Path) -> None:
    result, report = run_report(tmp_path, "profiled", "--backend", "naive", *GQA, "--profile")
    profile = report["profile"]
    check_profile(profile, GQA_CASES)
    assert profile["process_s"] == profile["wall_s"]  # one process
    assert "devices" not in profile
    largest = max((read_golden(p) for p in select_cases(SMOKE, "attention/gqa/*")),
                  key=lambda gc: declared_bytes(gc.case))
    assert (profile["largest_case_id"], profile["largest_case_bytes"]) == (largest.case.id,
                                                                          declared_bytes(largest.case))
    assert list(report)[-2:] == ["profile", "records"]  # after the summary, before the records
    text = " ".join(result.stdout.split())
    assert f"profile of the run ({GQA_CASES} cases)" in text and "peak RSS" in text
    assert all(f"│ {phase} " in result.stdout for phase in (*PHASES, "other"))


def test_without_profile_the_report_has_no_profile(tmp_path: Path) -> None:
    result, report = run_report(tmp_path, "plain", "--backend", "naive", *GQA)
    assert list(report) == ["format", "schema_version", "complete", "backend", "compare_to", "execution_target",
                            "goldens", "settings", "summary", "records"]
    assert "peak RSS" not in result.stdout


def test_isolated_run_profiles_the_work_of_its_worker(tmp_path: Path) -> None:
    _, report = run_report(tmp_path, "isolated", "--backend", "naive", *GQA, "--isolate", "--profile")
    check_profile(report["profile"], GQA_CASES)


def test_phase_timer_charges_nested_phases_to_the_inner_one_only() -> None:
    timer = PhaseTimer()
    with timer.phase("judge"):
        time.sleep(0.02)
        with timer.phase("backend"):
            time.sleep(0.05)
        time.sleep(0.02)
    assert 0.035 <= timer.seconds["judge"] < 0.05 + 0.03
    assert 0.045 <= timer.seconds["backend"] < 0.05 + 0.03
    profile = timer.profile(cases=1)
    assert sum(profile.phases_s.values()) <= profile.wall_s and profile.other_s >= 0
    with pytest.raises(ValueError, match="unknown phase"):
        timer.phase("nap")


def test_on_a_cuda_device_each_phase_synchronizes_as_it_starts_and_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    synced: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    timer = PhaseTimer()
    timer.synchronize_with("cuda:1")
    with timer.phase("judge"), timer.phase("backend"):
        pass
    assert synced == [torch.device("cuda:1")] * 4
    with pytest.raises(RuntimeError), timer.phase("backend"):
        raise RuntimeError("kernel failed")  # no synchronize after a failed phase: the error is what counts
    assert len(synced) == 5
    timer.synchronize_with("cpu")
    with timer.phase("read"):
        pass
    assert len(synced) == 5
    PhaseTimer(enabled=False).synchronize_with("cuda:0")  # nothing to do, and no CUDA needed


def test_a_disabled_timer_measures_nothing() -> None:
    timer = PhaseTimer(enabled=False)
    assert timer.phase("read") is timer.phase("backend")  # one shared no-op context manager
    with timer.phase("read"):
        time.sleep(0.01)
    timer.note_case("x", 10**9)
    assert set(timer.seconds.values()) == {0.0} and timer.largest_case_bytes == 0


def test_merged_profiles_sum_seconds_and_take_the_largest_memory_and_case() -> None:
    a = {"wall_s": 2.0, "process_s": 2.0, "phases_s": {"read": 0.5, "transfer": 0.0, "backend": 1.0, "judge": 0.25,
                                                       "report": 0.05, "other": 0.2},
         "cases": 3, "peak_rss_mib": 300.0, "largest_case_bytes": 100, "largest_case_id": "a"}
    b = {"wall_s": 1.0, "process_s": 1.0, "phases_s": {"read": 0.25, "transfer": 0.125, "backend": 0.25,
                                                       "judge": 0.125, "report": 0.05, "other": 0.2},
         "cases": 2, "peak_rss_mib": 400.0, "largest_case_bytes": 50, "largest_case_id": "b"}
    merged = merge_profiles([a, b])
    assert merged is not None
    assert merged["wall_s"] == merged["process_s"] == 3.0
    assert merged["phases_s"] == {"read": 0.75, "transfer": 0.125, "backend": 1.25, "judge": 0.375, "report": 0.1,
                                  "other": 0.4}
    assert (merged["cases"], merged["peak_rss_mib"], merged["largest_case_bytes"], merged["largest_case_id"]) == (
        5, 400.0, 100, "a")
    assert merge_profiles([a, None]) is None  # a partial sum would mislead
    assert RunProfile.from_json(a).to_json() == a


def test_merge_combines_the_profiles_of_profiled_shards(tmp_path: Path) -> None:
    shards = [run_report(tmp_path, f"s{i}", "--backend", "naive", *GQA, "--shard", f"{i}/2", "--profile")[1]
              for i in range(2)]
    files = [tmp_path / f"s{i}.json" for i in range(2)]
    result = CliRunner().invoke(app, ["merge", *map(str, files), "--out", str(tmp_path / "merged.json")])
    assert result.exit_code in (0, 1), result.output
    merged = json.loads((tmp_path / "merged.json").read_text())["profile"]
    check_profile(merged, GQA_CASES)
    assert merged["wall_s"] == pytest.approx(sum(s["profile"]["wall_s"] for s in shards), abs=1e-5)
    assert merged["phases_s"]["backend"] == pytest.approx(sum(s["profile"]["phases_s"]["backend"] for s in shards),
                                                          abs=1e-5)
    assert merged["peak_rss_mib"] == max(s["profile"]["peak_rss_mib"] for s in shards)
    assert merged["largest_case_bytes"] == max(s["profile"]["largest_case_bytes"] for s in shards)
    assert "peak RSS" in result.stdout
    plain = run_report(tmp_path, "plain", "--backend", "naive", *GQA, "--shard", "1/2")[0]
    assert plain.exit_code in (0, 1)
    result = CliRunner().invoke(app, ["merge", str(files[0]), str(tmp_path / "plain.json"), "--out",
                                      str(tmp_path / "m2.json")])
    assert result.exit_code in (0, 1), result.output
    assert "profile" not in json.loads((tmp_path / "m2.json").read_text())


# --- --devices -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result, Result]:
    """The committed smoke goldens through `naive`, in one process and over --devices cpu,cpu (the
    forward checks: the split of the cases over the workers is what is tested)."""
    tmp = tmp_path_factory.mktemp("smoke-runs")
    forward = ["--checks", ",".join(c for c in GOLDEN_CHECKS if c not in GRADIENT_CHECKS)]
    single = invoke("--backend", "naive", "--report-json", tmp / "single.json", "--junit", tmp / "single.xml",
                    "--profile", *forward)
    split = invoke("--backend", "naive", "--devices", "cpu,cpu", "--report-json", tmp / "devices.json",
                   "--junit", tmp / "devices.xml", "--profile", *forward)
    return tmp, single, split


def test_devices_cpu_cpu_gives_the_records_of_a_one_process_run(smoke_runs: tuple[Path, Result, Result]) -> None:
    tmp, single, split = smoke_runs
    assert single.exit_code in (0, 1), single.output
    assert split.exit_code == single.exit_code, split.output
    one = json.loads((tmp / "single.json").read_text())
    two = json.loads((tmp / "devices.json").read_text())
    assert len(one["records"]) > 900 and one["summary"]["cases"] == SMOKE_CASES
    assert two["records"] == one["records"]  # same cases, checks, statuses, metrics and messages, same order
    assert two["summary"] == one["summary"] and two["complete"] is True
    assert two["backend"]["device"] == "cpu,cpu" and [d["device"] for d in two["devices"]] == ["cpu", "cpu"]
    assert sum(d["cases"] for d in two["devices"]) == SMOKE_CASES and all(d["complete"] for d in two["devices"])
    assert all(d["cases"] == d["finished"] and d["ended"] is None for d in two["devices"])
    junit = [[(tc.get("classname"), tc.get("name"), [c.tag for c in tc]) for tc in ET.parse(tmp / f"{n}.xml").iter(
        "testcase")] for n in ("single", "devices")]
    assert junit[0] == junit[1]
    # the same console summary (its title names both devices) and verdict line
    def summary(result: Result) -> str:
        text = result.stdout.split("JSON report")[0].replace("cpu,cpu", "cpu")
        return " ".join(text.split())  # the title is centred and wrapped to its own length

    assert summary(split) == summary(single) and "worst offenders" in summary(single)
    assert f"backend naive on cpu,cpu, {SMOKE_CASES} cases" in " ".join(split.stdout.split())
    assert split.stdout.splitlines()[-1] == single.stdout.splitlines()[-1]


def test_devices_profile_sums_the_devices_and_lists_each(smoke_runs: tuple[Path, Result, Result]) -> None:
    tmp, _, split = smoke_runs
    profile = json.loads((tmp / "devices.json").read_text())["profile"]
    check_profile(profile, SMOKE_CASES)
    assert [d["device"] for d in profile["devices"]] == ["cpu", "cpu"]
    assert sum(d["cases"] for d in profile["devices"]) == SMOKE_CASES
    for phase in ("read", "transfer", "backend", "judge"):
        assert profile["phases_s"][phase] == pytest.approx(sum(d["phases_s"][phase] for d in profile["devices"]),
                                                           abs=1e-5)
    assert profile["process_s"] >= sum(d["process_s"] for d in profile["devices"]) - 1e-5
    assert profile["peak_rss_mib"] >= max(d["peak_rss_mib"] for d in profile["devices"])
    assert len(re.findall(r"^  cpu: \d+ cases in ", split.stdout, re.MULTILINE)) == 2


def test_shares_are_balanced_by_golden_size_and_deterministic() -> None:
    paths = select_cases(SMOKE)
    sizes = golden_sizes(paths, [SMOKE])
    assert sizes == [p.stat().st_size for p in paths]
    keys = [p.as_posix() for p in paths]
    shares = balance(sizes, keys, 3)
    assert shares == balance(sizes, keys, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(paths)))
    loads = [sum(sizes[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes)  # greedy LPT: within one case of each other
    assert balance([5, 1, 1, 1], ["a", "b", "c", "d"], 2) == [[0], [1, 2, 3]]
    assert balance([1], ["a"], 3) == [[0], [], []]


@pytest.mark.parametrize(("devices", "message"), [
    ("", "error: --devices '': expected a comma-separated list"),
    ("cpu,", "error: --devices 'cpu,': expected a comma-separated list"),
    ("gpu:0", "error: --devices: 'gpu:0' is not a torch device"),
    ("cuda:x", "error: --devices: 'cuda:x' is not a torch device"),
    ("meta", "error: --devices: 'meta': device type 'meta' is not supported here"),
])
def test_a_bad_device_list_is_one_line_and_exit_two(devices: str, message: str) -> None:
    result = invoke("--backend", "naive", "--devices", devices)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(message), result.stderr


def test_a_cuda_index_that_does_not_exist_is_refused() -> None:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result = invoke("--backend", "naive", "--devices", f"cpu,cuda:{count}")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: --devices: 'cuda:{count}': " + (
        "does not exist" if count else "CUDA is not available"))
    with pytest.raises(ConformanceError):
        parse_devices(f"cuda:{count}")
    assert parse_devices(" cpu , cpu:0 ") == ["cpu", "cpu"]


@pytest.mark.parametrize(("other", "message"), [
    (["--device", "cpu"], "error: --devices cannot be combined with --device"),
    (["--shard", "0/2"], "error: --devices cannot be combined with --shard"),
])
def test_devices_excludes_device_and_shard(other: list[str], message: str) -> None:
    result = invoke("--backend", "naive", "--devices", "cpu,cpu", *other)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)


def test_a_backend_that_cannot_load_on_a_device_is_one_line_and_exit_two() -> None:
    result = invoke("--backend", "no-such-backend", "--devices", "cpu,cpu")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: unknown backend 'no-such-backend'")


# --- --devices: a worker that dies, a signal ---------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROBUSTNESS), str(ROOT),
                                                             os.environ.get("PYTHONPATH", "")]),
                "COLUMNS": "200", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "conformance", "run", *COMMON, *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_worker_that_dies_costs_its_case_and_the_run_is_incomplete(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = cli("--backend", "faulty_backends:CrashesOneInTen", "--filter", "attention/*", "--checks",
               "accuracy,contract", "--devices", "cpu,cpu", "--report-json", str(report))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stdout + stderr
    data = json.loads(report.read_text())
    assert data["complete"] is False and "interrupted_by" not in data
    died = [d for d in data["devices"] if d["ended"]]
    assert died and all(not d["complete"] and d["finished"] < d["cases"] for d in died)
    errors = [r for r in data["records"] if r["status"] == "error"]
    assert len(errors) == len(died)
    assert all(r["message"].startswith("the worker process on cpu ") and r["op"] == "attention" for r in errors)
    assert "INCOMPLETE: the worker process on cpu" in stdout


def test_ctrl_c_stops_every_device_and_keeps_each_finished_case(tmp_path: Path) -> None:
    calls, report = tmp_path / "calls.log", tmp_path / "report.json"
    checks = ["accuracy", "contract"]
    proc = cli("--backend", "faulty_backends:Slow", "--filter", "attention/*", "--checks", ",".join(checks),
               "--devices", "cpu,cpu", "--report-json", str(report), env={"RLK_TEST_CALL_LOG": str(calls)})
    deadline = time.monotonic() + 120
    while not (calls.exists() and len(calls.read_text().splitlines()) >= 8):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    data = json.loads(report.read_text())
    assert data["complete"] is False and data["interrupted_by"] == "SIGINT"
    per_case = Counter(r["case_id"] for r in data["records"])
    assert per_case and set(per_case.values()) == {len(checks)}  # every finished case whole, nothing else
    assert sum(d["finished"] for d in data["devices"]) == len(per_case) < SMOKE_ATTENTION_CASES
    line = f"INTERRUPTED by SIGINT: {len(per_case)} of {SMOKE_ATTENTION_CASES} cases finished"
    assert line in " ".join(stdout.split())
