"""Sliding windows through the packed and paged layouts: the spec gives a layout family's cases a
window and its layout cases carry it, every layout call passes it, correct adapters pass every layout
check on windowed cases, a packed call that drops the window fails accuracy, and a backend without
window support is skipped with the reason, never run without it.

The goldens are generated from a tiny spec into a temporary directory (float32, D 8: seconds).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_backend
from planted_layouts import LayoutCorrect, LayoutWindowCorrect, WindowIgnoredWhenPacked
from test_layouts import failing, fake_varlen_backend, seqs
from test_run import SMOKE, TOLERANCES

from conformance.backends import load_backend
from conformance.backends.builtin import NaiveFp32Backend, ReferenceBackend
from conformance.backends.registry import skip_reason
from conformance.errors import SpecError
from conformance.golden.generate import generate
from conformance.golden.layouts import read_layout, read_layout_golden
from conformance.judge.layout_calls import pack_call, paged_call
from conformance.judge.records import Record
from conformance.run.settings import RunSettings
from conformance.spec.load import load_spec

# Window 2 is smaller than every sequence (and, on the cached sequences, reaches back across the
# cache/new split); window 40 is larger than every sequence; the non-causal family is two-sided.
SPEC = """schema_version: 1
op: kv_cache_attention
seed: 7
presets: presets.yaml
families:
  win:
    base: {hq: 2, hkv: 1, d: 8, batch: 2, causal: true, dtype: float32, window_left: [2, 40]}
    tiers:
      smoke:
        - {s_past: 0, s_new: [5, 9]}
        - {s_past: 6, s_new: [1, 3]}
    layouts:
      smoke:
        - {layout: varlen, packs: [[1x9, 2x5, 1x3of9]]}
        - {layout: paged, packs: [[1x1of7, 1x3of9, 1x9]], page_sizes: [4, 1]}
  two-sided:
    base: {hq: 2, hkv: 1, d: 8, batch: 2, causal: false, dtype: float32, s_past: 0, window_left: 2,
           window_right: 1}
    tiers:
      smoke:
        - {s_new: [4, 7]}
    layouts:
      smoke:
        - {layout: varlen, packs: [[1x7, 2x4]]}
        - {layout: paged, packs: [[1x7, 1x4]], page_sizes: [3]}
