"""Which golden is computed where and when: the jobs of a generation, their split over devices and
their admission under a host-memory budget.

- :class:`Job`: one golden to compute (its case, provenance and path); :func:`estimated_work` its
  relative cost;
- :func:`split_jobs`: the cases over the devices by :func:`conformance.processes.balance` (greedy
  longest-processing-time), each device a :class:`DeviceShare` with its share of the workers
  (:func:`worker_counts`); the split depends only on the cases and the device list;
- :class:`Admission`: the order in which a share's jobs start, largest first, so that the cases in
  flight fit the host budget (:func:`host_bytes`, :func:`default_host_budget`).

None of it changes a golden's bytes: a golden does not depend on where or when it was computed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from conformance.golden.format import Provenance
from conformance.processes import balance
from conformance.spec.case import Case


@dataclass(frozen=True)
class Job:
    case: Case
    provenance: Provenance
    path: Path


@dataclass(frozen=True)
class DeviceShare:
    """The jobs one device computes, on ``workers`` worker processes (in this process when it is the
    only device and has one worker)."""

    device: str
    workers: int
    jobs: list[Job]


def share_workers(share: DeviceShare) -> int:
    """The worker processes a share starts: its ``workers``, no more than it has jobs."""
    return min(share.workers, len(share.jobs))


def estimated_work(case: Case) -> float:
    """Relative cost of a case (score-matrix work plus a fixed overhead) for progress and scheduling."""
    return case.batch * case.hq * case.sq * case.skv * case.d + 2e5


def worker_counts(n_workers: int, n_devices: int) -> list[int]:
    """``--jobs`` spread over the devices: as evenly as possible (the first devices get the
    remainder), at least one each."""
    return [max(1, n_workers // n_devices + (d < n_workers % n_devices)) for d in range(n_devices)]


def split_jobs(jobs: Sequence[Job], devices: Sequence[str], n_workers: int) -> list[DeviceShare]:
    """The share of every device (in ``devices`` order): greedy longest-processing-time over
    :func:`estimated_work` (largest first, to the least-loaded device; ties by case id, then device
    order), so the split depends only on the cases and the device list."""
    shares = balance([estimated_work(j.case) for j in jobs], [j.case.id for j in jobs], len(devices))
    return [DeviceShare(device, workers, [jobs[i] for i in share])
            for device, workers, share in zip(devices, worker_counts(n_workers, len(devices)), shares)]


def largest_first(jobs: Sequence[Job]) -> list[Job]:
    return sorted(jobs, key=lambda j: -estimated_work(j.case))


# Host memory a worker holds for one case beyond its own (Python, torch, h5py, a CUDA context): the
# inputs and their float64 copies, the outputs, the HDF5 write, as a multiple of Case.working_bytes,
# plus a floor for the float64 stage's blocks (on the CPU) and the transfer buffers of a small case.
# Measured peaks: docs/performance.md, "Fourth run on the H200" (host memory of the full tier).
HOST_BYTES_PER_WORKING_BYTE = 2
HOST_BYTES_PER_CASE = 512 << 20
# A worker's own memory not shared with the others (its CUDA context, torch's and h5py's state): the
# host budget less this much per worker is what the cases in flight may hold.
HOST_BYTES_PER_WORKER = 400 << 20
# The default host budget of a generation (its workers and their cases): 24 GiB, or three quarters of
# a smaller machine.
DEFAULT_HOST_BUDGET_BYTES = 24 << 30


def host_bytes(case: Case) -> int:
    """The host memory generating ``case`` holds at its peak (an estimate: :data:`HOST_BYTES_PER_CASE` plus
    :data:`HOST_BYTES_PER_WORKING_BYTE` times its working bytes)."""
    return HOST_BYTES_PER_CASE + HOST_BYTES_PER_WORKING_BYTE * case.working_bytes


def default_host_budget() -> int:
    """:data:`DEFAULT_HOST_BUDGET_BYTES`, or three quarters of the physical memory when that is less."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return DEFAULT_HOST_BUDGET_BYTES
    return min(DEFAULT_HOST_BUDGET_BYTES, physical * 3 // 4)


class Admission:
    """Which waiting jobs start next, so that the cases in flight fit the host budget: each share (a
    device and its workers) starts at most :func:`share_workers` jobs at once, and from its waiting
    jobs (largest first) the first whose :func:`host_bytes` fits what the running ones leave; when
    nothing runs anywhere, its largest starts whatever its size (a case larger than the budget runs
    alone). The order changes when a case is computed, never its bytes."""

    def __init__(self, shares: Sequence[DeviceShare], budget: int) -> None:
        # Per share, its waiting (job, host bytes) pairs, largest first.
        self.waiting = [[(j, host_bytes(j.case)) for j in largest_first(s.jobs)] for s in shares]
        self.slots = [share_workers(s) for s in shares]
        self.budget = budget
        self.running: dict[int, tuple[int, int]] = {}  # id(job) of a started job -> (its share, its host bytes)
        self.in_use = 0

    def next_jobs(self) -> list[tuple[int, Job]]:
        """The (share index, job) pairs to start now, marked as running."""
        started = []
        for i, waiting in enumerate(self.waiting):
            while waiting and self.slots[i] > 0:
                at = next((n for n, (_, size) in enumerate(waiting) if self.in_use + size <= self.budget), None)
                if at is None:
                    if self.running:
                        break
                    at = 0
                job, size = waiting.pop(at)
                self.slots[i] -= 1
                self.running[id(job)] = (i, size)
                self.in_use += size
                started.append((i, job))
        return started

    def finished(self, job: Job) -> None:
        share, used = self.running.pop(id(job))
        self.in_use -= used
        self.slots[share] += 1
