"""FlexAttention (``torch.nn.attention.flex_attention``), compiled, adapted to CONTRACT.md.

The contract's visibility is one ``mask_mod``: key ``j`` is seen by row ``i`` of batch entry ``b``
iff ``keep[b, j]`` and ``lo <= j - i <= hi``, with ``keep`` the ``key_padding_mask`` (all True when
none is given) and the bounds from the bottom-right diagonal ``i + Skv - Sq`` (:func:`key_bounds`):
causal is ``hi = Skv - Sq`` (otherwise ``Skv``: no limit), a sliding window ``(left, right)`` adds
``lo = Skv - Sq - left`` and ``hi <= Skv - Sq + right``. GQA goes through ``enable_gqa=True``
(FlexAttention maps query head ``h`` to KV head ``h // (Hq/Hkv)``); ``scale`` is passed through
(``0.0`` stays 0.0). FlexAttention gives fully masked rows an output of 0 itself.

Soft-capping and sinks are one ``score_mod`` (:func:`contract_score_mod`): the scaled score becomes
``softcap·tanh(score / softcap)`` (masking comes after it, as the contract says). Compiled FlexAttention
on CPU cannot return the log-sum-exp (torch 2.13: ``return_lse`` is not supported yet), so the sinks
are one more key instead: the first padded slot after the real keys, value 0, seen by every real row,
whose score the ``score_mod`` replaces by the head's sink logit (not capped). The kernel's softmax then
gives ``Σ e^{s_j} v_j / (Σ e^{s_j} + e^{sink})`` exactly, within its own max-subtracted running sums,
and a row that sees no key but the sink outputs 0 (its only weight is on a zero value). The cap,
the sinks and the bounds are captured tensors: their values never trigger a compile; whether a
``score_mod`` runs does.

The op always runs through ``torch.compile(dynamic=False)`` (eager FlexAttention is PyTorch's
unfused debugging path, a different kernel), and a static compile serves one shape. To compile once
per *shape family* rather than once per shape, every call runs at a bucketed shape:

- the batch, ``Sq`` and ``Skv`` are each rounded up to a power of two: the batch to at least 4,
  ``Sq`` and ``Skv`` to at least one 128-key tile, except that ``Sq = 1`` stays 1 (decode stays
  decode), ``Skv`` counting the sink slot. A compile is keyed by (device, dtype, bucketed shape, Hq,
  Hkv, D, scale, whether a score_mod runs);
- ``q``, ``k``, ``v`` are copied into fresh contiguous zero-filled buffers of that shape (so the
  padded slots hold zeros, never NaN, and the strides never differ between calls);
- the padded keys and padded batch entries get ``keep = False`` and the bounds are computed from the
  real ``Sq`` and ``Skv``, so every real row sees exactly the keys the contract gives it, and a row
  that sees no real key sees no padded one either (output 0);
- the block mask is computed per tile (:func:`contract_block_mask`, equal to
  ``create_block_mask``'s) without materialising the ``[B, Sq, Skv]`` mask; tiles of padded keys,
  of padded batch entries and tiles wholly outside a window are empty, so the kernel skips them;
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

from conformance.spec.case import Case

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
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (device, dtype, B, Hq, Hkv, Sq, Skv, D, scale, whether a score_mod runs): the variants' values are
# captured tensors, never part of the key.
BucketKey = tuple[str, torch.dtype, int, int, int, int, int, int, "float | None", bool]


class FlexCompileError(RuntimeError):
    """Compiled FlexAttention could not be built or run for one bucket; the message has torch's reason."""


def bucket(n: int, minimum: int = 1) -> int:
    """The bucket of a size: the smallest power of two ``>= max(n, minimum)``."""
    return 1 << (max(n, minimum, 1) - 1).bit_length()


def bucket_shape(batch: int, sq: int, skv: int) -> tuple[int, int, int]:
    """The (batch, Sq, Skv) a call runs at: powers of two, with the floors above (``Sq = 1`` kept)."""
    return (bucket(batch, BATCH_MIN_BUCKET), 1 if sq == 1 else bucket(sq, SQ_MIN_BUCKET),
            bucket(skv, SKV_MIN_BUCKET))


