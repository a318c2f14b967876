"""MMDetection 2.x's RPN training targets on torchvision's ``RegionProposalNetwork``
(``--rpn-assign mmdet``): the head, anchors, sampler, losses and proposals stay torchvision's;
which anchors are positive, negative or ignored follows MMDetection's ``AnchorHead`` with
``train_cfg.rpn`` of ``cascade_mask_rcnn_r50_fpn.py`` / ``htc_r50_fpn_1x_coco.py``:

* ``anchor_inside_flags(allowed_border=0)``: an anchor is used only when it lies inside the
  image, ``x1 >= 0, y1 >= 0, x2 < W, y2 < H`` with ``(H, W)`` the image before padding
  (``img_shape``; a target's ``img_shape``, else the image size); the others are ignored
  (neither positive nor negative: MMDetection unmaps them with zero weight).
* ``MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True,
  gt_max_assign_all=True)`` over the inside anchors: negative below 0.3, positive from 0.7 (the
  best ground truth), ignored between; then for each ground truth in turn whose best IoU is
  >= 0.3, every anchor at that best IoU becomes its positive (a later ground truth wins a tie).

torchvision's rule (``--rpn-assign torchvision``) uses every anchor and makes each ground
truth's best anchors positive at any IoU, matched to the anchor's own best ground truth.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

# train_cfg.rpn of the MMDetection configs the cascades follow
POS_IOU, NEG_IOU, MIN_POS_IOU, ALLOWED_BORDER = 0.7, 0.3, 0.3, 0

IGNORED, NEGATIVE = -2, -1  # the assignment of an anchor that is no ground truth's


def inside_flags(anchors: Tensor, img_shape: tuple[int, int], allowed_border: float = ALLOWED_BORDER) -> Tensor:
    """MMDetection's ``anchor_inside_flags``: the anchors within ``allowed_border`` of the image."""
    h, w = img_shape
    return (
        (anchors[:, 0] >= -allowed_border)
        & (anchors[:, 1] >= -allowed_border)
        & (anchors[:, 2] < w + allowed_border)
        & (anchors[:, 3] < h + allowed_border)
    )


def max_iou_assign(iou: Tensor, pos: float = POS_IOU, neg: float = NEG_IOU, min_pos: float = MIN_POS_IOU) -> Tensor:
    """MMDetection's ``MaxIoUAssigner.assign_wrt_overlaps`` on ``iou`` ``[G, A]`` (G >= 1):
    per anchor the index of its ground truth, or :data:`NEGATIVE` / :data:`IGNORED`."""
    best, best_gt = iou.max(dim=0)
    assigned = torch.full_like(best_gt, IGNORED)
    assigned[(best >= 0) & (best < neg)] = NEGATIVE
    positive = best >= pos
    assigned[positive] = best_gt[positive]
    gt_best = iou.max(dim=1).values
    for g in range(len(iou)):  # in order: a later ground truth takes an anchor tied between two
        if gt_best[g] >= min_pos:
            assigned[iou[g] == gt_best[g]] = g
    return assigned


class MMDetRPN(RegionProposalNetwork):
    """torchvision's RPN with MMDetection's training targets (module docstring): its matcher's
    thresholds are ``pos_iou_thr`` / ``neg_iou_thr``; ``min_pos_iou``, ``allowed_border``."""

    def __init__(self, *args, min_pos_iou: float = MIN_POS_IOU, allowed_border: float = ALLOWED_BORDER, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_pos_iou, self.allowed_border = min_pos_iou, allowed_border

    @classmethod
    def like(cls, rpn: RegionProposalNetwork) -> MMDetRPN:
        """The same RPN (its head and anchor generator, the same modules; its sampler and
        proposal settings) with MMDetection's targets."""
        sampler = rpn.fg_bg_sampler
        return cls(
            rpn.anchor_generator,
            rpn.head,
            POS_IOU,
            NEG_IOU,
            sampler.batch_size_per_image,
            sampler.positive_fraction,
            dict(rpn._pre_nms_top_n),
            dict(rpn._post_nms_top_n),
            rpn.nms_thresh,
            rpn.score_thresh,
        )

    def forward(self, images, features, targets=None):
        # the image before padding is what MMDetection's border rule measures: a target's
        # img_shape (the training transform's valid region), else the image's size
        if targets is not None:
            targets = [{"img_shape": tuple(size), **t} for t, size in zip(targets, images.image_sizes, strict=True)]
        return super().forward(images, features, targets)

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]):
        """Per image, the anchors' labels (1 positive, 0 negative, -1 ignored) and matched boxes,
        as torchvision's RPN takes them."""
        labels, matched_boxes = [], []
        for anchors_per_image, target in zip(anchors, targets, strict=True):
            gt = target["boxes"]
            inside = inside_flags(anchors_per_image, target["img_shape"], self.allowed_border)
            assigned = torch.full((len(anchors_per_image),), IGNORED, dtype=torch.int64, device=gt.device)
            if len(gt) and inside.any():
                iou = box_iou(gt, anchors_per_image[inside])
                matcher = self.proposal_matcher
                assigned[inside] = max_iou_assign(iou, matcher.high_threshold, matcher.low_threshold, self.min_pos_iou)
            elif not len(gt):  # no ground truth: every inside anchor is a negative
                assigned[inside] = NEGATIVE
            label = (assigned >= 0).to(torch.float32)
            label[assigned == IGNORED] = -1.0
            labels.append(label)
            matched_boxes.append(gt[assigned.clamp(min=0)] if len(gt) else torch.zeros_like(anchors_per_image))
        return labels, matched_boxes
