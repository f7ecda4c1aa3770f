"""Which golden is computed where and when: the jobs of a generation, their split over devices and
their admission under a host-memory budget.

- :class:`Job`: one golden to compute (its case, provenance and path); :func:`estimated_work` its
  relative cost;
- :func:`split_jobs`: the cases over the devices by :func:`conformance.processes.balance` (greedy
  longest-processing-time), each device a :class:`DeviceShare` with its share of the workers
  (:func:`worker_counts`); the split depends only on the cases and the device list;
- :class:`Admission`: the order in which a share's jobs start, largest first, so that the memory the
  workers hold (measured where the platform tells) and the cases in flight need (:func:`host_bytes`)
  fit the host budget (:func:`default_host_budget`).

None of it changes a golden's bytes: a golden does not depend on where or when it was computed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
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


def default_workers(devices: Sequence[str], budget: int, cores: int) -> int:
    """``--jobs`` when it is not given: one worker per core in all, as :func:`worker_counts` spreads
    them over ``devices``, but at most :data:`CUDA_WORKERS_PER_DEVICE` on each CUDA device and no
    more than keep the workers' own memory (:func:`worker_bytes`, and a CUDA worker's
    :data:`HOST_KERNEL_BYTES_PER_CUDA_WORKER`) within :data:`WORKERS_SHARE_OF_BUDGET` of ``budget``;
    at least one per device."""

    def fits(n: int) -> bool:
        counts = worker_counts(n, len(devices))
        own = sum(c * (worker_bytes(d) + (HOST_KERNEL_BYTES_PER_CUDA_WORKER if _kind(d) == "cuda" else 0))
                  for c, d in zip(counts, devices))
        return (own <= budget * WORKERS_SHARE_OF_BUDGET
                and all(c <= CUDA_WORKERS_PER_DEVICE for c, d in zip(counts, devices) if _kind(d) == "cuda"))

    n = max(cores, 1)
    while n > len(devices) and not fits(n):
        n -= 1
    return max(n, 1)


def split_jobs(jobs: Sequence[Job], devices: Sequence[str], n_workers: int) -> list[DeviceShare]:
    """The share of every device (in ``devices`` order): greedy longest-processing-time over
    :func:`estimated_work` (largest first, to the least-loaded device; ties by case id, then device
    order), so the split depends only on the cases and the device list."""
    shares = balance([estimated_work(j.case) for j in jobs], [j.case.id for j in jobs], len(devices))
    return [DeviceShare(device, workers, [jobs[i] for i in share])
            for device, workers, share in zip(devices, worker_counts(n_workers, len(devices)), shares)]


def largest_first(jobs: Sequence[Job]) -> list[Job]:
    return sorted(jobs, key=lambda j: -estimated_work(j.case))


# Host memory a case adds to its worker at the peak, beyond what the worker held before it: the
# inputs and their float64 copies, the outputs, the HDF5 write, as a multiple of Case.working_bytes,
# plus a floor: on the CPU, the float64 stage's blocks (2^22 (row, key) pairs of a few dozen float64
# temporaries), on a GPU the transfer buffers of a small case. Measured peaks: docs/performance.md,
# "Fourth run on the H200" (host memory of the full tier).
HOST_BYTES_PER_WORKING_BYTE = 2
HOST_BYTES_PER_CASE = {"cuda": 128 << 20, "cpu": 512 << 20}
# A worker's own memory (torch, h5py and, for a CUDA worker, its CUDA context and loaded kernels), for
# the workers not yet measured (or without a meter): on the H200 an idle CUDA worker held 0.96-1.0 GiB
# of its own (RssAnon) after its first cases, a CPU worker ~0.3 GiB, and the kernel ~0.15 GiB more per
# CUDA process that no process's status shows: docs/performance.md, "Fifth run".
HOST_BYTES_PER_WORKER = {"cuda": 1152 << 20, "cpu": 400 << 20}
HOST_KERNEL_BYTES_PER_CUDA_WORKER = 160 << 20
# By default (no --jobs) a CUDA device gets at most this many workers, and the workers' own memory
# takes at most this share of the host budget, the rest left to the cases in flight: 16 idle CUDA
# workers hold ~20 GiB of a 24 GiB budget, and the largest cases then run one or two at a time. On
# the H200 (16 cores, 24 GiB budget) the full tier took 118.6 / 122.6 / 142.7 / 185.2 / 269.7 s with
# 6 / 8 / 10 / 12 / 16 CUDA workers, the standard tier 45.8 / 42.6 / 39.4 / 40.6 s with 6 / 8 / 12 /
# 16: docs/performance.md, "Sixth run".
CUDA_WORKERS_PER_DEVICE = 8
WORKERS_SHARE_OF_BUDGET = 0.5
# The default host budget of a generation (its workers and their cases): 24 GiB, or three quarters of
# a smaller machine.
DEFAULT_HOST_BUDGET_BYTES = 24 << 30


def _kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def host_bytes(case: Case, device: str = "cpu") -> int:
    """The host memory generating ``case`` on ``device`` adds to a worker at its peak (an estimate:
    :data:`HOST_BYTES_PER_CASE` plus :data:`HOST_BYTES_PER_WORKING_BYTE` times its working bytes)."""
    return HOST_BYTES_PER_CASE[_kind(device)] + HOST_BYTES_PER_WORKING_BYTE * case.working_bytes


def worker_bytes(device: str) -> int:
    """:data:`HOST_BYTES_PER_WORKER` of a worker on ``device`` (a ``cuda:N`` device as ``cuda``)."""
    return HOST_BYTES_PER_WORKER[_kind(device)]


def default_host_budget() -> int:
    """:data:`DEFAULT_HOST_BUDGET_BYTES`, or three quarters of the physical memory when that is less."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return DEFAULT_HOST_BUDGET_BYTES
    return min(DEFAULT_HOST_BUDGET_BYTES, physical * 3 // 4)


@dataclass
class HostUse:
    """How a generation used its host budget: the most its processes held (measured with a meter,
    sampled whenever the parent looks: at least every ADMISSION_POLL_S), and how long cases waited for
    memory while a worker was free."""

    budget: int
    measured: bool
    peak: int = 0  # bytes held by the workers and the parent at the most (0 without a meter)
    waited_s: float = 0.0


Meter = Callable[[int], "int | None"]  # pid -> the host bytes it holds (processes.resident_bytes), None if unknown


class Admission:
    """Which waiting jobs start next, so that the generation's host memory stays within the budget:
    each share (a device and its workers) starts at most :func:`share_workers` jobs at once, and from
    its waiting jobs (largest first) the first that fits; when nothing runs anywhere, its largest
    starts whatever its size (a case larger than the budget runs alone). The order changes when a
    case is computed, never its bytes.

    What is committed, with a ``meter`` (Linux): the memory the workers that reported (:meth:`started`)
    hold now, measured (what an idle worker kept after its cases included), plus, per running job,
    what its estimate (:func:`host_bytes`) leaves beyond what its worker has grown since it started;
    the workers not yet measured at :func:`worker_bytes`; this process (``own_pid``); and
    :data:`HOST_KERNEL_BYTES_PER_CUDA_WORKER` per CUDA worker. Without a meter: the estimates of the
    running jobs and :func:`worker_bytes` per worker."""

    def __init__(self, shares: Sequence[DeviceShare], budget: int, meter: Meter | None = None,
                 own_pid: int | None = None) -> None:
        # Per share, its waiting (job, host bytes) pairs, largest first.
        self.waiting = [[(j, host_bytes(j.case, s.device)) for j in largest_first(s.jobs)] for s in shares]
        self.slots = [share_workers(s) for s in shares]
        self.budget = budget
        self.meter = meter
        self.own_pid = os.getpid() if own_pid is None else own_pid
        # Per share, its workers that have not reported yet, all of its slots at first: a pool starts a worker
        # when a job arrives and none is idle, and a worker whose result has just come back is not idle yet
        # (the pool marks it so after the result), so a share may start all its workers even when fewer of
        # its jobs ever run at once.
        self.unseen = list(self.slots)
        # Per worker slot, the kernel's allowance (CUDA) and, without a meter, the worker's own.
        self.fixed = sum(n * ((HOST_KERNEL_BYTES_PER_CUDA_WORKER if _kind(s.device) == "cuda" else 0) +
                              (worker_bytes(s.device) if meter is None else 0)) for n, s in zip(self.slots, shares))
        self.devices = [s.device for s in shares]
        self.workers: dict[int, int] = {}  # pid of a worker that reported -> its share
        self.running: dict[str, int] = {}  # case id of a running job -> its host bytes
        self.reports: dict[str, tuple[int, int]] = {}  # case id of a running job -> (its worker's pid, bytes at start)
        self.share_of: dict[str, int] = {}  # case id of every job started -> its share

    def committed(self) -> int:
        """The host bytes the generation holds or has promised to its running jobs (class docstring)."""
        if self.meter is None:
            return self.fixed + self.in_use
        now = self._held_now()
        total = self.fixed + sum(now.values())
        total += sum(n * worker_bytes(device) for n, device in zip(self.unseen, self.devices))
        for cid, size in self.running.items():
            pid, at_start = self.reports.get(cid, (None, 0))
            grown = max(0, now[pid] - at_start) if pid in now else 0
            total += max(0, size - grown)
        return total

    @property
    def in_use(self) -> int:
        """The estimates of the running jobs."""
        return sum(self.running.values())

    def _held_now(self) -> dict[int, int]:
        """Bytes held now by this process and each worker that reported, by pid (with a meter)."""
        assert self.meter is not None
        return {pid: self.meter(pid) or 0 for pid in (self.own_pid, *self.workers)}

    def held(self) -> int:
        """What the reported workers and this process hold now, measured (0 without a meter)."""
        return 0 if self.meter is None else sum(self._held_now().values())

    def waiting_for_memory(self) -> bool:
        """Whether a share has waiting jobs and a free worker: what holds them back is the budget."""
        return any(waiting and slots > 0 for waiting, slots in zip(self.waiting, self.slots))

    def next_jobs(self) -> list[tuple[int, Job]]:
        """The (share index, job) pairs to start now, marked as running."""
        started: list[tuple[int, Job]] = []
        committed = None
        for i, waiting in enumerate(self.waiting):
            while waiting and self.slots[i] > 0:
                committed = self.committed() if committed is None else committed
                at = next((n for n, (_, size) in enumerate(waiting) if committed + size <= self.budget), None)
                if at is None:
                    if self.running:
                        break
                    at = 0
                job, size = waiting.pop(at)
                self.slots[i] -= 1
                self.running[job.case.id] = size
                self.share_of[job.case.id] = i
                committed += size
                started.append((i, job))
        return started

    def started(self, case_id: str, pid: int, held: int) -> None:
        """A worker (``pid``, holding ``held`` bytes then) reports that it starts ``case_id``."""
        share = self.share_of.get(case_id)
        if pid not in self.workers and share is not None:  # (a report may come after its case's result)
            self.workers[pid] = share
            self.unseen[share] = max(0, self.unseen[share] - 1)
        if case_id in self.running:
            self.reports[case_id] = (pid, held)

    def finished(self, job: Job) -> None:
        self.running.pop(job.case.id)
        self.reports.pop(job.case.id, None)
        self.slots[self.share_of[job.case.id]] += 1
