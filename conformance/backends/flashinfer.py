"""FlashInfer's batch attention wrappers (``pip install flashinfer-python``, the ``flashinfer``
extra; CUDA), adapted to docs/backends.md#layouts. The harness's block table becomes FlashInfer's CSR page layout
(:func:`csr_pages`: ``indptr``, ``indices``, ``last_page_len``); every call plans and runs once.

| backend | wrapper | layouts |
|---|---|---|
| ``flashinfer-decode`` | ``BatchDecodeWithPagedKVCacheWrapper`` | paged, one query per sequence |
| ``flashinfer-decode-fixed-split`` | the same, ``fixed_split_size`` set | paged decode |
| ``flashinfer-prefill`` | ``BatchPrefillWithPagedKVCacheWrapper`` / ``…RaggedKVCacheWrapper`` | paged and packed |
| ``flashinfer-prefill-no-split`` | the same, ``disable_split_kv=True`` | paged and packed |

The second of each pair is FlashInfer's batch-invariant setting (the one vLLM and SGLang pass in
their batch-invariant modes); a FlashInfer whose ``plan`` lacks that argument makes the backend
unavailable with that reason rather than judged without it. FlashInfer is optional: without it,
or without CUDA, every one is unavailable with the reason.

None declares the sliding window (no ``variants``): FlashInfer's ``window_left`` is not wired to
the layouts' ``window_size`` here and cannot be tested without CUDA, so the windowed layout cases
are skipped with the reason rather than run without their window.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from .contract import BackendUnavailable, KernelUnavailable, cuda_unavailable_reason

WORKSPACE_BYTES = 256 * 1024**2
FIXED_SPLIT_SIZE = 2048  # keys per split in the fixed-split decode (vLLM's batch-invariant value)


def csr_pages(block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's page layout of a block table: ``indptr [B + 1]``, ``indices`` (each sequence's
    pages, in order) and ``last_page_len [B]`` (``1 <= last_page_len <= page_size``), int32."""
    lens = [int(n) for n in seq_lens.tolist()]
    counts = [-(-n // page_size) for n in lens]
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int32), 0)
    indices = torch.cat([block_table[i, :c].to(torch.int32) for i, c in enumerate(counts)])
    last = torch.tensor([n - (c - 1) * page_size for n, c in zip(lens, counts)], dtype=torch.int32)
    return indptr.to(block_table.device), indices.to(block_table.device), last.to(block_table.device)


def flashinfer_unavailable_reason(device: str, wrapper: str, needs: str | None) -> str | None:
    """Why FlashInfer's ``wrapper`` cannot be judged on ``device`` (with its ``plan`` argument ``needs``)."""
    try:
        import flashinfer
    except ImportError as exc:
        return f"flashinfer is not installed ({exc}); pip install flashinfer-python (the 'flashinfer' extra)"
    except Exception as exc:  # a broken install must not break the listing
        return f"importing flashinfer failed: {type(exc).__name__}: {exc}"
    if torch.device(device).type != "cuda":
        return f"FlashInfer runs on CUDA devices; {device!r} is not one"
    reason = cuda_unavailable_reason(device)
    if reason is not None:
        return reason
    cls = getattr(flashinfer, wrapper, None)
    if cls is None:
        return f"flashinfer {getattr(flashinfer, '__version__', '?')} has no {wrapper}"
    if needs is not None and needs not in inspect.signature(cls.plan).parameters:
        return (f"flashinfer {getattr(flashinfer, '__version__', '?')}: {wrapper}.plan has no '{needs}' (its "
                "batch-invariant setting); upgrade flashinfer")
    return None


