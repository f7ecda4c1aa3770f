#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one go, on a machine with one or more CUDA GPUs:
#
#   benchmarks/gpu.sh OUTDIR [TIER]
#
# 1. generate TIER (default standard) on the CPU cores and with --device cuda: speed ratio and
#    byte identity (benchmarks/gpu_generation.py), keeping the CUDA goldens;
# 2. `run --backend cuda` over them with --profile: streaming memory and phase overhead, and with
#    two or more GPUs, `run --devices cuda:0,cuda:1,...` against one GPU (benchmarks/run.py);
# 3. peak memory of the full tier's largest 32k-context case (benchmarks/memory.py), unless
#    RLK_SKIP_MEMORY=1;
# 4. the stage profile of the largest prefill, KV-cache prefill and gradient goldens
#    (benchmarks/profile_generation.py), then the operators with the most device time in each stage
#    of an 8k x 32k prefill (--kernels), and tier 1's decisions on the probes
#    (benchmarks/tier1_decisions.py), unless RLK_SKIP_PROFILE=1;
# 5. with RLK_FLEX=1: the smoke tier through sdpa-flash, then flex on a cold and a warm Inductor cache
#    (benchmarks/run_cprofile.py: wall time, Dynamo's graphs and compile time), in the same run;
# 6. with RLK_FULL=1: `generate --tier full --device cuda` under benchmarks/host_memory.py (its time
#    and its host memory, process by process, within the default host budget).
# The package need not be installed: the repository root goes on PYTHONPATH.
set -u -o pipefail
out=${1:?usage: benchmarks/gpu.sh OUTDIR [TIER]}
tier=${2:-standard}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
cores=$(nproc)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  echo "cpu cores: $cores, gpus: $gpus"
} 2>&1 | tee "$out/machine.txt"

goldens=$(mktemp -d)/goldens
python3 benchmarks/gpu_generation.py --tier "$tier" --cpu-jobs "$cores" --keep "$goldens" \
  --json "$out/generation.json" 2>&1 | tee "$out/generation.txt"

devices=""
if [ "$gpus" -ge 2 ]; then
  devices=$(python3 -c "print(','.join(f'cuda:{i}' for i in range($gpus)))")
fi
python3 benchmarks/run.py --goldens "$goldens" --backend cuda --device cuda:0 ${devices:+--devices "$devices"} \
  2>&1 | tee "$out/run.txt"

if [ "${RLK_SKIP_MEMORY:-0}" != 1 ]; then
  timeout "${RLK_MEMORY_TIMEOUT:-300}" python3 benchmarks/memory.py --device cuda --json "$out/memory.json" 2>&1 | tee "$out/memory.txt"
fi

if [ "${RLK_SKIP_PROFILE:-0}" != 1 ]; then
  timeout "${RLK_PROFILE_TIMEOUT:-300}" python3 benchmarks/profile_generation.py --device cuda --json "$out/profile.json" \
    attention/presets/llama3.1-8b-b1-sq32768-skv32768-bf16-causal \
    kv_cache_attention/presets/llama3.1-8b-b1-past24576-new8192-bf16-causal \
    kv_cache_attention/grad-presets/qwen3-8b-b1-past2048-new2048-bf16-causal-grad 2>&1 | tee "$out/profile.txt"
  timeout "${RLK_PROFILE_TIMEOUT:-300}" python3 benchmarks/profile_generation.py --device cuda --kernels 12 \
    --json "$out/kernels.json" attention/presets/llama3.1-8b-b1-sq8192-skv32768-bf16-causal 2>&1 | tee "$out/kernels.txt"
  timeout "${RLK_PROFILE_TIMEOUT:-300}" python3 benchmarks/tier1_decisions.py --device cuda --json "$out/tier1.json" \
    2>&1 | tee "$out/tier1.txt"
fi

if [ "${RLK_FLEX:-0}" = 1 ]; then
  export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)/inductor}"
  python3 benchmarks/run_cprofile.py sdpa-flash run --backend sdpa-flash --device cuda:0 --profile \
    > "$out/flex-sdpa-flash.txt" 2>&1
  for pass in cold warm; do
    timeout "${RLK_FLEX_TIMEOUT:-1800}" python3 benchmarks/run_cprofile.py "flex-$pass" run --backend flex \
      --device cuda:0 --profile > "$out/flex-$pass.txt" 2>&1
  done
  grep -h '^== ' "$out"/flex-*.txt | tee "$out/flex-summary.txt"
fi

if [ "${RLK_FULL:-0}" = 1 ]; then
  full=$(mktemp -d)/full
  timeout "${RLK_FULL_TIMEOUT:-900}" python3 benchmarks/host_memory.py --samples "$out/full-host-samples.txt" -- \
    python3 -m conformance generate --tier full --device cuda --out "$full" > "$out/full.txt" 2>&1
  tail -20 "$out/full.txt"
  rm -rf "$full"
fi
