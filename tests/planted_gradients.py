"""Backends with one planted backward defect each, for the gradient checks' own tests.

The forward of every one is :class:`planted_backends.Correct`'s (float64 per (batch, head), rounded
once). The correct backward is autograd of that float64 formula; each defective one starts from it
and changes exactly one thing a kernel author could get wrong, so a test can assert that the check
meant to catch it does (``test_gradient_checks.py``): in ``rlk-conform run`` on the smoke goldens
and in the property search of ``rlk-conform check``.
"""

from __future__ import annotations

import math

import torch
from planted_backends import Correct, attend64


def effective_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def grads64(q, k, v, grad_out, causal, scale, mask, per_query_head: bool = False):
    """Autograd of :func:`attend64` in float64: (dq, dk, dv). With ``per_query_head`` dk and dv are
    the per-query-head contributions [B, Hq, Skv, D] before the GQA group sum."""
    g = q.shape[1] // k.shape[1]
    q64 = q.detach().double().requires_grad_(True)
    if per_query_head:
        k64 = k.detach().double().repeat_interleave(g, 1).requires_grad_(True)
        v64 = v.detach().double().repeat_interleave(g, 1).requires_grad_(True)
    else:
        k64 = k.detach().double().requires_grad_(True)
        v64 = v.detach().double().requires_grad_(True)
    with torch.enable_grad():
        out = attend64(q64, k64, v64, causal, scale, mask)
        grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double(), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q64, k64, v64)))  # unused: 0


def ulp_up(x: torch.Tensor) -> torch.Tensor:
    """Each element one ulp of its own dtype up (0 becomes the smallest subnormal)."""
    return torch.nextafter(x, torch.full_like(x, math.inf))


class GradCorrect(Correct):
    """Correct forward and backward (the backward through ``attention_backward``)."""

    name = "grad-correct"

    def attention_backward(self, q, k, v, out, grad_out, *, causal, scale, key_padding_mask):
        dq, dk, dv = grads64(q, k, v, grad_out, causal, scale, key_padding_mask)
        return self.finish(q, k, v, grad_out, causal, scale, key_padding_mask, dq, dk, dv)

    def kv_cache_attention_backward(self, q, k_cache, v_cache, k_new, v_new, out, grad_out, *, causal, scale,
                                    key_padding_mask):
        p = k_cache.shape[2]
        dq, dk, dv = self.attention_backward(q, torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2), out,
                                             grad_out, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
        return dq, dk[:, :, :p], dv[:, :, :p], dk[:, :, p:], dv[:, :, p:]

    def finish(self, q, k, v, grad_out, causal, scale, mask, dq, dk, dv):
        """The float64 gradients rounded once to the input dtype (a defect changes them here)."""
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class DkWithoutScale(GradCorrect):
    """dK = dSᵀ·q, the softmax scale forgotten (dQ keeps it)."""

    name = "grad-dk-without-scale"

    def finish(self, q, k, v, grad_out, causal, scale, mask, dq, dk, dv):
        return super().finish(q, k, v, grad_out, causal, scale, mask, dq, dk / effective_scale(q, scale), dv)


class CausalIgnoredInBackward(GradCorrect):
    """The backward recomputes P without the causal mask (the forward applies it)."""

    name = "grad-causal-ignored"

    def attention_backward(self, q, k, v, out, grad_out, *, causal, scale, key_padding_mask):
        dq, dk, dv = grads64(q, k, v, grad_out, False, scale, key_padding_mask)
        return self.finish(q, k, v, grad_out, causal, scale, key_padding_mask, dq, dk, dv)


class PaddedKeysNonzeroDk(GradCorrect):
    """Padded keys' dK slots are never written: they keep a tiny leftover instead of exact 0 (within
    any accuracy tolerance, so only the exact-zero rule can see it)."""

    name = "grad-padded-dk-nonzero"

    def finish(self, q, k, v, grad_out, causal, scale, mask, dq, dk, dv):
        if mask is not None:
            dk = torch.where(mask.cpu()[:, None, :, None], dk, torch.full_like(dk, 1e-30))
        return super().finish(q, k, v, grad_out, causal, scale, mask, dq, dk, dv)


class NanLeaksIntoDq(GradCorrect):
    """dQ = dS·K over every key slot: 0·NaN from a padded key slot holding NaN makes the row NaN."""

    name = "grad-nan-leaks-into-dq"

    def finish(self, q, k, v, grad_out, causal, scale, mask, dq, dk, dv):
        if mask is not None:
            poisoned = (~mask.cpu()[:, None, :] & torch.isnan(k.cpu()).any(-1)).any(-1)  # [B, Hkv]
            g = q.shape[1] // k.shape[1]
            rows = poisoned.repeat_interleave(g, 1)[:, :, None, None].expand_as(dq)
            dq = torch.where(rows, torch.full_like(dq, math.nan), dq)
        return super().finish(q, k, v, grad_out, causal, scale, mask, dq, dk, dv)


