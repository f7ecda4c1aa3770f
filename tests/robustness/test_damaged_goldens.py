"""Damaged and hostile golden files: refused with one message naming file and dataset, never judged.

Each test damages copies of committed smoke goldens (truncation, flipped bits, a wrong schema,
missing or mistyped attributes and datasets, shapes that would exhaust memory, links and storage
that point outside the file, files that are not HDF5 at all) and asserts what ``read_golden``,
``verify`` and ``run`` say — and that the intact cases beside a damaged one are judged as before.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import run_backend
from faulty_backends import Tracking
from typer.testing import CliRunner

from conformance.cli.app import app
from conformance.errors import EXIT_BAD_INPUT, EXIT_FAILURE, GoldenError
from conformance.files import sha256_file
from conformance.golden.format import DEFAULT_MAX_CASE_BYTES, read_golden
from conformance.golden.manifest import manifest_checksums, select_cases
from conformance.golden.verify import verify
from conformance.run.settings import RunSettings
from conformance.spec.tolerances import load_tolerances

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "goldens" / "smoke"
TOLERANCES = load_tolerances(REPO / "specs" / "tolerances.yaml")
# Small committed goldens: an attention case with a padding mask, a KV-cache case, a decode case.
MASKED = "attention/padding/hq2-hkv1-d64-b2-sq17-skv17-bf16-causal-allmasked.h5"
KV = "kv_cache_attention/decode/hq4-hkv1-d64-b2-past63-new1-bf16-causal.h5"
DECODE_FILTER = "attention/decode/*"
DATASETS = ("inputs/q", "inputs/k", "inputs/v", "inputs/key_padding_mask", "expected/out", "expected/lse",
            "expected/error_scale", "expected/naive_error")


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    """A private copy of one committed golden (with a key padding mask, so all eight datasets)."""
    path = tmp_path / Path(MASKED).name
    shutil.copy(SMOKE / MASKED, path)
    return path


@pytest.fixture
def golden_dir(tmp_path: Path) -> Path:
    """A private copy of the committed smoke tier (files and manifest)."""
    return Path(shutil.copytree(SMOKE, tmp_path / "smoke"))


def refusal(path: Path, **kw: Any) -> GoldenError:
    with pytest.raises(GoldenError) as info:
        read_golden(path, **kw)
    err = info.value
    assert err.file == str(path)
    assert "\n" not in str(err)
    return err


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def data_offset(path: Path, dataset: str) -> int:
    with h5py.File(path, "r") as f:
        return int(f[dataset].id.get_offset())


def edit(path: Path, change: Callable[[h5py.File], None]) -> None:
    with h5py.File(path, "r+") as f:
        change(f)


def replace_dataset(f: h5py.File, name: str, **create: Any) -> None:
    """Recreate ``name`` with other storage, keeping its attributes (so only the storage is wrong)."""
    attrs = dict(f[name].attrs)
    del f[name]
    ds = f.create_dataset(name, **create)
    for key, value in attrs.items():
        ds.attrs[key] = value


# --- truncation and flipped bits -------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 8, 512, 0.5, -1], ids=["empty", "signature-only", "512-bytes", "half",
                                                             "last-byte-missing"])
def test_truncated_file_is_refused_with_a_one_line_reason(golden: Path, keep: float) -> None:
    data = golden.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    golden.write_bytes(data[:n])
    err = refusal(golden)
    if n >= 512:
        assert err.reason == f"truncated file: {n} of its {len(data)} bytes (an interrupted download or copy?)"


@pytest.mark.parametrize("dataset", DATASETS)
def test_flipped_bit_in_a_dataset_names_that_dataset(golden: Path, dataset: str) -> None:
    flip_bit(golden, data_offset(golden, dataset) + 1, bit=3)
    err = refusal(golden)
    assert (err.dataset, err.reason) == (dataset, "SHA-256 of the data does not match its 'sha256' attribute")
    assert str(err) == f"{golden}::{dataset}: {err.reason}"


def test_every_single_bit_flip_anywhere_is_refused_against_the_manifest(golden: Path) -> None:
    """300 flips spread over the whole file (metadata included): each is one GoldenError, none crashes."""
    original = golden.read_bytes()
    checksum = hashlib.sha256(original).hexdigest()
    rng = np.random.default_rng(20261126)
    reasons: set[str] = set()
    for offset, bit in zip(rng.integers(0, len(original), 300), rng.integers(0, 8, 300)):
        golden.write_bytes(original)
        flip_bit(golden, int(offset), int(bit))
        reasons.add(refusal(golden, expected_sha256=checksum).reason.split(" (")[0])
    assert len(reasons) > 5  # data checksums, attributes, structure: the messages say which


# --- schema, attributes, datasets ------------------------------------------------------------------


def test_other_schema_version_is_refused_before_anything_else(golden: Path) -> None:
    def future(f: h5py.File) -> None:
        f.attrs["schema_version"] = np.int64(5)
        del f.attrs["batch"]  # a later schema may lay the file out differently: the version speaks first
    edit(golden, future)
    assert refusal(golden).reason == "schema_version 5 is not supported (this rlk-conform reads 3, 4)"


@pytest.mark.parametrize("attribute", ["format", "schema_version", "case_id", "dtype", "batch", "hq", "scale",
                                       "causal", "split_points", "seed", "mask"])
def test_missing_attribute_is_named(golden: Path, attribute: str) -> None:
    edit(golden, lambda f: f.attrs.__delitem__(attribute))
    assert refusal(golden).reason == f"missing attribute '{attribute}'"


WRONG_TYPES = [
    ("batch", np.bytes_(b"three"), "attribute 'batch' must be an integer, found bytes_"),
    ("hq", np.array([2, 2], dtype=np.int64),
     "attribute 'hq' must be an integer, found an array of int64 with shape (2,)"),
    ("hkv", np.float64(1.0), "attribute 'hkv' must be an integer, found float64"),
    ("dtype", np.int64(16), "attribute 'dtype' must be a string, found int64"),
    ("causal", np.float32(0.5), "attribute 'causal' must be an integer, found float32"),
    ("causal", np.uint8(7), "attribute 'causal' must be 0 or 1, found 7"),
    ("scale", np.bytes_(b"0.125"), "attribute 'scale' must be a finite float, found bytes_ b'0.125'"),
    ("scale", np.float64(np.inf), "attribute 'scale' must be a finite float, found float64 inf"),
    ("split_points", np.array([[1.5]]), "attribute 'split_points' must be a list of integers, found an array of "
                                        "float64 with shape (1, 1)"),
    ("case_id", np.bytes_(b"\xff\xfe"), "attribute 'case_id' is not valid UTF-8"),
]


@pytest.mark.parametrize(("attribute", "value", "message"), WRONG_TYPES,
                         ids=[f"{a}-{type(v).__name__}-{i}" for i, (a, v, _) in enumerate(WRONG_TYPES)])
def test_attribute_of_the_wrong_type_is_named(golden: Path, attribute: str, value: Any, message: str) -> None:
    edit(golden, lambda f: f.attrs.__setitem__(attribute, value))
    assert refusal(golden).reason == message


BAD_VALUES = [
    ("dtype", np.bytes_(b"float64"), "attribute 'dtype' = 'float64' is invalid: expected one of float32, bfloat16, "
                                     "float16"),
    ("op", np.bytes_(b"matmul"), "attribute 'op' = 'matmul' is invalid: expected one of attention, "
                                 "kv_cache_attention"),
    ("hkv", np.int64(0), "attribute 'hkv' = 0 is invalid: must be at least 1"),
    ("hkv", np.int64(3), "attribute 'hkv' = 3 is invalid: hq=2 is not a multiple of it"),
    ("case_id", np.bytes_(b"../../etc/passwd"), "attribute 'case_id' = '../../etc/passwd' is invalid: a case id is "
                                                "letters, digits, '.', '_', '-' and '/'"),
    ("s_past", np.int64(4), "attribute 's_past' = 4 is invalid: the attention op stores s_past = s_new = -1 and no "
                            "split_points"),
]


@pytest.mark.parametrize(("attribute", "value", "message"), BAD_VALUES, ids=[f"{a}-{i}" for i, (a, _, _) in
                                                                            enumerate(BAD_VALUES)])
def test_attribute_with_an_impossible_value_is_named(golden: Path, attribute: str, value: Any, message: str) -> None:
    edit(golden, lambda f: f.attrs.__setitem__(attribute, value))
    assert refusal(golden).reason == message


def test_oversized_attribute_is_refused_before_it_is_read(golden: Path, tmp_path: Path) -> None:
    # Attributes over 64 KiB need HDF5's dense attribute storage: rebuild the file in the latest format.
    rebuilt = tmp_path / "rebuilt.h5"
    with h5py.File(golden, "r") as src, h5py.File(rebuilt, "w", libver="latest") as dst:
        for group in src:
            src.copy(src[group], dst, group)
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        dst.attrs["generator"] = np.bytes_(b"x" * 200_000)
    shutil.move(rebuilt, golden)
    assert refusal(golden).reason == "attribute 'generator' declares 200000 bytes (at most 65536)"


@pytest.mark.parametrize("dataset", DATASETS)
def test_missing_dataset_is_named(golden: Path, dataset: str) -> None:
    edit(golden, lambda f: f.__delitem__(dataset))
    err = refusal(golden)
    assert (err.dataset, err.reason) == (dataset, "missing dataset")


def test_dataset_of_the_wrong_dtype_is_named(golden: Path) -> None:
    edit(golden, lambda f: replace_dataset(f, "expected/lse", data=f["expected/lse"][()].astype(np.float64)))
    err = refusal(golden)
    assert (err.dataset, err.reason) == ("expected/lse", "dtype float64 where float32 is expected")


def test_declared_shape_over_the_cap_is_refused_before_allocating(golden: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Attributes and datasets agree on 2**20 × 32 × 4096 × 128 elements (32 TiB): storage never
    written, so the file stays small and reading it would allocate the whole declared size."""
    def huge(f: h5py.File) -> None:
        f.attrs["batch"], f.attrs["hq"], f.attrs["hkv"] = np.int64(2**20), np.int64(32), np.int64(32)
        f.attrs["sq"], f.attrs["skv"], f.attrs["head_dim"] = np.int64(4096), np.int64(4096), np.int64(128)
        for name in DATASETS:
            ds = f[name]
            shape = (2**20, 32, 4096, 128)[: ds.ndim] if name != "inputs/key_padding_mask" else (2**20, 4096)
            replace_dataset(f, name, shape=shape, dtype=ds.dtype)
    edit(golden, huge)
    assert golden.stat().st_size < 1_000_000

    def no_read(self: h5py.Dataset, *args: Any) -> None:
        raise AssertionError(f"dataset {self.name} was read")
    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_read)
    err = refusal(golden)
    declared = 2**20 * 32 * (4096 * 128 * (2 + 2 * 2 + 4) + 4096 * (4 + 8 + 8)) + 2**20 * 4096
    assert err.reason == (f"its attributes declare {declared / 2**20:,.1f} MiB of tensors, over the cap of "
                          f"{DEFAULT_MAX_CASE_BYTES / 2**20:,.1f} MiB per case (raise it with --max-case-mib)")


