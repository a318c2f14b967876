"""Semantic segmentation with UperNet (the paper's ADE20K protocol) on the dense backbone.

``ummae segment train`` builds UperNet on the four stage maps of :mod:`ummae.models.dense` (each LayerNorm +
Linear to 768 channels, the reference's ``up1..up4``) and trains it with the one engine, for a
number of iterations (MMSegmentation's ``IterBasedRunner``): the reference's
``upernet_mae_swin_tiny_256_..._512_slide_160k_ade20k_lr1e4_lrd1_pt``, i.e.

* UperNet (MMSegmentation's ``UPerHead``): a pyramid pooling module (scales 1, 2, 3, 6) on the
  last stage map, an FPN fusion of all four, 768 channels, BatchNorm (SyncBN under DDP on
  CUDA), dropout 0.1; an auxiliary FCN head on stage 3 (one 3x3 conv, 256 channels, loss
  weight 0.4);
* 512 x 512 crops of the image resized to 2048 x 512 times 0.5-2.0 (:mod:`ummae.data.ade`);
* AdamW lr 1e-4 at batch 16, weight decay 0.05, layer decay 1.0, 1500 warm-up iterations from
  1e-6 of the lr, poly schedule (power 1) to 0 over 160k iterations;
* sliding-window test: the image resized to fit 2048 x 512, windows of 512 every 341 px, the
  logits of overlapping windows averaged, resized to the label map and argmaxed.

No library holds an UperNet that takes our backbone: segmentation_models_pytorch builds its
UPerNet only on its own encoders, and its decoder is not MMSegmentation's (its pooling
branches have ``in_channels / 4`` channels, not the head's); MMSegmentation no longer installs
with current PyTorch. So the head is written in :mod:`ummae.models.upernet`, on torchvision's
``Conv2dNormActivation``, layer for layer as ``UPerHead`` / ``FCNHead`` build it. The sliding-window
and whole-image inference is the segmenter's own (:class:`~ummae.models.upernet.SegmenterInference`);
the metrics (confusion matrix, summed over the ranks) are torchmetrics', in :mod:`ummae.evaluation.segmentation`.
"""

from __future__ import annotations

import colorsys
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.functional import pil_to_tensor

from ummae.data.ade import SegmentationFolder, SegTrainTransform, collate_segmentation, collate_segmentation_eval
from ummae.engine import dist as udist
from ummae.engine.optim import build_optimizer
from ummae.engine.precision import resolve_device, resolve_precision
from ummae.errors import UsageError
from ummae.evaluation import inference_on_dataset, shard_loader
from ummae.evaluation.segmentation import (
    SemSegEvaluator,
    class_probabilities,
    images_of,
    scalar_metrics,
)
from ummae.models.dense import check_dense_backbone
from ummae.models.registry import create_model
from ummae.models.upernet import Segmenter
from ummae.tasks.base import Parts, RunContext, Task, check_weights_file, run
from ummae.tasks.dense import validation
from ummae.visualize import image_paths, read_rgb
from ummae.weights import io as ckpt
from ummae.weights.build import build_from_checkpoint
from ummae.weights.load import load_pretrained, log_load_report

log = logging.getLogger("ummae")


def build_segmenter(
    backbone: str,
    num_classes: int,
    crop_size: int = 512,
    neck_channels: int = 768,
    head_channels: int = 768,
    aux_channels: int = 256,
    aux_weight: float = 0.4,
    ignore_index: int = 255,
    drop_path: float | None = 0.1,
    window_size: int | None = None,
    pretrained: str | None = None,
    **settings: Any,
):
    """UperNet on ``backbone`` (registered as ``upernet_<backbone>``: :mod:`ummae.models.upernet`,
    built at ``crop_size``), and the report of loading ``pretrained`` into it (None from
    scratch). ``settings`` (data conventions, test settings, class names) are recorded in
    ``model_args`` with the rest: what eval and predict rebuild it from."""
    model = create_model(
        f"upernet_{backbone}",
        num_classes=num_classes,
        crop_size=crop_size,
        neck_channels=neck_channels,
        head_channels=head_channels,
        aux_channels=aux_channels,
        aux_weight=aux_weight,
        ignore_index=ignore_index,
        drop_path=drop_path,
        window_size=window_size,
        **settings,
    )
    report = load_pretrained(model, pretrained) if pretrained else None
    return model, report


