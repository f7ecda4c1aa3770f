"""Find, load and check backends: the built-ins, entry points and ``package.module:attr`` specs.

``list_backends()`` lists the built-ins (``builtin.BUILTIN_BACKENDS``) and every entry point of the
group ``rlk_conform.backends``; ``load_backend(spec, device)`` turns a name or ``module:attr`` into
a checked backend object. Every problem a user can fix is raised as a one-line
:class:`~conformance.errors.ConformanceError` (exit code 2) naming the backend spec and what to do.
The API a backend implements is documented in docs/backends.md and ``contract.py``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from conformance.errors import ConformanceError
from conformance.spec.case import LAYOUT_OPS, OPS, VARIANTS, Case

from .builtin import BUILTIN_BACKENDS
from .contract import VARIANT_KEYWORDS, Backend, BackendUnavailable, one_line
from .layouts import LAYOUT_KEYWORDS, LAYOUT_POSITIONAL

ENTRY_POINT_GROUP = "rlk_conform.backends"
DOCS = "see docs/backends.md"


@dataclass(frozen=True)
class BackendInfo:
    """One registered backend as ``list_backends`` reports it.

    ``factory`` is what ``load_backend(name)`` calls or returns (a class, a zero-argument factory or
    an instance); None when its entry point failed to import. ``available`` says whether it can be
    created here with its default device; ``reason`` says why not. ``source`` is ``"built-in"`` or
    the entry point (``name = module:attr`` and its distribution).
    """

    name: str
    factory: Any
    available: bool
    reason: str | None
    description: str
    source: str
    device: str | None = None
    implements: str = ""


# How ``rlk-conform backends`` names each op.
OP_LABELS = {"attention": "attention", "kv_cache_attention": "kv-cache", "varlen_attention": "varlen",
             "paged_kv_attention": "paged"}


def implements(target: Any) -> str:
    """The ops and variants a backend (an instance or a class) declares, e.g. ``"attention, kv-cache;
    window"``: read from its members, nothing is created. Empty for a factory function, which shows
    nothing until it is called."""
    if target is None or (not isinstance(target, type) and not hasattr(target, "name")):
        return ""
    ops = [OP_LABELS.get(op, op) for op in (*backend_ops(target), *layout_ops(target))]
    variants = declared_variants(target)
    return ", ".join(ops) + (f"; {', '.join(variants)}" if variants else "")


@dataclass(frozen=True)
class _Registration:
    name: str
    factory: Any  # None when loading failed
    description: str
    source: str
    error: str | None = None


def list_backends(skip: Collection[str] = ()) -> list[BackendInfo]:
    """Built-ins then entry points (``rlk_conform.backends``), each created once to learn whether it
    is available here. Never raises: a backend that fails to import or to start is listed as
    unavailable with the exception text. Names in ``skip`` are left out without being created (the
    nightly lane skips the backends it does not run)."""
    infos = []
    for reg in _registrations().values():
        if reg.name in skip:
            continue
        if reg.error is not None:
            infos.append(BackendInfo(reg.name, reg.factory, False, reg.error, reg.description, reg.source))
            continue
        try:
            backend = _create(reg.factory, None, reg.name)
            validate_backend(backend, reg.name)
        except BackendUnavailable as exc:
            infos.append(BackendInfo(reg.name, reg.factory, False, one_line(str(exc)), reg.description, reg.source,
                                     implements=implements(reg.factory)))
        except Exception as exc:  # a broken third-party backend must not break the listing
            infos.append(BackendInfo(reg.name, reg.factory, False, _describe(exc), reg.description, reg.source,
                                     implements=implements(reg.factory)))
        else:
            infos.append(BackendInfo(reg.name, reg.factory, True, None,
                                     str(getattr(backend, "description", "") or reg.description), reg.source,
                                     backend.device, implements(backend)))
    return infos


def load_backend(spec: str, device: str | None = None) -> Backend:
    """Create the backend ``spec`` names and check it (:func:`validate_backend`).

    ``spec`` is a registered name (a built-in or an entry point) or ``package.module:attr`` where
    ``attr`` (dotted for nested attributes) is a backend class (called with no arguments), a
    zero-argument factory or a backend instance. The module is imported from ``sys.path``, the
    current directory and ``PYTHONPATH`` included. ``device`` (e.g. ``"cuda:1"``) is passed as
    ``device=`` to a class or factory that takes that argument; a backend that takes none must
    already run on ``device``. Raises ConformanceError for every user-fixable problem.
    """
    spec = spec.strip()
    if ":" in spec:
        target = _import_target(spec)
    else:
        registrations = _registrations()
        if spec not in registrations:
            known = ", ".join(dict.fromkeys(reg.name for reg in registrations.values()))
            raise ConformanceError(f"unknown backend {spec!r}; known backends: {known}; "
                                   "or give an importable 'package.module:attr'")
        reg = registrations[spec]
        if reg.error is not None:
            raise ConformanceError(f"backend {spec!r} ({reg.source}) cannot be loaded: {reg.error}; "
                                   "fix or reinstall the package that provides it")
        target = reg.factory
    try:
        backend = _create(target, device, spec)
    except BackendUnavailable as exc:
        where = f" on {device}" if device is not None else " on this machine"
        raise ConformanceError(f"backend {spec!r} is unavailable{where}: {one_line(str(exc))}; "
                               "choose another backend or --device") from None
    except ConformanceError:
        raise
    except Exception as exc:
        raise ConformanceError(f"backend {spec!r}: creating it raised {_describe(exc)}; fix the backend's "
                               "constructor or factory") from None
    checked = validate_backend(backend, spec)
    moved = not _is_instance(target) and _takes_device(target)
    if device is not None and not moved and torch.device(checked.device) != torch.device(device):
        raise ConformanceError(f"backend {spec!r} runs on {checked.device} and takes no 'device' argument, "
                               f"so it cannot be moved to {device}; drop --device or give the backend a "
                               "'device' parameter")
    return checked


def validate_backend(obj: object, spec: str | None = None) -> Backend:
    """Check ``obj`` against the Backend API and return it; raise ConformanceError naming the problem.

    Required: ``name`` (non-empty str), ``device`` (a torch device string), at least one of the ops
    ``attention`` / ``kv_cache_attention`` callable. Optional members, when present: ``supports``
    callable, ``returns_lse`` bool, ``output_dtype`` None or ``torch.float32``.
    """
    who = f"backend {spec!r}" if spec else f"backend object {type(obj).__name__}"

    def fail(problem: str) -> ConformanceError:
        return ConformanceError(f"{who} is not a usable backend: {problem}; {DOCS}")

    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise fail("it has no 'name' string attribute")
    device = getattr(obj, "device", None)
    if not isinstance(device, str):
        raise fail("it has no 'device' string attribute (e.g. 'cpu', 'cuda', 'cuda:1')")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise fail(f"device {device!r} is not a torch device string") from None
    ops = [op for op in OPS if hasattr(obj, op)]
    layouts = [op for op in LAYOUT_OPS if hasattr(obj, op)]
    if not ops and not layouts:
        raise fail("it implements none of attention(), kv_cache_attention(), varlen_attention(), "
                   "paged_kv_attention()")
    for member in (*ops, *layouts, "supports"):
        if hasattr(obj, member) and not callable(getattr(obj, member)):
            raise fail(f"its '{member}' is not callable")
    if getattr(obj, "output_dtype", None) not in (None, torch.float32):
        raise fail(f"output_dtype must be torch.float32 or absent, got {obj.output_dtype!r}")  # type: ignore[attr-defined]
    if not isinstance(getattr(obj, "returns_lse", False), bool):
        raise fail("returns_lse must be True or False")
    variants = getattr(obj, "variants", ())
    if not isinstance(variants, tuple | list | frozenset | set) or any(v not in VARIANTS for v in variants):
        raise fail(f"variants must list some of {', '.join(VARIANTS)}, got {variants!r}")
    keywords = (*OP_KEYWORDS, *(VARIANT_KEYWORDS[v] for v in VARIANTS if v in variants))
    for op in ops:
        problem = signature_problem(getattr(obj, op), OP_POSITIONAL[op], keywords)
        if problem:
            raise fail(f"{op}() {problem}; the harness calls {op}({', '.join(OP_POSITIONAL[op])}, *, "
                       f"{', '.join(keywords)})")
    for op in layouts:
        problem = signature_problem(getattr(obj, op), LAYOUT_POSITIONAL[op], LAYOUT_KEYWORDS)
        if problem:
            raise fail(f"{op}() {problem}; the harness calls {op}({', '.join(LAYOUT_POSITIONAL[op])}, *, "
                       f"{', '.join(LAYOUT_KEYWORDS)})")
    for op, positional in BACKWARD_POSITIONAL.items():
        backward = getattr(obj, op, None)
        if backward is None:
            continue
        problem = "is not callable" if not callable(backward) else signature_problem(backward, positional, keywords)
        if problem:
            raise fail(f"{op}() {problem}; the harness calls {op}({', '.join(positional)}, *, causal, scale, "
                       "key_padding_mask) and expects the gradients of the inputs before out")
    if hasattr(obj, "supports"):
        problem = signature_problem(obj.supports, ("op", "case"), keywords=())  # type: ignore[attr-defined]
        if problem:
            raise fail(f"supports() {problem}; the harness calls supports(op, case)")
    return obj  # type: ignore[return-value]


# How the harness calls each op: these positional arguments, then OP_KEYWORDS by keyword.
OP_POSITIONAL = {"attention": ("q", "k", "v"), "kv_cache_attention": ("q", "k_cache", "v_cache", "k_new", "v_new")}
OP_KEYWORDS = ("causal", "scale", "key_padding_mask")
#: How the harness calls an op's optional backward: the op's inputs, then its output and grad_out.
BACKWARD_POSITIONAL = {f"{op}_backward": (*args, "out", "grad_out") for op, args in OP_POSITIONAL.items()}


def signature_problem(fn: Callable[..., Any], positional: Sequence[str], keywords: Sequence[str] = OP_KEYWORDS
                      ) -> str | None:
    """Why ``fn`` cannot be called with ``len(positional)`` positional arguments and ``keywords`` by
    keyword (a missing parameter, too few positional ones, a required parameter the harness does not
    pass), or None. A signature Python cannot read (a C extension) is accepted."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in params)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    takes_pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(takes_pos) < len(positional) and not var_pos:
        return (f"takes {len(takes_pos)} positional argument(s) ({', '.join(p.name for p in takes_pos) or 'none'}), "
                f"the harness passes {len(positional)}")
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [k for k in keywords if k not in named and not var_kw]
    if missing:
        return f"has no parameter {', '.join(repr(k) for k in missing)}"
    passed = set(keywords)
    extra = [p.name for p in takes_pos[len(positional):] + [p for p in params if p.kind is p.KEYWORD_ONLY]
             if p.default is p.empty and p.name not in passed]
    if extra:
        return f"requires {', '.join(repr(n) for n in extra)}, which the harness does not pass"
    return None


