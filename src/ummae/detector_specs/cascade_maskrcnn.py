from ummae.detector_specs._differences import CASCADES
from ummae.detector_specs._options import CASCADE, EVERY, RPN_ASSIGN
from ummae.detector_specs._spec import P2_P6, DetectorSpec

SPEC = DetectorSpec(
    name="cascade_maskrcnn",
    summary="MMDetection's Cascade Mask R-CNN",
    builder="ummae.models.cascade:CascadeMaskRCNN",
    pyramid=P2_P6,
    masks=True,
    follows="MMDetection 2.x `configs/_base_/models/cascade_mask_rcnn_r50_fpn.py` (`CascadeRoIHead`)",
    options=(*EVERY, RPN_ASSIGN, *CASCADE),
    defaults={"rpn_assign": "mmdet"},
    differences=CASCADES,
)
