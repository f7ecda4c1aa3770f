"""FlexAttention (``torch.nn.attention.flex_attention``), compiled, adapted to CONTRACT.md.

The contract's visibility is one ``mask_mod``: key ``j`` is seen by row ``i`` of batch entry ``b``
iff ``keep[b, j]`` and ``j <= i + offset``, with ``keep`` the ``key_padding_mask`` (all True when
none is given), ``offset = Skv - Sq`` when causal (bottom-right) and ``Skv`` otherwise (no limit).
GQA goes through ``enable_gqa=True`` (FlexAttention maps query head ``h`` to KV head
``h // (Hq/Hkv)``); ``scale`` is passed through (``0.0`` stays 0.0). FlexAttention gives fully
masked rows an output of 0 itself; the adapter does not touch them.

The op always runs through ``torch.compile(dynamic=False)`` (eager FlexAttention is PyTorch's
unfused debugging path, a different kernel), and a static compile serves one shape. To compile once
per *shape family* rather than once per shape, every call runs at a bucketed shape:

- the batch, ``Sq`` and ``Skv`` are each rounded up to a power of two: the batch to at least 4,
  ``Sq`` and ``Skv`` to at least one 128-key tile, except that ``Sq = 1`` stays 1 (decode stays
  decode). A compile is keyed by (device, dtype, bucketed shape, Hq, Hkv, D, scale);
- ``q``, ``k``, ``v`` are copied into fresh contiguous zero-filled buffers of that shape (so the
  padded slots hold zeros, never NaN, and the strides never differ between calls);
- the padded keys and padded batch entries get ``keep = False`` and ``offset`` is computed from the
  real ``Sq`` and ``Skv``, so every real row sees exactly the keys the contract gives it, and a row
  that sees no real key sees no padded one either (output 0);
- the block mask is computed per tile (:func:`contract_block_mask`, equal to
  ``create_block_mask``'s) without materialising the ``[B, Sq, Skv]`` mask; tiles of padded keys
  and padded batch entries are empty, so the kernel skips them;
- the padded query rows and batch entries are sliced off the output.

The output is the contract's attention of the real inputs. What the bucket changes is the kernel's
tiling (how the keys and rows are split over tiles and threads), so calls whose shapes fall in
different buckets may differ in the last bits: a bitwise invariance failure of ``flex`` is a
property of FlexAttention run at the bucketed shapes.

Dynamic shapes are not used: in torch 2.13 on CPU ``dynamic=True`` still recompiles on
0/1-specialised sizes and whenever the number of KV tiles changes, and such a recompile can emit
C++ that does not build (``'cur_qSplitSize8' was not declared``); ``mark_dynamic`` on the sequence
dims raises ``ConstraintViolationError`` for some shapes. Buckets run the same static code path on
every device.

Dynamo's silent fallbacks to eager are turned into errors for the duration of a call:
``suppress_errors`` off, ``fail_on_recompile_limit_hit`` on where torch has it, and a high recompile
limit. Constructing the backend compiles nothing: it checks that FlexAttention exists and that the
device's code generator has what it needs (a C++ compiler on CPU, Triton on CUDA). A compile
failure surfaces on the first call of its bucket as :class:`FlexCompileError` with torch's reason;
the failure is remembered, so later calls of that bucket fail at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .contract import AttentionResult, BackendUnavailable, BuiltinBackend, call_case, one_line

# Every bucket is one static compile; the limit is high because reaching it would otherwise make
# dynamo run eager code silently.
RECOMPILE_LIMIT = 1 << 16
# FlexAttention's tile of the block mask (create_block_mask's default, on every device).
SPARSE_BLOCK = 128
# Bucket floors. Sq and Skv: one tile, so every short sequence (chunks, a short prompt) shares the
# compile of its family; Sq = 1 is exempt, a decode stays a one-row decode (on CUDA FlexAttention
# runs its decoding kernel for short queries). Batch: the harness calls B, 1 and 2B rows per case;
# padded entries have no visible tile, so the kernel skips them and they cost only zero-filled copies.
SQ_MIN_BUCKET = SPARSE_BLOCK
SKV_MIN_BUCKET = SPARSE_BLOCK
BATCH_MIN_BUCKET = 4

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BucketKey = tuple[str, torch.dtype, int, int, int, int, int, int, "float | None"]


class FlexCompileError(RuntimeError):
    """Compiled FlexAttention could not be built or run for one bucket; the message has torch's reason."""


