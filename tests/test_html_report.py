"""rlk-conform report: the HTML page (read back as a DOM, in Python and in headless Chromium) and
the Markdown summary show what the JSON run reports say; bad input is exit 2 naming the file."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SMOKE_GOLDENS, SPEC_DIR
from typer.testing import CliRunner, Result

from conformance.cli.app import app
from conformance.errors import EXIT_BAD_INPUT, EXIT_OK
from conformance.judge.records import Record
from conformance.report.json import STATUSES, summarize
from conformance.report.markdown import render_markdown
from conformance.report.markup import case_dims
from conformance.report.runs import load_runs
from conformance.spec.checks import INVARIANCE_CHECKS, judgment_of

GPU_NAME = "NVIDIA H200 (synthetic target)"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


# --- the reports under test -------------------------------------------------------------------------


def _run_report(out: Path, backend: str, *extra: str) -> dict[str, Any]:
    result = invoke("run", "--backend", backend, "--goldens", SMOKE_GOLDENS, "--tolerances",
                    SPEC_DIR / "tolerances.yaml", "--report-json", out, *extra)
    assert result.exit_code in (0, 1), result.output
    return json.loads(out.read_text())


def _synthetic_gpu_copy(report: dict[str, Any]) -> dict[str, Any]:
    """The naive report re-labelled as a GPU run, with an error, skips, an infinite and a NaN
    accuracy metric planted, so that every status and every kind of plot value is present."""
    r = copy.deepcopy(report)
    r["backend"]["device"] = "cuda"
    r["execution_target"].update(device="cuda", device_name=GPU_NAME, compute_capability="9.0", cuda="13.0",
                                 cudnn=91900, driver="580.159.04")
    accuracy = [x for x in r["records"] if x["check"] == "accuracy"]
    accuracy[0].update(status="fail", message="planted NaN output")
    accuracy[0]["metrics"].update(threshold_ratio="inf", margin="-inf")
    accuracy[1]["metrics"]["threshold_ratio"] = None
    accuracy[2].update(status="error", metrics={}, message="RuntimeError: planted")
    for x in [x for x in r["records"] if x["check"] == "batch"][:3]:
        x.update(status="skip", metrics={}, message="planted: declined")
    r["summary"] = summarize([Record(**x) for x in r["records"]])
    return r


@pytest.fixture(scope="module")
def report_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three reports: naive (invariance failures), a planted wrong GQA mapping (accuracy failures)
    and a synthetic GPU copy of the naive run (same backend name: labels must disambiguate)."""
    d = tmp_path_factory.mktemp("reports")
    naive = _run_report(d / "naive.json", "naive", "--shard", "0/5")  # every 5th case: all families, all dtypes
    gqa = _run_report(d / "gqa.json", "planted_backends:WrongGqaMapping", "--filter", "attention/gqa/*",
                      "--checks", "accuracy,contract")
    assert any(r["status"] == "fail" and r["check"] in INVARIANCE_CHECKS for r in naive["records"])
    assert any(r["status"] == "fail" and r["check"] == "accuracy" for r in gqa["records"])
    (d / "gpu.json").write_text(json.dumps(_synthetic_gpu_copy(naive)))
    return [d / "naive.json", d / "gqa.json", d / "gpu.json"]


@pytest.fixture(scope="module")
def rendered(report_files: list[Path]) -> tuple[Path, Path]:
    out = report_files[0].parent
    result = invoke("report", *report_files, "--html", out / "report.html", "--summary-md", out / "summary.md")
    assert result.exit_code == EXIT_OK, result.output
    return out / "report.html", out / "summary.md"


# --- reading the page back ---------------------------------------------------------------------------


