"""Tests of ummae.data.coco on coco_mini (80 train / 80 val COCO images, long side 320):
loading and targets (boxes, labels, crowd regions, masks from polygons and RLE), large-scale
jitter, collate and the training loader, COCO evaluation, and bad input (broken or missing
annotation files, images missing on disk or corrupt)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from _helpers import COCO_MINI
from ummae.data import build_train_loader
from ummae.data.coco import (
    CocoDetection,
    LargeScaleJitter,
    coco_evaluate,
    coco_results,
    collate_detection,
    collate_detection_eval,
    masks_to_boxes,
    write_results_json,
)

PAD = (124, 116, 104)


def _root() -> Path:
    if not (COCO_MINI / "annotations" / "instances_train2017.json").is_file():
        pytest.fail(
            f"the coco_mini test data is missing: expected {COCO_MINI} with "
            f"annotations/instances_{{train,val}}2017.json and train2017/, val2017/"
        )
    return COCO_MINI


def _json(split: str) -> dict:
    with open(_root() / "annotations" / f"instances_{split}.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def train_ds():
    return CocoDetection(_root(), "train2017", train=True, with_masks=True, transform=LargeScaleJitter(256))


@pytest.fixture(scope="module")
def train_eval_ds():
    """The train split as evaluation reads it: every annotation, crowd regions included."""
    return CocoDetection(_root(), "train2017", train=False, with_masks=True)


@pytest.fixture(scope="module")
def val_ds():
    return CocoDetection(_root(), "val2017", train=False, with_masks=True)


def _mirror(tmp_path: Path, split: str = "train2017") -> Path:
    """A copy of coco_mini's ``split`` in ``tmp_path``: images as symlinks (so one can be
    deleted or replaced), the annotation file as a real copy (so it can be edited)."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / split).mkdir()
    for img in sorted((_root() / split).iterdir()):
        (root / split / img.name).symlink_to(img)
    data = (_root() / "annotations" / f"instances_{split}.json").read_bytes()
    (root / "annotations" / f"instances_{split}.json").write_bytes(data)
    return root


# ---------------------------------------------------------------- loading and targets


def test_train_split__images_classes_labels(train_ds):
    data = _json("train2017")
    # every train image of coco_mini has a non-crowd annotation: none is left out
    assert len(train_ds) == 80 and train_ds.ids == sorted(i["id"] for i in data["images"])
    assert train_ds.num_classes == 80 == len(train_ds.class_names)
    assert train_ds.cat_ids == sorted(c["id"] for c in data["categories"])
    n_targets = 0
    for i in range(len(train_ds)):
        t = train_ds.target(i)
        assert t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32
        assert int(t["labels"].min()) >= 1 and int(t["labels"].max()) <= 80
        assert t["image_id"] == train_ds.ids[i]
        n_targets += len(t["labels"])
    assert n_targets == 705 - 6  # every annotation but the 6 crowd regions
    assert train_ds.label_to_cat_id(1) == 1 and train_ds.label_to_cat_id(80) == 90
    with pytest.raises(ValueError, match="label 0"):
        train_ds.label_to_cat_id(0)


def test_target__box_converted_to_xyxy(train_ds):
    # annotation 3007 of image 98304: bbox [131.94, 108.44, 10.56, 7.58], category 18 (dog);
    # category ids 1..11, 13..18 precede it, so its label is 17
    t = train_ds.target(train_ds.ids.index(98304))
    assert t["orig_size"] == (212, 320)
    assert torch.allclose(t["boxes"][0], torch.tensor([131.94, 108.44, 142.50, 116.02]))
    assert int(t["labels"][0]) == 17 and train_ds.class_names[17 - 1] == "dog"
    assert train_ds.label_to_cat_id(17) == 18
    assert abs(float(t["area"][0]) - 49.3247) < 1e-3


