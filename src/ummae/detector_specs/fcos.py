from ummae.detector_specs._differences import TORCHVISION_ONE_STAGE
from ummae.detector_specs._options import EVERY
from ummae.detector_specs._spec import P3_P7, DetectorSpec

SPEC = DetectorSpec(
    name="fcos",
    summary="torchvision's FCOS",
    builder="torchvision.models.detection:FCOS",
    pyramid=P3_P7,
    masks=False,
    follows="torchvision's `fcos_resnet50_fpn`",
    options=EVERY,
    defaults={"test_score_thr": 0.2},  # torchvision's FCOS(score_thresh=0.2)
    keywords={"test_score_thr": "score_thresh"},
    differences=TORCHVISION_ONE_STAGE,
)