def load_segmenter(path: str) -> Segmenter:
    """A segmenter as ``ummae segment train`` saved it (any of its checkpoints)."""
    return build_from_checkpoint(path, "segment", drop_path=0.0)[0]  # drop path off: inference


# ------------------------------------------------------------------------- evaluation


def per_class_table(metrics: dict[str, Any], class_names: Sequence[str]) -> str:
    """The per-class IoU / accuracy table (percent), as MMSegmentation prints it."""
    width = max([5, *(len(n) for n in class_names)])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"], strict=False):
        lines.append(f"{name:<{width}}  {100 * iou:6.2f}  {100 * acc:6.2f}".replace("nan", "  - "))
    lines.append(f"{'mean':<{width}}  {100 * metrics['mIoU']:6.2f}  {100 * metrics['mAcc']:6.2f}")
    lines.append(f"overall pixel accuracy (aAcc) {100 * metrics['aAcc']:.2f}")
    return "\n".join(lines) + "\n"


def evaluate_segmentation(model: Segmenter, loader, device: torch.device, precision: str, test: dict[str, Any]):
    """mIoU, mAcc, aAcc and per-class IoU / Acc of ``model`` over this rank's shard of the
    images with the test settings ``test`` (the arguments of
    :meth:`~ummae.models.upernet.SegmenterInference.predict_probs` after the image), the
    confusion matrices of all ranks summed: every rank returns the same figures."""
    return inference_on_dataset(
        model,
        images_of(loader),
        SemSegEvaluator(model.num_classes, model.ignore_index, device),
        class_probabilities(test),
        device,
        precision,
        desc="segmentation eval",
        unit="img",
        total=len(loader.sampler),
    )


# ------------------------------------------------------------------------- commands


def _data_settings(cfg) -> dict[str, Any]:
    return dict(num_classes=cfg.num_classes, reduce_zero_label=cfg.reduce_zero_label, ignore_index=cfg.ignore_index)


