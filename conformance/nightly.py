"""The nightly GPU lane: generate the goldens, run every available CUDA backend, report.

    python -m conformance.nightly --out nightly/ [--tier standard] [--profile nightly]
    nox -s nightly                      # the same, from a GPU runner

Steps, each a plain ``rlk-conform`` command (so a failure in one backend cannot take the others
down, and the log shows exactly what to rerun):

1. ``generate --tier T --device cuda --resume`` into ``OUT/goldens`` (``--resume`` keeps what an
   earlier night already made; the manifest is rewritten at the end);
2. for every backend that ``rlk-conform backends`` lists as available on CUDA: ``run`` over those
   goldens with the known-failure list ``known-failures/<backend>.yaml`` when it exists, then
   ``check --profile P`` (property search), each writing JSON and JUnit into OUT;
3. ``report`` over every JSON file: ``OUT/report.html`` and ``OUT/summary.md``.

Exit status: 0 when every run and check passed (known failures allowed), 1 when any has
unexpected failures, 2 when the lane itself could not run (no CUDA, generation failed).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "conformance"]


def _run(cmd: list[str], log: Path) -> int:
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"$ {line}", flush=True)
    with open(log, "a") as out:
        out.write(f"\n$ {line}\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode


def cuda_backends() -> list[str]:
    import torch

    from .backends import list_backends

    if not torch.cuda.is_available():
        return []
    names = []
    for info in list_backends():
        if info.available and info.name not in ("reference", "naive", "naive-fp32", "flex"):
            names.append(info.name)  # flex compiles per shape: too slow for a nightly over every case
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("nightly"))
    parser.add_argument("--tier", default="standard", choices=("smoke", "standard", "full"))
    parser.add_argument("--profile", default="nightly", choices=("ci", "nightly"))
    parser.add_argument("--max-examples", type=int, default=None, help="examples per property (default: profile)")
    parser.add_argument("--jobs", type=int, default=8, help="generation worker processes")
    parser.add_argument("--backends", default=None, help="comma-separated subset (default: every CUDA backend)")
    parser.add_argument("--known-failures", type=Path, default=Path("known-failures"))
    args = parser.parse_args(argv)

    backends = args.backends.split(",") if args.backends else cuda_backends()
    if not backends:
        print("error: no CUDA backend is available on this machine; the nightly lane needs a GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "nightly.log"
    goldens = args.out / "goldens"
    if _run([*CLI, "generate", "--tier", args.tier, "--device", "cuda", "--jobs", str(args.jobs), "--out",
             str(goldens), "--resume"], log) != 0:
        print(f"error: generating the {args.tier} goldens failed; see {log}", file=sys.stderr)
        return 2
    worst = 0
    reports: list[str] = []
    for name in backends:
        run_cmd = [*CLI, "run", "--backend", name, "--device", "cuda", "--goldens", str(goldens), "--no-regression",
                   "--report-json", str(args.out / f"run-{name}.json"), "--junit", str(args.out / f"run-{name}.xml")]
        known = args.known_failures / f"{name}.yaml"
        if known.is_file():
            run_cmd += ["--known-failures", str(known)]
        code = _run(run_cmd, log)
        print(f"run {name}: exit {code}")
        worst = max(worst, code)
        reports.append(str(args.out / f"run-{name}.json"))
        check_cmd = [*CLI, "check", "--backend", name, "--device", "cuda", "--profile", args.profile,
                     "--reproducers", str(args.out / "reproducers"),
                     "--report-json", str(args.out / f"check-{name}.json"),
                     "--junit", str(args.out / f"check-{name}.xml")]
        if args.max_examples:
            check_cmd += ["--max-examples", str(args.max_examples)]
        code = _run(check_cmd, log)
        print(f"check {name}: exit {code}")
        worst = max(worst, code)
        reports.append(str(args.out / f"check-{name}.json"))
    present = [r for r in reports if Path(r).is_file()]
    if present:
        _run([*CLI, "report", *present, "--html", str(args.out / "report.html"), "--summary-md",
              str(args.out / "summary.md")], log)
    status = 0 if worst == 0 else 1
    print(f"nightly: reports in {args.out} ({len(present)} result files); exit {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
