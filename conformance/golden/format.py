"""Golden HDF5 files: write (atomic, byte-reproducible) and read (validated).

The on-disk format is documented in docs/golden-format.md; ``SCHEMA_VERSION`` changes whenever it
does. One file per case at ``<dir>/<case id>.h5`` (the manifest is :mod:`conformance.golden.manifest`).

Writer and reader stay in one module (past 500 lines) on purpose: every dataset and attribute the
writer stores is validated by the reader next to it (names, dtypes, shapes from the attributes,
size caps, links and storage refused), so a format change is made and reviewed in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from conformance.environment import GENERATOR
from conformance.errors import GoldenError
from conformance.files import atomic_path, sha256_file
from conformance.reference.compute import ALGORITHM, Golden
from conformance.reference.gradient import GRAD_ALGORITHM, GradientGolden
from conformance.spec.case import DISTS, DTYPES, MASKS, OPS, Case
from conformance.spec.inputs import CaseInputs

# 2: no refinement counts in the file (they depend on the device's float64 rounding);
# 3: the exact gradients of cases with grad = 1 (inputs/grad_out, expected/grad_*), attributes grad*.
# 4: the attention variants (attributes window_left, window_right, softcap, sinks; dataset inputs/sinks).
# A file is written in the lowest schema that describes it: a case without variants stays schema 3
# (its bytes unchanged), and a reader of schema 3 refuses a variant case instead of ignoring the variant.
SCHEMA_VERSION = 3
VARIANT_SCHEMA_VERSION = 4
READ_SCHEMA_VERSIONS = (SCHEMA_VERSION, VARIANT_SCHEMA_VERSION)
FORMAT = "rlk-conform-golden"
INPUT_GENERATOR = "numpy-pcg64/1"
INPUT_DATASETS = ("inputs/q", "inputs/k", "inputs/v")
EXPECTED_DATASETS = ("expected/out", "expected/lse", "expected/error_scale", "expected/naive_error")
# A case with gradients (attribute grad = 1) also holds these: dQ [B, Hq, Sq, D], dK and dV
# [B, Hkv, Skv, D] correctly rounded to float32, and per row (dQ) or key (dK, dV) its error scale and
# the naive same-dtype backward's error, float64.
GRADIENT_DATASETS = ("inputs/grad_out", "expected/grad_q", "expected/grad_k", "expected/grad_v",
                     "expected/grad_q_error_scale", "expected/grad_k_error_scale", "expected/grad_v_error_scale",
                     "expected/grad_q_naive_error", "expected/grad_k_naive_error", "expected/grad_v_naive_error")
_GRADIENT_FIELDS = {"expected/grad_q": "dq", "expected/grad_k": "dk", "expected/grad_v": "dv",
                    "expected/grad_q_error_scale": "dq_error_scale", "expected/grad_k_error_scale": "dk_error_scale",
                    "expected/grad_v_error_scale": "dv_error_scale", "expected/grad_q_naive_error": "dq_naive_error",
                    "expected/grad_k_naive_error": "dk_naive_error", "expected/grad_v_naive_error": "dv_naive_error"}


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
    inputs: CaseInputs  # inputs.grad_out is set for a case with gradients
    golden: Golden
    attrs: dict[str, Any]
    gradient: GradientGolden | None = None  # the exact gradients of a case with grad = 1


def case_path(root: Path, case_id: str) -> Path:
    return root / f"{case_id}.h5"


def tensor_to_storage(t: torch.Tensor) -> np.ndarray:
    """bfloat16 has no HDF5/numpy type: its raw bits are stored as uint16 (see golden-format.md)."""
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def storage_to_tensor(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def ascii_attr(s: str) -> np.bytes_:
    return np.bytes_(s.encode("utf-8"))


def write_golden(path: Path, case: Case, inputs: CaseInputs, golden: Golden, prov: Provenance,
                 gradient: GradientGolden | None = None) -> None:
    """Write one golden file atomically. Same inputs → identical bytes (no timestamps). A case with
    gradients (``case.grad``) needs ``gradient`` and ``inputs.grad_out``; one without takes neither."""
    if case.grad != (gradient is not None) or case.grad != (inputs.grad_out is not None):
        raise ValueError(f"{case.id}: grad={case.grad} needs the gradients and grad_out exactly when it is set")
    with atomic_path(path) as tmp:
        _write(tmp, case, inputs, golden, prov, gradient)


def _write(tmp: Path, case: Case, inputs: CaseInputs, golden: Golden, prov: Provenance,
           gradient: GradientGolden | None) -> None:
    with h5py.File(tmp, "w", track_order=False) as f:
        a = f.attrs
        a["format"] = ascii_attr(FORMAT)
        a["schema_version"] = np.int64(VARIANT_SCHEMA_VERSION if case.variants else SCHEMA_VERSION)
        a["case_id"] = ascii_attr(case.id)
        a["op"] = ascii_attr(case.op)
        a["family"] = ascii_attr(case.family)
        a["tier"] = ascii_attr(case.tier)
        a["preset"] = ascii_attr(case.preset or "")
        a["dtype"] = ascii_attr(case.dtype)
        for key in ("batch", "hq", "hkv", "sq", "skv"):
            a[key] = np.int64(getattr(case, key))
        a["head_dim"] = np.int64(case.d)
        a["s_past"] = np.int64(-1 if case.s_past is None else case.s_past)
        a["s_new"] = np.int64(-1 if case.s_new is None else case.s_new)
        a["split_points"] = np.asarray(case.split_points, dtype=np.int64)
        a["causal"] = np.uint8(case.causal)
        a["scale"] = np.float64(case.effective_scale)
        a["scale_mode"] = ascii_attr("default" if case.scale is None else "explicit")
        a["mask"] = ascii_attr(case.mask)
        a["dist"] = ascii_attr(case.dist)
        a["seed"] = np.uint64(case.seed)
        a["input_generator"] = ascii_attr(INPUT_GENERATOR)
        a["algorithm"] = ascii_attr(ALGORITHM)
        a["generator"] = ascii_attr(GENERATOR)
        a["spec_file"] = ascii_attr(prov.spec_file)
        a["spec_sha256"] = ascii_attr(prov.spec_sha256)
        a["spec_seed"] = np.int64(prov.spec_seed)
        a["flops"] = np.int64(golden.flops)
        a["grad"] = np.uint8(case.grad)
        a["grad_algorithm"] = ascii_attr(GRAD_ALGORITHM if case.grad else "")
        a["grad_flops"] = np.int64(gradient.flops if gradient is not None else 0)
        if case.variants:
            a["window_left"] = np.int64(case.window[0])
            a["window_right"] = np.int64(case.window[1])
            a["softcap"] = np.float64(case.softcap or 0.0)
            a["sinks"] = np.uint8(case.sinks is not None)
        arrays: dict[str, np.ndarray] = {
            "inputs/q": tensor_to_storage(inputs.q),
            "inputs/k": tensor_to_storage(inputs.k),
            "inputs/v": tensor_to_storage(inputs.v),
            "expected/out": golden.out,
            "expected/lse": golden.lse,
            "expected/error_scale": golden.error_scale,
            "expected/naive_error": golden.naive_error,
        }
        if inputs.key_padding_mask is not None:
            arrays["inputs/key_padding_mask"] = inputs.key_padding_mask.numpy().astype(np.uint8)
        if case.sinks is not None:
            arrays["inputs/sinks"] = np.asarray(case.sinks, dtype=np.float32)
        if gradient is not None and inputs.grad_out is not None:
            arrays["inputs/grad_out"] = tensor_to_storage(inputs.grad_out)
            arrays.update({name: getattr(gradient, field) for name, field in _GRADIENT_FIELDS.items()})
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            ds = f.create_dataset(name, data=arr, track_times=False)
            ds.attrs["sha256"] = ascii_attr(data_sha256(arr))
            if name.startswith("inputs/") and name not in ("inputs/key_padding_mask", "inputs/sinks"):  # q, k, v, dO
                ds.attrs["element_type"] = ascii_attr(case.dtype)


def data_sha256(arr: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order, what a dataset's ``sha256`` attribute holds; hashed
    from the array's own buffer (no copy when it is contiguous)."""
    return hashlib.sha256(np.ascontiguousarray(arr)).hexdigest()