def contract_mask_mod(keep: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, sink: torch.Tensor) -> MaskMod:
    """FlexAttention ``mask_mod`` of CONTRACT.md visibility: row ``i`` of entry ``b`` sees key ``j`` iff
    ``keep[b, j]`` and either ``lo <= j - i <= hi`` (causal and window, :func:`key_bounds`) or ``j == sink``
    (the slot holding the sink logits; -1: none). ``keep`` bool ``[B, Skv]``, the others 0-d int64
    tensors. Every call returns a function with the same code, so compiled code is reused."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        rel = kv_idx - q_idx
        return keep[b, kv_idx] & (((rel >= lo) & (rel <= hi)) | (kv_idx == sink))

    return mask_mod


def contract_score_mod(cap: torch.Tensor, sinks: torch.Tensor, sink: torch.Tensor) -> ScoreMod:
    """FlexAttention ``score_mod`` of soft-capping and sinks: the scaled score becomes
    ``cap·tanh(score / cap)`` when ``cap > 0`` (0: off), and the score of key slot ``sink`` becomes the
    head's sink logit ``sinks[h]`` (not capped). ``cap`` 0-d float32, ``sinks`` float32 ``[Hq]``, ``sink``
    0-d int64 (-1: no sinks): values never change the code, so one compile serves every cap and sink."""

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                  kv_idx: torch.Tensor) -> torch.Tensor:
        on = cap > 0
        safe = torch.where(on, cap, 1.0)  # no 0/0 in the branch where() drops (its gradient would be NaN)
        capped = torch.where(on, safe * torch.tanh(score / safe), score)
        return torch.where(kv_idx == sink, sinks[h].to(score.dtype), capped)

    return score_mod


def key_bounds(case: Case, sq_bucket: int) -> tuple[int, int]:
    """``(lo, hi)``: row ``i`` may see key ``j`` iff ``lo <= j - i <= hi`` (before padding), from the
    bottom-right diagonal ``i + Skv - Sq`` of the real sizes: causal is ``hi = Skv - Sq``, a window
    ``(left, right)`` adds ``lo = Skv - Sq - left`` and ``hi <= Skv - Sq + right``; an unbounded side is
    a bound no key reaches (``-sq_bucket`` below, ``Skv`` above)."""
    diag = case.skv - case.sq
    left, right = case.window
    hi = diag if case.causal else case.skv
    if right >= 0:
        hi = min(hi, diag + right)
    return (diag - left if left >= 0 else -sq_bucket), hi


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of tiles: how many are set and their indices first (ascending), as create_block_mask orders them."""
    dense = tiles.to(torch.int32)
    return (dense.sum(-1, dtype=torch.int32).contiguous(),
            torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32).contiguous())


def contract_block_mask(keep: torch.Tensor, lo: int, hi: int, sq: int, skv: int, sink: int = -1) -> Any:
    """The ``BlockMask`` of :func:`contract_mask_mod` for ``sq`` rows and ``skv = keep.shape[1]`` keys.

    Equal to ``create_block_mask(contract_mask_mod(keep, lo, hi, sink), B, None, sq, skv)`` (the tests
    compare them) but computed per 128×128 tile from prefix counts of the kept keys, in
    O(B · tiles) instead of materialising the ``[B, sq, skv]`` mask. A tile is *partial* when some
    row sees some key in it (a kept key with ``lo <= j - i <= hi``, or the kept sink slot) and *full*
    when every row (all ``SPARSE_BLOCK`` of them in range) sees every key (all kept, each in every
    row's bounds or the sink); full tiles skip the ``mask_mod`` in the kernel. Tiles wholly outside
    the window are empty, so the kernel skips them.
    """
    from torch.nn.attention.flex_attention import BlockMask

    dev, n = keep.device, SPARSE_BLOCK
    nq, nkv = -(-sq // n), -(-skv // n)
    padded = torch.nn.functional.pad(keep, (0, nkv * n - skv))  # out of range: False
    tiles = padded.view(keep.shape[0], nkv, n)
    kept_before = torch.nn.functional.pad(padded.to(torch.int64).cumsum(-1), (1, 0))  # [B, nkv·n + 1]
    all_kept = tiles.all(-1)[:, None, None, :]  # [B, 1, 1, nkv]
    q_first = torch.arange(nq, device=dev) * n
    q_last = (q_first + n).clamp(max=sq) - 1
    kv_first = torch.arange(nkv, device=dev) * n
    kv_last = kv_first + n - 1
    # Key j is seen by some row of a q tile iff q_first + lo <= j <= q_last + hi: count the kept keys
    # of each key tile in that range.
    start = torch.maximum(kv_first[None, :], (q_first + lo)[:, None]).clamp(0, nkv * n)  # [nq, nkv]
    stop = torch.minimum(kv_last[None, :], (q_last + hi)[:, None]).clamp(-1, nkv * n - 1) + 1
    stop = torch.maximum(stop, start)
    counted = kept_before[:, stop.flatten()] - kept_before[:, start.flatten()]
    some = (counted > 0).view(keep.shape[0], 1, nq, nkv)
    in_tile = (kv_first <= sink) & (sink <= kv_last)
    if sink >= 0:
        some = some | (in_tile & keep[:, sink, None, None, None])
    last_bounded = kv_last - (in_tile & (kv_last == sink)).to(kv_last.dtype)  # the sink needs no bound
    full = (all_kept & (q_first + n <= sq)[:, None] & ((kv_first[None, :] - (q_first + n - 1)[:, None]) >= lo)
            & ((last_bounded[None, :] - q_first[:, None]) <= hi))
    kv_num, kv_idx = _ordered(some & ~full)
    full_num, full_idx = _ordered(full)
    mask_mod = contract_mask_mod(*_captured(keep, lo, hi, sink))
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(n, n), mask_mod=mask_mod,
                                    seq_lengths=(sq, skv))


