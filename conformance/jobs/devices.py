"""``rlk-conform run --devices d0,d1,...``: one worker process per device, one report.

The selected golden files are split into one share per device by a greedy longest-processing-time
balance over their sizes in the manifest (reading, checksumming, copying and judging a case all
grow with its file): largest file first, each to the device with the least total so far, ties by
path then device order, so the split depends only on the manifest and the device list. Each
worker (``spawn``, so CUDA starts fresh in each) calls :func:`conformance.jobs.job.execute` on
its device with its share — the same code as a one-device run — and streams every finished case
back. The parent puts the records back in the order a one-process run produces them, so the
console summary, ``--report-json``, ``--junit``, known failures and exit codes are those of a
single run.

Workers run in their own process group, so a Ctrl-C in the terminal reaches the parent only; the
parent passes the first SIGINT or SIGTERM on to every worker, which stops after its case in flight
like a one-process run, and kills the workers still running after :data:`GRACE_S` seconds or at a
second signal. A worker that dies (a segfault, the OOM killer) costs the case it was running, which
becomes an error record, and its unstarted cases; the other devices finish their shares and the
report says ``complete: false``. The job is handed to the worker when it is spawned; the worker's
messages are those of :mod:`conformance.run.wire` (JSON, never unpickled).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance.errors import ConformanceError
from conformance.jobs.job import JobResult, RunJob, execute, job_info
from conformance.judge.records import Record
from conformance.processes import Terminated, balance, exit_with_parent, ignore_signals, signals_held, stop_on_signals
from conformance.run import wire
from conformance.run.case import CaseOutcome
from conformance.run.profiling import PhaseTimer, RunProfile

GRACE_S = 30.0  # after passing a signal on: how long the workers may take to stop before they are killed
POLL_S = 0.2


def parse_devices(text: str) -> list[str]:
    """The devices of ``--devices`` (``cuda:0,cuda:1``; ``cpu,cpu`` too), each a torch device that
    exists here. Raises ConformanceError with a one-line message otherwise. Needs no backend."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise ConformanceError(f"--devices {text!r}: expected a comma-separated list of torch devices, "
                               "e.g. cuda:0,cuda:1")
    import torch

    devices = []
    for item in items:
        try:
            dev = torch.device(item)
        except (RuntimeError, ValueError, TypeError):
            raise ConformanceError(f"--devices: {item!r} is not a torch device (expected e.g. cpu, cuda, cuda:1)"
                                   ) from None
        if dev.type != "cpu":
            accelerator = getattr(torch, dev.type, None)
            if not (callable(getattr(accelerator, "is_available", None))
                    and callable(getattr(accelerator, "device_count", None))):
                raise ConformanceError(f"--devices: {item!r}: device type {dev.type!r} is not supported here "
                                       "(use cpu or cuda[:N])")
            if not accelerator.is_available():  # type: ignore[union-attr]
                raise ConformanceError(f"--devices: {item!r}: {dev.type.upper()} is not available on this machine "
                                       f"(torch {torch.__version__})")
            count = int(accelerator.device_count())  # type: ignore[union-attr]
            if dev.index is not None and dev.index >= count:
                raise ConformanceError(f"--devices: {item!r} does not exist: this machine has {count} {dev.type} "
                                       f"device(s), {dev.type}:0 to {dev.type}:{count - 1}")
        devices.append("cpu" if dev.type == "cpu" else str(dev))  # there is one CPU device; tensors say "cpu"
    return devices


def golden_sizes(paths: Sequence[Path], roots: Sequence[Path]) -> list[int]:
    """The size in bytes of each golden file, from the manifests of ``roots`` (``stat`` for a file
    none of them lists, 0 when that fails too)."""
    from conformance.golden.manifest import read_manifest

    listed: dict[Path, int] = {}
    for root in roots:
        for entry in read_manifest(root)["files"]:
            listed[root / entry["path"]] = int(entry.get("bytes") or 0)
    sizes = []
    for path in paths:
        size = listed.get(path)
        if size is None:
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
        sizes.append(size)
    return sizes