DEFAULT_MAX_CASE_BYTES = 4 * 1024**3
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Links a golden may hold: the groups "inputs" and "expected" and at most 18 datasets (with gradients).
MAX_LINKS = 64
MAX_ATTR_BYTES = 64 * 1024
# File bytes allowed beyond the declared tensors: object headers, attributes, B-trees.
METADATA_SLACK_BYTES = 16 * 1024**2
MAX_SPLIT_POINTS = 4096
_INT_ATTRS = ("batch", "hq", "hkv", "head_dim", "sq", "skv", "s_past", "s_new", "spec_seed", "flops", "grad_flops")
_STR_ATTRS = ("case_id", "op", "family", "tier", "preset", "dtype", "scale_mode", "mask", "dist",
              "input_generator", "algorithm", "generator", "spec_file", "spec_sha256", "grad_algorithm")
_CASE_ID_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_STORAGE_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}
_EXPECTED_DTYPES = {"inputs/key_padding_mask": np.uint8, "inputs/sinks": np.float32,
                    "expected/out": np.float32, "expected/lse": np.float32,
                    "expected/error_scale": np.float64, "expected/naive_error": np.float64,
                    **{name: np.float32 for name in ("expected/grad_q", "expected/grad_k", "expected/grad_v")},
                    **{name: np.float64 for name in GRADIENT_DATASETS if name.endswith(("_scale", "_error"))}}


