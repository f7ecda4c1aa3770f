"""The merge of a sharded generation (``rlk-conform merge-goldens DIR``).

``rlk-conform generate --shard i/n`` writes the goldens of shard i and ``manifest.shard-<i>-of-<n>.json``
(:func:`conformance.golden.manifest.build_shard_manifest`); the shards may run on different hosts,
into different directories, and be copied into one. The merge checks that directory before it
writes anything: every shard 0..n-1 exactly once, all of one generation (tier, specs, provenance,
case set and layout files equal), together exactly the tier's cases, each in the shard the k % n
rule gives it, and every listed file present with its SHA-256. Then it writes ``manifest.json``,
the one an unsharded generation in the same environment writes, byte for byte. Any problem is one
:class:`ShardMergeError` naming the file, and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.errors import ConformanceError
from conformance.files import sha256_file
from conformance.golden.generate import directory_lock, os_reason
from conformance.golden.manifest import (
    MANIFEST_NAME,
    SHARD_MANIFEST_RE,
    build_manifest,
    case_ids_sha256,
    read_shard_manifest,
    shard_manifest_name,
    take_shard,
    write_manifest,
)

# What every shard of one generation must share with the first, and its name in messages.
SHARED_KEYS = {"tier": "tier differs", "specs": "specs differ", "provenance": "provenance differs",
               "cases": "case set differs", "layouts": "layout files differ"}


class ShardMergeError(ConformanceError):
    """The shards in a directory do not make one whole generation (exit 2; nothing written)."""


@dataclass
class ShardMerge:
    manifest: Path
    tier: str
    shards: int
    files: int  # goldens and layout files the manifest lists
    dataset_sha256: str


def shard_manifests(root: Path) -> list[Path]:
    """The shard manifests in ``root`` (not below it), ordered by shard count, index, then name."""
    found = [(SHARD_MANIFEST_RE.fullmatch(p.name), p) for p in root.iterdir() if p.is_file()]
    return [p for m, p in sorted(((m, p) for m, p in found if m),
                                 key=lambda mp: (int(mp[0][2]), int(mp[0][1]), mp[1].name))]


def _same_generation(data: dict[str, Any], first: dict[str, Any], path: Path, first_path: Path) -> None:
    for key, label in SHARED_KEYS.items():
        if data[key] == first[key]:
            continue
        if key == "tier":
            raise ShardMergeError(f"{path}: tier {data[key]!r} differs from {first[key]!r} in {first_path} "
                                  "(not a shard of the same generation)")
        if key == "provenance":  # name the differing field: a generator version, a library version
            mine, theirs = data[key] or {}, first[key] or {}
            field = next(k for k in sorted({*mine, *theirs}) if mine.get(k) != theirs.get(k))
            raise ShardMergeError(f"{path}: provenance.{field} {mine.get(field)!r} differs from "
                                  f"{theirs.get(field)!r} in {first_path} (not a shard of the same generation)")
        raise ShardMergeError(f"{path}: {label} from {first_path} (not a shard of the same generation)")


def _check_file(root: Path, entry: dict[str, Any], listed_in: Path) -> None:
    path = root / entry["path"]
    if not path.is_file():
        raise ShardMergeError(f"{path}: listed in {listed_in} but missing; copy it from that shard's directory")
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise ShardMergeError(f"{path}: unreadable ({os_reason(exc)})") from None
    if digest != entry["sha256"]:
        raise ShardMergeError(f"{path}: SHA-256 does not match {listed_in} (changed after its shard was written); "
                              f"regenerate that shard")


def check_shards(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """The first shard manifest, every file entry of the whole generation, and the shard count, once
    every check of the module docstring passes; ShardMergeError (or GoldenError) otherwise."""
    paths = shard_manifests(root)
    if not paths:
        raise ShardMergeError(f"{root}: no shard manifest (manifest.shard-<i>-of-<n>.json) here; generate the "
                              "shards with rlk-conform generate --shard i/n and copy them into one directory")
    manifests = [read_shard_manifest(p) for p in paths]
    first, first_path = manifests[0], paths[0]
    count = first["shard"]["count"]
    by_index: dict[int, Path] = {}
    for data, path in zip(manifests, paths):
        i, n = data["shard"]["index"], data["shard"]["count"]
        if n != count:
            raise ShardMergeError(f"{path}: shard {i}/{n} is of a generation split {n} ways; {first_path} of one "
                                  f"split {count} ways")
        if i in by_index:
            raise ShardMergeError(f"{path}: shard {i}/{n} is given twice ({by_index[i]} and {path})")
        by_index[i] = path
        _same_generation(data, first, path, first_path)
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        have = ", ".join(f"{i}/{count}" for i in sorted(by_index))
        raise ShardMergeError(f"{root}: missing shard(s) {', '.join(f'{i}/{count}' for i in missing)} "
                              f"({', '.join(shard_manifest_name((i, count)) for i in missing)}; have {have}); "
                              "copy every shard's directory here")
    owner: dict[str, tuple[int, Path]] = {}
    for data, path in zip(manifests, paths):
        for entry in data["files"]:
            if entry["case_id"] in owner:
                raise ShardMergeError(f"{path}: case {entry['case_id']} is also in {owner[entry['case_id']][1]}")
            owner[entry["case_id"]] = (data["shard"]["index"], path)
    ids = sorted(owner)
    if len(ids) != first["cases"]["count"] or case_ids_sha256(ids) != first["cases"]["ids_sha256"]:
        raise ShardMergeError(f"{root}: the shards hold {len(ids)} cases, not the {first['cases']['count']} cases "
                              "of the generation they name")
    for i in range(count):
        for case_id in take_shard(ids, (i, count)):
            if owner[case_id][0] != i:
                raise ShardMergeError(f"{owner[case_id][1]}: case {case_id} belongs to shard {i}/{count}")
    files: list[dict[str, Any]] = []
    for data, path in zip(manifests, paths):
        for entry in data["files"]:
            _check_file(root, entry, path)
        files += data["files"]
    for entry in first["layouts"]:
        _check_file(root, entry, first_path)
    return first, files + first["layouts"], count


def merge_shards(root: Path) -> ShardMerge:
    """Check the shards of a generation in ``root`` and write its ``manifest.json`` (module
    docstring). Holds the directory lock, so no ``generate`` writes there meanwhile."""
    if not root.is_dir():
        raise ShardMergeError(f"{root}: no such directory")
    with directory_lock(root):
        first, files, count = check_shards(root)
        manifest = build_manifest(first["tier"], first["specs"], files, provenance=first["provenance"])
        try:
            path = write_manifest(root, manifest)
        except OSError as exc:
            raise ConformanceError(f"{root / MANIFEST_NAME}: writing the manifest failed ({os_reason(exc)}); the "
                                   "previous manifest is unchanged") from None
    return ShardMerge(path, first["tier"], count, len(files), manifest["dataset_sha256"])
