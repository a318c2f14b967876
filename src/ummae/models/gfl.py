"""GFL: Generalized Focal Loss detector (Li et al., NeurIPS 2020, arXiv:2006.04388) on
torchvision's detection pieces, following the behaviour of MMDetection 2.x's ``GFLHead``
trained with ``ATSSAssigner`` (Zhang et al., CVPR 2020, arXiv:1912.02424).

:class:`GFL` subclasses torchvision's :class:`~torchvision.models.detection.FCOS` and keeps its
``forward`` (transform, backbone, head, anchors, outputs); what differs is here:

* one square anchor per location, ``octave_base_scale`` (8) times the level's stride, only
  used for ATSS (IoU and centre distance) and as the point the box is regressed around;
* :class:`GFLHead`: GroupNorm towers, a class-score branch that is also the localisation
  quality (no centre-ness branch) and a box branch that predicts, for each of the four sides,
  a discrete distribution over ``0..reg_max`` strides;
* the loss: quality focal loss (the IoU of the predicted box as the soft class target),
  distribution focal loss and GIoU loss, the two box losses weighted by the predicted score;
* inference: sigmoid scores, per-level top-k, integral decoding, class-wise NMS.

The numbers follow MMDetection's GFL config (``gfl_r50_fpn_1x_coco``): ATSS top 9, QFL beta 2,
DFL weight 0.25, GIoU weight 2, score threshold 0.05, NMS IoU 0.6, 1000 candidates per level,
100 detections per image.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, generalized_box_iou_loss, remove_small_boxes

__all__ = ["GFL", "GFLHead", "atss_assign", "quality_focal_loss", "distribution_focal_loss", "integral"]


# ---------------------------------------------------------------------------------- the losses


def quality_focal_loss(logits: Tensor, labels: Tensor, scores: Tensor, beta: float = 2.0) -> Tensor:
    """Elementwise QFL ``[A, C]``: ``BCE(x, y) * |y - sigmoid(x)|^beta`` with the soft target
    ``y`` = ``scores[a]`` at the label channel of a positive (``labels[a] >= 0``), else 0.
    With ``y = 0`` the factor is ``sigmoid(x)^beta``: the focal loss of the negatives."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or scores.shape != logits.shape[:1]:
        raise ValueError(
            f"quality_focal_loss: logits [A, C], labels [A], scores [A]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(scores.shape)}"
        )
    pos = labels >= 0
    target = torch.zeros_like(logits)
    target[pos, labels[pos]] = scores[pos].to(logits.dtype)
    # the modulating factor is not detached: the gradient of the paper's loss goes through it
    factor = (target - logits.sigmoid()).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * factor


def distribution_focal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """DFL ``[P]`` of distributions ``pred [P, reg_max + 1]`` (logits) for continuous targets
    in ``[0, reg_max)``: cross-entropy towards the two bins around the target, each weighted
    by its nearness, so the distribution's mean is drawn to the target."""
    if pred.dim() != 2 or target.shape != pred.shape[:1]:
        raise ValueError(
            f"distribution_focal_loss: pred [P, reg_max + 1], target [P]; got "
            f"{tuple(pred.shape)}, {tuple(target.shape)}"
        )
    left = target.long()  # floor: the targets are not negative
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    return (
        F.cross_entropy(pred, left, reduction="none") * w_left
        + F.cross_entropy(pred, right, reduction="none") * w_right
    )


def integral(pred: Tensor, reg_max: int) -> Tensor:
    """``[..., 4 * (reg_max + 1)]`` side distributions (logits) -> ``[..., 4]`` distances in
    strides: the mean of each softmax over the bins ``0..reg_max``."""
    if pred.shape[-1] != 4 * (reg_max + 1):
        raise ValueError(f"integral: last dimension {pred.shape[-1]} is not 4 * (reg_max + 1) = {4 * (reg_max + 1)}")
    prob = pred.reshape(*pred.shape[:-1], 4, reg_max + 1).softmax(dim=-1)
    bins = torch.arange(reg_max + 1, dtype=prob.dtype, device=prob.device)
    return (prob * bins).sum(dim=-1)


