"""The ``rlk-conform`` command line. Every command parses options, calls one library function and
maps its result to output and an exit code.

Commands are registered by importing the modules of :data:`COMMAND_MODULES` (each decorates
:data:`conformance.cli.app.app`); the list is explicit, as pytest's ``default_plugins`` is.
"""

from __future__ import annotations

import sys

import typer

from conformance.cli import backends, golden, report, run, search  # noqa: F401  (registers the commands, in this order)
from conformance.cli.app import app, err

COMMAND_MODULES = ("golden", "run", "backends", "search", "report")


def main() -> None:
    """The command line. A usage error (an unknown command or option, a bad option value) is one line
    on stderr naming the command, with exit code 2, like every other bad input; ``rlk-conform``
    alone prints the help."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        err.print("Aborted!", markup=False)
        sys.exit(1)
    except typer.TyperException as exc:  # the command-line parser's errors (click's UsageError and the like)
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # type: ignore[attr-defined]  # the help, for a bare command that needs arguments
        else:
            ctx = getattr(exc, "ctx", None)  # None when the parser stops before a command's context exists
            command = ctx.command_path if ctx is not None else app.info.name
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            err.print(f"error: {command}: {message} (see: {command} --help)", markup=False, highlight=False,
                      emoji=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
