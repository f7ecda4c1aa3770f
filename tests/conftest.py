"""Shared fixtures: the repository's specs, tiny specs in tmp_path, and hand-built cases and inputs."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import conformance
from conformance.golden.format import Provenance
from conformance.golden.generate import generate
from conformance.golden.schedule import Job
from conformance.spec.case import Case
from conformance.spec.inputs import TORCH_DTYPES, CaseInputs
from conformance.spec.load import OpSpec, default_spec_paths, load_spec, load_specs

REPO = Path(conformance.__file__).resolve().parents[1]
SPEC_DIR = REPO / "specs"
SMOKE_GOLDENS = REPO / "goldens" / "smoke"
#: How many cases the committed smoke tier holds, in all and per op directory (tests count, never hard-code).
# Goldens (.h5) and packed/paged layout files (.json, the manifest aside).
SMOKE_CASES = len(list(SMOKE_GOLDENS.rglob("*.h5"))) + len(list(SMOKE_GOLDENS.rglob("*_attention/**/*.json")))
SMOKE_ATTENTION_CASES = len(list((SMOKE_GOLDENS / "attention").rglob("*.h5")))
DATA = Path(__file__).resolve().parent / "data"
TINY_SPECS = ("tiny_attention.yaml", "tiny_kv_cache.yaml")

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # Each xdist worker is one of several processes on the machine's cores: one torch thread each (and
    # in the rlk-conform processes they start), or the OpenMP pools oversubscribe the cores and the
    # suite runs twice as long.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def repo_specs() -> list[OpSpec]:
    """specs/attention.yaml and specs/kv_cache_attention.yaml, loaded once."""
    return load_specs(default_spec_paths(SPEC_DIR))


@pytest.fixture(scope="session")
def smoke_cases(repo_specs: list[OpSpec]) -> dict[str, Case]:
    """Every smoke case of the repository's specs, by id."""
    return {c.id: c for s in repo_specs for c in s.cases_for_tier("smoke")}


# --- spec files in tmp_path ------------------------------------------------------------------------


def copy_spec_dir(target: Path) -> Path:
    """Copy the tiny specs of tests/data and specs/presets.yaml (which they name) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(SPEC_DIR / "presets.yaml", target / "presets.yaml")
    for name in TINY_SPECS:
        shutil.copy(DATA / name, target / name)
    return target


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    """A directory holding tiny_attention.yaml, tiny_kv_cache.yaml and presets.yaml."""
    return copy_spec_dir(tmp_path / "specs")


def line_of(text: str, marker: str) -> int:
    """1-based line of the only line of ``text`` that contains ``marker``."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if marker in line]
    assert len(hits) == 1, f"marker {marker!r} must occur on exactly one line, found {hits}"
    return hits[0]


def edit_spec(path: Path, old: str, new: str) -> str:
    """Replace the single occurrence of ``old`` in the spec at ``path``; return the new text.

    Lone surrogates in ``new`` are written as the raw bytes they stand for (surrogateescape), so a
    test can plant bytes that are not UTF-8.
    """
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} must occur exactly once in {path.name}"
    text = text.replace(old, new)
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    return text


@dataclass(frozen=True)
class BrokenSpec:
    """A spec file with one defect and where the loader must point."""

    path: Path
    line: int
    field: str | None
    reason: str  # a fragment the reason must contain
    memory_cap_mib: int


@dataclass(frozen=True)
class Defect:
    name: str
    spec: str  # file in tests/data
    old: str
    new: str
    marker: str  # text on the line the error must name
    field: str | None
    reason: str
    memory_cap_mib: int = 8192


