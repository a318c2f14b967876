"""Cascade Mask R-CNN and HTC RoI heads on torchvision's pieces (MultiScaleRoIAlign, BoxCoder,
Matcher, BalancedPositiveNegativeSampler, the Mask R-CNN mask head and loss, ``batched_nms``).

:class:`CascadeRoIHeads` replaces a torchvision ``FasterRCNN``'s ``roi_heads`` (same call:
``(features, proposals, image_sizes, targets) -> (detections, losses)``), so the backbone, FPN,
RPN, transform and post-processing stay torchvision's. It follows MMDetection 2.x:

* ``CascadeRoIHead`` of ``configs/_base_/models/cascade_mask_rcnn_r50_fpn.py``: three box
  stages (``Shared2FCBBoxHead``: two 1024-d fc) with IoU thresholds 0.5 / 0.6 / 0.7 (positive
  and negative at the same threshold), 512 RoIs per image at 25 % positives with the ground
  truth added as proposals, class-agnostic deltas with stds (0.1, 0.1, 0.2, 0.2) /
  (0.05, 0.05, 0.1, 0.1) / (0.033, 0.033, 0.067, 0.067) (torchvision's BoxCoder weights are
  their inverses), cross-entropy + smooth-L1 (beta 1) per stage, stage losses weighted
  1 / 0.5 / 0.25; the sampled RoIs of stage t, minus the ground truth added, refined by its
  deltas (no gradient) are the proposals of stage t + 1. A mask head (``FCNMaskHead``: four
  3x3 convs, a 2x deconv, 28x28 class masks) per stage, trained on that stage's positives
  with the stage's weight (MMDetection repeats a single ``mask_head`` config per stage).
  Test: the proposals are refined by stages 1 and 2, the class logits of the three stages
  are averaged, softmaxed, and the last stage's deltas give the boxes; every stage's mask
  head runs on the final boxes and the sigmoid masks are averaged.
* ``HybridTaskCascadeRoIHead`` of ``htc_without_semantic_r50_fpn_1x_coco.py`` (``htc=True``):
  interleaved execution (the mask branch of stage t trains on RoIs re-assigned and re-sampled
  after stage t's box refinement) and mask information flow (``HTCMaskHead``: stage t's mask
  head adds, through a 1x1 conv + ReLU, the conv features of stage t - 1's mask head,
  itself fed by t - 2's, on the same RoIs).
* ``htc_r50_fpn_1x_coco.py``'s semantic branch (``semantic=True``): ``FusedSemanticHead`` on the
  five FPN levels (each resized bilinearly to the stride-8 level, 1x1 conv + ReLU, summed; four
  3x3 convs; 1x1 ``conv_logits`` to the 183 COCO-stuff classes and 1x1 ``conv_embedding``),
  trained by cross-entropy against the stuff map at 1/8 (nearest; 255 ignored, the mean over
  every pixel as MMDetection 2.x's ``avg_non_ignore=False``) weighted 0.2; the embedding,
  RoI-pooled at 14x14 and average-pooled to 7x7 for the box heads, is added to every stage's box
  and mask RoI features (``bbox_semantic_feat`` / ``mask_semantic_feat``), in training and test.
* The Swin-paper settings, as options: ``Shared4Conv1FCBBoxHead`` (four 3x3 convs with a norm,
  one fc), class-specific deltas (``reg_class_agnostic=False``: ``BBoxHead.loss`` takes the
  ground-truth class's deltas, ``CascadeRoIHead.refine_bboxes`` / ``regress_by_class`` the
  ground-truth class's between stages in training (background RoIs: the class the stage
  predicts) and the predicted class's at test), ``GIoULoss`` on the deltas decoded onto the RoIs
  (``reg_decoded_bbox=True``), and soft-NMS at test, linear or Gaussian (mmcv's ``soft_nms``).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import (
    MultiScaleRoIAlign,
    batched_nms,
    box_iou,
    clip_boxes_to_image,
    generalized_box_iou_loss,
    remove_small_boxes,
)
from torchvision.ops.misc import Conv2dNormActivation

from ummae.errors import UsageError

# (IoU threshold, box coder stds) of the three stages: cascade_mask_rcnn_r50_fpn / htc_r50_fpn
STAGES = ((0.5, (0.1, 0.1, 0.2, 0.2)), (0.6, (0.05, 0.05, 0.1, 0.1)), (0.7, (0.033, 0.033, 0.067, 0.067)))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
NORMS = {"none": None, "bn": nn.BatchNorm2d, "gn": lambda c: nn.GroupNorm(32, c)}
# htc_r50_fpn_1x_coco's semantic_head: COCO-stuff classes, ignored label, loss weight, fused level
STUFF_CLASSES = 183
STUFF_IGNORE = 255
SEMANTIC_LOSS_WEIGHT = 0.2
FUSION_LEVEL = 1  # of P2-P6: stride 8
# mmcv's soft_nms defaults (sigma of the Gaussian decay, the score under which a box is dropped)
SOFT_NMS_SIGMA, SOFT_NMS_MIN_SCORE = 0.5, 1e-3
GIOU_EPS = 1e-6  # MMDetection's GIoULoss(eps=1e-6)


def _relu_conv(in_channels: int, out_channels: int, kernel: int) -> Conv2dNormActivation:
    """mmcv's ``ConvModule`` without norm: conv (with bias, Kaiming-normal fan-out as its
    ``init_weights``) + ReLU."""
    block = Conv2dNormActivation(in_channels, out_channels, kernel, norm_layer=None, inplace=False)
    nn.init.kaiming_normal_(block[0].weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(block[0].bias)
    return block


class FusedSemanticHead(nn.Module):
    """MMDetection's ``FusedSemanticHead`` (``num_ins=5, fusion_level=1, num_convs=4``): every
    level resized (bilinear, ``align_corners=True``) to the fusion level's size, through its own
    1x1 conv + ReLU, summed; four 3x3 conv + ReLU; then the stuff logits (1x1 conv) and the
    semantic feature (1x1 conv + ReLU). Returns (logits, feature) at the fusion level's stride."""

    def __init__(
        self, channels: int, num_classes: int = STUFF_CLASSES, num_ins: int = 5, fusion_level: int = FUSION_LEVEL
    ):
        super().__init__()
        self.fusion_level = fusion_level
        self.laterals = nn.ModuleList(_relu_conv(channels, channels, 1) for _ in range(num_ins))
        self.convs = nn.Sequential(*(_relu_conv(channels, channels, 3) for _ in range(4)))
        self.embedding = _relu_conv(channels, channels, 1)
        self.logits = nn.Conv2d(channels, num_classes, 1)
        nn.init.kaiming_normal_(self.logits.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.logits.bias)

    def fuse(self, feats: list[Tensor]) -> Tensor:
        x = self.laterals[self.fusion_level](feats[self.fusion_level])
        size = x.shape[-2:]
        for i, feat in enumerate(feats):
            if i != self.fusion_level:
                x = x + self.laterals[i](F.interpolate(feat, size=size, mode="bilinear", align_corners=True))
        return x

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = self.convs(self.fuse(feats))
        return self.logits(x), self.embedding(x)


