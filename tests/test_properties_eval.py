"""Properties of the evaluation protocols against plain formulations written out here:

* classification: the eval transform of :func:`ummae.data.classify.build_classify_transform`
  equals MAE's ``util/datasets.py::build_transform`` eval path pixel for pixel:
  ``Resize(int(size / crop_pct), bicubic)`` (the *short* side, keeping the aspect) then
  ``CenterCrop(size)``, ``ToTensor``, ``Normalize(ImageNet mean, std)``, with MAE's
  ``crop_pct = 224 / 256`` for ``size <= 224`` and ``1.0`` above;
* COCO: the category-id round trip (contiguous labels 1..K <-> the data set's category ids,
  which need be neither contiguous nor sorted in the JSON), the xyxy target boxes, the result
  conversion xyxy -> xywh, the background output 0 dropped, the whole
  :func:`ummae.tasks.detect.evaluate_coco` path on a stand-in detector that returns the ground
  truth (AP 1) and on one that shifts each box's class (AP 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from ummae.config import FinetuneConfig
from ummae.data import build_classify_transform, build_eval_loader
from ummae.data.coco import CocoDetection, coco_evaluate, coco_results, collate_detection_eval
from ummae.errors import DataError
from ummae.evaluation.coco import drop_background
from ummae.tasks.detect import evaluate_coco

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------- classification


def mae_eval_transform(input_size: int, crop_pct: float | None = None):
    """MAE's ``build_transform(is_train=False)``, written with torchvision."""
    if crop_pct is None:
        crop_pct = 224 / 256 if input_size <= 224 else 1.0
    size = int(input_size / crop_pct)
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(input_size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


def _noise_image(w: int, h: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: every interpolation and every offset gives other pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("w, h", [(500, 375), (333, 500), (300, 300), (257, 1000)])
def test_eval_transform__equals_mae_build_transform_at_224(w, h):
    img = _noise_image(w, h, w * h)
    ours = build_classify_transform(224, is_training=False)(img)
    ref = mae_eval_transform(224)(img)
    assert ours.shape == ref.shape == (3, 224, 224)
    assert torch.equal(ours, ref)
    # and with the command's default crop_pct
    crop_pct = FinetuneConfig.__dataclass_fields__["crop_pct"].default
    assert torch.equal(build_classify_transform(224, is_training=False, crop_pct=crop_pct)(img), ref)


@pytest.mark.parametrize("w, h", [(500, 375), (333, 500)])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875, 0.9])
def test_eval_transform__equals_the_plain_formulation_at_256_for_any_crop_pct(w, h, crop_pct):
    """At 256 px, int(256 / 0.875) = 292 (292.57: rounding would give 293); 256 / 0.9 = 284.4."""
    img = _noise_image(w, h, 7)
    ours = build_classify_transform(256, is_training=False, crop_pct=crop_pct)(img)
    assert torch.equal(ours, mae_eval_transform(256, crop_pct)(img))


def test_eval_transform__the_default_at_256_is_maes():
    img = _noise_image(500, 375, 8)
    crop_pct = FinetuneConfig.__dataclass_fields__["crop_pct"].default
    ours = build_classify_transform(256, is_training=False, crop_pct=crop_pct)(img)
    assert torch.equal(ours, mae_eval_transform(256)(img))


# ------------------------------------------------------------------------- COCO

