"""Weighted k-nearest-neighbour classification on frozen features (the quick probe of
pre-training quality used by DINO and many MIM papers): cosine similarity, the ``k`` nearest
training images vote for their class with weight ``exp(sim / T)``."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ummae.config import KnnConfig, resolve
from ummae.data import build_classify_dataset, build_classify_transform, build_eval_loader
from ummae.engine import dist as udist
from ummae.engine.precision import autocast, resolve_precision
from ummae.engine.progress import progress
from ummae.models.classifier import check_classifier
from ummae.models.registry import create_model
from ummae.tasks.classify import VAL_IS_TRAIN, classifier_from_weights, same_images
from ummae.weights.load import OneReadPerFile, load_pretrained

log = logging.getLogger("ummae")


def knn_scores(
    train_feats: Tensor,
    train_labels: Tensor,
    feats: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Class scores ``[M, num_classes]`` of ``feats [M, D]`` from ``train_feats [N, D]``."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for q in F.normalize(feats.float(), dim=1).split(chunk):
        sim, idx = (q @ train.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        out.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(out)


@torch.no_grad()
def extract_features(
    model: nn.Module, loader, device: torch.device, precision: str, desc: str = "features"
) -> tuple[Tensor, Tensor]:
    """Features and labels of every rank's shard, gathered on every rank."""
    model.eval()
    feats, labels = [], []
    for images, y, _ in progress(loader, desc=desc, unit="batch", is_main=udist.is_main_process()):
        if images.shape[0] == 0:
            continue
        with autocast(device, precision):
            f = model(images.to(device, non_blocking=True))
        feats.append(f.float())
        labels.append(y.to(device))
    dim = model.num_features
    f = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    return udist.all_gather_rows(f), udist.all_gather_rows(y)


def run_knn(cfg: KnnConfig) -> dict[str, Any]:
    """``ummae knn``: weighted kNN top-1 of the frozen encoder of ``--pretrained``."""
    with OneReadPerFile():  # the check of --pretrained (before the data is scanned) and the load: one read
        cfg, _ = resolve(cfg, weights=lambda values: classifier_from_weights(values, "pretrained", "kNN evaluation"))
        check_classifier(cfg.model)
        return _knn(cfg)


def _knn(cfg: KnnConfig) -> dict[str, Any]:
    with udist.distributed(cfg.device) as (info, device):
        precision = resolve_precision(cfg.precision, device)
        train_ds = build_classify_dataset(cfg.data, "train", None, cfg.data_root)
        val_ds = build_classify_dataset(
            cfg.val_data or cfg.data, "val", None, cfg.data_root, class_names=train_ds.class_names
        )
        model = create_model(cfg.model, num_classes=0, img_size=cfg.img_size, drop_path=0.0)  # head-less: features
        report = load_pretrained(model, cfg.pretrained)
        if info.is_main:
            log.info("pre-trained weights:\n%s", report.format())
        model.to(device)
        workers = udist.loader_workers(cfg.num_workers)
        feats = {}
        for name, ds in (("train", train_ds), ("val", val_ds)):
            ds.transform = build_classify_transform(model.img_size, is_training=False, crop_pct=cfg.crop_pct)
            loader = build_eval_loader(
                ds, cfg.batch_size, workers, info.world_size, info.rank, pin_memory=device.type == "cuda"
            )
            feats[name] = extract_features(model, loader, device, precision, f"kNN features ({name})")
        scores = knn_scores(*feats["train"], feats["val"][0], train_ds.num_classes, cfg.k, cfg.temperature)
        val_labels = feats["val"][1]
        top1 = 100.0 * float((scores.argmax(1) == val_labels).float().mean())
        result = {
            "knn_acc1": top1,
            "k": cfg.k,
            "temperature": cfg.temperature,
            "train_images": int(feats["train"][1].numel()),
            "val_images": int(val_labels.numel()),
        }
        if same_images(train_ds, val_ds, cfg.val_data):
            result["val_is_train"] = True
            if info.is_main:
                log.warning(VAL_IS_TRAIN, cfg.data)
        if info.is_main:
            log.info(
                "kNN (k=%d, T=%g) top-1 %.2f%% on %d val images", cfg.k, cfg.temperature, top1, result["val_images"]
            )
        return result