def _h5_reason(exc: BaseException) -> str:
    """h5py's message on one line, without the 'Unable to synchronously open file (...)' wrapper."""
    text = " ".join(str(exc).split())
    match = re.match(r"^Unable to [^(]*\((.*)\)$", text)
    return match.group(1) if match else (text or type(exc).__name__)


@contextlib.contextmanager
def _h5_errors(path: Path, what: str, dataset: str | None = None) -> Iterator[None]:
    """Turn whatever h5py raises on a damaged structure into one GoldenError naming file and dataset."""
    try:
        yield
    except GoldenError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, UnicodeError, OverflowError) as exc:
        raise GoldenError(path, f"{what} ({_h5_reason(exc)})", dataset) from None


def _attr(path: Path, attrs: h5py.AttributeManager, key: str, dataset: str | None = None) -> Any:
    """Attribute ``key``; its declared size is checked before h5py allocates room for it."""
    with _h5_errors(path, f"attribute '{key}' is unreadable", dataset):
        if key not in attrs:
            raise GoldenError(path, f"missing attribute '{key}'", dataset)
        aid = attrs.get_id(key)
        nbytes = math.prod(aid.shape or ()) * aid.dtype.itemsize
        if nbytes > MAX_ATTR_BYTES:
            raise GoldenError(path, f"attribute '{key}' declares {nbytes} bytes (at most {MAX_ATTR_BYTES})", dataset)
        return attrs[key]


def _str_attr(path: Path, attrs: h5py.AttributeManager, key: str) -> str:
    val = _attr(path, attrs, key)
    if isinstance(val, str):
        return val
    if not isinstance(val, bytes | np.bytes_):
        raise GoldenError(path, f"attribute '{key}' must be a string, found {_type_name(val)}")
    try:
        return bytes(val).decode("utf-8")
    except UnicodeDecodeError:
        raise GoldenError(path, f"attribute '{key}' is not valid UTF-8") from None


def _int_attr(path: Path, attrs: h5py.AttributeManager, key: str) -> int:
    val = _attr(path, attrs, key)
    if not isinstance(val, np.integer | int) or isinstance(val, bool | np.bool_):
        raise GoldenError(path, f"attribute '{key}' must be an integer, found {_type_name(val)}")
    return int(val)


