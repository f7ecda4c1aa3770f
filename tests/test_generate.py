"""Generation and verification: reproducible bytes, the manifest, atomic files, and regeneration."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import SMOKE_GOLDENS, TINY_SPECS, copy_spec_dir

from conformance.errors import GoldenError
from conformance.golden.format import read_golden
from conformance.golden.generate import generate
from conformance.golden.manifest import MANIFEST_NAME, build_manifest, read_manifest, write_manifest
from conformance.golden.verify import regenerate_and_compare, verify
from conformance.spec.load import load_spec

RLK_CONFORM = Path(sys.executable).with_name("rlk-conform")


def golden_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.h5"))}


def manifest_of(root: Path) -> dict[str, Any]:
    return json.loads((root / MANIFEST_NAME).read_text())


def generate_tiny(tmp_path: Path, n_workers: int = 1) -> Path:
    specs_dir = copy_spec_dir(tmp_path / "specs")
    out = tmp_path / "out"
    generate([load_spec(specs_dir / name) for name in TINY_SPECS], "smoke", out, n_workers=n_workers)
    return out


def rewrite_manifest_entry(root: Path, relative: str) -> None:
    """Make the manifest agree with the current bytes of ``relative`` (what a careless edit would do)."""
    manifest = manifest_of(root)
    for entry in manifest["files"]:
        if entry["path"] == relative:
            entry["sha256"] = hashlib.sha256((root / relative).read_bytes()).hexdigest()
            entry["bytes"] = (root / relative).stat().st_size
    write_manifest(root, build_manifest(manifest["tier"], manifest["specs"], manifest["files"]))


# --- reproducibility -------------------------------------------------------------------------------


def test_generating_twice_gives_identical_bytes(tiny_goldens: Path, tmp_path: Path) -> None:
    again = generate_tiny(tmp_path)
    assert golden_files(again) == golden_files(tiny_goldens)


def test_one_and_two_jobs_give_the_same_manifest_files(tiny_goldens: Path, tmp_path: Path) -> None:
    two_jobs = generate_tiny(tmp_path, n_workers=2)
    assert manifest_of(two_jobs)["files"] == manifest_of(tiny_goldens)["files"]


def test_generation_covers_every_smoke_case(tiny_goldens: Path, spec_dir: Path) -> None:
    ids = {c.id for name in TINY_SPECS for c in load_spec(spec_dir / name).cases_for_tier("smoke")}
    assert {p.relative_to(tiny_goldens).with_suffix("").as_posix() for p in tiny_goldens.rglob("*.h5")} == ids


# --- the manifest ----------------------------------------------------------------------------------


def test_manifest_lists_every_file_with_its_sha256(tiny_goldens: Path) -> None:
    listed = {e["path"]: e["sha256"] for e in manifest_of(tiny_goldens)["files"]}
    actual = {path: hashlib.sha256(data).hexdigest() for path, data in golden_files(tiny_goldens).items()}
    assert listed == actual


def test_manifest_names_each_case_and_its_size(tiny_goldens: Path) -> None:
    for entry in manifest_of(tiny_goldens)["files"]:
        assert entry["path"] == f"{entry['case_id']}.h5"
        assert entry["bytes"] == (tiny_goldens / entry["path"]).stat().st_size


def test_manifest_records_the_tier_and_each_spec_hash(tiny_goldens: Path, spec_dir: Path) -> None:
    manifest = manifest_of(tiny_goldens)
    specs = {name: hashlib.sha256((spec_dir / name).read_bytes()).hexdigest() for name in TINY_SPECS}
    assert manifest["tier"] == "smoke"
    assert {name: info["sha256"] for name, info in manifest["specs"].items()} == specs


def test_manifest_reads_back(tiny_goldens: Path) -> None:
    assert read_manifest(tiny_goldens) == manifest_of(tiny_goldens)


# --- verify ----------------------------------------------------------------------------------------


def test_verify_passes_on_a_fresh_directory(tiny_goldens: Path) -> None:
    result = verify(tiny_goldens)
    assert result.ok, result.problems
    assert result.checked == len(manifest_of(tiny_goldens)["files"])


def test_verify_reports_a_modified_file(golden_dir: Path) -> None:
    entry = manifest_of(golden_dir)["files"][0]
    with h5py.File(golden_dir / entry["path"], "r+") as f:
        f["expected/out"][0, 0, 0, 0] += 1
    assert [p.path for p in verify(golden_dir).problems] == [str(golden_dir / entry["path"])]


def test_verify_reports_a_missing_file(golden_dir: Path) -> None:
    entry = manifest_of(golden_dir)["files"][-1]
    (golden_dir / entry["path"]).unlink()
    problems = verify(golden_dir).problems
    assert [(p.path, p.message) for p in problems] == [(str(golden_dir / entry["path"]),
                                                        "listed in the manifest but missing")]


def test_verify_reports_an_unlisted_golden_file(golden_dir: Path) -> None:
    listed = golden_dir / manifest_of(golden_dir)["files"][0]["path"]
    extra = listed.with_name("unlisted.h5")
    shutil.copy(listed, extra)
    assert [p.path for p in verify(golden_dir).problems] == [str(extra)]


def test_verify_reports_a_golden_whose_datasets_and_manifest_disagree(golden_dir: Path) -> None:
    relative = manifest_of(golden_dir)["files"][0]["path"]
    with h5py.File(golden_dir / relative, "r+") as f:
        f["inputs/v"][0, 0, 0, 0] = f["inputs/v"][0, 0, 0, 1]  # dataset sha256 attribute now stale
    rewrite_manifest_entry(golden_dir, relative)
    (problem,) = verify(golden_dir).problems
    assert problem.path == str(golden_dir / relative) and "inputs/v" in problem.message


def test_verify_ignores_leftover_temp_files(golden_dir: Path) -> None:
    listed = golden_dir / manifest_of(golden_dir)["files"][0]["path"]
    leftover = listed.with_name(f".{listed.name}.k3j9x1.tmp")  # what a killed write leaves
    leftover.write_bytes(listed.read_bytes()[:1000])
    assert verify(golden_dir).ok


def test_verify_without_a_manifest_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GoldenError, match="no manifest"):
        verify(tmp_path)


# --- regeneration ----------------------------------------------------------------------------------

COMMITTED = [
    "attention/dtypes/hq2-hkv2-d64-b1-sq65-skv65-bf16-causal.h5",
    "attention/dtypes/hq2-hkv2-d64-b1-sq65-skv65-fp16-noncausal.h5",
    "attention/scale/hq2-hkv1-d64-b1-sq17-skv33-fp32-causal-scale0p0.h5",
    "attention/padding/hq2-hkv1-d64-b2-sq17-skv17-bf16-causal-allmasked.h5",
    "attention/presets/qwen2.5-0.5b-b1-sq5-skv17-bf16-causal.h5",
    "kv_cache_attention/chunked-prefill/hq4-hkv2-d64-b2-past63-new16-bf16-causal.h5",
    "kv_cache_attention/distributions/hq2-hkv1-d64-b1-past63-new2-fp32-causal-neartie.h5",
]


@pytest.mark.parametrize("relative", COMMITTED)
def test_committed_smoke_golden_regenerates_bit_identical(relative: str) -> None:
    assert regenerate_and_compare(read_golden(SMOKE_GOLDENS / relative)) is None


def test_committed_smoke_goldens_match_their_manifest() -> None:
    result = verify(SMOKE_GOLDENS)
    assert result.ok, result.problems[:3]


def test_verify_regenerate_passes_on_a_fresh_directory(tiny_goldens: Path) -> None:
    result = verify(tiny_goldens, regenerate=True)
    assert result.ok, result.problems
    assert result.regenerated == len(manifest_of(tiny_goldens)["files"])


@pytest.mark.parametrize("dataset", ["expected/out", "expected/lse"])
def test_regenerate_catches_a_consistently_altered_golden(golden_dir: Path, dataset: str) -> None:
    relative = manifest_of(golden_dir)["files"][0]["path"]
    with h5py.File(golden_dir / relative, "r+") as f:
        data = f[dataset][()]
        data.reshape(-1)[-1] = np.nextafter(data.reshape(-1)[-1], np.float32(np.inf))
        f[dataset][...] = data
        f[dataset].attrs["sha256"] = np.bytes_(hashlib.sha256(data.tobytes()).hexdigest().encode())
    rewrite_manifest_entry(golden_dir, relative)
    assert verify(golden_dir).ok  # checksums alone cannot see it
    (problem,) = verify(golden_dir, regenerate=True).problems
    assert problem.path == str(golden_dir / relative)
    assert f"dataset {dataset} differs" in problem.message


# --- atomic writes under kill -9 -------------------------------------------------------------------

# The prefill case is computed and written first (more work); the decode case comes second and
# its 64 MiB of inputs keep its temp file on disk long enough to be caught mid-write.
KILL_SPEC = """\
schema_version: 1
op: attention
seed: 3
presets: presets.yaml
families:
  big:
    base: {hq: 8, hkv: 8, d: 128, batch: 1, causal: true, dtype: float32}
    tiers:
      smoke:
        - {sq: 512, skv: 512}
        - {sq: 1, skv: 8192}
