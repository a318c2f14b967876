"""Object detection and instance segmentation on COCO, on torchvision's detection package.

``ummae detect train`` builds a detector (:mod:`ummae.detector_specs`, one spec per detector;
built by :mod:`ummae.models.detectors`) on the dense backbone (the four stage maps, each
LayerNorm + Linear to 768 channels) and trains it with the one engine. The defaults are the
paper's protocol, ``gfl`` (the reference's
``gfl_mae_swin_tiny_256_..._fpn_25ep_1024x1024_coco``): FPN from stage 2 on (strides 8-32) with
two extra levels on its output (P3-P7), BatchNorm (SyncBN under DDP on CUDA), the GFL head
(:mod:`ummae.models.gfl`), large-scale jitter at 1024, AdamW lr 1e-4 (batch 16), weight decay
0.05, 2000 warm-up steps, cosine to 0.01x, 25 epochs. A spec with masks (``masks=True``) trains
on the instance masks too and is evaluated by box and mask AP; the others by box AP.

``--train-resize range`` replaces the large-scale jitter by MMDetection's "range" multi-scale
resize (HTC++: ``--img-size 1600 --short-range 400 1400``) for any detector.

Images reach the model as uint8 (4x fewer bytes to the device) and are normalised there by
torchvision's transform. Training images are already the ``img_size`` canvas (the jitter pads
them); evaluation images are resized to fit in ``img_size`` x ``img_size`` (keep ratio) and
padded to it, as the model was trained, and the detections are mapped back to the original
image by torchvision's post-processing. Labels are ``1..K`` for the K categories of the
training annotations (0 is torchvision's background), recorded with the weights so that eval
and predict map them back to COCO category ids without the training data.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ummae.config import DetectTestConfig, config_from_args
from ummae.data.coco import CocoDetection, LargeScaleJitter, RangeResize, collate_detection, collate_detection_eval
from ummae.detector_specs import SPECS
from ummae.engine import dist as udist
from ummae.engine.optim import build_optimizer
from ummae.engine.precision import resolve_device, resolve_precision
from ummae.errors import UsageError
from ummae.evaluation import inference_on_dataset, shard_loader
from ummae.evaluation.coco import CocoEvaluator, detections, drop_background
from ummae.models.dense import check_dense_backbone
from ummae.models.detect_tta import MultiScaleFlip, detect
from ummae.models.detectors import build_detector
from ummae.tasks.base import Parts, RunContext, Task, check_weights_file, run
from ummae.tasks.dense import validation
from ummae.visualize import image_paths, read_rgb
from ummae.weights.build import build_from_checkpoint
from ummae.weights.load import load_pretrained, log_load_report

log = logging.getLogger("ummae")


class DetectStep:
    """``step_fn`` of the Trainer: uint8 canvases -> [0, 1] floats, torchvision's loss dict."""

    def __call__(self, model: nn.Module, batch, generator: torch.Generator) -> dict[str, Tensor]:
        images, targets = batch[0], batch[1]
        device = images.device
        inputs = [im.float().div_(255) for im in images]
        targets = [
            {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets
        ]
        losses = model(inputs, targets)
        return {"loss": sum(losses.values()), **losses}


def evaluate_coco(
    model: nn.Module,
    dataset,
    loader,
    device: torch.device,
    precision: str,
    iou_types: tuple[str, ...],
    results_path: str | None = None,
    test: MultiScaleFlip | None = None,
) -> dict[str, float]:
    """COCO AP of ``model`` over ``dataset``: every rank detects on its shard of the images
    (under ``test``: at its scales and flips, merged), the results of all ranks are gathered
    (each image once), rank 0 runs pycocotools and every rank returns its numbers (they decide
    which checkpoint is the best, a collective)."""
    evaluator = CocoEvaluator(dataset, iou_types, results_path)
    predict = functools.partial(detections, test=test)
    return inference_on_dataset(model, loader, evaluator, predict, device, precision, desc="detection eval")


def test_augment(cfg) -> MultiScaleFlip:
    """The multi-scale + flip test of ``cfg``'s ``test_scales`` and ``test_flip``."""
    return MultiScaleFlip(cfg.test_scale_pairs(), cfg.test_flip)


def load_detector(path: str) -> nn.Module:
    """A detector as ``ummae detect train`` saved it (any of its checkpoints)."""
    return build_from_checkpoint(path, "detect", drop_path=0.0)[0]  # drop path off: inference


def category_names(model: nn.Module) -> list[str]:
    """Name of each label (index 0: background) of a detector built here."""
    return ["background", *model.model_args["class_names"]]


def train_transform(cfg):
    """The training resize of ``cfg``: large-scale jitter, or MMDetection's "range" multi-scale
    (HTC++), each with the flip and the pad to the ``img_size`` canvas."""
    if cfg.train_resize == "range":
        return RangeResize(cfg.img_size, cfg.short_range, cfg.flip_prob)
    return LargeScaleJitter(cfg.img_size, cfg.scale_range, cfg.flip_prob)


class DetectTask(Task):
    """``ummae detect train``: a detector on COCO from a pre-trained backbone."""

    best_metric = "bbox_AP"

    def check(self, cfg) -> None:
        check_dense_backbone(cfg.backbone)
        check_weights_file(cfg.pretrained, encoder=True)

    def build(self, cfg, ctx: RunContext) -> Parts:
        train_ds = CocoDetection(
            cfg.data,
            cfg.train_split,
            train=True,
            with_masks=SPECS[cfg.detector].masks,
            transform=train_transform(cfg),
            stuff_dir=cfg.stuff_maps,
        )
        val_ds = CocoDetection(cfg.data, cfg.val_split, train=False)
        if val_ds.cat_ids != train_ds.cat_ids:
            raise UsageError(f"the {cfg.val_split} annotations have other categories than the {cfg.train_split} ones")
        model = build_detector(
            cfg.detector,
            cfg.backbone,
            train_ds.num_classes + 1,
            cat_ids=list(train_ds.cat_ids),
            class_names=list(train_ds.class_names),
            **cfg.model_kwargs(),
        )
        report = load_pretrained(model, cfg.pretrained) if cfg.pretrained else None
        if (
            ctx.info.enabled and ctx.device.type == "cuda"
        ):  # the paper's SyncBN in the FPN (BatchNorm per rank otherwise)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return Parts(model, train_ds, val_ds, report, collate=collate_detection)

    def optimizer(self, cfg, model: nn.Module, lr: float, device: torch.device):
        return build_optimizer(model, lr, cfg.weight_decay, cfg.betas, device)

    def step(self, cfg, parts: Parts) -> DetectStep:
        return DetectStep()

    def describe(self, cfg, ctx: RunContext, parts: Parts, lr: float) -> None:
        log.info(
            "detection: %s on %s, %d classes, %.1fM params; train %d images, val %d images; device %s x%d, "
            "precision %s, lr %.3e",
            cfg.detector,
            cfg.backbone,
            parts.train.num_classes,
            sum(p.numel() for p in parts.model.parameters()) / 1e6,
            len(parts.train),
            len(parts.val),
            ctx.device,
            ctx.info.world_size,
            ctx.precision,
            lr,
        )
        log_load_report(parts.report, Path(cfg.output), "the backbone")

    def evaluator(self, cfg, ctx: RunContext, parts: Parts):
        val_ds = parts.val
        val_loader = shard_loader(val_ds, cfg.batch_size, ctx.workers, ctx.info, ctx.device, collate_detection_eval)
        iou_types = SPECS[cfg.detector].iou_types  # box AP, and mask AP for a detector with masks
        test = test_augment(cfg)
        measure = validation(
            lambda m: evaluate_coco(m, val_ds, val_loader, ctx.device, ctx.precision, iou_types, test=test),
            val_ds.img_dir,
            parts.train.img_dir,
            cfg.val_split,
            ctx.is_main,
        )
        return measure, cfg.eval_every


def train(cfg) -> dict[str, Any]:
    """``ummae detect train``: the detector on COCO with the one Trainer."""
    return run(DetectTask(), cfg)


def run_eval(cfg) -> dict[str, Any]:
    """``ummae detect eval``: COCO result JSON and AP of a detection checkpoint."""
    cfg.validate()
    with udist.distributed(cfg.device) as (info, device):
        precision = resolve_precision(cfg.precision, device)
        model = load_detector(cfg.checkpoint).to(device)  # refused before the annotations are read
        ds = CocoDetection(cfg.data, cfg.split, train=False)
        if list(ds.cat_ids) != list(model.model_args["cat_ids"]):
            raise UsageError(f"{cfg.data} {cfg.split} has other categories than the detector was trained on")
        out = Path(cfg.output)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        workers = udist.loader_workers(cfg.num_workers)
        loader = shard_loader(ds, cfg.batch_size, workers, info, device, collate_detection_eval)
        iou_types = model.spec.iou_types
        results_path = str(out / f"detections_{cfg.split}.json")
        metrics = evaluate_coco(model, ds, loader, device, precision, iou_types, results_path, test=test_augment(cfg))
        if info.is_main:
            (out / f"metrics_{cfg.split}.json").write_text(json.dumps(metrics, indent=1) + "\n")
            log.info(
                "%s on %s (%s, %d images): %s; results in %s",
                cfg.checkpoint,
                cfg.data,
                cfg.split,
                len(ds),
                ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()),
                results_path,
            )
        return metrics


