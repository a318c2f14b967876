#!/usr/bin/env bash
# CPU over-fit check of the detectors (docs/experiments.md): GFL, Mask R-CNN, Cascade Mask R-CNN
# and HTC on 8 coco_mini training images, evaluated on those same images.
# Usage: bash experiments/coco_overfit.sh [OUT [DETECTOR ...]]   (the detectors run at once; default:
# gfl maskrcnn, the first section of docs/experiments.md; the cascade section names cascade_maskrcnn, htc;
# htc_semantic: HTC with its semantic branch on stuff maps drawn from the instance masks)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/coco_overfit}
dets=("${@:2}")
[ ${#dets[@]} -gt 0 ] || dets=(gfl maskrcnn)
declare -A epochs=([gfl]=150 [maskrcnn]=100 [cascade_maskrcnn]=40 [htc]=40 [htc_semantic]=40)
declare -A every=([gfl]=25 [maskrcnn]=25 [cascade_maskrcnn]=10 [htc]=10 [htc_semantic]=10)
mkdir -p "$out"
[ -d "$out/coco8" ] || python experiments/coco_subset.py ../shared/data/coco_mini "$out/coco8" --train 8 --val 8 --val-from train2017
common=(--data "$out/coco8" --backbone swin_test --img-size 256 --scale-range 1 1 --flip-prob 0
        --neck-channels 64 --fpn-channels 64 --drop-path 0 --batch-size 2 --num-workers 0
        --lr 1e-3 --min-lr 1e-5 --warmup-steps 20 --log-every 20 --keep-every 0)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for d in "${dets[@]}"; do
  extra=(--detector "$d")
  if [ "$d" = htc_semantic ]; then
    [ -d "$out/coco8/stuff" ] || python experiments/stuff_maps_from_instances.py "$out/coco8" train2017 "$out/coco8/stuff"
    extra=(--detector htc --stuff-maps "$out/coco8/stuff")
  fi
  ummae detect train "${common[@]}" "${extra[@]}" --epochs "${epochs[$d]}" --eval-every "${every[$d]}" \
    --output "$out/$d" &
done
wait
for d in "${dets[@]}"; do grep -h '"bbox_AP"' "$out/$d/metrics.jsonl"; done
