"""Generation: specs → correctly rounded golden files and their manifest (``rlk-conform generate``).

Robustness contract: one ``generate`` at a time per output directory (an flock on
``<out>/.rlk-conform.lock``; a second one gets a one-line error); every golden and the manifest are
written atomically, so a generation killed at any point leaves only complete goldens and the
previous manifest (or none); ``resume=True`` keeps the goldens such a run completed and computes the
rest, ending byte-identical to an uninterrupted run; a failed write (a full disk) raises one
ConformanceError naming the file, leaves no partial file and the manifest unchanged.

Devices: the cases are split over one or more devices (``--devices``; one device is a list of one)
by :func:`conformance.golden.schedule.split_jobs`, each device with its own
worker processes; a golden does not depend on where it was computed, so the files and manifest are
those of a one-device run. Shards (``--shard i/n``): only case k % n == i (case-id order) is
generated and a shard manifest written instead of the tier manifest; :mod:`conformance.golden.shards`
merges the shards into the manifest of the whole tier.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conformance.environment import GENERATOR
from conformance.errors import ConformanceError, GoldenError
from conformance.files import sha256_file
from conformance.golden.format import INPUT_GENERATOR, Provenance, case_path, read_golden, write_golden
from conformance.golden.layouts import layout_path, write_layout
from conformance.golden.manifest import (
    MANIFEST_NAME,
    build_manifest,
    build_shard_manifest,
    is_shard_manifest_name,
    shard_manifest_name,
    take_shard,
    write_manifest,
)
from conformance.golden.schedule import (
    Admission,
    DeviceShare,
    HostUse,
    Job,
    default_host_budget,
    default_workers,
    largest_first,
    share_workers,
    split_jobs,
)
from conformance.processes import exit_with_parent, release_host_memory, resident_bytes
from conformance.reference.compute import ALGORITHM, Golden, compute_reference
from conformance.reference.gradient import GradientGolden, compute_gradient_reference
from conformance.spec.case import Case
from conformance.spec.inputs import CaseInputs, make_inputs
from conformance.spec.load import OpSpec


@dataclass
class CaseResult:
    case_id: str
    path: Path
    sha256: str
    bytes: int
    flops: int
    seconds: float
    refined_double_double: int
    refined_exact: int


LOCK_NAME = ".rlk-conform.lock"


class GoldenWriteError(ConformanceError):
    """Writing one golden file failed (a full disk, a quota, an I/O error); nothing partial is left."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)  # both in args, so that it crosses the worker-process boundary
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: writing the golden failed ({self.reason})"


@dataclass
class GenerateSummary:
    tier: str
    out_dir: Path
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0
    manifest: Path | None = None  # manifest.json, or the shard manifest with ``shard``
    reused: int = 0  # goldens kept from an interrupted run (resume)
    devices: list[DeviceShare] = field(default_factory=list)  # the cases computed in this run, per device
    shard: tuple[int, int] | None = None
    tier_cases: int = 0  # goldens of the whole tier (all shards)
    host: HostUse | None = None  # how the workers used the host budget (None: computed in this process)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.results)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.results)

    @property
    def compute_seconds(self) -> float:
        return sum(r.seconds for r in self.results)


def plan(specs: Sequence[OpSpec], tier: str, out_dir: Path) -> list[Job]:
    jobs = []
    for spec in specs:
        prov = Provenance(spec_file=spec.path.name, spec_sha256=spec.sha256, spec_seed=spec.seed)
        for case in spec.cases_for_tier(tier):
            jobs.append(Job(case, prov, case_path(out_dir, case.id)))
    return jobs


def os_reason(exc: OSError) -> str:
    """The one-line reason of an OSError: h5py puts a multi-line HDF5 report in ``strerror``."""
    if exc.errno:
        return os.strerror(exc.errno)
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass(frozen=True)
class ComputedCase:
    """Everything a golden file of a case holds: its seeded inputs (grad_out too for a case with
    gradients), the exact forward and, for a case with gradients, the exact backward."""

    inputs: CaseInputs
    golden: Golden
    gradient: GradientGolden | None

    @property
    def flops(self) -> int:
        return self.golden.flops + (self.gradient.flops if self.gradient is not None else 0)


