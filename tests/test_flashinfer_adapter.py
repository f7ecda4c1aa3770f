"""The FlashInfer adapters over a stand-in ``flashinfer`` module with FlashInfer 0.7.2's call
signatures (its decode ``plan`` forwarding ``**kwargs`` to ``_plan_impl``, ``fixed_split_size`` only
on tensor cores, no CUDA-core kernel for some GQA group sizes), computing each sequence's attention
in float32 from the CSR page layout it is given. The whole smoke layout set then runs through
the real harness on the CPU: what the adapters hand FlashInfer (pages, ``indptr``, the last page's
length, ``cu_seqlens``, ``window_left``, the batch-invariant settings) is checked end to end, and the
real kernels' own bits are judged on a GPU (docs/results)."""

from __future__ import annotations

import dataclasses
import sys
import types
from collections import Counter
from typing import Any

import pytest
import torch
from conftest import build_case, run_backend
from test_layouts import LAYOUT_CASES, failing, run_layouts
from test_run import SMOKE, TOLERANCES

from conformance.backends import flashinfer as fi
from conformance.backends import validate_backend
from conformance.backends.contract import BackendUnavailable, KernelUnavailable
from conformance.golden.manifest import select_cases
from conformance.run.settings import RunSettings

# The GQA group sizes FlashInfer 0.7.2's CUDA-core decode has kernels for (it raised on Qwen2.5-7B's 7).
CUDA_CORE_GROUPS = (1, 2, 3, 4, 8)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window_left: int,
           scale: float | None, softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One sequence: ``q [sq, Hq, D]``, ``k, v [skv, Hkv, D]``, bottom-right causal and window, the
    soft-cap on the scaled logits and the sinks in the denominator, float32."""
    sq, hq, d = q.shape
    skv, hkv = k.shape[:2]
    kk, vv = (t.float().repeat_interleave(hq // hkv, 1) for t in (k, v))
    s = torch.einsum("qhd,khd->hqk", q.float(), kk) * (d ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    diag = torch.arange(sq)[:, None] + (skv - sq)
    j = torch.arange(skv)[None, :]
    seen = torch.ones(sq, skv, dtype=torch.bool)
    if causal:
        seen &= j <= diag
    if window_left >= 0:
        seen &= j >= diag - window_left
    s = s.masked_fill(~seen, float("-inf"))
    if sinks is not None:  # one more column per row, the head's sink logit, dropped after the softmax
        s = torch.cat([s, sinks.float()[:, None, None].expand(hq, sq, 1)], -1)
    p = s.softmax(-1).nan_to_num(0.0)[..., :skv]
    return torch.einsum("hqk,khd->qhd", p, vv).to(q.dtype)


def paged_keys(pages: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, last: torch.Tensor,
               b: int) -> torch.Tensor:
    """Sequence ``b``'s keys from FlashInfer's CSR page layout: its pages in order, the last one cut."""
    own = indices[int(indptr[b]):int(indptr[b + 1])].long()
    page_size = pages.shape[1]
    n = (len(own) - 1) * page_size + int(last[b])
    return pages[own].reshape(-1, *pages.shape[2:])[:n]


class FakeFlashInfer:
    """The three wrappers, recording every plan's settings in ``plans``."""

    def __init__(self) -> None:
        self.plans: list[dict[str, Any]] = []
        fake = self

        class Decode:
            def __init__(self, workspace: torch.Tensor, kv_layout: str, use_tensor_cores: bool = False) -> None:
                assert kv_layout == "NHD" and workspace.dtype == torch.uint8
                self.tc = use_tensor_cores

            def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                     *deprecated: Any, **kwargs: Any) -> None:
                assert not deprecated
                self._plan_impl(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                                **kwargs)

            def _plan_impl(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
                           pos_encoding_mode: str = "NONE", window_left: int = -1, q_data_type=None,
                           kv_data_type=None, sm_scale=None, fixed_split_size=None,
                           disable_split_kv: bool = False) -> None:
                if fixed_split_size is not None and not self.tc:
                    raise ValueError("fixed_split_size is only supported by tensor core decode for now.")
                group = num_qo_heads // num_kv_heads
                if not self.tc and group not in CUDA_CORE_GROUPS:
                    raise RuntimeError(f"Error in function 'operator()' at batch_decode.cu:63: Unsupported "
                                       f"group_size: {group}")
                fake.plans.append({"wrapper": "decode", "tensor_cores": self.tc, "window_left": window_left,
                                   "fixed_split_size": fixed_split_size, "sm_scale": sm_scale,
                                   "pos_encoding_mode": pos_encoding_mode})
                self.layout = (indptr, indices, last_page_len, window_left, sm_scale)

            def run(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
                indptr, indices, last, wl, scale = self.layout
                return torch.cat([attend(q[b:b + 1], paged_keys(kv[0], indptr, indices, last, b),
                                         paged_keys(kv[1], indptr, indices, last, b), causal=True,
                                         window_left=wl, scale=scale) for b in range(len(last))])

        class PagedPrefill:
            def __init__(self, workspace: torch.Tensor, kv_layout: str) -> None:
                assert kv_layout == "NHD"

            def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                     num_kv_heads, head_dim_qk, page_size, *, causal=False, sm_scale=None, window_left=-1,
                     logits_soft_cap=None, q_data_type=None, kv_data_type=None, fixed_split_size=None,
                     disable_split_kv=False) -> None:
                fake.plans.append({"wrapper": "paged", "causal": causal, "window_left": window_left,
                                   "disable_split_kv": disable_split_kv, "logits_soft_cap": logits_soft_cap})
                self.layout = (qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, causal,
                               window_left, sm_scale, logits_soft_cap)

            def run(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], *,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
                qo, indptr, indices, last, causal, wl, scale, cap = self.layout
                if sinks is not None:
                    assert sinks.dtype == torch.float32 and sinks.shape == q.shape[1:2]
                    fake.plans[-1]["sinks"] = True
                return torch.cat([attend(q[int(qo[b]):int(qo[b + 1])], paged_keys(kv[0], indptr, indices, last, b),
                                         paged_keys(kv[1], indptr, indices, last, b), causal=causal,
                                         window_left=wl, scale=scale, softcap=cap, sinks=sinks)
                                  for b in range(len(last))])

        class Ragged:
            def __init__(self, workspace: torch.Tensor, kv_layout: str) -> None:
                assert kv_layout == "NHD"

            def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo=None, *,
                     causal=False, window_left=-1, sm_scale=None, q_data_type=None, kv_data_type=None,
                     fixed_split_size=None, disable_split_kv=False) -> None:
                fake.plans.append({"wrapper": "ragged", "causal": causal, "window_left": window_left,
                                   "disable_split_kv": disable_split_kv})
                self.layout = (qo_indptr, kv_indptr, causal, window_left, sm_scale)

            def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                qo, kvp, causal, wl, scale = self.layout
                return torch.cat([attend(q[int(qo[b]):int(qo[b + 1])], k[int(kvp[b]):int(kvp[b + 1])],
                                         v[int(kvp[b]):int(kvp[b + 1])], causal=causal, window_left=wl,
                                         scale=scale) for b in range(len(qo) - 1)])

        class SinkWrapper(PagedPrefill):
            """0.7.2's BatchAttentionWithAttentionSinkWrapper: the sliding window is compiled in (its
            constructor's ``window_left``), the sinks and ``sm_scale`` are ``run``'s extra arguments."""

            def __init__(self, workspace: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False, *,
                         backend: str = "auto", q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
                         head_dim_qk: int = 128, head_dim_vo: int = 128, window_left: int = -1) -> None:
                super().__init__(workspace, kv_layout)
                self.dims, self.swa = (head_dim_qk, head_dim_vo), window_left >= 0

            def run(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], *args: Any) -> torch.Tensor:
                sink, sm_scale = args
                assert self.dims == (q.shape[-1], q.shape[-1]) and sink.dtype == torch.float32
                qo, indptr, indices, last, causal, wl, scale, cap = self.layout
                assert scale == sm_scale and cap is None
                fake.plans[-1].update(wrapper="sink", sinks=True)
                wl = wl if self.swa else -1  # a module built without the window runs none
                return torch.cat([attend(q[int(qo[b]):int(qo[b + 1])], paged_keys(kv[0], indptr, indices, last, b),
                                         paged_keys(kv[1], indptr, indices, last, b), causal=causal,
                                         window_left=wl, scale=sm_scale, sinks=sink) for b in range(len(last))])

        self.module = types.ModuleType("flashinfer")
        self.module.BatchAttentionWithAttentionSinkWrapper = SinkWrapper
        self.module.__version__ = "0.7.2"
        self.module.BatchDecodeWithPagedKVCacheWrapper = Decode
        self.module.BatchPrefillWithPagedKVCacheWrapper = PagedPrefill
        self.module.BatchPrefillWithRaggedKVCacheWrapper = Ragged


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeFlashInfer:
    """The stand-in installed as ``flashinfer``, with the adapters allowed onto the CPU."""
    f = FakeFlashInfer()
    monkeypatch.setitem(sys.modules, "flashinfer", f.module)
    monkeypatch.setattr(fi, "cuda_only_reason", lambda device, kernel: None)
    monkeypatch.setattr(fi, "WORKSPACE_BYTES", 1024)
    return f