def _type_name(val: Any) -> str:
    if isinstance(val, np.ndarray):
        return f"an array of {val.dtype} with shape {val.shape}"
    return type(val).__name__


def read_attrs(path: Path, f: h5py.File) -> dict[str, Any]:
    """The root attributes, type-checked; ``format`` and ``schema_version`` first, so that a file of
    another schema is named as such rather than as missing some attribute."""
    out: dict[str, Any] = {"format": _str_attr(path, f.attrs, "format")}
    if out["format"] != FORMAT:
        raise GoldenError(path, f"not an rlk-conform golden (format={out['format']!r})")
    out["schema_version"] = _int_attr(path, f.attrs, "schema_version")
    if out["schema_version"] not in READ_SCHEMA_VERSIONS:
        raise GoldenError(path, f"schema_version {out['schema_version']} is not supported "
                          f"(this rlk-conform reads {', '.join(map(str, READ_SCHEMA_VERSIONS))})")
    for key in _STR_ATTRS:
        out[key] = _str_attr(path, f.attrs, key)
    for key in _INT_ATTRS:
        out[key] = _int_attr(path, f.attrs, key)
    for flag in ("causal", "grad"):
        out[flag] = _int_attr(path, f.attrs, flag)
        if out[flag] not in (0, 1):
            raise GoldenError(path, f"attribute '{flag}' must be 0 or 1, found {out[flag]}")
        out[flag] = bool(out[flag])
    scale = _attr(path, f.attrs, "scale")
    if not isinstance(scale, np.floating | float) or not math.isfinite(float(scale)):
        raise GoldenError(path, f"attribute 'scale' must be a finite float, found {_type_name(scale)} {scale}")
    out["scale"] = float(scale)
    out["seed"] = _int_attr(path, f.attrs, "seed")
    split = _attr(path, f.attrs, "split_points")
    split_arr = np.asarray(split)
    if split_arr.ndim > 1 or split_arr.dtype.kind not in "iu" or split_arr.size > MAX_SPLIT_POINTS:
        raise GoldenError(path, f"attribute 'split_points' must be a list of integers, found {_type_name(split)}")
    out["split_points"] = tuple(int(x) for x in np.atleast_1d(split_arr))
    out.update(window_left=-1, window_right=-1, softcap=0.0, sinks=False)
    if out["schema_version"] >= VARIANT_SCHEMA_VERSION:
        out["window_left"] = _int_attr(path, f.attrs, "window_left")
        out["window_right"] = _int_attr(path, f.attrs, "window_right")
        cap = _attr(path, f.attrs, "softcap")
        if not isinstance(cap, np.floating | float) or not math.isfinite(float(cap)):
            raise GoldenError(path, f"attribute 'softcap' must be a finite float, found {_type_name(cap)} {cap}")
        out["softcap"] = float(cap)
        out["sinks"] = _int_attr(path, f.attrs, "sinks")
        if out["sinks"] not in (0, 1):
            raise GoldenError(path, f"attribute 'sinks' must be 0 or 1, found {out['sinks']}")
        out["sinks"] = bool(out["sinks"])
    _check_attr_values(path, out)
    return out


