"""``rlk-conform run --isolate``: every golden is read and judged in a worker subprocess, so that a
backend that segfaults, calls ``os._exit``, poisons its CUDA context or hangs costs one case, not the
night's run.

The parent never imports the backend: the worker loads it from the same spec string and device
(``load_backend``), reads the golden itself (``read_golden``, with all its guards)
and runs ``runner.judge_case``. Parent and worker speak JSON over a ``multiprocessing`` pipe, one
message per ``send_bytes`` — plain data only, nothing from a golden file is ever unpickled:

- worker → parent, once: ``{"kind": "ready", "backend": {...}, "compare_to": {...} | null,
  "execution_target": {...}, "numerical_settings": {...}}`` or ``{"kind": "fatal", "message": ...}``;
- parent → worker, per case: ``{"kind": "case", "path", "sha256", "max_case_bytes", "settings",
  "profile": bool}``;
- worker → parent, per case: ``{"kind": "started", "case": {...}}`` once the golden is read, then
  ``{"kind": "records", "records": [...], "restart": bool, "profile": {...} | null}``,
  ``{"kind": "refused", "message": ..., "profile": {...} | null}`` (a damaged golden) or
  ``{"kind": "fatal", "message": ...}`` (a user error that ends the run). ``profile`` (with
  ``--profile``) is the worker's :meth:`~conformance.profiling.PhaseTimer.snapshot` of that case.

A worker that dies (signal or exit code) or exceeds the per-case timeout is killed and replaced
before the next case; the case becomes one ``error`` record saying what happened. A worker whose
case ended in a CUDA error (a poisoned context) is replaced too. Workers are forked from a
forkserver that has imported torch once, so a restart costs milliseconds, and CUDA is never
initialised in a process that forks.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from .errors import ConformanceError, GoldenError
from .generate import exit_with_parent
from .golden import DEFAULT_MAX_CASE_BYTES, declared_bytes, read_golden
from .judge import Record
from .profiling import PhaseTimer
from .runner import CaseOutcome, Invoker, RunSettings, case_error_record, judge_case, refused_outcome
from .tolerances import Tolerances

DEFAULT_START_TIMEOUT_S = 300.0  # loading a GPU backend can take a while (CUDA init, JIT)
STOP_GRACE_S = 5.0
# Error text after which a CUDA context is unusable: every later call in that process fails too.
POISONED_CONTEXT = re.compile(r"CUDA error|device-side assert|illegal memory access|unspecified launch failure|"
                              r"CUDA_ERROR|cudaError|AcceleratorError", re.IGNORECASE)

_TIMED_OUT = object()
_DIED = object()


# --- the worker process ----------------------------------------------------------------------------


def _send(conn: multiprocessing.connection.Connection, message: dict[str, Any]) -> None:
    # NaN and ±Infinity travel as JSON's extension tokens, so metrics come back as the same floats.
    conn.send_bytes(json.dumps(message, allow_nan=True).encode())


def _plain(x: Any) -> Any:
    """Metrics as JSON data: numpy scalars to Python numbers, tuples to lists, non-finite floats kept."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _record_to_wire(r: Record) -> dict[str, Any]:
    return {"case_id": r.case_id, "op": r.op, "check": r.check, "status": r.status, "dtype": r.dtype,
            "family": r.family, "metrics": _plain(r.metrics), "message": r.message}


def _backend_info(backend: Any) -> dict[str, Any]:
    return {"name": backend.name, "device": str(backend.device),
            "output_dtype": None if getattr(backend, "output_dtype", None) is None else str(backend.output_dtype),
            "returns_lse": bool(getattr(backend, "returns_lse", False)),
            "description": str(getattr(backend, "description", "") or "")}


def _settings_to_json(settings: RunSettings) -> dict[str, Any]:
    return {"tolerances": settings.tolerances.model_dump(mode="json"), "checks": list(settings.checks),
            "rule_set": settings.rule_set, "reruns": settings.reruns}


def _settings_from_json(data: dict[str, Any]) -> RunSettings:
    return RunSettings(tolerances=Tolerances.model_validate(data["tolerances"]), checks=tuple(data["checks"]),
                       rule_set=data["rule_set"], reruns=data["reruns"])


