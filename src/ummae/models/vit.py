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
from ummae.models.family import Family, Size, register_family
from ummae.models.layers import LayerNorm, PatchEmbed, resize_pos_table, sincos_grid
from ummae.models.mae import DECODER_512D2B, DECODER_512D8B, DECODER_NANO, DECODER_TEST


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
        dpr = torch.linspace(0, drop_path, depth, device="cpu").tolist()  # cpu: builds on "meta" too
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


# --- the family: its sizes and what it registers (models/family.py) -----------------------------


def signature(arch: dict) -> dict:
    """What a ViT checkpoint's tensors show of ``arch`` (family.Signature): patch, width,
    blocks and MLP width (the heads are not visible: qkv is full-width)."""
    hidden = int(arch["embed_dim"] * arch.get("mlp_ratio", 4.0))
    return dict(patch=arch["patch_size"], stages=((arch["embed_dim"], arch["depth"], None, hidden),), pos_hidden=None)


# Pre-training: MAE's 8-block decoder (dec512d8b) under MAE's names; ``_dec512d2b`` the 2-block
# decoder of the paper's ViT-B rows. Fine-tuning: MAE's recipe (drop path 0.1, layer decay 0.75),
# ViT-B at the reference's 0.8 (Makefile, finetune_mae_vit_base_patch16_dec512d2b_*), ViT-L at
# MAE's drop path 0.2. nano_patch8_64: ViT-Tiny's width at half its depth, 8 px patches, the ViT
# rows of the small-scale table (experiments/minitable.py, 64 px: an 8x8 patch grid, the unit
# grid of its pyramid rows).
VIT = Family(
    "vit",
    "ViT",
    VisionTransformer,
    sizes={
        "base_patch16": Size(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), 224, DECODER_512D8B, decoders={"dec512d2b": DECODER_512D2B}, finetune=dict(layer_decay=0.8)),
        "large_patch16": Size(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), 224, DECODER_512D8B, finetune=dict(drop_path=0.2)),
        "nano_patch8_64": Size(dict(patch_size=8, embed_dim=192, depth=6, num_heads=3), 64, DECODER_NANO),
        "test": Size(dict(patch_size=16, embed_dim=32, depth=2, num_heads=2), 64, DECODER_TEST, finetune=dict(layer_decay=0.65)),
    },
    finetune=dict(drop_path=0.1, layer_decay=0.75),
    signature=signature,
    simmim=False,
    learnable_pos=True,
)  # fmt: skip
register_family(VIT)
