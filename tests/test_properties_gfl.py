"""Properties of the GFL loss and assignment (:mod:`ummae.models.gfl`) against an independent,
plain formulation written out here: a per-anchor, per-class loop of MMDetection 2.x's
``GFLHead.loss_single`` / ``GFLHead.loss`` (QFL, DFL, GIoU, the score weights and the
normalisers) and of ``ATSSAssigner.assign``, on anchors of three levels (strides 8, 16, 32)
and several objects of different sizes, so that the positives differ in side, score and stride.

MMDetection's formulation, written out by the loop below:

* the QFL target of a positive is the IoU of its *detached* decoded box with its gt, at the gt's
  class (0 elsewhere); ``BCE(x, y) * |y - sigmoid(x)|^beta``, summed, over the number of
  positives (at least 1);
* each positive's box-loss weight is the *detached* maximum over the classes of its predicted
  score; GIoU (weight 2) and DFL (weight 0.25, the four sides averaged: ``avg_factor`` 4) are
  weighted by it and divided by the sum of the weights (at least 1), a constant;
* the DFL target is the distance from the anchor centre to each gt side in units of the
  anchor's stride, clamped to ``[0, reg_max - eps]``; MMDetection's ``bbox2distance`` (2.x) /
  ``DistancePointBBoxCoder.encode`` (3.x), as ``GFLHead`` calls it, has ``eps = 0.1``
  (``DFL_EPS``; ``test_gfl_loss__dfl_target_clamp_is_mmdetections`` builds a target that is clamped);
* ATSS: per gt, the ``topk`` anchors of each level nearest its centre; IoU >= mean + unbiased
  std of theirs, centre inside the gt by more than 0.01; the gt of highest IoU wins.

The only deliberate difference from MMDetection at this level is the K + 1 outputs of
docs/differences.md ("Classes"), which does not change ``compute_loss`` given labels.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from ummae.models.gfl import GFL, atss_assign, distribution_focal_loss, integral, quality_focal_loss

REG_MAX = 4
DFL_EPS = 0.1  # MMDetection 2.x GFLHead: bbox2distance(points, gt, max_dis=reg_max, eps=0.1)
STRIDES = (8, 16, 32)
OCTAVE = 8.0
IMG = 256


class _NoBackbone(nn.Module):
    out_channels = 8

    def forward(self, x):  # pragma: no cover - compute_loss never runs the backbone
        raise AssertionError


def _gfl(num_classes: int) -> GFL:
    torch.manual_seed(0)
    return GFL(_NoBackbone(), num_classes, min_size=IMG, max_size=IMG, reg_max=REG_MAX)


def _grid_anchors(offset: float = 0.0) -> tuple[torch.Tensor, list[int], list[int]]:
    """Square anchors of side ``OCTAVE * stride`` centred on each cell of a 256 px image, for
    the three strides; also each anchor's stride (what the test knows independently)."""
    boxes, sizes, strides = [], [], []
    for s in STRIDES:
        n = IMG // s
        half = OCTAVE * s / 2
        for i in range(n):
            for j in range(n):
                cx, cy = (j + 0.5) * s + offset, (i + 0.5) * s + offset
                boxes.append([cx - half, cy - half, cx + half, cy + half])
                strides.append(s)
        sizes.append(n * n)
    return torch.tensor(boxes, dtype=torch.float64), sizes, strides


