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
from conformance.spec.case import parse_case_id
from conformance.spec.checks import CHECKS, GRADIENT_CHECKS, GRADIENT_INVARIANCE_CHECKS, INVARIANCE_CHECKS


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
        if r.check in ("accuracy", "gradient_accuracy") and r.metrics.get("margin") is not None:
            margins[key] = min(margins.get(key, float("inf")), float(r.metrics["margin"]))
    # The title on a line of its own: a table title wraps at the table's width.
    console.print(title, style="bold", markup=False, highlight=False, soft_wrap=True)
    present = [c for c in CHECKS if any(r.check == c for r in records)]
    present += sorted({r.check for r in records} - set(present))
    forward = [c for c in present if c not in GRADIENT_CHECKS]
    gradient = [c for c in present if c in GRADIENT_CHECKS]
    # The forward's and the gradients' judgments are reported apart: a table each.
    for checks, what in ((forward, "the forward: out"), (gradient, "the gradients: dQ, dK, dV")):
        if not checks:
            continue
        table = Table(title=what if gradient else None,
                      caption="pass / fail / error / skip (worst accuracy margin: 1 − err/threshold)")
        table.add_column("check")
        for d in dtypes:
            table.add_column(d or "—", justify="right")
        for check in checks:
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
    for line in failure_patterns(records):
        console.print(f"[bold]pattern[/] {line}", soft_wrap=True)
    skipped = [r for r in records if r.status == "skip"]
    if skipped:
        reasons = Counter(r.message for r in skipped)
        console.print(f"[yellow]{len(skipped)} skipped[/]: " + "; ".join(f"{n}× {msg}" for msg, n in
                                                                        reasons.most_common(3)), soft_wrap=True)


# Case parameters a failure pattern may name, and how a value reads in a sentence.
PATTERN_PARAMETERS = ("op", "family", "dtype", "causal", "mask", "dist", "decode", "group", "sinks", "softcapped",
                      "windowed")
# Yes/no parameters: how the failing cases and the others read for each value.
_FLAGS = {
    "causal": (("are causal", "non-causal"), ("are non-causal", "causal")),
    "decode": (("are decodes (Sq = 1)", "with Sq > 1"), ("have Sq > 1", "decodes (Sq = 1)")),
    "sinks": (("have attention sinks", "without sinks"), ("have no sinks", "with sinks")),
    "softcapped": (("are soft-capped", "without soft-capping"), ("are not soft-capped", "soft-capped")),
    "windowed": (("have a sliding window", "without a window"), ("have no window", "with a window")),
}


def _phrase(param: str, value: Any) -> tuple[str, str]:
    """What the failing cases share, and how the other cases are named: ("are causal", "non-causal")."""
    if param in _FLAGS:
        return _FLAGS[param][0 if value else 1]
    if param == "op":
        return f"are {value} cases", "of the other op"
    if param == "group":
        return f"have GQA group {value}", "with another group"
    return f"have {param} {value}", f"with another {param}"


def failure_patterns(records: Sequence[Record]) -> list[str]:
    """One line per check whose failing cases share a parameter value that its passing cases do not
    all share — ``all 74 failing accuracy cases are causal; 0 of 76 non-causal fail`` — choosing the
    value that explains the failures best (the largest share of its cases failing). Parameters come
    from the case ids (:func:`conformance.spec.case.parse_case_id`); property-search records and
    checks with a single failing case give no line."""
    by_check: dict[str, dict[str, set[str]]] = defaultdict(lambda: {"fail": set(), "pass": set()})
    params: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.status == "skip" or r.expected is not None:
            continue
        p = params.get(r.case_id) or parse_case_id(r.case_id)
        if p is None or "seed" in p:
            continue
        params[r.case_id] = {**p, "decode": p["sq"] == 1, "softcapped": p.get("softcap") is not None,
                             "windowed": tuple(p.get("window", (-1, -1))) != (-1, -1)}
        by_check[r.check]["fail" if r.status in ("fail", "error") else "pass"].add(r.case_id)
    lines = []
    for check in [c for c in CHECKS if c in by_check] + sorted(set(by_check) - set(CHECKS)):
        failing = by_check[check]["fail"]
        passing = by_check[check]["pass"] - failing
        if len(failing) < 2 or not passing:
            continue
        best: tuple[float, str, Any, int] | None = None
        for param in PATTERN_PARAMETERS:
            values = {params[c].get(param) for c in failing}
            if len(values) != 1 or None in values:
                continue
            value = values.pop()
            others = [c for c in passing if params[c].get(param) != value]
            if not others:
                continue  # every case has that value: it separates nothing
            same = sum(params[c].get(param) == value for c in passing) + len(failing)
            share = len(failing) / same
            if best is None or share > best[0]:
                best = (share, param, value, len(others))
        if best is not None:
            _, param, value, others = best
            shared, rest = _phrase(param, value)
            lines.append(f"all {len(failing)} failing {check} cases {shared}; 0 of {others} {rest} fail")
    return lines


def guidance(records: Sequence[Record], backend: str) -> list[str]:
    """Two or three closing lines for a failing run: what failed by kind, where to look, and the
    command of a run that passes (the exact reference) or of the accuracy and contract checks alone."""
    bad = [r for r in records if r.status in ("fail", "error") and r.expected is None]
    if not bad:
        return []
    kinds = Counter("invariance" if r.check in INVARIANCE_CHECKS else "gradient invariance"
                    if r.check in GRADIENT_INVARIANCE_CHECKS else r.check for r in bad)
    by_check = Counter(r.check for r in bad if r.check in INVARIANCE_CHECKS)
    by_gradient = Counter(r.check for r in bad if r.check in GRADIENT_INVARIANCE_CHECKS)
    parts = []
    for kind, n in kinds.most_common():
        counts = by_check if kind == "invariance" else by_gradient if kind == "gradient invariance" else None
        detail = f" ({', '.join(f'{c} {k}' for c, k in counts.most_common())})" if counts else ""
        parts.append(f"{kind} {n}{detail}")
    lines = [f"what failed: {'; '.join(parts)}"]
    if set(kinds) <= {"invariance", "gradient invariance"}:
        lines[0] += (" — the outputs are accurate but their bits change with the surroundings (batch, split, "
                     "chunking, padding, reruns): a correct kernel that is not invariant; docs/backends.md "
                     "'Reading a report' says how to read it")
    lines.append("where to look: the worst offenders above; rerun one with --filter CASE_ID --checks CHECK, or "
                 "write --report-json run.json and render it with rlk-conform report run.json --html report.html")
    lines.append(f"a run that passes: rlk-conform run --backend reference; accuracy and contract alone: "
                 f"rlk-conform run --backend {backend} --checks accuracy,contract")
    return lines

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
