"""``rlk-conform run --isolate``: every golden is read and judged in a worker subprocess, so that a
backend that segfaults, calls ``os._exit``, poisons its CUDA context or hangs costs one case, not the
night's run.

The parent never imports the backend: the worker loads it from the same spec string and device
(``load_backend``), reads the golden itself (``read_golden``, with all its guards) and runs
:func:`~conformance.run.case.judge_case`. Parent and worker speak the messages of
:mod:`conformance.run.wire` (plain JSON data; nothing from a golden file is ever unpickled): the
worker answers :class:`~conformance.run.wire.Ready` once, then for each
:class:`~conformance.run.wire.CaseRequest` a :class:`~conformance.run.wire.Started` and a
:class:`~conformance.run.wire.CaseDone` (or :class:`~conformance.run.wire.Fatal` for a user error
that ends the run).

A worker that dies (signal or exit code) or exceeds the per-case timeout is killed and replaced
before the next case; the case becomes one ``error`` record saying what happened. A worker whose
case ended in a CUDA error (a poisoned context) is replaced too. Workers are forked from a
forkserver that has imported torch once, so a restart costs milliseconds, and CUDA is never
initialised in a process that forks. :meth:`IsolatedBackend.case_judge` is the per-case judge the
run loop (:func:`conformance.run.loop.run`) is given, exactly as an in-process one.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from conformance.errors import ConformanceError, GoldenError
from conformance.golden.format import DEFAULT_MAX_CASE_BYTES, declared_bytes
from conformance.processes import describe_exit, exit_with_parent
from conformance.run import wire
from conformance.run.case import CaseJudge, CaseOutcome, case_error_record, judge_case, read_case, refused_outcome
from conformance.run.invoker import Invoker
from conformance.run.profiling import NO_TIMER, PhaseTimer
from conformance.run.settings import RunSettings
from conformance.spec.case import Case

DEFAULT_START_TIMEOUT_S = 300.0  # loading a GPU backend can take a while (CUDA init, JIT)
STOP_GRACE_S = 5.0
# Error text after which a CUDA context is unusable: every later call in that process fails too.
POISONED_CONTEXT = re.compile(r"CUDA error|device-side assert|illegal memory access|unspecified launch failure|"
                              r"CUDA_ERROR|cudaError|AcceleratorError", re.IGNORECASE)
_TIMED_OUT = object()
_DIED = object()




def isolated_worker(conn: multiprocessing.connection.Connection, backend_spec: str, device: str | None,
                    compare_spec: str | None, cwd: str, sys_path: list[str]) -> None:
    """The worker: load the backend(s), answer Ready, then judge one case per CaseRequest until the
    pipe closes. Ctrl-C and SIGTERM are the parent's to handle: it kills this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent()
    os.chdir(cwd)
    sys.path[:] = sys_path
    from conformance.backends.registry import describe_backend, load_backend
    from conformance.environment import execution_target, numerical_settings

    try:
        backend = load_backend(backend_spec, device)
        other = load_backend(compare_spec, device) if compare_spec else None
    except ConformanceError as exc:
        wire.send(conn, wire.Fatal(str(exc)))
        return
    except Exception as exc:
        wire.send(conn, wire.Fatal(f"backend {backend_spec!r}: loading it raised {type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())}"))
        return
    wire.send(conn, wire.Ready(describe_backend(backend), None if other is None else describe_backend(other),
                               execution_target(str(backend.device)), numerical_settings()))
    invoker = Invoker(backend)
    other_invoker = Invoker(other) if other is not None else None
    while True:
        try:
            request = wire.receive(conn)
        except (EOFError, OSError):
            return
        assert isinstance(request, wire.CaseRequest)
        timer = PhaseTimer(enabled=request.profile)
        timer.synchronize_with(backend.device)
        invoker.timer = timer
        if other_invoker is not None:
            other_invoker.timer = timer
        loaded, refusal = None, ""
        with timer.phase("read"):
            try:
                loaded = read_case(request.path, request.max_case_bytes, request.sha256)
            except GoldenError as exc:
                refusal = str(exc)
        snapshot = timer.snapshot if timer.enabled else dict
        if loaded is None:
            wire.send(conn, wire.CaseDone(refused_outcome(request.path, refusal).records, refused=True,
                                          profile=snapshot() or None))
            continue
        case = loaded.case
        if isinstance(case, Case):
            timer.note_case(case.id, declared_bytes(case))
        wire.send(conn, wire.Started({"case_id": case.id, "op": case.op, "dtype": case.dtype, "family": case.family}))
        try:
            with timer.phase("judge"):
                records = judge_case(invoker, loaded, request.settings, other_invoker)
        except ConformanceError as exc:
            wire.send(conn, wire.Fatal(str(exc)))
            return
        poisoned = any(r.status == "error" and POISONED_CONTEXT.search(r.message) for r in records)
        wire.send(conn, wire.CaseDone(records, restart=poisoned, profile=snapshot() or None))
        if poisoned:
            return  # this process's CUDA context is unusable; the parent starts a fresh worker


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["conformance.run.isolation"])  # torch imported once, in the forkserver
    return ctx


