"""FlashInfer's batch attention wrappers (``pip install flashinfer-python``, the ``flashinfer``
extra; CUDA), adapted to docs/backends.md#layouts. The harness's block table becomes FlashInfer's CSR page layout
(:func:`csr_pages`: ``indptr``, ``indices``, ``last_page_len``); every call plans and runs once.

| backend | wrapper | layouts |
|---|---|---|
| ``flashinfer-decode`` | ``BatchDecodeWithPagedKVCacheWrapper`` (CUDA-core decode) | paged, one query per sequence |
| ``flashinfer-decode-tensor-cores`` | the same, ``use_tensor_cores=True`` | paged decode |
| ``flashinfer-decode-fixed-split`` | the same, ``use_tensor_cores=True`` and ``fixed_split_size`` set | paged decode |
| ``flashinfer-prefill`` | ``BatchPrefillWithPagedKVCacheWrapper`` / ``…RaggedKVCacheWrapper`` | paged and packed |
| ``flashinfer-prefill-no-split`` | the same, ``disable_split_kv=True`` | paged and packed |
| ``flashinfer-dense`` | ``BatchPrefillWithPagedKVCacheWrapper`` | the dense ops, with the three variants |
| ``flashinfer-sink-wrapper`` | ``BatchAttentionWithAttentionSinkWrapper`` | the dense ops' cases with sinks |

``fixed_split_size`` and ``disable_split_kv`` are FlashInfer's batch-invariant settings (the ones vLLM
and SGLang pass in their batch-invariant modes). FlashInfer 0.7 takes ``fixed_split_size`` only in
its tensor-core decode, so the fixed-split backend runs that path, and ``flashinfer-decode-tensor-cores``
is the same path at its own split choice: the pair shows what the setting buys, the pair
``flashinfer-decode``/``…-tensor-cores`` what the kernel choice does. A FlashInfer whose ``plan`` lacks
the setting makes the backend unavailable with that reason rather than judged without it.
FlashInfer is optional: without it, or without CUDA, every one is unavailable with the reason.

The sliding window (``variants = ("window",)``) is FlashInfer's ``window_left`` (the keys a row sees
to the left of its bottom-right aligned diagonal, inclusive: the contract's ``left``) in a causal
case; FlashInfer bounds the right side only in its cute backend, so a non-causal case with a
bounded window is skipped with that reason. Soft-capping and sinks do not compose with the layouts.

``flashinfer-dense`` serves the dense ops (``attention``, and ``kv_cache_attention`` as the
attention over the concatenated keys) through the paged prefill: each batch entry is one sequence
of pages of :data:`DENSE_PAGE_SIZE` keys, in order. It declares all three variants:
``window_left`` as above; ``logits_soft_cap`` (FlashInfer's ``cap·tanh(scale·s / cap)``: the
contract's soft-capping of the scaled logits, applied before the mask) and ``sinks`` (``run``'s
per-head logits, ``[Hq]`` float32, joined to each row's softmax denominator, uncapped). FlashInfer's
sequences are whole, so a key padding mask with a masked key is a missing kernel, and so is a causal
case with ``Sq > Skv`` (rows that see no key are outside FlashInfer's prefill); it has no backward.
On an H200 (0.7.2) that ``run(sinks=…)`` left the sinks out of the result without an error
(docs/results/2026-12-01-h200-flashinfer.md); ``flashinfer-sink-wrapper`` judges the same cases
through FlashInfer's dedicated sink wrapper instead.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from .contract import BackendUnavailable, KernelUnavailable, concat_kv_cache, cuda_only_reason, one_line

WORKSPACE_BYTES = 256 * 1024**2
FIXED_SPLIT_SIZE = 2048  # keys per split in the fixed-split decode (vLLM's batch-invariant value)
DENSE_PAGE_SIZE = 16  # keys per page when flashinfer-dense lays a dense batch out as pages


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


def plan_parameters(cls: Any) -> set[str] | None:
    """The keyword arguments ``cls.plan`` takes: its own, or, where ``plan`` forwards ``**kwargs`` (FlashInfer
    0.7's decode wrapper), those of the ``_plan_impl`` it forwards them to; ``None`` when that cannot be told."""
    def keywords(fn: Any) -> set[str] | None:
        params = inspect.signature(fn).parameters.values()
        return None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) else {p.name for p in params}

    names = keywords(cls.plan)
    impl = getattr(cls, "_plan_impl", None)
    if names is None and callable(impl):
        names = keywords(impl)
    return names


