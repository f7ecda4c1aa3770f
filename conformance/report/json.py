"""The JSON report of a run (docs/report-format.md): build, write, read back, merge shards."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conformance import __version__
from conformance.errors import ConformanceError
from conformance.files import atomic_path
from conformance.judge.records import STATUSES, Record
from conformance.spec.case import DTYPES
from conformance.spec.checks import JUDGMENTS, judgment_of

REPORT_FORMAT = "rlk-conform-report"
REPORT_SCHEMA_VERSION = 1
DTYPE_ORDER = DTYPES  # report order: float32, bfloat16, float16


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    by_status = Counter(r.status for r in records)
    by_check: dict[str, dict[str, int]] = {}
    for r in records:
        by_check.setdefault(r.check, dict.fromkeys(STATUSES, 0))[r.status] += 1
    executed = by_status["pass"] + by_status["fail"] + by_status["error"]
    unexpected = sum(r.status in ("fail", "error") and r.expected is None for r in records)
    verdict = "fail" if unexpected or executed == 0 else "pass"
    by_judgment: dict[str, dict[str, int]] = {}
    for r in records:
        by_judgment.setdefault(judgment_of(r.check), dict.fromkeys(STATUSES, 0))[r.status] += 1
    return {
        "records": len(records),
        "cases": len({r.case_id for r in records}),
        "by_status": {s: by_status[s] for s in STATUSES},
        "by_check": by_check,
        "by_judgment": {j: by_judgment[j] for j in (*JUDGMENTS, "other") if j in by_judgment},
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


def records_of(report: dict[str, Any]) -> list[Record]:
    """The records of a report read back (:func:`load_report`), as :class:`~conformance.judge.records.Record`."""
    return [Record.from_json(r) for r in report["records"]]


def write_json(path: Path, report: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n")


class MergeError(ConformanceError):
    """Reports that cannot be merged into one (different backend or golden set, duplicate records): exit 2."""


# Settings every shard of one run shares (host-dependent ones, like thread counts, may differ).
SHARED_SETTINGS = ("checks", "rule_set", "filter", "reruns", "tolerances_sha256", "isolate", "timeout_s",
                   "max_case_mib")


def _shard_of(report: dict[str, Any], name: str) -> tuple[int, int]:
    """``(i, n)`` of a report's ``settings.shard`` (``0/1`` for a run that was not sharded)."""
    text = (report.get("settings") or {}).get("shard")
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise MergeError(f"{name}: settings.shard {text!r} is not i/n") from None
    return i, n


def _same_run(report: dict[str, Any], first: dict[str, Any], name: str, first_name: str) -> None:
    """Raise MergeError unless ``report`` is a shard of the run ``first`` is a shard of."""
    def differs(what: str, a: Any, b: Any) -> MergeError:
        return MergeError(f"{name}: {what} {a!r} differs from {b!r} in {first_name} (not a shard of the same run)")

    if report["backend"].get("requested") != first["backend"].get("requested"):
        raise differs("backend", report["backend"].get("requested"), first["backend"].get("requested"))
    goldens, first_goldens = report.get("goldens") or {}, first.get("goldens") or {}
    for key in ("dataset_sha256", "manifest_sha256"):
        if goldens.get(key) != first_goldens.get(key):
            raise differs(f"golden set ({key})", goldens.get(key), first_goldens.get(key))
    settings, first_settings = report.get("settings") or {}, first.get("settings") or {}
    for key in SHARED_SETTINGS:
        if settings.get(key) != first_settings.get(key):
            raise differs(f"settings.{key}", settings.get(key), first_settings.get(key))


