"""Calling a backend: every call goes through :class:`Invoker`, which checks the op contract."""

from __future__ import annotations

from typing import Any

import torch

from conformance.backends.contract import KernelUnavailable, one_line
from conformance.judge.invariance import bit_view
from conformance.judge.transforms import OpCall
from conformance.run.profiling import NO_TIMER, PhaseTimer


class BackendCallError(Exception):
    """The backend raised; carries the original exception text."""


class ContractViolation(Exception):
    """The backend returned something the op contract forbids."""


class KernelSkipped(Exception):
    """The backend raised KernelUnavailable: it cannot take this call (reported as skipped)."""


class Invoker:
    """Calls one backend and checks the op contract on every call (shape, dtype, device, finite
    output, inputs unchanged, no exception). Violations are collected for the case's contract record.
    ``timer`` (``--profile``) is charged the backend calls and the copies to and from the device."""

    def __init__(self, backend: Any, timer: PhaseTimer = NO_TIMER) -> None:
        self.backend = backend
        self.device = torch.device(backend.device)
        self.returns_lse = bool(getattr(backend, "returns_lse", False))
        self.output_dtype = getattr(backend, "output_dtype", None)
        self.violations: list[str] = []
        self.timer = timer

    def has(self, op: str) -> bool:
        return callable(getattr(self.backend, op, None))

    def to_device(self, call: OpCall) -> OpCall:
        with self.timer.phase("transfer"):
            mask = None if call.key_padding_mask is None else call.key_padding_mask.to(self.device)
            return OpCall(call.op, call.q.to(self.device), call.k.to(self.device), call.v.to(self.device), mask,
                          call.causal, call.scale, call.s_past)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the CPU, for judging (the same tensor when it is there already)."""
        with self.timer.phase("transfer"):
            return t.detach().cpu()

    def __call__(self, call: OpCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        fn = getattr(self.backend, call.op)
        kwargs = {"causal": call.causal, "scale": call.scale, "key_padding_mask": call.key_padding_mask}
        if call.op == "attention":
            args: tuple[torch.Tensor, ...] = (call.q, call.k, call.v)
        else:
            p = call.s_past
            args = (call.q, call.k[:, :, :p], call.v[:, :, :p], call.k[:, :, p:], call.v[:, :, p:])
        watched = [*args, *([call.key_padding_mask] if call.key_padding_mask is not None else [])]
        before = [t.clone() for t in watched]
        try:
            with self.timer.phase("backend"):
                result = fn(*args, **kwargs)
        except KernelUnavailable as exc:
            raise KernelSkipped(one_line(str(exc))) from exc
        except Exception as exc:  # a backend may raise anything; it becomes an 'error' record
            raise BackendCallError(f"{type(exc).__name__}: {exc}".strip().splitlines()[0]) from exc
        names = ["q", "k", "v"] if call.op == "attention" else ["q", "k_cache", "v_cache", "k_new", "v_new"]
        for name, t, t0 in zip([*names, "key_padding_mask"], watched, before):
            if not torch.equal(bit_view(t), bit_view(t0)):
                self.violations.append(f"{call.op} modified its input '{name}'")
        return self._check_result(call, result)

    def _check_result(self, call: OpCall, result: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        lse = None
        if self.returns_lse:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise ContractViolation(f"{call.op} declares returns_lse but returned {type(result).__name__}, "
                                        "not (out, lse)")
            result, lse = result
        if not isinstance(result, torch.Tensor):
            raise ContractViolation(f"{call.op} returned {type(result).__name__}, not a torch.Tensor")
        b, hq, sq, d = call.q.shape
        want_dtype = self.output_dtype or call.q.dtype
        problems = []
        if tuple(result.shape) != (b, hq, sq, d):
            problems.append(f"output shape {tuple(result.shape)}, expected {(b, hq, sq, d)}")
        if result.dtype != want_dtype:
            problems.append(f"output dtype {result.dtype}, expected {want_dtype}")
        if result.device.type != self.device.type or (
            self.device.index is not None and result.device.index != self.device.index
        ):
            problems.append(f"output on {result.device}, expected {self.device}")
        if problems:
            raise ContractViolation(f"{call.op}: " + "; ".join(problems))
        if result.is_floating_point() and not bool(torch.isfinite(result).all()):
            n = int((~torch.isfinite(result)).sum())
            self.violations.append(f"{call.op} returned {n} NaN/Inf elements (fully masked rows must be exactly 0)")
        if lse is not None and (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (b, hq, sq)):
            raise ContractViolation(f"{call.op}: lse must be a tensor of shape {(b, hq, sq)}")
        return result, lse
