"""Semantic segmentation figures: MMSegmentation's mIoU / mAcc / aAcc and per-class IoU /
accuracy from a confusion matrix (torchmetrics', summed over the ranks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from ummae.evaluation.base import DatasetEvaluator


def segmentation_metrics(confusion: Tensor) -> dict[str, Any]:
    """MMSegmentation's metrics from a confusion matrix ``[K, K]`` (rows: label, columns:
    prediction; ignored pixels left out): per-class IoU = TP / (label + predicted - TP) and
    accuracy = TP / label; ``mIoU`` / ``mAcc`` their means over the classes where they are
    defined (a class absent from the labels and never predicted has no IoU; absent from the
    labels, no accuracy); ``aAcc`` all correct pixels / all labelled pixels. Fractions in [0, 1]."""
    confusion = confusion.double()
    tp = confusion.diag()
    label, pred = confusion.sum(1), confusion.sum(0)
    iou = tp / (label + pred - tp)  # 0/0 = nan: undefined
    acc = tp / label
    total = label.sum()
    return {
        "mIoU": float(iou.nanmean()) if iou.isfinite().any() else float("nan"),
        "mAcc": float(acc.nanmean()) if acc.isfinite().any() else float("nan"),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The single figures of :func:`segmentation_metrics` (the per-class lists left out)."""
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def confusion_matrix(num_classes: int, ignore_index: int, device: torch.device | str = "cpu"):
    """torchmetrics' confusion-matrix metric (rows: label, columns: prediction; pixels labelled
    ``ignore_index`` left out), summed over the ranks by its ``compute()``. The labels were
    checked against the classes when read (:mod:`ummae.data.ade`), so its own checks are off."""
    return MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False).to(device)


def images_of(loader):
    """``(image, label)`` pairs of a segmentation eval loader's batches: segmentation is
    evaluated (and its progress reported) image by image, sliding windows over a large one
    taking long."""
    for images, labels, _paths, _ in loader:
        yield from zip(images, labels, strict=True)


def class_probabilities(test: dict[str, Any]) -> Callable[[nn.Module, Any, torch.device], Tensor]:
    """The segmenter's class probabilities ``[K, H, W]`` of an ``(image, label)`` pair, with
    the test settings ``test`` (:meth:`~ummae.models.upernet.SegmenterInference.predict_probs`)."""

    def predict(model: nn.Module, item, device: torch.device) -> Tensor:
        return model.predict_probs(item[0].to(device, non_blocking=True), **test)

    return predict


class SemSegEvaluator(DatasetEvaluator):
    """mIoU, mAcc, aAcc and per-class IoU / Acc of class probabilities ``[K, H, W]`` (their
    argmax) against label maps ``[H, W]`` (pixels ``ignore_index`` left out)."""

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device):
        self.num_classes, self.ignore_index, self.device = num_classes, ignore_index, device

    def reset(self) -> None:
        self.confusion = confusion_matrix(self.num_classes, self.ignore_index, self.device)

    def process(self, inputs, outputs: Tensor) -> None:
        label = inputs[1]
        self.confusion.update(outputs.argmax(0).flatten(), label.to(self.device).flatten())

    def evaluate(self) -> dict[str, Any]:
        return segmentation_metrics(self.confusion.compute().cpu())
