"""Packed and paged layouts: their specs, files, the shared dense adapter, and the layout checks,
each planted layout defect caught by the check named for it while correct adapters pass."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, build_case, run_backend
from planted_layouts import (
    AttendsIntoNeighbour,
    BlockTableOffByOne,
    LayoutCorrect,
    ReadsUnusedTail,
    SplitsFromPageSize,
    SplitsFromSequenceCount,
    TileFromPackMax,
)
from test_run import SMOKE, TOLERANCES

from conformance.backends import load_backend, validate_backend
from conformance.backends.layouts import gather_pages, unpack_paged, unpack_varlen
from conformance.errors import ConformanceError, SpecError
from conformance.golden.layouts import read_layout_golden
from conformance.golden.manifest import select_cases
from conformance.judge.layout_calls import Seq, pack_call, page_count, paged_call
from conformance.judge.records import Record
from conformance.run.settings import RunSettings
from conformance.spec.checks import LAYOUT_INVARIANCE_CHECKS
from conformance.spec.layouts import parse_token
from conformance.spec.load import load_spec

LAYOUT_CASES = "*_attention/layouts-*"


def run_layouts(backend: object) -> list[Record]:
    """Every packed and paged smoke case (none of the dense cases they are composed of)."""
    paths = [p for p in select_cases(SMOKE, LAYOUT_CASES) if p.suffix == ".json"]
    return run_backend(backend, paths, RunSettings(tolerances=TOLERANCES, reruns=2)).records


def failing(records: list[Record]) -> Counter[str]:
    return Counter(r.check for r in records if r.status in ("fail", "error"))


def seqs(lengths: list[tuple[int, int]], hq: int = 4, hkv: int = 2, d: int = 8, seed: int = 0) -> list[Seq]:
    g = torch.Generator().manual_seed(seed)
    return [Seq(torch.randn(sq, hq, d, generator=g), torch.randn(skv, hkv, d, generator=g),
                torch.randn(skv, hkv, d, generator=g)) for sq, skv in lengths]


# --- specs -----------------------------------------------------------------------------------------


def test_pack_tokens_read_as_counts_of_query_and_key_lengths() -> None:
    assert (parse_token("7x17").count, parse_token("7x17").sq, parse_token("7x17").skv) == (7, 17, 17)
    assert (parse_token("31x1of128").sq, parse_token("31x1of128").skv) == (1, 128)
    for bad in ("x17", "7x", "0x5", "3x9of4", "7 x 17"):
        with pytest.raises(ValueError, match="pack token"):
            parse_token(bad)


def test_smoke_layouts_mix_one_long_sequence_with_short_ones_and_cover_every_page_size() -> None:
    spec = load_spec(REPO / "specs" / "kv_cache_attention.yaml")
    layouts = spec.layouts_for_tier("smoke")
    ids = {c.id for c in layouts}
    assert "varlen_attention/layouts-prefill/hq2-hkv1-d64-bf16-causal-1x129+7x17" in ids
    assert {c.page_size for c in layouts if c.op == "paged_kv_attention"} == {1, 5, 16}
    assert {c.dtype for c in layouts} == {"bfloat16", "float32", "float16"}
    mixed = next(c for c in layouts if c.id.endswith("1x129+7x17"))
    assert [s.skv for s in mixed.sequences] == [129] + [17] * 7
    assert len({(s.case_id, s.batch_index) for s in mixed.sequences}) == 3  # 7 short ones cycle a batch of 2
    standard = {c.id for c in spec.layouts_for_tier("standard")}
    assert "paged_kv_attention/layouts-presets/qwen3-8b-bf16-causal-page16-1x1of32768+31x1of128" in standard


@pytest.mark.parametrize(("layouts", "message"), [
    ("{layout: varlen, packs: [[2x9]]}", r"pack token 2x9: family f has no case with Sq=9 and Skv=9"),
    ("{layout: varlen, packs: [[2y9]]}", r"pack token '2y9' is not"),
    ("{layout: paged, packs: [[1x5]]}", r"a paged layout needs page_sizes"),
    ("{layout: varlen, packs: [[1x5]], page_sizes: [4]}", r"page_sizes belong to a paged layout"),
])
def test_a_bad_layout_is_one_spec_error_naming_file_line_and_field(tmp_path: Path, layouts: str,
                                                                   message: str) -> None:
    (tmp_path / "presets.yaml").write_text((REPO / "specs" / "presets.yaml").read_text())
    spec = tmp_path / "kv_cache_attention.yaml"
    spec.write_text("schema_version: 1\nop: kv_cache_attention\nseed: 1\npresets: presets.yaml\nfamilies:\n  f:\n"
                    "    base: {hq: 2, hkv: 1, d: 8, batch: 2, s_past: 0, causal: true, dtype: float32}\n"
                    "    tiers:\n      smoke:\n        - {s_new: 5}\n"
                    f"    layouts:\n      smoke:\n        - {layouts}\n")
    with pytest.raises(SpecError, match=message) as err:
        load_spec(spec)
    assert "kv_cache_attention.yaml:" in str(err.value) and "layouts.smoke" in str(err.value)
    done = subprocess.run([sys.executable, "-m", "conformance", "specs", "--spec", str(spec)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr


# --- files and the shared adapter ------------------------------------------------------------------


def test_a_layout_file_reads_back_its_sequences_from_the_dense_goldens() -> None:
    path = SMOKE / "varlen_attention/layouts-prefill/hq2-hkv1-d64-bf16-causal-1x129+7x17.json"
    lg = read_layout_golden(path)
    assert [s.q.shape for s in lg.sequences][:2] == [torch.Size([129, 2, 64]), torch.Size([17, 2, 64])]
    assert lg.sequences[0].golden.out.shape == (1, 2, 129, 64)


def test_a_damaged_layout_file_is_refused_naming_the_file_and_field(tmp_path: Path) -> None:
    src = SMOKE / "varlen_attention/layouts-prefill/hq2-hkv1-d64-bf16-causal-1x129+7x17.json"
    data = json.loads(src.read_text())
    data["hq"] = "four"
    bad = tmp_path / src.relative_to(SMOKE)
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps(data))
    with pytest.raises(ConformanceError, match=r"1x129\+7x17.json: field 'hq' must be int"):
        read_layout_golden(bad)
    (record,) = run_backend(LayoutCorrect(), [bad], RunSettings(tolerances=TOLERANCES)).records
    assert record.status == "error" and "field 'hq'" in record.message


def test_the_dense_adapter_unpacks_and_gathers_exactly_the_sequences_keys() -> None:
    s = seqs([(3, 9), (1, 16), (5, 5)])
    packed = pack_call(s, True, None)
    for (q, k, v), want in zip(unpack_varlen(packed.q, *packed.tensors), s):
        assert torch.equal(q, want.q) and torch.equal(k, want.k) and torch.equal(v, want.v)
    order = torch.randperm(page_count(s, 4), generator=torch.Generator().manual_seed(3)).tolist()
    paged = paged_call(s, True, None, 4, order)
    for (_, k, v), want in zip(unpack_paged(paged.q, *paged.tensors), s):
        assert torch.equal(k, want.k) and torch.equal(v, want.v) and not torch.isnan(k).any()
    k_pages, _, table, _, _ = paged.tensors
    tail = gather_pages(k_pages, table[0], 12)[9:]  # the 3 unused slots of sequence 0's last page
    assert torch.isnan(tail).all()


def test_layout_ops_are_signature_checked_when_a_backend_is_loaded() -> None:
    class WrongSignature:
        name, device = "wrong", "cpu"

        def varlen_attention(self, q, k, v, cu_seqlens_q, *, causal, scale):
            return q

    with pytest.raises(ConformanceError, match=r"varlen_attention\(\) takes 4 positional argument"):
        validate_backend(WrongSignature())


# --- the checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [LayoutCorrect(), load_backend("naive-fp32")], ids=["correct", "naive-fp32"])
def test_correct_adapters_show_no_false_layout_failure(backend: object) -> None:
    records = run_layouts(backend)
    judged = Counter(r.check for r in records)
    assert set(LAYOUT_INVARIANCE_CHECKS) <= set(judged) and {"accuracy", "split", "prefill_decode"} <= set(judged)
    if isinstance(backend, LayoutCorrect):
        assert failing(records) == Counter()
    else:  # a dense kernel that is not row-count invariant: only split and prefill_decode may fail
        assert set(failing(records)) <= {"split", "prefill_decode"}
        assert not failing([r for r in records if r.check in ("accuracy", "pack", "page", "contract")])


@pytest.mark.parametrize(("backend", "caught", "never"), [
    (TileFromPackMax(), {"pack"}, {"accuracy", "page", "contract"}),
    (SplitsFromSequenceCount(), {"pack"}, {"accuracy", "page", "contract"}),
    (ReadsUnusedTail(), {"page"}, set()),
    (SplitsFromPageSize(), {"page"}, {"accuracy", "pack", "contract"}),
    (BlockTableOffByOne(), {"accuracy"}, {"pack", "contract"}),
    (AttendsIntoNeighbour(), {"accuracy", "pack"}, {"page", "contract"}),
], ids=lambda x: getattr(x, "name", ""))
def test_each_planted_layout_defect_is_caught_by_its_check(backend: object, caught: set[str], never: set[str]) -> None:
    found = failing(run_layouts(backend))
    assert caught <= set(found), found
    assert not never & set(found), found


# --- the real packed and paged kernels (judged on a GPU; their pure pieces here) ---------------------

REAL_KERNELS = ("torch-varlen", "torch-varlen-nosplit", "flashinfer-decode", "flashinfer-decode-tensor-cores",
                "flashinfer-decode-fixed-split",
                "flashinfer-prefill", "flashinfer-prefill-no-split")


def test_real_layout_kernels_are_listed_and_refuse_cleanly_without_their_library_or_gpu() -> None:
    from conformance.backends import list_backends

    infos = {i.name: i for i in list_backends()}
    for name in REAL_KERNELS:
        assert name in infos
        if not torch.cuda.is_available():
            assert not infos[name].available and infos[name].reason
            with pytest.raises(ConformanceError, match=f"backend '{name}' is unavailable"):
                load_backend(name)


def test_flashinfer_csr_pages_name_each_sequences_pages_and_last_page_length() -> None:
    from conformance.backends.flashinfer import csr_pages

    s = seqs([(1, 9), (1, 16), (1, 1)])
    call = paged_call(s, True, None, 4, torch.randperm(page_count(s, 4), generator=torch.Generator().manual_seed(1))
                      .tolist())
    _, _, table, lens, _ = call.tensors
    indptr, indices, last = csr_pages(table, lens, 4)
    assert indptr.tolist() == [0, 3, 7, 8] and last.tolist() == [1, 4, 1]
    assert indices.tolist() == table[0, :3].tolist() + table[1, :4].tolist() + table[2, :1].tolist()


# --- the torch varlen_attn adapter follows the installed signature ----------------------------------


def _fake_varlen(keywords: str):
    calls: list[dict] = []
    namespace: dict = {"calls": calls}
    exec(f"def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, {keywords}):\n"
         "    calls.append(dict(locals()))\n"
         "    return query\n", namespace)
    return namespace["varlen_attn"], calls


# The keyword-only parameters of varlen_attn after max_q, max_k in two torch releases.
VARLEN_KEYWORDS = {"2.11": "return_aux=None, scale=None, is_causal=False",
                   "2.13": "return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None, "
                           "block_table=None, num_splits=None"}


def fake_varlen_backend(release: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[dict[str, Any]]]:
    """``torch-varlen`` on "cuda" over a recording varlen_attn with the signature of torch ``release``."""
    from conformance.backends import varlen

    fn, calls = _fake_varlen(VARLEN_KEYWORDS[release])
    monkeypatch.setattr(varlen, "varlen_unavailable_reason", lambda device: None)
    monkeypatch.setattr(varlen, "_varlen_attn", lambda: fn)
    return varlen.TorchVarlenBackend("cuda"), calls


@pytest.mark.parametrize("release", ["2.11", "2.13"])
def test_the_varlen_adapter_passes_only_what_the_installed_varlen_attn_takes(release: str, monkeypatch) -> None:
    from conformance.backends import varlen
    from conformance.backends.contract import BackendUnavailable

    backend, calls = fake_varlen_backend(release, monkeypatch)
    q, k = torch.zeros(9, 4, 8), torch.arange(9 * 2 * 8, dtype=torch.float32).reshape(9, 2, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    backend.varlen_attention(q, k, k, cu, cu, max_seqlen_q=5, max_seqlen_k=5, causal=True, scale=0.5)
    (call,) = calls
    paged = backend.supports("paged_kv_attention", build_case(dtype="bfloat16"))
    if release == "2.11":
        assert call["is_causal"] is True and call["key"].shape == (9, 4, 8)  # K/V heads repeated, h // group
        assert torch.equal(call["key"][:, 1], k[:, 0]) and torch.equal(call["key"][:, 2], k[:, 1])
        assert paged == f"torch {torch.__version__}'s varlen_attn takes no block_table: no paged KV cache"
        with pytest.raises(BackendUnavailable, match="has no num_splits"):
            varlen.TorchVarlenNoSplitBackend("cuda")
    else:
        assert call["window_size"] == (-1, 0) and call["enable_gqa"] is True and call["key"] is k
        assert call["num_splits"] is None and paged is True
        varlen.TorchVarlenNoSplitBackend("cuda").varlen_attention(q, k, k, cu, cu, max_seqlen_q=5, max_seqlen_k=5,
                                                                  causal=False, scale=None)
        assert calls[-1]["num_splits"] == 1 and calls[-1]["window_size"] == (-1, -1)


def test_a_layout_op_the_backend_declines_skips_the_cross_layout_variants_with_its_reason() -> None:
    class NoPagedCache(LayoutCorrect):
        def supports(self, op, case):
            return "no paged KV cache in this build" if op == "paged_kv_attention" else True

    paths = [p for p in select_cases(SMOKE, "varlen_attention/*") if p.suffix == ".json"]
    records = run_backend(NoPagedCache(), paths, RunSettings(tolerances=TOLERANCES, reruns=2)).records
    cross = [r for r in records if r.check == "prefill_decode"]
    assert cross and {(r.status, r.message) for r in cross} == {("skip", "no paged KV cache in this build")}
    assert not failing(records)
