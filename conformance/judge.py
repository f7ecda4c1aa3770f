"""Verdicts. Pure functions from tensors and rules to :class:`Record` values; nothing here prints.

Relations (CONTRACT.md §2): accuracy (A) against the golden, invariance (I) bitwise against the
backend itself, parity (P) against another backend, plus the op contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .reference import Golden
from .tolerances import AccuracyRule, ElementRule

Status = Literal["pass", "fail", "error", "skip"]
CHECKS = ("accuracy", "batch", "split", "prefill_decode", "chunk", "padding", "determinism", "contract", "parity",
          "gqa", "nan_padding")  # the last two are property-search checks only (rlk-conform check)
INVARIANCE_CHECKS = ("batch", "split", "prefill_decode", "chunk", "padding", "determinism")


@dataclass
class Record:
    """One outcome: the unit of every report (console, JSON, JUnit)."""

    case_id: str
    op: str
    check: str
    status: Status
    dtype: str = ""
    family: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    expected: str | None = None  # reason from a known-failure list when this outcome was expected

    def to_json(self) -> dict[str, Any]:
        out = {"case_id": self.case_id, "op": self.op, "check": self.check, "status": self.status,
               "dtype": self.dtype, "family": self.family, "metrics": _jsonable(self.metrics),
               "message": self.message}
        if self.expected is not None:
            out["expected"] = self.expected
        return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


# --- accuracy --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    status: Status
    metrics: dict[str, Any]
    message: str


def judge_accuracy(out: torch.Tensor, golden: Golden, rule: AccuracyRule | None, peak_k: float | None,
                   rule_name: str) -> Verdict:
    """Elementwise ``|c − g| ≤ max(atol + rtol·|g|, naive_factor·e_row)``; strict rules also bound the
    max and mean error by multiples of the naive same-dtype error. NaN/Inf where g is finite fails."""
    if rule is None:
        return Verdict("fail", {}, f"no accuracy rule for this op and dtype in rule set '{rule_name}' of "
                       "tolerances.yaml (fail closed)")
    c = out.detach().to("cpu", torch.float64).numpy()
    g = golden.out.astype(np.float64)
    e_row = golden.naive_error[..., None]
    err = np.abs(c - g)
    nonfinite = ~np.isfinite(c) & np.isfinite(g)
    err = np.where(nonfinite, np.inf, err)
    threshold = np.maximum(rule.atol + rule.rtol * np.abs(g), rule.naive_factor * e_row)
    ratio = err / threshold
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape) if ratio.size else None
    peak = float(np.max(np.abs(g))) if g.size else 0.0
    max_err = float(err.max()) if err.size else 0.0
    mean_err = float(err[np.isfinite(err)].mean()) if np.isfinite(err).any() else float("inf")
    naive_max = float(golden.naive_error.max()) if golden.naive_error.size else 0.0
    scale = golden.error_scale[..., None]
    in_scale_units = np.where(scale > 0, err / np.where(scale > 0, scale, 1.0), 0.0)
    worst_ratio = float(ratio.max()) if ratio.size else 0.0
    metrics: dict[str, Any] = {
        "max_abs_err": max_err,
        "mean_abs_err": mean_err,
        "err_rel_peak": max_err / peak if peak > 0 else 0.0,
        "err_in_error_scale_units": float(in_scale_units.max()) if in_scale_units.size else 0.0,
        "naive_ratio": max_err / naive_max if naive_max > 0 else (0.0 if max_err == 0 else float("inf")),
        "threshold_ratio": worst_ratio,
        "margin": 1.0 - worst_ratio,
        "nonfinite": int(nonfinite.sum()),
        "worst_index": [int(i) for i in worst] if worst is not None else None,
        "rule_set": rule_name,
    }
    if peak_k is not None:
        metrics["peak_relative_ok"] = bool(max_err <= peak_k * peak)
    problems = []
    if nonfinite.any():
        problems.append(f"{int(nonfinite.sum())} NaN/Inf elements where the golden is finite")
    n_bad = int((ratio > 1).sum())
    if n_bad and not nonfinite.all():
        problems.append(f"{n_bad} elements over the threshold, worst {worst_ratio:.3g}× at "
                        f"(b,h,row,col)={tuple(metrics['worst_index'])}: got {c[worst]:.9g}, golden {g[worst]:.9g}")
    naive_mean = float(golden.naive_error.mean()) if golden.naive_error.size else 0.0
    if rule.max_naive_ratio is not None and max_err > rule.max_naive_ratio * naive_max:
        problems.append(f"max error {max_err:.3g} > {rule.max_naive_ratio}× naive same-dtype error {naive_max:.3g}")
    if rule.mean_naive_ratio is not None and mean_err > rule.mean_naive_ratio * max(naive_mean, 0.0) and mean_err > 0:
        problems.append(f"mean error {mean_err:.3g} > {rule.mean_naive_ratio}× mean naive same-dtype error "
                        f"{naive_mean:.3g}")
    if problems:
        return Verdict("fail", metrics, "; ".join(problems))
    return Verdict("pass", metrics, f"max err {max_err:.3g} ({worst_ratio:.3g} of threshold)")


def judge_elementwise(got: torch.Tensor, want: np.ndarray, rule: ElementRule | AccuracyRule | None,
                      what: str, e_row: np.ndarray | None = None) -> Verdict:
    """``|got − want| ≤ atol + rtol·|want|`` (or the naive-error floor when ``e_row`` is given);
    infinities must match exactly (the log-sum-exp of a fully masked row is −inf)."""
    if rule is None:
        return Verdict("fail", {}, f"no rule for {what} in tolerances.yaml (fail closed)")
    c = got.detach().to("cpu", torch.float64).numpy()
    w = want.astype(np.float64)
    both_inf = np.isinf(w) & (c == w)
    err = np.where(both_inf, 0.0, np.abs(c - w))
    err = np.where(np.isnan(err), np.inf, err)
    threshold = rule.atol + rule.rtol * np.where(np.isfinite(w), np.abs(w), 0.0)
    if e_row is not None and isinstance(rule, AccuracyRule):
        threshold = np.maximum(threshold, rule.naive_factor * e_row[..., None])
    ratio = err / threshold
    worst_ratio = float(ratio.max()) if ratio.size else 0.0
    metrics = {"max_abs_err": float(err.max()) if err.size else 0.0, "threshold_ratio": worst_ratio,
               "margin": 1.0 - worst_ratio}
    if worst_ratio > 1:
        idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        metrics["worst_index"] = [int(i) for i in idx]
        return Verdict("fail", metrics, f"{what}: {int((ratio > 1).sum())} elements over the threshold, worst at "
                       f"{tuple(int(i) for i in idx)}: got {c[idx]:.9g}, expected {w[idx]:.9g}")
    return Verdict("pass", metrics, f"{what}: max err {metrics['max_abs_err']:.3g}")


# --- invariance ------------------------------------------------------------------------------------


_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (floats only; other dtypes as they are): equality of bit views
    is bitwise equality, NaN payloads and signed zeros included."""
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def _raw_and_ordered(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Raw bit patterns, and integers whose order is the float order (ulp distance = difference)."""
    if x.dtype not in _INT_VIEW:
        raise TypeError(f"bitwise comparison of {x.dtype} is not supported")
    raw = bit_view(x.detach().cpu().contiguous()).numpy().astype(np.int64)
    magnitude_mask = np.int64((1 << (8 * x.element_size() - 1)) - 1)
    ordered = np.where(raw < 0, -(raw & magnitude_mask), raw)
    return raw, ordered


@dataclass(frozen=True)
class Mismatch:
    count: int
    max_abs: float
    max_ulp: float
    first_index: tuple[int, ...]
    first_values: tuple[float, float]

    def metrics(self) -> dict[str, Any]:
        return {"mismatched_elements": self.count, "max_abs_diff": self.max_abs, "max_ulp_diff": self.max_ulp,
                "first_mismatch": list(self.first_index), "first_values": list(self.first_values)}

    def describe(self) -> str:
        a, b = self.first_values
        return (f"{self.count} elements differ (max |Δ| {self.max_abs:.3g}, max {self.max_ulp:.0f} ulp); first at "
                f"(b,h,row,col)={self.first_index}: {a!r} vs {b!r}")


def bitwise_mismatch(a: torch.Tensor, b: torch.Tensor) -> Mismatch | None:
    """None if ``a`` and ``b`` are bit-identical, with two explicit exceptions: a NaN matches any
    NaN (payloads are not values), and +0 matches −0 (a fully masked row is "exactly 0" either way;
    a sign flip of zero changes no later sum). Everything else is compared bit for bit."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"cannot compare {tuple(a.shape)} {a.dtype} with {tuple(b.shape)} {b.dtype}")
    a = a.detach().cpu()
    b = b.detach().cpu()
    both_nan = (torch.isnan(a) & torch.isnan(b)).numpy()
    ra, oa = _raw_and_ordered(a)
    rb, ob = _raw_and_ordered(b)
    both_zero = ((a == 0) & (b == 0)).numpy()
    differ = (ra != rb) & ~both_nan & ~both_zero
    if not differ.any():
        return None
    af, bf = a.to(torch.float64).numpy(), b.to(torch.float64).numpy()
    with np.errstate(invalid="ignore"):
        absdiff = np.where(differ, np.abs(af - bf), 0.0)
    ulp = np.where(differ, np.abs(oa.astype(np.float64) - ob.astype(np.float64)), 0.0)
    first = tuple(int(i) for i in np.argwhere(differ)[0])
    finite_diffs = absdiff[~np.isnan(absdiff)]
    max_abs = float(finite_diffs.max()) if finite_diffs.size else float("nan")
    return Mismatch(count=int(differ.sum()), max_abs=max_abs, max_ulp=float(ulp.max()),
                    first_index=first, first_values=(float(af[first]), float(bf[first])))
