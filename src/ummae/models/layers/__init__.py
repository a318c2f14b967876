"""Layers shared by the encoders. Generic ones (DropPath, Mlp, trunc_normal_) come from timm."""

from ummae.models.layers.init import init_weights
from ummae.models.layers.norm import LayerNorm
from ummae.models.layers.patch_embed import PatchEmbed
from ummae.models.layers.pos_embed import resize_pos_table, sincos_2d, sincos_grid

__all__ = ["LayerNorm", "PatchEmbed", "resize_pos_table", "sincos_2d", "sincos_grid", "init_weights"]
