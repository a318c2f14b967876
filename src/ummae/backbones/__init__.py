"""Encoders. Pyramid encoders (Swin, PVT) share :class:`PyramidBackbone`: a compact forward
for UM-MAE pre-training and a dense forward returning the four stage maps for every task."""
from .base import PyramidBackbone
from .pvt import PyramidVisionTransformer
from .swin import SwinTransformer
from .vit import VisionTransformer

__all__ = ["PyramidBackbone", "PyramidVisionTransformer", "SwinTransformer", "VisionTransformer"]