# category ids neither contiguous nor sorted in the JSON (COCO's run 1..90 with gaps)
CATS = [(90, "toothbrush"), (3, "car"), (44, "bottle"), (1, "person"), (7, "train")]
SIZES = [(64, 40), (48, 72), (80, 80)]  # (w, h)
ANNS = [  # image index, category id, [x, y, w, h]
    (0, 90, [3.0, 4.0, 20.0, 10.0]),
    (0, 1, [30.0, 10.0, 25.0, 28.0]),
    (0, 44, [10.5, 20.25, 8.0, 12.0]),
    (1, 7, [5.0, 5.0, 40.0, 30.0]),
    (1, 3, [20.0, 40.0, 20.0, 25.0]),
    (2, 3, [0.0, 0.0, 30.0, 30.0]),
    (2, 90, [40.0, 45.0, 35.0, 30.0]),
    (2, 7, [10.0, 50.0, 12.0, 20.0]),
]
IMAGE_IDS = [139, 42, 7000]  # not in the order of the file names


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> CocoDetection:
    root = tmp_path_factory.mktemp("coco_props")
    (root / "annotations").mkdir()
    (root / "val2017").mkdir()
    images = []
    for k, ((w, h), image_id) in enumerate(zip(SIZES, IMAGE_IDS, strict=True)):
        name = f"{k:012d}.png"
        # the image encodes its own index in its colour, for the stand-in detectors
        Image.new("RGB", (w, h), (10 * (k + 1), 0, 0)).save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    anns = [
        {"id": i + 1, "image_id": IMAGE_IDS[k], "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for i, (k, c, b) in enumerate(ANNS)
    ]
    data = {"images": images, "annotations": anns, "categories": [{"id": c, "name": n} for c, n in CATS]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return CocoDetection(root, "val2017", train=False)


def test_coco__labels_are_one_plus_the_rank_of_the_sorted_category_id_and_round_trip(coco):
    sorted_ids = sorted(c for c, _ in CATS)  # 1, 3, 7, 44, 90
    assert coco.num_classes == 5
    assert coco.class_names == [dict(CATS)[c] for c in sorted_ids]
    for label in range(1, 6):
        assert coco.label_to_cat_id(label) == sorted_ids[label - 1]
    with pytest.raises(DataError):
        coco.label_to_cat_id(0)  # the background
    with pytest.raises(DataError):
        coco.label_to_cat_id(6)
    for index, image_id in enumerate(coco.ids):
        k = IMAGE_IDS.index(image_id)
        mine = [(c, b) for i, c, b in ANNS if i == k]
        t = coco.target(index)
        assert t["image_id"] == image_id and t["orig_size"] == (SIZES[k][1], SIZES[k][0])
        assert [coco.label_to_cat_id(int(lab)) for lab in t["labels"]] == [c for c, _ in mine]
        assert t["labels"].tolist() == [sorted_ids.index(c) + 1 for c, _ in mine]
        want = [[x, y, x + w, y + h] for _, (x, y, w, h) in mine]
        assert t["boxes"].tolist() == want


def test_coco_results__xyxy_to_xywh_and_labels_to_category_ids(coco):
    preds, refs = [], []
    for index in range(len(coco)):
        t = coco.target(index)
        n = len(t["labels"])
        preds.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(0.9, 0.5, n)})
        refs.append(t)
    results = coco_results(refs, preds, coco)
    got = sorted((r["image_id"], r["category_id"], tuple(r["bbox"])) for r in results)
    want = sorted((IMAGE_IDS[k], c, tuple(b)) for k, c, b in ANNS)
    assert got == want
    assert coco_evaluate(coco.coco, results, "bbox")["bbox_AP"] == pytest.approx(1.0)


def test_drop_background__only_output_zero_goes():
    det = {
        "boxes": torch.arange(20.0).reshape(5, 4),
        "labels": torch.tensor([0, 1, 5, 0, 2]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
    }
    out = drop_background(det)
    assert out["labels"].tolist() == [1, 5, 2] and out["scores"].tolist() == pytest.approx([0.8, 0.7, 0.5])
    assert torch.equal(out["boxes"], det["boxes"][[1, 2, 4]])


class _GroundTruthDetector(torch.nn.Module):
    """Returns, for each image (told apart by its colour), the ground truth as detections with
    the labels shifted by ``shift`` (mod K), plus a confident detection of output 0 (the
    background, which must be dropped) over the whole image."""

    def __init__(self, coco: CocoDetection, shift: int = 0):
        super().__init__()
        self.coco, self.shift = coco, shift

    def forward(self, images):
        out = []
        for im in images:
            k = round(float(im[0, 0, 0]) * 255 / 10) - 1
            t = self.coco.target(self.coco.ids.index(IMAGE_IDS[k]))
            labels = (t["labels"] - 1 + self.shift) % self.coco.num_classes + 1
            h, w = im.shape[-2:]
            out.append(
                {
                    "boxes": torch.cat([torch.tensor([[0.0, 0.0, w, h]]), t["boxes"]]),
                    "labels": torch.cat([torch.tensor([0]), labels]),
                    "scores": torch.cat([torch.tensor([0.99]), torch.full((len(labels),), 0.8)]),
                }
            )
        return out


@pytest.mark.parametrize("shift, ap", [(0, 1.0), (1, 0.0)])
def test_evaluate_coco__stand_in_detector_of_the_ground_truth(coco, shift, ap, tmp_path):
    loader = build_eval_loader(coco, 2, 0, collate_fn=collate_detection_eval)
    path = tmp_path / "results.json"
    metrics = evaluate_coco(
        _GroundTruthDetector(coco, shift), coco, loader, torch.device("cpu"), "fp32", ("bbox",), str(path)
    )
    assert metrics["bbox_AP"] == pytest.approx(ap)
    written = json.loads(Path(path).read_text())
    assert len(written) == len(ANNS)  # the background detections dropped
    assert {r["category_id"] for r in written} <= {c for c, _ in CATS}