def bucket(n: int, minimum: int = 1) -> int:
    """The bucket of a size: the smallest power of two ``>= max(n, minimum)``."""
    return 1 << (max(n, minimum, 1) - 1).bit_length()


def bucket_shape(batch: int, sq: int, skv: int) -> tuple[int, int, int]:
    """The (batch, Sq, Skv) a call runs at: powers of two, with the floors above (``Sq = 1`` kept)."""
    return (bucket(batch, BATCH_MIN_BUCKET), 1 if sq == 1 else bucket(sq, SQ_MIN_BUCKET),
            bucket(skv, SKV_MIN_BUCKET))


def contract_mask_mod(keep: torch.Tensor, offset: torch.Tensor) -> MaskMod:
    """FlexAttention ``mask_mod`` of CONTRACT.md visibility. ``keep`` bool ``[B, Skv]``, ``offset``
    a 0-d int64 tensor. Every call returns a function with the same code, so compiled code is reused."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return keep[b, kv_idx] & (kv_idx <= q_idx + offset)

    return mask_mod


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of tiles: how many are set and their indices first (ascending), as create_block_mask orders them."""
    dense = tiles.to(torch.int32)
    return (dense.sum(-1, dtype=torch.int32).contiguous(),
            torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32).contiguous())


def contract_block_mask(keep: torch.Tensor, offset: int, sq: int, skv: int) -> Any:
    """The ``BlockMask`` of :func:`contract_mask_mod` for ``sq`` rows and ``skv = keep.shape[1]`` keys.

    Equal to ``create_block_mask(contract_mask_mod(keep, offset), B, None, sq, skv)`` (the tests
    compare them) but computed per 128×128 tile from the first kept key of each key tile, in
    O(B · tiles) instead of materialising the ``[B, sq, skv]`` mask. A tile is *partial* when some
    row sees some key in it and *full* when every row (all ``SPARSE_BLOCK`` of them in range) sees
    every key (all in range and kept); full tiles skip the ``mask_mod`` in the kernel.
    """
    from torch.nn.attention.flex_attention import BlockMask

    dev, n = keep.device, SPARSE_BLOCK
    nq, nkv = -(-sq // n), -(-skv // n)
    tiles = torch.nn.functional.pad(keep, (0, nkv * n - skv)).view(keep.shape[0], nkv, n)  # out of range: False
    pos = torch.arange(nkv * n, device=dev).view(nkv, n)
    first_kept = torch.where(tiles, pos, nkv * n).amin(-1)[:, None, None, :]  # [B, 1, 1, nkv]
    any_kept, all_kept = tiles.any(-1)[:, None, None, :], tiles.all(-1)[:, None, None, :]
    q_first = torch.arange(nq, device=dev) * n
    q_last = (q_first + n).clamp(max=sq) - 1
    kv_last = torch.arange(nkv, device=dev) * n + n - 1
    some = any_kept & (first_kept <= (q_last + offset)[:, None])  # row i sees key j iff kept, j <= i + offset
    full = all_kept & (q_first + n <= sq)[:, None] & (kv_last[None, :] <= (q_first + offset)[:, None])
    kv_num, kv_idx = _ordered(some & ~full)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(n, n),
                                    mask_mod=contract_mask_mod(keep, torch.tensor(offset, device=dev)),
                                    seq_lengths=(sq, skv))


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
    with cfg.patch(**changes):
        yield


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# Buckets whose compile (or compiled run) failed, with the error text: later calls fail at once.
_FAILED: dict[BucketKey, str] = {}


