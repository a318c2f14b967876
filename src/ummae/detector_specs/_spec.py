"""What a detector spec is made of (:mod:`ummae.detector_specs`): its pyramid, its options, the
spec itself. Plain data: no torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pyramid:
    """The FPN a detector reads: over the backbone's stage maps ``stages`` (0..3: strides 4..32),
    and ``extra_levels`` more levels above the last one, made by ``extra``: ``max_pool``
    (torchvision's ``LastLevelMaxPool``) or ``conv_on_output`` (MMDetection's
    ``add_extra_convs='on_output'``: 3x3 stride-2 convs on the last FPN output)."""

    stages: tuple[int, ...]
    extra: str
    extra_levels: int

    @property
    def levels(self) -> tuple[int, ...]:
        """The pyramid levels: P<l> has stride 2**l; stage ``s`` (stride 2**(s + 2)) gives P<s + 2>."""
        first = self.stages[0] + 2
        return tuple(range(first, first + len(self.stages) + self.extra_levels))

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2**level for level in self.levels)

    def __str__(self) -> str:
        return f"P{self.levels[0]}-P{self.levels[-1]} from stage {self.stages[0] + 1}"


# torchvision's Mask R-CNN FPN (MAE's / ViTDet's benchmark): all four stages, P6 by max pool
P2_P6 = Pyramid(stages=(0, 1, 2, 3), extra="max_pool", extra_levels=1)
# the reference's GFL config: MMDetection's start_level=1 and two extra convs on the output
P3_P7 = Pyramid(stages=(1, 2, 3), extra="conv_on_output", extra_levels=2)


# What a detector option is a keyword of (DetectorOption.part): the class a spec's builder
# names, or the stage maps under its FPN
OPTION_PARTS = ("head", "backbone", "detector")


@dataclass(frozen=True)
class DetectorOption:
    """An option only some detectors take: ``name`` is the builder's keyword and what a
    checkpoint records, ``help`` its flag's help (after the detectors that take it). Its flag is
    the ``DetectConfig`` field of its name; or, with ``set_by``, that field: a folder the run
    reads, whose presence switches the (bool) option on (``--stuff-maps DIR`` -> ``semantic``).

    ``per_detector``: its default is each detector's (``DetectorSpec.defaults`` overrides
    ``default`` for some), and its flag's default None means "the detector's". ``unrecorded``:
    the value a checkpoint written before the option existed was trained with (None: the
    detector's default); ``replaces``: an older key that option stood for and how its values map
    (``("soft_nms", {True: "soft_gaussian", False: "nms"})``).

    ``part``: what takes it, :data:`OPTION_PARTS`: a keyword of the spec's class (``"head"``),
    of the stage maps its backbone builds (``"backbone"``, :func:`ummae.models.dense.build_stage_maps`),
    or applied by :class:`ummae.models.detectors.Detector` to any class (``"detector"``: the FPN
    norm, the RPN rule)."""

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    set_by: str = ""
    per_detector: bool = False
    unrecorded: Any = None
    replaces: tuple[str, Mapping[Any, Any]] | None = field(default=None, hash=False)
    accepts: Mapping[str, Any] = field(default_factory=dict, hash=False)  # the flag's bounds (ge, le)
    part: str = "head"

    def __post_init__(self):
        assert self.part in OPTION_PARTS, f"option {self.name}: part {self.part!r} is not one of {OPTION_PARTS}"

    @property
    def field_name(self) -> str:
        """The ``DetectConfig`` field (and flag) that sets the option."""
        return self.set_by or self.name

    @property
    def flag(self) -> str:
        return "--" + self.field_name.replace("_", "-")

    @property
    def field_default(self) -> Any:
        """The field's value when the flag is not given: the option's default, or None (no
        folder; the detector's default)."""
        return None if self.set_by or self.per_detector else self.default

    def from_field(self, value: Any) -> Any:
        """The option's value for the field's ``value`` (None: the detector's default)."""
        return bool(value) if self.set_by else value


# How a detector leaves PyTorch (DetectorSpec.onnx): what its ONNX graph takes and gives
ONNX_FORMS = {
    "torchvision": "the whole model as torchvision exports it: one image [3, H, W] in [0, 1] in; boxes, labels, "
    "scores (and masks) out, post-processing included",
    "raw": "backbone + head to raw outputs: the normalised, padded img_size canvas [N, 3, S, S] in; "
    "cls_logits, bbox_regression and anchors out; decoding and NMS are left to the caller (docs)",
}


@dataclass(frozen=True)
class DetectorSpec:
    """One detector. ``builder``: ``"module:Class"``, called as ``Class(pyramid, num_classes,
    **builder_args, **options)``; ``masks``: instance masks too (box and mask AP, the training
    targets carry masks); ``onnx``: how ``ummae export --format onnx`` exports it
    (:data:`ONNX_FORMS`), "" where it cannot."""

    name: str
    summary: str  # one line: what it is
    builder: str
    pyramid: Pyramid
    masks: bool
    follows: str  # the configuration it follows
    options: tuple[DetectorOption, ...] = ()
    onnx: str = ""
    builder_args: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # this detector's default of an option, where it is not the option's (per_detector options)
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # what a checkpoint written before an option was trained with, where not the option's unrecorded
    unrecorded: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # the builder's keyword for an option it names otherwise (torchvision's box_score_thresh ...)
    keywords: Mapping[str, str] = field(default_factory=dict, hash=False)
    # every way it differs from ``follows`` (markdown, one item each): the differences page
    differences: tuple[str, ...] = ()

    @property
    def iou_types(self) -> tuple[str, ...]:
        """What COCO evaluation measures: box AP, and mask AP for a mask detector."""
        return ("bbox", "segm") if self.masks else ("bbox",)

    def takes(self, option: str) -> bool:
        return any(o.name == option for o in self.options)

    def option(self, name: str) -> DetectorOption:
        return next(o for o in self.options if o.name == name)

    def default(self, option: str) -> Any:
        """This detector's default of ``option``."""
        return self.defaults.get(option, self.option(option).default)

    def value_unrecorded(self, option: str) -> Any:
        """The value of ``option`` a checkpoint that does not record it was trained with."""
        if option in self.unrecorded:
            return self.unrecorded[option]
        before = self.option(option).unrecorded
        return self.default(option) if before is None else before