class FlashInferBackend:
    """Base: the device, a workspace, and the batch-invariant ``plan`` arguments of the subclass."""

    name = ""
    description = ""
    wrapper: ClassVar[str] = ""
    plan_extra: ClassVar[dict[str, Any]] = {}

    def __init__(self, device: str = "cuda") -> None:
        self.device = device
        needs = next(iter(self.plan_extra), None)
        reason = flashinfer_unavailable_reason(device, self.wrapper, needs)
        if reason is not None:
            raise BackendUnavailable(reason)
        self._workspace: torch.Tensor | None = None

    def workspace(self) -> torch.Tensor:
        if self._workspace is None:
            self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        return self._workspace

    def supports(self, op: str, case: Any) -> bool | str:
        if case.dtype == "float32":
            return "FlashInfer's attention kernels run float16 and bfloat16 here, not float32"
        return True


class FlashInferDecodeBackend(FlashInferBackend):
    name = "flashinfer-decode"
    description = "FlashInfer BatchDecodeWithPagedKVCacheWrapper (paged decode), its own split-KV choice"
    wrapper = "BatchDecodeWithPagedKVCacheWrapper"

    def supports(self, op: str, case: Any) -> bool | str:
        if case.sq != 1:
            return f"{self.wrapper} decodes one query per sequence; this case has up to {case.sq}"
        return super().supports(op, case)

    def paged_kv_attention(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           scale: float | None = None) -> torch.Tensor:
        import flashinfer

        if max_seqlen_q != 1:
            raise KernelUnavailable(f"No available kernel: {self.name} decodes one query per sequence, not "
                                    f"{max_seqlen_q}")
        page_size, hkv, d = k_pages.shape[1:]
        indptr, indices, last = csr_pages(block_table, seq_lens, page_size)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace(), "NHD")
        w.plan(indptr, indices, last, q.shape[1], hkv, d, page_size, pos_encoding_mode="NONE", q_data_type=q.dtype,
               kv_data_type=k_pages.dtype, sm_scale=scale, **self.plan_extra)
        return w.run(q, (k_pages, v_pages))


class FlashInferDecodeFixedSplitBackend(FlashInferDecodeBackend):
    name = "flashinfer-decode-fixed-split"
    description = f"FlashInfer paged decode with fixed_split_size={FIXED_SPLIT_SIZE} (its batch-invariant setting)"
    plan_extra: ClassVar[dict[str, Any]] = {"fixed_split_size": FIXED_SPLIT_SIZE}


class FlashInferPrefillBackend(FlashInferBackend):
    name = "flashinfer-prefill"
    description = "FlashInfer BatchPrefillWithPagedKVCacheWrapper (paged) and …RaggedKVCacheWrapper (packed)"
    wrapper = "BatchPrefillWithPagedKVCacheWrapper"

    def paged_kv_attention(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           scale: float | None = None) -> torch.Tensor:
        import flashinfer

        page_size, hkv, d = k_pages.shape[1:]
        indptr, indices, last = csr_pages(block_table, seq_lens, page_size)
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace(), "NHD")
        w.plan(cu_seqlens_q, indptr, indices, last, q.shape[1], hkv, d, page_size, causal=causal, sm_scale=scale,
               q_data_type=q.dtype, kv_data_type=k_pages.dtype, **self.plan_extra)
        return w.run(q, (k_pages, v_pages))

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                         scale: float | None = None) -> torch.Tensor:
        import flashinfer

        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace(), "NHD")
        missing = [k for k in self.plan_extra if k not in inspect.signature(w.plan).parameters]
        if missing:  # never judge the default mode under the batch-invariant name
            raise KernelUnavailable(f"No available kernel: {self.name}: BatchPrefillWithRaggedKVCacheWrapper.plan "
                                    f"has no {missing[0]!r}")
        w.plan(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1], q.shape[2], causal=causal, sm_scale=scale,
               q_data_type=q.dtype, kv_data_type=k.dtype, **self.plan_extra)
        return w.run(q, k, v)


class FlashInferPrefillNoSplitBackend(FlashInferPrefillBackend):
    name = "flashinfer-prefill-no-split"
    description = "FlashInfer paged and packed prefill with disable_split_kv=True (its batch-invariant setting)"
    plan_extra: ClassVar[dict[str, Any]] = {"disable_split_kv": True}
