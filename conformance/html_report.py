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

import hashlib
import html
import json
import math
import re
import shlex
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConformanceError
from .golden import atomic_path
from .judge import CHECKS, INVARIANCE_CHECKS
from .report import DTYPE_ORDER, REPORT_FORMAT, REPORT_SCHEMA_VERSION, STATUSES

#: The accuracy metric plotted as "normalized error": worst err/threshold over the case (≤ 1 passes).
NORMALIZED_ERROR = "threshold_ratio"
DEFAULT_GOLDENS_DIR = "goldens/smoke"
DTYPE_COLORS = {"float32": "#1f6fb4", "bfloat16": "#e0700b", "float16": "#2a9d3a"}
STATUS_COLORS = {"pass": "#2e8b57", "fail": "#d62728", "error": "#8b0000", "skip": "#c9a227"}
CHECK_ABBREV = {"accuracy": "acc", "batch": "batch", "split": "split", "prefill_decode": "p→d", "chunk": "chunk",
                "padding": "pad", "determinism": "det", "contract": "contr", "parity": "par"}


class ReportInputError(ConformanceError):
    """A result file is unreadable, not an rlk-conform report, or of another schema version (exit 2)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: {reason}")


# --- input -----------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class BackendRun:
    """One report, with the label it is shown under (unique among the reports of one page)."""

    path: Path
    label: str
    report: dict[str, Any]

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.report["records"]

    @property
    def target(self) -> dict[str, Any]:
        return self.report.get("execution_target") or {}

    @property
    def goldens(self) -> dict[str, Any]:
        return self.report.get("goldens") or {}

    @property
    def search(self) -> dict[str, Any] | None:
        """The property search's settings when this report is one (``rlk-conform check``), else None."""
        return self.report.get("search")

    @property
    def source(self) -> str:
        """What was judged: the goldens' tier and dataset hash, or the property search's profile."""
        if self.search is not None:
            examples = sum(int(r.get("examples_run") or 0) for r in self.search.get("results") or [])
            budget = self.search.get("time_budget_s")
            return (f"property search, profile {self.search.get('profile')}, {examples} examples"
                    + (f", {budget:g} s per property" if budget else ""))
        g = self.goldens
        return f"{g.get('tier')} goldens `{str(g.get('dataset_sha256'))[:12]}`"

    @property
    def requested(self) -> str:
        b = self.report["backend"]
        return str(b.get("requested") or b.get("used") or "?")


def load_runs(paths: Sequence[Path]) -> list[BackendRun]:
    """Load every report; labels are the requested backend (``(check)`` for a property search), made
    unique by device name, then by index."""
    reports = [(p, load_report(p)) for p in paths]
    labels = [str(r["backend"].get("requested") or r["backend"].get("used") or "?")
              + (" (check)" if "search" in r else "") for _, r in reports]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} · {(r.get('execution_target') or {}).get('device_name') or r['backend'].get('device')}"
                  if labels.count(lab) > 1 else lab for lab, (_, r) in zip(labels, reports)]
    seen: Counter[str] = Counter(labels)
    if len(seen) < len(labels):
        labels = [f"{lab} #{i + 1}" if seen[lab] > 1 else lab for i, lab in enumerate(labels)]
    return [BackendRun(p, lab, r) for lab, (p, r) in zip(labels, reports)]


def load_preset_dims(path: Path | None) -> dict[str, int]:
    """Preset name → head dim from a presets.yaml (specs/presets.yaml when ``path`` is None: the
    working directory's, else the repository's; ``{}`` if neither exists). An explicit ``path`` that
    is missing or invalid raises :class:`~conformance.errors.SpecError`/``ConformanceError``."""
    from .spec import load_presets

    if path is None:
        for candidate in (Path("specs/presets.yaml"), Path(__file__).resolve().parents[1] / "specs" / "presets.yaml"):
            if candidate.is_file():
                path = candidate
                break
        else:
            return {}
    elif not path.is_file():
        raise ConformanceError(f"{path}: no such presets file")
    return {name: p.d for name, p in load_presets(path).items()}


# --- facts derived from records ----------------------------------------------------------------------

_VARIANT_RE = re.compile(r"^(?P<model>.+?)-b\d+-(?:sq\d+-skv(?P<skv>\d+)|past(?P<past>\d+)-new(?P<new>\d+))-")
_MODEL_RE = re.compile(r"^hq\d+-hkv\d+-d(?P<d>\d+)$")


