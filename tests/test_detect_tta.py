"""Multi-scale + flip test (``ummae.models.detect_tta``): the merge rules against MMDetection 2.x's
(``merge_augs.py``, ``bbox_mapping`` / ``bbox_mapping_back``, the dense heads' ``aug_test_bboxes``)
written out here in numpy on hand-made tensors; one scale without flip at the canvas is the plain
test; a flip test is mirror-symmetric on real detectors; test images are padded to a size the
backbone runs; every detector's ``detect eval --test-scales ... --test-flip`` gives valid COCO
results on ``../shared/data/coco_mini`` (two gloo ranks give the one-process results:
``tests/test_detect.py::test_detect_eval__two_ranks_give_the_one_rank_numbers``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import TINY_DETECTOR, coco_subset
from ummae.cli import main
from ummae.detector_specs import SPECS
from ummae.models.dense import build_stage_maps
from ummae.models.detect_tta import (
    MultiScaleFlip,
    at_scale,
    detect,
    flip_boxes,
    map_back,
    map_to_aug,
    merge_boxes,
    merge_dense,
    merge_masks,
    merge_proposals,
    size_divisor,
)
from ummae.models.detectors import build_detector

# -- MMDetection 2.x's definitions, in numpy ---------------------------------------------------


def mm_bbox_flip(bboxes: np.ndarray, img_shape) -> np.ndarray:
    """``mmdet.core.bbox.transforms.bbox_flip``, horizontal."""
    w = img_shape[1]
    flipped = bboxes.copy()
    flipped[..., 0::4] = w - bboxes[..., 2::4]
    flipped[..., 2::4] = w - bboxes[..., 0::4]
    return flipped


def mm_bbox_mapping(bboxes, img_shape, scale_factor, flip):
    new = bboxes * scale_factor
    return mm_bbox_flip(new, img_shape) if flip else new


def mm_bbox_mapping_back(bboxes, img_shape, scale_factor, flip):
    new = mm_bbox_flip(bboxes, img_shape) if flip else bboxes
    return (new.reshape(-1, 4) / scale_factor).reshape(bboxes.shape)


def mm_scale_factor(aug_shape, ori_shape) -> np.ndarray:
    """``Resize`` with keep_ratio: ``[w_scale, h_scale, w_scale, h_scale]``."""
    (ah, aw), (oh, ow) = aug_shape, ori_shape
    return np.array([aw / ow, ah / oh, aw / ow, ah / oh], dtype=np.float32)


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """NMS as mmcv's ``nms``: the best remaining box kept, every box overlapping it by more than
    ``iou`` dropped, in order of decreasing score."""
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if box_iou_np(boxes[i], boxes[j]) <= iou]
    return keep


def box_iou_np(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def random_boxes(rng, n, h, w) -> np.ndarray:
    xy = rng.uniform(0, [w * 0.7, h * 0.7], size=(n, 2))
    wh = rng.uniform(4, [w * 0.3, h * 0.3], size=(n, 2))
    return np.concatenate([xy, xy + wh], -1).astype(np.float32)


IMAGE = (60, 90)  # (h, w) of the original image
AUGS = [((40, 60), False), ((40, 60), True), ((120, 180), True)]  # (aug h, w), flip


# -- the maps ------------------------------------------------------------------------------


def test_map_back_and_map_to_aug__are_mmdetection_s_bbox_mapping_back_and_bbox_mapping():
    rng = np.random.default_rng(0)
    for aug, flip in AUGS:
        boxes = random_boxes(rng, 7, *aug)
        sf = mm_scale_factor(aug, IMAGE)
        back = map_back(torch.from_numpy(boxes), aug, IMAGE, flip).numpy()
        np.testing.assert_allclose(back, mm_bbox_mapping_back(boxes, aug, sf, flip), rtol=1e-5, atol=1e-4)
        forward = map_to_aug(torch.from_numpy(back), IMAGE, aug, flip).numpy()
        np.testing.assert_allclose(forward, mm_bbox_mapping(back, aug, sf, flip), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(forward, boxes, rtol=1e-5, atol=1e-3)  # the one undoes the other
    per_class = random_boxes(rng, 6, 40, 60).reshape(3, 2, 4)  # [N, C, 4]: every class's box mapped
    sf = mm_scale_factor((40, 60), IMAGE)
    np.testing.assert_allclose(
        map_back(torch.from_numpy(per_class), (40, 60), IMAGE, True).numpy(),
        mm_bbox_mapping_back(per_class, (40, 60), sf, True),
        rtol=1e-5,
        atol=1e-4,
    )


# -- the merges ----------------------------------------------------------------------------


def test_merge_proposals__is_merge_aug_proposals():
    """Each augmentation's proposals mapped back, concatenated, NMS over all of them at the
    RPN's IoU, sorted by score, the top n; near-duplicates across augmentations (a proposal
    and the mirror image's copy of it) collapse into one."""
    rng = np.random.default_rng(1)
    found, scores, mm = [], [], []
    shared = random_boxes(rng, 5, *IMAGE)  # objects every augmentation finds, slightly moved
    for aug, flip in AUGS:
        sf = mm_scale_factor(aug, IMAGE)
        own = np.concatenate([mm_bbox_mapping(shared + rng.normal(0, 0.5, shared.shape), aug, sf, flip)])
        boxes = np.concatenate([own, random_boxes(rng, 6, *aug)]).astype(np.float32)
        score = rng.uniform(0, 1, len(boxes)).astype(np.float32)
        found.append(map_back(torch.from_numpy(boxes), aug, IMAGE, flip))
        scores.append(torch.from_numpy(score))
        mm.append(np.concatenate([mm_bbox_mapping_back(boxes, aug, sf, flip), score[:, None]], 1))
    proposals = np.concatenate(mm)
    merged = proposals[greedy_nms(proposals[:, :4], proposals[:, 4], 0.7)]
    merged = merged[np.argsort(-merged[:, 4], kind="stable")][:9]
    got = merge_proposals(found, scores, 0.7, 9).numpy()
    assert len(merged) == 9 < len(proposals)
    np.testing.assert_allclose(got, merged[:, :4], rtol=1e-5, atol=1e-4)