def merge_reports(reports: Sequence[dict[str, Any]], names: Sequence[str], allow_partial: bool = False
                  ) -> dict[str, Any]:
    """One report from the reports of the shards of one run (``run --shard i/n`` on several hosts).

    The shards must be shards of one run — the same requested backend, golden set (dataset and
    manifest checksums) and settings (:data:`SHARED_SETTINGS`) — and together every shard ``i/n``
    exactly once: a missing or repeated shard raises :class:`MergeError` naming it, unless
    ``allow_partial``, which merges what is there, writes ``complete: false`` and lists the missing
    shards in ``missing_shards``. A (case, check) pair may appear in one shard only. The summary is
    recomputed; ``complete`` holds only if every shard is there and completed. Metadata (target,
    settings) comes from the first report; ``merged_from`` lists every shard. When every shard was
    profiled (``run --profile``), ``profile`` combines theirs
    (:func:`conformance.run.profiling.merge_profiles`: seconds and cases summed, peak RSS and largest
    case the maximum).
    """
    from conformance.run.profiling import merge_profiles

    first = reports[0]
    shards: dict[int, str] = {}
    count = _shard_of(first, names[0])[1]
    for report, name in zip(reports, names):
        _same_run(report, first, name, names[0])
        i, n = _shard_of(report, name)
        if n != count:
            raise MergeError(f"{name}: shard {i}/{n} is of a run split {n} ways; {names[0]} of one split {count} ways")
        if i in shards:
            raise MergeError(f"{name}: shard {i}/{n} is given twice ({shards[i]} and {name})")
        shards[i] = name
    missing = [f"{i}/{count}" for i in range(count) if i not in shards]
    if missing and not allow_partial:
        have = ", ".join(f"{i}/{count}" for i in sorted(shards))
        raise MergeError(f"missing shard(s) {', '.join(missing)} of {count} (have {have}); merge every shard of "
                         "the run, or pass --allow-partial")
    records: list[Record] = []
    seen: dict[tuple[str, str], str] = {}
    for report, name in zip(reports, names):
        for r in report["records"]:
            pair = (r["case_id"], r.get("check", ""))
            if pair in seen:
                raise MergeError(f"{name}: record {pair[1]} of {pair[0]} is also in {seen[pair]} "
                                 "(overlapping shards?)")
            seen[pair] = name
            records.append(Record.from_json(r))
    meta = {k: v for k, v in first.items() if k not in ("format", "schema_version", "complete", "summary",
                                                          "records", "profile")}
    meta["merged_from"] = [{"file": name, "shard": (rep.get("settings") or {}).get("shard"),
                            "complete": bool(rep.get("complete", True))} for rep, name in zip(reports, names)]
    if missing:
        meta["missing_shards"] = missing
    complete = not missing and all(bool(rep.get("complete", True)) for rep in reports)
    merged = build_report(records, meta, complete=complete)
    return with_profile(merged, merge_profiles([rep.get("profile") for rep in reports]))


class ReportInputError(ConformanceError):
    """A result file is unreadable, not an rlk-conform report, or of another schema version (exit 2)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: {reason}")


def load_report(path: Path) -> dict[str, Any]:
    """Read one run report. Raises :class:`ReportInputError` naming ``path`` when the file cannot be
    read or parsed, is not an ``rlk-conform-report``, has another ``schema_version``, or lacks the
    ``backend``/``records`` fields every report has."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportInputError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportInputError(path, f"unreadable ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ReportInputError(path, f"not JSON ({exc}); expected a file of rlk-conform run --report-json") from None
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise ReportInputError(path, f"not an rlk-conform report (no \"format\": \"{REPORT_FORMAT}\"); expected "
                               "a file of rlk-conform run --report-json")
    if data.get("schema_version") != REPORT_SCHEMA_VERSION:
        raise ReportInputError(path, f"report schema_version {data.get('schema_version')!r} is not supported "
                               f"(this rlk-conform {__version__} reads {REPORT_SCHEMA_VERSION})")
    if not isinstance(data.get("backend"), dict) or not isinstance(data.get("records"), list) or not all(
            isinstance(r, dict) and isinstance(r.get("case_id"), str) and r.get("status") in STATUSES
            for r in data["records"]):
        raise ReportInputError(path, "malformed report: 'backend' must be an object and 'records' a list of "
                               "records with case_id and status")
    return data