def flashinfer_unavailable_reason(device: str, wrapper: str, needs: str | None) -> str | None:
    """Why FlashInfer's ``wrapper`` cannot be judged on ``device`` (with its ``plan`` argument ``needs``)."""
    try:
        import flashinfer
    except ImportError as exc:
        return f"flashinfer is not installed ({exc}); pip install flashinfer-python (the 'flashinfer' extra)"
    except Exception as exc:  # a broken install must not break the listing
        return f"importing flashinfer failed: {type(exc).__name__}: {exc}"
    reason = cuda_only_reason(device, "FlashInfer")
    if reason is not None:
        return reason
    cls = getattr(flashinfer, wrapper, None)
    if cls is None:
        return f"flashinfer {getattr(flashinfer, '__version__', '?')} has no {wrapper}"
    if needs is not None:
        names = plan_parameters(cls)
        if names is None:
            return (f"flashinfer {getattr(flashinfer, '__version__', '?')}: {wrapper}.plan takes **kwargs, so "
                    f"whether it accepts '{needs}' (its batch-invariant setting) cannot be told")
        if needs not in names:
            return (f"flashinfer {getattr(flashinfer, '__version__', '?')}: {wrapper}.plan has no '{needs}' (its "
                    "batch-invariant setting); upgrade flashinfer")
    return None


class FlashInferBackend:
    """Base: the device, a workspace, the window, and the batch-invariant ``plan`` arguments of the subclass."""

    name = ""
    description = ""
    wrapper: ClassVar[str] = ""
    plan_extra: ClassVar[dict[str, Any]] = {}
    variants = ("window",)

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
        if tuple(getattr(case, "window", (-1, -1))) != (-1, -1) and not case.causal:
            return ("FlashInfer bounds a window's right side only in its cute backend: a non-causal case with a "
                    "sliding window is not run here")
        return True


def window_left(window_size: tuple[int, int], causal: bool) -> int:
    """FlashInfer's ``window_left`` for the contract's ``window_size`` (``-1``: unbounded)."""
    left, right = (int(w) for w in window_size)
    if not causal and (left, right) != (-1, -1):
        raise KernelUnavailable(f"No available kernel: FlashInfer bounds the right side of the window {(left, right)} "
                                "only in its cute backend")
    return left


class FlashInferDecodeBackend(FlashInferBackend):
    name = "flashinfer-decode"
    description = "FlashInfer BatchDecodeWithPagedKVCacheWrapper (paged decode, CUDA cores), its own split-KV choice"
    wrapper = "BatchDecodeWithPagedKVCacheWrapper"
    use_tensor_cores: ClassVar[bool] = False

    def supports(self, op: str, case: Any) -> bool | str:
        if case.sq != 1:
            return f"{self.wrapper} decodes one query per sequence; this case has up to {case.sq}"
        return super().supports(op, case)

    def paged_kv_attention(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           scale: float | None = None, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
        import flashinfer

        if max_seqlen_q != 1:
            raise KernelUnavailable(f"No available kernel: {self.name} decodes one query per sequence, not "
                                    f"{max_seqlen_q}")
        page_size, hkv, d = k_pages.shape[1:]
        indptr, indices, last = csr_pages(block_table, seq_lens, page_size)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace(), "NHD",
                                                          use_tensor_cores=self.use_tensor_cores)
        try:
            w.plan(indptr, indices, last, q.shape[1], hkv, d, page_size, pos_encoding_mode="NONE",
                   q_data_type=q.dtype, kv_data_type=k_pages.dtype, sm_scale=scale,
                   window_left=window_left(window_size, causal), **self.plan_extra)
            return w.run(q, (k_pages, v_pages))
        except RuntimeError as exc:
            # FlashInfer's CUDA-core decode instantiates a fixed set of GQA group sizes (0.7.2: not 7, so
            # not Qwen2.5-7B's 28/4): a kernel it does not have, not a wrong result.
            if "Unsupported group_size" not in str(exc):
                raise
            raise KernelUnavailable(f"No available kernel: {self.name} has no kernel for GQA group size "
                                    f"{q.shape[1] // hkv} ({one_line(str(exc))[-120:]})") from exc


