"""``ummae knn``: weighted k-nearest-neighbour classification on the frozen features of a
pre-trained encoder (:class:`~ummae.evaluation.classification.KnnEvaluator`): the training
images' features are the bank, the val images vote with theirs."""

from __future__ import annotations

import logging
from typing import Any

from ummae.config import KnnConfig, resolve
from ummae.data import build_classify_dataset, build_classify_transform
from ummae.engine import dist as udist
from ummae.engine.precision import resolve_precision
from ummae.evaluation import inference_on_dataset, on_training_images, shard_loader
from ummae.evaluation.classification import FeatureBank, KnnEvaluator, model_outputs
from ummae.models.classifier import check_classifier
from ummae.models.registry import create_model
from ummae.tasks.classify import classifier_from_weights, no_val_split, same_images, take_label_subset
from ummae.weights.load import OneReadPerFile, load_pretrained

log = logging.getLogger("ummae")


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
        take_label_subset(train_ds, cfg)  # the bank: the labelled images only
        model = create_model(cfg.model, num_classes=0, img_size=cfg.img_size, drop_path=0.0)  # head-less: features
        report = load_pretrained(model, cfg.pretrained)
        if info.is_main:
            log.info("pre-trained weights:\n%s", report.format())
        model.to(device)
        workers = udist.loader_workers(cfg.num_workers)
        loaders = {}
        for name, ds in (("train", train_ds), ("val", val_ds)):
            ds.transform = build_classify_transform(model.img_size, is_training=False, crop_pct=cfg.crop_pct)
            loaders[name] = shard_loader(ds, cfg.batch_size, workers, info, device)
        bank = FeatureBank(model.num_features, device)
        train = inference_on_dataset(
            model, loaders["train"], bank, model_outputs, device, precision, desc="kNN features (train)"
        )
        knn = KnnEvaluator(bank, train_ds.num_classes, cfg.k, cfg.temperature)
        val = inference_on_dataset(
            model, loaders["val"], knn, model_outputs, device, precision, desc="kNN features (val)"
        )
        result = {
            "knn_acc1": val["knn_acc1"],
            "k": cfg.k,
            "temperature": cfg.temperature,
            "train_images": train["images"],
            "val_images": val["val_images"],
        }
        why = no_val_split(cfg.data) if same_images(train_ds, val_ds, cfg.val_data) else None
        on_training_images(result, why, info.is_main, flag=True)
        if info.is_main:
            log.info(
                "kNN (k=%d, T=%g) top-1 %.2f%% on %d val images",
                cfg.k,
                cfg.temperature,
                result["knn_acc1"],
                result["val_images"],
            )
        return result
