from ummae.detector_specs._options import EVERY
from ummae.detector_specs._spec import P3_P7, DetectorSpec

SPEC = DetectorSpec(
    name="gfl",
    summary="GFL, the paper's protocol",
    builder="ummae.models.gfl:GFL",
    pyramid=P3_P7,
    masks=False,
    follows="the reference's `DET/configs/gfl/gfl_mae_swin_tiny_256_..._fpn_25ep_1024x1024_coco.py`",
    onnx="raw",
    options=EVERY,
    defaults={"fpn_norm": "bn"},  # the config's FPN: norm_cfg=dict(type='MMSyncBN')
    keywords={"test_score_thr": "score_thresh"},
    differences=(
        "**Test size**: images are fitted into the 1024 x 1024 training canvas and padded to it (ViTDet's LSJ "
        "protocol); the reference config keeps MMDetection's base test pipeline (1333 x 800, padded to a multiple of "
        "32), which its Swin pads per window, as ours does: `--test-scales 1333x800` runs that test size.",
        "**Classes**: K + 1 outputs as torchvision's COCO models have (MMDetection's GFL: K sigmoid outputs); output "
        "0 is never a positive and its detections are dropped before evaluation.",
        "**Stage projections**: only the stage maps the detector reads (stages 2-4) get a LayerNorm + Linear; the "
        "reference builds all four and trains with `find_unused_parameters`.",
        "**Head GroupNorm**: at most 32 groups of at least 2 channels: 32 at the default 256 channels, as "
        "MMDetection's `GN(num_groups=32)`; fewer at `--fpn-channels` under 64.",
        "**FPN init**: torchvision's `FeaturePyramidNetwork` initialises its lateral and output convs "
        "Kaiming-uniform (a=1), the extra P6 / P7 convs PyTorch's default; MMDetection's `FPN` all Xavier-uniform.",
    ),
)
