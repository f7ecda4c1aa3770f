"""Gradient generation against the forward and against the float64 matmul rate, in one run.

    python benchmarks/gradients.py                               # standard tier's grad cases, CPU
    python benchmarks/gradients.py --device cuda --max-gflop 200 # on a GPU
    python benchmarks/gradients.py --tier smoke --cases 0        # every smoke grad case

For each chosen case with gradients (``grad: true``) it times the exact forward golden
(``compute_reference``) and the exact backward golden (``compute_gradient_reference``) of the same
inputs, on one thread on the CPU (as ``generate`` runs each worker) or on the GPU. Work is counted
as the golden files count it: the forward 4·D per (query row, visible key) pair (two matmuls), the
backward 10·D (five matmuls: dP = dO·vᵀ, dV = Pᵀ·dO, dQ = dS·k, dK = dSᵀ·q, and the recomputed
scores). Rows of the table, every ratio from this one run:

- the float64 matmul rate of the device (one thread on the CPU);
- forward and backward generation rate (GFLOP/s) and each as a share of that matmul rate;
- the backward's time against the forward's on the same cases, and its rate against the forward's;
- how many gradient elements each tier decided (float64, double-double, exact).
Figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from conformance.reference.compute import compute_reference, single_thread
from conformance.reference.gradient import compute_gradient_reference
from conformance.spec.case import Case
from conformance.spec.inputs import make_inputs
from conformance.spec.load import default_spec_paths, load_specs

ROOT = Path(__file__).resolve().parents[1]


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """float64 GFLOP/s of an n³ matmul on ``device`` (one thread on the CPU)."""
    a = torch.randn(n, n, dtype=torch.float64, device=device)
    b = torch.randn(n, n, dtype=torch.float64, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def chosen_cases(tier: str, limit: int, max_gflop: float) -> list[Case]:
    """The tier's cases with gradients (those it declares itself, or the smoke tier's), at most
    ``max_gflop`` of backward work each, ``limit`` of them spread evenly over their sizes."""
    cases = [c for s in load_specs(default_spec_paths(ROOT / "specs")) for c in s.cases_for_tier(tier)
             if c.grad and (c.tier == tier or tier == "smoke")]
    cases = sorted((c for c in cases if backward_flops(c) <= max_gflop * 1e9),
                   key=lambda c: (backward_flops(c), c.id))
    if 0 < limit < len(cases):
        cases = [cases[round(i * (len(cases) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else cases[-1:]
    return cases


def backward_flops(case: Case) -> float:
    """An upper bound for the selection (every pair visible), 10·D per pair."""
    return 10.0 * case.d * case.batch * case.hq * case.sq * case.skv


def timed(device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="standard", choices=("smoke", "standard", "full"))
    parser.add_argument("--cases", type=int, default=8, help="N cases spread over the sizes (0 = all)")
    parser.add_argument("--max-gflop", type=float, default=20.0, help="leave out cases with more backward work")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)

    cases = chosen_cases(args.tier, args.cases, args.max_gflop)
    if not cases:
        raise SystemExit(f"error: no case with gradients of at most {args.max_gflop} GFLOP in tier {args.tier}")
    with single_thread():
        rate = matmul_rate(device)
        fwd_s = bwd_s = 0.0
        fwd_flops = bwd_flops = 0
        tiers = {"float64": 0, "double_double": 0, "exact": 0}
        per_case = []
        for case in cases:
            inputs = make_inputs(case)
            assert inputs.grad_out is not None
            golden, f = timed(device, lambda case=case, inputs=inputs: compute_reference(case, inputs, device))
            grads, b = timed(device, lambda case=case, inputs=inputs: compute_gradient_reference(
                case, inputs, inputs.grad_out, device))
            fwd_s, bwd_s = fwd_s + f, bwd_s + b
            fwd_flops, bwd_flops = fwd_flops + golden.flops, bwd_flops + grads.flops
            for tier in tiers:
                tiers[tier] += getattr(grads.stats, tier)
            per_case.append({"case": case.id, "forward_s": round(f, 4), "backward_s": round(b, 4),
                             "backward_gflop": grads.flops / 1e9,
                             "refined": {"double_double": grads.stats.double_double, "exact": grads.stats.exact}})
            print(f"  {case.id}: forward {f:.3f} s, backward {b:.3f} s ({grads.flops / 1e9:.2f} GFLOP, "
                  f"{grads.stats.double_double} double-double, {grads.stats.exact} exact)", flush=True)
    fwd_rate, bwd_rate = fwd_flops / fwd_s / 1e9, bwd_flops / bwd_s / 1e9
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, 1 thread"
    figures = {
        "device": name, "torch": torch.__version__, "cores": os.cpu_count(), "tier": args.tier, "cases": len(cases),
        "float64_matmul_gflops": rate,
        "forward": {"seconds": fwd_s, "gflop": fwd_flops / 1e9, "gflops": fwd_rate, "of_matmul": fwd_rate / rate},
        "backward": {"seconds": bwd_s, "gflop": bwd_flops / 1e9, "gflops": bwd_rate, "of_matmul": bwd_rate / rate},
        "backward_over_forward_time": bwd_s / fwd_s, "backward_over_forward_rate": bwd_rate / fwd_rate,
        "gradient_elements_by_tier": tiers, "per_case": per_case,
    }
    rows = [
        ("device", f"{name}, torch {torch.__version__}"),
        (f"cases with gradients ({args.tier}, ≤ {args.max_gflop:g} GFLOP)", str(len(cases))),
        ("float64 matmul", f"{rate:.1f} GFLOP/s"),
        ("forward golden", f"{fwd_s:.2f} s, {fwd_flops / 1e9:.2f} GFLOP = {fwd_rate:.2f} GFLOP/s "
                           f"({fwd_rate / rate:.1%} of matmul)"),
        ("backward golden", f"{bwd_s:.2f} s, {bwd_flops / 1e9:.2f} GFLOP = {bwd_rate:.2f} GFLOP/s "
                            f"({bwd_rate / rate:.1%} of matmul)"),
        ("backward / forward time", f"{bwd_s / fwd_s:.2f}x (for {bwd_flops / fwd_flops:.1f}x the work)"),
        ("backward rate / forward rate", f"{bwd_rate / fwd_rate:.2f}x"),
        ("gradient elements by tier", ", ".join(f"{k} {v}" for k, v in tiers.items())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
