from ummae.detector_specs._differences import TORCHVISION_ONE_STAGE
from ummae.detector_specs._options import EVERY
from ummae.detector_specs._spec import P3_P7, DetectorSpec

SPEC = DetectorSpec(
    name="retinanet",
    summary="torchvision's RetinaNet",
    builder="torchvision.models.detection:RetinaNet",
    pyramid=P3_P7,
    masks=False,
    follows="torchvision's `retinanet_resnet50_fpn`",
    options=EVERY,
    keywords={"test_score_thr": "score_thresh"},
    differences=TORCHVISION_ONE_STAGE,
)
