"""Golden HDF5 files: write (atomic, byte-reproducible), read (validated), and the manifest.

The on-disk format is documented in docs/golden-format.md; ``SCHEMA_VERSION`` changes whenever it
does. One file per case at ``<dir>/<case id>.h5``; ``<dir>/manifest.json`` lists every file with
its SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import __version__
from .errors import GoldenError
from .inputs import CaseInputs
from .reference import ALGORITHM, Golden, RefinementStats
from .spec import Case

SCHEMA_VERSION = 1
FORMAT = "rlk-conform-golden"
MANIFEST_FORMAT = "rlk-conform-manifest"
MANIFEST_NAME = "manifest.json"
INPUT_GENERATOR = "numpy-pcg64/1"
GENERATOR = f"rlk-conform {__version__}"

INPUT_DATASETS = ("inputs/q", "inputs/k", "inputs/v")
EXPECTED_DATASETS = ("expected/out", "expected/lse", "expected/error_scale", "expected/naive_error")


@dataclass(frozen=True)
class Provenance:
    """What produced a golden file; stored as attributes (environment-independent fields only)."""

    spec_file: str
    spec_sha256: str
    spec_seed: int


@dataclass
class GoldenCase:
    """One golden file, read back."""

    path: Path
    case: Case
    inputs: CaseInputs
    golden: Golden
    attrs: dict[str, Any]


def case_path(root: Path, case_id: str) -> Path:
    return root / f"{case_id}.h5"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_to_storage(t: torch.Tensor) -> np.ndarray:
    """bfloat16 has no HDF5/numpy type: its raw bits are stored as uint16 (see golden-format.md)."""
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _storage_to_tensor(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _ascii(s: str) -> np.bytes_:
    return np.bytes_(s.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; goldens are shared files
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_golden(path: Path, case: Case, inputs: CaseInputs, golden: Golden, prov: Provenance) -> None:
    """Write one golden file atomically. Same inputs → identical bytes (no timestamps)."""
    with atomic_path(path) as tmp:
        _write(tmp, case, inputs, golden, prov)


def _write(tmp: Path, case: Case, inputs: CaseInputs, golden: Golden, prov: Provenance) -> None:
    with h5py.File(tmp, "w", track_order=False) as f:
        a = f.attrs
        a["format"] = _ascii(FORMAT)
        a["schema_version"] = np.int64(SCHEMA_VERSION)
        a["case_id"] = _ascii(case.id)
        a["op"] = _ascii(case.op)
        a["family"] = _ascii(case.family)
        a["tier"] = _ascii(case.tier)
        a["preset"] = _ascii(case.preset or "")
        a["dtype"] = _ascii(case.dtype)
        for key in ("batch", "hq", "hkv", "sq", "skv"):
            a[key] = np.int64(getattr(case, key))
        a["head_dim"] = np.int64(case.d)
        a["s_past"] = np.int64(-1 if case.s_past is None else case.s_past)
        a["s_new"] = np.int64(-1 if case.s_new is None else case.s_new)
        a["split_points"] = np.asarray(case.split_points, dtype=np.int64)
        a["causal"] = np.uint8(case.causal)
        a["scale"] = np.float64(case.effective_scale)
        a["scale_mode"] = _ascii("default" if case.scale is None else "explicit")
        a["mask"] = _ascii(case.mask)
        a["dist"] = _ascii(case.dist)
        a["seed"] = np.uint64(case.seed)
        a["input_generator"] = _ascii(INPUT_GENERATOR)
        a["algorithm"] = _ascii(ALGORITHM)
        a["generator"] = _ascii(GENERATOR)
        a["spec_file"] = _ascii(prov.spec_file)
        a["spec_sha256"] = _ascii(prov.spec_sha256)
        a["spec_seed"] = np.int64(prov.spec_seed)
        a["refined_double_double"] = np.int64(golden.stats.double_double)
        a["refined_exact"] = np.int64(golden.stats.exact)
        a["flops"] = np.int64(golden.flops)
        arrays: dict[str, np.ndarray] = {
            "inputs/q": _tensor_to_storage(inputs.q),
            "inputs/k": _tensor_to_storage(inputs.k),
            "inputs/v": _tensor_to_storage(inputs.v),
            "expected/out": golden.out,
            "expected/lse": golden.lse,
            "expected/error_scale": golden.error_scale,
            "expected/naive_error": golden.naive_error,
        }
        if inputs.key_padding_mask is not None:
            arrays["inputs/key_padding_mask"] = inputs.key_padding_mask.numpy().astype(np.uint8)
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            ds = f.create_dataset(name, data=arr, track_times=False)
            ds.attrs["sha256"] = _ascii(hashlib.sha256(arr.tobytes()).hexdigest())
            if name.startswith("inputs/") and name != "inputs/key_padding_mask":
                ds.attrs["element_type"] = _ascii(case.dtype)


# --- reading ---------------------------------------------------------------------------------------

_INT_ATTRS = ("schema_version", "batch", "hq", "hkv", "head_dim", "sq", "skv", "s_past", "s_new", "spec_seed",
              "refined_double_double", "refined_exact", "flops")
_STR_ATTRS = ("format", "case_id", "op", "family", "tier", "preset", "dtype", "scale_mode", "mask", "dist",
              "input_generator", "algorithm", "generator", "spec_file", "spec_sha256")


def _attr(path: Path, attrs: h5py.AttributeManager, key: str) -> Any:
    if key not in attrs:
        raise GoldenError(path, f"missing attribute '{key}'")
    return attrs[key]


def read_attrs(path: Path, f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _STR_ATTRS:
        val = _attr(path, f.attrs, key)
        if not isinstance(val, bytes | np.bytes_ | str):
            raise GoldenError(path, f"attribute '{key}' must be a string, found {type(val).__name__}")
        out[key] = val.decode() if isinstance(val, bytes | np.bytes_) else val
    if out["format"] != FORMAT:
        raise GoldenError(path, f"not an rlk-conform golden (format={out['format']!r})")
    for key in _INT_ATTRS:
        val = _attr(path, f.attrs, key)
        if not isinstance(val, np.integer | int):
            raise GoldenError(path, f"attribute '{key}' must be an integer, found {type(val).__name__}")
        out[key] = int(val)
    if out["schema_version"] != SCHEMA_VERSION:
        raise GoldenError(path, f"schema_version {out['schema_version']} is not supported "
                          f"(this rlk-conform reads {SCHEMA_VERSION})")
    out["causal"] = bool(_attr(path, f.attrs, "causal"))
    out["scale"] = float(_attr(path, f.attrs, "scale"))
    out["seed"] = int(_attr(path, f.attrs, "seed"))
    out["split_points"] = tuple(int(x) for x in np.atleast_1d(_attr(path, f.attrs, "split_points")))
    return out


def case_from_attrs(a: dict[str, Any]) -> Case:
    return Case(id=a["case_id"], op=a["op"], family=a["family"], tier=a["tier"], batch=a["batch"], hq=a["hq"],
                hkv=a["hkv"], d=a["head_dim"], sq=a["sq"], skv=a["skv"], dtype=a["dtype"], causal=a["causal"],
                scale=None if a["scale_mode"] == "default" else a["scale"], mask=a["mask"], dist=a["dist"],
                seed=a["seed"], preset=a["preset"] or None, s_past=None if a["s_past"] < 0 else a["s_past"],
                split_points=a["split_points"])


def _expected_shapes(case: Case) -> dict[str, tuple[int, ...]]:
    rows = (case.batch, case.hq, case.sq)
    shapes = {
        "inputs/q": (*rows, case.d),
        "inputs/k": (case.batch, case.hkv, case.skv, case.d),
        "inputs/v": (case.batch, case.hkv, case.skv, case.d),
        "expected/out": (*rows, case.d),
        "expected/lse": rows,
        "expected/error_scale": rows,
        "expected/naive_error": rows,
    }
    if case.mask != "none":
        shapes["inputs/key_padding_mask"] = (case.batch, case.skv)
    return shapes


_STORAGE_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}


def read_golden(path: str | Path, check_sha256: bool = True) -> GoldenCase:
    """Read and validate one golden file. Raises :class:`GoldenError` naming file and dataset."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise GoldenError(path, "file not found") from None
    except OSError as exc:
        raise GoldenError(path, f"not a readable HDF5 file ({exc})") from None
    with f:
        attrs = read_attrs(path, f)
        case = case_from_attrs(attrs)
        expected_dtypes = {"inputs/key_padding_mask": np.uint8, "expected/out": np.float32,
                           "expected/lse": np.float32, "expected/error_scale": np.float64,
                           "expected/naive_error": np.float64}
        arrays: dict[str, np.ndarray] = {}
        for name, shape in _expected_shapes(case).items():
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise GoldenError(path, "missing dataset", name)
            ds = f[name]
            want = expected_dtypes.get(name, _STORAGE_DTYPES[case.dtype])
            if ds.shape != shape:
                raise GoldenError(path, f"shape {ds.shape} does not match the case attributes {shape}", name)
            if ds.dtype != np.dtype(want):
                raise GoldenError(path, f"dtype {ds.dtype} where {np.dtype(want)} is expected", name)
            try:
                arr = ds[()]
            except OSError as exc:
                raise GoldenError(path, f"unreadable ({exc})", name) from None
            if check_sha256:
                stored = ds.attrs.get("sha256")
                stored = stored.decode() if isinstance(stored, bytes | np.bytes_) else stored
                actual = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
                if stored != actual:
                    raise GoldenError(path, "SHA-256 of the data does not match its 'sha256' attribute", name)
            arrays[name] = arr
    mask = arrays.get("inputs/key_padding_mask")
    inputs = CaseInputs(
        q=_storage_to_tensor(arrays["inputs/q"], case.dtype),
        k=_storage_to_tensor(arrays["inputs/k"], case.dtype),
        v=_storage_to_tensor(arrays["inputs/v"], case.dtype),
        key_padding_mask=None if mask is None else torch.from_numpy(mask.astype(bool)),
    )
    golden = Golden(out=arrays["expected/out"], lse=arrays["expected/lse"],
                    error_scale=arrays["expected/error_scale"], naive_error=arrays["expected/naive_error"],
                    flops=attrs["flops"],
                    stats=RefinementStats(double_double=attrs["refined_double_double"],
                                          exact=attrs["refined_exact"]))
    return GoldenCase(path=path, case=case, inputs=inputs, golden=golden, attrs=attrs)


# --- manifest --------------------------------------------------------------------------------------


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = res.stdout.strip()
    if res.returncode != 0 or not commit:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                           capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def environment_provenance() -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
    }


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


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GoldenError(path, "no manifest here; generate goldens first (rlk-conform generate)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenError(path, f"unreadable manifest ({exc})") from None
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
    for e in files:
        p = Path(e["path"])
        if p.is_absolute() or ".." in p.parts:
            raise GoldenError(path, f"manifest path {e['path']!r} leaves the golden directory")
    return data
