"""Fine-tuning, linear probing and evaluation of classifiers, on the one training engine.

``finetune``: the paper's recipe (METHOD.md; MAE's ``main_finetune``): layer-wise lr decay,
RandAugment, mixup/cutmix, label smoothing, random erasing, drop path, optional EMA.
``linprobe``: MAE's probing recipe: frozen encoder, BatchNorm (no affine) + linear head, LARS.
``evaluate``: top-1 / top-5 (:mod:`ummae.evaluation`), sharded over ranks and summed exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars
from timm.utils import ModelEmaV3

from ummae.config import EvalConfig, FinetuneConfig, LinprobeConfig, resolve
from ummae.data import build_classify_dataset, build_classify_transform
from ummae.data.classify import default_crop_pct
from ummae.data.dataset import ImageDataset
from ummae.data.subset import SUBSET_FILE, balanced_subset, subset_lines
from ummae.engine import dist as udist
from ummae.engine.optim import build_optimizer
from ummae.engine.precision import resolve_precision
from ummae.errors import UsageError
from ummae.evaluation import inference_on_dataset, on_training_images, same_folder, shard_loader
from ummae.evaluation.classification import TopKAccuracy, model_outputs
from ummae.models.classifier import check_classifier, classifier_for
from ummae.models.registry import create_model, list_models, model_kind
from ummae.tasks.base import Parts, RunContext, Task, check_weights_file, run
from ummae.weights import io as ckpt
from ummae.weights.build import build_from_checkpoint
from ummae.weights.load import OneReadPerFile, load_pretrained, log_load_report, read_weights

log = logging.getLogger("ummae")


@contextlib.contextmanager
def numpy_seeded(seed: int):
    """timm's Mixup draws from numpy's global RNG: seed it per step (so a resumed run mixes
    exactly as the uninterrupted one) and restore the state afterwards."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


class ClassifyStep:
    """``step_fn`` of the Trainer for classification: optional mixup/cutmix, then the loss."""

    def __init__(self, criterion: nn.Module, mixup=None):
        self.criterion = criterion
        self.mixup = mixup

    def __call__(self, model: nn.Module, batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        images, targets = batch[0], batch[1]
        if self.mixup is not None:
            if images.shape[0] % 2 == 0:  # timm mixes a batch with its reverse: needs pairs
                with numpy_seeded(generator.initial_seed()):
                    images, targets = self.mixup(images, targets)
            elif images.shape[0] > 1:  # odd only after an unreadable image was skipped
                with numpy_seeded(generator.initial_seed()):
                    images, targets = self.mixup(images[:-1], targets[:-1])
            else:
                targets = mixup_target(targets, self.mixup.num_classes, 1.0, self.mixup.label_smoothing)
        return {"loss": self.criterion(model(images), targets)}


def evaluate(model: nn.Module, loader, device: torch.device, precision: str) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over every rank's shard."""
    return inference_on_dataset(
        model, loader, TopKAccuracy(device), model_outputs, device, precision, desc="evaluation"
    )


# What `ummae predict` reads from a classifier's model_args (the checkpoint and its exports carry
# them): the training data's class names, and the crop of the evaluation transform
PREDICTION_ARGS = ("class_names", "crop_pct")


def record_for_prediction(model: nn.Module, class_names: list[str], cfg) -> None:
    """Record in ``model.model_args`` what applying the classifier needs besides its weights:
    ``class_names`` (label i is ``class_names[i]``) and ``crop_pct`` of its evaluation transform
    (``--crop-pct``, or MAE's rule for its size). A run resumed from a checkpoint written before
    they were recorded goes on without them: its checkpoint's model_args must stay the same."""
    resumed = resumed_model_args(cfg)
    if resumed is not None and not all(k in resumed for k in PREDICTION_ARGS):
        log.info("resume: the checkpoint records no class names; `ummae predict` will name its classes by index")
        return
    names = list(class_names) + [str(i) for i in range(len(class_names), model.num_classes)]  # --num-classes above
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else default_crop_pct(model.img_size)
    model.model_args.update(class_names=names, crop_pct=crop_pct)


def resumed_checkpoint(cfg) -> Path | None:
    """The checkpoint ``--resume`` continues (None: a new run)."""
    if not cfg.resume:
        return None
    path = Path(cfg.output) / "checkpoint-last.pth" if cfg.resume == "auto" else Path(cfg.resume)
    return path if path.exists() else None  # resume auto without a checkpoint: a new run


def resumed_model_args(cfg) -> dict[str, Any] | None:
    """The model_args of the checkpoint ``--resume`` continues (None: a new run)."""
    path = resumed_checkpoint(cfg)
    return None if path is None else ckpt.load(path, mmap=True).get("model_args") or {}


def take_label_subset(train_ds, cfg, record: Path | None = None) -> None:
    """``--label-fraction``: keep only the class-balanced subset of the training images that
    ``--label-seed`` draws (:func:`ummae.data.subset.balanced_subset`). ``record``: the run
    folder, whose ``label_subset.txt`` lists the subset (a list file: ``--data FILE
    --data-root TRAIN_SPLIT`` reads it back); a resumed run's list must be the one it draws now,
    else the training folder changed under the run and it is refused."""
    if cfg.label_fraction is None:
        return
    if not isinstance(train_ds, ImageDataset):  # a shard stream has no list of images to draw from
        raise UsageError("--label-fraction draws from a folder or a list file, not from tar shards")
    flag = f"--label-fraction {cfg.label_fraction} --label-seed {cfg.label_seed}:"
    keep = balanced_subset(train_ds.samples, train_ds.class_names, cfg.label_fraction, cfg.label_seed, flag[:-1])
    lines = subset_lines(train_ds.samples, keep)
    log.info("%s %d of the %d training images", flag, len(keep), len(train_ds.samples))
    train_ds.samples = [train_ds.samples[i] for i in keep]
    if record is None:
        return
    path = record / SUBSET_FILE
    if resumed_checkpoint(cfg) is not None and path.exists():
        if path.read_text().splitlines() != lines:
            raise UsageError(
                f"{path} lists other images than {flag[:-1]} draws from {cfg.data} now: the training images changed "
                f"since the run started; resume it on the data it started with"
            )
        return
    record.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)  # atomic: a killed run leaves the whole list or none