def backend_ops(backend: Backend) -> tuple[str, ...]:
    """The ops ``backend`` implements, in ``conformance.spec.OPS`` order."""
    return tuple(op for op in OPS if callable(getattr(backend, op, None)))


def layout_ops(backend: Backend) -> tuple[str, ...]:
    """The packed and paged layouts ``backend`` implements, in ``conformance.spec.LAYOUT_OPS`` order."""
    return tuple(op for op in LAYOUT_OPS if callable(getattr(backend, op, None)))


def skip_reason(backend: Backend, op: str, case: Any) -> str | None:
    """Why ``backend`` skips ``case`` of ``op`` (a dense op's :class:`Case` or a layout op's
    :class:`~conformance.spec.layouts.LayoutCase`), or None when it runs it.

    The op missing, ``supports`` returning False, or ``supports`` returning a reason string all
    mean skipped; ``True`` (or no ``supports``) means run. Any other answer is a ConformanceError.
    """
    if op not in backend_ops(backend) + layout_ops(backend):
        if op in LAYOUT_OPS:
            return (f"{backend.name} does not implement {op} (a backend with only the dense ops is not judged on "
                    "the packed and paged layouts; see docs/backends.md#layouts)")
        return f"{backend.name} does not implement {op}"
    return (_supports_reason(backend, op, case, "this case") or variant_skip_reason(backend, case)
            or layout_window_skip_reason(backend, op, case))


