#!/usr/bin/env bash
# Images/s of the pre-training input pipeline alone (read, decode, RandomResizedCrop 0.2-1
# bicubic, flip; `pil` also normalises to float, `tensor` / `device` leave that to the device):
# MAE's PIL pipeline ("before") against the uint8 one ("after") and the device-decode one, per
# core and with DataLoader workers, on real full-size camera JPEGs, from the folder and from
# tar shards written by `ummae shards`. One process: the ratios are measured in one run.
#
#   benchmarks/input_pipeline.sh [OUTPUT_DIR]        (default: benchmarks/results)
#
# Environment: BENCH_DATA (default ../shared/data/jpeg_fullres/images), BENCH_IMAGES (640),
# BENCH_WORKERS (the CPU count), BENCH_DEVICE (cpu; cuda times the device pipeline's nvJPEG),
# BENCH_IMG_SIZE (256), PYTHON (python).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${1:-$repo/benchmarks/results}"
py="${PYTHON:-python}"
data="${BENCH_DATA:-$repo/../shared/data/jpeg_fullres/images}"
workers="${BENCH_WORKERS:-$("$py" -c 'import os; print(os.cpu_count())')}"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
shards="$(mktemp -d)"
trap 'rm -rf "$shards"' EXIT
"$py" -m ummae shards "$data" --output "$shards/sh" --shard-size 20 >/dev/null
for src in folder shards; do
    path="$data"; [[ $src == shards ]] && path="$shards/sh"
    echo "== $src: $path"
    "$py" -m ummae bench --data "$path" --pipelines pil,tensor,device --images "${BENCH_IMAGES:-640}" \
        --workers "$workers" --batch-size 32 --img-size "${BENCH_IMG_SIZE:-256}" --device "${BENCH_DEVICE:-cpu}" \
        --json "$out/input_pipeline_$src.json" 2>&1 | grep -v " INFO "
done
