"""The dense backbones' two reference forms (issue 25): segmentation projects each stage with a
1x1 convolution (the reference's ``SEG/swin.py``, ``SEG/pvt.py``: ``fpn1..fpn4``), detection with
LayerNorm + Linear (``DET/*.py``: ``up1..up4``); PVT detection keeps the pre-trained 64x64
position table as the parameter and interpolates it to the input on every forward
(``DET/pvt.py`` ``_get_pos_embed``). Checkpoints that record neither still rebuild the forms
they were trained with.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ummae.models.dense import StageMaps, stage_maps_of
from ummae.models.registry import create_model
from ummae.weights.build import build_from_weights


def _segmenter(backbone="pvt_test", **kw):
    return create_model(
        f"upernet_{backbone}", num_classes=5, crop_size=64, neck_channels=24, head_channels=16, aux_channels=8, **kw
    )


def _detector(img_size, backbone="pvt_test", **kw):
    return create_model(f"gfl_{backbone}", num_classes=3, img_size=img_size, neck_channels=16, fpn_channels=16, **kw)


@pytest.mark.parametrize("backbone", ["pvt_test", "swin_test"])
def test_segmentation_projection__is_the_references_1x1_conv(backbone):
    """Each stage map through ``fpn_i = nn.Conv2d(C_i, 768, 1)``, written here as a sum over the
    input channels of every pixel: ``out[n, o, h, w] = sum_c W[o, c] x[n, c, h, w] + b[o]``."""
    torch.manual_seed(0)
    model = _segmenter(backbone).eval()
    maps_module = stage_maps_of(model)
    assert maps_module.neck == "conv" and model.options()["neck"] == "conv"
    for proj in maps_module.proj.values():  # a trained bias, so that it is tested too
        torch.nn.init.normal_(proj.bias)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = maps_module(x)
        stages = maps_module.encoder.forward_dense(x)
    assert list(ours) == ["0", "1", "2", "3"]
    for k, out in ours.items():
        conv = maps_module.proj[k]
        weight = conv.weight.detach()[:, :, 0, 0]  # [out, in]
        plain = torch.einsum("oc,nchw->nohw", weight, stages[int(k)]) + conv.bias.detach()[None, :, None, None]
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
        assert out.shape == (2, 24, 16 >> int(k), 16 >> int(k))


def test_segmentation_projection__init_is_kaiming_fan_out():
    """The reference's ``_init_weights``: ``fan_out = k_h * k_w * out_channels``, weight drawn
    ``normal(0, sqrt(2 / fan_out))`` (untruncated), bias 0."""
    torch.manual_seed(1)
    model = create_model("upernet_swin_test", num_classes=5, crop_size=64, neck_channels=768)
    for conv in stage_maps_of(model).proj.values():
        w = conv.weight.detach().flatten().double()
        std = math.sqrt(2.0 / 768)
        n = w.numel()  # 768 x C_i
        assert abs(w.mean().item()) < 4 * std / math.sqrt(n)
        assert abs(w.std().item() / std - 1) < 4 * math.sqrt(0.5 / n) + 0.01
        assert w.abs().max().item() > 2.5 * std  # a normal draw, not one truncated at 2 std
        assert torch.count_nonzero(conv.bias) == 0


def test_detection_projection__stays_layernorm_linear():
    maps_module = stage_maps_of(_detector(64))
    assert maps_module.neck == "ln_linear"
    for proj in maps_module.proj.values():
        assert isinstance(proj[0], torch.nn.LayerNorm) and isinstance(proj[1], torch.nn.Linear)


def test_pvt_detection__one_table_at_the_pretraining_size_for_every_input_size():
    """pvt_test's own size is 64 px: a 16 x 16 table, whatever size the detector runs at."""
    shapes = {s: stage_maps_of(_detector(s)).encoder.pos_embed.shape for s in (64, 128, 256)}
    assert set(shapes.values()) == {torch.Size([16, 16, 16])}
    assert _detector(128).options()["pos_embed_mode"] == "interpolate"


def _reference_get_pos_embed(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``DET/pvt.py`` ``_get_pos_embed``: the [1, side * side, C] table as an image, interpolated
    bicubically (``align_corners=False``) to the stage-1 map of the input."""
    side, _, c = table.shape
    as_image = table.reshape(1, side, side, c).permute(0, 3, 1, 2)
    return F.interpolate(as_image, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)


def test_pvt_detection__forward_interpolates_the_table_as_the_reference():
    """The detector's backbone at 128 px (a 32 x 32 stage-1 map) equals the same weights with the
    table interpolated once, by the reference's call, into a backbone that holds it at 32 x 32;
    and the gradient reaches the 16 x 16 parameter."""
    torch.manual_seed(2)
    ours = stage_maps_of(_detector(128)).eval()
    with torch.no_grad():
        ours.encoder.pos_embed.add_(torch.randn_like(ours.encoder.pos_embed))  # a trained, not sin-cos, table
    resized = stage_maps_of(_detector(128, pos_embed_mode="resize")).eval()
    state = dict(ours.state_dict())
    state["encoder.pos_embed"] = _reference_get_pos_embed(ours.encoder.pos_embed.detach(), 32, 32)
    resized.load_state_dict(state)
    x = torch.randn(1, 3, 128, 128)
    a, b = ours(x), resized(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    sum(v.sum() for v in a.values()).backward()
    assert ours.encoder.pos_embed.grad is not None and ours.encoder.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["segment", "detect"])
def test_checkpoint_without_the_new_options__rebuilds_the_old_forms(kind):
    """A checkpoint of the current main records no ``neck`` / ``pos_embed_mode``: it was
    LayerNorm + Linear, with a PVT table at the input size; it rebuilds so and loads strictly."""
    if kind == "segment":
        old = _segmenter(neck="ln_linear", pos_embed_mode="resize")
        name = "upernet_pvt_test"
    else:
        old = _detector(128, neck="ln_linear", pos_embed_mode="resize")
        name = "gfl_pvt_test"
    args = {k: v for k, v in old.options().items() if k not in ("neck", "pos_embed_mode")}
    state = old.state_dict()
    rebuilt = build_from_weights(state, {"model_name": name, "model_args": args}, "old.pth", kind)
    maps_module = stage_maps_of(rebuilt)
    assert isinstance(maps_module, StageMaps) and maps_module.neck == "ln_linear"
    assert maps_module.encoder.pos_embed.shape == stage_maps_of(old).encoder.pos_embed.shape
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, state[k]), k
    # a new checkpoint records its forms and rebuilds them
    new = _segmenter() if kind == "segment" else _detector(128)
    again = build_from_weights(new.state_dict(), {"model_name": name, "model_args": new.options()}, "new.pth", kind)
    assert stage_maps_of(again).neck == stage_maps_of(new).neck
    assert stage_maps_of(again).encoder.pos_embed.shape == stage_maps_of(new).encoder.pos_embed.shape