# ------------------------------------------------------------------------- plain formulation


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def ref_atss(anchors: list, level_sizes: list[int], gts: list, topk: int) -> list[int]:
    """MMDetection's ``ATSSAssigner.assign`` as loops over anchors and gts."""
    matched = [-1] * len(anchors)
    if not gts:
        return matched
    centre = [((a[0] + a[2]) / 2, (a[1] + a[3]) / 2) for a in anchors]
    best: list[tuple[float, int] | None] = [None] * len(anchors)
    for g, gt in enumerate(gts):
        gc = ((gt[0] + gt[2]) / 2, (gt[1] + gt[3]) / 2)
        cands, start = [], 0
        for n in level_sizes:
            level = sorted(range(start, start + n), key=lambda a: math.dist(centre[a], gc))
            cands += level[: min(topk, n)]
            start += n
        ious = [_iou(anchors[a], gt) for a in cands]
        mean = sum(ious) / len(ious)
        std = math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))  # unbiased
        for a, v in zip(cands, ious, strict=True):
            cx, cy = centre[a]
            inside = min(cx - gt[0], cy - gt[1], gt[2] - cx, gt[3] - cy) > 0.01
            if v >= mean + std and inside and (best[a] is None or v > best[a][0]):
                best[a] = (v, g)
    return [b[1] if b is not None else -1 for b in best]


def _t_iou_giou(p, g):
    """IoU and GIoU of two boxes given as 4 scalars each (tensors or floats)."""
    iw = torch.clamp(torch.minimum(p[2], g[2]) - torch.maximum(p[0], g[0]), min=0)
    ih = torch.clamp(torch.minimum(p[3], g[3]) - torch.maximum(p[1], g[1]), min=0)
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    iou = inter / union
    enclose = (torch.maximum(p[2], g[2]) - torch.minimum(p[0], g[0])) * (
        torch.maximum(p[3], g[3]) - torch.minimum(p[1], g[1])
    )
    return iou, iou - (enclose - union) / enclose


def ref_gfl_losses(
    cls,
    reg,
    anchors,
    level_sizes,
    strides,
    targets,
    reg_max=REG_MAX,
    beta=2.0,
    topk=9,
    dfl_weight=0.25,
    giou_weight=2.0,
    dfl_eps=DFL_EPS,
):
    """MMDetection 2.x ``GFLHead.loss`` (one rank) as a loop over images, anchors and sides
    (QFL then elementwise over the classes, as MMDetection's ``quality_focal_loss``). ``cls [N, A, C]`` and ``reg [N, A, 4 (R + 1)]`` logits; ``strides[a]`` the stride of
    anchor ``a`` (known here, not read back from the anchor's size)."""
    num_images, num_anchors, num_classes = cls.shape
    giou_sum, dfl_sum = cls.new_zeros(()), cls.new_zeros(())
    weight_sum, num_pos = 0.0, 0
    info = {"pos_strides": set(), "clamped": 0, "weight_not_gt_class": 0, "pos": 0}
    y_pos = []
    alist = anchors.tolist()
    for n in range(num_images):
        gts, labels = targets[n]["boxes"].tolist(), targets[n]["labels"].tolist()
        matched = ref_atss(alist, level_sizes, gts, topk)
        for a in range(num_anchors):
            m = matched[a]
            score_target, label = 0.0, -1
            if m >= 0:
                num_pos += 1
                label, gt, s = labels[m], gts[m], strides[a]
                cx, cy = (alist[a][0] + alist[a][2]) / 2, (alist[a][1] + alist[a][3]) / 2
                dist = []
                for side in range(4):
                    logits = reg[n, a, side * (reg_max + 1) : (side + 1) * (reg_max + 1)]
                    p = torch.softmax(logits, 0)
                    dist.append(sum(k * p[k] for k in range(reg_max + 1)))
                box = [cx - dist[0] * s, cy - dist[1] * s, cx + dist[2] * s, cy + dist[3] * s]
                g = [torch.tensor(v, dtype=cls.dtype) for v in gt]
                iou_const, _ = _t_iou_giou([b.detach() for b in box], g)
                score_target = iou_const  # a constant
                probs = [torch.sigmoid(cls[n, a, c]).item() for c in range(num_classes)]
                w = max(probs)  # a float: a constant
                info["weight_not_gt_class"] += probs.index(w) != label
                weight_sum += w
                _, giou = _t_iou_giou(box, g)
                giou_sum = giou_sum + w * (1 - giou)
                raw = [(cx - gt[0]) / s, (cy - gt[1]) / s, (gt[2] - cx) / s, (gt[3] - cy) / s]
                for side, t in enumerate(raw):
                    info["clamped"] += t > reg_max - dfl_eps
                    t = min(max(t, 0.0), reg_max - dfl_eps)
                    left = math.floor(t)
                    logp = torch.log_softmax(reg[n, a, side * (reg_max + 1) : (side + 1) * (reg_max + 1)], 0)
                    dfl_sum = dfl_sum + w * (-logp[left] * (left + 1 - t) - logp[left + 1] * (t - left))
                info["pos_strides"].add(s)
            if m >= 0:
                y_pos.append((n, a, label, score_target))
    # QFL elementwise, the soft target y of each (anchor, class) pair set above (0 elsewhere)
    y = torch.zeros_like(cls)
    for n, a, label, score_target in y_pos:
        y[n, a, label] = score_target
    bce = -(y * nn.functional.logsigmoid(cls) + (1 - y) * nn.functional.logsigmoid(-cls))
    qfl_sum = (bce * (y - torch.sigmoid(cls)).abs() ** beta).sum()
    info["pos"] = num_pos
    avg = max(weight_sum, 1.0)
    return {
        "loss_qfl": qfl_sum / max(num_pos, 1),
        "loss_bbox": giou_weight * giou_sum / avg,
        "loss_dfl": dfl_weight * dfl_sum / 4.0 / avg,
    }, info