def _check_attr_values(path: Path, a: dict[str, Any]) -> None:
    """Values that would make a meaningless case (or a division by zero) are refused by name."""
    def bad(key: str, why: str) -> GoldenError:
        return GoldenError(path, f"attribute '{key}' = {a[key]!r} is invalid: {why}")

    for key, allowed in (("op", OPS), ("dtype", DTYPES), ("mask", MASKS), ("dist", DISTS),
                         ("scale_mode", ("default", "explicit"))):
        if a[key] not in allowed:
            raise bad(key, f"expected one of {', '.join(allowed)}")
    for key in ("batch", "hq", "hkv", "head_dim", "sq", "skv"):
        if a[key] < 1:
            raise bad(key, "must be at least 1")
    if a["hq"] % a["hkv"]:
        raise bad("hkv", f"hq={a['hq']} is not a multiple of it")
    for key in ("window_left", "window_right"):
        if a[key] < -1:
            raise bad(key, "a window side is -1 (unbounded) or a number of keys >= 0")
    if a["softcap"] < 0:
        raise bad("softcap", "soft-capping is > 0, or 0 for none")
    if not 0 <= a["seed"] < 2**64:
        raise bad("seed", "must be an unsigned 64-bit integer")
    if not _CASE_ID_RE.match(a["case_id"]) or ".." in a["case_id"].split("/"):
        raise bad("case_id", "a case id is letters, digits, '.', '_', '-' and '/'")
    if a["op"] == "attention":
        if a["s_past"] != -1 or a["s_new"] != -1 or a["split_points"]:
            raise bad("s_past", "the attention op stores s_past = s_new = -1 and no split_points")
    else:
        if not 0 <= a["s_past"] < a["skv"] or a["s_new"] != a["sq"] or a["skv"] != a["s_past"] + a["s_new"]:
            raise bad("s_past", f"need sq == s_new and skv == s_past + s_new (sq={a['sq']}, skv={a['skv']}, "
                      f"s_new={a['s_new']})")
        if not a["split_points"] or any(not a["s_past"] <= p < a["skv"] for p in a["split_points"]):
            raise bad("split_points", f"each must lie in [s_past, skv) = [{a['s_past']}, {a['skv']})")


def case_from_attrs(a: dict[str, Any], sinks: tuple[float, ...] | None = None) -> Case:
    """The case the root attributes describe; ``sinks`` the values of ``inputs/sinks`` (read by the caller)."""
    return Case(id=a["case_id"], op=a["op"], family=a["family"], tier=a["tier"], batch=a["batch"], hq=a["hq"],
                hkv=a["hkv"], d=a["head_dim"], sq=a["sq"], skv=a["skv"], dtype=a["dtype"], causal=a["causal"],
                scale=None if a["scale_mode"] == "default" else a["scale"], mask=a["mask"], dist=a["dist"],
                seed=a["seed"], preset=a["preset"] or None, s_past=None if a["s_past"] < 0 else a["s_past"],
                split_points=a["split_points"], grad=a["grad"], window=(a["window_left"], a["window_right"]),
                softcap=a["softcap"] or None, sinks=sinks)


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
    if case.sinks is not None:
        shapes["inputs/sinks"] = (case.hq,)
    if case.grad:
        keys = (case.batch, case.hkv, case.skv)
        shapes.update({"inputs/grad_out": (*rows, case.d), "expected/grad_q": (*rows, case.d),
                       "expected/grad_k": (*keys, case.d), "expected/grad_v": (*keys, case.d),
                       "expected/grad_q_error_scale": rows, "expected/grad_q_naive_error": rows,
                       **{f"expected/grad_{x}_{stat}": keys for x in "kv" for stat in ("error_scale", "naive_error")}})
    return shapes


def _expected_dtypes(case: Case) -> dict[str, np.dtype]:
    return {name: np.dtype(_EXPECTED_DTYPES.get(name, _STORAGE_DTYPES[case.dtype])) for name in _expected_shapes(case)}


def declared_bytes(case: Case) -> int:
    """Bytes the datasets of ``case`` occupy once read, computed from its attributes alone."""
    dtypes = _expected_dtypes(case)
    return sum(math.prod(shape) * dtypes[name].itemsize for name, shape in _expected_shapes(case).items())


def _check_links(path: Path, f: h5py.File) -> None:
    """Every link in the file is a hard link: a soft or external link, or an external or virtual
    dataset, could make HDF5 open another file. Counted, so a link cycle cannot loop."""
    seen = 0

    def walk(group: h5py.Group, prefix: str) -> None:
        nonlocal seen
        for name in group:
            seen += 1
            if seen > MAX_LINKS:
                raise GoldenError(path, f"holds more than {MAX_LINKS} objects; a golden holds at most 20")
            full = f"{prefix}{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise GoldenError(path, f"external link to {link.filename}:{link.path} refused "
                                  "(a golden file must be self-contained)", full)
            if isinstance(link, h5py.SoftLink):
                raise GoldenError(path, f"soft link to {link.path} refused (a golden holds plain datasets)", full)
            if not isinstance(link, h5py.HardLink):
                raise GoldenError(path, "user-defined link refused (a golden holds plain datasets)", full)
            obj = group.get(name)
            if isinstance(obj, h5py.Group):
                walk(obj, full + "/")

    with _h5_errors(path, "damaged HDF5 structure"):
        walk(f, "")


