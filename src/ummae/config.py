"""Run configuration: small dataclasses, a YAML file, and command-line flags generated from
the dataclass fields (one flag per field, so nothing is declared twice).

Precedence: dataclass default < ``--config file.yaml`` < explicit command-line flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml
from ummae.errors import UsageError


def is_device_name(name: str) -> bool:
    """auto, cpu, cuda or cuda:N (:func:`ummae.engine.precision.is_device_name`, imported when a
    config is checked: the module loads torch, which building the command line must not)."""
    from ummae.engine.precision import is_device_name as check

    return check(name)


def _f(default, help_, **meta):
    """A field and its flag's help; ``meta`` may add ``choices`` (the values, shown in
    ``--help``; checked by ``validate``) and ``required`` (shown without brackets in the usage
    line; a YAML file may still give it, so ``validate`` checks it)."""
    return field(default=default, metadata={"help": help_, **meta})


from ummae.choices import DETECTORS, INPUT_PIPELINES, PRECISIONS, SEG_TEST_MODES  # noqa: F401  (re-exported)


@dataclass
class RunConfig:
    """What every training run shares: output, schedule, optimiser basics and the machinery
    of the one engine (checkpoints, resume, logging, precision, devices)."""

    output: str = _f("runs/run", "output folder: checkpoints, metrics.jsonl, TensorBoard")
    # optimisation
    epochs: int = _f(200, "training epochs")
    warmup_epochs: float = _f(10, "linear warm-up epochs")
    batch_size: int = _f(128, "images per process per step")
    accum_iter: int = _f(1, "gradient accumulation steps")
    blr: float = _f(1.5e-4, "base lr: lr = blr * effective batch / 256")
    lr: Optional[float] = _f(None, "absolute lr (overrides blr)")
    min_lr: float = _f(0.0, "lr at the end of the cosine")
    weight_decay: float = _f(0.05, "weight decay")
    clip_grad: Optional[float] = _f(None, "max gradient norm (default: no clipping)")
    # machinery
    precision: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (with a grad scaler) or fp32", choices=PRECISIONS)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    num_workers: int = _f(8, "data-loading processes per training process")
    seed: int = _f(0, "seed of data order, augmentation, masks and init")
    save_every: int = _f(1, "write checkpoint-last.pth every N epochs (and at the end)")
    keep_every: int = _f(20, "also keep checkpoint-EPOCH.pth every N epochs and at the end (0 = only the end)")
    save_every_steps: int = _f(0, "also checkpoint-last.pth every N optimiser steps inside an epoch (0 = off)")
    resume: Optional[str] = _f(None, "'auto' (checkpoint-last.pth of the output folder, if any) or a checkpoint path")
    overwrite: bool = _f(False, "start over in an output folder that holds a run (its checkpoints and logs are deleted)")
    log_every: int = _f(20, "metrics every N steps")
    max_steps_per_epoch: Optional[int] = _f(None, "cap on steps per epoch (quick runs)")
    compile: bool = _f(False, "torch.compile the model")

    def validate(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(self.accum_iter >= 1, "accum_iter", self.accum_iter, "must be >= 1")
        _check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be >= 0")
        _check(0 < self.blr < 1e9, "blr", self.blr, "must be > 0 and below 1e9")
        _check(self.lr is None or 0 < self.lr < 1e9, "lr", self.lr, "must be > 0 and below 1e9")
        _check(0 <= self.min_lr < 1e9, "min_lr", self.min_lr, "must be >= 0 and below 1e9")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _check(self.clip_grad is None or self.clip_grad > 0, "clip_grad", self.clip_grad, "must be > 0")
        _check_machinery(self)
        _check(self.save_every >= 1, "save_every", self.save_every, "must be >= 1")
        _check(self.keep_every >= 0, "keep_every", self.keep_every, "must be >= 0")
        _check(self.save_every_steps >= 0, "save_every_steps", self.save_every_steps, "must be >= 0")
        _check(self.log_every >= 1, "log_every", self.log_every, "must be >= 1")
        _check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "max_steps_per_epoch", self.max_steps_per_epoch, "must be >= 1")

    def effective_lr(self, world_size: int) -> float:
        """``lr``, or MAE's scaling rule ``blr * effective batch / 256``."""
        return self.lr if self.lr is not None else self.blr * self.batch_size * self.accum_iter * world_size / 256


