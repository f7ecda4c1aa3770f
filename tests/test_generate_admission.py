"""Generation under a host-memory budget (:class:`Admission`): the cases in flight fit the budget,
a case larger than the budget runs alone, smaller cases fill what a large one leaves, the workers'
measured memory (what an idle one kept included) counts and a running case's growth is not counted
twice, and a run with a small budget writes the same bytes as one without, its workers reporting each
case they start; and the CUDA allocator setting of the workers."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import build_case, build_job

import conformance.golden.generate as gen
import conformance.golden.schedule as schedule
from conformance.golden.schedule import Admission, DeviceShare, Job, host_bytes

GIB = 1 << 30


@pytest.fixture
def sized(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Host bytes by case id, set by each test instead of the working-bytes estimate."""
    sizes: dict[str, int] = {}
    monkeypatch.setattr(schedule, "host_bytes", lambda case, device="cpu": sizes[case.id])
    # The workers' own memory is left out here (budget = what the cases may hold) unless a test sets it.
    monkeypatch.setattr(schedule, "HOST_BYTES_PER_WORKER", {"cuda": 0, "cpu": 0})
    monkeypatch.setattr(schedule, "HOST_KERNEL_BYTES_PER_CUDA_WORKER", 0)
    return sizes


def drain(admission: Admission, order: list[str] | None = None, seed: int = 0) -> list[list[str]]:
    """Run ``admission`` to the end, finishing one running job at a time (in a seeded random order);
    returns the ids started at each step and checks the invariants on the way."""
    rng = random.Random(seed)
    running: list[Job] = []
    steps = []
    while True:
        started = admission.next_jobs()
        steps.append([j.case.id for _, j in started])
        running += [j for _, j in started]
        assert running or not any(admission.waiting), "jobs wait while nothing runs"
        if not running:
            return steps
        in_use = sum(schedule.host_bytes(j.case) for j in running)
        assert in_use == admission.in_use
        assert len(running) == 1 or in_use <= admission.budget
        admission.finished(running.pop(rng.randrange(len(running))))


def test_cases_in_flight_fit_the_budget_and_every_case_runs(sized: dict[str, int]) -> None:
    jobs = [build_job(f"c{i}", 4 + i) for i in range(12)]
    sized.update({j.case.id: (1 + i % 5) * GIB for i, j in enumerate(jobs)})
    for seed in range(5):
        admission = Admission([DeviceShare("cpu", 4, list(jobs))], budget=6 * GIB)
        started = [cid for step in drain(admission, seed=seed) for cid in step]
        assert sorted(started) == sorted(j.case.id for j in jobs)


def test_a_case_larger_than_the_budget_runs_alone(sized: dict[str, int]) -> None:
    big, small = build_job("big", 64), build_job("small", 4)
    sized.update(big=10 * GIB, small=1 * GIB)
    admission = Admission([DeviceShare("cuda:0", 4, [small, big])], budget=4 * GIB)
    assert [j.case.id for _, j in admission.next_jobs()] == ["small"]  # big does not fit beside it
    admission.finished(small)
    assert [j.case.id for _, j in admission.next_jobs()] == ["big"]  # nothing runs: big starts alone
    assert admission.next_jobs() == []


def test_smaller_cases_fill_what_the_largest_leaves_and_slots_bound_each_share(sized: dict[str, int]) -> None:
    jobs = [build_job("a", 64), build_job("b", 32), build_job("c", 16), build_job("d", 8), build_job("e", 4)]
    sized.update(a=5 * GIB, b=5 * GIB, c=1 * GIB, d=1 * GIB, e=1 * GIB)
    admission = Admission([DeviceShare("cuda:0", 3, jobs)], budget=8 * GIB)
    assert [j.case.id for _, j in admission.next_jobs()] == ["a", "c", "d"]  # b waits for a; 3 slots
    admission.finished(jobs[2])  # c: one slot, 1 GiB free
    assert [j.case.id for _, j in admission.next_jobs()] == ["e"]
    admission.finished(jobs[0])  # a
    assert [j.case.id for _, j in admission.next_jobs()] == ["b"]


def test_each_device_has_its_own_slots_under_one_budget(sized: dict[str, int]) -> None:
    jobs = [build_job(f"c{i}", 4 + i) for i in range(6)]
    sized.update({j.case.id: 2 * GIB for j in jobs})
    admission = Admission([DeviceShare("cuda:0", 1, jobs[:3]), DeviceShare("cpu", 4, jobs[3:])], budget=6 * GIB)
    shares = [i for i, _ in admission.next_jobs()]
    assert shares == [0, 1, 1]  # one on the GPU's single worker, two more within 6 GiB


OWN = 1  # the pid of the generating process in the metered tests


