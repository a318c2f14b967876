"""The dense-prediction backbone shared by detection and segmentation (METHOD.md, "Transfer
settings"): the encoder runs densely on the full image (Swin window 16, PVT sr 8-4-2-1,
positions for the new size) and the output of the last block of each of its four stages
(strides 4, 8, 16, 32) goes through its own LayerNorm + Linear to ``out_channels`` (768),
the reference's ``up1..up4``.

The seam is the one classification uses: ``forward`` returns torchvision's ``OrderedDict``
'0'..'3' of stage maps, so any pyramid encoder we register is a detection and segmentation
backbone. Weights load through the classifier path (:func:`load_pretrained`): a pre-training,
fine-tuning or converted reference checkpoint, with the same key report.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Dict

from timm.layers import trunc_normal_
from torch import Tensor, nn

from ummae.models.base import PyramidBackbone
from ummae.models.registry import create_model, model_kind
from ummae.weights.load import LoadReport, load_pretrained
from ummae.errors import UsageError

log = logging.getLogger("ummae")


class StageMaps(nn.Module):
    """``encoder`` -> ``OrderedDict`` '0'..'3' of ``[N, out_channels, S/4/2^i, S/4/2^i]``, or
    of the ``stages`` a head uses (P3-P7 detectors: 1, 2, 3): a projection no head reads
    would get no gradient, which DDP refuses."""

    def __init__(self, encoder: PyramidBackbone, out_channels: int = 768, stages: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        self.encoder = encoder
        # Every stage gets its own norm below; the encoder's final norm (the classifier's
        # fc_norm replaces it too) would norm the last stage twice.
        self.encoder.norm = nn.Identity()
        self.out_channels = out_channels
        # nn.LayerNorm's eps 1e-5, as the reference builds these layers
        self.proj = nn.ModuleDict(
            {str(i): nn.Sequential(nn.LayerNorm(encoder.embed_dims[i]), nn.Linear(encoder.embed_dims[i], out_channels))
             for i in stages}
        )
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.encoder.forward_dense(x)
        return OrderedDict((k, proj(maps[int(k)].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)) for k, proj in self.proj.items())


def check_dense_backbone(name: str) -> None:
    """Refuse what cannot give four stage maps: a pre-training model name or a plain ViT."""
    if model_kind(name) != "classify":
        raise UsageError(f"--backbone {name!r} is a pre-training model; give its encoder's name (`ummae models --kind "
                         f"classify`, e.g. swin_tiny_256) and the checkpoint with --pretrained")


def build_stage_maps(backbone: str, img_size: int, out_channels: int = 768, drop_path: float | None = None,
                     window_size: int | None = None, pretrained: str | None = None,
                     stages: Sequence[int] = (0, 1, 2, 3)) -> tuple[StageMaps, LoadReport | None]:
    """The encoder of the registered classifier ``backbone`` at ``img_size``, loaded from
    ``pretrained`` (any checkpoint ``ummae finetune --pretrained`` takes), as :class:`StageMaps`."""
    check_dense_backbone(backbone)
    kwargs: Dict[str, Any] = dict(num_classes=0, img_size=img_size, drop_path=drop_path)
    if window_size is not None:
        kwargs["window_size"] = window_size
    classifier = create_model(backbone, **kwargs)
    if not isinstance(classifier.encoder, PyramidBackbone):
        raise UsageError(f"--backbone {backbone}: a plain ViT has one map at stride 16, not the four stage maps "
                         f"detection and segmentation take; use a Swin or PVT backbone")
    report = load_pretrained(classifier, pretrained) if pretrained else None
    return StageMaps(classifier.encoder, out_channels, stages), report


def encoder_options(maps: StageMaps) -> Dict[str, Any]:
    """What rebuilds the encoder as trained (recorded in a checkpoint's ``model_args``)."""
    enc = maps.encoder
    out: Dict[str, Any] = {"drop_path": enc.drop_path_rate}
    if hasattr(enc, "window_size"):
        out["window_size"] = enc.window_size
    return out



def validation(measure: Callable[[nn.Module], Dict[str, float]], val_dir: str, train_dir: str, val_split: str,
               is_main: bool) -> Callable[[nn.Module], Dict[str, float]]:
    """The Trainer's ``evaluate`` of a dense task: ``measure(model)``, logged on rank 0, and
    flagged ``val_is_train`` (with a warning each time) when the val split is the training
    folder, so that no figure measured on the training images passes for a validation one."""
    val_is_train = os.path.realpath(val_dir) == os.path.realpath(train_dir)

    def evaluate(model: nn.Module) -> Dict[str, float]:
        metrics = measure(model)
        if val_is_train:
            metrics["val_is_train"] = 1.0
            if is_main:
                log.warning("the 'val' figures are measured on the TRAINING images (--val-split %s is the "
                            "training split)", val_split)
        if is_main:
            log.info("val: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    return evaluate


def load_task_model(path: str, command: str, is_ours: Callable[[Any, Dict[str, Any]], bool],
                    build: Callable[..., tuple[nn.Module, Any]]) -> nn.Module:
    """The model of a checkpoint that ``ummae COMMAND train`` wrote (any of them): refused in one
    line when ``is_ours(model_name, model_args)`` says it is another's, else rebuilt by
    ``build(**model_args)`` (drop path off: inference) and loaded strictly."""
    from ummae.weights import io as ckpt

    state = ckpt.load(path)
    name = state.get("model_name") if isinstance(state, dict) else None
    args = state.get("model_args") if isinstance(state, dict) else None
    if not (isinstance(args, dict) and is_ours(name, args)):
        raise ckpt.CheckpointError(f"{path} is not a checkpoint of `ummae {command} train` (it holds "
                                   f"{name or 'no model name'}); a backbone checkpoint goes to "
                                   f"`ummae {command} train --pretrained`")
    model, _ = build(**{**args, "drop_path": 0.0})
    model.model_args = args
    ckpt.load_state_strict(model, state["model"], path)
    return model
