from ummae.detector_specs._spec import P3_P7, DetectorSpec

SPEC = DetectorSpec(
    name="gfl",
    summary="GFL, the paper's protocol",
    builder="ummae.models.gfl:GFL",
    pyramid=P3_P7,
    masks=False,
    follows="the reference's `DET/configs/gfl/gfl_mae_swin_tiny_256_..._fpn_25ep_1024x1024_coco.py`",
    onnx="raw",
)
