"""A float64 backend of the attention variants for the harness's own tests, correct by default and with
one planted defect per knob: each is a bug real kernels had or could have (docs/backends.md, terms)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFECTS = ("softcap_after_mask", "window_left_off_by_one", "window_top_left", "sink_in_numerator",
           "sink_ignored_when_fully_masked", "sinks_dropped")
# sinks_dropped: the sinks argument accepted and never used (FlashInfer 0.7.2's paged prefill on sm90,
# docs/results/2026-12-01-h200-flashinfer.md)


@dataclass
class PlantedVariants:
    """Float64 attention with window, soft-capping and sinks; returns (out in the input dtype, lse)."""

    defect: str | None = None
    device: str = "cpu"
    returns_lse: bool = True
    variants: tuple[str, ...] = ("window", "softcap", "sinks")

    @property
    def name(self) -> str:
        return f"planted-variants-{self.defect or 'correct'}"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask, window_size=(-1, -1), softcap=None,
                  sinks=None):
        out, lse = self.attend64(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                 window_size=window_size, softcap=softcap, sinks=sinks)
        return out.to(q.dtype), lse.to(torch.float32)

    def attend64(self, q, k, v, *, causal, scale, key_padding_mask, window_size=(-1, -1), softcap=None, sinks=None):
        """The float64 output and log-sum-exp (differentiable in q, k, v)."""
        b, hq, sq, d = q.shape
        hkv, skv = k.shape[1], k.shape[2]
        g = hq // hkv
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        i = torch.arange(sq)[:, None]
        j = torch.arange(skv)[None, :]
        diag = i + (skv - sq)
        see = (j <= diag) if causal else torch.ones(sq, skv, dtype=torch.bool)
        left, right = window_size
        wdiag = i if self.defect == "window_top_left" else diag
        if left >= 0:
            see = see & (j >= wdiag - left - int(self.defect == "window_left_off_by_one"))
        if right >= 0:
            see = see & (j <= wdiag + right)
        see = see[None] & (torch.ones(b, skv, dtype=torch.bool) if key_padding_mask is None
                           else key_padding_mask.cpu())[:, None, :]
        kk = k.double().repeat_interleave(g, 1)
        vv = torch.where(see.any(1)[:, None, :, None], v.double(), 0.0).repeat_interleave(g, 1)
        s = (q.double() @ kk.transpose(-1, -2)) * scale
        s = torch.where(see[:, None], s, 0.0) if self.defect != "softcap_after_mask" else s
        if softcap is not None and self.defect != "softcap_after_mask":
            s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~see[:, None], -math.inf)
        if softcap is not None and self.defect == "softcap_after_mask":
            s = torch.tanh(s / softcap) * softcap  # −inf becomes −softcap: masked keys get weight
        cols = [s]
        if self.defect == "sinks_dropped":
            sinks = None
        if sinks is not None:
            cols.append(sinks.double()[None, :, None, None].expand(b, hq, sq, 1))
        full = torch.cat(cols, -1)
        m = full.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(full - m)
        den = e.sum(-1, keepdim=True)
        num = e[..., :skv] @ vv
        if sinks is not None and self.defect == "sink_in_numerator":
            num = num + e[..., skv:]  # as if the sink had the value 1
        seen = see.any(-1)[:, None, :, None]
        out = torch.where(seen, num / torch.where(den > 0, den, torch.ones_like(den)), 0.0)
        lse = (m + torch.log(den)).squeeze(-1)
        if sinks is not None and self.defect == "sink_ignored_when_fully_masked":
            lse = torch.where(seen.squeeze(-1), lse, -math.inf)
        return out, lse

    def kv_cache_attention(self, q, k_cache, v_cache, k_new, v_new, *, causal, scale, key_padding_mask, **variants):
        return self.attention(q, torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2), causal=causal,
                              scale=scale, key_padding_mask=key_padding_mask, **variants)
