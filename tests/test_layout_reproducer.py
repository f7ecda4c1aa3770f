"""Layout reproducers: check writes a planted pack or page defect as a layout file with its member
goldens, replay re-runs it with the same composition and block table, promote adds it to a regression
set that run includes; a damaged one is one line and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SPEC_DIR
from planted_layouts import ReadsUnusedTail, TileFromPackMax
from typer.testing import CliRunner, Result

from conformance.cli.app import app
from conformance.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from conformance.golden.format import read_golden
from conformance.golden.layout_reproducer import read_layout_reproducer
from conformance.golden.layouts import read_layout
from conformance.golden.manifest import read_manifest
from conformance.golden.verify import verify
from conformance.search import layout_properties
from conformance.search.engine import PROFILES, PropertyResult, SearchSettings, check_backend
from conformance.search.layout_strategies import block_table_order, page_count_of
from conformance.search.replay import replay
from conformance.spec.load import OpSpec
from conformance.spec.tolerances import load_tolerances

TOLERANCES = load_tolerances(SPEC_DIR / "tolerances.yaml")
SPEC_ARGS = ("--spec", SPEC_DIR / "attention.yaml", "--spec", SPEC_DIR / "kv_cache_attention.yaml",
             "--tolerances", SPEC_DIR / "tolerances.yaml")
TAIL = "planted_layouts:ReadsUnusedTail"
TILE = "planted_layouts:TileFromPackMax"
CORRECT = "planted_layouts:LayoutCorrect"


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def _search(backend: Any, specs: list[OpSpec], name: str, out: Path) -> PropertyResult:
    (result,) = check_backend(backend, specs, TOLERANCES, (name,),
                              SearchSettings(profile=PROFILES["ci"], reproducer_dir=out),
                              backend_spec=f"planted_layouts:{type(backend).__name__}")
    assert result.counterexample is not None and result.reproducer is not None, result.records
    return result


@pytest.fixture(scope="module")
def page_found(repo_specs: list[OpSpec], tmp_path_factory: pytest.TempPathFactory) -> PropertyResult:
    """``page`` on the planted backend that reads the unused tail of the last page (shrinks to ``1x1``)."""
    return _search(ReadsUnusedTail(), repo_specs, "page", tmp_path_factory.mktemp("page"))


@pytest.fixture(scope="module")
def pack_found(repo_specs: list[OpSpec], tmp_path_factory: pytest.TempPathFactory) -> PropertyResult:
    """``pack`` on the planted backend whose tile size follows the pack's longest sequence (two members)."""
    return _search(TileFromPackMax(), repo_specs, "pack", tmp_path_factory.mktemp("pack"))


def copied(found: PropertyResult, tmp_path: Path) -> Path:
    """A copy of the reproducer's directory (the layout file and its members), to damage or edit."""
    assert found.reproducer is not None
    root = found.reproducer.parents[3]  # <dir>/<backend>/<op>/property/<name>/<id>.json → <dir>/<backend>
    shutil.copytree(root, tmp_path / "rep")
    return tmp_path / "rep" / found.reproducer.relative_to(root)


