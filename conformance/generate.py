"""Generation: specs → correctly rounded golden files and their manifest (``rlk-conform generate``)."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConformanceError
from .golden import (
    MANIFEST_NAME,
    Provenance,
    build_manifest,
    case_path,
    sha256_file,
    write_golden,
    write_manifest,
)
from .inputs import make_inputs
from .reference import compute_reference
from .spec import Case, OpSpec


@dataclass(frozen=True)
class Job:
    case: Case
    provenance: Provenance
    path: Path


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


@dataclass
class GenerateSummary:
    tier: str
    out_dir: Path
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0
    manifest: Path | None = None

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


def estimated_work(case: Case) -> float:
    """Relative cost of a case (score-matrix work plus a fixed overhead) for progress and scheduling."""
    return case.batch * case.hq * case.sq * case.skv * case.d + 2e5


def generate_case(job: Job, device: str = "cpu") -> CaseResult:
    start = time.perf_counter()
    inputs = make_inputs(job.case)
    golden = compute_reference(job.case, inputs, device=device)
    write_golden(job.path, job.case, inputs, golden, job.provenance)
    seconds = time.perf_counter() - start
    return CaseResult(job.case.id, job.path, sha256_file(job.path), job.path.stat().st_size, golden.flops, seconds,
                      golden.stats.double_double, golden.stats.exact)


def run_jobs(jobs: Sequence[Job], n_workers: int, device: str,
             on_done: Callable[[Job, CaseResult], None]) -> list[CaseResult]:
    """Run ``jobs`` (largest first) on ``n_workers`` processes; ``on_done`` is called as each finishes."""
    order = sorted(jobs, key=lambda j: -estimated_work(j.case))
    results: list[CaseResult] = []
    if n_workers <= 1 or len(order) <= 1:
        for job in order:
            res = generate_case(job, device)
            results.append(res)
            on_done(job, res)
        return results
    ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can deadlock
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
        pending: dict[Future[CaseResult], Job] = {pool.submit(generate_case, j, device): j for j in order}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = pending.pop(fut)
                    res = fut.result()
                    results.append(res)
                    on_done(job, res)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return results


def generate(specs: Sequence[OpSpec], tier: str, out_dir: Path, n_workers: int = 1, device: str = "cpu",
             on_start: Callable[[list[Job]], None] | None = None,
             on_done: Callable[[Job, CaseResult], None] | None = None) -> GenerateSummary:
    """Generate every case of ``tier`` into ``out_dir`` and write the manifest last."""
    if device != "cpu" and not torch.device(device).type == "cuda":
        raise ConformanceError(f"--device {device}: generation runs on 'cpu' or a CUDA device")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConformanceError(f"--device {device}: CUDA is not available on this machine")
    jobs = plan(specs, tier, out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConformanceError(f"{out_dir}: cannot create the output directory ({exc.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise ConformanceError(f"{out_dir}: output directory is not writable")
    if on_start:
        on_start(jobs)
    summary = GenerateSummary(tier=tier, out_dir=out_dir)
    start = time.perf_counter()
    try:
        summary.results = run_jobs(jobs, n_workers, device, on_done or (lambda j, r: None))
    except OSError as exc:
        raise ConformanceError(f"{out_dir}: writing goldens failed ({exc.strerror or exc}); files already "
                               f"written are complete, {MANIFEST_NAME} is unchanged") from None
    summary.seconds = time.perf_counter() - start
    spec_info: dict[str, Any] = {s.path.name: {"op": s.op, "sha256": s.sha256, "seed": s.seed} for s in specs}
    files = [{"case_id": r.case_id, "path": r.path.relative_to(out_dir).as_posix(), "sha256": r.sha256,
              "bytes": r.bytes} for r in summary.results]
    try:
        summary.manifest = write_manifest(out_dir, build_manifest(tier, spec_info, files))
    except OSError as exc:
        raise ConformanceError(f"{out_dir / MANIFEST_NAME}: writing the manifest failed ({exc.strerror}); "
                               "the previous manifest is unchanged") from None
    return summary