class IsolatedBackend:
    """A backend judged in a worker process: :meth:`case_judge` is the run loop's per-case judge.

    ``backend`` and ``compare_to`` are backend specs (registered names or ``module:attr``): backend
    objects cannot cross processes. ``timeout`` (seconds, None for none) bounds one case — reading
    its golden and every check — after which the worker is killed. :meth:`start` loads the backend
    in the worker and raises ConformanceError when it cannot; afterwards :attr:`ready` (a
    :class:`~conformance.run.wire.Ready`) describes what the worker loaded, and ``name`` and
    ``device`` are those of the backend. Use it as a context manager.
    """

    def __init__(self, backend: str, device: str | None = None, compare_to: str | None = None,
                 timeout: float | None = None, start_timeout: float = DEFAULT_START_TIMEOUT_S) -> None:
        if timeout is not None and not timeout > 0:
            raise ConformanceError(f"--timeout {timeout}: a per-case timeout must be a positive number of seconds")
        self.spec = backend
        self.requested_device = device
        self.compare_spec = compare_to
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.restarts = 0  # workers replaced after a crash, a timeout or a poisoned context
        self.ready: wire.Ready | None = None
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None

    @property
    def name(self) -> str:
        assert self.ready is not None, "start() the worker first"
        return str(self.ready.backend["name"])

    @property
    def device(self) -> str:
        assert self.ready is not None, "start() the worker first"
        return str(self.ready.backend["device"])

    def __enter__(self) -> IsolatedBackend:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Start a worker and wait until it has loaded the backend(s); ConformanceError if it cannot."""
        if self._proc is not None:
            return
        ctx = _context()
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=isolated_worker, name="rlk-conform-worker", daemon=True,
                           args=(child_conn, self.spec, self.requested_device, self.compare_spec, os.getcwd(),
                                 list(sys.path)))
        proc.start()
        child_conn.close()
        self._proc, self._conn = proc, parent_conn
        try:
            message = self._receive(self.start_timeout)
        except BaseException:
            self._kill()
            raise
        if message is _TIMED_OUT:
            self._kill()
            raise ConformanceError(f"backend {self.spec!r}: the worker did not finish loading it within "
                                   f"{self.start_timeout:g} s")
        if message is _DIED:
            how, _ = describe_exit(self._reap())
            raise ConformanceError(f"backend {self.spec!r}: the worker process {how} while loading it")
        if not isinstance(message, wire.Ready):
            self._kill()
            raise ConformanceError(message.message if isinstance(message, wire.Fatal)
                                   else f"backend {self.spec!r} could not be loaded")
        self.ready = message

    def judge(self, path: Path, settings: RunSettings, sha256: str | None = None,
              max_case_bytes: int = DEFAULT_MAX_CASE_BYTES, profile: bool = False) -> CaseOutcome:
        """Judge one golden in the worker. A crash, a timeout or a worker that cannot be restarted
        becomes one error record of this case; a ConformanceError from the worker (a user error that
        would stop an in-process run too) is raised. KeyboardInterrupt and other BaseExceptions kill
        the worker and propagate. With ``profile`` the worker times the case (``outcome.profile``)."""
        if self._proc is None:
            try:
                self.start()
            except ConformanceError as exc:
                return CaseOutcome([case_error_record(None, path, settings, f"not run: the worker could not be "
                                                      f"restarted after the previous crash: {exc}", {})])
        started: dict[str, Any] | None = None
        begun = time.monotonic()
        request = wire.CaseRequest(path, sha256, max_case_bytes, settings, profile)
        try:
            sent = self._send_request(request)
            while True:
                left = None if self.timeout is None else max(0.0, self.timeout - (time.monotonic() - begun))
                message = self._receive(left) if sent else _DIED
                if message is _TIMED_OUT:
                    self._kill()
                    self.restarts += 1
                    stage = "reading its golden file" if started is None else "running the backend"
                    return CaseOutcome([case_error_record(started, path, settings,
                                                          f"timed out after {self.timeout:g} s ({stage}); the worker "
                                                          "was killed and the run went on in a fresh one",
                                                          {"timeout_s": self.timeout, "stage": stage})])
                if message is _DIED:
                    how, metrics = describe_exit(self._reap())
                    self.restarts += 1
                    stage = "reading its golden file" if started is None else "running the backend"
                    return CaseOutcome([case_error_record(started, path, settings,
                                                          f"the worker process {how} while {stage}; the run went "
                                                          "on in a fresh worker", {**metrics, "stage": stage})])
                if isinstance(message, wire.Started):
                    started = message.case
                elif isinstance(message, wire.CaseDone):
                    if message.restart:
                        self._stop()
                        self.restarts += 1
                    return CaseOutcome(message.records, refused=message.refused, profile=message.profile)
                else:  # Fatal: the same user error would have stopped an in-process run
                    self.close()
                    raise ConformanceError(message.message if isinstance(message, wire.Fatal)
                                           else f"unexpected message from the worker: {message!r}")
        except BaseException as exc:  # Ctrl-C, SIGTERM: the case in flight is abandoned with its worker
            if not isinstance(exc, ConformanceError):
                self._kill()
            raise

    def case_judge(self, settings: RunSettings, timer: PhaseTimer = NO_TIMER,
                   max_case_bytes: int = DEFAULT_MAX_CASE_BYTES,
                   checksums: Mapping[Path, str] | None = None) -> CaseJudge:
        """The run loop's per-case judge: :meth:`judge` with these settings; ``timer`` absorbs the
        worker's timings of each case (``--profile``)."""
        sums = checksums or {}

        def judge(path: Path) -> CaseOutcome:
            outcome = self.judge(path, settings, sums.get(path), max_case_bytes, profile=timer.enabled)
            timer.absorb(outcome.profile)
            return outcome

        return judge

    def close(self) -> None:
        """Let the worker exit (it sees the pipe close), killing it if it does not within a few seconds."""
        self._stop()

    # --- worker plumbing ---

    def _send_request(self, request: wire.CaseRequest) -> bool:
        """Send one request; False when the worker is already gone (its pipe is closed)."""
        assert self._conn is not None
        try:
            wire.send(self._conn, request)
        except OSError:
            return False
        return True

    def _receive(self, timeout: float | None) -> object:
        """The next message, ``_TIMED_OUT`` or ``_DIED`` (a message already sent wins over death)."""
        assert self._conn is not None and self._proc is not None
        ready = multiprocessing.connection.wait([self._conn, self._proc.sentinel], timeout)
        if self._conn in ready:
            try:
                return wire.receive(self._conn)
            except (EOFError, OSError):
                return _DIED
        return _DIED if ready else _TIMED_OUT

    def _reap(self) -> int | None:
        proc = self._proc
        self._forget()
        if proc is None:
            return None
        proc.join(STOP_GRACE_S)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        return proc.exitcode

    def _kill(self) -> None:
        proc = self._proc
        self._forget()
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.join()

    def _stop(self) -> None:
        proc = self._proc
        self._forget()
        if proc is not None:
            proc.join(STOP_GRACE_S)
            if proc.exitcode is None:
                proc.kill()
                proc.join()

    def _forget(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        self._proc, self._conn = None, None
