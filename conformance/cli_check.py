"""The ``check``, ``replay`` and ``promote`` commands (property search and its reproducers),
registered on the ``rlk-conform`` app by ``conformance.cli``. Thin: they parse options and call
:mod:`conformance.properties` and :mod:`conformance.reproducer`; Hypothesis is imported only when
a command that searches or replays runs.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli import CapOpt, SpecOpt, _best_backend, _load, app, err, out, user_errors
from .errors import EXIT_FAILURE, EXIT_OK, UsageError
from .judge import CHECKS, Record
from .reproducer import DEFAULT_REGRESSION_DIR, DEFAULT_REPRODUCER_DIR
from .spec import DEFAULT_MEMORY_CAP_BYTES

DEFAULT_TOLERANCES = Path("specs/tolerances.yaml")
# Every check but the two that need a golden or a second backend is also a property.
PROPERTY_HELP = ", ".join(c for c in CHECKS if c not in ("contract", "parity")) + " (default: all)"


class ProfileName(str, Enum):
    ci = "ci"
    nightly = "nightly"


def _properties_module() -> Any:
    try:
        from . import properties
    except ImportError as exc:  # hypothesis is the one dependency only the property search needs
        raise UsageError(f"the property search needs Hypothesis ({exc}); install it with "
                         "pip install 'hypothesis>=6.100'") from None
    return properties


def _tolerances(path: Path, rules: str) -> Any:
    from .tolerances import load_tolerances

    tol = load_tolerances(path)
    if rules not in tol.accuracy:
        raise UsageError(f"--rules {rules!r}: {path} defines {', '.join(sorted(tol.accuracy))}")
    return tol


def _search_device(profile: Any, device: str | None) -> tuple[str | None, str]:
    """The backend's device (None = its default) and where the exact reference runs."""
    import torch

    if device is None and profile.device == "cuda" and torch.cuda.is_available():
        device = "cuda"
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return device, device if on_cuda else "cpu"


