"""HTC's semantic-segmentation branch (``ummae.models.cascade.FusedSemanticHead`` and the semantic
fusion of ``CascadeRoIHeads``), its COCO-stuff data and MMDetection's "range" multi-scale resize
(``ummae.data.coco.RangeResize``), against MMDetection 2.x's definitions written out here:

* ``configs/htc/htc_r50_fpn_1x_coco.py``: ``semantic_roi_extractor=SingleRoIExtractor(RoIAlign(
  output_size=14), featmap_strides=[8])``; ``semantic_head=FusedSemanticHead(num_ins=5,
  fusion_level=1, num_convs=4, in_channels=256, conv_out_channels=256, num_classes=183,
  ignore_label=255, loss_weight=0.2)``; ``SegRescale(scale_factor=1 / 8)`` (nearest) on the
  padded stuff map.
* ``mask_heads/fused_semantic_head.py``: ``x = lateral[fusion](feats[fusion])``; for every other
  level ``x += lateral[i](interpolate(feat, fused size, bilinear, align_corners=True))``; four
  3x3 ``ConvModule`` (conv + ReLU); ``mask_pred = conv_logits(x)`` (1x1), ``x =
  conv_embedding(x)`` (1x1 ConvModule). Loss: ``CrossEntropyLoss(ignore_index=255,
  loss_weight=0.2)``, whose 2.x default ``avg_non_ignore=False`` averages over every pixel,
  the ignored ones counting 0.
* ``htc_roi_head.py``: ``bbox_feats += adaptive_avg_pool2d(semantic_roi_extractor([semantic_feat],
  rois), bbox_feats.shape[-2:])`` when the sizes differ, ``mask_feats += mask_semantic_feat``.
* ``mmdet/datasets/pipelines/transforms.py`` ``Resize(multiscale_mode='range')``: ``long =
  randint(min(longs), max(longs) + 1)``, ``short = randint(min(shorts), max(shorts) + 1)``; mmcv
  ``rescale_size``: ``scale = min(long / max(h, w), short / min(h, w))``, sizes ``int(x * scale +
  0.5)``.

``../shared`` has no COCO-stuff maps: the tests draw them from the COCO instance masks of the
coco_mini images (each training instance painted with its category, the rest a stuff class,
a band of 255).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align

from _helpers import TINY_DETECTOR, coco_subset, stable, step_records, tiny_detect_config
from ummae.cli import main
from ummae.config import DetectConfig
from ummae.data.coco import CocoDetection, LargeScaleJitter, RangeResize, collate_detection
from ummae.errors import DataError, UsageError
from ummae.models.cascade import CascadeRoIHeads, FusedSemanticHead, semantic_loss
from ummae.models.detectors import build_detector
from ummae.tasks.detect import DetectStep, load_detector, train, train_transform

BACKGROUND_STUFF = 150  # a COCO-stuff class id for the pixels of no instance


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return coco_subset(tmp_path_factory.mktemp("coco"), n_train=4, n_val=3)


def draw_stuff_maps(root: Path, split: str = "train2017") -> Path:
    """``root/stuff/<stem>.png``: every training instance of the image painted with its
    category id - 1 (the stuffthingmaps numbering), in annotation order; the other pixels
    ``BACKGROUND_STUFF``; the top 3 rows 255 (unlabelled)."""
    ds = CocoDetection(str(root), split, train=True, with_masks=True)
    out = root / "stuff"
    out.mkdir(exist_ok=True)
    for i, image_id in enumerate(ds.ids):
        target = ds.target(i)
        h, w = target["orig_size"]
        stuff = np.full((h, w), BACKGROUND_STUFF, dtype=np.uint8)
        for mask, label in zip(target["masks"].numpy(), target["labels"].tolist(), strict=True):
            stuff[mask > 0] = ds.cat_ids[label - 1] - 1
        stuff[:3] = 255
        Image.fromarray(stuff, mode="L").save(out / (Path(ds.coco.imgs[image_id]["file_name"]).stem + ".png"))
    return out


@pytest.fixture(scope="module")
def stuff(coco):
    return draw_stuff_maps(coco)


# ---------------------------------------------------------------- the head


def bilinear_align_corners(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """``[C, H, W]`` resized by the align_corners=True rule written out: output ``i`` samples
    input ``i * (H - 1) / (out_h - 1)`` (0 when out_h is 1), linearly between its neighbours."""
    c, h, w = x.shape
    out = torch.zeros(c, out_h, out_w, dtype=torch.float64)

    def src(i, n_in, n_out):
        s = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        lo = min(int(math.floor(s)), n_in - 1)
        return lo, min(lo + 1, n_in - 1), s - lo

    for i in range(out_h):
        y0, y1, fy = src(i, h, out_h)
        for j in range(out_w):
            x0, x1, fx = src(j, w, out_w)
            out[:, i, j] = (
                (1 - fy) * (1 - fx) * x[:, y0, x0]
                + (1 - fy) * fx * x[:, y0, x1]
                + fy * (1 - fx) * x[:, y1, x0]
                + fy * fx * x[:, y1, x1]
            )
    return out


def conv1x1_relu(block, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv + ReLU as the matrix product it is, ``x`` ``[C, H, W]``."""
    conv = block[0]
    y = torch.einsum("oc,chw->ohw", conv.weight[:, :, 0, 0].double(), x) + conv.bias.double()[:, None, None]
    return y.clamp(min=0)


