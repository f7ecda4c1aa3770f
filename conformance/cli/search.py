"""The ``check``, ``replay`` and ``promote`` commands: the property search and its reproducers.
Thin: they parse options and call :func:`conformance.jobs.check.run_check`,
:func:`conformance.search.replay.replay` and :func:`conformance.golden.reproducer.promote`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from conformance.cli.app import (
    DEFAULT_TOLERANCES,
    BackendOpt,
    CapOpt,
    DeviceOpt,
    JunitOpt,
    ReportJsonOpt,
    RerunsOpt,
    RulesOpt,
    SpecOpt,
    TolerancesOpt,
    app,
    out,
    user_errors,
)
from conformance.cli.progress import progress_bar
from conformance.errors import EXIT_FAILURE, EXIT_OK, UsageError
from conformance.golden.reproducer import DEFAULT_REPRODUCER_DIR
from conformance.spec.checks import CHECKS
from conformance.spec.load import DEFAULT_MEMORY_CAP_BYTES

# Every check but the contracts (judged on every call) and parity (a second backend) is also a property.
NOT_PROPERTIES = ("contract", "parity", "gradient_contract")
PROPERTY_HELP = ", ".join(c for c in CHECKS if c not in NOT_PROPERTIES) + " (default: all)"


class ProfileName(str, Enum):
    ci = "ci"
    nightly = "nightly"


def _describe(result: Any) -> str:
    status = "FAIL" if result.counterexample is not None else ("ok" if result.status == "pass" else "skip")
    return f"{result.name}: {status} ({result.examples_run} examples, {result.stopped_by or 'not applicable'})"


@app.command()
@user_errors
def check(
    backend: BackendOpt = None,
    search_profile: Annotated[ProfileName, typer.Option("--search-profile", help="ci: fast, derandomized, CPU. "
                                                        "nightly: thousands of examples, GPU, larger shapes."
                                                        )] = ProfileName.ci,
    old_profile: Annotated[str | None, typer.Option("--profile", hidden=True)] = None,
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
    filter_: Annotated[str, typer.Option("--filter", help="Search only the space of the profile tier's cases "
                                         "whose id matches this glob (as run --filter), e.g. '*-d64-*-bf16-*': "
                                         "their dtypes, head dims, heads and lengths.")] = "*",
    memory_cap_mib: CapOpt = DEFAULT_MEMORY_CAP_BYTES // 2**20,
    rules: RulesOpt = "default",
    tolerances: TolerancesOpt = DEFAULT_TOLERANCES,
    reruns: RerunsOpt = None,
    database: Annotated[Path | None, typer.Option(help="Hypothesis example database of unseeded (nightly) "
                                                  "searches; earlier failures are tried first. Default: "
                                                  ".rlk-conform/hypothesis.")] = None,
    reproducers: Annotated[Path, typer.Option(help="Where shrunk counterexamples are written.")
                           ] = DEFAULT_REPRODUCER_DIR,
    report_json: ReportJsonOpt = None,
    junit: JunitOpt = None,
) -> None:
    """Search the space the specs describe for a case where the backend breaks a property; shrink
    each failure to its smallest case and write it as a reproducer (golden format)."""
    from conformance.jobs.check import CheckRequest, run_check
    from conformance.report.console import print_reproducers, print_search, print_summary
    from conformance.report.json import write_json
    from conformance.report.junit import write_junit

    if old_profile is not None:
        raise UsageError(f"--profile {old_profile}: check's search profile is --search-profile {old_profile} "
                         "(--profile is run's timing flag)")
    request = CheckRequest(backend=backend, profile=search_profile.value, max_examples=max_examples,
                           time_budget=time_budget, seed=seed, properties=properties, device=device, specs=spec,
                           memory_cap_bytes=memory_cap_mib * 2**20, rules=rules, tolerances=tolerances, reruns=reruns,
                           database=database, reproducers=reproducers, filter=filter_)
    with progress_bar("check") as bar:
        done = run_check(request, on_start=lambda n, name: bar.start(n, title=name),
                         on_property=lambda result: bar.advance(_describe(result)))
    impl, settings, records = done.backend, done.settings, done.records
    seed_text = "random seed" if settings.effective_seed is None else f"seed {settings.effective_seed}"
    budget_text = "" if time_budget is None else f", at most {time_budget:g} s"
    budget_text += "" if filter_ == "*" else f", the space of the cases {filter_}"
    print_summary(out, records, f"rlk-conform check — backend {impl.name} on {impl.device}, profile "
                  f"{done.profile.name} ({settings.examples} examples per property{budget_text}, {seed_text})")
    print_search(out, done.results, time_budget)
    print_reproducers(out, records, done.report["backend"]["requested"])
    if report_json:
        write_json(report_json, done.report)
        out.print(f"JSON report: {report_json}")
    if junit:
        write_junit(junit, records, f"rlk-conform.{impl.name}")
        out.print(f"JUnit report: {junit}")
    if done.report["summary"]["executed"] == 0:
        out.print("[bold red]FAIL[/]: no property was executed (every record skipped) — nothing was verified")
        raise typer.Exit(EXIT_FAILURE)
    if done.exit_code != EXIT_OK:
        out.print(f"[bold red]FAIL[/]: {done.summary_line()}")
        raise typer.Exit(EXIT_FAILURE)
    out.print(f"[bold green]PASS[/]: {done.summary_line()}")


@app.command()
@user_errors
def replay(
    file: Annotated[Path, typer.Argument(help="A reproducer written by check (or run --properties): a .h5 file, "
                                         "or the .json layout file of a pack or page counterexample.")],
    backend: Annotated[str | None, typer.Option(help="Backend to replay on. Default: the one the reproducer "
                                                "names.")] = None,
    device: DeviceOpt = None,
    rules: RulesOpt = "default",
    tolerances: TolerancesOpt = DEFAULT_TOLERANCES,
    reruns: RerunsOpt = None,
) -> None:
    """Re-run a reproducer's property on a backend; exit 1 while it still fails, 0 once it passes."""
    from conformance.backends.registry import load_backend
    from conformance.golden.layout_reproducer import read_any_reproducer
    from conformance.run.settings import load_rules
    from conformance.search.replay import replay as replay_reproducer
    from conformance.search.strategies import describe_shape

    tol = load_rules(tolerances, rules)
    recorded = read_any_reproducer(file).info
    impl = load_backend(backend or recorded.backend_spec, device)
    result = replay_reproducer(file, impl, tol, rules, reruns)
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
    file: Annotated[Path, typer.Argument(help="A reproducer (or any golden file); a layout reproducer (.json) "
                                         "brings the member goldens beside it.")],
    to: Annotated[Path | None, typer.Option("--to", help="Regression golden directory. Default: regression/ of the "
                                            "default golden root, which rlk-conform run includes with the default "
                                            "goldens.")] = None,
) -> None:
    """Add a reproducer's case to a regression golden set (its manifest is rewritten); a layout case
    with the dense goldens it is composed of."""
    from conformance.golden.layout_reproducer import promote_any

    done = promote_any(file, to)
    verb = "replaced" if done.replaced else "added"
    members = "".join(f"\n  member {m}" for m in done.members)
    out.print(f"{verb} {done.case_id}\n  → {done.path}{members}\n  {done.manifest}: {done.cases} case(s), "
              f"dataset SHA-256 {done.dataset_sha256}", markup=False, highlight=False, soft_wrap=True)
