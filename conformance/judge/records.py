"""The record: one outcome of one check on one case, the unit of every report (console, JSON,
JUnit), and its one JSON codec (reports, worker messages and merged shards all use it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Status = Literal["pass", "fail", "error", "skip"]
STATUSES: tuple[Status, ...] = ("pass", "fail", "error", "skip")


def plain(x: Any, strict: bool = False) -> Any:
    """Metrics as JSON data: numpy scalars to Python numbers, tuples to lists. Non-finite floats are
    kept (``strict=False``: messages between processes, ``json`` with ``allow_nan``) or written as the
    report format has them (``strict=True``: NaN → ``null``, ±∞ → ``"inf"``/``"-inf"``)."""
    if isinstance(x, dict):
        return {str(k): plain(v, strict) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v, strict) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if strict and isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


@dataclass
class Record:
    """One outcome: the unit of every report (console, JSON, JUnit)."""

    case_id: str
    op: str
    check: str
    status: Status
    dtype: str = ""
    family: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    expected: str | None = None  # reason from a known-failure list when this outcome was expected

    def to_json(self, strict: bool = True) -> dict[str, Any]:
        """The record as JSON data (docs/report-format.md); ``strict`` as in :func:`plain`."""
        out = {"case_id": self.case_id, "op": self.op, "check": self.check, "status": self.status,
               "dtype": self.dtype, "family": self.family, "metrics": plain(self.metrics, strict),
               "message": self.message}
        if self.expected is not None:
            out["expected"] = self.expected
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        """The inverse of :meth:`to_json`; fields a report may leave out read as empty."""
        return cls(data["case_id"], data.get("op") or "", data.get("check") or "", data["status"],
                   data.get("dtype") or "", data.get("family") or "", data.get("metrics") or {},
                   data.get("message") or "", data.get("expected"))
