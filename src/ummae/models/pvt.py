"""PVT (v1 style), UM-MAE variant (the reference's ``models_mae_pvt`` / ``models_pvt``):
spatial-reduction attention whose keys/values are average-pooled by ``sr`` and then pass a
1x1 conv + LayerNorm, so the same weights serve any ``sr`` (pre-training 4-2-1-1 on the compact
map, fine-tuning and SimMIM 8-4-2-1 on the full map). No norm after the patch embedding or the
down-sampling convs. One position embedding, added to the patch embedding at stage 1: the
fixed 2-D sin-cos of every token's TRUE position in pre-training; in fine-tuning
(``pos_embed="learnable"``) a table initialised from it (METHOD.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from ummae.errors import UsageError
from ummae.models.base import PyramidBackbone
from ummae.models.family import Family, Size, register_family
from ummae.models.layers import LayerNorm, resize_pos_table, sincos_grid
from ummae.models.mae import DECODER_512D2B, DECODER_NANO, DECODER_TEST


def _sincos_table(side: int, dim: int, device=None) -> Tensor:
    return sincos_grid(side, side, dim).view(side, side, dim).to(device)


# one copy per geometry and device (no host-to-device copy per step); torch.compile builds it
# into the graph instead (it warns on lru_cache)
_cached_sincos_table = functools.lru_cache(maxsize=16)(_sincos_table)


class SRAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, 1)
        # The reference builds this one norm as a plain nn.LayerNorm (eps 1e-5), unlike the rest.
        self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, H, W, C]`` -> ``[B, H, W, C]``."""
        b, h, w, c = x.shape
        d = c // self.num_heads
        q = self.q(x).view(b, h * w, self.num_heads, d).transpose(1, 2)
        y = x.permute(0, 3, 1, 2)
        if self.sr_ratio > 1:
            y = F.avg_pool2d(y, self.sr_ratio)  # floor, as the reference
        y = self.sr_norm(self.sr(y).flatten(2).transpose(1, 2))
        k, v = self.kv(y).view(b, -1, 2, self.num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class PVTBlock(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio, mlp_ratio, drop_path=0.0):
        super().__init__()
        # The reference builds its blocks without passing its norm_layer: their two norms have
        # nn.LayerNorm's default eps 1e-5 (the parity cases confirm it), the others 1e-6.
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SRAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Downsample(nn.Module):
    """2x2 stride-2 conv between stages (no norm); positions: top-left, halved."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, out_dim, 2, stride=2)

    def forward(self, x: Tensor, pos: Tensor):
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), pos[:, ::2, ::2] / 2


class PyramidVisionTransformer(PyramidBackbone):
    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (4, 2, 1, 1),
        drop_path: float = 0.0,
        in_chans: int = 3,
        pos_embed: str = "sincos",
        img_size: int = 256,
    ):
        super().__init__(embed_dims, in_chans, patch_norm=False)
        if pos_embed not in ("sincos", "learnable"):
            raise UsageError(f"pos_embed must be 'sincos' or 'learnable', got {pos_embed!r}")
        self.drop_path_rate = drop_path
        self.depths = list(depths)
        self.pos_embed_kind = pos_embed
        self.pos_embed = None
        if pos_embed == "learnable":
            # [H, W, C] of the stage-1 grid, initialised to exactly the fixed embedding it replaces
            side = img_size // self.patch_size
            self.pos_embed = nn.Parameter(_sincos_table(side, embed_dims[0]))
        dpr = torch.linspace(0, drop_path, sum(depths), device="cpu").tolist()  # cpu: builds on "meta" too
        self.downsamples = nn.ModuleList(Downsample(embed_dims[s], embed_dims[s + 1]) for s in range(len(depths) - 1))
        self.stages = nn.ModuleList()
        i = 0
        for s, depth in enumerate(depths):
            self.stages.append(
                nn.ModuleList(
                    PVTBlock(embed_dims[s], num_heads[s], sr_ratios[s], mlp_ratios[s], dpr[i + j]) for j in range(depth)
                )
            )
            i += depth
        self.norm = LayerNorm(embed_dims[-1])
        self.sr_ratios = list(sr_ratios)

    def set_sr_ratios(self, sr_ratios: Sequence[int]) -> None:
        """Pre-training uses 4-2-1-1 on the compact map, fine-tuning 8-4-2-1 on the full map;
        pooling is parameter-free, so the weights carry over unchanged."""
        if len(sr_ratios) != len(self.stages):
            raise UsageError(f"need {len(self.stages)} sr ratios, got {list(sr_ratios)}")
        self.sr_ratios = list(sr_ratios)
        for stage, sr in zip(self.stages, sr_ratios, strict=True):
            for blk in stage:
                blk.attn.sr_ratio = sr

    def check_map_size(self, side: int, what: str) -> None:
        super().check_map_size(side, what)
        for s, sr in enumerate(self.sr_ratios):
            if (side >> s) < sr:
                raise UsageError(
                    f"{what}: the {side >> s}x{side >> s} map of stage {s + 1} is smaller than its spatial reduction {sr}"
                )

    def position_embedding(self, pos: Tensor, extent: int) -> Tensor:
        """Stage-1 embedding at integer positions ``pos [P, h, w, 2]`` of a grid of side
        ``extent``; a learnable table of another size is resized (bicubic) first."""
        if self.pos_embed is None:
            fn = _sincos_table if torch.compiler.is_compiling() else _cached_sincos_table
            table = fn(extent, self.embed_dims[0], pos.device)
        else:
            table = self.pos_embed
            if table.shape[0] != extent or table.shape[1] != extent:
                table = resize_pos_table(table, extent, extent)
        idx = pos.long()
        return table[idx[..., 0], idx[..., 1]]

    def forward_stages(self, x: Tensor, pos: Tensor, extent: int, frac_bits: Sequence[int]) -> list[Tensor]:
        outs = []
        x = x + self.position_embedding(pos, extent).to(x.dtype)
        for s, stage in enumerate(self.stages):
            if s > 0:
                x, pos = self.downsamples[s - 1](x, pos)
            for blk in stage:
                x = blk(x)
            if s == len(self.stages) - 1:
                x = self.norm(x)
            outs.append(x.permute(0, 3, 1, 2))
        return outs


# --- the family: its sizes and what it registers (models/family.py) -----------------------------


def signature(arch: dict) -> dict:
    """What a PVT checkpoint's tensors show of ``arch`` (family.Signature): stage widths,
    blocks and MLP widths (the heads are not visible: q, k, v are full-width)."""
    hidden = [int(d * r) for d, r in zip(arch["embed_dims"], arch["mlp_ratios"], strict=True)]
    stages = tuple((d, n, None, h) for d, n, h in zip(arch["embed_dims"], arch["depths"], hidden, strict=True))
    return dict(patch=PyramidVisionTransformer.patch_size, stages=stages, pos_hidden=None)


# sr_ratios: the pre-training spatial reduction, on the compact map (METHOD.md); on the full map
# (SimMIM, fine-tuning, dense tasks) it is 8-4-2-1: pooling has no weights, nothing to convert.
# Fine-tuning: the reference's PVT-S recipe (drop path 0.1, layer decay 0.85).
PVT = Family(
    "pvt",
    "PVT",
    PyramidVisionTransformer,
    sizes={
        "small_256": Size(dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(4, 2, 1, 1)), 256, DECODER_512D2B),
        "nano_128": Size(dict(embed_dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), mlp_ratios=(4, 4, 4, 4), sr_ratios=(4, 2, 1, 1)), 128, DECODER_NANO),
        "test": Size(dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2), sr_ratios=(4, 2, 1, 1)), 64, DECODER_TEST),
    },
    finetune=dict(drop_path=0.1, layer_decay=0.85),
    signature=signature,
    dense=dict(sr_ratios=(8, 4, 2, 1)),
    tunable=("sr_ratios",),
    learnable_pos=True,
)  # fmt: skip
register_family(PVT)