def test_an_idle_workers_measured_memory_counts(sized: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedule, "HOST_BYTES_PER_WORKER", {"cuda": 0, "cpu": GIB})  # a worker not yet measured
    for kept, admitted in ((4 * GIB + GIB // 2, []), (GIB, ["c"])):
        jobs = [build_job("a", 16), build_job("b", 8), build_job("c", 4)]
        sized.update(a=GIB, b=GIB, c=GIB)
        held = {OWN: 0}
        admission = Admission([DeviceShare("cpu", 2, jobs)], budget=6 * GIB, meter=held.get, own_pid=OWN)
        assert admission.committed() == 2 * GIB  # two workers not yet seen
        assert [j.case.id for _, j in admission.next_jobs()] == ["a", "b"]
        held.update({10: GIB, 11: GIB})
        admission.started("a", 10, GIB)
        admission.started("b", 11, GIB)
        assert admission.committed() == 4 * GIB  # measured 1 + 1, and a's and b's estimates
        admission.finished(jobs[0])
        held[10] = kept  # what a's worker holds after it
        assert admission.committed() == kept + 2 * GIB
        assert [j.case.id for _, j in admission.next_jobs()] == admitted


def test_a_running_cases_growth_is_not_counted_twice(sized: dict[str, int]) -> None:
    jobs = [build_job("a", 16), build_job("b", 8)]
    sized.update(a=3 * GIB, b=GIB)
    held = {OWN: GIB // 4}
    admission = Admission([DeviceShare("cuda:0", 2, jobs)], budget=5 * GIB, meter=held.get, own_pid=OWN)
    assert [j.case.id for _, j in admission.next_jobs()] == ["a", "b"]
    held[10] = GIB
    admission.started("a", 10, GIB)
    assert admission.committed() == GIB // 4 + GIB + 3 * GIB + GIB  # b's worker has not reported
    held[10] = 3 * GIB  # a has grown by 2 GiB of its 3
    assert admission.committed() == GIB // 4 + 3 * GIB + GIB + GIB
    held[10] = 6 * GIB  # beyond its estimate: what it holds counts
    assert admission.committed() == GIB // 4 + 6 * GIB + GIB


def test_a_report_that_arrives_after_its_case_finished_still_makes_its_worker_counted(sized: dict[str, int]) -> None:
    jobs = [build_job("a", 16), build_job("b", 8), build_job("c", 4)]
    sized.update(a=GIB, b=GIB, c=GIB)
    held = {OWN: 0, 10: 3 * GIB}
    admission = Admission([DeviceShare("cpu", 2, jobs)], budget=4 * GIB + GIB // 2, meter=held.get, own_pid=OWN)
    assert [j.case.id for _, j in admission.next_jobs()] == ["a", "b"]
    admission.finished(jobs[0])
    admission.started("a", 10, GIB)  # late: a's result came first
    assert admission.workers == {10: 0}
    assert admission.committed() == 3 * GIB + GIB  # a's worker as measured, and b (not reported yet)
    assert admission.next_jobs() == []  # c does not fit beside them while b runs


def test_without_a_meter_each_worker_counts_its_allowance(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [build_job("a", 16), build_job("b", 8)]
    admission = Admission([DeviceShare("cuda:0", 2, jobs[:1]), DeviceShare("cpu", 3, jobs[1:])], budget=64 * GIB)
    fixed = (schedule.HOST_BYTES_PER_WORKER["cuda"] + schedule.HOST_KERNEL_BYTES_PER_CUDA_WORKER
             + schedule.HOST_BYTES_PER_WORKER["cpu"])  # one worker per share: one job each
    assert admission.committed() == fixed
    admission.next_jobs()
    assert admission.committed() == fixed + host_bytes(jobs[0].case, "cuda:0") + host_bytes(jobs[1].case, "cpu")


def test_resident_bytes_follows_what_a_process_holds() -> None:
    import os

    from conformance.processes import resident_bytes

    before = resident_bytes(os.getpid())
    if before is None:
        pytest.skip("no /proc: the admission falls back to its estimates (tested above)")
    import mmap

    # Fresh anonymous mappings (a heap allocation might reuse pages already resident): private ones
    # count as RssAnon, shared ones as RssShmem; each page touched.
    for flags in (mmap.MAP_PRIVATE, mmap.MAP_SHARED):
        start = resident_bytes(os.getpid())
        block = mmap.mmap(-1, 64 << 20, flags=flags)
        for at in range(0, len(block), mmap.PAGESIZE):
            block[at] = 1
        assert resident_bytes(os.getpid()) - start >= 60 << 20
        block.close()
    assert resident_bytes(2**22 + 12345) is None  # beyond any pid


def test_the_estimate_grows_with_the_working_set() -> None:
    small, large = build_case(sq=16, skv=16), build_case(sq=256, skv=256)
    assert host_bytes(large) > host_bytes(small) >= small.working_bytes
    # On the CPU the float64 stage's blocks are host memory: a larger floor than on a GPU.
    assert host_bytes(small, "cpu") > host_bytes(small, "cuda:0") >= small.working_bytes


def test_a_small_budget_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import SPEC_DIR

    from conformance.golden.generate import generate
    from conformance.spec.load import load_specs

    specs = load_specs([SPEC_DIR / "attention.yaml"])
    specs = [replace(s, cases=[c for c in s.cases if c.id.startswith("attention/gqa/")][:6]) for s in specs]
    one = generate(specs, "smoke", tmp_path / "one", n_workers=1)
    monkeypatch.setattr(gen, "default_host_budget", lambda: 1)  # every case alone
    reports: list[tuple[str, int, int]] = []
    real_started = Admission.started
    monkeypatch.setattr(Admission, "started",
                        lambda self, *report: reports.append(report) or real_started(self, *report))
    two = generate(specs, "smoke", tmp_path / "two", n_workers=2)
    assert len(one.results) == sum(len(s.cases_for_tier("smoke")) for s in specs) >= 3
    assert {r.case_id: r.sha256 for r in one.results} == {r.case_id: r.sha256 for r in two.results}
    assert one.host is None  # one worker: computed in this process, no budget
    assert two.host is not None and two.host.budget == 1 and two.host.waited_s > 0  # every case waited its turn
    assert two.host.measured == (gen.resident_bytes(gen.os.getpid()) is not None)
    if two.host.measured:  # measured admission: each start reported, and what the processes held
        assert two.host.peak > 0
        assert sorted(cid for cid, _, _ in reports) == sorted(r.case_id for r in two.results)
        assert 1 <= len({pid for _, pid, _ in reports}) <= 2 and all(held > 0 for _, _, held in reports)


def test_generate_host_memory_gib_sets_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from conftest import DATA, SPEC_DIR
    from typer.testing import CliRunner

    from conformance.cli.app import app

    budgets = []
    real = gen.run_jobs
    monkeypatch.setattr(gen, "run_jobs", lambda shares, on_done, host_budget=None:
                        budgets.append(host_budget) or real(shares, on_done, host_budget))
    shutil.copy(SPEC_DIR / "presets.yaml", tmp_path / "presets.yaml")
    shutil.copy(DATA / "tiny_attention.yaml", tmp_path / "tiny_attention.yaml")
    spec = ["--spec", str(tmp_path / "tiny_attention.yaml")]
    result = CliRunner().invoke(app, ["generate", *spec, "--out", str(tmp_path / "a"), "-j", "2",
                                      "--host-memory-gib", "1.5"])
    assert result.exit_code == 0, result.output
    assert budgets == [3 << 29]
    flat = " ".join(result.output.replace("│", " ").split())  # the table's cells may wrap
    assert "host memory" in flat and "of the 1.5 GiB budget" in flat
    result = CliRunner().invoke(app, ["generate", *spec, "--out", str(tmp_path / "b"), "--host-memory-gib", "0.1"])
    assert result.exit_code == 2 and "--host-memory-gib" in result.output
    assert not (tmp_path / "b").exists()


def test_cuda_workers_prefer_expandable_segments_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in gen.ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(gen.torch.cuda, "is_initialized", lambda: False)
    assert gen.prefer_expandable_segments()
    assert gen.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert not gen.prefer_expandable_segments()
    assert gen.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")
    assert not gen.prefer_expandable_segments()
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setattr(gen.torch.cuda, "is_initialized", lambda: True)  # too late to configure
    assert not gen.prefer_expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in gen.os.environ


CHILD = """
import os
import sys
from pathlib import Path
import conformance.golden.generate as gen
from conformance.golden.format import Provenance
from conformance.golden.schedule import Job
from conformance.processes import memory_status, release_host_memory
from conformance.spec.load import default_spec_paths, load_specs

def rss_mib():
    return memory_status(os.getpid(), ("VmRSS",))[0] / 2**20

case = next(c for s in load_specs(default_spec_paths()) for c in s.cases
            if c.id == "attention/gqa/hq28-hkv4-d64-b2-sq513-skv513-fp16-causal")
job = Job(case, Provenance(spec_file="t.yaml", spec_sha256="0" * 64, spec_seed=0), Path(sys.argv[2]))
if sys.argv[1] == "worker":
    gen.worker_case(job, "cpu")
    print(rss_mib())
else:
    gen.generate_case(job, "cpu")
    kept = rss_mib()
    release_host_memory()
    print(kept, rss_mib())
"""


def test_a_worker_gives_back_the_host_memory_its_case_freed(tmp_path: Path) -> None:
    """After a 513 x 513 GQA golden a fresh process's heap keeps a few hundred MiB the case freed
    (measured: 0.55 GiB resident after it, 0.27 GiB after a trim); a worker returns them before its
    next case. Each in a fresh process: a process that ran other work first reuses its heap."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux) to read the resident set size")
    import subprocess
    import sys

    def child(mode: str) -> list[float]:
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(tmp_path / f"{mode}.h5")], check=True,
                             capture_output=True, text=True).stdout
        return [float(x) for x in out.split()]

    kept, released = child("plain")
    assert released < kept - 64
    (worker,) = child("worker")
    assert worker < kept - 64
