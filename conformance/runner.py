"""The run: stream golden cases, call a backend (with contract checks), apply the invariance
transforms and hand every outcome to the judge. One case is in memory at a time."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backends.contract import KernelUnavailable, one_line
from .backends.registry import skip_reason
from .errors import ConformanceError, GoldenError
from .golden import DEFAULT_MAX_CASE_BYTES, GoldenCase, declared_bytes, read_golden, read_manifest
from .judge import (
    Record,
    Verdict,
    bit_view,
    bitwise_mismatch,
    judge_accuracy,
    judge_elementwise,
)
from .profiling import NO_TIMER, PhaseTimer
from .spec import OPS
from .tolerances import Tolerances
from .transforms import (
    OpCall,
    Variant,
    batch_variants,
    chunk_variants,
    padding_variants,
    prefill_decode_variants,
    split_variants,
)

# The checks a golden run makes; `parity` needs --compare-to and `gqa`/`nan_padding` are properties
# (rlk-conform check), not golden checks.
GOLDEN_CHECKS = ("accuracy", "batch", "split", "prefill_decode", "chunk", "padding", "determinism", "contract")
DEFAULT_CHECKS = GOLDEN_CHECKS


@dataclass(frozen=True)
class RunSettings:
    tolerances: Tolerances
    checks: tuple[str, ...] = DEFAULT_CHECKS
    rule_set: str = "default"
    reruns: int | None = None  # determinism reruns; default from tolerances.yaml


@dataclass
class RunResult:
    records: list[Record] = field(default_factory=list)
    cases: int = 0
    complete: bool = True  # False when a signal stopped the run; records hold every finished case
    interrupted_by: str | None = None  # "SIGINT" or "SIGTERM"
    refused: int = 0  # golden files refused as damaged (one error record each, nothing judged)


class BackendCallError(Exception):
    """The backend raised; carries the original exception text."""


class ContractViolation(Exception):
    """The backend returned something the op contract forbids."""


class KernelSkipped(Exception):
    """The backend raised KernelUnavailable: it cannot take this call (reported as skipped)."""


def select_cases(root: Path, pattern: str | None = None, shard: tuple[int, int] | None = None) -> list[Path]:
    """Golden files listed in ``root``'s manifest, filtered by a glob on case ids and a shard ``(i, n)``:
    case number k (in case-id order) belongs to shard ``k % n``."""
    manifest = read_manifest(root)
    entries = sorted(manifest["files"], key=lambda e: e["case_id"])
    if pattern:
        entries = [e for e in entries if fnmatch.fnmatchcase(e["case_id"], pattern)]
    if shard is not None:
        i, n = shard
        entries = [e for k, e in enumerate(entries) if k % n == i]
    return [root / e["path"] for e in entries]


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


def run_case(invoker: Invoker, gc: GoldenCase, settings: RunSettings,
             compare_to: Invoker | None = None) -> list[Record]:
    """Every requested check on one golden case."""
    case = gc.case

    def rec(check: str, verdict: Verdict) -> Record:
        return Record(case.id, case.op, check, verdict.status, case.dtype, case.family, verdict.metrics,
                      verdict.message)
    requested = [c for c in settings.checks if c != "parity" or compare_to is not None]
    reason = skip_reason(invoker.backend, case.op, case)
    if reason:
        return [rec(c, Verdict("skip", {}, reason)) for c in requested]

    invoker.violations = []
    call = invoker.to_device(OpCall(case.op, gc.inputs.q, gc.inputs.k, gc.inputs.v, gc.inputs.key_padding_mask,
                                    case.causal, case.scale, case.s_past or 0))
    records: list[Record] = []
    try:
        out, lse = invoker(call)
    except KernelSkipped as exc:
        return [rec(c, Verdict("skip", {}, str(exc))) for c in requested]
    except (BackendCallError, ContractViolation) as exc:
        status = "error" if isinstance(exc, BackendCallError) else "fail"
        msg = f"primary call failed: {exc}"
        records = [rec(c, Verdict("error", {}, msg)) for c in requested if c != "contract"]
        if "contract" in requested:
            records.append(rec("contract", Verdict(status, {}, str(exc))))
        return records

    out_host = invoker.to_host(out) if {"accuracy", "determinism", "parity"} & set(requested) else out
    if "accuracy" in requested:
        records.append(rec("accuracy", _accuracy(out_host, None if lse is None else invoker.to_host(lse), gc,
                                                 settings)))
    transforms: dict[str, Callable[[], Iterator[Variant]]] = {
        "batch": lambda: batch_variants(call),
        "split": lambda: split_variants(call, case),
        "prefill_decode": lambda: prefill_decode_variants(call),
        "chunk": lambda: chunk_variants(call),
        "padding": lambda: padding_variants(call),
    }
    for check, make in transforms.items():
        if check in requested:
            verdict = _invariance(invoker, check, list(make()), out)
            if verdict is not None:
                records.append(rec(check, verdict))
    if "determinism" in requested:
        records.append(rec("determinism", _determinism(invoker, call, out_host, settings)))
    if "parity" in requested and compare_to is not None:
        records.append(rec("parity", _parity(compare_to, call, out_host, gc, settings)))
    if "contract" in requested:
        if invoker.violations:
            first = invoker.violations[0]
            more = f" (+{len(invoker.violations) - 1} more)" if len(invoker.violations) > 1 else ""
            records.append(rec("contract", Verdict("fail", {"violations": invoker.violations[:20]}, first + more)))
        else:
            records.append(rec("contract", Verdict("pass", {}, "shape, dtype, device, finite output, inputs "
                                                   "unchanged, no exception")))
    return records


def _accuracy(out: torch.Tensor, lse: torch.Tensor | None, gc: GoldenCase, settings: RunSettings) -> Verdict:
    case = gc.case
    rule = settings.tolerances.accuracy_rule(settings.rule_set, case.op, case.dtype)
    verdict = judge_accuracy(out, gc.golden, rule, settings.tolerances.peak_relative.get(case.dtype),  # type: ignore[call-overload]
                             settings.rule_set)
    if lse is None:
        return verdict
    lse_rule = settings.tolerances.lse.get(case.dtype)  # type: ignore[call-overload]
    lv = judge_elementwise(lse, gc.golden.lse, lse_rule, "lse")
    metrics = {**verdict.metrics, "lse_max_abs_err": lv.metrics.get("max_abs_err")}
    if lv.status != "pass":
        return Verdict("fail", metrics, "; ".join(m for m in (verdict.message if verdict.status == "fail" else "",
                                                              lv.message) if m))
    return Verdict(verdict.status, metrics, verdict.message)


def _invariance(invoker: Invoker, check: str, variants: Sequence[Variant], out: torch.Tensor) -> Verdict | None:
    if not variants:
        return None  # the check does not apply to this case
    needed = {v.call.op for v in variants}
    missing = [op for op in needed if not invoker.has(op)]
    if missing:
        return Verdict("skip", {}, f"needs {', '.join(missing)}, which backend {invoker.backend.name} lacks")
    for variant in variants:
        try:
            got, _ = invoker(variant.call)
        except KernelSkipped as exc:
            return Verdict("skip", {"variant": variant.label}, f"{variant.label}: {exc}")
        except (BackendCallError, ContractViolation) as exc:
            return Verdict("error", {"variant": variant.label}, f"{variant.label}: {exc}")
        mismatch = bitwise_mismatch(invoker.to_host(variant.taken(got)), invoker.to_host(variant.expected(out)))
        if mismatch is not None:
            return Verdict("fail", {"variant": variant.label, **mismatch.metrics()},
                           f"{variant.label}: {mismatch.describe()}")
    return Verdict("pass", {"variants": len(variants)}, f"{len(variants)} variants bit-identical")


def _determinism(invoker: Invoker, call: OpCall, out_host: torch.Tensor, settings: RunSettings) -> Verdict:
    rule = settings.tolerances.invariance_rule("determinism")
    reruns = settings.reruns or (rule.reruns if rule and rule.reruns else 5)
    for i in range(1, reruns):
        try:
            again, _ = invoker(call)
        except (BackendCallError, ContractViolation, KernelSkipped) as exc:
            return Verdict("error", {"rerun": i}, f"rerun {i}: {exc}")
        mismatch = bitwise_mismatch(invoker.to_host(again), out_host)
        if mismatch is not None:
            return Verdict("fail", {"rerun": i, **mismatch.metrics()}, f"rerun {i} of {reruns}: {mismatch.describe()}")
    return Verdict("pass", {"reruns": reruns}, f"{reruns} runs bit-identical")


def _parity(other: Invoker, call: OpCall, out_host: torch.Tensor, gc: GoldenCase, settings: RunSettings) -> Verdict:
    case = gc.case
    reason = skip_reason(other.backend, case.op, case)
    if reason:
        return Verdict("skip", {}, f"{other.backend.name}: {reason}")
    try:
        theirs, _ = other(other.to_device(call))
    except KernelSkipped as exc:
        return Verdict("skip", {}, f"{other.backend.name}: {exc}")
    except (BackendCallError, ContractViolation) as exc:
        return Verdict("error", {}, f"{other.backend.name}: {exc}")
    rule_set = settings.tolerances.parity.rules
    rule = settings.tolerances.accuracy_rule(rule_set, case.op, case.dtype)
    v = judge_elementwise(out_host, other.to_host(theirs).to(torch.float64).numpy(), rule,
                          f"parity with {other.backend.name}", gc.golden.naive_error)
    return Verdict(v.status, {**v.metrics, "compared_to": other.backend.name}, v.message)


# --- the run loop: one case at a time, in this process or in an isolated worker ----------------------


@dataclass
class CaseOutcome:
    """The records of one golden file; ``refused`` when the file was refused and nothing was judged."""

    records: list[Record]
    refused: bool = False
    profile: dict[str, Any] | None = None  # an --isolate worker's PhaseTimer.snapshot() of this case


class Terminated(BaseException):
    """SIGTERM arrived while :func:`stop_on_signals` was active (a BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` in a backend call swallows it)."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` in the main thread, as SIGINT raises
    KeyboardInterrupt, so that :func:`run` can stop and return what it finished. No-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver_stops(previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous)


def _redeliver_stops(fallback: Callable[[Any], None]) -> Callable[[Any], None]:
    """An ``unraisablehook`` for :func:`stop_on_signals`: a KeyboardInterrupt or Terminated raised
    where Python cannot propagate it (a weakref callback, a finaliser) would be printed as an
    ignored traceback and lost; instead the signal is sent again, to be raised at the next point
    that can propagate it."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt | Terminated):
            again = signal.SIGINT if isinstance(unraisable.exc_value, KeyboardInterrupt) else signal.SIGTERM
            # A moment later, from another thread: sent from here, its handler would raise inside this
            # hook and be lost again.
            timer = threading.Timer(0.05, os.kill, args=(os.getpid(), again))
            timer.daemon = True
            timer.start()
            return
        fallback(unraisable)

    return hook


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[str]]:
    """While active, SIGINT and SIGTERM are only noted (their names are appended to the yielded
    list), so that the reports of a run are written whole; the caller acts on them afterwards."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def case_id_of(path: Path) -> str:
    """The case id a golden path stands for (``<op>/<family>/<variant>``), before the file is read."""
    parts = path.with_suffix("").parts
    starts = [i for i, part in enumerate(parts) if part in OPS]
    return "/".join(parts[starts[-1]:]) if starts else path.with_suffix("").as_posix()


def refused_outcome(path: Path, reason: str) -> CaseOutcome:
    """One error record for a golden file that was refused (``reason`` names file and dataset)."""
    return CaseOutcome([Record(case_id_of(path), "?", "accuracy", "error",
                               message=f"golden file refused, nothing judged: {reason}")], refused=True)


def case_error_record(case: dict[str, Any] | None, path: Path, settings: RunSettings, message: str,
                      metrics: dict[str, Any]) -> Record:
    """The one ``error`` record of a case that ended abnormally (a crash, a timeout, an exception the
    checks did not expect). ``case`` holds case_id, op, dtype and family once the golden was read.
    The record's check is ``contract`` (the call must return normally) when that check was asked for."""
    check = "contract" if "contract" in settings.checks else settings.checks[0]
    if case is None:
        return Record(case_id_of(path), "?", check, "error", metrics=metrics, message=message)
    return Record(case["case_id"], case["op"], check, "error", case["dtype"], case["family"], metrics, message)


def judge_case(invoker: Invoker, gc: GoldenCase, settings: RunSettings, compare_to: Invoker | None = None
               ) -> list[Record]:
    """:func:`run_case`, except that an unexpected exception (a backend's ``supports`` raising, say)
    becomes one error record of this case instead of ending the run. ConformanceError propagates."""
    try:
        return run_case(invoker, gc, settings, compare_to)
    except ConformanceError:
        raise
    except Exception as exc:
        case = {"case_id": gc.case.id, "op": gc.case.op, "dtype": gc.case.dtype, "family": gc.case.family}
        return [case_error_record(case, gc.path, settings, f"the case could not be judged: {type(exc).__name__}: "
                                  f"{one_line(str(exc))}", {})]


def read_and_judge(path: Path, invoker: Invoker, settings: RunSettings, compare_to: Invoker | None = None,
                   timer: PhaseTimer = NO_TIMER, max_case_bytes: int = DEFAULT_MAX_CASE_BYTES,
                   sha256: str | None = None) -> CaseOutcome:
    """One golden file: read it (refused when :func:`read_golden` refuses it), then :func:`judge_case`."""
    with timer.phase("read"):
        try:
            gc = read_golden(path, max_bytes=max_case_bytes, expected_sha256=sha256)
        except GoldenError as exc:
            return refused_outcome(path, str(exc))
    timer.note_case(gc.case.id, declared_bytes(gc.case))
    with timer.phase("judge"):
        return CaseOutcome(judge_case(invoker, gc, settings, compare_to))


def manifest_checksums(root: Path) -> dict[Path, str]:
    """SHA-256 of every file ``root``'s manifest lists, keyed like :func:`select_cases` paths."""
    return {root / e["path"]: e["sha256"] for e in read_manifest(root)["files"]}


def run(backend: Any, paths: Sequence[Path], settings: RunSettings, compare_to: Any | None = None,
        on_case: Callable[[str, list[Record]], None] | None = None, *,
        max_case_bytes: int = DEFAULT_MAX_CASE_BYTES, checksums: Mapping[Path, str] | None = None,
        timer: PhaseTimer = NO_TIMER, on_outcome: Callable[[Path, CaseOutcome], None] | None = None) -> RunResult:
    """Run every golden file in ``paths`` (streamed one at a time) through ``backend``.

    As each case finishes, in the order of ``paths``, ``on_case(file name, records)`` and
    ``on_outcome(path, outcome)`` are called.

    ``backend`` is a backend object, run in this process, or a started
    :class:`~conformance.isolation.IsolatedBackend`, which judges each case in its worker process
    (there a crash or a timeout is an error record of that case; ``compare_to`` goes to the
    IsolatedBackend, not here). A golden that :func:`read_golden` refuses — damaged, over
    ``max_case_bytes``, or not matching its entry in ``checksums`` (the manifest's file SHA-256) —
    gives one error record, is counted in ``refused`` and is never judged.

    KeyboardInterrupt and :class:`Terminated` stop the run: the result holds every finished case,
    ``complete`` is False and ``interrupted_by`` names the signal; the case in flight is dropped.
    ConformanceError (a user-fixable problem) propagates. An enabled ``timer`` (``--profile``) is
    charged each phase of each case: ``read``, ``judge`` and, within it, ``backend`` and ``transfer``
    (an isolated worker times its cases itself and the timer adds them up).
    """
    from .isolation import IsolatedBackend  # isolation builds on this module

    sums = checksums or {}
    if isinstance(backend, IsolatedBackend):
        if compare_to is not None:
            raise ConformanceError("an isolated run takes compare_to in IsolatedBackend(...): the worker loads it")

        def judge(path: Path) -> CaseOutcome:
            outcome = backend.judge(path, settings, sums.get(path), max_case_bytes, profile=timer.enabled)
            timer.absorb(outcome.profile)
            return outcome
    else:
        invoker = Invoker(backend, timer)
        other = Invoker(compare_to, timer) if compare_to is not None else None

        def judge(path: Path) -> CaseOutcome:
            return read_and_judge(path, invoker, settings, other, timer, max_case_bytes, sums.get(path))

    result = RunResult()
    try:
        for path in paths:
            outcome = judge(path)
            result.records.extend(outcome.records)
            result.cases += 1
            result.refused += outcome.refused
            if on_case:
                on_case(path.name, outcome.records)
            if on_outcome:
                on_outcome(path, outcome)
    except (KeyboardInterrupt, Terminated) as exc:
        result.complete = False
        result.interrupted_by = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
    return result


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise ConformanceError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ConformanceError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n
