"""Adapters of ``torch.nn.functional.scaled_dot_product_attention`` (SDPA) to CONTRACT.md.

SDPA's own semantics differ from the contract in ways CONTRACT.md §4 lists; the adapters bridge
them, and only them:

- ``is_causal=True`` is top-left aligned. It is passed only when ``Sq == Skv`` and there is no
  padding (then both alignments agree); otherwise the bottom-right causal rule and the
  key_padding_mask go in as one boolean ``attn_mask [B or 1, 1, Sq, Skv]``. Decode (``Sq == 1``)
  sees every key, so it needs neither.
- A row that sees no key outputs exactly 0 (the contract); SDPA leaves such rows undefined (NaN on
  some kernels), so the adapter sets every row whose mask row is all False to 0. Rows that see a
  key are returned exactly as the kernel computed them: a NaN there stays a NaN.
- GQA: ``enable_gqa=True`` where torch has it, except for the memory-efficient kernel, which gets
  K/V expanded to Hq heads with ``repeat_interleave`` (the contract's head mapping).
- ``scale`` is passed through unchanged: ``None`` lets the kernel use ``1/sqrt(D)``, ``0.0`` is 0.0.

A forced kernel (``sdpa-math``, ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``) runs inside
``torch.nn.attention.sdpa_kernel`` with that kernel alone enabled: when PyTorch refuses a call it
raises :class:`KernelUnavailable` with PyTorch's reasons, never another kernel's result.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from conformance.spec.case import Case

from .contract import (
    AttentionResult,
    BackendUnavailable,
    BuiltinBackend,
    KernelUnavailable,
    call_case,
    one_line,
    visible_keys,
    zero_unseen_rows,
)

KERNEL_LABELS = {
    SDPBackend.MATH: "math",
    SDPBackend.FLASH_ATTENTION: "flash",
    SDPBackend.EFFICIENT_ATTENTION: "memory-efficient",
    SDPBackend.CUDNN_ATTENTION: "cuDNN",
}
NO_KERNEL_MESSAGES = ("No available kernel", "No viable backend")  # CUDA's and CPU's wording
# PyTorch's refusal warnings carry C++ source locations and notes about the kernels sdpa_kernel
# disabled on purpose; neither says why the forced kernel refused.
WARNING_NOISE = re.compile(r"\s*\(Triggered internally at [^)]*\)\.?")


@functools.cache
def sdpa_has_enable_gqa() -> bool:
    """Whether the installed torch's SDPA takes ``enable_gqa`` (added in torch 2.5)."""
    q = torch.zeros(1, 2, 1, 8)
    kv = torch.zeros(1, 1, 1, 8)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except TypeError:
        return False
    return True


def mask_requirement(case: Case) -> str | None:
    """Why a call of ``case`` needs an explicit ``attn_mask`` (the contract cannot be met with
    ``is_causal`` alone), or None."""
    if case.mask != "none":
        return "a key_padding_mask"
    if case.window != (-1, -1):
        return f"a sliding window {case.window}"
    if case.causal and 1 < case.sq != case.skv:
        return f"bottom-right causal with Sq={case.sq} != Skv={case.skv} (is_causal is top-left aligned)"
    return None


