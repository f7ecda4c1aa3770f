"""Generation benchmarks: every figure is a ratio measured in this one run (machines are noisy).

    python benchmarks/generation.py                      # standard tier subset, 2 jobs
    python benchmarks/generation.py --tier smoke --cases 0

Rows of the table:
- the float64 matmul rate of this machine (one thread, all threads);
- the exact generation rate on the chosen cases (mask-remaining float64 FLOPs / wall time) and its
  ratio to the all-threads matmul rate;
- ``--jobs N`` against ``--jobs 1`` on the same cases;
- the exact reference against the seed's naive fp32 reference (repeat_interleave K/V, full score
  matrix, fp32) on prefill and on decode cases, per case, single-threaded both.
Figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from conformance.golden.generate import generate
from conformance.reference.compute import compute_reference, single_thread
from conformance.spec.case import Case
from conformance.spec.inputs import make_inputs
from conformance.spec.load import OpSpec, default_spec_paths, load_specs

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


def naive_fp32_reference(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """The seed's reference: K/V repeated to every query head, the full score matrix, fp32."""
    g = case.group
    k = k.float().repeat_interleave(g, dim=1)
    v = v.float().repeat_interleave(g, dim=1)
    scale = case.effective_scale
    s = (q.float() @ k.transpose(-1, -2)) * scale
    i = torch.arange(case.sq)[:, None]
    j = torch.arange(case.skv)[None, :]
    see = (j <= i + case.skv - case.sq) if case.causal else torch.ones(case.sq, case.skv, dtype=torch.bool)
    see = see[None, None] if mask is None else see[None, None] & mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~see, -math.inf), dim=-1).nan_to_num(0.0)
    return p @ v


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def subset(specs: list[OpSpec], tier: str, limit: int) -> list[OpSpec]:
    """``limit`` cases per op declared by ``tier`` itself (not inherited from smaller tiers), evenly
    spread over the tier's range of sizes, so the benchmark is representative and fits in minutes."""
    out = []
    for spec in specs:
        cases = sorted((c for c in spec.cases if c.tier == tier), key=lambda c: c.batch * c.hq * c.sq * c.skv * c.d)
        if 0 < limit < len(cases):
            step = (len(cases) - 1) / (limit - 1) if limit > 1 else 0
            cases = [cases[round(i * step)] for i in range(limit)]
        out.append(OpSpec(path=spec.path, op=spec.op, seed=spec.seed, sha256=spec.sha256, cases=cases))
    return out


def spread(cases: list[Case], n: int) -> list[Case]:
    """``n`` of ``cases`` evenly spread over their range of sizes (smallest and largest included)."""
    cases = sorted(cases, key=lambda c: c.batch * c.hq * c.sq * c.skv * c.d)
    if len(cases) <= n:
        return cases
    return [cases[round(i * (len(cases) - 1) / (n - 1))] for i in range(n)]


def vs_naive(cases: list[Case]) -> tuple[float, float]:
    ours = theirs = 0.0
    with single_thread():
        for case in cases:
            inputs = make_inputs(case)
            ours += timed(lambda case=case, inputs=inputs: compute_reference(case, inputs))
            theirs += timed(lambda case=case, inputs=inputs: naive_fp32_reference(
                case, inputs.q, inputs.k, inputs.v, inputs.key_padding_mask))
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="standard", choices=("smoke", "standard", "full"))
    parser.add_argument("--cases", type=int, default=24, help="N cases per op spread over the tier's sizes "
                        "(0 = every case the tier itself declares)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-generation", action="store_true", help="only the comparison with the naive reference")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    specs = subset(load_specs(default_spec_paths(ROOT / "specs")), args.tier, args.cases)
    cases = [c for s in specs for c in s.cases]
    rows: list[tuple[str, str]] = []
    rate_1, rate_all = matmul_rate(1), matmul_rate(cores)
    rows += [("float64 matmul, 1 thread", f"{rate_1:.1f} GFLOP/s"),
             (f"float64 matmul, {cores} threads", f"{rate_all:.1f} GFLOP/s")]
    rows.append((f"cases ({args.tier}, {args.cases or 'all'} per op)", str(len(cases))))
    if not args.skip_generation:
        with tempfile.TemporaryDirectory(prefix="rlk-bench-") as tmp:
            one = generate(specs, args.tier, Path(tmp) / "j1", n_workers=1)
            many = generate(specs, args.tier, Path(tmp) / f"j{args.jobs}", n_workers=args.jobs)
        rate = many.flops / many.seconds / 1e9
        rows += [("mask-remaining float64 work", f"{many.flops / 1e9:.2f} GFLOP"),
                 (f"generation, {args.jobs} jobs", f"{many.seconds:.1f} s = {rate:.2f} GFLOP/s"),
                 ("  ratio to float64 matmul (all threads)", f"{rate / rate_all:.1%} (target >= 60%)"),
                 ("generation, 1 job", f"{one.seconds:.1f} s"),
                 (f"  --jobs {args.jobs} speed-up over --jobs 1",
                  f"{one.seconds / many.seconds:.2f}x (target >= 1.7x)")]
    prefill = spread([c for c in cases if c.sq == c.skv and c.sq > 1], 10)
    decode = spread([c for c in cases if c.sq == 1], 20)
    for label, chosen in (("prefill", prefill), ("decode", decode)):
        if chosen:
            ours, theirs = vs_naive(chosen)
            target = "1.0x" if label == "prefill" else "20x"
            rows.append((f"exact vs naive fp32 reference, {len(chosen)} {label} cases",
                         f"{ours:.2f} s vs {theirs:.2f} s = {theirs / ours:.2f}x its speed (target >= {target})"))
    print(f"machine: {platform.machine()} {platform.processor()}, {cores} cores, torch {torch.__version__}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
