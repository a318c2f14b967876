from ummae.detector_specs._spec import P3_P7, DetectorSpec

SPEC = DetectorSpec(
    name="fcos",
    summary="torchvision's FCOS",
    builder="torchvision.models.detection:FCOS",
    pyramid=P3_P7,
    masks=False,
    follows="torchvision's `fcos_resnet50_fpn`",
)
