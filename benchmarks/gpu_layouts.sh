#!/usr/bin/env bash
# The packed and paged kernels, and FlashInfer's dense adapter, judged on one CUDA GPU, as in
# docs/results/2026-12-01-h200-flashinfer.md:
#
#   benchmarks/gpu_layouts.sh OUTDIR [SECONDS_PER_RUN] [DEVICE]
#
# 1. the standard tier's layout goldens (the packed and paged cases and the dense goldens they are
#    made of): `generate --tier standard --device cuda --filter '*layouts-*'` into OUTDIR/goldens;
# 2. when flashinfer imports: its JIT modules for those cases, built side by side
#    (benchmarks/flashinfer_warm.py), so that no judged run waits on a compile;
# 3. every available layout kernel (torch-varlen*, flex-layouts, flashinfer-*) over the smoke and
#    the standard layout cases, and flashinfer-dense and flashinfer-sink-wrapper over the smoke tier
#    (RLK_DENSE_FILTER below), each run limited to
#    SECONDS_PER_RUN (default 600; a run stopped at its limit keeps its finished cases, complete:
#    false): OUTDIR/<tier>-<backend>.{json,txt};
# 4. the property search of `pack` and `page` (`check --search-profile nightly --time-budget B`, B =
#    $RLK_CHECK_BUDGET seconds per property, default 30) on
#    each available layout kernel: shrunk reproducers in OUTDIR/reproducers, reports in
#    OUTDIR/checks/<backend>.{json,txt};
# 5. OUTDIR/summary.md (`rlk-conform report --summary-md`) and OUTDIR/report.html over the runs.
# Environment: RLK_LAYOUT_KERNELS (space-separated) judges a subset of the layout kernels, in that
# order; RLK_CHECK_FILTER (a `check --filter` glob, default '*') narrows step 4's search space (e.g.
# '*-d64-*-bf16-*': the head dims and dtypes whose FlashInfer modules step 2 built); RLK_DENSE_FILTER
# (a `run --filter` glob, default '*') the smoke cases of flashinfer-dense and flashinfer-sink-wrapper,
# whose JIT modules step 2 builds (the paged prefill, and the sink wrapper's module, of each
# configuration they need).
# DEVICE (default cuda) is where everything runs; `cpu` exercises the script where the CUDA kernels
# are unavailable (they are listed as such). The package need not be installed: the repository
# root goes on PYTHONPATH. A second call with the same OUTDIR keeps what the first finished: the
# goldens (--resume), the JIT build, and each run or search that ended (a `.done` file beside its
# report); one stopped at its limit or interrupted runs again.
set -u -o pipefail
out=${1:?usage: benchmarks/gpu_layouts.sh OUTDIR [SECONDS_PER_RUN] [DEVICE]}
limit=${2:-600}
device=${3:-cuda}
budget=${RLK_CHECK_BUDGET:-30}
check_filter=${RLK_CHECK_FILTER:-*}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
cli=(python3 -m conformance)
echo "--- $(date -u +%FT%TZ)" >> "$out/runs.txt"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  python3 -c 'import flashinfer; print("flashinfer", flashinfer.__version__)' 2>/dev/null || echo "flashinfer: not installed"
} 2>&1 | tee "$out/machine.txt"

"${cli[@]}" generate --tier standard --device "$device" --filter '*layouts-*' --out "$out/goldens" --resume \
  > "$out/generate.txt" 2>&1 || { echo "generation failed: $out/generate.txt"; exit 2; }

dense_filter=${RLK_DENSE_FILTER:-*}
if python3 -c 'import flashinfer' 2>/dev/null && [ ! -e "$out/flashinfer-warm.done" ]; then
  # what the runs below use: the layout cases of both tiers (smoke's configurations are among the
  # standard tier's) and flashinfer-dense's smoke cases
  { python3 benchmarks/flashinfer_warm.py --tier standard --layouts &&
    python3 benchmarks/flashinfer_warm.py --tier smoke --filter "$dense_filter" --paged-only; } 2>&1 |
    tee "$out/flashinfer-warm.txt" && touch "$out/flashinfer-warm.done"
fi

available=$(python3 -c 'from conformance.backends import list_backends
print("\n".join(i.name for i in list_backends() if i.available))' 2>/dev/null)
finished() {  # report-stem exit-code: a run or search that ended (0 or 1) is kept for a later call
  case $2 in 0|1) touch "$1.done" ;; esac
}
judge() {  # tier backend run-args...
  local tier=$1 backend=$2; shift 2
  local start=$SECONDS stem="$out/$tier-$backend" code
  [ -e "$stem.done" ] && { echo "$tier $backend: kept from an earlier call" | tee -a "$out/runs.txt"; return; }
  timeout --signal=TERM "$limit" "${cli[@]}" run --backend "$backend" --device "$device" "$@" \
    --report-json "$stem.json" > "$stem.txt" 2>&1
  code=$?
  finished "$stem" $code
  echo "$tier $backend: exit $code in $((SECONDS - start)) s" | tee -a "$out/runs.txt"
}
read -r -a layout_kernels <<< "${RLK_LAYOUT_KERNELS:-torch-varlen torch-varlen-nosplit flex-layouts flashinfer-decode \
flashinfer-decode-tensor-cores flashinfer-decode-fixed-split flashinfer-prefill flashinfer-prefill-no-split}"
for backend in "${layout_kernels[@]}"; do
  grep -qx "$backend" <<< "$available" || { echo "$backend: unavailable here" | tee -a "$out/runs.txt"; continue; }
  judge smoke "$backend" --filter '*_attention/layouts-*'
  judge standard "$backend" --goldens "$out/goldens" --filter '*_attention/layouts-*'
done
for backend in flashinfer-dense flashinfer-sink-wrapper; do
  grep -qx "$backend" <<< "$available" && judge smoke "$backend" --filter "$dense_filter"
done
for backend in "${layout_kernels[@]}"; do
  grep -qx "$backend" <<< "$available" || continue
  start=$SECONDS stem="$out/checks/$backend"
  mkdir -p "$out/checks"
  [ -e "$stem.done" ] && { echo "check $backend: kept from an earlier call" | tee -a "$out/runs.txt"; continue; }
  timeout --signal=TERM "$limit" "${cli[@]}" check --backend "$backend" --device "$device" --properties pack,page \
    --filter "$check_filter" --search-profile nightly --time-budget "$budget" --reproducers "$out/reproducers" \
    --report-json "$stem.json" > "$stem.txt" 2>&1
  code=$?
  finished "$stem" $code
  echo "check $backend: exit $code in $((SECONDS - start)) s" | tee -a "$out/runs.txt"
done

shopt -s nullglob
reports=("$out"/*.json)
if [ ${#reports[@]} -gt 0 ]; then
  "${cli[@]}" report "${reports[@]}" --summary-md "$out/summary.md" --html "$out/report.html" \
    > "$out/report.txt" 2>&1
fi