def device_worker(conn: multiprocessing.connection.Connection, job: RunJob, spawned_at: float) -> None:
    """One device's worker: :func:`~conformance.jobs.job.execute` ``job`` and report to the parent
    (:mod:`conformance.run.wire`): Ready once the backend is loaded, CaseDone (``index`` k) as the
    k-th golden of ``job.paths`` finishes, then Done; or Fatal for an error that stops a one-process
    run too (exit code 2). ``spawned_at`` (``time.time()`` when the parent started this process)
    starts the worker's wall time, so its start-up counts as 'other'."""
    with contextlib.suppress(OSError):
        os.setpgrp()  # a Ctrl-C in the terminal goes to the parent only, which passes it on once
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (nohup, &)
    exit_with_parent()
    timer = PhaseTimer(enabled=job.profile)
    timer.started -= max(0.0, time.time() - spawned_at)  # the interpreter's start and imports are 'other'
    finished = [0]

    def send(message: wire.Message) -> None:
        with signals_held():
            wire.send(conn, message)
            if isinstance(message, wire.CaseDone):
                finished[0] += 1

    def on_outcome(path: Path, outcome: CaseOutcome) -> None:
        send(wire.CaseDone(outcome.records, refused=outcome.refused, index=finished[0]))

    done = wire.Done(complete=False)
    try:
        with stop_on_signals():
            job_result = execute(job, timer, on_ready=send, on_outcome=on_outcome)
    except (KeyboardInterrupt, Terminated) as exc:  # stopped outside the case loop (start-up, property search)
        done = wire.Done(complete=False, interrupted_by="SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM")
    except ConformanceError as exc:
        ignore_signals()
        send(wire.Fatal(str(exc)))
        return
    else:
        result = job_result.result
        done = wire.Done(complete=result.complete, interrupted_by=result.interrupted_by,
                         property_records=job_result.property_records, restarts=job_result.restarts)
    ignore_signals()  # stopped or finished: a late signal must not end this process with a traceback
    if job.profile:
        done = dataclasses.replace(done, profile={"device": job.device, **timer.profile(finished[0]).to_json()})
    send(done)


def _case_of(path: Path) -> dict[str, Any]:
    """case_id, op, family and dtype of a golden path, from its case id alone (``<op>/<family>/<variant>``,
    the variant naming the dtype as fp32, bf16 or fp16): for the error record of a case whose worker
    died before its golden could be reported."""
    from conformance.golden.manifest import case_id_of
    from conformance.spec.case import DTYPE_SHORT

    case_id = case_id_of(path)
    parts = case_id.split("/")
    tokens = set(parts[-1].split("-"))
    dtype = next((name for name, short in DTYPE_SHORT.items() if short in tokens), "")
    return {"case_id": case_id, "op": parts[0] if len(parts) == 3 else "?",
            "family": parts[1] if len(parts) == 3 else "", "dtype": dtype}


@dataclass
class DevicesResult(JobResult):
    """The :class:`~conformance.jobs.job.JobResult` of the whole run (``info`` from the first
    device whose worker loaded the backend; None only when interrupted before any did) and, per
    device: ``devices`` (the report's objects), ``profiles`` (each worker's, with ``--profile``),
    ``failures`` (a line per worker that died on its own); ``waited_s``: the parent's time spent
    waiting for its workers."""

    devices: list[dict[str, Any]] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    waited_s: float = 0.0


@dataclass
class _Worker:
    device: str
    indices: list[int]  # into the run's paths, ascending
    proc: Any
    conn: multiprocessing.connection.Connection
    ready: wire.Ready | None = None
    finished: int = 0
    refused: int = 0
    done: wire.Done | None = None
    ended: str | None = None  # how the process ended when it ended without reporting "done"
    open: bool = True  # its pipe has not reached its end yet
    killed: bool = False  # by this run (after an interrupt, or to stop the others after a fatal error)

    def send_signal(self, sig: signal.Signals) -> None:
        if self.proc.exitcode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.exitcode is None:
            self.killed = True
            with contextlib.suppress(Exception):
                self.proc.kill()

    def close(self) -> None:
        """The pipe reached its end: reap the process and note how it ended unless it sent ``done``."""
        from conformance.processes import describe_exit

        self.open = False
        with contextlib.suppress(OSError):
            self.conn.close()
        self.proc.join(5.0)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
        if self.done is None:
            self.ended = "was stopped by this run" if self.killed else describe_exit(self.proc.exitcode)[0]


