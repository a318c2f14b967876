"""Fine-tuning, linear probing and evaluation of classifiers, on the one training engine.

``finetune``: the paper's recipe (METHOD.md; MAE's ``main_finetune``): layer-wise lr decay,
RandAugment, mixup/cutmix, label smoothing, random erasing, drop path, optional EMA.
``linprobe``: MAE's probing recipe: frozen encoder, BatchNorm (no affine) + linear head, LARS.
``evaluate``: top-1 / top-5, sharded over ranks and summed exactly.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ummae.engine import dist as udist
from ummae.config import EvalConfig, FinetuneConfig, LinprobeConfig, settings_from_checkpoint
from ummae.data import build_classify_dataset, build_classify_transform, build_eval_loader, build_train_loader
from ummae.weights.io import CheckpointError
from ummae.engine.trainer import Trainer, training_run
from ummae.engine.optim import build_optimizer
from ummae.engine.precision import autocast, resolve_precision
from ummae.models.registry import create_model, list_models, model_kind
from ummae.models.classifier import check_classifier, classifier_for
from ummae.weights.load import load_pretrained, load_weights, log_load_report, model_args_within_bounds, read_weights
from ummae.errors import UsageError

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

    def __call__(self, model: nn.Module, batch, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        images, targets = batch[0], batch[1]
        if self.mixup is not None:
            from timm.data.mixup import mixup_target

            if images.shape[0] % 2 == 0:  # timm mixes a batch with its reverse: needs pairs
                with numpy_seeded(generator.initial_seed()):
                    images, targets = self.mixup(images, targets)
            elif images.shape[0] > 1:  # odd only after an unreadable image was skipped
                with numpy_seeded(generator.initial_seed()):
                    images, targets = self.mixup(images[:-1], targets[:-1])
            else:
                targets = mixup_target(targets, self.mixup.num_classes, 1.0, self.mixup.label_smoothing)
        return {"loss": self.criterion(model(images), targets)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over every rank's shard."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # images, top-1, top-5, loss
    for images, labels, _ in loader:
        if images.shape[0] == 0:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels.unsqueeze(1))
        sums += torch.stack([
            torch.tensor(float(labels.numel()), device=device, dtype=torch.float64),
            hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
            F.cross_entropy(logits, labels, reduction="sum").double(),
        ])
    n, top1, top5, loss = udist.all_reduce_sum(sums).tolist()
    if n == 0:
        raise UsageError("the validation data yielded no readable image")
    return {"acc1": 100.0 * top1 / n, "acc5": 100.0 * top5 / n, "val_loss": loss / n, "val_images": int(n)}


def _build_classifier(cfg, num_classes: int, **overrides) -> nn.Module:
    return create_model(cfg.model, **{**_model_kwargs(cfg), "num_classes": num_classes, **overrides})


VAL_IS_TRAIN = ("the 'val' figures are measured on the TRAINING images: %s has no val/ split; give --val-data "
                "for a real validation")


def same_images(train_ds, val_ds, val_data) -> bool:
    """Whether the val split fell back to the training images (data without a ``val/``
    folder, or a list file, and no ``--val-data``)."""
    return val_data is None and os.path.realpath(val_ds.source) == os.path.realpath(train_ds.source)


def _model_kwargs(cfg) -> Dict[str, Any]:
    return cfg.model_kwargs() if hasattr(cfg, "model_kwargs") else {"img_size": cfg.img_size}


def _weights_model(path: str) -> tuple:
    """``(model_name, source_model)`` the weights file at ``path`` records, read without
    loading its tensors: ours (checkpoint or export) or a reference checkpoint (our model of its
    architecture, None for a size we do not register)."""
    _, meta = read_weights(path, tensors=False)
    return meta.get("model_name"), meta.get("source_model")


def model_from_weights(cfg, path: str | None, flag: str, what: str) -> None:
    """``--model`` left out: the classifier the weights name (a classifier checkpoint's own
    model; a pre-training checkpoint's classifier, ``mae_X`` / ``simmim_X`` -> ``X``), said in
    the log; one clear error when nothing names one."""
    if cfg.model:
        return
    if not path:
        raise UsageError(f"{what} from scratch (no --pretrained) needs --model: a registered classifier "
                         f"(`ummae models --kind classify`)")
    name, source = _weights_model(path)
    if name is None or name not in list_models():
        found = f"it records {name!r}, not a registered model" if name else (
            "a reference checkpoint of a size ummae does not register, or an export without ummae metadata")
        raise UsageError(f"{flag} {path} names no model ({found}): pass --model, a registered classifier "
                         f"(`ummae models --kind classify`)")
    if model_kind(name) == "pretrain":
        cfg.model = classifier_for(name)
        how = f"the classifier of the pre-training model {name} ({flag} {path})"
    elif source and source != name and source in list_models() and model_kind(source) == "pretrain":
        cfg.model = name
        how = f"the classifier of the pre-training model {source} ({flag} {path}, an export of its encoder)"
    else:
        cfg.model = name
        how = f"the classifier {flag} {path} holds"
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("--model %s: %s", cfg.model, how)


def _run(cfg, what: str, make_model, make_optimizer, make_step, train_transform, probe: bool = False) -> Dict[str, Any]:
    """Shared assembly of fine-tuning and probing: data, model, optimiser -> the Trainer."""
    cfg.validate()
    settings_from_checkpoint(cfg, log)  # a resumed run's model comes from its checkpoint
    model_from_weights(cfg, cfg.pretrained, "--pretrained", what)
    check_classifier(cfg.model)
    with training_run(cfg) as (info, device, precision):
        train_ds = build_classify_dataset(cfg.data, "train", None, cfg.data_root,
                                          samples_per_epoch=getattr(cfg, "samples_per_epoch", None))
        val_ds = build_classify_dataset(cfg.val_data or cfg.data, "val", None, cfg.data_root, class_names=train_ds.class_names)
        num_classes = getattr(cfg, "num_classes", None) or train_ds.num_classes
        if num_classes < train_ds.num_classes:
            raise UsageError(f"num_classes={num_classes} but the training data has {train_ds.num_classes} classes")
        model = make_model(num_classes)
        report = load_pretrained(model, cfg.pretrained) if cfg.pretrained else None
        if probe:
            model.use_probe_head()
        model.to(device)
        train_ds.transform = train_transform(model.img_size)
        val_ds.transform = build_classify_transform(model.img_size, is_training=False, crop_pct=cfg.crop_pct)
        workers = min(cfg.num_workers, os.cpu_count() or 1)
        pin = device.type == "cuda"
        loader, sampler = build_train_loader(train_ds, cfg.batch_size, workers, info.world_size, info.rank, cfg.seed, pin_memory=pin)
        val_loader = build_eval_loader(val_ds, cfg.batch_size, workers, info.world_size, info.rank, pin_memory=pin)
        lr = cfg.effective_lr(info.world_size)
        optimizer = make_optimizer(model, lr, device)
        out = Path(cfg.output)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            log.info("%s %s: %d classes, %.1fM params (%.2fM trained)", what, cfg.model, num_classes,
                     sum(p.numel() for p in model.parameters()) / 1e6,
                     sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
            log.info("train %d images, val %d images; device %s x%d, precision %s, lr %.3e",
                     len(train_ds), len(val_ds), device, info.world_size, precision, lr)
            log_load_report(report, out)
        ema = None
        if getattr(cfg, "ema", False):
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=cfg.ema_decay)

        val_is_train = same_images(train_ds, val_ds, cfg.val_data)

        def run_eval(m: nn.Module) -> Dict[str, float]:
            out = evaluate(m, val_loader, device, precision)
            if val_is_train:  # said at every report, and recorded with the numbers
                out["val_is_train"] = 1.0
                if info.is_main:
                    log.warning(VAL_IS_TRAIN, cfg.data)
            return out

        trainer = Trainer(cfg, model, optimizer, loader, sampler, device, precision, lr, info, make_step(num_classes),
                          evaluate=run_eval, eval_every=cfg.eval_every, ema=ema)
        summary = trainer.fit()
        if info.is_main:
            log.info("done: %s", ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if "acc" in k and isinstance(v, float)))
        return summary


def classify_step(cfg: FinetuneConfig, num_classes: int) -> ClassifyStep:
    """The fine-tuning loss of ``cfg``: mixup/cutmix with soft targets (timm's Mixup also
    applies the label smoothing to them), else label-smoothed or plain cross-entropy."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup_prob > 0 and (cfg.mixup > 0 or cfg.cutmix > 0):
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        return ClassifyStep(SoftTargetCrossEntropy(), mixup)
    if cfg.smoothing > 0:
        return ClassifyStep(LabelSmoothingCrossEntropy(cfg.smoothing))
    return ClassifyStep(nn.CrossEntropyLoss())


def finetune(cfg: FinetuneConfig) -> Dict[str, Any]:
    def make_optimizer(model, lr, device):
        decay = cfg.layer_decay if cfg.layer_decay is not None else model.default_layer_decay
        log.info("layer-wise lr decay %s", decay)
        return build_optimizer(model, lr, cfg.weight_decay, cfg.betas, device, None if decay == 1.0 else decay)

    aa = None if cfg.auto_augment.lower() in ("", "none") else cfg.auto_augment
    return _run(cfg, "fine-tuning", lambda n: _build_classifier(cfg, n), make_optimizer, lambda n: classify_step(cfg, n),
                lambda size: build_classify_transform(size, True, auto_augment=aa, re_prob=cfg.reprob))


def lars_optimizer(head: nn.Linear, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """MAE's linear-probing optimiser: LARS (momentum 0.9, trust coefficient 0.001) with the
    trust ratio on the weight matrix and none on the bias (timm's Lars, ``always_adapt`` per
    group)."""
    from timm.optim import Lars

    return Lars([{"params": [head.weight], "always_adapt": True}, {"params": [head.bias], "always_adapt": False}],
                lr=lr, momentum=0.9, weight_decay=weight_decay)


def linprobe(cfg: LinprobeConfig) -> Dict[str, Any]:
    def make_model(num_classes: int) -> nn.Module:
        return _build_classifier(cfg, num_classes, drop_path=0.0)

    return _run(cfg, "linear probing", make_model, lambda model, lr, device: lars_optimizer(model.head[1], lr, cfg.weight_decay),
                lambda n: ClassifyStep(nn.CrossEntropyLoss()),
                lambda size: build_classify_transform(size, True, simple=True), probe=True)


def load_classifier(cfg, path: str, ema: bool = False) -> nn.Module:
    """Build ``cfg.model`` shaped like the classifier saved in ``path`` (classes, probe head)
    and load it (its EMA weights with ``ema``); refuse weights without a trained head."""
    state, meta = read_weights(path, ema)
    if "head.weight" not in state and "head.1.weight" not in state:
        raise CheckpointError(
            f"{path} holds no classifier head (model {meta.get('source_model') or meta.get('model_name')}): it is a "
            f"pre-training or encoder-only file; fine-tune it (`ummae finetune --pretrained`) or use `ummae knn`"
        )
    probe = "head.1.weight" in state
    n = state["head.1.weight" if probe else "head.weight"].shape[0]
    args = model_args_within_bounds(meta.get("model_args") or {}, path)
    # Options without weights (Swin window, PVT spatial reduction) are rebuilt as trained.
    built = {k: args[k] for k in ("window_size", "sr_ratios") if k in args}
    model = create_model(cfg.model, num_classes=n, img_size=cfg.img_size or args.get("img_size"), drop_path=0.0, **built)
    if probe:
        model.use_probe_head()
    report = load_weights(model, state, meta, path)  # the weights read above: one read of the file
    if report.new or report.dropped:
        raise CheckpointError(f"{path} does not hold a complete {cfg.model} classifier:\n{report.format()}")
    return model


def run_eval(cfg: EvalConfig) -> Dict[str, Any]:
    cfg.validate()
    model_from_weights(cfg, cfg.checkpoint, "--checkpoint", "evaluation")
    check_classifier(cfg.model)
    with udist.distributed(cfg.device) as (info, device):
        precision = resolve_precision(cfg.precision, device)
        ds = build_classify_dataset(cfg.data, cfg.split, None, cfg.data_root)
        model = load_classifier(cfg, cfg.checkpoint, ema=cfg.ema).to(device)
        if ds.num_classes > model.num_classes:
            raise UsageError(f"the data has {ds.num_classes} classes but the classifier only {model.num_classes}")
        ds.transform = build_classify_transform(model.img_size, is_training=False, crop_pct=cfg.crop_pct)
        loader = build_eval_loader(ds, cfg.batch_size, min(cfg.num_workers, os.cpu_count() or 1),
                                   info.world_size, info.rank, pin_memory=device.type == "cuda")
        result = evaluate(model, loader, device, precision)
        if info.is_main:
            log.info("%s%s on %s (%s split, %d images): top-1 %.2f%%, top-5 %.2f%%", cfg.checkpoint, " (EMA)" if cfg.ema else "", cfg.data, cfg.split,
                     result["val_images"], result["acc1"], result["acc5"])
        return result
