"""An independent check of the gradient golden: elements recomputed directly with mpmath.

Nothing here is shared with :mod:`conformance.reference.gradient` (no float64 stage, no error bounds,
no tiers, not even the visibility helper): each element is the textbook formula of CONTRACT.md,

    P = softmax(scale·q·kᵀ + mask),  dP = dO·vᵀ,  dS = P ∘ (dP − rowsum(P ∘ dP)),
    dQ = scale·dS·k,  dK = scale·dSᵀ·q,  dV = Pᵀ·dO   (dK, dV summed over the query group),

evaluated at ``digits`` decimal digits plus the digits the formula's cancellation costs, and rounded
once to float32. dP_j − D cancels down to ~exp(−(largest − smallest logit of the row)) of dP, so the
working precision grows by that range (in decimal digits, taken over the case); the result then sits
~10^-digits from the exact value relative to the terms of its final sum, far closer than any float32
rounding boundary a real case comes near.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import mpmath
import numpy as np
import torch

from conformance.reference.rounding import round_fraction_to_f32
from conformance.spec.case import Case
from conformance.spec.inputs import CaseInputs

Index = tuple[int, int, int, int]
KINDS = ("dq", "dk", "dv")


@dataclass(frozen=True)
class GradientMismatch:
    """One gradient element whose stored value is not the correctly rounded exact value."""

    which: str  # "dq", "dk" or "dv"
    index: Index  # dq: (batch, query head, row, column); dk/dv: (batch, KV head, key, column)
    stored: float
    expected: float


def exact_gradient_element(case: Case, inputs: CaseInputs, grad_out: torch.Tensor, which: str, index: Index,
                           digits: int = 50) -> np.float32:
    """Correctly rounded float32 of ``which[index]``: ``dq[b, h, i, c]`` (h a query head) or
    ``dk``/``dv[b, kv_head, j, c]``. For the KV-cache op ``inputs.k``/``inputs.v`` hold cache then new
    keys (``j`` indexes that concatenation). Raises ValueError for an unknown ``which`` and IndexError
    for an index outside the gradient's shape."""
    return _Evaluator(case, inputs, grad_out, digits).element(which, tuple(int(x) for x in index))


def exact_gradient_values(case: Case, inputs: CaseInputs, grad_out: torch.Tensor,
                          elements: Mapping[str, Iterable[Index]], digits: int = 50) -> dict[tuple, mpmath.mpf]:
    """The unrounded values of many elements, ``{(which, *index): value}``, each row's softmax computed
    once (same arguments as :func:`exact_gradient_element`): for measuring other computations' errors."""
    ev = _Evaluator(case, inputs, grad_out, digits)
    return {(which, *idx): ev.value(which, idx)
            for which, indices in elements.items() for idx in (tuple(int(x) for x in e) for e in indices)}


def crosscheck_gradients(case: Case, inputs: CaseInputs, grad_out: torch.Tensor, golden: Any,
                         elements: Mapping[str, Iterable[Index]], digits: int = 50) -> list[GradientMismatch]:
    """Compare the stored gradients (``golden.dq``/``.dk``/``.dv``, or a mapping with those keys) with
    :func:`exact_gradient_element` at ``elements`` (per kind, a list of indices).

    Returns the mismatches, by kind then index order (empty when every element is correctly rounded).
    Values compare as numbers: +0.0 equals -0.0, a NaN never matches. Each row's softmax is computed
    once per call however many elements need it.
    """
    ev = _Evaluator(case, inputs, grad_out, digits)
    mismatches: list[GradientMismatch] = []
    for which in KINDS:
        stored_all = golden[which] if isinstance(golden, Mapping) else getattr(golden, which)
        for index in sorted({tuple(int(x) for x in e) for e in elements.get(which, ())}):
            expected = ev.element(which, index)
            stored = np.float32(stored_all[index])
            if stored != expected:
                mismatches.append(GradientMismatch(which, index, float(stored), float(expected)))
    return mismatches