def case_dims(case_id: str, preset_dims: dict[str, int]) -> tuple[int | None, int | None]:
    """(Skv, head dim D) from a case id (docs/golden-format.md): ``…-sq<Sq>-skv<Skv>-…`` or
    ``…-past<P>-new<N>-…`` (Skv = P + N); D from ``hq…-hkv…-d<D>`` or the preset's head dim. ``None``
    for what cannot be derived (an unknown id shape or preset)."""
    m = _VARIANT_RE.match(case_id.rsplit("/", 1)[-1])
    if not m:
        return None, None
    skv = int(m["skv"]) if m["skv"] is not None else int(m["past"]) + int(m["new"])
    model = _MODEL_RE.match(m["model"])
    return skv, int(model["d"]) if model else preset_dims.get(m["model"])


def _number(x: Any) -> float | None:
    """A metric as a float: JSON numbers, ``"inf"``/``"-inf"``; ``None`` (NaN) and others → None."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, int | float):
        return float(x)
    if x in ("inf", "-inf"):
        return float(x)
    return None


def family_key(record: dict[str, Any]) -> str:
    """``op/family`` of a record (from its fields, else from the first two parts of its case id)."""
    op, fam = record.get("op"), record.get("family")
    if op and fam:
        return f"{op}/{fam}"
    return "/".join(record["case_id"].split("/")[:2])


def ordered_dtypes(records: Iterable[dict[str, Any]]) -> list[str]:
    present = {r.get("dtype", "") for r in records}
    return [d for d in DTYPE_ORDER if d in present] + sorted(present - set(DTYPE_ORDER))


def ordered_checks(records: Iterable[dict[str, Any]]) -> list[str]:
    present = {r["check"] for r in records}
    return [c for c in CHECKS if c in present] + sorted(present - set(CHECKS))


def count_by(records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, Counter[str]]:
    """Status counts per ``key(record)``."""
    cells: dict[Any, Counter[str]] = defaultdict(Counter)
    for r in records:
        cells[key(r)][r["status"]] += 1
    return cells


@dataclass(frozen=True)
class ErrorPoint:
    """One accuracy record as a plot point: its normalized error and the shape it ran at."""

    case_id: str
    dtype: str
    status: str
    value: float  # threshold_ratio; +inf for NaN/Inf output
    skv: int | None
    d: int | None


def error_points(records: Iterable[dict[str, Any]], preset_dims: dict[str, int]) -> list[ErrorPoint]:
    """Every accuracy record whose ``threshold_ratio`` is a number or ``"inf"`` (records without it,
    e.g. errors, skips or a missing rule, have no point)."""
    points = []
    for r in records:
        if r["check"] != "accuracy":
            continue
        value = _number((r.get("metrics") or {}).get(NORMALIZED_ERROR))
        if value is None or value < 0 or math.isnan(value):
            continue
        skv, d = case_dims(r["case_id"], preset_dims)
        points.append(ErrorPoint(r["case_id"], r.get("dtype", ""), r["status"], value, skv, d))
    return points


def _severity(r: dict[str, Any]) -> tuple[int, float]:
    """Errors first, then accuracy/parity/contract failures (by err/threshold), then invariance
    failures (by mismatched elements)."""
    m = r.get("metrics") or {}
    if r["status"] == "error":
        return 3, 0.0
    if r["check"] in ("accuracy", "parity"):
        return 2, _number(m.get("threshold_ratio")) or 0.0
    if r["check"] == "contract":
        return 2, float(len(m.get("violations") or ()))
    return 1, _number(m.get("mismatched_elements")) or 0.0


def worst_records(records: Iterable[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` worst failing (``fail``/``error``) records, most severe first; ties by case id, check."""
    bad = [r for r in records if r["status"] in ("fail", "error")]
    bad.sort(key=lambda r: (-_severity(r)[0], -_severity(r)[1], r["case_id"], r["check"]))
    return bad[:n]


