"""Registered pre-training models. Reference names (UM-MAE / MAE / SimMIM code bases) for the
paper's configurations, each meaning exactly the reference's architecture:

* ``mae_swin_tiny_256``, ``mae_pvt_small_256``: 512-d, 2-block decoder (``dec512d2b``);
* ``mae_swin_large_256``: the paper's Swin-L run, 8-block decoder and pos-MLP width 64
  (the reference's ``mae_swin_large_256_dec512d8b64pmd``);
* ``mae_vit_base_patch16`` / ``mae_vit_large_patch16``: MAE's 8-block decoder (``dec512d8b``);
  ``mae_vit_base_patch16_dec512d2b`` is the 2-block decoder of the paper's ViT-B rows;
* ``simmim_*``: the encoder with its dense-map settings (Swin window 16, PVT sr 8-4-2-1).

``*_nano_128`` for the demo and small experiments; ``*_test`` for CI."""
from __future__ import annotations

from typing import Any, Dict

from ummae.models.pvt import PyramidVisionTransformer

from ummae.models.swin import SwinTransformer

from ummae.models.vit import VisionTransformer
from ummae.models.registry import register_model
from ummae.models.mae import MaskedAutoencoder
from ummae.models.simmim import SimMIM
from ummae.errors import UsageError

SWIN = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), pos_hidden=32),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), pos_hidden=64),
    "nano": dict(embed_dim=32, depths=(1, 1, 3, 1), num_heads=(1, 2, 4, 8), pos_hidden=16),
    "test": dict(embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4), pos_hidden=8),
}
PVT = {
    "small": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4)),
    "nano": dict(embed_dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), mlp_ratios=(4, 4, 4, 4)),
    "test": dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2)),
}
VIT = {
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "test": dict(embed_dim=32, depth=2, num_heads=2),
}
DECODER = {
    "paper": dict(decoder_dim=512, decoder_depth=2, decoder_heads=16),  # 512d2b (METHOD.md)
    "mae": dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),  # 512d8b (MAE; Swin-L run)
    "nano": dict(decoder_dim=128, decoder_depth=2, decoder_heads=4),
    "test": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
}
MAE_OPTIONS = ("img_size", "unit_size", "sampling", "mask_ratio", "sm_ratio", "norm_pix_loss", "decoder_pos")


def _split(kw: Dict[str, Any], allowed, model: str):
    unknown = sorted(set(kw) - set(allowed) - {"drop_path"})
    if unknown:
        raise UsageError(f"option(s) {', '.join(unknown)} do not apply to {model}; it takes {', '.join(sorted(allowed))} and drop_path")
    return kw.pop("drop_path", 0.0)


def _pyramid_encoder(family, arch, window_or_sr, drop_path):
    """Swin takes a pre-training window size, PVT its spatial-reduction ratios."""
    if family == "swin":
        return SwinTransformer(window_size=window_or_sr, drop_path=drop_path, **SWIN[arch])
    return PyramidVisionTransformer(sr_ratios=window_or_sr, drop_path=drop_path, **PVT[arch])


def _mae_pyramid(name, family, arch, img_size, window_or_sr, decoder, kw):
    drop_path = _split(kw, MAE_OPTIONS, name)
    img_size = kw.pop("img_size", img_size)
    enc = _pyramid_encoder(family, arch, window_or_sr, drop_path)
    return MaskedAutoencoder(enc, img_size, **{**DECODER[decoder], **kw})


def _simmim(name, family, arch, img_size, window_or_sr, kw):
    drop_path = _split(kw, ("img_size", "unit_size", "mask_ratio"), name)
    img_size = kw.pop("img_size", img_size)
    return SimMIM(_pyramid_encoder(family, arch, window_or_sr, drop_path), img_size, **kw)


