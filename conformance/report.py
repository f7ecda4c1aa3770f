"""Reports of a run: the JSON document (docs/report-format.md), JUnit XML and the console summary."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .golden import atomic_path
from .judge import CHECKS, Record

REPORT_FORMAT = "rlk-conform-report"
REPORT_SCHEMA_VERSION = 1
STATUSES = ("pass", "fail", "error", "skip")
DTYPE_ORDER = ("float32", "bfloat16", "float16")


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    by_status = Counter(r.status for r in records)
    by_check: dict[str, dict[str, int]] = {}
    for r in records:
        by_check.setdefault(r.check, dict.fromkeys(STATUSES, 0))[r.status] += 1
    executed = by_status["pass"] + by_status["fail"] + by_status["error"]
    unexpected = sum(r.status in ("fail", "error") and r.expected is None for r in records)
    verdict = "fail" if unexpected or executed == 0 else "pass"
    return {
        "records": len(records),
        "cases": len({r.case_id for r in records}),
        "by_status": {s: by_status[s] for s in STATUSES},
        "by_check": by_check,
        "executed": executed,
        "expected_failures": sum(r.status in ("fail", "error") and r.expected is not None for r in records),
        "unexpected_failures": unexpected,
        "verdict": verdict,
    }


def build_report(records: Sequence[Record], meta: dict[str, Any], complete: bool = True) -> dict[str, Any]:
    return {
        "format": REPORT_FORMAT,
        "schema_version": REPORT_SCHEMA_VERSION,
        "complete": complete,
        **meta,
        "summary": summarize(records),
        "records": [r.to_json() for r in records],
    }


def with_profile(report: dict[str, Any], profile: dict[str, Any] | None) -> dict[str, Any]:
    """``report`` with its ``profile`` object (``run --profile``) placed after the summary, before the
    records; unchanged when ``profile`` is None."""
    if profile is None:
        return report
    head = {k: v for k, v in report.items() if k not in ("profile", "records")}
    return {**head, "profile": profile, "records": report["records"]}


def write_json(path: Path, report: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_junit(path: Path, records: Sequence[Record], suite: str) -> None:
    """One testcase per record; classname ``<suite>.<op>.<check>``, name the case id."""
    counts = Counter(r.status for r in records)
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(records)), failures=str(counts["fail"]),
                       errors=str(counts["error"]), skipped=str(counts["skip"]))
    for r in records:
        tc = ET.SubElement(ts, "testcase", classname=f"{suite}.{r.op}.{r.check}", name=r.case_id)
        if r.status == "fail":
            ET.SubElement(tc, "failure", message=r.message[:500]).text = json.dumps(r.to_json()["metrics"])
        elif r.status == "error":
            ET.SubElement(tc, "error", message=r.message[:500])
        elif r.status == "skip":
            ET.SubElement(tc, "skipped", message=r.message[:500])
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)


def _badness(r: Record) -> float:
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
    bad = sorted((r for r in records if r.status in ("fail", "error") and r.expected is None), key=_badness,
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


class MergeError(ValueError):
    """Reports that cannot be merged into one (different backend or golden set, duplicate records)."""


def merge_reports(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """One report from the reports of the shards of one run (``run --shard i/n`` on several hosts).

    The shards must name the same requested backend and golden set; a (case, check) pair may appear
    in one shard only. The summary is recomputed; ``complete`` holds only if every shard completed.
    Metadata (target, settings) comes from the first report; ``merged_from`` lists every shard.
    When every shard was profiled (``run --profile``), ``profile`` combines theirs
    (:func:`conformance.profiling.merge_profiles`: seconds and cases summed, peak RSS and largest
    case the maximum).
    """
    from .profiling import merge_profiles

    first = reports[0]
    records: list[Record] = []
    seen: dict[tuple[str, str], str] = {}
    for report, name in zip(reports, names):
        for key in ("requested",):
            if report["backend"].get(key) != first["backend"].get(key):
                raise MergeError(f"{name}: backend {report['backend'].get(key)!r} differs from "
                                 f"{first['backend'].get(key)!r} in {names[0]}")
        if (report.get("goldens") or {}).get("dataset_sha256") != (first.get("goldens") or {}).get("dataset_sha256"):
            raise MergeError(f"{name}: its golden set (dataset_sha256) differs from {names[0]}'s")
        for r in report["records"]:
            pair = (r["case_id"], r.get("check", ""))
            if pair in seen:
                raise MergeError(f"{name}: record {pair[1]} of {pair[0]} is also in {seen[pair]} "
                                 "(overlapping shards?)")
            seen[pair] = name
            records.append(Record(r["case_id"], r.get("op") or "", r.get("check") or "", r["status"],
                                  r.get("dtype") or "", r.get("family") or "", r.get("metrics") or {},
                                  r.get("message") or "", r.get("expected")))
    meta = {k: v for k, v in first.items() if k not in ("format", "schema_version", "complete", "summary",
                                                          "records", "profile")}
    meta["merged_from"] = [{"file": name, "shard": (rep.get("settings") or {}).get("shard"),
                            "complete": bool(rep.get("complete", True))} for rep, name in zip(reports, names)]
    merged = build_report(records, meta, complete=all(bool(rep.get("complete", True)) for rep in reports))
    return with_profile(merged, merge_profiles([rep.get("profile") for rep in reports]))
