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
* mmcv ``soft_nms(method='gaussian' | 'linear', iou_threshold, sigma=0.5, min_score=1e-3)``
  (``soft_nms_cpu``: linear weight ``1 - iou`` where ``iou > iou_threshold``).
* ``BBoxHead.loss`` with ``reg_class_agnostic=False`` (the ground-truth class's deltas) and
  ``reg_decoded_bbox=True`` + ``GIoULoss`` (``1 - GIoU`` of the decoded box and the ground truth,
  ``avg_factor`` = sampled RoIs); ``CascadeRoIHead`` refinement by class (``refine_bboxes`` in
  training, background RoIs by ``cls_score[:, :-1].argmax``; ``regress_by_class`` at test).
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
from ummae.models.cascade import CascadeRoIHeads, refine_labels, soft_nms
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


def _test_case(**kw):
    """Heads in eval mode with larger deltas and logits than their init (the refinement moves the
    boxes, the classes differ), the features and three proposals."""
    heads = _heads(**kw)
    heads.eval()
    with torch.no_grad():
        for h in heads.box_heads:
            h.reg.weight.normal_(std=0.05)
            h.cls.weight.normal_(std=0.5)
    props = torch.tensor([[9.0, 7.0, 38.0, 31.0], [28.0, 33.0, 61.0, 60.0], [2.0, 2.0, 20.0, 20.0]])
    return heads, _features(), props


def test_forward_test__score_is_the_softmax_of_the_three_stages_mean_logits_and_boxes_the_last_refinement():
    heads, features, props = _test_case(score_thresh=0.0)
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


def _mmcv_soft_nms(b, s, method, iou_threshold=0.3, sigma=0.5, min_score=1e-3):
    """mmcv's soft_nms_cpu written out (offset 0): method 1 linear, 2 gaussian."""
    s, idx, order, kept = list(s), list(range(len(s))), [], []
    while idx:
        m = max(idx, key=lambda k: s[k])
        order.append(m)
        kept.append(s[m])
        idx.remove(m)
        for k in list(idx):
            ov = iou(b[m], b[k])
            if method == "linear":
                weight = 1 - ov if ov > iou_threshold else 1.0
            else:
                weight = math.exp(-(ov * ov) / sigma)
            s[k] *= weight
            if s[k] < min_score:
                idx.remove(k)
    return order, kept


@pytest.mark.parametrize("method, iou_threshold", [("linear", 0.5), ("linear", 0.3), ("gaussian", 0.3)])
def test_soft_nms__linear_and_gaussian_as_mmcv_against_a_plain_loop(method, iou_threshold):
    torch.manual_seed(1)
    xy = torch.rand(60, 2) * 40
    boxes = torch.cat([xy, xy + 10 + torch.rand(60, 2) * 30], 1)
    scores = torch.rand(60)
    order, kept = _mmcv_soft_nms(boxes.tolist(), scores.tolist(), method, iou_threshold)
    keep, new = soft_nms(boxes, scores, method=method, iou_threshold=iou_threshold)
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
    [
        ("cascade_maskrcnn", {}),
        ("htc", dict(box_head="4conv1fc", box_norm="gn", test_nms="soft_gaussian", box_reg="class", box_loss="giou")),
    ],
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


# --- the options of issue 34: soft-NMS kinds, GIoU on decoded boxes, class-specific deltas ----------
def test_postprocess__test_nms_kinds_per_class_with_the_iou_threshold():
    """postprocess's soft-NMS is mmcv's per class (batched: classes never suppress each other),
    linear at --test-nms-iou; its reported scores are the decayed ones, best first."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    # candidates [N, C, 4] with C = 3: box 0 and 1 in class 1 (IoU 9/11), box 2 in class 2
    cand = boxes[:, None].expand(-1, 3, 4)
    scores = torch.tensor([[0.0, 0.9, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, 0.7]])
    ov = iou([0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0])
    for kind, iou_thr, second in [("soft_linear", 0.5, 0.8 * (1 - ov)), ("soft_linear", 0.85, 0.8),
                                  ("soft_gaussian", 0.5, 0.8 * math.exp(-ov * ov / 0.5)), ("nms", 0.5, None)]:  # fmt: skip
        out = _heads(test_nms=kind, nms_thresh=iou_thr, score_thresh=0.01).postprocess(cand, scores)
        got = sorted(zip(out["labels"].tolist(), out["scores"].tolist(), strict=True), key=lambda t: -t[1])
        want = sorted([(1, 0.9), (2, 0.7)] + ([(1, second)] if second is not None else []), key=lambda t: -t[1])
        assert [g[0] for g in got] == [w[0] for w in want], kind
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], rel=1e-5), (kind, iou_thr)
        assert out["scores"].tolist() == sorted(out["scores"].tolist(), reverse=True)


def _decode(p, d, std):
    """delta2bbox without clipping (reg_decoded_bbox decodes with no max_shape)."""
    pw, ph = p[2] - p[0], p[3] - p[1]
    px, py = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
    cx, cy = px + d[0] * std[0] * pw, py + d[1] * std[1] * ph
    w, h = pw * math.exp(d[2] * std[2]), ph * math.exp(d[3] * std[3])
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def giou(a, b):
    """Generalised IoU by hand: IoU - (enclosing area - union) / enclosing area."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enclose - union) / enclose


def smooth_l1(x):
    return sum(0.5 * v * v if abs(v) < 1 else abs(v) - 0.5 for v in x)


def _box_loss_case():
    rois = torch.tensor(
        [[4.0, 4.0, 30.0, 28.0], [10.0, 12.0, 44.0, 40.0], [0.0, 0.0, 20.0, 50.0], [5.0, 5.0, 9.0, 9.0]]
    )
    labels = torch.tensor([2, 3, 0, 1])
    matched = torch.tensor([0, 1, -1, 0])
    target = {"boxes": torch.tensor([[6.0, 3.0, 33.0, 30.0], [12.0, 9.0, 41.0, 44.0]]), "labels": torch.tensor([2, 3])}
    torch.manual_seed(3)
    logits, deltas = torch.randn(4, 4), torch.randn(4, 12) * 0.5
    return [(rois, labels, matched, torch.zeros(4, dtype=torch.bool))], [target], logits, deltas


@pytest.mark.parametrize("kind", ["giou", "smooth_l1"])
def test_box_loss__class_specific_deltas_of_the_ground_truth_class(kind):
    """--box-reg class: each positive's deltas are those of its ground-truth class; GIoU (weight
    10, Swin's) compares them decoded onto the RoI with the ground-truth box, smooth-L1 encoded;
    summed over the positives and divided by every sampled RoI."""
    stage = 1
    samples, targets, logits, deltas = _box_loss_case()
    heads = _heads(box_reg="class", box_loss=kind, box_loss_weight=10.0)
    loss_cls, loss_box = heads.box_loss(stage, logits, deltas, samples, targets)
    rois, labels, matched, _ = samples[0]
    total = 0.0
    for i in range(4):
        if labels[i] > 0:
            d = deltas[i, 4 * (labels[i] - 1) : 4 * labels[i]].tolist()
            gt = targets[0]["boxes"][matched[i]].tolist()
            if kind == "giou":
                total += 1 - giou(_decode(rois[i].tolist(), d, STDS[stage]), gt)
            else:
                total += smooth_l1(
                    [a - b for a, b in zip(d, bbox2delta(rois[i].tolist(), gt, STDS[stage]), strict=True)]
                )
    assert float(loss_box) == pytest.approx(10.0 * total / 4, rel=1e-5)
    assert float(loss_cls) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    assert heads.box_heads[0].reg.out_features == 4 * 3  # 4 x the foreground classes


def test_refine__between_stages_by_the_ground_truth_class_background_by_the_predicted_one():
    """CascadeRoIHead.refine_bboxes with class-specific deltas: a RoI's ground-truth class's
    deltas; a background RoI's: the foreground class the stage scores highest."""
    samples, _, logits, deltas = _box_loss_case()
    rois, labels, _, _ = samples[0]
    heads = _heads(box_reg="class")
    got = heads.refine(0, deltas, [rois], [(64, 64)], refine_labels(labels, logits))[0]
    for i in range(4):
        c = int(labels[i]) or int(logits[i, 1:].argmax()) + 1
        want = delta2bbox(rois[i].tolist(), deltas[i, 4 * (c - 1) : 4 * c].tolist(), STDS[0], (64, 64))
        assert got[i].tolist() == pytest.approx(want, abs=1e-4)


def test_box_candidates__class_specific_regress_by_class_then_a_box_per_class():
    """At test, stage t < 2 refines each RoI by the class it scores highest (regress_by_class on
    cls_score[:, :-1].argmax); the last stage's deltas of every class give a box per class."""
    heads, features, props = _test_case(box_reg="class")
    ((boxes, scores),) = heads.box_candidates(features, [props], [(64, 64)])
    rois, all_logits = props.tolist(), []
    with torch.no_grad():
        for t in range(3):
            logits, deltas = heads.box_heads[t](heads.box_roi_pool(features, [torch.tensor(rois)], [(64, 64)]))
            all_logits.append(logits)
            if t < 2:
                cls = (logits[:, 1:].argmax(1) + 1).tolist()
                rois = [delta2bbox(r, d[4 * (c - 1) : 4 * c], STDS[t], (64, 64))
                        for r, d, c in zip(rois, deltas.tolist(), cls, strict=True)]  # fmt: skip
    assert boxes.shape == (3, 4, 4)
    for i in range(3):
        for c in range(1, 4):
            want = delta2bbox(rois[i], deltas[i, 4 * (c - 1) : 4 * c].tolist(), STDS[2], (64, 64))
            assert boxes[i, c].tolist() == pytest.approx(want, abs=1e-3)
    assert not torch.equal(boxes[:, 1], boxes[:, 2])  # a distinct box per class
    torch.testing.assert_close(scores, (sum(all_logits) / 3).softmax(-1), rtol=1e-5, atol=1e-6)
