"""Generation split over devices (``generate --devices``) and hosts (``generate --shard i/n`` then
``merge-goldens``): the same bytes as one run on one device, and one-line errors that write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import DATA, SPEC_DIR, build_job
from typer.testing import CliRunner, Result

from conformance.cli.app import app
from conformance.golden import schedule
from conformance.golden.generate import LOCK_NAME, remove_stale_temp_files
from conformance.golden.manifest import MANIFEST_NAME, shard_manifest_name
from conformance.golden.schedule import default_workers, split_jobs, worker_counts
from conformance.golden.verify import verify

# A kv_cache_attention spec whose two goldens are also packed and paged: the layout files are part
# of what shards and merge must reproduce.
PACKED_SPEC = """\
schema_version: 1
op: kv_cache_attention
seed: 7
presets: presets.yaml
families:
  packed:
    base: {hq: 2, hkv: 1, d: 8, batch: 2, s_past: 0, causal: true, dtype: float32}
    tiers:
      smoke:
        - {s_new: [3, 5]}
    layouts:
      smoke:
        - {layout: varlen, packs: [[1x3, 1x5]]}
        - {layout: paged, packs: [[1x3, 1x5]], page_sizes: [4]}
"""


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (the lock aside) by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def assert_one_line_error(result: Result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--spec`` arguments: tests/data/tiny_attention.yaml and the packed spec above."""
    root = tmp_path_factory.mktemp("split-specs")
    shutil.copy(SPEC_DIR / "presets.yaml", root / "presets.yaml")
    shutil.copy(DATA / "tiny_attention.yaml", root / "tiny_attention.yaml")
    (root / "packed.yaml").write_text(PACKED_SPEC)
    return ["--spec", str(root / "tiny_attention.yaml"), "--spec", str(root / "packed.yaml")]


