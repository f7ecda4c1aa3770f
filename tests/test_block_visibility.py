"""Whether a block of query rows sees every one of its keys, decided from the case's geometry
(``block_sees_every_key``) without building the visibility mask: the answer the mask gives, for
every causal / window / padding combination."""

from __future__ import annotations

from dataclasses import replace

import torch
from conftest import build_case
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.spec.inputs import block_sees_every_key, leading_keys_kept, visible


@st.composite
def blocks(draw: st.DrawFn) -> tuple:
    sq = draw(st.integers(1, 24))
    skv = draw(st.integers(1, 24))
    causal = draw(st.booleans())
    window = (draw(st.integers(-1, 8)), draw(st.integers(-1, 8)))
    batch = draw(st.integers(1, 3))
    padded = draw(st.booleans())
    mask = None
    if padded:
        keep = draw(st.lists(st.lists(st.booleans(), min_size=skv, max_size=skv), min_size=batch, max_size=batch))
        mask = torch.tensor(keep, dtype=torch.bool)
    case = replace(build_case(batch=batch, sq=sq, skv=skv, causal=causal), window=window)
    i0 = draw(st.integers(0, sq - 1))
    i1 = draw(st.integers(i0 + 1, sq))
    keys = draw(st.integers(0, skv))
    return case, mask, i0, i1, keys


@settings(max_examples=400, deadline=None)
@given(blocks())
def test_the_geometry_answers_what_the_mask_answers(block: tuple) -> None:
    case, mask, i0, i1, keys = block
    expected = bool(visible(case, mask, slice(i0, i1))[..., :keys].all())
    assert block_sees_every_key(case, leading_keys_kept(case, mask), i0, i1, keys) == expected


def test_leading_keys_kept_counts_to_the_first_padded_key_of_any_entry() -> None:
    case = build_case(batch=2, sq=1, skv=5)
    assert leading_keys_kept(case, None) == 5
    assert leading_keys_kept(case, torch.ones(2, 5, dtype=torch.bool)) == 5
    mask = torch.tensor([[True, True, True, False, True], [True, False, True, True, True]])
    assert leading_keys_kept(case, mask) == 1
    assert leading_keys_kept(case, torch.tensor([[False] * 5, [True] * 5])) == 0


def test_a_causal_block_sees_every_key_only_up_to_its_first_rows_diagonal() -> None:
    case = build_case(sq=4, skv=8, causal=True)  # row i's diagonal is key i + 4
    assert block_sees_every_key(case, 8, 0, 4, 5)  # keys 0-4: row 0 sees up to key 4
    assert not block_sees_every_key(case, 8, 0, 4, 6)
    assert block_sees_every_key(case, 8, 2, 4, 7)
    assert not block_sees_every_key(case, 5, 2, 4, 7)  # key 5 is padded somewhere
