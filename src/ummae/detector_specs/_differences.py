"""The differences several detectors share from the configurations they follow (markdown, one
item each); a spec lists its own in ``DetectorSpec.differences``, and the differences page is
generated from them. Each is true of what the code does; the values are pinned by
``tests/test_detector_settings.py``."""

BACKBONE = (
    "**Backbone and neck**: a registered Swin or PVT encoder run densely at `--img-size`, each stage map through its "
    "own LayerNorm + Linear to 768 channels (the UM-MAE reference's `up1..up4`), in place of the configuration's "
    "ResNet-50 (the paper's transfer protocol)."
)
TEST_SIZE = (
    "**Test size**: images are fitted into the `--img-size` square canvas and padded to it (ViTDet's LSJ protocol), "
    "the size the backbone trains at; the configuration tests at 1333 x 800 (torchvision: `min_size=800, "
    "max_size=1333`), padded to a multiple of 32."
)
RECIPE = (
    "**Training recipe**: the paper's GFL protocol for every detector (large-scale jitter at `--img-size`, AdamW, "
    "cosine, 25 epochs; [Recipes](recipes.md) for others), not the configuration's schedule (MMDetection's 1x: SGD, "
    "steps at epochs 8 and 11, 1333 x 800; torchvision's reference scripts: SGD, 26 epochs)."
)
TRAIN_CLIP = (
    "**Clipping in training**: training images arrive as the padded `--img-size` canvas, so the RPN's proposals (and "
    "the cascade's refined boxes) are clipped to the canvas; the configuration clips them to the image (`img_shape`, "
    "before the padding)."
)
EXTRA_LEVELS = (
    "**P6 / P7**: 3x3 stride-2 convs on the P5 output without a ReLU between them (MMDetection's "
    "`add_extra_convs='on_output'`, the pyramid GFL shares), PyTorch's default init; torchvision's `LastLevelP6P7` "
    "puts a ReLU before P7 and initialises Kaiming-uniform (a=1)."
)
FPN_INIT = (
    "**FPN init**: torchvision's `FeaturePyramidNetwork` initialises its convs Kaiming-uniform (a=1), bias 0; "
    "MMDetection's `FPN` Xavier-uniform."
)
ANCHORS = (
    "**RPN anchors**: torchvision's `AnchorGenerator` (sizes 32-512 at strides 4-64, ratios 0.5 / 1 / 2: the "
    "configuration's `scales=[8]`) rounds the anchors' corners to whole pixels; MMDetection's are not rounded "
    "(at ratio 0.5 a half-width of 23 px for 22.63)."
)
RPN_MIN_SIZE = (
    "**Proposal size**: proposals with a side under 0.001 px are dropped (torchvision's RPN); MMDetection's "
    "`min_bbox_size=0` drops those with a side of 0."
)
ROI_ALIGN = (
    "**RoIAlign**: torchvision's `MultiScaleRoIAlign`, 2 x 2 sampling points per bin, `aligned=False`; the "
    "configuration's `RoIAlign(sampling_ratio=0)` takes ceil(RoI size / output size) points per bin with mmcv's "
    "`aligned=True` (a half-pixel shift). The level mapping (224 px at level 4) equals MMDetection's "
    "`finest_scale=56`."
)
MASK_TARGETS = (
    "**Mask targets**: torchvision's `project_masks_on_boxes` (the RoIAlign of the ground-truth mask, not "
    "binarised); MMDetection binarises them at 0.5."
)
MASK_PASTE = (
    "**Test masks** are pasted into the image by torchvision's `paste_masks_in_image` (the 28 x 28 map padded by one "
    "pixel and its box widened to match, bilinear) and binarised at > 0.5; MMDetection's `_do_paste_mask` "
    "(`grid_sample` on the box) at >= 0.5."
)
SMALL_BOXES = (
    "**Tiny detections**: boxes with a side under 0.01 px are dropped at test (torchvision's post-processing); "
    "MMDetection's `multiclass_nms` keeps them."
)
CLASS_RULE_HTC = (
    "**`--box-reg class` in HTC**: between stages the RoIs are refined by the deltas of their ground-truth class, "
    "background RoIs by those of the class the stage predicts (`CascadeRoIHead`'s rule, used for HTC's "
    "interleaved mask RoIs too)."
)
BOX_CONV_INIT = (
    "**`--box-head 4conv1fc` convs** start at PyTorch's default init; mmcv's `ConvModule` initialises them "
    "Kaiming-normal (fan-out)."
)
CASCADES = (BACKBONE, TEST_SIZE, RECIPE, TRAIN_CLIP, FPN_INIT, ANCHORS, RPN_MIN_SIZE, ROI_ALIGN, MASK_TARGETS,
            MASK_PASTE, SMALL_BOXES, BOX_CONV_INIT)  # fmt: skip
TORCHVISION_TWO_STAGE = (BACKBONE, TEST_SIZE, RECIPE, TRAIN_CLIP)
TORCHVISION_ONE_STAGE = (BACKBONE, TEST_SIZE, RECIPE, EXTRA_LEVELS)