@dataclass
class PretrainConfig(RunConfig):
    """Pre-training run. Defaults are the paper's recipe (METHOD.md)."""

    model: str = _f("mae_swin_tiny_256", "registered pre-training model (`ummae models`)")
    data: Optional[str] = _f(None, "ImageFolder tree, flat image folder, or list file of 'relative/path label' lines; omitted: the embedded demo photos")
    data_root: Optional[str] = _f(None, "root of the paths in a list file (default: the list file's folder)")
    output: str = _f("runs/pretrain", "output folder: checkpoints, metrics.jsonl, TensorBoard")
    init: Optional[str] = _f(None, "start from the weights of this pre-training checkpoint (ummae, or the reference's: converted), with a fresh optimiser and schedule; a resumed run keeps its own weights")
    # method (None = the model's default)
    img_size: Optional[int] = _f(None, "input size (default: the model's, 256 for pyramid models, 224 for ViT)")
    unit_size: Optional[int] = _f(None, "mask unit size in pixels (default 16)")
    sampling: Optional[str] = _f(None, "uniform (UM-MAE) or random (MAE RS; ViT only)", choices=("uniform", "random"))
    mask_ratio: Optional[float] = _f(None, "masked fraction (uniform sampling is always 0.75)")
    sm_ratio: Optional[float] = _f(None, "secondary masking ratio of the visible units (default 0.25; 0 = US only)")
    norm_pix_loss: Optional[bool] = _f(None, "per-unit normalised pixel targets (default on for MAE models)")
    decoder_pos: Optional[str] = _f(None, "'true' (each visible token at its own unit) or 'reference' (the reference code's ordering, for reproduction only)", choices=("true", "reference"))
    drop_path: Optional[float] = _f(None, "stochastic depth rate of the encoder")
    betas: Tuple[float, float] = _f((0.9, 0.95), "AdamW betas")
    crop_scale: Tuple[float, float] = _f((0.2, 1.0), "RandomResizedCrop scale range")
    samples_per_epoch: Optional[int] = _f(None, "tar shards (--data \"dir/shard-{000000..000099}.tar\", pipe:..., or a folder of `ummae shards`): samples per epoch (default: their shards.json's count)")
    input_pipeline: str = _f("tensor", "tensor: decode, crop and flip on uint8 tensors, normalise on the device (faster); pil: MAE's PIL transform (the same crops; pixels within 2 grey levels); device: JPEGs decoded (nvJPEG on CUDA), cropped and flipped by the training step, batched", choices=INPUT_PIPELINES)
    demo_repeats: int = _f(8, "embedded demo data: random crops per photo per epoch")
    vis_every: int = _f(20, "write a reconstruction picture of fixed validation images every N epochs (and at the end); 0 = off")
    vis_images: int = _f(8, "images in that picture")

    def validate(self) -> None:
        super().validate()
        _check(self.vis_every >= 0, "vis_every", self.vis_every, "must be >= 0")
        _check(self.vis_images >= 1, "vis_images", self.vis_images, "must be >= 1")
        _check(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "must be in [0, 1)")
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, "crop_scale", self.crop_scale, "must satisfy 0 < min <= max <= 1")
        _check(self.demo_repeats >= 1, "demo_repeats", self.demo_repeats, "must be >= 1")
        _check(self.input_pipeline in INPUT_PIPELINES, "input_pipeline", self.input_pipeline,
               f"must be one of {', '.join(INPUT_PIPELINES)}")
        _check(self.samples_per_epoch is None or self.samples_per_epoch >= 1, "samples_per_epoch", self.samples_per_epoch, "must be >= 1")
        _check(self.drop_path is None or 0 <= self.drop_path < 1, "drop_path", self.drop_path, "must be in [0, 1)")
        _check(self.img_size is None or 16 <= self.img_size <= 4096, "img_size", self.img_size, "must be in [16, 4096]")
        _check(self.unit_size is None or self.unit_size >= 1, "unit_size", self.unit_size, "must be >= 1")

    def model_kwargs(self) -> Dict[str, Any]:
        """The options the model builder takes (None = the model's default)."""
        return dict(
            img_size=self.img_size, unit_size=self.unit_size, sampling=self.sampling,
            mask_ratio=self.mask_ratio, sm_ratio=self.sm_ratio, norm_pix_loss=self.norm_pix_loss,
            decoder_pos=self.decoder_pos, drop_path=self.drop_path,
        )


@dataclass
class ClassifyData:
    """Labelled data and the classifier options shared by fine-tuning, probing and eval."""

    model: Optional[str] = _f(None, "registered classifier (`ummae models --kind classify`); default: the one the weights (--pretrained / --checkpoint) name, for a pre-training model its classifier (mae_X / simmim_X -> X)")
    data: Optional[str] = _f(None, "dataset root holding train/ and val/ ImageFolders, an ImageFolder, or a list file of 'relative/path label' lines", required=True)
    val_data: Optional[str] = _f(None, "validation data (default: the val/ split of --data)")
    data_root: Optional[str] = _f(None, "root of the paths in list files (default: each list file's folder)")
    img_size: Optional[int] = _f(None, "input size (default: the model's)")
    crop_pct: float = _f(0.875, "evaluation: resize to img_size / crop_pct, then center crop")

    def validate_data(self, what: str) -> None:
        if not self.data:
            raise UsageError(f"{what} needs labelled data: pass --data (a dataset root with train/ and val/, an ImageFolder or a list file)")
        _check(self.img_size is None or self.img_size > 0, "img_size", self.img_size, "must be > 0")
        _check(0 < self.crop_pct <= 1, "crop_pct", self.crop_pct, "must be in (0, 1]")


