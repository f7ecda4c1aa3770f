"""The names of the judgments (CONTRACT.md §2), in report order, and the one parser of a ``--checks``
list (the CLI and the pytest plugin both use it)."""

from __future__ import annotations

from conformance.errors import UsageError

#: The bitwise invariance checks of a golden run (relation I) on the forward.
INVARIANCE_CHECKS = ("batch", "split", "prefill_decode", "chunk", "padding", "determinism")
#: The same relation on the gradients dQ, dK, dV of a case with gradients (grad: true).
GRADIENT_INVARIANCE_CHECKS = ("gradient_batch", "gradient_split", "gradient_padding", "gradient_determinism")
#: The gradient judgments: accuracy against the exact gradients, invariance, and the backward's contract.
GRADIENT_CHECKS = ("gradient_accuracy", *GRADIENT_INVARIANCE_CHECKS, "gradient_contract")
#: The bitwise invariance checks of the packed and paged layouts (varlen_attention, paged_kv_attention):
#: ``pack`` (a sequence alone, elsewhere in the pack, among other neighbours) and ``page`` (another page
#: size, a permuted block table, other garbage in the unused page slots).
LAYOUT_INVARIANCE_CHECKS = ("pack", "page")
#: The checks a golden run makes by default: accuracy, every invariance check and the op contract, on
#: the forward and (for cases with gradients) on the backward, and the layouts' invariance checks.
GOLDEN_CHECKS = ("accuracy", *INVARIANCE_CHECKS, "contract", *GRADIENT_CHECKS, *LAYOUT_INVARIANCE_CHECKS)
DEFAULT_CHECKS = GOLDEN_CHECKS
#: Checks that only the property search makes (``rlk-conform check``).
PROPERTY_ONLY_CHECKS = ("gqa", "nan_padding")
#: Every check name a record can carry, in report order (new names are appended, never reordered:
#: dashboards key on the position); ``parity`` needs a second backend (``--compare-to``).
CHECKS = ("accuracy", *INVARIANCE_CHECKS, "contract", "parity", *PROPERTY_ONLY_CHECKS, *GRADIENT_CHECKS,
          *LAYOUT_INVARIANCE_CHECKS)
#: The four judgments of the users' numerical contract (CONTRACT.md §2), each reported apart, and
#: the contract checks beside them: judgment → its checks.
JUDGMENTS = {
    "forward accuracy": ("accuracy", "parity"),
    "forward invariance": (*INVARIANCE_CHECKS, *PROPERTY_ONLY_CHECKS, *LAYOUT_INVARIANCE_CHECKS),
    "forward contract": ("contract",),
    "gradient accuracy": ("gradient_accuracy",),
    "gradient invariance": GRADIENT_INVARIANCE_CHECKS,
    "gradient contract": ("gradient_contract",),
}


def judgment_of(check: str) -> str:
    """The judgment a check belongs to (``forward accuracy`` … ``gradient contract``)."""
    return next((name for name, checks in JUDGMENTS.items() if check in checks), "other")


def parse_checks(text: str | None, option: str = "--checks", allow_parity: bool = True) -> tuple[str, ...]:
    """``"accuracy,batch"`` → the named checks in the order given; None → :data:`DEFAULT_CHECKS`.

    Raises :class:`~conformance.errors.UsageError` naming ``option``, the unknown names and the known
    ones (an empty list is refused: a run with no check verifies nothing)."""
    if text is None:
        return DEFAULT_CHECKS
    wanted = tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    known = CHECKS if allow_parity else tuple(c for c in CHECKS if c != "parity")
    unknown = [c for c in wanted if c not in known]
    if unknown or not wanted:
        raise UsageError(f"{option}: unknown check(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(known)}")
    return wanted
