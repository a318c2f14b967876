"""Properties of the detection parts we wrote around torchvision's detectors
(:mod:`ummae.models.detectors`), against the reference (MMDetection 2.x) written out here:

* the stage-map backbone: the P3-P7 detectors (GFL, RetinaNet, FCOS) read stages 2-4 (strides
  8, 16, 32: MMDetection's ``start_level=1``), Mask R-CNN all four (P2-P5, then P6 by max pool);
* the FPN extras of the P3-P7 detectors: MMDetection's ``add_extra_convs='on_output'``:
  P6 = conv3x3/2(P5 *output*), P7 = conv3x3/2(P6), each with the FPN's norm and no activation
  (docs/differences.md, "Detection": MMDetection has a norm there too in the GFL config; torchvision's
  ``LastLevelP6P7`` reads C5 with a ReLU before P7);
* GFL's anchors: one square anchor per location of side ``octave_base_scale`` (8) x stride;
* the input transform: ImageNet mean / std, images fitted into and padded to the canvas.
"""

from __future__ import annotations

import pytest
import torch

from ummae.models.detectors import build_detector

TINY = dict(img_size=128, neck_channels=16, fpn_channels=32)


def _outputs(model, x):
    """(stage maps, FPN outputs) of ``x`` through the detector's backbone."""
    seen = {}
    h = model.backbone.body.register_forward_hook(lambda m, a, out: seen.setdefault("maps", out))
    try:
        with torch.no_grad():
            out = model.backbone(x)
    finally:
        h.remove()
    return seen["maps"], out


@pytest.fixture(scope="module")
def gfl():
    torch.manual_seed(0)
    return build_detector("gfl", "swin_test", 4, **TINY).eval()


def test_p3_p7_detectors__stages_2_to_4_and_extras_on_the_fpn_output(gfl):
    x = torch.randn(1, 3, 128, 128)
    maps, out = _outputs(gfl, x)
    assert list(maps) == ["1", "2", "3"]
    assert [v.shape[-1] for v in maps.values()] == [16, 8, 4]  # strides 8, 16, 32
    p = list(out.values())
    assert [v.shape[-1] for v in p] == [16, 8, 4, 2, 1]  # P3-P7
    extra = gfl.backbone.fpn.extra_blocks
    with torch.no_grad():
        p6 = extra.convs[0](p[2])
        p7 = extra.convs[1](p6)
    torch.testing.assert_close(p[3], p6)
    torch.testing.assert_close(p[4], p7)
    # no activation between them: P6 has negative values that P7 is computed from
    assert (p[3] < 0).any()


def test_gfl_anchors__one_square_anchor_of_8_strides_per_location(gfl):
    assert gfl.anchor_generator.sizes == ((64,), (128,), (256,), (512,), (1024,))
    assert gfl.anchor_generator.aspect_ratios == ((1.0,),) * 5
    assert gfl.octave_base_scale == 8.0


@pytest.mark.parametrize(
    "detector, stages", [("retinanet", ["1", "2", "3"]), ("fcos", ["1", "2", "3"]), ("maskrcnn", ["0", "1", "2", "3"])]
)
def test_other_detectors__the_stages_they_read(detector, stages):
    torch.manual_seed(0)
    model = build_detector(detector, "swin_test", 4, **TINY).eval()
    maps, out = _outputs(model, torch.randn(1, 3, 128, 128))
    assert list(maps) == stages
    sides = [v.shape[-1] for v in out.values()]
    assert sides == ([32, 16, 8, 4, 2] if detector == "maskrcnn" else [16, 8, 4, 2, 1])


def test_transform__imagenet_normalisation_and_the_canvas(gfl):
    t = gfl.transform
    assert t.image_mean == pytest.approx([0.485, 0.456, 0.406]) and t.image_std == pytest.approx([0.229, 0.224, 0.225])
    assert t.min_size == (128,) and t.max_size == 128 and t.size_divisible == 128
    # a 96 x 64 image (in [0, 1]) is normalised, fitted into the canvas and padded to it
    img = torch.rand(3, 96, 64)
    batch, _ = t([img])
    assert batch.tensors.shape == (1, 3, 128, 128)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    h, w = batch.image_sizes[0]
    assert (h, w) == (128, 85)
    want = torch.nn.functional.interpolate(
        ((img - mean) / std)[None], size=(h, w), mode="bilinear", align_corners=False
    )[0]
    torch.testing.assert_close(batch.tensors[0, :, :h, :w], want, atol=1e-4, rtol=1e-4)
