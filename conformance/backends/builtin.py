"""Built-in backends that need nothing beyond PyTorch: the golden itself and the seed's naive attention.

``BUILTIN_BACKENDS`` lists every built-in, the SDPA adapters (``sdpa.py``) and FlexAttention
(``flex.py``) included; ``registry.py`` serves them by name.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from conformance.reference.compute import compute_reference
from conformance.reference.gradient import compute_gradient_reference
from conformance.spec.inputs import CaseInputs

from .contract import AttentionResult, BuiltinBackend, call_case, concat_kv_cache, visible_keys, zero_unseen_rows
from .flashinfer import (
    FlashInferDecodeBackend,
    FlashInferDecodeFixedSplitBackend,
    FlashInferDecodeTensorCoresBackend,
    FlashInferDenseBackend,
    FlashInferPrefillBackend,
    FlashInferPrefillNoSplitBackend,
    FlashInferSinkWrapperBackend,
)
from .flex import FlexBackend
from .flex_layouts import FlexLayoutsBackend
from .sdpa import (
    CudaBackend,
    SdpaBackend,
    SdpaCudnnBackend,
    SdpaEfficientBackend,
    SdpaFlashBackend,
    SdpaMathBackend,
)
from .varlen import TorchVarlenBackend, TorchVarlenNoSplitBackend


class ReferenceBackend(BuiltinBackend):
    """The golden algorithms (``conformance.reference``: the exact forward and backward) as a backend.

    Returns ``(out, lse)``: ``out`` float32, every element correctly rounded (bitwise equal to a
    stored golden's ``expected/out``), ``lse`` float32 ``[B, Hq, Sq]`` with ``-inf`` for rows that
    see no key. ``device`` is where the float64 stage runs; the result does not depend on it.
    """

    name = "reference"
    description = "exact reference: every output element correctly rounded to float32 (the golden algorithm)"
    output_dtype = torch.float32
    returns_lse = True
    variants = ("window", "softcap", "sinks")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                  window_size: tuple[int, int] = (-1, -1), softcap: float | None = None,
                  sinks: torch.Tensor | None = None) -> AttentionResult:
        case = call_case(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                         window_size=window_size, softcap=softcap, sinks=sinks)
        golden = compute_reference(case, _exact_inputs(q, k, v, key_padding_mask, sinks), device=self.device)
        return torch.from_numpy(golden.out).to(self.device), torch.from_numpy(golden.lse).to(self.device)

    def attention_backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           grad_out: torch.Tensor, *, causal: bool = True, scale: float | None = None,
                           key_padding_mask: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1),
                           softcap: float | None = None, sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The exact gradients (``conformance.reference.gradient``), each element correctly rounded to
        float32: (dq, dk, dv), bitwise equal to a golden's ``expected/grad_*``."""
        case = call_case(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                         window_size=window_size, softcap=softcap, sinks=sinks)
        exact = compute_gradient_reference(case, _exact_inputs(q, k, v, key_padding_mask, sinks),
                                           grad_out.detach().cpu().to(torch.float32), device=self.device)
        return tuple(torch.from_numpy(g).to(self.device) for g in (exact.dq, exact.dk, exact.dv))

    def kv_cache_attention_backward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    k_new: torch.Tensor, v_new: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
                                    *, causal: bool = True, scale: float | None = None,
                                    key_padding_mask: torch.Tensor | None = None,
                                    **variants: Any) -> tuple[torch.Tensor, ...]:
        """(dq, dk_cache, dv_cache, dk_new, dv_new): the slices of the exact gradients of the concatenated keys."""
        k, v = concat_kv_cache(q, k_cache, v_cache, k_new, v_new)
        dq, dk, dv = self.attention_backward(q, k, v, out, grad_out, causal=causal, scale=scale,
                                             key_padding_mask=key_padding_mask, **variants)
        p = k_cache.shape[2]
        return dq, dk[:, :, :p], dv[:, :, :p], dk[:, :, p:], dv[:, :, p:]


