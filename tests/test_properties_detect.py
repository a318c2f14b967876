"""Properties of the detection parts we wrote around torchvision's detectors
(:mod:`ummae.models.detectors`), against the reference (MMDetection 2.x) written out here:

* the stage-map backbone: the P3-P7 detectors (GFL, RetinaNet, FCOS) read stages 2-4 (strides
  8, 16, 32: MMDetection's ``start_level=1``), Mask R-CNN all four (P2-P5, then P6 by max pool);
* every spec of :mod:`ummae.detector_specs`: its model has the pyramid levels and strides the
  spec states, masks exactly when the spec says, and the options of the other detectors are
  refused in one line;
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

from ummae.config import DetectConfig
from ummae.detector_specs import OPTIONS, SPECS, markdown_table
from ummae.errors import UsageError
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


@pytest.fixture(scope="module")
def built():
    """Every spec's model, built once (random weights, eval mode). 64 FPN channels: FCOS's head
    norms with GroupNorm(32), which needs more than one value per group on the 1 x 1 P7."""
    torch.manual_seed(0)
    return {name: build_detector(name, "swin_test", 4, **{**TINY, "fpn_channels": 64}).eval() for name in SPECS}


@pytest.mark.parametrize("detector", list(SPECS))
def test_every_spec__the_model_reads_the_stages_and_gives_the_levels_the_spec_states(built, detector):
    """Stage s of the backbone has stride 4 * 2**s; the FPN keeps the strides of the stages
    it reads and adds levels above the last, each at twice the stride before; P<l> has
    stride 2**l. Measured on a 128 px input."""
    pyramid = SPECS[detector].pyramid
    maps, out = _outputs(built[detector], torch.randn(1, 3, 128, 128))
    assert [int(k) for k in maps] == list(pyramid.stages)
    assert [128 // v.shape[-1] for v in maps.values()] == [4 * 2**s for s in pyramid.stages]
    strides = [128 // v.shape[-1] for v in out.values()]
    assert len(strides) == len(pyramid.stages) + pyramid.extra_levels
    assert strides == [4 * 2 ** pyramid.stages[0] * 2**i for i in range(len(strides))]
    assert list(pyramid.strides) == strides
    assert [2**level for level in pyramid.levels] == strides


@pytest.mark.parametrize("detector", list(SPECS))
def test_every_spec__masks_exactly_when_the_spec_says(built, detector):
    """A mask detector's detections carry masks (one 1 x H x W map per box, at the image's
    size); a box-only detector's carry none."""
    model = built[detector]
    with torch.no_grad():
        (out,) = model([torch.rand(3, 96, 64)])
    assert {"boxes", "labels", "scores"} <= set(out)
    assert ("masks" in out) == SPECS[detector].masks
    if SPECS[detector].masks:
        assert out["masks"].shape == (len(out["boxes"]), 1, 96, 64)


def _not_default(option):
    """A value of ``option``'s flag other than its default (a folder for a folder flag)."""
    if option.set_by:
        return "stuff/maps"
    if option.choices:
        return next(c for c in option.choices if c != option.default)
    return not option.default


@pytest.mark.parametrize("detector", list(SPECS))
def test_every_spec__the_options_of_other_detectors_are_refused_in_one_line(detector, tmp_path):
    """Each detector option the spec does not take is refused by the builder (even at its
    default) and by the config (set on its flag), naming the flag and the detectors that take
    it; the ones it takes are accepted and recorded."""
    spec = SPECS[detector]
    for name, option in OPTIONS.items():
        takers = [s.name for s in SPECS.values() if option in s.options]
        config = dict(data=str(tmp_path), detector=detector, **{option.field_name: _not_default(option)})
        if option in spec.options:
            DetectConfig(**config).validate()
            continue
        with pytest.raises(UsageError) as by_builder:
            build_detector(detector, "swin_test", 4, **{name: option.default}, **TINY)
        with pytest.raises(UsageError) as by_config:
            DetectConfig(**config).validate()
        for message in (str(by_builder.value), str(by_config.value)):
            assert "\n" not in message and option.flag in message, message
            assert f"--detector {' / '.join(takers)}, not of {detector}" in message, message
    model = build_detector(detector, "swin_test", 4, **{o.name: o.default for o in spec.options}, **TINY)
    assert {k: model.model_args[k] for k in OPTIONS if k in model.model_args} == {
        o.name: o.default for o in spec.options
    }


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


def test_markdown_table__one_row_per_spec_with_its_facts():
    """The docs table: a row per spec in --detector order, with its pyramid, its evaluation
    and the flags of its options."""
    rows = markdown_table().splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{name}`" for name in SPECS]
    for row, spec in zip(rows, SPECS.values(), strict=True):
        levels = spec.pyramid.levels
        assert f"P{levels[0]}-P{levels[-1]} from stage {spec.pyramid.stages[0] + 1}" in row
        assert ("box + mask AP" in row) == spec.masks
        assert all(o.flag in row for o in spec.options)
        assert [o.flag for o in OPTIONS.values() if o.flag in row] == [o.flag for o in spec.options]
