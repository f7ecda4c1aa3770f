"""Faulty backends: one bad case gets a clear verdict, every other case is judged and reported.

In-process faults (raising, wrong shape, dtype or device, NaN, None, mutated inputs) are caught
by the contract checks. Faults that kill or hang the process (segfault, ``os._exit``, SIGKILL, a
CUDA device-side assert that poisons the context, an endless loop) need ``--isolate``: the case
becomes one ``error`` record naming the signal, exit code or timeout, and the run goes on in a
fresh worker. Ctrl-C and SIGTERM still write the reports, flagged incomplete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import faulty_backends as fb
import pytest
from conftest import is_variant_case, run_backend

from conformance.backends.registry import skip_reason
from conformance.errors import ConformanceError
from conformance.golden.format import read_golden
from conformance.golden.manifest import select_cases
from conformance.judge.records import Record
from conformance.processes import Terminated
from conformance.run.isolation import IsolatedBackend
from conformance.run.loop import RunResult
from conformance.run.settings import RunSettings
from conformance.spec.tolerances import load_tolerances

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SMOKE = REPO / "goldens" / "smoke"
TOLERANCES = load_tolerances(REPO / "specs" / "tolerances.yaml")
DECODE = "attention/decode/*"
CHECKS = ("accuracy", "contract")


def settings() -> RunSettings:
    return RunSettings(tolerances=TOLERANCES, checks=CHECKS)


def by_case(records: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r.case_id, []).append(r)
    return out


def case_ids(pattern: str) -> list[str]:
    return [p.relative_to(SMOKE).with_suffix("").as_posix() for p in select_cases(SMOKE, pattern)]


def cli(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
    """``rlk-conform`` in a subprocess, from the repository, with this directory importable."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                "COLUMNS": "200", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "conformance", *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)  # type: ignore[call-overload]


# --- faults the contract checks catch in-process ---------------------------------------------------

IN_PROCESS = [
    (fb.Raises, "error", "error", "RuntimeError: kernel launch failed: invalid configuration argument"),
    (fb.WrongShape, "error", "fail", "attention: the output has shape (2, 4, 1, 63), expected (2, 4, 1, 64)"),
    (fb.WrongDtype, "error", "fail", "the output has dtype torch.float64, expected torch."),
    (fb.WrongDevice, "error", "fail", "attention: the output is on meta, expected cpu"),
    (fb.ReturnsNone, "error", "fail", "attention returned NoneType, not a torch.Tensor"),
    (fb.ReturnsNaN, "fail", "fail", "attention returned 512 NaN/Inf elements (fully masked rows must be exactly 0)"),
    (fb.MutatesInputs, "pass", "fail", "attention modified its input 'k'"),
]


@pytest.mark.parametrize(("backend", "accuracy", "contract", "message"), IN_PROCESS,
                         ids=[b.name for b, *_ in IN_PROCESS])
def test_faulty_result_gets_a_contract_verdict_on_every_case(backend: type, accuracy: str, contract: str,
                                                             message: str) -> None:
    result = run_backend(backend(), select_cases(SMOKE, DECODE), settings())
    cases = by_case(result.records)
    assert list(cases) == case_ids(DECODE) and result.complete  # every case judged, none lost
    for records in cases.values():
        verdicts = {r.check: r for r in records}
        assert (verdicts["accuracy"].status, verdicts["contract"].status) == (accuracy, contract)
        assert message in verdicts["contract"].message


def test_backend_whose_supports_raises_gets_one_error_per_case_and_the_run_completes() -> None:
    result = run_backend(fb.SupportsRaises(), select_cases(SMOKE, DECODE), settings())
    assert [r.case_id for r in result.records] == case_ids(DECODE)
    assert {(r.check, r.status, r.message) for r in result.records} == {
        ("contract", "error", "the case could not be judged: KeyError: 'no tuning entry for this shape'")}


@pytest.mark.parametrize(("exc", "signal_name"), [(KeyboardInterrupt(), "SIGINT"), (Terminated(15), "SIGTERM")])
def test_interrupt_mid_case_returns_every_finished_case_flagged_incomplete(exc: BaseException,
                                                                          signal_name: str) -> None:
    result = run_backend(fb.Interrupts(exc, at=4), select_cases(SMOKE, DECODE), settings())
    assert (result.complete, result.interrupted_by, result.cases) == (False, signal_name, 3)
    assert list(by_case(result.records)) == case_ids(DECODE)[:3]
    assert all(len(recs) == len(CHECKS) for recs in by_case(result.records).values())


