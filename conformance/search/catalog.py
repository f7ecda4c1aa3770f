"""Every property the search knows, by name, in report order: the forward ones
(:mod:`conformance.search.properties`), the gradient ones (:mod:`conformance.search.gradient_properties`),
then the layout ones (:mod:`conformance.search.layout_properties`); and the one parser of a
``--properties`` list."""

from __future__ import annotations

from conformance.search.gradient_properties import GRADIENT_PROPERTIES
from conformance.search.layout_properties import LAYOUT_PROPERTIES
from conformance.search.properties import FORWARD_PROPERTIES, Property

PROPERTIES: dict[str, Property] = {p.name: p for p in (*FORWARD_PROPERTIES, *GRADIENT_PROPERTIES, *LAYOUT_PROPERTIES)}
PROPERTY_NAMES = tuple(PROPERTIES)


def parse_properties(text: str | None) -> tuple[str, ...]:
    """``"batch,split"`` → the named properties; None, empty or ``all`` → every one. Raises
    ``ValueError`` naming the unknown names and the known ones."""
    if text is None or text.strip() in ("", "all"):
        return PROPERTY_NAMES
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in PROPERTIES]
    if unknown or not names:
        raise ValueError(f"unknown propert{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(PROPERTY_NAMES)} or all")
    return names