class SegmentTask(Task):
    """``ummae segment train``: UperNet on an ADE20K-layout data set from a pre-trained backbone,
    for ``--iters`` iterations, validated at the end (and every ``--eval-every-iters``)."""

    best_metric = "mIoU"

    def check(self, cfg) -> None:
        check_dense_backbone(cfg.backbone)
        check_weights_file(cfg.pretrained, encoder=True)

    def build(self, cfg, ctx: RunContext) -> Parts:
        transform = SegTrainTransform(
            cfg.crop_size,
            tuple(cfg.scale),
            tuple(cfg.ratio_range),
            cat_max_ratio=cfg.cat_max_ratio,
            flip_prob=cfg.flip_prob,
            photometric=cfg.photometric,
            ignore_index=cfg.ignore_index,
        )
        train_ds = SegmentationFolder(cfg.data, cfg.train_split, train=True, transform=transform, **_data_settings(cfg))
        val_ds = SegmentationFolder(cfg.data, cfg.val_split, train=False, **_data_settings(cfg))
        model, report = build_segmenter(
            cfg.backbone,
            cfg.num_classes,
            cfg.crop_size,
            cfg.neck_channels,
            cfg.head_channels,
            cfg.aux_channels,
            cfg.aux_weight,
            cfg.ignore_index,
            cfg.drop_path,
            cfg.window_size,
            cfg.pretrained,
            reduce_zero_label=cfg.reduce_zero_label,
            scale=list(cfg.scale),
            test_mode=cfg.test_mode,
            test_stride=cfg.stride(),
            class_names=list(train_ds.class_names),
        )
        sync_bn = ctx.info.enabled and ctx.device.type == "cuda"
        if sync_bn:  # the paper's SyncBN in the heads (BatchNorm per rank otherwise)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.batch_size * (ctx.info.world_size if sync_bn else 1) < 2:
            # the pyramid pooling's 1x1 branch gives BatchNorm one value per channel
            raise UsageError(
                f"--batch-size {cfg.batch_size}: the heads' BatchNorm needs at least 2 images per step "
                f"(SyncBN pools the ranks' images only under DDP on CUDA); use --batch-size 2 or more"
            )
        return Parts(model, train_ds, val_ds, report, collate=collate_segmentation)

    def optimizer(self, cfg, model: nn.Module, lr: float, device: torch.device):
        layer_decay = cfg.layer_decay if cfg.layer_decay < 1 else None
        return build_optimizer(model, lr, cfg.weight_decay, cfg.betas, device, layer_decay=layer_decay)

    def step(self, cfg, parts: Parts) -> SegmentStep:
        return SegmentStep()

    def describe(self, cfg, ctx: RunContext, parts: Parts, lr: float) -> None:
        log.info(
            "segmentation: UperNet on %s, %d classes, %.1fM params; train %d images, val %d images; device %s "
            "x%d, precision %s, lr %.3e, %d iterations",
            cfg.backbone,
            cfg.num_classes,
            sum(p.numel() for p in parts.model.parameters()) / 1e6,
            len(parts.train),
            len(parts.val),
            ctx.device,
            ctx.info.world_size,
            ctx.precision,
            lr,
            cfg.iters,
        )
        log_load_report(parts.report, Path(cfg.output), "the backbone")

    def evaluator(self, cfg, ctx: RunContext, parts: Parts):
        # this rank's shard of the images, one at a time
        val_loader = shard_loader(parts.val, 1, ctx.workers, ctx.info, ctx.device, collate_segmentation_eval)
        test = dict(mode=cfg.test_mode, crop=cfg.crop_size, stride=cfg.stride(), scale=tuple(cfg.scale))
        measure = validation(
            lambda m: scalar_metrics(evaluate_segmentation(m, val_loader, ctx.device, ctx.precision, test)),
            parts.val.img_dir,
            parts.train.img_dir,
            cfg.val_split,
            ctx.is_main,
        )
        return measure, 0  # iteration-based: --eval-every-iters, and after the last


def train(cfg) -> dict[str, Any]:
    """``ummae segment train``: UperNet on an ADE20K-layout data set with the one Trainer."""
    return run(SegmentTask(), cfg)


class SegmentStep:
    """``step_fn`` of the Trainer: (uint8 crops, labels) -> the losses, through the model's
    forward (so DDP sees it)."""

    def __call__(self, model: nn.Module, batch, generator: torch.Generator) -> dict[str, Tensor]:
        images, labels = batch[0], batch[1]
        return model(images, labels)


def run_eval(cfg) -> dict[str, Any]:
    """``ummae segment eval``: mIoU, mAcc, aAcc and the per-class table of a checkpoint."""
    cfg.validate()
    with udist.distributed(cfg.device) as (info, device):
        precision = resolve_precision(cfg.precision, device)
        model = load_segmenter(cfg.checkpoint).to(device)
        args = model.model_args
        test = _test_settings(cfg, args)
        ds = SegmentationFolder(
            cfg.data,
            cfg.split,
            train=False,
            num_classes=args["num_classes"],
            reduce_zero_label=args["reduce_zero_label"],
            ignore_index=args["ignore_index"],
        )
        workers = udist.loader_workers(cfg.num_workers)
        loader = shard_loader(ds, cfg.batch_size, workers, info, device, collate_segmentation_eval)
        metrics = evaluate_segmentation(model, loader, device, precision, test)
        if info.is_main:
            _write_eval_report(cfg, args.get("class_names") or ds.class_names, len(ds), metrics, test)
        return scalar_metrics(metrics)


