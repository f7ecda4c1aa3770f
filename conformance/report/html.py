"""Reports over finished runs: one static HTML page and a Markdown summary from JSON run reports.

Input: one or more files written by ``rlk-conform run --report-json`` (docs/report-format.md). The
HTML page is self-contained and offline (inline CSS, inline JS, plots as inline SVG drawn here) and
shows, per backend: the execution target and golden set, a pass/fail matrix (check × dtype × case
family), counts per check × dtype, error-distribution plots, invariance mismatch maps and the worst
cases with the command that replays each. Several files are shown side by side. Nothing here
re-runs a case; everything comes from the JSON. Output is deterministic (no timestamps), so a
rendered page or summary can be committed.

Machine-readable hooks, for tests and scrapers: count cells carry ``data-backend``, ``data-check``,
``data-dtype`` (``*`` for the total over dtypes) and ``data-pass/fail/error/skip``; each plot is an
``<svg data-plot=… data-backend=… data-points=N>`` whose N points have the class ``pt``; worst-case
rows carry ``data-case`` and their replay command sits in ``<code class="replay">``.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from conformance import __version__
from conformance.errors import ConformanceError
from conformance.judge.records import STATUSES
from conformance.report.markup import (
    CHECK_ABBREV,
    as_number,
    cell_class,
    closest_to_threshold,
    count_attrs,
    count_by,
    counts_title,
    dtype_label,
    esc,
    family_key,
    fmt_number,
    html_attrs,
    ordered_checks,
    ordered_dtypes,
    profile_rows,
    record_measure,
    replay_command,
    variant_pattern,
    worst_records,
)
from conformance.report.plots import error_plots, error_points
from conformance.report.runs import BackendRun
from conformance.spec.checks import GRADIENT_CHECKS, GRADIENT_INVARIANCE_CHECKS, INVARIANCE_CHECKS


def kv_table(rows: Sequence[tuple[str, Any]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc('—' if v is None or v == '' else v)}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def target_section(run: BackendRun) -> str:
    t, g, s, b = run.target, run.goldens, run.report.get("settings") or {}, run.report["backend"]
    target = [("device", t.get("device")), ("device name", t.get("device_name")),
              ("compute capability", t.get("compute_capability")), ("torch", t.get("torch")),
              ("CUDA", t.get("cuda")), ("cuDNN", t.get("cudnn")), ("driver", t.get("driver")),
              ("host", t.get("host")), ("platform", t.get("platform")), ("python", t.get("python")),
              ("rlk-conform", t.get("rlk_conform"))]
    backend = [("requested", b.get("requested")), ("used", b.get("used")), ("device", b.get("device")),
               ("output dtype", b.get("output_dtype")), ("returns LSE", b.get("returns_lse")),
               ("description", b.get("description"))]
    compare = run.report.get("compare_to")
    if compare:
        backend.append(("compared to", f"{compare.get('requested')} ({compare.get('device')})"))
    goldens = [("dir", g.get("dir")), ("tier", g.get("tier")), ("dataset SHA-256", g.get("dataset_sha256")),
               ("manifest SHA-256", g.get("manifest_sha256")), ("cases selected", g.get("cases_selected"))]
    settings = [("checks", ", ".join(s.get("checks") or [])), ("rule set", s.get("rule_set")),
                ("CUDA matmul TF32", s.get("cuda_matmul_allow_tf32")), ("cuDNN TF32", s.get("cudnn_allow_tf32")),
                ("float32 matmul precision", s.get("float32_matmul_precision")),
                ("deterministic algorithms", s.get("deterministic_algorithms")), ("threads", s.get("threads")),
                ("filter", s.get("filter")), ("shard", s.get("shard")),
                ("tolerances", f"{s.get('tolerances_file')} ({s.get('tolerances_sha256')})")]
    blocks = [("Execution target", target), ("Backend", backend), ("Goldens", goldens), ("Settings", settings)]
    if run.report.get("profile"):
        blocks.append(("Profile (run --profile)", profile_rows(run.report["profile"])))
    return '<div class="target">' + "".join(
        f'<div class="tblock"><h4>{esc(name)}</h4>{kv_table(rows)}</div>' for name, rows in blocks) + "</div>"


def counts_table(run: BackendRun) -> str:
    """Counts per check × dtype (and the total over dtypes, which equals ``summary.by_check``)."""
    recs = run.records
    dtypes, checks = ordered_dtypes(recs), ordered_checks(recs)
    cells = count_by(recs, lambda r: (r["check"], r.get("dtype", "")))
    totals = count_by(recs, lambda r: r["check"])
    head = "".join(f"<th>{esc(dtype_label(d))}</th>" for d in dtypes)
    rows = []
    for check in checks:
        tds = []
        for d in [*dtypes, "*"]:
            c = totals[check] if d == "*" else cells.get((check, d), Counter())
            if not c:
                tds.append('<td class="st-none"></td>')  # not run for this dtype
                continue
            nums = " ".join(f'<span class="n {s}">{c[s]}</span>' for s in STATUSES)
            attrs = html_attrs(class_=f"cnt {cell_class(c)}", data_backend=run.label, data_check=check, data_dtype=d,
                           title=counts_title(c), **count_attrs(c))
            tds.append(f"<td{attrs}>{nums}</td>")
        rows.append(f"<tr><th>{esc(check)}</th>{''.join(tds)}</tr>")
    return (f'<table class="counts"><thead><tr><th>check</th>{head}<th>all dtypes</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
            '<p class="note">Each cell: <span class="n pass">pass</span> <span class="n fail">fail</span> '
            '<span class="n error">error</span> <span class="n skip">skip</span>.</p>')


def matrix_section(runs: Sequence[BackendRun], gradients: bool = False) -> str:
    """Rows: case family × dtype; one column group per backend, one column per check: the forward
    checks, or (``gradients``) the gradient checks, each judgment apart. Empty without records."""
    picked = [[r for r in run.records if (r["check"] in GRADIENT_CHECKS) == gradients] for run in runs]
    all_recs = [r for recs in picked for r in recs]
    if not all_recs:
        return ""
    dtypes = ordered_dtypes(all_recs)
    families = sorted({family_key(r) for r in all_recs})
    per_run = [count_by(recs, lambda r: (family_key(r), r.get("dtype", ""), r["check"])) for recs in picked]
    # Each backend's column group holds the checks its own report has (a property search has others
    # than a golden run), so that a comparison of several reports stays narrow.
    run_checks = [ordered_checks(recs) for recs in picked]
    head1 = "".join(f'<th colspan="{len(checks)}" class="bgroup">{esc(run.label)}</th>'
                    for run, checks in zip(runs, run_checks))
    head2 = "".join(f'<th class="chk" title="{esc(c)}">{esc(CHECK_ABBREV.get(c, c[:5]))}</th>'
                    for checks in run_checks for c in checks)
    rows = []
    for fam in families:
        for d in dtypes:
            if not any((fam, d, c) in cells for cells, checks in zip(per_run, run_checks) for c in checks):
                continue
            tds = []
            for run, cells, checks in zip(runs, per_run, run_checks):
                for i, c in enumerate(checks):
                    cnt = cells.get((fam, d, c), Counter())
                    bad, total = cnt["fail"] + cnt["error"], sum(cnt.values())
                    if not total:
                        text = ""
                    elif bad:
                        text = f"{bad}/{total}"
                    elif cnt["pass"]:
                        text = str(cnt["pass"]) + ("*" if cnt["skip"] else "")
                    else:
                        text = "s"
                    attrs = html_attrs(class_=f"m {cell_class(cnt)}" + (" gstart" if i == 0 else ""),
                                   data_backend=run.label, data_family=fam, data_dtype=d, data_check=c,
                                   title=f"{run.label} · {fam} · {d} · {c}: {counts_title(cnt)}", **count_attrs(cnt))
                    tds.append(f"<td{attrs}>{esc(text)}</td>")
            rows.append(f'<tr><th class="fam">{esc(fam)}</th><th class="dt">{esc(dtype_label(d))}</th>'
                        f"{''.join(tds)}</tr>")
    toggle = "" if gradients else (
        '<label class="toggle"><input type="checkbox" id="only-failing"> show only rows with a failure</label>')
    return (
        f'{toggle}<div class="scroll"><table class="matrix" id="matrix-{"gradients" if gradients else "forward"}">'
        f'<thead><tr><th rowspan="2">case family</th><th rowspan="2">dtype</th>{head1}</tr><tr>{head2}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
        '<p class="note">A cell: failing/total when any record fails or errors (red); the number of passes '
        "when all pass (green; * = some skipped); s = all skipped (yellow); empty = not run.</p>")


def summary_section(runs: Sequence[BackendRun]) -> str:
    hashes = {run.goldens.get("dataset_sha256") for run in runs}
    warn = ('<p class="warn">These reports were run on different golden sets (dataset SHA-256 differ); compare '
            "them with care.</p>") if len(hashes) > 1 else ""
    rows = []
    for i, run in enumerate(runs):
        s = run.report.get("summary") or {}
        st = s.get("by_status") or {}
        worst = max((p.value for p in error_points(run.records, {})), default=None)
        verdict = s.get("verdict", "?")
        complete = run.report.get("complete", True)
        g = run.goldens
        cells = [f'<a href="#b{i}">{esc(run.label)}</a>', esc(run.path.name),
                 esc(run.target.get("device_name") or run.target.get("device")), esc(run.target.get("torch")),
                 f'<span class="verdict {esc(verdict)}">{esc(verdict)}</span>' + ("" if complete else " (incomplete)"),
                 esc(s.get("cases")), esc(s.get("records"))]
        cells += [f'<span class="n {st_}">{esc(st.get(st_, 0))}</span>' for st_ in STATUSES]
        cells += [esc(fmt_number(worst)), f'<code title="{esc(g.get("dataset_sha256"))}">'
                  f'{esc(str(g.get("dataset_sha256") or "—")[:12])}</code> {esc(g.get("tier") or "")}']
        rows.append(f'<tr data-backend="{esc(run.label)}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("backend", "file", "device", "torch", "verdict", "cases", "records",
                                             "pass", "fail", "error", "skip", "worst err/threshold", "goldens"))
    return f'{warn}<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def invariance_section(run: BackendRun, checks: Sequence[str] = INVARIANCE_CHECKS) -> str:
    """Failing invariance records of ``checks`` (the forward's, or the gradients') as a map (variant
    kind × dtype → failing cases) and a detail list (variant, tensor, batch row and query row of the
    first mismatch, mismatched elements, ulp)."""
    bad = [r for r in run.records if r["check"] in checks and r["status"] == "fail"]
    if not bad:
        kind = "gradient invariance" if checks == GRADIENT_INVARIANCE_CHECKS else "invariance"
        return f'<p class="ok">No {kind} check failed.</p>'
    dtypes = ordered_dtypes(bad)
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in bad:
        variant = str((r.get("metrics") or {}).get("variant") or "(no variant)")
        groups[(r["check"], variant_pattern(variant))][r.get("dtype", "")].append(r)
    peak = max(len(v) for g in groups.values() for v in g.values())
    rows = []
    for check in [c for c in checks if any(k[0] == c for k in groups)]:
        for (chk, pattern), by_dtype in sorted(groups.items()):
            if chk != check:
                continue
            tds = []
            for d in dtypes:
                recs = by_dtype.get(d, [])
                elements = sum(int(as_number((r.get("metrics") or {}).get("mismatched_elements")) or 0) for r in recs)
                alpha = 0.15 + 0.85 * len(recs) / peak if recs else 0
                exact = sorted({str((r.get("metrics") or {}).get("variant")) for r in recs})
                title = f"{len(recs)} failing cases, {elements} mismatched elements; variants: " + "; ".join(exact[:8])
                tds.append(f'<td class="heat" style="background:rgba(214,39,40,{alpha:.2f})" title="{esc(title)}">'
                           f"{len(recs) or ''}</td>")
            rows.append(f"<tr><th>{esc(check)}</th><td class='pat'>{esc(pattern)}</td>{''.join(tds)}</tr>")
    heat = (f'<table class="heat"><thead><tr><th>check</th><th>variant (numbers → N)</th>'
            f"{''.join(f'<th>{esc(dtype_label(d))}</th>' for d in dtypes)}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")
    detail_rows = []
    for r in sorted(bad, key=lambda r: (r["check"], r["case_id"])):
        m = r.get("metrics") or {}
        first = m.get("first_mismatch") or []
        vals = m.get("first_values") or []
        detail_rows.append(
            f'<tr data-case="{esc(r["case_id"])}"><td>{esc(r["check"])}</td><td>{esc(dtype_label(r.get("dtype", "")))}'
            f'</td><td class="id">{esc(r["case_id"])}</td><td>{esc(variant_cell(m))}</td>'
            f"<td>{esc(first[0] if len(first) > 0 else '—')}</td><td>{esc(first[1] if len(first) > 1 else '—')}</td>"
            f"<td>{esc(first[2] if len(first) > 2 else '—')}</td><td>{esc(first[3] if len(first) > 3 else '—')}</td>"
            f"<td>{esc(m.get('mismatched_elements', '—'))}</td>"
            f"<td>{esc(fmt_number(as_number(m.get('max_ulp_diff'))))}</td>"
            f"<td>{esc(' vs '.join(str(v) for v in vals))}</td></tr>")
    details = ('<details><summary>every failing invariance record '
               f'({len(bad)})</summary><div class="scroll"><table class="detail"><thead><tr><th>check</th>'
               "<th>dtype</th><th>case id</th><th>variant</th><th>b (batch)</th><th>h (head)</th>"
               "<th>q (query row) or k (key)</th>"
               "<th>d (head dim)</th><th>mismatched elements</th><th>max ulp</th>"
               "<th>first values (variant vs original)</th>"
               f"</tr></thead><tbody>{''.join(detail_rows)}</tbody></table></div></details>")
    return heat + details


def variant_cell(metrics: dict[str, Any]) -> str:
    """The variant of an invariance record, with the gradient tensor that differed (``dk · …``)."""
    variant = str(metrics.get("variant", ""))
    return f"{metrics['tensor']} · {variant}" if metrics.get("tensor") else variant


def worst_section(run: BackendRun, n: int, anchor: str) -> str:
    worst = worst_records(run.records, n)
    n_bad = sum(r["status"] in ("fail", "error") for r in run.records)
    if worst:
        caption = f"The {len(worst)} worst of {n_bad} failing records"
        body = _records_table(run, worst, "worst")
    else:
        caption, body = "No record failed.", ""
    close = closest_to_threshold(run.records, 5)
    margin = ("<h4>Smallest accuracy margins (passing)</h4>" + _records_table(run, close, "margin")) if close else ""
    return (f'<p>{esc(caption)}. <input class="filter" type="search" placeholder="filter by case id or check" '
            f'data-target="{anchor}"></p><div id="{anchor}">{body}</div>{margin}')


def _records_table(run: BackendRun, records: Sequence[dict[str, Any]], cls: str) -> str:
    rows = []
    for i, r in enumerate(records, 1):
        cmd = replay_command(run, r)
        msg = r.get("message", "")
        rows.append(
            f'<tr class="{cls}" data-case="{esc(r["case_id"])}" data-check="{esc(r["check"])}"><td>{i}</td>'
            f'<td><span class="badge {esc(r["status"])}">{esc(r["status"])}</span></td><td>{esc(r["check"])}</td>'
            f'<td>{esc(dtype_label(r.get("dtype", "")))}</td><td class="id">{esc(r["case_id"])}</td>'
            f'<td>{esc(record_measure(r))}</td><td class="msg">{esc(msg[:300] + ("…" if len(msg) > 300 else ""))}</td>'
            f'<td class="cmd"><code class="replay">{esc(cmd)}</code><button class="copy" type="button">copy</button>'
            "</td></tr>")
    return ('<div class="scroll"><table class="records"><thead><tr><th>#</th><th>status</th><th>check</th>'
            "<th>dtype</th><th>case id</th><th>measure</th><th>message</th><th>replay</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def skip_section(run: BackendRun) -> str:
    reasons = Counter(r.get("message", "") for r in run.records if r["status"] == "skip")
    if not reasons:
        return ""
    items = "".join(f"<li>{n}× {esc(msg)}</li>" for msg, n in reasons.most_common(8))
    return f"<h3>Skip reasons</h3><ul class='skips'>{items}</ul>"


def backend_section(i: int, run: BackendRun, preset_dims: dict[str, int], worst: int) -> str:
    s = run.report.get("summary") or {}
    verdict = s.get("verdict", "?")
    incomplete = ("" if run.report.get("complete", True) else
                  '<p class="warn">Incomplete run (interrupted): only the finished records are shown.</p>')
    return (
        f'<section class="backend" id="b{i}" data-backend="{esc(run.label)}">'
        f'<h2>{esc(run.label)} <span class="verdict {esc(verdict)}">{esc(verdict)}</span></h2>'
        f'<p class="src">{esc(run.path)}</p>{incomplete}'
        f"{target_section(run)}"
        f"<h3>Counts per check × dtype</h3>{counts_table(run)}"
        f"<h3>Accuracy: normalized error (err / threshold, worst element per case)</h3>"
        f"{error_plots(run, preset_dims)}"
        f"<h3>Invariance mismatch map</h3>{invariance_section(run)}"
        + (f"<h3>Gradient invariance mismatch map</h3>{invariance_section(run, GRADIENT_INVARIANCE_CHECKS)}"
           if any(r["check"] in GRADIENT_CHECKS for r in run.records) else "") +
        f"<h3>Worst cases</h3>{worst_section(run, worst, f'worst-b{i}')}"
        f"{skip_section(run)}</section>")






@functools.cache
def asset(name: str) -> str:
    """A static file of the page (``assets/report.css``, ``assets/report.js``), shipped in the package."""
    return importlib.resources.files("conformance.report").joinpath("assets", name).read_text(encoding="utf-8")


def render_html(runs: Sequence[BackendRun], preset_dims: dict[str, int], worst: int = 20) -> str:
    """The whole page for ``runs`` (at least one), as one string: no external resource of any kind."""
    if not runs:
        raise ConformanceError("no report to render")
    nav = "".join(f'<a href="#b{i}">{esc(run.label)}</a>' for i, run in enumerate(runs))
    title = "rlk-conform report — " + ", ".join(run.label for run in runs)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{asset('report.css')}</style></head><body>"
        f"<header><h1>rlk-conform report</h1><p class='note'>{len(runs)} result file(s); rendered by "
        f"rlk-conform {esc(__version__)}. Accuracy, invariance and contract judgments as recorded by "
        f"<code>rlk-conform run</code>.</p><nav>{nav}</nav></header>"
        f"<section><h2>Summary across backends</h2>{summary_section(runs)}</section>"
        f"<section><h2>Pass/fail matrix (check × dtype × case family)</h2>{matrix_section(runs)}</section>"
        + (f"<section><h2>Gradients: pass/fail matrix (dQ, dK, dV checks × dtype × case family)</h2>{grad}"
           "</section>" if (grad := matrix_section(runs, gradients=True)) else "")
        + "".join(backend_section(i, run, preset_dims, worst) for i, run in enumerate(runs))
        + f"<script>{asset('report.js')}</script></body></html>\n")