def _check_storage(path: Path, name: str, ds: h5py.Dataset, file_size: int) -> None:
    """Contiguous, unfiltered, inside this file and exactly as large as its shape says."""
    with _h5_errors(path, "unreadable dataset layout", name):
        plist = ds.id.get_create_plist()
        layout = plist.get_layout()
        if layout == h5py.h5d.VIRTUAL:
            raise GoldenError(path, "virtual dataset refused (its data would come from other files)", name)
        if plist.get_external_count():
            raise GoldenError(path, "external raw-data storage refused (a golden file must be self-contained)",
                              name)
        if layout != h5py.h5d.CONTIGUOUS:
            kind = {h5py.h5d.CHUNKED: "chunked", h5py.h5d.COMPACT: "compact"}.get(layout, f"layout {layout}")
            raise GoldenError(path, f"{kind} storage refused (golden datasets are contiguous and unfiltered)", name)
        offset = ds.id.get_offset()
        stored = ds.id.get_storage_size()
    nbytes = ds.size * ds.dtype.itemsize
    if offset is None or stored != nbytes:
        raise GoldenError(path, f"stores {stored or 0} bytes where its shape needs {nbytes}", name)
    if offset + stored > file_size:
        raise GoldenError(path, f"its data ends at byte {offset + stored}, past the end of the {file_size}-byte "
                          "file (truncated?)", name)


