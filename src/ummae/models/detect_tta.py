"""Multi-scale + flip test of every detector of :mod:`ummae.detector_specs`, as MMDetection 2.x's
``aug_test`` does it (``MultiScaleFlipAug``; ``mmdet/core/post_processing/merge_augs.py``, the
dense heads' ``aug_test_bboxes``, the RoI heads' ``aug_test``).

An augmentation is a test scale ``(long, short)`` (``img_scale`` with ``keep_ratio``: the image
resized as large as possible with its long side <= ``long`` and its short side <= ``short``,
torchvision's resize rule with ``max_size = long``, ``min_size = short``), optionally flipped
horizontally. Each image is run on its own (the figures cannot depend on the batch), one
forward per scale holding the image and, with ``flip``, its mirror image (the same size: no
padding between them). The image is normalised, resized (bilinear, as the model's transform)
and padded to :func:`size_divisor`, not to the ``img_size`` canvas of a plain test; the mirror
image is flipped before the resize, which gives the pixels of a flip after it (bilinear
resizing commutes with the flip).

* One augmentation (one scale, no flip): the plain test at that scale, as MMDetection runs
  ``simple_test`` then.
* Two-stage detectors (Mask / Faster R-CNN, Cascade, HTC): the RPN's proposals of every
  augmentation mapped back to the image and merged (``merge_aug_proposals``: concatenated,
  NMS at the RPN's IoU, the RPN's top n); per augmentation, the RoI heads' per-class boxes
  and scores on those proposals (mapped into the augmentation's frame), mapped back and
  averaged (``merge_aug_bboxes``); then the RoI heads' own threshold and NMS. Masks: the final
  boxes mapped into each augmentation's frame, the mask probabilities of each (flipped back)
  averaged (``merge_aug_masks``) and pasted into the image.
* Dense detectors (RetinaNet, FCOS, GFL): per augmentation the candidates before NMS (the
  detector's own score threshold and top k per level), mapped back and concatenated, then the
  detector's NMS and its ``detections_per_img`` (``aug_test_bboxes``).

:func:`detect` is the one entry point (``detect eval``, the evaluation of ``detect train``,
``detect predict``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import maskrcnn_inference, paste_masks_in_image
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import batched_nms, clip_boxes_to_image, nms

from ummae.models.cascade import CascadeRoIHeads, postprocess_candidates
from ummae.models.dense import stage_maps_of

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class MultiScaleFlip:
    """The test-time augmentation: ``scales`` ``(long, short)`` (none: the ``img_size``
    canvas), each also flipped with ``flip``. No scale and no flip: the plain test."""

    scales: tuple[tuple[int, int], ...] = ()
    flip: bool = False

    @property
    def plain(self) -> bool:
        return not self.scales and not self.flip

    def scales_of(self, model: nn.Module) -> tuple[tuple[int, int], ...]:
        canvas = model.transform.max_size
        return self.scales or ((canvas, canvas),)

    def flips(self) -> tuple[bool, ...]:
        """Per scale, the augmentations' flips: the image, then its mirror image."""
        return (False, True) if self.flip else (False,)


def size_divisor(model: nn.Module) -> int:
    """What a test image is padded to a multiple of: the backbone's own need
    (``PyramidBackbone.size_divisor``: 32, Swin's too, since its blocks pad to the window in
    the dense backbone)
    and the pyramid's largest stride (torchvision's anchor generator places a level's anchors
    ``padded size // map size`` apart, the level's stride only then)."""
    return math.lcm(stage_maps_of(model).encoder.size_divisor, max(model.spec.pyramid.strides))