def layout_window_skip_reason(backend: Backend, op: str, case: Any) -> str | None:
    """Why ``backend`` skips a layout case with a sliding window although it declares the window: its
    layout op has no ``window_size`` parameter (its dense ops may take one, its layouts not), so the
    window would be dropped. None otherwise (the window is the one variant the layouts take)."""
    if op not in LAYOUT_OPS or "window" not in case.variants:
        return None
    keywords = (*LAYOUT_KEYWORDS, VARIANT_KEYWORDS["window"])
    if signature_problem(getattr(backend, op), LAYOUT_POSITIONAL[op], keywords) is None:
        return None
    return (f"{backend.name}'s {op} takes no window_size: the sliding window {tuple(case.window)} of this case "
            "would be dropped (docs/backends.md#layouts)")


def _supports_reason(backend: Backend, asked: str, case: Case, what: str) -> str | None:
    """The answer of ``backend.supports(asked, case)`` as a skip reason (None: run it)."""
    supports = getattr(backend, "supports", None)
    if supports is None:
        return None
    verdict = supports(asked, case)
    if verdict is True:
        return None
    if verdict is False or verdict == "":
        return f"{backend.name} does not support {what}"
    if isinstance(verdict, str):
        return verdict
    raise ConformanceError(f"backend {backend.name!r}: supports({asked!r}, {case.id}) returned {verdict!r}; it must "
                           f"return True, False or a reason string; {DOCS}")