# ------------------------------------------------------------------------- ATSS


@pytest.mark.parametrize("seed", range(6))
def test_atss_assign__equals_the_plain_loop_on_random_objects(seed):
    rng = random.Random(seed)
    anchors, sizes, _ = _grid_anchors(offset=rng.uniform(-2, 2))
    gts = []
    for _ in range(rng.randint(1, 5)):
        w, h = rng.uniform(6, 110), rng.uniform(6, 110)
        x0, y0 = rng.uniform(0, IMG - w), rng.uniform(0, IMG - h)
        gts.append([x0, y0, x0 + w, y0 + h])
    for topk in (9, 3):
        got = atss_assign(anchors, sizes, torch.tensor(gts, dtype=torch.float64), topk=topk).tolist()
        want = ref_atss(anchors.tolist(), sizes, gts, topk)
        assert got == want, (seed, topk)
        assert any(m >= 0 for m in want)


def test_atss_assign__hand_built_two_levels_nearest_per_level_not_overall():
    """Level 0 anchors are far more numerous near the gt than level 1's: the candidates are the
    topk nearest *of each level*, so a level-1 anchor is positive though 8 level-0 anchors
    are nearer the centre (a global top-k would never look at level 1)."""
    # level 0: 10 px anchors centred x = 5, 15, ..., 95 (y 0..10); level 1: 40 px at 20, 60, 100
    lvl0 = [[10 * i, 0, 10 * i + 10, 10] for i in range(10)]
    lvl1 = [[0, 0, 40, 10], [40, 0, 80, 10], [80, 0, 120, 10]]
    anchors = torch.tensor(lvl0 + lvl1, dtype=torch.float64)
    gt = [[2.0, 0.0, 38.0, 10.0]]  # centre 20: the level-1 anchor 0 is exactly on it, IoU 36/40
    want = ref_atss(anchors.tolist(), [10, 3], gt, topk=2)
    # level 0 candidates: centres 15, 25 (IoU 10/36 each); level 1: centres 20, 60 (0.9, 0)
    # -> mean 0.3444, unbiased std 0.3946: threshold 0.739, only the level-1 anchor passes
    assert want == [-1] * 10 + [0, -1, -1]
    assert atss_assign(anchors, [10, 3], torch.tensor(gt, dtype=torch.float64), topk=2).tolist() == want


# ------------------------------------------------------------------------- the loss


def _case(seed: int, num_classes: int = 3):
    """Two images, objects of several sizes (positives on all three strides), random logits."""
    g = torch.Generator().manual_seed(seed)
    anchors, sizes, strides = _grid_anchors()
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 34.0, 40.0], [40.0, 30.0, 106.0, 92.0], [20.0, 60.0, 250.0, 255.0]]),
            "labels": torch.tensor([2, 0, 1]),
        },
        {
            "boxes": torch.tensor([[160.0, 5.0, 182.0, 21.0], [5.0, 20.0, 100.0, 120.0], [2.0, 1.0, 230.0, 200.0]]),
            "labels": torch.tensor([1, 2, 0]),
        },
    ]
    cls = (torch.randn(2, anchors.shape[0], num_classes, generator=g) * 1.5).requires_grad_()
    reg = (torch.randn(2, anchors.shape[0], 4 * (REG_MAX + 1), generator=g) * 2).requires_grad_()
    return anchors.float(), sizes, strides, targets, cls, reg


def _ours(model, anchors, sizes, targets, cls, reg):
    return model.compute_loss(targets, {"cls_logits": cls, "bbox_regression": reg}, [anchors] * len(targets), sizes)


@pytest.mark.parametrize("seed", [0, 1])
def test_gfl_loss__values_and_gradients_equal_mmdetection_loss_single_written_as_a_loop(seed):
    anchors, sizes, strides, targets, cls, reg = _case(seed)
    model = _gfl(3)
    ours = _ours(model, anchors, sizes, targets, cls, reg)
    cls_r = cls.detach().double().requires_grad_()
    reg_r = reg.detach().double().requires_grad_()
    ref, info = ref_gfl_losses(cls_r, reg_r, anchors.double(), sizes, strides, targets)
    # the case is one where the wrong variants differ: positives on several strides, sides
    # beyond reg_max strides (clamped), positives whose best class is not their gt's class
    assert info["pos_strides"] == set(STRIDES) and info["pos"] >= 10
    assert info["clamped"] > 0 and info["weight_not_gt_class"] > 0
    for name in ("loss_qfl", "loss_bbox", "loss_dfl"):
        assert ours[name].item() == pytest.approx(ref[name].item(), rel=1e-4), name
        # the gradient of each term, with respect to both outputs of the head
        g_ours = torch.autograd.grad(ours[name], [cls, reg], allow_unused=True, retain_graph=True)
        g_ref = torch.autograd.grad(ref[name], [cls_r, reg_r], allow_unused=True, retain_graph=True)
        for go, gr, what in zip(g_ours, g_ref, ("cls", "reg"), strict=True):
            go = torch.zeros_like(cls if what == "cls" else reg) if go is None else go
            gr = torch.zeros_like(cls_r if what == "cls" else reg_r) if gr is None else gr
            torch.testing.assert_close(go.double(), gr, rtol=1e-3, atol=1e-6, msg=f"d {name} / d {what}")


def test_gfl_loss__the_quality_target_and_the_box_weights_are_constants():
    """QFL's target (the IoU) is detached: QFL gives no gradient to the box branch; the box
    losses' weights (the max score) and their normaliser are detached: GIoU and DFL give no
    gradient to the class branch. Each head output gets gradient from its own losses only."""
    anchors, sizes, _, targets, cls, reg = _case(0)
    losses = _ours(_gfl(3), anchors, sizes, targets, cls, reg)
    g_cls, g_reg = torch.autograd.grad(losses["loss_qfl"], [cls, reg], allow_unused=True, retain_graph=True)
    assert g_cls is not None and g_cls.abs().sum() > 0
    assert g_reg is None or g_reg.abs().max() == 0, "QFL's IoU target carries gradient to the box branch"
    for name in ("loss_bbox", "loss_dfl"):
        g_cls, g_reg = torch.autograd.grad(losses[name], [cls, reg], allow_unused=True, retain_graph=True)
        assert g_reg is not None and g_reg.abs().sum() > 0
        assert g_cls is None or g_cls.abs().max() == 0, f"{name}'s score weight carries gradient to the class branch"


