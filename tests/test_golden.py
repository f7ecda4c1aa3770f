"""Golden HDF5 files: round trip, storage types, integrity checks and the atomic write."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import build_case

from conformance.errors import GoldenError
from conformance.files import atomic_path
from conformance.golden.format import Provenance, read_golden, write_golden
from conformance.reference.compute import compute_reference
from conformance.spec.case import Case
from conformance.spec.inputs import make_inputs

PROVENANCE = Provenance(spec_file="tiny.yaml", spec_sha256="0" * 64, spec_seed=17)

CASES = {
    "bfloat16-holes": build_case(batch=2, hq=4, hkv=2, sq=3, skv=5, dtype="bfloat16", mask="holes"),
    "float16-right-pad": build_case(batch=3, sq=4, skv=4, dtype="float16", mask="right_pad", scale=0.5),
    "float32": build_case(hq=2, hkv=2, sq=2, skv=6, causal=False),
    "kv-cache-bfloat16": build_case(op="kv_cache_attention", hq=4, hkv=1, sq=2, skv=7, dtype="bfloat16"),
}


def write_case(case: Case, path: Path) -> Path:
    inputs = make_inputs(case)
    write_golden(path, case, inputs, compute_reference(case, inputs), PROVENANCE)
    return path


@pytest.fixture
def golden_file(tmp_path: Path) -> Path:
    """A bfloat16 golden with a key_padding_mask."""
    return write_case(CASES["bfloat16-holes"], tmp_path / "case.h5")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_read_golden_returns_the_case_that_was_written(case: Case, tmp_path: Path) -> None:
    assert read_golden(write_case(case, tmp_path / "case.h5")).case == case


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_read_golden_returns_the_inputs_bit_for_bit(case: Case, tmp_path: Path) -> None:
    back = read_golden(write_case(case, tmp_path / "case.h5")).inputs
    inputs = make_inputs(case)
    for name in ("q", "k", "v"):
        got, want = getattr(back, name), getattr(inputs, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    if case.mask == "none":
        assert back.key_padding_mask is None
    else:
        assert torch.equal(back.key_padding_mask, inputs.key_padding_mask)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_read_golden_returns_the_expected_arrays_bit_for_bit(case: Case, tmp_path: Path) -> None:
    back = read_golden(write_case(case, tmp_path / "case.h5")).golden
    golden = compute_reference(case, make_inputs(case))
    for name in ("out", "lse", "error_scale", "naive_error"):
        assert getattr(back, name).tobytes() == getattr(golden, name).tobytes(), name
    assert (back.flops, back.stats.double_double, back.stats.exact) == \
           (golden.flops, golden.stats.double_double, golden.stats.exact)


def test_bfloat16_inputs_are_stored_as_their_uint16_bits(golden_file: Path) -> None:
    inputs = make_inputs(CASES["bfloat16-holes"])
    with h5py.File(golden_file, "r") as f:
        stored = f["inputs/q"][()]
        element_type = f["inputs/q"].attrs["element_type"]
    assert stored.dtype == np.uint16 and element_type == b"bfloat16"
    assert np.array_equal(stored, inputs.q.view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("case_name, storage", [("float16-right-pad", np.float16), ("float32", np.float32)])
def test_float16_and_float32_inputs_are_stored_natively(case_name: str, storage: type, tmp_path: Path) -> None:
    case = CASES[case_name]
    path = write_case(case, tmp_path / "case.h5")
    with h5py.File(path, "r") as f:
        assert {f[n].dtype for n in ("inputs/q", "inputs/k", "inputs/v")} == {np.dtype(storage)}
        assert np.array_equal(f["inputs/v"][()], make_inputs(case).v.numpy())


def test_key_padding_mask_is_stored_as_uint8(golden_file: Path) -> None:
    with h5py.File(golden_file, "r") as f:
        mask = f["inputs/key_padding_mask"][()]
    assert mask.dtype == np.uint8
    assert np.array_equal(mask, make_inputs(CASES["bfloat16-holes"]).key_padding_mask.numpy().astype(np.uint8))


def test_expected_arrays_are_stored_as_float32_and_float64(golden_file: Path) -> None:
    with h5py.File(golden_file, "r") as f:
        dtypes = {n: f[f"expected/{n}"].dtype for n in ("out", "lse", "error_scale", "naive_error")}
    assert dtypes == {"out": np.float32, "lse": np.float32, "error_scale": np.float64, "naive_error": np.float64}


def test_every_dataset_carries_the_sha256_of_its_bytes(golden_file: Path) -> None:
    with h5py.File(golden_file, "r") as f:
        names: list[str] = []
        f.visit(names.append)
        datasets = [n for n in names if isinstance(f[n], h5py.Dataset)]
        assert len(datasets) == 8
        for name in datasets:
            data = np.ascontiguousarray(f[name][()]).tobytes()
            assert f[name].attrs["sha256"].decode() == hashlib.sha256(data).hexdigest(), name


def test_writing_the_same_golden_twice_gives_identical_bytes(tmp_path: Path) -> None:
    a = write_case(CASES["float16-right-pad"], tmp_path / "a.h5")
    b = write_case(CASES["float16-right-pad"], tmp_path / "b.h5")
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("dataset", ["inputs/q", "inputs/k", "inputs/v", "inputs/key_padding_mask", "expected/out",
                                     "expected/lse", "expected/error_scale", "expected/naive_error"])
def test_changed_element_is_reported_with_its_dataset(golden_file: Path, dataset: str) -> None:
    with h5py.File(golden_file, "r+") as f:
        data = f[dataset][()]
        flat = data.reshape(-1)
        flat[0] = 1 - flat[0] if data.dtype == np.uint8 else flat[0] + 1  # the sha256 attribute is kept
        f[dataset][...] = data
    with pytest.raises(GoldenError) as info:
        read_golden(golden_file)
    assert info.value.dataset == dataset
    assert info.value.file == str(golden_file)
    assert dataset in str(info.value)


def test_check_sha256_false_reads_a_changed_dataset(golden_file: Path) -> None:
    with h5py.File(golden_file, "r+") as f:
        f["expected/out"][0, 0, 0, 0] = 42.0
    assert read_golden(golden_file, check_sha256=False).golden.out[0, 0, 0, 0] == 42.0


def test_unsupported_schema_version_is_refused(golden_file: Path) -> None:
    with h5py.File(golden_file, "r+") as f:
        f.attrs["schema_version"] = np.int64(99)
    with pytest.raises(GoldenError, match="schema_version 99"):
        read_golden(golden_file)


def test_file_that_is_not_hdf5_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.h5"
    path.write_text("this is not an HDF5 file\n")
    with pytest.raises(GoldenError, match="not a readable HDF5 file") as info:
        read_golden(path)
    assert info.value.file == str(path)


def test_truncated_file_is_refused(golden_file: Path) -> None:
    data = golden_file.read_bytes()
    golden_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(GoldenError):
        read_golden(golden_file)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GoldenError, match="file not found"):
        read_golden(tmp_path / "absent.h5")


def test_missing_dataset_is_reported_by_name(golden_file: Path) -> None:
    with h5py.File(golden_file, "r+") as f:
        del f["expected/lse"]
    with pytest.raises(GoldenError, match="missing dataset") as info:
        read_golden(golden_file)
    assert info.value.dataset == "expected/lse"


def test_dataset_shape_that_contradicts_the_attributes_is_refused(golden_file: Path) -> None:
    with h5py.File(golden_file, "r+") as f:
        f.attrs["sq"] = np.int64(4)
    with pytest.raises(GoldenError, match="does not match the case attributes"):
        read_golden(golden_file)


# --- atomic_path -----------------------------------------------------------------------------------


def test_atomic_path_replaces_the_target_when_the_block_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "out.h5"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


def test_atomic_path_leaves_the_target_untouched_when_the_block_raises(tmp_path: Path) -> None:
    target = tmp_path / "out.h5"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


def test_atomic_path_creates_nothing_when_the_block_raises(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.h5"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("interrupted")
    assert list(target.parent.iterdir()) == []


def test_atomic_path_temp_file_is_hidden_beside_the_target(tmp_path: Path) -> None:
    target = tmp_path / "out.h5"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".out.h5.") and tmp.name.endswith(".tmp")
        tmp.write_text("x")


def test_atomic_path_gives_the_target_the_permissions_of_a_new_file(tmp_path: Path) -> None:
    reference = tmp_path / "plain.txt"
    reference.write_text("x")  # created through open(): mode 0666 & ~umask
    target = tmp_path / "out.h5"
    with atomic_path(target) as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
