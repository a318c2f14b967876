"""MAE decoder (METHOD.md): visible unit tokens are placed at their units on the full unit
grid, every masked unit gets the shared mask token, fixed sin-cos positions are added, a few
transformer blocks, LayerNorm, and a linear prediction of each unit's pixels."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch import Tensor

from ummae.models.layers import LayerNorm, sincos_grid


class MAEDecoder(nn.Module):
    def __init__(
        self,
        grid: tuple[int, int],
        out_dim: int,
        dim: int = 512,
        depth: int = 2,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.grid = grid
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_grid(grid[0], grid[1], dim), persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
        )
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, visible: Tensor, unit_index: Tensor, prefix: Tensor | None = None) -> Tensor:
        """``visible [N, V, D]`` tokens of the units ``unit_index [N, V]`` (row-major on the
        full grid) -> predictions ``[N, L, out_dim]`` for every unit.

        Scattering by the unit index is what gives each visible token the position of the unit
        it came from: the order of ``visible`` does not matter. ``prefix [N, P, D]``: tokens
        without a unit (ViT's cls token, position 0 as in MAE) that take part in attention and
        are dropped from the output."""
        n, _, d = visible.shape
        length = self.grid[0] * self.grid[1]
        x = self.mask_token.to(visible.dtype).expand(n, length, d).clone()
        x = x.scatter(1, unit_index.unsqueeze(-1).expand(-1, -1, d), visible)
        x = x + self.pos_embed.to(x.dtype)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        if prefix is not None:
            x = x[:, prefix.shape[1] :]
        return self.pred(self.norm(x))
