#!/usr/bin/env bash
# A first GPU run that reports everything at once (issue 27): one command, ~8 minutes on one
# H100, one JSON + markdown report. Each part runs under its own timeout; a part that fails or
# times out is recorded (with its log's tail) and the script goes on to the next.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUTPUT_DIR]     (default: benchmarks/results/gpu_check)
#
# Parts (GPU sizes; --dry-run: CPU, fp32, the *_test models at toy sizes, compile backend eager):
#   bench_eager          ummae bench of both paper pairs (SimMIM vs UM-MAE, Swin-T and PVT-S, 256 px),
#                        bf16, batch 128: images/s, peak memory, FLOPs per image (FlopCounterMode)
#   bench_compiled_*     the same pair eager and under torch.compile (inductor), compile time apart
#   shards               `ummae shards` of the JPEGs (../shared/data/jpeg_fullres, else synthetic ones)
#   pretrain             UM-MAE Swin-T, a few hundred steps from the tar shards, --input-pipeline device
#                        (nvJPEG): end-to-end images/s against the synthetic rate, MFU
#   finetune_ema         one fine-tuning step of Swin-T with --ema (fused AdamW, pinned memory, EMA)
#   gfl, upernet         one GFL step at 1024 px and one UperNet step at 512 px, under
#                        torchrun --nproc_per_node 1 (NCCL, DDP, SyncBN), then their evaluation
#   fp16                 pre-training steps with --precision fp16 (the grad scaler path)
# MFU is counted against the H100's bf16 dense peak, 989 TFLOP/s (GPU_CHECK_PEAK_TFLOPS).
# Data: GPU_CHECK_JPEGS, GPU_CHECK_COCO, GPU_CHECK_ADE (default: ../shared/data/...); PYTHON.
# Output: OUTPUT_DIR/report.json, report.md, logs/<part>.log; exit status 0 iff every part passed.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
mode=gpu
if [[ "${1:-}" == "--dry-run" ]]; then mode=dry; shift; fi
out="${1:-$repo/benchmarks/results/gpu_check}"
py="${PYTHON:-python}"
shared="$repo/../shared/data"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
helper=("$py" "$here/gpu_check.py")

if [[ $mode == gpu ]]; then
    device=cuda; precision=bf16; batch=128; steps=20; warmup=5; backend=inductor
    swin=(simmim_swin_tiny_256 mae_swin_tiny_256); pvt=(simmim_pvt_small_256 mae_pvt_small_256)
    pre_model=mae_swin_tiny_256; pre_steps=300; ft_model=swin_tiny_256; ft_batch=32; workers=8
    det=(--backbone swin_tiny_256 --img-size 1024 --batch-size 2)
    seg=(--backbone swin_tiny_256 --crop-size 512 --batch-size 2)
    n_train=16; n_val=4; skip_lines=3
    limits=(bench_eager=100 bench_compiled_swin=130 bench_compiled_pvt=110 shards=30 pretrain=110 finetune_ema=50 gfl=80 upernet=70 fp16=50)
else
    device=cpu; precision=fp32; batch=2; steps=1; warmup=1; backend=eager
    swin=(simmim_swin_test mae_swin_test); pvt=(simmim_pvt_test mae_pvt_test)
    pre_model=mae_swin_test; pre_steps=4; ft_model=swin_test; ft_batch=2; workers=0
    det=(--backbone pvt_test --img-size 128 --batch-size 2 --neck-channels 32 --fpn-channels 32)
    seg=(--backbone swin_test --crop-size 64 --batch-size 2 --neck-channels 32 --head-channels 16 --aux-channels 8
         --scale 128 64)
    n_train=2; n_val=1; skip_lines=0
    limits=(bench_eager=120 bench_compiled_swin=120 bench_compiled_pvt=120 shards=60 pretrain=120 finetune_ema=120 gfl=120 upernet=120 fp16=120)
fi

rm -rf "$out"
mkdir -p "$out/logs"
: >"$out/parts.jsonl"

limit_of() { local kv; for kv in "${limits[@]}"; do [[ ${kv%%=*} == "$1" ]] && echo "${kv#*=}"; done; }