def _build_classifier(cfg, num_classes: int, **overrides) -> nn.Module:
    return create_model(cfg.model, **{**_model_kwargs(cfg), "num_classes": num_classes, **overrides})


def no_val_split(data: str) -> str:
    """Why the 'val' images are the training images, when :func:`same_images` says so."""
    return f"{data} has no val/ split; give --val-data for a real validation"


def same_images(train_ds, val_ds, val_data) -> bool:
    """Whether the val split fell back to the training images (data without a ``val/``
    folder, or a list file, and no ``--val-data``)."""
    return val_data is None and same_folder(val_ds.source, train_ds.source)


def _model_kwargs(cfg) -> dict[str, Any]:
    return cfg.model_kwargs() if hasattr(cfg, "model_kwargs") else {"img_size": cfg.img_size}


def _weights_model(path: str) -> tuple:
    """``(model_name, source_model)`` the weights file at ``path`` records, read without
    loading its tensors: ours (checkpoint or export) or a reference checkpoint (our model of its
    architecture, None for a size we do not register)."""
    _, meta = read_weights(path, tensors=False)
    return meta.get("model_name"), meta.get("source_model")


def model_from_weights(model: str | None, path: str | None, flag: str, what: str) -> str:
    """The classifier to build: ``model`` (``--model``), or when it is left out the one the
    weights name (a classifier checkpoint's own model; a pre-training checkpoint's registered classifier,
    ``registry.classifier_for``), said in the log; one clear error when nothing names one."""
    if model:
        return model
    if not path:
        raise UsageError(
            f"{what} from scratch (no --pretrained) needs --model: a registered classifier "
            f"(`ummae models --kind classify`)"
        )
    name, source = _weights_model(path)
    if name is None or name not in list_models():
        found = (
            f"it records {name!r}, not a registered model"
            if name
            else ("a reference checkpoint of a size ummae does not register, or an export without ummae metadata")
        )
        raise UsageError(
            f"{flag} {path} names no model ({found}): pass --model, a registered classifier "
            f"(`ummae models --kind classify`)"
        )
    if model_kind(name) == "pretrain":
        model = classifier_for(name)
        how = f"the classifier of the pre-training model {name} ({flag} {path})"
    elif source and source != name and source in list_models() and model_kind(source) == "pretrain":
        model = name
        how = f"the classifier of the pre-training model {source} ({flag} {path}, an export of its encoder)"
    else:
        model = name
        how = f"the classifier {flag} {path} holds"
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("--model %s: %s", model, how)
    return model


def classifier_from_weights(values: dict[str, Any], option: str, what: str) -> dict[str, Any]:
    """The weights level of a classifier command's config (:func:`ummae.config.resolve.resolve`):
    the weights file of ``option`` checked (an encoder to start from, or a classifier), then
    ``model`` from it when ``--model`` is left out."""
    flag = "--" + option.replace("_", "-")
    check_weights_file(values[option], flag, encoder=True)
    return {"model": model_from_weights(values["model"], values[option], flag, what)}


