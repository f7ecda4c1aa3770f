"""A short Markdown summary of finished runs (for docs/results/)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conformance.judge.records import STATUSES
from conformance.report.markup import (
    count_by,
    dtype_label,
    ordered_checks,
    ordered_dtypes,
    profile_rows,
    record_measure,
    replay_command,
    worst_records,
)
from conformance.report.runs import BackendRun
from conformance.spec.checks import JUDGMENTS, judgment_of


def md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(runs: Sequence[BackendRun], top: int = 5) -> str:
    """A short summary for docs/results/: per backend its target, counts per check × dtype
    (pass/fail/error/skip) and the top failures with replay commands."""
    lines = ["# rlk-conform results", "",
             "| backend | device | torch | verdict | pass | fail | error | skip | judged against |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for run in runs:
        s = run.report.get("summary") or {}
        st = s.get("by_status") or {}
        device = run.target.get("device_name") or run.target.get("device")
        lines.append(f"| {md_escape(run.label)} | {md_escape(device)} | "
                     f"{md_escape(run.target.get('torch'))} | **{md_escape(s.get('verdict', '?'))}** | "
                     + " | ".join(str(st.get(x, 0)) for x in STATUSES)
                     + f" | {md_escape(run.source)} |")
    for run in runs:
        t, g = run.target, run.goldens
        s = run.report.get("summary") or {}
        lines += ["", f"## {md_escape(run.label)}", "",
                  f"- target: `{t.get('device')}` {t.get('device_name') or ''} (compute capability "
                  f"{t.get('compute_capability') or '—'}); torch {t.get('torch')}, CUDA {t.get('cuda') or '—'}, "
                  f"cuDNN {t.get('cudnn') or '—'}, driver {t.get('driver') or '—'}; host {t.get('host')}",
                  (f"- judged against: {run.source}" if run.search is not None else
                   f"- goldens: `{g.get('dir')}` (tier {g.get('tier')}), dataset SHA-256 `{g.get('dataset_sha256')}`"),
                  f"- verdict: **{s.get('verdict', '?')}** over {s.get('cases')} cases"
                  + ("" if run.report.get("complete", True) else " (incomplete run)")]
        if run.report.get("profile"):
            lines.append("- profile: " + "; ".join(f"{k} {v}" for k, v in profile_rows(run.report["profile"])))
        lines.append("")
        dtypes, checks = ordered_dtypes(run.records), ordered_checks(run.records)
        cells = count_by(run.records, lambda r: (r["check"], r.get("dtype", "")))
        lines.append("| judgment | check (pass/fail/error/skip) | " + " | ".join(dtype_label(d) for d in dtypes) + " |")
        lines.append("|---|---|" + "---:|" * len(dtypes))
        for check in sorted(checks, key=lambda c: list(JUDGMENTS).index(j) if (j := judgment_of(c)) in JUDGMENTS
                            else len(JUDGMENTS)):  # the judgments apart, each in check order
            row = []
            for d in dtypes:
                c = cells.get((check, d))
                row.append("/".join(str(c[x]) for x in STATUSES) if c else "")
            lines.append(f"| {judgment_of(check)} | {check} | " + " | ".join(row) + " |")
        worst = worst_records(run.records, top)
        if worst:
            n_bad = sum(r["status"] in ("fail", "error") for r in run.records)
            lines += ["", f"Top failures ({len(worst)} of {n_bad}):", ""]
            for r in worst:
                lines.append(f"1. {r['status']} `{r['check']}` `{r['case_id']}` — {md_escape(record_measure(r))}")
                lines.append(f"   `{replay_command(run, r)}`")
    return "\n".join(lines) + "\n"