# part NAME CMD...: run CMD under NAME's time limit, its output in logs/NAME.log, and record it
part() {
    local name=$1 limit t0 rc
    shift
    limit=$(limit_of "$name")
    echo "== $name (limit ${limit}s)"
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$out/logs/$name.log" 2>&1
    rc=$?
    "${helper[@]}" record "$out" "$name" "$rc" "$(echo "$(date +%s.%N) - $t0" | bc)" "$limit"
    tail -n 3 "$out/logs/$name.log"
}

ummae=("$py" -m ummae)
torchrun1=("$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m ummae)

"$py" - "$out/settings.json" "$mode" "$device" "$precision" "$batch" "$pre_model" "$skip_lines" <<'EOF'
import json, sys, torch
path, mode, device, precision, batch, model, skip = sys.argv[1:]
name = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "CPU"
json.dump({"mode": mode, "device": device, "device_name": name, "torch": torch.__version__, "precision": precision,
           "batch": int(batch), "pretrain_model": model, "skip_lines": int(skip)}, open(path, "w"))
EOF
"${helper[@]}" data "$out" "${GPU_CHECK_COCO:-$shared/coco_mini}" "${GPU_CHECK_ADE:-$shared/coco_semseg_mini}" \
    "${GPU_CHECK_JPEGS:-$shared/jpeg_fullres/images}" "$n_train" "$n_val"

common=(--batch-size "$batch" --steps "$steps" --warmup "$warmup" --device "$device" --precision "$precision")
pair() { local IFS=,; echo "$*"; }
part bench_eager "${ummae[@]}" bench --models "$(pair "${swin[@]}" "${pvt[@]}")" "${common[@]}" --flops \
    --json "$out/bench_eager.json"
part bench_compiled_swin "${ummae[@]}" bench --models "$(pair "${swin[@]}")" "${common[@]}" --compile \
    --compile-backend "$backend" --json "$out/bench_compiled_swin.json"
part bench_compiled_pvt "${ummae[@]}" bench --models "$(pair "${pvt[@]}")" "${common[@]}" --compile \
    --compile-backend "$backend" --json "$out/bench_compiled_pvt.json"

part shards "${ummae[@]}" shards "$out/data/jpegs" --output "$out/shards" --shard-size 16
run=(--device "$device" --num-workers "$workers" --epochs 1 --warmup-epochs 0 --keep-every 0 --overwrite)
part pretrain "${ummae[@]}" pretrain --model "$pre_model" --data "$out/shards" --input-pipeline device \
    --samples-per-epoch $((batch * pre_steps)) --max-steps-per-epoch "$pre_steps" --batch-size "$batch" \
    --precision "$precision" --vis-every 0 --log-every 10 --output "$out/pretrain" "${run[@]}"
part finetune_ema "${ummae[@]}" finetune --model "$ft_model" --data "$out/data/classes" --ema --batch-size "$ft_batch" \
    --max-steps-per-epoch 1 --precision "$precision" --log-every 1 --output "$out/finetune_ema" "${run[@]}"
part gfl "${torchrun1[@]}" detect train --data "$out/data/coco" --detector gfl "${det[@]}" --max-steps-per-epoch 1 \
    --warmup-steps 1 --precision "$precision" --log-every 1 --output "$out/gfl" "${run[@]}"
part upernet "${torchrun1[@]}" segment train --data "$out/data/ade" "${seg[@]}" --iters 1 --warmup-steps 1 \
    --precision "$precision" --log-every 1 --output "$out/upernet" --device "$device" --num-workers "$workers" \
    --overwrite
fp16=fp16; [[ $device == cpu ]] && fp16=$precision # CPU autocast has no fp16 scaler path: fp32 there
part fp16 "${ummae[@]}" pretrain --model "$pre_model" --data "$out/shards" --input-pipeline device --batch-size "$batch" \
    --samples-per-epoch $((batch * 4)) --max-steps-per-epoch 4 --precision "$fp16" --vis-every 0 --log-every 1 \
    --output "$out/fp16" "${run[@]}"

"${helper[@]}" report "$out" "${GPU_CHECK_PEAK_TFLOPS:-989}"