"""


@dataclass(frozen=True)
class KilledRun:
    spec: Path
    out: Path


@pytest.fixture(scope="module")
def killed_generation(tmp_path_factory: pytest.TempPathFactory) -> KilledRun:
    """``rlk-conform generate`` killed with SIGKILL while it writes its second golden file."""
    specs_dir = copy_spec_dir(tmp_path_factory.mktemp("kill-specs"))
    spec = specs_dir / "big.yaml"
    spec.write_text(KILL_SPEC)
    out = tmp_path_factory.mktemp("killed") / "out"
    proc = subprocess.Popen([str(RLK_CONFORM), "generate", "--spec", str(spec), "--out", str(out), "--jobs", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # a golden and a temp file beside it: the second write is under way
        while not (any(out.rglob("*.h5")) and any(out.rglob("*.tmp"))):
            assert proc.poll() is None, "generation ended before it could be killed mid-write"
            assert time.monotonic() < deadline, "generation did not reach its second write within 120 s"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return KilledRun(spec, out)


def test_killed_generation_leaves_no_manifest(killed_generation: KilledRun) -> None:
    assert not (killed_generation.out / MANIFEST_NAME).exists()


def test_killed_generation_leaves_only_complete_goldens(killed_generation: KilledRun) -> None:
    out = killed_generation.out
    goldens = sorted(out.rglob("*.h5"))
    assert len(goldens) == 1
    assert all(read_golden(p).case.id == p.relative_to(out).with_suffix("").as_posix() for p in goldens)


def test_temp_files_of_a_killed_generation_are_not_taken_for_goldens(killed_generation: KilledRun,
                                                                     tmp_path: Path) -> None:
    out = Path(shutil.copytree(killed_generation.out, tmp_path / "out"))
    leftovers = sorted(out.rglob(".*.h5.*.tmp"))
    generate([load_spec(killed_generation.spec)], "smoke", out, n_workers=1)
    result = verify(out)
    assert leftovers and all(p.exists() for p in leftovers)
    assert result.ok, result.problems
    assert result.checked == 2


def test_a_case_that_runs_out_of_gpu_memory_waits_and_tries_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    import conformance.golden.generate as gen

    failures = {"left": 2}
    original = gen.compute_case

    def short_of_memory(case: Any, device: str) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(case, device)

    monkeypatch.setattr(gen, "OUT_OF_MEMORY_WAITS_S", (0.0, 0.0, 0.0))
    monkeypatch.setattr(gen, "compute_case", short_of_memory)
    retried = generate_tiny(tmp_path / "retried")
    assert failures["left"] == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "out of memory" in line]
    assert len(notes) == 2 and all(line.startswith("note: ") and "trying again in 0 s" in line for line in notes)
    monkeypatch.setattr(gen, "compute_case", original)
    assert golden_files(retried) == golden_files(generate_tiny(tmp_path / "plain"))


def test_a_case_that_never_gets_the_memory_is_one_error_naming_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import conformance.golden.generate as gen
    from conformance.errors import ConformanceError

    calls = {"n": 0}

    def never(case: Any, device: str) -> Any:
        calls["n"] += 1
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gen, "OUT_OF_MEMORY_WAITS_S", (0.0, 0.0))
    monkeypatch.setattr(gen, "compute_case", never)
    with pytest.raises(ConformanceError, match=r"out of memory on cpu after 3 attempts .* fewer --jobs and --resume"):
        generate_tiny(tmp_path)
    out = tmp_path / "out"
    assert calls["n"] == 3
    assert not list(out.rglob("*.h5")) and not (out / MANIFEST_NAME).exists()