def generate(specs: list[str], out: Path, *args: str) -> Result:
    result = invoke("generate", *specs, "--out", out, *args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def whole(specs: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of one unsharded run on one device, one worker."""
    out = tmp_path_factory.mktemp("whole") / "out"
    generate(specs, out, "--jobs", "1")
    return tree(out)


@pytest.fixture(scope="module")
def shard_dirs(specs: list[str], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Shards 0/2 and 1/2, each generated into a directory of its own (as on two hosts)."""
    dirs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"host{i}") / "out"
        generate(specs, out, "--jobs", "1", "--shard", f"{i}/2")
        dirs.append(out)
    return dirs


def copied_together(dirs: list[Path], target: Path) -> Path:
    for d in dirs:
        shutil.copytree(d, target, dirs_exist_ok=True)
    return target


# --- --devices ----------------------------------------------------------------------------------------


def test_two_cpu_devices_write_the_bytes_of_a_one_device_run(specs: list[str], whole: dict[str, bytes],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a short --out keeps the summary table's rows whole
    result = generate(specs, Path("out"), "--devices", "cpu,cpu", "--jobs", "2")
    assert tree(tmp_path / "out") == whole
    assert MANIFEST_NAME in whole and any(name.endswith(".json") and "/" in name for name in whole)
    assert "(2 jobs, cpu,cpu)" in result.stdout
    assert "cpu: 3 computed, 1 job; cpu: 4 computed, 1 job" in result.stdout  # the LPT split of the 7 goldens


def test_the_split_is_largest_first_to_the_least_loaded_device_ties_by_device_order() -> None:
    jobs = [build_job("a", 4), build_job("b", 512), build_job("c", 256), build_job("d", 256), build_job("e", 4)]
    shares = split_jobs(jobs, ["cuda:0", "cuda:1"], 3)
    assert [[j.case.id for j in s.jobs] for s in shares] == [["b"], ["a", "c", "d", "e"]]  # b outweighs the rest
    assert [s.workers for s in shares] == [2, 1]
    # b, then c before d (equal work: by case id), then a to cuda:1 (tied with cuda:2: device order), e to cuda:2
    three = split_jobs(jobs, ["cuda:0", "cuda:1", "cuda:2"], 1)
    assert [[j.case.id for j in s.jobs] for s in three] == [["b"], ["a", "c"], ["d", "e"]]


def test_jobs_are_spread_evenly_over_the_devices_at_least_one_each() -> None:
    assert worker_counts(5, 2) == [3, 2]
    assert worker_counts(4, 4) == [1, 1, 1, 1]
    assert worker_counts(1, 3) == [1, 1, 1]
    assert worker_counts(7, 1) == [7]


GIB = 1 << 30


def own_bytes(counts: list[int], devices: list[str]) -> int:
    """The workers' own memory the default rule allows for: per worker, its allowance (and the kernel's, CUDA)."""
    return sum(c * (schedule.HOST_BYTES_PER_WORKER["cuda" if d.startswith("cuda") else "cpu"]
                    + (schedule.HOST_KERNEL_BYTES_PER_CUDA_WORKER if d.startswith("cuda") else 0))
               for c, d in zip(counts, devices))


def test_default_jobs_are_one_per_core_on_the_cpu() -> None:
    assert default_workers(["cpu"], 24 * GIB, 16) == 16
    assert default_workers(["cpu"], 24 * GIB, 2) == 2
    assert default_workers(["cpu", "cpu"], 24 * GIB, 6) == 6


def test_default_jobs_on_one_gpu_are_capped_per_device() -> None:
    assert default_workers(["cuda:0"], 24 * GIB, 16) == schedule.CUDA_WORKERS_PER_DEVICE == 8
    assert default_workers(["cuda:0"], 24 * GIB, 4) == 4  # fewer cores than the cap


@pytest.mark.parametrize(("devices", "budget"), [(["cuda:0", "cuda:1"], 24 * GIB), (["cuda:0", "cpu"], 24 * GIB),
                                                 (["cpu"], 2 * GIB), (["cuda:0"], 8 * GIB)])
def test_default_jobs_leave_half_the_host_budget_to_the_cases(devices: list[str], budget: int) -> None:
    n = default_workers(devices, budget, 16)
    assert n < 16
    assert own_bytes(worker_counts(n, len(devices)), devices) <= budget // 2
    more = worker_counts(n + 1, len(devices))
    assert (own_bytes(more, devices) > budget // 2
            or any(c > schedule.CUDA_WORKERS_PER_DEVICE for c, d in zip(more, devices) if d.startswith("cuda")))


def test_default_jobs_are_at_least_one_per_device() -> None:
    assert default_workers(["cpu"], GIB // 2, 16) == 1
    assert worker_counts(default_workers(["cuda:0", "cuda:1", "cpu"], GIB, 16), 3) == [1, 1, 1]


def test_generate_without_jobs_takes_the_default(specs: list[str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Four cores but a 1 GiB host budget: half of it holds one CPU worker's own memory, so one job."""
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    result = generate(specs, tmp_path / "out", "--host-memory-gib", "1")
    assert "(1 job, cpu)" in result.stdout
    assert default_workers(["cpu"], GIB, 4) == 1


@pytest.mark.parametrize(("args", "expected"), [
    (["--devices", "cpu,,cpu"], "--devices 'cpu,,cpu': expected a comma-separated list of torch devices"),
    (["--devices", "gpu0"], "--devices: 'gpu0' is not a torch device"),
    (["--devices", "cpu,cpu", "--device", "cpu"], "--devices cannot be combined with --device"),
    (["--shard", "2/2"], "--shard '2/2': expected i/n with 0 <= i < n"),
], ids=["empty-item", "not-a-device", "with-device", "bad-shard"])
def test_bad_device_and_shard_options_are_one_line_errors_that_write_nothing(specs: list[str], tmp_path: Path,
                                                                            args: list[str], expected: str) -> None:
    result = invoke("generate", *specs, "--out", tmp_path / "out", "--jobs", "1", *args)
    assert_one_line_error(result, expected)
    assert not (tmp_path / "out").exists()


# --- --shard and merge-goldens -----------------------------------------------------------------------


def test_shards_merged_give_the_files_and_manifest_of_an_unsharded_run(shard_dirs: list[Path],
                                                                       whole: dict[str, bytes],
                                                                       tmp_path: Path) -> None:
    assert not any((d / MANIFEST_NAME).exists() for d in shard_dirs)  # a shard writes its shard manifest only
    merged = copied_together(shard_dirs, tmp_path / "merged")
    result = invoke("merge-goldens", merged)
    assert result.exit_code == 0, result.output
    files = tree(merged)
    shard_names = [shard_manifest_name((i, 2)) for i in range(2)]
    assert {name: data for name, data in files.items() if name not in shard_names} == whole
    assert verify(merged).ok


def test_each_shard_holds_case_k_of_the_sorted_case_ids_with_k_mod_n_equal_to_its_index(
        shard_dirs: list[Path], whole: dict[str, bytes]) -> None:
    ids = sorted(e["case_id"] for e in json.loads(whole[MANIFEST_NAME])["files"] if e["path"].endswith(".h5"))
    for i, d in enumerate(shard_dirs):
        shard = json.loads((d / shard_manifest_name((i, 2))).read_text())
        assert [e["case_id"] for e in shard["files"]] == ids[i::2]
        assert shard["shard"] == {"index": i, "count": 2} and shard["cases"]["count"] == len(ids)
        assert sorted(p.relative_to(d).with_suffix("").as_posix() for p in d.rglob("*.h5")) == ids[i::2]
        assert len(shard["layouts"]) == 2 and all((d / e["path"]).is_file() for e in shard["layouts"])


def test_a_shard_split_over_devices_and_resumed_writes_the_same_shard(specs: list[str], shard_dirs: list[Path],
                                                                      tmp_path: Path) -> None:
    out = Path(shutil.copytree(shard_dirs[1], tmp_path / "out"))
    (out / shard_manifest_name((1, 2))).unlink()
    for dropped in sorted(out.rglob("*.h5"))[:2]:
        dropped.unlink()  # what an interrupted run leaves: some goldens, no manifest
    result = generate(specs, out, "--shard", "1/2", "--resume", "--devices", "cpu,cpu", "--jobs", "2")
    assert tree(out) == tree(shard_dirs[1])
    assert "(1 kept from the interrupted run)" in " ".join(result.stdout.split())


def test_a_stale_shard_manifest_temp_file_is_removed_on_resume(tmp_path: Path) -> None:
    stale = tmp_path / f".{shard_manifest_name((0, 2))}.x1y2z3.tmp"
    other = tmp_path / ".notes.txt.x1y2z3.tmp"
    stale.write_text("{")
    other.write_text("")
    assert remove_stale_temp_files(tmp_path) == 1
    assert not stale.exists() and other.exists()


def merge_refused(directory: Path, expected: str) -> None:
    before = tree(directory)
    assert_one_line_error(invoke("merge-goldens", directory), expected)
    assert tree(directory) == before  # nothing written
    assert not (directory / MANIFEST_NAME).exists()


def test_merge_without_every_shard_names_the_missing_one(shard_dirs: list[Path], tmp_path: Path) -> None:
    merged = copied_together(shard_dirs[:1], tmp_path / "merged")
    merge_refused(merged, f"{merged}: missing shard(s) 1/2 (manifest.shard-1-of-2.json; have 0/2)")


def test_merge_refuses_a_repeated_shard(shard_dirs: list[Path], tmp_path: Path) -> None:
    merged = copied_together(shard_dirs, tmp_path / "merged")
    first, second = (merged / shard_manifest_name((i, 2)) for i in range(2))
    shutil.copy(first, second)  # the name says 1/2, the content 0/2
    merge_refused(merged, f"{second}: shard 0/2 is given twice ({first} and {second})")


def test_merge_refuses_a_golden_changed_after_its_shard_was_written(shard_dirs: list[Path], tmp_path: Path) -> None:
    merged = copied_together(shard_dirs, tmp_path / "merged")
    entry = json.loads((merged / shard_manifest_name((1, 2))).read_text())["files"][0]
    path = merged / entry["path"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    merge_refused(merged, f"{path}: SHA-256 does not match {merged / shard_manifest_name((1, 2))} (changed after")


def test_merge_refuses_a_missing_layout_file(shard_dirs: list[Path], tmp_path: Path) -> None:
    merged = copied_together(shard_dirs, tmp_path / "merged")
    layout = next(merged.rglob("varlen_attention/**/*.json"))
    layout.unlink()
    merge_refused(merged, f"{layout}: listed in {merged / shard_manifest_name((0, 2))} but missing")


def test_merge_refuses_shards_of_other_specs(specs: list[str], shard_dirs: list[Path], tmp_path: Path) -> None:
    spec_dir = Path(shutil.copytree(Path(specs[1]).parent, tmp_path / "specs"))
    edited = spec_dir / "packed.yaml"
    edited.write_text(edited.read_text().replace("seed: 7", "seed: 8"))
    other = tmp_path / "other"
    generate(["--spec", str(spec_dir / "tiny_attention.yaml"), "--spec", str(edited)], other, "--jobs", "1",
             "--shard", "1/2")
    merged = copied_together([shard_dirs[0], other], tmp_path / "merged")
    merge_refused(merged, f"{merged / shard_manifest_name((1, 2))}: specs differ from "
                          f"{merged / shard_manifest_name((0, 2))} (not a shard of the same generation)")


def test_merge_refuses_shards_of_splits_of_another_count(specs: list[str], shard_dirs: list[Path],
                                                         tmp_path: Path) -> None:
    merged = copied_together(shard_dirs, tmp_path / "merged")
    generate(specs, merged, "--jobs", "1", "--shard", "2/3")
    merge_refused(merged, "shard 2/3 is of a generation split 3 ways")


def test_merge_of_a_directory_without_shards_is_one_line(tmp_path: Path) -> None:
    merge_refused(tmp_path, f"{tmp_path}: no shard manifest (manifest.shard-<i>-of-<n>.json) here")


# --- help ---------------------------------------------------------------------------------------------


def test_help_lists_the_new_options_and_the_merge_command() -> None:
    generate_help = invoke("generate", "--help")
    assert generate_help.exit_code == 0
    for option in ("--devices", "--shard", "merge-goldens", "at least one per device"):
        assert option in " ".join(generate_help.stdout.split()), option
    assert "merge-goldens" in invoke("--help").stdout
    merge_help = invoke("merge-goldens", "--help")
    assert merge_help.exit_code == 0 and "exactly once" in " ".join(merge_help.stdout.split())
