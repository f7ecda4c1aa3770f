"""Calling a backend: every call goes through :class:`Invoker`, which checks the op contract."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from conformance.backends.contract import KernelUnavailable, one_line
from conformance.judge.gradient_transforms import Grads
from conformance.judge.invariance import bit_view
from conformance.judge.layout_calls import LayoutCall
from conformance.judge.transforms import OpCall
from conformance.judge.verdicts import Verdict
from conformance.run.profiling import NO_TIMER, PhaseTimer


class BackendCallError(Exception):
    """The backend raised; carries the original exception text."""


class ContractViolation(Exception):
    """The backend returned something the op contract forbids."""


class KernelSkipped(Exception):
    """The backend raised KernelUnavailable: it cannot take this call (reported as skipped)."""


class NoBackward(KernelSkipped):
    """The backend has no backward for this call: no ``<op>_backward`` and its output is not
    differentiable (no autograd graph). Gradient checks are skipped with this reason, never passed."""


BACKWARD = {"attention": "attention_backward", "kv_cache_attention": "kv_cache_attention_backward"}


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

    def to_device(self, call: OpCall | LayoutCall) -> OpCall | LayoutCall:
        with self.timer.phase("transfer"):
            if isinstance(call, LayoutCall):
                return call.to(self.device)
            mask = None if call.key_padding_mask is None else call.key_padding_mask.to(self.device)
            sinks = None if call.sinks is None else call.sinks.to(self.device)
            return OpCall(call.op, call.q.to(self.device), call.k.to(self.device), call.v.to(self.device), mask,
                          call.causal, call.scale, call.s_past, call.window, call.softcap, sinks)

    def to_device_tensor(self, t: torch.Tensor) -> torch.Tensor:
        with self.timer.phase("transfer"):
            return t.to(self.device)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the CPU, for judging (the same tensor when it is there already)."""
        with self.timer.phase("transfer"):
            return t.detach().cpu()

    def __call__(self, call: OpCall | LayoutCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(call, LayoutCall):
            return self._layout(call), None
        fn = getattr(self.backend, call.op)
        kwargs = {"causal": call.causal, "scale": call.scale, "key_padding_mask": call.key_padding_mask,
                  **call.variant_kwargs()}
        args = self._args(call)
        watched = [*args, *([call.key_padding_mask] if call.key_padding_mask is not None else [])]
        before = [t.clone() for t in watched]
        result = self._backend_call(lambda: fn(*args, **kwargs))
        names = ["q", "k", "v"] if call.op == "attention" else ["q", "k_cache", "v_cache", "k_new", "v_new"]
        for name, t, t0 in zip([*names, "key_padding_mask"], watched, before):
            if not torch.equal(bit_view(t), bit_view(t0)):
                self.violations.append(f"{call.op} modified its input '{name}'")
        return self._check_result(call, result)

    def _layout(self, call: LayoutCall) -> torch.Tensor:
        """A packed or paged call (docs/backends.md#layouts), its contract checked: ``out [total_q, Hq,
        D]`` in the output dtype on the device (ContractViolation otherwise); finite, and no input
        modified (``self.violations``). The layouts return the output only, whatever ``returns_lse``."""
        fn = getattr(self.backend, call.op)
        args = call.args()
        before = [t.clone() for t in args]
        result = self._backend_call(lambda: fn(*args, **call.kwargs()))
        for name, t, t0 in zip(call.names(), args, before):
            if not torch.equal(bit_view(t), bit_view(t0)):
                self.violations.append(f"{call.op} modified its input '{name}'")
        if not isinstance(result, torch.Tensor):
            raise ContractViolation(f"{call.op} returned {type(result).__name__}, not a torch.Tensor (the layouts "
                                    "return the output only)")
        want_dtype = self.output_dtype or call.q.dtype
        problems = self._tensor_problems("the output", result, tuple(call.q.shape), want_dtype, " [total_q, Hq, D]")
        if problems:
            raise ContractViolation(f"{call.op}: " + "; ".join(problems))
        if not bool(torch.isfinite(result).all()):
            n = int((~torch.isfinite(result)).sum())
            self.violations.append(f"{call.op} returned {n} NaN/Inf elements")
        return result

    def gradients(self, call: OpCall, grad_out: torch.Tensor) -> Grads:
        """``(dq, dk, dv)`` of ``call`` for the upstream gradient ``grad_out`` (dk, dv of the concatenated
        keys for the KV-cache op): the backend's ``<op>_backward`` when it has one (called with its own
        forward output), else autograd of its op on copies of the inputs that require grad. The
        contract is checked: each gradient has its input's shape, the output dtype and the device
        (ContractViolation); the inputs and ``grad_out`` are unchanged (``self.violations``). Raises
        NoBackward when the backend has no backward, KernelSkipped when it declines the call and
        BackendCallError when it raises."""
        names = ["q", "k", "v"] if call.op == "attention" else ["q", "k_cache", "v_cache", "k_new", "v_new"]
        grad_out = self.to_device_tensor(grad_out)
        args = self._args(call)
        kwargs = {"causal": call.causal, "scale": call.scale, "key_padding_mask": call.key_padding_mask,
                  **call.variant_kwargs()}
        backward = getattr(self.backend, BACKWARD[call.op], None)
        watched = [*args, grad_out, *([call.key_padding_mask] if call.key_padding_mask is not None else [])]
        before = [t.clone() for t in watched]
        if callable(backward):
            out, _ = self(call)
            raw = self._backend_call(lambda: backward(*args, out, grad_out.to(out.dtype), **kwargs))
            if not isinstance(raw, tuple | list) or len(raw) != len(args) or not all(
                    isinstance(t, torch.Tensor) for t in raw):
                raise ContractViolation(f"{BACKWARD[call.op]} must return {len(args)} tensors "
                                        f"({', '.join('d' + n for n in names)}), got {type(raw).__name__}")
            grads = list(raw)
        else:
            grads = self._autograd(call, args, kwargs, grad_out)
        for name, t, t0 in zip([*names, "grad_out", "key_padding_mask"], watched, before):
            if not torch.equal(bit_view(t), bit_view(t0)):
                self.violations.append(f"the backward of {call.op} modified its input '{name}'")
        want_dtype = self.output_dtype or call.q.dtype
        problems = [p for name, g, a in zip(names, grads, args)
                    for p in self._tensor_problems(f"d{name}", g, tuple(a.shape), want_dtype)]
        if problems:
            raise ContractViolation(f"the gradients of {call.op}: " + "; ".join(problems))
        if call.op == "attention":
            return grads[0], grads[1], grads[2]
        return grads[0], torch.cat([grads[1], grads[3]], 2), torch.cat([grads[2], grads[4]], 2)

    def _autograd(self, call: OpCall, args: tuple[torch.Tensor, ...], kwargs: dict[str, Any],
                  grad_out: torch.Tensor) -> list[torch.Tensor]:
        fn = getattr(self.backend, call.op)
        leaves = [a.detach().clone().requires_grad_(True) for a in args]
        with torch.enable_grad():
            result = self._backend_call(lambda: fn(*leaves, **kwargs))
            out = result[0] if self.returns_lse and isinstance(result, tuple) else result
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                raise NoBackward(f"{self.backend.name} has no backward: its {call.op} output is not differentiable "
                                 f"(no autograd graph) and it has no {BACKWARD[call.op]}()")
            grads = self._backend_call(lambda: torch.autograd.grad(out, leaves, grad_out.to(out.dtype),
                                                                    allow_unused=True))
        return [torch.zeros_like(a) if g is None else g for g, a in zip(grads, leaves)]

    def _args(self, call: OpCall) -> tuple[torch.Tensor, ...]:
        if call.op == "attention":
            return call.q, call.k, call.v
        p = call.s_past
        return call.q, call.k[:, :, :p], call.v[:, :, :p], call.k[:, :, p:], call.v[:, :, p:]

    def _backend_call(self, fn: Callable[[], Any]) -> Any:
        try:
            with self.timer.phase("backend"):
                return fn()
        except KernelUnavailable as exc:
            raise KernelSkipped(one_line(str(exc))) from exc
        except Exception as exc:  # a backend may raise anything; it becomes an 'error' record
            raise BackendCallError(f"{type(exc).__name__}: {exc}".strip().splitlines()[0]) from exc

    def _tensor_problems(self, what: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                         hint: str = "") -> list[str]:
        """What is wrong with a tensor the backend returned: its shape, dtype or device (the device's
        index too, when the run names one)."""
        problems = []
        if tuple(t.shape) != shape:
            problems.append(f"{what} has shape {tuple(t.shape)}, expected {shape}{hint}")
        if t.dtype != dtype:
            problems.append(f"{what} has dtype {t.dtype}, expected {dtype}")
        if t.device.type != self.device.type or (self.device.index is not None and t.device.index != self.device.index):
            problems.append(f"{what} is on {t.device}, expected {self.device}")
        return problems

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
        problems = self._tensor_problems("the output", result, (b, hq, sq, d), want_dtype)
        if problems:
            raise ContractViolation(f"{call.op}: " + "; ".join(problems))
        if result.is_floating_point() and not bool(torch.isfinite(result).all()):
            n = int((~torch.isfinite(result)).sum())
            self.violations.append(f"{call.op} returned {n} NaN/Inf elements (fully masked rows must be exactly 0)")
        if lse is not None and (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (b, hq, sq)):
            raise ContractViolation(f"{call.op}: lse must be a tensor of shape {(b, hq, sq)}")
        return result, lse


def failed_call_verdicts(checks: Sequence[str], exc: BackendCallError | ContractViolation) -> list[tuple[str, Verdict]]:
    """``(check, verdict)`` for each of ``checks`` when the case's own call failed: ``error`` naming the
    failure, except ``contract`` (last): ``error`` when the backend raised, ``fail`` when it broke the
    contract."""
    out = [(c, Verdict("error", {}, f"primary call failed: {exc}")) for c in checks if c != "contract"]
    if "contract" in checks:
        out.append(("contract", Verdict("error" if isinstance(exc, BackendCallError) else "fail", {}, str(exc))))
    return out
