"""What a person reads in the terminal: the check × dtype summary, the worst offenders, the
profile table and the property search table.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from conformance.judge.records import Record
from conformance.report.json import DTYPE_ORDER
from conformance.run.profiling import MIB, PHASES
from conformance.spec.checks import CHECKS


def badness(r: Record) -> float:
    m = r.metrics
    if r.status == "error":
        return float("inf")
    if "threshold_ratio" in m and m["threshold_ratio"] is not None:
        return float(m["threshold_ratio"])
    return float(m.get("mismatched_elements", 1))


def print_summary(console: Console, records: Sequence[Record], title: str, worst: int = 10) -> None:
    cells: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    margins: dict[tuple[str, str], float] = {}
    dtypes = [d for d in DTYPE_ORDER if any(r.dtype == d for r in records)]
    dtypes += sorted({r.dtype for r in records} - set(dtypes))
    for r in records:
        key = (r.check, r.dtype)
        cells[key][r.status] += 1
        if r.check == "accuracy" and r.metrics.get("margin") is not None:
            margins[key] = min(margins.get(key, float("inf")), float(r.metrics["margin"]))
    table = Table(title=title, caption="pass / fail / error / skip (worst accuracy margin: 1 − err/threshold)")
    table.add_column("check")
    for d in dtypes:
        table.add_column(d or "—", justify="right")
    for check in [c for c in CHECKS if any(r.check == c for r in records)]:
        row = [check]
        for d in dtypes:
            c = cells.get((check, d))
            if not c:
                row.append("")
                continue
            style = "red" if c["fail"] or c["error"] else ("green" if c["pass"] else "yellow")
            text = f"{c['pass']}/{c['fail']}/{c['error']}/{c['skip']}"
            if (check, d) in margins:
                text += f"  m={margins[(check, d)]:.2f}"
            row.append(f"[{style}]{text}[/]")
        table.add_row(*row)
    console.print(table)
    bad = sorted((r for r in records if r.status in ("fail", "error") and r.expected is None), key=badness,
                 reverse=True)
    known = [r for r in records if r.status in ("fail", "error") and r.expected is not None]
    if known:
        reasons = Counter(r.expected for r in known)
        console.print(f"[yellow]{len(known)} expected failures[/] (known-failure list): " + "; ".join(
            f"{n}× {msg}" for msg, n in reasons.most_common(3)), soft_wrap=True)
    if bad:
        console.print(f"[bold red]worst offenders[/] ({len(bad)} failing records):")
        for r in bad[:worst]:
            console.print(f"  {r.status.upper()} {r.check}: {r.case_id}", markup=False, highlight=False,
                          soft_wrap=True)
            console.print(f"      {r.message}", markup=False, highlight=False, soft_wrap=True)
    skipped = [r for r in records if r.status == "skip"]
    if skipped:
        reasons = Counter(r.message for r in skipped)
        console.print(f"[yellow]{len(skipped)} skipped[/]: " + "; ".join(f"{n}× {msg}" for msg, n in
                                                                        reasons.most_common(3)), soft_wrap=True)

def mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def print_profile(console: Console, profile: dict[str, Any], title: str = "profile") -> None:
    """The report's ``profile`` object as a small table: seconds and share per phase, then totals."""
    phases = profile.get("phases_s") or {}
    wall_s = float(profile.get("wall_s") or 0.0)
    process_s = float(profile.get("process_s") or wall_s)
    several = abs(process_s - wall_s) > 1e-6  # --devices, or a merged report
    table = Table(title=title)
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    for name in (*PHASES, "other"):
        seconds = float(phases.get(name) or 0.0)
        table.add_row(name, f"{seconds:.3f}", f"{seconds / process_s:.1%}" if process_s > 0 else "—")
    table.add_section()
    if several:
        table.add_row("process time", f"{process_s:.3f}", "100.0%")
    table.add_row("wall time", f"{wall_s:.3f}", "" if several else "100.0%")
    console.print(table)
    largest = int(profile.get("largest_case_bytes") or 0)
    console.print(f"{profile.get('cases', 0)} cases; peak RSS {float(profile.get('peak_rss_mib') or 0.0):.1f} MiB; "
                  f"largest case {mib(largest)} of tensors"
                  + (f" ({profile['largest_case_id']})" if profile.get("largest_case_id") else ""),
                  markup=False, highlight=False, soft_wrap=True)
    if several:
        console.print("phases add up to the process time: the seconds of every process of the run (each device's "
                      "worker with --devices, each shard in a merged report)", markup=False, highlight=False,
                      soft_wrap=True)
    for dev in profile.get("devices") or []:
        dev_phases = dev.get("phases_s") or {}
        console.print(f"  {dev.get('device')}: {dev.get('cases', 0)} cases in {float(dev.get('wall_s') or 0.0):.2f} s "
                      f"(read {float(dev_phases.get('read') or 0.0):.2f} s, backend "
                      f"{float(dev_phases.get('backend') or 0.0):.2f} s), peak RSS "
                      f"{float(dev.get('peak_rss_mib') or 0.0):.1f} MiB", markup=False, highlight=False,
                      soft_wrap=True)

def print_search(console: Console, results: list[Any], budget: float | None) -> None:
    """One row per property: its result, the examples the search judged and what stopped it."""
    title = "property search" + (f" (time budget {budget:g} s per property)" if budget is not None else "")
    table = Table(title=title, caption="stopped by: max-examples, time-budget, counterexample (then shrunk), "
                  "exhausted (Hypothesis ran out of new or accepted examples)")
    table.add_column("property")
    table.add_column("result")
    table.add_column("examples run", justify="right")
    table.add_column("declined", justify="right")
    table.add_column("stopped by")
    table.add_column("seconds", justify="right")
    styles = {"pass": "green", "fail": "red", "error": "red", "skip": "yellow"}
    for res in results:
        status = res.status
        stopped = res.stopped_by or "not applicable"
        if res.shrink_stopped_by == "time-budget":
            stopped += ", shrinking cut by time-budget"
        table.add_row(res.name, f"[{styles.get(status, 'white')}]{status}[/]", str(res.examples_run),
                      str(res.examples_declined), stopped, f"{res.elapsed_s:.1f}")
    console.print(table)


def print_reproducers(console: Console, records: Sequence[Record], backend: str) -> None:
    """For each failing property record with a reproducer: its path and the command that replays it."""
    for r in records:
        path = r.metrics.get("reproducer")
        if path and r.status in ("fail", "error"):
            console.print(f"reproducer ({r.check}): {path}\n      replay: rlk-conform replay {path} --backend "
                          f"{backend}", markup=False, highlight=False, soft_wrap=True)