# --- discovery and creation ------------------------------------------------------------------------


def _registrations() -> dict[str, _Registration]:
    """Name → registration: built-ins first, then entry points (the first of a name wins)."""
    regs: dict[str, _Registration] = {
        cls.name: _Registration(cls.name, cls, cls.description, "built-in") for cls in BUILTIN_BACKENDS
    }
    builtin_targets = {cls.name: f"{cls.__module__}:{cls.__qualname__}" for cls in BUILTIN_BACKENDS}
    for ep in _entry_points():
        dist = getattr(getattr(ep, "dist", None), "name", None)
        source = f"entry point {ep.name} = {ep.value}" + (f" (from {dist})" if dist else "")
        if builtin_targets.get(ep.name) == ep.value:
            continue  # rlk-conform declares its own built-ins as entry points too
        if ep.name in regs:
            # Keep the first; list the clash under a distinct key so that it is seen.
            regs[f"{ep.name} ({ep.value})"] = _Registration(
                ep.name, None, "", source, f"the name {ep.name!r} is taken by {regs[ep.name].source}; "
                f"load this one as '{ep.value}'")
            continue
        try:
            target = ep.load()
        except Exception as exc:
            regs[ep.name] = _Registration(ep.name, None, "", source, f"import failed: {_describe(exc)}")
            continue
        regs[ep.name] = _Registration(ep.name, target, str(getattr(target, "description", "") or ""), source)
    return regs


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    try:
        return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # damaged distribution metadata must not hide the built-ins
        return []


