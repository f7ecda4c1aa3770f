"""The ``backends`` command."""

from __future__ import annotations

from rich.table import Table

from conformance.cli.app import app, out, user_errors


@app.command("backends")
@user_errors
def list_backends_cmd() -> None:
    """List every registered backend: whether it is available here (and why not), the ops and attention
    variants it implements, and what it is."""
    from conformance.backends.registry import list_backends

    table = Table(title="backends (use --backend NAME, or --backend package.module:attr)")
    for col in ("name", "available", "device", "ops; variants", "description / reason"):
        table.add_column(col, overflow="fold")
    for info in list_backends():
        table.add_row(info.name, "[green]yes[/]" if info.available else "[red]no[/]", info.device or "",
                      info.implements, info.description if info.available else (info.reason or ""))
    out.print(table)
