"""The ``rlk-conform`` command line. Every command parses options, calls one library function and
maps its result to output and an exit code.

Commands are registered by importing the modules of :data:`COMMAND_MODULES` (each decorates
:data:`conformance.cli.app.app`); the list is explicit, as pytest's ``default_plugins`` is.
"""

from __future__ import annotations

from conformance.cli import backends, golden, report, run, search  # noqa: F401  (registers the commands, in this order)
from conformance.cli.app import app

COMMAND_MODULES = ("golden", "run", "backends", "search", "report")


def main() -> None:
    app()