def _mae_vit(name, arch, img_size, patch, decoder, kw):
    drop_path = _split(kw, MAE_OPTIONS, name)
    img_size = kw.pop("img_size", img_size)
    kw.setdefault("unit_size", patch)
    enc = VisionTransformer(patch_size=patch, drop_path=drop_path, **VIT[arch])
    return MaskedAutoencoder(enc, img_size, **{**DECODER[decoder], **kw})


PRETRAIN_SR = (4, 2, 1, 1)  # PVT pre-training spatial reduction on the compact map
DENSE_SR = (8, 4, 2, 1)  # PVT on the full map: SimMIM and fine-tuning
DENSE_WINDOW = 16  # Swin on the full map: SimMIM and fine-tuning


@register_model("pretrain")
def mae_swin_tiny_256(**kw):
    return _mae_pyramid("mae_swin_tiny_256", "swin", "tiny", 256, 8, "paper", kw)


@register_model("pretrain")
def mae_swin_large_256(**kw):
    return _mae_pyramid("mae_swin_large_256", "swin", "large", 256, 8, "mae", kw)


@register_model("pretrain")
def mae_pvt_small_256(**kw):
    return _mae_pyramid("mae_pvt_small_256", "pvt", "small", 256, PRETRAIN_SR, "paper", kw)


@register_model("pretrain")
def mae_vit_base_patch16(**kw):
    return _mae_vit("mae_vit_base_patch16", "base", 224, 16, "mae", kw)


@register_model("pretrain")
def mae_vit_base_patch16_dec512d2b(**kw):
    return _mae_vit("mae_vit_base_patch16_dec512d2b", "base", 224, 16, "paper", kw)


@register_model("pretrain")
def mae_vit_large_patch16(**kw):
    return _mae_vit("mae_vit_large_patch16", "large", 224, 16, "mae", kw)


@register_model("pretrain")
def simmim_swin_tiny_256(**kw):
    return _simmim("simmim_swin_tiny_256", "swin", "tiny", 256, DENSE_WINDOW, kw)


@register_model("pretrain")
def simmim_swin_large_256(**kw):
    return _simmim("simmim_swin_large_256", "swin", "large", 256, DENSE_WINDOW, kw)


@register_model("pretrain")
def simmim_pvt_small_256(**kw):
    return _simmim("simmim_pvt_small_256", "pvt", "small", 256, DENSE_SR, kw)


# small configurations: the demo and quick experiments (128 px) ------------------------------
@register_model("pretrain")
def mae_swin_nano_128(**kw):
    return _mae_pyramid("mae_swin_nano_128", "swin", "nano", 128, 8, "nano", kw)


@register_model("pretrain")
def mae_pvt_nano_128(**kw):
    return _mae_pyramid("mae_pvt_nano_128", "pvt", "nano", 128, PRETRAIN_SR, "nano", kw)


@register_model("pretrain")
def simmim_swin_nano_128(**kw):
    return _simmim("simmim_swin_nano_128", "swin", "nano", 128, DENSE_WINDOW, kw)


@register_model("pretrain")
def simmim_pvt_nano_128(**kw):
    return _simmim("simmim_pvt_nano_128", "pvt", "nano", 128, DENSE_SR, kw)


# tiny configurations for tests (64 px) -------------------------------------------------------
@register_model("pretrain")
def mae_swin_test(**kw):
    return _mae_pyramid("mae_swin_test", "swin", "test", 64, 4, "test", kw)


@register_model("pretrain")
def mae_pvt_test(**kw):
    return _mae_pyramid("mae_pvt_test", "pvt", "test", 64, PRETRAIN_SR, "test", kw)


@register_model("pretrain")
def mae_vit_test(**kw):
    return _mae_vit("mae_vit_test", "test", 64, 16, "test", kw)


@register_model("pretrain")
def simmim_swin_test(**kw):
    return _simmim("simmim_swin_test", "swin", "test", 64, 8, kw)  # swin_test's fine-tuning window


@register_model("pretrain")
def simmim_pvt_test(**kw):
    return _simmim("simmim_pvt_test", "pvt", "test", 64, DENSE_SR, kw)
