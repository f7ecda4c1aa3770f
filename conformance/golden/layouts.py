"""Layout files: a packed or paged case on disk (``<root>/<layout id>.json``), next to the dense
goldens it is composed of (docs/golden-format.md#layout-files). A layout file holds no tensor: it
names, for every sequence, the dense golden and the batch entry it comes from, so its exact output
is theirs. ``write_layout`` is byte-reproducible; ``read_layout_golden`` reads a layout and the
sequences of its members, checking each member against the layout (one-line :class:`GoldenError`
naming the file and field otherwise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conformance.errors import GoldenError
from conformance.files import atomic_path, sha256_file
from conformance.golden.format import DEFAULT_MAX_CASE_BYTES, GoldenCase, Provenance, case_path, read_golden
from conformance.golden.manifest import MANIFEST_NAME, manifest_checksums
from conformance.reference.compute import Golden
from conformance.spec.case import DISTS, DTYPES, LAYOUT_OPS, TIERS
from conformance.spec.inputs import CaseInputs
from conformance.spec.layouts import LayoutCase, SequenceRef, parse_token

LAYOUT_FORMAT = "rlk-conform-layout"
LAYOUT_SCHEMA_VERSION = 1
LAYOUT_SUFFIX = ".json"
MAX_LAYOUT_BYTES = 16 * 1024**2


def layout_path(root: Path, case_id: str) -> Path:
    return root / f"{case_id}{LAYOUT_SUFFIX}"


def is_layout_path(path: Path) -> bool:
    return path.suffix == LAYOUT_SUFFIX


def layout_json(case: LayoutCase, prov: Provenance) -> dict[str, Any]:
    """The content of a layout file (docs/golden-format.md#layout-files). ``window`` ``[left, right]``
    only for a bounded window: the files of plain layout cases keep their bytes."""
    window = {} if case.window == (-1, -1) else {"window": list(case.window)}
    return {**window, "format": LAYOUT_FORMAT, "schema_version": LAYOUT_SCHEMA_VERSION, "case_id": case.id,
            "op": case.op, "family": case.family, "tier": case.tier, "preset": case.preset, "hq": case.hq,
            "hkv": case.hkv,
            "head_dim": case.d, "dtype": case.dtype, "causal": case.causal, "scale": case.scale, "dist": case.dist,
            "seed": case.seed, "pack": [t.text for t in case.tokens],
            "sequences": [{"case_id": s.case_id, "batch_index": s.batch_index, "sq": s.sq, "skv": s.skv}
                          for s in case.sequences],
            "page_size": case.page_size, "page_sizes": list(case.page_sizes),
            "spec_file": prov.spec_file, "spec_sha256": prov.spec_sha256, "spec_seed": prov.spec_seed}


def layout_bytes(case: LayoutCase, prov: Provenance) -> bytes:
    return (json.dumps(layout_json(case, prov), indent=1, sort_keys=True) + "\n").encode()


def write_layout(path: Path, case: LayoutCase, prov: Provenance) -> None:
    """Write one layout file atomically; the same case gives the same bytes."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(layout_bytes(case, prov))


def load_layout_json(path: Path) -> Any:
    """The JSON of a layout file of at most ``MAX_LAYOUT_BYTES`` (GoldenError when it cannot be read)."""
    try:
        raw = path.read_bytes()[: MAX_LAYOUT_BYTES + 1]
        if len(raw) > MAX_LAYOUT_BYTES:
            raise GoldenError(path, f"a layout file is at most {MAX_LAYOUT_BYTES // 2**20} MiB")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise GoldenError(path, "missing layout file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise GoldenError(path, f"unreadable layout file ({' '.join(str(exc).split())})") from None
    return data


def read_layout(path: Path) -> tuple[LayoutCase, Provenance]:
    """The layout case of ``path``, validated field by field (GoldenError naming the field). Fields
    it does not know (a layout reproducer's ``reproducer``) are left to their readers."""
    data = load_layout_json(path)
    if not isinstance(data, dict) or data.get("format") != LAYOUT_FORMAT:
        raise GoldenError(path, "not an rlk-conform layout file")

    def field(key: str, kind: type | tuple[type, ...], allowed: Any = None) -> Any:
        value = data.get(key)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)) or (
                allowed is not None and value not in allowed):
            want = f"one of {', '.join(map(str, allowed))}" if allowed is not None else (
                kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind))
            raise GoldenError(path, f"field '{key}' must be {want}, found {value!r}")
        return value

    if field("schema_version", int) != LAYOUT_SCHEMA_VERSION:
        raise GoldenError(path, f"layout schema_version {data['schema_version']} is not supported")
    op = field("op", str, LAYOUT_OPS)
    scale = data.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)
                              or not math.isfinite(scale)):
        raise GoldenError(path, f"field 'scale' must be null or a finite number, found {scale!r}")
    try:
        tokens = tuple(parse_token(t) for t in field("pack", list))
    except ValueError as exc:
        raise GoldenError(path, f"field 'pack': {exc}") from None
    entries = field("sequences", list)
    sequences = []
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("case_id"), str) and all(
                isinstance(e.get(k), int) and not isinstance(e.get(k), bool)
                and e[k] >= (0 if k == "batch_index" else 1) for k in ("batch_index", "sq", "skv"))):
            raise GoldenError(path, f"field 'sequences[{i}]' must hold case_id, batch_index, sq and skv")
        sequences.append(SequenceRef(e["case_id"], e["batch_index"], e["sq"], e["skv"]))
    if not sequences or len(sequences) != sum(t.count for t in tokens):
        raise GoldenError(path, f"field 'sequences' lists {len(sequences)} sequences, its pack "
                          f"{sum(t.count for t in tokens)}")
    page_size = data.get("page_size")
    if op == LAYOUT_OPS[1] and not (isinstance(page_size, int) and page_size >= 1):
        raise GoldenError(path, f"field 'page_size' must be a positive integer for {op}, found {page_size!r}")
    sizes = field("page_sizes", list)
    if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in sizes):
        raise GoldenError(path, f"field 'page_sizes' must list positive integers, found {sizes!r}")
    preset = data.get("preset")
    window = data.get("window", [-1, -1])
    if not (isinstance(window, list) and len(window) == 2 and all(
            isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise GoldenError(path, f"field 'window' must be [left, right], each -1 (unbounded) or >= 0, found {window!r}")
    case = LayoutCase(id=field("case_id", str), op=op, family=field("family", str), tier=field("tier", str, TIERS),
                      hq=field("hq", int), hkv=field("hkv", int), d=field("head_dim", int),
                      dtype=field("dtype", str, DTYPES), causal=field("causal", bool),
                      scale=None if scale is None else float(scale), dist=field("dist", str, DISTS),
                      seed=field("seed", int), tokens=tokens, sequences=tuple(sequences),
                      page_size=page_size if op == LAYOUT_OPS[1] else None, page_sizes=tuple(sizes),
                      preset=preset if isinstance(preset, str) else None, window=(window[0], window[1]))
    if case.hq < 1 or case.hkv < 1 or case.hq % case.hkv:
        raise GoldenError(path, f"fields 'hq' = {case.hq} and 'hkv' = {case.hkv}: hq must be a multiple of hkv")
    prov = Provenance(str(data.get("spec_file", "")), str(data.get("spec_sha256", "")), int(data.get("spec_seed", 0)))
    return case, prov


@dataclass(frozen=True)
class SequenceData:
    """One sequence of a layout case, read from its member golden: q ``[sq, Hq, D]``, k, v
    ``[skv, Hkv, D]`` in the case dtype, and the golden of its rows as a batch-1 :class:`Golden`."""

    ref: SequenceRef
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    golden: Golden


@dataclass
class LayoutGolden:
    """A layout file, read back with its sequences."""

    path: Path
    case: LayoutCase
    sequences: list[SequenceData]


def layout_root(path: Path, case_id: str) -> Path:
    """The golden directory of a layout file (its id has the op and family as folders)."""
    return Path(str(path)[: -len(f"{case_id}{LAYOUT_SUFFIX}")] or ".")


def read_layout_golden(path: Path, max_bytes: int = DEFAULT_MAX_CASE_BYTES, expected_sha256: str | None = None,
                       checksums: Mapping[Path, str] | None = None) -> LayoutGolden:
    """The layout of ``path`` (its SHA-256 ``expected_sha256`` when given) and every sequence it names,
    each member golden read once and refused like any golden: damaged, over ``max_bytes``, not
    matching its SHA-256 in ``checksums`` (by default the manifest of the layout's directory). A member
    that does not match the layout (heads, dtype, lengths, batch entry) is a GoldenError naming both files."""
    if expected_sha256 is not None and path.is_file() and sha256_file(path) != expected_sha256:
        raise GoldenError(path, "SHA-256 of the file does not match the manifest (changed or damaged)")
    case, _ = read_layout(path)
    if not path.as_posix().endswith(f"{case.id}{LAYOUT_SUFFIX}"):
        raise GoldenError(path, f"field 'case_id' = {case.id!r} does not match the file's path")
    root = layout_root(path, case.id)
    if checksums is None:
        checksums = manifest_checksums(root) if (root / MANIFEST_NAME).is_file() else {}
    members: dict[str, GoldenCase] = {}
    sequences = []
    for i, ref in enumerate(case.sequences):
        if ref.case_id not in members:
            member_path = case_path(root, ref.case_id)
            members[ref.case_id] = read_golden(member_path, max_bytes=max_bytes,
                                               expected_sha256=checksums.get(member_path))
        gc = members[ref.case_id]
        m = gc.case
        wanted = {"hq": case.hq, "hkv": case.hkv, "head_dim": case.d, "dtype": case.dtype, "causal": case.causal,
                  "scale": case.scale, "dist": case.dist, "sq": ref.sq, "skv": ref.skv, "mask": "none",
                  "window": case.window, "softcap": None, "sinks": None}
        found = {"hq": m.hq, "hkv": m.hkv, "head_dim": m.d, "dtype": m.dtype, "causal": m.causal, "scale": m.scale,
                 "dist": m.dist, "sq": m.sq, "skv": m.skv, "mask": m.mask, "window": m.window,
                 "softcap": m.softcap, "sinks": None if m.sinks is None else "sinks"}
        bad = [k for k in wanted if wanted[k] != found[k]]
        if bad or ref.batch_index >= m.batch:
            what = (f"{bad[0]} {found[bad[0]]!r}, the layout needs {wanted[bad[0]]!r}" if bad
                    else f"batch {m.batch}, the layout needs entry {ref.batch_index}")
            raise GoldenError(path, f"sequence {i} comes from {gc.path}, which has {what}", f"sequences[{i}]")
        sequences.append(sequence_data(ref, gc.inputs, gc.golden))
    return LayoutGolden(path, case, sequences)


def sequence_data(ref: SequenceRef, inputs: CaseInputs, golden: Golden) -> SequenceData:
    """Sequence ``ref`` of a layout case: batch entry ``ref.batch_index`` of a dense member's inputs
    ``[B, H, S, D]`` and golden, as ``[S, H, D]`` tensors and a batch-1 golden."""
    b, x, g = ref.batch_index, inputs, golden
    return SequenceData(ref, x.q[b].transpose(0, 1).contiguous(), x.k[b].transpose(0, 1).contiguous(),
                        x.v[b].transpose(0, 1).contiguous(),
                        Golden(out=np.ascontiguousarray(g.out[b:b + 1]), lse=np.ascontiguousarray(g.lse[b:b + 1]),
                               error_scale=np.ascontiguousarray(g.error_scale[b:b + 1]),
                               naive_error=np.ascontiguousarray(g.naive_error[b:b + 1]), flops=0))