def closest_to_threshold(records: Iterable[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` passing accuracy records with the largest err/threshold (the smallest margins)."""
    acc = [(v, r) for r in records if r["check"] == "accuracy" and r["status"] == "pass"
           and (v := _number((r.get("metrics") or {}).get(NORMALIZED_ERROR))) is not None]
    acc.sort(key=lambda vr: (-vr[0], vr[1]["case_id"]))
    return [r for _, r in acc[:n]]


def replay_command(run: BackendRun, record: dict[str, Any]) -> str:
    """``rlk-conform run --backend <requested> --filter '<case id>' --checks <check>``, followed by
    the options the run needs to be repeated as it was: ``--goldens`` (if not goldens/smoke),
    ``--device`` (if not cpu), ``--rules``/``--tolerances`` (if not the defaults) and
    ``--compare-to`` for parity."""
    backend = run.report["backend"]
    parts = ["rlk-conform", "run", "--backend", shlex.quote(run.requested), "--filter",
             "'" + record["case_id"].replace("'", "'\\''") + "'", "--checks", shlex.quote(record["check"])]
    golden_dir = run.goldens.get("dir")
    if golden_dir and golden_dir != DEFAULT_GOLDENS_DIR:
        parts += ["--goldens", shlex.quote(str(golden_dir))]
    device = str(backend.get("device") or "").split(",")[0]  # a --devices run names each device: one will do
    if device and device != "cpu":
        parts += ["--device", shlex.quote(str(device))]
    settings = run.report.get("settings") or {}
    if settings.get("rule_set") not in (None, "default"):
        parts += ["--rules", shlex.quote(str(settings["rule_set"]))]
    if settings.get("tolerances_file") not in (None, "specs/tolerances.yaml"):
        parts += ["--tolerances", shlex.quote(str(settings["tolerances_file"]))]
    compare_to = run.report.get("compare_to") or {}
    if record["check"] == "parity" and compare_to.get("requested"):
        parts += ["--compare-to", shlex.quote(str(compare_to["requested"]))]
    return " ".join(parts)


def _measure(r: dict[str, Any]) -> str:
    """The one number that says how bad a record is, as text."""
    m = r.get("metrics") or {}
    if r["check"] in ("accuracy", "parity") and NORMALIZED_ERROR in m:
        v = _number(m[NORMALIZED_ERROR])
        return "err/threshold " + ("NaN" if v is None else _fmt(v))
    if "mismatched_elements" in m:
        return f"{m['mismatched_elements']} elements differ, max {_fmt(_number(m.get('max_ulp_diff')))} ulp"
    if m.get("violations"):
        return f"{len(m['violations'])} contract violations"
    return r["status"]


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.3g}"


def _variant_pattern(variant: str) -> str:
    """A variant name with its numbers replaced, so that e.g. all split points group together."""
    return re.sub(r"\d+", "N", variant)


# --- HTML building blocks ------------------------------------------------------------------------------


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _attrs(**kv: Any) -> str:
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in kv.items() if v is not None)


def _cell_class(c: Counter[str]) -> str:
    if not c:
        return "st-none"
    if c["fail"] or c["error"]:
        return "st-fail"
    if c["pass"]:
        return "st-pass" if not c["skip"] else "st-partial"
    return "st-skip"


def _counts_title(c: Counter[str]) -> str:
    return " · ".join(f"{c[s]} {s}" for s in STATUSES)


def _count_attrs(c: Counter[str]) -> dict[str, int]:
    return {f"data_{s}": c[s] for s in STATUSES}


def _dtype_label(d: str) -> str:
    return d or "—"


def _jitter(key: str) -> float:
    """A deterministic offset in [-0.5, 0.5) from a case id (stable plots, no randomness)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") / 2**32 - 0.5


# --- plots ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Axis:
    """Log10 y axis over the positive finite values, with lanes for exact zeros (below) and ∞ (above)."""

    lo: int  # decades
    hi: int

    @classmethod
    def for_values(cls, values: Sequence[float]) -> _Axis:
        pos = [v for v in values if 0 < v < math.inf]
        lo = math.floor(math.log10(min(pos))) if pos else -3
        hi = math.ceil(math.log10(max(pos))) if pos else 1
        return cls(min(lo, -1), max(hi, 1))


W, H = 380, 250
ML, MR, MT, MB = 56, 12, 30, 40  # margins
ZERO_LANE, INF_LANE = 20, 20


def _y(axis: _Axis, v: float) -> float:
    top, bottom = MT + INF_LANE, H - MB - ZERO_LANE
    if v <= 0:
        return H - MB - ZERO_LANE / 2
    if math.isinf(v):
        return MT + INF_LANE / 2
    frac = (math.log10(v) - axis.lo) / (axis.hi - axis.lo)
    return bottom - min(max(frac, 0.0), 1.0) * (bottom - top)


def _plot_frame(axis: _Axis, title: str, x_label: str, x_ticks: Sequence[tuple[float, str]]) -> list[str]:
    top, bottom = MT + INF_LANE, H - MB - ZERO_LANE
    out = [f'<text class="ptitle" x="{W / 2}" y="16" text-anchor="middle">{esc(title)}</text>',
           f'<rect class="frame" x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}"/>',
           f'<line class="lane" x1="{ML}" x2="{W - MR}" y1="{top}" y2="{top}"/>',
           f'<line class="lane" x1="{ML}" x2="{W - MR}" y1="{bottom}" y2="{bottom}"/>',
           f'<text class="tick" x="{ML - 4}" y="{MT + INF_LANE / 2 + 3}" text-anchor="end">∞</text>',
           f'<text class="tick" x="{ML - 4}" y="{H - MB - ZERO_LANE / 2 + 3}" text-anchor="end">0</text>']
    for dec in range(axis.lo, axis.hi + 1):
        y = _y(axis, 10.0**dec)
        out.append(f'<line class="grid" x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{ML - 4}" y="{y + 3:.1f}" text-anchor="end">1e{dec}</text>')
    y1 = _y(axis, 1.0)
    out.append(f'<line class="threshold" x1="{ML}" x2="{W - MR}" y1="{y1:.1f}" y2="{y1:.1f}"/>')
    out.append(f'<text class="thlabel" x="{W - MR - 2}" y="{y1 - 3:.1f}" text-anchor="end">threshold</text>')
    for x, label in x_ticks:
        out.append(f'<line class="xtick" x1="{x:.1f}" x2="{x:.1f}" y1="{H - MB}" y2="{H - MB + 4}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{H - MB + 14}" text-anchor="middle">{esc(label)}</text>')
    out.append(f'<text class="axlabel" x="{(ML + W - MR) / 2}" y="{H - 6}" text-anchor="middle">{esc(x_label)}</text>')
    out.append(f'<text class="axlabel" transform="translate(12 {(MT + H - MB) / 2}) rotate(-90)" '
               'text-anchor="middle">err / threshold</text>')
    return out


def _point(x: float, y: float, p: ErrorPoint, color: str) -> str:
    tip = f"{p.case_id}\n{p.dtype} · {p.status} · err/threshold {_fmt(p.value)}"
    attrs = _attrs(class_=f"pt {p.status}", data_case=p.case_id, data_dtype=p.dtype, data_value=_fmt(p.value))
    if math.isinf(p.value):
        return (f'<path{attrs} d="M{x - 4:.1f},{y + 3:.1f} L{x + 4:.1f},{y + 3:.1f} L{x:.1f},{y - 4:.1f} Z" '
                f'fill="{color}"><title>{esc(tip)}</title></path>')
    stroke = ' stroke="#000" stroke-width="1.2"' if p.status == "fail" else ""
    return (f'<circle{attrs} cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"{stroke}>'
            f"<title>{esc(tip)}</title></circle>")


def _svg(kind: str, backend: str, n: int, body: list[str], legend: list[tuple[str, str]]) -> str:
    items = "".join(f'<span class="lg"><i style="background:{c}"></i>{esc(t)}</span>' for t, c in legend)
    return (f'<figure class="plot"><svg{_attrs(class_="plot", data_plot=kind, data_backend=backend, data_points=n)}'
            f' viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" xmlns="http://www.w3.org/2000/svg">'
            + "".join(body) + f"</svg><figcaption>{items}</figcaption></figure>")


def _categorical_plot(kind: str, backend: str, title: str, x_label: str, points: Sequence[ErrorPoint],
                      category: Callable[[ErrorPoint], Any], categories: Sequence[Any],
                      color: Callable[[ErrorPoint], str], legend: list[tuple[str, str]]) -> str:
    axis = _Axis.for_values([p.value for p in points])
    lane = (W - ML - MR) / max(len(categories), 1)
    centre = {c: ML + lane * (i + 0.5) for i, c in enumerate(categories)}
    body = _plot_frame(axis, title, x_label, [(centre[c], str(c)) for c in categories])
    body += [_point(centre[category(p)] + 0.7 * lane * _jitter(p.case_id), _y(axis, p.value), p, color(p))
             for p in points]
    return _svg(kind, backend, len(points), body, legend)


def _log2_plot(kind: str, backend: str, title: str, x_label: str, points: Sequence[ErrorPoint],
               xval: Callable[[ErrorPoint], int], color: Callable[[ErrorPoint], str],
               legend: list[tuple[str, str]]) -> str:
    axis = _Axis.for_values([p.value for p in points])
    xs = [max(xval(p), 1) for p in points] or [1, 2]
    lo, hi = math.floor(math.log2(min(xs))), math.ceil(math.log2(max(xs)))
    hi = max(hi, lo + 1)

    def x_of(v: int) -> float:
        return ML + 8 + (math.log2(max(v, 1)) - lo) / (hi - lo) * (W - ML - MR - 16)

    step = max(1, math.ceil((hi - lo + 1) / 8))
    ticks = [(x_of(2**e), str(2**e)) for e in range(lo, hi + 1, step)]
    body = _plot_frame(axis, title, x_label, ticks)
    body += [_point(x_of(xval(p)) + 3 * _jitter(p.case_id), _y(axis, p.value), p, color(p)) for p in points]
    return _svg(kind, backend, len(points), body, legend)


def error_plots(run: BackendRun, preset_dims: dict[str, int]) -> str:
    """Three SVG plots of the normalized accuracy error: per dtype (strip), against Skv, against D."""
    points = error_points(run.records, preset_dims)
    dtypes = ordered_dtypes([{"dtype": p.dtype} for p in points])

    def by_dtype(p: ErrorPoint) -> str:
        return DTYPE_COLORS.get(p.dtype, "#777")

    def by_status(p: ErrorPoint) -> str:
        return STATUS_COLORS.get(p.status, "#777")

    dtype_legend = [(d, DTYPE_COLORS.get(d, "#777")) for d in dtypes] + [("fail (outlined)", "#000")]
    status_legend = [(s, STATUS_COLORS[s]) for s in ("pass", "fail")] + [("▲ NaN/Inf output", "#555")]
    with_skv = [p for p in points if p.skv is not None]
    with_d = [p for p in points if p.d is not None]
    ds = sorted({p.d for p in with_d if p.d is not None})
    plots = [
        _categorical_plot("error-by-dtype", run.label, "normalized error per dtype", "dtype", points,
                          lambda p: p.dtype, dtypes, by_status, status_legend),
        _log2_plot("error-vs-skv", run.label, "normalized error vs Skv", "Skv (keys, log₂)", with_skv,
                   lambda p: p.skv or 1, by_dtype, dtype_legend),
        _categorical_plot("error-vs-d", run.label, "normalized error vs head dim D", "head dim D", with_d,
                          lambda p: p.d, ds, by_dtype, dtype_legend),
    ]
    skipped = len(points) - len(with_d)
    note = (f'<p class="note">{skipped} point(s) without a derivable head dim (unknown preset) are left out of '
            "the D plot.</p>") if skipped else ""
    return f'<div class="plots">{"".join(plots)}</div>{note}'


# --- sections -----------------------------------------------------------------------------------------


def _kv_table(rows: Sequence[tuple[str, Any]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc('—' if v is None or v == '' else v)}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def profile_rows(profile: dict[str, Any]) -> list[tuple[str, str]]:
    """The ``profile`` object of a report (run --profile) as label/value rows: wall time, seconds
    and share of each phase, peak RSS and the largest case."""
    wall = float(profile.get("wall_s") or 0.0)
    process = float(profile.get("process_s") or wall)
    phases = profile.get("phases_s") or {}
    rows = [("wall", f"{wall:.2f} s over {profile.get('cases')} cases")]
    rows += [(name, f"{float(sec):.2f} s ({float(sec) / process:.0%})" if process > 0 else f"{float(sec):.2f} s")
             for name, sec in phases.items()]
    rows += [("peak RSS", f"{profile.get('peak_rss_mib')} MiB"),
             ("largest case", f"{(profile.get('largest_case_bytes') or 0) / 2**20:.1f} MiB "
                              f"({profile.get('largest_case_id')})")]
    return rows


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
        f'<div class="tblock"><h4>{esc(name)}</h4>{_kv_table(rows)}</div>' for name, rows in blocks) + "</div>"


def counts_table(run: BackendRun) -> str:
    """Counts per check × dtype (and the total over dtypes, which equals ``summary.by_check``)."""
    recs = run.records
    dtypes, checks = ordered_dtypes(recs), ordered_checks(recs)
    cells = count_by(recs, lambda r: (r["check"], r.get("dtype", "")))
    totals = count_by(recs, lambda r: r["check"])
    head = "".join(f"<th>{esc(_dtype_label(d))}</th>" for d in dtypes)
    rows = []
    for check in checks:
        tds = []
        for d in [*dtypes, "*"]:
            c = totals[check] if d == "*" else cells.get((check, d), Counter())
            if not c:
                tds.append('<td class="st-none"></td>')  # not run for this dtype
                continue
            nums = " ".join(f'<span class="n {s}">{c[s]}</span>' for s in STATUSES)
            attrs = _attrs(class_=f"cnt {_cell_class(c)}", data_backend=run.label, data_check=check, data_dtype=d,
                           title=_counts_title(c), **_count_attrs(c))
            tds.append(f"<td{attrs}>{nums}</td>")
        rows.append(f"<tr><th>{esc(check)}</th>{''.join(tds)}</tr>")
    return (f'<table class="counts"><thead><tr><th>check</th>{head}<th>all dtypes</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
            '<p class="note">Each cell: <span class="n pass">pass</span> <span class="n fail">fail</span> '
            '<span class="n error">error</span> <span class="n skip">skip</span>.</p>')


def matrix_section(runs: Sequence[BackendRun]) -> str:
    """Rows: case family × dtype; one column group per backend, one column per check."""
    all_recs = [r for run in runs for r in run.records]
    checks = ordered_checks(all_recs)
    dtypes = ordered_dtypes(all_recs)
    families = sorted({family_key(r) for r in all_recs})
    per_run = [count_by(run.records, lambda r: (family_key(r), r.get("dtype", ""), r["check"])) for run in runs]
    head1 = "".join(f'<th colspan="{len(checks)}" class="bgroup">{esc(run.label)}</th>' for run in runs)
    head2 = "".join(f'<th class="chk" title="{esc(c)}">{esc(CHECK_ABBREV.get(c, c[:5]))}</th>'
                    for _ in runs for c in checks)
    rows = []
    for fam in families:
        for d in dtypes:
            if not any((fam, d, c) in cells for cells in per_run for c in checks):
                continue
            tds = []
            for run, cells in zip(runs, per_run):
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
                    attrs = _attrs(class_=f"m {_cell_class(cnt)}" + (" gstart" if i == 0 else ""),
                                   data_backend=run.label, data_family=fam, data_dtype=d, data_check=c,
                                   title=f"{run.label} · {fam} · {d} · {c}: {_counts_title(cnt)}", **_count_attrs(cnt))
                    tds.append(f"<td{attrs}>{esc(text)}</td>")
            rows.append(f'<tr><th class="fam">{esc(fam)}</th><th class="dt">{esc(_dtype_label(d))}</th>'
                        f"{''.join(tds)}</tr>")
    return (
        '<label class="toggle"><input type="checkbox" id="only-failing"> show only rows with a failure</label>'
        '<div class="scroll"><table class="matrix" id="matrix"><thead>'
        f'<tr><th rowspan="2">case family</th><th rowspan="2">dtype</th>{head1}</tr><tr>{head2}</tr></thead>'
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
        cells += [esc(_fmt(worst)), f'<code title="{esc(g.get("dataset_sha256"))}">'
                  f'{esc(str(g.get("dataset_sha256") or "—")[:12])}</code> {esc(g.get("tier") or "")}']
        rows.append(f'<tr data-backend="{esc(run.label)}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("backend", "file", "device", "torch", "verdict", "cases", "records",
                                             "pass", "fail", "error", "skip", "worst err/threshold", "goldens"))
    return f'{warn}<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def invariance_section(run: BackendRun) -> str:
    """Failing invariance records as a map (variant kind × dtype → failing cases) and a detail list
    (variant, batch row and query row of the first mismatch, mismatched elements, ulp)."""
    bad = [r for r in run.records if r["check"] in INVARIANCE_CHECKS and r["status"] == "fail"]
    if not bad:
        return '<p class="ok">No invariance check failed.</p>'
    dtypes = ordered_dtypes(bad)
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in bad:
        variant = str((r.get("metrics") or {}).get("variant") or "(no variant)")
        groups[(r["check"], _variant_pattern(variant))][r.get("dtype", "")].append(r)
    peak = max(len(v) for g in groups.values() for v in g.values())
    rows = []
    for check in [c for c in INVARIANCE_CHECKS if any(k[0] == c for k in groups)]:
        for (chk, pattern), by_dtype in sorted(groups.items()):
            if chk != check:
                continue
            tds = []
            for d in dtypes:
                recs = by_dtype.get(d, [])
                elements = sum(int(_number((r.get("metrics") or {}).get("mismatched_elements")) or 0) for r in recs)
                alpha = 0.15 + 0.85 * len(recs) / peak if recs else 0
                exact = sorted({str((r.get("metrics") or {}).get("variant")) for r in recs})
                title = f"{len(recs)} failing cases, {elements} mismatched elements; variants: " + "; ".join(exact[:8])
                tds.append(f'<td class="heat" style="background:rgba(214,39,40,{alpha:.2f})" title="{esc(title)}">'
                           f"{len(recs) or ''}</td>")
            rows.append(f"<tr><th>{esc(check)}</th><td class='pat'>{esc(pattern)}</td>{''.join(tds)}</tr>")
    heat = (f'<table class="heat"><thead><tr><th>check</th><th>variant (numbers → N)</th>'
            f"{''.join(f'<th>{esc(_dtype_label(d))}</th>' for d in dtypes)}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")
    detail_rows = []
    for r in sorted(bad, key=lambda r: (r["check"], r["case_id"])):
        m = r.get("metrics") or {}
        first = m.get("first_mismatch") or []
        vals = m.get("first_values") or []
        detail_rows.append(
            f'<tr data-case="{esc(r["case_id"])}"><td>{esc(r["check"])}</td><td>{esc(_dtype_label(r.get("dtype", "")))}'
            f'</td><td class="id">{esc(r["case_id"])}</td><td>{esc(m.get("variant", ""))}</td>'
            f"<td>{esc(first[0] if len(first) > 0 else '—')}</td><td>{esc(first[1] if len(first) > 1 else '—')}</td>"
            f"<td>{esc(first[2] if len(first) > 2 else '—')}</td><td>{esc(first[3] if len(first) > 3 else '—')}</td>"
            f"<td>{esc(m.get('mismatched_elements', '—'))}</td><td>{esc(_fmt(_number(m.get('max_ulp_diff'))))}</td>"
            f"<td>{esc(' vs '.join(str(v) for v in vals))}</td></tr>")
    details = ('<details><summary>every failing invariance record '
               f'({len(bad)})</summary><div class="scroll"><table class="detail"><thead><tr><th>check</th>'
               "<th>dtype</th><th>case id</th><th>variant</th><th>batch row</th><th>head</th><th>query row</th>"
               "<th>col</th><th>mismatched elements</th><th>max ulp</th><th>first values (variant vs original)</th>"
               f"</tr></thead><tbody>{''.join(detail_rows)}</tbody></table></div></details>")
    return heat + details


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
            f'<td>{esc(_dtype_label(r.get("dtype", "")))}</td><td class="id">{esc(r["case_id"])}</td>'
            f'<td>{esc(_measure(r))}</td><td class="msg">{esc(msg[:300] + ("…" if len(msg) > 300 else ""))}</td>'
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
        f"<h3>Worst cases</h3>{worst_section(run, worst, f'worst-b{i}')}"
        f"{skip_section(run)}</section>")


_CSS = """
:root{--pass:#2e8b57;--fail:#d62728;--error:#8b0000;--skip:#c9a227;--ink:#1d1d1f;--mute:#666;--line:#ddd}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--ink);
margin:0;padding:18px 26px;background:#fafafa}h1{font-size:22px;margin:0 0 4px}h2{font-size:19px;margin:0 0 6px}
h3{font-size:15px;margin:20px 0 6px;border-bottom:1px solid var(--line);padding-bottom:3px}h4{margin:4px 0}
section{background:#fff;border:1px solid var(--line);border-radius:6px;padding:14px 18px;margin:16px 0}
table{border-collapse:collapse;font-size:12.5px}th,td{border:1px solid var(--line);padding:3px 6px;text-align:left;
vertical-align:top}thead th{background:#f0f0f0}.scroll{overflow-x:auto;max-width:100%}
.note{color:var(--mute);font-size:12px;margin:4px 0}.src{color:var(--mute);font-size:12px;margin:0}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:6px 10px;border-radius:4px}.ok{color:var(--pass)}
.verdict{font-size:12px;padding:2px 8px;border-radius:10px;color:#fff;vertical-align:middle}
.verdict.pass{background:var(--pass)}.verdict.fail{background:var(--fail)}
.badge{font-size:11px;padding:1px 6px;border-radius:8px;color:#fff}.badge.fail{background:var(--fail)}
.badge.error{background:var(--error)}.badge.pass{background:var(--pass)}.badge.skip{background:var(--skip)}
.n{display:inline-block;min-width:2.2em;text-align:right;margin-right:4px;font-variant-numeric:tabular-nums}
.n.pass{color:var(--pass)}.n.fail{color:var(--fail);font-weight:600}.n.error{color:var(--error);font-weight:600}
.n.skip{color:#9a7b00}td.cnt{white-space:nowrap}
.st-pass{background:#e4f4ea}.st-fail{background:#fbe0e0}.st-skip{background:#fbf3d5}.st-partial{background:#eef6dc}
.st-none{background:#fff}
table.matrix td.m{text-align:center;min-width:34px;font-size:11.5px;font-variant-numeric:tabular-nums}
table.matrix td.st-fail{color:#a00;font-weight:600}table.matrix .gstart{border-left:2px solid #888}
table.matrix th.bgroup{text-align:center;border-left:2px solid #888}table.matrix th.chk{font-size:11px}
table.matrix th.fam{white-space:nowrap}.target{display:flex;flex-wrap:wrap;gap:14px}
.tblock table.kv th{background:#f6f6f6;white-space:nowrap;font-weight:500}.tblock td{word-break:break-all}
.plots{display:flex;flex-wrap:wrap;gap:10px}figure.plot{margin:0;background:#fff;border:1px solid var(--line);
border-radius:4px;padding:4px}figcaption{font-size:11.5px;color:var(--mute);padding:0 6px}
.lg{margin-right:10px}.lg i{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:4px}
svg .frame{fill:none;stroke:#999}svg .grid{stroke:#eee}svg .lane{stroke:#ccc;stroke-dasharray:2 3}
svg .threshold{stroke:var(--fail);stroke-dasharray:5 3}svg .thlabel{fill:var(--fail);font-size:10px}
svg .tick{font-size:10px;fill:#555}svg .axlabel{font-size:11px;fill:#333}svg .ptitle{font-size:12px;font-weight:600}
svg .xtick{stroke:#999}svg .pt{fill-opacity:.75}
td.id{font-family:ui-monospace,monospace;font-size:11.5px;word-break:break-all}td.msg{max-width:360px;font-size:12px}
td.cmd{min-width:330px}code.replay{font-size:11px;display:block;white-space:pre-wrap;word-break:break-all;
background:#f4f4f4;padding:2px 4px;border-radius:3px}button.copy{font-size:10.5px;margin-top:2px}
table.heat td.heat{text-align:center;min-width:54px;font-weight:600}td.pat{font-family:ui-monospace,monospace}
details{margin-top:8px}nav a{margin-right:12px}.toggle{font-size:12.5px;display:block;margin:4px 0}
"""

_JS = """
(function () {
  document.querySelectorAll('button.copy').forEach(function (b) {
    b.addEventListener('click', function () {
      var text = b.parentNode.querySelector('code.replay').textContent;
      if (navigator.clipboard) {
        navigator.clipboard.writeText(text).then(function () {
          b.textContent = 'copied';
          setTimeout(function () { b.textContent = 'copy'; }, 1200);
        });
      }
    });
  });
  var only = document.getElementById('only-failing');
  if (only) {
    only.addEventListener('change', function () {
      document.querySelectorAll('#matrix tbody tr').forEach(function (tr) {
        tr.hidden = only.checked && !tr.querySelector('td.st-fail');
      });
    });
  }
  document.querySelectorAll('input.filter').forEach(function (inp) {
    inp.addEventListener('input', function () {
      var box = document.getElementById(inp.getAttribute('data-target'));
      var q = inp.value.toLowerCase();
      if (!box) { return; }
      box.querySelectorAll('tbody tr').forEach(function (tr) {
        var hay = (tr.getAttribute('data-case') + ' ' + tr.getAttribute('data-check')).toLowerCase();
        tr.hidden = q !== '' && hay.indexOf(q) < 0;
      });
    });
  });
  document.documentElement.setAttribute('data-scripts', 'ok');
})();
"""


def render_html(runs: Sequence[BackendRun], preset_dims: dict[str, int], worst: int = 20) -> str:
    """The whole page for ``runs`` (at least one), as one string: no external resource of any kind."""
    if not runs:
        raise ConformanceError("no report to render")
    nav = "".join(f'<a href="#b{i}">{esc(run.label)}</a>' for i, run in enumerate(runs))
    title = "rlk-conform report — " + ", ".join(run.label for run in runs)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>rlk-conform report</h1><p class='note'>{len(runs)} result file(s); rendered by "
        f"rlk-conform {esc(__version__)}. Accuracy, invariance and contract judgments as recorded by "
        f"<code>rlk-conform run</code>.</p><nav>{nav}</nav></header>"
        f"<section><h2>Summary across backends</h2>{summary_section(runs)}</section>"
        f"<section><h2>Pass/fail matrix (check × dtype × case family)</h2>{matrix_section(runs)}</section>"
        + "".join(backend_section(i, run, preset_dims, worst) for i, run in enumerate(runs))
        + f"<script>{_JS}</script></body></html>\n")


# --- Markdown --------------------------------------------------------------------------------------------


def _md(text: Any) -> str:
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
        lines.append(f"| {_md(run.label)} | {_md(run.target.get('device_name') or run.target.get('device'))} | "
                     f"{_md(run.target.get('torch'))} | **{_md(s.get('verdict', '?'))}** | "
                     + " | ".join(str(st.get(x, 0)) for x in STATUSES)
                     + f" | {_md(run.source)} |")
    for run in runs:
        t, g = run.target, run.goldens
        s = run.report.get("summary") or {}
        lines += ["", f"## {_md(run.label)}", "",
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
        lines.append("| check (pass/fail/error/skip) | " + " | ".join(_dtype_label(d) for d in dtypes) + " |")
        lines.append("|---|" + "---:|" * len(dtypes))
        for check in checks:
            row = []
            for d in dtypes:
                c = cells.get((check, d))
                row.append("/".join(str(c[x]) for x in STATUSES) if c else "")
            lines.append(f"| {check} | " + " | ".join(row) + " |")
        worst = worst_records(run.records, top)
        if worst:
            n_bad = sum(r["status"] in ("fail", "error") for r in run.records)
            lines += ["", f"Top failures ({len(worst)} of {n_bad}):", ""]
            for r in worst:
                lines.append(f"1. {r['status']} `{r['check']}` `{r['case_id']}` — {_md(_measure(r))}")
                lines.append(f"   `{replay_command(run, r)}`")
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (the parent directory is created)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
