"""Stand-in COCO-stuff maps drawn from a COCO split's instance masks, for HTC's semantic branch
(``ummae detect train --detector htc --stuff-maps DIR``) where the real ``stuffthingmaps`` are
not at hand (``../shared`` has none).

Each image gets ``OUT/<file stem>.png`` (uint8, one channel, the image's size): the pixels of
each non-crowd instance painted with its category id - 1 (the stuffthingmaps numbering of the
thing classes, 0..90), in annotation order, every other pixel 255 (unlabelled: ignored by the
loss). The real maps also label the stuff classes (91..181); these do not.

Usage: python experiments/stuff_maps_from_instances.py COCO_ROOT SPLIT OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from ummae.data.coco import CocoDetection


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("split")
    p.add_argument("out")
    args = p.parse_args()
    ds = CocoDetection(args.root, args.split, train=True, with_masks=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image_id in enumerate(ds.ids):
        target = ds.target(i)
        stuff = np.full(target["orig_size"], 255, dtype=np.uint8)
        for mask, label in zip(target["masks"].numpy(), target["labels"].tolist(), strict=True):
            stuff[mask > 0] = ds.cat_ids[label - 1] - 1
        Image.fromarray(stuff, mode="L").save(out / (Path(ds.coco.imgs[image_id]["file_name"]).stem + ".png"))
    print(f"wrote {len(ds.ids)} stuff maps to {out}")


if __name__ == "__main__":
    main()