def _levels(channels=8, size=64, batch=1):
    torch.manual_seed(3)
    return [torch.randn(batch, channels, size // 2 ** (i + 2), size // 2 ** (i + 2)) for i in range(5)]


def test_fused_semantic_head__sum_of_resized_laterals():
    """Five levels of a 64 px image (strides 4-64: 16, 8, 4, 2, 1 px): the fused map is the
    stride-8 level's lateral plus every other level resized to 8x8 (bilinear, align_corners)
    then through its own 1x1 conv + ReLU, computed here pixel by pixel."""
    head = FusedSemanticHead(8).eval()
    feats = _levels()
    with torch.no_grad():
        fused = head.fuse(feats)[0].double()
        want = conv1x1_relu(head.laterals[1], feats[1][0].double())
        for i in (0, 2, 3, 4):
            want = want + conv1x1_relu(head.laterals[i], bilinear_align_corners(feats[i][0].double(), 8, 8))
        torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
        logits, embedding = head(feats)
    assert logits.shape == (1, 183, 8, 8) and embedding.shape == (1, 8, 8, 8)
    assert [len(head.convs), head.convs[0][0].kernel_size, head.logits.kernel_size] == [4, (3, 3), (1, 1)]
    assert head.embedding[0].kernel_size == (1, 1) and isinstance(head.embedding[-1], torch.nn.ReLU)
    assert (embedding >= 0).all()  # ConvModule: conv + ReLU


def test_semantic_loss__0_2_x_ce_at_1_8_over_every_pixel():
    torch.manual_seed(0)
    logits = torch.randn(2, 183, 4, 4)
    stuff = torch.randint(0, 183, (2, 32, 32), dtype=torch.uint8)
    stuff[0, :16] = 255  # ignored: the top half of image 0 at 1/8
    total = 0.0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                c = int(stuff[b, 8 * i, 8 * j])  # SegRescale(1/8), nearest: pixel 8i, 8j
                if c != 255:
                    total -= float(logits[b, :, i, j].log_softmax(0)[c])
    want = 0.2 * total / (2 * 4 * 4)
    assert float(semantic_loss(logits, stuff)) == pytest.approx(want, rel=1e-5)


def _heads():
    torch.manual_seed(0)
    return CascadeRoIHeads(16, 4, htc=True, semantic=True)


def _features(size=64):
    torch.manual_seed(1)
    names = ["0", "1", "2", "3", "pool"]
    return OrderedDict((n, torch.randn(1, 16, size // 2 ** (i + 2), size // 2 ** (i + 2))) for i, n in enumerate(names))


def test_roi_features__plus_exactly_the_roi_pooled_semantic_feature():
    """Box RoI features (7x7) + the 14x14 RoIAlign of the semantic feature at scale 1/8,
    average-pooled 2x2 (adaptive pooling 14 -> 7); mask RoI features (14x14) + it as is."""
    heads = _heads()
    features = _features()
    levels = OrderedDict((k, v) for k, v in features.items() if k != "pool")
    rois = [torch.tensor([[4.0, 4.0, 40.0, 36.0], [20.0, 10.0, 60.0, 50.0], [0.0, 0.0, 64.0, 64.0]])]
    with torch.no_grad():
        _, semantic = heads.semantic_head(list(features.values()))
        assert semantic.shape == (1, 16, 8, 8)
        # torchvision's RoIAlign as the box / mask pools use it: sampling ratio 2, not aligned
        pooled = roi_align(semantic, [rois[0]], 14, spatial_scale=1 / 8, sampling_ratio=2, aligned=False)
        blocks = pooled.reshape(3, 16, 7, 2, 7, 2).mean(dim=(3, 5))
        for pool, extra in ((heads.box_roi_pool, blocks), (heads.mask_roi_pool, pooled)):
            with_sem = heads.roi_features(pool, levels, rois, [(64, 64)], semantic)
            without = heads.roi_features(pool, levels, rois, [(64, 64)], None)
            torch.testing.assert_close(without, pool(levels, rois, [(64, 64)]))
            torch.testing.assert_close(with_sem - without, extra, rtol=1e-5, atol=1e-5)
        # and the mask head of stage 0 (no information flow before it) reads them
        got = heads.mask_forward(0, levels, rois, [(64, 64)], semantic)
        want = heads.mask_heads[0](heads.mask_roi_pool(levels, rois, [(64, 64)]) + pooled)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_forward__every_stage_and_the_test_path_read_the_semantic_feature():
    """The training losses and the detections change with the semantic feature; with its
    embedding conv zeroed (a zero semantic feature) they equal the heads' forward without it."""
    heads = _heads()
    with torch.no_grad():
        for h in heads.box_heads:
            h.cls.weight.normal_(std=0.5)
    features = _features()
    levels = OrderedDict((k, v) for k, v in features.items() if k != "pool")
    props = [torch.tensor([[9.0, 7.0, 38.0, 31.0], [28.0, 33.0, 61.0, 60.0], [2.0, 2.0, 20.0, 20.0]])]
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 6:30, 8:40], masks[1, 30:62, 30:60] = 1, 1
    target = {
        "boxes": torch.tensor([[8.0, 6.0, 40.0, 30.0], [30.0, 30.0, 60.0, 62.0]]),
        "labels": torch.tensor([1, 3]),
        "masks": masks,
        "semantic": torch.randint(0, 183, (64, 64), dtype=torch.uint8),
    }
    heads.train()
    torch.manual_seed(5)
    losses = heads(features, props, [(64, 64)], [target])[1]
    assert "loss_semantic_seg" in losses
    stuff_logits, _ = heads.semantic_head(list(features.values()))
    assert float(losses["loss_semantic_seg"].detach()) == pytest.approx(
        float(semantic_loss(stuff_logits, target["semantic"][None]))
    )
    with torch.no_grad():
        heads.semantic_head.embedding[0].weight.zero_()
        heads.semantic_head.embedding[0].bias.zero_()
    torch.manual_seed(5)
    zeroed = heads(features, props, [(64, 64)], [target])[1]
    torch.manual_seed(5)
    plain = heads.forward_train(levels, props, [(64, 64)], [target])
    for k in plain:
        assert float(zeroed[k]) == pytest.approx(float(plain[k]), rel=1e-5), k
        assert k.endswith("box_reg") or float(losses[k]) != pytest.approx(float(plain[k]), rel=1e-5), k
    heads.eval()
    with torch.no_grad():
        (got,) = heads(features, props, [(64, 64)])[0]
        (want,) = heads.forward_test(levels, props, [(64, 64)])
    for k in ("boxes", "scores", "labels", "masks"):
        torch.testing.assert_close(got[k], want[k])


# ---------------------------------------------------------------- data


def _paint(masks: torch.Tensor, labels: list[int], cat_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(label painted last on each pixel, number of instances covering it)."""
    painted = torch.full(masks.shape[1:], -1, dtype=torch.int64)
    for m, label in zip(masks, labels, strict=True):
        painted[m > 0] = cat_ids[label - 1] - 1
    return painted, (masks > 0).sum(0)


@pytest.mark.parametrize("resize", ["lsj", "range"])
def test_stuff_maps__transformed_with_the_image(coco, stuff, resize):
    """The maps were painted from the instance masks: after the training transform the map
    still carries each instance's category exactly where its (transformed) mask is, the
    stuff class or 255 elsewhere in the image, 255 in the padding."""
    transform = (
        LargeScaleJitter(128, (0.3, 2.0), 0.5) if resize == "lsj" else RangeResize(128, (40, 200), flip_prob=0.5)
    )
    ds = CocoDetection(str(coco), "train2017", train=True, with_masks=True, stuff_dir=str(stuff), transform=transform)
    for seed in range(8):
        image, target, _ = ds.load_or_substitute((seed % len(ds), seed))
        sem = target["semantic"]
        assert sem.shape == image.shape[-2:] and sem.dtype == torch.uint8
        ch, cw = target["img_shape"]
        assert (sem[ch:] == 255).all() and (sem[:, cw:] == 255).all()
        painted, cover = _paint(target["masks"], target["labels"].tolist(), ds.cat_ids)
        single = cover == 1
        assert single.any()
        assert torch.equal(sem[single].long(), painted[single])
        valid = torch.zeros_like(single)
        valid[:ch, :cw] = True
        free = valid & (cover == 0)
        assert set(sem[free].unique().tolist()) <= {BACKGROUND_STUFF, 255}


def test_stuff_maps__missing_wrong_size_and_bad_labels_are_one_line_data_errors(coco, stuff, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    maps = sorted(stuff.iterdir())
    for p in maps[1:]:
        (broken / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DataError, match=f"1 of the .* no stuff map .*{maps[0].name}") as e:
        CocoDetection(str(coco), "train2017", train=True, with_masks=True, stuff_dir=str(broken))
    assert "\n" not in str(e.value)
    Image.new("L", (7, 5)).save(broken / maps[0].name)
    with pytest.raises(DataError, match="7x5 L: it must be a single-channel"):
        CocoDetection(str(coco), "train2017", train=True, with_masks=True, stuff_dir=str(broken))
    Image.open(maps[0]).convert("RGB").save(broken / maps[0].name)
    with pytest.raises(DataError, match="RGB"):
        CocoDetection(str(coco), "train2017", train=True, with_masks=True, stuff_dir=str(broken))
    bad = np.array(Image.open(maps[0]))
    bad[5, 5] = 200
    Image.fromarray(bad, mode="L").save(broken / maps[0].name)
    ds = CocoDetection(str(coco), "train2017", train=True, with_masks=True, stuff_dir=str(broken))
    with pytest.raises(DataError, match="has label 200: COCO-stuff labels are 0..182 and 255"):
        ds.target(0)
    with pytest.raises(DataError, match="stuff map folder .* not found"):
        CocoDetection(str(coco), "train2017", train=True, stuff_dir=str(tmp_path / "none"))


def test_stuff_maps__htc_only(coco, stuff, tmp_path, capsys):
    with pytest.raises(UsageError, match="--stuff-maps .* option of --detector htc, not of cascade_maskrcnn"):
        DetectConfig(data=str(coco), detector="cascade_maskrcnn", stuff_maps=str(stuff)).validate()
    with pytest.raises(UsageError, match="option of --detector htc, not of maskrcnn"):
        build_detector("maskrcnn", "swin_test", 5, semantic=True, **TINY_DETECTOR)
    args = ["detect", "train", "--data", str(coco), "--detector", "gfl", "--stuff-maps", str(stuff)]
    assert main([*args, "--output", str(tmp_path / "x")]) == 2
    assert "--detector htc" in capsys.readouterr().err


# ---------------------------------------------------------------- range resize


def test_range_resize__short_side_in_range_long_side_capped_aspect_kept():
    img = Image.new("RGB", (300, 200))
    target = {"boxes": torch.tensor([[10.0, 20.0, 110.0, 180.0]]), "labels": torch.tensor([1])}
    shorts = []
    for seed in range(60):
        torch.manual_seed(seed)
        canvas, out = RangeResize(256, (100, 220), flip_prob=0.0)(img, target)
        assert canvas.shape == (3, 256, 256)
        h, w = out["img_shape"]
        # mmcv rescale_size: scale = min(256 / 300, short / 200), sizes rounded
        assert w <= 256 and abs(w - 1.5 * h) <= 1.25  # rounding: |e1 - 1.5 e2| with |e| <= 0.5
        assert w == 256 or 100 <= h <= 220
        shorts.append(h)
        sx, sy = w / 300, h / 200
        want = torch.tensor([[10 * sx, 20 * sy, 110 * sx, 180 * sy]])
        torch.testing.assert_close(out["boxes"], want, rtol=1e-5, atol=1e-4)
    assert min(shorts) < 120 and max(shorts) == round(200 * 256 / 300)  # both ends of the range drawn


def test_range_resize__masks_follow_the_nearest_rule_and_the_flip():
    torch.manual_seed(0)
    mask = (torch.rand(1, 90, 60) > 0.5).to(torch.uint8)
    img = Image.new("RGB", (60, 90))
    target = {"boxes": torch.tensor([[0.0, 0.0, 60.0, 90.0]]), "labels": torch.tensor([1]), "masks": mask}
    for flip in (0.0, 1.0):
        torch.manual_seed(4)
        _, out = RangeResize(128, (30, 100), flip_prob=flip)(img, target)
        h, w = out["img_shape"]
        got = out["masks"][0]
        for y in range(h):
            for x in range(w):
                sx = w - 1 - x if flip else x
                src = mask[0, math.floor(y * 90 / h), math.floor(sx * 60 / w)]
                assert got[y, x] == src
        assert not got[h:].any() and not got[:, w:].any()


def test_train_transform__range_or_lsj_from_the_config():
    cfg = DetectConfig(data="x", train_resize="range", short_range=(400, 1400), img_size=1600)
    t = train_transform(cfg)
    assert isinstance(t, RangeResize) and t.short_range == (400, 1400) and t.img_size == 1600
    assert type(train_transform(DetectConfig(data="x"))) is LargeScaleJitter


# ---------------------------------------------------------------- whole model, runs, checkpoints


def test_htc_semantic__a_gradient_reaches_every_parameter_of_the_branch(coco, stuff):
    ds = CocoDetection(
        str(coco),
        "train2017",
        train=True,
        with_masks=True,
        stuff_dir=str(stuff),
        transform=LargeScaleJitter(128, (1.0, 1.0), 0.0),
    )
    images, targets, _ = collate_detection([ds.load_or_substitute((i, i)) for i in range(2)])
    torch.manual_seed(0)
    model = build_detector("htc", "swin_test", ds.num_classes + 1, drop_path=0.0, semantic=True, **TINY_DETECTOR)
    model.train()
    out = DetectStep()(model, [images, targets, 0], None)
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad[:5]
    branch = dict(model.roi_heads.semantic_head.named_parameters())
    assert len(branch) == 2 * (5 + 4 + 1 + 1)
    assert all(p.grad.abs().sum() > 0 for p in branch.values()), [n for n, p in branch.items() if not p.grad.any()]


_cfg = functools.partial(tiny_detect_config, backbone="pvt_test", detector="htc", warmup_steps=1, max_steps_per_epoch=1)


def test_htc_semantic__resumes_exactly_and_its_checkpoint_rebuilds_the_branch(coco, stuff, tmp_path):
    """HTC with the semantic branch, trained with the range resize (HTC++'s), killed after one
    epoch and resumed: the same weights and records as the uninterrupted run; the checkpoint
    rebuilds the branch (eval ran on it every epoch), and one written before the branch was
    recorded (no 'semantic' in its options) still loads, without it."""
    kw = dict(stuff_maps=str(stuff), train_resize="range", short_range=(64, 120))
    full = _cfg(tmp_path / "full", coco, **kw)
    train(full)
    train(_cfg(tmp_path / "part", coco, epochs=1, **kw))
    resumed = _cfg(tmp_path / "part", coco, resume="auto", **kw)
    train(resumed)
    a = torch.load(Path(full.output) / "checkpoint-last.pth", weights_only=True)
    b = torch.load(Path(resumed.output) / "checkpoint-last.pth", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert any(k.startswith("roi_heads.semantic_head.") for k in a["model"])
    assert stable(step_records(Path(full.output))) == stable(step_records(Path(resumed.output)))

    model = load_detector(str(Path(full.output) / "checkpoint-last.pth"))
    assert model.roi_heads.semantic_head is not None and model.model_args["semantic"] is True
    state = model.state_dict()
    assert all(torch.equal(state[k], a["model"][k]) for k in a["model"])

    plain = _cfg(tmp_path / "plain", coco, epochs=1, eval_every=0)
    train(plain)
    old = torch.load(Path(plain.output) / "checkpoint-last.pth", weights_only=True)
    assert old["model_args"].pop("semantic") is False
    torch.save(old, tmp_path / "old.pth")
    model = load_detector(str(tmp_path / "old.pth"))
    assert model.roi_heads.semantic_head is None
