"""Swin Transformer, UM-MAE variant: window attention whose relative position bias is a
small MLP of the tokens' TRUE relative positions (METHOD.md "pos-MLP"), so the same weights
run on the compact map (pre-training, window 8) and on the full map (fine-tuning, window 16).
Patch merging = LayerNorm + 2x2 stride-2 conv. The shifted-window mask is -inf where the
reference adds -100: both give the masked pairs zero weight in fp32.

As a detection / segmentation backbone (``pad_to_window``, set by ``dense.build_stage_maps``)
a block pads a map its window does not tile, as Swin's own dense backbone does
(Swin-Transformer-Object-Detection, ``SwinTransformerBlock.forward``): after ``norm1``, zeros on
the right and bottom up to multiples of the window, the shift and its mask on the padded size,
the result cropped back. Everywhere else (pre-training, fine-tuning, classification) such a map
means a wrong configuration and is refused.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from ummae.errors import UsageError
from ummae.models.base import PyramidBackbone
from ummae.models.family import Family, Size, register_family
from ummae.models.layers import LayerNorm
from ummae.models.mae import DECODER_512D2B, DECODER_512D8B, DECODER_NANO, DECODER_TEST


def log_spaced(d: Tensor) -> Tensor:
    """``sign(d) * log(1 + |d|)``: relative coordinates squashed so that far offsets share
    resolution (METHOD.md)."""
    return torch.sign(d) * torch.log1p(d.abs())


class PosMLPBias(nn.Module):
    """Relative position bias ``heads x T x T`` from the tokens' true positions.

    The MLP (the reference's 1x1 conv 2->hidden, ReLU, 1x1 conv hidden->heads, written as
    Linear layers) is applied pointwise to each offset *key minus query* (the reference's sign).
    Positions at stage ``s`` are multiples of ``2**-f`` (``f`` = ``frac_bits``: 0 on a dense map,
    up to 1 at the last compact stage) inside a grid of side ``E``, so every offset is one of
    the ``(2 E 2**f + 1)**2`` points of a fixed table: we evaluate the MLP once on that table
    and gather, exactly the per-pair MLP at a fraction of the cost.
    """

    def __init__(self, num_heads: int, hidden: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_heads))

    def init_as_reference(self) -> None:
        # The reference's 1x1 convs: normal(0, sqrt(2 / fan_out)), zero bias.
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=math.sqrt(2.0 / layer.out_features))
            nn.init.zeros_(layer.bias)

    def mlp_of_offsets(self, d: Tensor) -> Tensor:
        """Reference path: the MLP on offsets ``d [..., 2]`` (key - query) -> ``[..., heads]``."""
        return self.mlp(log_spaced(d.float()))

    def forward(self, pos: Tensor, extent: int, frac_bits: int = 0) -> Tensor:
        """``pos [..., T, 2]`` (float, multiples of ``2**-frac_bits``) -> bias ``[..., heads, T, T]``."""
        scale = 2**frac_bits
        n = extent * scale  # offsets lie in [-extent, extent]
        side = 2 * n + 1
        r = torch.arange(-n, n + 1, device=pos.device, dtype=torch.float32) / scale
        grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1)  # [side, side, 2]
        table = self.mlp_of_offsets(grid).permute(2, 0, 1).reshape(-1, side * side)
        d = ((pos.unsqueeze(-3) - pos.unsqueeze(-2)) * scale).round().long() + n  # [..., T(q), T(k), 2]
        bias = table[:, d[..., 0] * side + d[..., 1]]  # [heads, ..., T, T]
        return bias.movedim(0, -3)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, pos_hidden: int = 32, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.pos_bias = PosMLPBias(num_heads, pos_hidden)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """``x [B, nW, T, C]``, ``bias`` broadcastable to ``[B, nW, heads, T, T]``."""
        b, nw, t, c = x.shape
        qkv = self.qkv(x).view(b, nw, t, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # [B, nW, heads, T, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(2, 3).reshape(b, nw, t, c))


def window_partition(x: Tensor, ws: int) -> Tensor:
    """``[B, H, W, C]`` -> ``[B, nW, ws*ws, C]``."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).transpose(2, 3)
    return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def window_reverse(x: Tensor, ws: int, h: int, w: int) -> Tensor:
    b, c = x.shape[0], x.shape[-1]
    x = x.view(b, h // ws, w // ws, ws, ws, c).transpose(2, 3)
    return x.reshape(b, h, w, c)


def shift_region_mask(h: int, w: int, ws: int, shift: int, device: torch.device) -> Tensor:
    """Swin's mask for shifted windows: tokens that were not neighbours before the cyclic
    shift must not attend to each other. ``[nW, 1, T, T]`` with 0 / -inf. Eager runs use a
    cached copy: it depends on the map geometry only and every shifted block needs it."""
    region = torch.zeros(h, w, device=device)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            region[hs, wsl] = cnt
            cnt += 1
    win = window_partition(region.view(1, h, w, 1), ws).squeeze(-1)[0]  # [nW, T]
    diff = win.unsqueeze(1) != win.unsqueeze(2)
    return torch.zeros(diff.shape, device=device).masked_fill(diff, float("-inf")).unsqueeze(1)


_cached_shift_region_mask = functools.lru_cache(maxsize=32)(shift_region_mask)


def pad_positions(pos: Tensor, pad_h: int, pad_w: int) -> Tensor:
    """``pos [P, H, W, 2]`` extended by ``pad_h`` rows and ``pad_w`` columns that continue its
    grid (each new row / column one grid step past the last): padded tokens take part in
    attention as keys, and Swin's bias, a table of in-window offsets, gives them the bias of
    their place in the window, which continuing the grid reproduces with true positions. A map
    is only padded along a side of at least two tokens (the window is at most the map's short
    side, and a window of 1 tiles everything), so the last two rows / columns give the step."""
    for dim, n in ((1, pad_h), (2, pad_w)):
        if n:
            side = pos.shape[dim]
            last, before = pos.narrow(dim, side - 1, 1), pos.narrow(dim, side - 2, 1)
            steps = torch.arange(1, n + 1, device=pos.device, dtype=pos.dtype).view(
                [n if d == dim else 1 for d in range(4)]
            )
            pos = torch.cat([pos, last + steps * (last - before)], dim=dim)
    return pos


class SwinBlock(nn.Module):
    def __init__(
        self, dim, num_heads, window_size, shift, mlp_ratio=4.0, drop_path=0.0, pos_hidden=32, pad_to_window=False
    ):
        super().__init__()
        self.window_size = window_size
        self.shift = shift  # whether this block uses shifted windows (every second block)
        self.pad_to_window = pad_to_window  # the dense backbone's padding (module docstring)
        # The reference builds its blocks without passing its norm_layer: their two norms have
        # nn.LayerNorm's default eps 1e-5 (the parity cases confirm it), the others 1e-6.
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, pos_hidden)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, pos: Tensor, extent: int, frac_bits: int = 0) -> Tensor:
        b, h, w, c = x.shape
        # A map smaller than the window gets one window of its short side and no shift (Swin's
        # classification rule; its dense backbone pads such a map to the full window instead).
        ws = min(self.window_size, h, w)
        pad_h, pad_w = -h % ws, -w % ws
        if (pad_h or pad_w) and not self.pad_to_window:
            raise ValueError(f"Swin window {ws} does not tile a {h}x{w} token map")
        shift = ws // 2 if self.shift and min(h, w) > ws else 0
        y = self.norm1(x)
        if pad_h or pad_w:
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))  # zeros after the norm, as Swin pads
            pos = pad_positions(pos, pad_h, pad_w)
            # the cyclic shift puts first and last (padded) rows in one window: offsets reach
            # the padded side, past the grid's extent; the table grows, no bias changes
            extent = max(extent, h + pad_h, w + pad_w)
        hp, wp = h + pad_h, w + pad_w
        if shift:
            y = torch.roll(y, (-shift, -shift), dims=(1, 2))
            pos = torch.roll(pos, (-shift, -shift), dims=(1, 2))
        bias = self.attn.pos_bias(window_partition(pos, ws), extent, frac_bits)  # [P, nW, heads, T, T]
        if shift:
            # torch.compile folds the mask into the graph itself and warns on lru_cache
            fn = shift_region_mask if torch.compiler.is_compiling() else _cached_shift_region_mask
            bias = bias + fn(hp, wp, ws, shift, x.device)  # the regions of the padded map, as Swin's
        y = window_reverse(self.attn(window_partition(y, ws), bias), ws, hp, wp)
        if shift:
            y = torch.roll(y, (shift, shift), dims=(1, 2))
        if pad_h or pad_w:
            y = y[:, :h, :w]
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """LayerNorm + 2x2 stride-2 conv (METHOD.md); positions: top-left of each 2x2, divided by 2
    exactly (half-integers on the compact map's last stage, as in the reference)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.reduction = nn.Conv2d(dim, out_dim, 2, stride=2)

    def forward(self, x: Tensor, pos: Tensor):
        x = self.reduction(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x, pos[:, ::2, ::2] / 2


class SwinTransformer(PyramidBackbone):
    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        pos_hidden: int = 32,
        drop_path: float = 0.0,
        in_chans: int = 3,
        pad_to_window: bool = False,
    ):
        dims = [embed_dim * 2**i for i in range(len(depths))]
        super().__init__(dims, in_chans)
        self.window_size = window_size
        self.pad_to_window = pad_to_window  # the dense backbone's (module docstring); no parameters
        self.drop_path_rate = drop_path
        self.depths = list(depths)
        dpr = torch.linspace(0, drop_path, sum(depths), device="cpu").tolist()  # cpu: builds on "meta" too
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        i = 0
        for s, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            self.stages.append(
                nn.ModuleList(
                    SwinBlock(
                        dims[s],
                        heads,
                        window_size,
                        shift=bool(j % 2),
                        mlp_ratio=mlp_ratio,
                        drop_path=dpr[i + j],
                        pos_hidden=pos_hidden,
                        pad_to_window=pad_to_window,
                    )
                    for j in range(depth)
                )
            )
            i += depth
            if s < len(depths) - 1:
                self.downsamples.append(PatchMerging(dims[s], dims[s + 1]))
        self.norm = LayerNorm(dims[-1])

    def set_window_size(self, window_size: int) -> None:
        """Pre-train at 8 on the compact map, fine-tune at 16 on the full map: the pos-MLP
        needs no interpolation."""
        self.window_size = window_size
        for stage in self.stages:
            for blk in stage:
                blk.window_size = window_size

    @property
    def size_divisor(self) -> int:
        """32 x the window where the blocks do not pad: every stage map of an image of any size
        must be a multiple of the window (a map smaller than it is only tiled when square).
        Padding to the window (the dense backbone), 32: what the patch and the three 2x
        merges need (a multiple of 32 leaves even maps before every merge)."""
        return super().size_divisor * (1 if self.pad_to_window else self.window_size)

    def check_map_size(self, side: int, what: str) -> None:
        super().check_map_size(side, what)
        if self.pad_to_window:
            return
        for s in range(len(self.stages)):
            m = side // 2**s
            ws = min(self.window_size, m)
            if m % ws:
                raise UsageError(
                    f"{what}: Swin window {self.window_size} does not tile the {m}x{m} map of stage {s + 1}; "
                    f"choose an image size whose stage maps are multiples of the window"
                )

    def forward_stages(self, x: Tensor, pos: Tensor, extent: int, frac_bits: Sequence[int]) -> list[Tensor]:
        outs = []
        for s, stage in enumerate(self.stages):
            for blk in stage:
                x = blk(x, pos, extent, frac_bits[s])
            if s == len(self.stages) - 1:
                x = self.norm(x)
            outs.append(x.permute(0, 3, 1, 2))
            if s < len(self.downsamples):
                x, pos = self.downsamples[s](x, pos)
                extent = (extent + 1) // 2
        return outs


# --- the family: its sizes and what it registers (models/family.py) -----------------------------


def signature(arch: dict) -> dict:
    """What a Swin checkpoint's tensors show of ``arch`` (family.Signature): stage widths
    (doubling from ``embed_dim``), blocks, heads (the pos-MLP's outputs), MLP widths."""
    dims = [arch["embed_dim"] * 2**i for i in range(len(arch["depths"]))]
    hidden = [int(d * arch.get("mlp_ratio", 4.0)) for d in dims]
    stages = tuple(zip(dims, arch["depths"], arch["num_heads"], hidden, strict=True))
    return dict(patch=SwinTransformer.patch_size, stages=stages, pos_hidden=arch["pos_hidden"])


# window_size: the pre-training window, on the compact map (METHOD.md); on the full map (SimMIM,
# fine-tuning, dense tasks) the window is 16 (the 64 px test model's full map: 8): the pos-MLP
# bias carries over unchanged. Fine-tuning: the reference's Swin-T recipe (drop path 0.1, layer
# decay 0.85); Swin-L the reference's (Makefile, finetune_mae_swin_large_256_mask_vmr025_200e_100e).
# Swin-L: the paper's run, 8-block decoder and pos-MLP width 64 (``..._dec512d8b64pmd``).
# Swin-S (Swin's paper; not a reference run): the paper's decoder and the family's fine-tuning.
SWIN = Family(
    "swin",
    "Swin",
    SwinTransformer,
    sizes={
        "tiny_256": Size(dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=8, pos_hidden=32), 256, DECODER_512D2B),
        "small_256": Size(dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=8, pos_hidden=32), 256, DECODER_512D2B),
        "large_256": Size(dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=8, pos_hidden=64), 256, DECODER_512D8B, finetune=dict(drop_path=0.2, layer_decay=0.7)),
        "nano_128": Size(dict(embed_dim=32, depths=(1, 1, 3, 1), num_heads=(1, 2, 4, 8), window_size=8, pos_hidden=16), 128, DECODER_NANO),
        "test": Size(dict(embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4, pos_hidden=8), 64, DECODER_TEST, dense=dict(window_size=8)),
    },
    finetune=dict(drop_path=0.1, layer_decay=0.85),
    signature=signature,
    dense=dict(window_size=16),
    tunable=("window_size",),
    backbone=dict(pad_to_window=True),
)  # fmt: skip
register_family(SWIN)