def _aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (torchvision's ``box_iou`` is all-pairs: ``P^2``)."""
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


def _mean_over_ranks(x: Tensor) -> Tensor:
    """The normalisers are averaged over the DDP ranks (MMDetection's ``reduce_mean``), so
    every rank divides by the same number and the gradient is that of the global batch."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        x = x.clone()
        torch_dist.all_reduce(x)
        x = x / torch_dist.get_world_size()
    return x


# ---------------------------------------------------------------------------------- assignment


def atss_assign(anchors: Tensor, num_anchors_per_level: list[int], gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """ATSS: for every gt, the ``min(topk, level size)`` anchors of each level whose centres
    are nearest its centre are the candidates; those with IoU >= mean + std (unbiased) of
    the candidates' IoUs and whose centre lies inside the gt (> 0.01 from every side) are
    positive. An anchor positive for several gts takes the one it overlaps most.

    Returns ``matched [A]``: the gt index of each anchor, -1 for background."""
    if anchors.dim() != 2 or anchors.shape[-1] != 4 or gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(
            f"atss_assign: anchors [A, 4] and gt_boxes [G, 4]; got {tuple(anchors.shape)}, {tuple(gt_boxes.shape)}"
        )
    if sum(num_anchors_per_level) != anchors.shape[0]:
        raise ValueError(
            f"atss_assign: num_anchors_per_level sums to {sum(num_anchors_per_level)}, "
            f"not the {anchors.shape[0]} anchors"
        )
    if topk < 1:
        raise ValueError(f"atss_assign: topk must be >= 1, got {topk}")
    num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gts == 0 or num_anchors == 0:
        return matched

    gt_boxes = gt_boxes.to(anchors.dtype)
    ious = box_iou(anchors, gt_boxes)  # [A, G]
    anchor_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    # direct differences rather than torch.cdist, whose matmul path can reorder near-ties
    dist = (anchor_ctr[:, None, :] - gt_ctr[None, :, :]).pow(2).sum(-1).sqrt()  # [A, G]

    candidates = []
    start = 0
    for n in num_anchors_per_level:
        if n > 0:
            k = min(topk, n)
            candidates.append(dist[start : start + n].topk(k, dim=0, largest=False).indices + start)
        start += n
    cand = torch.cat(candidates, dim=0)  # [K, G], anchor indices
    cand_ious = ious.gather(0, cand)
    thresh = cand_ious.mean(0) + cand_ious.std(0)
    is_pos = cand_ious >= thresh[None, :]

    cx, cy = anchor_ctr[cand, 0], anchor_ctr[cand, 1]  # [K, G]
    x0, y0, x1, y1 = gt_boxes.unbind(dim=1)
    inside = torch.stack([cx - x0, cy - y0, x1 - cx, y1 - cy], dim=-1).min(dim=-1).values > 0.01
    is_pos &= inside

    # IoU where positive, -inf elsewhere; each gt's candidates are distinct anchors
    neg_inf = torch.tensor(float("-inf"), dtype=ious.dtype, device=ious.device)
    pos_ious = torch.full_like(ious, float("-inf")).scatter_(0, cand, torch.where(is_pos, cand_ious, neg_inf))
    best, best_gt = pos_ious.max(dim=1)
    return torch.where(torch.isfinite(best), best_gt, matched)


# ---------------------------------------------------------------------------------- the head


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as MMDetection's head (256 channels); with few channels, the most groups that
    # keep two channels each, so a 1x1 map (P7 of a small image) still has two values a group
    groups = max(g for g in range(1, max(1, min(32, channels // 2)) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class GFLHead(nn.Module):
    """Classification (quality) and distribution branches of GFL, shared over the levels.

    Outputs, concatenated over the levels as torchvision's heads do (one anchor a location):
    ``cls_logits [N, HWA, num_classes]`` and ``bbox_regression [N, HWA, 4 * (reg_max + 1)]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        reg_max: int = 16,
        num_convs: int = 4,
        num_levels: int = 5,
        prior_probability: float = 0.01,
    ):
        super().__init__()
        if num_classes < 1 or reg_max < 1 or num_convs < 0 or num_levels < 1:
            raise ValueError(
                f"GFLHead: need num_classes >= 1, reg_max >= 1, num_convs >= 0, num_levels >= 1; got "
                f"{num_classes}, {reg_max}, {num_convs}, {num_levels}"
            )
        self.num_classes, self.reg_max, self.num_levels = num_classes, reg_max, num_levels

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(num_convs):
                layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1), _group_norm(in_channels), nn.ReLU()]
            return nn.Sequential(*layers)

        self.cls_tower, self.reg_tower = tower(), tower()
        self.gfl_cls = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(in_channels, 4 * (reg_max + 1), 3, padding=1)
        # one learnable scale per level: the levels share the convs but not the range of logits
        self.scales = nn.Parameter(torch.ones(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # start every location at the prior probability, so the many negatives do not swamp the
        # first steps
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        if len(x) != self.num_levels:
            raise ValueError(f"GFLHead was built for {self.num_levels} levels, got {len(x)} feature maps")
        cls_out, reg_out = [], []
        for level, feat in enumerate(x):
            cls = self.gfl_cls(self.cls_tower(feat))
            reg = self.gfl_reg(self.reg_tower(feat)) * self.scales[level]
            # [N, K, H, W] -> [N, HW, K]: torchvision's layout for one anchor per location
            cls_out.append(cls.flatten(2).transpose(1, 2))
            reg_out.append(reg.flatten(2).transpose(1, 2))
        return {"cls_logits": torch.cat(cls_out, dim=1), "bbox_regression": torch.cat(reg_out, dim=1)}


# ---------------------------------------------------------------------------------- the detector


class GFL(FCOS):
    """GFL detector. ``backbone`` has ``out_channels`` and returns the P3-P7 maps (strides
    8-128, an ``OrderedDict``); images and targets as every torchvision detector takes them
    (``boxes [n, 4]`` xyxy, possibly empty, ``labels`` int64 in ``[0, num_classes)``).

    ``octave_base_scale`` is the anchor size over the stride, by which the stride of each
    anchor is read back from its size. The transform pads to a multiple of 128 unless told
    otherwise (``size_divisible``): torchvision's anchor generator spaces anchors by
    ``padded size // feature size``, which is the true stride at P6/P7 only then.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        anchor_generator: AnchorGenerator | None = None,
        head: nn.Module | None = None,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        reg_max: int = 16,
        atss_topk: int = 9,
        qfl_beta: float = 2.0,
        dfl_weight: float = 0.25,
        giou_weight: float = 2.0,
        num_convs: int = 4,
        octave_base_scale: float = 8.0,
        **kwargs: Any,
    ):
        if num_classes < 1:
            raise ValueError(f"GFL: num_classes must be >= 1, got {num_classes}")
        if reg_max < 1 or atss_topk < 1 or octave_base_scale <= 0:
            raise ValueError(
                f"GFL: need reg_max >= 1, atss_topk >= 1, octave_base_scale > 0; got {reg_max}, "
                f"{atss_topk}, {octave_base_scale}"
            )
        if not hasattr(backbone, "out_channels"):
            raise ValueError("GFL: the backbone needs an `out_channels` attribute (channels of every map)")
        if anchor_generator is None:
            sizes = tuple((int(octave_base_scale * s),) for s in (8, 16, 32, 64, 128))
            anchor_generator = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
        if head is None:
            head = GFLHead(
                backbone.out_channels, num_classes, reg_max, num_convs, num_levels=len(anchor_generator.sizes)
            )
        elif getattr(head, "reg_max", reg_max) != reg_max:
            raise ValueError(f"GFL: head.reg_max {head.reg_max} differs from reg_max {reg_max}")
        kwargs.setdefault("size_divisible", 128)
        super().__init__(
            backbone,
            num_classes,
            min_size=min_size,
            max_size=max_size,
            image_mean=image_mean,
            image_std=image_std,
            anchor_generator=anchor_generator,
            head=head,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
            **kwargs,
        )
        self.num_classes = num_classes
        self.reg_max, self.atss_topk, self.qfl_beta = reg_max, atss_topk, qfl_beta
        self.dfl_weight, self.giou_weight = dfl_weight, giou_weight
        self.octave_base_scale = octave_base_scale
        # distances in pixels around the anchor centre (the stride is applied before decoding)
        self.box_coder = BoxLinearCoder(normalize_by_size=False)

    def _strides(self, anchors: Tensor) -> Tensor:
        return (anchors[..., 2] - anchors[..., 0]) / self.octave_base_scale

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        num_anchors_per_level: list[int],
    ) -> dict[str, Tensor]:
        # the losses in float32 whatever autocast made the head's outputs
        cls_logits = head_outputs["cls_logits"].float()  # [N, A, C]
        bbox_reg = head_outputs["bbox_regression"].float()  # [N, A, 4 (R + 1)]
        num_classes = cls_logits.shape[-1]

        all_labels, all_boxes = [], []
        for anchors_i, target in zip(anchors, targets, strict=True):
            boxes, labels = target["boxes"], target["labels"]
            if labels.shape != boxes.shape[:1]:
                raise ValueError(f"GFL: {boxes.shape[0]} boxes but {labels.numel()} labels in a target")
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(
                    f"GFL: labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}"
                )
            matched = atss_assign(anchors_i, num_anchors_per_level, boxes, self.atss_topk)
            if boxes.shape[0] == 0:
                all_labels.append(torch.full_like(matched, -1))
                all_boxes.append(anchors_i.new_zeros(anchors_i.shape))
            else:
                safe = matched.clamp(min=0)
                all_labels.append(torch.where(matched >= 0, labels[safe], -1))
                all_boxes.append(boxes[safe].to(anchors_i.dtype))
        labels_t, gt_boxes, anchors_t = torch.stack(all_labels), torch.stack(all_boxes), torch.stack(anchors)
        pos = labels_t >= 0  # [N, A]

        pos_reg = bbox_reg[pos]  # [P, 4 (R + 1)]
        pos_anchors, pos_gt = anchors_t[pos], gt_boxes[pos]
        pos_stride = self._strides(pos_anchors)[:, None]
        pos_pred = self.box_coder.decode(integral(pos_reg, self.reg_max) * pos_stride, pos_anchors)

        # QFL's soft target: how well the predicted box localises, as a constant
        scores = torch.zeros_like(labels_t, dtype=cls_logits.dtype)
        scores[pos] = _aligned_iou(pos_pred.detach(), pos_gt)
        qfl = quality_focal_loss(cls_logits.flatten(0, 1), labels_t.flatten(), scores.flatten(), self.qfl_beta)
        num_pos = _mean_over_ranks(pos.sum().to(cls_logits.dtype)).clamp(min=1.0)
        loss_qfl = qfl.sum() / num_pos

        # the box losses weigh each positive by its (constant) best class score, so confident
        # predictions are the ones refined; with no positive the sums below are empty, 0 and
        # still connected to the regression branch (DDP sees every parameter used)
        weight = cls_logits.detach().sigmoid().max(dim=-1).values[pos]  # [P]
        giou = generalized_box_iou_loss(pos_pred, pos_gt, reduction="none")
        # MMDetection's bbox2distance(points, gt, max_dis=reg_max, eps=0.1): a target at the
        # last bin still puts weight 0.1 on the one below
        dfl_target = (self.box_coder.encode(pos_anchors, pos_gt) / pos_stride).clamp(0, self.reg_max - 0.1)
        dfl = distribution_focal_loss(pos_reg.reshape(-1, self.reg_max + 1), dfl_target.reshape(-1))
        avg = _mean_over_ranks(weight.sum()).clamp(min=1.0)
        loss_bbox = (giou * weight).sum() / avg
        # MMDetection's avg_factor 4: the four sides count as one box
        loss_dfl = (dfl * weight.repeat_interleave(4)).sum() / 4.0 / avg
        return {"loss_qfl": loss_qfl, "loss_bbox": self.giou_weight * loss_bbox, "loss_dfl": self.dfl_weight * loss_dfl}

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        detections: list[dict[str, Tensor]] = []
        for index, image_shape in enumerate(image_shapes):
            boxes_all, scores_all, labels_all = [], [], []
            for logits, reg, level_anchors in zip(
                head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors[index], strict=True
            ):
                logits, reg = logits[index], reg[index]
                num_classes = logits.shape[-1]
                scores = logits.sigmoid().flatten()  # (anchor, class) pairs
                idx = torch.where(scores > self.score_thresh)[0]
                scores = scores[idx]
                scores, order = scores.topk(min(self.topk_candidates, idx.numel()))
                idx = idx[order]
                anchor_idx = torch.div(idx, num_classes, rounding_mode="floor")
                sel_anchors = level_anchors[anchor_idx]
                dist = integral(reg[anchor_idx].float(), self.reg_max) * self._strides(sel_anchors)[:, None]
                boxes = clip_boxes_to_image(self.box_coder.decode(dist, sel_anchors), image_shape)
                boxes_all.append(boxes)
                scores_all.append(scores)
                labels_all.append(idx % num_classes)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            # boxes clipped away to nothing cannot cover an object
            keep = remove_small_boxes(boxes, 1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections
