"""Seeded inputs of a case, drawn so that they are exactly representable in the case dtype.

The generator is documented in docs/golden-format.md so that anyone can reproduce the inputs:
``numpy.random.Generator(numpy.random.PCG64(case.seed))`` draws, in this order, q, k, v (float64,
C order, shapes of CONTRACT.md) and then the key_padding_mask; each float64 array is rounded to the
case dtype with round-to-nearest-even (through float32 for bfloat16 and float16, as torch does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from conformance.spec.case import Case

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Distribution constants (documented in docs/golden-format.md).
LARGE_LOGIT_STD = 8.0  # q, k ~ N(0, 8²): logits have a standard deviation of ~64 and reach the hundreds
NEAR_TIE_NOISE = 1.0 / 64.0  # k_j = k_base + N(0, (1/64)²): logits tie within a few ulps of the dtype
KEEP_PROBABILITY = 0.75  # mask 'holes': each key kept with this probability


@dataclass(frozen=True)
class CaseInputs:
    """Inputs in the case dtype (CPU tensors). For the KV-cache op, ``k``/``v`` hold cache then new keys."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None  # bool [batch, skv], True = keep
    grad_out: torch.Tensor | None = None  # the upstream gradient dO [batch, hq, sq, d] of a case with gradients
    sinks: torch.Tensor | None = None  # float32 [hq]: the sink logit of each query head (case.sinks)


def round_to_dtype(x: np.ndarray, dtype: str) -> torch.Tensor:
    """float64 array → tensor of ``dtype`` with round-to-nearest-even (via float32 for 16-bit types)."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(torch.float32).to(TORCH_DTYPES[dtype])


def make_inputs(case: Case) -> CaseInputs:
    """The seeded inputs of ``case`` (docs/golden-format.md): q, k, v from ``PCG64(case.seed)``, the
    key padding mask, and for a case with gradients the upstream gradient (:func:`make_grad_out`)."""
    rng = np.random.Generator(np.random.PCG64(case.seed))
    q_shape = (case.batch, case.hq, case.sq, case.d)
    kv_shape = (case.batch, case.hkv, case.skv, case.d)
    if case.dist == "normal":
        q, k, v = (rng.standard_normal(s) for s in (q_shape, kv_shape, kv_shape))
    elif case.dist == "uniform":
        q, k, v = (rng.uniform(-1.0, 1.0, s) for s in (q_shape, kv_shape, kv_shape))
    elif case.dist == "large_logits":
        q = LARGE_LOGIT_STD * rng.standard_normal(q_shape)
        k = LARGE_LOGIT_STD * rng.standard_normal(kv_shape)
        v = rng.standard_normal(kv_shape)
    elif case.dist == "near_ties":
        q = rng.standard_normal(q_shape)
        base = rng.standard_normal((case.batch, case.hkv, 1, case.d))
        k = base + NEAR_TIE_NOISE * rng.standard_normal(kv_shape)
        v = rng.standard_normal(kv_shape)
    else:  # pragma: no cover - the spec validates dist
        raise ValueError(f"unknown distribution {case.dist!r}")
    mask = make_key_padding_mask(rng, case)
    return CaseInputs(round_to_dtype(q, case.dtype), round_to_dtype(k, case.dtype), round_to_dtype(v, case.dtype),
                      None if mask is None else torch.from_numpy(mask), make_grad_out(case) if case.grad else None,
                      sink_tensor(case))


def sink_tensor(case: Case) -> torch.Tensor | None:
    """``case.sinks`` as the float32 [Hq] tensor the op takes (None without sinks)."""
    return None if case.sinks is None else torch.tensor(case.sinks, dtype=torch.float32)


def make_key_padding_mask(rng: np.random.Generator, case: Case) -> np.ndarray | None:
    b, skv = case.batch, case.skv
    if case.mask == "none":
        return None
    if case.mask in ("right_pad", "left_pad"):
        lengths = rng.integers(1, skv + 1, size=b)
        if skv > 1 and np.all(lengths == skv):
            lengths[0] = skv - 1  # at least one padded key somewhere
        cols = np.arange(skv)[None, :]
        if case.mask == "right_pad":
            return cols < lengths[:, None]
        return cols >= (skv - lengths)[:, None]
    if case.mask == "holes":
        keep = rng.random((b, skv)) < KEEP_PROBABILITY
        forced = rng.integers(0, skv, size=b)  # every batch entry keeps at least one key
        keep[np.arange(b), forced] = True
        return keep
    if case.mask == "all_masked":
        # Even batch entries see no key at all (their rows output 0); odd entries see every key.
        return np.repeat((np.arange(b) % 2 == 1)[:, None], skv, axis=1)
    raise ValueError(f"unknown mask {case.mask!r}")  # pragma: no cover


def visible(case: Case, key_padding_mask: torch.Tensor | None,
            rows: slice | np.ndarray | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [batch or 1, rows, skv] of which key each query row sees (padding, causal and window rules);
    ``rows`` is a slice of the query rows (all by default) or an array of row indices; built on ``device``.

    Row ``i``'s diagonal is key ``i + Skv - Sq`` (bottom-right aligned); causal keeps keys up to it,
    a window (left, right) keeps keys in [diagonal - left, diagonal + right] (-1: unbounded side)."""
    rows = rows if rows is not None else slice(0, case.sq)
    i = (torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice)
         else torch.as_tensor(rows, dtype=torch.long).to(device))
    diag = i[:, None] + (case.skv - case.sq)
    j = torch.arange(case.skv, device=device)[None, :]
    see = (j <= diag) if case.causal else torch.ones(diag.shape[0], case.skv, dtype=torch.bool, device=device)
    left, right = case.window
    if left >= 0:
        see = see & (j >= diag - left)
    if right >= 0:
        see = see & (j <= diag + right)
    see = see[None]
    if key_padding_mask is not None:
        see = see & key_padding_mask.to(device)[:, None, :]
    return see


