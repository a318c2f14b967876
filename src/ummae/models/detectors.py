"""Detectors on the dense backbone (:mod:`.dense`: the four stage maps, each LayerNorm +
Linear to 768 channels), registered as heads of kind ``detect``: ``create_model(
"gfl_swin_tiny_256", num_classes=81, ...)`` builds one, and records what rebuilds it.

* ``gfl``: the paper's protocol (the reference's ``gfl_mae_swin_tiny_256_..._fpn``): FPN from
  stage 2 on (strides 8-32) with two extra levels on its output (P3-P7), BatchNorm, the GFL
  head (:mod:`.gfl`);
* ``maskrcnn``: torchvision's Mask R-CNN on an FPN over all four stages (P2-P6), the transfer
  benchmark of MAE / SimMIM;
* ``retinanet`` / ``fcos``: torchvision's, on the P3-P7 pyramid of GFL;
* ``cascade_maskrcnn`` / ``htc``: MMDetection 2.x's Cascade Mask R-CNN and HTC on the P2-P6
  pyramid of Mask R-CNN (:mod:`.cascade`); ``box_head`` (``2fc`` / ``4conv1fc``), ``box_norm``
  and ``soft_nms`` set the Swin paper's variants, ``semantic`` (htc only) builds HTC's
  semantic-segmentation branch (trained on COCO-stuff maps).

``num_classes`` counts torchvision's background (K + 1). Images are normalised on the device
by torchvision's transform (timm's ImageNet mean and std, as every data pipeline uses).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool
from torchvision.ops.misc import Conv2dNormActivation

from ummae.choices import BOX_HEADS, BOX_NORMS, DETECTORS
from ummae.errors import UsageError
from ummae.models.cascade import CascadeMaskRCNN
from ummae.models.dense import StageMaps, build_stage_maps, encoder_options
from ummae.models.gfl import GFL
from ummae.models.registry import register_model


class ExtraLevelsOnOutput(ExtraFPNBlock):
    """P6 and P7 as MMDetection's ``add_extra_convs='on_output'`` makes them for GFL: 3x3
    stride-2 convs on the last FPN output, each followed by the FPN's norm, no activation
    in between (torchvision's ``LastLevelP6P7`` puts a ReLU before P7 and has no norm)."""

    def __init__(self, channels: int, norm_layer=None, levels: int = 2):
        super().__init__()
        self.convs = nn.ModuleList(
            Conv2dNormActivation(channels, channels, 3, stride=2, norm_layer=norm_layer, activation_layer=None)
            for _ in range(levels)
        )

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]):
        for i, conv in enumerate(self.convs):
            results.append(conv(results[-1]))
            names.append(f"extra{i}")
        return results, names


class FeaturePyramid(nn.Module):
    """``body`` (:class:`StageMaps`) + torchvision's FPN over its stage maps;
    ``out_channels`` is what torchvision's detectors read."""

    def __init__(self, body: StageMaps, out_channels: int, extra_blocks: ExtraFPNBlock, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork([body.out_channels] * len(body.proj), out_channels, extra_blocks, norm_layer)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


_DETECTOR_CLASSES = {
    "gfl": GFL,
    "maskrcnn": MaskRCNN,
    "retinanet": RetinaNet,
    "fcos": FCOS,
    "cascade_maskrcnn": CascadeMaskRCNN,
    "htc": functools.partial(CascadeMaskRCNN, htc=True),
}
CASCADES = ("cascade_maskrcnn", "htc")


def build_detector(
    detector: str,
    backbone: str,
    num_classes: int,
    img_size: int = 1024,
    neck_channels: int = 768,
    fpn_channels: int = 256,
    drop_path: float | None = None,
    window_size: int | None = None,
    neck: str = "ln_linear",
    pos_embed_mode: str = "interpolate",
    box_head: str = "2fc",
    box_norm: str = "none",
    soft_nms: bool = False,
    semantic: bool = False,
    **names: Any,
) -> nn.Module:
    """``detector`` on the stage maps of ``backbone``, from scratch; ``names`` (category ids
    and names) are recorded with the options. ``box_head``, ``box_norm`` and ``soft_nms``: the
    cascade detectors' (recorded for them only); ``semantic``: HTC's semantic branch (recorded
    for htc). Called through the registry (``create_model``)."""
    if detector not in DETECTORS:
        raise UsageError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    if box_head not in BOX_HEADS or box_norm not in BOX_NORMS:
        raise UsageError(f"box head {box_head!r} / norm {box_norm!r}: choose {BOX_HEADS} / {BOX_NORMS}")
    cascade = dict(box_head=box_head, box_norm=box_norm, soft_nms=bool(soft_nms)) if detector in CASCADES else {}
    if detector == "htc":
        cascade["semantic"] = bool(semantic)
    elif semantic:
        raise UsageError(f"the semantic branch (COCO-stuff maps) is HTC's, not {detector}'s: use --detector htc")
    # Mask R-CNN: P2-P6, as torchvision's and MAE's / ViTDet's; the others P3-P7: from stage 2
    # on, two extra levels on the output
    two_stage = detector == "maskrcnn" or detector in CASCADES
    stages = [0, 1, 2, 3] if two_stage else [1, 2, 3]
    # the reference's DET backbones: LayerNorm + Linear projections; PVT keeps its pre-trained
    # position table and interpolates it to the input on every forward (DET/pvt.py)
    body = build_stage_maps(backbone, img_size, neck_channels, drop_path, window_size, stages, neck, pos_embed_mode)
    extra = LastLevelMaxPool() if two_stage else ExtraLevelsOnOutput(fpn_channels, nn.BatchNorm2d)
    model = _DETECTOR_CLASSES[detector](FeaturePyramid(body, fpn_channels, extra), num_classes, **cascade)
    # Training images come as the img_size canvas of the jitter (no resize); evaluation
    # images are fitted into it (min_size = max_size: scale = img_size / long side) and padded
    # to it (size_divisible = img_size), so the backbone always sees the size it trains at.
    model.transform = GeneralizedRCNNTransform(
        img_size, img_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, size_divisible=img_size, _skip_resize=True
    )
    # What --compile compiles (engine.trainer.compiled): the backbone and FPN always see the
    # img_size canvas; target matching and box decoding are data-dependent Python
    model.compile_region = "backbone"
    # torchvision's detectors have no options(): what create_model records
    model.options = functools.partial(
        dict,
        detector=detector,
        backbone=backbone,
        num_classes=num_classes,
        img_size=img_size,
        neck_channels=neck_channels,
        fpn_channels=fpn_channels,
        **encoder_options(body),
        **cascade,
        **names,
    )
    return model


def _detector(detector: str, kw: dict) -> nn.Module:
    """``detector`` with the options ``kw``, which name it too when they come from a checkpoint."""
    named = kw.pop("detector", detector)
    if named != detector:
        raise UsageError(f"model {detector}_{kw.get('backbone')} is a {detector} detector, not a {named} one")
    return build_detector(detector, **kw)


@register_model("detect")
def gfl(**kw):
    return _detector("gfl", kw)


@register_model("detect")
def maskrcnn(**kw):
    return _detector("maskrcnn", kw)


@register_model("detect")
def retinanet(**kw):
    return _detector("retinanet", kw)


@register_model("detect")
def fcos(**kw):
    return _detector("fcos", kw)


@register_model("detect")
def cascade_maskrcnn(**kw):
    return _detector("cascade_maskrcnn", kw)


@register_model("detect")
def htc(**kw):
    return _detector("htc", kw)
