"""Image data: datasets (pre-training and labelled), the resumable sampler and the loaders."""
from .classify import (
    build_classify_dataset,
    build_classify_transform,
    build_eval_loader,
)
from .datasets import ImageDataset, NoReadableImageError, SubstituteUnreadable, build_pretrain_dataset
from .sampler import ResumableSampler, build_train_loader, collate_skip_bad

__all__ = [
    "ImageDataset",
    "NoReadableImageError",
    "ResumableSampler",
    "SubstituteUnreadable",
    "build_classify_dataset",
    "build_classify_transform",
    "build_eval_loader",
    "build_pretrain_dataset",
    "build_train_loader",
    "collate_skip_bad",
]
