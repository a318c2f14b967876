"""Image classification with a pre-trained encoder: the fine-tuning, probing and eval model.

``Classifier(encoder, num_classes)``: global average pooling of the last stage + LayerNorm +
linear head (METHOD.md; MAE's ``global_pool`` convention: the encoder's final norm is replaced
by the norm after pooling). Registered under the reference names (``swin_tiny_256``,
``pvt_small_256``, ``vit_base_patch16``...) in our registry (models/family.py) and, once
``ummae.register_timm()`` has run, as ``ummae_<name>`` in timm's (:func:`register_with_timm`).
Fine-tuning settings that differ from pre-training are the models' defaults: Swin window 16,
PVT spatial reduction 8-4-2-1 and a learnable position embedding.
"""

from __future__ import annotations

from typing import Any

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import is_model
from timm.models import register_model as timm_register
from torch import Tensor, nn

from ummae.errors import UsageError
from ummae.models.base import PyramidBackbone
from ummae.models.layers import LayerNorm, init_weights
from ummae.models.registry import classifier_for, create_model, list_models, model_kind

# classifier_for is the registry's (each family registers its pairings), offered here as before
__all__ = [
    "POS_EMBED_MODES",
    "Classifier",
    "build_classifier",
    "check_classifier",
    "classifier_for",
    "register_with_timm",
]