def test_crowd__dropped_for_training_kept_for_eval(train_ds, train_eval_ds):
    assert len(train_eval_ds) == 80
    for ds in (train_ds, train_eval_ds):
        i = ds.ids.index(262145)  # 2 crowd regions (900100262145, 905700262145)
        t = ds.target(i)
        n_all = len(ds.coco.imgToAnns[262145])
        if ds is train_ds:
            assert len(t["labels"]) == n_all - 2 and int(t["iscrowd"].sum()) == 0
        else:
            assert len(t["labels"]) == n_all and int(t["iscrowd"].sum()) == 2
    assert sum(int(train_ds.target(i)["iscrowd"].sum()) for i in range(80)) == 0
    assert sum(len(train_eval_ds.target(i)["labels"]) for i in range(80)) == 705


def test_masks__polygon_area_and_crowd_rle(train_ds, train_eval_ds):
    # the largest non-crowd object: annotation 1901023 of image 557059 (a polygon)
    t = train_ds.target(train_ds.ids.index(557059))
    anns = train_ds.coco.imgToAnns[557059]
    k = [a["id"] for a in anns if not a["iscrowd"]].index(1901023)
    h, w = t["orig_size"]
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (len(t["labels"]), h, w)
    assert 0.9 < int(t["masks"][k].sum()) / 73211.1102 < 1.1
    # the mask's box (pixel edges) is the annotation's box [2.48, 0.93, 237.52, 314.19] within
    # the rasterisation's pixel
    assert torch.allclose(masks_to_boxes(t["masks"][k : k + 1])[0], t["boxes"][k], atol=1.0)
    # crowd regions are uncompressed RLEs: e.g. 904400581632 of image 581632 (239 x 320)
    t = train_eval_ds.target(train_eval_ds.ids.index(581632))
    ids = [a["id"] for a in train_eval_ds.coco.imgToAnns[581632]]
    k = ids.index(904400581632)
    assert t["masks"].shape[1:] == (239, 320) and int(t["iscrowd"][k]) == 1
    assert 0.9 < int(t["masks"][k].sum()) / 6362.75 < 1.1
    # every crowd mask is pycocotools' own rasterisation of the annotation
    coco = train_eval_ds.coco
    for a in coco.loadAnns(coco.getAnnIds(iscrowd=True)):
        t = train_eval_ds.target(train_eval_ds.ids.index(a["image_id"]))
        k = [b["id"] for b in coco.imgToAnns[a["image_id"]]].index(a["id"])
        assert np.array_equal(t["masks"][k].numpy(), coco.annToMask(a))


