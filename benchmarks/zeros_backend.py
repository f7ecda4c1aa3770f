"""A backend that returns zeros: no working memory and no time of its own, so that a run's
figures (peak RSS, phases) are the harness's alone. It fails every accuracy check by design.

    python benchmarks/run.py --goldens DIR --backend benchmarks.zeros_backend:Zeros
"""

from __future__ import annotations

import torch


class Zeros:
    name = "zeros"
    description = "returns zeros of the output's shape (harness-only measurements)"

    def __init__(self, device: str = "cpu") -> None:
        self.device = str(device)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros_like(q)

    def kv_cache_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
                           v_new: torch.Tensor, *, causal: bool = True, scale: float | None = None,
                           key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros_like(q)