def semantic_loss(logits: Tensor, stuff: Tensor) -> Tensor:
    """``SEMANTIC_LOSS_WEIGHT`` x cross-entropy of the stuff ``logits`` ``[B, C, h, w]`` against
    the stuff maps ``[B, H, W]`` downscaled to ``h x w`` (nearest: ``SegRescale(1/8)``), pixels
    labelled 255 contributing 0 but counted in the mean (MMDetection 2.x's ``CrossEntropyLoss``,
    ``avg_non_ignore=False``)."""
    labels = F.interpolate(stuff[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
    loss = F.cross_entropy(logits.float(), labels, ignore_index=STUFF_IGNORE, reduction="sum")
    return SEMANTIC_LOSS_WEIGHT * loss / labels.numel()


class BoxHead(nn.Module):
    """MMDetection's ``ConvFCBBoxHead`` as ``Shared2FCBBoxHead`` (``convs=0, fcs=2``) or
    ``Shared4Conv1FCBBoxHead`` (``convs=4, fcs=1``, each conv with ``norm``): RoI features ->
    (class logits incl. background at 0, deltas: ``[N, 4]`` class-agnostic, or with
    ``class_deltas`` ``[N, 4 (num_classes - 1)]``, one set per class but the background's, as
    MMDetection's ``4 * num_classes``)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        resolution: int = 7,
        convs: int = 0,
        fcs: int = 2,
        norm=None,
        class_deltas: bool = False,
    ):
        super().__init__()
        self.convs = nn.Sequential(
            *(Conv2dNormActivation(in_channels, in_channels, 3, norm_layer=norm) for _ in range(convs))
        )
        dims = [in_channels * resolution**2] + [1024] * fcs
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.cls = nn.Linear(dims[-1], num_classes)
        self.reg = nn.Linear(dims[-1], 4 * (num_classes - 1) if class_deltas else 4)
        # MMDetection's init: xavier-uniform fcs, N(0, 0.01) classifier, N(0, 0.001) regressor
        for fc in self.fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.reg.weight, std=0.001)
        nn.init.zeros_(self.cls.bias)
        nn.init.zeros_(self.reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.convs(x).flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.cls(x), self.reg(x)


class MaskHead(nn.Module):
    """``FCNMaskHead`` (torchvision's ``MaskRCNNHeads`` + ``MaskRCNNPredictor``); with
    ``flow`` HTC's ``HTCMaskHead(with_conv_res=True)``: the previous stage's conv features go
    through a 1x1 conv + ReLU and are added to the RoI features. Returns (mask logits, conv
    features)."""

    def __init__(self, in_channels: int, num_classes: int, flow: bool = False, norm=None):
        super().__init__()
        self.res = Conv2dNormActivation(in_channels, in_channels, 1, norm_layer=None) if flow else None
        self.convs = MaskRCNNHeads(in_channels, (in_channels,) * 4, 1, norm_layer=norm)
        self.predictor = MaskRCNNPredictor(in_channels, in_channels, num_classes)

    def forward(self, x: Tensor, previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.res is not None and previous is not None:
            x = x + self.res(previous)
        feat = self.convs(x)
        return self.predictor(feat), feat


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    method: str = "gaussian",
    iou_threshold: float = 0.3,
    sigma: float = SOFT_NMS_SIGMA,
    min_score: float = SOFT_NMS_MIN_SCORE,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS as mmcv's ``soft_nms``: repeatedly take the highest remaining score, decay every
    other remaining score by its IoU with it, ``exp(-iou^2 / sigma)`` (``method='gaussian'``) or
    ``1 - iou`` where ``iou > iou_threshold`` (``'linear'``), and drop those below
    ``min_score``. Returns (indices in selection order, their decayed scores)."""
    scores = scores.clone()
    remaining = torch.arange(len(scores), device=scores.device)
    keep, kept_scores = [], []
    while remaining.numel():
        best = int(scores[remaining].argmax())
        i = remaining[best]
        keep.append(i)
        kept_scores.append(scores[i])
        remaining = torch.cat([remaining[:best], remaining[best + 1 :]])
        if not remaining.numel():
            break
        iou = box_iou(boxes[i][None], boxes[remaining])[0]
        scores[remaining] = scores[remaining] * _soft_nms_decay(iou, method, iou_threshold, sigma)
        remaining = remaining[scores[remaining] >= min_score]
    if not keep:
        return torch.zeros(0, dtype=torch.long, device=scores.device), scores[:0]
    return torch.stack(keep), torch.stack(kept_scores)


def _soft_nms_decay(iou: Tensor, method: str, iou_threshold: float, sigma: float) -> Tensor:
    """mmcv's soft-NMS weight of the scores overlapping the kept box by ``iou``."""
    if method == "linear":
        return torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
    return torch.exp(-(iou * iou) / sigma)


def batched_soft_nms(boxes: Tensor, scores: Tensor, labels: Tensor, **kw) -> tuple[Tensor, Tensor]:
    """:func:`soft_nms` (``kw``: its method and parameters) per class (mmcv's ``batched_nms``:
    boxes of different classes offset so that they never overlap)."""
    if not len(boxes):
        return torch.zeros(0, dtype=torch.long, device=boxes.device), scores[:0]
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return soft_nms(boxes + offsets[:, None], scores, **kw)


def class_deltas(deltas: Tensor, labels: Tensor) -> Tensor:
    """The ``[N, 4]`` deltas of each RoI's class ``labels`` (1..K) from class-specific deltas
    ``[N, 4K]`` (MMDetection's ``regress_by_class`` gather); class-agnostic ``[N, 4]`` as they are."""
    if deltas.shape[1] == 4:
        return deltas
    return deltas.view(len(deltas), -1, 4)[torch.arange(len(deltas), device=deltas.device), labels - 1]


# --test-nms: the soft-NMS kinds, as mmcv's soft_nms method ("nms" is torchvision's batched_nms)
SOFT_NMS_METHODS = {"soft_linear": "linear", "soft_gaussian": "gaussian"}


def refine_labels(labels: Tensor, logits: Tensor) -> Tensor:
    """The class whose deltas refine each sampled RoI between stages (``CascadeRoIHead``): its
    ground-truth label, or for a background RoI (0) the foreground class the stage scores highest."""
    return torch.where(labels > 0, labels, logits[:, 1:].argmax(1) + 1)


def postprocess_candidates(
    boxes: Tensor, scores: Tensor, score_thresh: float, nms_thresh: float, keep_top: int, test_nms: str = "nms"
) -> dict[str, Tensor]:
    """torchvision's ``postprocess_detections`` for one image's candidates (boxes ``[N, C, 4]``,
    scores ``[N, C]``, background at 0): every (box, class > 0) pair scoring above
    ``score_thresh``, small boxes dropped, NMS per class at ``nms_thresh`` (or, with ``test_nms``,
    soft-NMS, linear at ``nms_thresh`` or Gaussian, whose decayed scores are reported), the best
    ``keep_top``. The cascade's test and the multi-scale test of torchvision's RoI heads."""
    num_classes = scores.shape[1]
    labels = torch.arange(num_classes, device=scores.device).expand_as(scores)[:, 1:].reshape(-1)
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = remove_small_boxes(boxes, 1e-2)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if test_nms in SOFT_NMS_METHODS:
        keep, scores = batched_soft_nms(
            boxes, scores, labels, method=SOFT_NMS_METHODS[test_nms], iou_threshold=nms_thresh
        )
        order = scores.argsort(descending=True)
        keep, scores = keep[order], scores[order]
    else:
        keep = batched_nms(boxes, scores, labels, nms_thresh)
        scores = scores[keep]
    keep, scores = keep[:keep_top], scores[:keep_top]
    return {"boxes": boxes[keep], "scores": scores, "labels": labels[keep]}


class CascadeRoIHeads(nn.Module):
    """The cascade's RoI heads (module docstring). ``num_classes`` counts the background (0)."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        htc: bool = False,
        box_head: str = "2fc",
        norm: str = "none",
        test_nms: str = "nms",
        semantic: bool = False,
        box_loss: str = "smooth_l1",
        box_loss_weight: float = 1.0,
        box_reg: str = "agnostic",
        rois_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ):
        super().__init__()
        if norm == "gn" and channels % 32:
            raise UsageError(f"--box-norm gn: GroupNorm(32) needs channels divisible by 32, not {channels}")
        names = ["0", "1", "2", "3"]
        self.box_roi_pool = MultiScaleRoIAlign(names, 7, 2)
        self.mask_roi_pool = MultiScaleRoIAlign(names, 14, 2)
        # htc_r50_fpn's semantic_roi_extractor: 14x14 on the semantic feature (stride 8)
        self.semantic_head = FusedSemanticHead(channels) if semantic else None
        self.semantic_roi_pool = MultiScaleRoIAlign(["semantic"], 14, 2) if semantic else None
        norm_layer = NORMS[norm]
        convs, fcs = (4, 1) if box_head == "4conv1fc" else (0, 2)
        self.box_heads = nn.ModuleList(
            BoxHead(channels, num_classes, 7, convs, fcs, norm_layer, box_reg == "class") for _ in range(len(STAGES))
        )
        self.mask_heads = nn.ModuleList(MaskHead(channels, num_classes, flow=htc and t > 0) for t in range(len(STAGES)))
        self.coders = [det_utils.BoxCoder(tuple(1.0 / s for s in stds), math.log(1000.0 / 16)) for _, stds in STAGES]
        self.matchers = [det_utils.Matcher(iou, iou, allow_low_quality_matches=False) for iou, _ in STAGES]
        self.sampler = det_utils.BalancedPositiveNegativeSampler(rois_per_image, positive_fraction)
        self.stage_loss_weights = STAGE_LOSS_WEIGHTS
        self.htc = htc
        self.test_nms = test_nms
        self.box_loss_kind = box_loss
        self.box_loss_weight = box_loss_weight
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    # -- training ----------------------------------------------------------------------
    def sample(self, stage: int, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """Stage ``stage``'s RoIs per image: the proposals with the ground truth appended,
        matched at the stage's IoU threshold, 512 sampled at <= 25 % positives. Returns per
        image (rois, labels (0 = background), matched gt index (-1: none), is-gt flags)."""
        out = []
        for props, target in zip(proposals, targets, strict=True):
            gt = target["boxes"].to(props)
            rois = torch.cat([props, gt])
            is_gt = torch.cat(
                [props.new_zeros(len(props), dtype=torch.bool), props.new_ones(len(gt), dtype=torch.bool)]
            )
            if len(gt):
                matched = self.matchers[stage](box_iou(gt, rois))
                labels = target["labels"][matched.clamp(min=0)].to(torch.int64)
                labels[matched < 0] = 0
            else:
                matched = torch.full((len(rois),), -1, dtype=torch.int64, device=rois.device)
                labels = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
            pos, neg = self.sampler([labels])
            keep = torch.where(pos[0] | neg[0])[0]
            matched = matched[keep]
            out.append((rois[keep], labels[keep], torch.where(labels[keep] > 0, matched, -1), is_gt[keep]))
        return out

    def roi_features(self, pool: MultiScaleRoIAlign, features, rois, image_shapes, semantic: Tensor | None):
        """``pool``'s RoI features, plus (HTC's semantic fusion) the RoI-pooled semantic
        feature, average-pooled to their size where it differs (7x7 box features)."""
        x = pool(features, rois, image_shapes)
        if semantic is None:
            return x
        extra = self.semantic_roi_pool({"semantic": semantic}, rois, image_shapes)
        if extra.shape[-2:] != x.shape[-2:]:
            extra = F.adaptive_avg_pool2d(extra, x.shape[-2:])
        return x + extra

    def box_loss(self, stage: int, logits: Tensor, deltas: Tensor, samples, targets) -> tuple[Tensor, Tensor]:
        """Cross-entropy over the sampled RoIs; on the positives (their ground-truth class's
        deltas where they are class-specific) smooth-L1 (beta 1) against the ground truth encoded
        with the stage's stds, or GIoU loss between the deltas decoded onto the RoIs and the
        ground truth; summed, times ``box_loss_weight``, divided by the number of sampled RoIs
        (MMDetection's ``avg_factor``)."""
        labels = torch.cat([s[1] for s in samples])
        rois = torch.cat([s[0] for s in samples])
        gt = torch.cat([t["boxes"].to(s[0])[s[2].clamp(min=0)] for s, t in zip(samples, targets, strict=True)])
        loss_cls = F.cross_entropy(logits, labels)
        pos = labels > 0
        pos_deltas = class_deltas(deltas[pos], labels[pos])
        if self.box_loss_kind == "giou":  # reg_decoded_bbox: the decoded boxes, not clipped
            decoded = self.coders[stage].decode_single(pos_deltas.float(), rois[pos].float())
            loss = generalized_box_iou_loss(decoded, gt[pos].float(), reduction="sum", eps=GIOU_EPS)
        else:
            regression = self.coders[stage].encode_single(gt[pos], rois[pos])
            loss = F.smooth_l1_loss(pos_deltas, regression, beta=1.0, reduction="sum")
        return loss_cls, self.box_loss_weight * loss / max(labels.numel(), 1)

    def mask_forward(self, stage: int, features, rois: list[Tensor], image_shapes, semantic=None) -> Tensor:
        """Stage ``stage``'s mask logits on ``rois``; under HTC through the information flow of
        the mask heads before it (on the same RoI features)."""
        x = self.roi_features(self.mask_roi_pool, features, rois, image_shapes, semantic)
        previous = None
        if self.htc:
            for head in self.mask_heads[:stage]:
                _, previous = head(x, previous)
        return self.mask_heads[stage](x, previous)[0]

    def mask_loss(self, stage: int, features, samples, targets, image_shapes, semantic=None) -> Tensor:
        pos = [torch.where(s[1] > 0)[0] for s in samples]
        rois = [s[0][p] for s, p in zip(samples, pos, strict=True)]
        if sum(len(r) for r in rois) == 0:  # no positive: a zero that still reaches every mask parameter
            return sum(p.sum() * 0 for p in self.mask_heads[stage].parameters())
        logits = self.mask_forward(stage, features, rois, image_shapes, semantic)
        return maskrcnn_loss(
            logits,
            rois,
            [t["masks"] for t in targets],
            [t["labels"] for t in targets],
            [s[2][p] for s, p in zip(samples, pos, strict=True)],
        )

    def refine(self, stage: int, deltas: Tensor, rois: list[Tensor], image_shapes, labels=None) -> list[Tensor]:
        """Stage ``stage``'s deltas applied to ``rois`` (class-specific ones: those of each
        RoI's class ``labels``, 1..K), clipped to the image."""
        deltas = class_deltas(deltas, labels)
        # in float32 whatever the autocast: torchvision's decode casts the boxes to the deltas'
        # dtype, and bf16 coordinates of a 1024 px image are 4 px apart
        boxes = self.coders[stage].decode_single(deltas.float(), torch.cat(rois).float())
        return [
            clip_boxes_to_image(b, s) for b, s in zip(boxes.split([len(r) for r in rois]), image_shapes, strict=True)
        ]

    def class_boxes(self, stage: int, deltas: Tensor, rois: Tensor, image_shape) -> Tensor:
        """``[N, C, 4]``: each RoI refined by each class's deltas ``[N, 4 (C - 1)]``, clipped to
        the image; column 0 (the background's) is the RoI itself."""
        n, k = len(rois), deltas.shape[1] // 4
        boxes = self.coders[stage].decode_single(deltas.reshape(n * k, 4).float(), rois.float().repeat_interleave(k, 0))
        return torch.cat([rois.float()[:, None], clip_boxes_to_image(boxes.view(n, k, 4), image_shape)], 1)

    def forward_train(self, features, proposals, image_shapes, targets, semantic=None) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        with_masks = all("masks" in t for t in targets)
        for stage, weight in enumerate(self.stage_loss_weights):
            samples = self.sample(stage, proposals, targets)
            rois = [s[0] for s in samples]
            x = self.roi_features(self.box_roi_pool, features, rois, image_shapes, semantic)
            logits, deltas = self.box_heads[stage](x)
            loss_cls, loss_box = self.box_loss(stage, logits, deltas, samples, targets)
            losses[f"s{stage}_loss_classifier"] = loss_cls * weight
            losses[f"s{stage}_loss_box_reg"] = loss_box * weight
            refined = None
            if stage < len(STAGES) - 1 or self.htc:
                with torch.no_grad():  # the ground truth appended to the proposals leaves again
                    labels = refine_labels(torch.cat([s[1] for s in samples]), logits)
                    refined = self.refine(stage, deltas.detach(), rois, image_shapes, labels)
                    refined = [r[~s[3]] for r, s in zip(refined, samples, strict=True)]
            if with_masks:
                mask_samples = samples
                if self.htc:  # interleaved: the mask branch sees the RoIs this stage refined
                    mask_samples = self.sample(stage, refined, targets)
                losses[f"s{stage}_loss_mask"] = (
                    self.mask_loss(stage, features, mask_samples, targets, image_shapes, semantic) * weight
                )
            proposals = refined
        return losses

    # -- inference ---------------------------------------------------------------------
    # Three seams, so that test-time augmentation (which merges candidates and masks across
    # sizes and flips before NMS) runs the same code as a plain test: box_candidates ->
    # postprocess -> mask_probs.
    @torch.no_grad()
    def box_candidates(self, features, proposals, image_shapes, semantic=None) -> list[tuple[Tensor, Tensor]]:
        """Per image, before any threshold or NMS: (boxes ``[N, C, 4]``, one box per class
        (class-agnostic deltas: the same box for every class; the background's column is the
        RoI), scores ``[N, C]``: the softmax of the three stages' mean logits, background at 0).
        The proposals are refined by stages 1 and 2 (class-specific deltas: those of the class
        the stage scores highest, ``regress_by_class``); the last stage's deltas give the boxes."""
        rois = proposals
        stage_logits = []
        for stage in range(len(STAGES)):
            x = self.roi_features(self.box_roi_pool, features, rois, image_shapes, semantic)
            logits, deltas = self.box_heads[stage](x)
            stage_logits.append(logits)
            if stage < len(STAGES) - 1:
                rois = self.refine(stage, deltas, rois, image_shapes, logits[:, 1:].argmax(1) + 1)
        scores = torch.stack(stage_logits).float().mean(0).softmax(-1)  # MMDetection averages the logits
        num_classes = scores.shape[1]
        counts = [len(r) for r in rois]
        if deltas.shape[1] == 4:
            boxes = self.refine(len(STAGES) - 1, deltas, rois, image_shapes)
            per_class = [b[:, None].expand(-1, num_classes, 4) for b in boxes]
        else:  # a box per class: each class's deltas decoded onto the RoIs (MMDetection's get_bboxes)
            last = len(STAGES) - 1
            per_class = [
                self.class_boxes(last, d, r, size)
                for r, d, size in zip(rois, deltas.split(counts), image_shapes, strict=True)
            ]
        return list(zip(per_class, scores.split(counts), strict=True))

    @torch.no_grad()
    def mask_probs(self, features, boxes: list[Tensor], labels: list[Tensor], image_shapes, semantic=None):
        """Per image, the ``[n, 1, 28, 28]`` mask probabilities of its detections (``boxes``,
        ``labels``): every stage's mask head on the boxes, sigmoid, averaged (MMDetection's
        ``merge_aug_masks`` over the stages), the channel of each box's class."""
        if not sum(len(b) for b in boxes):
            return [b.new_zeros((0, 1, 28, 28)) for b in boxes]
        x = self.roi_features(self.mask_roi_pool, features, boxes, image_shapes, semantic)
        probs, previous = 0, None
        for head in self.mask_heads:
            logits, feat = head(x, previous if self.htc else None)
            previous = feat
            probs = probs + logits.float().sigmoid() / len(self.mask_heads)
        flat_labels = torch.cat(labels)
        probs = probs[torch.arange(len(flat_labels), device=flat_labels.device), flat_labels][:, None]
        return list(probs.split([len(b) for b in boxes]))

    @torch.no_grad()
    def forward_test(self, features, proposals, image_shapes, semantic=None) -> list[dict[str, Tensor]]:
        candidates = self.box_candidates(features, proposals, image_shapes, semantic)
        results = [self.postprocess(b, s) for b, s in candidates]
        masks = self.mask_probs(
            features, [r["boxes"] for r in results], [r["labels"] for r in results], image_shapes, semantic
        )
        for r, m in zip(results, masks, strict=True):
            r["masks"] = m
        return results

    def postprocess(self, boxes: Tensor, scores: Tensor) -> dict[str, Tensor]:
        """:func:`postprocess_candidates` at this head's threshold, NMS kind and IoU and
        ``detections_per_img``."""
        return postprocess_candidates(
            boxes, scores, self.score_thresh, self.nms_thresh, self.detections_per_img, self.test_nms
        )

    def semantic_feature(self, features: OrderedDict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """HTC's semantic branch on all five levels (P2-P6, as ``num_ins=5``): (stuff logits,
        semantic feature), or (None, None) without the branch."""
        if self.semantic_head is None:
            return None, None
        return self.semantic_head(list(features.values()))

    def roi_levels(self, features: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        """The levels the RoI extractors pool from (P2-P5)."""
        return OrderedDict((k, v) for k, v in features.items() if k in self.box_roi_pool.featmap_names)

    def forward(self, features: OrderedDict[str, Tensor], proposals, image_shapes, targets=None):
        losses = {}
        stuff_logits, semantic = self.semantic_feature(features)
        if self.training and stuff_logits is not None:
            if not all("semantic" in t for t in targets):
                raise ValueError("HTC with its semantic branch trains on targets with a 'semantic' stuff map")
            losses["loss_semantic_seg"] = semantic_loss(stuff_logits, torch.stack([t["semantic"] for t in targets]))
        features = self.roi_levels(features)
        if self.training:
            return [], {**losses, **self.forward_train(features, proposals, image_shapes, targets, semantic)}
        return self.forward_test(features, proposals, image_shapes, semantic), {}


class CascadeMaskRCNN(FasterRCNN):
    """torchvision's two-stage detector (transform, ``backbone`` with its FPN, RPN) with
    :class:`CascadeRoIHeads` as its RoI heads: Cascade Mask R-CNN, or HTC with ``htc``."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        htc: bool = False,
        box_head: str = "2fc",
        box_norm: str = "none",
        test_nms: str = "nms",
        semantic: bool = False,
        box_loss: str = "smooth_l1",
        box_loss_weight: float = 1.0,
        box_reg: str = "agnostic",
        test_score_thr: float = 0.05,
        test_nms_iou: float = 0.5,
    ):
        super().__init__(backbone, num_classes)
        if semantic and not htc:
            raise UsageError("the semantic branch (COCO-stuff maps) is HTC's: use --detector htc")
        self.roi_heads = CascadeRoIHeads(
            backbone.out_channels, num_classes, htc, box_head, box_norm, test_nms, semantic, box_loss,
            box_loss_weight, box_reg, score_thresh=test_score_thr, nms_thresh=test_nms_iou,
        )  # fmt: skip
