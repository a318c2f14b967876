"""``--rpn-assign mmdet`` (``ummae.models.rpn``) against MMDetection 2.x's RPN training rule,
written out here as loops:

* ``mmdet/core/anchor/utils.py`` ``anchor_inside_flags(allowed_border=0)``: an anchor is used
  when ``x1 >= 0, y1 >= 0, x2 < W, y2 < H`` of the image before padding (``img_shape``); the
  others get no label (zero weight).
* ``MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True,
  gt_max_assign_all=True)`` over the inside anchors: 0 <= max IoU < 0.3 negative, >= 0.7
  positive (argmax ground truth), ignored between; then for each ground truth i in order whose
  best IoU >= 0.3, every anchor with IoU == that best is assigned to i (a later one wins).
"""

from __future__ import annotations

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from ummae.models.rpn import MMDetRPN

H, W = 30, 40  # the image before padding


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def mmdet_rpn_labels(anchors, gts, img_shape):
    """Labels per anchor: 1 positive, 0 negative, -1 no label; and the assigned gt (or None)."""
    h, w = img_shape
    inside = [i for i, a in enumerate(anchors) if a[0] >= 0 and a[1] >= 0 and a[2] < w and a[3] < h]
    assigned = dict.fromkeys(inside, -1)  # -1 ignored, 0 negative, g + 1 ground truth g
    for i in inside:
        ious = [iou(g, anchors[i]) for g in gts]
        best = max(ious)
        if 0 <= best < 0.3:
            assigned[i] = 0
        if best >= 0.7:
            assigned[i] = ious.index(best) + 1
    for g, gt in enumerate(gts):
        ious = {i: iou(gt, anchors[i]) for i in inside}
        best = max(ious.values())
        if best >= 0.3:
            for i, v in ious.items():
                if v == best:
                    assigned[i] = g + 1
    labels = [-1] * len(anchors)
    matched = [None] * len(anchors)
    for i, a in assigned.items():
        labels[i] = 1 if a > 0 else (0 if a == 0 else -1)
        matched[i] = a - 1 if a > 0 else None
    return labels, matched


def _rpn(kind: str) -> RegionProposalNetwork:
    rpn = RegionProposalNetwork(
        AnchorGenerator(((16,),), ((1.0,),)), RPNHead(4, 1), 0.7, 0.3, 256, 0.5,
        {"training": 2000, "testing": 1000}, {"training": 2000, "testing": 1000}, 0.7,
    )  # fmt: skip
    return MMDetRPN.like(rpn) if kind == "mmdet" else rpn


# A tiny case that tells the rules apart: gt 0 has a >= 0.7 anchor inside; gt 1's best inside
# anchor is at IoU 0.5 (a low-quality positive for both rules); gt 2's best is at 0.2 (a
# positive only for torchvision's); anchor 6 crosses the right edge (ignored by MMDetection's);
# anchors 7 and 8 are the best anchors of gts 3 and 4, both at IoU 36/64 (the later gt takes both).
ANCHORS = [
    [2.0, 2.0, 12.0, 12.0],  # 0: gt 0 at IoU 0.81
    [20.0, 2.0, 30.0, 12.0],  # 1: gt 1 at IoU 0.5
    [14.0, 14.0, 16.0, 16.0],  # 2: far from all: negative
    [2.0, 18.0, 7.0, 28.0],  # 3: gt 2 at IoU 0.2
    [3.0, 3.0, 11.0, 11.0],  # 4: gt 0 at IoU 0.64 (between): ignored
    [0.0, 0.0, 4.0, 4.0],  # 5: negative
    [32.0, 2.0, 42.0, 12.0],  # 6: crosses x = 40 (W): no label under MMDetection's rule
    [31.0, 18.0, 37.0, 24.0],  # 7: tied between gts 3 and 4
    [31.0, 18.0, 37.0, 24.0],  # 8: the same box
]
GTS = [[2.0, 2.0, 13.0, 13.0], [20.0, 2.0, 35.0, 12.0], [2.0, 18.0, 27.0, 28.0], [30.0, 17.0, 38.0, 25.0],
       [31.0, 18.0, 39.0, 26.0]]  # fmt: skip


def test_mmdet_rule__border_ignore_and_min_pos_iou_as_mmdetection():
    anchors, gts = torch.tensor(ANCHORS), torch.tensor(GTS)
    labels, matched = _rpn("mmdet").assign_targets_to_anchors([anchors], [{"boxes": gts, "img_shape": (H, W)}])
    want_labels, want_matched = mmdet_rpn_labels(ANCHORS, GTS, (H, W))
    assert labels[0].tolist() == want_labels
    assert want_labels[6] == -1 and want_labels[3] == 0 and want_labels[4] == -1 and want_labels[1] == 1
    for i, g in enumerate(want_matched):
        if g is not None:
            assert matched[0][i].tolist() == GTS[g], i
    assert want_matched[7] == want_matched[8] == 4  # the later of the tied ground truths


def test_torchvision_rule__differs_on_the_same_case():
    """The case separates the rules: torchvision's makes the IoU-0.2 anchor and the edge anchor
    targets, MMDetection's does not."""
    anchors, gts = torch.tensor(ANCHORS), torch.tensor(GTS)
    labels, _ = _rpn("torchvision").assign_targets_to_anchors([anchors], [{"boxes": gts}])
    assert labels[0][3] == 1 and labels[0][6] != -1


def test_mmdet_rule__img_shape_defaults_to_the_image_size_and_no_ground_truth_means_negatives():
    rpn = _rpn("mmdet")
    rpn.train()
    images = ImageList(torch.zeros(1, 3, 32, 48), [(H, W)])
    features = {"0": torch.zeros(1, 4, 4, 6)}
    seen = []
    real = rpn.assign_targets_to_anchors
    rpn.assign_targets_to_anchors = lambda a, t: seen.append(t[0]["img_shape"]) or real(a, t)
    rpn(images, features, [{"boxes": torch.tensor(GTS), "labels": torch.ones(5, dtype=torch.int64)}])
    assert seen == [(H, W)]
    anchors = torch.tensor(ANCHORS)
    labels, _ = rpn.assign_targets_to_anchors([anchors], [{"boxes": torch.zeros(0, 4), "img_shape": (H, W)}])
    assert labels[0].tolist() == [0, 0, 0, 0, 0, 0, -1, 0, 0]
