"""The gradient checks of one golden case with gradients (``grad: true``): the backend's dQ, dK, dV
for the golden's upstream gradient, judged against the exact gradients (``gradient_accuracy``),
against themselves under changed surroundings (``gradient_batch``, ``gradient_padding``,
``gradient_split``, ``gradient_determinism``: bitwise) and against the backward's contract
(``gradient_contract``). The gradients come from the backend's ``<op>_backward`` when it has one,
else from autograd of its op (:meth:`conformance.run.invoker.Invoker.gradients`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from conformance.backends.registry import backward_skip_reason
from conformance.golden.format import GoldenCase
from conformance.judge.gradient_transforms import (
    GRAD_NAMES,
    Grads,
    GradVariant,
    gradient_batch_variants,
    gradient_padding_variants,
    gradient_split_variants,
)
from conformance.judge.invariance import compare_gradients, determinism_reruns
from conformance.judge.transforms import OpCall
from conformance.judge.verdicts import GRADIENT_AXES, Verdict, at, judge_gradient_accuracy
from conformance.run.invoker import BackendCallError, ContractViolation, Invoker, KernelSkipped
from conformance.run.settings import RunSettings
from conformance.spec.checks import GRADIENT_CHECKS
from conformance.spec.tolerances import Tolerances

Rec = Callable[[str, Verdict], object]


def gradient_checks(invoker: Invoker, gc: GoldenCase, settings: RunSettings, call: OpCall) -> dict[str, Verdict]:
    """Check → verdict for every requested gradient check that applies to ``gc`` (none for a case
    without gradients). ``call`` is the case's own call, on the backend's device."""
    wanted = [c for c in GRADIENT_CHECKS if c in settings.checks]
    if not wanted or gc.gradient is None or gc.inputs.grad_out is None:
        return {}
    case = gc.case
    reason = backward_skip_reason(invoker.backend, case.op, case)
    if reason:
        return dict.fromkeys(wanted, Verdict("skip", {}, reason))
    grad_out = invoker.to_device_tensor(gc.inputs.grad_out)
    invoker.violations = []
    try:
        grads = invoker.gradients(call, grad_out)
    except KernelSkipped as exc:  # NoBackward too: never a pass
        return dict.fromkeys(wanted, Verdict("skip", {}, str(exc)))
    except (BackendCallError, ContractViolation) as exc:
        out = dict.fromkeys(wanted, Verdict("error", {}, f"the backward of the case's own call failed: {exc}"))
        if "gradient_contract" in wanted:
            status = "error" if isinstance(exc, BackendCallError) else "fail"
            out["gradient_contract"] = Verdict(status, {}, str(exc))
        return out
    host = tuple(invoker.to_host(g) for g in grads)
    tol = settings.tolerances
    verdicts: dict[str, Verdict] = {}
    if "gradient_accuracy" in wanted:
        rule = tol.gradient_rule(settings.rule_set, case.op, case.dtype)
        verdicts["gradient_accuracy"] = judge_gradient_accuracy(host, gc.gradient, rule, settings.rule_set)
    variants: dict[str, Callable[[], Iterator[GradVariant]]] = {
        "gradient_batch": lambda: gradient_batch_variants(call, grad_out),
        "gradient_padding": lambda: gradient_padding_variants(call, grad_out),
        "gradient_split": lambda: gradient_split_variants(call, grad_out, case),
    }
    for check, make in variants.items():
        if check not in wanted:
            continue
        found = list(make())
        if not found:
            continue  # the check does not apply (gradient_split: the attention op)
        own = _padded_keys_not_zero(host, call) if check == "gradient_padding" else None
        verdicts[check] = own or compare_gradient_variants(invoker, check, found, grads, tol).verdict
    if "gradient_determinism" in wanted:
        reruns = determinism_reruns(tol, settings.reruns)
        again = [GradVariant(f"rerun {i} of {reruns}", call, grad_out, _same, _same) for i in range(1, reruns)]
        verdicts["gradient_determinism"] = compare_gradient_variants(
            invoker, "gradient_determinism", again, grads, tol,
            Verdict("pass", {"reruns": reruns}, f"{reruns} backward runs bit-identical")).verdict
    if "gradient_contract" in wanted:
        verdicts["gradient_contract"] = _contract(invoker, host, gc)
    return {c: verdicts[c] for c in wanted if c in verdicts}


def _same(g: Grads) -> Grads:
    return g


@dataclass
class GradientsOutcome:
    """How a set of gradient variants compared with the case's own gradients: the verdict and, for
    the variant that differed, its label, the tensor (``dq``, ``dk``, ``dv``) and both versions of it
    (the variant's, the one it must equal), or the exception of a call that failed."""

    verdict: Verdict
    label: str = ""
    tensor: str = ""
    got: torch.Tensor | None = None
    want: torch.Tensor | None = None
    exception: Exception | None = None


def compare_gradient_variants(invoker: Invoker, check: str, variants: Iterable[GradVariant], base: Grads,
                              tolerances: Tolerances, passed: Verdict | None = None) -> GradientsOutcome:
    """The gradients of each variant against the case's own (``base``) or its ``against`` call's,
    bitwise (:func:`~conformance.judge.invariance.compare_gradients`); the keys a variant added must
    get dK = dV = 0 exactly. A declined call gives a ``skip`` verdict, a failed one an ``error``."""
    n = 0
    for v in variants:
        n += 1
        try:
            got = invoker.gradients(invoker.to_device(v.call), v.grad_out)
            ref = base if v.against is None else invoker.gradients(invoker.to_device(v.against[0]), v.against[1])
        except KernelSkipped as exc:
            return GradientsOutcome(Verdict("skip", {"variant": v.label}, f"{v.label}: {exc}"), v.label, exception=exc)
        except (BackendCallError, ContractViolation) as exc:
            return GradientsOutcome(Verdict("error", {"variant": v.label}, f"{v.label}: {exc}"), v.label,
                                    exception=exc)
        host = tuple(invoker.to_host(g) for g in got)
        taken, expected = v.taken(host), v.expected(tuple(invoker.to_host(g) for g in ref))
        verdict = compare_gradients(tolerances, check, v.label, taken, expected)
        if verdict is not None:
            i = GRAD_NAMES.index(verdict.metrics["tensor"])
            return GradientsOutcome(verdict, v.label, GRAD_NAMES[i], taken[i], expected[i])
        verdict = None if v.zero_keys is None else _keys_not_zero(host, v.zero_keys, v.label)
        if verdict is not None:  # an added key's dK or dV is not 0: the variant's whole tensor
            i = GRAD_NAMES.index(verdict.metrics["tensor"])
            return GradientsOutcome(verdict, v.label, GRAD_NAMES[i], host[i])
    return GradientsOutcome(passed or Verdict("pass", {"variants": n}, f"{n} variants: gradients bit-identical"))


def _keys_not_zero(grads: Grads, keys: slice | np.ndarray, label: str) -> Verdict | None:
    """A failing verdict when dK or dV of a masked key (``keys``: a slice of key positions, or a bool
    [B, Skv] mask of them) is not exactly 0 (NaN included)."""
    for name, g in zip(("dk", "dv"), grads[1:]):
        if isinstance(keys, slice):
            part = g[:, :, keys]
            offset = keys.start or 0
            bad = torch.nonzero(part != 0)
            if len(bad):
                b, h, j, c = (int(x) for x in bad[0])
                index = (b, h, j + offset, c)
                return _zero_verdict(label, name, index, float(part[b, h, j, c]), len(bad))
        else:
            masked = torch.as_tensor(keys)[:, None, :, None].expand_as(g)
            bad = torch.nonzero(masked & (g != 0))
            if len(bad):
                index = tuple(int(x) for x in bad[0])
                return _zero_verdict(label, name, index, float(g[index]), len(bad))
    return None


def _zero_verdict(label: str, name: str, index: tuple[int, ...], value: float, count: int) -> Verdict:
    return Verdict("fail", {"variant": label, "tensor": name, "nonzero_padded": count, "first_nonzero": list(index)},
                   f"{label}: {name} of a masked key is {value!r}, not 0, at {at(index, GRADIENT_AXES[name])} "
                   f"({count} elements)")


def _padded_keys_not_zero(grads: Grads, call: OpCall) -> Verdict | None:
    if call.key_padding_mask is None:
        return None
    return _keys_not_zero(grads, ~call.key_padding_mask.cpu(), "the case's own call")


def _contract(invoker: Invoker, host: Grads, gc: GoldenCase) -> Verdict:
    problems = list(invoker.violations)
    assert gc.gradient is not None
    for name, g in zip(GRAD_NAMES, host):
        want = getattr(gc.gradient, name)
        bad = int((~torch.isfinite(g.to(torch.float64)) & torch.from_numpy(np.isfinite(want))).sum())
        if bad:
            problems.append(f"{name} has {bad} NaN/Inf elements where the exact gradient is finite")
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Verdict("fail", {"violations": problems[:20]}, problems[0] + more)
    return Verdict("pass", {}, "gradient shapes, dtypes, devices, finite gradients, inputs and grad_out unchanged, "
                   "no exception")
