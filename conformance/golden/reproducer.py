"""Reproducer files and the regression golden set.

A reproducer is a golden file (docs/golden-format.md: the case's inputs and its exact reference
output, written by :func:`conformance.golden.write_golden`, so ``read_golden`` accepts it) plus a
group ``/reproducer`` saying which property failed on which backend and how:

- attributes ``format`` (``rlk-conform-reproducer``), ``schema_version``, ``property``,
  ``parameters`` (JSON: the property's own draws, e.g. split points or a chunking),
  ``hypothesis_seed`` (``-1`` when the search was not seeded), ``profile``, ``backend`` (its name),
  ``backend_spec`` (what ``--backend`` was given: a registered name or ``package.module:attr``; replay
  loads it by default), ``backend_device``, ``execution_target`` (JSON), ``status``, ``message``,
  ``variant`` (the call that differed);
- dataset ``backend_out``: the backend's output for the case's own call, ``[B, Hq, Sq, D]`` (absent
  only when the backend raised on that call; the message says so);
- dataset ``variant_out`` (when the property compared one): the output of the call that differed.

Both datasets store the backend's output dtype like the golden inputs (bfloat16 as its raw
``uint16`` bits) with an ``element_type`` attribute.

``promote`` copies the golden part of a reproducer (or of any golden file) into a regression
golden directory and rewrites that directory's manifest; ``rlk-conform run`` includes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from conformance import locations
from conformance.errors import GoldenError
from conformance.files import atomic_path, sha256_file
from conformance.golden.format import (
    GoldenCase,
    Provenance,
    ascii_attr,
    case_path,
    read_golden,
    storage_to_tensor,
    tensor_to_storage,
    write_golden,
)
from conformance.golden.manifest import MANIFEST_NAME, build_manifest, read_manifest, write_manifest
from conformance.reference.compute import Golden
from conformance.reference.gradient import GradientGolden
from conformance.spec.case import Case
from conformance.spec.inputs import CaseInputs

REPRODUCER_FORMAT = "rlk-conform-reproducer"
REPRODUCER_SCHEMA_VERSION = 1
GROUP = "reproducer"
REGRESSION_TIER = "regression"
DEFAULT_REPRODUCER_DIR = Path("reproducers")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}


@dataclass(frozen=True)
class ReproducerInfo:
    """What failed, where and how: the attributes of ``/reproducer``."""

    property: str
    parameters: dict[str, Any]
    hypothesis_seed: int | None
    profile: str
    backend: str
    backend_spec: str
    backend_device: str
    execution_target: dict[str, Any]
    status: str
    message: str
    variant: str = ""


@dataclass(frozen=True)
class Reproducer:
    """A reproducer file, read back: the golden part, the info and the recorded outputs."""

    golden: GoldenCase
    info: ReproducerInfo
    backend_out: torch.Tensor | None
    variant_out: torch.Tensor | None

    @property
    def case(self) -> Case:
        return self.golden.case


def reproducer_root(directory: Path, backend: str) -> Path:
    """``<directory>/<backend>``, where a backend's reproducers go; characters a file name cannot hold
    become '_'."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in backend) or "backend"
    return directory / safe


def reproducer_path(directory: Path, backend: str, case_id: str) -> Path:
    """``<directory>/<backend>/<case id>.h5``."""
    return case_path(reproducer_root(directory, backend), case_id)