def _test_settings(cfg, args: dict[str, Any]) -> dict[str, Any]:
    """The inference settings of ``segment eval``: the options given, else the checkpoint's."""
    test = dict(
        mode=cfg.test_mode or args["test_mode"],
        crop=args["crop_size"],
        stride=cfg.test_stride or args["test_stride"],
        scale=tuple(cfg.scale or args["scale"]),
        ratios=tuple(cfg.ratios),
        flip=cfg.flip,
    )
    if test["stride"] > test["crop"]:
        raise UsageError(
            f"--test-stride {test['stride']} is larger than the {test['crop']} px window: pixels would be left out"
        )
    return test


def _write_eval_report(cfg, names, images: int, metrics: dict[str, Any], test: dict[str, Any]) -> None:
    """``metrics_SPLIT.json`` and ``per_class_SPLIT.txt`` in ``--output``, and the table in the log."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    table = per_class_table(metrics, names)
    record = {
        **scalar_metrics(metrics),
        "IoU": dict(zip(names, metrics["IoU"], strict=False)),
        "Acc": dict(zip(names, metrics["Acc"], strict=False)),
        "images": images,
        "test": test,
    }
    ckpt.write_atomic(
        out / f"metrics_{cfg.split}.json",
        lambda f: f.write(json.dumps(record, indent=1, allow_nan=True) + "\n"),
        "w",
    )
    ckpt.write_atomic(out / f"per_class_{cfg.split}.txt", lambda f: f.write(table), "w")
    scales = f", scales {list(test['ratios'])}" + (" + flip" if cfg.flip else "")
    log.info(
        "%s on %s (%s, %d images, %s%s):\n%s", cfg.checkpoint, cfg.data, cfg.split, images, test["mode"], scales, table
    )


def palette(num_classes: int) -> Tensor:
    """A fixed colour per class ``[K, 3]`` uint8 (golden-ratio hues, alternating brightness):
    neighbouring class ids get distant colours."""
    colours = [
        colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.65 + 0.35 * (k % 2), 0.95 - 0.3 * ((k // 2) % 2))
        for k in range(num_classes)
    ]
    return (torch.tensor(colours) * 255).round().to(torch.uint8)


@torch.no_grad()
def predict(args) -> int:
    """``ummae segment predict``: for each image, ``STEM.png`` (the class colours over the image)
    and ``STEM_labels.png`` (the class per pixel, encoded as the data set's label maps)."""
    if not 0 <= args.alpha <= 1:
        raise UsageError(f"--alpha {args.alpha}: must be in [0, 1]")
    device = resolve_device(args.device)
    model = load_segmenter(args.checkpoint).to(device).eval()
    margs = model.model_args
    paths = image_paths(args.images)
    if not paths:
        raise UsageError("no images given")
    stems: dict[str, str] = {}
    for path in paths:
        stem = Path(path).stem
        if stem in stems:
            raise UsageError(
                f"{stems[stem]} and {path} would both be written as {stem}.png; give them in separate runs"
            )
        stems[stem] = path
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    colours = palette(model.num_classes)
    for path in paths:
        image = pil_to_tensor(read_rgb(path))
        probs = model.predict_probs(
            image.to(device), margs["test_mode"], margs["crop_size"], margs["test_stride"], margs["scale"]
        )
        labels = probs.argmax(0).cpu()
        blended = (1 - args.alpha) * image.float() + args.alpha * colours[labels].permute(2, 0, 1).float()
        picture = blended.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(picture)).save(out / f"{Path(path).stem}.png")
        # in the data set's own encoding (ADE20K: classes 1..150, as its annotation PNGs)
        encoded = labels.numpy() + (1 if margs.get("reduce_zero_label") else 0)
        Image.fromarray(encoded.astype(np.uint8 if encoded.max() < 256 else np.uint16)).save(
            out / f"{Path(path).stem}_labels.png"
        )
        present = labels.unique().tolist()
        names = margs.get("class_names") or [f"class{k}" for k in range(model.num_classes)]
        log.info(
            "%s: %s -> %s",
            path,
            ", ".join(names[k] for k in present[:8]) + (" ..." if len(present) > 8 else ""),
            out / f"{Path(path).stem}.png",
        )
    print(f"wrote {len(paths)} picture(s) and label maps to {out}")
    return 0
