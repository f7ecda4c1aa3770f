"""Where rlk-conform finds its default files, whatever the current directory.

- the specs and tolerances ship in the package (``conformance/spec/data/``; ``specs/`` of a source
  checkout is a link to it);
- the default golden root (the directory holding ``smoke/``, ``standard/``, ``regression/``…) is
  ``$RLK_GOLDENS`` when set, else ``goldens/`` of the source checkout the package runs from (where
  the smoke tier is committed), else ``goldens/`` in the current directory. ``run``, ``verify``,
  ``release`` and the pytest plugin read the first of these that holds the tier; ``generate`` and
  ``promote`` write under the first that is set or exists.

An explicit ``--goldens``, ``--spec``, ``--tolerances`` or ``--out`` is a path like any other,
relative to the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from conformance.errors import GoldenError

PACKAGE = Path(__file__).resolve().parent
SPEC_DATA = PACKAGE / "spec" / "data"
GOLDENS_ENV = "RLK_GOLDENS"
MANIFEST = "manifest.json"
REGRESSION = "regression"


def spec_dir() -> Path:
    """The directory of the shipped specs: ``attention.yaml``, ``kv_cache_attention.yaml``, ``presets.yaml``,
    ``tolerances.yaml``."""
    return SPEC_DATA


def default_tolerances() -> Path:
    return SPEC_DATA / "tolerances.yaml"


def source_checkout() -> Path | None:
    """The repository the package runs from (an editable install or ``PYTHONPATH``), or None for an
    installed wheel."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "conformance").is_dir() else None


def docs_dir() -> Path | None:
    """``docs/`` of the source checkout (the release bundle ships files from it), or None."""
    checkout = source_checkout()
    return checkout / "docs" if checkout is not None and (checkout / "docs").is_dir() else None


def golden_roots() -> list[tuple[Path, str]]:
    """The candidate golden roots in the order they are tried, each with where it comes from."""
    found: list[tuple[Path, str]] = []
    env = os.environ.get(GOLDENS_ENV)
    if env:
        found.append((Path(env), f"${GOLDENS_ENV}"))
    checkout = source_checkout()
    if checkout is not None:
        found.append((checkout / "goldens", "the source checkout"))
    found.append((Path.cwd() / "goldens", "the current directory"))
    unique: list[tuple[Path, str]] = []
    for path, why in found:
        if all(path.resolve() != p.resolve() for p, _ in unique):
            unique.append((path, why))
    return unique


def find_goldens(tier: str) -> Path:
    """The default golden directory of ``tier``: ``<root>/<tier>`` of the first :func:`golden_roots`
    entry that holds a manifest there. Raises GoldenError naming every place looked at."""
    roots = golden_roots()
    for root, _ in roots:
        if (root / tier / MANIFEST).is_file():
            return root / tier
    looked = "; ".join(f"{root / tier} ({why})" for root, why in roots)
    raise GoldenError(roots[0][0] / tier, f"no {tier} goldens found (looked in: {looked}); generate them with "
                      f"'rlk-conform generate --tier {tier}', set ${GOLDENS_ENV} to the directory holding "
                      f"{tier}/, or pass --goldens DIR")


def output_root() -> Path:
    """Where ``generate`` and ``promote`` write by default: ``$RLK_GOLDENS``, else the first golden root
    that exists, else ``goldens/`` in the current directory."""
    roots = golden_roots()
    if os.environ.get(GOLDENS_ENV):
        return roots[0][0]
    for root, _ in roots:
        if root.is_dir():
            return root
    return Path("goldens")


def regression_dir() -> Path | None:
    """The regression set of the default golden root (promoted reproducers), when it has a manifest."""
    for root, _ in golden_roots():
        if (root / REGRESSION / MANIFEST).is_file():
            return root / REGRESSION
    return None


def shown(path: Path) -> str:
    """``path`` as a person reads it: relative to the current directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