class _DeviceRun:
    """The parent's side of one ``--devices`` run (see :func:`run_on_devices`)."""

    def __init__(self, job: RunJob, devices: Sequence[str], sizes: Sequence[int],
                 on_ready: Callable[[wire.Ready], None] | None,
                 on_case: Callable[[str, list[Record]], None] | None) -> None:
        self.job = job
        self.devices = list(devices)
        self.shares = balance(sizes, [p.as_posix() for p in job.paths], len(devices))
        self.on_ready = on_ready
        self.on_case = on_case
        self.workers: list[_Worker] = []
        self.outcomes: dict[int, list[Record]] = {}  # path index → its records
        self.interrupted_by: str | None = None  # the signal this process received
        self.fatal: str | None = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child; spawn starts clean
        for device, indices in zip(self.devices, self.shares):
            if not indices:
                continue
            share = tuple(self.job.paths[i] for i in indices)
            sub = dataclasses.replace(self.job, device=device, paths=share,
                                      properties=self.job.properties and not self.workers,
                                      checksums={p: self.job.checksums[p] for p in share if p in self.job.checksums})
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=device_worker, args=(send, sub, time.time()), name=f"rlk-conform-run-{device}")
            proc.start()
            send.close()  # the worker holds the only write end: the pipe ends when the worker does
            self.workers.append(_Worker(device, list(indices), proc, receive))

    def collect(self) -> None:
        """Read every worker's messages until all pipes end, a worker reports a fatal error, or one
        dies while loading the backend. Signals are deferred and acted on between messages."""
        from conformance.processes import deferred_signals

        with deferred_signals() as received:
            deadline: float | None = None
            handled = 0
            while self.fatal is None and any(w.open for w in self.workers):
                live = [w for w in self.workers if w.open]
                ready = multiprocessing.connection.wait([w.conn for w in live] + [w.proc.sentinel for w in live],
                                                        POLL_S)
                for w in live:
                    if w.conn in ready or w.proc.sentinel in ready:
                        self._drain(w)
                if len(received) > handled:
                    handled = len(received)
                    if self.interrupted_by is None:  # pass the first signal on, once, and give them time
                        self.interrupted_by = received[0]
                        deadline = time.monotonic() + GRACE_S
                        for w in self.workers:
                            w.send_signal(signal.Signals[received[0]])
                    else:  # a second signal: stop waiting
                        deadline = 0.0
                if deadline is not None and time.monotonic() >= deadline:
                    for w in self.workers:
                        w.kill()  # their pipes end; what they sent before is still read
                if self.fatal is None and self.interrupted_by is None:
                    self.fatal = self._died_while_loading()

    def _drain(self, w: _Worker) -> None:
        while w.open and self.fatal is None and w.conn.poll():
            try:
                message = wire.receive(w.conn)
            except Exception:  # the end of the pipe (EOFError), or a message its dying process left unfinished
                w.close()
                return
            self._handle(w, message)
        if w.open and w.proc.exitcode is not None and not w.conn.poll():
            w.close()  # ended, and everything it sent has been read

    def _handle(self, w: _Worker, message: wire.Message) -> None:
        if isinstance(message, wire.Ready):
            w.ready = message
            if self.on_ready is not None:
                self.on_ready(message)
        elif isinstance(message, wire.CaseDone):
            assert message.index is not None
            index = w.indices[message.index]
            self.outcomes[index] = message.records
            w.finished += 1
            w.refused += bool(message.refused)
            if self.on_case is not None:
                self.on_case(self.job.paths[index].name, message.records)
        elif isinstance(message, wire.Done):
            w.done = message
        elif isinstance(message, wire.Fatal):
            self.fatal = message.message

    def _died_while_loading(self) -> str | None:
        for w in self.workers:
            if not w.open and w.ready is None and w.done is None:
                return (f"--devices: the worker process on {w.device} {w.ended} while loading backend "
                        f"{self.job.backend!r}")
        return None

    def stop(self) -> None:
        for w in self.workers:
            w.kill()
            if w.open:
                w.close()

    def result(self, waited_s: float) -> DevicesResult:
        from conformance.run.case import case_error_record
        from conformance.run.loop import RunResult

        failures = []
        for w in self.workers:
            if w.done is not None or self.interrupted_by is not None:
                continue  # finished, or stopped by the signal this run received
            unrun = len(w.indices) - w.finished
            line = f"the worker process on {w.device} {w.ended} after {w.finished} of its {len(w.indices)} cases"
            if unrun:
                path = self.job.paths[w.indices[w.finished]]
                message = (f"the worker process on {w.device} {w.ended} while running this case; the other devices "
                           f"went on and the {unrun - 1} later case(s) of {w.device} were not run")
                self.outcomes[w.indices[w.finished]] = [
                    case_error_record(_case_of(path), path, self.job.settings, message, {"device": w.device})]
                line += f"; the case it was running is an error record, {unrun - 1} were not run"
            failures.append(line)
        records = [r for i in sorted(self.outcomes) for r in self.outcomes[i]]
        for w in self.workers:
            if w.done:
                records.extend(w.done.property_records)  # the property search, after the golden cases
        worker_signal = next((w.done.interrupted_by for w in self.workers if w.done and w.done.interrupted_by), None)
        result = RunResult(records=records, cases=sum(w.finished for w in self.workers),
                           refused=sum(w.refused for w in self.workers),
                           interrupted_by=self.interrupted_by or worker_signal)
        result.complete = (result.interrupted_by is None and not failures
                           and all(w.done is not None and w.done.complete for w in self.workers))
        ready = [w.ready for w in self.workers if w.ready is not None]
        restarts = [w.done.restarts for w in self.workers if w.done and w.done.restarts is not None]
        by_device = {(w.device, tuple(w.indices)): w for w in self.workers}
        report_devices = []
        for device, indices in zip(self.devices, self.shares):
            w = by_device.get((device, tuple(indices)))
            report_devices.append({
                "device": w.ready.backend["device"] if w and w.ready else device,
                "device_name": w.ready.execution_target.get("device_name") if w and w.ready else None,
                "cases": len(indices), "finished": w.finished if w else 0,
                "complete": w is None or bool(w.done and w.done.complete),
                "ended": w.ended if w else None})
        return DevicesResult(result=result, info=job_info(self.job, ready[0]) if ready else None,  # type: ignore[arg-type]
                             restarts=sum(restarts) if self.job.isolate else None, devices=report_devices,
                             profiles=[w.done.profile for w in self.workers if w.done and w.done.profile],
                             failures=failures, waited_s=waited_s)


