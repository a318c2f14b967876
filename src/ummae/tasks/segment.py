"""Semantic segmentation with UperNet (the paper's ADE20K protocol) on the dense backbone.

``ummae segment train`` builds UperNet on the four stage maps of :mod:`.dense` (each LayerNorm +
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
with current PyTorch. So the head is written here, on torchvision's ``Conv2dNormActivation``,
layer for layer as ``UPerHead`` / ``FCNHead`` build it. The metrics (confusion matrix, summed
over the ranks) are torchmetrics'.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from ummae.engine import dist as udist
from ummae.weights import io as ckpt
from ummae.engine.precision import autocast
from ummae.tasks.dense import StageMaps, build_stage_maps, encoder_options, load_task_model, validation
from ummae.weights.load import log_load_report
from ummae.errors import UsageError

log = logging.getLogger("ummae")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
POOL_SCALES = (1, 2, 3, 6)


def _conv(in_ch: int, out_ch: int, kernel: int) -> Conv2dNormActivation:
    """MMCV's ``ConvModule``: conv (no bias) + BatchNorm + ReLU, the conv Kaiming-normal
    (fan_out), as MMCV initialises it."""
    block = Conv2dNormActivation(in_ch, out_ch, kernel, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU)
    nn.init.kaiming_normal_(block[0].weight, mode="fan_out", nonlinearity="relu")
    return block


def _classifier(in_ch: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)  # MMSegmentation's conv_seg init
    nn.init.zeros_(conv.bias)
    return conv


def _resize(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """UperNet's decode head (MMSegmentation's ``UPerHead``): pyramid pooling on the last map,
    lateral 1x1 convs on the others, a top-down pathway, 3x3 convs on each level, all levels
    upsampled to the first and fused by a 3x3 conv; dropout and a 1x1 classifier."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = POOL_SCALES, dropout: float = 0.1):
        super().__init__()
        last = in_channels[-1]
        self.pool = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv(last, channels, 1)) for s in pool_scales)
        self.bottleneck = _conv(last + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(_conv(c, channels, 1) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(_conv(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = _conv(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        top = maps[-1]
        pooled = [_resize(branch(top), top.shape[-2:]) for branch in self.pool]
        levels = [lat(m) for lat, m in zip(self.lateral, maps[:-1])]
        levels.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [smooth(x) for smooth, x in zip(self.smooth, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0], *(_resize(x, size) for x in outs[1:])], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head (MMSegmentation's ``FCNHead``, ``num_convs=1``, no input concat)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = _conv(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class Segmenter(nn.Module):
    """UperNet on :class:`StageMaps`. Takes uint8 (or [0, 255] float) images ``[N, 3, H, W]``
    and normalises them itself (4x fewer bytes to the device).

    ``model(images)``: logits ``[N, K, H/4, W/4]`` of the decode head. ``model(images, labels)``
    (training, through DDP's forward): the losses, ``{"loss", "loss_decode", "loss_aux"}``, each
    the cross-entropy of logits upsampled to the labels, averaged over all pixels (ignored
    ones count 0: MMSegmentation 0.x's mean, which the reference trained with)."""

    AUX_STAGE = 2  # stage 3 (stride 16): the reference's auxiliary head in_index

    def __init__(self, backbone: StageMaps, num_classes: int, head_channels: int = 768, aux_channels: int = 256,
                 aux_weight: float = 0.4, ignore_index: int = 255):
        super().__init__()
        self.backbone = backbone
        c = backbone.out_channels
        self.decode_head = UperHead([c] * len(backbone.proj), head_channels, num_classes)
        self.aux_head = FCNHead(c, aux_channels, num_classes) if aux_weight > 0 else None
        self.aux_weight = aux_weight
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        return (images.float() - self.mean) / self.std

    def logits(self, x: Tensor) -> Tensor:
        """Decode-head logits ``[N, K, H/4, W/4]`` of normalised images."""
        return self.decode_head(list(self.backbone(x).values()))

    def forward(self, images: Tensor, labels: Tensor | None = None):
        x = self.normalize(images)
        if labels is None:
            return self.logits(x)
        maps = list(self.backbone(x).values())
        losses = {"loss_decode": self._ce(self.decode_head(maps), labels)}
        if self.aux_head is not None:
            losses["loss_aux"] = self.aux_weight * self._ce(self.aux_head(maps[self.AUX_STAGE]), labels)
        return {"loss": sum(losses.values()), **losses}

    def _ce(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = _resize(logits, labels.shape[-2:]).float()
        return F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="none").mean()

    # layer-wise lr decay (engine.optim.param_groups): the encoder's depths, heads at full lr
    @property
    def num_layers(self) -> int:
        return self.backbone.encoder.num_layers

    def layer_id(self, name: str) -> int:
        prefix = "backbone.encoder."
        if name.startswith(prefix):
            return self.backbone.encoder.layer_id(name[len(prefix):])
        return self.num_layers + 1


def build_segmenter(backbone: str, num_classes: int, crop_size: int = 512, neck_channels: int = 768,
                    head_channels: int = 768, aux_channels: int = 256, aux_weight: float = 0.4,
                    ignore_index: int = 255, drop_path: float | None = 0.1, window_size: int | None = None,
                    pretrained: str | None = None, **settings: Any):
    """UperNet on ``backbone`` (built at ``crop_size``), and the report of loading ``pretrained``
    into it (None from scratch). ``settings`` (data conventions, test settings, class names) are
    recorded in ``model_args`` with the rest: what eval and predict rebuild it from."""
    body, report = build_stage_maps(backbone, crop_size, neck_channels, drop_path, window_size, pretrained)
    model = Segmenter(body, num_classes, head_channels, aux_channels, aux_weight, ignore_index)
    model.model_name = f"upernet_{backbone}"
    model.model_args = dict(backbone=backbone, num_classes=num_classes, crop_size=crop_size,
                            neck_channels=neck_channels, head_channels=head_channels, aux_channels=aux_channels,
                            aux_weight=aux_weight, ignore_index=ignore_index, **encoder_options(body), **settings)
    return model, report


def load_segmenter(path: str) -> Segmenter:
    """A segmenter as ``ummae segment train`` saved it (any of its checkpoints)."""
    return load_task_model(path, "segment", lambda name, args: isinstance(name, str) and name.startswith("upernet_"),
                           build_segmenter)


# ------------------------------------------------------------------------- inference


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """MMSegmentation's keep-ratio ``Resize``: the largest size with the image's aspect whose
    long side is at most ``max(scale)`` and short side at most ``min(scale)``."""
    f = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * f + 0.5), int(width * f + 0.5)


def _fitting_side(model: Segmenter, side: int) -> int:
    """The smallest side >= ``side`` the encoder runs on (Swin windows must tile each map)."""
    enc = model.backbone.encoder
    for s in range(side, side + 4096):
        try:
            enc.check_image_size(s, "size")
            return s
        except ValueError:
            continue
    raise UsageError(f"no input size from {side} px fits {type(enc).__name__}")


def _pad_to(x: Tensor, height: int, width: int) -> Tensor:
    # zeros after normalisation: the mean colour, as the training crops are padded
    return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))


def _logits_at(model: Segmenter, x: Tensor, height: int, width: int) -> Tensor:
    """Logits of normalised ``x`` padded to ``height`` x ``width``, at the input's own size."""
    h, w = x.shape[-2:]
    out = model.logits(_pad_to(x, height, width))
    return _resize(out.float(), (height, width))[..., :h, :w]


def slide_logits(model: Segmenter, x: Tensor, crop: int, stride: int) -> Tensor:
    """MMSegmentation's ``slide_inference``: windows of ``crop`` every ``stride`` px (the last
    one flush with the edge), the logits of overlapping windows averaged. A window smaller
    than ``crop`` (an image side below it) is padded to ``crop``, the size the model trains at."""
    n, _, h, w = x.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    total = torch.zeros(n, model.num_classes, h, w, device=x.device)
    count = torch.zeros(1, 1, h, w, device=x.device)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            total[..., y1:y2, x1:x2] += _logits_at(model, x[..., y1:y2, x1:x2], crop, crop)
            count[..., y1:y2, x1:x2] += 1
    return total / count


def whole_logits(model: Segmenter, x: Tensor) -> Tensor:
    """One pass over the image padded to the nearest size the encoder runs on."""
    h, w = x.shape[-2:]
    return _logits_at(model, x, _fitting_side(model, h), _fitting_side(model, w))


@torch.no_grad()
def predict_probs(model: Segmenter, image: Tensor, mode: str, crop: int, stride: int, scale: Sequence[int],
                  ratios: Sequence[float] = (1.0,), flip: bool = False, precision: str = "fp32") -> Tensor:
    """Class probabilities ``[K, H, W]`` of one uint8 image ``[3, H, W]`` at its own size: the
    image resized to fit ``scale`` x each ratio (and flipped, with ``flip``), the logits of each
    view resized back to the image and soft-maxed, the views averaged (MMSegmentation's
    ``aug_test``; one view: the plain softmax)."""
    h0, w0 = image.shape[-2:]
    x0 = model.normalize(image.unsqueeze(0))
    device = image.device
    probs = torch.zeros(model.num_classes, h0, w0, device=device)
    views = 0
    for ratio in ratios:
        size = keep_ratio_size(h0, w0, [round(s * ratio) for s in scale])
        x = _resize(x0, size)
        for flipped in ([False, True] if flip else [False]):
            xi = x.flip(-1) if flipped else x
            with autocast(device, precision):
                out = slide_logits(model, xi, crop, stride) if mode == "slide" else whole_logits(model, xi)
            out = out.float().flip(-1) if flipped else out.float()
            probs += _resize(out, (h0, w0))[0].softmax(0)
            views += 1
    return probs / views


# ------------------------------------------------------------------------- metrics


def segmentation_metrics(confusion: Tensor) -> Dict[str, Any]:
    """MMSegmentation's metrics from a confusion matrix ``[K, K]`` (rows: label, columns:
    prediction; ignored pixels left out): per-class IoU = TP / (label + predicted - TP) and
    accuracy = TP / label; ``mIoU`` / ``mAcc`` their means over the classes where they are
    defined (a class absent from the labels and never predicted has no IoU; absent from the
    labels, no accuracy); ``aAcc`` all correct pixels / all labelled pixels. Fractions in [0, 1]."""
    confusion = confusion.double()
    tp = confusion.diag()
    label, pred = confusion.sum(1), confusion.sum(0)
    iou = tp / (label + pred - tp)  # 0/0 = nan: undefined
    acc = tp / label
    total = label.sum()
    return {"mIoU": float(iou.nanmean()) if iou.isfinite().any() else float("nan"),
            "mAcc": float(acc.nanmean()) if acc.isfinite().any() else float("nan"),
            "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
            "IoU": iou.tolist(), "Acc": acc.tolist()}


def per_class_table(metrics: Dict[str, Any], class_names: Sequence[str]) -> str:
    """The per-class IoU / accuracy table (percent), as MMSegmentation prints it."""
    width = max([5, *(len(n) for n in class_names)])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
        lines.append(f"{name:<{width}}  {100 * iou:6.2f}  {100 * acc:6.2f}".replace("nan", "  - "))
    lines.append(f"{'mean':<{width}}  {100 * metrics['mIoU']:6.2f}  {100 * metrics['mAcc']:6.2f}")
    lines.append(f"overall pixel accuracy (aAcc) {100 * metrics['aAcc']:.2f}")
    return "\n".join(lines) + "\n"


def confusion_matrix(num_classes: int, ignore_index: int, device: torch.device | str = "cpu"):
    """torchmetrics' confusion-matrix metric (rows: label, columns: prediction; pixels labelled
    ``ignore_index`` left out), summed over the ranks by its ``compute()``. The labels were
    checked against the classes when read (:mod:`ummae.data.ade`), so its own checks are off."""
    from torchmetrics.classification import MulticlassConfusionMatrix

    return MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False).to(device)


@torch.no_grad()
def evaluate_segmentation(model: Segmenter, loader, device: torch.device, precision: str, *, mode: str, crop: int,
                          stride: int, scale: Sequence[int], ratios: Sequence[float] = (1.0,),
                          flip: bool = False) -> Dict[str, Any]:
    """mIoU, mAcc, aAcc and per-class IoU / Acc of ``model`` over this rank's shard of the
    images, the confusion matrices of all ranks summed (torchmetrics syncs them): every rank
    returns the same figures."""
    model.eval()
    confusion = confusion_matrix(model.num_classes, model.ignore_index, device)
    for images, labels, _paths, _ in loader:
        for image, label in zip(images, labels):
            probs = predict_probs(model, image.to(device, non_blocking=True), mode, crop, stride, scale, ratios,
                                  flip, precision)
            confusion.update(probs.argmax(0).flatten(), label.to(device).flatten())
    return segmentation_metrics(confusion.compute().cpu())


def scalar_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


# ------------------------------------------------------------------------- commands


def _data_settings(cfg) -> Dict[str, Any]:
    return dict(num_classes=cfg.num_classes, reduce_zero_label=cfg.reduce_zero_label, ignore_index=cfg.ignore_index)


def train(cfg) -> Dict[str, Any]:
    """``ummae segment train``: UperNet on an ADE20K-layout data set with the one Trainer."""
    from ummae.config import settings_from_checkpoint
    from ummae.data import build_eval_loader, build_train_loader
    from ummae.data.ade import SegmentationFolder, SegTrainTransform, collate_segmentation, collate_segmentation_eval
    from ummae.engine.trainer import Trainer, training_run
    from ummae.engine.optim import build_optimizer

    cfg.validate()
    settings_from_checkpoint(cfg, log)
    with training_run(cfg) as (info, device, precision):
        transform = SegTrainTransform(cfg.crop_size, tuple(cfg.scale), tuple(cfg.ratio_range), cat_max_ratio=cfg.cat_max_ratio,
                                      flip_prob=cfg.flip_prob, photometric=cfg.photometric, ignore_index=cfg.ignore_index)
        train_ds = SegmentationFolder(cfg.data, cfg.train_split, train=True, transform=transform, **_data_settings(cfg))
        val_ds = SegmentationFolder(cfg.data, cfg.val_split, train=False, **_data_settings(cfg))
        model, report = build_segmenter(
            cfg.backbone, cfg.num_classes, cfg.crop_size, cfg.neck_channels, cfg.head_channels, cfg.aux_channels,
            cfg.aux_weight, cfg.ignore_index, cfg.drop_path, cfg.window_size, cfg.pretrained,
            reduce_zero_label=cfg.reduce_zero_label, scale=list(cfg.scale), test_mode=cfg.test_mode,
            test_stride=cfg.stride(), class_names=list(train_ds.class_names))
        sync_bn = info.enabled and device.type == "cuda"
        if sync_bn:  # the paper's SyncBN in the heads (BatchNorm per rank otherwise)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        norm_batch = cfg.batch_size * (info.world_size if sync_bn else 1)
        if norm_batch < 2:
            # the pyramid pooling's 1x1 branch gives BatchNorm one value per channel
            raise UsageError(f"--batch-size {cfg.batch_size}: the heads' BatchNorm needs at least 2 images per step "
                             f"(SyncBN pools the ranks' images only under DDP on CUDA); use --batch-size 2 or more")
        model.to(device)
        workers = min(cfg.num_workers, os.cpu_count() or 1)
        pin = device.type == "cuda"
        loader, sampler = build_train_loader(train_ds, cfg.batch_size, workers, info.world_size, info.rank, cfg.seed,
                                             pin_memory=pin, collate_fn=collate_segmentation)
        # this rank's shard of the images (rank, rank + R, ...: each image once), one at a time
        val_loader = build_eval_loader(val_ds, 1, workers, info.world_size, info.rank, pin_memory=pin,
                                       collate_fn=collate_segmentation_eval)
        lr = cfg.effective_lr(info.world_size)
        layer_decay = cfg.layer_decay if cfg.layer_decay < 1 else None
        optimizer = build_optimizer(model, lr, cfg.weight_decay, cfg.betas, device, layer_decay=layer_decay)
        out = Path(cfg.output)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            log.info("segmentation: UperNet on %s, %d classes, %.1fM params; train %d images, val %d images; device %s "
                     "x%d, precision %s, lr %.3e, %d iterations", cfg.backbone, cfg.num_classes,
                     sum(p.numel() for p in model.parameters()) / 1e6, len(train_ds), len(val_ds), device,
                     info.world_size, precision, lr, cfg.iters)
            log_load_report(report, out, "the backbone")
        test = dict(mode=cfg.test_mode, crop=cfg.crop_size, stride=cfg.stride(), scale=tuple(cfg.scale))
        run_eval = validation(lambda m: scalar_metrics(evaluate_segmentation(m, val_loader, device, precision, **test)),
                              val_ds.img_dir, train_ds.img_dir, cfg.val_split, info.is_main)
        trainer = Trainer(cfg, model, optimizer, loader, sampler, device, precision, lr, info, SegmentStep(),
                          evaluate=run_eval, eval_every=0, best_metric="mIoU")
        return trainer.fit()


class SegmentStep:
    """``step_fn`` of the Trainer: (uint8 crops, labels) -> the losses, through the model's
    forward (so DDP sees it)."""

    def __call__(self, model: nn.Module, batch, generator: torch.Generator) -> Dict[str, Tensor]:
        images, labels = batch[0], batch[1]
        return model(images, labels)


def run_eval(cfg) -> Dict[str, Any]:
    """``ummae segment eval``: mIoU, mAcc, aAcc and the per-class table of a checkpoint."""
    from ummae.data import build_eval_loader
    from ummae.data.ade import SegmentationFolder, collate_segmentation_eval
    from ummae.engine.precision import resolve_precision

    cfg.validate()
    with udist.distributed(cfg.device) as (info, device):
        precision = resolve_precision(cfg.precision, device)
        model = load_segmenter(cfg.checkpoint).to(device)
        args = model.model_args
        ds = SegmentationFolder(cfg.data, cfg.split, train=False, num_classes=args["num_classes"],
                                reduce_zero_label=args["reduce_zero_label"], ignore_index=args["ignore_index"])
        test = dict(mode=cfg.test_mode or args["test_mode"], crop=args["crop_size"],
                    stride=cfg.test_stride or args["test_stride"], scale=tuple(cfg.scale or args["scale"]),
                    ratios=tuple(cfg.ratios), flip=cfg.flip)
        if test["stride"] > test["crop"]:
            raise UsageError(f"--test-stride {test['stride']} is larger than the {test['crop']} px window: pixels would "
                             f"be left out")
        out = Path(cfg.output)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        loader = build_eval_loader(ds, cfg.batch_size, min(cfg.num_workers, os.cpu_count() or 1), info.world_size,
                                   info.rank, pin_memory=device.type == "cuda", collate_fn=collate_segmentation_eval)
        metrics = evaluate_segmentation(model, loader, device, precision, **test)
        if info.is_main:
            names = args.get("class_names") or ds.class_names
            table = per_class_table(metrics, names)
            record = {**scalar_metrics(metrics), "IoU": dict(zip(names, metrics["IoU"])),
                      "Acc": dict(zip(names, metrics["Acc"])), "images": len(ds), "test": test}
            ckpt.write_atomic(out / f"metrics_{cfg.split}.json",
                              lambda f: f.write(json.dumps(record, indent=1, allow_nan=True) + "\n"), "w")
            ckpt.write_atomic(out / f"per_class_{cfg.split}.txt", lambda f: f.write(table), "w")
            log.info("%s on %s (%s, %d images, %s%s):\n%s", cfg.checkpoint, cfg.data, cfg.split, len(ds), test["mode"],
                     f", scales {list(test['ratios'])}" + (" + flip" if cfg.flip else ""), table)
        return scalar_metrics(metrics)


def palette(num_classes: int) -> Tensor:
    """A fixed colour per class ``[K, 3]`` uint8 (golden-ratio hues, alternating brightness):
    neighbouring class ids get distant colours."""
    import colorsys

    colours = [colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.65 + 0.35 * (k % 2), 0.95 - 0.3 * ((k // 2) % 2))
               for k in range(num_classes)]
    return (torch.tensor(colours) * 255).round().to(torch.uint8)


@torch.no_grad()
def predict(args) -> int:
    """``ummae segment predict``: for each image, ``STEM.png`` (the class colours over the image)
    and ``STEM_labels.png`` (the class per pixel, encoded as the data set's label maps)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from ummae.engine.precision import resolve_device
    from ummae.visualize import image_paths, read_rgb

    if not 0 <= args.alpha <= 1:
        raise UsageError(f"--alpha {args.alpha}: must be in [0, 1]")
    device = resolve_device(args.device)
    model = load_segmenter(args.checkpoint).to(device).eval()
    margs = model.model_args
    paths = image_paths(args.images)
    if not paths:
        raise UsageError("no images given")
    stems: Dict[str, str] = {}
    for path in paths:
        stem = Path(path).stem
        if stem in stems:
            raise UsageError(f"{stems[stem]} and {path} would both be written as {stem}.png; give them in separate runs")
        stems[stem] = path
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    colours = palette(model.num_classes)
    for path in paths:
        image = pil_to_tensor(read_rgb(path))
        probs = predict_probs(model, image.to(device), margs["test_mode"], margs["crop_size"], margs["test_stride"],
                              margs["scale"])
        labels = probs.argmax(0).cpu()
        blended = (1 - args.alpha) * image.float() + args.alpha * colours[labels].permute(2, 0, 1).float()
        picture = blended.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(picture)).save(out / f"{Path(path).stem}.png")
        # in the data set's own encoding (ADE20K: classes 1..150, as its annotation PNGs)
        encoded = labels.numpy() + (1 if margs.get("reduce_zero_label") else 0)
        Image.fromarray(encoded.astype(np.uint8 if encoded.max() < 256 else np.uint16)).save(
            out / f"{Path(path).stem}_labels.png")
        present = labels.unique().tolist()
        names = margs.get("class_names") or [f"class{k}" for k in range(model.num_classes)]
        log.info("%s: %s -> %s", path, ", ".join(names[k] for k in present[:8]) + (" ..." if len(present) > 8 else ""),
                 out / f"{Path(path).stem}.png")
    print(f"wrote {len(paths)} picture(s) and label maps to {out}")
    return 0
