"""Errors the user can act on. The CLI prints each as one line and exits with its code."""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class ConformanceError(Exception):
    """Base class: ``str(err)`` is the single line the user sees."""

    exit_code = EXIT_BAD_INPUT


class SpecError(ConformanceError):
    """A spec or tolerance file is invalid: names the file, line, field and reason."""

    def __init__(self, file: str | Path, line: int | None, field: str | None, reason: str) -> None:
        self.file = str(file)
        self.line = line
        self.field = field
        self.reason = reason
        where = self.file if line is None else f"{self.file}:{line}"
        what = f" {field}:" if field else ""
        super().__init__(f"{where}:{what} {reason}")


class GoldenError(ConformanceError):
    """A golden file or manifest is unreadable, damaged or of the wrong schema."""

    def __init__(self, file: str | Path, reason: str, dataset: str | None = None) -> None:
        self.file = str(file)
        self.dataset = dataset
        self.reason = reason
        where = self.file if dataset is None else f"{self.file}::{dataset}"
        super().__init__(f"{where}: {reason}")


class UsageError(ConformanceError):
    """A command-line option or combination of options is wrong."""
