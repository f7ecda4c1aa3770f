"""Worker processes and signals, shared by generation, ``--isolate`` and ``--devices``.

- :func:`exit_with_parent`: a worker is killed by the kernel when its parent dies;
- :func:`stop_on_signals`, :class:`Terminated`: SIGTERM raised in the main thread like SIGINT;
- :func:`deferred_signals`: SIGINT/SIGTERM only noted while reports are written;
- :func:`signals_held`, :func:`ignore_signals`: around a message, and after a worker is done;
- :func:`describe_exit`: how a process ended, in words;
- :func:`balance`: a deterministic split of work into shares of about equal cost (``--devices``);
- :func:`release_host_memory`: a long-lived worker gives the memory its last job freed back;
- :func:`resident_bytes`, :func:`memory_status`: the host memory a process holds (Linux), for
  generation's host budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def exit_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker process when its parent dies, so that a generation
    (or run) killed with SIGKILL leaves no orphan computing on. Best effort elsewhere."""
    with contextlib.suppress(Exception):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def release_host_memory() -> None:
    """(glibc) Return the heap's free pages to the system with ``malloc_trim``: memory freed by one
    job stays in a process's heap otherwise, so a long-lived worker would keep its largest job's
    peak. A job's tensors are freed when it returns (no ``gc.collect``: 0.1 s with torch loaded, more
    than a small golden takes). Best effort elsewhere."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).malloc_trim(0)


def memory_status(pid: int, names: Sequence[str]) -> list[int] | None:
    """The fields ``names`` (``RssAnon``, ``VmPTE``, ...) of ``/proc/PID/status``, in bytes; None where
    they cannot be read (not Linux, no such process, a field missing)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return [int(fields[name].split()[0]) * 1024 for name in names]  # the kernel writes kB
    except (OSError, KeyError, ValueError, IndexError):
        return None


def resident_bytes(pid: int) -> int | None:
    """The host memory process ``pid`` holds of its own: its resident anonymous and shared-memory
    pages and its page tables (``RssAnon + RssShmem + VmPTE`` of ``/proc/PID/status``; not the files
    it maps, which the page cache can drop). None where that cannot be read (not Linux, no such process)."""
    held = memory_status(pid, ("RssAnon", "RssShmem", "VmPTE"))
    return None if held is None else sum(held)


class Terminated(BaseException):
    """SIGTERM arrived while :func:`stop_on_signals` was active (a BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` in a backend call swallows it)."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` in the main thread, as SIGINT raises
    KeyboardInterrupt, so that :func:`run` can stop and return what it finished. No-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver_stops(previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous)


def _redeliver_stops(fallback: Callable[[Any], None]) -> Callable[[Any], None]:
    """An ``unraisablehook`` for :func:`stop_on_signals`: a KeyboardInterrupt or Terminated raised
    where Python cannot propagate it (a weakref callback, a finaliser) would be printed as an
    ignored traceback and lost; instead the signal is sent again, to be raised at the next point
    that can propagate it."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt | Terminated):
            again = signal.SIGINT if isinstance(unraisable.exc_value, KeyboardInterrupt) else signal.SIGTERM
            # A moment later, from another thread: sent from here, its handler would raise inside this
            # hook and be lost again.
            timer = threading.Timer(0.05, os.kill, args=(os.getpid(), again))
            timer.daemon = True
            timer.start()
            return
        fallback(unraisable)

    return hook


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[str]]:
    """While active, SIGINT and SIGTERM are only noted (their names are appended to the yielded
    list), so that the reports of a run are written whole; the caller acts on them afterwards."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

def ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (a message is never cut in half by one)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

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


def balance(costs: Sequence[float], keys: Sequence[str], n: int) -> list[list[int]]:
    """Split items ``0..len(costs)-1`` into ``n`` shares of about equal total cost: greedy
    longest-processing-time (costliest first, to the share with the least total; ties broken by
    ``keys``, then by share index), so the split is a function of its inputs. Each share lists its
    items in ascending order."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], keys[i], i))
    loads = [0.0] * n
    shares: list[list[int]] = [[] for _ in range(n)]
    for i in order:
        j = min(range(n), key=lambda s: (loads[s], s))
        shares[j].append(i)
        loads[j] += costs[i]
    return [sorted(s) for s in shares]
