"""Verdicts. Pure functions from tensors and rules to :class:`Record` values; nothing here prints.

Relations (CONTRACT.md §2): accuracy (A) against the golden, invariance (I) bitwise against the
backend itself, parity (P) against another backend, plus the op contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from conformance.judge.records import Status
from conformance.reference.compute import Golden
from conformance.spec.tolerances import AccuracyRule, ElementRule


@dataclass(frozen=True)
class Verdict:
    status: Status
    metrics: dict[str, Any]
    message: str


#: Axis names of an output [B, Hq, Sq, D] (and, by the first three, of a row statistic [B, Hq, Sq]):
#: batch entry, query head, query row, head-dim column.
OUTPUT_AXES = ("b", "h", "q", "d")


def at(index: list[int] | tuple[int, ...], axes: tuple[str, ...] = OUTPUT_AXES) -> str:
    """An element's place with its axes named: ``(b, h, q, d) = (0, 3, 17, 44)``."""
    return f"({', '.join(axes[:len(index)])}) = ({', '.join(str(int(i)) for i in index)})"


JUDGE_CHUNK = 1 << 20  # elements judged at a time: bounds the judge's float64 temporaries to a few MiB each


def _row_chunks(rows: int, d: int) -> list[tuple[int, int]]:
    step = max(1, JUDGE_CHUNK // max(1, d))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def judge_accuracy(out: torch.Tensor, golden: Golden, rule: AccuracyRule | None, peak_k: float | None,
                   rule_name: str) -> Verdict:
    """Elementwise ``|c − g| ≤ max(atol + rtol·|g|, naive_factor·e_row)``; strict rules also bound the
    max and mean error by multiples of the naive same-dtype error. NaN/Inf where g is finite fails.
    Rows are judged a chunk at a time, so the judge's memory does not grow with the case."""
    if rule is None:
        return Verdict("fail", {}, f"no accuracy rule for this op and dtype in rule set '{rule_name}' of "
                       "tolerances.yaml (fail closed)")
    shape = golden.out.shape
    d = shape[-1] if shape else 1
    got = out.detach().to("cpu").reshape(-1, d)
    want = golden.out.reshape(-1, d)
    e_rows = golden.naive_error.reshape(-1)
    scales = golden.error_scale.reshape(-1)
    max_err = peak = in_units = 0.0
    err_sum, n_finite, n_nonfinite, n_bad = 0.0, 0, 0, 0
    worst_ratio, worst_flat = -math.inf, 0
    for r0, r1 in _row_chunks(want.shape[0], d):
        c = got[r0:r1].to(torch.float64).numpy()
        g = want[r0:r1].astype(np.float64)
        err = np.abs(c - g)
        nonfinite = ~np.isfinite(c) & np.isfinite(g)
        err[nonfinite] = np.inf
        threshold = np.maximum(rule.atol + rule.rtol * np.abs(g), rule.naive_factor * e_rows[r0:r1, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(err == 0, 0.0, err / threshold)
            scale = scales[r0:r1, None]
            units = np.where(scale > 0, err / np.where(scale > 0, scale, 1.0), 0.0)
        finite = np.isfinite(err)
        err_sum += float(err[finite].sum())
        n_finite += int(finite.sum())
        n_nonfinite += int(nonfinite.sum())
        n_bad += int((ratio > 1).sum())
        max_err = max(max_err, float(err.max()))
        peak = max(peak, float(np.abs(g).max()))
        in_units = max(in_units, float(units.max()))
        local = int(np.argmax(ratio))
        if ratio.flat[local] > worst_ratio:
            worst_ratio, worst_flat = float(ratio.flat[local]), r0 * d + local
    size = want.size
    worst = np.unravel_index(worst_flat, shape) if size else None
    worst_ratio = worst_ratio if size else 0.0
    mean_err = err_sum / n_finite if n_finite else float("inf")
    naive_max = float(golden.naive_error.max()) if golden.naive_error.size else 0.0
    metrics: dict[str, Any] = {
        "max_abs_err": max_err,
        "mean_abs_err": mean_err,
        "err_rel_peak": max_err / peak if peak > 0 else 0.0,
        "err_in_error_scale_units": in_units,
        "naive_ratio": max_err / naive_max if naive_max > 0 else (0.0 if max_err == 0 else float("inf")),
        "threshold_ratio": worst_ratio,
        "margin": 1.0 - worst_ratio,
        "nonfinite": n_nonfinite,
        "worst_index": [int(i) for i in worst] if worst is not None else None,
        "rule_set": rule_name,
    }
    if peak_k is not None:
        metrics["peak_relative_ok"] = bool(max_err <= peak_k * peak)
    problems = []
    if n_nonfinite:
        problems.append(f"{n_nonfinite} NaN/Inf elements where the golden is finite")
    if n_bad and n_nonfinite < size:
        got_w = float(got.reshape(-1)[worst_flat].to(torch.float64))
        problems.append(f"{n_bad} elements over the threshold, worst {worst_ratio:.3g}× at "
                        f"{at(metrics['worst_index'])}: got {got_w:.9g}, golden "
                        f"{float(want.reshape(-1)[worst_flat]):.9g}")
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
                       f"{at(metrics['worst_index'])}: got {c[idx]:.9g}, expected {w[idx]:.9g}")
    return Verdict("pass", metrics, f"{what}: max err {metrics['max_abs_err']:.3g}")