class FlashInferDecodeTensorCoresBackend(FlashInferDecodeBackend):
    name = "flashinfer-decode-tensor-cores"
    description = "FlashInfer paged decode on tensor cores (use_tensor_cores=True), its own split-KV choice"
    use_tensor_cores = True


class FlashInferDecodeFixedSplitBackend(FlashInferDecodeTensorCoresBackend):
    name = "flashinfer-decode-fixed-split"
    description = (f"FlashInfer paged decode on tensor cores with fixed_split_size={FIXED_SPLIT_SIZE} (its "
                   "batch-invariant setting)")
    plan_extra: ClassVar[dict[str, Any]] = {"fixed_split_size": FIXED_SPLIT_SIZE}


class FlashInferPrefillBackend(FlashInferBackend):
    name = "flashinfer-prefill"
    description = "FlashInfer BatchPrefillWithPagedKVCacheWrapper (paged) and …RaggedKVCacheWrapper (packed)"
    wrapper = "BatchPrefillWithPagedKVCacheWrapper"

    def paged_kv_attention(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           scale: float | None = None, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
        import flashinfer

        page_size, hkv, d = k_pages.shape[1:]
        indptr, indices, last = csr_pages(block_table, seq_lens, page_size)
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace(), "NHD")
        w.plan(cu_seqlens_q, indptr, indices, last, q.shape[1], hkv, d, page_size, causal=causal, sm_scale=scale,
               window_left=window_left(window_size, causal), q_data_type=q.dtype, kv_data_type=k_pages.dtype,
               **self.plan_extra)
        return w.run(q, (k_pages, v_pages))

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                         scale: float | None = None, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
        import flashinfer

        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace(), "NHD")
        names = plan_parameters(type(w)) or set()
        missing = [k for k in self.plan_extra if k not in names]
        if missing:  # never judge the default mode under the batch-invariant name
            raise KernelUnavailable(f"No available kernel: {self.name}: BatchPrefillWithRaggedKVCacheWrapper.plan "
                                    f"has no {missing[0]!r}")
        w.plan(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1], q.shape[2], causal=causal, sm_scale=scale,
               window_left=window_left(window_size, causal), q_data_type=q.dtype, kv_data_type=k.dtype,
               **self.plan_extra)
        return w.run(q, k, v)


class FlashInferPrefillNoSplitBackend(FlashInferPrefillBackend):
    name = "flashinfer-prefill-no-split"
    description = "FlashInfer paged and packed prefill with disable_split_kv=True (its batch-invariant setting)"
    plan_extra: ClassVar[dict[str, Any]] = {"disable_split_kv": True}