def run_on_devices(job: RunJob, devices: Sequence[str], sizes: Sequence[int], *,
                   on_ready: Callable[[wire.Ready], None] | None = None,
                   on_case: Callable[[str, list[Record]], None] | None = None) -> DevicesResult:
    """Run ``job`` split over ``devices``, one worker process each (``sizes`` of ``job.paths``
    balance the split; a device whose share is empty gets no process). ``on_ready(ready)`` is called
    as each worker has loaded the backend, ``on_case(file name, records)`` as each case finishes.
    The records come back in ``job.paths`` order, then the first worker's property-search records.
    Raises ConformanceError, after stopping every worker, when a worker reports one (a backend that
    cannot be loaded on its device, say) or dies while loading the backend."""
    run = _DeviceRun(job, devices, sizes, on_ready, on_case)
    started = time.perf_counter()
    try:
        run.start()
        run.collect()
    finally:
        run.stop()
    if run.fatal is not None:
        raise ConformanceError(run.fatal)
    return run.result(time.perf_counter() - started)


def devices_profile(parent: RunProfile, waited_s: float, workers: Sequence[dict[str, Any]]) -> RunProfile:
    """The profile of a ``--devices`` run: the workers' profiles combined (phases, peak RSS, largest
    case; each kept under ``devices``), the parent's own phases (its reports) added, ``wall_s`` the
    parent's wall time and ``process_s`` the workers' plus the parent's time not spent waiting."""
    from conformance.run.profiling import PHASES

    parts = [RunProfile.from_json(p) for p in workers]
    total = RunProfile.combine(parts)
    total.wall_s = parent.wall_s
    total.process_s = sum(p.process_s for p in parts) + max(0.0, parent.wall_s - waited_s)
    for phase in PHASES:
        total.phases_s[phase] += parent.phases_s.get(phase, 0.0)
    total.cases = parent.cases
    total.peak_rss_bytes = max(total.peak_rss_bytes, parent.peak_rss_bytes)
    total.devices = [dict(p) for p in workers]
    return total
