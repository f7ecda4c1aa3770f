"""Tier 3 of the exact backward: integer logits and dP, rational rows, the formal zero test of a dQ
numerator, and interval arithmetic of doubling precision for what double-double leaves open."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from conformance.reference.compute import RefinementStats
from conformance.reference.exact import EXACT_SHIFT, capped, decide_by_intervals, exact_dots, rational_scale
from conformance.reference.gradient_float64 import Operands
from conformance.reference.rounding import round_fraction_to_f32
from conformance.spec.case import Case
from conformance.spec.inputs import visible


@dataclass
class _ExactRow:
    """One query row in exact arithmetic: its visible keys, integer logits and dP (value·2^-298)."""

    keys: np.ndarray
    dots: list[int]
    dps: list[int]
    group_of: list[int]  # group index of each key (equal logits)
    groups: list[list[int]]  # key positions per group
    group_dots: list[int]
    group_dps: list[int]  # Σ dP over each group (·2^298)
    # The row's weights, their sum and D in intervals, per precision (shared by every element of the
    # row's dQ and by every dK, dV element the row contributes to: the same bits at each precision).
    intervals: dict[int, tuple[list[Any], Any, Any]] = field(default_factory=dict)
    sink: float | None = None  # the row's sink logit


_SHIFT = Fraction(1, 2 ** 298)  # exact_dots gives value·2^298


def _exact_row(case: Case, q: np.ndarray, do: np.ndarray, k: np.ndarray, v: np.ndarray,
               keys: np.ndarray, sink: float | None = None) -> _ExactRow:
    dots = exact_dots(q, k[keys]) if len(keys) else []
    dps = exact_dots(do, v[keys]) if len(keys) else []
    index: dict[int, int] = {}
    groups: list[list[int]] = []
    group_dots: list[int] = []
    group_of = []
    for pos, dot in enumerate(dots):
        key = 0 if case.effective_scale == 0 else dot  # scale 0: every logit is 0
        if key not in index:
            index[key] = len(groups)
            groups.append([])
            group_dots.append(dot)
        groups[index[key]].append(pos)
        group_of.append(index[key])
    return _ExactRow(keys, dots, dps, group_of, groups, group_dots, [sum(dps[j] for j in grp) for grp in groups],
                     sink=sink)


def exact_tier(case: Case, ops: Operands, left: dict[str, np.ndarray], out32: dict[str, np.ndarray],
                stats: RefinementStats) -> None:
    """Tier 3 for the elements ``left`` (see the module docstring)."""
    b, hkv, g, sq, d = ops.q.shape
    qn, don = ops.q.cpu().numpy(), ops.do.cpu().numpy()
    kn, vn = ops.k.cpu().numpy(), ops.v.cpu().numpy()
    kpm = None if ops.kpm is None else ops.kpm.cpu()
    cache: dict[tuple[int, int, int, int], _ExactRow] = {}

    def row(bi: int, hi: int, gi: int, i: int) -> _ExactRow:
        key = (bi, hi, gi, i)
        if key not in cache:
            see = visible(case, None if kpm is None else kpm[bi:bi + 1], np.array([i]))[0, 0].numpy()
            cache[key] = _exact_row(case, qn[bi, hi, gi, i], don[bi, hi, gi, i], kn[bi, hi], vn[bi, hi],
                                    np.flatnonzero(see), None if case.sinks is None else case.sinks[hi * g + gi])
        return cache[key]

    dq_view = out32["dq"].reshape(b, hkv, g, sq, d)
    for bi, hi, gi, i, c in left["dq"]:
        er = row(bi, hi, gi, i)
        k_col = [int(x) for x in np.ldexp(kn[bi, hi, er.keys, c], EXACT_SHIFT)]
        dq_view[bi, hi, gi, i, c] = _exact_dq(case, er, k_col, f"dq[{bi}, {hi * g + gi}, {i}, {c}]")
        stats.exact += 1
    for name in ("dk", "dv"):
        mask = ops.active if name == "dk" else ops.seen
        for bi, hi, j, c in left[name]:
            contributions = []
            for gi, i in zip(*np.nonzero(mask[bi, hi])):
                er = row(bi, hi, int(gi), int(i))
                pos = np.searchsorted(er.keys, j)
                if pos < len(er.keys) and er.keys[pos] == j:
                    x = qn[bi, hi, gi, i, c] if name == "dk" else don[bi, hi, gi, i, c]
                    contributions.append((er, int(pos), Fraction(float(x))))
            out32[name][bi, hi, j, c] = _exact_column(case, name, contributions, f"{name}[{bi}, {hi}, {j}, {c}]")
            stats.exact += 1


def _round_scaled(case: Case, c: Fraction, what: str) -> np.float32:
    """The float32 rounding of scale·c (c rational, exact); scale·c is irrational when the scale is
    1/sqrt(d) with d not a square and c ≠ 0, and then never a boundary: intervals decide it."""
    if c == 0:
        return np.float32(0.0)
    rational = rational_scale(case)
    if rational is not None:
        return round_fraction_to_f32(c * rational)
    # A dot of 2^298 makes the logit interval exactly the scale.
    return decide_by_intervals([2 ** 298], case, lambda iv, logits: logits[0] * _iv_fraction(iv, c), what)


def _iv_fraction(iv: Any, x: Fraction) -> Any:
    return iv.mpf(x.numerator) / iv.mpf(x.denominator)


QUICK_PREC = 256  # intervals up to this many bits decide every value not on (or at 0 near) a boundary
FORMAL_GROUPS = 256  # up to this many logit groups the O(G²) algebraicity check runs before longer intervals


def _exact_dq(case: Case, er: _ExactRow, k_col: list[int], what: str) -> np.float32:
    """dQ_c = scale·Σ_{g,h} x_g x_h (n_h A_g − B_g C_h) / W² with x_g = exp(logit of group g),
    A_g = Σ dP_j k_jc, B_g = Σ dP_j, C_g = Σ k_jc over the group, W = Σ n_g x_g (``k_col``: the
    column's values ·2^149 as integers). The x_g are powers of one transcendental number (integer
    logits), so the value is algebraic iff the numerator's coefficient of each distinct exponent is
    c times W²'s, one constant c (the value is then scale·c): a formal check, O(G²). It is needed only
    for algebraic values, where intervals never converge, so short intervals go first; with many
    groups the long intervals do too."""
    n = [len(grp) for grp in er.groups]
    bsum = er.group_dps  # ·2^298
    a: list[int] = []  # ·2^447, filled (with csum) only when the formal check or the exact value runs
    csum: list[int] = []  # ·2^149
    order = sorted(range(len(n)), key=lambda x: er.group_dots[x])
    top, bottom = order[-1], order[0]

    def diagonal(x: int) -> int:  # the coefficient of x_g² (·2^447); W²'s is n_g²
        if not a:
            a.extend(sum(er.dps[j] * k_col[j] for j in grp) for grp in er.groups)
            csum.extend(sum(k_col[j] for j in grp) for grp in er.groups)
        return n[x] * a[x] - bsum[x] * csum[x]

    def algebraic() -> bool:
        if len(n) == 1:
            return True
        # the extreme exponents 2·t_top and 2·t_bottom come from one pair each
        if diagonal(top) * n[bottom] ** 2 != diagonal(bottom) * n[top] ** 2:
            return False
        num: dict[int, int] = {}
        den: dict[int, int] = {}
        for x in range(len(n)):
            for y in range(len(n)):
                e = er.group_dots[x] + er.group_dots[y]
                num[e] = num.get(e, 0) + n[y] * a[x] - bsum[x] * csum[y]
                den[e] = den.get(e, 0) + n[x] * n[y]
        return all(num[e] * n[top] ** 2 == diagonal(top) * den[e] for e in num)

    def exact() -> np.float32:
        return _round_scaled(case, Fraction(diagonal(top), n[top] ** 2 * 2 ** 447), what)

    def value(iv: Any, logits: list[Any]) -> Any:
        scale = logits[0]
        _, _, ds = _row_intervals(iv, case, er, scale)
        acc = iv.mpf(0)
        for dsj, kj in zip(ds, k_col):
            if kj:
                acc += dsj * kj
        return _away_from_zero(iv, scale * acc * iv.mpf(2) ** -149)

    if case.softcap is not None or case.sinks is not None:
        # The formal check assumes integer logits; capped logits and sinks break that. An all-zero key
        # column is exactly 0; any other value is decided by intervals (an exact zero or rounding
        # boundary reached by cancellation would raise ArithmeticError naming the element).
        if not any(k_col):
            return np.float32(0.0)
        return decide_by_intervals([2 ** 298], case, value, what)
    try:
        return decide_by_intervals([2 ** 298], case, value, what, QUICK_PREC)
    except ArithmeticError:
        pass
    if len(n) <= FORMAL_GROUPS:
        return exact() if algebraic() else decide_by_intervals([2 ** 298], case, value, what)
    try:
        return decide_by_intervals([2 ** 298], case, value, what)
    except ArithmeticError:
        if algebraic():
            return exact()
        raise


def _exact_column(case: Case, name: str, contributions: list[tuple[_ExactRow, int, Fraction]],
                  what: str) -> np.float32:
    """dK_jc = scale·Σ_i q_ic·P_ij(dP_ij − D_i) or dV_jc = Σ_i dO_ic·P_ij over the rows that see key j.
    Each row's term is 0 (formally), rational (one logit group) or transcendental (several groups)."""
    rational = Fraction(0)
    rest = []
    for er, pos, x in contributions:
        if x == 0:
            continue
        if er.sink is not None or (case.softcap is not None and name == "dk"):
            # A sink's weight (transcendental) is in every P; soft-capping multiplies dS by
            # c = 1 − tanh², irrational unless the logit is 0: intervals, but for dS ≡ 0 without a sink.
            grp_dps = er.group_dps
            if er.sink is None and all(len(g) * er.dps[pos] == sm for g, sm in zip(er.groups, grp_dps)):
                continue
            rest.append((er, pos, x))
            continue
        grp = er.groups[er.group_of[pos]]
        if name == "dv":
            if len(er.groups) == 1:
                rational += x / len(grp)
            else:
                rest.append((er, pos, x))
            continue
        dpj = er.dps[pos]
        sums = er.group_dps
        if all(len(grp_h) * dpj == s for grp_h, s in zip(er.groups, sums)):
            continue  # dP_j equals every group's mean: dS_ij ≡ 0
        if len(er.groups) == 1:
            n = len(grp)
            rational += x * (n * Fraction(dpj) - sums[0]) * _SHIFT / (n * n)
        else:
            rest.append((er, pos, x))
    if not rest:
        return _round_scaled(case, rational, what) if name == "dk" else round_fraction_to_f32(rational)
    def value(iv: Any, logits: list[Any]) -> Any:
        scale = logits[0]
        acc = _iv_fraction(iv, rational)
        for er, pos, x in rest:
            w, total, ds = _row_intervals(iv, case, er, scale)
            term = ds[pos] if name == "dk" else w[pos] / total
            acc += _iv_fraction(iv, x) * term
        return _away_from_zero(iv, scale * acc if name == "dk" else acc)

    return decide_by_intervals([2 ** 298], case, value, what)  # the one "logit" is the scale