class PageFacts(HTMLParser):
    """What a reader sees: count cells, plot points, worst-case rows and replay commands, the text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.counts: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.plots: list[dict[str, Any]] = []
        self.worst: list[dict[str, str]] = []
        self.text: list[str] = []
        self.root_attrs: dict[str, str] = {}
        self._section = ""
        self._cell: dict[str, Any] | None = None
        self._plot: dict[str, Any] | None = None
        self._code: list[str] | None = None

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: v or "" for k, v in attrs_list}
        classes = attrs.get("class", "").split()
        if tag == "html":
            self.root_attrs = attrs
        if tag == "section" and "data-backend" in attrs:
            self._section = attrs["data-backend"]
        if tag == "td" and "cnt" in classes:
            self._cell = {"key": (attrs["data-backend"], attrs["data-check"], attrs["data-dtype"]),
                          "data": {s: int(attrs[f"data-{s}"]) for s in STATUSES}, "text": []}
        if tag == "svg" and "data-plot" in attrs:
            self._plot = {"kind": attrs["data-plot"], "backend": attrs["data-backend"],
                          "declared": int(attrs["data-points"]), "points": 0}
        if self._plot is not None and "pt" in classes:
            self._plot["points"] += 1
        if tag == "tr" and "worst" in classes:
            self.worst.append({"backend": self._section, "case": attrs["data-case"], "check": attrs["data-check"],
                               "replay": ""})
        if tag == "code" and "replay" in classes:
            self._code = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.counts[self._cell["key"]] = self._cell
            self._cell = None
        if tag == "svg" and self._plot is not None:
            self.plots.append(self._plot)
            self._plot = None
        if tag == "code" and self._code is not None:
            if self.worst and not self.worst[-1]["replay"]:
                self.worst[-1]["replay"] = "".join(self._code)
            self._code = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"].append(data)
        if self._code is not None:
            self._code.append(data)


def read_page(html_text: str) -> PageFacts:
    facts = PageFacts()
    facts.feed(html_text)
    facts.close()
    return facts


# --- what the JSON says, computed independently of conformance.html_report ----------------------------

_SKV = re.compile(r"-(?:sq\d+-skv(\d+)|past(\d+)-new(\d+))-")
_D = re.compile(r"/hq\d+-hkv\d+-d(\d+)-b\d+-")


def _preset_dims() -> dict[str, int]:
    presets = yaml.safe_load((SPEC_DIR / "presets.yaml").read_text())["presets"]
    return {name: p["d"] for name, p in presets.items()}


def _dims(case_id: str, presets: dict[str, int]) -> tuple[int | None, int | None]:
    m = _SKV.search(case_id)
    skv = None if not m else int(m[1]) if m[1] else int(m[2]) + int(m[3])
    d = _D.search(case_id)
    variant = case_id.split("/")[-1]
    preset = next((p for p in presets if variant.startswith(p + "-b")), None)
    return skv, int(d[1]) if d else presets.get(preset) if preset else None


def expected_points(report: dict[str, Any]) -> dict[str, int]:
    presets = _preset_dims()
    acc = [r for r in report["records"] if r["check"] == "accuracy" and r["metrics"].get("threshold_ratio") is not None]
    dims = [_dims(r["case_id"], presets) for r in acc]
    return {"error-by-dtype": len(acc), "error-vs-skv": sum(s is not None for s, _ in dims),
            "error-vs-d": sum(d is not None for _, d in dims)}


def assert_page_matches_reports(facts: PageFacts, report_files: list[Path]) -> None:
    runs = load_runs(report_files)
    assert len({run.label for run in runs}) == len(runs)
    for run in runs:
        report = json.loads(run.path.read_text())
        label = run.label
        # counts per check × dtype, and per check over all dtypes (= the JSON summary)
        want: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        for r in report["records"]:
            want[(r["check"], r["dtype"])][r["status"]] += 1
            want[(r["check"], "*")][r["status"]] += 1
        for (check, dtype), counter in want.items():
            cell = facts.counts[(label, check, dtype)]
            expect = {s: counter[s] for s in STATUSES}
            assert cell["data"] == expect, (label, check, dtype)
            shown = [int(x) for x in "".join(cell["text"]).split()]
            assert shown == [expect[s] for s in STATUSES], (label, check, dtype, shown)
        for check, by_status in report["summary"]["by_check"].items():
            assert facts.counts[(label, check, "*")]["data"] == by_status
        shown_cells = {k for k in facts.counts if k[0] == label}
        assert shown_cells == {(label, c, d) for c, d in want}
        # plots: three per backend, each with one point per plottable accuracy record
        plots = {p["kind"]: p for p in facts.plots if p["backend"] == label}
        assert set(plots) == {"error-by-dtype", "error-vs-skv", "error-vs-d"}
        for kind, n in expected_points(report).items():
            assert plots[kind]["points"] == plots[kind]["declared"] == n, (label, kind)
        # worst cases: failing records, errors first, each with its replay command
        failing = {(r["case_id"], r["check"]): r for r in report["records"] if r["status"] in ("fail", "error")}
        rows = [w for w in facts.worst if w["backend"] == label]
        assert len(rows) == min(20, len(failing)), label
        assert all((w["case"], w["check"]) in failing for w in rows)
        for w in rows:
            assert w["replay"].startswith(f"rlk-conform run --backend {report['backend']['requested']} "
                                          f"--filter '{w['case']}' --checks {w['check']}")
        errors = [k for k, r in failing.items() if r["status"] == "error"]
        assert [(w["case"], w["check"]) for w in rows[:len(errors)]] == sorted(errors)
        # the execution target and the golden set
        text = " ".join(facts.text)
        assert report["execution_target"]["device_name"] in text
        assert report["goldens"]["dataset_sha256"] in text


# --- tests ---------------------------------------------------------------------------------------------


def test_html_page_shows_what_the_reports_say(rendered: tuple[Path, Path], report_files: list[Path]) -> None:
    assert_page_matches_reports(read_page(rendered[0].read_text()), report_files)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install -y chromium); the same "
                    "facts are checked on the generated HTML by test_html_page_shows_what_the_reports_say")
def test_html_page_rendered_by_headless_chromium_shows_what_the_reports_say(
        rendered: tuple[Path, Path], report_files: list[Path], tmp_path: Path) -> None:
    assert CHROMIUM is not None
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", rendered[0].resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    facts = read_page(dom)
    assert facts.root_attrs.get("data-scripts") == "ok", "the page's script did not run to its end"
    assert_page_matches_reports(facts, report_files)


WINDOW = 1400  # px: the comparison of three reports must fit a window this wide
MEASURE = """<script>
var wide = [];
document.querySelectorAll('table, section, figure').forEach(function (e) {
  var box = e.parentElement.getBoundingClientRect().width;
  if (e.scrollWidth > box + 1) { wide.push((e.id || e.className || e.tagName) + ':' + e.scrollWidth + '>' + box); }
});
document.documentElement.setAttribute('data-wide', wide.join(' '));
document.documentElement.setAttribute('data-page-width', document.documentElement.scrollWidth);
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install -y chromium)")
def test_three_reports_side_by_side_fit_a_1400_px_window(report_files: list[Path], tmp_path: Path) -> None:
    """Two golden runs and a property search (whose checks differ): no table or section is wider
    than the space it is given, and the page needs no horizontal scrolling."""
    check = tmp_path / "check.json"
    result = invoke("check", "--backend", "naive", "--max-examples", "2", "--reproducers", tmp_path / "rep",
                    "--tolerances", SPEC_DIR / "tolerances.yaml", "--report-json", check)
    assert result.exit_code in (0, 1), result.output
    page = tmp_path / "three.html"
    assert invoke("report", report_files[0], report_files[1], check, "--html", page).exit_code == EXIT_OK
    measured = tmp_path / "measured.html"
    measured.write_text(page.read_text().replace("</body>", MEASURE))
    assert CHROMIUM is not None
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--window-size={WINDOW},900", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         measured.resolve().as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    root = read_page(dom).root_attrs
    assert root.get("data-wide") == "", root.get("data-wide")
    assert int(root["data-page-width"]) <= WINDOW


