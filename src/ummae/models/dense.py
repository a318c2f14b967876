"""The dense-prediction backbone shared by detection and segmentation (METHOD.md, "Transfer
settings"): the encoder runs densely on the full image (Swin window 16, its maps padded to
the window where it does not tile them; PVT sr 8-4-2-1; positions for the new size) and the
output of the last block of each of its four stages (strides 4, 8, 16, 32) goes through its
own projection to ``out_channels`` (768): a LayerNorm + Linear in detection
(``neck="ln_linear"``, the reference's ``DET/*.py`` ``up1..up4``), a 1x1 convolution in
segmentation (``neck="conv"``, its ``SEG/*.py`` ``fpn1..fpn4``, initialised
normal with std sqrt(2 / out_channels): Kaiming fan-out).

HTC++'s extra global self-attention layer (``global_attn``, a detector option): one more
pre-norm transformer block on the last stage's map before its projection, its attention over
every token of the map (:class:`GlobalAttentionBlock`).

PVT's position table (``pos_embed_mode``, :data:`~ummae.models.classifier.POS_EMBED_MODES`):
detection keeps the pre-trained table at its own size and interpolates it to the input on
every forward (``"interpolate"``, the reference's ``DET/pvt.py``); segmentation builds it at
the crop size, the pre-trained one resized once at load (``"resize"``, its ``SEG/pvt.py``).

The seam is the one classification uses: the encoder is that of a registered classifier, and
``forward`` returns torchvision's ``OrderedDict`` '0'..'3' of stage maps, so any pyramid
encoder we register is a detection and segmentation backbone. Pre-trained weights load into
:meth:`StageMaps.as_classifier` as into that classifier, with the same key report.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from ummae.errors import UsageError
from ummae.models.base import PyramidBackbone
from ummae.models.classifier import Classifier
from ummae.models.family import families
from ummae.models.registry import create_model, model_info, model_kind

NECKS = ("ln_linear", "conv")  # detection's projections, segmentation's


class GlobalAttentionBlock(nn.Module):
    """HTC++'s "extra global self-attention layer appended at the output of last stage" (Swin
    paper, appendix A2.2). Neither Swin's authors nor UM-MAE published HTC++'s code, and the
    public Swin HTC configs (CBNetV2's) have no such layer, so it is built from the paper's
    words in the form of the last stage's own blocks: a pre-norm transformer block (LayerNorm,
    multi-head self-attention, residual; LayerNorm, MLP x4 with GELU, residual) whose one
    window is the whole map: every token attends to every token, with no shift and no
    position bias (a bias table of the window would fix the map's size). ``num_heads``: the
    last stage's. Initialised as Swin initialises its blocks (truncated normal std 0.02,
    zero biases, unit LayerNorms); no stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, C, H, W]`` -> the same shape."""
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        qkv = self.qkv(self.norm1(tokens)).view(n, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [N, heads, HW, d]
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h * w, c)
        tokens = tokens + self.proj(attended)
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(n, c, h, w)


def last_stage_heads(encoder: PyramidBackbone) -> int:
    """The attention heads of the encoder's last stage (Swin's and PVT's blocks alike)."""
    return encoder.stages[-1][0].attn.num_heads