def test_merge_boxes__is_merge_aug_bboxes_the_mean_of_the_mapped_back_class_boxes_and_scores():
    rng = np.random.default_rng(2)
    n, c = 4, 3
    boxes, scores, mm_boxes = [], [], []
    for aug, flip in AUGS:
        b = random_boxes(rng, n * c, *aug).reshape(n, c, 4)
        p = rng.dirichlet(np.ones(c), n).astype(np.float32)
        boxes.append(map_back(torch.from_numpy(b), aug, IMAGE, flip))
        scores.append(torch.from_numpy(p))
        # MMDetection's layout: (n, 4 * #class)
        mm_boxes.append(mm_bbox_mapping_back(b.reshape(n, 4 * c), aug, mm_scale_factor(aug, IMAGE), flip))
    got_boxes, got_scores = merge_boxes(boxes, scores)
    want_boxes = sum(mm_boxes) / len(mm_boxes)
    np.testing.assert_allclose(got_boxes.numpy().reshape(n, 4 * c), want_boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_scores.numpy(), sum(p.numpy() for p in scores) / len(scores), rtol=1e-6)


def test_merge_masks__is_merge_aug_masks_with_the_mirrored_ones_flipped_back():
    rng = np.random.default_rng(3)
    probs = [rng.uniform(0, 1, (2, 1, 5, 5)).astype(np.float32) for _ in AUGS]
    flips = [f for _, f in AUGS]
    want = np.mean([p[:, :, :, ::-1] if f else p for p, f in zip(probs, flips, strict=True)], axis=0)
    got = merge_masks([torch.from_numpy(p) for p in probs], flips).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_merge_dense__concatenates_the_augmentations_candidates_then_nms_per_class_and_top_k():
    """``aug_test_bboxes``: no averaging; the same object found by two augmentations is one
    detection after the class-wise NMS, and a class does not suppress another."""
    rng = np.random.default_rng(4)
    found, mm = [], []
    for aug, flip in AUGS:
        boxes = random_boxes(rng, 8, *aug)
        scores = rng.uniform(0.05, 1, 8).astype(np.float32)
        labels = rng.integers(1, 3, 8)
        back = mm_bbox_mapping_back(boxes, aug, mm_scale_factor(aug, IMAGE), flip)
        found.append(
            {
                "boxes": torch.from_numpy(back.copy()),
                "scores": torch.from_numpy(scores),
                "labels": torch.from_numpy(labels),
            }
        )
        mm.append((back, scores, labels))
    boxes, scores, labels = (np.concatenate(x) for x in zip(*mm, strict=True))
    keep = []
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        keep += [idx[i] for i in greedy_nms(boxes[idx], scores[idx], 0.3)]
    keep = sorted(keep, key=lambda i: -scores[i])[:10]
    got = merge_dense(found, 0.3, 10)
    assert len(keep) == 10 and len(got["boxes"]) == 10
    np.testing.assert_allclose(got["boxes"].numpy(), boxes[keep], rtol=1e-6)
    np.testing.assert_allclose(got["scores"].numpy(), scores[keep])
    assert got["labels"].tolist() == labels[keep].tolist()