def test_masks__compressed_rle_decodes_like_uncompressed(tmp_path, train_eval_ds):
    root = _mirror(tmp_path)
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    for a in data["annotations"]:
        if a["iscrowd"]:
            h, w = a["segmentation"]["size"]
            rle = mask_utils.frPyObjects(a["segmentation"], h, w)
            a["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    path.write_text(json.dumps(data))
    ds = CocoDetection(root, "train2017", train=False, with_masks=True)
    i = ds.ids.index(262145)
    assert torch.equal(ds.target(i)["masks"], train_eval_ds.target(i)["masks"])


def test_eval_access__original_size_uint8(val_ds):
    img, t = val_ds[0]
    h, w = t["orig_size"]
    assert img.dtype == torch.uint8 and img.shape == (3, h, w)
    assert t["masks"].shape == (len(t["labels"]), h, w)
    assert len(val_ds) == 80 and "COCO" in val_ds.describe()


# ---------------------------------------------------------------- large-scale jitter


def _image_and_target(ds: CocoDetection, image_id: int, masks: bool = False):
    i = ds.ids.index(image_id)
    t = ds.target(i)
    if not masks:
        t.pop("masks", None)
    return ds._read(i), t


def test_lsj__shapes_and_boxes_in_valid_region(train_ds):
    for seed in range(8):
        img, t, n = train_ds.load_or_substitute((seed * 7 % 80, seed))
        assert img.shape == (3, 256, 256) and img.dtype == torch.uint8 and n == 0
        ch, cw = t["img_shape"]
        assert ch <= 256 and cw <= 256 and max(ch, cw) >= 26  # long side >= 0.1 x 256
        b = t["boxes"]
        assert b.shape == (len(t["labels"]), 4) and len(t["masks"]) == len(b)
        assert bool((b[:, 0] >= 0).all() and (b[:, 2] <= cw).all())
        assert bool((b[:, 1] >= 0).all() and (b[:, 3] <= ch).all())
        assert bool(((b[:, 2] - b[:, 0]) > 1e-2).all() and ((b[:, 3] - b[:, 1]) > 1e-2).all())
        # with masks, every box is the box of its (cropped, maybe flipped) mask
        assert torch.equal(b, masks_to_boxes(t["masks"]))
        assert t["masks"].shape[1:] == (256, 256)
        assert int(t["masks"][:, ch:].sum()) == 0 and int(t["masks"][:, :, cw:].sum()) == 0
        pad = torch.tensor(PAD, dtype=torch.uint8).view(3, 1, 1)
        assert bool((img[:, ch:] == pad).all() and (img[:, :, cw:] == pad).all())


def test_lsj__same_seed_same_output(train_ds):
    state = torch.get_rng_state()
    a_img, a_t, _ = train_ds.load_or_substitute((5, 1234))
    b_img, b_t, _ = train_ds.load_or_substitute((5, 1234))
    c_img, c_t, _ = train_ds.load_or_substitute((5, 4321))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is left alone
    assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])
    assert torch.equal(a_t["masks"], b_t["masks"])
    assert not torch.equal(a_img, c_img)


def test_lsj__unit_scale_no_flip_is_a_plain_resize(val_ds):
    img, t = _image_and_target(val_ds, 5001)  # 320 x 240
    out, o = LargeScaleJitter(256, (1.0, 1.0), flip_prob=0.0)(img, t)
    assert o["img_shape"] == (192, 256)
    expected = t["boxes"] * torch.tensor([256 / 320, 192 / 240, 256 / 320, 192 / 240])
    keep = ((expected[:, 2:] - expected[:, :2]) > 1e-2).all(dim=1)
    assert torch.allclose(o["boxes"], expected[keep], atol=1e-4)
    assert torch.equal(o["labels"], t["labels"][keep])
    assert o["orig_size"] == t["orig_size"] and o["image_id"] == 5001


