"""PyTorch's packed and paged FlashAttention kernel, ``torch.nn.attention.varlen.varlen_attn``
(torch >= 2.10, CUDA), adapted to docs/backends.md#layouts.

- packed: ``varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k)``;
- paged: the same kernel on the page pool with ``block_table`` and ``seqused_k = seq_lens``;
- causal is ``window_size=(-1, 0)`` (FlashAttention aligns it bottom-right when Sq != Skv), GQA
  ``enable_gqa``; ``scale`` is passed through.

``torch-varlen`` lets the kernel choose its split-KV count (``num_splits=None``), which it bases
on the longest sequence of the batch; ``torch-varlen-nosplit`` passes ``num_splits=1``, the
setting PyTorch documents as batch invariant. Neither has dense ops: the dense cases are skipped.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .contract import BackendUnavailable, cuda_unavailable_reason


def varlen_unavailable_reason(device: str) -> str | None:
    """Why ``varlen_attn`` cannot run on ``device``: no such function in this torch, or no CUDA."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (it needs torch >= 2.10)"
    if torch.device(device).type != "cuda":
        return f"varlen_attn is a CUDA kernel (FlashAttention); {device!r} is not a CUDA device"
    return cuda_unavailable_reason(device)


class TorchVarlenBackend:
    """``varlen_attn`` for both layouts, with PyTorch's own split-KV choice."""

    name = "torch-varlen"
    description = "torch.nn.attention.varlen.varlen_attn (FlashAttention varlen, paged via block_table), own splits"
    num_splits: ClassVar[int | None] = None

    def __init__(self, device: str = "cuda") -> None:
        self.device = device
        reason = varlen_unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailable(reason)

    def supports(self, op: str, case: Any) -> bool | str:
        if case.dtype == "float32":
            return "varlen_attn (FlashAttention) runs float16 and bfloat16 only, not float32"
        return True

    def _call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor | None,
              max_q: int, max_k: int, causal: bool, scale: float | None, **extra: Any) -> torch.Tensor:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0) if causal else (-1, -1),
                           enable_gqa=q.shape[1] != k.shape[-2], num_splits=self.num_splits, **extra)

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                         scale: float | None = None) -> torch.Tensor:
        return self._call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)

    def paged_kv_attention(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           scale: float | None = None) -> torch.Tensor:
        return self._call(q, k_pages, v_pages, cu_seqlens_q, None, max_seqlen_q, max_seqlen_k, causal, scale,
                          seqused_k=seq_lens, block_table=block_table)


class TorchVarlenNoSplitBackend(TorchVarlenBackend):
    """``varlen_attn`` with ``num_splits=1``: split-KV off, the batch-invariant setting."""

    name = "torch-varlen-nosplit"
    description = "torch varlen_attn with num_splits=1 (split-KV off: documented as batch invariant)"
    num_splits = 1
