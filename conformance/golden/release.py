"""Vendor release bundles: build one from a golden tier, and verify one end to end.

A bundle is a directory a kernel vendor receives (docs/release.md)::

    README.md              how to read a case (Python, C/C++), run a backend, what a result holds
    bundle.json            every other file's SHA-256 and size, the bundle checksum, must-pass lists
    BUNDLE.sha256          the bundle checksum alone
    goldens/               the golden HDF5 files and their manifest.json, byte for byte
    specs/*.yaml           the specs, presets and tolerances the goldens were made and are judged with
    docs/*.md              golden-format.md (the file format), report-format.md, backends.md
    mustpass/<op>-<dtype>.txt   the case ids that must pass, per op and dtype

The bundle checksum is the SHA-256 of the lines ``"<sha256>  <path>\n"`` over every file except
``bundle.json`` and ``BUNDLE.sha256``, sorted by path (byte order): exactly what
``find . -type f ! -name bundle.json ! -name BUNDLE.sha256 -printf '%P\n' | LC_ALL=C sort |
xargs sha256sum | sha256sum`` prints in the bundle directory. Nothing in a bundle depends on the
time it was built: the same goldens, specs and docs give the same checksum.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import json
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from conformance import __version__, locations
from conformance.environment import git_commit
from conformance.errors import ConformanceError, GoldenError
from conformance.files import sha256_file
from conformance.golden.format import read_attrs
from conformance.golden.layouts import is_layout_path, read_layout
from conformance.golden.manifest import MANIFEST_NAME, read_manifest
from conformance.golden.verify import Problem, VerifyResult
from conformance.golden.verify import verify as verify_goldens
from conformance.spec.checks import GOLDEN_CHECKS

BUNDLE_FORMAT = "rlk-conform-bundle"
BUNDLE_SCHEMA_VERSION = 1
BUNDLE_JSON = "bundle.json"
BUNDLE_SHA256 = "BUNDLE.sha256"
GOLDENS_DIR = "goldens"
SPECS_DIR = "specs"
DOCS_DIR = "docs"
MUSTPASS_DIR = "mustpass"
README = "README.md"
#: Documentation shipped in every bundle (from the repository's docs/), the file format first.
BUNDLED_DOCS = ("golden-format.md", "report-format.md", "backends.md")
#: The files that describe the bundle and are therefore outside its checksum.
UNCHECKSUMMED = (BUNDLE_JSON, BUNDLE_SHA256)
#: The fields a result file must hold (docs/report-format.md), as dotted paths.
REQUIRED_RESULT_FIELDS = (
    "format", "schema_version", "complete",
    "backend.requested", "backend.used", "backend.device",
    "execution_target.device", "execution_target.device_name", "execution_target.host",
    "execution_target.torch", "execution_target.cuda", "execution_target.cudnn", "execution_target.driver",
    "goldens.tier", "goldens.dataset_sha256", "goldens.manifest_sha256", "goldens.cases_selected",
    "settings.checks", "settings.rule_set", "settings.cuda_matmul_allow_tf32", "settings.cudnn_allow_tf32",
    "settings.tolerances_sha256",
    "summary.records", "summary.cases", "summary.executed", "summary.by_status", "summary.by_check",
    "summary.verdict",
    "records",
)
REQUIRED_RECORD_FIELDS = ("case_id", "op", "check", "status", "dtype", "metrics", "message")


def must_pass_checks() -> tuple[str, ...]:
    """The checks every must-pass case must pass on a golden run: accuracy, each invariance check
    and the op contract (CONTRACT.md §2), and on a case with gradients the same on dQ, dK, dV.
    Parity needs a second backend and is informative only."""
    return GOLDEN_CHECKS


def is_bundle(directory: Path) -> bool:
    """True when ``directory`` holds a ``bundle.json`` (and is therefore verified as a bundle)."""
    return (directory / BUNDLE_JSON).is_file()


def bundle_sha256(files: list[dict[str, Any]]) -> str:
    """One checksum of a bundle: SHA-256 of the lines ``'<sha256>  <path>\\n'`` sorted by path."""
    listing = "".join(f"{e['sha256']}  {e['path']}\n" for e in sorted(files, key=lambda e: e["path"].encode()))
    return hashlib.sha256(listing.encode()).hexdigest()


def missing_result_fields(report: dict[str, Any]) -> list[str]:
    """The fields of :data:`REQUIRED_RESULT_FIELDS` (and of each record, as ``records[i].field``)
    that ``report`` lacks; ``[]`` for a complete result file. Values may be ``null`` where the
    format allows it (a CPU run has no CUDA version), but every key must be present."""
    missing = []
    for dotted in REQUIRED_RESULT_FIELDS:
        node: Any = report
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                missing.append(dotted)
                break
            node = node[key]
    records = report.get("records")
    if isinstance(records, list):
        for i, rec in enumerate(records):
            missing += [f"records[{i}].{k}" for k in REQUIRED_RECORD_FIELDS
                        if not isinstance(rec, dict) or k not in rec]
    elif "records" not in missing:
        missing.append("records")
    return missing


@dataclass
class ReleaseSummary:
    """What ``build_release`` wrote."""

    out: Path
    tier: str
    cases: int
    files: int
    bytes: int
    bundle_sha256: str
    dataset_sha256: str
    mustpass: dict[str, int] = field(default_factory=dict)  # "<op>-<dtype>" → number of case ids


def build_release(tier: str, out: Path, goldens: Path | None = None, spec_dir: Path | None = None,
                  docs_dir: Path | None = None) -> ReleaseSummary:
    """Write a vendor bundle for ``tier`` into ``out`` (which must not exist, or be empty).

    ``goldens`` (default: the tier's default goldens, :func:`conformance.locations.find_goldens`)
    must hold a manifest of that tier whose files all match their SHA-256; ``spec_dir`` (default: the
    shipped specs) the spec files the manifest names, unchanged since generation (their SHA-256 is
    checked), plus presets and ``tolerances.yaml``; ``docs_dir`` (default: ``docs/`` of the source
    checkout) the files of :data:`BUNDLED_DOCS`. Nothing is generated here. The bundle is
    assembled in a temporary directory beside ``out`` and renamed into place, so a failed release
    leaves nothing behind. Raises :class:`ConformanceError` (exit 2) naming the file at fault.
    """
    src = goldens if goldens is not None else locations.find_goldens(tier)
    spec_dir = spec_dir if spec_dir is not None else locations.spec_dir()
    if docs_dir is None:
        docs_dir = locations.docs_dir()
        if docs_dir is None:
            raise ConformanceError("a release ships docs/golden-format.md, report-format.md and backends.md from a "
                                   "source checkout of rlk-conform; run it from one (or pass docs_dir)")
    if not (src / MANIFEST_NAME).is_file():
        raise ConformanceError(f"{src}: no golden set here (no {MANIFEST_NAME}); generate it first: "
                               f"rlk-conform generate --tier {tier} --out {src}")
    manifest = read_manifest(src)
    if manifest.get("tier") != tier:
        raise ConformanceError(f"{src / MANIFEST_NAME}: holds tier {manifest.get('tier')!r}, not {tier!r}; "
                               f"pass --goldens with a {tier} golden directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConformanceError(f"{out}: exists and is not an empty directory; choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates 0700; a bundle is meant to be shared
    try:
        summary = _assemble(staging, tier, src, manifest, spec_dir, docs_dir)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    summary.out = out
    return summary


def _copy_checked(src: Path, dst: Path, want_sha256: str | None = None) -> dict[str, Any]:
    """Copy ``src`` to ``dst``; return its bundle entry (path filled in by the caller)."""
    if not src.is_file():
        raise ConformanceError(f"{src}: missing; a release needs it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    digest = sha256_file(dst)
    if want_sha256 is not None and digest != want_sha256:
        raise ConformanceError(f"{src}: SHA-256 does not match its manifest (file changed or damaged); "
                               f"run rlk-conform verify {src.parent} and regenerate")
    return {"sha256": digest, "bytes": dst.stat().st_size}


def _assemble(root: Path, tier: str, src: Path, manifest: dict[str, Any], spec_dir: Path,
              docs_dir: Path) -> ReleaseSummary:
    entries: dict[str, dict[str, Any]] = {}

    def add(rel: str, src_file: Path, want: str | None = None) -> None:
        entries[rel] = {"path": rel, **_copy_checked(src_file, root / rel, want)}

    # Goldens, byte for byte, each checked against the manifest while copying.
    lists: dict[tuple[str, str], list[str]] = {}
    for e in manifest["files"]:
        rel = f"{GOLDENS_DIR}/{e['path']}"
        add(rel, src / e["path"], e["sha256"])
        if is_layout_path(src / e["path"]):  # a packed or paged case: a view of the goldens listed beside it
            layout, _ = read_layout(root / rel)
            lists.setdefault((layout.op, layout.dtype), []).append(e["case_id"])
            continue
        try:
            with h5py.File(root / rel, "r") as f:
                attrs = read_attrs(src / e["path"], f)
        except OSError as exc:
            raise GoldenError(src / e["path"], f"unreadable HDF5 file ({exc})") from None
        lists.setdefault((attrs["op"], attrs["dtype"]), []).append(e["case_id"])
    add(f"{GOLDENS_DIR}/{MANIFEST_NAME}", src / MANIFEST_NAME)

    # Specs: the ones the goldens were generated from must be unchanged; presets and tolerances too.
    for name, info in sorted((manifest.get("specs") or {}).items()):
        path = spec_dir / name
        if not path.is_file():
            raise ConformanceError(f"{path}: the goldens were generated from this spec file and it is missing; "
                                   "pass --specs with the spec directory")
        if hashlib.sha256(path.read_text(encoding="utf-8").encode()).hexdigest() != info.get("sha256"):
            raise ConformanceError(f"{path}: changed since {src} was generated (SHA-256 differs from the "
                                   "manifest); regenerate the goldens or release from the matching specs")
    yaml_files = sorted(spec_dir.glob("*.yaml"))
    if not (spec_dir / "tolerances.yaml").is_file():
        raise ConformanceError(f"{spec_dir / 'tolerances.yaml'}: missing; a release ships the tolerances")
    for path in yaml_files:
        add(f"{SPECS_DIR}/{path.name}", path)
    for name in BUNDLED_DOCS:
        add(f"{DOCS_DIR}/{name}", docs_dir / name)

    # Must-pass lists, one per op and dtype.
    mustpass: dict[str, int] = {}
    mustpass_lists = []
    for (op, dtype), ids in sorted(lists.items()):
        rel = f"{MUSTPASS_DIR}/{op}-{dtype}.txt"
        (root / MUSTPASS_DIR).mkdir(exist_ok=True)
        (root / rel).write_text("".join(f"{cid}\n" for cid in sorted(ids)), encoding="utf-8")
        entries[rel] = {"path": rel, "sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
        mustpass[f"{op}-{dtype}"] = len(ids)
        mustpass_lists.append({"op": op, "dtype": dtype, "path": rel, "cases": len(ids)})

    readme = vendor_readme(tier, manifest, mustpass, [f"{SPECS_DIR}/{p.name}" for p in yaml_files])
    (root / README).write_text(readme, encoding="utf-8")
    entries[README] = {"path": README, "sha256": sha256_file(root / README), "bytes": (root / README).stat().st_size}

    files = sorted(entries.values(), key=lambda e: e["path"].encode())
    checksum = bundle_sha256(files)
    bundle = {
        "format": BUNDLE_FORMAT,
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "tier": tier,
        "generator": f"rlk-conform {__version__}",
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "bundle_sha256": checksum,
        "goldens": {"dir": GOLDENS_DIR, "dataset_sha256": manifest["dataset_sha256"], "cases": len(manifest["files"])},
        "must_pass": {"checks": list(must_pass_checks()), "lists": mustpass_lists},
        "files": files,
    }
    (root / BUNDLE_JSON).write_text(json.dumps(bundle, indent=2) + "\n", encoding="utf-8")
    (root / BUNDLE_SHA256).write_text(checksum + "\n", encoding="utf-8")
    return ReleaseSummary(out=root, tier=tier, cases=len(manifest["files"]), files=len(files) + len(UNCHECKSUMMED),
                          bytes=sum(e["bytes"] for e in files), bundle_sha256=checksum,
                          dataset_sha256=manifest["dataset_sha256"], mustpass=mustpass)


#: Recomputes the bundle checksum with coreutils, run inside the bundle directory.
CHECKSUM_COMMAND = (f"find . -type f ! -name {BUNDLE_JSON} ! -name {BUNDLE_SHA256} -printf '%P\\n' | LC_ALL=C sort "
                    "| xargs sha256sum | sha256sum")
#: The command the vendor runs; MODULE:CLASS and BUNDLE are the placeholders the README explains.
RUN_COMMAND = ("rlk-conform run --backend MODULE:CLASS --goldens BUNDLE/goldens "
               "--tolerances BUNDLE/specs/tolerances.yaml --report-json result.json")


def vendor_readme(tier: str, manifest: dict[str, Any], mustpass: dict[str, int], spec_files: list[str]) -> str:
    """The bundle's README.md: what is in it, how to read a case, how to run and what to send back."""
    lists = "\n".join(f"| `{MUSTPASS_DIR}/{k}.txt` | {n} |" for k, n in mustpass.items())
    checks = ", ".join(f"`{c}`" for c in must_pass_checks())
    fields = "\n".join(f"- `{f}`" for f in REQUIRED_RESULT_FIELDS)
    specs = ", ".join(f"`{s}`" for s in spec_files)
    return vendor_readme_template().substitute(
        tier=tier, version=__version__, cases=len(manifest["files"]), dataset_sha256=manifest["dataset_sha256"],
        specs=specs, checksum_command=CHECKSUM_COMMAND, run_command=RUN_COMMAND, checks=checks, lists=lists,
        fields=fields)


@functools.cache
def vendor_readme_template() -> string.Template:
    """``templates/vendor_README.md``: the bundle README's text with ``$name`` placeholders."""
    text = importlib.resources.files("conformance.golden").joinpath("templates", "vendor_README.md").read_text(
        encoding="utf-8")
    return string.Template(text)


@dataclass
class BundleVerifyResult:
    """Outcome of :func:`verify_bundle`: every problem names the file it is about."""

    root: Path
    bundle: dict[str, Any]
    files_checked: int = 0
    goldens: VerifyResult | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_bundle_json(root: Path, result: BundleVerifyResult) -> dict[str, Any] | None:
    path = root / BUNDLE_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        result.problems.append(Problem(str(path), f"unreadable ({exc})"))
        return None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        result.problems.append(Problem(str(path), "not an rlk-conform bundle description"))
        return None
    if data.get("schema_version") != BUNDLE_SCHEMA_VERSION:
        result.problems.append(Problem(str(path), f"bundle schema_version {data.get('schema_version')!r} is not "
                                       f"supported (this rlk-conform reads {BUNDLE_SCHEMA_VERSION})"))
        return None
    files = data.get("files")
    if not isinstance(files, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str) for e in files):
        result.problems.append(Problem(str(path), "'files' must list objects with path and sha256"))
        return None
    for e in files:
        p = Path(e["path"])
        if p.is_absolute() or ".." in p.parts or e["path"] in UNCHECKSUMMED:
            result.problems.append(Problem(str(path), f"file entry {e['path']!r} is not a bundle member"))
            return None
    return data


