#!/usr/bin/env bash
# CPU over-fit check of the detectors (docs/experiments.md): GFL, Mask R-CNN, Cascade Mask R-CNN
# and HTC on 8 coco_mini training images, evaluated on those same images.
# Usage: bash experiments/coco_overfit.sh [OUT [DETECTOR ...]]   (the detectors run at once; default:
# gfl maskrcnn, the first section of docs/experiments.md; the cascade section names cascade_maskrcnn, htc;
# htc_semantic: HTC with its semantic branch on stuff maps drawn from the instance masks;
# htcpp: HTC with the HTC++ settings of the recipe swin_large_ummae_htcpp_coco at this scale, then
# evaluated once at one scale and once with multi-scale + flip)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/coco_overfit}
dets=("${@:2}")
[ ${#dets[@]} -gt 0 ] || dets=(gfl maskrcnn)
declare -A epochs=([gfl]=150 [maskrcnn]=100 [cascade_maskrcnn]=40 [htc]=40 [htc_semantic]=40 [htcpp]=40)
declare -A every=([gfl]=25 [maskrcnn]=25 [cascade_maskrcnn]=10 [htc]=10 [htc_semantic]=10 [htcpp]=10)
# HTC++ (the recipe swin_large_ummae_htcpp_coco) at the over-fit's 256 px, its sizes x 256 / 1600 = 0.16:
# range resize, shorter side 400-1400 -> 64-224, longer side at most 1600 -> the 256 canvas; test scales
# (CBNetV2's Swin HTC test-time augmentation, (long, short) (1600, 1000) (1600, 1400) (1800, 1200)
# (1800, 1600)) -> 256x160 256x224 288x192 288x256; its 6x step schedule (x0.1 at epochs 63 and 69 of 72)
# -> epochs 35 and 38 of 40. The over-fit keeps its own lr, warm-up, drop path 0 and no flip.
htcpp=(--global-attn --box-head 4conv1fc --box-norm bn
       --box-loss giou --box-loss-weight 10 --box-reg class --test-nms soft_linear --test-nms-iou 0.5
       --train-resize range --short-range 64 224 --schedule step --lr-steps 35 38)
htcpp_test_scales=(256x160 256x224 288x192 288x256)
mkdir -p "$out"
[ -d "$out/coco8" ] || python experiments/coco_subset.py ../shared/data/coco_mini "$out/coco8" --train 8 --val 8 --val-from train2017
common=(--data "$out/coco8" --backbone swin_test --img-size 256 --scale-range 1 1 --flip-prob 0
        --neck-channels 64 --fpn-channels 64 --drop-path 0 --batch-size 2 --num-workers 0
        --lr 1e-3 --min-lr 1e-5 --warmup-steps 20 --log-every 20 --keep-every 0)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for d in "${dets[@]}"; do
  extra=(--detector "$d")
  if [ "$d" = htc_semantic ] || [ "$d" = htcpp ]; then
    [ -d "$out/coco8/stuff" ] || python experiments/stuff_maps_from_instances.py "$out/coco8" train2017 "$out/coco8/stuff"
    extra=(--detector htc --stuff-maps "$out/coco8/stuff")
  fi
  if [ "$d" = htcpp ]; then extra+=("${htcpp[@]}"); fi
  ummae detect train "${common[@]}" "${extra[@]}" --epochs "${epochs[$d]}" --eval-every "${every[$d]}" \
    --output "$out/$d" &
done
wait
for d in "${dets[@]}"; do grep -h '"bbox_AP"' "$out/$d/metrics.jsonl"; done
if [[ " ${dets[*]} " == *" htcpp "* ]]; then  # HTC++'s best checkpoint at one scale, then multi-scale + flip
  ummae detect eval --checkpoint "$out/htcpp/checkpoint-best.pth" --data "$out/coco8" --num-workers 0 \
    --output "$out/htcpp/eval_single"
  ummae detect eval --checkpoint "$out/htcpp/checkpoint-best.pth" --data "$out/coco8" --num-workers 0 \
    --test-scales "${htcpp_test_scales[@]}" --test-flip --output "$out/htcpp/eval_ms_flip"
fi
