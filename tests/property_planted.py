"""Backends for the property-search tests: one correct, and four with a defect planted where the
smoke goldens never look (``test_properties.py`` checks that ``run`` on goldens/smoke passes each).

What the smoke run calls a backend with (every case and every transform of ``run``): key lengths
up to 136 only, batches of 3 or more only with at most 7 query heads, GQA group 7 only in
bfloat16 when there is a second KV head, and never a NaN. Each defect hides just outside that.
"""

from __future__ import annotations

import math

import torch

from conformance.spec.case import Case
from conformance.spec.inputs import visible


def _case(q: torch.Tensor, k: torch.Tensor, causal: bool) -> Case:
    b, hq, sq, d = q.shape
    return Case(id="planted", op="attention", family="planted", tier="smoke", batch=b, hq=hq, hkv=k.shape[1], d=d,
                sq=sq, skv=k.shape[2], dtype="float32", causal=causal, scale=None, mask="none", dist="normal", seed=0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
           mask: torch.Tensor | None, *, zero_padded_values: bool = True, additive_mask: bool = False,
           cross_head_max: bool = False) -> torch.Tensor:
    """Float64 attention with CONTRACT.md semantics, rounded once to q's dtype.

    Padded values are zeroed before ``p @ v`` and masked logits are replaced (``masked_fill``), so
    NaN in padded slots cannot reach an output; ``zero_padded_values=False`` and
    ``additive_mask=True`` undo that (the NaN defect). ``cross_head_max`` nudges a row of a GQA
    group of 7 when the neighbouring KV head would give it a larger logit (the GQA defect).
    """
    hq, d = q.shape[1], q.shape[3]
    hkv = k.shape[1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    see = visible(_case(q, k, causal), None if mask is None else mask.cpu())[:, None]  # [B or 1, 1, Sq, Skv]
    k64 = k.double().repeat_interleave(g, 1)
    v64 = v.double().repeat_interleave(g, 1)
    if zero_padded_values and mask is not None:
        v64 = v64.masked_fill(~mask[:, None, :, None], 0.0)
    s = (q.double() @ k64.transpose(-1, -2)) * scale
    bias = torch.zeros_like(s).masked_fill(~see, -math.inf)
    s = s + bias if additive_mask else s.masked_fill(~see, -math.inf)  # NaN + (-inf) stays NaN
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    out = (p @ v64) / torch.where(den > 0, den, torch.ones_like(den))
    out = torch.where(see.any(-1, keepdim=True), out, torch.zeros_like(out))
    if cross_head_max and g == 7 and hkv > 1:
        neighbour = torch.arange(hq) // g
        neighbour = (neighbour + 1) % hkv
        s_other = (q.double() @ k.double()[:, neighbour].transpose(-1, -2)) * scale
        m_other = s_other.masked_fill(~see, -math.inf).amax(-1, keepdim=True)
        out = torch.where(m_other > s.amax(-1, keepdim=True), out * (1 + 2.0**-10), out)
    return out.to(q.dtype)


class PropertyCorrect:
    """Correct and invariant by construction; NaN in padded slots never reaches an output."""

    name = "property-correct"
    device = "cpu"

    def supports(self, op, case):
        # The defects planted here are forward defects; the float64 autograd of attend() is not a
        # bitwise-invariant backward (its blocked sums change with the key count), so claim none.
        return not op.endswith("_backward") or "the property backends are forward-only"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        return attend(q, k, v, causal, scale, key_padding_mask)

    def kv_cache_attention(self, q, k_cache, v_cache, k_new, v_new, *, causal, scale, key_padding_mask):
        return self.attention(q, torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2), causal=causal,
                              scale=scale, key_padding_mask=key_padding_mask)


class TileTailOffByOne(PropertyCorrect):
    """Keys in tiles of 64; past two full tiles (Skv > 136 here: the smoke run stops at 136), a
    partial last tile loses its last key (an off-by-one in the tail's bound)."""

    name = "planted-tile-tail"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        skv = k.shape[2]
        if skv > 136 and skv % 64 != 0:
            keep = torch.ones(q.shape[0], skv, dtype=torch.bool)
            keep[:, -1] = False
            key_padding_mask = keep if key_padding_mask is None else key_padding_mask & keep
        return super().attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)


class GroupOfSevenCrossHead(PropertyCorrect):
    """GQA group 7 straddles 8-wide head tiles: a query head's rounding depends on the next KV
    head's logits. Accurate (a 2**-10 relative nudge) and invariant under every run transform."""

    name = "planted-gqa-group7"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        return attend(q, k, v, causal, scale, key_padding_mask, cross_head_max=True)


class SplitKvOnLargeBatch(PropertyCorrect):
    """A split-KV heuristic keyed on batch × heads: with B >= 3 sequences and Hq >= 8 the split
    path merges partial results with different rounding (a 2**-10 relative nudge)."""

    name = "planted-split-kv-batch"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        out = super().attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
        if q.shape[0] >= 3 and q.shape[1] >= 8:
            return (out.double() * (1 + 2.0**-10)).to(q.dtype)
        return out


class NanLeaksFromPadding(PropertyCorrect):
    """The mask is added to the logits and padded values are multiplied by weight 0: correct for
    finite data, but NaN in a padded slot becomes NaN in the output (0·NaN, NaN + (-inf))."""

    name = "planted-nan-padding"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        return attend(q, k, v, causal, scale, key_padding_mask, zero_padded_values=False, additive_mask=True)


PLANTED = (TileTailOffByOne, GroupOfSevenCrossHead, SplitKvOnLargeBatch, NanLeaksFromPadding)