def test_lsj__flip_mirrors_boxes_and_image(val_ds):
    img, t = _image_and_target(val_ds, 5001)
    runs = []
    for flip in (0.0, 1.0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            runs.append(LargeScaleJitter(256, (0.5, 1.5), flip_prob=flip)(img, t))
    (a, ta), (b, tb) = runs
    ch, cw = ta["img_shape"]
    assert tb["img_shape"] == (ch, cw)
    fa = ta["boxes"]
    assert torch.allclose(tb["boxes"], torch.stack([cw - fa[:, 2], fa[:, 1], cw - fa[:, 0], fa[:, 3]], dim=1))
    assert torch.equal(b[:, :ch, :cw], a[:, :ch, :cw].flip(-1))


def test_lsj__large_scale_crops_and_may_drop_objects(val_ds):
    img, t = _image_and_target(val_ds, 5001, masks=True)
    lsj = LargeScaleJitter(128, (2.0, 2.0), flip_prob=0.0)
    counts = set()
    for seed in range(6):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out, o = lsj(img, t)
        assert o["img_shape"] == (128, 128)  # 256 x 192 before the crop: no padding
        assert torch.equal(o["boxes"], masks_to_boxes(o["masks"]))
        assert len(o["masks"]) == len(o["labels"]) == len(o["iscrowd"]) == len(o["area"])
        counts.add(len(o["labels"]))
    assert len(counts) > 1  # different crops keep different objects


def test_lsj__bad_arguments():
    with pytest.raises(ValueError, match="scale_range"):
        LargeScaleJitter(64, (0.0, 1.0))
    with pytest.raises(ValueError, match="flip_prob"):
        LargeScaleJitter(64, flip_prob=2)


# ---------------------------------------------------------------- collate and loader


def test_train_loader__batches(train_ds):
    loader, sampler = build_train_loader(train_ds, 2, 0, collate_fn=collate_detection)
    images, targets, n_skipped = next(iter(loader))
    assert images.shape == (2, 3, 256, 256) and images.dtype == torch.uint8
    assert len(targets) == 2 and n_skipped == 0
    assert {"boxes", "labels", "masks", "image_id", "img_shape"} <= set(targets[0])
    assert len(loader) == 40


def test_collate_detection_eval__drops_unreadable():
    img = torch.zeros(3, 4, 5, dtype=torch.uint8)
    images, targets, n = collate_detection_eval([(img, {"image_id": 1}), None])
    assert len(images) == 1 and targets == [{"image_id": 1}] and n == 1


# ---------------------------------------------------------------- evaluation


def _gt_predictions(ds: CocoDetection, keep_every: int = 1):
    targets, preds = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        keep = torch.nonzero(t["iscrowd"] == 0).flatten()[::keep_every]
        preds.append(
            {
                "boxes": t["boxes"][keep],
                "labels": t["labels"][keep],
                "scores": torch.ones(len(keep)),
                "masks": t["masks"][keep][:, None].float(),
            }
        )
        targets.append(t)
    return targets, preds


def test_coco_results__format(val_ds):
    targets, preds = _gt_predictions(val_ds)
    results = coco_results(targets[:1], preds[:1], val_ds)
    anns = [a for a in val_ds.coco.imgToAnns[targets[0]["image_id"]] if not a["iscrowd"]]
    assert len(results) == len(anns)
    r, a = results[0], anns[0]
    assert r["image_id"] == a["image_id"] and r["category_id"] == a["category_id"]
    assert np.allclose(r["bbox"], a["bbox"], atol=1e-4) and r["score"] == 1.0
    assert isinstance(r["segmentation"]["counts"], str)
    assert r["segmentation"]["size"] == list(targets[0]["orig_size"])
    with pytest.raises(ValueError, match="original size"):
        coco_results(targets[:1], [{**preds[0], "masks": preds[0]["masks"][..., :10]}], val_ds)


def test_coco_evaluate__ground_truth_scores_one(val_ds, caplog):
    targets, preds = _gt_predictions(val_ds)
    results = coco_results(targets, preds, val_ds)
    summaries = {}
    with caplog.at_level(logging.INFO, logger="ummae.data"):
        m = coco_evaluate(val_ds.coco, results, ("bbox", "segm"), val_ds.ids, summaries=summaries)
    for t in ("bbox", "segm"):
        assert m[f"{t}_AP"] == m[f"{t}_AP50"] == m[f"{t}_AP75"] == pytest.approx(1.0)
        assert "Average Precision" in summaries[t]
    assert set(m) == {f"{t}_{k}" for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert "Average Precision" in caplog.text


def test_coco_evaluate__half_the_objects_found(val_ds, capsys):
    targets, preds = _gt_predictions(val_ds, keep_every=2)
    m = coco_evaluate(val_ds.coco, coco_results(targets, preds, val_ds), "bbox", val_ds.ids)
    assert 0.2 < m["bbox_AP"] < 0.9
    assert capsys.readouterr().out == ""  # pycocotools' prints stay off stdout


def test_coco_evaluate__images_without_detections_count(val_ds):
    targets, preds = _gt_predictions(val_ds)
    results = coco_results(targets[:40], preds[:40], val_ds)
    assert coco_evaluate(val_ds.coco, results, "bbox", val_ds.ids)["bbox_AP"] < 1.0
    assert coco_evaluate(val_ds.coco, results, "bbox", val_ds.ids[:40])["bbox_AP"] == pytest.approx(1.0)


def test_coco_evaluate__no_results_is_zero(val_ds, caplog):
    with caplog.at_level(logging.WARNING, logger="ummae.data"):
        m = coco_evaluate(val_ds.coco, [], ("bbox", "segm"), val_ds.ids)
    assert m["bbox_AP"] == 0.0 and m["segm_AP75"] == 0.0 and len(m) == 12
    assert "no detections" in caplog.text


def test_write_results_json__atomic_and_loadable(tmp_path, val_ds):
    targets, preds = _gt_predictions(val_ds)
    results = coco_results(targets[:3], preds[:3], val_ds)
    path = write_results_json(results, tmp_path / "out" / "results.json")
    assert os.listdir(tmp_path / "out") == ["results.json"]
    loaded = json.loads(path.read_text())
    assert loaded == results
    m = coco_evaluate(val_ds.coco, loaded, ("bbox", "segm"))  # all 80 images
    assert 0.0 < m["segm_AP"] < 1.0


# ---------------------------------------------------------------- bad input


def test_bad_input__missing_annotation_file(tmp_path):
    root = _mirror(tmp_path)
    (root / "annotations" / "instances_train2017.json").unlink()
    with pytest.raises(ValueError, match="annotation file not found: .*instances_train2017.json"):
        CocoDetection(root, "train2017", train=True)


def test_bad_input__truncated_json(tmp_path):
    root = _mirror(tmp_path)
    path = root / "annotations" / "instances_train2017.json"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"{path}.*not valid JSON") as e:
        CocoDetection(root, "train2017", train=True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("annotations"), "no 'annotations' list"),
        (lambda d: d["annotations"][0].update(image_id=1), "points at image id 1"),
        (lambda d: d["annotations"][0].update(category_id=12), "category id 12"),
        (lambda d: d["images"][0].pop("file_name"), "has no 'file_name'"),
    ],
)
def test_bad_input__not_a_coco_instances_file(tmp_path, edit, message):
    root = _mirror(tmp_path)
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{path} is not a COCO instances file: .*{message}"):
        CocoDetection(root, "train2017", train=True)


