#!/usr/bin/env bash
# The gradient figures of docs/performance.md and docs/results on a CUDA machine, in two steps that
# each fit a short lease:
#
#   benchmarks/gpu_gradients.sh generate OUTDIR [GOLDENS]              # byte identity, rates, goldens
#   benchmarks/gpu_gradients.sh judge OUTDIR [GOLDENS [BACKEND...]]    # the backends' gradient checks
#
# generate: (1) the smoke tier generated on the CPU cores and with --device cuda, compared file by
# file (every gradient case included); (2) the same for the standard tier's gradient cases other
# than the presets (the presets' 2k training shapes take minutes per case on one CPU core);
# (3) every gradient case of the standard tier generated with --device cuda into GOLDENS (default
# /tmp/rlk-standard-grad), timed; (4) benchmarks/gradients.py on the GPU (forward and backward
# golden rates against the float64 matmul rate), presets included.
# judge: `run --checks <the gradient checks>` over GOLDENS (generated first if missing) for each
# BACKEND (default: cuda and every sdpa-* kernel); `flex` runs over the smoke tier's gradient cases
# instead (it compiles per shape bucket).
# The package need not be installed: the repository root goes on PYTHONPATH. Every step has its
# own log in OUTDIR and a time limit; a failing step does not stop the others.
set -u -o pipefail
usage="usage: benchmarks/gpu_gradients.sh generate|judge OUTDIR [GOLDENS [BACKEND...]]"
step=${1:?$usage}
out=${2:?$usage}
goldens=${3:-/tmp/rlk-standard-grad}
shift $(($# < 3 ? $# : 3))
backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(cuda sdpa-math sdpa-flash sdpa-efficient sdpa-cudnn)
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$root"
cores=$(nproc)

timed() {  # timed NAME LIMIT_S COMMAND...: run with a limit, log to OUTDIR/NAME.txt, print the seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}
grad_checks=gradient_accuracy,gradient_batch,gradient_split,gradient_padding,gradient_determinism,gradient_contract

if [ "$step" = generate ]; then
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
    echo "cpu cores: $cores"
  } >"$out/machine.txt" 2>&1
  timed identity-smoke 150 python3 benchmarks/gpu_generation.py --tier smoke --cpu-jobs "$cores" \
    --gpu-jobs "$cores" --json "$out/identity-smoke.json"
  timed identity-standard-grad 200 python3 benchmarks/gpu_generation.py --tier standard --filter '*/grad-[!p]*' \
    --cpu-jobs "$cores" --gpu-jobs "$cores" --json "$out/identity-standard-grad.json"
  rm -rf "$goldens"
  timed generate-standard-grad 240 python3 -m conformance generate --tier standard --filter '*-grad' --device cuda --jobs "$cores" \
    --out "$goldens"
  [ "${RLK_SKIP_BENCH:-0}" = 1 ] || timed bench-gradients 120 python3 benchmarks/gradients.py --tier standard --device cuda --cases 10 \
    --max-gflop 400 --json "$out/bench-gradients.json"
elif [ "$step" = judge ]; then
  if [ ! -f "$goldens/manifest.json" ]; then
    timed generate-standard-grad 240 python3 -m conformance generate --tier standard --filter '*-grad' --device cuda --jobs "$cores" \
      --out "$goldens"
  fi
  for backend in "${backends[@]}"; do
    if [ "$backend" = flex ]; then
      timed run-flex-smoke-grad 150 python3 -m conformance run --backend flex --device cuda --filter '*-grad' \
        --checks "$grad_checks" --report-json "$out/run-flex-smoke-grad.json"
    else
      timed "run-$backend" "${RLK_RUN_LIMIT:-150}" python3 -m conformance run --backend "$backend" --device cuda \
        --goldens "$goldens" --checks "$grad_checks" --report-json "$out/run-$backend.json"
    fi
  done
else
  echo "unknown step $step (generate or judge)" >&2
  exit 2
fi
