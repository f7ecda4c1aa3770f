"""The run loop: golden files streamed one at a time through a per-case judge, in the order given.
One case is in memory at a time.

The judge is a function of a golden path (:data:`~conformance.run.case.CaseJudge`): in this process
(:func:`~conformance.run.case.in_process_judge`) or in a restartable worker
(:meth:`conformance.run.isolation.IsolatedBackend.case_judge`); the loop does not know which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conformance.errors import UsageError
from conformance.judge.records import Record
from conformance.processes import Terminated
from conformance.run.case import CaseJudge, CaseOutcome


@dataclass
class RunResult:
    records: list[Record] = field(default_factory=list)
    cases: int = 0
    complete: bool = True  # False when a signal stopped the run; records hold every finished case
    interrupted_by: str | None = None  # "SIGINT" or "SIGTERM"
    refused: int = 0  # golden files refused as damaged (one error record each, nothing judged)


def run(paths: Sequence[Path], judge: CaseJudge, on_case: Callable[[str, list[Record]], None] | None = None,
        on_outcome: Callable[[Path, CaseOutcome], None] | None = None) -> RunResult:
    """Judge every golden file in ``paths`` with ``judge``, one at a time, in order.

    As each case finishes, ``on_case(file name, records)`` and ``on_outcome(path, outcome)`` are
    called. A refused golden (damaged, over the size cap, not matching the manifest) is one error
    record counted in ``refused``. KeyboardInterrupt and :class:`~conformance.processes.Terminated`
    stop the run: the result holds every finished case, ``complete`` is False and
    ``interrupted_by`` names the signal; the case in flight is dropped. ConformanceError (a
    user-fixable problem) propagates.
    """
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
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``; UsageError otherwise."""
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n
