"""Gradient invariance transforms: the gradients of a case's call (dQ, dK, dV for its upstream
gradient dO) under changed surroundings, and which of their parts must equal which, bit for bit.

Gradients are ``(dq, dk, dv)``: ``dq [B, Hq, Sq, D]``, ``dk, dv [B, Hkv, Skv, D]`` (for the KV-cache
op, of the concatenated keys: ``cat(dk_cache, dk_new)``). Every variant is built by slicing and
concatenating the case's own tensors (its grad_out included), never by drawing new data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from conformance.judge.transforms import OpCall
from conformance.spec.case import Case

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (dq, dk, dv)
GRAD_NAMES = ("dq", "dk", "dv")


@dataclass(frozen=True)
class GradVariant:
    """One call whose gradients must reproduce parts of another's: ``taken`` picks the parts of the
    variant's gradients, ``expected`` the same parts of the reference gradients — those of the case's
    own call, or of ``against`` (a call and its grad_out) when given. ``zero_keys``: keys of the
    variant whose dK and dV must be exactly 0 (masked keys it added)."""

    label: str
    call: OpCall
    grad_out: torch.Tensor
    taken: Callable[[Grads], Grads]
    expected: Callable[[Grads], Grads]
    against: tuple[OpCall, torch.Tensor] | None = None
    zero_keys: slice | None = None


def _same(g: Grads) -> Grads:
    return g


def _batch(idx: torch.Tensor | slice) -> Callable[[Grads], Grads]:
    return lambda g: (g[0][idx], g[1][idx], g[2][idx])


def _index(call: OpCall, grad_out: torch.Tensor, idx: torch.Tensor | slice) -> tuple[OpCall, torch.Tensor]:
    mask = None if call.key_padding_mask is None else call.key_padding_mask[idx]
    return replace(call, q=call.q[idx], k=call.k[idx], v=call.v[idx], key_padding_mask=mask), grad_out[idx]


def gradient_batch_variants(call: OpCall, grad_out: torch.Tensor, max_alone: int = 8) -> Iterator[GradVariant]:
    """Each sample alone (batch 1), the batch reversed, and the batch followed by its reverse: a
    sample's dQ, dK, dV must not depend on its neighbours or its position (N runs at B=1 against one
    at B=N, the users' gradient-invariance rule)."""
    b = call.q.shape[0]
    for i in range(min(b, max_alone)):
        sl = slice(i, i + 1)
        alone, go = _index(call, grad_out, sl)
        yield GradVariant(f"sample {i} alone (batch 1 of {b})", alone, go, _same, _batch(sl))
    if b > 1:
        rev = torch.arange(b - 1, -1, -1)  # on the host: it indexes the call's tensors and host copies alike
        perm, go = _index(call, grad_out, rev)
        yield GradVariant(f"batch of {b} reversed", perm, go, _batch(rev), _same)
    both = torch.cat([torch.arange(b), torch.arange(b - 1, -1, -1)])
    doubled, go = _index(call, grad_out, both)
    yield GradVariant(f"batch of {2 * b} (batch then its reverse)", doubled, go, _batch(slice(0, b)), _same)


def gradient_padding_variants(call: OpCall, grad_out: torch.Tensor, extra: int = 7) -> Iterator[GradVariant]:
    """Masked keys prepended (copies of real keys in the padded slots): dQ and the real keys' dK, dV
    unchanged, the added keys' dK, dV exactly 0; and, for a case with padding, NaN written into every
    padded key and value slot: no gradient may change (the padded keys' dK, dV stay exactly 0)."""
    n = min(extra, call.skv)
    b = call.q.shape[0]
    pad_mask = torch.zeros(b, n, dtype=torch.bool, device=call.q.device)
    mask = call.key_padding_mask if call.key_padding_mask is not None else torch.ones(
        b, call.skv, dtype=torch.bool, device=call.q.device)
    pre = replace(call, k=torch.cat([call.k[:, :, :n], call.k], 2), v=torch.cat([call.v[:, :, :n], call.v], 2),
                  key_padding_mask=torch.cat([pad_mask, mask], 1),
                  s_past=call.s_past + n if call.op == "kv_cache_attention" else 0)
    yield GradVariant(f"{n} masked keys prepended", pre, grad_out, lambda g: (g[0], g[1][:, :, n:], g[2][:, :, n:]),
                      _same, zero_keys=slice(0, n))
    if call.key_padding_mask is not None and not bool(call.key_padding_mask.all()):
        label = f"NaN in the padded keys and values ({int((~call.key_padding_mask).sum())} slots)"
        yield GradVariant(label, refill_padding(call, lambda x: torch.full_like(x, float("nan"))), grad_out,
                          _same, _same)


def refill_padding(call: OpCall, fill: Callable[[torch.Tensor], torch.Tensor]) -> OpCall:
    """``call`` with every padded key and value slot replaced by ``fill(k)``, ``fill(v)`` there."""
    padded = ~call.key_padding_mask[:, None, :, None].expand_as(call.k)
    return replace(call, k=torch.where(padded, fill(call.k), call.k), v=torch.where(padded, fill(call.v), call.v))


def gradient_split_variants(call: OpCall, grad_out: torch.Tensor, case: Case) -> Iterator[GradVariant]:
    """KV-cache op at each split point against the one-shot ``attention`` of the same query rows over
    the same keys: ``cat(dk_cache, dk_new)`` must equal the one-shot dK bitwise (dV likewise), and dQ
    must be unchanged."""
    if call.op != "kv_cache_attention":
        return
    for p in case.split_points:
        first = p - call.s_past  # the row of the case's q at position p
        rows, go = call.q[:, :, first:], grad_out[:, :, first:]
        split = replace(call, q=rows, s_past=p)
        one_shot = OpCall("attention", rows, call.k, call.v, call.key_padding_mask, call.causal, call.scale,
                          **call.variants())
        yield GradVariant(f"split at S_past={p} against one-shot attention", split, go, _same, _same,
                          against=(one_shot, go))
