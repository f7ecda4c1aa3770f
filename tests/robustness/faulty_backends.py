"""Backends with one injected fault each, for the robustness tests.

Each is SDPA's math kernel (correct, fast on CPU) with one thing broken. ``supports()`` runs before a
case's calls, so a backend learns the case id there and can fault on chosen cases only. The CLI
loads them as ``faulty_backends:<Class>`` with this directory on PYTHONPATH (or as the working
directory); tests in this process import them directly.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from conformance.backends.sdpa import SdpaMathBackend


def crashes_on(case_id: str) -> bool:
    """One case in ten, chosen by a stable hash of its id."""
    return zlib.crc32(case_id.encode()) % 10 == 0


def segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV


class Tracking(SdpaMathBackend):
    """Correct; remembers the id of the case being run (``self.case_id``)."""

    name = "faulty-tracking"
    case_id = ""

    def supports(self, op: str, case: Any) -> bool | str:
        self.case_id = case.id
        return super().supports(op, case)


# --- faults that a contract check catches in-process ------------------------------------------------


class Raises(Tracking):
    name = "faulty-raises"

    def attention(self, q, k, v, **kw):
        raise RuntimeError("kernel launch failed: invalid configuration argument")


class WrongShape(Tracking):
    name = "faulty-wrong-shape"

    def attention(self, q, k, v, **kw):
        return super().attention(q, k, v, **kw)[:, :, :, :-1]


class WrongDtype(Tracking):
    name = "faulty-wrong-dtype"

    def attention(self, q, k, v, **kw):
        return super().attention(q, k, v, **kw).to(torch.float64)


class WrongDevice(Tracking):
    name = "faulty-wrong-device"

    def attention(self, q, k, v, **kw):
        return torch.empty(q.shape, dtype=q.dtype, device="meta")


class ReturnsNaN(Tracking):
    name = "faulty-nan"

    def attention(self, q, k, v, **kw):
        return torch.full_like(q, float("nan"))


class ReturnsNone(Tracking):
    name = "faulty-none"

    def attention(self, q, k, v, **kw):
        return None


class MutatesInputs(Tracking):
    name = "faulty-mutates"

    def attention(self, q, k, v, **kw):
        out = super().attention(q, k, v, **kw)
        k.mul_(2)  # after computing: the output is right, the caller's keys are not
        return out


class SupportsRaises(Tracking):
    """``supports()`` itself raises: not a call the Invoker guards."""

    name = "faulty-supports-raises"

    def supports(self, op: str, case: Any) -> bool | str:
        raise KeyError("no tuning entry for this shape")


# --- faults that only process isolation survives ------------------------------------------------------


class CrashesOneInTen(Tracking):
    """Kills its process on one case in ten (:func:`crashes_on`): SIGSEGV or os._exit(3), alternately."""

    name = "faulty-crashes-one-in-ten"

    def attention(self, q, k, v, **kw):
        if crashes_on(self.case_id):
            if zlib.crc32(self.case_id.encode()) % 20 == 0:
                segfault()
            os._exit(3)
        return super().attention(q, k, v, **kw)

    def kv_cache_attention(self, q, k_cache, v_cache, k_new, v_new, **kw):
        if crashes_on(self.case_id):
            os._exit(3)
        return super().kv_cache_attention(q, k_cache, v_cache, k_new, v_new, **kw)


# Which fault PerCaseFault injects, by a substring of the case id (the first match wins).
PER_CASE_FAULTS = {
    "sq1-skv1-": "segfault",
    "sq1-skv127-": "exit",
    "sq1-skv129-": "sigkill",
    "sq1-skv63-": "device-assert",
    "sq1-skv65-fp16-noncausal": "hang",
}


class PerCaseFault(Tracking):
    """One fault per chosen case (:data:`PER_CASE_FAULTS`); correct elsewhere.

    ``device-assert`` imitates CUDA's device-side assert: the call raises, and every later call in
    this process raises too (the context is poisoned), as on a real GPU.
    """

    name = "faulty-per-case"
    poisoned = False

    def attention(self, q, k, v, **kw):
        if PerCaseFault.poisoned:
            raise RuntimeError("CUDA error: device-side assert triggered (context poisoned by an earlier call)")
        fault = next((f for key, f in PER_CASE_FAULTS.items() if key in self.case_id), None)
        if fault == "segfault":
            segfault()
        elif fault == "exit":
            os._exit(7)
        elif fault == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "device-assert":
            PerCaseFault.poisoned = True
            raise RuntimeError("CUDA error: device-side assert triggered")
        elif fault == "hang":
            while True:
                time.sleep(1)
        return super().attention(q, k, v, **kw)


class Slow(Tracking):
    """Correct but slow; appends the case id to ``$RLK_TEST_CALL_LOG`` on every call, so that a test
    can send a signal once some cases are done."""

    name = "faulty-slow"

    def attention(self, q, k, v, **kw):
        log = os.environ.get("RLK_TEST_CALL_LOG")
        if log:
            with Path(log).open("a") as f:
                f.write(self.case_id + "\n")
        time.sleep(0.15)
        return super().attention(q, k, v, **kw)


class BrokenConstructor(Tracking):
    name = "faulty-constructor"

    def __init__(self, device: str | None = None) -> None:
        raise OSError("libfancykernel.so: cannot open shared object file")


class SegfaultingConstructor(Tracking):
    name = "faulty-constructor-segfault"

    def __init__(self, device: str | None = None) -> None:
        segfault()


class Interrupts(Tracking):
    """Raises ``exc`` (KeyboardInterrupt, or the runner's Terminated) on the call of case number ``at``,
    as the signal handler would in the middle of a kernel."""

    name = "faulty-interrupts"

    def __init__(self, exc: BaseException, at: int) -> None:
        super().__init__()
        self.exc, self.at, self.calls = exc, at, 0

    def attention(self, q, k, v, **kw):
        self.calls += 1
        if self.calls == self.at:
            raise self.exc
        return super().attention(q, k, v, **kw)