def compute_case(case: Case, device: str = "cpu") -> ComputedCase:
    """The seeded inputs of ``case`` and their exact results (forward, and backward when ``case.grad``)."""
    inputs = make_inputs(case)  # with the seeded grad_out when case.grad
    golden = compute_reference(case, inputs, device=device)
    gradient = compute_gradient_reference(case, inputs, inputs.grad_out, device=device) if case.grad else None
    return ComputedCase(inputs, golden, gradient)


def write_case(path: Path, case: Case, computed: ComputedCase, prov: Provenance) -> None:
    write_golden(path, case, computed.inputs, computed.golden, prov, computed.gradient)


# A case that finds the GPU's memory taken by the other workers' cases waits and tries again:
# OUT_OF_MEMORY_WAITS_S between the attempts (their peaks pass within seconds), then gives up.
OUT_OF_MEMORY_WAITS_S = (5.0, 10.0, 20.0, 40.0)


def compute_on_shared_device(case: Case, device: str) -> ComputedCase:
    """:func:`compute_case`, retried after a CUDA out-of-memory error (the golden does not depend on
    when it is computed). Each worker gives its cached blocks back after a case, so that one worker's
    cache from its largest case does not leave the others out of memory. Raises ConformanceError
    (one line) when the memory never frees up."""
    cuda = torch.device(device).type == "cuda"
    waits = iter(OUT_OF_MEMORY_WAITS_S)
    while True:
        try:
            return compute_case(case, device)
        except torch.OutOfMemoryError:
            wait_s = next(waits, None)
            if wait_s is None:
                raise ConformanceError(
                    f"{case.id}: out of memory on {device} after {len(OUT_OF_MEMORY_WAITS_S) + 1} attempts "
                    "while the other workers' cases held the rest; rerun with fewer --jobs and --resume "
                    "(the goldens already written are kept)") from None
        finally:  # after every attempt, before any wait
            if cuda:
                torch.cuda.empty_cache()
        print(f"note: {case.id}: out of memory on {device} while the other workers' cases hold it; "
              f"trying again in {wait_s:g} s", file=sys.stderr, flush=True)
        time.sleep(wait_s)


def generate_case(job: Job, device: str = "cpu") -> CaseResult:
    """Compute and write one golden. A failed write raises :class:`GoldenWriteError` (no partial file)."""
    start = time.perf_counter()
    computed = compute_on_shared_device(job.case, device)
    try:
        write_case(job.path, job.case, computed, job.provenance)
    except OSError as exc:
        raise GoldenWriteError(str(job.path), os_reason(exc)) from None
    seconds = time.perf_counter() - start
    stats = [computed.golden.stats] + ([computed.gradient.stats] if computed.gradient is not None else [])
    return CaseResult(job.case.id, job.path, sha256_file(job.path), job.path.stat().st_size, computed.flops, seconds,
                      sum(s.double_double for s in stats), sum(s.exact for s in stats))


# Generation's CUDA tensors change size from block to block (a causal block sees more keys than the
# block before it), and the caching allocator serves each larger request with a new segment: on an
# H200 an 8k x 32k prefill reserved 117 GiB for 4.5 GiB of tensors, so that workers sharing the card
# ran out of memory. Expandable segments grow in place and serve a larger request with freed memory.
# The allocator never changes a value: the goldens are the same bytes either way.
CUDA_ALLOCATOR_SETTINGS = "expandable_segments:True"
ALLOCATOR_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def prefer_expandable_segments() -> bool:
    """Configure this process's CUDA caching allocator with :data:`CUDA_ALLOCATOR_SETTINGS`, unless the
    user configured it (either environment variable set) or CUDA is already initialised here (too late
    to change it). True when it was set."""
    if any(name in os.environ for name in ALLOCATOR_ENV) or torch.cuda.is_initialized():
        return False
    os.environ[ALLOCATOR_ENV[0]] = CUDA_ALLOCATOR_SETTINGS
    return True


# A worker's channel to its parent: (case id, pid, host bytes held) as it starts a case (init_worker).
_STARTS: Any = None
# How often the parent looks at the workers' memory while cases wait for room in the host budget.
ADMISSION_POLL_S = 0.5


