"""The shape of every training command, and the one set-up that runs it.

A :class:`Task` says what is particular to a command: its checks, its data and model, the
optimiser, the loss step, the validation and the log lines. :func:`run` does everything else,
once, in this order: resolve the config (:func:`ummae.config.resolve.resolve`: a recipe's
batch split, a resumed run's settings, what the weights name), let the task check the rest and
the weights files named (cheap: no data scanned, no model built; the build reads each file no
more: :class:`~ummae.weights.load.OneReadPerFile`), claim the output folder and join the process group (:func:`~ummae.engine.run.training_run`), build data and model, the
loaders and the optimiser, and train with the one :class:`~ummae.engine.trainer.Trainer`.

``ummae pretrain``, ``finetune``, ``linprobe``, ``detect train`` and ``segment train`` are each
``run(SomeTask(), cfg)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ummae.config import resolve
from ummae.data import build_train_loader
from ummae.engine.dist import DistInfo, loader_workers
from ummae.engine.hooks import Evaluate
from ummae.engine.run import training_run
from ummae.engine.trainer import Trainer
from ummae.errors import CheckpointError, UsageError
from ummae.models.registry import model_kind
from ummae.weights.load import LoadReport, OneReadPerFile, read_weights

log = logging.getLogger("ummae")

StepFn = Callable[[nn.Module, Any, torch.Generator], dict[str, torch.Tensor]]


@dataclass
class RunContext:
    """Where a run trains: its process group, device, precision and loader workers."""

    info: DistInfo
    device: torch.device
    precision: str
    workers: int

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def pin(self) -> bool:  # pinned host memory only helps copies to a GPU
        return self.device.type == "cuda"


@dataclass
class Parts:
    """What a task builds for a run."""

    model: nn.Module
    train: Any  # the training data set
    val: Any = None  # the validation data set (None: no validation split)
    report: LoadReport | None = None  # the pre-trained weights loaded into the model
    collate: Callable | None = None  # the training loader's collate (None: the default)


class Task:
    """What one training command is. Subclasses override :meth:`build`, :meth:`optimizer`
    and :meth:`step`; the other hooks have defaults (no extra check, no validation, no EMA)."""

    best_metric = "acc1"  # the validation figure (higher = better) that picks checkpoint-best.pth

    def from_weights(self, values: dict[str, Any]) -> dict[str, Any]:
        """The options derived from the weights files that ``values`` (the options resolved so
        far) name: the last level of :func:`ummae.config.resolve.resolve`. A file is checked
        here, before anything is derived from it."""
        return {}

    def check(self, cfg) -> None:
        """Refuse bad options and weights files before anything expensive (on the resolved
        config)."""

    def build(self, cfg, ctx: RunContext) -> Parts:
        raise NotImplementedError

    def optimizer(self, cfg, model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
        raise NotImplementedError

    def step(self, cfg, parts: Parts) -> StepFn:
        raise NotImplementedError

    def evaluator(self, cfg, ctx: RunContext, parts: Parts) -> tuple[Evaluate | None, int]:
        """``(evaluate(model) -> figures, every N epochs (0: after the last only))``."""
        return None, 0

    def ema(self, cfg, model: nn.Module) -> nn.Module | None:
        return None

    def describe(self, cfg, ctx: RunContext, parts: Parts, lr: float) -> None:
        """The run's opening log lines (rank 0)."""

    def started(self, trainer: Trainer) -> None:
        """Called once the Trainer exists, before it trains."""

    def finished(self, cfg, summary: dict[str, Any]) -> None:
        """The closing log line (rank 0)."""


def check_weights_file(path: str | None, flag: str = "--pretrained", encoder: bool = False) -> dict[str, Any]:
    """The metadata of the weights file ``path`` (``{}`` for none), read without its tensors:
    an unreadable or foreign file is refused in one line before any data is scanned.
    ``encoder``: the file must hold an encoder to start from (pre-training, fine-tuning, an
    export): a detection or segmentation checkpoint is refused too."""
    if not path:
        return {}
    meta = read_weights(path, tensors=False)[1]
    kind = recorded_kind(meta)
    if encoder and kind in ("detect", "segment"):
        raise CheckpointError(
            f"{flag} {path} is a checkpoint of `ummae {kind} train` ({meta.get('model_name')}), not "
            f"an encoder to start from; give a pre-training, fine-tuning or exported checkpoint "
            f"(this one goes to `ummae {kind} eval` / `predict`)"
        )
    return meta


def recorded_kind(meta: dict[str, Any]) -> str | None:
    """The kind (``pretrain``, ``classify``, ``detect``, ``segment``) of the model a weights
    file's metadata names; None when it names no registered model."""
    name = meta.get("model_name")
    if not isinstance(name, str):
        return None
    try:
        return model_kind(name)
    except UsageError:  # not a registered name (a reference checkpoint of another size, ...)
        return None


def run(task: Task, cfg) -> dict[str, Any]:
    """Train ``task`` as ``cfg`` says; returns the Trainer's summary."""
    with OneReadPerFile() as reads:  # the check of a weights file and the build share one read
        # a recipe's total batch over this run's processes (torchrun's WORLD_SIZE, known before they join)
        cfg, recipe_lines = resolve(cfg, int(os.environ.get("WORLD_SIZE", "1")), task.from_weights, log)
        task.check(cfg)
        with training_run(cfg) as (info, device, precision):
            for line in recipe_lines if info.is_main else ():
                log.info(line)
            trainer = _trainer(task, cfg, RunContext(info, device, precision, loader_workers(cfg.num_workers)))
            reads.close()  # every weights file is read: the run does not hold them while it trains
            summary = trainer.fit()
            if info.is_main:
                task.finished(cfg, summary)
            return summary


def _trainer(task: Task, cfg, ctx: RunContext) -> Trainer:
    """The task's data, model, loader and optimiser, and the Trainer that trains them."""
    info, device = ctx.info, ctx.device
    parts = task.build(cfg, ctx)
    model = parts.model.to(device)
    collate = {"collate_fn": parts.collate} if parts.collate is not None else {}
    loader, sampler = build_train_loader(
        parts.train,
        cfg.batch_size,
        ctx.workers,
        info.world_size,
        info.rank,
        cfg.seed,
        pin_memory=ctx.pin,
        **collate,
    )
    lr = cfg.effective_lr(info.world_size)
    optimizer = task.optimizer(cfg, model, lr, device)
    if info.is_main:
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        task.describe(cfg, ctx, parts, lr)
    evaluate, eval_every = task.evaluator(cfg, ctx, parts)
    trainer = Trainer(
        cfg,
        model,
        optimizer,
        loader,
        sampler,
        device,
        ctx.precision,
        lr,
        info,
        task.step(cfg, parts),
        evaluate=evaluate,
        eval_every=eval_every,
        ema=task.ema(cfg, model),
        best_metric=task.best_metric,
    )
    task.started(trainer)
    return trainer
