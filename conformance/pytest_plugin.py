"""pytest plugin (entry point ``pytest11``: ``rlk_conform``): rlk-conform's golden cases and
property searches as tests.

``pytest --rlk-backend NAME`` adds, after the ordinary collection:

- ``rlk-conform::golden[<case id>]`` — one test per case of ``--rlk-goldens`` (the default smoke
  goldens, with their regression set when it exists): every check ``rlk-conform run`` makes on that case;
- ``rlk-conform::property[<name>]`` — one Hypothesis search per property (``--rlk-search-profile``,
  ci by default); a failure names its smallest case and the reproducer written for it.

``--rlk-only`` deselects every other collected test, so that running from a repository with its
own test suite judges the backend and nothing else.

A test fails when one of its records is ``fail`` or ``error`` (the message lists them), is skipped
when the backend declined everything, and passes otherwise — the same verdicts as the CLI. Without
``--rlk-backend`` the plugin adds nothing and imports nothing heavy.

With pytest-xdist (``-n``) every worker collects the same tests. On a machine with several GPUs a
CUDA backend's worker ``gwN`` runs on ``cuda:N mod count``, and ``-n auto`` starts one worker per
GPU. With ``--junitxml`` each test is one ``<testcase>``; the backend and any reproducer path are
``<property>`` elements of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

_STATE = pytest.StashKey["RlkState"]()
SUITE = "rlk-conform"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rlk-conform", "rlk-conform: golden cases and property searches of a backend")
    group.addoption("--rlk-backend", default=None, metavar="NAME",
                    help="Backend to test (registered name or package.module:attr); enables the plugin.")
    group.addoption("--rlk-device", default=None, help="Torch device for the backend, e.g. cpu, cuda:1.")
    group.addoption("--rlk-goldens", default=None, metavar="DIR",
                    help="Golden directory whose cases become tests, or 'none'. Default: the default smoke goldens "
                    "($RLK_GOLDENS/smoke, else the source checkout's goldens/smoke, else ./goldens/smoke) and their "
                    "regression set.")
    group.addoption("--rlk-no-regression", action="store_true",
                    help="Leave out the regression set (promoted reproducers) of the default goldens.")
    group.addoption("--rlk-only", action="store_true",
                    help="Run the rlk-conform tests only: every other collected test is deselected.")
    group.addoption("--rlk-checks", default=None, help="Comma-separated checks of each golden test (default: "
                    "those of rlk-conform run).")
    group.addoption("--rlk-properties", default="all", help="Comma-separated properties to search, 'all' or "
                    "'none'.")
    group.addoption("--rlk-search-profile", default="ci", choices=("ci", "nightly"),
                    help="Property search profile (as rlk-conform check --search-profile).")
    group.addoption("--rlk-max-examples", type=int, default=None, help="Examples per property.")
    group.addoption("--rlk-time-budget", type=float, default=None, metavar="SECONDS",
                    help="Wall-clock budget per property (as rlk-conform check --time-budget).")
    group.addoption("--rlk-seed", type=int, default=None, help="Search seed (default: 0 for ci, random for "
                    "nightly).")
    group.addoption("--rlk-specs", default=None, metavar="DIR", help="Directory of attention.yaml and "
                    "kv_cache_attention.yaml (the search space). Default: the shipped specs.")
    group.addoption("--rlk-tolerances", default=None, metavar="FILE", help="Threshold file. Default: the shipped "
                    "tolerances.yaml.")
    group.addoption("--rlk-rules", default="default", help="Accuracy rule set of the tolerances file.")
    group.addoption("--rlk-reproducers", default="reproducers", metavar="DIR",
                    help="Where shrunk counterexamples are written.")
    group.addoption("--rlk-database", default=None, metavar="DIR", help="Hypothesis example database of "
                    "unseeded searches (default: .rlk-conform/hypothesis).")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("rlk_backend"):
        config.stash[_STATE] = RlkState(config)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` with a backend: one worker per GPU when several are visible."""
    if not config.getoption("rlk_backend"):
        return None
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return count if count > 1 else None


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, so that they apply to these tests too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.stash.get(_STATE, None) is None:
        return
    if config.getoption("rlk_only") and items:
        config.hook.pytest_deselected(items=list(items))
        items.clear()
    # Collected like any collector's tests, so that counts, --collect-only and xdist see them.
    items.extend(session.genitems(RlkSuite.from_parent(session, name=SUITE, nodeid=SUITE)))


