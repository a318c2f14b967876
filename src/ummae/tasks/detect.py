"""Object detection and instance segmentation on COCO, on torchvision's detection package.

``ummae detect train`` builds a detector on the dense backbone (:mod:`.dense`: the four stage
maps, each LayerNorm + Linear to 768 channels) and trains it with the one engine:

* ``gfl`` (default): the paper's protocol (the reference's
  ``gfl_mae_swin_tiny_256_..._fpn_25ep_1024x1024_coco``): FPN from stage 2 on (strides
  8-32) with two extra levels on its output (P3-P7), BatchNorm (SyncBN under DDP on CUDA),
  the GFL head (:mod:`.gfl`), large-scale jitter at 1024, AdamW lr 1e-4 (batch 16), weight
  decay 0.05, 2000 warm-up steps, cosine to 0.01x, 25 epochs;
* ``maskrcnn``: torchvision's Mask R-CNN on an FPN over all four stages (P2-P6), the transfer
  benchmark of MAE / SimMIM; box and mask AP;
* ``retinanet`` / ``fcos``: torchvision's, on the P3-P7 pyramid of GFL.

Images reach the model as uint8 (4x fewer bytes to the device) and are normalised there by
torchvision's transform. Training images are already the ``img_size`` canvas (the jitter pads
them); evaluation images are resized to fit in ``img_size`` x ``img_size`` (keep ratio) and
padded to it, as the model was trained, and the detections are mapped back to the original
image by torchvision's post-processing. Labels are ``1..K`` for the K categories of the
training annotations (0 is torchvision's background), recorded with the weights so that eval
and predict map them back to COCO category ids without the training data.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool
from torchvision.ops.misc import Conv2dNormActivation

from ummae.engine import dist as udist
from ummae.choices import DETECTORS
from ummae.engine.precision import autocast
from ummae.tasks.dense import StageMaps, build_stage_maps, encoder_options, load_task_model, validation
from ummae.weights.load import log_load_report
from ummae.errors import UsageError

log = logging.getLogger("ummae")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ExtraLevelsOnOutput(ExtraFPNBlock):
    """P6 and P7 as MMDetection's ``add_extra_convs='on_output'`` makes them for GFL: 3x3
    stride-2 convs on the last FPN output, each followed by the FPN's norm, no activation
    in between (torchvision's ``LastLevelP6P7`` puts a ReLU before P7 and has no norm)."""

    def __init__(self, channels: int, norm_layer=None, levels: int = 2):
        super().__init__()
        self.convs = nn.ModuleList(
            Conv2dNormActivation(channels, channels, 3, stride=2, norm_layer=norm_layer, activation_layer=None)
            for _ in range(levels)
        )

    def forward(self, results: List[Tensor], x: List[Tensor], names: List[str]):
        for i, conv in enumerate(self.convs):
            results.append(conv(results[-1]))
            names.append(f"extra{i}")
        return results, names


class FeaturePyramid(nn.Module):
    """``body`` (:class:`StageMaps`) + torchvision's FPN over its stage maps;
    ``out_channels`` is what torchvision's detectors read."""

    def __init__(self, body: StageMaps, out_channels: int, extra_blocks: ExtraFPNBlock, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork([body.out_channels] * len(body.proj), out_channels, extra_blocks, norm_layer)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body(x))


def build_detector(detector: str, backbone: str, num_classes: int, img_size: int = 1024, neck_channels: int = 768,
                   fpn_channels: int = 256, drop_path: float | None = 0.1, window_size: int | None = None,
                   pretrained: str | None = None, **names: Any):
    """The detector, and the report of loading ``pretrained`` into its backbone (None when it
    starts from scratch). ``num_classes`` counts torchvision's background (K + 1). The model
    carries ``model_name`` / ``model_args``: what the checkpoints record and eval rebuilds."""
    from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    if detector not in DETECTORS:
        raise UsageError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    # Mask R-CNN: P2-P6, as torchvision's and MAE's / ViTDet's; the others P3-P7: from stage 2
    # on, two extra levels on the output
    stages = [0, 1, 2, 3] if detector == "maskrcnn" else [1, 2, 3]
    body, report = build_stage_maps(backbone, img_size, neck_channels, drop_path, window_size, pretrained, stages)
    extra = LastLevelMaxPool() if detector == "maskrcnn" else ExtraLevelsOnOutput(fpn_channels, nn.BatchNorm2d)
    neck = FeaturePyramid(body, fpn_channels, extra)
    if detector == "gfl":
        from ummae.models.gfl import GFL

        cls = GFL
    else:
        cls = {"maskrcnn": MaskRCNN, "retinanet": RetinaNet, "fcos": FCOS}[detector]
    model = cls(neck, num_classes)
    # Training images come as the img_size canvas of the jitter (no resize); evaluation
    # images are fitted into it (min_size = max_size: scale = img_size / long side) and padded
    # to it (size_divisible = img_size), so the backbone always sees the size it trains at.
    model.transform = GeneralizedRCNNTransform(img_size, img_size, IMAGENET_MEAN, IMAGENET_STD,
                                               size_divisible=img_size, _skip_resize=True)
    model.model_name = f"{detector}_{backbone}"
    model.model_args = dict(detector=detector, backbone=backbone, num_classes=num_classes, img_size=img_size,
                            neck_channels=neck_channels, fpn_channels=fpn_channels, **encoder_options(body),
                            **names)
    return model, report


class DetectStep:
    """``step_fn`` of the Trainer: uint8 canvases -> [0, 1] floats, torchvision's loss dict."""

    def __call__(self, model: nn.Module, batch, generator: torch.Generator) -> Dict[str, Tensor]:
        images, targets = batch[0], batch[1]
        device = images.device
        inputs = [im.float().div_(255) for im in images]
        targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        losses = model(inputs, targets)
        return {"loss": sum(losses.values()), **losses}


def drop_background(detections: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Detections of the real classes only. The sigmoid detectors (GFL, RetinaNet, FCOS) are
    built with torchvision's K + 1 outputs, as its COCO models are; output 0 is never a
    positive in training, so its scores fall towards 0, but it is no class to report."""
    keep = detections["labels"] > 0
    return {k: v[keep] for k, v in detections.items()}


@torch.no_grad()
def evaluate_coco(model: nn.Module, dataset, loader, device: torch.device, precision: str,
                  iou_types: tuple[str, ...], results_path: str | None = None) -> Dict[str, float]:
    """COCO AP of ``model`` over ``dataset``: every rank detects on its shard of the images,
    the results of all ranks are gathered (each image once), rank 0 runs pycocotools and
    every rank returns its numbers (they decide which checkpoint is the best, a collective)."""
    from ummae.data.coco import coco_evaluate, coco_results, write_results_json

    model.eval()
    results: List[dict] = []
    for images, targets, _ in loader:
        inputs = [im.to(device, non_blocking=True).float().div_(255) for im in images]
        if not inputs:
            continue
        with autocast(device, precision):
            outputs = model(inputs)
        outputs = [drop_background({k: v.float() if v.is_floating_point() else v for k, v in o.items()}) for o in outputs]
        results += coco_results(targets, outputs, dataset)
    everything = [r for part in udist.all_gather_object(results) for r in part]
    metrics: Dict[str, float] = {}
    if udist.is_main_process():
        if results_path:
            write_results_json(everything, results_path)
        metrics = coco_evaluate(dataset.coco, everything, iou_types, dataset.ids)
    return udist.broadcast_object(metrics)


def load_detector(path: str) -> nn.Module:
    """A detector as ``ummae detect train`` saved it (any of its checkpoints)."""
    return load_task_model(path, "detect", lambda name, args: args.get("detector") in DETECTORS, build_detector)


def category_names(model: nn.Module) -> List[str]:
    """Name of each label (index 0: background) of a detector built here."""
    return ["background", *model.model_args["class_names"]]


def _model_kwargs(cfg) -> Dict[str, Any]:
    return dict(detector=cfg.detector, backbone=cfg.backbone, img_size=cfg.img_size, neck_channels=cfg.neck_channels,
                fpn_channels=cfg.fpn_channels, drop_path=cfg.drop_path, window_size=cfg.window_size)


def train(cfg) -> Dict[str, Any]:
    """``ummae detect train``: the detector on COCO with the one Trainer."""
    from ummae.config import settings_from_checkpoint
    from ummae.data import build_train_loader
    from ummae.data.coco import CocoDetection, LargeScaleJitter, collate_detection
    from ummae.engine.trainer import Trainer, training_run
    from ummae.engine.optim import build_optimizer

    cfg.validate()
    settings_from_checkpoint(cfg, log)
    with training_run(cfg) as (info, device, precision):
        masks = cfg.detector == "maskrcnn"
        train_ds = CocoDetection(cfg.data, cfg.train_split, train=True, with_masks=masks,
                                 transform=LargeScaleJitter(cfg.img_size, cfg.scale_range, cfg.flip_prob))
        val_ds = CocoDetection(cfg.data, cfg.val_split, train=False)
        if val_ds.cat_ids != train_ds.cat_ids:
            raise UsageError(f"the {cfg.val_split} annotations have other categories than the {cfg.train_split} ones")
        model, report = build_detector(num_classes=train_ds.num_classes + 1, pretrained=cfg.pretrained,
                                       cat_ids=list(train_ds.cat_ids), class_names=list(train_ds.class_names),
                                       **_model_kwargs(cfg))
        if info.enabled and device.type == "cuda":  # the paper's SyncBN in the FPN (BatchNorm per rank otherwise)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device)
        workers = min(cfg.num_workers, os.cpu_count() or 1)
        pin = device.type == "cuda"
        loader, sampler = build_train_loader(train_ds, cfg.batch_size, workers, info.world_size, info.rank, cfg.seed,
                                             pin_memory=pin, collate_fn=collate_detection)
        val_loader = eval_loader(val_ds, cfg.batch_size, workers, info, pin)
        lr = cfg.effective_lr(info.world_size)
        optimizer = build_optimizer(model, lr, cfg.weight_decay, cfg.betas, device)
        out = Path(cfg.output)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            log.info("detection: %s on %s, %d classes, %.1fM params; train %d images, val %d images; device %s x%d, "
                     "precision %s, lr %.3e", cfg.detector, cfg.backbone, train_ds.num_classes,
                     sum(p.numel() for p in model.parameters()) / 1e6, len(train_ds), len(val_ds), device,
                     info.world_size, precision, lr)
            log_load_report(report, out, "the backbone")
        iou_types = ("bbox", "segm") if masks else ("bbox",)
        run_eval = validation(lambda m: evaluate_coco(m, val_ds, val_loader, device, precision, iou_types),
                              val_ds.img_dir, train_ds.img_dir, cfg.val_split, info.is_main)
        trainer = Trainer(cfg, model, optimizer, loader, sampler, device, precision, lr, info, DetectStep(),
                          evaluate=run_eval, eval_every=cfg.eval_every, best_metric="bbox_AP")
        return trainer.fit()


def eval_loader(dataset, batch_size: int, workers: int, info, pin: bool):
    """This rank's shard of ``dataset`` (images rank, rank + R, ...: each image once)."""
    from ummae.data import build_eval_loader
    from ummae.data.coco import collate_detection_eval

    return build_eval_loader(dataset, batch_size, workers, info.world_size, info.rank, pin_memory=pin,
                             collate_fn=collate_detection_eval)


def run_eval(cfg) -> Dict[str, Any]:
    """``ummae detect eval``: COCO result JSON and AP of a detection checkpoint."""
    from ummae.data.coco import CocoDetection
    from ummae.engine.precision import resolve_precision

    cfg.validate()
    with udist.distributed(cfg.device) as (info, device):
        precision = resolve_precision(cfg.precision, device)
        model = load_detector(cfg.checkpoint).to(device)
        ds = CocoDetection(cfg.data, cfg.split, train=False)
        if list(ds.cat_ids) != list(model.model_args["cat_ids"]):
            raise UsageError(f"{cfg.data} {cfg.split} has other categories than the detector was trained on")
        out = Path(cfg.output)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        loader = eval_loader(ds, cfg.batch_size, min(cfg.num_workers, os.cpu_count() or 1), info, device.type == "cuda")
        iou_types = ("bbox", "segm") if model.model_args["detector"] == "maskrcnn" else ("bbox",)
        results_path = str(out / f"detections_{cfg.split}.json")
        metrics = evaluate_coco(model, ds, loader, device, precision, iou_types, results_path)
        if info.is_main:
            import json

            (out / f"metrics_{cfg.split}.json").write_text(json.dumps(metrics, indent=1) + "\n")
            log.info("%s on %s (%s, %d images): %s; results in %s", cfg.checkpoint, cfg.data, cfg.split, len(ds),
                     ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), results_path)
        return metrics


@torch.no_grad()
def predict(args) -> int:
    """``ummae detect predict``: one picture per image with the detections scoring at least
    ``--score-thresh`` drawn: boxes, ``label score`` captions and, for Mask R-CNN, masks."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from ummae.engine.precision import resolve_device
    from ummae.visualize import image_paths, read_rgb

    if not 0 <= args.score_thresh <= 1:
        raise UsageError(f"--score-thresh {args.score_thresh}: must be in [0, 1]")
    device = resolve_device(args.device)
    model = load_detector(args.checkpoint).to(device).eval()
    names = category_names(model)
    paths = image_paths(args.images)
    if not paths:
        raise UsageError("no images given")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        image = pil_to_tensor(read_rgb(path))
        det = drop_background(model([image.to(device).float().div_(255)])[0])
        keep = det["scores"] >= args.score_thresh
        det = {k: v[keep].cpu() for k, v in det.items()}
        drawn = image
        if "masks" in det and len(det["scores"]):
            drawn = draw_segmentation_masks(drawn, det["masks"][:, 0] > 0.5, alpha=0.45)
        captions = [f"{names[int(c)]} {s:.2f}" for c, s in zip(det["labels"], det["scores"].tolist())]
        drawn = draw_bounding_boxes(drawn, det["boxes"], captions, colors="red", width=2)
        target = out / (Path(path).stem + ".png")
        Image.fromarray(np.ascontiguousarray(drawn.permute(1, 2, 0).numpy())).save(target)
        log.info("%s: %d detections >= %.2f -> %s", path, len(captions), args.score_thresh, target)
    print(f"wrote {len(paths)} picture(s) to {out}")
    return 0