def classify_step(cfg: FinetuneConfig, num_classes: int) -> ClassifyStep:
    """The fine-tuning loss of ``cfg``: mixup/cutmix with soft targets (timm's Mixup also
    applies the label smoothing to them), else label-smoothed or plain cross-entropy."""
    if cfg.mixup_prob > 0 and (cfg.mixup > 0 or cfg.cutmix > 0):
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode="batch",
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
        return ClassifyStep(SoftTargetCrossEntropy(), mixup)
    if cfg.smoothing > 0:
        return ClassifyStep(LabelSmoothingCrossEntropy(cfg.smoothing))
    return ClassifyStep(nn.CrossEntropyLoss())


def lars_optimizer(head: nn.Linear, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """MAE's linear-probing optimiser: LARS (momentum 0.9, trust coefficient 0.001) with the
    trust ratio on the weight matrix and none on the bias (timm's Lars, ``always_adapt`` per
    group)."""
    return Lars(
        [{"params": [head.weight], "always_adapt": True}, {"params": [head.bias], "always_adapt": False}],
        lr=lr,
        momentum=0.9,
        weight_decay=weight_decay,
    )


class ClassifyTask(Task):
    """The shared part of fine-tuning and linear probing: labelled train / val splits, a
    classifier with as many classes as the training data (or ``--num-classes``), top-1 / top-5
    validation. Subclasses give the model options, optimiser, loss step and augmentation."""

    what = "classification"
    probe = False  # linear probing: BatchNorm + linear head on the frozen encoder

    def from_weights(self, values: dict[str, Any]) -> dict[str, Any]:
        return classifier_from_weights(values, "pretrained", self.what)

    def check(self, cfg) -> None:
        check_classifier(cfg.model)

    def model_options(self, cfg) -> dict[str, Any]:
        return {}

    def train_transform(self, cfg, img_size: int):
        raise NotImplementedError

    def build(self, cfg, ctx: RunContext) -> Parts:
        train_ds = build_classify_dataset(
            cfg.data, "train", None, cfg.data_root, samples_per_epoch=getattr(cfg, "samples_per_epoch", None)
        )
        val_ds = build_classify_dataset(
            cfg.val_data or cfg.data, "val", None, cfg.data_root, class_names=train_ds.class_names
        )
        take_label_subset(train_ds, cfg, Path(cfg.output) if ctx.is_main else None)
        num_classes = getattr(cfg, "num_classes", None) or train_ds.num_classes
        if num_classes < train_ds.num_classes:
            raise UsageError(f"num_classes={num_classes} but the training data has {train_ds.num_classes} classes")
        model = _build_classifier(cfg, num_classes, **self.model_options(cfg))
        report = load_pretrained(model, cfg.pretrained) if cfg.pretrained else None
        if self.probe:
            model.use_probe_head()
        train_ds.transform = self.train_transform(cfg, model.img_size)
        val_ds.transform = build_classify_transform(model.img_size, is_training=False, crop_pct=cfg.crop_pct)
        record_for_prediction(model, train_ds.class_names, cfg)
        return Parts(model, train_ds, val_ds, report)

    def describe(self, cfg, ctx: RunContext, parts: Parts, lr: float) -> None:
        model = parts.model
        log.info(
            "%s %s: %d classes, %.1fM params (%.2fM trained)",
            self.what,
            cfg.model,
            model.num_classes,
            sum(p.numel() for p in model.parameters()) / 1e6,
            sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        )
        log.info(
            "train %d images, val %d images; device %s x%d, precision %s, lr %.3e",
            len(parts.train),
            len(parts.val),
            ctx.device,
            ctx.info.world_size,
            ctx.precision,
            lr,
        )
        log_load_report(parts.report, Path(cfg.output))

    def evaluator(self, cfg, ctx: RunContext, parts: Parts):
        val_loader = shard_loader(parts.val, cfg.batch_size, ctx.workers, ctx.info, ctx.device)
        why = no_val_split(cfg.data) if same_images(parts.train, parts.val, cfg.val_data) else None

        def run_eval(m: nn.Module) -> dict[str, float]:
            # said at every report, and recorded with the numbers
            return on_training_images(evaluate(m, val_loader, ctx.device, ctx.precision), why, ctx.is_main)

        return run_eval, cfg.eval_every

    def finished(self, cfg, summary: dict[str, Any]) -> None:
        log.info(
            "done: %s", ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if "acc" in k and isinstance(v, float))
        )


