"""Where the time of generating one golden goes: seconds per stage, per case, on one device.

    python benchmarks/profile_generation.py --device cuda --json prof.json CASE_ID [CASE_ID ...]

Each case of the full tier named is generated with ``generate_case`` into a temporary directory
(removed afterwards) while the stages are timed: input drawing, tier 1 (``float64_block``), tier 2's
two passes (``_tier2_pass``: the first pass and the double-double exp pass), the exact tier, the
backward's stages, writing and hashing. On CUDA every stage boundary synchronises the device, so a
stage's time is its own. Also printed: the card's float64 matmul rate (8192³) and float64
elementwise bandwidth, measured in the same run, and the GPU memory peaks of each case
(reserved by the caching allocator and allocated by tensors).

``--tier2-chunks FWD,BWD`` sets tier 2's chunk sizes (powers of two) for the comparison of chunk sizes.

``--kernels N`` also runs each case under ``torch.profiler`` and prints, per stage, the N operators
with the most device time (CUDA kernels on a GPU, CPU time on the CPU) and their share of the
stage: which kernels bound it. The profiler slows the case; its stage seconds are not the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import conformance.golden.generate as gen
import conformance.reference.compute as fwd
import conformance.reference.double_double as dd
import conformance.reference.gradient as bwd
import conformance.reference.gradient_double_double as gdd
from conformance.golden.format import Provenance
from conformance.spec.load import default_spec_paths, load_specs

ROOT = Path(__file__).resolve().parents[1]
STAGES = [(gen, "make_inputs"), (fwd, "float64_block"), (fwd, "_tier2_pass"), (fwd, "exact_row"),
          (fwd, "certified_lse"), (bwd, "backward_block"), (bwd, "decide_float64"), (bwd, "tier2"),
          (bwd, "exact_tier"), (gen, "write_golden"), (gen, "sha256_file")]


STAGE_MARK = "stage:"


def _own_time(event: Any, cuda: bool) -> float:
    """An operator's own device time (CUDA) or CPU time, in microseconds, whatever the torch version."""
    names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    return next((float(getattr(event, n)) for n in names if hasattr(event, n)), 0.0)


def kernel_shares(events: Any, cuda: bool, top: int) -> dict[str, list[tuple[str, float, float]]]:
    """Per stage (the innermost stage marker above an operator), its ``top`` operators by own time:
    (operator, seconds, share of the stage's operator time)."""
    per_stage: dict[str, dict[str, float]] = {}
    for event in events:
        if event.name.startswith(STAGE_MARK) or event.device_type != torch.autograd.DeviceType.CPU:
            continue  # a kernel's own event: its time is counted on the operator that launched it
        own = _own_time(event, cuda)
        if own <= 0:
            continue
        parent, stage = event.cpu_parent, "outside the stages"
        while parent is not None:
            if parent.name.startswith(STAGE_MARK):
                stage = parent.name[len(STAGE_MARK):]
                break
            parent = parent.cpu_parent
        ops = per_stage.setdefault(stage, {})
        ops[event.name] = ops.get(event.name, 0.0) + own
    shares = {}
    for stage, ops in per_stage.items():
        total = sum(ops.values())
        ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
        shares[stage] = [(name, us / 1e6, us / total) for name, us in ranked]
    return shares


def timed(module: Any, name: str, seconds: dict[str, float], sync: Callable[[], None]) -> None:
    """Replace ``module.name`` by a wrapper that adds its (synchronised) time to ``seconds``."""
    original = getattr(module, name)
    label = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sync()
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(STAGE_MARK + label):
                return original(*args, **kwargs)
        finally:
            sync()
            seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


def card_rates(device: str) -> dict[str, float]:
    """float64 matmul GFLOP/s (8192³) and elementwise GB/s (read + write) on ``device``."""
    a = torch.randn(8192, 8192, dtype=torch.float64, device=device)
    for _ in range(2):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    torch.cuda.synchronize()
    matmul = 5 * 2 * 8192**3 / (time.perf_counter() - start) / 1e9
    x = torch.randn(1 << 28, dtype=torch.float64, device=device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        x * 1.5
    torch.cuda.synchronize()
    bandwidth = 10 * 16 * (1 << 28) / (time.perf_counter() - start) / 1e9
    return {"float64_matmul_gflops": matmul, "float64_elementwise_gbps": bandwidth}


def profile_kernels(job: Any, device: str, cuda: bool, top: int) -> dict[str, list[tuple[str, float, float]]]:
    """Generate ``job``'s golden again under ``torch.profiler``; print and return :func:`kernel_shares`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        gen.generate_case(job, device)
    job.path.unlink()
    shares = kernel_shares(prof.events(), cuda, top)
    for stage, ops in shares.items():
        print(f"  {stage}:")
        for name, seconds, share in ops:
            print(f"    {share:6.1%} {seconds:8.3f} s  {name}")
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", metavar="CASE_ID")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--kernels", type=int, default=0, metavar="N",
                        help="also profile each case: the N operators with the most device time per stage")
    parser.add_argument("--tier2-chunks", default=None, metavar="FWD,BWD",
                        help="tier 2's (row, key) pairs per chunk on the device as powers of two, forward and "
                        "backward (e.g. 23,22): the chunk-size comparison of docs/performance.md (fifth run)")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    if args.tier2_chunks:
        fwd_log2, bwd_log2 = (int(x) for x in args.tier2_chunks.split(","))
        prefix = "CUDA_" if cuda else ""
        setattr(dd, f"{prefix}TIER2_ELEMENTS", 1 << fwd_log2)
        setattr(gdd, f"{prefix}GRAD_TIER2_ELEMENTS", 1 << bwd_log2)
        print(f"tier-2 chunks: 2^{fwd_log2} forward, 2^{bwd_log2} backward", flush=True)
    if cuda:
        gen.prefer_expandable_segments()  # as generate does (PYTORCH_CUDA_ALLOC_CONF set: the user's choice)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seconds: dict[str, float] = {}
    for module, name in STAGES:
        timed(module, name, seconds, sync)
    cases = {c.id: c for s in load_specs(default_spec_paths(ROOT / "specs")) for c in s.cases_for_tier("full")}
    unknown = [c for c in args.cases if c not in cases]
    if unknown:
        raise SystemExit(f"error: not a case of the full tier: {', '.join(unknown)}")
    figures: dict[str, Any] = {"device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
                               "torch": torch.__version__, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="rlk-profile-") as tmp:
        for cid in args.cases:
            seconds.clear()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            job = gen.Job(cases[cid], Provenance("profile", "0" * 64, 0), Path(tmp) / f"{len(figures['cases'])}.h5")
            start = time.perf_counter()
            res = gen.generate_case(job, args.device)
            wall = time.perf_counter() - start
            row = {"seconds": wall, "gflop": res.flops / 1e9, "gflops": res.flops / wall / 1e9,
                   "refined_double_double": res.refined_double_double, "refined_exact": res.refined_exact,
                   "stages": dict(seconds),
                   "gpu_peak_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
                   "gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
            figures["cases"][cid] = row
            print(cid, json.dumps(row), flush=True)
            job.path.unlink()
            if args.kernels:
                row["kernels"] = profile_kernels(job, args.device, cuda, args.kernels)
    if cuda:
        figures.update(card_rates(args.device))
    print(json.dumps({k: v for k, v in figures.items() if k != "cases"}))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
