"""The manifest of a golden directory (``manifest.json``: every file with its SHA-256), the shard
manifests of a sharded generation (``manifest.shard-<i>-of-<n>.json``, merged into ``manifest.json``
by :mod:`conformance.golden.shards`) and the selection of golden files a run reads from a manifest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from conformance.environment import environment_provenance
from conformance.errors import GoldenError
from conformance.files import atomic_path
from conformance.golden.format import SCHEMA_VERSION
from conformance.spec.case import LAYOUT_OPS, OPS

MANIFEST_FORMAT = "rlk-conform-manifest"
MANIFEST_NAME = "manifest.json"
SHARD_MANIFEST_FORMAT = "rlk-conform-shard-manifest"
SHARD_MANIFEST_RE = re.compile(r"manifest\.shard-(\d+)-of-(\d+)\.json")
T = TypeVar("T")


def dataset_sha256(files: list[dict[str, Any]]) -> str:
    """One checksum of a golden set: SHA-256 of the lines '<sha256>  <path>', sorted by case id."""
    listing = "".join(f"{e['sha256']}  {e['path']}\n" for e in sorted(files, key=lambda e: e["case_id"]))
    return hashlib.sha256(listing.encode()).hexdigest()


def build_manifest(tier: str, specs: dict[str, dict[str, Any]], files: list[dict[str, Any]],
                   provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a golden set; ``provenance`` defaults to this environment's (a merge of shards
    passes the one its shards share)."""
    files = sorted(files, key=lambda e: e["case_id"])
    return {
        "format": MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "tier": tier,
        "dataset_sha256": dataset_sha256(files),
        "specs": specs,
        "provenance": environment_provenance() if provenance is None else provenance,
        "files": files,
    }