# --- faults only a worker process survives ---------------------------------------------------------


@pytest.fixture(scope="module")
def isolated_faults() -> tuple[RunResult, int]:
    """PerCaseFault over the smoke tier's decode cases in a worker, 2 s per case: five cases fault."""
    with IsolatedBackend("faulty_backends:PerCaseFault", timeout=2.0) as backend:
        result = run_backend(backend, select_cases(SMOKE, DECODE), settings())
        return result, backend.restarts


def records_of(result: RunResult, fragment: str) -> list[Record]:
    return [r for r in result.records if fragment in r.case_id]


@pytest.mark.parametrize(("fragment", "message", "metrics"), [
    ("sq1-skv1-", "the worker process was killed by SIGSEGV (Segmentation fault) while running the backend; the run "
                  "went on in a fresh worker", {"signal": "SIGSEGV", "exit_code": -11}),
    ("sq1-skv127-", "the worker process exited with code 7 while running the backend; the run went on in a fresh "
                    "worker", {"signal": None, "exit_code": 7}),
    ("sq1-skv129-", "the worker process was killed by SIGKILL (Killed; out of memory, or killed from outside) while "
                    "running the backend; the run went on in a fresh worker", {"signal": "SIGKILL", "exit_code": -9}),
    ("sq1-skv65-fp16-noncausal", "timed out after 2 s (running the backend); the worker was killed and the run went "
                                 "on in a fresh one", {"timeout_s": 2.0}),
], ids=["segfault", "os-exit", "sigkill", "hang"])
def test_killed_or_hung_case_is_one_error_record_naming_signal_exit_code_or_timeout(
        isolated_faults: tuple[RunResult, int], fragment: str, message: str, metrics: dict[str, object]) -> None:
    (record,) = records_of(isolated_faults[0], fragment)
    assert (record.check, record.status, record.message) == ("contract", "error", message)
    assert record.metrics.items() >= metrics.items()
    assert (record.op, record.family) == ("attention", "decode")  # the worker had read the golden


def test_device_side_assert_errors_its_case_and_the_next_case_runs_in_a_fresh_worker(
        isolated_faults: tuple[RunResult, int]) -> None:
    asserted = records_of(isolated_faults[0], "sq1-skv63-")
    assert {r.status for r in asserted} == {"error"}
    assert all("CUDA error: device-side assert triggered" in r.message for r in asserted)
    following = records_of(isolated_faults[0], "sq1-skv65-bf16")  # would fail in a poisoned process
    assert {r.status for r in following} == {"pass"}


def test_isolated_run_judges_every_other_case_and_counts_the_restarts(isolated_faults: tuple[RunResult, int]
                                                                      ) -> None:
    result, restarts = isolated_faults
    cases = by_case(result.records)
    assert list(cases) == case_ids(DECODE) and result.complete
    faulty = [c for c in cases if any(key in c for key in fb.PER_CASE_FAULTS)]
    assert len(faulty) == 5 and restarts == 5
    assert all(r.status == "pass" for c, recs in cases.items() if c not in faulty for r in recs)


def test_isolated_results_equal_in_process_results_on_healthy_cases() -> None:
    paths = select_cases(SMOKE, "kv_cache_attention/decode/*")
    with IsolatedBackend("faulty_backends:Tracking") as backend:
        isolated = run_backend(backend, paths, settings())
    direct = run_backend(fb.Tracking(), paths, settings())
    assert [r.to_json() for r in isolated.records] == [r.to_json() for r in direct.records]


def test_backend_that_fails_to_load_in_the_worker_is_one_clear_error() -> None:
    with pytest.raises(ConformanceError) as info:
        IsolatedBackend("faulty_backends:BrokenConstructor").start()
    assert str(info.value) == ("backend 'faulty_backends:BrokenConstructor': creating it raised OSError: "
                               "libfancykernel.so: cannot open shared object file; fix the backend's constructor "
                               "or factory")