LAYOUT_BACKENDS = (fi.FlashInferDecodeBackend, fi.FlashInferDecodeTensorCoresBackend,
                   fi.FlashInferDecodeFixedSplitBackend, fi.FlashInferPrefillBackend,
                   fi.FlashInferPrefillNoSplitBackend)
BACKENDS = (*LAYOUT_BACKENDS, fi.FlashInferDenseBackend, fi.FlashInferSinkWrapperBackend)


@pytest.mark.parametrize("cls", LAYOUT_BACKENDS, ids=lambda c: c.name)
def test_each_flashinfer_adapter_passes_every_layout_check_over_a_correct_flashinfer(cls, fake) -> None:
    backend = cls("cpu")
    validate_backend(backend)
    records = run_layouts(backend)
    judged = Counter(r.check for r in records if r.status != "skip")
    assert {"accuracy", "pack", "page", "determinism", "contract"} <= set(judged), judged
    # float32 on the CPU is not row-count invariant: only the cross-layout rewrites may differ
    assert set(failing(records)) <= {"split", "prefill_decode"}, failing(records)
    wrappers = {p["wrapper"] for p in fake.plans}
    assert wrappers == ({"decode"} if "decode" in cls.name else {"paged", "ragged"})
    skipped = {r.message for r in records if r.status == "skip"}
    declined = "decodes one query per sequence" if "decode" in cls.name else "float16 and bfloat16"
    assert any(declined in m for m in skipped)  # the multi-row (decode) and float32 cases are declined, not run