class FinetuneTask(ClassifyTask):
    """``ummae finetune``: the paper's recipe (layer decay, RandAugment, mixup / cutmix, label
    smoothing, random erasing, drop path, optional EMA)."""

    what = "fine-tuning"

    def optimizer(self, cfg: FinetuneConfig, model: nn.Module, lr: float, device: torch.device):
        decay = cfg.layer_decay if cfg.layer_decay is not None else model.default_layer_decay
        log.info("layer-wise lr decay %s", decay)
        return build_optimizer(model, lr, cfg.weight_decay, cfg.betas, device, None if decay == 1.0 else decay)

    def train_transform(self, cfg: FinetuneConfig, img_size: int):
        aa = None if cfg.auto_augment.lower() in ("", "none") else cfg.auto_augment
        return build_classify_transform(img_size, True, auto_augment=aa, re_prob=cfg.reprob)

    def step(self, cfg: FinetuneConfig, parts: Parts) -> ClassifyStep:
        return classify_step(cfg, parts.model.num_classes)

    def ema(self, cfg: FinetuneConfig, model: nn.Module):
        if not cfg.ema:
            return None
        return ModelEmaV3(model, decay=cfg.ema_decay)


class LinprobeTask(ClassifyTask):
    """``ummae linprobe``: MAE's probing recipe: frozen encoder, BatchNorm (no affine) + linear
    head, LARS."""

    what = "linear probing"
    probe = True

    def model_options(self, cfg) -> dict[str, Any]:
        return {"drop_path": 0.0}

    def optimizer(self, cfg: LinprobeConfig, model: nn.Module, lr: float, device: torch.device):
        return lars_optimizer(model.head[1], lr, cfg.weight_decay)

    def train_transform(self, cfg: LinprobeConfig, img_size: int):
        return build_classify_transform(img_size, True, simple=True)

    def step(self, cfg: LinprobeConfig, parts: Parts) -> ClassifyStep:
        return ClassifyStep(nn.CrossEntropyLoss())


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """``ummae finetune``."""
    return run(FinetuneTask(), cfg)


def linprobe(cfg: LinprobeConfig) -> dict[str, Any]:
    """``ummae linprobe``."""
    return run(LinprobeTask(), cfg)


def load_classifier(cfg, path: str, ema: bool = False) -> nn.Module:
    """``cfg.model`` shaped like the classifier saved in ``path`` (classes, probe head, options
    without weights) and loaded from it (its EMA weights with ``ema``), drop path off; weights
    without a trained head are refused."""
    model, _ = build_from_checkpoint(path, "classify", ema=ema, name=cfg.model, img_size=cfg.img_size, drop_path=0.0)
    return model


def _model_of_checkpoint(values: dict[str, Any]) -> dict[str, Any]:
    """The weights level of ``ummae eval``'s config: ``--model`` from ``--checkpoint`` when left out."""
    return {"model": model_from_weights(values["model"], values["checkpoint"], "--checkpoint", "evaluation")}


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """``ummae eval``: top-1 / top-5 of a classifier checkpoint on a split."""
    with OneReadPerFile():  # the model named by the checkpoint and the model built from it: one read
        cfg, _ = resolve(cfg, weights=_model_of_checkpoint)
        check_classifier(cfg.model)
        model = load_classifier(cfg, cfg.checkpoint, ema=cfg.ema)  # refused before the data is scanned
    with udist.distributed(cfg.device) as (info, device):
        precision = resolve_precision(cfg.precision, device)
        model = model.to(device)
        ds = build_classify_dataset(cfg.val_data or cfg.data, cfg.split, None, cfg.data_root)  # as training reads val
        if ds.num_classes > model.num_classes:
            raise UsageError(f"the data has {ds.num_classes} classes but the classifier only {model.num_classes}")
        ds.transform = build_classify_transform(model.img_size, is_training=False, crop_pct=cfg.crop_pct)
        loader = shard_loader(ds, cfg.batch_size, udist.loader_workers(cfg.num_workers), info, device)
        result = evaluate(model, loader, device, precision)
        if info.is_main:
            log.info(
                "%s%s on %s (%s split, %d images): top-1 %.2f%%, top-5 %.2f%%",
                cfg.checkpoint,
                " (EMA)" if cfg.ema else "",
                cfg.data,
                cfg.split,
                result["val_images"],
                result["acc1"],
                result["acc5"],
            )
        return result
