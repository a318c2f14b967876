#!/usr/bin/env bash
# CPU over-fit check of the detectors (docs/experiments.md): GFL and Mask R-CNN on 8 coco_mini
# training images, evaluated on those same images. Usage: bash experiments/coco_overfit.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/coco_overfit}
mkdir -p "$out"
[ -d "$out/coco8" ] || python experiments/coco_subset.py ../shared/data/coco_mini "$out/coco8" --train 8 --val 8 --val-from train2017
common=(--data "$out/coco8" --backbone swin_test --img-size 256 --scale-range 1 1 --flip-prob 0
        --neck-channels 64 --fpn-channels 64 --drop-path 0 --batch-size 2 --num-workers 0
        --lr 1e-3 --min-lr 1e-5 --warmup-steps 20 --log-every 20 --keep-every 0 --eval-every 25)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ummae detect train "${common[@]}" --detector gfl --epochs 150 --output "$out/gfl" &
ummae detect train "${common[@]}" --detector maskrcnn --epochs 100 --output "$out/maskrcnn" &
wait
grep -h '"bbox_AP"' "$out"/gfl/metrics.jsonl "$out"/maskrcnn/metrics.jsonl
