"""Peak memory of generating one golden (issue item 5: 32k-context cases within 24 GiB of RAM).

    python benchmarks/memory.py                                  # the full tier's 32k-context decode cases, CPU
    python benchmarks/memory.py --device cuda --case attention/presets/llama3.1-8b-b1-sq32768-skv32768-bf16-causal

Each case is generated (inputs, exact reference, HDF5 write) in a fresh child process; the parent
reads the child's peak resident set size from the kernel (``wait4``), so nothing is sampled and
nothing is missed. The table gives, per case, the peak RSS, the case's tensors (inputs plus the
golden's outputs), the fixed overhead (peak RSS of a child that does the same for the smallest
smoke case: Python, torch, h5py and, on CUDA, the CUDA context) and the GPU's peak allocation.
The float64 stage works in blocks of a bounded number of score elements (see
``conformance.reference.BLOCK_ELEMENTS``), so no full score matrix is ever materialised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
DEFAULT_CPU_CASES = ("attention/decode/hq8-hkv2-d64-b3-sq1-skv32768-fp32-causal",
                     "kv_cache_attention/decode/hq8-hkv2-d64-b3-past32767-new1-bf16-causal",
                     "attention/presets/qwen2.5-0.5b-b4-sq1-skv32768-bf16-causal-rightpad")
DEFAULT_CUDA_CASES = ("attention/presets/llama3.1-8b-b1-sq32768-skv32768-bf16-causal",)


def child(case_id: str, device: str, out: Path) -> None:
    """Generate one golden and print its figures as JSON (runs in the measured child process)."""
    import time

    import torch

    from conformance.golden.format import Provenance, case_path
    from conformance.golden.generate import generate_case, prefer_expandable_segments
    from conformance.golden.schedule import Job, host_bytes
    from conformance.spec.load import default_spec_paths, load_specs

    specs = load_specs(default_spec_paths(ROOT / "specs"))
    found = [(s, c) for s in specs for c in s.cases if c.id == case_id]
    if not found:
        raise SystemExit(f"error: no case {case_id!r} in specs/")
    spec, case = found[0]
    if device.startswith("cuda"):
        prefer_expandable_segments()  # as generate does
    prov = Provenance(spec_file=spec.path.name, spec_sha256=spec.sha256, spec_seed=spec.seed)
    start = time.perf_counter()
    res = generate_case(Job(case, prov, case_path(out, case.id)), device)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[case.dtype]
    inputs = (case.batch * case.hq * case.sq * case.d + 2 * case.batch * case.hkv * case.skv * case.d) * itemsize
    outputs = case.batch * case.hq * case.sq * (case.d * 4 + 4 + 8 + 8)  # out, lse, error_scale, naive_error
    print(json.dumps({
        "case": case.id, "seconds": time.perf_counter() - start, "gflop": res.flops / 1e9,
        "tensor_bytes": inputs + outputs, "file_bytes": res.bytes,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0,
        "cuda_reserved_peak_bytes": torch.cuda.max_memory_reserved() if device.startswith("cuda") else 0,
        "working_bytes": case.working_bytes, "host_estimate_bytes": host_bytes(case, device),
    }))


def measure(case_id: str, device: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="rlk-mem-") as tmp:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, __file__, "--child", case_id, "--device", device, "--out", tmp],
                                stdout=subprocess.PIPE, env=env, text=True)
        stdout = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"error: generating {case_id} failed (exit {os.waitstatus_to_exitcode(status)})")
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="case id (repeatable; default: see above)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit-gib", type=float, default=24.0, help="the RAM budget the cases must fit")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.device, args.out)
        return

    import torch

    cases = args.case or list(DEFAULT_CUDA_CASES if args.device.startswith("cuda") else DEFAULT_CPU_CASES)
    smallest = "attention/distributions/hq2-hkv2-d64-b1-sq1-skv129-bf16-causal-largelogits"
    fixed = measure(smallest, args.device)["peak_rss_bytes"]
    rows = [measure(c, args.device) for c in cases]
    gpu = f", {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else ""
    print(f"machine: {platform.machine()} {platform.processor()}, {os.cpu_count()} cores{gpu}, torch "
          f"{torch.__version__}, device {args.device}")
    print(f"fixed overhead (peak RSS generating the smallest smoke case): {fixed / GIB:.2f} GiB")
    print("peak RSS − fixed overhead is what one case adds to a worker; generate starts a case when its "
          "estimate (est., HOST_BYTES_PER_CASE of the device + HOST_BYTES_PER_WORKING_BYTE × working bytes) "
          "fits its host budget beside what the workers hold")
    print(f"{'case':<72} {'time':>8} {'tensors':>9} {'peak RSS':>9} {'added':>8} {'est.':>8} {'GPU peak':>9} "
          f"{'reserved':>9}  within {args.limit_gib:g} GiB")
    for r in rows:
        ok = r["peak_rss_bytes"] <= args.limit_gib * GIB
        print(f"{r['case']:<72} {r['seconds']:7.1f}s {r['tensor_bytes'] / GIB:8.2f}G {r['peak_rss_bytes'] / GIB:8.2f}G "
              f"{(r['peak_rss_bytes'] - fixed) / GIB:7.2f}G {r['host_estimate_bytes'] / GIB:7.2f}G "
              f"{r['cuda_peak_bytes'] / GIB:8.2f}G {r['cuda_reserved_peak_bytes'] / GIB:8.2f}G  "
              f"{'yes' if ok else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"fixed_overhead_bytes": fixed, "device": args.device, "cases": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