@dataclass
class FinetuneConfig(RunConfig, ClassifyData):
    """End-to-end fine-tuning. Defaults are the paper's recipe (METHOD.md)."""

    pretrained: Optional[str] = _f(None, "pre-trained weights: an ummae checkpoint (.pth) or exported .safetensors; omitted: from scratch")
    output: str = _f("runs/finetune", "output folder: checkpoints, metrics.jsonl, TensorBoard")
    num_classes: Optional[int] = _f(None, "classes (default: those of the training data)")
    samples_per_epoch: Optional[int] = _f(None, "--data as labelled tar shards (`ummae shards`; then --val-data is needed): samples per epoch (default: all of them)")
    drop_path: Optional[float] = _f(None, "stochastic depth rate (default: the model's, 0.1 for Swin-T)")
    window_size: Optional[int] = _f(None, "Swin window (default: the model's, 16)")
    layer_decay: Optional[float] = _f(None, "layer-wise lr decay (default: the model's, 0.85 for Swin-T; 1 = off)")
    epochs: int = _f(100, "training epochs")
    warmup_epochs: float = _f(5, "linear warm-up epochs")
    blr: float = _f(5e-4, "base lr: lr = blr * effective batch / 256")
    min_lr: float = _f(1e-6, "lr at the end of the cosine")
    betas: Tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    smoothing: float = _f(0.1, "label smoothing")
    mixup: float = _f(0.8, "mixup alpha (0 = off)")
    cutmix: float = _f(1.0, "cutmix alpha (0 = off)")
    mixup_prob: float = _f(1.0, "probability of mixup or cutmix per batch")
    mixup_switch_prob: float = _f(0.5, "probability of cutmix rather than mixup when both are on")
    auto_augment: str = _f("rand-m9-mstd0.5-inc1", "timm RandAugment policy ('none' = off)")
    reprob: float = _f(0.25, "random erasing probability")
    ema: bool = _f(False, "keep an exponential moving average of the weights (evaluated too)")
    ema_decay: float = _f(0.9999, "EMA decay per optimiser update")
    eval_every: int = _f(1, "evaluate on the val split every N epochs (and at the end)")

    def validate(self) -> None:
        super().validate()
        self.validate_data("fine-tuning")
        _check(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "must be in [0, 1)")
        _check(self.num_classes is None or self.num_classes >= 1, "num_classes", self.num_classes, "must be >= 1")
        _check(self.drop_path is None or 0 <= self.drop_path < 1, "drop_path", self.drop_path, "must be in [0, 1)")
        _check(self.window_size is None or self.window_size >= 1, "window_size", self.window_size, "must be >= 1")
        _check(self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay", self.layer_decay, "must be in (0, 1]")
        _check(0 <= self.smoothing < 1, "smoothing", self.smoothing, "must be in [0, 1)")
        _check(self.mixup >= 0, "mixup", self.mixup, "must be >= 0")
        _check(self.cutmix >= 0, "cutmix", self.cutmix, "must be >= 0")
        _check(0 <= self.mixup_prob <= 1, "mixup_prob", self.mixup_prob, "must be in [0, 1]")
        _check(0 <= self.mixup_switch_prob <= 1, "mixup_switch_prob", self.mixup_switch_prob, "must be in [0, 1]")
        _check(0 <= self.reprob <= 1, "reprob", self.reprob, "must be in [0, 1]")
        _check(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in (0, 1)")
        _check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0")
        _check_auto_augment(self.auto_augment)

    def model_kwargs(self) -> Dict[str, Any]:
        return dict(img_size=self.img_size, num_classes=self.num_classes, drop_path=self.drop_path,
                    window_size=self.window_size)


@dataclass
class LinprobeConfig(RunConfig, ClassifyData):
    """Linear probing (MAE's recipe): frozen encoder, BatchNorm without affine + linear head,
    LARS, no weight decay, crop + flip only."""

    pretrained: Optional[str] = _f(None, "pre-trained weights to probe (required): an ummae checkpoint or exported .safetensors", required=True)
    output: str = _f("runs/linprobe", "output folder: checkpoints, metrics.jsonl, TensorBoard")
    epochs: int = _f(90, "training epochs")
    warmup_epochs: float = _f(10, "linear warm-up epochs")
    batch_size: int = _f(256, "images per process per step")
    blr: float = _f(0.1, "base lr: lr = blr * effective batch / 256")
    weight_decay: float = _f(0.0, "weight decay")
    eval_every: int = _f(1, "evaluate on the val split every N epochs (and at the end)")

    def validate(self) -> None:
        super().validate()
        self.validate_data("linear probing")
        if not self.pretrained:
            raise UsageError("linear probing needs --pretrained (the encoder to probe)")
        _check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0")


@dataclass
class InferenceConfig(ClassifyData):
    """Shared by the commands that only run the model forward (eval, kNN)."""

    batch_size: int = _f(128, "images per process per step")
    num_workers: int = _f(8, "data-loading processes per process")
    precision: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32", choices=PRECISIONS)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")

    def validate(self) -> None:
        self.validate_data(self.what)
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check_machinery(self)


@dataclass
class EvalConfig(InferenceConfig):
    """Top-1 / top-5 of a classifier checkpoint on a validation split."""

    what = "evaluation"
    checkpoint: Optional[str] = _f(None, "classifier weights (required): a fine-tuning checkpoint or exported .safetensors", required=True)
    split: str = _f("val", "split folder of --data to evaluate")
    ema: bool = _f(False, "evaluate the EMA weights of a fine-tuning checkpoint (a run with --ema)")

    def validate(self) -> None:
        super().validate()
        if not self.checkpoint:
            raise UsageError("evaluation needs --checkpoint")


@dataclass
class KnnConfig(InferenceConfig):
    """Weighted kNN on frozen features (cosine similarity, weights exp(sim / T))."""

    what = "kNN evaluation"
    pretrained: Optional[str] = _f(None, "encoder weights (required): an ummae checkpoint or exported .safetensors", required=True)
    k: int = _f(20, "neighbours")
    temperature: float = _f(0.07, "temperature of the neighbour weights exp(sim / T)")

    def validate(self) -> None:
        super().validate()
        if not self.pretrained:
            raise UsageError("kNN evaluation needs --pretrained (the encoder to evaluate)")
        _check(self.k >= 1, "k", self.k, "must be >= 1")
        _check(self.temperature > 0, "temperature", self.temperature, "must be > 0")



@dataclass
class DetectConfig(RunConfig):
    """Detection / instance segmentation training on COCO. Defaults are the paper's GFL
    protocol (the reference's gfl_..._fpn_25ep_1024x1024_coco): large-scale jitter at 1024,
    AdamW lr 1e-4 at batch 16, 2000 warm-up steps, cosine to 0.01x, 25 epochs."""

    backbone: str = _f("swin_tiny_256", "registered classifier whose encoder is the backbone (`ummae models --kind classify`)")
    detector: str = _f("gfl", "gfl (the paper's), maskrcnn (box + mask AP), retinanet or fcos (torchvision's)", choices=DETECTORS)
    pretrained: Optional[str] = _f(None, "backbone weights: a fine-tuning (the paper's choice) or pre-training checkpoint, ours or the reference's, or an export; omitted: from scratch")
    data: Optional[str] = _f(None, "COCO root: {train,val}2017/ and annotations/instances_{train,val}2017.json", required=True)
    train_split: str = _f("train2017", "training split (images folder and annotations/instances_SPLIT.json)")
    val_split: str = _f("val2017", "validation split")
    output: str = _f("runs/detect", "output folder: checkpoints, metrics.jsonl, TensorBoard")
    img_size: int = _f(1024, "training canvas (large-scale jitter crop) and test size (long side, padded square)")
    scale_range: Tuple[float, float] = _f((0.1, 2.0), "large-scale jitter: resize to this range of img_size")
    flip_prob: float = _f(0.5, "horizontal flip probability")
    drop_path: Optional[float] = _f(0.1, "stochastic depth rate of the backbone")
    window_size: Optional[int] = _f(None, "Swin window (default: the backbone's, 16)")
    neck_channels: int = _f(768, "channels each stage map is projected to (LayerNorm + Linear) before the FPN")
    fpn_channels: int = _f(256, "FPN channels")
    epochs: int = _f(25, "training epochs")
    warmup_epochs: float = _f(0, "linear warm-up epochs (--warmup-steps, when given, takes precedence)")
    warmup_steps: Optional[int] = _f(2000, "linear warm-up in optimiser steps")
    batch_size: int = _f(2, "images per process per step")
    blr: float = _f(1.6e-3, "base lr: lr = blr * effective batch / 256 (1e-4 at batch 16, the paper's)")
    min_lr: float = _f(1e-6, "lr at the end of the cosine (0.01x of 1e-4)")
    betas: Tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    keep_every: int = _f(5, "also keep checkpoint-EPOCH.pth every N epochs and at the end (0 = only the end)")
    eval_every: int = _f(1, "COCO evaluation on the val split every N epochs (and at the end)")
    num_workers: int = _f(4, "data-loading processes per training process")
    log_every: int = _f(50, "metrics every N steps")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise UsageError("detection needs --data: a COCO root with train2017/, val2017/ and annotations/")
        _check(self.detector in DETECTORS, "detector", self.detector, f"must be one of {', '.join(DETECTORS)}")
        _check(32 <= self.img_size <= 4096, "img_size", self.img_size, "must be in [32, 4096]")
        lo, hi = self.scale_range
        _check(0 < lo <= hi <= 10, "scale_range", self.scale_range, "must satisfy 0 < min <= max <= 10")
        _check(0 <= self.flip_prob <= 1, "flip_prob", self.flip_prob, "must be in [0, 1]")
        _check(self.drop_path is None or 0 <= self.drop_path < 1, "drop_path", self.drop_path, "must be in [0, 1)")
        _check(self.window_size is None or self.window_size >= 1, "window_size", self.window_size, "must be >= 1")
        _check(self.neck_channels >= 1, "neck_channels", self.neck_channels, "must be >= 1")
        _check(self.fpn_channels >= 1, "fpn_channels", self.fpn_channels, "must be >= 1")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "must be in [0, 1)")
        _check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0")