# -- on detectors --------------------------------------------------------------------------


def _detector(name: str, **overrides):
    """A tiny detector of spec ``name`` on swin_test, random weights, every detection kept
    down to score 0 (100 per image)."""
    options = {**TINY_DETECTOR, "fpn_channels": 64, **overrides}
    model = build_detector(name, "swin_test", 5, drop_path=0.0, **options).eval()
    for m in model.modules():
        if hasattr(m, "score_thresh"):
            m.score_thresh = 0.0
    return model


def _same_detections(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("detector", list(SPECS))
def test_one_scale_without_flip_at_the_canvas__is_the_plain_test(detector):
    """MMDetection runs ``simple_test`` for one augmentation; at the canvas size (the divisor,
    64 or 128, divides the 128 px canvas) it is the plain model's output, exactly."""
    model = _detector(detector)
    assert model.transform.max_size == 128 and 128 % size_divisor(model) == 0
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 60, 90, generator=g), torch.rand(3, 128, 100, generator=g)]
    with torch.no_grad():  # image by image, as the test runs them (a batch's sums differ in the last bits)
        plain = [model([image])[0] for image in images]
        tested = detect(model, images, MultiScaleFlip(((128, 128),), False))
    for p, t in zip(plain, tested, strict=True):
        assert len(p["boxes"]) > 0
        _same_detections(p, t)
    assert model.transform.size_divisible == 128 and model.transform.min_size == (128,)  # restored


@pytest.mark.parametrize("detector", list(SPECS))
def test_an_image_without_detections__gives_the_plain_test_s_empty_outputs(detector):
    """Nothing above the thresholds (no proposal either): the outputs the plain test gives,
    empty, masks included."""
    model = _detector(detector)
    for m in model.modules():
        if hasattr(m, "score_thresh"):
            m.score_thresh = 1.0
    image = torch.rand(3, 40, 70)
    with torch.no_grad():
        plain = model([image])[0]
    tested = detect(model, [image], MultiScaleFlip(((96, 64),), True))[0]
    assert {k: tuple(v.shape) for k, v in tested.items()} == {k: tuple(v.shape) for k, v in plain.items()}
    assert len(plain["boxes"]) == 0


def _mirrored(det: dict, width: int) -> dict:
    out = {**det, "boxes": flip_boxes(det["boxes"], width)}
    if "masks" in det:
        out["masks"] = det["masks"].flip(-1)
    return out


def _by_score(det: dict) -> dict:
    order = det["scores"].argsort(descending=True)
    return {k: v[order] for k, v in det.items()}


