"""Facts derived from records and the small formatting pieces the HTML page and the Markdown
summary share.
"""

from __future__ import annotations

import html
import math
import re
import shlex
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from conformance.judge.records import STATUSES
from conformance.report.json import DTYPE_ORDER
from conformance.report.runs import BackendRun
from conformance.spec.case import parse_case_id
from conformance.spec.checks import CHECKS

#: The accuracy metric plotted as "normalized error": worst err/threshold over the case (≤ 1 passes).
NORMALIZED_ERROR = "threshold_ratio"
DEFAULT_GOLDENS_DIR = "goldens/smoke"
DTYPE_COLORS = {"float32": "#1f6fb4", "bfloat16": "#e0700b", "float16": "#2a9d3a"}
STATUS_COLORS = {"pass": "#2e8b57", "fail": "#d62728", "error": "#8b0000", "skip": "#c9a227"}
CHECK_ABBREV = {"accuracy": "acc", "batch": "batch", "split": "split", "prefill_decode": "p→d", "chunk": "chunk",
                "padding": "pad", "determinism": "det", "contract": "contr", "parity": "par", "gqa": "gqa",
                "nan_padding": "NaN", "gradient_accuracy": "∇acc", "gradient_batch": "∇batch",
                "gradient_split": "∇split", "gradient_padding": "∇pad", "gradient_determinism": "∇det",
                "gradient_contract": "∇contr"}
def case_dims(case_id: str, preset_dims: dict[str, int]) -> tuple[int | None, int | None]:
    """(Skv, head dim D) from a case id (:func:`conformance.spec.case.parse_case_id`); D of a preset
    from ``preset_dims``. ``None`` for what cannot be derived (an unknown id shape or preset)."""
    params = parse_case_id(case_id)
    if params is None:
        return None, None
    return params["skv"], params.get("d", preset_dims.get(params["model"]))


def as_number(x: Any) -> float | None:
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


def severity(r: dict[str, Any]) -> tuple[int, float]:
    """Errors first, then accuracy/parity/contract failures (by err/threshold), then invariance
    failures (by mismatched elements)."""
    m = r.get("metrics") or {}
    if r["status"] == "error":
        return 3, 0.0
    if r["check"] in ("accuracy", "parity"):
        return 2, as_number(m.get("threshold_ratio")) or 0.0
    if r["check"] == "contract":
        return 2, float(len(m.get("violations") or ()))
    return 1, as_number(m.get("mismatched_elements")) or 0.0


def worst_records(records: Iterable[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` worst failing (``fail``/``error``) records, most severe first; ties by case id, check."""
    bad = [r for r in records if r["status"] in ("fail", "error")]
    bad.sort(key=lambda r: (-severity(r)[0], -severity(r)[1], r["case_id"], r["check"]))
    return bad[:n]


def closest_to_threshold(records: Iterable[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` passing accuracy records with the largest err/threshold (the smallest margins)."""
    acc = [(v, r) for r in records if r["check"] == "accuracy" and r["status"] == "pass"
           and (v := as_number((r.get("metrics") or {}).get(NORMALIZED_ERROR))) is not None]
    acc.sort(key=lambda vr: (-vr[0], vr[1]["case_id"]))
    return [r for _, r in acc[:n]]


def replay_command(run: BackendRun, record: dict[str, Any]) -> str:
    """``rlk-conform run --backend <requested> --filter '<case id>' --checks <check>``, followed by
    the options the run needs to be repeated as it was: ``--goldens`` and ``--tier`` (unless the
    default smoke goldens), ``--device`` (if not cpu), ``--rules``/``--tolerances`` (if not the
    defaults) and ``--compare-to`` for parity."""
    backend = run.report["backend"]
    parts = ["rlk-conform", "run", "--backend", shlex.quote(run.requested), "--filter",
             "'" + record["case_id"].replace("'", "'\\''") + "'", "--checks", shlex.quote(record["check"])]
    golden_dir = run.goldens.get("dir")
    default = run.goldens.get("default", golden_dir == DEFAULT_GOLDENS_DIR)  # reports before "default": the path
    if default and run.goldens.get("tier") not in (None, "smoke"):
        parts += ["--tier", shlex.quote(str(run.goldens["tier"]))]
    elif golden_dir and not default:
        parts += ["--goldens", shlex.quote(str(golden_dir))]
    device = str(backend.get("device") or "").split(",")[0]  # a --devices run names each device: one will do
    if device and device != "cpu":
        parts += ["--device", shlex.quote(str(device))]
    settings = run.report.get("settings") or {}
    if settings.get("rule_set") not in (None, "default"):
        parts += ["--rules", shlex.quote(str(settings["rule_set"]))]
    if not settings.get("tolerances_default", settings.get("tolerances_file") in (None, "specs/tolerances.yaml")):
        parts += ["--tolerances", shlex.quote(str(settings["tolerances_file"]))]
    compare_to = run.report.get("compare_to") or {}
    if record["check"] == "parity" and compare_to.get("requested"):
        parts += ["--compare-to", shlex.quote(str(compare_to["requested"]))]
    return " ".join(parts)


def record_measure(r: dict[str, Any]) -> str:
    """The one number that says how bad a record is, as text."""
    m = r.get("metrics") or {}
    if r["check"] in ("accuracy", "parity") and NORMALIZED_ERROR in m:
        v = as_number(m[NORMALIZED_ERROR])
        return "err/threshold " + ("NaN" if v is None else fmt_number(v))
    if "mismatched_elements" in m:
        return f"{m['mismatched_elements']} elements differ, max {fmt_number(as_number(m.get('max_ulp_diff')))} ulp"
    if m.get("violations"):
        return f"{len(m['violations'])} contract violations"
    return r["status"]


def fmt_number(v: float | None) -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.3g}"


def variant_pattern(variant: str) -> str:
    """A variant name with its numbers replaced, so that e.g. all split points group together."""
    return re.sub(r"\d+", "N", variant)


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def html_attrs(**kv: Any) -> str:
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in kv.items() if v is not None)


def cell_class(c: Counter[str]) -> str:
    if not c:
        return "st-none"
    if c["fail"] or c["error"]:
        return "st-fail"
    if c["pass"]:
        return "st-pass" if not c["skip"] else "st-partial"
    return "st-skip"


def counts_title(c: Counter[str]) -> str:
    return " · ".join(f"{c[s]} {s}" for s in STATUSES)


def count_attrs(c: Counter[str]) -> dict[str, int]:
    return {f"data_{s}": c[s] for s in STATUSES}


def dtype_label(d: str) -> str:
    return d or "—"


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
