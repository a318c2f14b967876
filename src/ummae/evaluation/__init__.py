"""Evaluation: one evaluator interface and one inference loop (detectron2's
``DatasetEvaluator`` / ``inference_on_dataset``), used by training-time validation and by every
``eval`` command. Modules, bottom to top (each imports only modules listed before it):

- :mod:`~ummae.evaluation.base`: :class:`DatasetEvaluator` (``reset`` / ``process`` /
  ``evaluate``), :func:`inference_on_dataset`, the eval shard of a rank, the warning for
  figures measured on the training images;
- :mod:`~ummae.evaluation.classification`: top-k accuracy, the kNN vote on frozen features;
- :mod:`~ummae.evaluation.coco`: COCO box and mask AP (pycocotools);
- :mod:`~ummae.evaluation.segmentation`: the confusion matrix and mIoU / mAcc / aAcc.

Sliding-window and whole-image inference are the segmenter's own
(:class:`~ummae.models.upernet.SegmenterInference`)."""

from ummae.evaluation.base import (
    DatasetEvaluator,
    inference_on_dataset,
    on_training_images,
    same_folder,
    shard_loader,
)

__all__ = ["DatasetEvaluator", "inference_on_dataset", "on_training_images", "same_folder", "shard_loader"]
