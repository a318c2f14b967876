#!/usr/bin/env bash
# Training-step speed and peak memory of UM-MAE vs SimMIM, the paper's comparison:
# the Swin-T pair and the PVT-S pair at 256 px, each pair in one process.
#
#   benchmarks/run_bench.sh [OUTPUT_DIR]          (default: benchmarks/results)
#
# Settings come from the environment (defaults depend on the device):
#   BENCH_DEVICE     auto | cpu | cuda | cuda:N          (default auto: cuda when available)
#   BENCH_BATCH      images per step                     (CPU 8, GPU 128)
#   BENCH_PRECISION  auto | bf16 | fp16 | fp32           (CPU fp32, GPU bf16)
#   BENCH_STEPS      timed steps per model               (CPU 5, GPU 20)
#   BENCH_WARMUP     untimed steps before timing         (CPU 2, GPU 5)
#   BENCH_IMG_SIZE   input size                          (256)
#   BENCH_SEED       seed of the input batch and masks   (0)
#   PYTHON           interpreter                         (python)
# In each table the ratio is images/s relative to the first model (SimMIM), i.e. the UM-MAE
# row reads as its speed-up. Results: OUTPUT_DIR/{swin_tiny,pvt_small}_256.json.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${1:-$repo/benchmarks/results}"
py="${PYTHON:-python}"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"

device="${BENCH_DEVICE:-auto}"
if [[ "$device" == "auto" ]]; then
    device="$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
fi
if [[ "$device" == cuda* ]]; then
    batch="${BENCH_BATCH:-128}"; precision="${BENCH_PRECISION:-bf16}"
    steps="${BENCH_STEPS:-20}"; warmup="${BENCH_WARMUP:-5}"
else
    batch="${BENCH_BATCH:-8}"; precision="${BENCH_PRECISION:-fp32}"
    steps="${BENCH_STEPS:-5}"; warmup="${BENCH_WARMUP:-2}"
fi
img="${BENCH_IMG_SIZE:-256}"
seed="${BENCH_SEED:-0}"

mkdir -p "$out"
for pair in "swin_tiny:simmim_swin_tiny_256,mae_swin_tiny_256" \
            "pvt_small:simmim_pvt_small_256,mae_pvt_small_256"; do
    tag="${pair%%:*}"; models="${pair#*:}"
    echo "== $tag: $models (device $device, batch $batch, $precision, ${img}px, $steps steps)"
    "$py" -m ummae bench --models "$models" --img-size "$img" --batch-size "$batch" \
        --steps "$steps" --warmup "$warmup" --device "$device" --precision "$precision" \
        --seed "$seed" --json "$out/${tag}_${img}.json"
    echo
done
