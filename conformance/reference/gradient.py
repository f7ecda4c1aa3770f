"""The exact backward: CONTRACT.md's attention gradients, every element correctly rounded once to float32.

For an upstream gradient dO (the shape of out), with the exact real softmax P = softmax(scale·q·kᵀ + mask)
and the exact real output O = P·v (never rounded):

    dV = Pᵀ·dO,   dP = dO·vᵀ,   D = rowsum(dO ∘ O) = Σ_j P_ij·dP_ij,   dS = P ∘ (dP − D),
    dQ = scale·dS·k,   dK = scale·dSᵀ·q.

With GQA the g query heads of a KV head are one row set (q reshaped to [b, hkv, g·sq, d], as the
forward does), so dK and dV of a KV head sum their group. The KV-cache op's k/v already hold cache
then new keys: dk_cache = dk[:, :, :s_past], dk_new = dk[:, :, s_past:].

**Structural zeros.** A row that sees no key, or exactly one (P = 1, D = dP: dS ≡ 0), or whose dO is 0,
or any row when scale = 0, has dS ≡ 0: its dQ row is +0.0 and it adds nothing to dK. A key that no such
"active" row sees has dK = +0.0; a key that no row with dO ≠ 0 sees has dV = +0.0. These elements are
exact by construction and never reach the refinement tiers.

The same three tiers as the forward (:mod:`conformance.reference.compute`) decide every other element:

1. **float64** (torch, blocked over query rows; dK/dV accumulate over the blocks with TwoSum). The bound
   is rigorous to first order, ×2 for safety. With u = 2^-53, h_j = (d+4)·w_j + |m| + 4 (the forward's
   logit error: w_j = |scale|·Σ_d|q_d k_jd|, m the row maximum) each weight exp(s_j − m) has relative
   error η_j ≤ u·h_j, the blocked row sum l a relative error σ_l ≤ (kb_l+1)·u, so P_j has relative error
   η_j − λ + δ_j with λ = Σ_i P_i η_i + σ_l (|λ| ≤ λ̄ = u·(Σ_i P_i h_i + kb_l + 1)) and |δ_j| ≤ u; dP_j
   (products exact, d additions) is off by ≤ d·u·a_j, a_j = Σ_c|dO_c||v_jc|. The cancellation in
   dP_j − D is taken apart instead of bounded by |dP|: with r the row's largest weight (any key would
   do, as Σ_i P_i = 1), dP_j − D = δ_j − D' where δ_j = dP_j − dP_r (off by ≤ d·u·(a_j + a_r) =: A_j,
   0 at r) and D' = Σ_i P_i δ_i = D − dP_r; when key r dominates, D' is as small as the exact result.
   Since λ is the weighted mean of the η_i (plus σ_l), Σ_i P_i(η_i − λ)δ_i = Σ_i P_i η_i (δ_i − D') − σ_l D',
   so (kb_D the block of D's blocked sum)

       |δD'| ≤ u·[Σ_i P_i h_i |dP_i − D| + (kb_l+1)|D'| + (kb_D+4)·Σ_i P_i|δ_i|] + Σ_i P_i A_i,

   and every dS_j = P_j·(dP_j − D) is off by at most

       G_j = P_j·[(u·(h_j + kb + 5) + λ̄)·|dP_j − D| + A_j + u·|δ_j| + |δD'|]

   (the P, subtraction, product roundings and the contraction's blocked sum, kb its block). Then
   |ΔdQ_c| ≤ 2·(|scale|·Σ_j G_j|k_jc| + 4u|dQ_c|), |ΔdK_jc| ≤ 2·(|scale|·Σ_i G_ij|q_ic| + 4u|dK_jc|) and
   |ΔdV_jc| ≤ 2·(Σ_i H_ij|dO_ic| + 2u|dV_jc|) with H_ij = P_ij·(u·(h_ij + kb + 2) + λ̄_i): extra matmuls of
   the error matrices with |k|, |q|, |dO|. Weights that underflow carry an absolute 2^-1000 instead.
   An element farther than its bound from both float32 rounding boundaries is final (a zero result
   also needs its sign certain: |value| > bound).
2. **double-double** (torch, vectorised over the rows of a batch of KV heads on the generation device,
   bounded working memory). Every row an undecided element needs gets its full softmax in double-double
   (``double_double.dd_weights``: Ozaki-sliced logits, then exp(x_hi)·(1 + x_lo), and in a second pass
   the double-double exp, relative error ≤ 2^-88), P = e/l with a Newton step, dP from ``dd_dots``,
   D' and dS by double-double products and sums (the same reference shift); dQ elements need their whole
   row, contracted against k_jc − k_rc (Σ_j dS_j = 0: the dominant key's error and keys sharing its k
   value drop out), dK/dV elements the whole column of dS/P (every row that sees the key); exact or
   double-double products and ``_dd_sum``. The bound has the same shape as tier 1 with eps_j (the
   weights' relative error) for u·h_j and u² terms for the double-double roundings. The first pass
   (cheap exp) works on every row an element needs; the second only on what the first left, and for
   dK/dV only on the chunks of rows (1/16 of a head) whose first-pass bounds stand in the way.
   Soft-capped, dS is multiplied by c = 1 − t² in double-double (t = s/cap from the capped logit, with
   the logit's error carried into c's) and dQ's contraction has no reference shift (Σ_j dS_j·c_j ≠ 0);
   a sink is one more key of value 0 and key 0 in every row.
3. **exact** (Python integers, fractions, ``mpmath.iv``): integer logits and dP; each row's keys are
   grouped by equal logit. By Lindemann–Weierstrass a row with a single group (all logits equal, e.g.
   scale 0: P = 1/n) contributes a rational number, one with several groups contributes 0 exactly (a
   formal identity of its group sums) or a transcendental number; a dQ element is algebraic exactly
   when the exponential polynomial of its numerator is a constant multiple of W² (checked formally). A
   rational (or zero) result is rounded exactly; otherwise intervals of doubling precision decide it
   (``exact.decide_by_intervals``). An interval that still contains 0 is refined further, so an
   undetected exact zero (only from contrived cancellation between rows) raises ArithmeticError naming
   the case and element instead of guessing the sign.

**Error scales** (float64, rounded up to 12 significant bits like the forward's): with w_ij the
forward's |scale|·Σ_d|q_id k_jd| and w̄_i = Σ_j P_ij w_ij,

    dq_error_scale[i] = max_c |scale|·Σ_j P_ij(|dP_ij| + |D_i|)(1 + w_ij)|k_jc|
    dk_error_scale[j] = max_c |scale|·Σ_i P_ij(|dP_ij| + |D_i|)(1 + w_ij)|q_ic|   (i: every row of the group)
    dv_error_scale[j] = max_c Σ_i P_ij(1 + w_ij + w̄_i)|dO_ic|

the magnitude of the terms an implementation sums, with the logits' sensitivity (the normalisation's
w̄ for dV). **Naive error**: max over the head dim of |naive − golden| for the autograd of the naive
same-dtype attention (scores = (q@kᵀ)·scale, masked_fill −inf, softmax, @v, K/V repeat_interleave),
modelled deterministically: each stage in float64, rounded to the case dtype where torch's naive path
rounds (the forward's probabilities; dprobs = dO@vᵀ; dscores = probs∘(dprobs − rowsum(dprobs∘probs));
·scale; dQ = dscores@k, dK = dscoresᵀ@q and dV = probsᵀ@dO per query head; the group sums). Rows and
keys that see nothing: 0.

**flops**: 10·D per (query row, visible key) pair, counted over all query heads: the five matmuls of
an attention backward (recomputed scores, dP, dV, dQ, dK), 2·D each.

Later variants go in one place each: visibility comes from :func:`conformance.spec.inputs.visible` only;
the logits are formed in :func:`~conformance.reference.gradient_float64.logits64` (tier 1),
:func:`~conformance.reference.double_double.dd_weights` (tier 2) and ``decide_by_intervals`` with
the exact rows of :mod:`conformance.reference.gradient_exact` (tier 3). A logit transform (soft-capping) changes
those and multiplies dS by its derivative before the contractions; an attention sink adds its weight to
each row's l (and nothing to D, having no value).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from conformance.reference.compute import (
    ERROR_SCALE_BITS,
    RefinementStats,
    round_up_significant,
    row_blocks,
    single_thread,
)
from conformance.reference.double_double import (
    U,
    two_sum,
)
from conformance.reference.exact_dots import lowest_bit_exponents
from conformance.reference.float64 import round_like_dtype
from conformance.reference.gradient_double_double import tier2
from conformance.reference.gradient_exact import exact_tier
from conformance.reference.gradient_float64 import (
    CUDA_GRAD_BLOCK_ELEMENTS,
    GRAD_BLOCK_ELEMENTS,
    WHICH,
    Operands,
    backward_block,
    decide_float64,
)
from conformance.spec.case import Case
from conformance.spec.inputs import CaseInputs, visible

GRAD_ALGORITHM = "exact-attention-backward/1"


@dataclass
class GradientGolden:
    dq: np.ndarray  # float32 [B, Hq, Sq, D], correctly rounded
    dk: np.ndarray  # float32 [B, Hkv, Skv, D]
    dv: np.ndarray  # float32 [B, Hkv, Skv, D]
    dq_error_scale: np.ndarray  # float64 [B, Hq, Sq]
    dk_error_scale: np.ndarray  # float64 [B, Hkv, Skv]
    dv_error_scale: np.ndarray  # float64 [B, Hkv, Skv]
    dq_naive_error: np.ndarray  # float64 [B, Hq, Sq]
    dk_naive_error: np.ndarray  # float64 [B, Hkv, Skv]
    dv_naive_error: np.ndarray  # float64 [B, Hkv, Skv]
    flops: int  # 10·D per (query row, visible key) pair
    stats: RefinementStats = field(default_factory=RefinementStats)  # dq, dk and dv elements per tier


def compute_gradient_reference(case: Case, inputs: CaseInputs, grad_out: torch.Tensor,
                               device: str | torch.device = "cpu") -> GradientGolden:
    """The exact gradients of ``case`` on ``inputs`` for the upstream gradient ``grad_out`` (see the
    module docstring): dQ [B, Hq, Sq, D], dK and dV [B, Hkv, Skv, D], every element the float32 nearest
    (ties to even) to the exact real value; per row/key error scales and naive errors in float64.

    ``grad_out`` has the shape of the output and finite values exactly representable in float32 (any
    of the case dtypes); otherwise ValueError. ArithmeticError if an element cannot be decided at 8192
    bits (only an exact zero or rounding boundary reached by cancellation between rows can do that).
    On CPU everything runs on one thread (the bits must not depend on the thread count); on CUDA
    the float64 and double-double tiers run on the GPU and give the same bits: device rounding only
    enters through the rigorous decisions.
    """
    shape = (case.batch, case.hq, case.sq, case.d)
    if tuple(grad_out.shape) != shape:
        raise ValueError(f"{case.id}: grad_out has shape {tuple(grad_out.shape)}, expected {shape}")
    g64 = grad_out.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(g64).all()) or not torch.equal(g64.to(torch.float32).to(torch.float64), g64):
        raise ValueError(f"{case.id}: grad_out must be finite and exactly representable in float32")
    for name in ("q", "k", "v"):
        if not bool(torch.isfinite(getattr(inputs, name)).all()):
            raise ValueError(f"{case.id}: input {name} is not finite")
    dev = torch.device(device)
    if dev.type == "cpu":
        with single_thread():
            return _compute(case, inputs, g64, dev)
    return _compute(case, inputs, g64, dev)


def _compute(case: Case, inputs: CaseInputs, g64: torch.Tensor, dev: torch.device) -> GradientGolden:
    b, hq, hkv, g, sq, skv, d = case.batch, case.hq, case.hkv, case.group, case.sq, case.skv, case.d
    scale = case.effective_scale
    q64 = inputs.q.to(dev, torch.float64).reshape(b, hkv, g, sq, d)
    do64 = g64.to(dev).reshape(b, hkv, g, sq, d)
    k64, v64 = inputs.k.to(dev, torch.float64), inputs.v.to(dev, torch.float64)
    kpm = None if inputs.key_padding_mask is None else inputs.key_padding_mask.to(dev)
    kabs, vabs = k64.abs(), v64.abs()
    # Σ_j dS_j = 0 on every row, so dQ = scale·dS·(k − κ) for any κ per column: with κ the column's
    # median key value, near-tied keys leave small differences and tier 1's bound shrinks with them.
    # κ is a key value, so k − κ is exact in float64 except across exponent gaps TwoSum detects (κ = 0).
    kappa = k64.median(dim=-2, keepdim=True).values
    _, kerr = two_sum(k64, -kappa)
    kappa = torch.where((kerr == 0).all(-2, keepdim=True), kappa, torch.zeros_like(kappa))
    if case.softcap is not None or case.sinks is not None:
        # Σ_j dS_j·c_j ≠ 0 with soft-capping, and Σ_j dS_j = −dS_sink with a sink: no shift.
        kappa = torch.zeros_like(kappa)
    sinks = None if inputs.sinks is None else inputs.sinks.to(dev, torch.float64).reshape(1, hkv, g, 1, 1)
    has_sink = int(sinks is not None)
    kshift = k64 - kappa
    ones = torch.ones(skv, 1, dtype=torch.float64, device=dev)
    k_bits = lowest_bit_exponents(k64).transpose(-1, -2)  # [b, hkv, 1, skv]: exact dot products
    v_bits = lowest_bit_exponents(v64).transpose(-1, -2)

    rows5 = (b, hkv, g, sq)
    dq64 = torch.zeros(*rows5, d, dtype=torch.float64)
    dq_bnd = torch.zeros_like(dq64)
    dq_scale = torch.zeros(rows5, dtype=torch.float64)
    dq_naive = torch.zeros_like(dq64)
    kv = (b, hkv, skv, d)
    # dK and dV: TwoSum-accumulated sums over the row blocks (unscaled dK), their bounds and scales.
    acc = {name: torch.zeros(kv, dtype=torch.float64, device=dev)
           for name in ("dk_hi", "dk_lo", "dk_bnd", "dk_scale", "dv_hi", "dv_lo", "dv_bnd", "dv_scale")}
    naive_rep = {name: torch.zeros(b, hkv, g, skv, d, dtype=torch.float64, device=dev) for name in ("dk", "dv")}
    active = np.zeros(rows5, dtype=bool)
    seen = np.zeros(rows5, dtype=bool)
    single = np.zeros(rows5, dtype=bool)
    key_active = torch.zeros(b, hkv, skv, dtype=torch.bool, device=dev)
    key_seen = torch.zeros_like(key_active)
    flops = 0

    for i0, i1, kmax in row_blocks(case, CUDA_GRAD_BLOCK_ELEMENTS if dev.type == "cuda" else GRAD_BLOCK_ELEMENTS):
        n = i1 - i0
        if kmax <= 0:
            continue  # every row of the block is fully masked: it contributes nothing
        vis = visible(case, kpm, slice(i0, i1))[..., :kmax].to(dev)  # [b|1, n, kmax]
        n_vis = vis.sum(-1)
        vis = vis[:, None, None].expand(b, 1, g, n, kmax).reshape(b, 1, g * n, kmax)
        n_vis = n_vis[:, None, None].expand(b, 1, g, n).reshape(b, 1, g * n)
        flops += int(vis.expand(b, hkv, g * n, kmax).sum()) * 10 * d
        q = q64[:, :, :, i0:i1].reshape(b, hkv, g * n, d)
        do = do64[:, :, :, i0:i1].reshape(b, hkv, g * n, d)
        do_nz = (do != 0).any(-1)
        # With a sink every row that sees a key has two weights (P < 1): none is single.
        blk_active = do_nz & (n_vis + has_sink >= 2) & (n_vis >= 1) & (scale != 0)
        blk_seen = do_nz & (n_vis >= 1)
        blk_single = ((n_vis == 1) & (not has_sink)).expand(b, hkv, g * n)
        sink = None if sinks is None else sinks.expand(1, hkv, g, n, 1).reshape(1, hkv, g * n, 1)
        res = backward_block(q, do, k64[:, :, :kmax], kabs[:, :, :kmax], kshift[:, :, :kmax], v64[:, :, :kmax],
                             vabs[:, :, :kmax], ones[:kmax], vis, blk_active, blk_single, case, sink,
                             k_bits[..., :kmax], v_bits[..., :kmax])
        shape5 = (b, hkv, g, n)
        dq64[:, :, :, i0:i1] = res["dq"].reshape(*shape5, d).cpu()
        dq_bnd[:, :, :, i0:i1] = res["dq_bound"].reshape(*shape5, d).cpu()
        dq_scale[:, :, :, i0:i1] = res["dq_scale"].reshape(shape5).cpu()
        dq_naive[:, :, :, i0:i1] = res["dq_naive"].reshape(*shape5, d).cpu()
        for name in ("dk", "dv"):
            hi, e = two_sum(acc[f"{name}_hi"][:, :, :kmax], res[name])
            acc[f"{name}_hi"][:, :, :kmax] = hi
            acc[f"{name}_lo"][:, :, :kmax] += e
            acc[f"{name}_bnd"][:, :, :kmax] += res[f"{name}_bound"]
            acc[f"{name}_scale"][:, :, :kmax] += res[f"{name}_scale"]
            naive_rep[name][:, :, :, :kmax] += res[f"{name}_naive"]
        key_active[:, :, :kmax] |= (vis & blk_active[..., None]).any(-2)
        key_seen[:, :, :kmax] |= (vis & blk_seen[..., None]).any(-2)
        active[:, :, :, i0:i1] = blk_active.reshape(shape5).cpu().numpy()
        seen[:, :, :, i0:i1] = blk_seen.reshape(shape5).cpu().numpy()
        single[:, :, :, i0:i1] = blk_single.reshape(shape5).cpu().numpy()

    # The float64 values; the cascade's final sum, the scale and its rounding cost ≤ 4u·|value| more.
    dk64 = (acc["dk_hi"] + acc["dk_lo"]) * scale
    dv64 = acc["dv_hi"] + acc["dv_lo"]
    dk_bnd = 2 * (abs(scale) * acc["dk_bnd"] + 4 * U * dk64.abs())
    dv_bnd = 2 * (acc["dv_bnd"] + 4 * U * dv64.abs())
    # The decision runs where the values are (dQ on the host, dK and dV on the generation device).
    zero = {"dq": torch.from_numpy(~active)[..., None], "dk": ~key_active[..., None], "dv": ~key_seen[..., None]}
    values = {"dq": dq64, "dk": dk64, "dv": dv64}
    bounds = {"dq": dq_bnd, "dk": dk_bnd, "dv": dv_bnd}
    out32: dict[str, np.ndarray] = {}
    undecided: dict[str, np.ndarray] = {}
    for name in WHICH:
        out32[name], undecided[name] = decide_float64(values[name], bounds[name], zero[name])
    stats = RefinementStats(float64=int(sum(x.size - x.sum() for x in undecided.values())))
    if any(x.any() for x in undecided.values()):
        ops = Operands(q64, do64, k64, v64, kpm, active, seen, single)
        _refine(case, ops, out32, undecided, stats)

    # Naive model: per-query-head dK/dV rounded, then the group sums rounded (repeat_interleave's backward).
    dk_naive = round_like_dtype(round_like_dtype(naive_rep["dk"], case.dtype).sum(2), case.dtype).cpu().numpy()
    dv_naive = round_like_dtype(round_like_dtype(naive_rep["dv"], case.dtype).sum(2), case.dtype).cpu().numpy()
    # Against the correctly rounded gradients the differences are exact: no float64 noise is stored.
    to_q, to_kv = (b, hq, sq), (b, hkv, skv)
    return GradientGolden(
        dq=out32["dq"].reshape(b, hq, sq, d),
        dk=out32["dk"],
        dv=out32["dv"],
        dq_error_scale=round_up_significant(dq_scale.numpy(), ERROR_SCALE_BITS).reshape(to_q),
        dk_error_scale=round_up_significant(abs(scale) * acc["dk_scale"].amax(-1).cpu().numpy(), ERROR_SCALE_BITS),
        dv_error_scale=round_up_significant(acc["dv_scale"].amax(-1).cpu().numpy(), ERROR_SCALE_BITS),
        dq_naive_error=np.abs(dq_naive.numpy() - out32["dq"].astype(np.float64)).max(-1).reshape(to_q),
        dk_naive_error=np.abs(dk_naive - out32["dk"].astype(np.float64)).max(-1).reshape(to_kv),
        dv_naive_error=np.abs(dv_naive - out32["dv"].astype(np.float64)).max(-1).reshape(to_kv),
        flops=flops,
        stats=stats,
    )


def _refine(case: Case, ops: Operands, out32: dict[str, np.ndarray], undecided: dict[str, np.ndarray],
            stats: RefinementStats) -> None:
    """Decide the undecided elements of ``out32`` (dq [b, hkv, g, sq, d], dk/dv [b, hkv, skv, d]) in
    place: tier 2 with the cheap exp, then with the double-double exp, then tier 3."""
    b, hkv, g, sq, d = out32["dq"].shape
    dq_view = out32["dq"].reshape(b, hkv, g, sq, d)
    prior: dict[str, list[torch.Tensor]] | None = None
    for precise in (False, True):
        if not any(x.any() for x in undecided.values()):
            return
        elements = {name: np.argwhere(undecided[name]) for name in WHICH}
        values, decided, chunks = tier2(case, ops, elements, precise, prior)
        # The first pass's per-chunk dK/dV terms of the elements still open (argwhere keeps their order).
        prior = {name: [t[torch.as_tensor(~decided[name], device=t.device)] for t in chunks[name]]
                 for name in ("dk", "dv")}
        for name in WHICH:
            at = elements[name][decided[name]]
            target = dq_view if name == "dq" else out32[name]
            target[tuple(at.T)] = values[name][decided[name]]
            undecided[name][tuple(at.T)] = False
            stats.double_double += int(decided[name].sum())
    left = {name: np.argwhere(undecided[name]) for name in WHICH}
    if any(len(x) for x in left.values()):
        exact_tier(case, ops, left, out32, stats)
