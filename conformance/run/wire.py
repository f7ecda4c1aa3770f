"""The messages between a run and its worker processes, and their one codec.

``--isolate`` (:mod:`conformance.run.isolation`: a restartable worker judges one case per request)
and ``--devices`` (:mod:`conformance.jobs.devices`: one worker per device runs its share) speak the
same typed messages over a ``multiprocessing`` pipe, one message per ``send_bytes``. Each is JSON
(``{"kind": <message type>, ...fields}``; NaN and ±Infinity travel as JSON's extension tokens, so
metrics come back as the same floats): plain data only, nothing is ever unpickled.

- worker → parent, once: :class:`Ready` (the backends as loaded, where they run) or :class:`Fatal`;
- parent → isolated worker, per case: :class:`CaseRequest`;
- worker → parent, per case: :class:`Started` once the golden is read, then :class:`CaseDone`
  (its records, or ``refused`` for a damaged golden); :class:`Fatal` for a user error that ends
  the run;
- device worker → parent, last: :class:`Done`.
"""

from __future__ import annotations

import json
import multiprocessing.connection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from conformance.judge.records import Record, plain
from conformance.run.settings import RunSettings
from conformance.spec.tolerances import Tolerances


@dataclass(frozen=True)
class Ready:
    """The worker has loaded its backend(s): each as :func:`~conformance.backends.registry.describe_backend`
    describes it, and the execution target and numerical settings of the worker."""

    backend: dict[str, Any]
    compare_to: dict[str, Any] | None
    execution_target: dict[str, Any]
    numerical_settings: dict[str, Any]


@dataclass(frozen=True)
class Fatal:
    """A problem that stops a one-process run too (exit code 2): the one-line message."""

    message: str


@dataclass(frozen=True)
class CaseRequest:
    """Judge one golden file: its manifest SHA-256, the size cap, the settings; ``profile``: time it."""

    path: Path
    sha256: str | None
    max_case_bytes: int
    settings: RunSettings
    profile: bool = False


@dataclass(frozen=True)
class Started:
    """The golden was read: case_id, op, dtype and family of the case now running."""

    case: dict[str, Any]


@dataclass(frozen=True)
class CaseDone:
    """The records of one case (``index``: its position in the worker's share); ``refused``: the golden
    was refused and the one record says why; ``restart``: the worker's CUDA context is unusable and it
    exits; ``profile``: the worker's PhaseTimer snapshot of this case."""

    records: list[Record]
    refused: bool = False
    restart: bool = False
    profile: dict[str, Any] | None = None
    index: int | None = None


@dataclass(frozen=True)
class Done:
    """A device worker's end: whether its share completed, the signal that stopped it, the property
    search's records, the isolated worker's restarts and, with ``--profile``, its profile."""

    complete: bool
    interrupted_by: str | None = None
    property_records: list[Record] = field(default_factory=list)
    restarts: int | None = None
    profile: dict[str, Any] | None = None


Message = Ready | Fatal | CaseRequest | Started | CaseDone | Done
_KINDS: dict[str, type] = {cls.__name__: cls for cls in (Ready, Fatal, CaseRequest, Started, CaseDone, Done)}


def settings_to_json(settings: RunSettings) -> dict[str, Any]:
    return {"tolerances": settings.tolerances.model_dump(mode="json"), "checks": list(settings.checks),
            "rule_set": settings.rule_set, "reruns": settings.reruns}


def settings_from_json(data: dict[str, Any]) -> RunSettings:
    return RunSettings(tolerances=Tolerances.model_validate(data["tolerances"]), checks=tuple(data["checks"]),
                       rule_set=data["rule_set"], reruns=data["reruns"])


def _to_json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json(strict=False)
    if isinstance(value, RunSettings):
        return settings_to_json(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return plain(value)


def encode(message: Message) -> bytes:
    data = {"kind": type(message).__name__, **{f.name: _to_json(getattr(message, f.name)) for f in fields(message)}}
    return json.dumps(data, allow_nan=True).encode()


def decode(raw: bytes) -> Message:
    data = json.loads(raw)
    cls = _KINDS[data.pop("kind")]
    if cls is CaseDone:
        data["records"] = [Record.from_json(r) for r in data["records"]]
    elif cls is Done:
        data["property_records"] = [Record.from_json(r) for r in data["property_records"]]
    elif cls is CaseRequest:
        data["path"] = Path(data["path"])
        data["settings"] = settings_from_json(data["settings"])
    return cls(**data)


def send(conn: multiprocessing.connection.Connection, message: Message) -> None:
    conn.send_bytes(encode(message))


def receive(conn: multiprocessing.connection.Connection) -> Message:
    """The next message; EOFError/OSError when the other end is gone."""
    return decode(conn.recv_bytes())