@dataclass
class DetectEvalConfig:
    """COCO box (and mask) AP of a detection checkpoint, and its result JSON."""

    checkpoint: Optional[str] = _f(None, "a checkpoint of `ummae detect train` (checkpoint-best.pth, -last.pth, ...)", required=True)
    data: Optional[str] = _f(None, "COCO root: SPLIT/ and annotations/instances_SPLIT.json", required=True)
    split: str = _f("val2017", "split to evaluate")
    output: str = _f("runs/detect_eval", "folder for detections_SPLIT.json (COCO results) and metrics_SPLIT.json")
    batch_size: int = _f(2, "images per process per step")
    num_workers: int = _f(4, "data-loading processes per process")
    precision: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32", choices=PRECISIONS)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")

    def validate(self) -> None:
        if not self.checkpoint:
            raise UsageError("detection evaluation needs --checkpoint")
        if not self.data:
            raise UsageError("detection evaluation needs --data: a COCO root")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check_machinery(self)



@dataclass
class SegmentConfig(RunConfig):
    """Semantic segmentation training (ADE20K layout). Defaults are the paper's UperNet
    protocol (the reference's upernet_mae_swin_tiny_256_..._512_slide_160k_ade20k_lr1e4_lrd1_pt):
    512 crops of a 2048x512 image resized 0.5-2.0x, AdamW lr 1e-4 at batch 16, weight decay 0.05,
    layer decay 1.0, 1500 warm-up iterations, poly schedule, 160k iterations, sliding-window test."""

    backbone: str = _f("swin_tiny_256", "registered classifier whose encoder is the backbone (`ummae models --kind classify`)")
    pretrained: Optional[str] = _f(None, "backbone weights: a fine-tuning (the paper's choice) or pre-training checkpoint, ours or the reference's, or an export; omitted: from scratch")
    data: Optional[str] = _f(None, "ADE20K-layout root: images/{training,validation}/*.jpg and annotations/{training,validation}/*.png", required=True)
    train_split: str = _f("training", "training split (images/SPLIT and annotations/SPLIT)")
    val_split: str = _f("validation", "validation split")
    output: str = _f("runs/segment", "output folder: checkpoints, metrics.jsonl, TensorBoard")
    num_classes: int = _f(150, "classes the label maps hold (after --reduce-zero-label)")
    reduce_zero_label: bool = _f(True, "label 0 is 'ignore' and 1..K are classes 0..K-1 (ADE20K); --no-reduce-zero-label: labels are the classes")
    ignore_index: int = _f(255, "label value that is ignored by the loss and the metrics")
    crop_size: int = _f(512, "training crop, and the sliding window at test time")
    scale: Tuple[int, int] = _f((2048, 512), "image scale (long, short): training resizes to it times --ratio-range (keep ratio), testing to it")
    ratio_range: Tuple[float, float] = _f((0.5, 2.0), "training resize ratio range")
    cat_max_ratio: float = _f(0.75, "a training crop is drawn again (up to 10 times) while one class covers this share of it or more")
    flip_prob: float = _f(0.5, "horizontal flip probability")
    photometric: bool = _f(True, "photometric distortion (brightness, contrast, saturation, hue) in training")
    drop_path: Optional[float] = _f(0.1, "stochastic depth rate of the backbone")
    window_size: Optional[int] = _f(None, "Swin window (default: the backbone's, 16)")
    neck_channels: int = _f(768, "channels each stage map is projected to (LayerNorm + Linear) before the head")
    head_channels: int = _f(768, "UperNet channels (the reference's decode_head channels=768)")
    aux_channels: int = _f(256, "channels of the auxiliary FCN head on stage 3")
    aux_weight: float = _f(0.4, "loss weight of the auxiliary FCN head (0 = no auxiliary head)")
    layer_decay: float = _f(1.0, "layer-wise lr decay of the backbone (the reference's 1.0: none)")
    iters: int = _f(160000, "training iterations (optimiser updates)")
    eval_every_iters: int = _f(16000, "evaluate on the val split and write checkpoint-last.pth every N iterations (and at the end)")
    schedule: str = _f("poly", "lr schedule over --iters: poly (power 1, MMSegmentation's) or cosine", choices=("poly", "cosine"))
    epochs: int = _f(1, "not used: segmentation runs for --iters iterations")
    warmup_epochs: float = _f(0, "not used: --warmup-steps")
    warmup_steps: Optional[int] = _f(1500, "linear warm-up in iterations (poly: from 1e-6 of the lr, as mmcv's)")
    batch_size: int = _f(2, "images per process per step (the paper: 8 GPUs x 2)")
    blr: float = _f(1.6e-3, "base lr: lr = blr * effective batch / 256 (1e-4 at batch 16, the paper's)")
    min_lr: float = _f(0.0, "lr at the end of the schedule")
    betas: Tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    test_mode: str = _f("slide", "validation inference: slide (windows of --crop-size) or whole (one pass over the padded image)", choices=SEG_TEST_MODES)
    test_stride: Optional[int] = _f(None, "sliding-window stride (default: 2/3 of --crop-size, the reference's 341 at 512)")
    keep_every: int = _f(0, "also keep a numbered checkpoint every N passes over the data (0 = only the end)")
    num_workers: int = _f(4, "data-loading processes per training process")
    log_every: int = _f(50, "metrics every N steps")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise UsageError("segmentation needs --data: an ADE20K-layout root with images/ and annotations/")
        _check_seg_labels(self)
        _check(32 <= self.crop_size <= 4096, "crop_size", self.crop_size, "must be in [32, 4096]")
        _check(all(16 <= v <= 16384 for v in self.scale), "scale", self.scale, "must be two sizes in [16, 16384]")
        lo, hi = self.ratio_range
        _check(0 < lo <= hi <= 10, "ratio_range", self.ratio_range, "must satisfy 0 < min <= max <= 10")
        _check(0 < self.cat_max_ratio <= 1, "cat_max_ratio", self.cat_max_ratio, "must be in (0, 1]")
        _check(0 <= self.flip_prob <= 1, "flip_prob", self.flip_prob, "must be in [0, 1]")
        _check(self.drop_path is None or 0 <= self.drop_path < 1, "drop_path", self.drop_path, "must be in [0, 1)")
        _check(self.window_size is None or self.window_size >= 1, "window_size", self.window_size, "must be >= 1")
        for name in ("neck_channels", "head_channels", "aux_channels"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _check(self.aux_weight >= 0, "aux_weight", self.aux_weight, "must be >= 0")
        _check(0 < self.layer_decay <= 1, "layer_decay", self.layer_decay, "must be in (0, 1]")
        _check(self.iters >= 1, "iters", self.iters, "must be >= 1")
        _check(self.eval_every_iters >= 0, "eval_every_iters", self.eval_every_iters, "must be >= 0")
        _check(self.schedule in ("poly", "cosine"), "schedule", self.schedule, "must be poly or cosine")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "must be in [0, 1)")
        _check(self.test_mode in SEG_TEST_MODES, "test_mode", self.test_mode, f"must be one of {', '.join(SEG_TEST_MODES)}")
        _check(self.test_stride is None or 1 <= self.test_stride <= self.crop_size, "test_stride", self.test_stride,
               f"must be in [1, --crop-size {self.crop_size}]")

    def stride(self) -> int:
        """The sliding-window stride: ``test_stride``, or 2/3 of the crop (341 at 512)."""
        return self.test_stride or self.crop_size * 2 // 3