def test_bad_input__image_missing_on_disk(tmp_path):
    root = _mirror(tmp_path)
    (root / "train2017" / "000000098304.jpg").unlink()
    with pytest.raises(
        ValueError,
        match=r"1 of the 80 images listed in .*instances_train2017"
        r"\.json are missing on disk, e\.g\. .*000000098304\.jpg",
    ):
        CocoDetection(root, "train2017", train=True)


def test_bad_input__corrupt_image_substituted_in_training(tmp_path, caplog):
    root = _mirror(tmp_path)
    bad = root / "train2017" / "000000008193.jpg"  # image id 8193: sample 0
    bad.unlink()
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    ds = CocoDetection(root, "train2017", train=True, transform=LargeScaleJitter(64))
    with caplog.at_level(logging.WARNING, logger="ummae.data"):
        img, t, n = ds.load_or_substitute((0, 9))
    assert n == 1 and t["image_id"] == ds.ids[1] and img.shape == (3, 64, 64)
    assert "000000008193.jpg" in caplog.text
    ev = CocoDetection(root, "train2017", train=False)
    assert ev[0] is None and ev[1] is not None


def test_bad_input__image_size_differs_from_json(tmp_path, caplog):
    """A resized copy of an image would put every box in the wrong place: it is treated as
    unreadable (skipped in evaluation, substituted in training), with the reason logged."""
    from PIL import Image

    root = _mirror(tmp_path)
    path = root / "train2017" / "000000008193.jpg"
    with Image.open(path) as f:
        small = f.convert("RGB").resize((160, 112))
    path.unlink()
    small.save(path)
    ev = CocoDetection(root, "train2017", train=False)
    with caplog.at_level(logging.WARNING, logger="ummae.data"):
        assert ev[0] is None
    assert "160x112 differs from the 320x224" in caplog.text