def leading_keys_kept(case: Case, key_padding_mask: torch.Tensor | None) -> int:
    """How many leading keys every batch entry keeps (``case.skv`` without a padding mask): the keys
    before the first padded one of any entry."""
    if key_padding_mask is None:
        return case.skv
    padded = (~key_padding_mask.to("cpu", torch.bool)).any(0)
    return int(padded.to(torch.int8).argmax()) if bool(padded.any()) else case.skv


def block_sees_every_key(case: Case, kept: int, row_start: int, row_end: int, keys: int) -> bool:
    """Whether every query row in ``[row_start, row_end)`` sees each of the first ``keys`` keys, i.e.
    ``visible(case, mask, slice(row_start, row_end))[..., :keys].all()``, decided from the causal and
    window rules and ``kept`` (:func:`leading_keys_kept`) without building the mask. The bounds grow
    with the row, so the first row's right bound (:func:`key_limit` of that row) and the last row's
    left bound decide."""
    if keys <= 0:
        return True
    if keys > kept or keys > key_limit(case, row_start + 1):
        return False
    left = case.window[0]
    return not (left >= 0 and row_end - 1 + case.skv - case.sq - left > 0)  # the last row's diagonal - left


def key_limit(case: Case, row_end: int) -> int:
    """How many leading keys the rows before ``row_end`` may see at most (causal and the window's right
    side): the keys beyond are skipped by the reference's blocks. May be <= 0 (no row sees a key)."""
    limit = case.skv
    diag = row_end - 1 + case.skv - case.sq
    if case.causal:
        limit = min(limit, diag + 1)
    if case.window[1] >= 0:
        limit = min(limit, diag + case.window[1] + 1)
    return limit


def make_grad_out(case: Case) -> torch.Tensor:
    """The seeded upstream gradient of ``case``: [B, Hq, Sq, D] in the case dtype, drawn as
    ``numpy.random.Generator(numpy.random.PCG64([case.seed, 1])).standard_normal(shape)`` and rounded
    to the dtype (nearest-even, via float32) like the inputs."""
    rng = np.random.Generator(np.random.PCG64([case.seed, 1]))
    return round_to_dtype(rng.standard_normal((case.batch, case.hq, case.sq, case.d)), case.dtype)
