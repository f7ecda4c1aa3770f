"""Layout reproducers: a ``pack`` or ``page`` counterexample on disk, which ``replay`` re-runs and
``promote`` adds to the regression set, like a dense reproducer.

A layout case holds no data of its own: a layout file (:mod:`conformance.golden.layouts`) names, for
each sequence, the dense golden and batch entry it comes from. A layout reproducer is therefore that
layout file with the dense goldens it names beside it, laid out like a golden directory, so that the
run's own readers take it as they are (``read_layout_golden``, ``read_golden`` and their guards):

    <dir>/<backend>/<layout case id>.json    the layout file, plus the object "reproducer"
    <dir>/<backend>/<member case id>.h5      each member golden: its inputs and exact reference

``reproducer`` holds what the ``/reproducer`` attributes of a dense reproducer hold
(:class:`~conformance.golden.reproducer.ReproducerInfo`: ``format``, ``schema_version``, ``property``,
``parameters`` — the whole composition, block table included —, ``hypothesis_seed`` (``-1`` when
unseeded), ``profile``, ``backend``, ``backend_spec``, ``backend_device``, ``execution_target``,
``status``, ``message``, ``variant``). The backend's outputs are not stored: a layout check compares
several calls, and its message names the one that differed.

Member ids spell out every parameter and the seed, so two reproducers of one backend that share a
member share its file (same bytes). ``promote`` copies the members and the plain layout file (no
``reproducer``) into the regression directory and lists them all in its manifest, as ``generate``
lists a layout case and its goldens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from conformance.errors import GoldenError
from conformance.files import atomic_path
from conformance.golden.format import Provenance, case_path, read_golden, write_golden
from conformance.golden.layouts import (
    LayoutGolden,
    is_layout_path,
    layout_json,
    layout_path,
    layout_root,
    load_layout_json,
    read_layout,
    read_layout_golden,
    write_layout,
)
from conformance.golden.reproducer import (
    REPRODUCER_FORMAT,
    REPRODUCER_SCHEMA_VERSION,
    Promotion,
    Reproducer,
    ReproducerInfo,
    add_to_regression,
    copy_golden,
    default_regression_dir,
    promote,
    read_reproducer,
    reproducer_root,
)
from conformance.reference.compute import Golden
from conformance.spec.case import Case
from conformance.spec.inputs import CaseInputs
from conformance.spec.layouts import LayoutCase

KEY = "reproducer"
_TEXT_FIELDS = ("property", "profile", "backend", "backend_spec", "backend_device", "status", "message", "variant")


@dataclass(frozen=True)
class Member:
    """One dense golden a layout case is composed of: the case, its inputs and its exact reference."""

    case: Case
    inputs: CaseInputs
    golden: Golden


@dataclass(frozen=True)
class LayoutReproducer:
    """A layout reproducer, read back: the layout with its sequences (as ``run`` reads a layout file),
    the spec provenance of the layout file and the failure."""

    layout: LayoutGolden
    provenance: Provenance
    info: ReproducerInfo

    @property
    def case(self) -> LayoutCase:
        return self.layout.case


def info_json(info: ReproducerInfo) -> dict[str, Any]:
    """The ``reproducer`` object: the ``/reproducer`` attributes of a dense reproducer, as JSON."""
    out: dict[str, Any] = {"format": REPRODUCER_FORMAT, "schema_version": REPRODUCER_SCHEMA_VERSION, **asdict(info)}
    out["hypothesis_seed"] = -1 if info.hypothesis_seed is None else info.hypothesis_seed
    return out


def write_layout_reproducer(directory: Path, case: LayoutCase, provenance: Provenance, members: Sequence[Member],
                            info: ReproducerInfo) -> Path:
    """Write the member goldens of ``case`` into ``<directory>/<backend>/`` and then its layout file with
    ``info`` (each atomically; the layout file last, so that it never names a missing member). Returns
    the layout file's path."""
    root = reproducer_root(directory, info.backend)
    for m in members:
        write_golden(case_path(root, m.case.id), m.case, m.inputs, m.golden, provenance)
    path = layout_path(root, case.id)
    data = {**layout_json(case, provenance), KEY: info_json(info)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def _info(path: Path, data: Any) -> ReproducerInfo:
    """The ``reproducer`` object of a layout file's JSON, field by field (GoldenError naming the field)."""
    rep = data.get(KEY) if isinstance(data, dict) else None
    if rep is None:
        raise GoldenError(path, f"not a reproducer: it has no '{KEY}' object (a plain layout file?)")
    if not isinstance(rep, dict) or rep.get("format") != REPRODUCER_FORMAT:
        raise GoldenError(path, f"field '{KEY}' is not an rlk-conform reproducer")
    if rep.get("schema_version") != REPRODUCER_SCHEMA_VERSION:
        raise GoldenError(path, f"reproducer schema_version {rep.get('schema_version')!r} is not supported "
                          f"(this rlk-conform reads {REPRODUCER_SCHEMA_VERSION})")
    for key, kind in [*((k, str) for k in _TEXT_FIELDS), ("parameters", dict), ("execution_target", dict),
                      ("hypothesis_seed", int)]:
        value = rep.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise GoldenError(path, f"field '{KEY}.{key}' must be {'an object' if kind is dict else kind.__name__}, "
                              f"found {value!r}")
    seed = rep["hypothesis_seed"]
    return ReproducerInfo(**{k: rep[k] for k in (*_TEXT_FIELDS, "parameters", "execution_target")},
                          hypothesis_seed=None if seed < 0 else seed)


def read_layout_reproducer(path: str | Path) -> LayoutReproducer:
    """Read a layout reproducer: the layout and every member golden as ``run`` reads them (each refused
    like any golden: missing, truncated, damaged), then its ``reproducer`` object. Raises
    :class:`GoldenError` naming the file when it is not a readable layout reproducer."""
    path = Path(path)
    info = _info(path, load_layout_json(path))
    layout = read_layout_golden(path)
    _, provenance = read_layout(path)
    return LayoutReproducer(layout, provenance, info)


def read_any_reproducer(path: str | Path) -> Reproducer | LayoutReproducer:
    """A dense reproducer (``.h5``) or a layout one (``.json``)."""
    return read_layout_reproducer(path) if is_layout_path(Path(path)) else read_reproducer(path)


def promote_layout(path: str | Path, regression_dir: Path | None = None) -> Promotion:
    """Copy a layout reproducer (or any layout file with its goldens beside it) into ``regression_dir``:
    every member golden as ``generate`` writes it, then the layout file without ``reproducer``; list them
    in the directory's manifest, which ``rlk-conform run`` then reads like any golden set. Everything is
    read (and refused with a GoldenError) before anything is written."""
    path = Path(path)
    regression_dir = default_regression_dir(regression_dir)
    read_layout_golden(path)  # the layout and every member it names, checked against each other
    case, provenance = read_layout(path)
    root = layout_root(path, case.id)
    members = [read_golden(case_path(root, cid)) for cid in case.members]
    written: list[tuple[str, Path]] = []
    specs: dict[str, dict[str, Any]] = {}
    for gc in members:
        dest, spec_file, spec_entry = copy_golden(gc, regression_dir)
        written.append((gc.case.id, dest))
        specs[spec_file] = spec_entry
    dest = layout_path(regression_dir, case.id)
    write_layout(dest, case, provenance)
    written.append((case.id, dest))
    return add_to_regression(regression_dir, written, specs)


def promote_any(path: str | Path, regression_dir: Path | None = None) -> Promotion:
    """``rlk-conform promote``: a layout reproducer or layout file (``.json``), else a golden file."""
    return promote_layout(path, regression_dir) if is_layout_path(Path(path)) else promote(path, regression_dir)
