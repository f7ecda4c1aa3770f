"""The layout properties: the run's ``pack`` and ``page`` checks, searched over drawn compositions.

Each draws a model from the specs' space and a pack composition (:mod:`conformance.search.layout_strategies`),
composes the layout case from dense cases of the drawn seed as ``rlk-conform run`` composes one from
its goldens (their exact references computed for the drawn sequences) and judges it with the run's
own :func:`~conformance.run.layout_case.run_layout_case`:

- ``pack``: on whichever layout op the backend has (packed or paged at a drawn page size): each sampled
  sequence alone, the pack reversed and the pack after its own reverse give the same bits;
- ``page``: on the paged op: the other drawn page sizes, the drawn block-table permutation and other
  garbage in the unused slots give the same bits.

A backend with neither op (``pack``) or without the paged op (``page``) skips the property with the
reason. A counterexample's record's message and ``parameters`` carry the composition (``pack`` tokens,
page size, page sizes, block table, seed), which with the case's model rebuild it exactly
(:func:`layout_subject`), and it is written as a layout reproducer
(:mod:`conformance.golden.layout_reproducer`: the layout file with the dense goldens it is composed
of), which ``replay`` judges again with the same composition and block table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from conformance.golden.layout_reproducer import Member, write_layout_reproducer
from conformance.golden.layouts import LayoutGolden, sequence_data
from conformance.golden.reproducer import ReproducerInfo
from conformance.judge.layout_calls import page_count
from conformance.judge.verdicts import Verdict
from conformance.reference.compute import compute_reference
from conformance.run.layout_case import layout_sequences, run_layout_case
from conformance.run.settings import RunSettings
from conformance.search.layout_strategies import (
    LayoutModel,
    block_table_order,
    compose_drawn,
    draw_block_table,
    draw_model,
    draw_other_page_sizes,
    draw_page_size,
    draw_tokens,
    member_cases,
    page_count_of,
)
from conformance.search.properties import (
    Counterexample,
    Example,
    Property,
    PropertyContext,
    PropertyOutcome,
    PropertySkipped,
)
from conformance.search.strategies import MAX_SEED, SpecSpace
from conformance.spec.inputs import make_inputs
from conformance.spec.layouts import PAGED, VARLEN, LayoutCase

LAYOUT_OPS_ORDER = (VARLEN, PAGED)
MEMBER_OP = "attention"  # the dense op of the cases a drawn layout is composed of (member_cases)


def _draw(name: str, data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    ops = [op for op in LAYOUT_OPS_ORDER if ctx.invoker.has(op) and (name == "pack" or op == PAGED)]
    op = data.draw(st.sampled_from(ops), label="layout op")
    model = draw_model(data, space, ctx.variants)
    tokens = draw_tokens(data, space, model)
    seed = data.draw(st.integers(0, MAX_SEED), label="input seed")
    page_size = draw_page_size(data) if op == PAGED else None
    others: tuple[int, ...] = ()
    block_table = None
    if name == "page" and page_size is not None:
        others = draw_other_page_sizes(data, page_size)
        block_table = draw_block_table(data, page_count_of(tokens, page_size))
    case = compose_drawn(name, op, space.tier, model, tokens, seed, page_size,
                         () if page_size is None else (page_size, *others))
    params = {"op": op, "pack": case.pack_text, "sequences": case.batch, "page_size": page_size,
              "page_sizes": list(case.page_sizes), "block_table": block_table, "seed": seed}
    if model.window != (-1, -1):
        params["window"] = list(model.window)
    return Example(name, case, params)  # type: ignore[arg-type]  # a LayoutCase reads like a dense case


def _draw_pack(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    return _draw("pack", data, space, ctx)


def _draw_page(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    return _draw("page", data, space, ctx)


@dataclass
class DrawnLayout(LayoutGolden):
    """A drawn layout case as the run reads a layout file, with the dense members it is composed of
    (what its reproducer stores)."""

    members: tuple[Member, ...] = ()


def layout_subject(example: Example, ctx: PropertyContext) -> DrawnLayout:
    """The drawn layout case with its sequences and their exact references, as the run reads a layout
    file: the dense member cases rebuilt from the case's model, tokens and seed."""
    case: LayoutCase = example.case  # type: ignore[assignment]
    members = []
    for m in member_cases(example.prop, case.tier, LayoutModel.of(case), case.tokens, case.seed).values():
        inputs = make_inputs(m)
        members.append(Member(m, inputs, compute_reference(m, inputs, device=ctx.reference_device)))
    data = {m.case.id: m for m in members}
    sequences = [sequence_data(ref, data[ref.case_id].inputs, data[ref.case_id].golden) for ref in case.sequences]
    return DrawnLayout(Path(f"{case.id}.json"), case, sequences, tuple(members))


def write_reproducer(found: Counterexample, ctx: PropertyContext, info: ReproducerInfo, directory: Path,
                     space: SpecSpace) -> Path:
    """The counterexample as a layout reproducer in ``directory``: its layout file and member goldens,
    with the spec provenance of the dense op its members are cases of."""
    subject: DrawnLayout = found.subject  # type: ignore[assignment]
    provenance = space.provenance.get(MEMBER_OP) or next(iter(space.provenance.values()))
    return write_layout_reproducer(directory, subject.case, provenance, subject.members, info)


def page_order(ex: Example, subject: LayoutGolden) -> list[int] | None:
    """The ``page`` check's block-table permutation from the example's ``block_table`` parameter (None
    for ``pack``). Raises ValueError when the parameters do not describe one (a damaged reproducer)."""
    if ex.prop != "page":
        return None
    block_table, page_size = ex.params.get("block_table"), subject.case.page_size
    if page_size is None or not isinstance(block_table, dict):
        raise ValueError(f"'page' needs a paged case and a block_table parameter, found {block_table!r}")
    try:
        return block_table_order(block_table, page_count(layout_sequences(subject), page_size))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"block_table {block_table!r} is incomplete ({exc!r})") from None


def _check(ctx: PropertyContext, ex: Example, subject: LayoutGolden) -> PropertyOutcome:
    """The run's own check ``ex.prop`` (and the op contract on its calls) on the drawn layout case."""
    case = subject.case
    order = page_order(ex, subject)
    settings = RunSettings(tolerances=ctx.tolerances, checks=(ex.prop, "contract"), rule_set=ctx.rule_set,
                           reruns=ctx.reruns)
    records = {r.check: r for r in run_layout_case(ctx.invoker, subject, settings, page_order=order)}
    judged, contract = records.get(ex.prop), records.get("contract")
    if judged is None or judged.status == "skip":
        raise PropertySkipped(judged.message if judged else f"{ex.prop} does not apply to {case.id}")
    if judged.status == "pass" and contract is not None and contract.status in ("fail", "error"):
        return PropertyOutcome(Verdict(contract.status, contract.metrics, f"contract: {contract.message}"),
                               check="contract")
    return PropertyOutcome(Verdict(judged.status, judged.metrics, judged.message))


#: The layout properties, in report order (the run's layout checks, conformance.spec.checks).
LAYOUT_PROPERTIES: tuple[Property, ...] = (
    Property("pack", "a sequence alone, elsewhere in the pack or among other neighbours gives the same bits", (),
             _draw_pack, _check, requires_any=LAYOUT_OPS_ORDER, subject=layout_subject,
             write_reproducer=write_reproducer),
    Property("page", "another page size, a permuted block table or other garbage in the unused slots gives the "
             "same bits", (PAGED,), _draw_page, _check, subject=layout_subject,
             write_reproducer=write_reproducer),
)