class _Evaluator:
    """Rows of one case at ``digits`` digits, each computed once: (keys, P, dS) per (b, query head, row)."""

    def __init__(self, case: Case, inputs: CaseInputs, grad_out: torch.Tensor, digits: int) -> None:
        self.case = case
        self.q = inputs.q.double().numpy()
        self.k = inputs.k.double().numpy()
        self.v = inputs.v.double().numpy()
        self.do = grad_out.double().numpy()
        self.kpm = None if inputs.key_padding_mask is None else inputs.key_padding_mask.numpy()
        self.digits = digits + self._cancellation_digits()
        self.rows: dict[tuple[int, int, int], tuple[list[int], list[Any], list[Any]]] = {}

    def _cancellation_digits(self) -> int:
        """Decimal digits of exp(logit range) over the case's rows, from float64 logits (a rough
        estimate is enough: 10 digits are added for its error)."""
        case = self.case
        scale = 1 / np.sqrt(case.d) if case.scale is None else case.scale
        span = 0.0
        for b in range(case.batch):
            for i in range(case.sq):
                keys = self.keys(b, i)
                if len(keys) > 1:
                    kv = np.repeat(self.k[b][:, keys], case.group, axis=0)  # [hq, keys, d]
                    logits = scale * np.einsum("hd,hjd->hj", self.q[b, :, i], kv)
                    span = max(span, float((logits.max(-1) - logits.min(-1)).max()))
        return int(np.ceil(span / np.log(10))) + 10

    def keys(self, b: int, i: int) -> list[int]:
        """CONTRACT.md: bottom-right causal (j ≤ i + Skv − Sq), the window (left, right) around that
        diagonal (-1: unbounded) and the padding mask (True = keep)."""
        case = self.case
        diag = i + case.skv - case.sq
        left, right = case.window
        out = []
        for j in range(case.skv):
            if case.causal and j > diag:
                continue
            if (left >= 0 and j < diag - left) or (right >= 0 and j > diag + right):
                continue
            if self.kpm is not None and not self.kpm[b, j]:
                continue
            out.append(j)
        return out

    def scale(self) -> Any:
        return 1 / mpmath.sqrt(self.case.d) if self.case.scale is None else mpmath.mpf(self.case.scale)

    def row(self, b: int, h: int, i: int) -> tuple[list[int], list[Any], list[Any]]:
        """(visible keys, P_j, dS_j) of query row i of query head h."""
        key = (b, h, i)
        if key not in self.rows:
            keys = self.keys(b, i)
            kv = h // self.case.group
            q, do = self.q[b, h, i].tolist(), self.do[b, h, i].tolist()
            if not keys:
                self.rows[key] = ([], [], [])
                return self.rows[key]
            raw = [self.scale() * _dot(q, self.k[b, kv, j].tolist()) for j in keys]
            cap = self.case.softcap
            # Soft-capped: logits cap·tanh(s/cap), and dS of the scaled dot carries 1 − tanh².
            logits = raw if cap is None else [cap * mpmath.tanh(s / cap) for s in raw]
            dcap = [1] * len(raw) if cap is None else [1 - mpmath.tanh(s / cap) ** 2 for s in raw]
            sink = None if self.case.sinks is None else mpmath.mpf(self.case.sinks[h])
            top = max(logits) if sink is None else max(max(logits), sink)
            weights = [mpmath.exp(s - top) for s in logits]
            total = mpmath.fsum(weights + ([mpmath.exp(sink - top)] if sink is not None else []))
            p = [w / total for w in weights]
            dp = [_dot(do, self.v[b, kv, j].tolist()) for j in keys]
            dsum = mpmath.fsum(pj * x for pj, x in zip(p, dp))  # the sink has no value: dP = 0
            self.rows[key] = (keys, p, [pj * (x - dsum) * c for pj, x, c in zip(p, dp, dcap)])
        return self.rows[key]

    def element(self, which: str, index: Index) -> np.float32:
        return round_fraction_to_f32(_mpf_to_fraction(self.value(which, index)))

    def value(self, which: str, index: Index) -> mpmath.mpf:
        case = self.case
        b, h, i, c = index
        if which not in KINDS:
            raise ValueError(f"unknown gradient {which!r}; expected one of {KINDS}")
        heads, length = (case.hq, case.sq) if which == "dq" else (case.hkv, case.skv)
        for name, value, bound in (("batch", b, case.batch), ("head", h, heads), ("row/key", i, length),
                                   ("column", c, case.d)):
            if not 0 <= value < bound:
                raise IndexError(f"{case.id}: {which} {name} index {value} is outside [0, {bound})")
        with mpmath.workdps(self.digits):
            if which == "dq":
                keys, _, ds = self.row(b, h, i)
                kv = h // case.group
                value = self.scale() * mpmath.fsum(d * mpmath.mpf(float(self.k[b, kv, j, c])) for j, d in zip(keys, ds))
            else:
                terms = []
                for hq in range(h * case.group, (h + 1) * case.group):
                    for r in range(case.sq):
                        keys, p, ds = self.row(b, hq, r)
                        if i in keys:
                            at = keys.index(i)
                            if which == "dk":
                                terms.append(ds[at] * mpmath.mpf(float(self.q[b, hq, r, c])))
                            else:
                                terms.append(p[at] * mpmath.mpf(float(self.do[b, hq, r, c])))
                value = mpmath.fsum(terms)
                if which == "dk":
                    value = self.scale() * value
            return mpmath.mpf(value)


def _dot(x: Sequence[float], y: Sequence[float]) -> Any:
    # float64 holds every float32/bfloat16/float16 value exactly, so mpf(x) is the input's exact value.
    return mpmath.fsum(mpmath.mpf(a) * mpmath.mpf(b) for a, b in zip(x, y))


def _mpf_to_fraction(x: mpmath.mpf) -> Fraction:
    """The exact binary value of ``x`` from its raw ``(sign, mantissa, exponent, bitcount)`` tuple."""
    sign, man, exp, _ = x._mpf_
    value = Fraction(int(man)) * Fraction(2) ** int(exp)
    return -value if sign else value
