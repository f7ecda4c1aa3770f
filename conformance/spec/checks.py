"""The names of the judgments (CONTRACT.md §2), in report order, and the one parser of a ``--checks``
list (the CLI and the pytest plugin both use it)."""

from __future__ import annotations

from conformance.errors import UsageError

#: The bitwise invariance checks of a golden run (relation I).
INVARIANCE_CHECKS = ("batch", "split", "prefill_decode", "chunk", "padding", "determinism")
#: The checks a golden run makes by default: accuracy, every invariance check and the op contract.
GOLDEN_CHECKS = ("accuracy", *INVARIANCE_CHECKS, "contract")
DEFAULT_CHECKS = GOLDEN_CHECKS
#: Checks that only the property search makes (``rlk-conform check``).
PROPERTY_ONLY_CHECKS = ("gqa", "nan_padding")
#: Every check name a record can carry; ``parity`` needs a second backend (``--compare-to``).
CHECKS = (*GOLDEN_CHECKS, "parity", *PROPERTY_ONLY_CHECKS)


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
