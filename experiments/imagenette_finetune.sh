#!/usr/bin/env bash
# Fine-tuning a small Swin on imagenette_mini (10 classes, 4000 train / 500 val, 128 px) from
# scratch vs from UM-MAE pre-trained weights, on CPU. docs/experiments.md reports the result.
#
#   bash experiments/imagenette_finetune.sh [DATA] [OUT]
#
# Rows:  scratch  - swin_nano_128 from random init (kNN: an untrained mae_swin_nano_128)
#        demo     - from the README's demo run (UM-MAE, 30 epochs on 17 embedded photos)
#        in-mini  - from UM-MAE pre-trained on imagenette_mini's train split (labels unused)
# Every fine-tune uses the paper's recipe (ummae finetune defaults) except a short schedule:
# EPOCHS epochs with 1 warm-up epoch, batch 64; each row once per seed in SEEDS.
set -euo pipefail
DATA=${1:-../shared/data/imagenette_mini}
OUT=${2:-runs/imagenette}
EPOCHS=${EPOCHS:-10}
PT_EPOCHS=${PT_EPOCHS:-20}
WORKERS=${WORKERS:-2}
SEEDS=${SEEDS:-"0 1"}
FT="--model swin_nano_128 --data $DATA --epochs $EPOCHS --warmup-epochs 1 --batch-size 64 --num-workers $WORKERS --log-every 20"

# 1. pre-training: the demo (embedded photos) and UM-MAE on the unlabelled train split
[ -f "$OUT/pt_demo/checkpoint-last.pth" ] || ummae pretrain --config demo --output "$OUT/pt_demo"
[ -f "$OUT/pt_mini/checkpoint-last.pth" ] || ummae pretrain --model mae_swin_nano_128 --data "$DATA" \
    --output "$OUT/pt_mini" --epochs "$PT_EPOCHS" --warmup-epochs 2 --batch-size 64 --blr 1.5e-3 \
    --num-workers "$WORKERS" --log-every 20

# 2. kNN of the frozen encoders (k=20, T=0.07), with an untrained one (init) as the floor
if [ ! -f "$OUT/pt_init/checkpoint-last.pth" ]; then
  python - "$OUT/pt_init/checkpoint-last.pth" <<'PY'
import sys, torch
from ummae.weights.io import save_atomic
from ummae.models import create_model
torch.manual_seed(0)
m = create_model("mae_swin_nano_128")
save_atomic({"model": m.state_dict(), "model_name": m.model_name, "model_args": m.model_args}, sys.argv[1])
PY
fi
for pt in init demo mini; do
  ummae knn --model swin_nano_128 --pretrained "$OUT/pt_$pt/checkpoint-last.pth" --data "$DATA" \
      --num-workers "$WORKERS" | tail -1 > "$OUT/knn_$pt.json"
done

# 3. fine-tuning: scratch vs the two pre-trained encoders, same recipe, same seeds
for seed in $SEEDS; do
  [ -f "$OUT/ft_scratch_s$seed/checkpoint-last.pth" ] || ummae finetune $FT --seed "$seed" --output "$OUT/ft_scratch_s$seed"
  for pt in demo mini; do
    [ -f "$OUT/ft_${pt}_s$seed/checkpoint-last.pth" ] || ummae finetune $FT --seed "$seed" --output "$OUT/ft_${pt}_s$seed" \
        --pretrained "$OUT/pt_$pt/checkpoint-last.pth"
  done
done

# 4. summary: final and best val top-1 of each fine-tune, per seed and averaged
python - "$OUT" $SEEDS <<'PY'
import json, sys, pathlib
out, seeds = pathlib.Path(sys.argv[1]), sys.argv[2:]
for row in ("scratch", "demo", "mini"):
    finals, bests = [], []
    for seed in seeds:
        recs = [json.loads(l) for l in (out / f"ft_{row}_s{seed}" / "metrics.jsonl").read_text().splitlines()]
        ep = [r for r in recs if "acc1" in r]
        finals.append(ep[-1]["acc1"])
        bests.append(max(r["acc1"] for r in ep))
    knn = json.loads((out / f"knn_{'init' if row == 'scratch' else row}.json").read_text())["knn_acc1"]
    print(f"{row:8s} final top-1 {' / '.join(f'{a:.1f}' for a in finals)} (mean {sum(finals) / len(finals):.1f})  "
          f"best {' / '.join(f'{b:.1f}' for b in bests)}  kNN {knn:.1f}")
PY