def test_gfl_loss__the_box_weight_is_the_max_score_over_classes_not_the_gt_class_score():
    """One positive (gt class 1): as class 0's logit rises above the gt class's, the box loss
    follows sigmoid(max logit), not sigmoid(gt class logit); one positive with a weight below 1
    has the normaliser 1, so the box loss is the GIoU loss times the weight exactly."""
    anchors = torch.tensor(
        [
            [0, 0, 10, 10],
            [10, 0, 20, 10],
            [20, 0, 30, 10],
            [30, 0, 40, 10],
            [40, 0, 50, 10],
            [0, 0, 20, 10],
            [20, 0, 40, 10],
            [40, 0, 60, 10],
        ],
        dtype=torch.float32,
    )
    sizes = [5, 3]
    target = {"boxes": torch.tensor([[6.0, 0.0, 12.0, 10.0]]), "labels": torch.tensor([1])}
    model = _gfl(3)
    reg = torch.zeros(1, 8, 4 * (REG_MAX + 1))
    out = {}
    for best in (-1.0, 0.5, 1.5):
        cls = torch.full((1, 8, 3), -4.0)
        cls[0, 5] = torch.tensor([best, -0.5, -3.0])  # anchor 5 is the positive (test_gfl.py), gt class 1
        out[best] = _ours(model, anchors, sizes, [target], cls, reg)["loss_bbox"].item()
    w = {b: 1 / (1 + math.exp(-max(b, -0.5))) for b in out}
    for b in out:
        assert out[b] / w[b] == pytest.approx(out[1.5] / w[1.5], rel=1e-5)


def test_gfl_loss__the_dfl_target_is_in_strides_and_clamped_below_reg_max():
    """One positive at stride 2.5 (anchor 20 px, octave 8); its gt sides lie 4, 5, 30 and 5
    px from the centre (10, 5): 1.6, 2, 12 and 2 strides; the 12 is clamped to reg_max - eps
    (ours: 3.99, so its loss is that of bins 3 (weight 0.01) and 4 (0.99))."""
    anchors = torch.tensor(
        [
            [0, 0, 10, 10],
            [10, 0, 20, 10],
            [20, 0, 30, 10],
            [30, 0, 40, 10],
            [40, 0, 50, 10],
            [0, 0, 20, 10],
            [20, 0, 40, 10],
            [40, 0, 60, 10],
        ],
        dtype=torch.float32,
    )
    target = {"boxes": torch.tensor([[6.0, 0.0, 40.0, 10.0]]), "labels": torch.tensor([0])}
    model = _gfl(2)
    pos = atss_assign(anchors, [5, 3], target["boxes"], topk=3)
    g = torch.Generator().manual_seed(3)
    reg = torch.randn(1, 8, 4 * (REG_MAX + 1), generator=g)
    cls = torch.full((1, 8, 2), -6.0)
    ref, info = ref_gfl_losses(
        cls.double(), reg.double(), anchors.double(), [5, 3], [1.25] * 5 + [2.5] * 3, [target], topk=3
    )
    assert (pos >= 0).sum() >= 1 and info["clamped"] > 0
    model.atss_topk = 3
    ours = _ours(model, anchors, [5, 3], [target], cls, reg)
    for name in ("loss_qfl", "loss_bbox", "loss_dfl"):
        assert ours[name].item() == pytest.approx(ref[name].item(), rel=1e-4), name


def test_gfl_defaults__the_reference_config():
    model = _gfl(3)
    assert (model.atss_topk, model.qfl_beta, model.dfl_weight, model.giou_weight) == (9, 2.0, 0.25, 2.0)
    assert (model.score_thresh, model.nms_thresh, model.topk_candidates, model.detections_per_img) == (
        0.05,
        0.6,
        1000,
        100,
    )
    assert model.reg_max == REG_MAX and GFL(_NoBackbone(), 3).reg_max == 16
    assert GFL(_NoBackbone(), 3).octave_base_scale == 8.0


# ------------------------------------------------------------------------- elementwise losses


