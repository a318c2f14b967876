from ummae.detector_specs._differences import TORCHVISION_TWO_STAGE
from ummae.detector_specs._options import EVERY, RPN_ASSIGN
from ummae.detector_specs._spec import P2_P6, DetectorSpec

SPEC = DetectorSpec(
    name="fasterrcnn",
    summary="torchvision's Faster R-CNN, Mask R-CNN without its mask head",
    builder="torchvision.models.detection:FasterRCNN",
    pyramid=P2_P6,
    masks=False,
    follows="torchvision's `fasterrcnn_resnet50_fpn`",
    onnx="torchvision",
    options=(*EVERY, RPN_ASSIGN),
    keywords={"test_score_thr": "box_score_thresh"},
    differences=TORCHVISION_TWO_STAGE,
)
