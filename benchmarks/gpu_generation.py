"""`generate --device cuda` against CPU generation, in one run: byte identity and speed ratio.

    python benchmarks/gpu_generation.py --tier standard --cpu-jobs 16 --gpu-jobs 4 [--keep DIR]

Generates the tier twice into temporary directories (CPU with --cpu-jobs worker processes, CUDA
with --gpu-jobs processes sharing the GPU for the float64 stage), then compares every file's
SHA-256 and prints the wall times and their ratio with the GPU named.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from conformance.golden.generate import generate
from conformance.spec.load import default_spec_paths, load_specs

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="standard", choices=("smoke", "standard", "full"))
    parser.add_argument("--cpu-jobs", type=int, default=16)
    parser.add_argument("--gpu-jobs", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--filter", default=None, help="only the cases whose id matches this glob, e.g. '*-grad'")
    parser.add_argument("--keep", type=Path, default=None, help="move the CUDA-generated goldens here afterwards")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: CUDA is not available on this machine")

    specs = load_specs(default_spec_paths(ROOT / "specs"))
    if args.filter:
        specs = [replace(s, cases=[c for c in s.cases if fnmatchcase(c.id, args.filter)]) for s in specs]
    with tempfile.TemporaryDirectory(prefix="rlk-gpu-bench-") as tmp:
        start = time.perf_counter()
        cpu = generate(specs, args.tier, Path(tmp) / "cpu", n_workers=args.cpu_jobs, device="cpu")
        cpu_s = time.perf_counter() - start
        start = time.perf_counter()
        gpu = generate(specs, args.tier, Path(tmp) / "gpu", n_workers=args.gpu_jobs, device="cuda")
        gpu_s = time.perf_counter() - start
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.move(str(Path(tmp) / "gpu"), args.keep)
    by_id = {r.case_id: r.sha256 for r in cpu.results}
    differing = sorted(r.case_id for r in gpu.results if by_id.get(r.case_id) != r.sha256)
    figures = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
        "tier": args.tier, "filter": args.filter, "cases": len(cpu.results), "gflop": cpu.flops / 1e9,
        "cpu_jobs": args.cpu_jobs, "cpu_seconds": cpu_s, "gpu_jobs": args.gpu_jobs, "gpu_seconds": gpu_s,
        "speedup": cpu_s / gpu_s, "byte_identical": len(cpu.results) - len(differing), "differing": differing[:20],
    }
    for key, value in figures.items():
        print(f"{key:16s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
