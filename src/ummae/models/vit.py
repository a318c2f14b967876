"""Plain ViT (MAE's encoder): global attention takes any subset of tokens, so UM-MAE and
MAE random sampling simply drop the masked patches; no compaction needed.

Position embedding: fixed sin-cos of the input grid in pre-training (the cls token's position
is 0, as MAE's); learnable in fine-tuning (``pos_embed="learnable"``: a patch table initialised
from the sin-cos and resized bicubically for another input size, plus the cls token's own
learnable position ``pos_embed_cls``, as MAE fine-tunes timm's ViT)."""

from __future__ import annotations

import functools

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ummae.errors import UsageError
from ummae.models.classifier import build_classifier
from ummae.models.layers import LayerNorm, PatchEmbed, resize_pos_table, sincos_grid
from ummae.models.mae import DECODER_512D2B, DECODER_512D8B, DECODER_NANO, DECODER_TEST, build_mae
from ummae.models.registry import register_model


def _sincos_table(h: int, w: int, dim: int, device=None) -> Tensor:
    return sincos_grid(h, w, dim).to(device)


# one copy per geometry and device; torch.compile builds it into the graph instead
_cached_sincos_table = functools.lru_cache(maxsize=16)(_sincos_table)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        in_chans: int = 3,
        pos_embed: str = "sincos",
        img_size: int = 224,
    ):
        super().__init__()
        if pos_embed not in ("sincos", "learnable"):
            raise UsageError(f"pos_embed must be 'sincos' or 'learnable', got {pos_embed!r}")
        self.patch_size = patch_size
        self.depths = [depth]
        self.pos_embed_kind = pos_embed
        self.pos_embed = self.pos_embed_cls = None
        if pos_embed == "learnable":
            g = img_size // patch_size
            self.pos_embed = nn.Parameter(sincos_grid(g, g, embed_dim).view(g, g, embed_dim))
            self.pos_embed_cls = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.num_features = embed_dim
        self.drop_path_rate = drop_path
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        dpr = torch.linspace(0, drop_path, depth).tolist()
        # timm's Block uses F.scaled_dot_product_attention (fused attention).
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i], norm_layer=LayerNorm)
            for i in range(depth)
        )
        self.norm = LayerNorm(embed_dim)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module="norm")]

    def _embed(self, imgs: Tensor) -> tuple[Tensor, Tensor]:
        """Patch tokens ``[N, L, D]`` (before position) and their fixed sin-cos positions."""
        x = self.patch_embed(imgs)
        h, w = x.shape[1:3]
        if self.pos_embed is None:
            fn = _sincos_table if torch.compiler.is_compiling() else _cached_sincos_table
            pos = fn(h, w, x.shape[-1], x.device).to(x.dtype)
        else:
            table = self.pos_embed
            if table.shape[:2] != (h, w):
                table = resize_pos_table(table, h, w)
            pos = table.reshape(h * w, -1).to(x.dtype)
        return x.flatten(1, 2), pos

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay depth (MAE's ``get_layer_id_for_vit``): embeddings 0, block i
        -> i + 1, the rest ``num_layers + 1``."""
        parts = name.split(".")
        if parts[0] in ("patch_embed", "cls_token", "pos_embed", "pos_embed_cls"):
            return 0
        if parts[0] == "blocks":
            return int(parts[1]) + 1
        return self.num_layers + 1

    def _run(self, x: Tensor) -> Tensor:
        cls = self.cls_token if self.pos_embed_cls is None else self.cls_token + self.pos_embed_cls
        x = torch.cat([cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_visible(
        self,
        imgs: Tensor,
        mask: Tensor,
        sm_mask: Tensor | None = None,
        sm_token: Tensor | None = None,
        num_visible: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """MAE encoder: ``mask [N, L]`` True = dropped. SM units get ``sm_token`` plus their
        position embedding. Returns the features ``[N, 1 + V, D]`` (cls first, then the visible
        units) and the visible units' indices ``[N, V]`` (row-major)."""
        x, pos = self._embed(imgs)
        if sm_mask is not None and sm_token is not None:
            x = torch.where(sm_mask.unsqueeze(-1), sm_token.to(x.dtype), x)
        x = x + pos
        if num_visible is None:
            counts = (~mask).sum(1)
            num_visible = int(counts[0])
            if not torch.all(counts == num_visible):
                raise ValueError("every image of a batch must have the same number of visible units")
        ids = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_visible]
        x = x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self._run(x), ids

    def forward_features(self, imgs: Tensor) -> Tensor:
        """All tokens ``[N, 1 + L, D]`` (cls first)."""
        x, pos = self._embed(imgs)
        return self._run(x + pos)


# --- architectures and registered models ------------------------------------------------------
VIT_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
VIT_LARGE = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
VIT_TEST = dict(patch_size=16, embed_dim=32, depth=2, num_heads=2)
# ViT-Tiny's width at half its depth, 8 px patches: the ViT rows of the small-scale table
# (experiments/minitable.py, 64 px inputs: an 8x8 patch grid, the unit grid of its pyramid rows).
VIT_NANO = dict(patch_size=8, embed_dim=192, depth=6, num_heads=3)


def _classifier(name, arch, img_size, drop_path, layer_decay, kw):
    return build_classifier(name, VisionTransformer, arch, img_size, drop_path, layer_decay, kw, learnable_pos=True)


@register_model("pretrain")
def mae_vit_base_patch16(**kw):
    """MAE's 8-block decoder (``dec512d8b``)."""
    return build_mae("mae_vit_base_patch16", VisionTransformer, VIT_BASE, img_size=224, decoder=DECODER_512D8B, kw=kw)


@register_model("pretrain")
def mae_vit_base_patch16_dec512d2b(**kw):
    """The 2-block decoder of the paper's ViT-B rows."""
    return build_mae(
        "mae_vit_base_patch16_dec512d2b", VisionTransformer, VIT_BASE, img_size=224, decoder=DECODER_512D2B, kw=kw
    )


@register_model("pretrain")
def mae_vit_large_patch16(**kw):
    return build_mae("mae_vit_large_patch16", VisionTransformer, VIT_LARGE, img_size=224, decoder=DECODER_512D8B, kw=kw)


@register_model("pretrain")
def mae_vit_nano_patch8_64(**kw):
    return build_mae("mae_vit_nano_patch8_64", VisionTransformer, VIT_NANO, img_size=64, decoder=DECODER_NANO, kw=kw)


@register_model("pretrain")
def mae_vit_test(**kw):
    return build_mae("mae_vit_test", VisionTransformer, VIT_TEST, img_size=64, decoder=DECODER_TEST, kw=kw)


@register_model("classify")
def vit_base_patch16(**kw):
    # layer decay 0.8: the reference's 200-epoch rows (Makefile, finetune_mae_vit_base_patch16_dec512d2b_*)
    return _classifier("vit_base_patch16", VIT_BASE, img_size=224, drop_path=0.1, layer_decay=0.8, kw=kw)


@register_model("classify")
def vit_large_patch16(**kw):
    return _classifier("vit_large_patch16", VIT_LARGE, img_size=224, drop_path=0.2, layer_decay=0.75, kw=kw)


@register_model("classify")
def vit_nano_patch8_64(**kw):
    return _classifier("vit_nano_patch8_64", VIT_NANO, img_size=64, drop_path=0.1, layer_decay=0.75, kw=kw)


@register_model("classify")
def vit_test(**kw):
    return _classifier("vit_test", VIT_TEST, img_size=64, drop_path=0.1, layer_decay=0.65, kw=kw)
