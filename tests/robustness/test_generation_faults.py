"""Generation under faults: kill -9 at any point, a full disk, two generations on one directory.

- A generation killed with SIGKILL (mid-write, between goldens, during a resume, during the
  manifest write) resumes with ``generate --resume`` and ends byte-identical to an uninterrupted run.
- A full disk gives one error line naming the file, leaves no partial file and the manifest as it
  was. Two ways: a real tmpfs of a few MiB (needs root and mount; skipped otherwise) and, always,
  ENOSPC injected where goldens and the manifest are written (``golden._write``, ``Path.write_text``).
- A second ``generate`` on a directory that one is writing gets a one-line lock error and changes
  nothing; the first finishes normally.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import conformance.golden.format
from conformance.cli.app import app
from conformance.errors import EXIT_BAD_INPUT, EXIT_OK, ConformanceError
from conformance.golden.format import read_golden
from conformance.golden.generate import LOCK_NAME, directory_lock, generate
from conformance.golden.manifest import MANIFEST_NAME
from conformance.spec.load import load_spec

REPO = Path(__file__).resolve().parents[2]
# Eight cases of about 1.6 MiB and 0.1–0.2 s each: long enough to be killed between and inside writes.
SPEC = """\
schema_version: 1
op: attention
seed: 7
presets: presets.yaml
families:
  resume:
    base: {hq: 8, hkv: 1, d: 64, batch: 1, causal: true, dtype: float32, skv: 1024}
    tiers:
      smoke:
        - {sq: [250, 251, 252, 253, 254, 255, 256, 257]}
"""
N_CASES = 8


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spec")
    shutil.copy(REPO / "specs" / "presets.yaml", root / "presets.yaml")
    (root / "resume.yaml").write_text(SPEC)
    return root / "resume.yaml"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, hidden ones included, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(spec: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of an uninterrupted generation."""
    out = tmp_path_factory.mktemp("reference") / "out"
    generate([load_spec(spec)], "smoke", out, n_workers=1)
    files = snapshot(out)
    assert len(files) == N_CASES + 1 and MANIFEST_NAME in files
    return files


def goldens(out: Path) -> list[Path]:
    return sorted(out.rglob("*.h5"))


def temp_files(out: Path) -> list[Path]:
    return sorted(out.rglob(".*.tmp"))