def worker_case(job: Job, device: str) -> CaseResult:
    """:func:`generate_case` in a worker process, which first tells its parent what it holds (for the
    host budget's measured admission) and afterwards gives the host memory the case freed back
    (:func:`release_host_memory`), so that what it holds between cases is its own."""
    if _STARTS is not None:
        _STARTS.put((job.case.id, os.getpid(), resident_bytes(os.getpid()) or 0))
    try:
        return generate_case(job, device)
    finally:
        release_host_memory()


def init_worker(threads: int, starts: Any = None) -> None:
    """A generation worker: dies with its parent, and its CPU-side torch work (inputs, the host side
    of a CUDA generation) uses its share of the cores, not all of them in every worker. (The CPU
    reference itself always runs on one thread: see compute_reference.) ``starts``: the queue on
    which it reports each case it starts."""
    global _STARTS
    _STARTS = starts
    exit_with_parent()
    torch.set_num_threads(threads)
    prefer_expandable_segments()


def run_jobs(shares: Sequence[DeviceShare], on_done: Callable[[Job, CaseResult], None],
             host_budget: int | None = None) -> tuple[list[CaseResult], HostUse | None]:
    """Run every share's jobs on its device and worker processes, as :class:`Admission` admits them
    under ``host_budget`` bytes (default :func:`default_host_budget`), measuring the workers' memory
    where the platform tells (:func:`resident_bytes`); ``on_done`` is called (in this
    process) as each finishes. One device with one worker runs in this process, largest first (no
    budget then: the :class:`HostUse` is None)."""
    active = [s for s in shares if s.jobs]
    results: list[CaseResult] = []
    if len(active) <= 1 and all(s.workers <= 1 or len(s.jobs) <= 1 for s in active):
        for share in active:
            for job in largest_first(share.jobs):
                res = generate_case(job, share.device)
                results.append(res)
                on_done(job, res)
        return results, None
    ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can deadlock
    workers = [share_workers(s) for s in active]
    threads = max(1, (os.cpu_count() or 1) // sum(workers))
    budget = default_host_budget() if host_budget is None else host_budget
    metered = resident_bytes(os.getpid()) is not None
    admission = Admission(active, budget, meter=resident_bytes if metered else None)
    use = HostUse(budget, metered)
    starts = ctx.SimpleQueue() if metered else None
    with contextlib.ExitStack() as stack:
        pools = [stack.enter_context(ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=init_worker,
                                                         initargs=(threads, starts))) for n in workers]
        pending: dict[Future[CaseResult], Job] = {}
        try:
            while True:
                for i, job in admission.next_jobs():
                    pending[pools[i].submit(worker_case, job, active[i].device)] = job
                if not pending:
                    break
                held_back, since = admission.waiting_for_memory(), time.perf_counter()
                done, _ = wait(pending, timeout=ADMISSION_POLL_S if metered else None, return_when=FIRST_COMPLETED)
                while starts is not None and not starts.empty():
                    admission.started(*starts.get())
                use.peak = max(use.peak, admission.held())
                use.waited_s += (time.perf_counter() - since) if held_back else 0.0
                for fut in done:
                    job = pending.pop(fut)
                    res = fut.result()
                    admission.finished(job)
                    results.append(res)
                    on_done(job, res)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return results, use


def reusable_result(job: Job) -> CaseResult | None:
    """The golden an earlier, interrupted generation completed for ``job``, or None if it must be
    computed: absent, damaged (any :func:`read_golden` refusal), or of another case, spec, seed or
    generator version. Goldens are deterministic, so a kept file has the bytes a fresh one would."""
    try:
        gc = read_golden(job.path)
    except GoldenError:
        return None
    a, prov = gc.attrs, job.provenance
    same = (gc.case == job.case and (a["spec_file"], a["spec_sha256"], a["spec_seed"]) ==
            (prov.spec_file, prov.spec_sha256, prov.spec_seed) and a["generator"] == GENERATOR
            and a["algorithm"] == ALGORITHM and a["input_generator"] == INPUT_GENERATOR)
    if not same:
        return None
    # Nothing was computed for a kept golden: no time, no refinement (the file does not record it).
    flops = gc.golden.flops + (gc.gradient.flops if gc.gradient is not None else 0)
    return CaseResult(job.case.id, job.path, sha256_file(job.path), job.path.stat().st_size, flops, 0.0,
                      refined_double_double=0, refined_exact=0)


