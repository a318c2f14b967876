"""The detectors' options, each stated once; the spec files list which of them they take and,
for a ``per_detector`` option, their own default."""

from ummae.detector_specs._spec import DetectorOption

UNIT = {"ge": 0.0, "le": 1.0}

# -- every detector ------------------------------------------------------------------------
FPN_NORM = DetectorOption(
    "fpn_norm",
    "none",
    "norm after each FPN conv (and the extra P6/P7 convs): bn (SyncBN under DDP on CUDA: the reference's GFL config) "
    "or none (torchvision's and MMDetection's Mask R-CNN / Cascade / HTC FPNs)",
    choices=("none", "bn"),
    per_detector=True,
    unrecorded="bn",  # every FPN had BatchNorm before the option
    part="detector",
)
TEST_SCORE_THR = DetectorOption(
    "test_score_thr",
    0.05,
    "test score threshold: candidates scoring at most this are dropped before NMS",
    per_detector=True,
    accepts=UNIT,
)
EVERY = (FPN_NORM, TEST_SCORE_THR)

# -- the two-stage detectors ---------------------------------------------------------------
RPN_ASSIGN = DetectorOption(
    "rpn_assign",
    "torchvision",
    "RPN training targets: torchvision (every anchor; each ground truth's best anchors positive at any IoU) or mmdet "
    "(MMDetection 2.x: anchors crossing the image edge ignored, allowed_border=0; best anchors positive only at IoU "
    ">= 0.3, min_pos_iou)",
    choices=("torchvision", "mmdet"),
    per_detector=True,
    unrecorded="torchvision",
    part="detector",
)

# -- the cascades (cascade_maskrcnn, htc) --------------------------------------------------
BOX_HEAD = DetectorOption(
    "box_head",
    "2fc",
    "box heads: 2fc (MMDetection's Shared2FCBBoxHead) or 4conv1fc (Swin's, with --box-norm)",
    choices=("2fc", "4conv1fc"),
)
BOX_NORM = DetectorOption(
    "box_norm",
    "none",
    "norm of the 4conv1fc box heads' convs: bn (SyncBN under DDP on CUDA, Swin's) or gn",
    choices=("none", "bn", "gn"),
)
BOX_REG = DetectorOption(
    "box_reg",
    "agnostic",
    "box deltas: agnostic (one set per RoI, reg_class_agnostic=True) or class (one per class, reg_class_agnostic=False, "
    "Swin's: trained on the ground-truth class's, refined between stages by the class the stage predicts)",
    choices=("agnostic", "class"),
)
BOX_LOSS = DetectorOption(
    "box_loss",
    "smooth_l1",
    "box regression loss: smooth_l1 (beta 1, on the encoded deltas) or giou (MMDetection's GIoULoss on the deltas "
    "decoded onto the RoIs, reg_decoded_bbox=True; Swin's configs: with --box-loss-weight 10)",
    choices=("smooth_l1", "giou"),
)
BOX_LOSS_WEIGHT = DetectorOption(
    "box_loss_weight", 1.0, "weight of the box regression loss (before the stage weights)", accepts={"ge": 0.0}
)
TEST_NMS = DetectorOption(
    "test_nms",
    "nms",
    "NMS per class of the RoI stage at test: nms (boxes above --test-nms-iou with a better one dropped), soft_linear "
    "(mmcv's soft_nms method linear, HTC++'s: scores x (1 - IoU) where IoU > --test-nms-iou) or soft_gaussian "
    "(scores x exp(-IoU^2 / 0.5)); soft-NMS drops scores under 0.001 and reports the decayed ones",
    choices=("nms", "soft_linear", "soft_gaussian"),
    replaces=("soft_nms", {True: "soft_gaussian", False: "nms"}),  # the bool flag --soft-nms was Gaussian
)
TEST_NMS_IOU = DetectorOption("test_nms_iou", 0.5, "IoU threshold of --test-nms nms and soft_linear", accepts=UNIT)
GLOBAL_ATTN = DetectorOption(
    "global_attn",
    False,
    "HTC++'s extra global self-attention block on the backbone's last stage map, before its projection (Swin "
    "paper A2.2)",
    part="backbone",
)
SEMANTIC = DetectorOption(
    "semantic",
    False,
    "folder of COCO-stuff maps of the training images (stuffthingmaps, <image stem>.png, 255 ignored); builds "
    "HTC's semantic branch. Omitted: no semantic branch",
    set_by="stuff_maps",
)
CASCADE = (BOX_HEAD, BOX_NORM, BOX_REG, BOX_LOSS, BOX_LOSS_WEIGHT, TEST_NMS, TEST_NMS_IOU, GLOBAL_ATTN)
