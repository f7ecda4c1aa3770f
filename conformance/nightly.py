"""The nightly GPU lane: generate the goldens, run every available CUDA backend, report.

    python -m conformance.nightly --out nightly/ [--tier standard] [--search-profile nightly]
    nox -s nightly                      # the same, from a GPU runner

Steps, each a plain ``rlk-conform`` command (so a failure in one backend cannot take the others
down, and the log shows exactly what to rerun):

1. ``generate --tier T --device cuda --resume`` into ``OUT/goldens`` (``--resume`` keeps what an
   earlier night already made; the manifest is rewritten at the end);
2. for every backend that ``rlk-conform backends`` lists as available on CUDA: ``run`` over those
   goldens with the known-failure list ``known-failures/<backend>.yaml`` when it exists, then
   ``check --search-profile P --time-budget B`` (property search, at most B seconds per property before
   shrinking), each writing JSON and JUnit into OUT. Up to ``--parallel`` backends at a time, each
   backend's ``run`` and ``check`` in its own subprocesses, one after the other;
3. ``report`` over every JSON file: ``OUT/report.html`` and ``OUT/summary.md``.

Files: ``OUT/run-<backend>.{json,xml}``, ``OUT/check-<backend>.{json,xml}``, ``OUT/reproducers/``;
each command's output in ``OUT/logs/<step>.log`` (``generate``, ``run-<backend>``,
``check-<backend>``, ``report``); the lane's own transcript (commands, exit codes, one status line
per backend) on stdout and in ``OUT/nightly.log``.

Exit status: 0 when every run and check passed (known failures allowed), 1 when any has
unexpected failures, 2 when the lane itself could not run (no CUDA, generation failed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "conformance"]
# Seconds of property search per property and backend (check --time-budget). A backend's check
# then takes about 9 × 10 s when every property holds, plus one example in flight each (less when
# failures end searches early; shrinking one may take until 2 × 10 s). With 6 CUDA backends, 4 at
# a time, the standard tier's whole lane took 356 s on one H200 (README.md, "The nightly GPU lane").
DEFAULT_CHECK_BUDGET = 10.0


def default_parallel(n_backends: int, cpus: int | None = None) -> int:
    """Backends at a time: one per 4 CPU cores (each one's exact reference and Hypothesis run on
    the CPU), at least 1, at most one per backend."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, min(n_backends, max(1, cpus // 4)))


class Lane:
    """Runs the lane's commands and keeps its transcript (stdout and ``OUT/nightly.log``)."""

    def __init__(self, out: Path, env: Mapping[str, str] | None = None) -> None:
        self.out = out
        self.logs = out / "logs"
        self.transcript = out / "nightly.log"
        self.env = dict(env) if env is not None else None
        self._lock = threading.Lock()

    def say(self, line: str, err: bool = False) -> None:
        with self._lock:
            print(line, file=sys.stderr if err else sys.stdout, flush=True)
            with open(self.transcript, "a") as f:
                f.write(line + "\n")

    def run(self, cmd: list[str], step: str) -> int:
        """Run ``cmd`` with its output in ``OUT/logs/<step>.log``; its exit code."""
        log = self.logs / f"{step}.log"
        line = " ".join(shlex.quote(c) for c in cmd)
        self.say(f"$ {line}    # log: {log}")
        start = time.monotonic()
        with open(log, "a") as out:
            out.write(f"\n$ {line}\n")
            out.flush()
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False, env=self.env).returncode
        self.say(f"{step}: exit {code} ({time.monotonic() - start:.0f} s)")
        return code


@dataclass
class BackendOutcome:
    """One backend's ``run`` and ``check``: exit codes, wall-clock seconds and report files."""

    name: str
    run_code: int
    check_code: int
    seconds: float
    run_json: Path
    check_json: Path

    @property
    def worst(self) -> int:
        return max(self.run_code, self.check_code)

    def status_line(self) -> str:
        """``<backend>: ok|FAIL — run: …; check: …; N s``, from the exit codes and the JSON reports."""
        verdict = "ok" if self.worst == 0 else "FAIL"
        return (f"{self.name}: {verdict} — run exit {self.run_code} ({_run_summary(self.run_json)}); "
                f"check exit {self.check_code} ({_check_summary(self.check_json)}); {self.seconds:.0f} s")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_summary(path: Path) -> str:
    report = _load(path)
    if report is None:
        return "no report"
    s = report.get("summary", {})
    by = s.get("by_status", {})
    text = f"{by.get('pass', 0)} pass, {s.get('unexpected_failures', 0)} unexpected failures"
    if s.get("expected_failures"):
        text += f", {s['expected_failures']} known"
    return text


def _check_summary(path: Path) -> str:
    report = _load(path)
    if report is None:
        return "no report"
    results = (report.get("search") or {}).get("results") or []
    count = {k: sum(r.get("status") == k for r in results) for k in ("pass", "fail", "error", "skip")}
    text = f"{count['pass']} held, {count['fail'] + count['error']} failed, {count['skip']} skipped"
    examples = sum(int(r.get("examples_run") or 0) for r in results)
    by_budget = sum(r.get("stopped_by") == "time-budget" for r in results)
    text += f"; {examples} examples"
    if by_budget:
        text += f", {by_budget} of {len(results)} properties stopped by the time budget"
    return text