"""
SMALL = "win2.inf"  # the id tag of the window smaller than the sequences
EVERY_CHECK = {"accuracy", "pack", "page", "split", "prefill_decode", "determinism", "contract"}


def write_spec(directory: Path, text: str = SPEC) -> Path:
    (directory / "presets.yaml").write_text((REPO / "specs" / "presets.yaml").read_text())
    path = directory / "kv_cache_attention.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def goldens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = load_spec(write_spec(tmp_path_factory.mktemp("window-spec")))
    out = tmp_path_factory.mktemp("window-goldens") / "smoke"
    generate([spec], "smoke", out, n_workers=1)
    return out


def layout_files(root: Path, pattern: str = "*_attention/*/*") -> list[Path]:
    paths = sorted(root.glob(f"{pattern}.json"))
    assert paths, f"no layout file matches {pattern}"
    return paths


def run(backend: object, paths: list[Path]) -> list[Record]:
    return run_backend(backend, paths, RunSettings(tolerances=TOLERANCES, reruns=2)).records


# --- spec and files ----------------------------------------------------------------------------------


def test_layout_cases_carry_their_members_window(goldens: Path) -> None:
    spec = load_spec(write_spec(goldens.parent))
    by_id = {c.id: c for c in spec.cases}
    windows = {c.window for c in spec.layouts}
    assert windows == {(2, -1), (40, -1), (2, 1)} and len(spec.layouts) == 2 * 3 + 2
    for lc in spec.layouts:
        assert lc.variants == ("window",) and "-win" in lc.id
        assert {by_id[m].window for m in lc.members} == {lc.window}  # the members' goldens are the references
        path = goldens / f"{lc.id}.json"
        assert json.loads(path.read_text())["window"] == list(lc.window)
        assert read_layout(path)[0].window == lc.window
        assert read_layout_golden(path).case == read_layout(path)[0]


def test_a_plain_layout_file_has_no_window_field_and_reads_back_unbounded() -> None:
    path = SMOKE / "varlen_attention/layouts-prefill/hq2-hkv1-d64-bf16-causal-1x129+7x17.json"
    assert "window" not in json.loads(path.read_text())  # the committed smoke files keep their bytes
    case, _ = read_layout(path)
    assert case.window == (-1, -1) and case.variants == ()


def test_a_layout_file_whose_member_has_another_window_is_refused(goldens: Path, tmp_path: Path) -> None:
    src = layout_files(goldens, f"varlen_attention/win/*{SMALL}-1x9*")[0]
    data = json.loads(src.read_text())
    data["window"] = [3, -1]
    bad = tmp_path / src.relative_to(goldens)
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps(data))
    for member in {s["case_id"] for s in data["sequences"]}:
        target = tmp_path / f"{member}.h5"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((goldens / f"{member}.h5").read_bytes())
    with pytest.raises(Exception, match=r"which has window \(2, -1\), the layout needs \(3, -1\)"):
        read_layout_golden(bad)


@pytest.mark.parametrize(("where", "value", "fragment"), [
    ("window_left: [2, 40]", "window_left: [2, -2]", "greater than or equal to -1"),
    ("window_right: 1", "window_right: 1.5", "valid integer"),
])
def test_a_bad_window_on_a_layout_family_is_one_spec_error_naming_file_and_field(
        tmp_path: Path, where: str, value: str, fragment: str) -> None:
    spec = write_spec(tmp_path, SPEC.replace(where, value))
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    text = str(err.value)
    field = where.split(":")[0]
    assert f"{spec}:" in text and field in text and fragment in text and "\n" not in text
    done = subprocess.run([sys.executable, "-m", "conformance", "specs", "--spec", str(spec)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and field in done.stderr


# --- the layout checks on windowed cases -------------------------------------------------------------


@pytest.mark.parametrize("backend", [ReferenceBackend(), LayoutWindowCorrect()], ids=lambda b: b.name)
def test_the_dense_adapter_passes_every_layout_check_with_a_window(goldens: Path, backend: object) -> None:
    records = run(backend, layout_files(goldens))
    assert failing(records) == Counter() and {r.status for r in records} == {"pass"}
    assert {r.check for r in records} == EVERY_CHECK


def test_the_dense_adapter_over_naive_is_accurate_and_pack_and_page_invariant_with_a_window(goldens: Path) -> None:
    records = run(NaiveFp32Backend(), layout_files(goldens))
    # Not row-count invariant (tests/test_layouts.py): only split and prefill_decode may differ.
    assert {r.status for r in records if r.check not in ("split", "prefill_decode")} == {"pass"}
    assert {r.check for r in records} == EVERY_CHECK


def test_a_packed_call_that_drops_the_window_fails_accuracy(goldens: Path) -> None:
    records = run(WindowIgnoredWhenPacked(), layout_files(goldens))
    bad = {r.case_id for r in records if r.check == "accuracy" and r.status == "fail"}
    # Every packed case with a window smaller than its sequences, and no paged one (its call keeps it).
    assert bad == {r.case_id for r in records if r.case_id.startswith("varlen_attention/") and "win40" not in r.case_id}
    assert len(bad) == 2
    assert not any(r.case_id.startswith("paged_kv_attention/") for r in records
                   if r.check == "accuracy" and r.status != "pass")


def test_a_backend_without_window_support_is_skipped_with_the_reason_never_run(goldens: Path) -> None:
    calls: list[str] = []

    class NoWindow(LayoutCorrect):  # dense ops and layouts, no variants declared
        def varlen_attention(self, *args, **kwargs):
            calls.append("varlen")
            return super().varlen_attention(*args, **kwargs)

        def paged_kv_attention(self, *args, **kwargs):
            calls.append("paged")
            return super().paged_kv_attention(*args, **kwargs)

    records = run(NoWindow(), layout_files(goldens))
    assert records and {r.status for r in records} == {"skip"} and calls == []
    assert {r.message for r in records} == {"layout-correct does not support the attention variant(s) window of "
                                            "this case (it declares variants: none)"}


def test_a_backend_whose_layout_op_takes_no_window_size_is_skipped_with_the_reason(goldens: Path) -> None:
    class DenseWindowOnly(NaiveFp32Backend):  # declares the window; its packed call has no window_size
        name = "dense-window-only"

        def varlen_attention(self, q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k, causal,
                             scale):
            raise AssertionError("called without the window")

    (path,) = layout_files(goldens, f"varlen_attention/win/*{SMALL}*")[:1]
    case = read_layout(path)[0]
    assert "varlen_attention takes no window_size" in (skip_reason(DenseWindowOnly(), case.op, case) or "")
    records = run(DenseWindowOnly(), [path])
    assert {r.status for r in records} == {"skip"}


# --- the real packed kernels: torch-varlen (faked) and flex-layouts ----------------------------------


@pytest.mark.parametrize("release", ["2.11", "2.13"])
def test_torch_varlen_passes_the_window_or_declines_it_with_the_reason(release: str, goldens: Path,
                                                                       monkeypatch) -> None:
    backend, calls = fake_varlen_backend(release, monkeypatch)
    case = replace(read_layout(layout_files(goldens, f"varlen_attention/win/*{SMALL}*")[0])[0], dtype="bfloat16")
    q = torch.zeros(9, 2, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    kw = {"max_seqlen_q": 5, "max_seqlen_k": 5, "scale": None}
    if release == "2.11":
        assert skip_reason(backend, case.op, case) == (f"torch {torch.__version__}'s varlen_attn takes no window_size: "
                                                       "no sliding window")
        with pytest.raises(ValueError, match="takes no window_size"):
            backend.varlen_attention(q, q, q, cu, cu, causal=True, window_size=(2, -1), **kw)
        return
    assert skip_reason(backend, case.op, case) is None
    backend.varlen_attention(q, q, q, cu, cu, causal=True, window_size=(2, -1), **kw)
    backend.varlen_attention(q, q, q, cu, cu, causal=False, window_size=(2, 1), **kw)
    backend.varlen_attention(q, q, q, cu, cu, causal=True, **kw)
    assert [c["window_size"] for c in calls] == [(2, 0), (2, 1), (-1, 0)]


def test_flex_layouts_bounds_each_sequence_by_its_own_bottom_right_window() -> None:
    from conformance.backends.flex_layouts import FlexLayoutsBackend

    flex, reference = FlexLayoutsBackend("cpu"), ReferenceBackend()
    s = seqs([(3, 9), (1, 16), (5, 5)], 4, 2, 16)  # the bucket of tests/test_flex_layouts.py: no new compile
    for causal, window in ((True, (2, -1)), (False, (1, 2)), (True, (40, -1))):
        call = pack_call(s, causal, None, window)
        got = flex.varlen_attention(*call.args(), **call.kwargs())
        want = reference.varlen_attention(*call.args(), **call.kwargs())
        torch.testing.assert_close(got, want.to(got.dtype), atol=1e-5, rtol=1e-5)
        paged = paged_call(s, causal, None, 4, window=window)
        assert torch.equal(flex.paged_kv_attention(*paged.args(), **paged.kwargs()), got)
        plain = pack_call(s, causal, None)
        unbounded = flex.varlen_attention(*plain.args(), **plain.kwargs())
        assert torch.equal(got, unbounded) == (window == (40, -1))  # the small windows change rows


@pytest.mark.slow
def test_flex_layouts_passes_every_layout_check_with_a_window(goldens: Path) -> None:
    records = run(load_backend("flex-layouts"), layout_files(goldens))
    assert failing(records) == Counter() and {r.check for r in records} == EVERY_CHECK
