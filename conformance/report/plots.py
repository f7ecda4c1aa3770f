"""Error-distribution plots as inline SVG (no plotting library, no external resource)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from conformance.report.markup import (
    DTYPE_COLORS,
    NORMALIZED_ERROR,
    STATUS_COLORS,
    as_number,
    case_dims,
    esc,
    fmt_number,
    html_attrs,
    ordered_dtypes,
)
from conformance.report.runs import BackendRun


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
        value = as_number((r.get("metrics") or {}).get(NORMALIZED_ERROR))
        if value is None or value < 0 or math.isnan(value):
            continue
        skv, d = case_dims(r["case_id"], preset_dims)
        points.append(ErrorPoint(r["case_id"], r.get("dtype", ""), r["status"], value, skv, d))
    return points


def _jitter(key: str) -> float:
    """A deterministic offset in [-0.5, 0.5) from a case id (stable plots, no randomness)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") / 2**32 - 0.5


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
    tip = f"{p.case_id}\n{p.dtype} · {p.status} · err/threshold {fmt_number(p.value)}"
    attrs = html_attrs(class_=f"pt {p.status}", data_case=p.case_id, data_dtype=p.dtype, data_value=fmt_number(p.value))
    if math.isinf(p.value):
        return (f'<path{attrs} d="M{x - 4:.1f},{y + 3:.1f} L{x + 4:.1f},{y + 3:.1f} L{x:.1f},{y - 4:.1f} Z" '
                f'fill="{color}"><title>{esc(tip)}</title></path>')
    stroke = ' stroke="#000" stroke-width="1.2"' if p.status == "fail" else ""
    return (f'<circle{attrs} cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"{stroke}>'
            f"<title>{esc(tip)}</title></circle>")


def _svg(kind: str, backend: str, n: int, body: list[str], legend: list[tuple[str, str]]) -> str:
    items = "".join(f'<span class="lg"><i style="background:{c}"></i>{esc(t)}</span>' for t, c in legend)
    return (f'<figure class="plot"><svg{html_attrs(class_="plot", data_plot=kind, data_backend=backend, data_points=n)}'
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
