"""How many output elements the float64 tier decides, and what reaches the double-double tier, on a
few probe cases (one run, one device): the measure of how tight tier 1's error bound is.

    python benchmarks/tier1_decisions.py [--device cuda] [--json out.json] [--quick]

Each probe is a Llama-3-like head layout (32 query heads over 8 KV heads, D = 128) or a D = 64 one,
in bfloat16, float16 and float32, with the long rows where tier 1's bound is loosest, and two
backward probes. Printed per probe: output elements (dQ, dK and dV for a backward probe), decided
by tier 1, by the double-double tier, by the exact tier, and the seconds of the reference. The
goldens are correctly rounded whatever the split, so these counts move only when the bound does;
the seconds are this machine's, this run's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from conformance.reference.compute import compute_reference
from conformance.reference.gradient import compute_gradient_reference
from conformance.spec.case import Case
from conformance.spec.inputs import make_grad_out, make_inputs


def probe(hq: int, hkv: int, d: int, sq: int, skv: int, dtype: str, causal: bool = True, dist: str = "normal",
          grad: bool = False) -> Case:
    cid = (f"attention/probe/hq{hq}-hkv{hkv}-d{d}-b1-sq{sq}-skv{skv}-{dtype}-{'causal' if causal else 'noncausal'}"
           f"{'-grad' if grad else ''}")
    return Case(id=cid, op="attention", family="probe", tier="standard", batch=1, hq=hq, hkv=hkv, d=d, sq=sq,
                skv=skv, dtype=dtype, causal=causal, scale=None, mask="none", dist=dist, seed=20261201, grad=grad)


PROBES = [
    probe(32, 8, 128, 16, 32768, "bfloat16"),
    probe(32, 8, 128, 512, 2048, "bfloat16"),
    probe(32, 8, 128, 512, 2048, "float16"),
    probe(32, 8, 128, 256, 2048, "float32"),
    probe(16, 4, 64, 512, 4096, "bfloat16"),
    probe(16, 4, 64, 64, 4096, "bfloat16", dist="large_logits"),
    probe(32, 8, 128, 512, 512, "bfloat16", grad=True),  # the backward: dQ, dK and dV elements
    probe(16, 4, 64, 1024, 1024, "float16", grad=True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="the first three probes only")
    parser.add_argument("--grad-only", action="store_true", help="the backward probes only")
    args = parser.parse_args()
    rows = []
    probes = [c for c in PROBES if c.grad] if args.grad_only else PROBES[:3] if args.quick else PROBES
    for case in probes:
        inputs = make_inputs(case)
        t = time.perf_counter()
        if case.grad:
            golden = compute_gradient_reference(case, inputs, make_grad_out(case), args.device)
        else:
            golden = compute_reference(case, inputs, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        st = golden.stats
        elements = sum(int(getattr(golden, n).size) for n in ("dq", "dk", "dv")) if case.grad else int(golden.out.size)
        row = {"case": case.id, "elements": elements, "float64": st.float64,
               "double_double": st.double_double, "exact": st.exact, "seconds": round(seconds, 2)}
        rows.append(row)
        print(f"{case.id}: {row['elements']} elements, tier 1 {st.float64}, double-double {st.double_double}, "
              f"exact {st.exact}, {seconds:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "probes": rows}, f, indent=1)


if __name__ == "__main__":
    main()
