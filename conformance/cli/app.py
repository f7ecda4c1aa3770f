"""The ``rlk-conform`` app: its consoles, the handling of user errors, and the options several commands share."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from conformance import __version__
from conformance.errors import ConformanceError
from conformance.spec.load import OpSpec, default_spec_paths, load_specs

app = typer.Typer(
    name="rlk-conform",
    help="Numerical conformance harness and exact golden-data generator for attention kernels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# Piped or redirected output is not cut to 80 columns (case ids and checksums stay on one line):
# $COLUMNS when set, else wide enough for the widest table.
PIPE_WIDTH = 240


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=int(os.environ.get("COLUMNS") or 0) or PIPE_WIDTH)


out = _console()
err = _console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


class Tier(str, Enum):
    smoke = "smoke"
    standard = "standard"
    full = "full"


def user_errors(fn: F) -> F:
    """Turn user-facing errors into one line on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConformanceError as exc:
            err.print(f"error: {exc}", markup=False, highlight=False, emoji=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out.print(f"rlk-conform {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Numerical conformance harness and exact golden-data generator for attention kernels."""


SpecOpt = Annotated[list[Path] | None, typer.Option("--spec", help="Op spec file (repeatable). Default: the "
                                                    "shipped attention.yaml and kv_cache_attention.yaml "
                                                    "(specs/ of the source checkout).")]
CapOpt = Annotated[int, typer.Option("--memory-cap-mib", min=1, help="Refuse cases whose tensors exceed this.")]


def load_spec_option(spec: list[Path] | None, memory_cap_mib: int) -> list[OpSpec]:
    paths = spec or default_spec_paths()
    return load_specs(paths, memory_cap_mib * 2**20)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --- options shared by several commands -------------------------------------------------------------

BackendOpt = Annotated[str | None, typer.Option(help="Registered name or package.module:attr. Default: cuda if "
                                                "available, else sdpa on the CPU.")]
DeviceOpt = Annotated[str | None, typer.Option(help="Torch device for the backend, e.g. cpu, cuda:1.")]
RulesOpt = Annotated[str, typer.Option(help="Accuracy rule set of tolerances.yaml: default or strict.")]
TolerancesOpt = Annotated[Path | None, typer.Option(help="Threshold file. Default: the shipped tolerances.yaml "
                                                   "(specs/tolerances.yaml of the source checkout).")]
RerunsOpt = Annotated[int | None, typer.Option(min=2, help="Determinism reruns (default: tolerances.yaml).")]
ReportJsonOpt = Annotated[Path | None, typer.Option("--report-json", help="Write the JSON report here.")]
JunitOpt = Annotated[Path | None, typer.Option(help="Write a JUnit XML report here.")]
DEFAULT_TOLERANCES = None  # the shipped tolerances.yaml (conformance.locations.default_tolerances)