def test_quality_focal_loss__elementwise_equals_the_mmdetection_formula_and_gradient():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([0, -1, 3, 2, -1, 1, 3])
    scores = torch.tensor([0.9, 0.0, 0.15, 0.5, 0.0, 0.02, 0.7], dtype=torch.float64)
    x = logits.clone().requires_grad_()
    ours = quality_focal_loss(x, labels, scores, beta=2.0)
    xr = logits.clone().requires_grad_()
    ref = torch.zeros_like(logits)
    rows = []
    for a in range(7):
        row = []
        for c in range(4):
            y = scores[a].item() if labels[a].item() == c else 0.0
            p = torch.sigmoid(xr[a, c])
            row.append(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)) * (y - p).abs() ** 2)
        rows.append(torch.stack(row))
    ref = torch.stack(rows)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    # beta enters as the exponent of the modulating factor
    ours3 = quality_focal_loss(logits, labels, scores, beta=3.0)
    assert not torch.allclose(ours3, ref.detach())


def test_distribution_focal_loss__equals_the_two_bin_cross_entropy_for_random_targets():
    g = torch.Generator().manual_seed(6)
    pred = torch.randn(20, REG_MAX + 1, generator=g, dtype=torch.float64)
    target = torch.rand(20, generator=g, dtype=torch.float64) * (REG_MAX - 0.01)
    ours = distribution_focal_loss(pred, target)
    for i in range(20):
        t = target[i].item()
        left = int(math.floor(t))
        logp = torch.log_softmax(pred[i], 0)
        want = -logp[left].item() * (left + 1 - t) - logp[left + 1].item() * (t - left)
        assert ours[i].item() == pytest.approx(want, rel=1e-9)


def test_integral__is_the_expectation_of_the_softmax_over_bins_for_random_logits():
    g = torch.Generator().manual_seed(7)
    pred = torch.randn(3, 5, 4 * (REG_MAX + 1), generator=g, dtype=torch.float64)
    got = integral(pred, REG_MAX)
    for i in range(3):
        for j in range(5):
            for side in range(4):
                logits = pred[i, j, side * (REG_MAX + 1) : (side + 1) * (REG_MAX + 1)].tolist()
                z = sum(math.exp(v) for v in logits)
                want = sum(k * math.exp(v) / z for k, v in enumerate(logits))
                assert got[i, j, side].item() == pytest.approx(want, rel=1e-9)


# ------------------------------------------------------------------------- inference


def _plain_nms(boxes: list, scores: list, thresh: float) -> list[int]:
    """Greedy NMS: by descending score, drop every box whose IoU with a kept one exceeds
    ``thresh``."""
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        if all(_iou(boxes[i], boxes[j]) <= thresh for j in keep):
            keep.append(i)
    return keep


def ref_postprocess(
    cls_levels, reg_levels, anchor_levels, strides, image_shape, reg_max, score_thresh, nms_thresh, topk, max_det
):
    """MMDetection's ``GFLHead._get_bboxes_single`` + ``multiclass_nms``, one image, as loops:
    sigmoid scores; per level the (anchor, class) pairs above the threshold, the ``topk`` best;
    each side the mean of its softmax times the stride from the anchor centre; clipped to the
    image; class-wise NMS; the ``max_det`` best."""
    h, w = image_shape
    cands = []  # (score, label, box)
    for cls, reg, anchors, s in zip(cls_levels, reg_levels, anchor_levels, strides, strict=True):
        pairs = []
        for a in range(cls.shape[0]):
            for c in range(cls.shape[1]):
                p = 1 / (1 + math.exp(-float(cls[a, c])))
                if p > score_thresh:
                    pairs.append((p, a, c))
        pairs.sort(key=lambda t: -t[0])
        for p, a, c in pairs[:topk]:
            x0, y0, x1, y1 = anchors[a].tolist()
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            d = []
            for side in range(4):
                logits = reg[a, side * (reg_max + 1) : (side + 1) * (reg_max + 1)].tolist()
                z = sum(math.exp(v) for v in logits)
                d.append(sum(k * math.exp(v) / z for k, v in enumerate(logits)) * s)
            box = [
                min(max(cx - d[0], 0), w),
                min(max(cy - d[1], 0), h),
                min(max(cx + d[2], 0), w),
                min(max(cy + d[3], 0), h),
            ]
            if box[2] - box[0] >= 1e-2 and box[3] - box[1] >= 1e-2:
                cands.append((p, c, box))
    kept = []
    for c in {c for _, c, _ in cands}:
        mine = [t for t in cands if t[1] == c]
        kept += [mine[i] for i in _plain_nms([t[2] for t in mine], [t[0] for t in mine], nms_thresh)]
    kept.sort(key=lambda t: -t[0])
    return kept[:max_det]


