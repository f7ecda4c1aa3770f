"""Where the time of generating one golden goes: seconds per stage, per case, on one device.

    python benchmarks/profile_generation.py --device cuda --json prof.json CASE_ID [CASE_ID ...]

Each case of the full tier named is generated with ``generate_case`` into a temporary directory
(removed afterwards) while the stages are timed: input drawing, tier 1 (``float64_block``), tier 2's
two passes (``_tier2_pass``: the first pass and the double-double exp pass), the exact tier, the
backward's stages, writing and hashing. On CUDA every stage boundary synchronises the device, so a
stage's time is its own. Also printed: the card's float64 matmul rate (8192³) and float64
elementwise bandwidth, measured in the same run, and the GPU memory peak of each case.
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
import conformance.reference.gradient as bwd
from conformance.golden.format import Provenance
from conformance.spec.load import default_spec_paths, load_specs

ROOT = Path(__file__).resolve().parents[1]
STAGES = [(gen, "make_inputs"), (fwd, "float64_block"), (fwd, "_tier2_pass"), (fwd, "exact_row"),
          (fwd, "certified_lse"), (bwd, "backward_block"), (bwd, "decide_float64"), (bwd, "tier2"),
          (bwd, "exact_tier"), (gen, "write_golden"), (gen, "sha256_file")]


def timed(module: Any, name: str, seconds: dict[str, float], sync: Callable[[], None]) -> None:
    """Replace ``module.name`` by a wrapper that adds its (synchronised) time to ``seconds``."""
    original = getattr(module, name)
    label = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sync()
        start = time.perf_counter()
        try:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", metavar="CASE_ID")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
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
                   "stages": dict(seconds), "gpu_peak_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}
            figures["cases"][cid] = row
            print(cid, json.dumps(row), flush=True)
            job.path.unlink()
    if cuda:
        figures.update(card_rates(args.device))
    print(json.dumps({k: v for k, v in figures.items() if k != "cases"}))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
