"""Tier 1 of the exact backward: float64 gradients of a block of query rows with a rigorous
first-order bound of their error, the operands every tier shares, and the naive same-dtype
backward the goldens store the error of (the derivation is in :mod:`conformance.reference.gradient`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from conformance.reference.double_double import (
    U,
)
from conformance.reference.exact_dots import NO_BITS, inexact_dots, lowest_bit_exponents
from conformance.reference.float64 import (
    SOFTCAP_LOGIT_TERMS,
    blocked_sums,
    naive_probs,
    pairwise_sum,
    round_like_dtype,
    sum_roundings,
    tier1_decision,
    with_sink_key,
)
from conformance.spec.case import Case

# Score-matrix elements per float64 block (about 25 float64 temporaries of this size: ~200 MiB on CPU).
GRAD_BLOCK_ELEMENTS = 1 << 20


CUDA_GRAD_BLOCK_ELEMENTS = 1 << 24


TINY = 2.0**-1000  # absolute error allowed for each weight that underflows (subnormal or flushed exp)


WHICH = ("dq", "dk", "dv")


@dataclass
class Operands:
    """The case's float64 operands on the generation device and its structural masks (CPU numpy)."""

    q: torch.Tensor  # [b, hkv, g, sq, d]
    do: torch.Tensor  # [b, hkv, g, sq, d]
    k: torch.Tensor  # [b, hkv, skv, d]
    v: torch.Tensor  # [b, hkv, skv, d]
    kpm: torch.Tensor | None
    active: np.ndarray  # bool [b, hkv, g, sq]: rows whose dS may be non-zero
    seen: np.ndarray  # bool [b, hkv, g, sq]: rows that see a key and have dO ≠ 0
    single: np.ndarray  # bool [b, hkv, g, sq]: rows that see exactly one key (P = 1)


