"""COCO box and mask AP of a detector (pycocotools, through :func:`ummae.data.coco.coco_evaluate`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ummae.data.coco import CocoDetection, coco_evaluate, coco_results, write_results_json
from ummae.engine import dist as udist
from ummae.evaluation.base import DatasetEvaluator
from ummae.models.detect_tta import MultiScaleFlip, detect


def drop_background(detections: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detections of the real classes only. The sigmoid detectors (GFL, RetinaNet, FCOS) are
    built with torchvision's K + 1 outputs, as its COCO models are; output 0 is never a
    positive in training, so its scores fall towards 0, but it is no class to report."""
    keep = detections["labels"] > 0
    return {k: v[keep] for k, v in detections.items()}


def detections(
    model: nn.Module, batch, device: torch.device, test: MultiScaleFlip | None = None
) -> list[dict[str, Tensor]]:
    """The detections (fp32, background dropped) of a batch ``(uint8 images, targets,
    n_skipped)``, at each image's original size; under ``test``, merged over its scales and
    flips (:func:`ummae.models.detect_tta.detect`)."""
    outputs = detect(model, [im.to(device, non_blocking=True).float().div_(255) for im in batch[0]], test)
    return [drop_background({k: v.float() if v.is_floating_point() else v for k, v in o.items()}) for o in outputs]


class CocoEvaluator(DatasetEvaluator):
    """COCO AP (``iou_types``: ``bbox``, ``segm``) of detections against ``dataset``'s
    annotations: the result dicts of all ranks gathered (each image once), pycocotools run on
    rank 0, which writes them to ``results_path`` (if given) first."""

    def __init__(self, dataset: CocoDetection, iou_types: tuple[str, ...], results_path: str | None = None):
        self.dataset, self.iou_types, self.results_path = dataset, iou_types, results_path

    def reset(self) -> None:
        self.results: list[dict] = []

    def process(self, inputs, outputs: list[dict[str, Tensor]]) -> None:
        self.results += coco_results(inputs[1], outputs, self.dataset)

    def evaluate(self) -> dict[str, Any]:
        everything = [r for part in udist.all_gather_object(self.results) for r in part]
        if not udist.is_main_process():
            return {}
        if self.results_path:
            write_results_json(everything, self.results_path)
        return coco_evaluate(self.dataset.coco, everything, self.iou_types, self.dataset.ids)