def start(spec: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "conformance", "generate", "--spec", str(spec), "--out",
                             str(out), "--jobs", "1", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 120
    try:
        while not ready():
            assert proc.poll() is None, f"generation ended before it could be killed {what}"
            assert time.monotonic() < deadline, f"generation never got {what}"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def assert_only_complete_goldens(out: Path, spec: Path) -> None:
    """What a kill may leave: complete, valid goldens of the spec, temp files, a stale lock; no manifest."""
    assert not (out / MANIFEST_NAME).exists()
    ids = {c.id for c in load_spec(spec).cases}
    for path in goldens(out):
        assert read_golden(path).case.id in ids


def resume_cli(spec: Path, out: Path) -> Result:
    return CliRunner().invoke(app, ["generate", "--spec", str(spec), "--out", str(out), "--jobs", "1", "--resume"])


def test_generation_killed_at_any_point_resumes_byte_identical(spec: Path, reference: dict[str, bytes],
                                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    # 1. killed inside the first write: a temp file, no golden yet
    kill_when(start(spec, out), lambda: bool(temp_files(out)) and not goldens(out), "inside its first write")
    assert_only_complete_goldens(out, spec)
    assert (out / LOCK_NAME).exists()  # stale: the kernel released the flock with the process
    # 2. a resume, killed inside a write after two more goldens
    kill_when(start(spec, out, "--resume"), lambda: len(goldens(out)) >= 2 and bool(temp_files(out)),
              "inside a write after two goldens")
    assert_only_complete_goldens(out, spec)
    # 3. a second resume, killed between goldens
    kept = len(goldens(out))
    kill_when(start(spec, out, "--resume"), lambda: len(goldens(out)) >= kept + 3, "three goldens further")
    assert_only_complete_goldens(out, spec)
    done = len(goldens(out))
    # 4. the last resume completes
    result = resume_cli(spec, out)
    assert result.exit_code == EXIT_OK, result.stderr
    assert f"{N_CASES} ({done} kept from the interrupted run)" in " ".join(result.stdout.split())
    assert snapshot(out) == reference


def test_generation_killed_while_writing_the_manifest_resumes_byte_identical(reference: dict[str, bytes],
                                                                             spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for relative, data in reference.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        if relative != MANIFEST_NAME:
            (out / relative).write_bytes(data)
    (out / f".{MANIFEST_NAME}.k3j9x1.tmp").write_bytes(reference[MANIFEST_NAME][:100])  # atomic write cut short
    (out / LOCK_NAME).write_text("12345\n")  # left by the killed process
    result = resume_cli(spec, out)
    assert result.exit_code == EXIT_OK, result.stderr
    assert snapshot(out) == reference


def test_resume_recomputes_damaged_and_foreign_goldens(reference: dict[str, bytes], spec: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    for relative, data in reference.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
    first, second, third = goldens(out)[:3]
    first.write_bytes(first.read_bytes()[:5000])  # a non-atomic copy cut short
    shutil.copy(third, second)  # another case under this case's name
    generate([load_spec(spec)], "smoke", out, n_workers=1, resume=True)
    assert snapshot(out) == reference


# --- two generations, one directory ----------------------------------------------------------------


def test_second_generate_on_a_locked_directory_gets_a_clear_error_and_changes_nothing(
        spec: Path, reference: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = start(spec, out)
    try:
        lock = out / LOCK_NAME
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        before = snapshot(out)
        second = CliRunner().invoke(app, ["generate", "--spec", str(spec), "--out", str(out), "--jobs", "1"])
        assert second.exit_code == EXIT_BAD_INPUT
        assert second.stderr.splitlines() == [
            f"error: {out}: another rlk-conform generate (pid {first.pid}) is writing to this directory (lock "
            f"{lock}); wait for it to finish or choose another --out"]
        after = snapshot(out)
        assert all(after[k] == v for k, v in before.items() if k.endswith(".h5"))  # nothing of the first undone
    finally:
        assert first.wait(timeout=120) == 0
    assert snapshot(out) == reference


def test_lock_is_released_and_removed_when_the_generation_ends(tmp_path: Path) -> None:
    with directory_lock(tmp_path) as lock:
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(ConformanceError, match="another rlk-conform generate"), directory_lock(tmp_path):
            pass
    assert not (tmp_path / LOCK_NAME).exists()
    with directory_lock(tmp_path):
        pass


# --- disk full ---------------------------------------------------------------------------------------

DISK_FULL = ("writing the golden failed (No space left on device); no partial file was left, the goldens already "
             f"written are complete and {MANIFEST_NAME} is unchanged; free space and rerun with --resume")
MANIFEST_FULL = ("writing the manifest failed (No space left on device); the previous manifest is unchanged and "
                 "every golden is complete; free space and rerun with --resume")


def generate_cli(spec: Path, out: Path, *extra: str) -> Result:
    return CliRunner().invoke(app, ["generate", "--spec", str(spec), "--out", str(out), "--jobs", "1", *extra])


def assert_one_line_error(result: Result, *, startswith: str, endswith: str) -> None:
    """Exit 2 and one error line, the last on stderr (above it only the progress bar's last state)."""
    assert result.exit_code == EXIT_BAD_INPUT, result.stderr
    lines = result.stderr.splitlines()
    assert all(line.startswith("generate ") for line in lines[:-1]), lines
    assert lines[-1].startswith(startswith) and lines[-1].endswith(endswith), lines[-1]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs: room for three goldens of the spec, not eight. Needs root and mount."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; returns the filler file to delete."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (b"\0" * 65536, b"\0"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def test_real_disk_full_mid_generation_leaves_no_partial_file_and_resumes(small_disk: Path, spec: Path,
                                                                          reference: dict[str, bytes]) -> None:
    out = small_disk / "out"
    result = generate_cli(spec, out)
    assert_one_line_error(result, startswith=f"error: {out}/attention/resume/", endswith=DISK_FULL)
    assert temp_files(out) == [] and not (out / MANIFEST_NAME).exists()
    assert 1 <= len(goldens(out)) < N_CASES
    assert_only_complete_goldens(out, spec)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # free space
    assert generate_cli(spec, out, "--resume").exit_code == EXIT_OK
    assert snapshot(out) == reference


def test_real_disk_full_on_two_devices_is_one_error_and_resumes_to_the_same_bytes(small_disk: Path, spec: Path,
                                                                                  reference: dict[str, bytes]) -> None:
    out = small_disk / "out"
    result = generate_cli(spec, out, "--devices", "cpu,cpu", "--jobs", "2")
    assert_one_line_error(result, startswith=f"error: {out}/attention/resume/", endswith=DISK_FULL)
    assert temp_files(out) == [] and not (out / MANIFEST_NAME).exists()
    assert_only_complete_goldens(out, spec)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert generate_cli(spec, out, "--resume").exit_code == EXIT_OK
    assert snapshot(out) == reference


def test_real_disk_full_in_a_shard_names_its_shard_manifest(small_disk: Path, spec: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    out = small_disk / "out"
    assert generate_cli(spec, out, "--shard", "0/2").exit_code == EXIT_OK
    (out / "manifest.shard-0-of-2.json").unlink()
    fill(small_disk)
    result = generate_cli(spec, out, "--shard", "0/2", "--resume")
    assert_one_line_error(result, startswith=f"error: {out / 'manifest.shard-0-of-2.json'}: ", endswith=MANIFEST_FULL)
    assert temp_files(out) == [] and not (out / "manifest.shard-0-of-2.json").exists()


def test_real_disk_full_when_regenerating_keeps_every_file_as_it_was(small_disk: Path, spec: Path,
                                                                     reference: dict[str, bytes]) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    out = small_disk / "out"
    assert generate_cli(spec, out).exit_code == EXIT_OK
    filler = fill(small_disk)
    result = generate_cli(spec, out)
    assert_one_line_error(result, startswith=f"error: {out}/attention/resume/", endswith=DISK_FULL)
    assert snapshot(out) == reference  # manifest and goldens untouched, no temp file
    (out / MANIFEST_NAME).unlink()  # now only the manifest is missing, and there is no room for it
    result = generate_cli(spec, out, "--resume")
    assert_one_line_error(result, startswith=f"error: {out / MANIFEST_NAME}: ", endswith=MANIFEST_FULL)
    assert temp_files(out) == [] and not (out / MANIFEST_NAME).exists()
    filler.unlink()
    assert generate_cli(spec, out, "--resume").exit_code == EXIT_OK
    assert snapshot(out) == reference


def test_injected_enospc_mid_golden_leaves_no_partial_file(spec: Path, reference: dict[str, bytes], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC raised by the HDF5 write of the third golden, after half of it reached the disk."""
    real_write, calls = conformance.golden.format._write, [0]

    def write_then_fail(tmp: Path, *args: object) -> None:
        calls[0] += 1
        real_write(tmp, *args)
        if calls[0] == 3:
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
            raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: ...\n errno = 28)")
    monkeypatch.setattr(conformance.golden.format, "_write", write_then_fail)
    out = tmp_path / "out"
    result = generate_cli(spec, out)
    assert_one_line_error(result, startswith=f"error: {out}/attention/resume/", endswith=DISK_FULL)
    assert len(goldens(out)) == 2 and temp_files(out) == [] and not (out / MANIFEST_NAME).exists()
    monkeypatch.undo()
    assert generate_cli(spec, out, "--resume").exit_code == EXIT_OK
    assert snapshot(out) == reference


def test_injected_enospc_in_the_manifest_keeps_the_previous_manifest(spec: Path, reference: dict[str, bytes],
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    for relative, data in reference.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
    (out / MANIFEST_NAME).write_text('{"previous": true}\n')
    real_write_text = Path.write_text

    def half_then_enospc(self: Path, data: str, *args: object, **kw: object) -> int:
        real_write_text(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Path, "write_text", half_then_enospc)
    result = generate_cli(spec, out, "--resume")
    assert_one_line_error(result, startswith=f"error: {out / MANIFEST_NAME}: ", endswith=MANIFEST_FULL)
    assert (out / MANIFEST_NAME).read_text() == '{"previous": true}\n' and temp_files(out) == []