@pytest.mark.parametrize("detector", ["gfl", "cascade_maskrcnn"])
def test_flip_test__of_the_mirror_image_is_the_mirror_of_the_image_s(detector):
    """With flip, the augmentations of an image and of its mirror image are the same two
    pictures: the merged detections of the mirror image are those of the image mirrored
    (boxes and masks), at two scales. A merge that mapped a flipped augmentation back wrong, or
    did not flip its masks back, breaks the symmetry."""
    torch.manual_seed(0)
    model = _detector(detector)
    for m in model.modules():  # a few confident detections: no near-ties at the cut
        if hasattr(m, "detections_per_img"):
            m.detections_per_img = 10
    image = torch.rand(3, 50, 76, generator=torch.Generator().manual_seed(1))
    test = MultiScaleFlip(((96, 64), (128, 96)), True)
    got = _by_score(detect(model, [image.flip(-1)], test)[0])
    want = _by_score(_mirrored(detect(model, [image], test)[0], image.shape[-1]))
    assert len(got["boxes"]) == 10 and got.keys() == want.keys()
    for k in ("boxes", "scores", "labels"):
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-4, atol=1e-3)
    if "masks" in want:
        # pasting rounds a box and its mirror image to whole pixels differently (a pixel's shift
        # of the resampling): the masks agree inside the boxes on average (not flipping the
        # mirrored augmentation's masks back: 0.01 or more)
        inside = _interior(want["boxes"], *image.shape[-2:])
        assert (got["masks"] - want["masks"]).abs()[inside].mean() < 5e-3


def _interior(boxes, h: int, w: int, margin: int = 2):
    """``[n, 1, h, w]``: the pixels ``margin`` inside each box."""
    ys, xs = torch.arange(h)[:, None], torch.arange(w)[None]
    return torch.stack(
        [
            (xs >= x1 + margin) & (xs < x2 - margin) & (ys >= y1 + margin) & (ys < y2 - margin)
            for x1, y1, x2, y2 in boxes.tolist()
        ]
    )[:, None]