# CPU-only backends, and the flex backends: they compile once per shape bucket (docs/backends.md),
# which has not yet been timed over a nightly's cases on the GPU.
NOT_NIGHTLY = ("reference", "naive", "naive-fp32", "flex", "flex-layouts")


def cuda_backends() -> list[str]:
    import torch

    from conformance.backends.registry import list_backends

    if not torch.cuda.is_available():
        return []
    return [info.name for info in list_backends(skip=NOT_NIGHTLY) if info.available]


def _child_env(parallel: int) -> dict[str, str] | None:
    """With several backends at a time, share the CPU cores among them (unless the caller set
    OMP_NUM_THREADS): otherwise each torch process starts one thread per core."""
    if parallel <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}


def _backend(lane: Lane, name: str, args: argparse.Namespace, goldens: Path) -> BackendOutcome:
    """``run`` then ``check`` of one backend, each a subprocess with its own log."""
    start = time.monotonic()
    out = args.out
    run_json, check_json = out / f"run-{name}.json", out / f"check-{name}.json"
    run_cmd = [*CLI, "run", "--backend", name, "--device", "cuda", "--goldens", str(goldens), "--no-regression",
               "--report-json", str(run_json), "--junit", str(out / f"run-{name}.xml")]
    known = args.known_failures / f"{name}.yaml"
    if known.is_file():
        run_cmd += ["--known-failures", str(known)]
    run_code = lane.run(run_cmd, f"run-{name}")
    check_cmd = [*CLI, "check", "--backend", name, "--device", "cuda", "--search-profile", args.search_profile,
                 "--reproducers", str(out / "reproducers"),
                 "--report-json", str(check_json), "--junit", str(out / f"check-{name}.xml")]
    if args.max_examples:
        check_cmd += ["--max-examples", str(args.max_examples)]
    if args.check_budget:
        check_cmd += ["--time-budget", f"{args.check_budget:g}"]
    check_code = lane.run(check_cmd, f"check-{name}")
    return BackendOutcome(name, run_code, check_code, time.monotonic() - start, run_json, check_json)


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _budget(text: str) -> float:
    x = float(text)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("nightly"))
    parser.add_argument("--tier", default="standard", choices=("smoke", "standard", "full"))
    parser.add_argument("--search-profile", default="nightly", choices=("ci", "nightly"),
                        help="property search profile of each backend's check (default: nightly)")
    parser.add_argument("--max-examples", type=_positive_int, default=None,
                        help="examples per property (default: the profile's)")
    parser.add_argument("--check-budget", type=_budget, default=DEFAULT_CHECK_BUDGET, metavar="SECONDS",
                        help="wall-clock seconds of property search per property and backend (check "
                        "--time-budget; shrinking a failure may take as long again); 0: no budget, the "
                        f"examples only (default: {DEFAULT_CHECK_BUDGET:g})")
    parser.add_argument("--parallel", type=_positive_int, default=None, metavar="N",
                        help="backends whose run and check go at the same time, as separate subprocesses "
                        "(default: min(backends, max(1, CPU cores // 4)))")
    parser.add_argument("--jobs", type=int, default=None,
                        help="generation worker processes (default: generate's own, at most 8 per CUDA device)")
    parser.add_argument("--backends", default=None, help="comma-separated subset (default: every CUDA backend)")
    parser.add_argument("--known-failures", type=Path, default=Path("known-failures"))
    args = parser.parse_args(argv)

    started = time.monotonic()
    backends = [b for b in args.backends.split(",") if b] if args.backends else cuda_backends()
    if not backends:
        print("error: no CUDA backend is available on this machine; the nightly lane needs a GPU", file=sys.stderr)
        return 2
    parallel = min(args.parallel, len(backends)) if args.parallel else default_parallel(len(backends))
    args.out.mkdir(parents=True, exist_ok=True)
    lane = Lane(args.out, _child_env(parallel))
    lane.logs.mkdir(exist_ok=True)
    goldens = args.out / "goldens"
    budget = f"{args.check_budget:g} s per property" if args.check_budget else "none"
    lane.say(f"nightly: {len(backends)} backends ({', '.join(backends)}), {parallel} at a time; tier {args.tier}, "
             f"search profile {args.search_profile}, check budget {budget}; logs in {lane.logs}")
    jobs = [] if args.jobs is None else ["--jobs", str(args.jobs)]
    if lane.run([*CLI, "generate", "--tier", args.tier, "--device", "cuda", *jobs, "--out", str(goldens), "--resume"],
                "generate") != 0:
        lane.say(f"error: generating the {args.tier} goldens failed; see {lane.logs / 'generate.log'}", err=True)
        return 2
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="nightly") as pool:
        outcomes = list(pool.map(lambda name: _backend(lane, name, args, goldens), backends))
    reports = [str(p) for o in outcomes for p in (o.run_json, o.check_json)]
    present = [r for r in reports if Path(r).is_file()]
    if present:
        lane.run([*CLI, "report", *present, "--html", str(args.out / "report.html"), "--summary-md",
                  str(args.out / "summary.md")], "report")
    worst = max(o.worst for o in outcomes)
    for o in outcomes:
        lane.say(f"nightly {o.status_line()}")
    status = 0 if worst == 0 else 1
    lane.say(f"nightly: reports in {args.out} ({len(present)} result files), {time.monotonic() - started:.0f} s; "
             f"exit {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
