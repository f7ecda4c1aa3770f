"""flex-layouts: both layouts through one compiled FlexAttention call over the tile-aligned pack.

CPU compiles take seconds each, so the fast tests share one bucket (float32, Hq 4, Hkv 2, D 16,
TQ = TK = 512: three or four sequences of at most one 128-row tile each side): the packed and the
paged call of the same sequences, a second and a reversed composition, all one compile. The harness
run over the 25 smoke layout cases compiles many buckets (about 90 s on two CPU cores with a warm
Inductor cache), so it is marked slow.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from planted_layouts import LayoutCorrect
from test_layouts import failing, run_layouts, seqs

from conformance.backends import list_backends, load_backend
from conformance.backends.flex_layouts import FlexLayoutsBackend, aligned_size
from conformance.judge.layout_calls import Seq, pack_call, page_count, paged_call

HQ, HKV, D = 4, 2, 16
FIRST = [(3, 9), (1, 16), (5, 5)]
SECOND = [(7, 40), (1, 1), (16, 100), (2, 2)]


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def backend() -> FlexLayoutsBackend:
    return FlexLayoutsBackend("cpu")


def packed(backend: FlexLayoutsBackend, s: list[Seq], causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    call = pack_call(s, causal, None)
    got = backend.varlen_attention(*call.args(), **call.kwargs())
    want = LayoutCorrect().varlen_attention(*call.args(), **call.kwargs())
    return got, want


def test_flex_layouts_is_listed_after_flex() -> None:
    names = [i.name for i in list_backends()]
    assert names.index("flex-layouts") == names.index("flex") + 1


def test_one_bucket_serves_both_layouts_and_every_composition_bitwise_per_sequence(backend: FlexLayoutsBackend
                                                                                   ) -> None:
    assert {aligned_size([n for n, _ in x]) for x in (FIRST, SECOND)} == {512}
    s = seqs(FIRST, HQ, HKV, D)
    got, want = packed(backend, s)  # compiled now, or already
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    graphs = unique_graphs()
    order = torch.randperm(page_count(s, 4), generator=torch.Generator().manual_seed(3)).tolist()
    call = paged_call(s, True, None, 4, order)  # unused slots hold NaN
    paged = backend.paged_kv_attention(*call.args(), **call.kwargs())
    assert torch.equal(paged, got) and not paged.isnan().any()
    other, want_other = packed(backend, seqs(SECOND, HQ, HKV, D, seed=1))
    torch.testing.assert_close(other, want_other, atol=1e-5, rtol=1e-5)
    noncausal, want_noncausal = packed(backend, s, causal=False)
    torch.testing.assert_close(noncausal, want_noncausal, atol=1e-5, rtol=1e-5)
    rev, _ = packed(backend, s[::-1])
    sizes = [n for n, _ in FIRST]
    rows = list(torch.split(got, sizes))
    assert torch.equal(rev, torch.cat(rows[::-1]))  # a sequence's bits do not depend on its neighbours
    assert unique_graphs() == graphs, "a pack composition, the paged layout or causal recompiled"


@pytest.mark.slow
def test_smoke_layout_cases_show_no_failure() -> None:
    """All 25 smoke layout cases, every check, the bitwise invariance ones included: no failure."""
    records = run_layouts(load_backend("flex-layouts"))
    assert {"accuracy", "pack", "page", "split", "prefill_decode", "contract"} <= {r.check for r in records}
    assert failing(records) == Counter()