DEFECTS = [
    Defect("unknown-key", "tiny_attention.yaml", "sq: 3, skv: 5, dtype: float32}",
           "sq: 3, skv: 5, dtype: float32, colour: red}", "colour: red",
           "families.small.tiers.smoke[0].colour", "unknown key"),
    Defect("unknown-top-level-key", "tiny_attention.yaml", "seed: 12345\n", "seed: 12345\nauthor: someone\n",
           "author: someone", "author", "unknown key"),
    Defect("misspelled-dtype", "tiny_attention.yaml", "dtype: bfloat16, causal: false",
           "dtype: bfloat61, causal: false", "bfloat61", "families.small.tiers.smoke[1].dtype", "bfloat61"),
    Defect("hq-not-divisible-by-hkv", "tiny_attention.yaml", "{hq: 4, hkv: 1, sq: 7", "{hq: 4, hkv: 3, sq: 7",
           "hkv: 3", "families.small.tiers.standard[0].hkv", "not divisible"),
    Defect("zero-size", "tiny_attention.yaml", "sq: 5, skv: 3", "sq: 0, skv: 3", "sq: 0",
           "families.small.tiers.smoke[1].sq", "greater than 0"),
    Defect("negative-batch", "tiny_attention.yaml", "d: 8, batch: 3", "d: 8, batch: -3", "batch: -3",
           "families.masked.base.batch", "greater than 0"),
    Defect("negative-head-dim", "tiny_attention.yaml", "base: {d: 8, batch: 2", "base: {d: -8, batch: 2", "d: -8",
           "families.small.base.d", "greater than 0"),
    Defect("sq-differs-from-s-new", "tiny_kv_cache.yaml", "{s_past: 3, s_new: 4, dtype: float32}",
           "{s_past: 3, s_new: 4, sq: 5, dtype: float32}", "sq: 5", "families.chunk.tiers.smoke[0].sq",
           "must equal s_new"),
    Defect("over-memory-cap", "tiny_attention.yaml", "{hq: 4, hkv: 1, sq: 7, skv: 7, dtype: float16}",
           "{hq: 4, hkv: 1, sq: 2048, skv: 2048, dtype: float16}", "sq: 2048",
           "families.small.tiers.standard[0]", "memory cap", memory_cap_mib=1),
    Defect("duplicate-key", "tiny_attention.yaml", "seed: 12345\n", "seed: 12345\nseed: 999\n", "seed: 999",
           "seed", "duplicate key"),
    Defect("malformed-yaml", "tiny_attention.yaml", "{mask: [right_pad, all_masked], dtype: float16}",
           "{mask: [right_pad, all_masked, dtype: float16}", "all_masked, dtype", None, "malformed YAML"),
    Defect("unknown-preset", "tiny_attention.yaml", "{hq: 4, hkv: 1, sq: 7, skv: 7, dtype: float16}",
           "{preset: qwen9-99b, sq: 7, skv: 7, dtype: float16}", "qwen9-99b",
           "families.small.tiers.standard[0].preset", "unknown preset"),
    Defect("split-offset-equals-s-new", "tiny_kv_cache.yaml", "split_offsets: [0, 2]", "split_offsets: [0, 4]",
           "split_offsets", "families.chunk.base.split_offsets", "split offset 4"),
    Defect("split-offset-beyond-s-new", "tiny_kv_cache.yaml", "split_offsets: [0, 2]", "split_offsets: [0, 9]",
           "split_offsets", "families.chunk.base.split_offsets", "split offset 9"),
    Defect("non-utf8", "tiny_attention.yaml", "description: padding masks", "description: padding \udcff masks",
           "padding \udcff masks", None, "UTF-8"),
]


@pytest.fixture(params=DEFECTS, ids=lambda d: d.name)
def broken_spec(request: pytest.FixtureRequest, spec_dir: Path) -> BrokenSpec:
    """Each defect the spec loader must report, written into a copy of a tiny spec."""
    defect: Defect = request.param
    path = spec_dir / defect.spec
    text = edit_spec(path, defect.old, defect.new)
    return BrokenSpec(path, line_of(text, defect.marker), defect.field, defect.reason, defect.memory_cap_mib)


# --- hand-built cases and inputs --------------------------------------------------------------------


def build_case(*, op: str = "attention", batch: int = 1, hq: int = 2, hkv: int = 1, d: int = 8, sq: int = 3,
               skv: int = 5, dtype: str = "float32", causal: bool = True, scale: float | None = None,
               mask: str = "none", dist: str = "normal", seed: int = 1, s_past: int | None = None) -> Case:
    """A Case built directly (not from a spec); its id spells out every parameter."""
    if op == "kv_cache_attention" and s_past is None:
        s_past = skv - sq
    parts = [f"hq{hq}-hkv{hkv}-d{d}-b{batch}-sq{sq}-skv{skv}", dtype, "causal" if causal else "noncausal", mask,
             dist, f"scale{scale}", f"seed{seed}"]
    return Case(id=f"{op}/handmade/" + "-".join(parts), op=op, family="handmade", tier="smoke", batch=batch, hq=hq,
                hkv=hkv, d=d, sq=sq, skv=skv, dtype=dtype, causal=causal, scale=scale, mask=mask, dist=dist,
                seed=seed, s_past=s_past, split_points=() if s_past is None else (s_past,))


def build_job(name: str, sq: int) -> Job:
    """A generation job whose case's estimated work grows with ``sq`` squared; ``name`` is its case id
    (and sorts its ties)."""
    from dataclasses import replace

    return Job(replace(build_case(sq=sq, skv=sq), id=name), Provenance(spec_file="t.yaml", spec_sha256="0" * 64,
                                                                       spec_seed=0), Path(f"{name}.h5"))


