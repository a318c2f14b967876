from ummae.detector_specs._differences import TORCHVISION_TWO_STAGE
from ummae.detector_specs._options import EVERY, RPN_ASSIGN
from ummae.detector_specs._spec import P2_P6, DetectorSpec

SPEC = DetectorSpec(
    name="maskrcnn",
    summary="torchvision's Mask R-CNN, MAE / SimMIM's benchmark",
    builder="torchvision.models.detection:MaskRCNN",
    pyramid=P2_P6,
    masks=True,
    follows="torchvision's `maskrcnn_resnet50_fpn`",
    onnx="torchvision",
    options=(*EVERY, RPN_ASSIGN),
    keywords={"test_score_thr": "box_score_thresh"},
    differences=TORCHVISION_TWO_STAGE,
)