def test_backend_that_crashes_while_loading_is_one_clear_error() -> None:
    with pytest.raises(ConformanceError) as info:
        IsolatedBackend("faulty_backends:SegfaultingConstructor").start()
    assert str(info.value) == ("backend 'faulty_backends:SegfaultingConstructor': the worker process was killed by "
                               "SIGSEGV (Segmentation fault) while loading it")


# --- the command line --------------------------------------------------------------------------------


def _op_and_case(case_id: str) -> tuple[str, Any]:
    case = read_golden(SMOKE / f"{case_id}.h5").case
    return case.op, case


def test_isolated_smoke_run_with_one_crash_in_ten_reports_those_cases_as_errors_and_the_rest_normally(
        tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = cli("run", "--backend", "faulty_backends:CrashesOneInTen", "--isolate", "--checks", ",".join(CHECKS),
               "--report-json", str(report))
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stdout + stderr
    data = json.loads(report.read_text())
    assert data["complete"] is True
    records = [Record(**r) for r in data["records"]]
    # A case the backend skips (soft-capping, sinks: SDPA cannot express them) never reaches the crash.
    crashed = {c for c in case_ids("*") if fb.crashes_on(c) and not (
        is_variant_case(c) and skip_reason(fb.Tracking(), *_op_and_case(c)))}
    assert 5 <= len(crashed) <= 30 and data["isolation"]["worker_restarts"] == len(crashed)
    cases = by_case(records)
    assert list(cases) == case_ids("*")  # every case of the tier, in order
    for case_id in crashed:
        (record,) = cases[case_id]
        assert record.status == "error" and record.check == "contract"
        assert record.message.startswith("the worker process ") and ("SIGSEGV" in record.message or
                                                                     "exited with code 3" in record.message)
    direct = run_backend(fb.Tracking(), select_cases(SMOKE, "*"), settings()).records
    expected = [r.to_json() for r in direct if r.case_id not in crashed]
    assert [r.to_json() for r in records if r.case_id not in crashed] == expected


def test_cli_timeout_kills_a_hung_case_and_goes_on(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = cli("run", "--backend", "faulty_backends:PerCaseFault", "--filter", "attention/decode/*-skv65-fp*",
               "--timeout", "1.5", "--checks", ",".join(CHECKS), "--report-json", str(report))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    data = json.loads(report.read_text())
    statuses = {(r["case_id"].rsplit("-", 2)[-2], r["check"], r["status"]) for r in data["records"]}
    # fp32: a healthy case; fp16 (non-causal): the one that hangs
    assert statuses == {("fp32", "accuracy", "pass"), ("fp32", "contract", "pass"), ("fp16", "contract", "error")}
    assert data["settings"]["isolate"] is True and data["settings"]["timeout_s"] == 1.5
    assert "timed out after 1.5 s (running the backend)" in stdout


@pytest.mark.parametrize(("sig", "isolate", "code"), [(signal.SIGTERM, True, 143), (signal.SIGINT, False, 130)],
                         ids=["sigterm-isolated", "ctrl-c-in-process"])
def test_signal_still_writes_both_reports_with_every_finished_record(tmp_path: Path, sig: signal.Signals,
                                                                     isolate: bool, code: int) -> None:
    calls, report, junit = tmp_path / "calls.log", tmp_path / "report.json", tmp_path / "junit.xml"
    proc = cli("run", "--backend", "faulty_backends:Slow", "--filter", "attention/*", "--checks", ",".join(CHECKS),
               "--report-json", str(report), "--junit", str(junit), *(["--isolate"] if isolate else []),
               env={"RLK_TEST_CALL_LOG": str(calls)})
    deadline = time.monotonic() + 60
    while not (calls.exists() and len(calls.read_text().splitlines()) >= 4):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stdout + stderr
    data = json.loads(report.read_text())
    assert data["complete"] is False and data["interrupted_by"] == sig.name
    finished = list(by_case([Record(**r) for r in data["records"]]))
    selected = case_ids("attention/*")
    assert 3 <= len(finished) < len(selected) and finished == selected[: len(finished)]
    assert Counter(r["case_id"] for r in data["records"]) == dict.fromkeys(finished, len(CHECKS))
    assert sum(1 for _ in ET.parse(junit).getroot().iter("testcase")) == len(data["records"])
    assert f"INTERRUPTED by {sig.name}: {len(finished)} of {len(selected)} cases finished" in " ".join(stdout.split())