def worker_device(device: str | None, worker: str | None, gpus: int) -> str | None:
    """The device of xdist worker ``worker`` (``gwN``): with several GPUs, a CUDA device without an
    index becomes ``cuda:N mod gpus``; anything else is kept."""
    if not worker or gpus < 2 or device not in ("cuda", None):
        return device
    index = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
    return f"cuda:{index % gpus}"


class RlkState:
    """Per-process state: options, and the backend, specs and tolerances loaded on first use."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.base = config.invocation_params.dir

    def opt(self, name: str) -> Any:
        return self.config.getoption(name)

    def path(self, name: str) -> Path | None:
        """An option's path, relative to where pytest was started; None when the option is unset."""
        value = self.opt(name)
        return None if value is None else self.base / value

    def golden_cases(self) -> list[tuple[Path, str]]:
        """(file, case id) of every selected golden case, in case-id order per directory."""
        from conformance.errors import ConformanceError
        from conformance.golden.manifest import read_manifest
        from conformance.locations import REGRESSION, find_goldens

        roots: list[Path] = []
        given = self.opt("rlk_goldens")
        if given is None:  # the default goldens, and their regression set
            try:
                root = find_goldens("smoke")
            except ConformanceError as exc:
                raise pytest.UsageError(f"--rlk-goldens: {exc}") from None
            roots.append(root)
            regression = root.parent / REGRESSION
            if not self.opt("rlk_no_regression") and (regression / "manifest.json").is_file():
                roots.append(regression)
        elif str(given).lower() != "none":
            root = self.base / given
            if not (root / "manifest.json").is_file():
                raise pytest.UsageError(f"--rlk-goldens {root}: no manifest.json there (generate goldens, or pass "
                                        "--rlk-goldens none)")
            roots.append(root)
        cases = []
        for root in roots:
            entries = sorted(read_manifest(root)["files"], key=lambda e: e["case_id"])
            cases += [(root / e["path"], e["case_id"]) for e in entries]
        return cases

    def property_names(self) -> Sequence[str]:
        text = str(self.opt("rlk_properties"))
        if text.lower() == "none":
            return ()
        from conformance.search.catalog import parse_properties

        try:
            return parse_properties(text)
        except ValueError as exc:
            raise pytest.UsageError(f"--rlk-properties: {exc}") from None

    @cached_property
    def _loaded(self) -> tuple[Any, str | None]:
        """(backend, None) or (None, why it cannot be loaded): each test then fails with the reason,
        which works the same in an xdist worker as in a single process."""
        import torch

        from conformance.backends.registry import load_backend
        from conformance.errors import ConformanceError

        name, device = self.opt("rlk_backend"), self.opt("rlk_device")
        try:
            impl = load_backend(name, device)
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            spread = worker_device(device, os.environ.get("PYTEST_XDIST_WORKER"), gpus)
            if spread != device and str(impl.device).startswith("cuda"):
                impl = load_backend(name, spread)
        except ConformanceError as exc:
            return None, f"--rlk-backend {name}: {exc}"
        return impl, None

    @property
    def backend(self) -> Any:
        impl, problem = self._loaded
        if problem is not None:
            pytest.fail(problem, pytrace=False)
        return impl

    @cached_property
    def tolerances(self) -> Any:
        from conformance.errors import ConformanceError
        from conformance.run.settings import load_rules

        try:
            return load_rules(self.path("rlk_tolerances"), self.opt("rlk_rules"), option="--rlk-rules")
        except ConformanceError as exc:
            raise pytest.UsageError(str(exc)) from None

    @cached_property
    def invoker(self) -> Any:
        from conformance.run.invoker import Invoker

        return Invoker(self.backend)

    @cached_property
    def run_settings(self) -> Any:
        from conformance.errors import ConformanceError
        from conformance.run.settings import RunSettings
        from conformance.spec.checks import parse_checks

        try:
            checks = parse_checks(self.opt("rlk_checks"), option="--rlk-checks", allow_parity=False)
        except ConformanceError as exc:
            raise pytest.UsageError(str(exc)) from None
        return RunSettings(tolerances=self.tolerances, checks=checks, rule_set=self.opt("rlk_rules"))

    @cached_property
    def search(self) -> tuple[Any, Any, Any]:
        """(PropertyContext, SpecSpace, SearchSettings) of this process's searches."""
        from conformance.search import engine, properties
        from conformance.search.strategies import space_from_specs
        from conformance.spec.load import default_spec_paths, load_specs

        profile = engine.PROFILES[self.opt("rlk_search_profile")]
        specs = load_specs(default_spec_paths(self.path("rlk_specs")))
        space = space_from_specs(specs, profile.tier, profile.limits)
        database = self.opt("rlk_database")
        settings = engine.SearchSettings(
            profile=profile, max_examples=self.opt("rlk_max_examples"), seed=self.opt("rlk_seed"),
            time_budget=self.opt("rlk_time_budget"),
            database_dir=self.base / database if database else self.base / engine.DEFAULT_DATABASE_DIR,
            reproducer_dir=self.path("rlk_reproducers"))
        device = str(self.backend.device)
        reference_device = device if device.startswith("cuda") else "cpu"
        ctx = properties.PropertyContext(self.invoker, self.tolerances, self.opt("rlk_rules"),
                                         reference_device=reference_device, backend_spec=self.opt("rlk_backend"))
        return ctx, space, settings