@dataclass
class SegmentEvalConfig:
    """mIoU, mean and overall accuracy and per-class IoU of a segmentation checkpoint."""

    checkpoint: Optional[str] = _f(None, "a checkpoint of `ummae segment train` (checkpoint-best.pth, -last.pth, ...)", required=True)
    data: Optional[str] = _f(None, "ADE20K-layout root: images/SPLIT and annotations/SPLIT", required=True)
    split: str = _f("validation", "split to evaluate")
    output: str = _f("runs/segment_eval", "folder for metrics_SPLIT.json and the per-class table per_class_SPLIT.txt")
    test_mode: Optional[str] = _f(None, "slide or whole (default: the checkpoint's)", choices=SEG_TEST_MODES)
    test_stride: Optional[int] = _f(None, "sliding-window stride (default: the checkpoint's)")
    scale: Optional[Tuple[int, int]] = _f(None, "test scale (long, short) (default: the checkpoint's)")
    ratios: Tuple[float, ...] = _f((1.0,), "test-time scales, as ratios of --scale (multi-scale: 0.5 0.75 1.0 1.25 1.5 1.75)")
    flip: bool = _f(False, "also predict on the flipped image (averaged with the others)")
    batch_size: int = _f(1, "images per process per step")
    num_workers: int = _f(4, "data-loading processes per process")
    precision: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32", choices=PRECISIONS)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")

    def validate(self) -> None:
        if not self.checkpoint:
            raise UsageError("segmentation evaluation needs --checkpoint")
        if not self.data:
            raise UsageError("segmentation evaluation needs --data: an ADE20K-layout root")
        _check(self.test_mode is None or self.test_mode in SEG_TEST_MODES, "test_mode", self.test_mode,
               f"must be one of {', '.join(SEG_TEST_MODES)}")
        _check(self.test_stride is None or self.test_stride >= 1, "test_stride", self.test_stride, "must be >= 1")
        _check(self.scale is None or all(16 <= v <= 16384 for v in self.scale), "scale", self.scale,
               "must be two sizes in [16, 16384]")
        _check(len(self.ratios) >= 1 and all(0 < r <= 8 for r in self.ratios), "ratios", self.ratios, "must be in (0, 8]")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check_machinery(self)