def test_the_batch_invariant_settings_reach_plan_and_the_fixed_split_runs_on_tensor_cores(fake) -> None:
    for cls in LAYOUT_BACKENDS:
        paths = [p for p in select_cases(SMOKE, LAYOUT_CASES) if p.suffix == ".json"][:6]
        run_backend(cls("cpu"), paths, RunSettings(tolerances=TOLERANCES, reruns=2))
    by = Counter((p["wrapper"], p.get("tensor_cores"), p.get("fixed_split_size"), p.get("disable_split_kv"))
                 for p in fake.plans)
    assert {k for k in by if k[0] == "decode"} == {("decode", False, None, None), ("decode", True, None, None),
                                                   ("decode", True, fi.FIXED_SPLIT_SIZE, None)}
    assert {k[3] for k in by if k[0] in ("paged", "ragged")} == {False, True}
    assert all(p["pos_encoding_mode"] == "NONE" for p in fake.plans if p["wrapper"] == "decode")


def test_plan_parameters_look_through_a_plan_that_forwards_its_keywords() -> None:
    class Forwards:
        def plan(self, a, *args, **kwargs): ...

        def _plan_impl(self, a, *, fixed_split_size=None, window_left=-1): ...

    class Opaque:
        def plan(self, a, **kwargs): ...

    class Plain:
        def plan(self, a, *, disable_split_kv=False): ...

    assert {"fixed_split_size", "window_left"} <= fi.plan_parameters(Forwards)
    assert fi.plan_parameters(Opaque) is None
    assert "disable_split_kv" in fi.plan_parameters(Plain)