@pytest.mark.parametrize("topk, max_det", [(1000, 100), (6, 100), (1000, 7)])
def test_postprocess__equals_the_plain_decode_threshold_topk_clip_and_classwise_nms(topk, max_det):
    g = torch.Generator().manual_seed(11)
    image_shape = (40, 56)  # not square, and anchors beyond it: clipping matters
    strides = [8, 16]
    anchor_levels, cls_levels, reg_levels = [], [], []
    for s in strides:
        ys, xs = torch.meshgrid(torch.arange(0, 48, s) + s / 2, torch.arange(0, 64, s) + s / 2, indexing="ij")
        ctr = torch.stack([xs.flatten(), ys.flatten()], 1).float()
        half = OCTAVE * s / 2
        anchor_levels.append(torch.cat([ctr - half, ctr + half], 1))
        n = ctr.shape[0]
        cls_levels.append(torch.randn(n, 3, generator=g) * 2 - 1.5)
        reg_levels.append(torch.randn(n, 4 * (REG_MAX + 1), generator=g) * 1.5)
    model = _gfl(3)
    model.topk_candidates, model.detections_per_img = topk, max_det
    det = model.postprocess_detections(
        {"cls_logits": [c[None] for c in cls_levels], "bbox_regression": [r[None] for r in reg_levels]},
        [anchor_levels],
        [image_shape],
    )[0]
    ref = ref_postprocess(
        cls_levels, reg_levels, anchor_levels, strides, image_shape, REG_MAX, 0.05, 0.6, topk, max_det
    )
    assert len(ref) >= 5
    assert det["scores"].tolist() == pytest.approx([t[0] for t in ref], rel=1e-5)
    assert det["labels"].tolist() == [t[1] for t in ref]
    torch.testing.assert_close(det["boxes"], torch.tensor([t[2] for t in ref]), atol=1e-4, rtol=1e-5)


def test_gfl_loss__dfl_target_clamp_is_mmdetections():
    """A side 12 strides from the anchor centre with reg_max 4: MMDetection's target is 3.9
    (bins 3 and 4 weighted 0.1 and 0.9), not 3.99."""
    anchors = torch.tensor(
        [[0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10], [30, 0, 40, 10], [40, 0, 50, 10],
         [0, 0, 20, 10], [20, 0, 40, 10], [40, 0, 60, 10]],
        dtype=torch.float32,
    )  # fmt: skip
    target = {"boxes": torch.tensor([[6.0, 0.0, 40.0, 10.0]]), "labels": torch.tensor([0])}
    model = _gfl(2)
    model.atss_topk = 3
    g = torch.Generator().manual_seed(3)
    reg = torch.randn(1, 8, 4 * (REG_MAX + 1), generator=g)
    cls = torch.full((1, 8, 2), -6.0)
    ref, info = ref_gfl_losses(
        cls.double(), reg.double(), anchors.double(), [5, 3], [1.25] * 5 + [2.5] * 3, [target], topk=3, dfl_eps=0.1
    )
    assert info["clamped"] > 0
    ours = _ours(model, anchors, [5, 3], [target], cls, reg)
    assert ours["loss_dfl"].item() == pytest.approx(ref["loss_dfl"].item(), rel=1e-4)
