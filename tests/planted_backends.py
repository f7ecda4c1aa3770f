"""Backends for the harness's own tests: one correct, and each of the others with one planted defect.

The correct one computes every (batch, head) slice on its own in float64 and rounds once to the
input dtype, so it is accurate and invariant by construction. Each defective one changes exactly
one thing, so the test can assert that exactly the check meant to catch it fails.
"""

from __future__ import annotations

import math

import torch


def attend64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
             mask: torch.Tensor | None, head_of=None, top_left: bool = False) -> torch.Tensor:
    """Float64 attention per (b, h) with CONTRACT.md semantics; fully masked rows give 0. Differentiable
    (its gradients are autograd's, NaN-free and invariant by the same construction)."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    head_of = head_of or (lambda h: h // g)
    out = q.detach().double().cpu() * 0 + q.double().cpu() * 0  # zeros that stay on the autograd graph
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    offset = 0 if top_left else skv - sq
    see_causal = (j <= i + offset) if causal else torch.ones(sq, skv, dtype=torch.bool)
    for bi in range(b):
        # Only the keys the padding mask keeps are read (a padded slot, NaN included, reaches neither out
        # nor a gradient), at their original positions for the causal rule: masked keys added anywhere
        # leave the computation unchanged.
        kept = torch.arange(skv) if mask is None else torch.nonzero(mask[bi].cpu()).flatten()
        if not len(kept):
            continue  # the batch entry sees no key: its rows stay 0
        see = see_causal[:, kept]
        for h in range(hq):
            kh = head_of(h)
            kb = k[bi, kh].double().cpu()[kept]
            vb = v[bi, kh].double().cpu()[kept]
            s = (q[bi, h].double().cpu() @ kb.T) * scale
            s = s.masked_fill(~see, -math.inf)
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = torch.exp(s - m)
            den = p.sum(-1, keepdim=True)
            o = (p @ vb) / torch.where(den > 0, den, torch.ones_like(den))
            out[bi, h] = o
    return out


class Correct:
    name = "planted-correct"
    device = "cpu"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        return attend64(q, k, v, causal, scale, key_padding_mask).to(q.dtype)

    def kv_cache_attention(self, q, k_cache, v_cache, k_new, v_new, *, causal, scale, key_padding_mask):
        return self.attention(q, torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2), causal=causal,
                              scale=scale, key_padding_mask=key_padding_mask)


def _nudge(out64: torch.Tensor, on: bool) -> torch.Tensor:
    """Relative 2**-10: flips the last bits of many bf16/fp16/fp32 elements, well inside bf16 tolerance."""
    return out64 * (1 + 2.0**-10) if on else out64


class TopLeftCausal(Correct):
    name = "planted-top-left-causal"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        return attend64(q, k, v, causal, scale, key_padding_mask, top_left=True).to(q.dtype)


class WrongGqaMapping(Correct):
    """Query head h reads KV head h % Hkv (the `repeat` mapping) instead of h // group."""

    name = "planted-wrong-gqa"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        hkv = k.shape[1]
        return attend64(q, k, v, causal, scale, key_padding_mask, head_of=lambda h: h % hkv).to(q.dtype)


class BatchDependent(Correct):
    """Result bits depend on the batch size (as a split-KV heuristic keyed on batch would)."""

    name = "planted-batch-dependent"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        out = attend64(q, k, v, causal, scale, key_padding_mask)
        return _nudge(out, q.shape[0] >= 2).to(q.dtype)


class SplitDependentMerge(Correct):
    """KV-cache op whose result bits depend on where the cache/new split falls (as a kernel that
    reduces the cache and the new keys separately and then merges would)."""

    name = "planted-split-merge"

    def kv_cache_attention(self, q, k_cache, v_cache, k_new, v_new, *, causal, scale, key_padding_mask):
        full = super().kv_cache_attention(q, k_cache, v_cache, k_new, v_new, causal=causal, scale=scale,
                                          key_padding_mask=key_padding_mask).double()
        return _nudge(full, k_cache.shape[2] % 2 == 1).to(q.dtype)


class SkvDependent(Correct):
    """Result bits depend on the padded key length, not only on the visible keys."""

    name = "planted-skv-dependent"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        out = attend64(q, k, v, causal, scale, key_padding_mask)
        return _nudge(out, key_padding_mask is not None and not bool(key_padding_mask.all())).to(q.dtype)


class RowCountDependent(Correct):
    """Result bits depend on how many query rows come in one call (prefill vs decode, chunking)."""

    name = "planted-rowcount-dependent"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        out = attend64(q, k, v, causal, scale, key_padding_mask)
        return _nudge(out, q.shape[2] >= 32).to(q.dtype)  # a "long prefill" kernel path

    def kv_cache_attention(self, q, k_cache, v_cache, k_new, v_new, *, causal, scale, key_padding_mask):
        return self.attention(q, torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2), causal=causal,
                              scale=scale, key_padding_mask=key_padding_mask)


class Nondeterministic(Correct):
    name = "planted-nondeterministic"

    def __init__(self) -> None:
        self.calls = 0

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        self.calls += 1
        out = attend64(q, k, v, causal, scale, key_padding_mask)
        return _nudge(out, self.calls % 3 == 0).to(q.dtype)


class MutatesInput(Correct):
    name = "planted-mutates-input"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        out = super().attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
        q.mul_(2)  # scratch use of an input buffer
        return out


class NanOnMaskedRows(Correct):
    """Rows that see no key come back NaN (0/0 softmax) instead of exactly 0."""

    name = "planted-nan-masked-rows"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        out = attend64(q, k, v, causal, scale, key_padding_mask)
        dead = (out == 0).all(-1, keepdim=True)
        return torch.where(dead, torch.full_like(out, math.nan), out).to(q.dtype)


class WrongDtype(Correct):
    name = "planted-wrong-dtype"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        return attend64(q, k, v, causal, scale, key_padding_mask).to(torch.float32 if q.dtype != torch.float32
                                                                      else torch.float64)


class Raises(Correct):
    name = "planted-raises"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        if q.shape[2] == 1:
            raise RuntimeError("kernel launch failed: decode path not built")
        return super().attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)


class DeclinesFloat32(Correct):
    name = "planted-declines-fp32"

    def supports(self, op, case):
        return "no fp32 kernel" if case.dtype == "float32" else True


class ImpreciseFp32Softmax(Correct):
    """Computes in the input dtype's precision only: a naive bf16-style path run even for fp32 inputs."""

    name = "planted-bf16-internally"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        out = attend64(q.to(torch.bfloat16).to(q.dtype), k.to(torch.bfloat16).to(k.dtype),
                       v.to(torch.bfloat16).to(v.dtype), causal, scale, key_padding_mask)
        return out.to(torch.bfloat16).to(q.dtype)
