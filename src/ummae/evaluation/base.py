"""The evaluator interface and the one inference loop (detectron2's ``DatasetEvaluator`` and
``inference_on_dataset``).

An evaluator is told each batch and what the model made of it (:meth:`DatasetEvaluator.process`)
and turns them into figures at the end (:meth:`DatasetEvaluator.evaluate`), reducing over the
DDP ranks itself: counts and confusion matrices are summed, results gathered to rank 0.
:func:`inference_on_dataset` runs a model over this rank's shard of the eval set
(:func:`shard_loader`) in eval mode, without gradients, under the run's precision, with the
progress report, and gives every rank rank 0's figures (they decide which checkpoint is the
best: every rank must agree).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ummae.data import build_eval_loader, collate_skip_bad
from ummae.engine import dist as udist
from ummae.engine.dist import DistInfo
from ummae.engine.precision import autocast
from ummae.engine.progress import progress

log = logging.getLogger("ummae")

# (model, one item of the eval data, device) -> what the evaluator processes with that item
Predict = Callable[[nn.Module, Any, torch.device], Any]


class DatasetEvaluator:
    """What an evaluation measures: :meth:`reset` before a pass, :meth:`process` for each batch
    (its inputs as the loader gives them and the model's outputs), :meth:`evaluate` after the
    pass, on every rank (a collective): the figures over all ranks' batches, on rank 0 at least
    (another rank may return ``{}``). The figures do not depend on how the data was cut into
    batches, nor on how many ranks shared it."""

    def reset(self) -> None:
        raise NotImplementedError

    def process(self, inputs: Any, outputs: Any) -> None:
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        raise NotImplementedError


def shard_loader(
    dataset, batch_size: int, workers: int, info: DistInfo, device: torch.device, collate_fn=collate_skip_bad
):
    """This rank's shard of ``dataset``: images rank, rank + R, ... (each image once, no
    padding, so sums over the ranks are exact), in order, unreadable images left out."""
    return build_eval_loader(
        dataset,
        batch_size,
        workers,
        info.world_size,
        info.rank,
        pin_memory=device.type == "cuda",  # pinned host memory only helps copies to a GPU
        collate_fn=collate_fn,
    )


def inference_on_dataset(
    model: nn.Module,
    data: Iterable,
    evaluator: DatasetEvaluator,
    predict: Predict,
    device: torch.device,
    precision: str,
    *,
    desc: str,
    unit: str = "batch",
    total: int | None = None,
) -> dict[str, Any]:
    """``evaluator``'s figures of ``model`` over ``data`` (a :func:`shard_loader`, or items made
    from one, ``total`` of them): ``predict(model, item, device)`` under the precision's autocast,
    each item and its outputs to :meth:`DatasetEvaluator.process`; the model in eval mode (its
    mode restored after) and no gradients. Every rank returns rank 0's figures."""
    evaluator.reset()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for item in progress(data, total, desc, unit, udist.is_main_process()):
                if len(item[0]) == 0:  # a batch whose every image was unreadable (left out by the collate)
                    continue
                with autocast(device, precision):
                    outputs = predict(model, item, device)
                evaluator.process(item, outputs)
            figures = evaluator.evaluate()
    finally:
        model.train(was_training)
    return udist.broadcast_object(figures)


def same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are one folder (a link to it included)."""
    return os.path.realpath(a) == os.path.realpath(b)


def on_training_images(figures: dict[str, Any], why: str | None, is_main: bool, flag: Any = 1.0) -> dict[str, Any]:
    """``figures`` as they are when ``why`` is None; else (the 'val' images are the training
    images, for the reason ``why`` says) flagged ``val_is_train`` and warned about on rank 0,
    at every evaluation, so that no figure measured on the training images passes for a
    validation one."""
    if why is not None:
        figures["val_is_train"] = flag
        if is_main:
            log.warning("the 'val' figures are measured on the TRAINING images: %s", why)
    return figures
