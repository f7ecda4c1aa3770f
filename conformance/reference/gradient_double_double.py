"""Tier 2 of the exact backward: what float64 leaves open, in double-double arithmetic (torch, on the
generation device, bounded working memory): every row an undecided element needs gets its full
softmax, dQ elements their row, dK/dV elements their column (see :mod:`conformance.reference.gradient`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from conformance.reference.double_double import (
    Segment,
    U,
    dd_add,
    dd_div,
    dd_dots,
    dd_logits,
    dd_mul,
    dd_sum,
    dd_weights,
    scale_dd,
    two_prod,
    two_sum,
)
from conformance.reference.gradient_float64 import TINY, WHICH, Operands
from conformance.reference.rounding import float32_neighbours
from conformance.spec.case import Case
from conformance.spec.inputs import visible

# (row, key) pairs of one tier-2 row pass (about 40 float64 temporaries: ~160 MiB), and gathered terms of
# one tier-2 contraction.
GRAD_TIER2_ELEMENTS = 1 << 19
# On a GPU 32× that (the launches of a pass's few hundred kernels amortised): the 4k-context gradient
# preset's tier 2 took 11.2 s with 2^22 on the H200, 6.3 s with 2^24, 6.8 s with 2^25.
CUDA_GRAD_TIER2_ELEMENTS = 1 << 24


def grad_tier2_limit(device: torch.device) -> int:
    """(row, key) pairs of one tier-2 row pass, and gathered terms of one contraction, on ``device``."""
    return CUDA_GRAD_TIER2_ELEMENTS if device.type == "cuda" else GRAD_TIER2_ELEMENTS


ROW_CHUNKS = 16  # a head's rows in this many chunks: the unit in which the second pass redoes dK/dV terms


def _row_chunk(gi: np.ndarray, i: np.ndarray, g: int, sq: int) -> np.ndarray:
    """The chunk of rows (gi, i) of a head: consecutive rows of the flattened [g·sq] row index."""
    return ((gi.astype(np.int64) * sq + i) * ROW_CHUNKS) // (g * sq)


def _select_chunks(case: Case, name: str, prior: list[torch.Tensor]) -> torch.Tensor:
    """Which chunks of each dK/dV element the double-double exp pass recomputes: the fewest, largest
    first, that leave the cheap pass's bound of the others below half the element's distance to the
    nearest float32 rounding boundary (a choice of work only; the decision stays rigorous)."""
    hi_c, lo_c, first_c, _ = prior
    scale = case.effective_scale if name == "dk" else 1.0
    value = (hi_c.sum(-1) + lo_c.sum(-1)) * scale
    _, _, _, mid_lo, mid_hi = float32_neighbours(value)
    margin = torch.minimum((value - mid_lo).abs(), (mid_hi - value).abs())
    chunk_bound = 2 * abs(scale) * first_c
    ordered, order = chunk_bound.sort(-1, descending=True)
    rest = ordered.flip(-1).cumsum(-1).flip(-1)  # rest[k]: the bound left if the k largest are redone
    needed = (rest > margin[:, None] / 2).sum(-1)
    chosen = torch.arange(ROW_CHUNKS, device=value.device)[None, :] < needed[:, None]
    return torch.zeros_like(chosen).scatter_(1, order, chosen) & (chunk_bound > 0)


def tier2(case: Case, ops: Operands, elements: dict[str, np.ndarray], precise: bool,
           prior: dict[str, list[torch.Tensor]] | None = None
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list[torch.Tensor]]]:
    """Tier 2 for ``elements`` (dq rows of (bi, hi, gi, i, c), dk/dv rows of (bi, hi, j, c)).

    dK/dV terms are kept per chunk of rows ([E, ROW_CHUNKS]: hi, lo, first-order bound, u² coefficient);
    with ``prior`` (the first pass's chunks of these elements) only the chunks :func:`_select_chunks`
    picks are recomputed and the others kept. Returns per kind the float32 values and the decided mask,
    and the dK/dV chunks."""
    dev = ops.q.device
    _, hkv, g, sq, d = ops.q.shape
    eq, ek, ev = elements["dq"], elements["dk"], elements["dv"]
    sel = {name: (torch.ones(len(elements[name]), ROW_CHUNKS, dtype=torch.bool, device=dev) if prior is None
                  else _select_chunks(case, name, prior[name])) for name in ("dk", "dv")}
    rows = _rows_needed(case, ops, elements, {name: x.cpu().numpy() for name, x in sel.items()})
    # Accumulators per element (dQ) or per element and chunk (dK, dV): value (hi, lo), first-order
    # bound, and the coefficient of the u² terms.
    state = {"dq": [torch.zeros(len(eq), dtype=torch.float64, device=dev) for _ in range(4)]}
    for name in ("dk", "dv"):
        state[name] = [torch.zeros(len(elements[name]), ROW_CHUNKS, dtype=torch.float64, device=dev)
                       for _ in range(4)]
    dq_code = _row_code(eq[:, :4], hkv, g, sq) if len(eq) else np.zeros(0, dtype=np.int64)
    by_head = {name: _group_by_head(elements[name], hkv) for name in ("dk", "dv")}
    limit = grad_tier2_limit(dev)
    # The sink logit of each (KV head, group member) row set: [hkv, g].
    sinks = None if case.sinks is None else torch.tensor(case.sinks, dtype=torch.float64).reshape(hkv, g)
    for batch in _row_batches(case, ops.kpm, rows, limit):
        heads = len(batch)
        r_max = max(len(seg.rows) for seg in batch)
        n = max(seg.kmax for seg in batch)
        bi_t = torch.as_tensor([seg.bi for seg in batch], device=dev)
        hi_t = torch.as_tensor([seg.hi for seg in batch], device=dev)
        kb, vb = ops.k[bi_t, hi_t, :n], ops.v[bi_t, hi_t, :n]
        sink = None if sinks is None else torch.zeros(heads, r_max, 1, dtype=torch.float64)
        qb = ops.q.new_zeros(heads, r_max, d)
        dob = ops.q.new_zeros(heads, r_max, d)
        see = torch.zeros(heads, r_max, n, dtype=torch.bool)
        act = np.zeros((heads, r_max), dtype=bool)
        one = np.zeros((heads, r_max), dtype=bool)
        codes, flat = [], []
        for j, seg in enumerate(batch):
            idx = tuple(torch.as_tensor(seg.rows[:, c]) for c in range(4))
            qb[j, :len(seg.rows)] = ops.q[idx]
            dob[j, :len(seg.rows)] = ops.do[idx]
            see[j, :len(seg.rows), :seg.kmax] = seg.see
            if sink is not None and sinks is not None:
                sink[j, :len(seg.rows), 0] = sinks[seg.hi, torch.as_tensor(seg.rows[:, 2])]
            at = tuple(seg.rows.T)
            act[j, :len(seg.rows)] = ops.active[at]
            one[j, :len(seg.rows)] = ops.single[at]
            codes.append(_row_code(seg.rows, hkv, g, sq))
            flat.append(j * r_max + np.arange(len(seg.rows)))
        sink = None if sink is None else sink.to(dev)
        rp = _dd_rows(qb, kb, vb, dob, see.to(dev), torch.as_tensor(act, device=dev),
                      torch.as_tensor(one, device=dev), case, precise, sink)
        if sink is not None:  # dQ's contraction runs over the sink's column too, whose key is 0
            kb = torch.cat([kb, torch.zeros_like(kb[:, :1])], 1)
        if len(eq):
            _tier2_dq(rp, kb, eq, dq_code, np.concatenate(codes), np.concatenate(flat), r_max, state["dq"])
        for j, seg in enumerate(batch):
            hc = seg.bi * hkv + seg.hi
            chunk = _row_chunk(seg.rows[:, 2], seg.rows[:, 3], g, sq)
            for name, x, which in (("dk", qb, ek), ("dv", dob, ev)):
                ids = by_head[name].get(hc)
                if ids is None:
                    continue
                ids = ids[which[ids, 2] < seg.kmax]  # the segment's rows see no later key
                _tier2_column(rp, name, j, x, which[ids, 2], which[ids, 3], ids, chunk, sel[name], state[name])
    values, decided, chunks = {}, {}, {}
    sh, sl = scale_dd(case)
    for name in WHICH:
        hi, lo, bnd, terms = state[name]
        if name != "dq":
            if prior is not None:  # the chunks not redone keep the first pass's terms
                hi, lo, bnd, terms = (torch.where(sel[name], x, y) for x, y in zip(state[name], prior[name]))
            chunks[name] = [hi, lo, bnd, terms]
            h, lw, levels = dd_sum(hi, lo)
            hi, lo = h, lw
            bnd = chunks[name][2].sum(-1)
            terms = chunks[name][3].sum(-1) + (3 * levels + 4) * chunks[name][0].abs().sum(-1)
        if name != "dv":  # the scale, as a double-double: relative error ≤ 16u² with its own rounding
            hi, lo = dd_mul(hi, lo, torch.full_like(hi, sh), torch.full_like(hi, sl))
            bnd = abs(case.effective_scale) * bnd
            terms = abs(case.effective_scale) * terms
        bound = 2 * (bnd + 16 * U * U * (hi.abs() + terms)) * (1 + 2.0**-20)
        values[name], decided[name] = _decide_dd(hi, lo, bound)
    return values, decided, chunks


def _row_batches(case: Case, kpm: torch.Tensor | None, rows: np.ndarray, limit: int) -> Iterator[list[Segment]]:
    """The (bi, hi, gi, i) ``rows`` (sorted) as batches of segments, each segment rows of one KV head
    with their visible keys (at most ``limit`` row × key pairs), each batch padded to its largest
    segment: segments of similar size go together (largest first) so that padding stays below half,
    and a batch holds at most ``limit`` padded pairs."""
    segments = []
    for bh in np.unique(rows[:, :2], axis=0):
        bi, hi = int(bh[0]), int(bh[1])
        head = rows[(rows[:, 0] == bi) & (rows[:, 1] == hi)]
        kpm_b = None if kpm is None else kpm[bi:bi + 1]
        # Pieces of at most an eighth of the head's rows (and the visibility mask computed at once bounded):
        # a causal piece pads its rows only to its own last key, ~1/8 of the triangle wasted instead of 1/2.
        per = max(1, min(limit // case.skv, max(32, -(-len(head) // 8))))
        for r0 in range(0, len(head), per):
            part = head[r0:r0 + per]
            see = visible(case, kpm_b, part[:, 3])[0]
            kmax = int(see.any(0).nonzero().max()) + 1  # every row needed sees a key
            step = max(1, limit // kmax)
            for s0 in range(0, len(part), step):
                segments.append(Segment(bi, hi, part[s0:s0 + step], see[s0:s0 + step, :kmax], kmax))
    segments.sort(key=lambda seg: (-len(seg.rows), -seg.kmax))
    batch: list[Segment] = []
    for seg in segments:
        if batch:
            r_max, n_max = len(batch[0].rows), max(s.kmax for s in batch)
            fits = (len(batch) + 1) * r_max * max(n_max, seg.kmax) <= limit
            if not fits or 2 * len(seg.rows) < r_max or 2 * seg.kmax < n_max:
                yield batch
                batch = []
        batch.append(seg)
    if batch:
        yield batch


def _row_code(rows: np.ndarray, hkv: int, g: int, sq: int) -> np.ndarray:
    """One integer per (bi, hi, gi, i) row."""
    rows = rows.astype(np.int64)
    return ((rows[:, 0] * hkv + rows[:, 1]) * g + rows[:, 2]) * sq + rows[:, 3]


def _group_by_head(elements: np.ndarray, hkv: int) -> dict[int, np.ndarray]:
    """Element indices per KV head code bi·hkv + hi."""
    if not len(elements):
        return {}
    hc = elements[:, 0] * hkv + elements[:, 1]
    order = np.argsort(hc, kind="stable")
    heads, starts = np.unique(hc[order], return_index=True)
    return {int(h): order[s:e] for h, s, e in zip(heads, starts, [*starts[1:], len(order)])}


def _rows_needed(case: Case, ops: Operands, elements: dict[str, np.ndarray],
                 sel: dict[str, np.ndarray]) -> np.ndarray:
    """The (bi, hi, gi, i) rows, sorted, whose softmax the elements need: the rows of undecided dQ
    elements, and every active (dK) or seen (dV) row that sees a key of an element, in a chunk
    ``sel`` ([E, ROW_CHUNKS]) selects for it."""
    _, _, g, sq, _ = ops.q.shape
    parts = [elements["dq"][:, :4]]
    span = max(1, (1 << 22) // case.skv)  # rows whose visibility is computed at once
    for name, mask in (("dk", ops.active), ("dv", ops.seen)):
        el = elements[name]
        if not len(el):
            continue
        for bh in np.unique(el[:, :2], axis=0):
            bi, hi = int(bh[0]), int(bh[1])
            mine = (el[:, 0] == bi) & (el[:, 1] == hi)
            keys, inverse = np.unique(el[mine, 2], return_inverse=True)
            chunks = np.zeros((len(keys), ROW_CHUNKS), dtype=bool)
            np.logical_or.at(chunks, inverse, sel[name][mine])  # per key: the chunks any element wants
            kpm = None if ops.kpm is None else ops.kpm[bi:bi + 1]
            for i0 in range(0, sq, span):
                i = np.arange(i0, min(sq, i0 + span))
                sees = visible(case, kpm, slice(i0, i0 + len(i)))[0][:, keys].numpy()  # [rows, keys]
                for gi in range(g):
                    wanted = chunks[:, _row_chunk(np.full(len(i), gi), i, g, sq)].T  # [rows, keys]
                    take = np.flatnonzero(mask[bi, hi, gi, i] & (sees & wanted).any(-1))
                    parts.append(np.stack([np.full(len(take), bi), np.full(len(take), hi),
                                           np.full(len(take), gi), i[take]], axis=1))
    rows = np.concatenate(parts).astype(np.int64)
    if not len(rows):
        return rows.reshape(0, 4)
    # Unique rows in (bi, hi, gi, i) order, through their codes: one integer sort rather than numpy's
    # sort of the rows as records (0.9 s of a 4k-context gradient golden's tier 2 on the H200's host).
    hkv = ops.q.shape[1]
    code = np.unique(_row_code(rows, hkv, g, sq))
    code, i = np.divmod(code, sq)
    code, gi = np.divmod(code, g)
    bi, hi = np.divmod(code, hkv)
    return np.stack([bi, hi, gi, i], axis=1)


def _dd_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, see: torch.Tensor,
             active: torch.Tensor, single: torch.Tensor, case: Case, precise: bool,
             sink: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Tier 2's rows: q, do [H, R, D], k, v [H, n, D], see [H, R, n], active/single [H, R]. Returns
    double-double P and dS ([H, R, n] hi and lo parts) and bounds on their absolute errors.

    With ``sink`` [H, R, 1] (the rows' sink logits) the sink is one more key after the real ones, of
    value 0 (so dP = 0 there, exactly) and key 0: its weight joins l, Σ over all n + 1 columns of P is 1
    and of dS is 0, as the reference shifts need; the returned tensors have n + 1 columns. Soft-capped,
    the returned dS is that of the scaled dots, dS·c with c = 1 − t², t = s/cap from the double-double
    capped logits s (the sink's column has c = 1), and ``shift`` is False: Σ_j dS_j·c_j ≠ 0, so dQ's
    contraction cannot subtract a reference key."""
    u2 = U * U
    logits = dd_logits(q, k, case)
    e_h, e_l, eps = dd_weights(q, k, see, case, precise, sink, logits)
    if sink is not None:
        see = torch.cat([see, torch.ones_like(see[..., :1])], -1)
        v = torch.cat([v, torch.zeros_like(v[..., :1, :])], -2)
    l_h, l_l, lev_l = dd_sum(e_h, e_l)
    l_h, l_l = l_h[..., None], l_l[..., None]
    has_key = l_h > 0
    l_h = torch.where(has_key, l_h, torch.ones_like(l_h))
    l_l = torch.where(has_key, l_l, torch.zeros_like(l_l))
    p_h = e_h / l_h
    r_h, r_l = two_prod(p_h, l_h.expand_as(p_h))
    p_l = ((e_h - r_h) - r_l + e_l - p_h * l_l) / l_h  # one Newton step: the quotient as a double-double
    one = single[..., None] & see
    p_h = torch.where(one, torch.ones_like(p_h), p_h)  # a row's only key: P = 1 exactly
    p_l = torch.where(one, torch.zeros_like(p_l), p_l)
    dp_h, dp_l, dp_err = dd_dots(do, v.transpose(-1, -2).contiguous())
    zero = torch.zeros_like(p_h)
    # As in tier 1: dP − D = (dP − dP_ref) − Σ_i P_i (dP_i − dP_ref), ref the row's largest weight.
    ref = e_h.argmax(-1, keepdim=True)
    not_ref = torch.ones_like(p_h).scatter_(-1, ref, 0.0)
    ref_h = dp_h.gather(-1, ref)
    y_h, y_l = dd_add(dp_h, dp_l, -ref_h.expand_as(dp_h), -dp_l.gather(-1, ref).expand_as(dp_l))
    # 0 at ref itself (x − x is exact); elsewhere both dot errors and the addition's.
    err_y = (dp_err + dp_err.gather(-1, ref) + 8 * u2 * (dp_h.abs() + ref_h.abs())) * not_ref
    t_h, t_l = dd_mul(p_h, p_l, y_h, y_l)
    t_h, t_l = torch.where(see, t_h, zero), torch.where(see, t_l, zero)
    d_h, d_l, lev_d = dd_sum(t_h, t_l)  # D − dP_ref
    d_h, d_l = d_h[..., None], d_l[..., None]
    x_h, x_l = dd_add(y_h, y_l, -d_h.expand_as(y_h), -d_l.expand_as(y_l))
    ds_h, ds_l = dd_mul(p_h, p_l, x_h, x_l)
    act = active[..., None] & see
    ds_h, ds_l = torch.where(act, ds_h, zero), torch.where(act, ds_l, zero)
    # Bounds (module docstring, with eps for u·h): l's sum, the division and each double-double operation
    # add relative errors of a few u² (taken generously: they are ~2^-100, far below eps).
    pe = p_h * eps
    lam = pe.sum(-1, keepdim=True) + (3 * lev_l + 8) * u2
    rel_p = eps + lam + 16 * u2
    ax, ay, ad = x_h.abs(), y_h.abs(), d_h.abs()
    delta_d = ((pe * ax).sum(-1, keepdim=True) + (3 * lev_l + 8) * u2 * ad + (p_h * err_y).sum(-1, keepdim=True)
               + (3 * lev_d + 32) * u2 * (p_h * ay).sum(-1, keepdim=True)
               + TINY * (ay + err_y).sum(-1, keepdim=True))
    err_s = p_h * ((rel_p + 32 * u2) * ax + err_y + delta_d + 16 * u2 * (ay + ad)) + TINY * ax
    err_s = torch.where(act, err_s, zero)
    err_p = torch.where(see & ~one, p_h * rel_p + TINY, zero)
    if case.softcap is not None:
        ds_h, ds_l, err_s = _times_cap_derivative(ds_h, ds_l, err_s, logits, case.softcap, sink is not None)
        ds_h, ds_l, err_s = (torch.where(act, x, zero) for x in (ds_h, ds_l, err_s))
    return {"ds_h": ds_h, "ds_l": ds_l, "ds_err": err_s, "p_h": p_h, "p_l": p_l, "p_err": err_p,
            "ref": ref.squeeze(-1), "shift": torch.tensor(case.softcap is None)}


def _times_cap_derivative(ds_h: torch.Tensor, ds_l: torch.Tensor, err_s: torch.Tensor,
                          logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor], cap: float,
                          with_sink: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dS of the capped logits times c = 1 − t² (t = s/cap, s the capped logit), as a double-double, with
    its error bound: |Δt| ≤ δs/|cap| + 8u²|t| for the logit's bound δs (the scale's double-double rounding
    4u²·|s| included), |Δc| ≤ (2|t| + |Δt|)·|Δt| + 16u²·(1 + t²) (the square and the subtraction), and
    the product adds |ΔdS|·(|c| + |Δc|) + |dS|·|Δc| + 8u²·|dS·c|. A sink's column has c = 1 exactly."""
    u2 = U * U
    s_h, s_l, s_err = logits
    capt = torch.full_like(s_h, cap)
    t_h, t_l = dd_div(s_h, s_l, capt, torch.zeros_like(capt))
    tt_h, tt_l = dd_mul(t_h, t_l, t_h, t_l)
    c_h, c_l = dd_add(torch.ones_like(tt_h), torch.zeros_like(tt_l), -tt_h, -tt_l)
    at = t_h.abs()
    dt = (s_err + 4 * u2 * s_h.abs()) / abs(cap) + 8 * u2 * at
    dc = (2 * at + dt) * dt + 16 * u2 * (1 + at * at)
    if with_sink:
        one = torch.ones_like(c_h[..., :1])
        c_h, c_l = torch.cat([c_h, one], -1), torch.cat([c_l, 0 * one], -1)
        dc = torch.cat([dc, 0 * one], -1)
    x_h, x_l = dd_mul(ds_h, ds_l, c_h, c_l)
    err = err_s * (c_h.abs() + dc) + ds_h.abs() * dc + 8 * u2 * (ds_h * c_h).abs()
    return x_h, x_l, err


