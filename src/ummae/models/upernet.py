"""UperNet (the paper's ADE20K protocol) on the dense backbone (:mod:`.dense`: the four stage
maps, each LayerNorm + Linear to 768 channels, the reference's ``up1..up4``), registered as the
head ``upernet`` of kind ``segment``: ``create_model("upernet_swin_tiny_256", num_classes=150,
...)`` builds one and records what rebuilds it.

* UperNet (MMSegmentation's ``UPerHead``): a pyramid pooling module (scales 1, 2, 3, 6) on the
  last stage map, an FPN fusion of all four, 768 channels, BatchNorm, dropout 0.1;
* an auxiliary FCN head on stage 3 (one 3x3 conv, 256 channels, loss weight 0.4).

No library holds an UperNet that takes our backbone: segmentation_models_pytorch builds its
UPerNet only on its own encoders, and its decoder is not MMSegmentation's (its pooling
branches have ``in_channels / 4`` channels, not the head's); MMSegmentation no longer installs
with current PyTorch. So the head is written here, on torchvision's ``Conv2dNormActivation``,
layer for layer as ``UPerHead`` / ``FCNHead`` build it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from ummae.errors import UsageError
from ummae.models.dense import StageMaps, build_stage_maps, encoder_options
from ummae.models.registry import register_model

POOL_SCALES = (1, 2, 3, 6)


def _conv(in_ch: int, out_ch: int, kernel: int) -> Conv2dNormActivation:
    """MMCV's ``ConvModule``: conv (no bias) + BatchNorm + ReLU, the conv Kaiming-normal
    (fan_out), as MMCV initialises it."""
    block = Conv2dNormActivation(in_ch, out_ch, kernel, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU)
    nn.init.kaiming_normal_(block[0].weight, mode="fan_out", nonlinearity="relu")
    return block


def _classifier(in_ch: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)  # MMSegmentation's conv_seg init
    nn.init.zeros_(conv.bias)
    return conv


def resize(x: Tensor, size) -> Tensor:
    """Bilinear, corners not aligned: MMSegmentation's ``resize`` of logits and maps."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """UperNet's decode head (MMSegmentation's ``UPerHead``): pyramid pooling on the last map,
    lateral 1x1 convs on the others, a top-down pathway, 3x3 convs on each level, all levels
    upsampled to the first and fused by a 3x3 conv; dropout and a 1x1 classifier."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = POOL_SCALES,
        dropout: float = 0.1,
    ):
        super().__init__()
        last = in_channels[-1]
        self.pool = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv(last, channels, 1)) for s in pool_scales)
        self.bottleneck = _conv(last + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(_conv(c, channels, 1) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(_conv(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = _conv(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        top = maps[-1]
        pooled = [resize(branch(top), top.shape[-2:]) for branch in self.pool]
        levels = [lat(m) for lat, m in zip(self.lateral, maps[:-1], strict=True)]
        levels.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[-2:])
        outs = [smooth(x) for smooth, x in zip(self.smooth, levels[:-1], strict=True)] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0], *(resize(x, size) for x in outs[1:])], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head (MMSegmentation's ``FCNHead``, ``num_convs=1``, no input concat)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = _conv(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """MMSegmentation's keep-ratio ``Resize``: the largest size with the image's aspect whose
    long side is at most ``max(scale)`` and short side at most ``min(scale)``."""
    f = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * f + 0.5), int(width * f + 0.5)


def _pad_to(x: Tensor, height: int, width: int) -> Tensor:
    # zeros after normalisation: the mean colour, as the training crops are padded
    return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))


class SegmenterInference:
    """A segmenter's test-time inference (MMSegmentation's ``slide`` / ``whole`` modes and
    ``aug_test``), on what the class provides: ``num_classes``, ``normalize(uint8 images)``,
    ``logits(normalised images)`` and, for whole-image inference, ``fitting_side(side)``.
    The caller sets eval mode, no_grad and the precision (the evaluation loop does)."""

    num_classes: int

    def _logits_at(self, x: Tensor, height: int, width: int) -> Tensor:
        """Logits of normalised ``x`` padded to ``height`` x ``width``, at the input's own size."""
        h, w = x.shape[-2:]
        out = self.logits(_pad_to(x, height, width))
        return resize(out.float(), (height, width))[..., :h, :w]

    def slide_logits(self, x: Tensor, crop: int, stride: int) -> Tensor:
        """MMSegmentation's ``slide_inference``: windows of ``crop`` every ``stride`` px (the last
        one flush with the edge), the logits of overlapping windows averaged. A window smaller
        than ``crop`` (an image side below it) is padded to ``crop``, the size the model trains at."""
        n, _, h, w = x.shape
        rows = max(h - crop + stride - 1, 0) // stride + 1
        cols = max(w - crop + stride - 1, 0) // stride + 1
        total = torch.zeros(n, self.num_classes, h, w, device=x.device)
        count = torch.zeros(1, 1, h, w, device=x.device)
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                total[..., y1:y2, x1:x2] += self._logits_at(x[..., y1:y2, x1:x2], crop, crop)
                count[..., y1:y2, x1:x2] += 1
        return total / count

    def whole_logits(self, x: Tensor) -> Tensor:
        """One pass over the image padded to the nearest size the encoder runs on."""
        h, w = x.shape[-2:]
        return self._logits_at(x, self.fitting_side(h), self.fitting_side(w))

    @torch.no_grad()
    def predict_probs(
        self,
        image: Tensor,
        mode: str,
        crop: int,
        stride: int,
        scale: Sequence[int],
        ratios: Sequence[float] = (1.0,),
        flip: bool = False,
    ) -> Tensor:
        """Class probabilities ``[K, H, W]`` of one uint8 image ``[3, H, W]`` at its own size: the
        image resized to fit ``scale`` x each ratio (and flipped, with ``flip``), the logits of each
        view (``mode`` ``slide`` or ``whole``) resized back to the image and soft-maxed, the views
        averaged (MMSegmentation's ``aug_test``; one view: the plain softmax)."""
        h0, w0 = image.shape[-2:]
        x0 = self.normalize(image.unsqueeze(0))
        probs = torch.zeros(self.num_classes, h0, w0, device=image.device)
        views = 0
        for ratio in ratios:
            size = keep_ratio_size(h0, w0, [round(s * ratio) for s in scale])
            x = resize(x0, size)
            for flipped in [False, True] if flip else [False]:
                xi = x.flip(-1) if flipped else x
                out = self.slide_logits(xi, crop, stride) if mode == "slide" else self.whole_logits(xi)
                out = out.float().flip(-1) if flipped else out.float()
                probs += resize(out, (h0, w0))[0].softmax(0)
                views += 1
        return probs / views


class Segmenter(SegmenterInference, nn.Module):
    """UperNet on :class:`StageMaps`. Takes uint8 (or [0, 255] float) images ``[N, 3, H, W]``
    and normalises them itself (4x fewer bytes to the device).

    ``model(images)``: logits ``[N, K, H/4, W/4]`` of the decode head. ``model(images, labels)``
    (training, through DDP's forward): the losses, ``{"loss", "loss_decode", "loss_aux"}``, each
    the cross-entropy of logits upsampled to the labels, averaged over all pixels (ignored
    ones count 0: MMSegmentation 0.x's mean, which the reference trained with)."""

    AUX_STAGE = 2  # stage 3 (stride 16): the reference's auxiliary head in_index

    def __init__(
        self,
        backbone: StageMaps,
        num_classes: int,
        head_channels: int = 768,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
    ):
        super().__init__()
        self.backbone = backbone
        c = backbone.out_channels
        self.decode_head = UperHead([c] * len(backbone.proj), head_channels, num_classes)
        self.aux_head = FCNHead(c, aux_channels, num_classes) if aux_weight > 0 else None
        self.aux_weight = aux_weight
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        return (images.float() - self.mean) / self.std

    def fitting_side(self, side: int) -> int:
        """The smallest side >= ``side`` the encoder runs on (a multiple of 32: Swin's blocks pad
        their maps to the window in the dense backbone)."""
        enc = self.backbone.encoder
        for s in range(side, side + 4096):
            try:
                enc.check_image_size(s, "size")
                return s
            except ValueError:
                continue
        raise UsageError(f"no input size from {side} px fits {type(enc).__name__}")

    def logits(self, x: Tensor) -> Tensor:
        """Decode-head logits ``[N, K, H/4, W/4]`` of normalised images."""
        return self.decode_head(list(self.backbone(x).values()))

    def forward(self, images: Tensor, labels: Tensor | None = None):
        x = self.normalize(images)
        if labels is None:
            return self.logits(x)
        maps = list(self.backbone(x).values())
        losses = {"loss_decode": self._ce(self.decode_head(maps), labels)}
        if self.aux_head is not None:
            losses["loss_aux"] = self.aux_weight * self._ce(self.aux_head(maps[self.AUX_STAGE]), labels)
        return {"loss": sum(losses.values()), **losses}

    def _ce(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = resize(logits, labels.shape[-2:]).float()
        return F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="none").mean()

    # layer-wise lr decay (engine.optim.param_groups): the encoder's depths, heads at full lr
    @property
    def num_layers(self) -> int:
        return self.backbone.encoder.num_layers

    def layer_id(self, name: str) -> int:
        prefix = "backbone.encoder."
        if name.startswith(prefix):
            return self.backbone.encoder.layer_id(name[len(prefix) :])
        return self.num_layers + 1


@register_model("segment")
def upernet(
    backbone: str,
    num_classes: int,
    crop_size: int = 512,
    neck_channels: int = 768,
    head_channels: int = 768,
    aux_channels: int = 256,
    aux_weight: float = 0.4,
    ignore_index: int = 255,
    drop_path: float | None = None,
    window_size: int | None = None,
    neck: str = "conv",
    pos_embed_mode: str = "resize",
    **settings: Any,
) -> Segmenter:
    """UperNet on ``backbone`` (built at ``crop_size``), from scratch. ``settings`` (data
    conventions, test settings, class names) are recorded with the options: what eval and
    predict rebuild it from. The stage maps are projected as the reference's segmentation
    backbones do (``neck="conv"``: a 1x1 convolution, ``SEG/*.py`` ``fpn1..fpn4``)."""
    body = build_stage_maps(
        backbone, crop_size, neck_channels, drop_path, window_size, neck=neck, pos_embed_mode=pos_embed_mode
    )
    model = Segmenter(body, num_classes, head_channels, aux_channels, aux_weight, ignore_index)
    model.options = functools.partial(
        dict,
        backbone=backbone,
        num_classes=num_classes,
        crop_size=crop_size,
        neck_channels=neck_channels,
        head_channels=head_channels,
        aux_channels=aux_channels,
        aux_weight=aux_weight,
        ignore_index=ignore_index,
        **encoder_options(body),
        **settings,
    )
    return model
