"""Verdicts. Pure functions from tensors and rules to :class:`Record` values; nothing here prints.

Relations (CONTRACT.md §2): accuracy (A) against the golden, invariance (I) bitwise against the
backend itself, parity (P) against another backend, plus the op contract.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from conformance.judge.records import Status
from conformance.reference.compute import Golden
from conformance.reference.gradient import GradientGolden
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
    metrics, problems = judge_elements(out, golden.out, golden.naive_error, golden.error_scale, rule, peak_k)
    metrics["rule_set"] = rule_name
    if problems:
        return Verdict("fail", metrics, "; ".join(problems))
    return Verdict("pass", metrics, f"max err {metrics['max_abs_err']:.3g} ({metrics['threshold_ratio']:.3g} of "
                   "threshold)")


#: Axis names of dK and dV [B, Hkv, Skv, D]: batch entry, KV head, key, head-dim column.
KEY_AXES = ("b", "h_kv", "k", "d")
GRADIENT_AXES = {"dq": OUTPUT_AXES, "dk": KEY_AXES, "dv": KEY_AXES}


def judge_gradient_accuracy(grads: Sequence[torch.Tensor], gradient: GradientGolden, rule: AccuracyRule | None,
                            rule_name: str) -> Verdict:
    """:func:`judge_elements` for each of dQ (per query row), dK and dV (per key) against the exact
    gradients; fails when one of them fails, naming it. Metrics: the worst ``threshold_ratio`` and
    ``margin`` over the three, and each tensor's metrics under ``dq``, ``dk``, ``dv``."""
    if rule is None:
        return Verdict("fail", {}, f"no gradient_accuracy rule for this op and dtype in rule set '{rule_name}' of "
                       "tolerances.yaml (fail closed)")
    metrics: dict[str, Any] = {"rule_set": rule_name}
    problems = []
    for name, got, axes in zip(("dq", "dk", "dv"), grads, (OUTPUT_AXES, KEY_AXES, KEY_AXES)):
        want = getattr(gradient, name)
        part, wrong = judge_elements(got, want, getattr(gradient, f"{name}_naive_error"),
                                     getattr(gradient, f"{name}_error_scale"), rule, None, axes)
        metrics[name] = part
        problems += [f"{name}: {p}" for p in wrong]
    metrics["threshold_ratio"] = max(metrics[n]["threshold_ratio"] for n in ("dq", "dk", "dv"))
    metrics["margin"] = 1.0 - metrics["threshold_ratio"]
    metrics["max_abs_err"] = max(metrics[n]["max_abs_err"] for n in ("dq", "dk", "dv"))
    if problems:
        return Verdict("fail", metrics, "; ".join(problems))
    return Verdict("pass", metrics, "max err " + ", ".join(f"{n} {metrics[n]['max_abs_err']:.3g}"
                                                           for n in ("dq", "dk", "dv"))
                   + f" ({metrics['threshold_ratio']:.3g} of threshold)")


def judge_elements(got_t: torch.Tensor, want_a: np.ndarray, naive_error: np.ndarray, error_scale: np.ndarray,
                   rule: AccuracyRule, peak_k: float | None, axes: tuple[str, ...] = OUTPUT_AXES
                   ) -> tuple[dict[str, Any], list[str]]:
    """The accuracy metrics of ``got_t`` against ``want_a`` (``[..., D]``; ``naive_error`` and
    ``error_scale`` one per row of D elements) and what is wrong: elementwise
    ``|c − g| ≤ max(atol + rtol·|g|, naive_factor·e_row)``, NaN/Inf where the golden is finite, and
    the strict rule set's bounds on the max and mean error by the naive same-dtype error. Judged a
    chunk of rows at a time; ``axes`` names the worst element's place in messages."""
    shape = want_a.shape
    d = shape[-1] if shape else 1
    got = got_t.detach().to("cpu").reshape(-1, d)
    want = want_a.reshape(-1, d)
    e_rows = naive_error.reshape(-1)
    scales = error_scale.reshape(-1)
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
    naive_max = float(naive_error.max()) if naive_error.size else 0.0
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
    }
    if peak_k is not None:
        metrics["peak_relative_ok"] = bool(max_err <= peak_k * peak)
    problems = []
    if n_nonfinite:
        problems.append(f"{n_nonfinite} NaN/Inf elements where the golden is finite")
    if n_bad and n_nonfinite < size:
        got_w = float(got.reshape(-1)[worst_flat].to(torch.float64))
        problems.append(f"{n_bad} elements over the threshold, worst {worst_ratio:.3g}× at "
                        f"{at(metrics['worst_index'], axes)}: got {got_w:.9g}, golden "
                        f"{float(want.reshape(-1)[worst_flat]):.9g}")
    naive_mean = float(naive_error.mean()) if naive_error.size else 0.0
    if rule.max_naive_ratio is not None and max_err > rule.max_naive_ratio * naive_max:
        problems.append(f"max error {max_err:.3g} > {rule.max_naive_ratio}× naive same-dtype error {naive_max:.3g}")
    if rule.mean_naive_ratio is not None and mean_err > rule.mean_naive_ratio * max(naive_mean, 0.0) and mean_err > 0:
        problems.append(f"mean error {mean_err:.3g} > {rule.mean_naive_ratio}× mean naive same-dtype error "
                        f"{naive_mean:.3g}")
    return metrics, problems


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