def test_a_flashinfer_without_the_setting_leaves_that_backend_unavailable_with_the_reason(fake, monkeypatch) -> None:
    class OldDecode:
        def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
                 window_left=-1): ...

    monkeypatch.setattr(fake.module, "BatchDecodeWithPagedKVCacheWrapper", OldDecode)
    with pytest.raises(BackendUnavailable, match="plan has no 'fixed_split_size'"):
        fi.FlashInferDecodeFixedSplitBackend("cpu")
    fi.FlashInferDecodeBackend("cpu")  # the default mode needs no setting

    class Opaque:
        def plan(self, *args, **kwargs): ...

    monkeypatch.setattr(fake.module, "BatchDecodeWithPagedKVCacheWrapper", Opaque)
    with pytest.raises(BackendUnavailable, match="cannot be told"):
        fi.FlashInferDecodeFixedSplitBackend("cpu")


def test_a_group_size_the_cuda_core_decode_has_no_kernel_for_is_a_missing_kernel_not_an_error(fake) -> None:
    q, pages = torch.randn(1, 7, 8, dtype=torch.bfloat16), torch.randn(2, 4, 1, 8, dtype=torch.bfloat16)
    table, lens, cu = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([6]), torch.tensor([0, 1])
    call = dict(max_seqlen_q=1, max_seqlen_k=6, causal=True, scale=None)
    with pytest.raises(KernelUnavailable, match="No available kernel: flashinfer-decode has no kernel for GQA group "
                                                "size 7"):
        fi.FlashInferDecodeBackend("cpu").paged_kv_attention(q, pages, pages, table, lens, cu, **call)
    out = fi.FlashInferDecodeTensorCoresBackend("cpu").paged_kv_attention(q, pages, pages, table, lens, cu, **call)
    assert out.shape == q.shape