def _exact_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_padding_mask: torch.Tensor | None, sinks: torch.Tensor | None = None) -> CaseInputs:
    """The inputs on the CPU for the exact reference, padded key and value slots set to 0: by the
    contract their content is never read (it may be NaN), and the exact tiers take finite numbers."""
    mask = None if key_padding_mask is None else key_padding_mask.detach().cpu()
    k, v = k.detach().cpu(), v.detach().cpu()
    if mask is not None:
        keep = mask[:, None, :, None]
        zero = torch.zeros((), dtype=k.dtype)
        k, v = torch.where(keep, k, zero), torch.where(keep, v, zero)
    return CaseInputs(q.detach().cpu(), k, v, mask, sinks=None if sinks is None else sinks.detach().cpu())


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None,
                    key_padding_mask: torch.Tensor | None, compute_dtype: torch.dtype,
                    window_size: tuple[int, int] = (-1, -1), softcap: float | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The seed's naive softmax attention, every stage in ``compute_dtype``; the output in q's dtype.

    K/V expanded to Hq heads with ``repeat_interleave``; ``scores = (q @ kᵀ) * scale``; soft-capped
    ``softcap * tanh(scores / softcap)``; keys a row may not see (causal, window, padding) are filled
    with ``-inf``; the sinks join as one more score column (per head), dropped after ``torch.softmax``;
    ``@ v``. Rows that see no key are set to exactly 0 (softmax of an all ``-inf`` row is NaN), and
    their gradients are 0 too. Differentiable: its gradients are autograd's.
    """
    case = call_case(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                     window_size=window_size, softcap=softcap, sinks=sinks)
    see = visible_keys(case, key_padding_mask, q.device)
    qc = q.to(compute_dtype)
    kc = k.to(compute_dtype).repeat_interleave(case.group, dim=1)
    vc = v.to(compute_dtype).repeat_interleave(case.group, dim=1)
    scores = (qc @ kc.transpose(-1, -2)) * case.effective_scale
    if softcap is not None:  # before the mask: a capped −inf would be −softcap, not masked
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~see, -math.inf)
    # A row that sees no key gets finite scores (its output is zeroed below): softmax of an all −inf
    # row is NaN, and autograd would carry that NaN into every gradient.
    scores = torch.where(see.any(-1, keepdim=True), scores, torch.zeros((), dtype=scores.dtype, device=q.device))
    if sinks is not None:
        sink_col = sinks.to(q.device, compute_dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink_col], -1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return zero_unseen_rows(probs @ vc, see).to(q.dtype)


class NaiveBackend(BuiltinBackend):
    """Naive attention computed in the input dtype (the 'naive same-dtype' error of the goldens)."""

    name = "naive"
    description = "naive softmax attention in the input dtype (K/V repeat_interleave, masked_fill, softmax)"
    compute_dtype: torch.dtype | None = None  # None: the input dtype
    variants = ("window", "softcap", "sinks")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                  window_size: tuple[int, int] = (-1, -1), softcap: float | None = None,
                  sinks: torch.Tensor | None = None) -> AttentionResult:
        return naive_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                               compute_dtype=self.compute_dtype or q.dtype, window_size=window_size,
                               softcap=softcap, sinks=sinks)


class NaiveFp32Backend(NaiveBackend):
    """Naive attention with inputs upcast to float32; the output cast back to the input dtype."""

    name = "naive-fp32"
    description = "naive softmax attention computed in float32, output cast back to the input dtype"
    compute_dtype = torch.float32


# Order is the listing order. Each class takes one optional argument, ``device``. The last ones are
# the real packed and paged kernels (layouts only; unavailable, with the reason, without CUDA).
BUILTIN_BACKENDS: tuple[type, ...] = (
    ReferenceBackend,
    NaiveBackend,
    NaiveFp32Backend,
    SdpaBackend,
    SdpaMathBackend,
    SdpaFlashBackend,
    SdpaEfficientBackend,
    SdpaCudnnBackend,
    CudaBackend,
    FlexBackend,
    FlexLayoutsBackend,
    TorchVarlenBackend,
    TorchVarlenNoSplitBackend,
    FlashInferDecodeBackend,
    FlashInferDecodeTensorCoresBackend,
    FlashInferDecodeFixedSplitBackend,
    FlashInferPrefillBackend,
    FlashInferPrefillNoSplitBackend,
    FlashInferDenseBackend,
    FlashInferSinkWrapperBackend,
)