def _import_target(spec: str) -> Any:
    """The object ``package.module:attr`` names. The current directory is importable."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ConformanceError(f"backend {spec!r}: expected a registered name or 'package.module:attr'")
    cwd = os.getcwd()
    if all(os.path.abspath(p or os.curdir) != cwd for p in sys.path):
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module file written since the last import must be found
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConformanceError(f"backend {spec!r}: importing module {module_name!r} failed: {_describe(exc)}; "
                                   "install what it imports") from None
        top = module_name.split(".")[0]
        raise ConformanceError(f"backend {spec!r}: no module named {exc.name!r}; check the spelling, install "
                               f"its package, or run from the directory holding {top}.py (or add that "
                               "directory to PYTHONPATH)") from None
    except Exception as exc:
        raise ConformanceError(f"backend {spec!r}: importing module {module_name!r} failed: {_describe(exc)}; "
                               "fix the module") from None
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            defined = sorted(n for n in vars(module) if not n.startswith("_"))
            raise ConformanceError(
                f"backend {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute "
                f"{attr_path!r}; it defines: {', '.join(defined[:20]) or 'nothing public'}")
        target = getattr(target, part)
    return target


def _create(target: Any, device: str | None, spec: str) -> Any:
    """Instantiate a class, call a factory (with ``device=`` when given and accepted) or return an instance."""
    if _is_instance(target):
        return target
    if not callable(target):
        raise ConformanceError(f"backend {spec!r} names an object of type {type(target).__name__}, which is "
                               f"neither a backend class, a zero-argument factory nor a backend instance; {DOCS}")
    if device is not None and _takes_device(target):
        return target(device=device)
    return target()


def _is_instance(target: Any) -> bool:
    """A ready backend object (not a class, not a factory): it already has name, device and an op."""
    return (not inspect.isclass(target) and hasattr(target, "name") and hasattr(target, "device")
            and any(hasattr(target, op) for op in (*OPS, *LAYOUT_OPS)))


def _takes_device(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any((p.name == "device" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or p.kind == p.VAR_KEYWORD
               for p in params)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(str(exc))}"


def declared_variants(backend: Backend) -> tuple[str, ...]:
    """The attention variants ``backend`` declares (its ``variants``; none when absent)."""
    return tuple(v for v in VARIANTS if v in tuple(getattr(backend, "variants", ()) or ()))


def variant_skip_reason(backend: Backend, case: Case) -> str | None:
    """Why ``backend`` skips ``case`` for its variants: a variant the case uses and the backend does not
    declare (it would run without it), or None."""
    missing = [v for v in case.variants if v not in declared_variants(backend)]
    if not missing:
        return None
    declared = ", ".join(declared_variants(backend)) or "none"
    return (f"{backend.name} does not support the attention variant(s) {', '.join(missing)} of this case "
            f"(it declares variants: {declared})")


def backward_skip_reason(backend: Backend, op: str, case: Case) -> str | None:
    """Why ``backend`` skips the gradients of ``case`` (its ``supports("<op>_backward", case)`` said so),
    or None. Whether it has a backward at all shows when the gradients are asked for."""
    return _supports_reason(backend, f"{op}_backward", case, "the backward of this case")


def describe_backend(backend: Any) -> dict[str, Any]:
    """What a report and a worker message say of a loaded backend: name, device, output dtype
    (None: the input dtype), whether it returns the log-sum-exp, its description."""
    output_dtype = getattr(backend, "output_dtype", None)
    return {"name": backend.name, "device": str(backend.device),
            "output_dtype": None if output_dtype is None else str(output_dtype),
            "returns_lse": bool(getattr(backend, "returns_lse", False)),
            "description": str(getattr(backend, "description", "") or "")}


def report_backend(requested: str, described: dict[str, Any]) -> dict[str, Any]:
    """The report's ``backend`` object (docs/report-format.md): what was asked for (``--backend``) and
    what was used, from :func:`describe_backend`."""
    return {"requested": requested, "used": described["name"], "device": described["device"],
            "output_dtype": described["output_dtype"] or "input dtype", "returns_lse": described["returns_lse"],
            "description": described["description"]}


def default_backend() -> str:
    """The backend a run without ``--backend`` judges: ``cuda`` where CUDA is available, else ``sdpa``."""
    return "cuda" if torch.cuda.is_available() else "sdpa"