@contextlib.contextmanager
def directory_lock(out_dir: Path) -> Iterator[Path]:
    """Hold an exclusive flock on ``<out_dir>/.rlk-conform.lock`` for the block; removed on exit.

    A second holder gets a ConformanceError at once (no waiting). The lock dies with its process,
    so a generation killed with SIGKILL leaves at most a stale file that the next one takes over.
    """
    path = out_dir / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConformanceError(f"{path}: cannot create the lock file ({os_reason(exc)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConformanceError(f"{path}: cannot lock the output directory ({os_reason(exc)})") from None
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise ConformanceError(f"{out_dir}: another rlk-conform generate{who} is writing to this directory "
                                   f"(lock {path}); wait for it to finish or choose another --out") from None
        # The previous holder removes the file as it leaves; the lock must be on the file that is there.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # the pid is a courtesy; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def remove_stale_temp_files(out_dir: Path) -> int:
    """Delete the temporary files (``.<name>.<random>.tmp``) a killed generation left; only call
    while holding :func:`directory_lock`, when no other writer can own them. Returns how many."""
    removed = 0
    for tmp in out_dir.rglob(".*.tmp"):
        manifest = (tmp.name.startswith(f".{MANIFEST_NAME}.")
                    or is_shard_manifest_name(tmp.name[1:].partition(".json.")[0] + ".json"))
        if tmp.is_file() and (manifest or ".h5." in tmp.name):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
    return removed


def write_layouts(specs: Sequence[OpSpec], tier: str, out_dir: Path) -> list[dict[str, Any]]:
    """Write the layout file of every packed and paged case of ``tier`` (no computation: each one
    names the dense goldens it is composed of) and return their manifest entries. A layout case whose
    dense goldens are not all among ``specs``' cases (a ``--filter`` left some out) is not written:
    its file would name goldens the directory does not hold."""
    dense = {c.id for spec in specs for c in spec.cases_for_tier(tier)}
    entries = []
    for spec in specs:
        prov = Provenance(spec_file=spec.path.name, spec_sha256=spec.sha256, spec_seed=spec.seed)
        for case in spec.layouts_for_tier(tier):
            if not set(case.members) <= dense:
                continue
            path = layout_path(out_dir, case.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_layout(path, case, prov)
            entries.append({"case_id": case.id, "path": path.relative_to(out_dir).as_posix(),
                            "sha256": sha256_file(path), "bytes": path.stat().st_size})
    return entries


def check_device(device: str, option: str) -> None:
    """A device generation can run on: the CPU or an available CUDA device (one-line ConformanceError)."""
    if device != "cpu" and not torch.device(device).type == "cuda":
        raise ConformanceError(f"{option} {device}: generation runs on 'cpu' or a CUDA device")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConformanceError(f"{option} {device}: CUDA is not available on this machine")


def generate(specs: Sequence[OpSpec], tier: str, out_dir: Path, n_workers: int | None = 1, device: str = "cpu",
             on_start: Callable[[list[Job]], None] | None = None,
             on_done: Callable[[Job, CaseResult], None] | None = None, resume: bool = False,
             devices: Sequence[str] | None = None, shard: tuple[int, int] | None = None,
             host_budget: int | None = None) -> GenerateSummary:
    """Generate every case of ``tier`` into ``out_dir`` and write the manifest last.

    ``devices`` (instead of ``device``) splits the cases over several devices, ``n_workers`` worker
    processes in all (:mod:`conformance.golden.schedule`: ``split_jobs``, ``worker_counts``; None: its
    ``default_workers`` for the devices, the host budget and this machine's cores); the bytes written
    are the same.
    ``shard=(i, n)`` generates only case k % n == i of the tier (case-id order) and writes
    ``manifest.shard-<i>-of-<n>.json`` (every layout file too) instead of ``manifest.json``.
    ``host_budget`` bounds the host memory of the workers and their cases in flight (bytes; default
    :func:`default_host_budget`, see :func:`run_jobs`); it changes when a case runs, not its bytes.
    Holds :func:`directory_lock` throughout. With ``resume``, goldens that :func:`reusable_result`
    accepts are kept (``summary.reused``) and stale temporary files removed; the result is then
    byte-identical to an uninterrupted run. Raises ConformanceError (one line) for a bad device, an
    unwritable or locked directory, or a failed write, after which the manifest is unchanged.
    """
    device_list = [device] if devices is None else list(devices)
    for dev in device_list:
        check_device(dev, "--device" if devices is None else "--devices")
    if any(torch.device(dev).type == "cuda" for dev in device_list):
        prefer_expandable_segments()  # before this process's first CUDA tensor; workers inherit it
    if n_workers is None:
        n_workers = default_workers(device_list, default_host_budget() if host_budget is None else host_budget,
                                    os.cpu_count() or 1)
    tier_jobs = plan(specs, tier, out_dir)
    jobs = take_shard(sorted(tier_jobs, key=lambda j: j.case.id), shard)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConformanceError(f"{out_dir}: cannot create the output directory ({os_reason(exc)})") from None
    if not os.access(out_dir, os.W_OK):
        raise ConformanceError(f"{out_dir}: output directory is not writable")
    summary = GenerateSummary(tier=tier, out_dir=out_dir, shard=shard, tier_cases=len(tier_jobs))
    with directory_lock(out_dir):
        _generate_locked(specs, summary, [j.case.id for j in tier_jobs], jobs, device_list, n_workers, on_start,
                         on_done or (lambda j, r: None), resume, host_budget)
    return summary


def _generate_locked(specs: Sequence[OpSpec], summary: GenerateSummary, tier_case_ids: list[str], jobs: list[Job],
                     devices: list[str], n_workers: int, on_start: Callable[[list[Job]], None] | None,
                     on_done: Callable[[Job, CaseResult], None], resume: bool, host_budget: int | None = None) -> None:
    tier, out_dir = summary.tier, summary.out_dir
    manifest_name = MANIFEST_NAME if summary.shard is None else shard_manifest_name(summary.shard)
    if on_start:
        on_start(jobs)
    start = time.perf_counter()
    kept: list[CaseResult] = []
    if resume:
        remove_stale_temp_files(out_dir)
        todo = []
        for job in jobs:
            res = reusable_result(job)
            if res is None:
                todo.append(job)
            else:
                kept.append(res)
                on_done(job, res)
        jobs = todo
    summary.devices = split_jobs(jobs, devices, n_workers)
    try:
        computed, summary.host = run_jobs(summary.devices, on_done, host_budget)
        summary.results = kept + computed
    except GoldenWriteError as exc:
        raise ConformanceError(f"{exc}; no partial file was left, the goldens already written are complete and "
                               f"{manifest_name} is unchanged; free space and rerun with --resume") from None
    except OSError as exc:
        raise ConformanceError(f"{out_dir}: writing goldens failed ({os_reason(exc)}); files already written are "
                               f"complete, {manifest_name} is unchanged") from None
    summary.reused = len(kept)
    summary.seconds = time.perf_counter() - start
    spec_info: dict[str, Any] = {s.path.name: {"op": s.op, "sha256": s.sha256, "seed": s.seed} for s in specs}
    files = [{"case_id": r.case_id, "path": r.path.relative_to(out_dir).as_posix(), "sha256": r.sha256,
              "bytes": r.bytes} for r in summary.results]
    try:
        layouts = write_layouts(specs, tier, out_dir)
    except OSError as exc:
        raise ConformanceError(f"{out_dir}: writing layout files failed ({os_reason(exc)}); {manifest_name} is "
                               "unchanged") from None
    if summary.shard is None:
        manifest = build_manifest(tier, spec_info, files + layouts)
    else:
        manifest = build_shard_manifest(tier, summary.shard, spec_info, files, layouts, tier_case_ids)
    try:
        summary.manifest = write_manifest(out_dir, manifest, manifest_name)
    except OSError as exc:
        raise ConformanceError(f"{out_dir / manifest_name}: writing the manifest failed ({os_reason(exc)}); "
                               "the previous manifest is unchanged and every golden is complete; free space "
                               "and rerun with --resume") from None
