"""Every evaluator of :mod:`ummae.evaluation` run through the one inference loop on small data
sets and stand-in models that give each image the same outputs whatever its batch (element-wise
maps, no matrix products), in one process or under torchrun (gloo): rank 0 writes the figures
each rank returned to the JSON file given.

    python -m torch.distributed.run --nproc_per_node 2 tests/_eval_ranks.py COCO_ROOT OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ummae.data.ade import collate_segmentation_eval
from ummae.data.coco import CocoDetection, collate_detection_eval
from ummae.data.collate import collate_skip_bad
from ummae.engine import dist as udist
from ummae.evaluation import inference_on_dataset, shard_loader
from ummae.evaluation.classification import FeatureBank, KnnEvaluator, TopKAccuracy, model_outputs
from ummae.evaluation.coco import CocoEvaluator, detections
from ummae.evaluation.segmentation import SemSegEvaluator, class_probabilities, images_of
from ummae.models.upernet import SegmenterInference

CLASSES = 7
COCO_SIZES = [(64, 40), (48, 72), (80, 80), (56, 60), (72, 48)]  # (w, h)
COCO_CATS = [(3, "car"), (1, "person"), (44, "bottle")]


class Vectors(torch.utils.data.Dataset):
    """``n`` random ``[CLASSES]`` vectors with labels (item 5 unreadable: ``None``, as
    ``ImageDataset`` gives an unreadable image in evaluation)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, CLASSES, generator=g)
        self.y = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return None if i == 5 else (self.x[i], self.y[i])


class Elementwise(nn.Module):
    """``x * w + b``: each row's outputs the same in any batch."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(CLASSES, generator=g))
        self.b = nn.Parameter(torch.randn(CLASSES, generator=g))
        self.num_features = CLASSES

    def forward(self, x):
        return x * self.w + self.b


class LabelMaps(torch.utils.data.Dataset):
    """Images of several sizes and label maps (classes 0..2, some pixels 255) that agree with
    :class:`Thresholds` about 70 % of the time."""

    def __init__(self, n: int = 7):
        g = torch.Generator().manual_seed(4)
        self.items = []
        for i in range(n):
            h, w = 24 + 8 * (i % 3), 40 - 4 * (i % 4)
            img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
            pred = (img[0] >= 80).long() + (img[0] >= 160).long()
            label = torch.where(torch.rand(h, w, generator=g) < 0.7, pred, torch.randint(0, 3, (h, w), generator=g))
            label[: h // 5] = 255
            self.items.append((img, label, f"{i}.png"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Thresholds(SegmenterInference, nn.Module):
    """A stand-in segmenter: class by the first channel's value (< 80, < 160, else), as
    logits at full resolution."""

    num_classes, ignore_index = 3, 255

    def normalize(self, images):
        return images.float()

    def logits(self, x):
        v = x[:, :1]
        cls = (v >= 80).long() + (v >= 160).long()
        return F.one_hot(cls[:, 0], 3).permute(0, 3, 1, 2).float() * 5


def write_coco(root: Path) -> Path:
    """A COCO split ``val`` of five images, each filled with a colour that tells its index,
    with two or three boxes each."""
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    images, anns = [], []
    for k, (w, h) in enumerate(COCO_SIZES):
        Image.new("RGB", (w, h), (10 * (k + 1), 0, 0)).save(root / "val" / f"{k}.png")
        images.append({"id": 100 + k, "file_name": f"{k}.png", "width": w, "height": h})
        for j in range(2 + k % 2):
            box = [2.0 + 9 * j, 3.0 + 7 * j, 12.0 + 2 * k, 10.0 + 3 * j]
            cat = COCO_CATS[(k + j) % 3][0]
            anns.append(
                {"id": len(anns) + 1, "image_id": 100 + k, "category_id": cat, "bbox": box, "area": box[2] * box[3]}
            )
            x1, y1, x2, y2 = box[0], box[1], box[0] + box[2], box[1] + box[3]
            anns[-1].update(iscrowd=0, segmentation=[[x1, y1, x2, y1, x2, y2, x1, y2]])
    data = {"images": images, "annotations": anns, "categories": [{"id": c, "name": n} for c, n in COCO_CATS]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


class ShiftedTruth(nn.Module):
    """Detections of each image (told apart by its colour): its ground-truth boxes, moved by
    a few pixels, scores all different, masks the boxes' rectangles, and one false positive."""

    def __init__(self, coco: CocoDetection):
        super().__init__()
        self.coco = coco

    def forward(self, images):
        out = []
        for im in images:
            k = round(float(im[0, 0, 0]) * 255 / 10) - 1
            t = self.coco.target(self.coco.ids.index(100 + k))
            boxes = torch.cat(
                [t["boxes"] + torch.tensor([1.0, 0.0, 1.0, 2.0]) * (k % 3), torch.tensor([[0, 0, 9, 9.0]])]
            )
            labels = torch.cat([t["labels"], torch.tensor([1 + k % 3])])
            scores = 0.9 - 0.01 * torch.arange(len(labels)) - 0.1 * k
            h, w = im.shape[-2:]
            masks = torch.zeros(len(boxes), 1, h, w)
            for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
                masks[i, 0, y1:y2, x1:x2] = 0.9
            out.append({"boxes": boxes, "labels": labels, "scores": scores, "masks": masks})
        return out


def all_figures(coco_root: Path, info: udist.DistInfo, batch_size: int = 3) -> dict[str, dict]:
    """The figures of every evaluator over this rank's shards (the whole sets in one process)."""
    cpu = torch.device("cpu")
    run = dict(device=cpu, precision="fp32")
    model = Elementwise(0)
    val, train = Vectors(23, 1), Vectors(31, 2)

    def loader(ds, collate=collate_skip_bad):
        return shard_loader(ds, batch_size, 0, info, cpu, collate)

    figures = {"top_k": inference_on_dataset(model, loader(val), TopKAccuracy(cpu), model_outputs, **run, desc="t")}
    bank = FeatureBank(CLASSES, cpu)
    figures["bank"] = inference_on_dataset(model, loader(train), bank, model_outputs, **run, desc="b")
    knn = KnnEvaluator(bank, CLASSES, 4, 0.1)
    figures["knn"] = inference_on_dataset(model, loader(val), knn, model_outputs, **run, desc="k")
    seg_loader = loader(LabelMaps(), collate_segmentation_eval)
    semseg = SemSegEvaluator(3, 255, cpu)
    test = class_probabilities(dict(mode="slide", crop=16, stride=11, scale=(40, 24)))
    figures["semseg"] = inference_on_dataset(
        Thresholds(), images_of(seg_loader), semseg, test, **run, desc="s", total=len(seg_loader.sampler)
    )
    coco = CocoDetection(coco_root, "val", train=False)
    coco_eval = CocoEvaluator(coco, ("bbox", "segm"))
    figures["coco"] = inference_on_dataset(
        ShiftedTruth(coco), loader(coco, collate_detection_eval), coco_eval, detections, **run, desc="c"
    )
    return figures


def main(coco_root: str, out: str) -> None:
    with udist.distributed("cpu") as (info, _):
        every_rank = udist.all_gather_object(all_figures(Path(coco_root), info))
        if info.is_main:
            Path(out).write_text(json.dumps(every_rank))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
