"""Every case's seconds in one generation, and what they say about its wall time.

    python benchmarks/case_seconds.py --tier full --device cuda [--jobs N] [--json FILE]
    python benchmarks/case_seconds.py --from FILE            # the analysis of an earlier --json

Generates the tier with generate's default workers (or ``--jobs``) into a temporary directory and
records, per case, its seconds (as its worker measured them: inputs, reference, write and hash),
its estimated work (``schedule.estimated_work``, the key of the largest-first order) and its shape.
Then prints the wall time, the sum of the case times per worker, and the end of a list schedule of
the measured times on as many workers in two orders: the generator's (largest estimate first) and
the longest measured first. When the two ends agree with the sum per worker, the order of the cases
does not set the wall time; the difference from the wall time is what the workers spent not
computing a case (waiting for host memory, starting).
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def list_schedule_end(seconds: list[float], workers: int) -> float:
    """When ``workers`` workers that each take the next case as they free up finish ``seconds`` in order."""
    free = [0.0] * max(workers, 1)
    end = 0.0
    for s in seconds:
        t = heapq.heappop(free) + s
        end = max(end, t)
        heapq.heappush(free, t)
    return end


def analyse(record: dict[str, Any]) -> dict[str, float]:
    cases, n = record["cases"], record["workers"]

    def end(key: Callable[[dict[str, Any]], Any]) -> float:
        return list_schedule_end([c["seconds"] for c in sorted(cases, key=key)], n)

    total = sum(c["seconds"] for c in cases)
    return {"wall_s": record["wall"], "workers": n, "cases": len(cases), "case_seconds": total,
            "per_worker_s": total / n, "schedule_estimate_order_s": end(lambda c: (-c["work"], c["id"])),
            "schedule_measured_order_s": end(lambda c: -c["seconds"])}


def measure(tier: str, device: str, jobs: int | None) -> dict[str, Any]:
    from conformance.golden.generate import generate
    from conformance.golden.schedule import estimated_work
    from conformance.spec.load import default_spec_paths, load_specs

    specs = load_specs(default_spec_paths(ROOT / "specs"))
    cases = {c.id: c for s in specs for c in s.cases_for_tier(tier)}
    with tempfile.TemporaryDirectory(prefix="rlk-case-seconds-") as tmp:
        start = time.perf_counter()
        summary = generate(specs, tier, Path(tmp) / tier, n_workers=jobs, device=device)
        wall = time.perf_counter() - start
    rows = []
    for r in summary.results:
        c = cases[r.case_id]
        rows.append({"id": r.case_id, "seconds": r.seconds, "work": estimated_work(c), "grad": c.grad,
                     "op": c.op, "b": c.batch, "hq": c.hq, "hkv": c.hkv, "sq": c.sq, "skv": c.skv, "d": c.d,
                     "causal": c.causal, "dtype": c.dtype, "variants": bool(c.variants), "flops": r.flops,
                     "dd": r.refined_double_double, "exact": r.refined_exact, "bytes": r.bytes})
    return {"tier": tier, "device": device, "wall": wall, "workers": sum(s.workers for s in summary.devices),
            "cases": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="standard", choices=("smoke", "standard", "full"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: generate's own)")
    parser.add_argument("--json", type=Path, default=None, help="write every case's record here")
    parser.add_argument("--from", dest="source", type=Path, default=None, help="analyse this earlier --json")
    args = parser.parse_args()
    record = json.loads(args.source.read_text()) if args.source else measure(args.tier, args.device, args.jobs)
    if args.json and not args.source:
        args.json.write_text(json.dumps(record))
    for key, value in analyse(record).items():
        print(f"{key:26} {value:.1f}" if isinstance(value, float) else f"{key:26} {value}")
    slowest = sorted(record["cases"], key=lambda c: -c["seconds"])[:12]
    rank = {c["id"]: i for i, c in enumerate(sorted(record["cases"], key=lambda c: (-c["work"], c["id"])))}
    print("slowest (seconds, rank by estimated work, case):")
    for c in slowest:
        print(f"  {c['seconds']:7.1f} {rank[c['id']]:5d}  {c['id']}")


if __name__ == "__main__":
    main()