def build_inputs(case: Case, q: Sequence | np.ndarray, k: Sequence | np.ndarray, v: Sequence | np.ndarray,
                 key_padding_mask: Sequence | np.ndarray | None = None) -> CaseInputs:
    """CaseInputs from nested lists or arrays of values exactly representable in ``case.dtype``."""

    def tensor(x: Sequence | np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        as64 = torch.tensor(np.asarray(x, dtype=np.float64))
        t = as64.to(TORCH_DTYPES[case.dtype])
        assert tuple(t.shape) == shape, f"expected shape {shape}, got {tuple(t.shape)}"
        assert torch.equal(t.to(torch.float64), as64), "values must be exact in the case dtype"
        return t

    kv_shape = (case.batch, case.hkv, case.skv, case.d)
    mask = None if key_padding_mask is None else torch.tensor(np.asarray(key_padding_mask, dtype=bool))
    return CaseInputs(tensor(q, (case.batch, case.hq, case.sq, case.d)), tensor(k, kv_shape), tensor(v, kv_shape),
                      mask)


# --- an independent float64 formula -----------------------------------------------------------------


def visible_keys(case: Case, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Bool [batch, 1, sq, skv]: CONTRACT.md's bottom-right causal rule and the padding mask, written out."""
    i = torch.arange(case.sq)[:, None]
    j = torch.arange(case.skv)[None, :]
    keep = torch.ones(case.batch, 1, case.sq, case.skv, dtype=torch.bool)
    if case.causal:
        keep = keep & (j <= i + (case.skv - case.sq))
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    return keep


def float64_attention(case: Case, inputs: CaseInputs) -> tuple[np.ndarray, np.ndarray]:
    """Textbook float64 attention: (out [B, Hq, Sq, D], lse [B, Hq, Sq]); fully masked rows give 0, -inf."""
    k = inputs.k.double().repeat_interleave(case.group, dim=1)
    v = inputs.v.double().repeat_interleave(case.group, dim=1)
    scale = 1.0 / math.sqrt(case.d) if case.scale is None else case.scale
    scores = (inputs.q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible_keys(case, inputs.key_padding_mask), -math.inf)
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    out = (weights @ v) / torch.where(total > 0, total, torch.ones_like(total))
    lse = (top + torch.log(total)).squeeze(-1)
    return out.numpy(), lse.numpy()


# --- generated goldens -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_goldens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke tier of the tiny specs, generated once per session. Copy it before changing it."""
    specs_dir = copy_spec_dir(tmp_path_factory.mktemp("tiny-specs"))
    specs = [load_spec(specs_dir / name) for name in TINY_SPECS]
    out = tmp_path_factory.mktemp("tiny-goldens") / "smoke"
    generate(specs, "smoke", out, n_workers=1)
    return out


@pytest.fixture
def golden_dir(tiny_goldens: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny smoke goldens that a test may change."""
    return Path(shutil.copytree(tiny_goldens, tmp_path / "goldens"))


def run_backend(backend: object, paths: Sequence[Path], settings: object, compare_to: object | None = None, *,
                checksums: dict[Path, str] | None = None, max_case_bytes: int | None = None, timer: object = None,
                on_case: object = None, on_outcome: object = None) -> object:
    """The run loop over ``paths`` with ``backend`` judged in this process, or in its worker when it is a
    started IsolatedBackend (then ``compare_to`` must be None: the worker loads it)."""
    from conformance.golden.format import DEFAULT_MAX_CASE_BYTES
    from conformance.run.case import in_process_judge
    from conformance.run.isolation import IsolatedBackend
    from conformance.run.loop import run
    from conformance.run.profiling import NO_TIMER

    cap = DEFAULT_MAX_CASE_BYTES if max_case_bytes is None else max_case_bytes
    timer = NO_TIMER if timer is None else timer
    if isinstance(backend, IsolatedBackend):
        assert compare_to is None
        judge = backend.case_judge(settings, timer, cap, checksums)  # type: ignore[arg-type]
    else:
        judge = in_process_judge(backend, settings, compare_to, timer=timer, max_case_bytes=cap,  # type: ignore[arg-type]
                                 checksums=checksums)
    return run(paths, judge, on_case=on_case, on_outcome=on_outcome)  # type: ignore[arg-type]


def is_variant_case(case_id: str) -> bool:
    """Whether the case id names an attention variant (window, soft-capping, sinks)."""
    from conformance.spec.case import parse_case_id

    params = parse_case_id(case_id) or {}
    return params.get("window", (-1, -1)) != (-1, -1) or bool(params.get("softcap")) or bool(params.get("sinks"))


def expected_variant_skip(record: Any) -> bool:
    """A variant case skipped by a backend that does not implement the variant (with the reason)."""
    return record.status == "skip" and is_variant_case(record.case_id) and any(
        why in record.message for why in ("attention variant", "cannot soft-cap", "no attention sinks"))
