"""What detection and segmentation share as tasks: their validation step. Their models (the
stage-map backbone, the detectors, UperNet) are in :mod:`ummae.models.dense`,
:mod:`ummae.models.detectors` and :mod:`ummae.models.upernet`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from ummae.evaluation import on_training_images, same_folder

log = logging.getLogger("ummae")


def validation(
    measure: Callable[[nn.Module], dict[str, float]], val_dir: str, train_dir: str, val_split: str, is_main: bool
) -> Callable[[nn.Module], dict[str, float]]:
    """The Trainer's ``evaluate`` of a dense task: ``measure(model)``, logged on rank 0, and
    flagged ``val_is_train`` (with a warning each time) when the val split is the training
    folder, so that no figure measured on the training images passes for a validation one."""
    why = f"--val-split {val_split} is the training split" if same_folder(val_dir, train_dir) else None

    def evaluate(model: nn.Module) -> dict[str, float]:
        metrics = on_training_images(measure(model), why, is_main)
        if is_main:
            log.info("val: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    return evaluate