def _check_seg_labels(cfg) -> None:
    _check(cfg.num_classes >= 1, "num_classes", cfg.num_classes, "must be >= 1")
    _check(not 0 <= cfg.ignore_index < cfg.num_classes, "ignore_index", cfg.ignore_index,
           f"is one of the {cfg.num_classes} classes (0..{cfg.num_classes - 1}); use a value outside them, e.g. 255")


def _check_machinery(cfg) -> None:
    """Options every run and every inference command shares: precision, device, workers."""
    _check(cfg.precision in PRECISIONS, "precision", cfg.precision, "must be auto, bf16, fp16 or fp32")
    _check(is_device_name(cfg.device), "device", cfg.device, "must be auto, cpu, cuda or cuda:N")
    _check(cfg.num_workers >= 0, "num_workers", cfg.num_workers, "must be >= 0")


def _check_auto_augment(policy: str) -> None:
    """Parse the RandAugment policy now (timm would fail in a loader worker, mid-run)."""
    if policy.lower() in ("", "none"):
        return
    from timm.data.auto_augment import rand_augment_transform

    try:
        if not policy.startswith("rand"):
            raise UsageError(policy)
        rand_augment_transform(policy, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except Exception:  # timm raises AssertionError / ValueError / KeyError for a bad policy
        raise UsageError(f"bad config value auto_augment={policy!r}: expected a timm RandAugment policy such as "
                         f"'rand-m9-mstd0.5-inc1', or 'none'") from None


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise UsageError(f"bad config value {name}={value!r}: {why}")


# --- YAML + flags ------------------------------------------------------------------------------


def _base_type(tp):
    """(python type, is_tuple) of a field annotation, unwrapping Optional. ``is_tuple`` is 0
    for one value, the number of values for a fixed tuple (``Tuple[int, int]``: 2) and -1 for
    one or more (``Tuple[float, ...]``)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        return args[0], -1 if args[-1] is Ellipsis else len(args)
    return tp, 0


def _coerce(cls, name: str, value: Any) -> Any:
    """A flag's text or a YAML value -> the field's type, refusing what would be misread: a
    missing value for a required option, a list or mapping where one value belongs, YAML's
    true/false as a number, and infinite or NaN numbers."""
    hints = typing.get_type_hints(cls)
    tp, is_tuple = _base_type(hints[name])
    optional = type(None) in typing.get_args(hints[name])
    if value is None:
        if optional:
            return None
        raise UsageError(f"bad config value {name}=None: a value is required ({tp.__name__})")
    if not is_tuple and isinstance(value, (list, tuple, dict)):
        raise UsageError(f"bad config value {name}={value!r}: expected one {tp.__name__}, not a {type(value).__name__}")
    if tp in (int, float) and isinstance(value, bool):
        raise UsageError(f"bad config value {name}={value!r}: expected a number, not true/false")
    out = _convert(name, value, tp, is_tuple)
    for v in out if is_tuple else (out,):
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"bad config value {name}={value!r}: must be a finite number")
    return out


def _convert(name: str, value: Any, tp, is_tuple: int) -> Any:
    count = {0: "", -1: "one or more values of type "}.get(is_tuple, f"{is_tuple} values of type ")
    try:
        if is_tuple:
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            value = tuple(tp(v) for v in value)
            if len(value) != is_tuple and not (is_tuple == -1 and value):
                raise UsageError(value)
            return value
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise UsageError(value)
            return bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise UsageError(value)
        return tp(value)
    except (TypeError, ValueError):
        raise UsageError(f"bad config value {name}={value!r}: expected {count}{tp.__name__}") from None


BUILTIN_CONFIGS = Path(__file__).parent / "configs"


def builtin_configs(cls=None):
    """Names of the built-in YAML configs; with ``cls``, only those whose options all belong
    to it (a pre-training config is no fine-tuning config)."""
    names = sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))
    if cls is None:
        return names
    known = {f.name for f in fields(cls)}
    return [n for n in names if set(yaml.safe_load((BUILTIN_CONFIGS / f"{n}.yaml").read_text()) or {}) <= known]


def load_yaml(cls, path: str | Path) -> Dict[str, Any]:
    """Load a YAML file of options, or a built-in config by name (``demo``, ...)."""
    path = Path(path)
    if not path.is_file() and (BUILTIN_CONFIGS / f"{path}.yaml").is_file():
        path = BUILTIN_CONFIGS / f"{path}.yaml"
    if not path.is_file():
        raise UsageError(f"config file not found: {path} (built-in configs: {', '.join(builtin_configs(cls)) or 'none'})")
    text = path.read_text(errors="replace")
    if len(text) > 1_000_000:
        raise UsageError(f"config file {path} is {len(text)} characters long: not an options file")
    try:
        # an options file needs no anchors; aliases can expand exponentially (a "YAML bomb")
        if any(isinstance(t, yaml.AliasToken) for t in yaml.scan(text)):
            raise UsageError(f"config file {path} uses YAML aliases (*name): write the values out")
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    known = {f.name for f in fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UsageError(f"unknown option {key!r} in {path}; valid options: {', '.join(sorted(known))}")
        out[name] = _coerce(cls, name, value)
    return out


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per dataclass field; defaults are left unset (SUPPRESS) so that only
    flags the user typed override the YAML file. A field's ``choices`` are shown as the flag's
    values (``--precision {auto,bf16,fp16,fp32}``) and checked by the config (one clear line,
    for a YAML value too); a ``required`` one is shown without brackets in the usage line, but
    argparse does not demand it: a ``--config`` file may give it (the config checks it)."""
    hints = typing.get_type_hints(cls)
    shown_required = False
    for f in fields(cls):
        tp, is_tuple = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f.metadata.get("help", "")
        if default is not None:  # None defaults are explained by the help text itself
            help_ += f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
        if tp is bool:
            action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        elif is_tuple:
            action = parser.add_argument(flag, nargs="+", type=str, default=argparse.SUPPRESS, help=help_, metavar="V")
        else:
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(choices) + "}" if choices else tp.__name__.upper()
            action = parser.add_argument(flag, type=str, default=argparse.SUPPRESS, help=help_, metavar=metavar)
        if f.metadata.get("required"):
            action.shown_required = True
            shown_required = True
    if shown_required and not issubclass(parser.formatter_class, _UsageShowsRequired):
        parser.formatter_class = type("UsageShowsRequired", (_UsageShowsRequired, parser.formatter_class), {})


class _UsageShowsRequired(argparse.HelpFormatter):
    """Writes the usage line with the flags marked ``shown_required`` as argparse writes
    required ones (no brackets); parsing is unchanged."""

    def _format_usage(self, usage, actions, groups, prefix):
        flipped = [a for a in actions if getattr(a, "shown_required", False) and not a.required]
        for a in flipped:
            a.required = True
        try:
            return super()._format_usage(usage, actions, groups, prefix)
        finally:
            for a in flipped:
                a.required = False


def config_from_args(cls, args: argparse.Namespace):
    """Build and validate ``cls`` from parsed args (with optional ``args.config`` YAML)."""
    values: Dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(cls, args.config))
    for f in fields(cls):
        if hasattr(args, f.name):
            values[f.name] = _coerce(cls, f.name, getattr(args, f.name))
    cfg = cls(**values)
    cfg._given = set(values)  # what the user set (YAML or flags): a resumed run refuses contradictions
    cfg.validate()
    return cfg


