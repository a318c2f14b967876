"""Image data: datasets (pre-training and labelled), the resumable sampler and the loaders.

The COCO detection names (:mod:`ummae.data.coco`) are loaded on first use, so that
``import ummae.data`` does not need pycocotools."""
from ummae.data.classify import build_classify_dataset, build_classify_transform, build_eval_loader
from ummae.data.datasets import ImageDataset, NoReadableImageError, SubstituteUnreadable, build_pretrain_dataset
from ummae.data.sampler import ResumableSampler, build_train_loader, collate_skip_bad

_COCO_NAMES = (
    "CocoDetection",
    "LargeScaleJitter",
    "coco_evaluate",
    "coco_results",
    "collate_detection",
    "collate_detection_eval",
    "write_results_json",
)

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
    *_COCO_NAMES,
]


def __getattr__(name: str):
    if name in _COCO_NAMES:
        from ummae.data import coco

        return getattr(coco, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
