"""Verification of a golden directory: manifest checksums, schema, and optional regeneration."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from conformance.errors import ConformanceError, GoldenError
from conformance.files import sha256_file
from conformance.golden.format import DEFAULT_MAX_CASE_BYTES, GoldenCase, Provenance, read_golden
from conformance.golden.generate import compute_case, write_case
from conformance.golden.layouts import is_layout_path, layout_bytes, layout_root, read_layout
from conformance.golden.manifest import MANIFEST_NAME, dataset_sha256, read_manifest


@dataclass
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class VerifyResult:
    root: Path
    manifest: dict[str, Any]
    checked: int = 0
    regenerated: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def regenerate_and_compare(gc: GoldenCase, device: str = "cpu") -> str | None:
    """Recompute ``gc`` from its own attributes; None if the bytes are identical, else what differs."""
    case = gc.case
    computed = compute_case(case, device)
    prov = Provenance(spec_file=gc.attrs["spec_file"], spec_sha256=gc.attrs["spec_sha256"],
                      spec_seed=gc.attrs["spec_seed"])
    with tempfile.TemporaryDirectory(prefix="rlk-verify-") as tmp:
        fresh = Path(tmp) / "case.h5"
        write_case(fresh, case, computed, prov)
        if sha256_file(fresh) == sha256_file(gc.path):
            return None
        return _first_difference(gc.path, fresh)


def _first_difference(old: Path, new: Path) -> str:
    with h5py.File(old, "r") as a, h5py.File(new, "r") as b:
        names: list[str] = []
        b.visit(names.append)
        for name in names:
            if isinstance(b[name], h5py.Dataset):
                if name not in a:
                    return f"dataset {name} is missing"
                x, y = a[name][()], b[name][()]
                if x.shape != y.shape or x.tobytes() != y.tobytes():
                    n = int(np.sum(x != y)) if x.shape == y.shape else -1
                    return f"dataset {name} differs from a fresh computation ({n} elements)"
        for key in b.attrs:
            if key not in a.attrs or not np.array_equal(a.attrs[key], b.attrs[key]):
                return f"attribute {key} differs from a fresh computation"
    return "file bytes differ from a fresh computation (layout)"


def verify(root: Path, regenerate: bool = False, device: str = "cpu",
           on_start: Callable[[int], None] | None = None,
           on_done: Callable[[str, bool], None] | None = None,
           max_case_bytes: int = DEFAULT_MAX_CASE_BYTES) -> VerifyResult:
    """Check every file the manifest of ``root`` lists: size, SHA-256, schema, per-dataset checksums
    (and, with ``regenerate``, bit-identical recomputation). Problems are collected, one per file,
    never raised; only a missing directory or an unreadable manifest raises (ConformanceError)."""
    if not root.is_dir():
        raise ConformanceError(f"{root}: no such golden directory")
    manifest = read_manifest(root)
    result = VerifyResult(root=root, manifest=manifest)
    entries = manifest["files"]
    if not entries:
        result.problems.append(Problem(str(root / MANIFEST_NAME), "the manifest lists no files"))
    if manifest.get("dataset_sha256") != dataset_sha256(entries):
        result.problems.append(Problem(str(root / MANIFEST_NAME), "dataset_sha256 does not match the listed files"))
    listed = {(root / e["path"]).resolve() for e in entries}
    for extra in sorted(p for p in root.rglob("*.h5") if p.resolve() not in listed):
        result.problems.append(Problem(str(extra), "file is not listed in the manifest"))
    if on_start:
        on_start(len(entries))
    for entry in entries:
        path = root / entry["path"]
        ok = _verify_entry(result, path, entry, regenerate, device, max_case_bytes)
        result.checked += 1
        if on_done:
            on_done(entry["case_id"], ok)
    return result


def _verify_entry(result: VerifyResult, path: Path, entry: dict[str, Any], regenerate: bool, device: str,
                  max_case_bytes: int) -> bool:
    """Check one listed file; every problem is recorded as one line naming the file (and the dataset
    when one is to blame). Damaged files are read with every guard of :func:`read_golden`."""
    def problem(msg: str) -> bool:
        result.problems.append(Problem(str(path), msg))
        return False

    def golden_problem(exc: GoldenError, prefix: str = "") -> bool:
        return problem(prefix + (f"dataset {exc.dataset}: {exc.reason}" if exc.dataset else exc.reason))

    if not path.exists() and not path.is_symlink():
        return problem("listed in the manifest but missing")
    if not path.is_file():
        return problem("listed in the manifest but not a regular file")
    size = path.stat().st_size
    listed_size = entry.get("bytes")
    if isinstance(listed_size, int) and size != listed_size:
        note = "truncated" if size < listed_size else "grown"
        prefix = f"file is {size} bytes, the manifest says {listed_size} ({note}); "
        try:
            read_golden(path, max_bytes=max_case_bytes)
        except GoldenError as exc:
            return golden_problem(exc, prefix)
        return problem(prefix.rstrip("; "))
    if is_layout_path(path):
        return _verify_layout(path, entry, regenerate, problem)
    try:
        gc = read_golden(path, max_bytes=max_case_bytes, expected_sha256=entry["sha256"])
    except GoldenError as exc:
        if exc.reason.startswith("SHA-256 of the file does not match the manifest"):
            return problem("SHA-256 does not match the manifest (file changed or damaged; every dataset matches "
                           "its own checksum, so the damage is in the attributes or the structure)")
        return golden_problem(exc)
    if gc.case.id != entry["case_id"]:
        return problem(f"holds case {gc.case.id}, the manifest says {entry['case_id']}")
    if regenerate:
        diff = regenerate_and_compare(gc, device)
        result.regenerated += 1
        if diff:
            return problem(diff)
    return True


def _verify_layout(path: Path, entry: dict[str, Any], regenerate: bool, problem: Callable[[str], bool]) -> bool:
    """A layout file: its SHA-256, its fields, its id, that every golden it names is listed, and (with
    ``regenerate``) that writing its case again gives the same bytes."""
    if sha256_file(path) != entry["sha256"]:
        return problem("SHA-256 does not match the manifest (file changed or damaged)")
    try:
        case, prov = read_layout(path)
    except GoldenError as exc:
        return problem(exc.reason)
    if case.id != entry["case_id"]:
        return problem(f"holds case {case.id}, the manifest says {entry['case_id']}")
    root = layout_root(path, case.id)
    listed = {e["case_id"] for e in read_manifest(root)["files"]} if (root / MANIFEST_NAME).is_file() else set()
    missing = [m for m in case.members if m not in listed]
    if missing:
        return problem(f"names the golden {missing[0]}, which the manifest does not list")
    if regenerate and layout_bytes(case, prov) != path.read_bytes():
        return problem("file bytes differ from the layout written again from its own fields")
    return True