class StageMaps(nn.Module):
    """``encoder`` -> ``OrderedDict`` '0'..'3' of ``[N, out_channels, S/4/2^i, S/4/2^i]``, or
    of the ``stages`` a head uses (P3-P7 detectors: 1, 2, 3): a projection no head reads
    would get no gradient, which DDP refuses. ``backbone`` / ``img_size``: the registered
    classifier the encoder comes from, and the size it was built at. ``neck``: each stage's
    projection, ``"ln_linear"`` (LayerNorm + Linear) or ``"conv"`` (a 1x1 convolution).
    ``global_attn``: HTC++'s :class:`GlobalAttentionBlock` on the last stage's map, before
    its projection (a model without it has no such module, no such keys)."""

    def __init__(
        self,
        encoder: PyramidBackbone,
        out_channels: int = 768,
        stages: Sequence[int] = (0, 1, 2, 3),
        backbone: str = "",
        img_size: int = 0,
        neck: str = "ln_linear",
        global_attn: bool = False,
    ):
        super().__init__()
        if neck not in NECKS:
            raise UsageError(f"neck must be one of {', '.join(NECKS)}, got {neck!r}")
        self.encoder = encoder
        # Every stage gets its own projection below; the encoder's final norm (the
        # classifier's fc_norm replaces it too) would norm the last stage twice.
        self.encoder.norm = nn.Identity()
        self.out_channels = out_channels
        self.backbone = backbone
        self.img_size = img_size
        self.neck = neck
        self.pos_embed_mode = "resize"  # how the encoder's position table was built (build_stage_maps)
        self.proj = nn.ModuleDict({str(i): _projection(neck, encoder.embed_dims[i], out_channels) for i in stages})
        self.global_attn = (
            GlobalAttentionBlock(encoder.embed_dims[-1], last_stage_heads(encoder)) if global_attn else None
        )

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.encoder.forward_dense(x)
        if self.global_attn is not None:
            maps[-1] = self.global_attn(maps[-1])
        if self.neck == "conv":
            return OrderedDict((k, proj(maps[int(k)])) for k, proj in self.proj.items())
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


def _projection(neck: str, in_channels: int, out_channels: int) -> nn.Module:
    """One stage's projection, initialised as the reference's: LayerNorm (nn.LayerNorm's eps
    1e-5) + Linear (truncated normal, std 0.02), or a 1x1 convolution drawn normal with std
    sqrt(2 / fan_out), fan_out = 1 x 1 x out_channels (``SEG/*.py`` ``_init_weights``), bias 0."""
    if neck == "conv":
        conv = nn.Conv2d(in_channels, out_channels, 1)
        nn.init.normal_(conv.weight, std=math.sqrt(2.0 / out_channels))
        nn.init.zeros_(conv.bias)
        return conv
    linear = nn.Linear(in_channels, out_channels)
    trunc_normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.LayerNorm(in_channels), linear)


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
    neck: str = "ln_linear",
    pos_embed_mode: str = "resize",
    global_attn: bool = False,
) -> StageMaps:
    """The encoder of the registered classifier ``backbone`` at ``img_size``, as
    :class:`StageMaps` (initialised from scratch: the task loads its ``--pretrained``).
    ``neck``, ``pos_embed_mode`` and ``global_attn``: see the module's text."""
    check_dense_backbone(backbone)
    kwargs: dict[str, Any] = dict(num_classes=0, img_size=img_size, drop_path=drop_path, pos_embed_mode=pos_embed_mode)
    kwargs.update(families()[model_info(backbone).family].backbone)  # Swin: pad maps to the window
    if window_size is not None:
        kwargs["window_size"] = window_size
    classifier = create_model(backbone, **kwargs)
    if not isinstance(classifier.encoder, PyramidBackbone):
        raise UsageError(
            f"--backbone {backbone}: a plain ViT has one map at stride 16, not the four stage maps "
            f"detection and segmentation take; use a Swin or PVT backbone"
        )
    maps = StageMaps(classifier.encoder, out_channels, stages, backbone, img_size, neck, global_attn)
    maps.pos_embed_mode = pos_embed_mode
    return maps


def encoder_options(maps: StageMaps) -> dict[str, Any]:
    """What rebuilds the encoder and its projections as trained (recorded in a checkpoint's
    ``model_args``). A checkpoint written before ``neck`` and ``pos_embed_mode`` were
    recorded holds the forms of then, LayerNorm + Linear and a resized table: what
    :func:`ummae.weights.build.build_from_checkpoint` rebuilds it with."""
    enc = maps.encoder
    out: dict[str, Any] = {"drop_path": enc.drop_path_rate, "neck": maps.neck}
    if hasattr(enc, "window_size"):
        out["window_size"] = enc.window_size
    if getattr(enc, "pos_embed", None) is not None:
        out["pos_embed_mode"] = maps.pos_embed_mode
    return out
