"""Cascade Mask R-CNN and HTC (``ummae.models.cascade``) against MMDetection 2.x's definitions,
written out here:

* ``configs/_base_/models/cascade_mask_rcnn_r50_fpn.py``: ``num_stages=3``,
  ``stage_loss_weights=[1, 0.5, 0.25]``; ``rcnn`` train cfg per stage ``MaxIoUAssigner(pos_iou_thr
  = neg_iou_thr = min_pos_iou = 0.5 / 0.6 / 0.7)``, ``RandomSampler(num=512, pos_fraction=0.25,
  add_gt_as_proposals=True)``; ``Shared2FCBBoxHead(fc_out_channels=1024, reg_class_agnostic=True,
  target_stds=[0.1, 0.1, 0.2, 0.2] / [0.05, 0.05, 0.1, 0.1] / [0.033, 0.033, 0.067, 0.067])``,
  ``CrossEntropyLoss`` and ``SmoothL1Loss(beta=1.0)`` averaged over the sampled RoIs; test cfg
  ``score_thr=0.05, nms iou_thr=0.5, max_per_img=100``.
* ``mmdet/core/bbox/coder/delta_xywh_bbox_coder.py`` ``bbox2delta``: ``dx = (gx - px) / pw / std``,
  ``dw = log(gw / pw) / std`` (centres ``(x1 + x2) / 2``, sizes ``x2 - x1``); ``delta2bbox`` its inverse.
* ``mmdet/models/roi_heads/cascade_roi_head.py``: ``refine_bboxes`` drops the RoIs that were ground
  truth (``pos_is_gts``) and decodes the others with the stage's deltas, without gradient, as the
  next stage's proposals; ``simple_test``: ``cls_score = sum(ms_scores) / num_stages`` (logits),
  softmaxed by the last head's ``get_bboxes``; masks ``merge_aug_masks``: the mean of every
  stage's sigmoid masks.
* ``mmdet/models/roi_heads/htc_roi_head.py`` / ``mask_heads/htc_mask_head.py``: with
  ``mask_info_flow``, stage t's mask head gets ``mask_feats + conv_res(last_feat)`` (1x1
  ConvModule, ReLU) where ``last_feat`` is the conv output of stages 0..t-1 run in turn.
* mmcv ``soft_nms(method='gaussian', sigma=0.5, min_score=1e-3)``.
"""

from __future__ import annotations

import functools
import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from _helpers import TINY_DETECTOR, coco_subset, epoch_records, run_torchrun, stable, step_records, tiny_detect_config
from ummae.cli import main
from ummae.models.cascade import CascadeRoIHeads, soft_nms
from ummae.models.detectors import build_detector
from ummae.tasks.detect import DetectStep, train

STDS = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
IOU = [0.5, 0.6, 0.7]
WEIGHTS = [1.0, 0.5, 0.25]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return coco_subset(tmp_path_factory.mktemp("coco"), n_train=4, n_val=3)


