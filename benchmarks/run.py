"""Run benchmarks: memory, phase overhead and multi-device speed-up of `rlk-conform run`, in one go.

    python benchmarks/run.py                                   # goldens/smoke, cuda if available else reference
    python benchmarks/run.py --goldens goldens/standard --devices cuda:0,cuda:1 --out bench/
    PYTHONPATH=. python benchmarks/run.py --devices cpu,cpu    # without the package installed

Every run is `python -m conformance run ... --profile --report-json` in a subprocess (the package
need not be installed: the repository root is put on PYTHONPATH), with `--no-regression`, from the
repository root. Before the timed runs every golden file is read once, so that the page cache is
equally warm for all of them. Rows of the table:

a. streaming memory: the run's peak RSS (its profile's `peak_rss_mib`, the high-water mark of the
   process that ran the cases) against 2 × the largest case's tensors (inputs + expected outputs,
   `largest_case_bytes`) + a fixed overhead. The fixed overhead is measured in the same invocation
   of this script: the peak RSS of the same command (same backend, device and checks) run on a
   golden directory holding only the smallest case of each family (`<op>/<family>`, copied from
   --goldens) — Python, the package, torch, the backend and its device initialized, and the code
   paths of every family taken once on small cases (their own tensors are not subtracted).
   The run of the largest case alone shows the streaming: the whole run's peak against it. With
   ``--backend benchmarks.zeros_backend:Zeros`` (a backend that returns zeros: it fails accuracy but
   has no working memory) the figures are the harness's own memory.
b. the run's wall time (profile `wall_s`: from the start of the `run` command, after the
   interpreter and imports, to its reports) against its read + backend time; target ≤ 1.5×.
c. with `--devices` listing two or more devices: wall time of `run --devices d0,d1,...` against
   `run --device d0` (the run of a.) on the same goldens, each timed from outside (the whole
   command, interpreter start-up included) and by its profile; target ≥ 1.8× on 2 GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
MAX_WALL_RATIO = 1.5
MIN_SPEEDUP = 1.8


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> list[tuple[str, str]]:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return [("machine", f"{platform.node()}: {cpu_model()}, {os.cpu_count()} cores"),
            ("GPUs", ", ".join(f"cuda:{i} {name}" for i, name in enumerate(gpus)) or "none"),
            ("torch", f"{torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}")]


def copy_cases(goldens: Path, manifest: dict[str, Any], entries: list[dict[str, Any]], target: Path) -> None:
    """A golden directory at ``target`` holding only the manifest ``entries`` of ``goldens``."""
    for entry in entries:
        (target / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(goldens / entry["path"], target / entry["path"])
    (target / "manifest.json").write_text(json.dumps({**manifest, "files": entries}, indent=2))


def smallest_per_family(goldens: Path, manifest: dict[str, Any], target: Path) -> list[dict[str, Any]]:
    """A golden directory at ``target`` with only the smallest case of each family; their entries."""
    chosen: dict[str, dict[str, Any]] = {}
    for entry in sorted(manifest["files"], key=lambda e: (e.get("bytes", 0), e["case_id"])):
        chosen.setdefault(entry["case_id"].rsplit("/", 1)[0], entry)
    copy_cases(goldens, manifest, list(chosen.values()), target)
    return list(chosen.values())


def warm_page_cache(goldens: Path, manifest: dict[str, Any]) -> int:
    total = 0
    for entry in manifest["files"]:
        with (goldens / entry["path"]).open("rb") as f:
            while chunk := f.read(16 * MIB):
                total += len(chunk)
    return total


def conform_run(label: str, goldens: Path, backend: str, report: Path, *extra: str) -> tuple[dict[str, Any], float]:
    """``python -m conformance run`` with --profile in a subprocess; its report and outside wall time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "conformance", "run", "--backend", backend, "--goldens", str(goldens),
           "--no-regression", "--profile", "--report-json", str(report), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1) or not report.is_file():  # 1: the backend failed checks, still measured
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise SystemExit(f"error: {label}: {' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    data = json.loads(report.read_text())
    if "profile" not in data:
        raise SystemExit(f"error: {label}: {report} has no profile")
    return data, wall


def same_records(a: list[dict], b: list[dict]) -> str:
    """Whether two runs' records are the same, compared as canonical JSON (NaN metrics equal NaN,
    which Python's == on floats denies), with the count and first of the differing ones if not."""
    ca = [json.dumps(r, sort_keys=True) for r in a]
    cb = [json.dumps(r, sort_keys=True) for r in b]
    if ca == cb:
        return "yes"
    if sorted(ca) == sorted(cb):
        return "same records, other order"
    differ = [(x, y) for x, y in zip(ca, cb) if x != y]
    first = differ[0] if differ else ("", "")
    return f"NO: {len(differ)} of {max(len(ca), len(cb))} differ; first: {first[0][:300]} vs {first[1][:300]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--goldens", type=Path, default=ROOT / "goldens" / "smoke", help="golden directory "
                        "(default: goldens/smoke)")
    parser.add_argument("--backend", default=None, help="default: cuda when CUDA is available, else reference")
    parser.add_argument("--device", default=None, help="device of the one-device runs (default: the first of "
                        "--devices, else the backend's own)")
    parser.add_argument("--devices", default=None, help="comma-separated devices for the multi-device run, "
                        "e.g. cuda:0,cuda:1 (cpu,cpu works too); needs two or more")
    parser.add_argument("--out", type=Path, default=None, help="keep the JSON reports in this directory")
    args = parser.parse_args()

    backend = args.backend or ("cuda" if torch.cuda.is_available() else "reference")
    goldens = args.goldens.resolve()
    manifest = json.loads((goldens / "manifest.json").read_text())
    devices = [d.strip() for d in args.devices.split(",")] if args.devices else []
    device = args.device or (devices[0] if devices else None)
    on_device = ["--device", device] if device else []

    with tempfile.TemporaryDirectory(prefix="rlk-run-bench-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        smallest = smallest_per_family(goldens, manifest, Path(tmp) / "smallest")
        warmed = warm_page_cache(goldens, manifest)
        tiny, tiny_wall = conform_run("fixed overhead", Path(tmp) / "smallest", backend, out / "overhead.json",
                                      *on_device)
        one, one_wall = conform_run("one device", goldens, backend, out / "one-device.json", *on_device)
        largest_id = one["profile"]["largest_case_id"]
        largest_entries = [e for e in manifest["files"] if e["case_id"] == largest_id]
        copy_cases(goldens, manifest, largest_entries, Path(tmp) / "largest")
        alone, _ = conform_run("largest case alone", Path(tmp) / "largest", backend, out / "largest.json", *on_device)
        several = None
        if len(devices) >= 2:
            several, several_wall = conform_run("devices", goldens, backend, out / "devices.json",
                                                "--devices", ",".join(devices))

    prof = one["profile"]
    rows = machine()
    rows += [("backend", f"{one['backend']['used']} on {one['backend']['device']} "
                         f"({one['execution_target'].get('device_name')})"),
             ("goldens", f"{goldens} ({len(manifest['files'])} cases, {warmed / MIB:.1f} MiB, page cache warmed)"),
             ("run, one device", f"{one_wall:.2f} s outside, {prof['wall_s']:.2f} s profile wall, "
                                 f"{prof['cases']} cases, verdict {one['summary']['verdict']}")]
    # a. streaming memory
    peak = prof["peak_rss_mib"] * MIB
    largest = prof["largest_case_bytes"]
    overhead = tiny["profile"]["peak_rss_mib"] * MIB
    bound = 2 * largest + overhead
    rows += [("a. peak RSS of the run", f"{peak / MIB:.1f} MiB"),
             ("   largest case (inputs + expected)", f"{largest / MIB:.2f} MiB ({prof['largest_case_id']})"),
             ("   fixed overhead", f"{overhead / MIB:.1f} MiB (peak RSS of the same run on only the smallest "
                                   f"case of each of the {len(smallest)} families, "
                                   f"{sum(e.get('bytes', 0) for e in smallest) / MIB:.2f} MiB of files, "
                                   f"{tiny_wall:.1f} s: interpreter, torch, backend, device, every code path)"),
             ("   bound 2 × largest + overhead", f"{bound / MIB:.1f} MiB"),
             ("   peak / bound", f"{peak / bound:.3f} → {'holds' if peak <= bound else 'EXCEEDED'}"),
             ("   streaming: the largest case alone", f"{alone['profile']['peak_rss_mib']:.1f} MiB peak RSS; the whole "
                                                     f"run / it = {peak / (alone['profile']['peak_rss_mib'] * MIB):.2f}"
                                                     " (1.0: the rest of the dataset adds nothing)")]
    # b. run wall time against the time reading goldens and in the backend
    phases = prof["phases_s"]
    work = phases["read"] + phases["backend"]
    ratio = prof["wall_s"] / work if work > 0 else float("inf")
    verdict = "met" if ratio <= MAX_WALL_RATIO else "MISSED"
    rows += [("b. profile phases (s)", ", ".join(f"{k} {v:.2f}" for k, v in phases.items())),
             ("   wall / (read + backend)", f"{prof['wall_s']:.2f} / {work:.2f} = {ratio:.2f}x "
                                           f"(target ≤ {MAX_WALL_RATIO}x: {verdict})")]
    # c. several devices against one
    if several is not None:
        dev_prof = several["profile"]
        speedup = one_wall / several_wall
        rows += [(f"c. run --devices {','.join(devices)}", f"{several_wall:.2f} s outside, {dev_prof['wall_s']:.2f} s "
                                                           f"profile wall, verdict {several['summary']['verdict']}"),
                 ("   per device", "; ".join(f"{d['device']} {d['cases']} cases {d['wall_s']:.2f} s"
                                             for d in dev_prof.get("devices") or [])),
                 ("   records identical to one device's", same_records(several["records"], one["records"])),
                 (f"   speed-up over --device {device}", f"{speedup:.2f}x outside, "
                                                          f"{prof['wall_s'] / dev_prof['wall_s']:.2f}x profile wall "
                                                          f"(target ≥ {MIN_SPEEDUP}x on 2 GPUs: "
                                                          f"{'met' if speedup >= MIN_SPEEDUP else 'missed'})")]
    elif args.devices:
        rows.append(("c. multi-device", f"skipped: --devices {args.devices} lists fewer than two devices"))
    if args.out:
        rows.append(("reports", str(args.out)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
