"""Build FlashInfer's JIT modules for the configurations a tier's cases use, one process per
configuration at once (FlashInfer builds a module on first use, one at a time per process, and
its sm90 prefill takes about a minute alone on 16 cores), so that the judged runs that follow load
them from the cache instead of each paying the compile:

    python benchmarks/flashinfer_warm.py                  # the standard tier's configurations (smoke's too)
    python benchmarks/flashinfer_warm.py --tier smoke
    python benchmarks/flashinfer_warm.py --tier standard --layouts   # the packed and paged cases only
    python benchmarks/flashinfer_warm.py bf16:128:32:8    # dtype:head_dim:Hq:Hkv[:window_left[:softcap[:sinks]]]
    python benchmarks/flashinfer_warm.py --tier smoke --filter '*/window/*' --paged-only

``--filter GLOB`` keeps the cases whose id matches (as ``run --filter``); ``--paged-only`` builds the
paged prefill alone (all that ``flashinfer-dense`` uses). A configuration with sinks and no
soft-capping also builds ``BatchAttentionWithAttentionSinkWrapper``'s module (``flashinfer-sink-wrapper``);
``--sink-wrapper-only`` builds that module alone.

A tier's configurations come from the shipped specs: one per FlashInfer module its float16 and
bfloat16 cases need (dtype, head dimension, whether a window, soft-capping, sinks), dense and
layout cases alike. Each builds the CUDA-core decode, the tensor-core decode (with
``fixed_split_size``), the paged prefill and the ragged prefill (with ``disable_split_kv``), timing
each; the cache is ``$FLASHINFER_WORKSPACE_BASE/.cache/flashinfer``. A step FlashInfer cannot build
or run is printed with its error and the others go on.
"""

from __future__ import annotations

import subprocess
import sys
import time

SHORT = {"bfloat16": "bf16", "float16": "fp16"}


def tier_configs(tier: str, layouts_only: bool = False, pattern: str = "*") -> list[str]:
    """``dtype:head_dim:Hq:Hkv[:window_left[:softcap[:sinks]]]``, one per FlashInfer module the tier's
    float16 and bfloat16 cases (dense and layout) need: the first case of each (dtype, head dim, and
    whether it has a window, soft-capping, sinks) names it."""
    from fnmatch import fnmatchcase

    from conformance.spec.load import default_spec_paths, load_specs

    configs: dict[tuple, str] = {}
    for spec in load_specs(default_spec_paths()):
        dense = [] if layouts_only else spec.cases_for_tier(tier)
        for case in [*dense, *spec.layouts_for_tier(tier)]:
            if case.dtype not in SHORT or not fnmatchcase(case.id, pattern):
                continue
            window = tuple(getattr(case, "window", (-1, -1)))
            softcap = getattr(case, "softcap", None)
            sinks = getattr(case, "sinks", None) is not None
            key = (case.dtype, case.d, window != (-1, -1), softcap is not None, sinks)
            left = str(window[0]) if window != (-1, -1) else ""
            text = (f"{SHORT[case.dtype]}:{case.d}:{case.hq}:{case.hkv}:{left}:{softcap or ''}:"
                    f"{'sinks' if sinks else ''}").rstrip(":")
            configs.setdefault(key, text)
    return list(configs.values())