def _dd_dot_rows(a_h: torch.Tensor, a_l: torch.Tensor, a_err: torch.Tensor, x: torch.Tensor,
                 x_l: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Σ_m (a_h + a_l)·(x + x_l) over the last axis as a double-double (``x`` exact, or the double-double
    x + x_l): exact or double-double products, :func:`dd_sum`. Returns (hi, lo, first-order bound
    from ``a_err``, bound coefficient of the u² roundings)."""
    if x_l is None:
        ph, pl = two_prod(a_h, x)
        pl = pl + a_l * x  # ≤ u·|a_l·x| ≤ u²·|a·x|
        ax = x.abs()
    else:
        ph, pl = dd_mul(a_h, a_l, x, x_l)  # ≤ 8u²·|a·x|
        ax = x.abs() + x_l.abs()
    hi, lo, levels = dd_sum(ph, pl)
    return hi, lo, (a_err * ax).sum(-1), (3 * levels + 8) * (a_h.abs() * ax).sum(-1)


def _accumulate(state: list[torch.Tensor], at: Any, hi: torch.Tensor, lo: torch.Tensor,
                first: torch.Tensor, second: torch.Tensor) -> None:
    """Add a partial double-double sum to the accumulators at index ``at`` (distinct elements): the
    addition's own error ≤ 4u²·(|acc| + |part|) joins the u² coefficient."""
    acc_h, acc_l, bnd, terms = state
    old = acc_h[at].abs() + hi.abs()
    acc_h[at], acc_l[at] = dd_add(acc_h[at], acc_l[at], hi, lo)
    bnd[at] += first
    terms[at] += second + 4 * old


def _tier2_dq(rp: dict[str, torch.Tensor], k: torch.Tensor, eq: np.ndarray, dq_code: np.ndarray,
              codes: np.ndarray, flat: np.ndarray, rows: int, state: list[torch.Tensor]) -> None:
    """dQ elements whose rows are in this row pass: Σ_j dS_j·k_jc over the row's keys."""
    order = np.argsort(codes)
    pos = np.searchsorted(codes[order], dq_code)
    pos = np.minimum(pos, len(codes) - 1)
    hit = codes[order][pos] == dq_code
    if not hit.any():
        return
    ids = np.flatnonzero(hit)
    local = flat[order][pos[hit]]  # flat row in [H·R]
    n = k.shape[1]
    ds_h, ds_l, ds_err = (rp[x].reshape(-1, n) for x in ("ds_h", "ds_l", "ds_err"))
    ref = rp["ref"].reshape(-1)
    dev = k.device
    per = max(1, grad_tier2_limit(dev) // n)
    for e0 in range(0, len(ids), per):
        li = torch.as_tensor(local[e0:e0 + per], device=dev)
        cols = torch.as_tensor(eq[ids[e0:e0 + per], 4], device=dev)
        x = k[li // rows, :, cols]  # [E, n]: each element's key column
        # Σ_j dS_j = 0, so dQ_c = scale·Σ_j dS_j (k_jc − k_ref,c) with ref the row's reference key: the
        # dominant key's large dS error and any keys sharing its k value drop out (exact differences).
        if bool(rp["shift"]):
            kappa = x.gather(1, ref[li][:, None]).expand_as(x)
            x_h, x_l = two_sum(x, -kappa)
            hi, lo, first, second = _dd_dot_rows(ds_h[li], ds_l[li], ds_err[li], x_h, x_l)
        else:  # soft-capped: Σ_j dS_j·c_j ≠ 0, the plain contraction
            hi, lo, first, second = _dd_dot_rows(ds_h[li], ds_l[li], ds_err[li], x)
        _accumulate(state, torch.as_tensor(ids[e0:e0 + per], device=dev), hi, lo, first, second)


def _tier2_column(rp: dict[str, torch.Tensor], name: str, head: int, x: torch.Tensor, keys: np.ndarray,
                  cols: np.ndarray, ids: np.ndarray, chunk: np.ndarray, sel: torch.Tensor,
                  state: list[torch.Tensor]) -> None:
    """dK (Σ_i dS_ij·q_ic) or dV (Σ_i P_ij·dO_ic) elements of one segment ``head`` of the row pass:
    this segment's rows' part of the sum over every row that sees the key, chunk by chunk of rows
    (``chunk`` per row of the segment; only the chunks ``sel`` [E, ROW_CHUNKS] picks per element)."""
    if not len(ids):
        return
    a = ("ds_h", "ds_l", "ds_err") if name == "dk" else ("p_h", "p_l", "p_err")
    dev = x.device
    cuts = np.flatnonzero(np.diff(chunk)) + 1  # the segment's rows are sorted: chunks are runs
    for r0, r1 in zip([0, *cuts], [*cuts, len(chunk)]):
        c = int(chunk[r0])
        picked = sel[torch.as_tensor(ids, device=dev), c].cpu().numpy()
        mine, at_keys, at_cols = ids[picked], keys[picked], cols[picked]
        per = max(1, grad_tier2_limit(dev) // (r1 - r0))
        for e0 in range(0, len(mine), per):
            kt = torch.as_tensor(at_keys[e0:e0 + per], device=dev)
            ct = torch.as_tensor(at_cols[e0:e0 + per], device=dev)
            a_h, a_l, a_err = (rp[t][head][r0:r1, kt].T for t in a)  # [E, rows]: the key's column
            hi, lo, first, second = _dd_dot_rows(a_h, a_l, a_err, x[head][r0:r1, ct].T)
            _accumulate(state, (torch.as_tensor(mine[e0:e0 + per], device=dev), c), hi, lo, first, second)


def _decide_dd(hi: torch.Tensor, lo: torch.Tensor, bound: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float32 rounding of the double-doubles hi + lo known to ±``bound``: (values, decided)."""
    o32, below, above, mid_lo, mid_hi = float32_neighbours(hi)
    # hi − mid is exact when the two are close (Sterbenz); then lo is added.
    inside = ((hi - mid_lo) + lo > bound) & ((mid_hi - hi) - lo > bound)
    narrow = bound < (mid_hi - mid_lo) / 4  # the neighbour's far boundary is out of reach too
    low = ((hi - mid_lo) + lo < -bound) & narrow
    high = ((mid_hi - hi) - lo < -bound) & narrow
    value = torch.where(inside, o32, torch.where(low, below, above))
    sure_sign = hi.abs() * (1 - 2.0**-50) > bound  # |lo| ≤ u·|hi|: the sign of hi is the value's
    decided = (inside | low | high) & ((value != 0) | sure_sign)
    return value.cpu().numpy(), decided.cpu().numpy()