def test_cap_is_configurable(golden: Path) -> None:
    assert read_golden(golden, max_bytes=1024**2).case.batch == 2
    err = refusal(golden, max_bytes=1024)
    b, hq, hkv, s, d = 2, 2, 1, 17, 64  # bf16 q, k, v; uint8 mask; fp32 out, lse; fp64 error scales
    declared = 2 * (b * hq * s * d + 2 * b * hkv * s * d) + b * s + 4 * (b * hq * s * d + b * hq * s) + 16 * b * hq * s
    assert err.reason == (f"its attributes declare {declared} bytes of tensors, over the cap of 1024 bytes per case "
                          "(raise it with --max-case-mib)")


# --- links and storage that leave the file ---------------------------------------------------------


def test_external_link_is_refused_and_never_followed(golden: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as g:
        g["data"] = np.zeros((2, 2, 17, 64), np.float32)
    opened = []
    real_file = h5py.File

    def watch(name: Any, *args: Any, **kw: Any) -> h5py.File:
        opened.append(Path(name))
        return real_file(name, *args, **kw)

    edit(golden, lambda f: (f.__delitem__("expected/out"),
                            f.__setitem__("expected/out", h5py.ExternalLink(str(outside), "/data"))))
    monkeypatch.setattr(h5py, "File", watch)
    err = refusal(golden)
    assert (err.dataset, err.reason) == ("expected/out", f"external link to {outside}:/data refused (a golden file "
                                                         "must be self-contained)")
    assert opened == [golden]


def test_soft_link_is_refused(golden: Path) -> None:
    edit(golden, lambda f: (f.__delitem__("inputs/v"), f.__setitem__("inputs/v", h5py.SoftLink("/inputs/k"))))
    err = refusal(golden)
    assert (err.dataset, err.reason) == ("inputs/v", "soft link to /inputs/k refused (a golden holds plain datasets)")


def test_virtual_dataset_pointing_outside_is_refused(golden: Path, tmp_path: Path) -> None:
    outside = tmp_path / "passwords.h5"
    with h5py.File(outside, "w") as g:
        g["secret"] = np.ones((2, 2, 17, 64), np.float32)

    def virtual(f: h5py.File) -> None:
        layout = h5py.VirtualLayout(shape=(2, 2, 17, 64), dtype=np.float32)
        layout[...] = h5py.VirtualSource(str(outside), "secret", shape=(2, 2, 17, 64))
        attrs = dict(f["expected/out"].attrs)
        del f["expected/out"]
        ds = f.create_virtual_dataset("expected/out", layout)
        for key, value in attrs.items():
            ds.attrs[key] = value
    edit(golden, virtual)
    err = refusal(golden)
    assert (err.dataset, err.reason) == ("expected/out", "virtual dataset refused (its data would come from other "
                                                         "files)")


def test_external_raw_storage_is_refused(golden: Path, tmp_path: Path) -> None:
    outside = tmp_path / "raw.bin"
    outside.write_bytes(b"\0" * (2 * 2 * 17 * 4))
    edit(golden, lambda f: replace_dataset(f, "expected/lse", shape=(2, 2, 17), dtype=np.float32,
                                           external=[(str(outside), 0, h5py.h5f.UNLIMITED)]))
    err = refusal(golden)
    assert (err.dataset, err.reason) == ("expected/lse", "external raw-data storage refused (a golden file must be "
                                                         "self-contained)")


def test_compressed_chunked_dataset_is_refused(golden: Path) -> None:
    edit(golden, lambda f: replace_dataset(f, "expected/out", data=f["expected/out"][()], chunks=True,
                                           compression="gzip"))
    err = refusal(golden)
    assert (err.dataset, err.reason) == ("expected/out", "chunked storage refused (golden datasets are contiguous "
                                                         "and unfiltered)")


# --- not HDF5 at all -------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("content", ["text", "png", "pickle", "json"])
def test_non_hdf5_file_with_the_right_name_is_refused_and_nothing_runs(tmp_path: Path, content: str) -> None:
    path = tmp_path / "hq2-hkv1-d64-b1-sq5-skv17-bf16-causal.h5"
    marker = tmp_path / "code-ran"
    path.write_bytes({"text": b"404 Not Found\n", "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
                      "pickle": pickle.dumps(_RunsCode(marker)),
                      "json": json.dumps({"format": "rlk-conform-golden"}).encode()}[content])
    assert refusal(path).reason == "not a readable HDF5 file (it does not start with the HDF5 signature)"
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_golden_path_that_is_not_a_regular_file_is_refused_without_opening(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "case.h5"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    assert refusal(path).reason == "not a regular file"


def test_package_never_unpickles_or_evaluates() -> None:
    """No pickle, marshal, shelve, eval, exec, unsafe yaml or numpy/torch loaders in conformance/."""
    banned_modules = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
    banned_calls = {"eval", "exec", "compile", "__import__"}
    banned_attrs = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("np", "load"),
                    ("numpy", "load"), ("torch", "load"), ("yaml", "Loader"), ("yaml", "UnsafeLoader")}
    found = []
    for source in sorted((REPO / "conformance").rglob("*.py")):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and
                                                        node.module else [])
                found += [f"{source.name}: import {n}" for n in names if n.split(".")[0] in banned_modules]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in banned_calls:
                found.append(f"{source.name}:{node.lineno}: {node.func.id}()")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    (node.value.id, node.attr) in banned_attrs:
                found.append(f"{source.name}:{node.lineno}: {node.value.id}.{node.attr}")
            elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                found.append(f"{source.name}:{node.lineno}: allow_pickle=")
    assert found == []


