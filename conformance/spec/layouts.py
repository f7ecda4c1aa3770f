"""Layouts real kernels use: packed variable-length batches (``varlen_attention``) and a paged KV
cache (``paged_kv_attention``). A layout case holds no data of its own: it is a composition of
sequences taken from dense golden cases of one family (same heads, head dim, dtype, scale, causal
flag and distribution, other lengths), so its exact outputs are those cases' goldens.

A family declares its compositions per tier under ``layouts`` (specs/*.yaml)::

    layouts:
      smoke:
        - {layout: varlen, packs: [[1x129, 7x17], [2x64, 2x65]]}
        - {layout: paged, packs: [[4x1of65, 1x1of129]], page_sizes: [16, 1, 5]}

A *pack token* ``<count>x<sq>`` is ``count`` sequences of ``sq`` query rows over ``sq`` keys (a
prefill); ``<count>x<sq>of<skv>`` is ``count`` sequences of ``sq`` query rows over ``skv`` keys, the
queries being the last ``sq`` positions (decode: ``1of<skv>``; chunked prefill with a cached
prefix). Each token takes its sequences from the family's case with that ``(sq, skv)``, one batch
entry per sequence (cycling when ``count`` exceeds the case's batch). The same tokens, joined by
``+``, end the layout case's id.

A family's grids may give its cases a sliding window (``window_left`` / ``window_right``, as for the
dense families): the cases of one window form their own group, so each layout case carries its
members' window (bottom-right aligned per sequence, like the dense op's), and its id carries the
dense ids' ``win<left>.<right>`` tag. Soft-capping and sinks do not compose with the
layouts: cases using them are not packed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from conformance.spec.case import DIST_SHORT, DTYPE_SHORT, LAYOUT_OPS, Case, scale_tag, window_tag

VARLEN, PAGED = LAYOUT_OPS
#: The ``layout:`` names of a spec and the op each one exercises.
LAYOUT_NAMES = {"varlen": VARLEN, "paged": PAGED}
TOKEN_RE = re.compile(r"^(?P<count>[1-9]\d*)x(?P<sq>[1-9]\d*)(?:of(?P<skv>[1-9]\d*))?$")
MAX_PACK_SEQUENCES = 4096


@dataclass(frozen=True)
class PackToken:
    """``count`` sequences of ``sq`` query rows over ``skv`` keys (bottom-right: the last ``sq`` positions)."""

    count: int
    sq: int
    skv: int

    @property
    def text(self) -> str:
        return f"{self.count}x{self.sq}" if self.sq == self.skv else f"{self.count}x{self.sq}of{self.skv}"


def parse_token(text: str) -> PackToken:
    """``"7x17"`` or ``"31x1of128"`` → :class:`PackToken`; ValueError naming the token otherwise."""
    m = TOKEN_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"pack token {text!r} is not <count>x<sq> or <count>x<sq>of<skv> (e.g. 7x17, 31x1of128)")
    sq = int(m["sq"])
    skv = sq if m["skv"] is None else int(m["skv"])
    if skv < sq:
        raise ValueError(f"pack token {text!r}: {sq} query rows over {skv} keys; a sequence's queries are its "
                         "last positions, so sq <= skv")
    return PackToken(int(m["count"]), sq, skv)


@dataclass(frozen=True)
class SequenceRef:
    """One sequence of a layout case: batch entry ``batch_index`` of the dense golden ``case_id``."""

    case_id: str
    batch_index: int
    sq: int
    skv: int


@dataclass(frozen=True)
class LayoutCase:
    """One packed (``varlen_attention``) or paged (``paged_kv_attention``) case: immutable, its id the
    key in files and reports. ``sequences`` in pack order; ``page_size`` for a paged case, and
    ``page_sizes`` every page size its family declares (the ``page`` check runs it at the others).

    For a backend's ``supports(op, case)`` it reads like a dense case: ``batch`` is the number of
    sequences, ``sq`` and ``skv`` the longest, ``mask`` is ``"none"`` and ``s_past`` None. ``window``
    is every sequence's sliding window (its members'), relative to each sequence's own bottom-right
    diagonal; ``variants`` is ``("window",)`` when it is bounded, so a backend that does not declare
    the window is skipped with the reason."""

    id: str
    op: str
    family: str
    tier: str
    hq: int
    hkv: int
    d: int
    dtype: str
    causal: bool
    scale: float | None
    dist: str
    seed: int
    tokens: tuple[PackToken, ...]
    sequences: tuple[SequenceRef, ...]
    page_size: int | None = None
    page_sizes: tuple[int, ...] = ()
    preset: str | None = None
    mask: str = "none"
    s_past: int | None = None
    grad: bool = False
    window: tuple[int, int] = (-1, -1)
    # Soft-capping and sinks do not compose with the layouts: a layout case uses neither.
    softcap: float | None = None
    sinks: tuple[float, ...] | None = None

    @property
    def variants(self) -> tuple[str, ...]:
        """The attention variants this case uses: ``("window",)`` for a bounded window, else none."""
        return ("window",) if self.window != (-1, -1) else ()

    @property
    def batch(self) -> int:
        return len(self.sequences)

    @property
    def sq(self) -> int:
        return max(s.sq for s in self.sequences)

    @property
    def skv(self) -> int:
        return max(s.skv for s in self.sequences)

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def members(self) -> tuple[str, ...]:
        """The dense golden cases the sequences come from, each once, in first-use order."""
        return tuple(dict.fromkeys(s.case_id for s in self.sequences))

    @property
    def pack_text(self) -> str:
        return "+".join(t.text for t in self.tokens)


def layout_group(case: Case) -> tuple[object, ...]:
    """What the sequences of one layout case share: model, dtype, causal flag, scale, distribution, window."""
    return (case.preset or f"hq{case.hq}-hkv{case.hkv}-d{case.d}", case.dtype, case.causal, case.scale, case.dist,
            case.window)


def layout_id(op: str, family: str, member: Case, tokens: tuple[PackToken, ...], page_size: int | None) -> str:
    """``<op>/<family>/<model>-<dtype>-<causal|noncausal>[-<dist>][-scale<s>][-win<l>.<r>][-page<P>]-<tokens
    joined by +>`` (an unbounded window adds nothing, so the ids of plain layout cases are unchanged)."""
    model, dtype, causal, scale, dist, window = layout_group(member)
    parts = [str(model), DTYPE_SHORT[str(dtype)], "causal" if causal else "noncausal", DIST_SHORT[str(dist)],
             "" if scale is None else f"scale{scale_tag(float(scale))}",  # type: ignore[arg-type]
             window_tag(window),  # type: ignore[arg-type]
             "" if page_size is None else f"page{page_size}", "+".join(t.text for t in tokens)]
    return f"{op}/{family}/" + "-".join(p for p in parts if p)


def compose(op: str, family: str, tier: str, tokens: tuple[PackToken, ...], members: dict[tuple[int, int], Case],
            seed: int, page_size: int | None = None, page_sizes: tuple[int, ...] = ()) -> LayoutCase:
    """The layout case of ``tokens`` over ``members`` (``(sq, skv)`` → the dense case holding such
    sequences; every token's must be there). Each token takes the next batch entries of its case."""
    used: dict[str, int] = {}
    sequences = []
    for token in tokens:
        case = members[(token.sq, token.skv)]
        for _ in range(token.count):
            k = used.get(case.id, 0)
            used[case.id] = k + 1
            sequences.append(SequenceRef(case.id, k % case.batch, token.sq, token.skv))
    first = members[(tokens[0].sq, tokens[0].skv)]
    return LayoutCase(id=layout_id(op, family, first, tokens, page_size), op=op, family=family, tier=tier,
                      hq=first.hq, hkv=first.hkv, d=first.d, dtype=first.dtype, causal=first.causal,
                      scale=first.scale, dist=first.dist, seed=seed, tokens=tokens, sequences=tuple(sequences),
                      page_size=page_size, page_sizes=page_sizes, preset=first.preset, window=first.window)