def bbox2delta(p, g, std):
    pw, ph = p[2] - p[0], p[3] - p[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    px, py = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
    gx, gy = (g[0] + g[2]) / 2, (g[1] + g[3]) / 2
    return [(gx - px) / pw / std[0], (gy - py) / ph / std[1], math.log(gw / pw) / std[2], math.log(gh / ph) / std[3]]


def delta2bbox(p, d, std, size):
    pw, ph = p[2] - p[0], p[3] - p[1]
    px, py = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
    dx, dy, dw, dh = (d[i] * std[i] for i in range(4))
    clip = abs(math.log(16 / 1000))
    dw, dh = max(min(dw, clip), -clip), max(min(dh, clip), -clip)
    cx, cy, w, h = px + dx * pw, py + dy * ph, pw * math.exp(dw), ph * math.exp(dh)
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    return [
        min(max(box[0], 0), size[1]),
        min(max(box[1], 0), size[0]),
        min(max(box[2], 0), size[1]),
        min(max(box[3], 0), size[0]),
    ]


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _heads(**kw):
    torch.manual_seed(0)
    return CascadeRoIHeads(16, 4, **kw)


def _features():
    torch.manual_seed(1)
    return OrderedDict((str(i), torch.randn(1, 16, 64 // 2**i, 64 // 2**i)) for i in range(4))


def test_stage_coders__deltas_are_bbox2delta_over_each_stages_stds():
    heads = _heads()
    props = [[10.0, 12.0, 40.0, 30.0], [0.0, 5.0, 7.0, 50.0]]
    gts = [[12.0, 10.0, 44.0, 35.0], [1.0, 4.0, 9.0, 41.0]]
    for t in range(3):
        got = heads.coders[t].encode_single(torch.tensor(gts), torch.tensor(props))
        want = torch.tensor([bbox2delta(p, g, STDS[t]) for p, g in zip(props, gts, strict=True)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        back = heads.refine(t, got, [torch.tensor(props)], [(64, 64)])[0]
        want_back = [delta2bbox(p, d, STDS[t], (64, 64)) for p, d in zip(props, want.tolist(), strict=True)]
        torch.testing.assert_close(back, torch.tensor(want_back), rtol=1e-4, atol=1e-4)
    assert heads.stage_loss_weights == tuple(WEIGHTS)
    assert all(h.reg.out_features == 4 for h in heads.box_heads)  # class-agnostic
    assert all(h.fcs[-1].out_features == 1024 and len(h.fcs) == 2 for h in heads.box_heads)


def test_sample__each_stage_assigns_at_its_iou_threshold_with_the_ground_truth_added():
    """Proposals at IoU 0.45 / 0.55 / 0.65 / 0.75 / 0.95 with the one ground truth box
    ``[0, 0, 10, 10]`` (widths 4.5 ... 9.5): positive at IoU >= the stage's threshold, background
    below it; the ground truth itself is the last RoI, positive, flagged."""
    heads = _heads()
    gt = [0.0, 0.0, 10.0, 10.0]
    props = torch.tensor([[0.0, 0.0, 10.0, w] for w in (4.5, 5.5, 6.5, 7.5, 9.5)])
    target = {"boxes": torch.tensor([gt]), "labels": torch.tensor([3])}
    for t in range(3):
        ((rois, labels, matched, is_gt),) = heads.sample(t, [props], [target])
        want = [3 if iou(p, gt) >= IOU[t] else 0 for p in props.tolist()] + [3]
        assert sorted(zip(rois.tolist(), labels.tolist(), strict=True)) == sorted(
            zip([*props.tolist(), gt], want, strict=True)
        )
        assert rois[is_gt].tolist() == [gt]
        assert ((matched == 0) == (labels > 0)).all() and (matched[labels == 0] == -1).all()


def test_box_norm_gn__needs_channels_divisible_by_32():
    from ummae.errors import UsageError

    with pytest.raises(UsageError, match="GroupNorm"):
        CascadeRoIHeads(16, 4, box_head="4conv1fc", norm="gn")
    assert isinstance(
        CascadeRoIHeads(32, 4, box_head="4conv1fc", norm="gn").box_heads[0].convs[0][1], torch.nn.GroupNorm
    )


def test_sample__512_rois_per_image_at_most_a_quarter_positive():
    heads = _heads()
    torch.manual_seed(0)
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    near = torch.tensor([[0.0, 0.0, 100.0, 99.0]]).repeat(300, 1)  # IoU 0.99: positive at every stage
    far = torch.tensor([[200.0, 200.0, 250.0, 250.0]]).repeat(600, 1)
    ((rois, labels, _, _),) = heads.sample(0, [torch.cat([near, far])], [{"boxes": gt, "labels": torch.tensor([1])}])
    assert len(rois) == 512 and int((labels > 0).sum()) == 128


def _reference_losses(heads, features, props, target, size):
    """The cascade's training losses computed by plain loops over the RoIs (assignment,
    deltas, smooth-L1, refinement), using only the heads' networks for the forward pass."""
    gt = target["boxes"].tolist()
    labels_gt = target["labels"].tolist()
    losses = {}
    props = props.tolist()
    for t in range(3):
        rois = props + gt
        labels, targets = [], []
        for r in rois:
            ious = [iou(r, g) for g in gt]
            j = max(range(len(gt)), key=lambda k: ious[k])
            labels.append(labels_gt[j] if ious[j] >= IOU[t] else 0)
            targets.append(bbox2delta(r, gt[j], STDS[t]))
        x = heads.box_roi_pool(features, [torch.tensor(rois)], [size])
        logits, deltas = heads.box_heads[t](x)
        ce = -sum(float(logits[i].log_softmax(-1)[c]) for i, c in enumerate(labels)) / len(rois)
        sl1 = 0.0
        for i, c in enumerate(labels):
            if c:
                for d, g in zip(deltas[i].tolist(), targets[i], strict=True):
                    a = abs(d - g)
                    sl1 += 0.5 * a * a if a < 1 else a - 0.5
        losses[f"s{t}_loss_classifier"] = WEIGHTS[t] * ce
        losses[f"s{t}_loss_box_reg"] = WEIGHTS[t] * sl1 / len(rois)
        # the next stage's proposals: this stage's RoIs without the ground truth, refined
        props = [delta2bbox(r, d, STDS[t], size) for r, d in zip(rois[: len(props)], deltas.tolist(), strict=False)]
    return losses


def test_forward_train__stage_losses_and_refinement_match_a_plain_loop():
    """Few proposals, so that every RoI is sampled at every stage (no draw): the weighted
    losses of the three stages equal the plain-loop cascade, whose stage t + 1 proposals are
    stage t's refined non-ground-truth RoIs, with the ground truth added again."""
    heads = _heads()
    heads.train()
    features = _features()
    with torch.no_grad():  # larger deltas than the 0.001 init: refinement moves the boxes
        for h in heads.box_heads:
            h.reg.weight.normal_(std=0.05)
    target = {"boxes": torch.tensor([[8.0, 6.0, 40.0, 30.0], [30.0, 30.0, 60.0, 62.0]]), "labels": torch.tensor([1, 3])}
    props = torch.tensor(
        [[9.0, 7.0, 38.0, 31.0], [28.0, 33.0, 61.0, 60.0], [2.0, 2.0, 20.0, 20.0], [5.0, 4.0, 36.0, 26.0]]
    )
    got = heads.forward_train(features, [props], [(64, 64)], [target])
    with torch.no_grad():
        want = _reference_losses(heads, features, props, target, (64, 64))
    assert set(got) == set(want)
    for k in want:
        assert float(got[k].detach()) == pytest.approx(want[k], rel=1e-4, abs=1e-6), k


def test_forward_test__score_is_the_softmax_of_the_three_stages_mean_logits_and_boxes_the_last_refinement():
    heads = _heads(score_thresh=0.0)
    heads.eval()
    features = _features()
    with torch.no_grad():
        for h in heads.box_heads:
            h.reg.weight.normal_(std=0.05)
            h.cls.weight.normal_(std=0.5)
    props = torch.tensor([[9.0, 7.0, 38.0, 31.0], [28.0, 33.0, 61.0, 60.0], [2.0, 2.0, 20.0, 20.0]])
    (out,) = heads.forward_test(features, [props], [(64, 64)])
    rois, all_logits = props.tolist(), []
    with torch.no_grad():
        for t in range(3):
            logits, deltas = heads.box_heads[t](heads.box_roi_pool(features, [torch.tensor(rois)], [(64, 64)]))
            all_logits.append(logits)
            rois = [delta2bbox(r, d, STDS[t], (64, 64)) for r, d in zip(rois, deltas.tolist(), strict=True)]
    scores = ((all_logits[0] + all_logits[1] + all_logits[2]) / 3).softmax(-1)
    assert len(out["scores"]) > 0
    assert out["masks"].shape == (len(out["scores"]), 1, 28, 28)
    for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist(), strict=True):
        i = min(range(len(rois)), key=lambda k: sum(abs(a - b) for a, b in zip(rois[k], box, strict=True)))
        assert box == pytest.approx(rois[i], abs=1e-3)
        assert score == pytest.approx(float(scores[i, label]), rel=1e-4)


@pytest.mark.parametrize("htc", [False, True])
def test_mask_heads__htc_information_flow_shapes_and_reach(htc):
    """Every stage's mask head: 14x14 RoI features -> 28x28 logits of every class; under HTC
    stage t's head adds a 1x1 conv (+ ReLU) of the conv features of the heads before it, so
    stage 2's logits depend on stage 0's and 1's parameters; without HTC they do not."""
    heads = _heads(htc=htc)
    features = _features()
    rois = [torch.tensor([[4.0, 4.0, 40.0, 36.0], [20.0, 10.0, 60.0, 50.0]])]
    logits = heads.mask_forward(2, features, rois, [(64, 64)])
    assert logits.shape == (2, 4, 28, 28)
    assert [h.res is not None for h in heads.mask_heads] == [False, htc, htc]
    if htc:
        assert heads.mask_heads[2].res[0].kernel_size == (1, 1)
        assert isinstance(heads.mask_heads[2].res[-1], torch.nn.ReLU)
    logits.sum().backward()
    earlier = [p.grad is not None for h in heads.mask_heads[:2] for p in h.convs.parameters()]
    assert all(earlier) if htc else not any(earlier)


def test_soft_nms__gaussian_as_mmcv_against_a_plain_loop():
    torch.manual_seed(0)
    xy = torch.rand(40, 2) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(40, 2) * 30], 1)
    scores = torch.rand(40)

    # mmcv soft_nms_cpu, method 2 (gaussian), offset 0
    b, s, idx = boxes.tolist(), scores.tolist(), list(range(40))
    order, kept = [], []
    while idx:
        m = max(idx, key=lambda k: s[k])
        order.append(m)
        kept.append(s[m])
        idx.remove(m)
        for k in list(idx):
            s[k] *= math.exp(-(iou(b[m], b[k]) ** 2) / 0.5)
            if s[k] < 1e-3:
                idx.remove(k)
    keep, new = soft_nms(boxes, scores)
    assert keep.tolist() == order
    torch.testing.assert_close(new, torch.tensor(kept), rtol=1e-5, atol=1e-6)


def _real_batch(coco: Path):
    from ummae.data.coco import CocoDetection, LargeScaleJitter, collate_detection

    ds = CocoDetection(
        str(coco), "train2017", train=True, with_masks=True, transform=LargeScaleJitter(128, (1.0, 1.0), 0.0)
    )
    return collate_detection([ds.load_or_substitute((i, i)) for i in range(2)])


@pytest.mark.parametrize(
    "detector, options",
    [("cascade_maskrcnn", {}), ("htc", dict(box_head="4conv1fc", box_norm="gn", soft_nms=True))],
)
def test_cascade_detectors__every_parameter_learns_and_the_loss_falls_on_real_coco_images(coco, detector, options):
    torch.manual_seed(0)
    images, targets, _ = _real_batch(coco)
    model = build_detector(detector, "swin_test", 81, drop_path=0.0, **options, **TINY_DETECTOR)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for i in range(8):
        out = DetectStep()(model, [images, targets, 0], None)
        assert all(torch.isfinite(v) for v in out.values()), out
        assert {f"s{t}_loss_{n}" for t in range(3) for n in ("classifier", "box_reg", "mask")} <= set(out)
        opt.zero_grad()
        out["loss"].backward()
        if i == 0:
            no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.8 * losses[0], losses


_cfg = functools.partial(tiny_detect_config, backbone="pvt_test", warmup_steps=1, max_steps_per_epoch=1)


def test_htc__a_killed_run_resumes_to_the_same_numbers(coco, tmp_path):
    full = _cfg(tmp_path / "full", coco, detector="htc")
    train(full)
    train(_cfg(tmp_path / "part", coco, detector="htc", epochs=1))
    resumed = _cfg(tmp_path / "part", coco, detector="htc", resume="auto")
    train(resumed)
    a = torch.load(Path(full.output) / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(Path(resumed.output) / "checkpoint-last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert stable(step_records(Path(full.output))) == stable(step_records(Path(resumed.output)))
    ev = epoch_records(Path(full.output))[-1]
    assert {"bbox_AP", "segm_AP"} <= set(ev)


def test_cascade_cli__train_eval_predict(coco, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["detect", "train", "--data", str(coco), "--backbone", "pvt_test", "--detector", "cascade_maskrcnn"]
    args += ["--output", str(out), "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--img-size", "128"]
    args += ["--neck-channels", "32", "--fpn-channels", "32", "--max-steps-per-epoch", "2", "--warmup-steps", "1"]
    assert main(args) == 0
    ckpt = out / "checkpoint-last.pth"
    ev = ["detect", "eval", "--checkpoint", str(ckpt), "--data", str(coco), "--output", str(tmp_path / "ev")]
    assert main([*ev, "--num-workers", "0"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"bbox_AP", "segm_AP"} <= set(printed)
    pics = tmp_path / "vis"
    images = sorted((coco / "val2017").iterdir())[:1]
    pred = ["detect", "predict", "--checkpoint", str(ckpt), "--images", *map(str, images), "--output", str(pics)]
    assert main([*pred, "--score-thresh", "0.0"]) == 0
    assert [p.name for p in pics.iterdir()] == [images[0].stem + ".png"]
    assert main([*args[:-2], "--box-head", "3fc"]) == 2
    assert "box_head" in capsys.readouterr().err


def test_cascade_train__two_ranks_keep_one_model(coco, tmp_path):
    """torchrun + DDP (gloo): two ranks train Cascade Mask R-CNN in lockstep (every parameter
    in every step's graph, as DDP needs) and end with the same weights."""
    out = tmp_path / "ddp"
    args = ["detect", "train", "--data", str(coco), "--backbone", "pvt_test", "--detector", "cascade_maskrcnn"]
    args += ["--output", str(out), "--epochs", "1", "--batch-size", "1", "--num-workers", "0", "--img-size", "128"]
    args += ["--neck-channels", "32", "--fpn-channels", "32", "--max-steps-per-epoch", "1", "--warmup-steps", "1"]
    run_torchrun([*args, "--eval-every", "0"], timeout=300)
    assert epoch_records(out)[-1]["replica_max_diff"] == 0.0
