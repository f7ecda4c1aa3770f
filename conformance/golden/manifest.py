"""The manifest of a golden directory (``manifest.json``: every file with its SHA-256) and the
selection of golden files a run reads from it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from conformance.environment import environment_provenance
from conformance.errors import GoldenError
from conformance.files import atomic_path
from conformance.golden.format import SCHEMA_VERSION
from conformance.spec.case import LAYOUT_OPS, OPS

MANIFEST_FORMAT = "rlk-conform-manifest"
MANIFEST_NAME = "manifest.json"


def dataset_sha256(files: list[dict[str, Any]]) -> str:
    """One checksum of a golden set: SHA-256 of the lines '<sha256>  <path>', sorted by case id."""
    listing = "".join(f"{e['sha256']}  {e['path']}\n" for e in sorted(files, key=lambda e: e["case_id"]))
    return hashlib.sha256(listing.encode()).hexdigest()


def build_manifest(tier: str, specs: dict[str, dict[str, Any]], files: list[dict[str, Any]]) -> dict[str, Any]:
    files = sorted(files, key=lambda e: e["case_id"])
    return {
        "format": MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "tier": tier,
        "dataset_sha256": dataset_sha256(files),
        "specs": specs,
        "provenance": environment_provenance(),
        "files": files,
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    path = root / MANIFEST_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


MAX_MANIFEST_BYTES = 256 * 1024**2


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of ``root``, checked: a regular JSON file of at most ``MAX_MANIFEST_BYTES`` whose
    ``files`` are objects with string case_id, path and sha256 (and an integer ``bytes`` if present),
    none of whose paths leaves ``root``. Raises :class:`GoldenError` naming the manifest."""
    path = root / MANIFEST_NAME
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise GoldenError(path, "the manifest is not a regular file")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise GoldenError(path, f"the manifest is larger than {MAX_MANIFEST_BYTES // 2**20} MiB")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise GoldenError(path, "no manifest here; generate goldens first (rlk-conform generate)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenError(path, f"unreadable manifest ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise GoldenError(path, "unreadable manifest (nested too deeply)") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise GoldenError(path, "not an rlk-conform manifest")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise GoldenError(path, f"manifest schema_version {data.get('schema_version')!r} is not supported")
    files = data.get("files")
    if not isinstance(files, list) or not all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
        and isinstance(e.get("case_id"), str) for e in files
    ):
        raise GoldenError(path, "manifest 'files' must list objects with case_id, path and sha256")
    if any("bytes" in e and (not isinstance(e["bytes"], int) or isinstance(e["bytes"], bool)) for e in files):
        raise GoldenError(path, "manifest 'bytes' of a file must be an integer")
    for e in files:
        p = Path(e["path"])
        if p.is_absolute() or ".." in p.parts:
            raise GoldenError(path, f"manifest path {e['path']!r} leaves the golden directory")
    return data

def select_cases(root: Path, pattern: str | None = None, shard: tuple[int, int] | None = None) -> list[Path]:
    """Golden files listed in ``root``'s manifest, filtered by a glob on case ids and a shard ``(i, n)``:
    case number k (in case-id order) belongs to shard ``k % n``."""
    manifest = read_manifest(root)
    entries = sorted(manifest["files"], key=lambda e: e["case_id"])
    if pattern:
        entries = [e for e in entries if fnmatch.fnmatchcase(e["case_id"], pattern)]
    if shard is not None:
        i, n = shard
        entries = [e for k, e in enumerate(entries) if k % n == i]
    return [root / e["path"] for e in entries]


def case_id_of(path: Path) -> str:
    """The case id a golden or layout path stands for (``<op>/<family>/<variant>``), before the file is read."""
    parts = (path.with_suffix("") if path.suffix in (".h5", ".json") else path).parts
    starts = [i for i, part in enumerate(parts) if part in OPS or part in LAYOUT_OPS]
    return "/".join(parts[starts[-1]:]) if starts else path.with_suffix("").as_posix()


def manifest_checksums(root: Path) -> dict[Path, str]:
    """SHA-256 of every file ``root``'s manifest lists, keyed like :func:`select_cases` paths."""
    return {root / e["path"]: e["sha256"] for e in read_manifest(root)["files"]}
