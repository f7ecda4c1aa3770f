"""Generation speed beside the machine's float64 matmul rate, measured in the same run.

    python benchmarks/generation.py --tier smoke --jobs 2
    python benchmarks/generation.py --tier standard --jobs 2 --out /tmp/goldens-standard

Prints one table: the float64 matmul rate (one thread, and all threads), the tier's mask-remaining
float64 work, wall time and the resulting rate, and their ratio. Figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from conformance.generate import generate
from conformance.spec import default_spec_paths, load_specs

ROOT = Path(__file__).resolve().parents[1]


def matmul_rate(threads: int, n: int = 2048, repeats: int = 5) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, dtype=torch.float64)
        b = torch.randn(n, n, dtype=torch.float64)
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="smoke", choices=("smoke", "standard", "full"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temporary one)")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    rate_1 = matmul_rate(1)
    rate_all = matmul_rate(cores)
    specs = load_specs(default_spec_paths(ROOT / "specs"))
    with tempfile.TemporaryDirectory(prefix="rlk-bench-") as tmp:
        out = args.out or Path(tmp)
        summary = generate(specs, args.tier, out, n_workers=args.jobs)
    rate = summary.flops / summary.seconds / 1e9
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}")
    print(f"{'float64 matmul, 1 thread':40s} {rate_1:8.2f} GFLOP/s")
    print(f"{'float64 matmul, ' + str(cores) + ' threads':40s} {rate_all:8.2f} GFLOP/s")
    print(f"{'tier ' + args.tier + ' cases':40s} {len(summary.results):8d}")
    print(f"{'mask-remaining float64 work':40s} {summary.flops / 1e9:8.2f} GFLOP")
    print(f"{'wall time (' + str(args.jobs) + ' jobs)':40s} {summary.seconds:8.2f} s")
    print(f"{'generation rate':40s} {rate:8.2f} GFLOP/s")
    print(f"{'ratio to float64 matmul (all threads)':40s} {rate / rate_all:8.1%}")


if __name__ == "__main__":
    main()
