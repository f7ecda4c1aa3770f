"""The one progress bar of every long command (generate, verify, run, check): on stderr, started
only once the library has validated its input and says how much work there is, so that an error
before that stays the only line on stderr; stopped whatever happens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from conformance.cli.app import err


class Bar:
    """``label`` in bold, then ``title`` (changeable), the bar, done/total, a description and the
    elapsed time (and an ETA with ``eta``); ``extra`` appends a text column over the task's fields."""

    def __init__(self, label: str, title: str = "", *, eta: bool = False, extra: str | None = None,
                 **fields: Any) -> None:
        columns: list[ProgressColumn] = [TextColumn(f"[bold]{label}[/] {{task.fields[title]}}"), BarColumn(),
                                         MofNCompleteColumn(), TextColumn("{task.description}")]
        if extra:
            columns.append(TextColumn(extra))
        columns.append(TimeElapsedColumn())
        if eta:
            columns += [TextColumn("ETA"), TimeRemainingColumn()]
        self.progress = Progress(*columns, console=err, transient=False)
        self.task = self.progress.add_task("", total=0, title=title, **fields)

    def start(self, total: int, **fields: Any) -> None:
        """The library has validated everything: show the bar with ``total`` steps."""
        self.progress.update(self.task, total=total, **fields)
        if not self.progress.live.is_started:
            self.progress.start()

    def advance(self, description: str | None = None, **fields: Any) -> None:
        kwargs: dict[str, Any] = dict(fields)
        if description is not None:
            kwargs["description"] = description
        self.progress.update(self.task, advance=1, **kwargs)

    def stop(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


@contextlib.contextmanager
def progress_bar(label: str, title: str = "", *, eta: bool = False, extra: str | None = None,
                 **fields: Any) -> Iterator[Bar]:
    """A :class:`Bar` for the block; it appears at its first :meth:`Bar.start` and stops at the end."""
    bar = Bar(label, title, eta=eta, extra=extra, **fields)
    try:
        yield bar
    finally:
        bar.stop()
