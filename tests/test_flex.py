"""The flex backend: shapes bucketed so one compile serves a shape family, results equal to the
contract's (against naive-fp32), the analytic block mask equal to create_block_mask's, and listing
that compiles nothing.

CPU compiles take seconds each, so the tests share four buckets (float32, GQA 4/2, D=16, batch 4;
Sq × Skv of 128 × 128, 1 × 128, 1 × 256 and 256 × 256).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from conftest import REPO, SMOKE_GOLDENS
from torch.nn.attention.flex_attention import create_block_mask

import conformance.backends.flex as flex
from conformance.backends import BackendUnavailable, list_backends, load_backend
from conformance.backends.builtin import ReferenceBackend
from conformance.backends.contract import visible_keys
from conformance.golden.format import GoldenCase, case_path, read_golden
from conformance.spec.case import Case
from conformance.spec.tolerances import load_tolerances

RULE = load_tolerances(REPO / "specs" / "tolerances.yaml").accuracy_rule("default", "attention", "float32")
HQ, HKV, D = 4, 2, 16


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def backend() -> flex.FlexBackend:
    return flex.FlexBackend("cpu")


@pytest.fixture(scope="module")
def naive() -> object:
    return load_backend("naive-fp32")


def make(b: int, sq: int, skv: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, HQ, sq, D, generator=g), torch.randn(b, HKV, skv, D, generator=g),
            torch.randn(b, HKV, skv, D, generator=g))


def unseen_rows(b: int, sq: int, skv: int, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    case = Case(id="t", op="attention", family="t", tier="smoke", batch=b, hq=HQ, hkv=HKV, d=D, sq=sq, skv=skv,
                dtype="float32", causal=causal, scale=None, mask="none" if mask is None else "custom", dist="normal",
                seed=0)
    return ~visible_keys(case, mask, "cpu").any(-1).expand(b, HQ, sq)


def check_against_naive(backend: flex.FlexBackend, naive: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        causal: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """flex's output, checked: contract shape, no NaN, unseen rows exactly 0, float32 tolerance to naive-fp32
    (run on the same inputs with padded slots zeroed: their content has weight 0 by the contract)."""
    out = backend.attention(q, k, v, causal=causal, scale=None, key_padding_mask=mask)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert not out.isnan().any()
    b, _, sq, _ = q.shape
    assert torch.all(out[unseen_rows(b, sq, k.shape[2], causal, mask)] == 0)
    if mask is not None:
        k, v = (t.masked_fill(~mask[:, None, :, None], 0.0) for t in (k, v))
    want = naive.attention(q, k, v, causal=causal, scale=None, key_padding_mask=mask)  # type: ignore[attr-defined]
    torch.testing.assert_close(out, want, atol=RULE.atol, rtol=RULE.rtol)
    return out


# --- buckets and the block mask (no compile) -------------------------------------------------------


@pytest.mark.parametrize(("n", "minimum", "expected"), [
    (0, 1, 1), (1, 1, 1), (2, 1, 2), (3, 1, 4), (16, 1, 16), (17, 1, 32), (129, 1, 256), (32768, 1, 32768),
    (1, 16, 16), (16, 16, 16), (17, 16, 32), (3, 4, 4), (6, 4, 8),
])
def test_bucket_is_the_next_power_of_two_above_the_floor(n: int, minimum: int, expected: int) -> None:
    assert flex.bucket(n, minimum) == expected


@pytest.mark.parametrize(("shape", "expected"), [
    ((1, 1, 1), (4, 1, 128)), ((3, 5, 20), (4, 128, 128)), ((2, 1, 129), (4, 1, 256)),
    ((6, 129, 200), (8, 256, 256)), ((1, 32768, 32768), (4, 32768, 32768)), ((4, 2, 4097), (4, 128, 8192)),
])
def test_a_call_runs_at_its_bucket_and_decode_stays_one_row(shape: tuple[int, int, int],
                                                             expected: tuple[int, int, int]) -> None:
    assert flex.bucket_shape(*shape) == expected


def keep_patterns(b: int, skv: int) -> Iterator[torch.Tensor]:
    yield torch.ones(b, skv, dtype=torch.bool)
    yield torch.zeros(b, skv, dtype=torch.bool)
    yield torch.rand(b, skv, generator=torch.Generator().manual_seed(skv)) < 0.7
    holes = torch.ones(b, skv, dtype=torch.bool)
    holes[:, 100:260] = False
    holes[0, 5] = False
    yield holes


def assert_block_masks_equal(got: object, want: object, where: object) -> None:
    assert got.seq_lengths == want.seq_lengths and got.BLOCK_SIZE == want.BLOCK_SIZE  # type: ignore[attr-defined]
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype and torch.equal(g, w), (name, where)


def case_of(sq: int, skv: int, causal: bool, window: tuple[int, int] = (-1, -1)) -> Case:
    return Case(id="t", op="attention", family="t", tier="smoke", batch=2, hq=HQ, hkv=HKV, d=D, sq=sq, skv=skv,
                dtype="float32", causal=causal, scale=None, mask="none", dist="normal", seed=0, window=window)


def want_block_mask(keep: torch.Tensor, lo: int, hi: int, sq: int, skv: int, sink: int = -1) -> object:
    mask_mod = flex.contract_mask_mod(keep, *(torch.tensor(x) for x in (lo, hi, sink)))
    return create_block_mask(mask_mod, keep.shape[0], None, sq, skv, device="cpu")


@pytest.mark.parametrize(("sq", "skv"), [(1, 16), (16, 128), (127, 129), (128, 256), (300, 512), (256, 128)])
def test_analytic_block_mask_equals_create_block_mask(sq: int, skv: int) -> None:
    for keep, (real_sq, real_skv), causal in itertools.product(keep_patterns(2, skv), [(1, 1), (sq, skv), (
            max(1, sq // 2), max(1, skv - 3))], [True, False]):
        lo, hi = flex.key_bounds(case_of(real_sq, real_skv, causal), sq)
        assert_block_masks_equal(flex.contract_block_mask(keep, lo, hi, sq, skv),
                                 want_block_mask(keep, lo, hi, sq, skv), (real_sq, real_skv, causal))


@pytest.mark.parametrize(("sq", "skv"), [(1, 256), (200, 384)])
def test_analytic_block_mask_with_windows_and_a_sink_equals_create_block_mask(sq: int, skv: int) -> None:
    """Windows empty the tiles outside them; the sink slot (after the real keys) is seen by every row."""
    shapes = [(sq, skv - 1), (max(1, sq // 2), skv - 129), (sq, skv - 128)]  # the sink mid-tile, last, first
    windows = [(0, -1), (130, -1), (3, 7), (200, 130), (-1, 3)]
    for (real_sq, real_skv), window, causal, with_sink in itertools.product(shapes, windows, [True, False],
                                                                            [False, True]):
        if causal and window[1] > 0:
            continue
        keep = torch.zeros(2, skv, dtype=torch.bool)
        keep[:, :real_skv] = torch.rand(2, real_skv, generator=torch.Generator().manual_seed(real_skv)) < 0.9
        keep[0, :real_skv] = True
        sink = real_skv if with_sink else -1
        if with_sink:
            keep[:, sink] = True
        lo, hi = flex.key_bounds(case_of(real_sq, real_skv, causal, window), sq)
        where = (real_sq, real_skv, window, causal, sink)
        assert_block_masks_equal(flex.contract_block_mask(keep, lo, hi, sq, skv, sink),
                                 want_block_mask(keep, lo, hi, sq, skv, sink), where)


# --- availability (no compile) -------------------------------------------------------------------


@pytest.fixture
def no_compile(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any compile during the test fails it; the availability cache starts and ends empty."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled something")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(flex, "compiled_flex_attention", refuse)
    flex.flex_unavailable_reason.cache_clear()
    yield
    flex.flex_unavailable_reason.cache_clear()


@pytest.mark.usefixtures("no_compile")
def test_listing_and_loading_flex_compile_nothing() -> None:
    graphs = unique_graphs()
    info = next(i for i in list_backends() if i.name == "flex")
    assert info.available, info.reason
    assert load_backend("flex").device == "cpu"
    assert unique_graphs() == graphs


@pytest.mark.usefixtures("no_compile")
def test_missing_cpp_compiler_makes_flex_unavailable_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(BackendUnavailable, match="no C\\+\\+ compiler 'no-such-c\\+\\+' on PATH"):
        flex.FlexBackend("cpu")


def test_compile_failure_is_a_clear_error_remembered_per_bucket(monkeypatch: pytest.MonkeyPatch,
                                                                 backend: flex.FlexBackend) -> None:
    calls = []

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        assert torch._dynamo.config.suppress_errors is False  # no silent fallback to eager during the call
        calls.append(args[0].shape)  # type: ignore[attr-defined]
        raise RuntimeError("C++ compile error\nline two")

    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: broken)
    monkeypatch.setattr(flex, "_FAILED", {})
    q, k, v = make(3, 5, 20)
    for _ in range(2):
        with pytest.raises(flex.FlexCompileError, match=r"B=4 Hq=4 Hkv=2 Sq=128 Skv=128 D=16 without score_mod "
                                                          r"\(bucket of B=3 Sq=5 "
                                                          r"Skv=20\): RuntimeError: C\+\+ compile error line two"):
            backend.attention(q, k, v, causal=True)
    assert calls == [torch.Size([4, HQ, 128, D])]  # tried once, at the bucketed shape; the second call failed at once


# --- compiled runs (CPU compiles: a few seconds each) --------------------------------------------


@pytest.mark.parametrize(("b", "sq", "skv", "causal"), [
    (2, 16, 16, True),   # prefill
    (2, 12, 16, False),  # non-causal, Sq < Skv
    (2, 11, 4, True),    # Sq > Skv: the first 7 rows see no key and are exactly 0
    (3, 9, 14, True),    # a batch bucket of 4 with a padded entry, chunked prefill
])
def test_flex_matches_naive_fp32(backend: flex.FlexBackend, naive: object, b: int, sq: int, skv: int,
                                 causal: bool) -> None:
    check_against_naive(backend, naive, *make(b, sq, skv), causal)


@pytest.mark.parametrize("causal", [True, False])
def test_nan_in_padded_keys_never_leaks_and_masked_rows_are_zero(backend: flex.FlexBackend, naive: object,
                                                                 causal: bool) -> None:
    """NaN in the padded key slots changes nothing; with NaN in the padded values too, an entry that sees
    no key is still exactly 0 (its tiles are empty). NaN in padded values of a visited tile leaks from
    the kernel itself (0·NaN in the tile's P·V on CPU, torch 2.13, with or without buckets): the
    adapter does not hide it, the ``nan_padding`` property reports it."""
    q, k, v = make(2, 13, 15)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[0, 9:] = False     # right padding
    mask[1, :] = False      # an entry that sees no key at all
    poisoned = ~mask[:, None, :, None]
    out = check_against_naive(backend, naive, q, k.masked_fill(poisoned, float("nan")), v, causal, mask)
    assert torch.all(out[1] == 0)
    both = backend.attention(q, k.masked_fill(poisoned, float("nan")), v.masked_fill(poisoned, float("nan")),
                             causal=causal, scale=None, key_padding_mask=mask)
    assert torch.all(both[1] == 0)


def test_one_compile_serves_ten_key_lengths_of_a_decode_family(backend: flex.FlexBackend, naive: object) -> None:
    torch._dynamo.reset()
    flex.compiled_flex_attention.cache_clear()
    graphs = unique_graphs()
    lengths = (1, 2, 5, 17, 64, 127, 128, 129, 160, 255)  # Skv buckets 128 and 256 (two tiles: full and partial)
    for i, skv in enumerate(lengths):
        q, k, v = make(1 + i % 3, 1, skv, seed=i)  # batch 1..3, all bucket 4
        check_against_naive(backend, naive, q, k, v, causal=bool(i % 2))
    compiled = unique_graphs() - graphs
    assert 1 <= compiled <= 2, f"{compiled} compiles for {len(lengths)} key lengths"


def test_multi_tile_prefill_with_holes_matches_naive_fp32(backend: flex.FlexBackend, naive: object) -> None:
    q, k, v = make(2, 150, 200)  # bucket 256 × 256: two tiles each way, full, partial and empty ones
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[0, 30:60] = False
    mask[1, 140:] = False
    for causal in (True, False):
        check_against_naive(backend, naive, q, k, v, causal, mask)


# --- the attention variants (window in the mask_mod, softcap and sinks in one score_mod) ------------

VARIANT_GOLDENS = (  # float32, two compiles: (Hq 2, Hkv 1, D 64) and (Hq 4, Hkv 2, D 64) with a score_mod
    "attention/softcap/hq2-hkv1-d64-b1-sq17-skv17-fp32-causal-softcap1p0",
    "attention/sinks/hq4-hkv2-d64-b1-sq17-skv17-fp32-causal-sinks",
    "attention/variants-combined/hq4-hkv2-d64-b2-sq17-skv17-fp32-causal-rightpad-win5.inf-softcap20p0-sinks",
)


def golden_call(backend: flex.FlexBackend, gc: GoldenCase, **changes: object) -> torch.Tensor:
    c, x = gc.case, gc.inputs
    call = {"causal": c.causal, "scale": c.scale, "key_padding_mask": x.key_padding_mask, "window_size": c.window,
            "softcap": c.softcap, "sinks": x.sinks, **changes}
    return backend.attention(x.q, x.k, x.v, **call)  # type: ignore[arg-type]


@pytest.mark.parametrize("case_id", VARIANT_GOLDENS)
def test_flex_matches_the_variant_golden_within_the_dtype_tolerance(backend: flex.FlexBackend, case_id: str) -> None:
    gc = read_golden(case_path(SMOKE_GOLDENS, case_id))
    assert gc.case.dtype == "float32" and gc.case.variants
    out = golden_call(backend, gc)
    torch.testing.assert_close(out, torch.from_numpy(gc.golden.out), atol=RULE.atol, rtol=RULE.rtol)


def test_a_row_that_sees_no_key_but_a_sink_is_exactly_zero(backend: flex.FlexBackend) -> None:
    gc = read_golden(case_path(SMOKE_GOLDENS, VARIANT_GOLDENS[-1]))
    mask = gc.inputs.key_padding_mask.clone()
    mask[1] = False  # entry 1 sees no key: only its sinks
    out = golden_call(backend, gc, key_padding_mask=mask)
    want, _ = ReferenceBackend().attention(gc.inputs.q, gc.inputs.k, gc.inputs.v, causal=True, scale=None,
                                           key_padding_mask=mask, window_size=gc.case.window,
                                           softcap=gc.case.softcap, sinks=gc.inputs.sinks)
    assert torch.all(out[1] == 0)
    torch.testing.assert_close(out, want, atol=RULE.atol, rtol=RULE.rtol)


def test_window_tiles_outside_the_window_are_skipped_and_the_result_matches_naive_fp32(
        backend: flex.FlexBackend, naive: object) -> None:
    q, k, v = make(2, 150, 200)  # the 256 × 256 bucket: with a 20-key window the far tiles are empty
    for causal, window in ((True, (20, -1)), (False, (3, 40))):
        out = backend.attention(q, k, v, causal=causal, scale=None, key_padding_mask=None, window_size=window)
        want = naive.attention(q, k, v, causal=causal, scale=None, key_padding_mask=None,  # type: ignore[attr-defined]
                               window_size=window)
        torch.testing.assert_close(out, want, atol=RULE.atol, rtol=RULE.rtol)
    case = case_of(150, 200, True, (20, -1))  # rows 128.. see keys 158.. only: key tile 0 is empty for q tile 1
    keep = torch.ones(1, 256, dtype=torch.bool)
    keep[:, 200:] = False
    block_mask = flex.contract_block_mask(keep, *flex.key_bounds(case, 256), 256, 256)
    assert block_mask.kv_num_blocks[0, 0].tolist() == [2, 1] and block_mask.full_kv_num_blocks.sum() == 0


def test_two_softcap_values_and_sinks_share_one_compile(backend: flex.FlexBackend) -> None:
    gc = read_golden(case_path(SMOKE_GOLDENS, VARIANT_GOLDENS[0]))
    golden_call(backend, gc)  # compiled already, or now
    graphs = unique_graphs()
    for softcap, sinks in ((50.0, None), (3.0, torch.tensor([0.5, -1.0])), (None, torch.tensor([2.0, 0.0]))):
        out = golden_call(backend, gc, softcap=softcap, sinks=sinks)
        want, _ = ReferenceBackend().attention(gc.inputs.q, gc.inputs.k, gc.inputs.v, causal=True, scale=None,
                                               key_padding_mask=None, softcap=softcap, sinks=sinks)
        torch.testing.assert_close(out, want, atol=RULE.atol, rtol=RULE.rtol)
    assert unique_graphs() == graphs, "a softcap or sink value recompiled"
