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
reason. A layout case is not a dense case, so a counterexample is written to no reproducer file: its
record's message and ``parameters`` carry the composition (``pack`` tokens, page size, page sizes,
block table, seed), which with the case's model rebuild it exactly (:func:`layout_subject`).
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

from conformance.golden.layouts import LayoutGolden, sequence_data
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
from conformance.search.properties import Example, Property, PropertyContext, PropertyOutcome, PropertySkipped
from conformance.search.strategies import MAX_SEED, SpecSpace
from conformance.spec.inputs import make_inputs
from conformance.spec.layouts import PAGED, VARLEN, LayoutCase

LAYOUT_OPS_ORDER = (VARLEN, PAGED)


def _draw(name: str, data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    ops = [op for op in LAYOUT_OPS_ORDER if ctx.invoker.has(op) and (name == "pack" or op == PAGED)]
    op = data.draw(st.sampled_from(ops), label="layout op")
    model = draw_model(data, space)
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
    return Example(name, case, params)  # type: ignore[arg-type]  # a LayoutCase reads like a dense case


def _draw_pack(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    return _draw("pack", data, space, ctx)


def _draw_page(data: st.DataObject, space: SpecSpace, ctx: PropertyContext) -> Example:
    return _draw("page", data, space, ctx)


def layout_subject(example: Example, ctx: PropertyContext) -> LayoutGolden:
    """The drawn layout case with its sequences and their exact references, as the run reads a layout
    file: the dense member cases rebuilt from the case's model, tokens and seed."""
    case: LayoutCase = example.case  # type: ignore[assignment]
    members = member_cases(example.prop, case.tier, LayoutModel.of(case), case.tokens, case.seed).values()
    data = {}
    for m in members:
        inputs = make_inputs(m)
        data[m.id] = (inputs, compute_reference(m, inputs, device=ctx.reference_device))
    sequences = [sequence_data(ref, *data[ref.case_id]) for ref in case.sequences]
    return LayoutGolden(Path(f"{case.id}.json"), case, sequences)


def _check(ctx: PropertyContext, ex: Example, subject: LayoutGolden) -> PropertyOutcome:
    """The run's own check ``ex.prop`` (and the op contract on its calls) on the drawn layout case."""
    case = subject.case
    order = None
    if ex.prop == "page":
        assert case.page_size is not None and ex.params["block_table"] is not None
        order = block_table_order(ex.params["block_table"], page_count(layout_sequences(subject), case.page_size))
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
             _draw_pack, _check, requires_any=LAYOUT_OPS_ORDER, subject=layout_subject, reproducer=False),
    Property("page", "another page size, a permuted block table or other garbage in the unused slots gives the "
             "same bits", (PAGED,), _draw_page, _check, subject=layout_subject, reproducer=False),
)