class FlashInferDenseBackend(FlashInferBackend):
    name = "flashinfer-dense"
    description = ("FlashInfer BatchPrefillWithPagedKVCacheWrapper serving the dense ops (one sequence per batch "
                   "entry), with window_left, logits_soft_cap and sinks")
    wrapper = "BatchPrefillWithPagedKVCacheWrapper"
    variants = ("window", "softcap", "sinks")

    def supports(self, op: str, case: Any) -> bool | str:
        if op.endswith("_backward"):
            return "FlashInfer's attention has no backward"
        if case.mask != "none":
            return "FlashInfer's sequences are whole: it takes no key padding mask"
        if case.causal and case.sq > case.skv:
            return ("FlashInfer's causal prefill needs Sq <= Skv: rows that see no key (Sq > Skv) are outside its "
                    "kernels")
        return super().supports(op, case)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                  window_size: tuple[int, int] = (-1, -1), softcap: float | None = None,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
        b, hq, sq, d = q.shape
        hkv, skv = k.shape[1], k.shape[2]
        if key_padding_mask is not None and not bool(key_padding_mask.all()):
            raise KernelUnavailable(f"No available kernel: {self.name} takes no key padding mask (FlashInfer's "
                                    "sequences are whole)")
        if causal and sq > skv:
            raise KernelUnavailable(f"No available kernel: {self.name}: FlashInfer's causal prefill needs Sq <= Skv, "
                                    f"not {sq} > {skv}")
        per_seq = -(-skv // DENSE_PAGE_SIZE)

        def pages(t: torch.Tensor) -> torch.Tensor:  # [B, Hkv, Skv, D] -> [B * per_seq, page, Hkv, D]
            x = torch.nn.functional.pad(t.transpose(1, 2), (0, 0, 0, 0, 0, per_seq * DENSE_PAGE_SIZE - skv))
            return x.reshape(b * per_seq, DENSE_PAGE_SIZE, hkv, d).contiguous()

        table = torch.arange(b * per_seq, dtype=torch.int32).reshape(b, per_seq)
        indptr, indices, last = csr_pages(table, torch.full((b,), skv, dtype=torch.int32), DENSE_PAGE_SIZE)
        dev = q.device
        qo = torch.arange(b + 1, dtype=torch.int32, device=dev) * sq
        layout = (qo, indptr.to(dev), indices.to(dev), last.to(dev), hq, hkv, d, DENSE_PAGE_SIZE)
        out = self.prefill(layout, q.transpose(1, 2).reshape(b * sq, hq, d).contiguous(), (pages(k), pages(v)),
                           causal=causal, scale=scale, window=window_left(window_size, causal), softcap=softcap,
                           sinks=None if sinks is None else sinks.to(dev, torch.float32))
        return out.reshape(b, sq, hq, d).transpose(1, 2).contiguous()

    def prefill(self, layout: tuple, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], *, causal: bool,
                scale: float | None, window: int, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        """One plan and run of the paged prefill over ``layout`` (``plan``'s leading arguments)."""
        import flashinfer

        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace(), "NHD")
        w.plan(*layout, causal=causal, sm_scale=scale, window_left=window, logits_soft_cap=softcap,
               q_data_type=q.dtype, kv_data_type=kv[0].dtype)
        return w.run(q, kv, **({} if sinks is None else {"sinks": sinks}))

    def kv_cache_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_new: torch.Tensor, v_new: torch.Tensor, *, causal: bool = True,
                           scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                           window_size: tuple[int, int] = (-1, -1), softcap: float | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
        k, v = concat_kv_cache(q, k_cache, v_cache, k_new, v_new)
        return self.attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                              window_size=window_size, softcap=softcap, sinks=sinks)


class FlashInferSinkWrapperBackend(FlashInferDenseBackend):
    """The dense ops' cases with sinks through ``BatchAttentionWithAttentionSinkWrapper``: FlashInfer's
    attention-sink JIT variant (``AttentionSink``, its FA2/FA3 kernels), the path its own sink tests
    take, with the sinks and ``sm_scale`` as the variant's extra ``run`` arguments. That variant has no
    soft-capping, so a soft-capped case is skipped (undeclared variant), and a case without sinks is
    ``flashinfer-dense``'s."""

    name = "flashinfer-sink-wrapper"
    description = ("FlashInfer BatchAttentionWithAttentionSinkWrapper (its attention-sink variant) serving the dense "
                   "ops' cases with sinks, with window_left")
    wrapper = "BatchAttentionWithAttentionSinkWrapper"
    variants = ("window", "sinks")

    def supports(self, op: str, case: Any) -> bool | str:
        if getattr(case, "sinks", None) is None and not op.endswith("_backward"):
            return "the case has no sinks: flashinfer-dense runs it through the same paged prefill"
        return super().supports(op, case)

    def prefill(self, layout: tuple, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], *, causal: bool,
                scale: float | None, window: int, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        import flashinfer

        if softcap is not None:
            raise KernelUnavailable(f"No available kernel: {self.name}: FlashInfer's attention-sink variant has no "
                                    "soft-capping")
        if sinks is None:
            raise KernelUnavailable(f"No available kernel: {self.name} runs the cases with sinks")
        d = q.shape[-1]
        w = flashinfer.BatchAttentionWithAttentionSinkWrapper(
            self.workspace(), "NHD", q_data_type=q.dtype, kv_data_type=kv[0].dtype, head_dim_qk=d, head_dim_vo=d,
            window_left=window)
        sm_scale = d ** -0.5 if scale is None else scale
        w.plan(*layout, causal=causal, sm_scale=sm_scale, window_left=window, q_data_type=q.dtype,
               kv_data_type=kv[0].dtype)
        return w.run(q, kv, sinks, sm_scale)