def write_manifest(root: Path, manifest: dict[str, Any], name: str = MANIFEST_NAME) -> Path:
    path = root / name
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def take_shard(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """The items of shard ``(i, n)``: item number k belongs to shard ``k % n`` (all of them for None).
    Callers pass items in case-id order, so that a run and a generation shard alike."""
    if shard is None:
        return list(items)
    i, n = shard
    return [item for k, item in enumerate(items) if k % n == i]


def shard_manifest_name(shard: tuple[int, int]) -> str:
    return f"manifest.shard-{shard[0]}-of-{shard[1]}.json"


def is_shard_manifest_name(name: str) -> bool:
    return SHARD_MANIFEST_RE.fullmatch(name) is not None


def case_ids_sha256(case_ids: Sequence[str]) -> str:
    """SHA-256 of the sorted case ids, one a line: which case set a shard is part of."""
    return hashlib.sha256("".join(f"{c}\n" for c in sorted(case_ids)).encode()).hexdigest()


def build_shard_manifest(tier: str, shard: tuple[int, int], specs: dict[str, dict[str, Any]],
                         files: list[dict[str, Any]], layouts: list[dict[str, Any]],
                         case_ids: Sequence[str]) -> dict[str, Any]:
    """The manifest of shard ``(i, n)`` of a generation (docs/golden-format.md#sharded-generation):
    its goldens (``files``), every layout file of the tier (each shard writes them all), and the
    identity of the whole generation — tier, specs, provenance and the case set (``cases``: how many
    goldens the tier has and :func:`case_ids_sha256` of their ids) — that the merge checks."""
    return {
        "format": SHARD_MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "tier": tier,
        "shard": {"index": shard[0], "count": shard[1]},
        "cases": {"count": len(case_ids), "ids_sha256": case_ids_sha256(case_ids)},
        "specs": specs,
        "provenance": environment_provenance(),
        "files": sorted(files, key=lambda e: e["case_id"]),
        "layouts": sorted(layouts, key=lambda e: e["case_id"]),
    }


MAX_MANIFEST_BYTES = 256 * 1024**2


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of ``root``, checked: a regular JSON file of at most ``MAX_MANIFEST_BYTES`` whose
    ``files`` are objects with string case_id, path and sha256 (and an integer ``bytes`` if present),
    none of whose paths leaves ``root``. Raises :class:`GoldenError` naming the manifest."""
    path = root / MANIFEST_NAME
    data = _load_json(path, "no manifest here; generate goldens first (rlk-conform generate)")
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise GoldenError(path, "not an rlk-conform manifest")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise GoldenError(path, f"manifest schema_version {data.get('schema_version')!r} is not supported")
    _check_entries(path, data.get("files"), "files")
    return data


def read_shard_manifest(path: Path) -> dict[str, Any]:
    """A shard manifest (:func:`build_shard_manifest`), checked like :func:`read_manifest`, and its
    ``shard`` two integers ``0 <= index < count``. Raises :class:`GoldenError` naming the file."""
    data = _load_json(path, "no such shard manifest")
    if not isinstance(data, dict) or data.get("format") != SHARD_MANIFEST_FORMAT:
        raise GoldenError(path, "not an rlk-conform shard manifest")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise GoldenError(path, f"manifest schema_version {data.get('schema_version')!r} is not supported")
    shard, cases = data.get("shard"), data.get("cases")
    if not (isinstance(shard, dict) and all(type(shard.get(k)) is int for k in ("index", "count"))
            and 0 <= shard["index"] < shard["count"]):
        raise GoldenError(path, "shard manifest 'shard' must be {index, count} with 0 <= index < count")
    if not (isinstance(cases, dict) and type(cases.get("count")) is int and isinstance(cases.get("ids_sha256"), str)):
        raise GoldenError(path, "shard manifest 'cases' must be {count, ids_sha256}")
    if not (isinstance(data.get("tier"), str) and isinstance(data.get("specs"), dict)
            and isinstance(data.get("provenance"), dict)):
        raise GoldenError(path, "shard manifest needs 'tier', 'specs' and 'provenance'")
    _check_entries(path, data.get("files"), "files")
    _check_entries(path, data.get("layouts"), "layouts")
    return data


def _load_json(path: Path, missing: str) -> Any:
    """The JSON of a manifest file of at most ``MAX_MANIFEST_BYTES``; GoldenError(``missing``) if absent."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise GoldenError(path, "the manifest is not a regular file")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise GoldenError(path, f"the manifest is larger than {MAX_MANIFEST_BYTES // 2**20} MiB")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise GoldenError(path, missing) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenError(path, f"unreadable manifest ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise GoldenError(path, "unreadable manifest (nested too deeply)") from None
    return data


def _check_entries(path: Path, files: Any, key: str) -> None:
    """``files`` (the manifest's ``key``) lists objects with string case_id, path and sha256 (and an
    integer ``bytes`` if present), none of whose paths leaves the golden directory."""
    if not isinstance(files, list) or not all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
        and isinstance(e.get("case_id"), str) for e in files
    ):
        raise GoldenError(path, f"manifest '{key}' must list objects with case_id, path and sha256")
    if any("bytes" in e and (not isinstance(e["bytes"], int) or isinstance(e["bytes"], bool)) for e in files):
        raise GoldenError(path, "manifest 'bytes' of a file must be an integer")
    for e in files:
        p = Path(e["path"])
        if p.is_absolute() or ".." in p.parts:
            raise GoldenError(path, f"manifest path {e['path']!r} leaves the golden directory")

def select_cases(root: Path, pattern: str | None = None, shard: tuple[int, int] | None = None) -> list[Path]:
    """Golden files listed in ``root``'s manifest, filtered by a glob on case ids and a shard ``(i, n)``:
    case number k (in case-id order) belongs to shard ``k % n``."""
    manifest = read_manifest(root)
    entries = sorted(manifest["files"], key=lambda e: e["case_id"])
    if pattern:
        entries = [e for e in entries if fnmatch.fnmatchcase(e["case_id"], pattern)]
    return [root / e["path"] for e in take_shard(entries, shard)]


def case_id_of(path: Path) -> str:
    """The case id a golden or layout path stands for (``<op>/<family>/<variant>``), before the file is read."""
    parts = (path.with_suffix("") if path.suffix in (".h5", ".json") else path).parts
    starts = [i for i, part in enumerate(parts) if part in OPS or part in LAYOUT_OPS]
    return "/".join(parts[starts[-1]:]) if starts else path.with_suffix("").as_posix()


def manifest_checksums(root: Path) -> dict[Path, str]:
    """SHA-256 of every file ``root``'s manifest lists, keyed like :func:`select_cases` paths."""
    return {root / e["path"]: e["sha256"] for e in read_manifest(root)["files"]}
