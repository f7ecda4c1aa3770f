"""PyTorch's packed and paged FlashAttention kernel, ``torch.nn.attention.varlen.varlen_attn``
(torch >= 2.10, CUDA), adapted to docs/backends.md#layouts.

- packed: ``varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k)``;
- paged: the same kernel on the page pool with ``block_table`` and ``seqused_k = seq_lens``;
- causal is ``window_size=(-1, 0)`` (FlashAttention aligns it bottom-right when Sq != Skv), GQA
  ``enable_gqa``; ``scale`` is passed through;
- a sliding window ``(left, right)`` (docs/backends.md#layouts) is FlashAttention's own
  ``window_size``, bottom-right aligned per sequence as the contract's: ``(left, 0)`` when causal (the
  causal bound is the tighter right side), ``(left, right)`` otherwise.

The keywords follow the installed torch's ``varlen_attn`` (its signature is read once): torch 2.11
has no ``enable_gqa`` (K/V heads are then repeated to the query heads, the contract's
``h // (Hq/Hkv)`` mapping) and may lack ``window_size`` (then ``is_causal``, and a case with a
sliding window is declined with the reason), ``block_table``
(paged cases are declined with the reason) and ``num_splits`` (``torch-varlen-nosplit`` is then
unavailable with the reason: it would otherwise run PyTorch's own split choice under its name).

``torch-varlen`` lets the kernel choose its split-KV count (``num_splits=None``), which it bases
on the longest sequence of the batch; ``torch-varlen-nosplit`` passes ``num_splits=1``, the
setting PyTorch documents as batch invariant. Neither has dense ops: the dense cases are skipped.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from .contract import BackendUnavailable, cuda_only_reason


def varlen_unavailable_reason(device: str) -> str | None:
    """Why ``varlen_attn`` cannot run on ``device``: no such function in this torch, or no CUDA."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (it needs torch >= 2.10)"
    return cuda_only_reason(device, "varlen_attn (FlashAttention)")


def _varlen_attn() -> Callable[..., Any]:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


@functools.cache
def varlen_keywords(fn: Callable[..., Any] | None = None) -> frozenset[str]:
    """The parameter names of the installed ``varlen_attn`` (or of ``fn``)."""
    return frozenset(inspect.signature(fn or _varlen_attn()).parameters)


class TorchVarlenBackend:
    """``varlen_attn`` for both layouts, with PyTorch's own split-KV choice."""

    name = "torch-varlen"
    description = "torch.nn.attention.varlen.varlen_attn (FlashAttention varlen, paged via block_table), own splits"
    num_splits: ClassVar[int | None] = None
    # FlashAttention's window_size; a torch whose varlen_attn lacks it declines window cases (supports).
    variants = ("window",)

    def __init__(self, device: str = "cuda") -> None:
        self.device = device
        reason = varlen_unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailable(reason)
        self._fn = _varlen_attn()
        self._keywords = varlen_keywords(self._fn)
        if self.num_splits is not None and "num_splits" not in self._keywords:
            raise BackendUnavailable(f"torch {torch.__version__}'s varlen_attn has no num_splits: split-KV cannot be "
                                     f"set to {self.num_splits}")

    def supports(self, op: str, case: Any) -> bool | str:
        if case.dtype == "float32":
            return "varlen_attn (FlashAttention) runs float16 and bfloat16 only, not float32"
        if op == "paged_kv_attention" and not {"block_table", "seqused_k"} <= self._keywords:
            return f"torch {torch.__version__}'s varlen_attn takes no block_table: no paged KV cache"
        if tuple(getattr(case, "window", (-1, -1))) != (-1, -1) and "window_size" not in self._keywords:
            return f"torch {torch.__version__}'s varlen_attn takes no window_size: no sliding window"
        return True

    def _call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor | None,
              max_q: int, max_k: int, causal: bool, scale: float | None, window: tuple[int, int],
              **extra: Any) -> torch.Tensor:
        kw: dict[str, Any] = {"scale": scale, **extra}
        left, right = (int(w) for w in window)
        if "window_size" in self._keywords:
            kw["window_size"] = (left, 0) if causal else (left, right)
        elif (left, right) != (-1, -1):  # supports() declines these cases; a direct call must not drop it
            raise ValueError(f"torch {torch.__version__}'s varlen_attn takes no window_size: cannot apply the "
                             f"sliding window {(left, right)}")
        else:
            kw["is_causal"] = causal
        group = q.shape[1] // k.shape[-2]
        if group > 1 and "enable_gqa" in self._keywords:
            kw["enable_gqa"] = True
        elif group > 1:  # query head h reads KV head h // group
            k, v = k.repeat_interleave(group, dim=-2), v.repeat_interleave(group, dim=-2)
        if self.num_splits is not None:
            kw["num_splits"] = self.num_splits
        return self._fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                         scale: float | None = None, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
        return self._call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                          window_size)

    def paged_kv_attention(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           scale: float | None = None, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
        return self._call(q, k_pages, v_pages, cu_seqlens_q, None, max_seqlen_q, max_seqlen_k, causal, scale,
                          window_size, seqused_k=seq_lens, block_table=block_table)


class TorchVarlenNoSplitBackend(TorchVarlenBackend):
    """``varlen_attn`` with ``num_splits=1``: split-KV off, the batch-invariant setting."""

    name = "torch-varlen-nosplit"
    description = "torch varlen_attn with num_splits=1 (split-KV off: documented as batch invariant)"
    num_splits = 1