def _row_intervals(iv: Any, case: Case, er: _ExactRow, scale: Any) -> tuple[list[Any], Any, Any]:
    """:func:`_iv_row` of ``er`` at the current precision, computed once per row and precision
    (``scale``: the scale's interval at that precision)."""
    hit = er.intervals.get(iv.prec)
    if hit is None:
        unit = iv.mpf(2) ** -298
        hit = er.intervals[iv.prec] = _iv_row(iv, [iv.mpf(dot) * unit * scale for dot in er.dots], er.dps, case,
                                              er.sink)
    return hit


def _iv_row(iv: Any, logits: list[Any], dps: list[int], case: Case | None = None,
            sink: float | None = None) -> tuple[list[Any], Any, list[Any]]:
    """A row's weights w_j = exp(s_j − ref), their sum W and dS_j = P_j (dP_j − D) in intervals.

    dP_j − D = Σ_l w_l (dP_j − dP_l) / W is the difference that cancels (when one weight dominates,
    D is dP of that key up to the tiny others). It is taken apart around the key m of the largest
    logit: F = Σ_l w_l (dP_l − dP_m) and W (dP_j − D) = (dP_j − dP_m) W − F, where every dP
    difference is an exact integer. Then dS_m = −w_m F / W² has no cancellation at all and the others
    cancel only when the value itself is small against its terms, so the intervals stay tight at the
    working precision instead of needing as many bits as the weights span.

    Soft-capped (``case.softcap``): the weights are those of the capped logits and dS_j is the gradient
    of the scaled dot, times c_j = 1 − tanh²; a ``sink`` adds its weight to W and, with dP = 0, its
    term −w_sink·dP_m to F."""
    raw = logits
    if case is not None and case.softcap is not None:
        logits = [capped(iv, x, case) for x in logits]
    m = max(range(len(logits)), key=lambda j: float(logits[j].mid))
    top = float(logits[m].mid) if sink is None else max(float(logits[m].mid), sink)
    ref = iv.mpf(top)
    unit = iv.mpf(2) ** -298
    w = [iv.exp(x - ref) for x in logits]
    total = iv.mpf(0)
    f = iv.mpf(0)
    for wj, dpj in zip(w, dps):
        total += wj
        if dpj != dps[m]:
            f += wj * (dpj - dps[m])
    if sink is not None:
        w_sink = iv.exp(iv.mpf(sink) - ref)
        total += w_sink
        if dps[m]:
            f -= w_sink * dps[m]
    f *= unit
    inv2 = 1 / (total * total)
    ds = [wj * (((dpj - dps[m]) * unit) * total - f) * inv2 for wj, dpj in zip(w, dps)]
    if case is not None and case.softcap is not None:
        cap = iv.mpf(case.softcap)
        for j, x in enumerate(raw):
            t = 1 - 2 / (iv.exp(2 * x / cap) + 1)
            ds[j] = ds[j] * (1 - t * t)
    return w, total, ds


def _away_from_zero(iv: Any, x: Any) -> Any:
    """An interval that still contains 0 is widened so that its endpoints cannot round alike: the
    sign of a zero result is never guessed (more precision separates a non-zero value from 0)."""
    return x + iv.mpf([-1, 1]) if x.a <= 0 <= x.b else x