def build(config: str, paged_only: bool = False, sink_only: bool = False) -> None:
    import flashinfer
    import torch

    parts = config.split(":") + [""] * 7
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[parts[0]]
    d, hq, hkv = int(parts[1]), int(parts[2]), int(parts[3])
    wl = int(parts[4]) if parts[4] else -1
    cap = float(parts[5]) if parts[5] else None
    sinks = {"sinks": torch.zeros(hq, dtype=torch.float32, device="cuda")} if parts[6] == "sinks" else {}
    dev = "cuda"
    ws = torch.empty(256 * 1024**2, dtype=torch.uint8, device=dev)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
    ps = 16
    kp = torch.randn(5, ps, hkv, d, device=dev, dtype=dt)
    indptr, idx, last, cu = i32([0, 3, 5]), i32([0, 1, 2, 3, 4]), i32([1, 1]), i32([0, 33, 50])

    def step(name: str, fn) -> None:
        t = time.time()
        try:
            fn()
            torch.cuda.synchronize()
            print(f"{config} {name}: {time.time() - t:.1f} s", flush=True)
        except Exception as exc:  # report and go on: the runs will say the same, per case
            print(f"{config} {name}: FAILED after {time.time() - t:.1f} s: {type(exc).__name__}: "
                  f"{' '.join(str(exc).split())[:300]}", flush=True)

    def decode(tc: bool, extra: dict) -> None:
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
        w.plan(indptr, idx, last, hq, hkv, d, ps, pos_encoding_mode="NONE", q_data_type=dt, kv_data_type=dt,
               window_left=wl, logits_soft_cap=cap, **extra)
        w.run(torch.randn(2, hq, d, device=dev, dtype=dt), (kp, kp), **sinks)

    def paged(extra: dict) -> None:
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        w.plan(cu, indptr, idx, last, hq, hkv, d, ps, causal=True, window_left=wl, logits_soft_cap=cap,
               q_data_type=dt, kv_data_type=dt, **extra)
        w.run(torch.randn(50, hq, d, device=dev, dtype=dt), (kp, kp), **sinks)

    def ragged(extra: dict) -> None:
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
        w.plan(cu, cu, hq, hkv, d, causal=True, window_left=wl, logits_soft_cap=cap, q_data_type=dt,
               kv_data_type=dt, **extra)
        k = torch.randn(50, hkv, d, device=dev, dtype=dt)
        w.run(torch.randn(50, hq, d, device=dev, dtype=dt), k, k)

    def sink_wrapper() -> None:  # flashinfer-sink-wrapper's module: the sink variant, the window compiled in
        w = flashinfer.BatchAttentionWithAttentionSinkWrapper(ws, "NHD", q_data_type=dt, kv_data_type=dt,
                                                              head_dim_qk=d, head_dim_vo=d, window_left=wl)
        w.plan(cu, indptr, idx, last, hq, hkv, d, ps, causal=True, sm_scale=d ** -0.5, window_left=wl,
               q_data_type=dt, kv_data_type=dt)
        w.run(torch.randn(50, hq, d, device=dev, dtype=dt), (kp, kp), sinks["sinks"], d ** -0.5)

    if sinks and cap is None:
        step("sink wrapper", sink_wrapper)
    if sink_only:
        return
    if paged_only:
        step("paged prefill (no split)", lambda: paged({"disable_split_kv": True}))
        return
    step("decode (CUDA cores)", lambda: decode(False, {}))
    step("decode (tensor cores, fixed split)", lambda: decode(True, {"fixed_split_size": 2048}))
    step("paged prefill (no split)", lambda: paged({"disable_split_kv": True}))
    if not sinks:  # FlashInfer's ragged run takes no sinks (flashinfer-dense uses the paged prefill)
        step("ragged prefill (no split)", lambda: ragged({"disable_split_kv": True}))


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    paged_only, sink_only = "--paged-only" in argv, "--sink-wrapper-only" in argv
    argv = [a for a in argv if a not in ("--paged-only", "--sink-wrapper-only")]
    if argv[:1] == ["--one"]:
        build(argv[1], paged_only, sink_only)
        return 0
    tier, pattern = "standard", "*"
    while argv[:1] in (["--tier"], ["--filter"]) and len(argv) > 1:
        if argv[0] == "--tier":
            tier = argv[1]
        else:
            pattern = argv[1]
        argv = argv[2:]
    layouts_only = "--layouts" in argv
    argv = [a for a in argv if a != "--layouts"]
    configs = argv or tier_configs(tier, layouts_only, pattern)
    print(f"{len(configs)} configurations: {' '.join(configs)}", flush=True)
    t = time.time()
    extra = (["--paged-only"] if paged_only else []) + (["--sink-wrapper-only"] if sink_only else [])
    procs = [subprocess.Popen([sys.executable, __file__, "--one", c, *extra]) for c in configs]
    codes = [p.wait() for p in procs]
    print(f"{len(configs)} configurations built in {time.time() - t:.1f} s", flush=True)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