def _size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def _regular_file_size(path: Path) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise GoldenError(path, "file not found") from None
    except OSError as exc:
        raise GoldenError(path, f"cannot read file ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise GoldenError(path, "not a regular file")
    return st.st_size


def read_golden(path: str | Path, check_sha256: bool = True, max_bytes: int = DEFAULT_MAX_CASE_BYTES,
                expected_sha256: str | None = None) -> GoldenCase:
    """Read and validate one golden file. Raises :class:`GoldenError` naming the file and, where one
    is to blame, the dataset; never anything else for any content of the file.

    Before any array is read: the file is a regular file that starts with the HDF5 signature; every
    link is a hard link (soft and external links refused); the attributes have their documented
    types and consistent values; the tensors the attributes declare fit in ``max_bytes``; and every
    dataset has the declared shape and dtype, contiguous and unfiltered storage inside this file of
    exactly that size (no virtual, external, chunked or compressed data). Then each dataset's bytes
    must match its ``sha256`` attribute (``check_sha256``). ``expected_sha256`` is the manifest's
    checksum of the whole file: a mismatch is refused too, so a damaged attribute cannot slip through.
    No other file is opened, nothing is unpickled or evaluated.
    """
    path = Path(path)
    size = _regular_file_size(path)
    if size > max_bytes + METADATA_SLACK_BYTES:
        raise GoldenError(path, f"file is {_size(size)}, over the cap of {_size(max_bytes)} per "
                          "case (raise it with --max-case-mib)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(HDF5_SIGNATURE))
    except OSError as exc:
        raise GoldenError(path, f"cannot read file ({exc.strerror})") from None
    if head != HDF5_SIGNATURE:
        raise GoldenError(path, "not a readable HDF5 file (it does not start with the HDF5 signature)")
    file_damaged = expected_sha256 is not None and sha256_file(path) != expected_sha256
    gc = _read_checked(path, size, check_sha256, max_bytes)  # names the dataset when one is damaged
    if file_damaged:
        raise GoldenError(path, "SHA-256 of the file does not match the manifest (changed or damaged; every "
                          "dataset matches its own checksum, so the damage is in the attributes or the structure)")
    return gc


def _read_sinks(path: Path, f: h5py.File, attrs: dict[str, Any]) -> tuple[float, ...] | None:
    """The values of ``inputs/sinks`` ([Hq] float32) of a case whose attribute ``sinks`` is 1; its
    storage and checksum are checked again with the other datasets."""
    if not attrs["sinks"]:
        return None
    with _h5_errors(path, "unreadable dataset", "inputs/sinks"):
        ds = f.get("inputs/sinks")
        if not isinstance(ds, h5py.Dataset) or ds.shape != (attrs["hq"],) or ds.dtype != np.float32:
            raise GoldenError(path, f"missing or not float32 [{attrs['hq']}] (attribute sinks = 1)", "inputs/sinks")
        values = ds[()]
    if not np.isfinite(values).all():
        raise GoldenError(path, "sink logits must be finite", "inputs/sinks")
    return tuple(float(x) for x in values)


def _read_checked(path: Path, file_size: int, check_sha256: bool, max_bytes: int) -> GoldenCase:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        reason = _h5_reason(exc)
        cut = re.search(r"truncated file: eof = (\d+),.*stored_eof = (\d+)", reason)
        if cut:
            raise GoldenError(path, f"truncated file: {cut.group(1)} of its {cut.group(2)} bytes (an interrupted "
                              "download or copy?)") from None
        raise GoldenError(path, f"not a readable HDF5 file ({reason})") from None
    with f:
        _check_links(path, f)
        attrs = read_attrs(path, f)
        case = case_from_attrs(attrs, _read_sinks(path, f, attrs))
        need = declared_bytes(case)
        if need > max_bytes:
            raise GoldenError(path, f"its attributes declare {_size(need)} of tensors, over the cap of "
                              f"{_size(max_bytes)} per case (raise it with --max-case-mib)")
        dtypes = _expected_dtypes(case)
        arrays: dict[str, np.ndarray] = {}
        for name, shape in _expected_shapes(case).items():
            with _h5_errors(path, "unreadable dataset", name):
                ds = f.get(name)
                if not isinstance(ds, h5py.Dataset):
                    raise GoldenError(path, "missing dataset", name)
                if ds.shape != shape:
                    raise GoldenError(path, f"shape {ds.shape} does not match the case attributes {shape}", name)
                if ds.dtype != dtypes[name]:
                    raise GoldenError(path, f"dtype {ds.dtype} where {dtypes[name]} is expected", name)
            _check_storage(path, name, ds, file_size)
            with _h5_errors(path, "unreadable", name):
                arr = ds[()]
            if check_sha256:
                stored = _attr(path, ds.attrs, "sha256", name)
                if isinstance(stored, bytes | np.bytes_):
                    stored = bytes(stored).decode("ascii", errors="replace")
                actual = data_sha256(arr)
                if stored != actual:
                    raise GoldenError(path, "SHA-256 of the data does not match its 'sha256' attribute", name)
            arrays[name] = arr
    mask = arrays.get("inputs/key_padding_mask")
    grad_out = arrays.get("inputs/grad_out")
    inputs = CaseInputs(
        q=storage_to_tensor(arrays["inputs/q"], case.dtype),
        k=storage_to_tensor(arrays["inputs/k"], case.dtype),
        v=storage_to_tensor(arrays["inputs/v"], case.dtype),
        key_padding_mask=None if mask is None else torch.from_numpy(mask.astype(bool)),
        grad_out=None if grad_out is None else storage_to_tensor(grad_out, case.dtype),
        sinks=None if case.sinks is None else torch.from_numpy(arrays["inputs/sinks"]),
    )
    golden = Golden(out=arrays["expected/out"], lse=arrays["expected/lse"],
                    error_scale=arrays["expected/error_scale"], naive_error=arrays["expected/naive_error"],
                    flops=attrs["flops"])
    gradient = None
    if case.grad:
        gradient = GradientGolden(**{field: arrays[name] for name, field in _GRADIENT_FIELDS.items()},
                                  flops=attrs["grad_flops"])
    return GoldenCase(path=path, case=case, inputs=inputs, golden=golden, attrs=attrs, gradient=gradient)
