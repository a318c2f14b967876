#!/usr/bin/env bash
# CPU over-fit of UperNet (docs/experiments.md, "Semantic segmentation over-fit"): the first 8
# training images of ../shared/data/coco_semseg_mini, trained on and evaluated on themselves
# (sliding window), to show the whole pipeline (data, UperNet, loss, schedule, inference, mIoU)
# can fit real label maps. Not a benchmark: the figures are on the training images.
#   bash experiments/semseg_overfit.sh [OUT]    (about 10 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/semseg_overfit}
SRC=../shared/data/coco_semseg_mini
DATA=$OUT/data
rm -rf "$DATA"
mkdir -p "$DATA/images/training" "$DATA/annotations/training"
for img in $(ls "$SRC/images/training" | sort | head -8); do
    cp "$SRC/images/training/$img" "$DATA/images/training/"
    cp "$SRC/annotations/training/${img%.jpg}.png" "$DATA/annotations/training/"
done
cp "$SRC/label_map.txt" "$DATA/"
ummae segment train --data "$DATA" --val-split training --output "$OUT/run" --overwrite \
    --backbone swin_test --num-classes 81 --crop-size 128 --scale 256 192 --ratio-range 1.0 1.0 \
    --flip-prob 0 --no-photometric --cat-max-ratio 1.0 --neck-channels 64 --head-channels 64 --aux-channels 32 \
    --drop-path 0 --iters "${ITERS:-3000}" --eval-every-iters 100 --warmup-steps 20 --batch-size 4 --blr "${BLR:-0.25}" \
    --num-workers 2 --log-every 20 --device cpu
ummae segment eval --checkpoint "$OUT/run/checkpoint-last.pth" --data "$DATA" --split training \
    --output "$OUT/eval" --num-workers 2 --device cpu
ummae segment predict --checkpoint "$OUT/run/checkpoint-last.pth" --images "$DATA/images/training" \
    --output "$OUT/predict" --device cpu
