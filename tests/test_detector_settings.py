"""Every detector's settings against the configuration it follows (``DetectorSpec.follows``),
written out here with their sources, asserted on the BUILT model (the way
``tests/test_recipes.py`` pins the recipes). A row whose value is ours and not the
configuration's names the difference that says so: a phrase of one of the spec's
``differences``, the list the differences page is generated from.

Sources, read for this table:

* MMDetection 2.x ``configs/_base_/models/cascade_mask_rcnn_r50_fpn.py`` (cascade_maskrcnn) and
  ``configs/htc/htc_without_semantic_r50_fpn_1x_coco.py`` / ``htc_r50_fpn_1x_coco.py`` (htc):
  ``neck=FPN(out_channels=256, num_outs=5)`` (no ``norm_cfg``, no extra convs: P6 by max pool);
  ``rpn_head`` ``AnchorGenerator(scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64])``;
  ``train_cfg.rpn``: ``MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)``,
  ``RandomSampler(num=256, pos_fraction=0.5)``, ``allowed_border=0``; ``rpn_proposal``
  ``nms_pre=2000, max_per_img=2000, nms iou_threshold=0.7, min_bbox_size=0``; ``test_cfg.rpn``
  ``nms_pre=1000, max_per_img=1000``; ``roi_head``: ``RoIAlign(output_size=7 / 14,
  sampling_ratio=0)``, ``featmap_strides=[4, 8, 16, 32]``, three ``Shared2FCBBoxHead(fc_out_channels
  =1024, reg_class_agnostic=True, SmoothL1Loss(beta=1.0, loss_weight=1.0))`` with stds 0.1/0.2,
  0.05/0.1, 0.033/0.067, ``stage_loss_weights=[1, 0.5, 0.25]``, ``FCNMaskHead(num_convs=4)``;
  ``rcnn`` assigners at 0.5 / 0.6 / 0.7, ``RandomSampler(num=512, pos_fraction=0.25)``;
  ``test_cfg.rcnn``: ``score_thr=0.05`` (htc: ``0.001``), ``nms iou_threshold=0.5``,
  ``max_per_img=100``; base test pipeline ``img_scale=(1333, 800)``.
* torchvision 0.2x ``MaskRCNN`` / ``FasterRCNN`` / ``RetinaNet`` / ``FCOS`` constructor defaults
  (what ``maskrcnn_resnet50_fpn`` & co. build) and ``_resnet_fpn_extractor`` (FPN without norm;
  ``LastLevelMaxPool``, or ``LastLevelP6P7(256, 256)`` for RetinaNet and FCOS).
* the UM-MAE reference's ``DET/configs/gfl/gfl_mae_swin_tiny_256_..._fpn_25ep_1024x1024_coco.py``:
  ``FPN(start_level=1, add_extra_convs='on_output', num_outs=5, norm_cfg=MMSyncBN)``, ``GFLHead(
  num_classes=80, stacked_convs=4, octave_base_scale=8, strides [8..128], QualityFocalLoss(beta=2.0),
  DistributionFocalLoss(loss_weight=0.25), reg_max=16, GIoULoss(loss_weight=2.0))``, ``ATSSAssigner(
  topk=9)``, ``test_cfg`` ``nms_pre=1000, score_thr=0.05, nms iou 0.6, max_per_img=100``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from ummae.detector_specs import DETECTORS, OPTIONS, SPECS, recorded_options
from ummae.models.detectors import build_detector
from ummae.weights.build import build_from_weights

K = 80  # COCO classes: the models have K + 1 outputs with torchvision's background
CASCADE_CFG = "cascade_mask_rcnn_r50_fpn.py"
HTC_CFG = "htc_without_semantic_r50_fpn_1x_coco.py"
GFL_CFG = "gfl_mae_swin_tiny_256_..._coco.py"


@dataclass(frozen=True)
class Row:
    """``got(model)`` should be ``want``, the configuration's value (``source``: file and key);
    where ours differs, ``differs`` is a phrase of the spec difference that documents it."""

    what: str
    got: Any
    want: Any
    source: str
    differs: str = ""


def _fpn_norms(m) -> bool:
    return any(isinstance(x, torch.nn.BatchNorm2d) for x in m.backbone.fpn.modules())


def _mmdet_half_width(size: float, ratio: float) -> float:
    """MMDetection's AnchorGenerator.gen_single_level_base_anchors (center_offset 0): half the
    width of the base anchor, w = size / sqrt(ratio), not rounded."""
    return round(0.5 * size / math.sqrt(ratio), 3)


def _two_stage_rpn(cfg: str, mmdet: bool) -> list[Row]:
    rpn = lambda m: m.rpn  # noqa: E731
    rows = [
        Row("RPN anchor sizes", lambda m: rpn(m).anchor_generator.sizes, ((32,), (64,), (128,), (256,), (512,)),
            f"{cfg} AnchorGenerator(scales=[8], strides=[4, 8, 16, 32, 64])"),
        Row("RPN anchor ratios", lambda m: rpn(m).anchor_generator.aspect_ratios, ((0.5, 1.0, 2.0),) * 5,
            f"{cfg} AnchorGenerator(ratios=[0.5, 1.0, 2.0])"),
        Row("RPN positive IoU", lambda m: rpn(m).proposal_matcher.high_threshold, 0.7, f"{cfg} rpn pos_iou_thr"),
        Row("RPN negative IoU", lambda m: rpn(m).proposal_matcher.low_threshold, 0.3, f"{cfg} rpn neg_iou_thr"),
        Row("RPN anchors per image", lambda m: rpn(m).fg_bg_sampler.batch_size_per_image, 256, f"{cfg} rpn sampler num"),
        Row("RPN positive fraction", lambda m: rpn(m).fg_bg_sampler.positive_fraction, 0.5,
            f"{cfg} rpn sampler pos_fraction"),
        Row("RPN pre-NMS top-n per level", lambda m: rpn(m)._pre_nms_top_n, {"training": 2000, "testing": 1000},
            f"{cfg} rpn_proposal / test_cfg.rpn nms_pre"),
        Row("RPN proposals per image", lambda m: rpn(m)._post_nms_top_n, {"training": 2000, "testing": 1000},
            f"{cfg} rpn_proposal / test_cfg.rpn max_per_img"),
        Row("RPN NMS IoU", lambda m: rpn(m).nms_thresh, 0.7, f"{cfg} rpn nms iou_threshold"),
    ]  # fmt: skip
    if mmdet:
        rows += [
            Row("RPN rule", lambda m: type(rpn(m)).__name__, "MMDetRPN", f"{cfg} train_cfg.rpn (MaxIoUAssigner)"),
            Row("RPN min_pos_iou", lambda m: rpn(m).min_pos_iou, 0.3, f"{cfg} rpn min_pos_iou"),
            Row("RPN allowed_border", lambda m: rpn(m).allowed_border, 0, f"{cfg} rpn allowed_border"),
            Row("RPN base anchor half-width (stride 4, ratio 0.5)", lambda m: float(rpn(m).anchor_generator.cell_anchors[0][0, 2]),
                _mmdet_half_width(32, 0.5), "mmdet AnchorGenerator.gen_single_level_base_anchors", differs="rounds the anchors' corners"),
            Row("RPN minimum proposal side", lambda m: rpn(m).min_size, 0, f"{cfg} rpn_proposal min_bbox_size=0",
                differs="Proposal size"),
        ]  # fmt: skip
    else:  # torchvision's rule: every anchor, low-quality matches at any IoU
        rows += [
            Row("RPN rule", lambda m: type(rpn(m)).__name__, "RegionProposalNetwork", f"{cfg} (torchvision's RPN)"),
            Row("RPN low-quality matches", lambda m: rpn(m).proposal_matcher.allow_low_quality_matches, True,
                f"{cfg} RegionProposalNetwork Matcher(allow_low_quality_matches=True)"),
            Row("RPN minimum proposal side", lambda m: rpn(m).min_size, 1e-3, f"{cfg} RegionProposalNetwork min_size"),
        ]  # fmt: skip
    return rows


def _cascade(cfg: str, score: float) -> list[Row]:
    heads = lambda m: m.roi_heads  # noqa: E731
    stds = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
    return [
        Row("FPN norm", _fpn_norms, False, f"{cfg} neck FPN (no norm_cfg)"),
        Row("P6", lambda m: type(m.backbone.fpn.extra_blocks).__name__, "LastLevelMaxPool", f"{cfg} neck num_outs=5, no extra convs"),
        *_two_stage_rpn(cfg, mmdet=True),
        Row("RoI levels", lambda m: heads(m).box_roi_pool.featmap_names, ["0", "1", "2", "3"], f"{cfg} featmap_strides=[4, 8, 16, 32]"),
        Row("box RoI size", lambda m: heads(m).box_roi_pool.output_size, (7, 7), f"{cfg} bbox_roi_extractor output_size=7"),
        Row("mask RoI size", lambda m: heads(m).mask_roi_pool.output_size, (14, 14), f"{cfg} mask_roi_extractor output_size=14"),
        Row("RoIAlign sampling ratio", lambda m: heads(m).box_roi_pool.sampling_ratio, 0, f"{cfg} RoIAlign sampling_ratio=0",
            differs="2 x 2 sampling points per bin"),
        Row("stage IoU thresholds", lambda m: [(x.high_threshold, x.low_threshold) for x in heads(m).matchers],
            [(0.5, 0.5), (0.6, 0.6), (0.7, 0.7)], f"{cfg} rcnn[i] pos_iou_thr = neg_iou_thr"),
        Row("RoIs per image", lambda m: heads(m).sampler.batch_size_per_image, 512, f"{cfg} rcnn sampler num"),
        Row("RoI positive fraction", lambda m: heads(m).sampler.positive_fraction, 0.25, f"{cfg} rcnn sampler pos_fraction"),
        Row("stage stds", lambda m: [tuple(round(1 / w, 3) for w in c.weights) for c in heads(m).coders], list(stds),
            f"{cfg} bbox_head[i].bbox_coder target_stds"),
        Row("stage loss weights", lambda m: tuple(heads(m).stage_loss_weights), (1.0, 0.5, 0.25), f"{cfg} stage_loss_weights"),
        Row("box head fc", lambda m: [fc.out_features for fc in heads(m).box_heads[0].fcs], [1024, 1024],
            f"{cfg} Shared2FCBBoxHead fc_out_channels=1024"),
        Row("class-agnostic deltas", lambda m: heads(m).box_heads[0].reg.out_features, 4, f"{cfg} reg_class_agnostic=True"),
        Row("box loss", lambda m: (heads(m).box_loss_kind, heads(m).box_loss_weight), ("smooth_l1", 1.0),
            f"{cfg} SmoothL1Loss(beta=1.0, loss_weight=1.0)"),
        Row("mask head convs", lambda m: len(heads(m).mask_heads[0].convs), 4, f"{cfg} FCNMaskHead num_convs=4"),
        Row("test score threshold", lambda m: heads(m).score_thresh, score, f"{cfg} test_cfg.rcnn score_thr"),
        Row("test NMS", lambda m: (heads(m).test_nms, heads(m).nms_thresh), ("nms", 0.5), f"{cfg} test_cfg.rcnn nms"),
        Row("detections per image", lambda m: heads(m).detections_per_img, 100, f"{cfg} test_cfg.rcnn max_per_img"),
        Row("test size", lambda m: m.transform.min_size, (800,), f"{cfg} test img_scale (1333, 800)", differs="Test size"),
    ]  # fmt: skip


def _torchvision_two_stage(cfg: str) -> list[Row]:
    heads = lambda m: m.roi_heads  # noqa: E731
    return [
        Row("FPN norm", _fpn_norms, False, f"{cfg} _resnet_fpn_extractor (FPN norm_layer=None)"),
        Row("P6", lambda m: type(m.backbone.fpn.extra_blocks).__name__, "LastLevelMaxPool", f"{cfg} LastLevelMaxPool"),
        *_two_stage_rpn(cfg, mmdet=False),
        Row("RoI IoU", lambda m: (heads(m).proposal_matcher.high_threshold, heads(m).proposal_matcher.low_threshold),
            (0.5, 0.5), f"{cfg} box_fg_iou_thresh / box_bg_iou_thresh"),
        Row("RoIs per image", lambda m: heads(m).fg_bg_sampler.batch_size_per_image, 512, f"{cfg} box_batch_size_per_image"),
        Row("RoI positive fraction", lambda m: heads(m).fg_bg_sampler.positive_fraction, 0.25, f"{cfg} box_positive_fraction"),
        Row("box coder weights", lambda m: heads(m).box_coder.weights, (10.0, 10.0, 5.0, 5.0), f"{cfg} bbox_reg_weights"),
        Row("test score threshold", lambda m: heads(m).score_thresh, 0.05, f"{cfg} box_score_thresh"),
        Row("test NMS IoU", lambda m: heads(m).nms_thresh, 0.5, f"{cfg} box_nms_thresh"),
        Row("detections per image", lambda m: heads(m).detections_per_img, 100, f"{cfg} box_detections_per_img"),
        Row("test size", lambda m: m.transform.min_size, (800,), f"{cfg} min_size=800", differs="Test size"),
    ]  # fmt: skip


def _torchvision_one_stage(cfg: str, score: float, nms: float, per_img: int) -> list[Row]:
    return [
        Row("FPN norm", _fpn_norms, False, f"{cfg} _resnet_fpn_extractor (FPN norm_layer=None)"),
        Row("P6 / P7", lambda m: type(m.backbone.fpn.extra_blocks).__name__, "LastLevelP6P7",
            f"{cfg} extra_blocks=LastLevelP6P7(256, 256)", differs="`LastLevelP6P7`"),
        Row("test score threshold", lambda m: m.score_thresh, score, f"{cfg} score_thresh"),
        Row("test NMS IoU", lambda m: m.nms_thresh, nms, f"{cfg} nms_thresh"),
        Row("detections per image", lambda m: m.detections_per_img, per_img, f"{cfg} detections_per_img"),
        Row("candidates per level", lambda m: m.topk_candidates, 1000, f"{cfg} topk_candidates"),
        Row("test size", lambda m: m.transform.min_size, (800,), f"{cfg} min_size=800", differs="Test size"),
    ]  # fmt: skip


def _gfl() -> list[Row]:
    cfg = GFL_CFG
    return [
        Row("FPN norm", _fpn_norms, True, f"{cfg} neck norm_cfg=MMSyncBN"),
        Row("extra P6 / P7 norm", lambda m: [type(c[1]).__name__ for c in m.backbone.fpn.extra_blocks.convs],
            ["BatchNorm2d", "BatchNorm2d"], f"{cfg} add_extra_convs='on_output' (ConvModule with the FPN's norm_cfg)"),
        Row("pyramid stages", lambda m: SPECS["gfl"].pyramid.stages, (1, 2, 3), f"{cfg} neck start_level=1"),
        Row("stage projections", lambda m: len(m.backbone.body.proj), 4, f"{cfg} SwinDet up1..up4",
            differs="Stage projections"),
        Row("anchor sizes", lambda m: m.anchor_generator.sizes, ((64,), (128,), (256,), (512,), (1024,)),
            f"{cfg} octave_base_scale=8 x strides [8, 16, 32, 64, 128]"),
        Row("classes", lambda m: m.head.gfl_cls.out_channels, K, f"{cfg} GFLHead num_classes=80", differs="K + 1 outputs"),
        Row("head convs", lambda m: sum(isinstance(x, torch.nn.Conv2d) for x in m.head.cls_tower), 4, f"{cfg} stacked_convs=4"),
        Row("head GroupNorm groups", lambda m: {x.num_groups for x in m.head.modules() if isinstance(x, torch.nn.GroupNorm)},
            {32}, f"{cfg} GFLHead norm_cfg GN(num_groups=32)"),
        Row("reg_max", lambda m: m.reg_max, 16, f"{cfg} reg_max=16"),
        Row("ATSS top-k", lambda m: m.atss_topk, 9, f"{cfg} ATSSAssigner(topk=9)"),
        Row("QFL beta", lambda m: m.qfl_beta, 2.0, f"{cfg} QualityFocalLoss(beta=2.0)"),
        Row("DFL weight", lambda m: m.dfl_weight, 0.25, f"{cfg} DistributionFocalLoss(loss_weight=0.25)"),
        Row("GIoU weight", lambda m: m.giou_weight, 2.0, f"{cfg} GIoULoss(loss_weight=2.0)"),
        Row("test score threshold", lambda m: m.score_thresh, 0.05, f"{cfg} test_cfg score_thr"),
        Row("test NMS IoU", lambda m: m.nms_thresh, 0.6, f"{cfg} test_cfg nms iou_threshold"),
        Row("candidates per level", lambda m: m.topk_candidates, 1000, f"{cfg} test_cfg nms_pre"),
        Row("detections per image", lambda m: m.detections_per_img, 100, f"{cfg} test_cfg max_per_img"),
        Row("test size", lambda m: m.transform.min_size, (800,), "mmdet base test pipeline img_scale (1333, 800)",
            differs="Test size"),
    ]  # fmt: skip


def _htc() -> list[Row]:
    heads = lambda m: m.roi_heads  # noqa: E731
    return [
        *_cascade(HTC_CFG, 0.001),
        Row("interleaved + mask information flow", lambda m: (heads(m).htc, [h.res is not None for h in heads(m).mask_heads]),
            (True, [False, True, True]), f"{HTC_CFG} interleaved=True, mask_info_flow=True, HTCMaskHead with_conv_res"),
        Row("RoI low-quality matches", lambda m: heads(m).matchers[0].allow_low_quality_matches, True,
            f"{HTC_CFG} rcnn MaxIoUAssigner (match_low_quality default True)", differs="Low-quality RoI matches"),
    ]  # fmt: skip


SETTINGS: dict[str, list[Row]] = {
    "gfl": _gfl(),
    "maskrcnn": _torchvision_two_stage("torchvision MaskRCNN"),
    "retinanet": _torchvision_one_stage("torchvision RetinaNet", 0.05, 0.5, 300),
    "fcos": _torchvision_one_stage("torchvision FCOS", 0.2, 0.6, 100),
    "cascade_maskrcnn": _cascade(CASCADE_CFG, 0.05),
    "htc": _htc(),
    "fasterrcnn": _torchvision_two_stage("torchvision FasterRCNN"),
}


def test_settings__every_detector_has_its_table():
    assert sorted(SETTINGS) == sorted(DETECTORS)


@pytest.mark.parametrize("detector", DETECTORS)
def test_settings__the_built_detector_against_its_configuration(detector):
    torch.manual_seed(0)
    model = build_detector(detector, "swin_test", K + 1, img_size=128, neck_channels=16, fpn_channels=256)
    differences = SPECS[detector].differences
    wrong, undocumented = [], []
    for row in SETTINGS[detector]:
        got = row.got(model)
        if not row.differs and got != row.want:
            wrong.append(f"{row.what}: {got!r}, the configuration's {row.want!r} ({row.source})")
        if row.differs:
            assert got != row.want, f"{row.what}: equals the configuration now; drop its difference"
            if not any(row.differs in d for d in differences):
                undocumented.append(f"{row.what}: no difference of {detector} says {row.differs!r}")
    assert wrong == []
    assert undocumented == []


def test_differences__every_detector_states_its_own():
    for spec in SPECS.values():
        assert spec.differences, spec.name
        assert len(set(spec.differences)) == len(spec.differences), spec.name
    # the RPN's per-level NMS is MMDetection 2.x's too (batched_nms with the level as the index)
    assert not any("per level" in d and "NMS" in d for s in SPECS.values() for d in s.differences)


# --- checkpoints written before the options ----------------------------------------------------
# What every detector computed before issue 34 made these settings options: an FPN with
# BatchNorm, torchvision's RPN rule, the score thresholds it tested at, NMS (or Gaussian soft-NMS
# where `soft_nms: true` is recorded), smooth-L1 on class-agnostic deltas, no global attention block.
BEFORE = {
    "fpn_norm": "bn", "rpn_assign": "torchvision", "box_head": "2fc", "box_norm": "none", "box_reg": "agnostic",
    "box_loss": "smooth_l1", "box_loss_weight": 1.0, "test_nms": "nms", "test_nms_iou": 0.5, "semantic": False,
    "global_attn": False,
}  # fmt: skip
BEFORE_SCORE = {"gfl": 0.05, "maskrcnn": 0.05, "retinanet": 0.05, "fcos": 0.2, "cascade_maskrcnn": 0.05, "htc": 0.05,
                "fasterrcnn": 0.05}  # fmt: skip


@pytest.mark.parametrize("detector", DETECTORS)
def test_unrecorded_options__as_the_detector_was_trained_before_them(detector):
    spec = SPECS[detector]
    got = recorded_options({"detector": detector, "backbone": "swin_test"})
    want = {o.name: BEFORE[o.name] for o in spec.options if o.name != "test_score_thr"}
    want["test_score_thr"] = BEFORE_SCORE[detector]
    assert {k: got[k] for k in want} == want
    if spec.takes("test_nms"):  # the bool soft_nms of earlier checkpoints
        assert recorded_options({"detector": detector, "soft_nms": True})["test_nms"] == "soft_gaussian"
        assert "soft_nms" not in recorded_options({"detector": detector, "soft_nms": False})


def test_unrecorded_options__a_cascade_checkpoint_before_them_loads_and_tests_as_trained(tmp_path):
    """A Cascade checkpoint of before the options (FPN with BatchNorm, torchvision's RPN, Gaussian
    soft-NMS recorded as ``soft_nms: true``) rebuilds through the checkpoint door as it was: its
    weights load strictly and the rebuilt model has those settings."""
    old = build_detector("cascade_maskrcnn", "swin_test", 5, img_size=64, neck_channels=16, fpn_channels=32,
                         fpn_norm="bn", rpn_assign="torchvision")  # fmt: skip
    args = {k: v for k, v in old.model_args.items() if k not in OPTIONS or k in ("box_head", "box_norm")}
    args["soft_nms"] = True
    meta = {"model_name": old.model_name, "model_args": args}
    model = build_from_weights(old.state_dict(), meta, tmp_path / "old.pth", "detect")
    assert _fpn_norms(model) and type(model.rpn).__name__ == "RegionProposalNetwork"
    assert (model.roi_heads.test_nms, model.roi_heads.score_thresh) == ("soft_gaussian", 0.05)
    assert model.model_args["test_nms"] == "soft_gaussian" and "soft_nms" not in model.model_args


@pytest.mark.parametrize("detector", ["gfl", "retinanet", "cascade_maskrcnn"])
@pytest.mark.parametrize("norm", ["bn", "none"])
def test_fpn_norm__a_batchnorm_after_every_fpn_conv_or_none_and_biased_convs(detector, norm):
    """--fpn-norm bn: each FPN conv (lateral, output and the extra P6 / P7 convs) is bias-free and
    followed by a BatchNorm (mmcv's ConvModule with norm_cfg); none: convs with a bias, no norm."""
    model = build_detector(detector, "swin_test", 5, img_size=64, neck_channels=16, fpn_channels=32, fpn_norm=norm)
    blocks = [b for b in model.backbone.fpn.modules() if isinstance(b, torch.nn.Sequential)]
    convs = [b[0] for b in blocks if isinstance(b[0], torch.nn.Conv2d)]
    extra = len(SPECS[detector].pyramid.levels) - len(SPECS[detector].pyramid.stages)
    pool = SPECS[detector].pyramid.extra == "max_pool"
    assert len(convs) == 2 * len(SPECS[detector].pyramid.stages) + (0 if pool else extra)
    for block, conv in zip(blocks, convs, strict=True):
        assert (conv.bias is None) == (norm == "bn")
        assert [type(m).__name__ for m in list(block)[1:]] == (["BatchNorm2d"] if norm == "bn" else [])
    assert model.model_args["fpn_norm"] == norm
