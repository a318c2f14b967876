"""A small COCO root cut from another: the first N images of each split (by image id), their
annotations, the full category list, images linked rather than copied.

    python experiments/coco_subset.py ../shared/data/coco_mini /tmp/coco8 --train 8 --val 8 --val-from train2017

``--val-from train2017`` makes the val split the same images as the training split: an
over-fit check, whose AP says whether the detector can learn what it is shown.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def coco_subset(src: Path, root: Path, n_train: int, n_val: int, val_from: str = "val2017") -> Path:
    for split, origin, n in (("train2017", "train2017", n_train), ("val2017", val_from, n_val)):
        data = json.loads((src / "annotations" / f"instances_{origin}.json").read_text())
        images = sorted(data["images"], key=lambda im: im["id"])[:n]
        ids = {im["id"] for im in images}
        data["images"] = images
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (root / split).mkdir(exist_ok=True)
        for im in images:
            os.symlink((src / origin / im["file_name"]).resolve(), root / split / im["file_name"])
    return root


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="a COCO root (train2017/, val2017/, annotations/)")
    p.add_argument("dst", type=Path, help="the new root (must not exist)")
    p.add_argument("--train", type=int, default=8, help="training images (default: 8)")
    p.add_argument("--val", type=int, default=8, help="val images (default: 8)")
    p.add_argument("--val-from", default="val2017", help="split the val images come from (default: val2017)")
    a = p.parse_args()
    if a.dst.exists():
        raise SystemExit(f"{a.dst} exists: give a new folder")
    coco_subset(a.src, a.dst, a.train, a.val, a.val_from)
    print(f"wrote {a.dst}: {a.train} train2017 images, {a.val} val2017 images (from {a.val_from})")