def test_html_page_needs_no_network(rendered: tuple[Path, Path]) -> None:
    page = rendered[0].read_text()
    assert not re.search(r"""\b(?:src|href)\s*=\s*(?!["']?#)""", page), "only in-page anchors may be linked"
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_labels_tell_apart_two_runs_of_the_same_backend(report_files: list[Path]) -> None:
    labels = [run.label for run in load_runs(report_files)]
    assert labels[1] == "planted_backends:WrongGqaMapping"
    assert labels[0] != labels[2] and labels[0].startswith("naive") and GPU_NAME in labels[2]


def test_labels_tell_apart_one_backend_run_on_two_tiers_by_the_tier(report_files: list[Path], tmp_path: Path) -> None:
    naive = json.loads(report_files[0].read_text())
    standard = json.loads(report_files[0].read_text())
    standard["goldens"]["tier"] = "standard"
    (tmp_path / "smoke.json").write_text(json.dumps(naive))
    (tmp_path / "standard.json").write_text(json.dumps(standard))
    labels = [run.label for run in load_runs([tmp_path / "smoke.json", tmp_path / "standard.json"])]
    assert labels == ["naive · smoke", "naive · standard"]


def test_replay_commands_keep_the_device_of_a_gpu_run(rendered: tuple[Path, Path]) -> None:
    gpu_rows = [w for w in read_page(rendered[0].read_text()).worst if "--device cuda" in w["replay"]]
    assert gpu_rows, "the synthetic GPU run's replay commands must pass --device cuda"