class RlkSuite(pytest.Collector):
    """The plugin's tests: one per golden case, then one per property."""

    def collect(self) -> list[pytest.Item]:
        state: RlkState = self.config.stash[_STATE]
        items: list[pytest.Item] = [GoldenItem.from_parent(self, name=f"golden[{case_id}]", golden_path=path)
                                    for path, case_id in state.golden_cases()]
        items += [PropertyItem.from_parent(self, name=f"property[{prop}]", prop=prop)
                  for prop in state.property_names()]
        return items


class RecordsFailed(Exception):
    """Some records of a test are ``fail`` or ``error``."""

    def __init__(self, records: Sequence[Any]) -> None:
        super().__init__(records[0].message if records else "")
        self.records = list(records)


def _verdict(item: pytest.Item, records: Sequence[Any]) -> None:
    """Fail, skip or pass ``item`` on its records (fail/error anywhere fails; only skips skip)."""
    bad = [r for r in records if r.status in ("fail", "error")]
    if bad:
        raise RecordsFailed(bad)
    if records and all(r.status == "skip" for r in records):
        pytest.skip(records[0].message)


def _describe_failure(item: pytest.Item, excinfo: pytest.ExceptionInfo[BaseException]) -> str | None:
    if not isinstance(excinfo.value, RecordsFailed):
        return None
    lines = []
    for r in excinfo.value.records:
        lines.append(f"{r.status.upper()} {r.check} [{r.dtype or '-'}] {r.case_id}")
        lines.append(f"    {r.message}")
        if r.metrics.get("reproducer"):
            lines.append(f"    reproducer: {r.metrics['reproducer']}")
            lines.append(f"    replay: rlk-conform replay {r.metrics['reproducer']} --backend "
                         f"{item.config.getoption('rlk_backend')}")
    return "\n".join(lines)


class _RlkItem(pytest.Item):
    @property
    def state(self) -> RlkState:
        return self.config.stash[_STATE]

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        text = _describe_failure(self, excinfo)
        return text if text is not None else super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{SUITE}::{self.name}"


class GoldenItem(_RlkItem):
    """Every check of ``rlk-conform run`` on one golden case."""

    def __init__(self, *, golden_path: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.golden_path = golden_path

    def runtest(self) -> None:
        from conformance.errors import GoldenError
        from conformance.golden.format import read_golden
        from conformance.run.case import run_case

        state = self.state
        self.user_properties.append(("backend", state.backend.name))
        try:
            gc = read_golden(self.golden_path)
        except GoldenError as exc:
            pytest.fail(f"golden file refused, nothing judged: {exc}", pytrace=False)
        _verdict(self, run_case(state.invoker, gc, state.run_settings))


class PropertyItem(_RlkItem):
    """One property's search; its failure is shrunk and written as a reproducer."""

    def __init__(self, *, prop: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prop = prop

    def runtest(self) -> None:
        from conformance.search.catalog import PROPERTIES
        from conformance.search.engine import search_property

        ctx, space, settings = self.state.search
        self.user_properties.append(("backend", ctx.backend.name))
        result = search_property(PROPERTIES[self.prop], ctx, space, settings)
        if result.reproducer is not None:
            self.user_properties.append(("reproducer", str(result.reproducer)))
        _verdict(self, result.records)