@contextmanager
def _set(obj: object, **values) -> Iterator[None]:
    """``obj``'s attributes set to ``values`` for the block, restored after."""
    saved = {k: getattr(obj, k) for k in values}
    try:
        for k, v in values.items():
            setattr(obj, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


def at_scale(model: nn.Module, scale: tuple[int, int], divisor: int):
    """The model's transform resizing to ``scale`` ``(long, short)`` and padding to ``divisor``."""
    long, short = scale
    return _set(model.transform, min_size=(short,), max_size=long, size_divisible=divisor)


# -- the box maps (MMDetection's bbox_flip, bbox_mapping, bbox_mapping_back) -------------------


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """``[..., 4]`` xyxy boxes mirrored in an image ``width`` wide."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], -1)


def _ratios(boxes: Tensor, to: Size, frm: Size) -> Tensor:
    """Per-coordinate (w, h, w, h) ratios of ``to`` over ``frm`` (torchvision's ``resize_boxes``)."""
    (th, tw), (fh, fw) = to, frm
    return boxes.new_tensor([tw / fw, th / fh, tw / fw, th / fh])


def map_to_aug(boxes: Tensor, image: Size, aug: Size, flip: bool) -> Tensor:
    """Boxes of the image (``image`` h, w) in an augmentation's frame (``aug``): scaled, then
    mirrored (``bbox_mapping``)."""
    boxes = boxes * _ratios(boxes, aug, image)
    return flip_boxes(boxes, aug[1]) if flip else boxes


def map_back(boxes: Tensor, aug: Size, image: Size, flip: bool) -> Tensor:
    """Boxes of an augmentation's frame in the image's: mirrored back, then scaled
    (``bbox_mapping_back``)."""
    if flip:
        boxes = flip_boxes(boxes, aug[1])
    return boxes * _ratios(boxes, image, aug)


# -- the merges (merge_augs.py, aug_test_bboxes) ----------------------------------------------


def merge_proposals(boxes: Sequence[Tensor], scores: Sequence[Tensor], iou: float, top_n: int) -> Tensor:
    """``merge_aug_proposals``: the proposals of every augmentation (mapped back) concatenated,
    NMS at ``iou`` over all of them (class-agnostic), the ``top_n`` best."""
    boxes, scores = torch.cat(list(boxes)), torch.cat(list(scores))
    return boxes[nms(boxes, scores, iou)[:top_n]]


def merge_boxes(boxes: Sequence[Tensor], scores: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``merge_aug_bboxes``: the mean of the augmentations' per-class boxes ``[N, C, 4]``
    (mapped back) and of their class scores ``[N, C]``, RoI by RoI."""
    return torch.stack(list(boxes)).mean(0), torch.stack(list(scores)).mean(0)


def merge_masks(probs: Sequence[Tensor], flips: Sequence[bool]) -> Tensor:
    """``merge_aug_masks``: the mean of the augmentations' mask probabilities ``[n, 1, M, M]``,
    those of a mirrored augmentation flipped back first."""
    return torch.stack([p.flip(-1) if f else p for p, f in zip(probs, flips, strict=True)]).mean(0)


def merge_dense(detections: Sequence[dict[str, Tensor]], nms_thresh: float, keep: int) -> dict[str, Tensor]:
    """``aug_test_bboxes`` of a dense head: the candidates of every augmentation (mapped back)
    concatenated, NMS per class at ``nms_thresh``, the ``keep`` best."""
    boxes, scores, labels = (torch.cat([d[k] for d in detections]) for k in ("boxes", "scores", "labels"))
    kept = batched_nms(boxes, scores, labels, nms_thresh)[:keep]
    return {"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]}


# -- the RoI heads' test pieces ------------------------------------------------------------


class TorchvisionRoIHeads:
    """torchvision's ``RoIHeads`` (Mask R-CNN, Faster R-CNN) with the test seams of
    :class:`~ummae.models.cascade.CascadeRoIHeads`, from its own pieces: ``box_roi_pool``,
    ``box_head``, ``box_predictor``, ``box_coder``, the tail of ``postprocess_detections``,
    the mask branch and ``maskrcnn_inference``."""

    def __init__(self, heads: nn.Module):
        self.heads = heads

    def semantic_feature(self, features) -> tuple[None, None]:
        return None, None

    def roi_levels(self, features):
        return features  # MultiScaleRoIAlign picks its own levels

    def box_candidates(self, features, proposals, image_shapes, semantic=None) -> list[tuple[Tensor, Tensor]]:
        """Per image (boxes ``[N, C, 4]``, scores ``[N, C]``): ``postprocess_detections``
        up to its threshold."""
        h = self.heads
        logits, deltas = h.box_predictor(h.box_head(h.box_roi_pool(features, proposals, image_shapes)))
        # [N, C, 4] (decode leaves [0, 4 C] when there is no proposal)
        boxes = h.box_coder.decode(deltas.float(), proposals).reshape(len(logits), logits.shape[-1], 4)
        scores = logits.float().softmax(-1)
        counts = [len(p) for p in proposals]
        return [
            (clip_boxes_to_image(b, s), p)
            for b, p, s in zip(boxes.split(counts), scores.split(counts), image_shapes, strict=True)
        ]

    def postprocess(self, boxes: Tensor, scores: Tensor) -> dict[str, Tensor]:
        """``postprocess_detections`` from its threshold on (NMS per class)."""
        h = self.heads
        return postprocess_candidates(boxes, scores, h.score_thresh, h.nms_thresh, h.detections_per_img)

    def mask_probs(self, features, boxes, labels, image_shapes, semantic=None) -> list[Tensor]:
        h = self.heads
        logits = h.mask_predictor(h.mask_head(h.mask_roi_pool(features, boxes, image_shapes)))
        return list(maskrcnn_inference(logits.float(), labels))


def roi_heads_of(model: nn.Module):
    """The RoI heads with the test seams: ours as they are, torchvision's through
    :class:`TorchvisionRoIHeads`."""
    heads = model.roi_heads
    return heads if isinstance(heads, CascadeRoIHeads) else TorchvisionRoIHeads(heads)


def rpn_proposals(rpn: nn.Module, images, features) -> tuple[list[Tensor], list[Tensor]]:
    """Per image the RPN's proposals and their objectness (torchvision's RPN ``forward``
    at test, which returns the proposals without their scores: the merge needs them)."""
    levels = list(features.values())
    objectness, deltas = rpn.head(levels)
    anchors = rpn.anchor_generator(images, levels)
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    return rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)


# -- the tests ---------------------------------------------------------------------------


@dataclass
class _Scale:
    """One scale's forward: the image (and its mirror image) resized and padded, the
    features, each one's flip and size."""

    images: ImageList
    features: dict[str, Tensor]
    flips: tuple[bool, ...]

    @property
    def sizes(self) -> list[Size]:
        return [tuple(s) for s in self.images.image_sizes]


def _mirrored(image: Tensor, flips: Sequence[bool]) -> list[Tensor]:
    return [image.flip(-1) if f else image for f in flips]


def _two_stage(model: nn.Module, image: Tensor, test: MultiScaleFlip, divisor: int) -> dict[str, Tensor]:
    """MMDetection's ``TwoStageDetector.aug_test`` (module text) on one image ``[3, H, W]``."""
    size = tuple(image.shape[-2:])
    scales = []
    for scale in test.scales_of(model):
        with at_scale(model, scale, divisor):
            images, _ = model.transform(_mirrored(image, test.flips()))
        scales.append(_Scale(images, model.backbone(images.tensors), test.flips()))
    proposals = _merged_proposals(model.rpn, scales, size)
    heads = roi_heads_of(model)
    # per scale: HTC's semantic feature (None without the branch) and the levels RoIs pool from
    semantic = [heads.semantic_feature(s.features)[1] for s in scales]
    levels = [heads.roi_levels(s.features) for s in scales]
    boxes, scores = [], []
    for s, lv, sem in zip(scales, levels, semantic, strict=True):
        rois = [map_to_aug(proposals, size, a, f) for a, f in zip(s.sizes, s.flips, strict=True)]
        for (b, p), a, f in zip(heads.box_candidates(lv, rois, s.sizes, sem), s.sizes, s.flips, strict=True):
            boxes.append(map_back(b.float(), a, size, f))
            scores.append(p.float())
    result = heads.postprocess(*merge_boxes(boxes, scores))
    if model.spec.masks:
        probs, mirrored = [], []
        for s, lv, sem in zip(scales, levels, semantic, strict=True):
            rois = [map_to_aug(result["boxes"], size, a, f) for a, f in zip(s.sizes, s.flips, strict=True)]
            probs += [p.float() for p in heads.mask_probs(lv, rois, [result["labels"]] * len(rois), s.sizes, sem)]
            mirrored += s.flips
        result["masks"] = paste_masks_in_image(merge_masks(probs, mirrored), result["boxes"], size)
    return result


def _merged_proposals(rpn: nn.Module, scales: list[_Scale], size: Size) -> Tensor:
    """The RPN's proposals of every augmentation, mapped back to the image (``size``) and
    merged at the RPN's own NMS IoU and test top n."""
    found, objectness = [], []
    for s in scales:
        boxes, scores = rpn_proposals(rpn, s.images, s.features)
        found += [map_back(b.float(), a, size, f) for b, a, f in zip(boxes, s.sizes, s.flips, strict=True)]
        objectness += [p.float() for p in scores]
    return merge_proposals(found, objectness, rpn.nms_thresh, rpn.post_nms_top_n())


def _dense(model: nn.Module, image: Tensor, test: MultiScaleFlip, divisor: int) -> dict[str, Tensor]:
    """MMDetection's ``aug_test_bboxes`` of a dense head (module text) on one image
    ``[3, H, W]``: the model's own test with its NMS a no-op (no IoU exceeds infinity) and no
    cap on the count gives each augmentation's candidates, mapped back by its transform."""
    width = image.shape[-1]
    flips = test.flips()
    candidates = []
    with _set(model, nms_thresh=math.inf, detections_per_img=sys.maxsize):
        for scale in test.scales_of(model):
            with at_scale(model, scale, divisor):
                found = model(_mirrored(image, flips))
            for det, f in zip(found, flips, strict=True):
                boxes = det["boxes"].float()
                boxes = flip_boxes(boxes, width) if f else boxes
                candidates.append({**det, "boxes": boxes, "scores": det["scores"].float()})
    return merge_dense(candidates, model.nms_thresh, model.detections_per_img)


@torch.no_grad()
def detect(model: nn.Module, images: list[Tensor], test: MultiScaleFlip | None = None) -> list[dict[str, Tensor]]:
    """The detections of ``model`` (a detector built by :mod:`ummae.models.detectors`, in eval
    mode) on ``images`` (``[3, H, W]`` floats in [0, 1]) at their original sizes, as the
    model's own forward gives them; under ``test`` (:class:`MultiScaleFlip`) merged over its
    augmentations (module text), each image on its own."""
    if test is None or test.plain:
        return model(images)
    divisor = size_divisor(model)
    scales = test.scales_of(model)
    out = []
    for image in images:
        if len(scales) == 1 and not test.flip:
            with at_scale(model, scales[0], divisor):
                out.append(model([image])[0])
        elif isinstance(model, GeneralizedRCNN):
            out.append(_two_stage(model, image, test, divisor))
        else:
            out.append(_dense(model, image, test, divisor))
    return out