@pytest.mark.parametrize(("backbone", "divisor"), [("swin_test", 128), ("pvt_test", 128)])
def test_size_divisor__test_images_are_padded_to_a_size_every_stage_runs(backbone, divisor):
    """Swin (its blocks pad to the window in the dense backbone) and PVT run on any multiple
    of 32, and the P3-P7 pyramid's anchors need multiples of 128. The transform at a test scale resizes by torchvision's (= MMDetection's
    keep-ratio) rule and pads to the divisor."""
    model = build_detector("gfl", backbone, 5, drop_path=0.0, **TINY_DETECTOR).eval()
    assert size_divisor(model) == divisor
    image = torch.rand(3, 70, 200)
    long, short = 300, 150
    with at_scale(model, (long, short), size_divisor(model)):
        images, _ = model.transform([image])
    factor = min(long / 200, short / 70)
    assert images.image_sizes == [(int(70 * factor), int(200 * factor))]
    assert [s % divisor for s in images.tensors.shape[-2:]] == [0, 0]
    with torch.no_grad():
        maps = model.backbone.body(images.tensors)
    assert maps["3"].shape[-2:] == tuple(s // 32 for s in images.tensors.shape[-2:])


def test_swin__a_multiple_of_32_runs_through_its_windows():
    """Why the divisor is 32 for Swin too: 160 x 256 px leaves a 20 x 32 stage-2 map that
    window 8 does not tile, which the dense backbone's blocks pad (tests/test_swin_pad.py)."""
    maps = build_stage_maps("swin_test", 64, 32, 0.0, window_size=8)
    assert maps.encoder.size_divisor == 32
    out = maps(torch.rand(1, 3, 160, 256))
    assert out["1"].shape[-2:] == (20, 32)


# -- the commands --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return coco_subset(tmp_path_factory.mktemp("coco"), n_train=2, n_val=2)


def _checkpoint(detector: str, coco: Path, path: Path) -> Path:
    """A checkpoint as `detect train` writes one, with the real categories; every class-logit
    layer (a bias of num_classes entries per anchor, in a module named *cls*) favouring class
    1, so that random weights detect above the score thresholds."""
    from ummae.data.coco import CocoDetection

    ds = CocoDetection(str(coco), "val2017", train=False)
    k = ds.num_classes + 1
    model = build_detector(
        detector, "swin_test", k, drop_path=0.0, cat_ids=list(ds.cat_ids), class_names=list(ds.class_names),
        **{**TINY_DETECTOR, "fpn_channels": 64},
    )  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cls" in name.rsplit(".", 2)[-2] and name.endswith("bias") and len(p) % k == 0:
                p.view(-1, k)[:, 1] += 4.0
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_args": model.model_args}, path)
    return path


def _valid_results(results: list, coco: Path, masks: bool) -> None:
    data = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    cats = {c["id"] for c in data["categories"]}
    assert results and {r["image_id"] for r in results} == set(sizes)
    for r in results:
        x, y, w, h = r["bbox"]
        width, height = sizes[r["image_id"]]
        assert r["category_id"] in cats and 0 <= r["score"] <= 1
        assert w >= 0 and h >= 0 and -0.01 <= x <= x + w <= width + 0.01 and -0.01 <= y <= y + h <= height + 0.01
        assert ("segmentation" in r) == masks


@pytest.mark.parametrize("detector", list(SPECS))
def test_every_detector__detect_eval_with_scales_and_flip_gives_valid_coco_results(coco, tmp_path, capsys, detector):
    spec = SPECS[detector]
    ckpt = _checkpoint(detector, coco, tmp_path / "det.pth")
    argv = ["detect", "eval", "--checkpoint", str(ckpt), "--data", str(coco), "--output", str(tmp_path / "ev")]
    capsys.readouterr()
    assert main([*argv, "--num-workers", "0", "--test-scales", "96x64", "128", "--test-flip"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k.split("_")[0] for k in printed} == set(spec.iou_types)
    _valid_results(json.loads((tmp_path / "ev" / "detections_val2017.json").read_text()), coco, spec.masks)


def test_detect_predict_and_train__take_the_test_options_and_refuse_a_bad_scale_in_one_line(coco, tmp_path, capsys):
    ckpt = _checkpoint("maskrcnn", coco, tmp_path / "det.pth")
    images = sorted((coco / "val2017").iterdir())
    pics = tmp_path / "vis"
    argv = ["detect", "predict", "--checkpoint", str(ckpt), "--images", *map(str, images), "--output", str(pics)]
    assert main([*argv, "--test-scales", "128", "--test-flip"]) == 0
    assert sorted(p.name for p in pics.iterdir()) == sorted(p.stem + ".png" for p in images)
    for bad in (["--test-scales", "12x"], ["--test-scales", "800x600x3"], ["--test-scales", "16"]):
        capsys.readouterr()
        assert main([*argv, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "test_scales" in err and "LONGxSHORT" in err and len(err.splitlines()) == 1, err
    evaluate = ["detect", "eval", "--checkpoint", str(ckpt), "--data", str(coco), "--test-scales", "1333x"]
    assert main(evaluate) == 2
    err = capsys.readouterr().err.strip()
    assert "LONGxSHORT" in err and len(err.splitlines()) == 1
    train = ["detect", "train", "--data", str(coco), "--output", str(tmp_path / "t"), "--test-scales", "a"]
    assert main(train) == 2
    assert "LONGxSHORT" in capsys.readouterr().err


def test_detect_train__evaluates_at_its_test_scales_and_flip(coco, tmp_path, monkeypatch):
    """The evaluation of `detect train` tests every image at the run's scales and flipped: the
    detections it scores are those of the test options (each call recorded, and run)."""
    import ummae.tasks.detect as detect_task
    from _helpers import tiny_detect_config

    seen = []
    real = detect_task.detections

    def recording(model, batch, device, test=None):
        seen.append(test)
        return real(model, batch, device, test)

    monkeypatch.setattr(detect_task, "detections", recording)
    cfg = tiny_detect_config(tmp_path / "run", coco, backbone="swin_test", detector="fcos", fpn_channels=64, epochs=1,
                             max_steps_per_epoch=1, test_scales=("96x64", "128"), test_flip=True)  # fmt: skip
    detect_task.train(cfg)
    assert seen and set(seen) == {MultiScaleFlip(((96, 64), (128, 128)), True)}