class NondeterministicDkAccumulation(GradCorrect):
    """dK, dV of a KV head accumulate the query heads' parts in float32 in an order that changes from
    call to call (as atomic adds do)."""

    name = "grad-nondeterministic-dk"

    def __init__(self) -> None:
        self.calls = 0

    def attention_backward(self, q, k, v, out, grad_out, *, causal, scale, key_padding_mask):
        self.calls += 1
        dq, dk_h, dv_h = grads64(q, k, v, grad_out, causal, scale, key_padding_mask, per_query_head=True)
        hkv = k.shape[1]
        g = q.shape[1] // hkv

        def accumulate(parts: torch.Tensor) -> torch.Tensor:
            b, _, s, d = parts.shape
            grouped = parts.float().view(b, hkv, g, s, d)
            total = torch.zeros(b, hkv, s, d)
            for i in range(g):
                total = total + grouped[:, :, (i + self.calls) % g]
            return total

        return dq.to(q.dtype), accumulate(dk_h).to(k.dtype), accumulate(dv_h).to(v.dtype)


class GqaReductionWrong(GradCorrect):
    """dK, dV of KV head h sum the query heads h, h + Hkv, h + 2·Hkv, … (the ``repeat`` mapping), not
    its own group h·g … h·g + g − 1."""

    name = "grad-gqa-reduction"

    def attention_backward(self, q, k, v, out, grad_out, *, causal, scale, key_padding_mask):
        dq, dk_h, dv_h = grads64(q, k, v, grad_out, causal, scale, key_padding_mask, per_query_head=True)
        b, hq, s, d = dk_h.shape
        hkv = k.shape[1]

        def wrong(parts: torch.Tensor) -> torch.Tensor:
            return parts.view(b, hq // hkv, hkv, s, d).sum(1)

        return dq.to(q.dtype), wrong(dk_h).to(k.dtype), wrong(dv_h).to(v.dtype)


class BatchDependentBackward(GradCorrect):
    """A work split keyed on the batch size: with two or more samples dQ comes out one ulp up."""

    name = "grad-batch-dependent"

    def finish(self, q, k, v, grad_out, causal, scale, mask, dq, dk, dv):
        dq, dk, dv = super().finish(q, k, v, grad_out, causal, scale, mask, dq, dk, dv)
        if q.shape[0] >= 2:
            dq = ulp_up(dq)
        return dq, dk, dv


class NanOnMaskedRowsBackward(GradCorrect):
    """A row that sees no key gets dQ = NaN (0/0 in the softmax backward) instead of 0."""

    name = "grad-nan-masked-rows"

    def finish(self, q, k, v, grad_out, causal, scale, mask, dq, dk, dv):
        out = attend64(q, k, v, causal, scale, mask)
        dead = (out == 0).all(-1, keepdim=True).expand_as(dq)
        dq = torch.where(dead, torch.full_like(dq, math.nan), dq)
        return super().finish(q, k, v, grad_out, causal, scale, mask, dq, dk, dv)


class SplitDependentBackward(GradCorrect):
    """The KV-cache backward reduces the cache and the new keys apart: with an odd cache length dK of
    the new keys comes out one ulp up."""

    name = "grad-split-dependent"

    def kv_cache_attention_backward(self, q, k_cache, v_cache, k_new, v_new, out, grad_out, *, causal, scale,
                                    key_padding_mask):
        dq, dkc, dvc, dkn, dvn = super().kv_cache_attention_backward(
            q, k_cache, v_cache, k_new, v_new, out, grad_out, causal=causal, scale=scale,
            key_padding_mask=key_padding_mask)
        if k_cache.shape[2] % 2 == 1:
            dkn = ulp_up(dkn)
        return dq, dkc, dvc, dkn, dvn


class MutatesGradOut(GradCorrect):
    """Uses the upstream gradient's buffer as scratch."""

    name = "grad-mutates-grad-out"

    def attention_backward(self, q, k, v, out, grad_out, *, causal, scale, key_padding_mask):
        grads = super().attention_backward(q, k, v, out, grad_out, causal=causal, scale=scale,
                                           key_padding_mask=key_padding_mask)
        grad_out.mul_(0.5)
        return grads


class ForwardOnly(Correct):
    """No backward at all: its output carries no autograd graph."""

    name = "forward-only"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        return super().attention(q.detach(), k.detach(), v.detach(), causal=causal, scale=scale,
                                 key_padding_mask=key_padding_mask)