def test_windows_go_to_window_left_and_a_bounded_non_causal_window_is_declined(fake) -> None:
    backend = fi.FlashInferPrefillBackend("cpu")
    q, k = torch.randn(9, 2, 8, dtype=torch.bfloat16), torch.randn(9, 1, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    backend.varlen_attention(q, k, k, cu, cu, max_seqlen_q=5, max_seqlen_k=5, causal=True, window_size=(3, -1))
    assert fake.plans[-1]["window_left"] == 3
    with pytest.raises(KernelUnavailable, match="right side"):
        backend.varlen_attention(q, k, k, cu, cu, max_seqlen_q=5, max_seqlen_k=5, causal=False, window_size=(3, 2))
    windowed = dataclasses.replace(build_case(dtype="bfloat16", causal=False), window=(4, 3))
    assert "non-causal case with a sliding window" in backend.supports("varlen_attention", windowed)
    assert backend.supports("varlen_attention", dataclasses.replace(build_case(dtype="bfloat16"), window=(4, -1)))


def test_without_cuda_every_flashinfer_backend_says_why(fake, monkeypatch) -> None:
    monkeypatch.undo()  # the device check back, the stand-in kept: "cpu" is refused on any machine
    monkeypatch.setitem(sys.modules, "flashinfer", fake.module)
    for cls in BACKENDS:
        with pytest.raises(BackendUnavailable, match="FlashInfer runs on CUDA devices"):
            cls("cpu")


# --- flashinfer-dense: the dense ops and the three variants -----------------------------------------

DENSE_FAMILIES = ("attention/window/*", "attention/softcap/*", "attention/sinks/*", "attention/variants-combined/*",
                  "attention/variant-presets/*", "attention/gqa/*", "attention/scale/*", "attention/causal-sq-gt-skv/*",
                  "kv_cache_attention/variants/*", "kv_cache_attention/window/*", "kv_cache_attention/decode/*",
                  "attention/grad-variants/*", "attention/padding/*")


def dense_records(backend: object) -> list:
    paths = sorted({p for pattern in DENSE_FAMILIES for p in select_cases(SMOKE, pattern)})
    return run_backend(backend, paths, RunSettings(tolerances=TOLERANCES, reruns=2)).records


def test_flashinfer_dense_passes_the_variant_cases_over_a_correct_flashinfer(fake) -> None:
    backend = fi.FlashInferDenseBackend("cpu")
    validate_backend(backend)
    records = dense_records(backend)
    ran = [r for r in records if r.status != "skip"]
    assert {"accuracy", "batch", "determinism", "contract"} <= {r.check for r in ran}
    # float32 on the CPU is not row-count invariant: only the invariance checks that change it may differ
    assert not failing([r for r in records if r.check in ("accuracy", "contract", "determinism", "batch")]), \
        failing(records)
    plans = [p for p in fake.plans if p["wrapper"] == "paged"]
    assert any(p["logits_soft_cap"] for p in plans) and any(p.get("sinks") for p in plans)
    assert any(p["window_left"] >= 0 for p in plans) and any(not p["causal"] for p in plans)
    skipped = Counter(r.message for r in records if r.status == "skip")
    assert any("no backward" in m for m in skipped) and any("no key padding mask" in m for m in skipped)
    assert any("Sq <= Skv" in m for m in skipped)


@pytest.mark.parametrize("defect", ["no-softcap", "no-sinks", "window-off-by-one"])
def test_flashinfer_dense_variants_that_do_not_reach_flashinfer_are_caught(defect, fake, monkeypatch) -> None:
    real_plan = fake.module.BatchPrefillWithPagedKVCacheWrapper.plan
    real_run = fake.module.BatchPrefillWithPagedKVCacheWrapper.run

    def plan(self, *args, **kwargs):
        if defect == "no-softcap":
            kwargs["logits_soft_cap"] = None
        if defect == "window-off-by-one" and kwargs["window_left"] >= 0:
            kwargs["window_left"] += 1
        return real_plan(self, *args, **kwargs)

    def run(self, q, kv, *, sinks=None):
        return real_run(self, q, kv, sinks=None if defect == "no-sinks" else sinks)

    monkeypatch.setattr(fake.module.BatchPrefillWithPagedKVCacheWrapper, "plan", plan)
    monkeypatch.setattr(fake.module.BatchPrefillWithPagedKVCacheWrapper, "run", run)
    family = {"no-softcap": "attention/softcap/*", "no-sinks": "attention/sinks/*",
              "window-off-by-one": "attention/window/*"}[defect]
    records = run_backend(fi.FlashInferDenseBackend("cpu"), select_cases(SMOKE, family),
                          RunSettings(tolerances=TOLERANCES, reruns=2)).records
    assert failing(records)["accuracy"] > 0


# --- flashinfer-sink-wrapper: the cases with sinks through FlashInfer's sink wrapper --------------------


def test_flashinfer_sink_wrapper_passes_the_sink_cases_and_leaves_the_others(fake) -> None:
    backend = fi.FlashInferSinkWrapperBackend("cpu")
    validate_backend(backend)
    records = dense_records(backend)
    ran = [r for r in records if r.status != "skip"]
    assert ran and all("sinks" in r.case_id for r in ran)
    assert {"accuracy", "batch", "determinism", "contract"} <= {r.check for r in ran}
    assert not failing([r for r in records if r.check in ("accuracy", "contract", "determinism", "batch")]), \
        failing(records)
    assert {p["wrapper"] for p in fake.plans} == {"sink"}
    assert any(p["window_left"] >= 0 for p in fake.plans)  # gpt-oss-like windows with sinks ran
    skipped = Counter(r.message for r in records if r.status == "skip")
    assert any("has no sinks: flashinfer-dense runs it" in m for m in skipped)
    assert any("softcap" in m for m in skipped)  # its sink variant has no soft-capping: never run without it


@pytest.mark.parametrize("defect", ["sinks-dropped", "window-not-compiled"])
def test_flashinfer_sink_wrapper_arguments_that_do_not_reach_the_kernel_are_caught(defect, fake, monkeypatch) -> None:
    cls = fake.module.BatchAttentionWithAttentionSinkWrapper
    real_init, real_run = cls.__init__, cls.run

    def init(self, *args, **kwargs):
        if defect == "window-not-compiled":
            kwargs["window_left"] = -1
        real_init(self, *args, **kwargs)

    def run(self, q, kv, sink, sm_scale):
        return real_run(self, q, kv, torch.full_like(sink, -torch.inf) if defect == "sinks-dropped" else sink,
                        sm_scale)

    monkeypatch.setattr(cls, "__init__", init)
    monkeypatch.setattr(cls, "run", run)
    family = {"sinks-dropped": "attention/sinks/*", "window-not-compiled": "attention/variant-presets/gpt-oss*"}[defect]
    records = run_backend(fi.FlashInferSinkWrapperBackend("cpu"), select_cases(SMOKE, family),
                          RunSettings(tolerances=TOLERANCES, reruns=2)).records
    assert failing(records)["accuracy"] > 0
