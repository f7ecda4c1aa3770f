"""``rlk-conform run --profile``: wall time per phase of a run, peak memory and the largest case.

A :class:`PhaseTimer` is handed to the run loop, which wraps its few phases in ``timer.phase(name)``:
reading a golden (``read``), host↔device copies (``transfer``), backend calls (``backend``), the
checks around them (``judge``) and writing the reports (``report``). Phases nest without overlap:
time spent in an inner phase (a backend call inside the judging of a case) is charged to the inner
phase only, so the phases add up to at most the wall time and the rest is ``other`` (start-up,
loading the backend, the property search). On a CUDA device each phase synchronizes the device when
it starts and ends, so that asynchronous kernels are charged to the phase that launched them. A
disabled timer (no ``--profile``) does nothing: its ``phase`` is a shared no-op context manager.

The result is a :class:`Profile`, written as the report's ``profile`` object
(docs/report-format.md) and combined over shards (``rlk-conform merge``) and devices (``--devices``).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

PHASES = ("read", "transfer", "backend", "judge", "report")
MIB = 2**20
_UNTIMED = contextlib.nullcontext()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes.

    On Linux this is ``VmHWM`` of /proc/self/status, the high-water mark of this process's own
    memory. ``getrusage(RUSAGE_SELF).ru_maxrss`` is the fallback elsewhere; on Linux it is avoided
    because a process started by fork and exec inherits its parent's high-water mark in it (a small
    run started from a large parent would report the parent's memory)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    try:
        import resource
    except ImportError:  # not on this platform
        return 0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # bytes on macOS, KiB elsewhere


@dataclass
class RunProfile:
    """Where the time and memory of a run went. ``phases_s`` holds the named phases; ``other`` is
    ``process_s`` minus their sum. ``process_s`` equals ``wall_s`` for a run in one process; for a
    ``--devices`` run it is the sum over the device workers plus the parent's own time, and in a
    merged report the sum over the shards (see :meth:`combine`)."""

    wall_s: float = 0.0
    process_s: float = 0.0
    phases_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    cases: int = 0
    peak_rss_bytes: int = 0
    largest_case_bytes: int = 0
    largest_case_id: str | None = None
    devices: list[dict[str, Any]] | None = None  # --devices: each device worker's own profile

    @property
    def other_s(self) -> float:
        return max(0.0, self.process_s - sum(self.phases_s.values()))

    def to_json(self) -> dict[str, Any]:
        named = {p: round(self.phases_s.get(p, 0.0), 6) for p in PHASES}
        process_s = round(self.process_s, 6)
        out: dict[str, Any] = {
            "wall_s": round(self.wall_s, 6),
            "process_s": process_s,
            "phases_s": {**named, "other": round(max(0.0, process_s - sum(named.values())), 6)},
            "cases": self.cases,
            "peak_rss_mib": round(self.peak_rss_bytes / MIB, 1),
            "largest_case_bytes": self.largest_case_bytes,
            "largest_case_id": self.largest_case_id,
        }
        if self.devices is not None:
            out["devices"] = self.devices
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunProfile:
        """The inverse of :meth:`to_json` (``other`` is recomputed); missing fields read as zero."""
        phases = data.get("phases_s") or {}
        wall = float(data.get("wall_s") or 0.0)
        return cls(wall_s=wall, process_s=float(data.get("process_s") or wall),
                   phases_s={p: float(phases.get(p) or 0.0) for p in PHASES}, cases=int(data.get("cases") or 0),
                   peak_rss_bytes=round(float(data.get("peak_rss_mib") or 0.0) * MIB),
                   largest_case_bytes=int(data.get("largest_case_bytes") or 0),
                   largest_case_id=data.get("largest_case_id"), devices=data.get("devices"))

    @classmethod
    def combine(cls, profiles: Sequence[RunProfile]) -> RunProfile:
        """The profile of several parts of one run: seconds and cases summed (``wall_s`` too: the
        total of the parts' wall times), peak RSS and largest case the maximum over the parts."""
        total = cls()
        for p in profiles:
            total.wall_s += p.wall_s
            total.process_s += p.process_s
            for phase in PHASES:
                total.phases_s[phase] += p.phases_s.get(phase, 0.0)
            total.cases += p.cases
            total.peak_rss_bytes = max(total.peak_rss_bytes, p.peak_rss_bytes)
            if p.largest_case_bytes > total.largest_case_bytes:
                total.largest_case_bytes, total.largest_case_id = p.largest_case_bytes, p.largest_case_id
            if p.devices is not None:
                total.devices = [*(total.devices or []), *p.devices]
        return total


def merge_profiles(profiles: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The ``profile`` of a merged report (:func:`conformance.report.merge_reports`): the shards'
    profiles combined, or None unless every shard was profiled (a partial sum would mislead)."""
    if not profiles or any(not isinstance(p, dict) for p in profiles):
        return None
    return RunProfile.combine([RunProfile.from_json(p) for p in profiles if p is not None]).to_json()


class PhaseTimer:
    """Wall time per phase (:data:`PHASES`), the largest case and peak memory of one process's run.

    ``with timer.phase("read"): ...`` charges the block to ``read``; phases nest, an inner phase
    pausing the enclosing one. After :meth:`synchronize_with` a CUDA device, every phase
    synchronizes it on entry and on a normal exit. ``PhaseTimer(enabled=False)`` measures nothing
    and costs next to nothing (the default of every call site without ``--profile``).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.largest_case_bytes = 0
        self.largest_case_id: str | None = None
        self.peak_rss_bytes = 0  # of other processes whose work this timer absorbed (an --isolate worker)
        self._stack: list[list[Any]] = []  # [phase, start of its current stretch]
        self._sync: Callable[[], None] | None = None

    def synchronize_with(self, device: Any) -> None:
        """Synchronize ``device`` around every phase when it is a CUDA device (no-op otherwise)."""
        if not self.enabled:
            return
        import torch

        dev = torch.device(device)
        self._sync = functools.partial(torch.cuda.synchronize, dev) if dev.type == "cuda" else None

    def phase(self, name: str) -> AbstractContextManager[None]:
        if not self.enabled:
            return _UNTIMED
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        return self._timed(name)

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        if self._sync is not None:
            self._sync()  # work launched before this phase is charged to the phase that launched it
        now = time.perf_counter()
        if self._stack:
            outer = self._stack[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._stack.append([name, now])
        try:
            yield
            if self._sync is not None:
                self._sync()  # this phase's asynchronous work (CUDA kernels) is charged to it
        finally:
            now = time.perf_counter()
            inner = self._stack.pop()
            self.seconds[inner[0]] += now - inner[1]
            if self._stack:
                self._stack[-1][1] = now

    def note_case(self, case_id: str, tensor_bytes: int) -> None:
        """A case was read; its inputs and expected outputs take ``tensor_bytes``."""
        if self.enabled and tensor_bytes > self.largest_case_bytes:
            self.largest_case_bytes, self.largest_case_id = tensor_bytes, case_id

    def snapshot(self) -> dict[str, Any]:
        """What this timer measured, as plain data (an ``--isolate`` worker sends it with each case)."""
        return {"phases_s": dict(self.seconds), "largest_case_bytes": self.largest_case_bytes,
                "largest_case_id": self.largest_case_id, "peak_rss_bytes": max(self.peak_rss_bytes, peak_rss_bytes())}

    def absorb(self, snapshot: dict[str, Any] | None) -> None:
        """Add the :meth:`snapshot` of work done for this run in another process (its phases ran
        while this process waited, so they stay within this process's wall time)."""
        if not self.enabled or not snapshot:
            return
        for phase, seconds in (snapshot.get("phases_s") or {}).items():
            if phase in self.seconds:
                self.seconds[phase] += float(seconds)
        self.note_case(snapshot.get("largest_case_id") or "", int(snapshot.get("largest_case_bytes") or 0))
        self.peak_rss_bytes = max(self.peak_rss_bytes, int(snapshot.get("peak_rss_bytes") or 0))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def profile(self, cases: int) -> RunProfile:
        """The profile so far: wall time since this timer was created, ``cases`` cases."""
        wall = self.elapsed()
        return RunProfile(wall_s=wall, process_s=wall, phases_s=dict(self.seconds), cases=cases,
                       peak_rss_bytes=max(self.peak_rss_bytes, peak_rss_bytes()),
                       largest_case_bytes=self.largest_case_bytes, largest_case_id=self.largest_case_id)


NO_TIMER = PhaseTimer(enabled=False)