def test_markdown_summary_lists_target_counts_and_top_failures(rendered: tuple[Path, Path],
                                                               report_files: list[Path]) -> None:
    text = rendered[1].read_text()
    for run in load_runs(report_files):
        report = run.report
        section = text.split(f"## {run.label}\n", 1)[1].split("\n## ", 1)[0]
        assert report["execution_target"]["device_name"] in section
        assert report["goldens"]["dataset_sha256"] in section
        dtypes = [c.strip() for c in section.split("| check (pass/fail/error/skip) |")[1].split("\n")[0].split("|")
                  if c.strip()]
        for check in report["summary"]["by_check"]:
            row = next(line for line in section.splitlines() if line.startswith(f"| {judgment_of(check)} | {check} |"))
            cells = [c.strip() for c in row.split("|")[3:-1]]
            for dtype, cell in zip(dtypes, cells):
                c = Counter(r["status"] for r in report["records"] if r["check"] == check and r["dtype"] == dtype)
                assert cell == ("/".join(str(c[s]) for s in STATUSES) if c else ""), (run.label, check, dtype)
        if report["summary"]["by_status"]["fail"]:
            assert "Top failures" in section and f"`rlk-conform run --backend {report['backend']['requested']} " \
                in section


def test_report_without_outputs_prints_the_console_summary(report_files: list[Path]) -> None:
    result = invoke("report", report_files[0])
    assert result.exit_code == EXIT_OK, result.output
    assert "accuracy" in result.stdout and "worst offenders" in result.stdout


@pytest.mark.parametrize("content, reason", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    ('{"format": "something-else"}', "not an rlk-conform report"),
    ('{"format": "rlk-conform-report", "schema_version": 2, "records": []}', "schema_version 2 is not supported"),
    ('{"format": "rlk-conform-report", "schema_version": 1}', "malformed report"),
], ids=["missing", "not-json", "other-format", "other-schema", "no-records"])
def test_bad_input_is_one_line_exit_2_naming_the_file(tmp_path: Path, report_files: list[Path],
                                                      content: str | None, reason: str) -> None:
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    result = invoke("report", report_files[0], bad, "--html", tmp_path / "out.html")
    assert result.exit_code == EXIT_BAD_INPUT
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ") and reason in lines[0], result.stderr
    assert not (tmp_path / "out.html").exists()


@pytest.mark.parametrize("case_id, dims", [
    ("attention/gqa/hq14-hkv2-d64-b1-sq17-skv17-bf16-causal", (17, 64)),
    ("kv_cache_attention/presets/qwen3-8b-b1-past15-new4-bf16-causal", (19, 128)),
    ("attention/presets/qwen2.5-0.5b-b1-sq5-skv17-bf16-causal", (17, 64)),
    ("kv_cache_attention/gqa/hq7-hkv1-d256-b1-past15-new1-bf16-causal", (16, 256)),
    ("attention/presets/unknown-model-b1-sq5-skv17-bf16-causal", (17, None)),
    ("attention/odd/not-a-case-id", (None, None)),
])
def test_case_dims_parses_skv_and_head_dim_from_the_id(case_id: str, dims: tuple[int | None, int | None]) -> None:
    assert case_dims(case_id, _preset_dims()) == dims


def test_property_search_reports_are_labelled_as_checks_and_name_their_search(tmp_path: Path,
                                                                              report_files: list[Path]) -> None:
    run = json.loads(report_files[0].read_text())
    check = copy.deepcopy(run)
    check["goldens"] = None
    check["search"] = {"profile": "nightly", "time_budget_s": 10.0,
                       "results": [{"examples_run": 12}, {"examples_run": 30}]}
    (tmp_path / "check.json").write_text(json.dumps(check))
    runs = load_runs([report_files[0], tmp_path / "check.json"])
    assert [r.label for r in runs] == ["naive", "naive (check)"]
    text = render_markdown(runs)
    section = text.split("## naive (check)\n", 1)[1]
    assert "judged against: property search, profile nightly, 42 examples, 10 s per property" in section
    assert "None" not in text.split("## naive\n", 1)[0]  # the overview table names no missing goldens


def test_a_profiled_run_shows_its_phases_in_the_page_and_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "profiled.json"
    report = _run_report(out, "naive", "--filter", "attention/gqa/*", "--profile")
    html, md = tmp_path / "r.html", tmp_path / "r.md"
    assert invoke("report", out, "--html", html, "--summary-md", md).exit_code == 0
    page, summary = html.read_text(), md.read_text()
    assert "Profile (run --profile)" in page
    for phase, seconds in report["profile"]["phases_s"].items():
        assert f"{phase} {seconds:.2f} s" in summary
        assert f"<th>{phase}</th><td>{seconds:.2f} s" in page
    assert f"peak RSS {report['profile']['peak_rss_mib']} MiB" in summary