def verify_bundle(root: Path, regenerate: bool = False, device: str = "cpu",
                  on_start: Callable[[int], None] | None = None,
                  on_done: Callable[[str, bool], None] | None = None) -> BundleVerifyResult:
    """Verify a bundle end to end; a problem list, never an exception, for anything tampered with.

    1. ``bundle.json`` is readable and of this format; every file it lists exists and matches its
       SHA-256; no other file is present (besides ``bundle.json`` and ``BUNDLE.sha256``);
    2. the bundle checksum recomputed from the listing equals both ``bundle.json``'s and
       ``BUNDLE.sha256``'s;
    3. every must-pass case id names a case of the golden manifest, whose ``dataset_sha256`` is the
       one ``bundle.json`` records;
    4. :func:`conformance.verify.verify` on ``goldens/`` (manifest, schema, per-dataset checksums;
       ``regenerate`` recomputes every case). ``on_start``/``on_done`` report its progress.

    Raises :class:`ConformanceError` only when ``root`` is not a directory.
    """
    if not root.is_dir():
        raise ConformanceError(f"{root}: no such bundle directory")
    result = BundleVerifyResult(root=root, bundle={})
    data = _read_bundle_json(root, result)
    if data is None:
        return result
    result.bundle = data
    listed = {e["path"]: e for e in data["files"]}
    for rel, entry in sorted(listed.items()):
        path = root / rel
        result.files_checked += 1
        if not path.is_file():
            result.problems.append(Problem(str(path), "listed in bundle.json but missing (file removed)"))
        elif sha256_file(path) != entry["sha256"]:
            result.problems.append(Problem(str(path), "SHA-256 does not match bundle.json (file changed)"))
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if rel not in listed and rel not in UNCHECKSUMMED:
            result.problems.append(Problem(str(path), "file is not listed in bundle.json (file added)"))
    checksum = bundle_sha256(list(listed.values()))
    if data.get("bundle_sha256") != checksum:
        result.problems.append(Problem(str(root / BUNDLE_JSON), "bundle_sha256 does not match the listed files"))
    try:
        recorded = (root / BUNDLE_SHA256).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        recorded = []
    if recorded[:1] != [checksum]:
        result.problems.append(Problem(str(root / BUNDLE_SHA256), "missing or does not hold the bundle checksum "
                                       f"{checksum}"))
    _verify_goldens(root, data, result, regenerate, device, on_start, on_done)
    return result


