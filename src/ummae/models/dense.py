"""The dense-prediction backbone shared by detection and segmentation (METHOD.md, "Transfer
settings"): the encoder runs densely on the full image (Swin window 16, PVT sr 8-4-2-1,
positions for the new size) and the output of the last block of each of its four stages
(strides 4, 8, 16, 32) goes through its own LayerNorm + Linear to ``out_channels`` (768),
the reference's ``up1..up4``.

The seam is the one classification uses: the encoder is that of a registered classifier, and
``forward`` returns torchvision's ``OrderedDict`` '0'..'3' of stage maps, so any pyramid
encoder we register is a detection and segmentation backbone. Pre-trained weights load into
:meth:`StageMaps.as_classifier` as into that classifier, with the same key report.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from timm.layers import trunc_normal_
from torch import Tensor, nn

from ummae.errors import UsageError
from ummae.models.base import PyramidBackbone
from ummae.models.classifier import Classifier
from ummae.models.registry import create_model, model_kind


class StageMaps(nn.Module):
    """``encoder`` -> ``OrderedDict`` '0'..'3' of ``[N, out_channels, S/4/2^i, S/4/2^i]``, or
    of the ``stages`` a head uses (P3-P7 detectors: 1, 2, 3): a projection no head reads
    would get no gradient, which DDP refuses. ``backbone`` / ``img_size``: the registered
    classifier the encoder comes from, and the size it was built at."""

    def __init__(
        self,
        encoder: PyramidBackbone,
        out_channels: int = 768,
        stages: Sequence[int] = (0, 1, 2, 3),
        backbone: str = "",
        img_size: int = 0,
    ):
        super().__init__()
        self.encoder = encoder
        # Every stage gets its own norm below; the encoder's final norm (the classifier's
        # fc_norm replaces it too) would norm the last stage twice.
        self.encoder.norm = nn.Identity()
        self.out_channels = out_channels
        self.backbone = backbone
        self.img_size = img_size
        # nn.LayerNorm's eps 1e-5, as the reference builds these layers
        self.proj = nn.ModuleDict(
            {
                str(i): nn.Sequential(
                    nn.LayerNorm(encoder.embed_dims[i]), nn.Linear(encoder.embed_dims[i], out_channels)
                )
                for i in stages
            }
        )
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.encoder.forward_dense(x)
        return OrderedDict(
            (k, proj(maps[int(k)].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)) for k, proj in self.proj.items()
        )

    def as_classifier(self) -> Classifier:
        """The classifier (no head) this backbone's encoder belongs to, sharing the encoder's
        tensors: what pre-trained weights load into, exactly as ``ummae finetune
        --pretrained`` loads them (same checks, same key report). No random draw: the
        classifier's norm starts at (1, 0) and it has no head."""
        view = Classifier(self.encoder, num_classes=0, img_size=self.img_size)
        view.model_name = self.backbone
        return view


def stage_maps_of(model: nn.Module) -> StageMaps:
    """The :class:`StageMaps` inside a detector or segmenter."""
    for m in model.modules():
        if isinstance(m, StageMaps):
            return m
    raise ValueError(f"{type(m).__name__} has no stage-map backbone")


def check_dense_backbone(name: str) -> None:
    """Refuse what cannot give four stage maps: a pre-training model name or a plain ViT."""
    if model_kind(name) != "classify":
        raise UsageError(
            f"--backbone {name!r} is a pre-training model; give its encoder's name (`ummae models --kind "
            f"classify`, e.g. swin_tiny_256) and the checkpoint with --pretrained"
        )


def build_stage_maps(
    backbone: str,
    img_size: int,
    out_channels: int = 768,
    drop_path: float | None = None,
    window_size: int | None = None,
    stages: Sequence[int] = (0, 1, 2, 3),
) -> StageMaps:
    """The encoder of the registered classifier ``backbone`` at ``img_size``, as
    :class:`StageMaps` (initialised from scratch: the task loads its ``--pretrained``)."""
    check_dense_backbone(backbone)
    kwargs: dict[str, Any] = dict(num_classes=0, img_size=img_size, drop_path=drop_path)
    if window_size is not None:
        kwargs["window_size"] = window_size
    classifier = create_model(backbone, **kwargs)
    if not isinstance(classifier.encoder, PyramidBackbone):
        raise UsageError(
            f"--backbone {backbone}: a plain ViT has one map at stride 16, not the four stage maps "
            f"detection and segmentation take; use a Swin or PVT backbone"
        )
    return StageMaps(classifier.encoder, out_channels, stages, backbone, img_size)


def encoder_options(maps: StageMaps) -> dict[str, Any]:
    """What rebuilds the encoder as trained (recorded in a checkpoint's ``model_args``)."""
    enc = maps.encoder
    out: dict[str, Any] = {"drop_path": enc.drop_path_rate}
    if hasattr(enc, "window_size"):
        out["window_size"] = enc.window_size
    return out
