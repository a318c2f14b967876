"""ummae: Uniform Masking (UM-MAE) pre-training for pyramid vision transformers.

Importing the package registers its classifiers with timm as ``ummae_<name>``, so
``timm.create_model("ummae_swin_tiny_256", num_classes=10)`` works after ``import ummae``.
"""
from .registry import create_model, list_models
from .tasks.classify import register_with_timm

register_with_timm()

__all__ = ["create_model", "list_models"]
