"""Built-in backends that need nothing beyond PyTorch: the golden itself and the seed's naive attention.

``BUILTIN_BACKENDS`` lists every built-in, the SDPA adapters (``sdpa.py``) and FlexAttention
(``flex.py``) included; ``registry.py`` serves them by name.
"""

from __future__ import annotations

import math

import torch

from conformance.reference.compute import compute_reference
from conformance.spec.inputs import CaseInputs

from .contract import AttentionResult, BuiltinBackend, call_case, visible_keys, zero_unseen_rows
from .flex import FlexBackend
from .sdpa import (
    CudaBackend,
    SdpaBackend,
    SdpaCudnnBackend,
    SdpaEfficientBackend,
    SdpaFlashBackend,
    SdpaMathBackend,
)


class ReferenceBackend(BuiltinBackend):
    """The golden algorithm (``conformance.reference.compute_reference``) as a backend.

    Returns ``(out, lse)``: ``out`` float32, every element correctly rounded (bitwise equal to a
    stored golden's ``expected/out``), ``lse`` float32 ``[B, Hq, Sq]`` with ``-inf`` for rows that
    see no key. ``device`` is where the float64 stage runs; the result does not depend on it.
    """

    name = "reference"
    description = "exact reference: every output element correctly rounded to float32 (the golden algorithm)"
    output_dtype = torch.float32
    returns_lse = True

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, key_padding_mask: torch.Tensor | None = None) -> AttentionResult:
        case = call_case(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
        inputs = CaseInputs(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(),
                            None if key_padding_mask is None else key_padding_mask.detach().cpu())
        golden = compute_reference(case, inputs, device=self.device)
        return torch.from_numpy(golden.out).to(self.device), torch.from_numpy(golden.lse).to(self.device)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None,
                    key_padding_mask: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """The seed's naive softmax attention, every stage in ``compute_dtype``; the output in q's dtype.

    K/V expanded to Hq heads with ``repeat_interleave``; ``scores = (q @ kᵀ) * scale``; keys a row
    may not see are filled with ``-inf``; ``torch.softmax``; ``@ v``. Rows that see no key are set
    to exactly 0 (softmax of an all ``-inf`` row is NaN).
    """
    case = call_case(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    see = visible_keys(case, key_padding_mask, q.device)
    qc = q.to(compute_dtype)
    kc = k.to(compute_dtype).repeat_interleave(case.group, dim=1)
    vc = v.to(compute_dtype).repeat_interleave(case.group, dim=1)
    scores = (qc @ kc.transpose(-1, -2)) * case.effective_scale
    probs = torch.softmax(scores.masked_fill(~see, -math.inf), dim=-1)
    return zero_unseen_rows(probs @ vc, see).to(q.dtype)


class NaiveBackend(BuiltinBackend):
    """Naive attention computed in the input dtype (the 'naive same-dtype' error of the goldens)."""

    name = "naive"
    description = "naive softmax attention in the input dtype (K/V repeat_interleave, masked_fill, softmax)"
    compute_dtype: torch.dtype | None = None  # None: the input dtype

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, key_padding_mask: torch.Tensor | None = None) -> AttentionResult:
        return naive_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                               compute_dtype=self.compute_dtype or q.dtype)


class NaiveFp32Backend(NaiveBackend):
    """Naive attention with inputs upcast to float32; the output cast back to the input dtype."""

    name = "naive-fp32"
    description = "naive softmax attention computed in float32, output cast back to the input dtype"
    compute_dtype = torch.float32


# Order is the listing order. Each class takes one optional argument, ``device``.
BUILTIN_BACKENDS: tuple[type[BuiltinBackend], ...] = (
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
)