def search_records(impl: Any, requested: str, specs: list[Any], tol: Any, names: tuple[str, ...], settings: Any,
                   rules: str, reruns: int | None, reference_device: str, console: Console
                   ) -> tuple[list[Record], list[Any]]:
    """Run the property search with a progress bar on ``console``; the records and per-property results."""
    properties = _properties_module()
    with Progress(TextColumn(f"[bold]check[/] {impl.name}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task(names[0] if names else "", total=len(names))

        def on_property(result: Any) -> None:
            status = "FAIL" if result.counterexample is not None else ("ok" if result.status == "pass" else "skip")
            bar.update(task, advance=1, description=f"{result.name}: {status} ({result.examples_run} examples, "
                       f"{result.stopped_by or 'not applicable'})")

        results = properties.check_backend(impl, specs, tol, names, settings, rules, reruns, reference_device,
                                           requested, on_property=on_property)
    return [r for res in results for r in res.records], results


def property_records(impl: Any, requested: str, tol: Any, rules: str, checks: tuple[str, ...],
                     reruns: int | None) -> list[Record]:
    """``rlk-conform run --properties``: the properties among ``checks``, ci profile, default specs,
    reproducers in ``reproducers/``; the records join the run's."""
    properties = _properties_module()
    names = tuple(n for n in properties.PROPERTY_NAMES if n in checks)
    if not names:
        return []
    settings = properties.SearchSettings(profile=properties.PROFILES["ci"], reproducer_dir=DEFAULT_REPRODUCER_DIR)
    specs = _load(None, DEFAULT_MEMORY_CAP_BYTES // 2**20)
    records, results = search_records(impl, requested, specs, tol, names, settings, rules, reruns, "cpu", err)
    _print_reproducers(results, requested)
    return records


def print_search(console: Console, results: list[Any], budget: float | None) -> None:
    """One row per property: its result, the examples the search judged and what stopped it."""
    title = "property search" + (f" (time budget {budget:g} s per property)" if budget is not None else "")
    table = Table(title=title, caption="stopped by: max-examples, time-budget, counterexample (then shrunk), "
                  "exhausted (Hypothesis ran out of new or accepted examples)")
    table.add_column("property")
    table.add_column("result")
    table.add_column("examples run", justify="right")
    table.add_column("declined", justify="right")
    table.add_column("stopped by")
    table.add_column("seconds", justify="right")
    styles = {"pass": "green", "fail": "red", "error": "red", "skip": "yellow"}
    for res in results:
        status = res.status
        stopped = res.stopped_by or "not applicable"
        if res.shrink_stopped_by == "time-budget":
            stopped += ", shrinking cut by time-budget"
        table.add_row(res.name, f"[{styles.get(status, 'white')}]{status}[/]", str(res.examples_run),
                      str(res.examples_declined), stopped, f"{res.elapsed_s:.1f}")
    console.print(table)


def _print_reproducers(results: list[Any], backend: str) -> None:
    for res in results:
        if res.reproducer is not None:
            out.print(f"reproducer ({res.name}): {res.reproducer}\n      replay: rlk-conform replay "
                      f"{res.reproducer} --backend {backend}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@user_errors
def check(
    backend: Annotated[str | None, typer.Option(help="Registered name or package.module:attr. Default: cuda if "
                                                "available, else sdpa on the CPU.")] = None,
    profile: Annotated[ProfileName, typer.Option(help="ci: fast, derandomized, CPU. nightly: thousands of "
                                                 "examples, GPU, larger shapes.")] = ProfileName.ci,
    max_examples: Annotated[int | None, typer.Option("--max-examples", min=1, help="Examples per property "
                                                     "(default: the profile's).")] = None,
    time_budget: Annotated[float | None, typer.Option("--time-budget", min=0.0, metavar="SECONDS",
                                                      help="Wall-clock budget per property: no new example "
                                                      "starts after it; a counterexample found in time is "
                                                      "shrunk until twice the budget. Default: none (the "
                                                      "examples of --max-examples or the profile).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Search seed: the same seed draws the same examples "
                                             "(default: 0 for ci, random for nightly).")] = None,
    properties: Annotated[str | None, typer.Option(help="Comma-separated subset of: " + PROPERTY_HELP + ".")
                          ] = None,
    device: Annotated[str | None, typer.Option(help="Torch device for the backend (nightly: cuda if "
                                               "available).")] = None,
    spec: SpecOpt = None,
    memory_cap_mib: CapOpt = DEFAULT_MEMORY_CAP_BYTES // 2**20,
    rules: Annotated[str, typer.Option(help="Accuracy rule set of tolerances.yaml: default or strict.")] = "default",
    tolerances: Annotated[Path, typer.Option(help="Threshold file.")] = DEFAULT_TOLERANCES,
    reruns: Annotated[int | None, typer.Option(min=2, help="Determinism reruns (default: tolerances.yaml).")] = None,
    database: Annotated[Path | None, typer.Option(help="Hypothesis example database of unseeded (nightly) "
                                                  "searches; earlier failures are tried first. Default: "
                                                  ".rlk-conform/hypothesis.")] = None,
    reproducers: Annotated[Path, typer.Option(help="Where shrunk counterexamples are written.")
                           ] = DEFAULT_REPRODUCER_DIR,
    report_json: Annotated[Path | None, typer.Option("--report-json", help="Write the JSON report here.")] = None,
    junit: Annotated[Path | None, typer.Option(help="Write a JUnit XML report here.")] = None,
) -> None:
    """Search the space the specs describe for a case where the backend breaks a property; shrink
    each failure to its smallest case and write it as a reproducer (golden format)."""
    from .backends import load_backend
    from .environment import execution_target, numerical_settings
    from .golden import sha256_file
    from .report import build_report, print_summary, write_json, write_junit

    props = _properties_module()
    try:
        names = props.parse_properties(properties)
    except ValueError as exc:
        raise UsageError(f"--properties: {exc}") from None
    tol = _tolerances(tolerances, rules)
    specs = _load(spec, memory_cap_mib)
    chosen = props.PROFILES[profile.value]
    device, reference_device = _search_device(chosen, device)
    requested = backend or _best_backend()
    impl = load_backend(requested, device)
    settings = props.SearchSettings(profile=chosen, max_examples=max_examples, seed=seed,
                                    database_dir=database or props.DEFAULT_DATABASE_DIR, reproducer_dir=reproducers,
                                    time_budget=time_budget)
    space = props.space_from_specs(specs, chosen.tier, chosen.limits)
    meta = {
        "backend": {"requested": requested, "used": impl.name, "device": str(impl.device),
                    "output_dtype": str(getattr(impl, "output_dtype", None) or "input dtype"),
                    "returns_lse": bool(getattr(impl, "returns_lse", False)),
                    "description": getattr(impl, "description", "")},
        "compare_to": None,
        "execution_target": execution_target(str(impl.device)),
        "goldens": None,
        "search": {"profile": chosen.name, "tier": chosen.tier, "properties": list(names),
                   "max_examples": settings.examples, "time_budget_s": time_budget, "seed": settings.effective_seed,
                   "database": None if settings.effective_seed is not None else str(settings.database_dir),
                   "reproducers": str(reproducers), "reference_device": reference_device,
                   "specs": {op: p.spec_file for op, p in space.provenance.items()}, "space": space.describe()},
        "settings": {**numerical_settings(), "checks": list(names), "rule_set": rules, "reruns": reruns,
                     "tolerances_file": str(tolerances), "tolerances_sha256": sha256_file(tolerances)},
    }
    records, results = search_records(impl, requested, specs, tol, names, settings, rules, reruns,
                                      reference_device, err)
    meta["search"]["results"] = [res.summary() for res in results]
    report = build_report(records, meta)
    seed_text = "random seed" if settings.effective_seed is None else f"seed {settings.effective_seed}"
    budget_text = "" if time_budget is None else f", at most {time_budget:g} s"
    print_summary(out, records, f"rlk-conform check — backend {impl.name} on {impl.device}, profile {chosen.name} "
                  f"({settings.examples} examples per property{budget_text}, {seed_text})")
    print_search(out, results, time_budget)
    _print_reproducers(results, requested)
    if report_json:
        write_json(report_json, report)
        out.print(f"JSON report: {report_json}")
    if junit:
        write_junit(junit, records, f"rlk-conform.{impl.name}")
        out.print(f"JUnit report: {junit}")
    summary = report["summary"]
    if summary["executed"] == 0:
        out.print("[bold red]FAIL[/]: no property was executed (every record skipped) — nothing was verified")
        raise typer.Exit(EXIT_FAILURE)
    failing = [res.name for res in results if res.counterexample is not None]
    passed = [res.name for res in results if res.status == "pass"]
    line = (f"{len(passed)} properties held, {len(failing)} failed ({', '.join(failing) or 'none'}), "
            f"{len(names) - len(passed) - len(failing)} skipped")
    starved = [res.name for res in results if res.status == "skip" and res.stopped_by == "time-budget"]
    if starved:
        line += f" ({', '.join(starved)}: no example within the time budget)"
    if summary["verdict"] != "pass":
        out.print(f"[bold red]FAIL[/]: {line}")
        raise typer.Exit(EXIT_FAILURE)
    out.print(f"[bold green]PASS[/]: {line}")


@app.command()
@user_errors
def replay(
    file: Annotated[Path, typer.Argument(help="A reproducer written by check (or run --properties).")],
    backend: Annotated[str | None, typer.Option(help="Backend to replay on. Default: the one the reproducer "
                                                "names.")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device for the backend.")] = None,
    rules: Annotated[str, typer.Option(help="Accuracy rule set of tolerances.yaml: default or strict.")] = "default",
    tolerances: Annotated[Path, typer.Option(help="Threshold file.")] = DEFAULT_TOLERANCES,
    reruns: Annotated[int | None, typer.Option(min=2, help="Determinism reruns (default: tolerances.yaml).")] = None,
) -> None:
    """Re-run a reproducer's property on a backend; exit 1 while it still fails, 0 once it passes."""
    from .backends import load_backend
    from .reproducer import read_reproducer

    props = _properties_module()
    from .strategies import describe_shape

    tol = _tolerances(tolerances, rules)
    recorded = read_reproducer(file).info
    impl = load_backend(backend or recorded.backend_spec, device)
    result = props.replay(file, impl, tol, rules, reruns)
    rec, case = result.record, result.reproducer.case
    params = ", ".join(f"{k}={v}" for k, v in recorded.parameters.items()) or "none"
    target = recorded.execution_target
    lines = [f"reproducer {file}",
             f"  property   {recorded.property} ({params})",
             f"  case       {case.id}",
             f"  shape      {describe_shape(case)}",
             f"  recorded   {recorded.status} on {recorded.backend} ({recorded.backend_device}, "
             f"{target.get('device_name', '?')}, torch {target.get('torch', '?')}): {recorded.message}",
             f"  replayed   {rec.status} on {impl.name} ({impl.device}): {rec.message}"]
    for line in lines:
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    if result.still_fails:
        out.print(f"[bold red]STILL FAILS[/]: {recorded.property} on {impl.name}")
        raise typer.Exit(EXIT_FAILURE)
    if rec.status == "skip":
        out.print(f"[bold yellow]SKIPPED[/]: {impl.name} declined the case — nothing was verified")
        raise typer.Exit(EXIT_FAILURE)
    out.print(f"[bold green]PASSES NOW[/]: {recorded.property} holds on {impl.name} for this case")
    raise typer.Exit(EXIT_OK)


@app.command()
@user_errors
def promote(
    file: Annotated[Path, typer.Argument(help="A reproducer (or any golden file).")],
    to: Annotated[Path, typer.Option("--to", help="Regression golden directory; rlk-conform run includes "
                                     "goldens/regression.")] = DEFAULT_REGRESSION_DIR,
) -> None:
    """Add a reproducer's case to a regression golden set (its manifest is rewritten)."""
    from .reproducer import promote as promote_case

    done = promote_case(file, to)
    verb = "replaced" if done.replaced else "added"
    out.print(f"{verb} {done.case_id}\n  → {done.path}\n  {done.manifest}: {done.cases} case(s), dataset SHA-256 "
              f"{done.dataset_sha256}", markup=False, highlight=False, soft_wrap=True)
