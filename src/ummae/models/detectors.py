"""The detectors of :mod:`ummae.detector_specs` on the dense backbone (:mod:`.dense`: the stage
maps, each LayerNorm + Linear to 768 channels) and an FPN, registered as heads of kind
``detect``, one per spec: ``create_model("gfl_swin_tiny_256", num_classes=81, ...)`` (or
:func:`build_detector`) builds one, and records what rebuilds it.

A spec names the detector's class (torchvision's ``MaskRCNN``, ``RetinaNet``, ``FCOS``, ...
or ours: :class:`~ummae.models.gfl.GFL`, :class:`~ummae.models.cascade.CascadeMaskRCNN`) and
its pyramid: ``P2_P6`` (all four stages, P6 by max pool: torchvision's Mask R-CNN, MAE's /
ViTDet's benchmark) or ``P3_P7`` (from stage 2 on, two extra levels on the output: the
reference's GFL config). The model is an instance of that class with :class:`Detector` mixed
in: the input transform, the region ``--compile`` compiles and the recorded options are its own.

``num_classes`` counts torchvision's background (K + 1). Images are normalised on the device
by torchvision's transform (timm's ImageNet mean and std, as every data pipeline uses).
"""

from __future__ import annotations

import functools
import importlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool
from torchvision.ops.misc import Conv2dNormActivation

from ummae.detector_specs import SPECS, DetectorSpec, check_options, detector_spec
from ummae.errors import UsageError
from ummae.models.dense import StageMaps, build_stage_maps, encoder_options
from ummae.models.registry import create_model, register_model
from ummae.models.rpn import MMDetRPN


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


# How a pyramid's levels above the last stage are made (ummae.detector_specs.Pyramid.extra), with
# the FPN's norm layer
_EXTRA_LEVELS: dict[str, Callable[[int, int, Any], ExtraFPNBlock]] = {
    "max_pool": lambda channels, levels, norm: LastLevelMaxPool(),
    "conv_on_output": lambda channels, levels, norm: ExtraLevelsOnOutput(channels, norm, levels),
}
# --fpn-norm: the norm after each FPN conv (BatchNorm becomes SyncBN under DDP on CUDA)
FPN_NORMS: dict[str, Any] = {"none": None, "bn": nn.BatchNorm2d}
# --rpn-assign: how a two-stage detector's RPN is made from torchvision's
RPN_RULES: dict[str, Callable[[nn.Module], nn.Module]] = {"torchvision": lambda rpn: rpn, "mmdet": MMDetRPN.like}


class Detector:
    """What every detector built here has besides its class (a spec's ``builder``, the next base
    of the classes :func:`detector_class` makes): the stage maps and FPN of the spec's pyramid,
    the input transform of the ``img_size`` canvas, the region ``--compile`` compiles, and
    :meth:`options`, what ``create_model`` records to rebuild it. ``options_and_names``: the
    spec's options (one it does not take is refused) and what is only recorded (category ids
    and names)."""

    # What --compile compiles (engine.trainer.compiled): the backbone and FPN always see the
    # img_size canvas; target matching and box decoding are data-dependent Python
    compile_region = "backbone"

    def __init__(
        self,
        spec: DetectorSpec,
        backbone: str,
        num_classes: int,
        img_size: int = 1024,
        neck_channels: int = 768,
        fpn_channels: int = 256,
        drop_path: float | None = None,
        window_size: int | None = None,
        neck: str = "ln_linear",
        pos_embed_mode: str = "interpolate",
        **options_and_names: Any,
    ):
        check_options(spec, options_and_names)
        options = {o.name: _or(options_and_names.pop(o.name, None), spec.default(o.name)) for o in spec.options}
        part = {o.name: o.part for o in spec.options}
        backbone_options = {k: v for k, v in options.items() if part[k] == "backbone"}
        pyramid = spec.pyramid
        # the reference's DET backbones: LayerNorm + Linear projections; PVT keeps its pre-trained
        # position table and interpolates it to the input on every forward (DET/pvt.py)
        body = build_stage_maps(
            backbone, img_size, neck_channels, drop_path, window_size, pyramid.stages, neck, pos_embed_mode,
            **backbone_options,
        )  # fmt: skip
        norm = FPN_NORMS[options["fpn_norm"]]
        extra = _EXTRA_LEVELS[pyramid.extra](fpn_channels, pyramid.extra_levels, norm)
        # the head options, under the class's own keywords (the backbone's went to the stage
        # maps; the FPN norm and the RPN rule, part "detector", are applied here)
        builder_options = {spec.keywords.get(k, k): v for k, v in options.items() if part[k] == "head"}
        super().__init__(
            FeaturePyramid(body, fpn_channels, extra, norm), num_classes, **spec.builder_args, **builder_options
        )
        if "rpn_assign" in options:
            self.rpn = RPN_RULES[options["rpn_assign"]](self.rpn)
        # Training images come as the img_size canvas of the jitter (no resize); evaluation
        # images are fitted into it (min_size = max_size: scale = img_size / long side) and padded
        # to it (size_divisible = img_size), so the backbone always sees the size it trains at.
        self.transform = GeneralizedRCNNTransform(
            img_size, img_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, size_divisible=img_size, _skip_resize=True
        )
        self.spec = spec
        self._options = dict(
            detector=spec.name,
            backbone=backbone,
            num_classes=num_classes,
            img_size=img_size,
            neck_channels=neck_channels,
            fpn_channels=fpn_channels,
            **encoder_options(body),
            **options,
            **options_and_names,
        )

    def options(self) -> dict[str, Any]:
        """What rebuilds this model (``create_model`` records it as ``model_args``)."""
        return dict(self._options)


def _or(value: Any, default: Any) -> Any:
    """``value``, or ``default`` where it is None (a flag left at "the detector's")."""
    return default if value is None else value


@functools.cache
def detector_class(builder: str) -> type:
    """The class a spec's ``builder`` (``"module:Class"``) names, with :class:`Detector` mixed in.
    Imported here, when a model is built: the specs are read without torch."""
    module, name = builder.split(":")
    base = getattr(importlib.import_module(module), name)
    return type(base.__name__, (Detector, base), {"__module__": __name__, "__doc__": base.__doc__})


def build_detector(detector: str, backbone: str, num_classes: int, **options: Any) -> nn.Module:
    """``detector`` (a spec's name) on the stage maps of ``backbone``, from scratch, through the
    registry (``<detector>_<backbone>``: it records the options). ``options``: :class:`Detector`'s
    keywords (None: the default) and the spec's options."""
    return create_model(f"{detector_spec(detector).name}_{backbone}", num_classes=num_classes, **options)


def _register(spec: DetectorSpec) -> None:
    """``spec``'s entry in the registry: ``<name>_<backbone>`` builds it."""

    def build(**kw: Any) -> nn.Module:
        # a checkpoint's options name the detector too
        named = kw.pop("detector", spec.name)
        if named != spec.name:
            raise UsageError(f"model {spec.name}_{kw.get('backbone')} is a {spec.name} detector, not a {named} one")
        return detector_class(spec.builder)(spec, **kw)

    build.__name__ = build.__qualname__ = spec.name
    register_model("detect")(build)


for _spec in SPECS.values():
    _register(_spec)
