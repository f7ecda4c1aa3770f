"""The Backend API (docs/backends.md) and the helpers that make a built-in honour CONTRACT.md.

A backend is any object with ``name: str``, ``device: str`` and at least one of the two ops::

    attention(q, k, v, *, causal, scale, key_padding_mask) -> out
    kv_cache_attention(q, k_cache, v_cache, k_new, v_new, *, causal, scale, key_padding_mask) -> out

Shapes (CONTRACT.md §1): ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Skv, D]``, ``out [B, Hq, Sq, D]``;
query head ``h`` reads KV head ``h // (Hq / Hkv)``; ``scale=None`` means ``1/sqrt(D)``, any explicit
value (``0.0`` too) is used as given; causal is bottom-right (row ``i`` sees key ``j`` iff
``j <= i + Skv - Sq``); ``key_padding_mask [B, Skv]`` bool, True = keep; a row that sees no key
outputs exactly 0. Optional members: ``supports(op, case)``, ``returns_lse``, ``output_dtype``,
``description``, ``variants``.

The attention variants (docs/backends.md, the terms table) are keyword arguments with defaults that
keep plain calls valid: ``window_size=(-1, -1)``, ``softcap=None``, ``sinks=None``. A backend lists the
ones it implements in ``variants`` (a subset of ``("window", "softcap", "sinks")``); the harness passes
a variant's keyword only for a case that uses it, and skips (with the reason) every case that uses a
variant the backend does not declare: a variant is never silently dropped.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Protocol, TypeAlias, runtime_checkable

import torch

from conformance.spec.case import Case
from conformance.spec.inputs import TORCH_DTYPES, visible

from .layouts import DenseLayouts

DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
AD_HOC_FAMILY = "backend-call"  # family of the Case built for one backend call (not from a spec)

# An op returns ``out``, or ``(out, lse)`` when the backend declares ``returns_lse = True``.
AttentionResult: TypeAlias = "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"


@runtime_checkable
class Backend(Protocol):
    """What the harness needs of every backend; the ops are optional and checked by ``validate_backend``."""

    name: str
    device: str


class BackendUnavailable(Exception):
    """Raised by a backend's constructor when it cannot run on this machine or device.

    ``str(exc)`` is the reason, shown by ``list_backends`` and in ``load_backend``'s error.
    """


class KernelUnavailable(RuntimeError):
    """Raised at call time when a forced kernel refuses one call ("No available kernel").

    The message starts with ``No available kernel`` and carries PyTorch's reasons; the harness
    reports the case as skipped for that backend, never as run by another kernel.
    """


VARIANT_KEYWORDS = {"window": "window_size", "softcap": "softcap", "sinks": "sinks"}


def call_case(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None,
              key_padding_mask: torch.Tensor | None, window_size: tuple[int, int] = (-1, -1),
              softcap: float | None = None, sinks: torch.Tensor | None = None) -> Case:
    """Check one ``attention`` call against CONTRACT.md and describe it as a :class:`Case`.

    Raises ``ValueError`` (shapes, GQA divisibility, mask, a window side below -1, a softcap that is
    not > 0, sinks not of shape [Hq]) or ``TypeError`` (dtypes, sinks not float32) naming the
    offending argument. The case's ``mask`` is ``"custom"`` when a key_padding_mask is given: the
    computation reads the mask tensor itself, never the mask name.
    """
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {arg} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
    b, hq, sq, d = q.shape
    _, hkv, skv, _ = k.shape
    if v.shape != k.shape:
        raise ValueError(f"attention: v has shape {tuple(v.shape)}, k has {tuple(k.shape)}; they must match")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k/v shape {tuple(k.shape)} does not fit q {tuple(q.shape)} "
                         "(batch and head dim must match)")
    if hq % hkv:
        raise ValueError(f"attention: Hq={hq} is not divisible by Hkv={hkv} (grouped-query attention needs "
                         "Hq % Hkv == 0)")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in DTYPE_NAMES:
        raise TypeError(f"attention: dtype {q.dtype} is not in the contract (float32, bfloat16, float16)")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (b, skv)):
        raise ValueError(f"attention: key_padding_mask must be bool [B={b}, Skv={skv}], got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    window = tuple(int(w) for w in window_size)
    if len(window) != 2 or min(window) < -1:
        raise ValueError(f"attention: window_size must be (left, right) with each -1 (unbounded) or >= 0, "
                         f"got {tuple(window_size)}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"attention: softcap must be a finite number > 0 (None: no soft-capping), got {softcap}")
    sink_values = None
    if sinks is not None:
        if sinks.dtype != torch.float32 or tuple(sinks.shape) != (hq,):
            raise (TypeError if sinks.dtype != torch.float32 else ValueError)(
                f"attention: sinks must be float32 [Hq={hq}], got {sinks.dtype} {tuple(sinks.shape)}")
        sink_values = tuple(float(x) for x in sinks.detach().cpu().tolist())
    return Case(id=f"{AD_HOC_FAMILY}/hq{hq}-hkv{hkv}-d{d}-b{b}-sq{sq}-skv{skv}", op="attention",
                family=AD_HOC_FAMILY, tier="smoke", batch=b, hq=hq, hkv=hkv, d=d, sq=sq, skv=skv,
                dtype=DTYPE_NAMES[q.dtype], causal=bool(causal), scale=None if scale is None else float(scale),
                mask="none" if key_padding_mask is None else "custom", dist="normal", seed=0,
                window=(window[0], window[1]), softcap=None if softcap is None else float(softcap), sinks=sink_values)


def concat_kv_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
                    v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k = cat([k_cache, k_new], dim=2)`` and the same for v; checks ``Sq == S_new`` (S_past may be 0)."""
    if q.dim() != 4 or k_new.dim() != 4:
        raise ValueError("kv_cache_attention: q and k_new must be 4-D [B, H, S, D]")
    if q.shape[2] != k_new.shape[2]:
        raise ValueError(f"kv_cache_attention: q has Sq={q.shape[2]} positions but k_new has S_new={k_new.shape[2]}; "
                         "q holds the new positions only")
    return torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)