def edit(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_check_writes_a_layout_reproducer_and_says_how_to_replay_it(tmp_path: Path) -> None:
    result = invoke("check", "--backend", TAIL, "--properties", "page", "--reproducers", tmp_path, *SPEC_ARGS)
    assert result.exit_code == EXIT_FAILURE, result.output
    (path,) = tmp_path.rglob("*.json")
    assert f"replay: rlk-conform replay {path} --backend {TAIL}" in " ".join(result.stdout.split())
    case, _ = read_layout(path)  # the plain layout reader takes it as it is
    assert all((tmp_path / "layout-reads-unused-tail" / f"{m}.h5").is_file() for m in case.members)


@pytest.mark.parametrize("found_name", ["page_found", "pack_found"])
def test_a_layout_reproducer_reads_back_as_it_was_written(found_name: str, request: pytest.FixtureRequest) -> None:
    found: PropertyResult = request.getfixturevalue(found_name)
    cx = found.counterexample
    assert cx is not None and found.reproducer is not None
    rep = read_layout_reproducer(found.reproducer)
    assert rep.case == cx.example.case  # composition, pack order, page size and page sizes
    info = rep.info
    assert (info.property, info.status, info.profile, info.hypothesis_seed) == (found.name, "fail", "ci", 0)
    assert info.parameters == cx.example.params and info.message == cx.outcome.verdict.message
    assert info.backend == found.reproducer.parents[3].name  # <dir>/<backend>/…
    assert info.backend_spec == {"page": TAIL, "pack": TILE}[found.name]  # what replay loads by default
    assert info.execution_target["device"] == "cpu"
    assert len(rep.layout.sequences) == len(cx.subject.sequences) == rep.case.batch
    for got, want in zip(rep.layout.sequences, cx.subject.sequences):
        assert got.ref == want.ref
        assert all(torch.equal(getattr(got, x), getattr(want, x)) for x in "qkv")
        assert np.array_equal(got.golden.out, want.golden.out) and np.array_equal(got.golden.lse, want.golden.lse)
    root = found.reproducer.parents[3]
    for member in cx.subject.members:  # each member golden holds the drawn dense case and its exact reference
        gc = read_golden(root / f"{member.case.id}.h5")
        assert gc.case == member.case and torch.equal(gc.inputs.q, member.inputs.q)
        assert np.array_equal(gc.golden.out, member.golden.out)


@pytest.mark.parametrize(("found_name", "planted"), [("page_found", TAIL), ("pack_found", TILE)])
def test_replay_fails_on_the_planted_backend_and_passes_on_a_correct_one(found_name: str, planted: str,
                                                                          request: pytest.FixtureRequest) -> None:
    found: PropertyResult = request.getfixturevalue(found_name)
    still = invoke("replay", found.reproducer)  # the backend the reproducer names
    assert still.exit_code == EXIT_FAILURE, still.output
    assert f"STILL FAILS: {found.name} on " in still.stdout and "replayed   fail on layout-" in still.stdout
    fixed = invoke("replay", found.reproducer, "--backend", CORRECT)
    assert fixed.exit_code == EXIT_OK, fixed.output
    assert f"PASSES NOW: {found.name} holds on layout-correct" in fixed.stdout
    assert invoke("replay", found.reproducer, "--backend", planted).exit_code == EXIT_FAILURE


def test_replay_passes_on_the_reference_backend(page_found: PropertyResult) -> None:
    result = invoke("replay", page_found.reproducer, "--backend", "reference")
    assert result.exit_code == EXIT_OK, result.output
    assert "PASSES NOW: page holds on reference" in result.stdout


def test_replay_on_a_backend_without_the_layout_op_verifies_nothing(page_found: PropertyResult) -> None:
    result = invoke("replay", page_found.reproducer, "--backend", "property_planted:PropertyCorrect")
    assert result.exit_code == EXIT_FAILURE, result.output
    assert "needs paged_kv_attention, which backend property-correct lacks" in result.stdout
    assert "SKIPPED" in result.stdout


def test_replay_lays_the_pages_out_by_the_recorded_block_table(page_found: PropertyResult, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    case = read_layout_reproducer(page_found.reproducer).case
    assert case.page_size is not None
    n = page_count_of(case.tokens, case.page_size)
    drawn = block_table_order(page_found.records[0].metrics["parameters"]["block_table"], n)
    # another permutation than the drawn one, written into a copy of the reproducer
    shuffles = ({"kind": "shuffled", "seed": seed} for seed in range(64))
    other = next(t for t in shuffles if block_table_order(t, n) != drawn)
    path = copied(page_found, tmp_path)
    edit(path, lambda d: d["reproducer"]["parameters"].update(block_table=other))
    seen: list[Any] = []
    real = layout_properties.run_layout_case

    def spy(invoker: Any, lg: Any, settings: Any, page_order: Any = None) -> Any:
        seen.append(page_order)
        return real(invoker, lg, settings, page_order=page_order)

    monkeypatch.setattr(layout_properties, "run_layout_case", spy)
    assert replay(page_found.reproducer, ReadsUnusedTail(), TOLERANCES).still_fails
    assert replay(path, ReadsUnusedTail(), TOLERANCES).still_fails
    assert seen == [drawn, block_table_order(other, n)]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _member(path: Path) -> Path:
    case, _ = read_layout(path)
    return path.parents[3] / f"{case.members[0]}.h5"


DAMAGES = {
    "truncated layout file": (lambda p: _truncate(p), "unreadable layout file"),
    "missing member golden": (lambda p: _member(p).unlink(), "file not found"),
    "truncated member golden": (lambda p: _truncate(_member(p)), "truncated file"),
    "plain layout file": (lambda p: edit(p, lambda d: d.pop("reproducer")), "not a reproducer"),
    "unknown reproducer schema": (lambda p: edit(p, lambda d: d["reproducer"].update(schema_version=99)),
                                  "schema_version 99 is not supported"),
    "unknown block table": (lambda p: edit(p, lambda d: d["reproducer"]["parameters"].update(
        block_table={"kind": "sideways"})), "unknown block table permutation 'sideways'"),
    "missing block table": (lambda p: edit(p, lambda d: d["reproducer"]["parameters"].pop("block_table")),
                            "needs a paged case and a block_table parameter"),
    "dense property": (lambda p: edit(p, lambda d: d["reproducer"].update(property="batch")),
                       "property 'batch' does not judge a layout case"),
    "unknown property": (lambda p: edit(p, lambda d: d["reproducer"].update(property="nosuch")),
                         "unknown property 'nosuch'"),
    "bad field type": (lambda p: edit(p, lambda d: d["reproducer"].update(hypothesis_seed="0")),
                       "field 'reproducer.hypothesis_seed' must be int"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_layout_reproducer_is_one_line_and_exit_two(damage: str, page_found: PropertyResult,
                                                              tmp_path: Path) -> None:
    path = copied(page_found, tmp_path)
    assert invoke("replay", path, "--backend", CORRECT).exit_code == EXIT_OK  # the copy replays before the damage
    change, reason = DAMAGES[damage]
    change(path)
    result = invoke("replay", path, "--backend", CORRECT)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and reason in line and str(tmp_path / "rep") in line


def test_promote_adds_the_layout_case_and_its_members_to_a_regression_set_that_run_includes(
        page_found: PropertyResult, tmp_path: Path) -> None:
    target = tmp_path / "regression"
    result = invoke("promote", page_found.reproducer, "--to", target)
    assert result.exit_code == EXIT_OK, result.output
    case = read_layout_reproducer(page_found.reproducer).case
    manifest = read_manifest(target)
    assert sorted(e["case_id"] for e in manifest["files"]) == sorted([case.id, *case.members])
    assert "reproducer" not in json.loads((target / f"{case.id}.json").read_text())  # the plain layout file
    assert verify(target, regenerate=True).ok  # members regenerate bit for bit; the layout names listed goldens
    args = ("--goldens", target, "--checks", "page", "--report-json")
    failing = invoke("run", "--backend", TAIL, *args, tmp_path / "fail.json")
    assert failing.exit_code == EXIT_FAILURE, failing.output
    records = json.loads((tmp_path / "fail.json").read_text())["records"]
    assert [(r["case_id"], r["status"]) for r in records if r["check"] == "page"] == [(case.id, "fail")]
    passing = invoke("run", "--backend", CORRECT, *args, tmp_path / "pass.json")
    assert passing.exit_code == EXIT_OK, passing.output
    records = json.loads((tmp_path / "pass.json").read_text())["records"]
    assert [(r["case_id"], r["status"]) for r in records if r["check"] == "page"] == [(case.id, "pass")]
    again = invoke("promote", page_found.reproducer, "--to", target)
    assert again.exit_code == EXIT_OK and again.stdout.startswith("replaced ")
    assert len(read_manifest(target)["files"]) == len(manifest["files"])


def test_promote_of_a_layout_reproducer_missing_a_member_writes_nothing(page_found: PropertyResult,
                                                                        tmp_path: Path) -> None:
    path = copied(page_found, tmp_path)
    _member(path).unlink()
    result = invoke("promote", path, "--to", tmp_path / "regression")
    assert result.exit_code == EXIT_BAD_INPUT and "file not found" in result.stderr
    assert not (tmp_path / "regression").exists()