def write_reproducer(path: Path, case: Case, inputs: CaseInputs, golden: Golden, provenance: Provenance,
                     info: ReproducerInfo, backend_out: torch.Tensor | None, variant_out: torch.Tensor | None,
                     gradient: GradientGolden | None = None) -> Path:
    """Write the golden file of ``case`` (with its gradients when it has them) with the ``/reproducer``
    group, atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        write_golden(tmp, case, inputs, golden, provenance, gradient)
        with h5py.File(tmp, "a") as f:
            g = f.create_group(GROUP, track_order=False)
            a = g.attrs
            a["format"] = ascii_attr(REPRODUCER_FORMAT)
            a["schema_version"] = np.int64(REPRODUCER_SCHEMA_VERSION)
            for key in ("property", "profile", "backend", "backend_spec", "backend_device", "status", "message",
                        "variant"):
                a[key] = ascii_attr(getattr(info, key))
            a["parameters"] = ascii_attr(json.dumps(info.parameters, sort_keys=True))
            a["execution_target"] = ascii_attr(json.dumps(info.execution_target, sort_keys=True, default=str))
            a["hypothesis_seed"] = np.int64(-1 if info.hypothesis_seed is None else info.hypothesis_seed)
            for name, tensor in (("backend_out", backend_out), ("variant_out", variant_out)):
                if tensor is None:
                    continue
                ds = g.create_dataset(name, data=tensor_to_storage(tensor.detach().cpu()), track_times=False)
                ds.attrs["element_type"] = ascii_attr(_DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)))
    return path


def _text(path: Path, attrs: h5py.AttributeManager, key: str) -> str:
    if key not in attrs:
        raise GoldenError(path, f"missing attribute '{key}'", GROUP)
    val = attrs[key]
    return val.decode() if isinstance(val, bytes | np.bytes_) else str(val)


def _output(path: Path, group: h5py.Group, name: str) -> torch.Tensor | None:
    if name not in group:
        return None
    ds = group[name]
    element_type = _text(path, ds.attrs, "element_type")
    return storage_to_tensor(ds[()], element_type)


def read_reproducer(path: str | Path) -> Reproducer:
    """Read a reproducer: ``read_golden`` validates the golden part, then ``/reproducer`` is read.

    Raises :class:`GoldenError` naming the file when it is not a readable reproducer.
    """
    path = Path(path)
    gc = read_golden(path)
    with h5py.File(path, "r") as f:
        if GROUP not in f or not isinstance(f[GROUP], h5py.Group):
            raise GoldenError(path, "not a reproducer: it has no /reproducer group (a plain golden file?)")
        g = f[GROUP]
        if _text(path, g.attrs, "format") != REPRODUCER_FORMAT:
            raise GoldenError(path, "the /reproducer group is not an rlk-conform reproducer", GROUP)
        version = int(g.attrs.get("schema_version", -1))
        if version != REPRODUCER_SCHEMA_VERSION:
            raise GoldenError(path, f"reproducer schema_version {version} is not supported "
                              f"(this rlk-conform reads {REPRODUCER_SCHEMA_VERSION})", GROUP)
        try:
            parameters = json.loads(_text(path, g.attrs, "parameters"))
            target = json.loads(_text(path, g.attrs, "execution_target"))
        except json.JSONDecodeError as exc:
            raise GoldenError(path, f"unreadable JSON attribute ({exc})", GROUP) from None
        seed = int(g.attrs.get("hypothesis_seed", -1))
        info = ReproducerInfo(property=_text(path, g.attrs, "property"), parameters=parameters,
                              hypothesis_seed=None if seed < 0 else seed, profile=_text(path, g.attrs, "profile"),
                              backend=_text(path, g.attrs, "backend"),
                              backend_spec=_text(path, g.attrs, "backend_spec"),
                              backend_device=_text(path, g.attrs, "backend_device"), execution_target=target,
                              status=_text(path, g.attrs, "status"), message=_text(path, g.attrs, "message"),
                              variant=_text(path, g.attrs, "variant"))
        backend_out = _output(path, g, "backend_out")
        variant_out = _output(path, g, "variant_out")
    return Reproducer(golden=gc, info=info, backend_out=backend_out, variant_out=variant_out)


@dataclass(frozen=True)
class Promotion:
    """Where ``promote`` put a case and the state of the regression set afterwards."""

    case_id: str
    path: Path
    manifest: Path
    cases: int
    dataset_sha256: str
    replaced: bool  # the set already held this case id
    members: tuple[Path, ...] = ()  # a layout case: the member goldens written with it


def promote(path: str | Path, regression_dir: Path | None = None) -> Promotion:
    """Copy the golden part of ``path`` (a reproducer or any golden file; ``/reproducer`` is left
    out) into ``regression_dir`` as ``<case id>.h5`` and rewrite the directory's manifest.

    The copy is what ``rlk-conform generate`` would write for the case (``verify --regenerate``
    recomputes it bit for bit). A case id already in the set is replaced. Raises
    :class:`GoldenError` for an unreadable file or manifest.
    """
    regression_dir = default_regression_dir(regression_dir)
    gc = read_golden(path)
    dest, spec_file, spec_entry = copy_golden(gc, regression_dir)
    return add_to_regression(regression_dir, [(gc.case.id, dest)], {spec_file: spec_entry})


def default_regression_dir(regression_dir: Path | None) -> Path:
    return regression_dir if regression_dir is not None else locations.output_root() / REGRESSION_TIER


def copy_golden(gc: GoldenCase, regression_dir: Path) -> tuple[Path, str, dict[str, Any]]:
    """Write the golden part of ``gc`` into ``regression_dir`` as ``generate`` would; returns its path
    and the manifest's ``specs`` entry of its spec (file name, entry)."""
    a = gc.attrs
    provenance = Provenance(spec_file=a["spec_file"], spec_sha256=a["spec_sha256"], spec_seed=a["spec_seed"])
    dest = case_path(regression_dir, gc.case.id)
    write_golden(dest, gc.case, gc.inputs, gc.golden, provenance, gc.gradient)
    return dest, provenance.spec_file, {"op": gc.case.op, "sha256": provenance.spec_sha256,
                                        "seed": provenance.spec_seed}


def add_to_regression(regression_dir: Path, written: list[tuple[str, Path]],
                      spec_entries: dict[str, dict[str, Any]]) -> Promotion:
    """List the files ``written`` into ``regression_dir`` (``(case id, path)``, the promoted case's own
    file last, after the member goldens of a layout case) in its manifest, replacing entries of the
    same case ids, and rewrite the manifest."""
    case_id = written[-1][0]
    files: list[dict[str, Any]] = []
    specs: dict[str, dict[str, Any]] = {}
    if (regression_dir / MANIFEST_NAME).exists():
        manifest = read_manifest(regression_dir)
        files = list(manifest["files"])
        specs = dict(manifest.get("specs") or {})
    replaced = any(e["case_id"] == case_id for e in files)
    ids = {cid for cid, _ in written}
    files = [e for e in files if e["case_id"] not in ids]
    files += [{"case_id": cid, "path": dest.relative_to(regression_dir).as_posix(), "sha256": sha256_file(dest),
               "bytes": dest.stat().st_size} for cid, dest in written]
    for spec_file, spec_entry in spec_entries.items():
        key = spec_file
        if key in specs and specs[key] != spec_entry:
            key = f"{key}@{spec_entry['sha256'][:12]}"  # the spec changed since an earlier promotion
        specs[key] = spec_entry
    manifest = build_manifest(REGRESSION_TIER, specs, files)
    manifest_path = write_manifest(regression_dir, manifest)
    return Promotion(case_id=case_id, path=written[-1][1], manifest=manifest_path, cases=len(files),
                     dataset_sha256=manifest["dataset_sha256"], replaced=replaced,
                     members=tuple(dest for _, dest in written[:-1]))
