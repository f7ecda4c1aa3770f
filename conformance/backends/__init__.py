"""Backends: what ``rlk-conform run`` calls. The API vendors implement is in docs/backends.md.

- ``contract.py`` — the Backend protocol, its exceptions and the call helpers built-ins share;
- ``registry.py`` — ``list_backends``, ``load_backend``, ``validate_backend``, ``skip_reason``;
- ``builtin.py``, ``sdpa.py``, ``flex.py`` — the built-in backends.
"""

from .contract import AttentionResult, Backend, BackendUnavailable, KernelUnavailable
from .registry import (
    ENTRY_POINT_GROUP,
    BackendInfo,
    backend_ops,
    describe_backend,
    implements,
    list_backends,
    load_backend,
    report_backend,
    skip_reason,
    validate_backend,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "AttentionResult",
    "Backend",
    "BackendInfo",
    "BackendUnavailable",
    "KernelUnavailable",
    "backend_ops",
    "describe_backend",
    "implements",
    "list_backends",
    "load_backend",
    "report_backend",
    "skip_reason",
    "validate_backend",
]
