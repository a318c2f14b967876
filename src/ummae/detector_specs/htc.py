from ummae.detector_specs._options import CASCADE, SEMANTIC
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
    options=(*CASCADE, SEMANTIC),
)