def _captured(keep: torch.Tensor, lo: int, hi: int, sink: int) -> tuple[torch.Tensor, ...]:
    """The mask_mod's arguments: ``keep`` and 0-d int64 tensors of the bounds and the sink slot."""
    return (keep, *(torch.tensor(x, dtype=torch.int64, device=keep.device) for x in (lo, hi, sink)))


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
                            scale: float | None, key_padding_mask: torch.Tensor | None,
                            window_size: tuple[int, int] = (-1, -1), softcap: float | None = None,
                            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """CONTRACT.md ``attention`` (with its variants) through compiled FlexAttention, run at the bucketed shape."""
    case = call_case(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                     window_size=window_size, softcap=softcap, sinks=sinks)
    # The sinks take the first key slot after the real keys (value 0): one more key for the bucket.
    sink = case.skv if sinks is not None else -1
    b, sq, skv = bucket_shape(case.batch, case.sq, case.skv + (sinks is not None))
    with_score_mod = softcap is not None or sinks is not None
    key: BucketKey = (str(q.device), q.dtype, b, case.hq, case.hkv, sq, skv, case.d, scale, with_score_mod)
    if key in _FAILED:
        raise FlexCompileError(_FAILED[key])
    keep = torch.zeros(b, skv, dtype=torch.bool, device=q.device)
    keep[: case.batch, : case.skv] = True if key_padding_mask is None else key_padding_mask.to(q.device)
    if sink >= 0:
        keep[: case.batch, sink] = True
    lo, hi = key_bounds(case, sq)
    block_mask = contract_block_mask(keep, lo, hi, sq, skv, sink)
    score_mod = None
    if with_score_mod:
        score_mod = contract_score_mod(
            torch.tensor(softcap or 0.0, dtype=torch.float32, device=q.device),
            torch.zeros(case.hq, dtype=torch.float32, device=q.device) if sinks is None
            else sinks.to(q.device, torch.float32),
            torch.tensor(sink, dtype=torch.int64, device=q.device))
    qp, kp, vp = _padded(q, b, sq), _padded(k, b, skv), _padded(v, b, skv)
    # FlexAttention has no backward on the CPU (FlexBackend.supports declines the gradient cases there);
    # its forward runs there only without autograd.
    grad = torch.is_grad_enabled() and q.device.type != "cpu"
    try:
        with no_silent_fallback(), torch.set_grad_enabled(grad):
            out = compiled_flex_attention()(qp, kp, vp, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                            enable_gqa=case.group > 1)
    except torch.OutOfMemoryError:  # a property of this call's size, not of the bucket's code
        raise
    except Exception as exc:  # InductorError, BackendCompilerFailed, a Triton error, ...
        _FAILED[key] = (f"flex: torch {torch.__version__} cannot run compiled FlexAttention on {q.device} "
                        f"for {q.dtype} B={b} Hq={case.hq} Hkv={case.hkv} Sq={sq} Skv={skv} D={case.d} "
                        f"{'with' if with_score_mod else 'without'} score_mod "
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
    description = ("torch FlexAttention (torch.compile'd), mask_mod for bottom-right causal, window and padding, "
                   "score_mod for softcap and sinks")
    variants = ("window", "softcap", "sinks")

    def __init__(self, device: str | None = None) -> None:
        super().__init__(device)
        reason = flex_unavailable_reason(self.device)
        if reason is not None:
            raise BackendUnavailable(reason)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                  window_size: tuple[int, int] = (-1, -1), softcap: float | None = None,
                  sinks: torch.Tensor | None = None) -> AttentionResult:
        return flex_contract_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                       window_size=window_size, softcap=softcap, sinks=sinks)

    def supports(self, op: str, case: Any) -> bool | str:
        """Gradients through autograd of compiled FlexAttention, except on the CPU, where it has no backward."""
        if op.endswith("_backward") and torch.device(self.device).type == "cpu":
            return (f"FlexAttention has no backward on the CPU (torch {torch.__version__}); "
                    "run flex on a GPU for gradients")
        return True
