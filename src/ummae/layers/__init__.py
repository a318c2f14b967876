"""Layers shared by the encoders. Generic ones (DropPath, Mlp, trunc_normal_) come from timm."""
from .init import init_weights
from .norm import LayerNorm
from .patch_embed import PatchEmbed
from .pos_embed import resize_pos_table, sincos_2d, sincos_grid

__all__ = ["LayerNorm", "PatchEmbed", "resize_pos_table", "sincos_2d", "sincos_grid", "init_weights"]