# --- verify and run --------------------------------------------------------------------------------


def test_verify_names_file_and_dataset_of_every_damaged_golden(golden_dir: Path) -> None:
    flip = golden_dir / MASKED
    flip_bit(flip, data_offset(flip, "inputs/k") + 5)
    truncated = golden_dir / KV
    full = truncated.read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    result = CliRunner().invoke(app, ["verify", str(golden_dir)])
    assert result.exit_code == EXIT_FAILURE
    fails = sorted(line for line in result.stdout.splitlines() if line.startswith("FAIL "))
    assert fails == sorted([
        f"FAIL {flip}: dataset inputs/k: SHA-256 of the data does not match its 'sha256' attribute",
        f"FAIL {truncated}: file is {len(full) // 2} bytes, the manifest says {len(full)} (truncated); truncated "
        f"file: {len(full) // 2} of its {len(full)} bytes (an interrupted download or copy?)",
    ])
    assert "Traceback" not in result.stdout + result.stderr


def settings(checks: tuple[str, ...] = ("accuracy", "contract")) -> RunSettings:
    return RunSettings(tolerances=TOLERANCES, checks=checks)


def test_run_refuses_the_damaged_case_and_judges_the_others_as_before(golden_dir: Path) -> None:
    paths = select_cases(golden_dir, DECODE_FILTER)
    before = run_backend(Tracking(), paths, settings(), checksums=manifest_checksums(golden_dir)).records
    damaged = paths[3]
    flip_bit(damaged, data_offset(damaged, "expected/out") + 2)
    result = run_backend(Tracking(), paths, settings(), checksums=manifest_checksums(golden_dir))
    (refused,) = [r for r in result.records if r.case_id == damaged.relative_to(golden_dir).with_suffix("").as_posix()]
    assert (refused.status, refused.check) == ("error", "accuracy")
    assert refused.message == (f"golden file refused, nothing judged: {damaged}::expected/out: SHA-256 of the data "
                               "does not match its 'sha256' attribute")
    assert result.refused == 1 and result.cases == len(paths)
    others = [r.to_json() for r in result.records if r is not refused]
    assert others == [r.to_json() for r in before if r.case_id != refused.case_id]