# What a resumed run may change: where and how it runs, how long, how often it logs and saves.
# Everything else defines the run (model, data order, optimisation) and comes from the checkpoint.
MAY_CHANGE_ON_RESUME = frozenset({
    "epochs", "num_workers", "device", "precision", "compile", "output", "resume", "overwrite", "log_every",
    "save_every", "keep_every", "save_every_steps", "max_steps_per_epoch", "vis_every", "vis_images", "eval_every",
    "data", "data_root", "val_data", "init", "pretrained", "iters", "eval_every_iters",
})


def given_fields(cfg) -> set:
    """Options the user set: flags and YAML keys (:func:`config_from_args` records them); for a
    config built in code, the fields that differ from their defaults."""
    given = getattr(cfg, "_given", None)
    if given is not None:
        return set(given)
    return {f.name for f in fields(cfg) if f.default is not dataclasses.MISSING and getattr(cfg, f.name) != f.default}


def settings_from_checkpoint(cfg, logger=None):
    """``--resume``: the run continues with the settings it was started with, read from its
    checkpoint. An option left out takes the checkpoint's value; one given that contradicts it
    is refused, unless it is one a resumed run may change (MAY_CHANGE_ON_RESUME); every
    difference is logged."""
    from ummae.weights import io as ckpt

    if not cfg.resume:
        return cfg
    path = Path(cfg.output) / "checkpoint-last.pth" if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume == "auto" and not path.exists():
        return cfg
    saved = ckpt.load(path, mmap=True).get("config") or {}
    given = given_fields(cfg)
    # model options whose None means "the model's default": an explicit default is the same
    # model, which the resume itself checks on the resolved options (ckpt.check_compatible)
    model_options = set(cfg.model_kwargs()) if hasattr(cfg, "model_kwargs") else set()
    taken, changed, conflicts = [], [], []
    for f in fields(cfg):
        if f.name not in saved:
            continue
        theirs = tuple(saved[f.name]) if isinstance(saved[f.name], list) else saved[f.name]
        ours = getattr(cfg, f.name)
        if ours == theirs or (f.name in model_options and f.name in given and None in (ours, theirs)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in MAY_CHANGE_ON_RESUME:
            changed.append(f"{flag} {theirs!r} -> {ours!r}")
        elif f.name in given:
            conflicts.append(f"{flag} {ours!r} (the run has {theirs!r})")
        else:
            setattr(cfg, f.name, theirs)
            taken.append(f"{flag} {theirs!r}")
    if conflicts:
        raise UsageError(
            f"--resume {path}: {'; '.join(conflicts)}: a resumed run keeps the settings it was started with; only "
            f"where, how long and how often it runs may change. Leave the option out, or start a new run "
            f"(--init {path} to start from its weights)"
        )
    if logger is not None:
        if taken:
            logger.info("resume: the run's settings from %s: %s", path, ", ".join(taken))
        if changed:
            logger.info("resume: changed for the rest of the run: %s", ", ".join(changed))
    return cfg


def config_to_dict(cfg) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