def _verify_goldens(root: Path, data: dict[str, Any], result: BundleVerifyResult, regenerate: bool, device: str,
                    on_start: Callable[[int], None] | None, on_done: Callable[[str, bool], None] | None) -> None:
    golden_dir = root / GOLDENS_DIR
    try:
        result.goldens = verify_goldens(golden_dir, regenerate=regenerate, device=device, on_start=on_start,
                                        on_done=on_done)
    except GoldenError as exc:
        result.problems.append(Problem(exc.file, exc.reason))
        return
    except ConformanceError as exc:
        result.problems.append(Problem(str(golden_dir), str(exc)))
        return
    result.problems += result.goldens.problems
    manifest = result.goldens.manifest
    if manifest.get("dataset_sha256") != (data.get("goldens") or {}).get("dataset_sha256"):
        result.problems.append(Problem(str(golden_dir / MANIFEST_NAME), "dataset_sha256 differs from bundle.json's"))
    known = {e["case_id"] for e in manifest["files"]}
    for entry in (data.get("must_pass") or {}).get("lists") or []:
        path = root / str(entry.get("path"))
        with contextlib.suppress(OSError, UnicodeDecodeError):
            unknown = [cid for cid in path.read_text(encoding="utf-8").split() if cid not in known]
            if unknown:
                result.problems.append(Problem(str(path), f"{len(unknown)} case id(s) not in the goldens, first "
                                               f"{unknown[0]}"))