def test_run_never_judges_a_golden_whose_attributes_were_changed(golden_dir: Path) -> None:
    """Datasets intact, 'causal' flipped: only the manifest's file checksum can tell, and it is used."""
    path = select_cases(golden_dir, DECODE_FILTER)[0]
    edit(path, lambda f: f.attrs.__setitem__("causal", np.uint8(0)))
    result = run_backend(Tracking(), [path], settings(), checksums=manifest_checksums(golden_dir))
    (record,) = result.records
    assert record.status == "error" and "SHA-256 of the file does not match the manifest" in record.message


def test_run_cli_exits_two_when_every_selected_golden_is_refused(golden_dir: Path, tmp_path: Path) -> None:
    paths = select_cases(golden_dir, DECODE_FILTER)
    for path in paths:
        path.write_bytes(path.read_bytes()[:600])
    report = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["run", "--backend", "sdpa-math", "--goldens", str(golden_dir), "--filter",
                                      DECODE_FILTER, "--checks", "accuracy,contract", "--report-json", str(report),
                                      "--tolerances", str(REPO / "specs" / "tolerances.yaml")])
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.splitlines()[-1] == (
        f"error: {golden_dir}: every selected golden file ({len(paths)}) was refused as damaged, so nothing was "
        f"judged; run 'rlk-conform verify {golden_dir}' to see why")
    records = json.loads(report.read_text())["records"]
    assert len(records) == len(paths)
    assert all(r["status"] == "error" and r["message"].startswith("golden file refused, nothing judged: ") and
               "truncated file: 600 of its" in r["message"] for r in records)


def test_run_refuses_cases_over_the_cap_and_judges_the_rest(golden_dir: Path) -> None:
    paths = select_cases(golden_dir, "attention/presets/*")
    cap = 100_000
    big = {p for p in paths if read_golden(p).golden.out.nbytes * 2 > cap}
    result = run_backend(Tracking(), paths, settings(("accuracy",)), max_case_bytes=cap)
    refused = [r for r in result.records if r.message.startswith("golden file refused")]
    assert big and len(refused) == result.refused == len(big)
    assert all("of tensors, over the cap of 100000 bytes per case (raise it with --max-case-mib)" in r.message
               for r in refused)
    assert all(r.status == "pass" for r in result.records if r not in refused)


def test_manifest_checksum_of_an_intact_tier_matches(golden_dir: Path) -> None:
    sums = manifest_checksums(golden_dir)
    assert all(sha256_file(p) == s for p, s in sums.items())
    assert verify(golden_dir).ok
