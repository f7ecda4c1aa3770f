"""Host memory of a command and of every process it starts, sampled once a second (Linux).

    python benchmarks/host_memory.py --samples host.txt -- python -m conformance generate --tier full \\
        --device cuda -j 16 --out /tmp/full

Runs the command, and while it runs writes one line a second to ``--samples``: the epoch, the
machine's used memory in MiB (``/proc/meminfo``: total − free − buffers − cached − reclaimable slab)
and ``pid:anon:shmem:file`` MiB (``RssAnon``, ``RssShmem``, ``RssFile``) for the command and each of
its descendants. At the end it prints the peaks: the machine's used memory (less what was used
before the command started), the sum over the processes of anon + shmem (what generation's host
budget counts, page tables aside), and the largest process; and the command's exit code, which it
returns. The figures of docs/performance.md ("Fifth run", host memory process by process) came
from this sampling.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from conformance.processes import memory_status

MIB = 1 << 20


def used_mib() -> int:
    info = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            name, value = line.split(":", 1)
            info[name] = int(value.split()[0])  # kB
    free = info["MemFree"] + info["Buffers"] + info["Cached"] + info.get("SReclaimable", 0)
    return (info["MemTotal"] - free) >> 10


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (every thread's list)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                found += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return found


def tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children(pid)
    return pids


def rss_mib(pid: int) -> tuple[int, int, int] | None:
    """(RssAnon, RssShmem, RssFile) of ``pid`` in MiB, None once it is gone."""
    fields = memory_status(pid, ("RssAnon", "RssShmem", "RssFile"))
    return None if fields is None else (fields[0] // MIB, fields[1] // MIB, fields[2] // MIB)


def sample(root: int, out: Path, stop: threading.Event, peaks: dict[str, int], period: float) -> None:
    with out.open("w", encoding="ascii") as f:
        f.write("# epoch_s used_MiB pid:RssAnon:RssShmem:RssFile (MiB) for the command and its descendants\n")
        while not stop.is_set():
            used = used_mib()
            procs = [(pid, r) for pid in tree(root) if (r := rss_mib(pid)) is not None]
            f.write(f"{int(time.time())} {used} " + " ".join(f"{pid}:{a}:{s}:{fl}" for pid, (a, s, fl) in procs) + "\n")
            f.flush()
            peaks["used"] = max(peaks["used"], used)
            peaks["processes"] = max(peaks["processes"], sum(a + s for _, (a, s, _) in procs))
            peaks["largest"] = max([peaks["largest"], *(a + s for _, (a, s, _) in procs)])
            peaks["count"] = max(peaks["count"], len(procs))
            stop.wait(period)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, required=True, help="write the samples here")
    parser.add_argument("--period", type=float, default=1.0, help="seconds between samples (default 1)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if not Path("/proc/meminfo").exists():
        parser.error("needs Linux's /proc")
    before = used_mib()
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peaks = {"used": before, "processes": 0, "largest": 0, "count": 0}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(proc.pid, args.samples, stop, peaks, args.period), daemon=True)
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    print(f"host memory of `{' '.join(command)}` ({time.perf_counter() - start:.1f} s, exit {code}):", file=sys.stderr)
    print(f"  machine's used memory at the peak: {peaks['used'] / 1024:.2f} GiB ({(peaks['used'] - before) / 1024:.2f} "
          f"GiB above the {before / 1024:.2f} GiB used before)", file=sys.stderr)
    print(f"  the processes' anon + shmem at the peak: {peaks['processes'] / 1024:.2f} GiB over up to "
          f"{peaks['count']} processes; the largest process {peaks['largest'] / 1024:.2f} GiB", file=sys.stderr)
    print(f"  samples: {args.samples}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
