"""FlexAttention (``torch.nn.attention.flex_attention``), compiled, adapted to CONTRACT.md.

The contract's visibility is one ``mask_mod``: key ``j`` is seen by row ``i`` of batch entry ``b``
iff ``key_padding_mask[b, j]`` and ``j <= i + offset``, with ``offset = Skv - Sq`` when causal
(bottom-right) and ``Skv`` otherwise (no limit). GQA goes through ``enable_gqa=True`` (FlexAttention
maps query head ``h`` to KV head ``h // (Hq/Hkv)``); ``scale`` is passed through (``0.0`` stays
0.0). FlexAttention gives fully masked rows an output of 0 itself; the adapter does not touch them.

The op always runs through ``torch.compile(dynamic=False)`` (eager FlexAttention is PyTorch's
unfused debugging path, a different kernel): every new shape or dtype costs one compile. Dynamo's
silent fallbacks to eager are turned into errors for the duration of a call: ``suppress_errors``
off, ``fail_on_recompile_limit_hit`` on where torch has it, and a high recompile limit. When
compiling fails on a device (no C++ compiler, no Triton, old torch) the backend is unavailable
there, with the reason.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .contract import AttentionResult, BackendUnavailable, BuiltinBackend, call_case, one_line

# Shapes are compiled statically (dynamic=True hits an Inductor CPU codegen bug in torch 2.13:
# 'cur_kvSplitSize7 was not declared'), so each distinct shape and dtype is one compile; the
# limit is high because reaching it would otherwise make dynamo run eager code silently.
RECOMPILE_LIMIT = 1 << 16

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def contract_mask_mod(keep: torch.Tensor, offset: torch.Tensor) -> MaskMod:
    """FlexAttention ``mask_mod`` of CONTRACT.md visibility. ``keep`` bool ``[B, Skv]``, ``offset``
    a 0-d int64 tensor. Every call returns a function with the same code, so compiled code is reused."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return keep[b, kv_idx] & (kv_idx <= q_idx + offset)

    return mask_mod


@contextlib.contextmanager
def no_silent_fallback() -> Iterator[None]:
    """Dynamo settings under which a compile problem raises instead of running eager code."""
    cfg: Any = torch._dynamo.config
    changes: dict[str, Any] = {"suppress_errors": False}
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                  "accumulated_cache_size_limit"):
        if hasattr(cfg, limit):
            changes[limit] = RECOMPILE_LIMIT
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        changes["fail_on_recompile_limit_hit"] = True
    with cfg.patch(**changes), torch.no_grad():  # torch.compile of flex on CPU supports inference only
        yield


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_contract_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                            scale: float | None, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """CONTRACT.md ``attention`` through compiled FlexAttention."""
    from torch.nn.attention.flex_attention import create_block_mask

    case = call_case(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    keep = (torch.ones(case.batch, case.skv, dtype=torch.bool, device=q.device) if key_padding_mask is None
            else key_padding_mask.to(q.device))
    offset = torch.tensor(case.skv - case.sq if case.causal else case.skv, device=q.device)
    block_mask = create_block_mask(contract_mask_mod(keep, offset), case.batch, None, case.sq, case.skv,
                                   device=q.device)
    with no_silent_fallback():
        return compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=case.group > 1)


@functools.cache
def flex_unavailable_reason(device: str) -> str | None:
    """Why compiled FlexAttention cannot run on ``device``, found by running it once on a tiny input."""
    try:
        import torch.nn.attention.flex_attention
    except ImportError as exc:
        return f"torch {torch.__version__} has no FlexAttention ({one_line(str(exc))}); it needs torch >= 2.5"
    dev = torch.device(device)
    # Three distinct tensors: compiled FlexAttention refuses q, k, v that share one buffer.
    q, k, v = (torch.zeros(1, 1, 16, 16, dtype=torch.float16 if dev.type == "cuda" else torch.float32, device=dev)
               for _ in range(3))
    try:
        flex_contract_attention(q, k, v, causal=True, scale=None, key_padding_mask=None)
    except Exception as exc:  # any compile failure (InductorError, BackendCompilerFailed, ...) means unavailable
        return (f"torch {torch.__version__} cannot compile FlexAttention on {device}: "
                f"{type(exc).__name__}: {one_line(str(exc))[:400]}")
    return None


class FlexBackend(BuiltinBackend):
    """``torch.compile(flex_attention)`` with the contract's mask as a ``mask_mod``."""

    name = "flex"
    description = "torch FlexAttention (torch.compile'd), mask_mod for bottom-right causal and padding"

    def __init__(self, device: str | None = None) -> None:
        super().__init__(device)
        reason = flex_unavailable_reason(self.device)
        if reason is not None:
            raise BackendUnavailable(reason)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, key_padding_mask: torch.Tensor | None = None) -> AttentionResult:
        return flex_contract_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