class Classifier(nn.Module):
    """timm's model surface: ``forward_features`` -> ``forward_head(pre_logits)`` -> logits."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int = 1000,
        img_size: int = 256,
        drop_rate: float = 0.0,
        layer_decay: float = 0.75,
    ):
        super().__init__()
        if num_classes < 0:
            raise UsageError(f"num_classes must be >= 0 (0 = no head), got {num_classes}")
        self.pyramid = isinstance(encoder, PyramidBackbone)
        if self.pyramid:
            encoder.check_image_size(img_size, f"image size {img_size}")
        elif img_size % encoder.patch_size:
            raise UsageError(f"image size {img_size} is not a multiple of the {encoder.patch_size}px patch")
        self.encoder = encoder
        self.encoder.norm = nn.Identity()  # pooled features are normed by fc_norm instead
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_features = encoder.num_features
        self.default_layer_decay = layer_decay
        self.fc_norm = LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.pretrained_cfg = self.default_cfg = dict(
            input_size=(3, img_size, img_size),
            num_classes=num_classes,
            interpolation="bicubic",
            crop_pct=224 / 256 if img_size <= 224 else 1.0,  # MAE's evaluation crop (util/datasets.py)
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            first_conv="encoder.patch_embed.proj",
            classifier="head",
        )

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        # A near-zero head (std 2e-5, MAE) keeps the first updates from wrecking the encoder.
        trunc_normal_(head.weight, std=2e-5)
        nn.init.zeros_(head.bias)
        return head

    def options(self) -> dict[str, Any]:
        enc = self.encoder
        opts: dict[str, Any] = dict(img_size=self.img_size, num_classes=self.num_classes, drop_path=enc.drop_path_rate)
        if hasattr(enc, "window_size"):  # Swin
            opts["window_size"] = enc.window_size
        if hasattr(enc, "sr_ratios"):  # PVT
            opts["sr_ratios"] = list(enc.sr_ratios)
        return opts

    # timm's classifier API
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"only global average pooling is supported, got {global_pool!r}")
        self.num_classes = num_classes
        self.head = self._new_head(num_classes).to(self.fc_norm.weight.device)

    def use_probe_head(self) -> None:
        """Linear probing (MAE): freeze everything, then a new BatchNorm1d without affine +
        linear head (std 0.01). With drop path 0 the frozen body has no train-mode behaviour,
        and no activation is kept for backward since nothing before the head needs a grad."""
        for p in self.parameters():
            p.requires_grad = False
        linear = nn.Linear(self.num_features, self.num_classes)
        trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(self.num_features, affine=False, eps=1e-6), linear)
        self.head.to(self.fc_norm.weight.device)
        if hasattr(self, "model_args"):
            self.model_args["probe_head"] = True

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    def layer_id(self, name: str) -> int:
        if name.startswith("encoder."):
            return self.encoder.layer_id(name[len("encoder.") :])
        return self.num_layers + 1  # fc_norm and head: full lr

    def forward_features(self, x: Tensor) -> Tensor:
        """``[N, 3, S, S]`` -> last-stage map ``[N, C, h, w]`` (pyramid) or tokens
        ``[N, 1 + L, D]`` (ViT, cls first)."""
        if self.pyramid:
            return self.encoder.forward_dense(x)[-1]
        return self.encoder.forward_features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3)) if self.pyramid else x[:, 1:].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --- building the registered classifiers (models/family.py registers them) -------------------
# A learnable position table (PVT, ViT) for an input of another size than the model's own:
# "resize" builds it at the input's size (a pre-trained table is resized once, at load);
# "interpolate" keeps it at the model's own size (the pre-trained 64x64 at 256 px) and the
# forward interpolates it to the input every time (the reference's DET/pvt.py).
POS_EMBED_MODES = ("resize", "interpolate")
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def build_classifier(
    name: str,
    encoder_cls,
    arch: dict[str, Any],
    img_size: int,
    drop_path: float,
    layer_decay: float,
    kw: dict[str, Any],
    tunable: tuple[str, ...] = (),
    learnable_pos: bool = False,
) -> Classifier:
    """``name`` as registered: a :class:`Classifier` on ``encoder_cls(**arch)``, initialised
    from scratch. ``kw``: the caller's options; ``tunable`` the encoder settings among them
    that override ``arch`` (Swin's window, PVT's spatial reduction); ``learnable_pos``: a
    learnable position table at ``img_size`` (PVT, ViT)."""
    allowed = {"img_size", "num_classes", "drop_path", "drop_rate", "pos_embed_mode", *tunable}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise UsageError(
            f"option(s) {', '.join(unknown)} do not apply to {name}; it takes {', '.join(sorted(allowed))}"
        )
    own_size = img_size  # the registered size: that of the pre-trained position table
    img_size = kw.pop("img_size", img_size)
    pos_embed_mode = kw.pop("pos_embed_mode", "resize")
    if pos_embed_mode not in POS_EMBED_MODES:
        raise UsageError(f"pos_embed_mode must be one of {', '.join(POS_EMBED_MODES)}, got {pos_embed_mode!r}")
    drop_path = kw.pop("drop_path", drop_path)
    head_kw = dict(
        num_classes=kw.pop("num_classes", 1000),
        img_size=img_size,
        drop_rate=kw.pop("drop_rate", 0.0),
        layer_decay=layer_decay,
    )
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}  # what is left: the tunable
    if learnable_pos:
        table_size = own_size if pos_embed_mode == "interpolate" else img_size
        settings.update(pos_embed="learnable", img_size=table_size)
    encoder = encoder_cls(drop_path=drop_path, **{**arch, **settings})
    model = Classifier(encoder, **head_kw)
    _init_encoder(encoder)
    return model


def _init_encoder(enc: nn.Module) -> None:
    """From-scratch initialisation, as in pre-training (layers/init.py);
    position tables keep their sin-cos start."""
    enc.apply(init_weights)
    if hasattr(enc, "cls_token"):  # ViT
        nn.init.normal_(enc.cls_token, std=0.02)


def check_classifier(name: str) -> None:
    """Refuse a pre-training model where a classifier is needed (fine-tuning, probing, eval)."""
    if model_kind(name) != "classify":
        raise UsageError(f"{name!r} is a pre-training model; classifiers are listed by `ummae models --kind classify`")


# --- timm registration: `ummae.register_timm(); timm.create_model("ummae_swin_tiny_256", num_classes=10)`
def _timm_entry(name: str):
    def create(pretrained: bool = False, **kwargs):
        if pretrained:
            raise UsageError(
                f"ummae_{name}: ummae downloads no weights; create it with pretrained=False and load an exported "
                f"file (`ummae export`) with load_state_dict(safetensors.torch.load_file(path), strict=False)"
            )
        for k in _TIMM_ONLY:
            kwargs.pop(k, None)
        if "drop_path_rate" in kwargs:  # timm's name for stochastic depth
            kwargs["drop_path"] = kwargs.pop("drop_path_rate")
        return create_model(name, **kwargs)

    create.__name__ = f"ummae_{name}"
    create.__qualname__ = create.__name__
    create.__module__ = __name__
    return create


def register_with_timm() -> list[str]:
    """Register every classifier with timm as ``ummae_<name>`` (those not registered yet: it
    may be called any number of times); returns timm's names of them all."""
    names = []
    for name in list_models(kind="classify"):
        if not is_model(f"ummae_{name}"):
            timm_register(_timm_entry(name))
        names.append(f"ummae_{name}")
    return names