def worker_main(conn: multiprocessing.connection.Connection, backend_spec: str, device: str | None,
                compare_spec: str | None, cwd: str, sys_path: list[str]) -> None:
    """The worker: load the backend(s), answer ``ready``, then judge one case per ``case`` message
    until the pipe closes. Ctrl-C and SIGTERM are the parent's to handle: it kills this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent()
    os.chdir(cwd)
    sys.path[:] = sys_path
    from .backends import load_backend
    from .environment import execution_target, numerical_settings

    try:
        backend = load_backend(backend_spec, device)
        other = load_backend(compare_spec, device) if compare_spec else None
    except ConformanceError as exc:
        _send(conn, {"kind": "fatal", "message": str(exc)})
        return
    except Exception as exc:
        _send(conn, {"kind": "fatal", "message": f"backend {backend_spec!r}: loading it raised "
                     f"{type(exc).__name__}: {' '.join(str(exc).split())}"})
        return
    _send(conn, {"kind": "ready", "backend": _backend_info(backend),
                 "compare_to": None if other is None else _backend_info(other),
                 "execution_target": execution_target(str(backend.device)), "numerical_settings": numerical_settings()})
    invoker = Invoker(backend)
    other_invoker = Invoker(other) if other is not None else None
    cached: tuple[str, RunSettings] | None = None
    while True:
        try:
            message = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        settings_text = json.dumps(message["settings"], sort_keys=True)
        if cached is None or cached[0] != settings_text:
            cached = (settings_text, _settings_from_json(message["settings"]))
        settings = cached[1]
        path = Path(message["path"])
        timer = PhaseTimer(enabled=bool(message.get("profile")))
        timer.synchronize_with(backend.device)
        invoker.timer = timer
        if other_invoker is not None:
            other_invoker.timer = timer
        loaded, refusal = None, ""
        with timer.phase("read"):
            try:
                loaded = read_golden(path, max_bytes=message["max_case_bytes"], expected_sha256=message["sha256"])
            except GoldenError as exc:
                refusal = str(exc)
        if loaded is None:
            _send(conn, {"kind": "refused", "message": refusal, "profile": timer.snapshot() if timer.enabled else None})
            continue
        case = loaded.case
        timer.note_case(case.id, declared_bytes(case))
        _send(conn, {"kind": "started", "case": {"case_id": case.id, "op": case.op, "dtype": case.dtype,
                                                 "family": case.family}})
        try:
            with timer.phase("judge"):
                records = judge_case(invoker, loaded, settings, other_invoker)
        except ConformanceError as exc:
            _send(conn, {"kind": "fatal", "message": str(exc)})
            return
        poisoned = any(r.status == "error" and POISONED_CONTEXT.search(r.message) for r in records)
        _send(conn, {"kind": "records", "records": [_record_to_wire(r) for r in records], "restart": poisoned,
                     "profile": timer.snapshot() if timer.enabled else None})
        if poisoned:
            return  # this process's CUDA context is unusable; the parent starts a fresh worker


# --- the parent side -------------------------------------------------------------------------------


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["conformance.isolation"])  # torch imported once, in the forkserver
    return ctx


def describe_exit(exitcode: int | None) -> tuple[str, dict[str, Any]]:
    """How a worker ended, for a message and for metrics: a signal by name, or an exit code."""
    if exitcode is None:
        return "stopped for an unknown reason", {"exit_code": None, "signal": None}
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        text = signal.strsignal(-exitcode) or name
        if -exitcode == signal.SIGKILL:
            text += "; out of memory, or killed from outside"
        return f"was killed by {name} ({text})", {"exit_code": exitcode, "signal": name}
    return f"exited with code {exitcode}", {"exit_code": exitcode, "signal": None}


class IsolatedBackend:
    """Stands in for a backend in :func:`conformance.runner.run`: cases are judged in a worker process.

    ``backend`` and ``compare_to`` are backend specs (registered names or ``module:attr``): backend
    objects cannot cross processes. ``timeout`` (seconds, None for none) bounds one case — reading
    its golden and every check — after which the worker is killed. :meth:`start` loads the backend
    in the worker and raises ConformanceError when it cannot; afterwards ``name``, ``device``,
    ``output_dtype``, ``returns_lse``, ``description``, ``compare_to_info``, ``execution_target``
    and ``numerical_settings`` describe what the worker loaded. Use it as a context manager.
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
        self.info: dict[str, Any] = {}
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None

    # what a report needs to know of the backend, as loaded by the worker
    @property
    def name(self) -> str:
        return str(self.info["backend"]["name"])

    @property
    def device(self) -> str:
        return str(self.info["backend"]["device"])

    @property
    def output_dtype(self) -> str | None:
        return self.info["backend"]["output_dtype"]

    @property
    def returns_lse(self) -> bool:
        return bool(self.info["backend"]["returns_lse"])

    @property
    def description(self) -> str:
        return str(self.info["backend"]["description"])

    @property
    def compare_to_info(self) -> dict[str, Any] | None:
        return self.info.get("compare_to")

    @property
    def execution_target(self) -> dict[str, Any]:
        return dict(self.info["execution_target"])

    @property
    def numerical_settings(self) -> dict[str, Any]:
        return dict(self.info["numerical_settings"])

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
        proc = ctx.Process(target=worker_main, name="rlk-conform-worker", daemon=True,
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
        assert isinstance(message, dict)
        if message["kind"] != "ready":
            self._kill()
            raise ConformanceError(str(message.get("message", f"backend {self.spec!r} could not be loaded")))
        self.info = message

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
        request = {"kind": "case", "path": str(path), "sha256": sha256, "max_case_bytes": max_case_bytes,
                   "settings": _settings_to_json(settings), "profile": profile}
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
                assert isinstance(message, dict)
                kind = message["kind"]
                if kind == "started":
                    started = message["case"]
                elif kind == "refused":
                    outcome = refused_outcome(path, message["message"])
                    outcome.profile = message.get("profile")
                    return outcome
                elif kind == "records":
                    if message["restart"]:
                        self._stop()
                        self.restarts += 1
                    return CaseOutcome([Record(**r) for r in message["records"]], profile=message.get("profile"))
                else:  # fatal: the same user error would have stopped an in-process run
                    self.close()
                    raise ConformanceError(str(message["message"]))
        except BaseException as exc:  # Ctrl-C, SIGTERM: the case in flight is abandoned with its worker
            if not isinstance(exc, ConformanceError):
                self._kill()
            raise

    def close(self) -> None:
        """Let the worker exit (it sees the pipe close), killing it if it does not within a few seconds."""
        self._stop()

    # --- worker plumbing ---

    def _send_request(self, request: dict[str, Any]) -> bool:
        """Send one request; False when the worker is already gone (its pipe is closed)."""
        assert self._conn is not None
        try:
            _send(self._conn, request)
        except OSError:
            return False
        return True

    def _receive(self, timeout: float | None) -> object:
        """The next message, ``_TIMED_OUT`` or ``_DIED`` (a message already sent wins over death)."""
        assert self._conn is not None and self._proc is not None
        ready = multiprocessing.connection.wait([self._conn, self._proc.sentinel], timeout)
        if self._conn in ready:
            try:
                return json.loads(self._conn.recv_bytes())
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
