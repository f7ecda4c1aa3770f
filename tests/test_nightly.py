"""The nightly lane refuses clearly when there is no GPU, runs its backends in parallel with a
property-search budget (its commands faked here), and nox runs it without a virtualenv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conformance import nightly

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the lane would really run")
def test_nightly_without_cuda_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "conformance.nightly", "--out", str(tmp_path / "n")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: no CUDA backend is available on this machine; the nightly "
                                               "lane needs a GPU"]
    assert not (tmp_path / "n").exists()


def test_noxfile_declares_the_ci_conformance_and_nightly_sessions() -> None:
    text = (ROOT / "noxfile.py").read_text()
    for session in ("def tests(", "def lint(", "def goldens(", "def conformance(", "def nightly("):
        assert session in text


# --- the lane's plumbing, with every rlk-conform command replaced by a fake -------------------------------


class FakeCommands:
    """Stands in for subprocess.run: records each command (and its log and environment), writes the
    JSON report a run or check would, and returns the exit code asked for per step."""

    def __init__(self, codes: dict[str, int] | None = None, seconds: float = 0.2) -> None:
        self.codes = codes or {}
        self.seconds = seconds
        self.calls: list[tuple[str, list[str], str, dict[str, str] | None]] = []
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0

    def __call__(self, cmd: list[str], stdout: Any, stderr: Any, check: bool, env: Any) -> subprocess.CompletedProcess:
        step = cmd[3] if cmd[3] not in ("run", "check") else f"{cmd[3]}-{cmd[cmd.index('--backend') + 1]}"
        with self.lock:
            self.calls.append((step, cmd, stdout.name, env))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            if step.startswith(("run-", "check-")):
                time.sleep(self.seconds)
                report = {"summary": {"by_status": {"pass": 3}, "unexpected_failures": 0},
                          "search": {"results": [{"property": "batch", "status": "pass", "examples_run": 7,
                                                  "stopped_by": "time-budget"}]}}
                Path(cmd[cmd.index("--report-json") + 1]).write_text(json.dumps(report))
            return subprocess.CompletedProcess(cmd, self.codes.get(step, 0))
        finally:
            with self.lock:
                self.active -= 1

    def steps(self) -> list[str]:
        return [step for step, *_ in self.calls]

    def command(self, step: str) -> list[str]:
        (cmd,) = [cmd for s, cmd, *_ in self.calls if s == step]
        return cmd


def lane(monkeypatch: pytest.MonkeyPatch, fake: FakeCommands, *args: str) -> int:
    monkeypatch.setattr(nightly.subprocess, "run", fake)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return nightly.main(list(args))


def test_generation_takes_generates_default_workers_unless_jobs_is_given(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    fake = FakeCommands()
    assert lane(monkeypatch, fake, "--out", str(tmp_path / "d"), "--backends", "a") == 0
    assert "--jobs" not in fake.command("generate")
    fake = FakeCommands()
    assert lane(monkeypatch, fake, "--out", str(tmp_path / "j"), "--backends", "a", "--jobs", "5") == 0
    generate = fake.command("generate")
    assert generate[generate.index("--jobs") + 1] == "5"


def test_backends_run_in_parallel_each_with_its_own_logs_and_the_check_budget(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCommands()
    out = tmp_path / "n"
    code = lane(monkeypatch, fake, "--out", str(out), "--backends", "a,b,c", "--parallel", "2", "--check-budget",
                "7.5", "--max-examples", "9")
    assert code == 0
    steps = fake.steps()
    assert steps[0] == "generate" and steps[-1] == "report"
    assert sorted(steps[1:-1]) == ["check-a", "check-b", "check-c", "run-a", "run-b", "run-c"]
    for b in "abc":
        assert steps.index(f"run-{b}") < steps.index(f"check-{b}")  # a backend's check follows its run
    assert fake.most_active == 2  # two backends at a time, never more
    check = fake.command("check-b")
    assert check[check.index("--time-budget") + 1] == "7.5" and check[check.index("--max-examples") + 1] == "9"
    assert check[check.index("--report-json") + 1] == str(out / "check-b.json")
    assert "--time-budget" not in fake.command("run-b")
    for step, cmd, log, env in fake.calls:
        assert log == str(out / "logs" / f"{step}.log")
        assert " ".join(cmd[1:]) in (out / "logs" / f"{step}.log").read_text()
        if step.startswith(("run-", "check-")):
            assert env is not None and env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    report = fake.command("report")
    assert report[4:10] == [str(out / f"{kind}-{b}.json") for b in "abc" for kind in ("run", "check")]
    stdout = capsys.readouterr().out
    status = [line for line in stdout.splitlines() if line.startswith("nightly ")]
    assert [line.split(":")[0] for line in status] == ["nightly a", "nightly b", "nightly c"]
    assert status[0].startswith("nightly a: ok — run exit 0 (3 pass, 0 unexpected failures); check exit 0 "
                                "(1 held, 0 failed, 0 skipped; 7 examples, 1 of 1 properties stopped by the time "
                                "budget);")
    assert "nightly a: ok" in (out / "nightly.log").read_text()


def test_one_backend_at_a_time_and_no_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeCommands(seconds=0.05)
    code = lane(monkeypatch, fake, "--out", str(tmp_path / "n"), "--backends", "a,b", "--parallel", "1",
                "--check-budget", "0")
    assert code == 0
    assert fake.steps() == ["generate", "run-a", "check-a", "run-b", "check-b", "report"]
    assert fake.most_active == 1
    assert "--time-budget" not in fake.command("check-a") and "--max-examples" not in fake.command("check-a")
    assert all(env is None for *_, env in fake.calls)  # one at a time: the CPU threads are left alone


def test_the_default_budget_reaches_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeCommands(seconds=0)
    assert lane(monkeypatch, fake, "--out", str(tmp_path / "n"), "--backends", "a") == 0
    check = fake.command("check-a")
    assert check[check.index("--time-budget") + 1] == f"{nightly.DEFAULT_CHECK_BUDGET:g}"


@pytest.mark.parametrize(("codes", "status"), [({"check-b": 1}, 1), ({"run-a": 1}, 1), ({"generate": 1}, 2)],
                         ids=["check-fails", "run-fails", "generation-fails"])
def test_exit_status(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     codes: dict[str, int], status: int) -> None:
    fake = FakeCommands(codes, seconds=0)
    assert lane(monkeypatch, fake, "--out", str(tmp_path / "n"), "--backends", "a,b", "--parallel", "2") == status
    captured = capsys.readouterr()
    if status == 2:
        assert fake.steps() == ["generate"]
        assert "error: generating the standard goldens failed" in captured.err
    else:
        failing = next(iter(codes))[-1]
        assert f"nightly {failing}: FAIL" in captured.out
        assert f"exit {status}" in captured.out.splitlines()[-1]


@pytest.mark.parametrize(("backends", "cpus", "parallel"), [(5, 16, 4), (2, 16, 2), (5, 2, 1), (5, 128, 5), (1, 1, 1)])
def test_default_parallelism_is_one_backend_per_four_cores(backends: int, cpus: int, parallel: int) -> None:
    assert nightly.default_parallel(backends, cpus) == parallel


@pytest.mark.parametrize("args", [["--parallel", "0"], ["--check-budget", "-1"], ["--max-examples", "0"]])
def test_bad_options_are_refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        nightly.main(["--backends", "a", *args])
    assert exc.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_nox_without_a_virtualenv_installs_nothing_and_runs_the_lane() -> None:
    """`nox --no-venv` (an offline GPU runner): install() skips pip, the session runs this interpreter."""
    res = subprocess.run([sys.executable, "-m", "nox", "--no-venv", "-s", "nightly", "--", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "RLK_TORCH": ""})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "--check-budget SECONDS" in res.stdout and "--parallel N" in res.stdout
    assert "no virtualenv" in res.stderr and "pip install" not in res.stderr
