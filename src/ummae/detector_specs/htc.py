from ummae.detector_specs._differences import CASCADES, CLASS_RULE_HTC
from ummae.detector_specs._options import CASCADE, EVERY, RPN_ASSIGN, SEMANTIC
from ummae.detector_specs._spec import P2_P6, DetectorSpec

SPEC = DetectorSpec(
    name="htc",
    summary="MMDetection's HTC, its semantic branch with --stuff-maps",
    builder="ummae.models.cascade:CascadeMaskRCNN",
    builder_args={"htc": True},
    pyramid=P2_P6,
    masks=True,
    follows="MMDetection 2.x `configs/htc/htc_r50_fpn_1x_coco.py` (`HybridTaskCascadeRoIHead`, `HTCMaskHead`, "
    "`FusedSemanticHead`); without --stuff-maps `htc_without_semantic_r50_fpn_1x_coco.py`",
    options=(*EVERY, RPN_ASSIGN, *CASCADE, SEMANTIC),
    defaults={"rpn_assign": "mmdet", "test_score_thr": 0.001},  # htc_r50_fpn_1x_coco: rcnn score_thr=0.001
    unrecorded={"test_score_thr": 0.05},  # HTC tested at 0.05 before the option
    differences=(
        *CASCADES,
        "**Low-quality RoI matches**: the RoI stages keep none; HTC's configs leave `MaxIoUAssigner`'s "
        "`match_low_quality=True` with `min_pos_iou` equal to the stage's threshold, which changes only which ground "
        "truth an RoI tied between two gets (Cascade's config sets `match_low_quality=False`, as ours).",
        "**Semantic branch**: its RoIAlign is torchvision's as for the box and mask features (2 x 2 points, "
        "`aligned=False`, so the summed features sample the same points; MMDetection's semantic extractor: "
        "`sampling_ratio=0`, `aligned=True`); the stuff map is taken to the logits' size by nearest resizing "
        "(MMDetection rescales it by 1/8: the same for canvases divisible by 8).",
        CLASS_RULE_HTC,
    ),
)