def _padded(t: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``t [B, H, S, D]`` copied into a contiguous zero buffer ``[batch, H, seq, D]``."""
    out = t.new_zeros(batch, t.shape[1], seq, t.shape[3])
    out[: t.shape[0], :, : t.shape[2]] = t
    return out


def flex_contract_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                            scale: float | None, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """CONTRACT.md ``attention`` through compiled FlexAttention, run at the bucketed shape."""
    case = call_case(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    b, sq, skv = bucket_shape(case.batch, case.sq, case.skv)
    key: BucketKey = (str(q.device), q.dtype, b, case.hq, case.hkv, sq, skv, case.d, scale)
    if key in _FAILED:
        raise FlexCompileError(_FAILED[key])
    keep = torch.zeros(b, skv, dtype=torch.bool, device=q.device)
    keep[: case.batch, : case.skv] = True if key_padding_mask is None else key_padding_mask.to(q.device)
    block_mask = contract_block_mask(keep, case.skv - case.sq if case.causal else case.skv, sq, skv)
    qp, kp, vp = _padded(q, b, sq), _padded(k, b, skv), _padded(v, b, skv)
    # FlexAttention has no backward on the CPU (FlexBackend.supports declines the gradient cases there);
    # its forward runs there only without autograd.
    grad = torch.is_grad_enabled() and q.device.type != "cpu"
    try:
        with no_silent_fallback(), torch.set_grad_enabled(grad):
            out = compiled_flex_attention()(qp, kp, vp, block_mask=block_mask, scale=scale,
                                            enable_gqa=case.group > 1)
    except torch.OutOfMemoryError:  # a property of this call's size, not of the bucket's code
        raise
    except Exception as exc:  # InductorError, BackendCompilerFailed, a Triton error, ...
        _FAILED[key] = (f"flex: torch {torch.__version__} cannot run compiled FlexAttention on {q.device} "
                        f"for {q.dtype} B={b} Hq={case.hq} Hkv={case.hkv} Sq={sq} Skv={skv} D={case.d} "
                        f"(bucket of B={case.batch} Sq={case.sq} Skv={case.skv}): "
                        f"{type(exc).__name__}: {one_line(str(exc))[:400]}")
        raise FlexCompileError(_FAILED[key]) from exc
    return out[: case.batch, :, : case.sq].contiguous()


def _cpp_compiler() -> str:
    """The C++ compiler Inductor's CPU code generation looks for first (``$CXX`` or the platform default)."""
    return os.environ.get("CXX") or {"darwin": "clang++", "win32": "cl"}.get(sys.platform, "g++")


@functools.cache
def flex_unavailable_reason(device: str) -> str | None:
    """Why compiled FlexAttention cannot run on ``device``, from cheap preconditions (nothing is compiled)."""
    try:
        import torch.nn.attention.flex_attention
    except ImportError as exc:
        return f"torch {torch.__version__} has no FlexAttention ({one_line(str(exc))}); it needs torch >= 2.5"
    dev = torch.device(device)
    if dev.type == "cpu":
        cxx = _cpp_compiler()
        if shutil.which(cxx) is None:
            return f"no C++ compiler {cxx!r} on PATH: Inductor needs one to compile FlexAttention for the CPU"
        return None
    if dev.type == "cuda":
        from torch.utils._triton import has_triton_package

        if not has_triton_package():
            return f"torch {torch.__version__} has no Triton: Inductor needs it to compile FlexAttention for CUDA"
        major, minor = torch.cuda.get_device_capability(dev)
        if major < 7:
            return f"{device} has compute capability {major}.{minor}; Triton needs 7.0 or newer"
        return None
    return None  # other devices: the first call finds out


class FlexBackend(BuiltinBackend):
    """``torch.compile(flex_attention)`` with the contract's mask as a ``mask_mod``, shapes bucketed."""

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

    def supports(self, op: str, case: Any) -> bool | str:
        """Gradients through autograd of compiled FlexAttention, except on the CPU, where it has no backward."""
        if op.endswith("_backward") and torch.device(self.device).type == "cpu":
            return (f"FlexAttention has no backward on the CPU (torch {torch.__version__}); run flex on a GPU for "
                    "gradients")
        return True
