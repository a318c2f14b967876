#!/usr/bin/env bash
# Fine-tuning a small Swin on imagenette_mini (10 classes, 4000 train / 500 val, 128 px) from
# scratch vs from UM-MAE pre-trained weights, on CPU. docs/experiments.md reports the result.
#
#   bash experiments/imagenette_finetune.sh [DATA] [OUT]
#
# Rows:  scratch  - swin_nano_128 from random init
#        demo     - from the README's demo run (UM-MAE, 30 epochs on 17 embedded photos)
#        in-mini  - from UM-MAE pre-trained on imagenette_mini's train split (labels unused)
# Every fine-tune uses the paper's recipe (ummae finetune defaults) except a short schedule:
# EPOCHS epochs with 1 warm-up epoch, batch 64.
set -euo pipefail
DATA=${1:-../shared/data/imagenette_mini}
OUT=${2:-runs/imagenette}
EPOCHS=${EPOCHS:-10}
PT_EPOCHS=${PT_EPOCHS:-20}
WORKERS=${WORKERS:-2}
FT="--model swin_nano_128 --data $DATA --epochs $EPOCHS --warmup-epochs 1 --batch-size 64 --num-workers $WORKERS --log-every 20"

# 1. pre-training: the demo (embedded photos) and UM-MAE on the unlabelled train split
[ -f "$OUT/pt_demo/checkpoint-last.pth" ] || ummae pretrain --config demo --output "$OUT/pt_demo"
[ -f "$OUT/pt_mini/checkpoint-last.pth" ] || ummae pretrain --model mae_swin_nano_128 --data "$DATA" \
    --output "$OUT/pt_mini" --epochs "$PT_EPOCHS" --warmup-epochs 2 --batch-size 64 --blr 1.5e-3 \
    --num-workers "$WORKERS" --log-every 20

# 2. kNN of the frozen pre-trained encoders (k=20, T=0.07)
for pt in demo mini; do
  ummae knn --model swin_nano_128 --pretrained "$OUT/pt_$pt/checkpoint-last.pth" --data "$DATA" \
      --num-workers "$WORKERS" | tail -1 > "$OUT/knn_$pt.json"
done

# 3. fine-tuning: scratch vs the two pre-trained encoders, same recipe and seed
ummae finetune $FT --output "$OUT/ft_scratch"
ummae finetune $FT --output "$OUT/ft_demo" --pretrained "$OUT/pt_demo/checkpoint-last.pth"
ummae finetune $FT --output "$OUT/ft_mini" --pretrained "$OUT/pt_mini/checkpoint-last.pth"

# 4. summary: best and final val top-1 of each fine-tune
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for row in ("scratch", "demo", "mini"):
    recs = [json.loads(l) for l in (out / f"ft_{row}" / "metrics.jsonl").read_text().splitlines()]
    ep = [r for r in recs if "acc1" in r]
    knn = json.loads((out / f"knn_{row}.json").read_text())["knn_acc1"] if row != "scratch" else None
    print(f"{row:8s} final top-1 {ep[-1]['acc1']:.1f}  best {max(r['acc1'] for r in ep):.1f}  "
          f"final train loss {ep[-1]['train_loss']:.3f}  kNN {knn}")
PY
