"""`generate --device cuda` against CPU generation, in one run: byte identity and speed ratio.

    python benchmarks/gpu_generation.py --tier standard --cpu-jobs 16 [--gpu-jobs N] [--keep DIR]

Generates the tier twice into temporary directories (CPU with --cpu-jobs worker processes, CUDA
with --gpu-jobs processes sharing the GPU for the float64 stage), then compares every file's
SHA-256 and prints the wall times and their ratio with the GPU named.

The write floor: the CUDA goldens are read back into memory by --gpu-jobs processes (each its share,
largest first in turn, untimed), which then, all at once, write them again with the generator's own
``write_golden`` and hash them as ``generate`` does: the time generation would take if computing
were free. ``--skip-cpu`` leaves out the CPU generation (and the byte comparison).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import tempfile
import time
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from conformance.files import sha256_file
from conformance.golden.format import Provenance, read_golden, write_golden
from conformance.golden.generate import generate
from conformance.spec.load import default_spec_paths, load_specs

ROOT = Path(__file__).resolve().parents[1]


def _rewrite(paths: list[Path], out_dir: Path, barrier: object, times: object) -> None:
    """Read ``paths`` into memory, wait for every writer, then write and hash them into ``out_dir``."""
    held = [read_golden(p) for p in paths]
    barrier.wait()  # type: ignore[attr-defined]
    start = time.perf_counter()
    for gc in held:
        target = out_dir / gc.path.name
        prov = Provenance(gc.attrs["spec_file"], gc.attrs["spec_sha256"], gc.attrs["spec_seed"])
        write_golden(target, gc.case, gc.inputs, gc.golden, prov, gc.gradient)
        sha256_file(target)
    times.put(time.perf_counter() - start)  # type: ignore[attr-defined]


def write_floor(goldens: Path, jobs: int, scratch: Path) -> tuple[float, int]:
    """Seconds for ``jobs`` processes to write every golden under ``goldens`` again from memory (the
    slowest writer's time), and the bytes written."""
    files = sorted(goldens.rglob("*.h5"), key=lambda p: -p.stat().st_size)
    shares: list[list[Path]] = [files[i::jobs] for i in range(jobs)]
    ctx = multiprocessing.get_context("spawn")
    barrier, times = ctx.Barrier(jobs), ctx.Queue()
    procs = []
    for i, share in enumerate(shares):
        out = scratch / str(i)
        out.mkdir(parents=True)
        procs.append(ctx.Process(target=_rewrite, args=(share, out, barrier, times)))
    for proc in procs:
        proc.start()
    seconds = max(times.get() for _ in procs)
    for proc in procs:
        proc.join()
    return seconds, sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="standard", choices=("smoke", "standard", "full"))
    parser.add_argument("--cpu-jobs", type=int, default=16)
    parser.add_argument("--gpu-jobs", type=int, default=None,
                        help="CUDA worker processes (default: generate's own default for one GPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--filter", default=None, help="only the cases whose id matches this glob, e.g. '*-grad'")
    parser.add_argument("--keep", type=Path, default=None, help="move the CUDA-generated goldens here afterwards")
    parser.add_argument("--skip-cpu", action="store_true", help="no CPU generation (no speed-up, no byte comparison)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: CUDA is not available on this machine")

    specs = load_specs(default_spec_paths(ROOT / "specs"))
    if args.filter:
        specs = [replace(s, cases=[c for c in s.cases if fnmatchcase(c.id, args.filter)]) for s in specs]
    with tempfile.TemporaryDirectory(prefix="rlk-gpu-bench-") as tmp:
        cpu, cpu_s = None, float("nan")
        if not args.skip_cpu:
            start = time.perf_counter()
            cpu = generate(specs, args.tier, Path(tmp) / "cpu", n_workers=args.cpu_jobs, device="cpu")
            cpu_s = time.perf_counter() - start
        start = time.perf_counter()
        gpu = generate(specs, args.tier, Path(tmp) / "gpu", n_workers=args.gpu_jobs, device="cuda")
        gpu_s = time.perf_counter() - start
        args.gpu_jobs = sum(share.workers for share in gpu.devices)
        floor_s, floor_bytes = write_floor(Path(tmp) / "gpu", args.gpu_jobs, Path(tmp) / "floor")
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.move(str(Path(tmp) / "gpu"), args.keep)
    by_id = {r.case_id: r.sha256 for r in cpu.results} if cpu else {}
    differing = sorted(r.case_id for r in gpu.results if by_id.get(r.case_id) != r.sha256) if cpu else []
    figures = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
        "tier": args.tier, "filter": args.filter, "cases": len(gpu.results), "gflop": gpu.flops / 1e9,
        "cpu_jobs": args.cpu_jobs, "cpu_seconds": cpu_s, "gpu_jobs": args.gpu_jobs, "gpu_seconds": gpu_s,
        "speedup": cpu_s / gpu_s, "write_floor_seconds": floor_s, "bytes": floor_bytes,
        "gpu_over_write_floor": gpu_s / floor_s,
        "refined_double_double": sum(r.refined_double_double for r in gpu.results),
        "refined_exact": sum(r.refined_exact for r in gpu.results),
        "gpu_case_seconds": sum(r.seconds for r in gpu.results),
        "gpu_grad_case_seconds": sum(r.seconds for r in gpu.results if r.case_id.endswith("-grad")),
        "gpu_slowest": [(r.case_id, round(r.seconds, 2)) for r in sorted(gpu.results, key=lambda r: -r.seconds)[:12]],
        "byte_identical": None if cpu is None else len(cpu.results) - len(differing), "differing": differing[:20],
    }
    for key, value in figures.items():
        print(f"{key:16s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