def decide_float64(value: torch.Tensor | np.ndarray, bound: torch.Tensor | np.ndarray,
                   zero: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 values and the undecided mask: an element is final when its float64 value is farther
    than ``bound`` from both rounding boundaries and, if it rounds to zero, its sign is certain;
    ``zero`` marks the structural zeros (+0.0, exact). Runs on the tensors' device (numpy arrays: on
    the CPU); only the float32 values and the mask come back."""
    value, bound = torch.as_tensor(value), torch.as_tensor(bound)
    zero = torch.as_tensor(np.ascontiguousarray(zero)) if isinstance(zero, np.ndarray) else zero
    v32, open_ = tier1_decision(value, bound)
    decided = ~open_ & ((v32 != 0) | (value.abs() > bound))
    zero = zero.to(value.device).expand_as(value)
    v32 = torch.where(zero, torch.zeros_like(v32), v32)
    return v32.cpu().numpy(), (~(decided | zero)).cpu().numpy()


def logits64(dots: torch.Tensor, scale: float, vis: torch.Tensor, all_visible: bool) -> torch.Tensor:
    """Tier 1's logits: scaled dot products, −inf where a key is not visible (in place on ``dots``'s copy)."""
    s = dots * scale
    return s if all_visible else s.masked_fill_(~vis, -math.inf)


def backward_block(q: torch.Tensor, do: torch.Tensor, k: torch.Tensor, kabs: torch.Tensor, kshift: torch.Tensor,
                   v: torch.Tensor, vabs: torch.Tensor, ones: torch.Tensor, vis: torch.Tensor, active: torch.Tensor,
                   single: torch.Tensor, case: Case, sink: torch.Tensor | None = None,
                   k_bits: torch.Tensor | None = None, v_bits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Float64 backward of one block of rows with its error bounds (module docstring, tier 1).

    q, do [b, h, r, d] (r = g·rows: a KV head's group), k/v [b, h, n, d] with ``kabs``/``vabs`` their
    absolute values, ``kshift`` k less a per-column constant (exact; dQ is contracted with it),
    ``ones`` [n, 1], vis [b, 1, r, n], active/single [b, h|1, r]; ``sink`` [1, h, r, 1] the rows' sink
    logits (one more key of value 0, after the real ones; ``kshift`` is then k itself). Returns dQ of the
    rows (with bound, error scale and naive model) and this block's contributions to unscaled dK, to dV,
    to their bounds (without the final 4u·|value| term) and scales, and to the per-head naive dK/dV.

    Soft-capped logits s = cap·tanh(x/cap) (x the scaled dot) multiply dS by c = 1 − tanh²(x/cap)
    before the contractions; c is off by Δc ≤ 2|t|·Δt + 2u with Δt ≤ ((d+4)·u·w)/cap + 4u (the
    argument's error, the division, tanh's 4 ulp), and the product adds u·|dS·c|.

    ``k_bits``/``v_bits`` [b, h, 1, n], the keys' and values' :func:`~conformance.reference.exact_dots.
    lowest_bit_exponents`: with them the d·u of the dot products Q·Kᵀ and dO·Vᵀ counts only where
    :func:`~conformance.reference.exact_dots.inexact_dots` says they may round (as in the forward)."""
    d, n_real, r = q.shape[-1], k.shape[-2], q.shape[-2]
    scale = case.effective_scale
    naive_vis = vis
    all_visible = bool(vis.all())
    dots = q @ k.transpose(-1, -2)  # products are exact; only the sum rounds
    adot = q.abs() @ kabs.transpose(-1, -2)
    inexact = None if k_bits is None else inexact_dots(adot, lowest_bit_exponents(q), k_bits)
    w = abs(scale) * adot  # |scale|·Σ_d |q_d k_jd| ≥ |s_j|
    tanh_t = None
    if case.softcap is None:
        s = logits64(dots, scale, vis, all_visible)
    else:
        tanh_t = torch.tanh(dots * scale / case.softcap)
        s = tanh_t * case.softcap
        s = s if all_visible else s.masked_fill_(~vis, -math.inf)
    if sink is not None:
        rows = (*q.shape[:-1], 1)
        vis, k, kabs, kshift, v, vabs = with_sink_key(sink, vis.expand(*q.shape[:-1], n_real), k, kabs, kshift, v,
                                                      vabs)
        ones = torch.cat([ones, torch.ones_like(ones[:1])], 0)
        s = torch.cat([s, sink.expand(rows)], -1)
        w = torch.cat([w, sink.abs().expand(rows)], -1)
        if inexact is not None:  # the sink's logit is given, and its value row is 0: dP = 0 exactly
            inexact = torch.cat([inexact, torch.zeros(rows, dtype=torch.bool, device=inexact.device)], -1)
        if v_bits is not None:
            v_bits = torch.cat([v_bits, torch.full((*v_bits.shape[:-1], 1), NO_BITS, dtype=v_bits.dtype,
                                                   device=v_bits.device)], -1)
        if tanh_t is not None:
            tanh_t = torch.cat([tanh_t, torch.zeros(rows, dtype=tanh_t.dtype, device=tanh_t.device)], -1)
    n = k.shape[-2]
    m = s.amax(-1, keepdim=True)
    has_key = torch.isfinite(m)
    m = torch.where(has_key, m, torch.zeros_like(m))
    p = torch.exp_(s.sub_(m))
    _, l_sum = blocked_sums(p, ones)
    kb_l = sum_roundings(n)  # one block of n < 64 terms: n − 1 additions
    p.div_(torch.where(has_key, l_sum, torch.ones_like(l_sum)))
    capped = SOFTCAP_LOGIT_TERMS if case.softcap is not None else 0
    # the logits' error / u: d·u·w_j of the dot product only where it may round
    lw = w * (d + 4 + capped) if inexact is None else w * (4 + capped) + (w * d).mul_(inexact)
    h = lw + (m.abs() + 4)  # the weights' relative error / u (forward's logit analysis)
    dp = do @ v.transpose(-1, -2)
    a = do.abs() @ vabs.transpose(-1, -2)  # ≥ |dP| and the scale of dP's rounding
    # dP_j's own rounding is ≤ d·u·a_j, and 0 where the dot product dO·v_j is exact
    a_round = a if v_bits is None else a * inexact_dots(a, lowest_bit_exponents(do), v_bits)
    # dP − D = (dP − dP_ref) − Σ_i P_i (dP_i − dP_ref) with ref the row's largest weight: when that key
    # dominates, D ≈ dP_ref and this form has no cancellation (and dP_ref's own error cancels).
    ref = p.argmax(-1, keepdim=True)
    not_ref = torch.ones_like(p).scatter_(-1, ref, 0.0)
    delta = dp - dp.gather(-1, ref)
    a2 = (a_round + a_round.gather(-1, ref)).mul_(not_ref)  # dP_j − dP_ref is off by ≤ d·u·(a_j + a_ref), 0 at ref
    _, dsum = blocked_sums(p * delta, ones)  # D − dP_ref
    kb_d = sum_roundings(n)
    diff = delta - dsum
    adiff = diff.abs()
    ds = torch.where(active[..., None], p * diff, torch.zeros_like(diff))
    # The contractions' blocked sums: over the keys (dQ) and over the rows (dK, dV).
    kb = max(sum_roundings(n), sum_roundings(r))
    ph = p * h
    lam = U * (ph.sum(-1, keepdim=True) + kb_l + 1)
    adelta = delta.abs()
    delta_d = (U * ((ph * adiff).sum(-1, keepdim=True) + (kb_l + 1) * dsum.abs()
                    + (kb_d + 4) * (p * adelta).sum(-1, keepdim=True) + d * (p * a2).sum(-1, keepdim=True))
               + TINY * (a + a.gather(-1, ref)).sum(-1, keepdim=True))
    visf = vis.to(torch.float64)
    gerr = (p * (adiff * (U * (h + kb + 5) + lam) + U * (d * a2 + adelta) + delta_d)
            + TINY * adiff * visf)
    gerr = torch.where(active[..., None], gerr, torch.zeros_like(gerr))
    if tanh_t is not None:  # dS of the capped logits times c = 1 − t² gives dS of the scaled dots
        c = 1 - tanh_t * tanh_t
        dc = U * (2 * (lw / case.softcap + 4) + 2)
        gerr = gerr * c + (p * adiff + gerr) * dc + U * ds.abs() * c
        ds = ds * c
        gerr = torch.where(active[..., None], gerr, torch.zeros_like(gerr))
    herr = p * (U * (h + kb + 2) + lam) + TINY * visf
    herr = torch.where(single[..., None], torch.zeros_like(herr), herr)  # P = 1 exactly
    dsum = dsum + dp.gather(-1, ref)  # D itself, for the error scale
    yscale = p * (dp.abs() + dsum.abs()) * (1 + w)
    wbar = (p * w).sum(-1, keepdim=True)
    yv = p * (1 + w + wbar)
    del ph, h, a, a_round, a2, not_ref, delta, adelta

    res: dict[str, torch.Tensor] = {}
    _, dq_u = blocked_sums(ds, kshift)
    dq = dq_u * scale
    res["dq"] = dq
    res["dq_bound"] = 2 * (abs(scale) * (gerr @ kshift.abs()) + 4 * U * dq.abs())
    res["dq_scale"] = abs(scale) * (yscale @ kabs).amax(-1)
    _, res["dk"] = blocked_sums(ds.transpose(-1, -2), q)
    gyk = torch.cat([gerr, yscale], dim=-1).transpose(-1, -2) @ q.abs()
    res["dk_bound"], res["dk_scale"] = gyk[..., :n, :], gyk[..., n:, :]
    _, res["dv"] = blocked_sums(p.transpose(-1, -2), do)
    hyv = torch.cat([herr, yv], dim=-1).transpose(-1, -2) @ do.abs()
    res["dv_bound"], res["dv_scale"] = hyv[..., :n, :], hyv[..., n:, :]
    del gerr, yscale, herr, yv, gyk, hyv

    # The naive same-dtype backward, modelled stage by stage (the real keys only).
    dtype = case.dtype
    probs, dcap = naive_probs(dots, None if bool(naive_vis.all()) else naive_vis, scale, dtype, case.softcap, sink)
    dprobs = round_like_dtype(dp[..., :n_real], dtype)
    # rowsum(dprobs ∘ probs) cancels against dprobs, so its last float64 bit can move the rounded
    # dscores: summed in a fixed order (the products are exact), the model is the same on every device.
    dscores = round_like_dtype(probs * (dprobs - pairwise_sum(dprobs * probs)), dtype)
    if dcap is not None:
        dscores = round_like_dtype(dscores * dcap, dtype)
    gd = round_like_dtype(dscores.mul_(scale), dtype)
    res["dq_naive"] = round_like_dtype(gd @ k[..., :n_real, :], dtype)
    per_head = (*q.shape[:2], case.group, r // case.group)  # the block's rows, query head by query head
    res["dk_naive"] = gd.reshape(*per_head, n_real).transpose(-1, -2) @ q.reshape(*per_head, d)
    res["dv_naive"] = probs.reshape(*per_head, n_real).transpose(-1, -2) @ do.reshape(*per_head, d)
    if sink is not None:  # the sink's key row of dK and dV is not a gradient of the op's inputs
        for name in ("dk", "dk_bound", "dk_scale", "dv", "dv_bound", "dv_scale"):
            res[name] = res[name][..., :n_real, :]
    return res