@torch.no_grad()
def predict(args) -> int:
    """``ummae detect predict``: one picture per image with the detections scoring at least
    ``--score-thresh`` drawn: boxes, ``label score`` captions and, for the mask detectors, masks."""
    if not 0 <= args.score_thresh <= 1:
        raise UsageError(f"--score-thresh {args.score_thresh}: must be in [0, 1]")
    test = test_augment(config_from_args(DetectTestConfig, args))  # --test-scales, --test-flip
    device = resolve_device(args.device)
    model = load_detector(args.checkpoint).to(device).eval()
    names = category_names(model)
    paths = image_paths(args.images)
    if not paths:
        raise UsageError("no images given")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:  # a log line per picture: its own progress report
        image = pil_to_tensor(read_rgb(path))
        det = drop_background(detect(model, [image.to(device).float().div_(255)], test)[0])
        keep = det["scores"] >= args.score_thresh
        det = {k: v[keep].cpu() for k, v in det.items()}
        drawn = image
        if "masks" in det and len(det["scores"]):
            drawn = draw_segmentation_masks(drawn, det["masks"][:, 0] > 0.5, alpha=0.45)
        captions = [f"{names[int(c)]} {s:.2f}" for c, s in zip(det["labels"], det["scores"].tolist(), strict=True)]
        drawn = draw_bounding_boxes(drawn, det["boxes"], captions, colors="red", width=2)
        target = out / (Path(path).stem + ".png")
        Image.fromarray(np.ascontiguousarray(drawn.permute(1, 2, 0).numpy())).save(target)
        log.info("%s: %d detections >= %.2f -> %s", path, len(captions), args.score_thresh, target)
    print(f"wrote {len(paths)} picture(s) to {out}")
    return 0
