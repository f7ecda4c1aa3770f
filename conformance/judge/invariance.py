"""Relation I (CONTRACT.md §2): a backend against itself, bit for bit, when only the
surroundings change. The comparison every invariance check and property uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from conformance.judge.verdicts import GRADIENT_AXES, JUDGE_CHUNK, OUTPUT_AXES, Verdict, at, judge_elementwise
from conformance.spec.tolerances import Tolerances

INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (floats only; other dtypes as they are): equality of bit views
    is bitwise equality, NaN payloads and signed zeros included."""
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


# Significand bits (with the implicit one) and the smallest normal exponent of each float dtype.
_FORMATS = {torch.float64: (53, -1022), torch.float32: (24, -126), torch.bfloat16: (8, -126), torch.float16: (11, -14)}


def ulp_distance(a: np.ndarray, b: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``|a − b|`` in units in the last place of the larger magnitude, in ``dtype``: a one-step
    difference is 1 wherever it lies, across zero and among subnormals too (docs/report-format.md)."""
    bits, emin = _FORMATS[dtype]
    larger = np.maximum(np.abs(a), np.abs(b))
    exponent = np.frexp(larger)[1] - 1  # larger = f·2^exponent with f in [1, 2)
    ulp = np.ldexp(1.0, np.maximum(exponent, emin) - (bits - 1))
    return np.abs(a - b) / ulp


@dataclass(frozen=True)
class BitMismatch:
    """How two tensors differ: elements that differ (``nan`` of them a NaN against a number), the
    largest difference and ulp distance over the pairs of numbers, and the first difference in index
    order (its index named by ``axes``)."""

    count: int
    max_abs: float
    max_ulp: float
    first_index: tuple[int, ...]
    first_values: tuple[float, float]
    nan: int = 0
    axes: tuple[str, ...] = OUTPUT_AXES

    def metrics(self) -> dict[str, Any]:
        return {"mismatched_elements": self.count, "nan_mismatches": self.nan, "max_abs_diff": self.max_abs,
                "max_ulp_diff": self.max_ulp, "first_mismatch": list(self.first_index),
                "first_mismatch_axes": list(self.axes[: len(self.first_index)]),
                "first_values": list(self.first_values)}

    def describe(self) -> str:
        a, b = self.first_values
        if self.nan == self.count:
            size = "all NaN against a number"
        else:
            size = f"max |Δ| {self.max_abs:.3g}, max {self.max_ulp:.0f} ulp" + (
                f"; {self.nan} NaN against a number" if self.nan else "")
        return f"{self.count} elements differ ({size}); first at {at(self.first_index, self.axes)}: {a!r} vs {b!r}"


def bitwise_mismatch(a: torch.Tensor, b: torch.Tensor, axes: tuple[str, ...] = OUTPUT_AXES) -> BitMismatch | None:
    """None if ``a`` and ``b`` are bit-identical, with two explicit exceptions: a NaN matches any
    NaN (payloads are not values), and +0 matches −0 (a fully masked row is "exactly 0" either way;
    a sign flip of zero changes no later sum). Everything else is compared bit for bit.
    Identical bits are confirmed without temporaries; differences are measured a chunk at a time.
    ``axes`` names the dimensions in messages (default: an output's b, h, q, d)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"cannot compare {tuple(a.shape)} {a.dtype} with {tuple(b.shape)} {b.dtype}")
    if a.dtype not in INT_VIEW:
        raise TypeError(f"bitwise comparison of {a.dtype} is not supported")
    a = a.detach().cpu().contiguous()
    b = b.detach().cpu().contiguous()
    if torch.equal(bit_view(a), bit_view(b)):
        return None
    af_all, bf_all = a.reshape(-1), b.reshape(-1)
    count, nan, max_abs, max_ulp, first = 0, 0, -math.inf, 0.0, None
    for i0 in range(0, af_all.numel(), JUDGE_CHUNK):
        ca, cb = af_all[i0:i0 + JUDGE_CHUNK], bf_all[i0:i0 + JUDGE_CHUNK]
        na, nb = torch.isnan(ca).numpy(), torch.isnan(cb).numpy()
        differ = ((bit_view(ca) != bit_view(cb)).numpy() & ~(na & nb) & ~((ca == 0) & (cb == 0)).numpy())
        if not differ.any():
            continue
        if first is None:
            first = i0 + int(np.flatnonzero(differ)[0])
        count += int(differ.sum())
        numbers = differ & ~na & ~nb
        nan += int((differ & ~numbers).sum())
        if numbers.any():
            x, y = ca.to(torch.float64).numpy()[numbers], cb.to(torch.float64).numpy()[numbers]
            with np.errstate(invalid="ignore", over="ignore"):
                diff = np.abs(x - y)
                ulps = ulp_distance(x, y, a.dtype)
            max_abs = max(max_abs, float(np.nanmax(diff)))
            max_ulp = max(max_ulp, float(np.nanmax(ulps)))
    if first is None:
        return None
    index = tuple(int(i) for i in np.unravel_index(first, tuple(a.shape)))
    return BitMismatch(count=count, max_abs=max_abs if count > nan else float("nan"),
                       max_ulp=max_ulp if count > nan else float("nan"), first_index=index,
                       first_values=(float(af_all[first]), float(bf_all[first])), nan=nan, axes=axes)


DEFAULT_RERUNS = 5  # determinism reruns when neither tolerances.yaml nor the caller sets them


def determinism_reruns(tolerances: Tolerances, override: int | None = None) -> int:
    """How many times a determinism check runs a call: ``override`` (``--reruns``), else the
    ``determinism`` rule's ``reruns`` in tolerances.yaml, else :data:`DEFAULT_RERUNS`."""
    rule = tolerances.invariance_rule("determinism")
    return override or (rule.reruns if rule is not None and rule.reruns else DEFAULT_RERUNS)


def compare_outputs(tolerances: Tolerances, check: str, label: str, got: torch.Tensor, want: torch.Tensor,
                    metrics: dict[str, Any] | None = None, axes: tuple[str, ...] = OUTPUT_AXES) -> Verdict | None:
    """The one invariance comparison of runs and property searches: None when ``got`` equals ``want``
    bit for bit (:func:`bitwise_mismatch`), or within the check's tolerance when tolerances.yaml gives
    it a non-zero one. A failing verdict names the variant (``label``); its metrics start with
    ``metrics`` (default ``{"variant": label}``); ``axes`` name the dimensions of the first mismatch."""
    head = metrics if metrics is not None else {"variant": label}
    rule = tolerances.invariance_rule(check)
    if rule is not None and (rule.atol > 0 or rule.rtol > 0):
        v = judge_elementwise(got, want.detach().to("cpu", torch.float64).numpy(), rule, label)
        return None if v.status == "pass" else Verdict("fail", {**head, **v.metrics}, v.message)
    mismatch = bitwise_mismatch(got, want, axes)
    if mismatch is None:
        return None
    return Verdict("fail", {**head, **mismatch.metrics()}, f"{label}: {mismatch.describe()}")


def compare_gradients(tolerances: Tolerances, check: str, label: str, got: Sequence[torch.Tensor],
                      want: Sequence[torch.Tensor]) -> Verdict | None:
    """:func:`compare_outputs` of dQ, dK and dV in turn (``got``, ``want``: the three, in that order);
    the first that differs fails the check, its message and metrics naming the tensor."""
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        mismatch = bitwise_mismatch(g, w, GRADIENT_AXES[name])
        rule = tolerances.invariance_rule(check)
        if rule is not None and (rule.atol > 0 or rule.rtol > 0):
            verdict = compare_outputs(tolerances, check, f"{label}: {name}", g, w, {"variant": label, "tensor": name})
        elif mismatch is None:
            verdict = None
        else:
            verdict = Verdict("fail", {"variant": label, "tensor": name, **mismatch.metrics()},
                              f"{label}: {name}: {mismatch.describe()}")
        if verdict is not None:
            return verdict
    return None