def visible_keys(case: Case, key_padding_mask: torch.Tensor | None, device: torch.device | str) -> torch.Tensor:
    """Bool ``[B or 1, 1, Sq, Skv]``: which key each query row sees (bottom-right causal and padding).

    The rule is ``conformance.inputs.visible``, the one the reference uses.
    """
    kpm = None if key_padding_mask is None else key_padding_mask.detach().cpu()
    return visible(case, kpm)[:, None].to(device)


def zero_unseen_rows(out: torch.Tensor, see: torch.Tensor) -> torch.Tensor:
    """Rows of ``out`` whose query sees no key become exactly 0 (CONTRACT.md §1), whatever they held."""
    seen = see.any(-1, keepdim=True)
    return torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))


def cuda_unavailable_reason(device: str) -> str | None:
    """Why ``device`` (a CUDA device string) cannot be used here, or None when it can."""
    if torch.cuda.is_available():
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            return f"{device} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
        return None
    if torch.version.cuda is None:
        return f"CUDA is not available: torch {torch.__version__} is a build without CUDA"
    return f"CUDA is not available: torch {torch.__version__} sees no CUDA device"


def cuda_only_reason(device: str, kernel: str) -> str | None:
    """Why ``kernel``, which runs on CUDA devices only, cannot run on ``device``: not a CUDA device, or
    :func:`cuda_unavailable_reason`; None when it can."""
    if torch.device(device).type != "cuda":
        return f"{kernel} runs on CUDA devices; {device!r} is not one"
    return cuda_unavailable_reason(device)


def device_unavailable_reason(device: str) -> str | None:
    """Why ``device`` cannot hold tensors here (malformed string, no CUDA, index out of range), or None."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        return f"{device!r} is not a torch device string ({one_line(str(exc))})"
    if dev.type == "cuda":
        return cuda_unavailable_reason(device)
    return None


def one_line(text: str) -> str:
    """Collapse an exception text onto one line (errors are printed as a single line)."""
    return " ".join(text.split())


class BuiltinBackend(DenseLayouts, abc.ABC):
    """Base of the built-ins: holds ``device`` and implements ``kv_cache_attention`` through ``attention``,
    and the packed and paged layouts through it too (:class:`~conformance.backends.layouts.DenseLayouts`).

    Subclasses set ``name`` and ``description`` and implement ``attention``. The constructor raises
    :class:`BackendUnavailable` when ``device`` is not usable on this machine.
    """

    name: str = ""
    description: str = ""
    default_device: str = "cpu"

    def __init__(self, device: str | None = None) -> None:
        self.device = self.default_device if device is None else device
        reason = device_unavailable_reason(self.device)
        if reason is not None:
            raise BackendUnavailable(reason)

    variants: tuple[str, ...] = ()  # the attention variants it implements (docs/backends.md)

    @abc.abstractmethod
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                  **variants: Any) -> AttentionResult:
        """CONTRACT.md ``attention``; see the module docstring (``variants``: window_size, softcap, sinks)."""

    def kv_cache_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
                           v_new: torch.Tensor, *, causal: bool = True, scale: float | None = None,
                           key_padding_mask: torch.Tensor | None = None, **variants: Any) -> AttentionResult:
        """CONTRACT.md: concatenate cache then new keys on the sequence axis, then exactly ``attention``
        (the variants' keywords passed on as they are)."""
        k, v = concat_kv_cache(q, k_cache, v_cache, k_new, v_new)
        return self.attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, **variants)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} on {self.device}>"