def sdpa_mask(case: Case, key_padding_mask: torch.Tensor | None,
              device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """``(attn_mask, is_causal)`` that make SDPA compute the contract's visibility for ``case``."""
    if mask_requirement(case) is not None:
        return visible_keys(case, key_padding_mask, device), False
    # Here Sq == Skv or Sq == 1: top-left and bottom-right agree, and a single row sees every key.
    return None, case.causal and case.sq > 1


def kernel_limitation(kernel: SDPBackend | None, device_type: str, case: Case) -> str | None:
    """A documented limit of ``kernel`` that rules ``case`` out on ``device_type``, or None.

    Only limits known in advance are listed; any other refusal surfaces at call time as
    :class:`KernelUnavailable`. On CPU the flash kernel (torch 2.13) takes masks and float32.
    """
    if device_type != "cuda" or kernel not in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        return None
    if case.dtype == "float32":
        return f"PyTorch's CUDA {KERNEL_LABELS[kernel]} kernel runs float16 and bfloat16 only, not float32"
    needed = mask_requirement(case)
    if kernel == SDPBackend.FLASH_ATTENTION and needed is not None:
        return f"PyTorch's flash kernel takes no attn_mask, and this case needs one for {needed}"
    return None


@functools.cache
def kernel_unavailable_reason(kernel_name: str | None, device: str) -> str | None:
    """Why SDPA (forced to the kernel named ``kernel_name``, or PyTorch's choice) cannot run on
    ``device`` at all, found by running it on a tiny float16 (CUDA) or float32 (CPU) input."""
    kernel = None if kernel_name is None else SDPBackend.__members__[kernel_name]
    dev = torch.device(device)
    x = torch.zeros(1, 1, 8, 64, dtype=torch.float16 if dev.type == "cuda" else torch.float32, device=dev)
    try:
        with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            F.scaled_dot_product_attention(x, x, x)
    except RuntimeError as exc:
        label = "SDPA" if kernel is None else f"the {KERNEL_LABELS[kernel]} SDPA kernel"
        return f"torch {torch.__version__} cannot run {label} on {device}: {one_line(str(exc))}"
    return None


class SdpaBackend(BuiltinBackend):
    """``scaled_dot_product_attention`` with PyTorch's own kernel choice, adapted to CONTRACT.md."""

    name = "sdpa"
    description = "torch scaled_dot_product_attention, PyTorch's own kernel choice"
    kernel: ClassVar[SDPBackend | None] = None
    expand_kv: ClassVar[bool] = False  # True: K/V repeated to Hq heads instead of enable_gqa

    def __init__(self, device: str | None = None) -> None:
        super().__init__(device)
        reason = kernel_unavailable_reason(None if self.kernel is None else self.kernel.name, self.device)
        if reason is not None:
            raise BackendUnavailable(reason)

    # A sliding window is visibility, which the explicit boolean attn_mask expresses exactly; SDPA has
    # no function of the logits (soft-capping) and no extra denominator term (sinks).
    variants = ("window",)

    def supports(self, op: str, case: Case) -> bool | str:
        """A reason string when a documented PyTorch limit rules ``case`` out (:func:`kernel_limitation`),
        or a variant SDPA cannot express (soft-capping, sinks), else True."""
        if case.softcap is not None:
            return ("scaled_dot_product_attention cannot soft-cap logits (it applies no function to the scores "
                    "between the scale and the softmax)")
        if case.sinks is not None:
            return ("scaled_dot_product_attention has no attention sinks (no extra softmax denominator term, and "
                    "it returns no log-sum-exp to add one afterwards)")
        return kernel_limitation(self.kernel, torch.device(self.device).type, case) or True

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                  window_size: tuple[int, int] = (-1, -1)) -> AttentionResult:
        case = call_case(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                         window_size=window_size)
        attn_mask, is_causal = sdpa_mask(case, key_padding_mask, q.device)
        extra: dict[str, Any] = {}
        if case.group > 1:
            if self.expand_kv or not sdpa_has_enable_gqa():
                k = k.repeat_interleave(case.group, dim=1)
                v = v.repeat_interleave(case.group, dim=1)
            else:
                extra["enable_gqa"] = True
        out = self._sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **extra)
        return out if attn_mask is None else zero_unseen_rows(out, attn_mask)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.kernel is None:
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        # PyTorch explains a refusal in warnings, then raises: keep them for the error message.
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(self.kernel):
            warnings.simplefilter("always")
            try:
                out = F.scaled_dot_product_attention(q, k, v, **kwargs)
            except RuntimeError as exc:
                if not any(m in str(exc) for m in NO_KERNEL_MESSAGES):
                    raise
                said = "; ".join(dict.fromkeys(_refusal_reasons(caught)))
                raise KernelUnavailable(
                    f"No available kernel: {self.name} cannot run this call on {self.device} "
                    f"({one_line(str(exc))}{' PyTorch said: ' + said if said else ''})") from exc
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out


def _refusal_reasons(caught: list[warnings.WarningMessage]) -> list[str]:
    """PyTorch's reasons for refusing a call, from its warnings, without locations and headings."""
    reasons = []
    for w in caught:
        text = one_line(WARNING_NOISE.sub("", str(w.message)))
        if text and not text.endswith("because:") and "has been runtime disabled" not in text:
            reasons.append(text)
    return reasons


class SdpaMathBackend(SdpaBackend):
    """SDPA forced to the math kernel (fp16/bf16 computed internally in float32)."""

    name = "sdpa-math"
    description = "torch SDPA forced to the math kernel"
    kernel = SDPBackend.MATH


class SdpaFlashBackend(SdpaBackend):
    """SDPA forced to the flash kernel. On CUDA: fp16/bf16, no attn_mask (padding or Sq != Skv causal
    cases are skipped); on CPU torch's flash kernel takes masks and float32."""

    name = "sdpa-flash"
    description = "torch SDPA forced to the flash kernel"
    kernel = SDPBackend.FLASH_ATTENTION


class SdpaEfficientBackend(SdpaBackend):
    """SDPA forced to the memory-efficient kernel (CUDA only); K/V expanded to Hq heads."""

    name = "sdpa-efficient"
    description = "torch SDPA forced to the memory-efficient kernel (CUDA)"
    kernel = SDPBackend.EFFICIENT_ATTENTION
    expand_kv = True
    default_device = "cuda"


class SdpaCudnnBackend(SdpaBackend):
    """SDPA forced to the cuDNN kernel (CUDA only, float16/bfloat16)."""

    name = "sdpa-cudnn"
    description = "torch SDPA forced to the cuDNN kernel (CUDA)"
    kernel = SDPBackend.CUDNN_ATTENTION
    default_device = "cuda"


class CudaBackend(SdpaBackend):
    """The default CUDA stack: SDPA with PyTorch's kernel choice on the current CUDA device."""

    name = "cuda"
    description = "default CUDA stack: torch SDPA with PyTorch's kernel choice on the current CUDA device"
    default_device = "cuda"

    def __init__(self, device: str | None = None) -> None:
        super().__init__(device)
        if torch.device(self.device).type != "cuda":
            raise BackendUnavailable(f"the 'cuda' backend runs on CUDA devices, not {self.device!r}; use 'sdpa' there")
