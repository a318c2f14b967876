"""The configuration of each command: one dataclass per command, built from a few shared parts.

Every field declares its default, its flag's help and the values it accepts
(:func:`ummae.config.fields.option`); ``validate`` checks them all at once
(:func:`~ummae.config.fields.check_fields`) and then the rules between fields, written out.
A config is frozen (:class:`~ummae.config.fields.Options`): the one resolution of a command's
options (:func:`ummae.config.resolve.resolve`) builds it, nothing assigns to it afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ummae import detector_specs
from ummae.choices import DETECT_SCHEDULES, INPUT_PIPELINES, PRECISIONS, SEG_TEST_MODES, TRAIN_RESIZES
from ummae.config.fields import DEVICE, RAND_AUGMENT, Options, Rule, check_fields, option, ordered_range
from ummae.errors import UsageError
from ummae.sampling import DEFAULT_MASK_RATIO, help_text, names, strategies


def _workers(default: int, source: str):
    """The data-loading workers option; its default differs per command (4 for detection and
    segmentation, whose samples are large)."""
    return option(default, "data-loading processes per process", ge=0, source=source)


@dataclass(frozen=True)
class Machinery(Options):
    """Where and how a command runs, shared by every training run and every inference command.
    The root of every command's config: ``validate`` checks all of its fields."""

    precision: str = option(
        "auto",
        "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (training: with a grad scaler) or fp32",
        choices=PRECISIONS,
        source="ours: bf16 where the device has it (the reference: fp16 autocast)",
    )
    device: str = option(
        "auto", "auto, cpu, cuda or cuda:N", check=DEVICE, source="ours: the CUDA device when there is one"
    )
    num_workers: int = _workers(8, source="ours (MAE's main_pretrain.py --num_workers 10, for 8 GPUs)")

    def validate(self) -> None:
        check_fields(self)


# A training run's parts. A dataclass lists a base's fields before its subclass's, so the runs
# below name their parts last-first, and their flags read: output, epochs, optimisation,
# machinery, run control.


@dataclass(frozen=True)
class _RunOutput:
    output: str = option(
        "runs/run",
        "output folder: checkpoints, metrics.jsonl, TensorBoard",
        source="ours: machinery, no effect on the results",
    )


@dataclass(frozen=True)
class _Epochs:
    epochs: int = option(200, "training epochs", ge=1, source="UM-MAE Swin-T pre-training: 200 epochs (METHOD.md)")
    warmup_epochs: float = option(
        10, "linear warm-up epochs", ge=0, source="UM-MAE pre-training: 10 warm-up epochs at 200 (METHOD.md)"
    )


@dataclass(frozen=True)
class _Optimisation:
    batch_size: int = option(
        128,
        "images per process per step",
        ge=1,
        source="UM-MAE: 128 per GPU (pre-training x 8 GPUs x accum 4, fine-tuning x 8 GPUs)",
    )
    accum_iter: int = option(1, "gradient accumulation steps", ge=1, source="MAE main_*.py --accum_iter 1")
    blr: float = option(
        1.5e-4,
        "base lr: lr = blr * effective batch / 256",
        gt=0,
        below=1e9,
        source="UM-MAE pre-training: base lr 1.5e-4 (METHOD.md)",
    )
    lr: float | None = option(
        None, "absolute lr (overrides blr)", gt=0, below=1e9, source="MAE main_*.py --lr None (from --blr)"
    )
    min_lr: float = option(
        0.0, "lr at the end of the cosine", ge=0, below=1e9, source="MAE main_pretrain.py / main_linprobe.py --min_lr 0"
    )
    weight_decay: float = option(
        0.05,
        "weight decay",
        ge=0,
        source="MAE main_pretrain.py / main_finetune.py --weight_decay 0.05 (and the UM-MAE detection config's)",
    )
    clip_grad: float | None = option(
        None,
        "max gradient norm (default: no clipping)",
        gt=0,
        source="MAE main_pretrain.py / main_finetune.py: no clipping",
    )

    def effective_lr(self, world_size: int) -> float:
        """``lr``, or MAE's scaling rule ``blr * effective batch / 256``."""
        return self.lr if self.lr is not None else self.blr * self.batch_size * self.accum_iter * world_size / 256


@dataclass(frozen=True)
class _RunControl:
    seed: int = option(0, "seed of data order, augmentation, masks and init", source="MAE main_*.py --seed 0")
    save_every: int = option(
        1,
        "write checkpoint-last.pth every N epochs (and at the end)",
        ge=1,
        source="ours: machinery, no effect on the results",
    )
    keep_every: int = option(
        20,
        "also keep checkpoint-EPOCH.pth every N epochs and at the end (0 = only the end)",
        ge=0,
        source="MAE main_*.py: a numbered checkpoint every 20 epochs",
    )
    save_every_steps: int = option(
        0,
        "also checkpoint-last.pth every N optimiser steps inside an epoch (0 = off)",
        ge=0,
        source="ours: machinery, no effect on the results",
    )
    resume: str | None = option(
        None,
        "'auto' (checkpoint-last.pth of the output folder, if any) or a checkpoint path",
        source="ours: machinery, no effect on the results",
    )
    overwrite: bool = option(
        False,
        "start over in an output folder that holds a run (its checkpoints and logs are deleted)",
        source="ours: an output folder holding a run is never deleted unasked",
    )
    log_every: int = option(20, "metrics every N steps", ge=1, source="MAE engine_*.py: print_freq 20")
    max_steps_per_epoch: int | None = option(
        None, "cap on steps per epoch (quick runs)", ge=1, source="ours: off (whole epochs)"
    )
    compile: bool = option(False, "torch.compile the model", source="ours: off (the reference has no torch.compile)")
    compile_backend: str = option(
        "inductor",
        "torch.compile backend of --compile: inductor (fast code), or aot_eager / eager (no code generation: to debug)",
        choices=("inductor", "aot_eager", "eager"),
        source="torch.compile's default backend",
    )


@dataclass(frozen=True)
class RunConfig(_RunControl, Machinery, _Optimisation, _Epochs, _RunOutput):
    """What every training run counted in epochs shares: output, schedule, optimiser basics and
    the machinery of the one engine (checkpoints, resume, logging, precision, devices)."""


@dataclass(frozen=True)
class IterationRunConfig(_RunControl, Machinery, _Optimisation, _RunOutput):
    """A training run counted in iterations (``iters``, given by the subclass): no epochs to set.
    Its passes over the data are the engine's business."""

    # The engine counts a warm-up in epochs when ``warmup_steps`` is None: then there is none.
    warmup_epochs: ClassVar[float] = 0.0
    # The config.yaml of a run of an earlier version holds them (unused): read back, ignored.
    retired_options: ClassVar[frozenset[str]] = frozenset({"epochs", "warmup_epochs"})


@dataclass(frozen=True)
class PretrainConfig(RunConfig):
    """Pre-training run. Defaults are the paper's recipe (METHOD.md)."""

    recipe_command: ClassVar[str] = "pretrain"  # the recipes (Recipe.command) --config takes

    model: str = option(
        "mae_swin_tiny_256",
        "registered pre-training model (`ummae models`)",
        source="UM-MAE: Swin-T at 256 px, the paper's main model",
    )
    data: str | None = option(
        None,
        "ImageFolder tree, flat image folder, or list file of 'relative/path label' lines; omitted: the embedded "
        "demo photos",
        source="ours: the embedded demo photos when omitted",
    )
    data_root: str | None = option(
        None,
        "root of the paths in a list file (default: the list file's folder)",
        source="ours: the list file's folder",
    )
    output: str = option(
        "runs/pretrain",
        "output folder: checkpoints, metrics.jsonl, TensorBoard",
        source="ours: machinery, no effect on the results",
    )
    init: str | None = option(
        None,
        "start from the weights of this pre-training checkpoint (ummae, or the reference's: converted), with a "
        "fresh optimiser and schedule; a resumed run keeps its own weights",
        source="ours: from scratch",
    )
    # method (None = the model's default)
    img_size: int | None = option(
        None,
        "input size (default: the model's, 256 for pyramid models, 224 for ViT)",
        ge=16,
        le=4096,
        source="the model's (UM-MAE: 256 pyramid, 224 ViT)",
    )
    unit_size: int | None = option(
        None, "mask unit size in pixels (default 16)", ge=1, source="the model's (UM-MAE: 16 px units)"
    )
    sampling: str | None = option(
        None, f"masking strategy: {help_text()}", choices=names(), source="the model's (UM-MAE: uniform)"
    )
    mask_ratio: float | None = option(
        None,
        f"masked fraction (default {DEFAULT_MASK_RATIO}; "
        + "; ".join(f"{s.name} sampling is always {s.fixed_ratio}" for s in strategies() if s.fixed_ratio is not None)
        + ")",
        source="the model's (MAE --mask_ratio 0.75)",
    )
    sm_ratio: float | None = option(
        None,
        "secondary masking ratio of the visible units (default 0.25; 0 = US only)",
        source="the model's (UM-MAE main_pretrain.py --vis_mask_ratio 0.25)",
    )
    norm_pix_loss: bool | None = option(
        None,
        "per-unit normalised pixel targets (default on for MAE models)",
        source="the model's (UM-MAE scripts: --norm_pix_loss)",
    )
    decoder_pos: str | None = option(
        None,
        "'true' (each visible token at its own unit) or 'reference' (the reference code's ordering, for "
        "reproduction only)",
        choices=("true", "reference"),
        source="the model's ('true'; ours, see differences)",
    )
    drop_path: float | None = option(
        None, "stochastic depth rate of the encoder", ge=0, lt=1, source="the model's (UM-MAE pre-training: 0)"
    )
    betas: tuple[float, float] = option(
        (0.9, 0.95), "AdamW betas", ge=0, lt=1, source="MAE main_pretrain.py: AdamW betas (0.9, 0.95)"
    )
    crop_scale: tuple[float, float] = option(
        (0.2, 1.0),
        "RandomResizedCrop scale range",
        check=ordered_range(0, 1),
        source="MAE main_pretrain.py: RandomResizedCrop scale (0.2, 1.0)",
    )
    samples_per_epoch: int | None = option(
        None,
        'tar shards (--data "dir/shard-{000000..000099}.tar", pipe:..., or a folder of `ummae shards`): samples '
        "per epoch (default: their shards.json's count)",
        ge=1,
        source="ours: the shards' shards.json count",
    )
    input_pipeline: str = option(
        "tensor",
        "tensor: decode, crop and flip on uint8 tensors, normalise on the device (faster); pil: MAE's PIL "
        "transform (the same crops; pixels within 2 grey levels); device: JPEGs decoded (nvJPEG on CUDA), cropped "
        "and flipped by the training step, batched",
        choices=INPUT_PIPELINES,
        source="ours: tensor (the same crops as MAE's PIL transform, faster)",
    )
    demo_repeats: int = option(
        8, "embedded demo data: random crops per photo per epoch", ge=1, source="ours: demo data only"
    )
    vis_every: int = option(
        20,
        "write a reconstruction picture of fixed validation images every N epochs (and at the end); 0 = off",
        ge=0,
        source="ours: a picture as often as a numbered checkpoint",
    )
    vis_images: int = option(8, "images in that picture", ge=1, source="ours: one row per image")

    def model_kwargs(self) -> dict[str, Any]:
        """The options the model builder takes (None = the model's default)."""
        return dict(
            img_size=self.img_size, unit_size=self.unit_size, sampling=self.sampling,
            mask_ratio=self.mask_ratio, sm_ratio=self.sm_ratio, norm_pix_loss=self.norm_pix_loss,
            decoder_pos=self.decoder_pos, drop_path=self.drop_path,
        )  # fmt: skip


@dataclass(frozen=True)
class ClassifyData:
    """Labelled data and the classifier options shared by fine-tuning, probing and eval."""

    model: str | None = option(
        None,
        "registered classifier (`ummae models --kind classify`); default: the one the weights (--pretrained / "
        "--checkpoint) name, for a pre-training model the classifier its family pairs it with",
        source="ours: the weights' model",
    )
    data: str | None = option(
        None,
        "dataset root holding train/ and val/ ImageFolders, an ImageFolder, or a list file of 'relative/path "
        "label' lines",
        required=True,
    )
    val_data: str | None = option(
        None, "validation data (default: the val/ split of --data)", source="ours: the val/ split of --data"
    )
    data_root: str | None = option(
        None,
        "root of the paths in list files (default: each list file's folder)",
        source="ours: each list file's folder",
    )
    img_size: int | None = option(
        None, "input size (default: the model's)", gt=0, source="the model's (UM-MAE fine-tuning: 256 pyramid, 224 ViT)"
    )
    crop_pct: float | None = option(
        None,
        "evaluation: resize to img_size / crop_pct, then center crop (default: MAE's rule, 224/256 up to 224 px, "
        "1.0 above)",
        gt=0,
        le=1,
        source="MAE util/datasets.py: 224/256 up to 224 px, 1.0 above",
    )

    def require_data(self, what: str) -> None:
        if not self.data:
            raise UsageError(
                f"{what} needs labelled data: pass --data (a dataset root with train/ and val/, an ImageFolder or "
                f"a list file)"
            )


@dataclass(frozen=True)
class FewLabels:
    """Training on a class-balanced fraction of the labels (:mod:`ummae.data.subset`): fine-tuning,
    probing and the kNN bank."""

    label_fraction: float | None = option(
        None,
        "use this class-balanced fraction of the training images and their labels, e.g. 0.01 (drawn once per "
        "--label-seed, every class at least one image; a training run lists it in its folder's "
        "label_subset.txt; kNN: the bank); default: every label",
        gt=0,
        lt=1,
        source="ours: every label (the reference trains on all of them)",
    )
    label_seed: int = option(
        0, "seed of the --label-fraction draw (the same seed, the same images)", source="ours: the first draw"
    )


@dataclass(frozen=True)
class FinetuneConfig(RunConfig, FewLabels, ClassifyData):
    """End-to-end fine-tuning. Defaults are the paper's recipe (METHOD.md)."""

    recipe_command: ClassVar[str] = "finetune"

    pretrained: str | None = option(
        None,
        "pre-trained weights: an ummae checkpoint (.pth) or exported .safetensors; omitted: from scratch",
        source="ours: from scratch",
    )
    output: str = option(
        "runs/finetune",
        "output folder: checkpoints, metrics.jsonl, TensorBoard",
        source="ours: machinery, no effect on the results",
    )
    num_classes: int | None = option(
        None, "classes (default: those of the training data)", ge=1, source="ours: the training data's classes"
    )
    samples_per_epoch: int | None = option(
        None,
        "--data as labelled tar shards (`ummae shards`; then --val-data is needed): samples per epoch (default: "
        "all of them)",
        source="ours: all of the shards' samples",
    )
    drop_path: float | None = option(
        None,
        "stochastic depth rate (default: the model's, 0.1 for Swin-T)",
        ge=0,
        lt=1,
        source="the model's (UM-MAE fine-tuning: 0.1 for Swin-T)",
    )
    window_size: int | None = option(
        None, "Swin window (default: the model's, 16)", ge=1, source="the model's (UM-MAE fine-tuning: window 16)"
    )
    layer_decay: float | None = option(
        None,
        "layer-wise lr decay (default: the model's, 0.85 for Swin-T; 1 = off)",
        gt=0,
        le=1,
        source="the model's (UM-MAE fine-tuning: 0.85 for Swin-T)",
    )
    epochs: int = option(100, "training epochs", ge=1, source="UM-MAE fine-tuning: 100 epochs (METHOD.md)")
    warmup_epochs: float = option(5, "linear warm-up epochs", ge=0, source="MAE main_finetune.py --warmup_epochs 5")
    blr: float = option(
        5e-4, "base lr: lr = blr * effective batch / 256", gt=0, below=1e9, source="MAE main_finetune.py --blr 5e-4"
    )
    min_lr: float = option(
        1e-6, "lr at the end of the cosine", ge=0, below=1e9, source="MAE main_finetune.py --min_lr 1e-6"
    )
    betas: tuple[float, float] = option(
        (0.9, 0.999), "AdamW betas", ge=0, lt=1, source="MAE main_finetune.py: AdamW's default betas (0.9, 0.999)"
    )
    smoothing: float = option(0.1, "label smoothing", ge=0, lt=1, source="MAE main_finetune.py --smoothing 0.1")
    mixup: float = option(
        0.8, "mixup alpha (0 = off)", ge=0, source="MAE main_finetune.py --mixup 0.8 (the paper's recipe)"
    )
    cutmix: float = option(
        1.0, "cutmix alpha (0 = off)", ge=0, source="MAE main_finetune.py --cutmix 1.0 (the paper's recipe)"
    )
    mixup_prob: float = option(
        1.0, "probability of mixup or cutmix per batch", ge=0, le=1, source="MAE main_finetune.py --mixup_prob 1.0"
    )
    mixup_switch_prob: float = option(
        0.5,
        "probability of cutmix rather than mixup when both are on",
        ge=0,
        le=1,
        source="MAE main_finetune.py --mixup_switch_prob 0.5",
    )
    auto_augment: str = option(
        "rand-m9-mstd0.5-inc1",
        "timm RandAugment policy ('none' = off)",
        check=RAND_AUGMENT,
        source="MAE main_finetune.py --aa rand-m9-mstd0.5-inc1",
    )
    reprob: float = option(0.25, "random erasing probability", ge=0, le=1, source="MAE main_finetune.py --reprob 0.25")
    ema: bool = option(
        False,
        "keep an exponential moving average of the weights (evaluated too)",
        source="ours: off (MAE's fine-tuning has no EMA)",
    )
    ema_decay: float = option(
        0.9999, "EMA decay per optimiser update", gt=0, lt=1, source="timm ModelEmaV3's decay 0.9999"
    )
    eval_every: int = option(
        1, "evaluate on the val split every N epochs (and at the end)", ge=0, source="MAE main_finetune.py: every epoch"
    )

    def validate(self) -> None:
        super().validate()
        self.require_data("fine-tuning")

    def model_kwargs(self) -> dict[str, Any]:
        return dict(img_size=self.img_size, num_classes=self.num_classes, drop_path=self.drop_path,
                    window_size=self.window_size)  # fmt: skip


@dataclass(frozen=True)
class LinprobeConfig(RunConfig, FewLabels, ClassifyData):
    """Linear probing (MAE's recipe): frozen encoder, BatchNorm without affine + linear head,
    LARS, no weight decay, crop + flip only."""

    recipe_command: ClassVar[str] = "linprobe"

    pretrained: str | None = option(
        None,
        "pre-trained weights to probe (required): an ummae checkpoint or exported .safetensors",
        required=True,
    )
    output: str = option(
        "runs/linprobe",
        "output folder: checkpoints, metrics.jsonl, TensorBoard",
        source="ours: machinery, no effect on the results",
    )
    epochs: int = option(90, "training epochs", ge=1, source="MAE main_linprobe.py --epochs 90")
    warmup_epochs: float = option(10, "linear warm-up epochs", ge=0, source="MAE main_linprobe.py --warmup_epochs 10")
    batch_size: int = option(
        256,
        "images per process per step",
        ge=1,
        source="ours (MAE main_linprobe.py: 512 per GPU; the lr follows the batch, blr x batch / 256)",
    )
    blr: float = option(
        0.1, "base lr: lr = blr * effective batch / 256", gt=0, below=1e9, source="MAE main_linprobe.py --blr 0.1"
    )
    weight_decay: float = option(0.0, "weight decay", ge=0, source="MAE main_linprobe.py --weight_decay 0")
    eval_every: int = option(
        1, "evaluate on the val split every N epochs (and at the end)", ge=0, source="MAE main_linprobe.py: every epoch"
    )

    def validate(self) -> None:
        super().validate()
        self.require_data("linear probing")
        if not self.pretrained:
            raise UsageError("linear probing needs --pretrained (the encoder to probe)")


@dataclass(frozen=True)
class InferenceConfig(Machinery, ClassifyData):
    """Shared by the commands that only run the model forward (eval, kNN)."""

    what: ClassVar[str]  # the command, for its refusals
    batch_size: int = option(
        128, "images per process per step", ge=1, source="ours: inference only, no effect on the figures"
    )

    def validate(self) -> None:
        super().validate()
        self.require_data(self.what)


@dataclass(frozen=True)
class EvalConfig(InferenceConfig):
    """Top-1 / top-5 of a classifier checkpoint on a validation split."""

    what: ClassVar[str] = "evaluation"
    checkpoint: str | None = option(
        None,
        "classifier weights (required): a fine-tuning checkpoint or exported .safetensors",
        required=True,
    )
    split: str = option("val", "split folder of --data to evaluate", source="ImageNet layout: val/")
    ema: bool = option(
        False,
        "evaluate the EMA weights of a fine-tuning checkpoint (a run with --ema)",
        source="ours: the trained weights",
    )

    def validate(self) -> None:
        super().validate()
        if not self.checkpoint:
            raise UsageError("evaluation needs --checkpoint")


@dataclass(frozen=True)
class KnnConfig(InferenceConfig, FewLabels):
    """Weighted kNN on frozen features (cosine similarity, weights exp(sim / T))."""

    what: ClassVar[str] = "kNN evaluation"
    pretrained: str | None = option(
        None,
        "encoder weights (required): an ummae checkpoint or exported .safetensors",
        required=True,
    )
    k: int = option(20, "neighbours", ge=1, source="DINO eval_knn.py: k 20 (of its --nb_knn 10 20 100 200)")
    temperature: float = option(
        0.07, "temperature of the neighbour weights exp(sim / T)", gt=0, source="DINO eval_knn.py --temperature 0.07"
    )

    def validate(self) -> None:
        super().validate()
        if not self.pretrained:
            raise UsageError("kNN evaluation needs --pretrained (the encoder to evaluate)")


def _detector_flag(option_name: str):
    """The flag of a detector's own option: its default, choices and help, after the detectors
    that take it (:mod:`ummae.detector_specs`)."""
    o = detector_specs.OPTIONS[option_name]
    accepts = {"choices": o.choices, **o.accepts} if o.choices else dict(o.accepts)
    return option(
        o.field_default,
        detector_specs.option_help(option_name),
        source="the configuration each detector follows (the detectors' options, ummae.detector_specs)",
        **accepts,
    )


def parse_test_scale(text: str) -> tuple[int, int]:
    """A test scale ``LONGxSHORT`` or ``S`` (``SxS``) -> ``(long, short)``, the larger number the
    long side's bound whatever the order (MMDetection's ``img_scale`` with ``keep_ratio``);
    ValueError when it is neither, or a side is outside [32, 8192]."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(text)
    sides = [int(p) for p in parts] * (3 - len(parts))
    if not all(32 <= s <= 8192 for s in sides):
        raise ValueError(text)
    return max(sides[:2]), min(sides[:2])


def _is_test_scales(values: tuple[str, ...]) -> bool:
    try:
        return all(parse_test_scale(v) for v in values)
    except ValueError:
        return False


@dataclass(frozen=True)
class _DetectTest:
    """How a detector is tested: once at the ``img_size`` canvas, or at several scales and
    flipped, merged as MMDetection's ``aug_test`` (:mod:`ummae.models.detect_tta`). Shared by the
    evaluation of ``detect train``, ``detect eval`` and the flags of ``detect predict``."""

    test_scales: tuple[str, ...] | None = option(
        None,
        "multi-scale test: sizes LONGxSHORT (each image resized as large as possible with its long side <= LONG and "
        "its short side <= SHORT, as MMDetection's img_scale with keep_ratio) or S (SxS); boxes and masks merged as "
        "MMDetection's aug_test (default: one test at the img_size canvas)",
        check=Rule(_is_test_scales, "must be sizes LONGxSHORT or S, each side in [32, 8192] (e.g. 1333x800)"),
        source="MMDetection's single-scale test at the training size",
    )
    test_flip: bool = option(
        False,
        "also test each scale's horizontal flip, merged with the others (MMDetection's MultiScaleFlipAug flip=True)",
        source="MMDetection's test: no flip",
    )

    def test_scale_pairs(self) -> tuple[tuple[int, int], ...]:
        """The ``(long, short)`` of each test scale (none: the ``img_size`` canvas)."""
        return tuple(parse_test_scale(s) for s in self.test_scales or ())


@dataclass(frozen=True)
class DetectTestConfig(_DetectTest, Options):
    """The test-time augmentation flags of ``detect predict``, checked as a config's."""

    def validate(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DetectConfig(_DetectTest, RunConfig):
    """Detection / instance segmentation training on COCO. Defaults are the paper's GFL
    protocol (the reference's gfl_..._fpn_25ep_1024x1024_coco): large-scale jitter at 1024,
    AdamW lr 1e-4 at batch 16, 2000 warm-up steps, cosine to 0.01x, 25 epochs."""

    recipe_command: ClassVar[str] = "detect train"

    backbone: str = option(
        "swin_tiny_256",
        "registered classifier whose encoder is the backbone (`ummae models --kind classify`)",
        source="UM-MAE detection: Swin-T at 256 px",
    )
    detector: str = option(
        "gfl",
        detector_specs.detector_help(),
        choices=detector_specs.DETECTORS,
        source="UM-MAE detection: GFL (gfl_..._fpn_25ep_1024x1024_coco)",
    )
    # the detectors' own options (ummae.detector_specs): refused for a detector that does not take them
    fpn_norm: str | None = _detector_flag("fpn_norm")
    test_score_thr: float | None = _detector_flag("test_score_thr")
    rpn_assign: str | None = _detector_flag("rpn_assign")
    box_head: str = _detector_flag("box_head")
    box_norm: str = _detector_flag("box_norm")
    box_reg: str = _detector_flag("box_reg")
    box_loss: str = _detector_flag("box_loss")
    box_loss_weight: float = _detector_flag("box_loss_weight")
    test_nms: str = _detector_flag("test_nms")
    test_nms_iou: float = _detector_flag("test_nms_iou")
    global_attn: bool = _detector_flag("global_attn")
    stuff_maps: str | None = _detector_flag("semantic")
    pretrained: str | None = option(
        None,
        "backbone weights: a fine-tuning (the paper's choice) or pre-training checkpoint, ours or the reference's, "
        "or an export; omitted: from scratch",
        source="ours: from scratch (the paper: the fine-tuned checkpoint)",
    )
    data: str | None = option(
        None,
        "COCO root: {train,val}2017/ and annotations/instances_{train,val}2017.json",
        required=True,
    )
    train_split: str = option(
        "train2017",
        "training split (images folder and annotations/instances_SPLIT.json)",
        source="COCO layout: train2017",
    )
    val_split: str = option("val2017", "validation split", source="COCO layout: val2017")
    output: str = option(
        "runs/detect",
        "output folder: checkpoints, metrics.jsonl, TensorBoard",
        source="ours: machinery, no effect on the results",
    )
    img_size: int = option(
        1024,
        "training canvas (large-scale jitter crop) and test size (long side, padded square)",
        ge=32,
        le=4096,
        source="UM-MAE gfl config: image_size (1024, 1024)",
    )
    scale_range: tuple[float, float] = option(
        (0.1, 2.0),
        "large-scale jitter: resize to this range of img_size",
        check=ordered_range(0, 10),
        source="UM-MAE gfl config: Resize ratio_range (0.1, 2.0)",
    )
    train_resize: str = option(
        "lsj",
        "training resize: lsj (large-scale jitter, --scale-range, cropped to --img-size) or range (MMDetection's "
        "multiscale_mode='range': shorter side drawn in --short-range, longer side at most --img-size; HTC++: "
        "--img-size 1600 --short-range 400 1400)",
        choices=TRAIN_RESIZES,
        source="UM-MAE gfl config: large-scale jitter",
    )
    short_range: tuple[int, int] = option(
        (400, 1400),
        "--train-resize range: the shorter side's range in pixels",
        check=ordered_range(0, 8192),
        source="Swin's HTC++ config: img_scale (1600, 400)-(1600, 1400)",
    )
    flip_prob: float = option(
        0.5, "horizontal flip probability", ge=0, le=1, source="MMDetection RandomFlip flip_ratio 0.5"
    )
    drop_path: float | None = option(
        0.1, "stochastic depth rate of the backbone", ge=0, lt=1, source="UM-MAE transfer: drop path 0.1 (METHOD.md)"
    )
    window_size: int | None = option(
        None, "Swin window (default: the backbone's, 16)", ge=1, source="the backbone's (UM-MAE fine-tuning: window 16)"
    )
    neck_channels: int = option(
        768,
        "channels each stage map is projected to (LayerNorm + Linear) before the FPN",
        ge=1,
        source="UM-MAE transfer: LayerNorm + Linear to 768 (METHOD.md)",
    )
    fpn_channels: int = option(256, "FPN channels", ge=1, source="MMDetection FPN out_channels 256")
    epochs: int = option(25, "training epochs", ge=1, source="UM-MAE gfl config: 25 epochs")
    warmup_epochs: float = option(
        0,
        "linear warm-up epochs (--warmup-steps, when given, takes precedence)",
        ge=0,
        source="ours: warm-up in steps (--warmup-steps)",
    )
    warmup_steps: int | None = option(
        2000, "linear warm-up in optimiser steps", ge=0, source="UM-MAE gfl config: warmup_iters 2000"
    )
    schedule: str = option(
        "cosine",
        "lr schedule after the warm-up: cosine (to --min-lr, the paper's GFL) or step (MMDetection's: x0.1 at each "
        "epoch of --lr-steps; HTC++: --lr-steps 63 69 over 72 epochs)",
        choices=DETECT_SCHEDULES,
        source="UM-MAE gfl config: lr_config policy='CosineAnnealing'",
    )
    lr_steps: tuple[int, ...] | None = option(
        None,
        "--schedule step: the epochs at whose start the lr is multiplied by 0.1 (MMDetection's lr_config step; "
        "none: the lr stays flat after the warm-up)",
        ge=1,
        source="ours: none (the cosine schedule has no steps)",
    )
    warmup_ratio: float = option(
        0.001,
        "--schedule step: the linear warm-up starts at this fraction of the lr (the cosine's starts at 0)",
        gt=0,
        le=1,
        source="MMDetection _base_/schedules/schedule_1x.py: lr_config warmup_ratio=0.001",
    )
    batch_size: int = option(2, "images per process per step", ge=1, source="UM-MAE gfl config: samples_per_gpu 2")
    blr: float = option(
        1.6e-3,
        "base lr: lr = blr * effective batch / 256 (1e-4 at batch 16, the paper's)",
        gt=0,
        below=1e9,
        source="UM-MAE gfl config: lr 1e-4 at batch 16",
    )
    min_lr: float = option(
        1e-6,
        "lr at the end of the cosine (0.01x of 1e-4)",
        ge=0,
        below=1e9,
        source="UM-MAE gfl config: CosineAnnealing min_lr_ratio 0.01",
    )
    betas: tuple[float, float] = option(
        (0.9, 0.999), "AdamW betas", ge=0, lt=1, source="UM-MAE gfl config: AdamW betas (0.9, 0.999)"
    )
    keep_every: int = option(
        5,
        "also keep checkpoint-EPOCH.pth every N epochs and at the end (0 = only the end)",
        ge=0,
        source="ours: 5 numbered checkpoints in 25 epochs",
    )
    eval_every: int = option(
        1,
        "COCO evaluation on the val split every N epochs (and at the end)",
        ge=0,
        source="MMDetection evaluation interval 1",
    )
    num_workers: int = _workers(
        4, source="MMDetection workers_per_gpu 4 (our --num-workers' default 4 for detection and segmentation)"
    )
    log_every: int = option(50, "metrics every N steps", ge=1, source="MMDetection log_config interval 50")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise UsageError("detection needs --data: a COCO root with train2017/, val2017/ and annotations/")
        detector_specs.check_flags(detector_specs.SPECS[self.detector], vars(self))
        if self.lr_steps and list(self.lr_steps) != sorted(set(self.lr_steps)):
            raise UsageError(f"--lr-steps {' '.join(map(str, self.lr_steps))}: give the epochs in increasing order")

    def model_kwargs(self) -> dict[str, Any]:
        """What the detector is built with (:class:`ummae.models.detectors.Detector`): the
        pyramid's sizes and the backbone's options, and the options the detector takes."""
        spec = detector_specs.SPECS[self.detector]
        own = {o.name: o.from_field(getattr(self, o.field_name)) for o in spec.options}
        return dict(img_size=self.img_size, neck_channels=self.neck_channels, fpn_channels=self.fpn_channels,
                    drop_path=self.drop_path, window_size=self.window_size, **own)  # fmt: skip


@dataclass(frozen=True)
class DetectEvalConfig(_DetectTest, Machinery):
    """COCO box (and mask) AP of a detection checkpoint, and its result JSON."""

    checkpoint: str | None = option(
        None,
        "a checkpoint of `ummae detect train` (checkpoint-best.pth, -last.pth, ...)",
        required=True,
    )
    data: str | None = option(None, "COCO root: SPLIT/ and annotations/instances_SPLIT.json", required=True)
    split: str = option("val2017", "split to evaluate", source="COCO layout: val2017")
    output: str = option(
        "runs/detect_eval",
        "folder for detections_SPLIT.json (COCO results) and metrics_SPLIT.json",
        source="ours: machinery, no effect on the results",
    )
    batch_size: int = option(
        2, "images per process per step", ge=1, source="ours: inference only, no effect on the figures"
    )
    num_workers: int = _workers(4, source="MMDetection workers_per_gpu 4")

    def validate(self) -> None:
        if not self.checkpoint:
            raise UsageError("detection evaluation needs --checkpoint")
        if not self.data:
            raise UsageError("detection evaluation needs --data: a COCO root")
        super().validate()


@dataclass(frozen=True)
class SegmentConfig(IterationRunConfig):
    """Semantic segmentation training (ADE20K layout). Defaults are the paper's UperNet
    protocol (the reference's upernet_mae_swin_tiny_256_..._512_slide_160k_ade20k_lr1e4_lrd1_pt):
    512 crops of a 2048x512 image resized 0.5-2.0x, AdamW lr 1e-4 at batch 16, weight decay 0.05,
    layer decay 1.0, 1500 warm-up iterations, poly schedule, 160k iterations, sliding-window test."""

    recipe_command: ClassVar[str] = "segment train"

    backbone: str = option(
        "swin_tiny_256",
        "registered classifier whose encoder is the backbone (`ummae models --kind classify`)",
        source="UM-MAE segmentation: Swin-T at 256 px",
    )
    pretrained: str | None = option(
        None,
        "backbone weights: a fine-tuning (the paper's choice) or pre-training checkpoint, ours or the reference's, "
        "or an export; omitted: from scratch",
        source="ours: from scratch (the paper: the fine-tuned checkpoint)",
    )
    data: str | None = option(
        None,
        "ADE20K-layout root: images/{training,validation}/*.jpg and annotations/{training,validation}/*.png",
        required=True,
    )
    train_split: str = option(
        "training", "training split (images/SPLIT and annotations/SPLIT)", source="ADE20K layout: training"
    )
    val_split: str = option("validation", "validation split", source="ADE20K layout: validation")
    output: str = option(
        "runs/segment",
        "output folder: checkpoints, metrics.jsonl, TensorBoard",
        source="ours: machinery, no effect on the results",
    )
    num_classes: int = option(
        150, "classes the label maps hold (after --reduce-zero-label)", ge=1, source="ADE20K: 150 classes"
    )
    reduce_zero_label: bool = option(
        True,
        "label 0 is 'ignore' and 1..K are classes 0..K-1 (ADE20K); --no-reduce-zero-label: labels are the classes",
        source="MMSegmentation ADE20K config: reduce_zero_label=True",
    )
    ignore_index: int = option(
        255, "label value that is ignored by the loss and the metrics", source="MMSegmentation: ignore_index 255"
    )
    crop_size: int = option(
        512,
        "training crop, and the sliding window at test time",
        ge=32,
        le=4096,
        source="UM-MAE upernet config: crop_size (512, 512)",
    )
    scale: tuple[int, int] = option(
        (2048, 512),
        "image scale (long, short): training resizes to it times --ratio-range (keep ratio), testing to it",
        ge=16, le=16384, what="two sizes", source='MMSegmentation ADE20K config: img_scale (2048, 512)',
    )  # fmt: skip
    ratio_range: tuple[float, float] = option(
        (0.5, 2.0),
        "training resize ratio range",
        check=ordered_range(0, 10),
        source="MMSegmentation ADE20K config: ratio_range (0.5, 2.0)",
    )
    cat_max_ratio: float = option(
        0.75,
        "a training crop is drawn again (up to 10 times) while one class covers this share of it or more",
        gt=0, le=1, source='MMSegmentation ADE20K config: RandomCrop cat_max_ratio 0.75',
    )  # fmt: skip
    flip_prob: float = option(
        0.5, "horizontal flip probability", ge=0, le=1, source="MMSegmentation RandomFlip prob 0.5"
    )
    photometric: bool = option(
        True,
        "photometric distortion (brightness, contrast, saturation, hue) in training",
        source="MMSegmentation ADE20K config: PhotoMetricDistortion",
    )
    drop_path: float | None = option(
        0.1, "stochastic depth rate of the backbone", ge=0, lt=1, source="UM-MAE transfer: drop path 0.1 (METHOD.md)"
    )
    window_size: int | None = option(
        None, "Swin window (default: the backbone's, 16)", ge=1, source="the backbone's (UM-MAE fine-tuning: window 16)"
    )
    neck_channels: int = option(
        768,
        "channels each stage map is projected to (a 1x1 convolution, the reference's SEG fpn1..4) before the head",
        ge=1,
        source="UM-MAE upernet config: fpn1..4 to 768 channels",
    )
    head_channels: int = option(
        768,
        "UperNet channels (the reference's decode_head channels=768)",
        ge=1,
        source="UM-MAE upernet config: decode_head channels 768",
    )
    aux_channels: int = option(
        256,
        "channels of the auxiliary FCN head on stage 3",
        ge=1,
        source="MMSegmentation upernet config: auxiliary_head channels 256",
    )
    aux_weight: float = option(
        0.4,
        "loss weight of the auxiliary FCN head (0 = no auxiliary head)",
        ge=0,
        source="MMSegmentation upernet config: auxiliary loss_weight 0.4",
    )
    layer_decay: float = option(
        1.0,
        "layer-wise lr decay of the backbone (the reference's 1.0: none)",
        gt=0,
        le=1,
        source="UM-MAE upernet config (..._lrd1_pt): layer decay 1.0",
    )
    iters: int = option(
        160000, "training iterations (optimiser updates)", ge=1, source="UM-MAE upernet config: 160k iterations"
    )
    eval_every_iters: int = option(
        16000,
        "evaluate on the val split and write checkpoint-last.pth every N iterations (and at the end)",
        ge=0,
        source="MMSegmentation schedule_160k: evaluation interval 16000",
    )
    schedule: str = option(
        "poly",
        "lr schedule over --iters: poly (power 1, MMSegmentation's) or cosine",
        choices=("poly", "cosine"),
        source="MMSegmentation schedule_160k: poly, power 1",
    )
    warmup_steps: int | None = option(
        1500,
        "linear warm-up in iterations (poly: from 1e-6 of the lr, as mmcv's)",
        ge=0,
        source="UM-MAE upernet config: warmup_iters 1500",
    )
    batch_size: int = option(
        2,
        "images per process per step (the paper: 8 GPUs x 2)",
        ge=1,
        source="UM-MAE upernet config: samples_per_gpu 2",
    )
    blr: float = option(
        1.6e-3,
        "base lr: lr = blr * effective batch / 256 (1e-4 at batch 16, the paper's)",
        gt=0,
        below=1e9,
        source="UM-MAE upernet config: lr 1e-4 at batch 16",
    )
    min_lr: float = option(
        0.0, "lr at the end of the schedule", ge=0, below=1e9, source="MMSegmentation schedule_160k: poly min_lr 0"
    )
    betas: tuple[float, float] = option(
        (0.9, 0.999), "AdamW betas", ge=0, lt=1, source="UM-MAE upernet config: AdamW betas (0.9, 0.999)"
    )
    test_mode: str = option(
        "slide",
        "validation inference: slide (windows of --crop-size) or whole (one pass over the padded image)",
        choices=SEG_TEST_MODES,
        source="UM-MAE upernet config (..._512_slide_...): slide",
    )
    test_stride: int | None = option(
        None,
        "sliding-window stride (default: 2/3 of --crop-size, the reference's 341 at 512)",
        source="UM-MAE upernet config: stride 341 at crop 512",
    )  # bounded by --crop-size: checked in validate
    keep_every: int = option(
        0,
        "also keep a numbered checkpoint every N passes over the data (0 = only the end)",
        ge=0,
        source="ours: only the end",
    )
    num_workers: int = _workers(4, source="MMSegmentation workers_per_gpu 4")
    log_every: int = option(50, "metrics every N steps", ge=1, source="MMSegmentation log_config interval 50")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise UsageError("segmentation needs --data: an ADE20K-layout root with images/ and annotations/")
        check_ignore_index(self.ignore_index, self.num_classes)
        if self.test_stride is not None and not 1 <= self.test_stride <= self.crop_size:
            raise UsageError(
                f"bad config value test_stride={self.test_stride!r}: must be in [1, --crop-size {self.crop_size}]"
            )

    def stride(self) -> int:
        """The sliding-window stride: ``test_stride``, or 2/3 of the crop (341 at 512)."""
        return self.test_stride or self.crop_size * 2 // 3


@dataclass(frozen=True)
class SegmentEvalConfig(Machinery):
    """mIoU, mean and overall accuracy and per-class IoU of a segmentation checkpoint."""

    checkpoint: str | None = option(
        None,
        "a checkpoint of `ummae segment train` (checkpoint-best.pth, -last.pth, ...)",
        required=True,
    )
    data: str | None = option(None, "ADE20K-layout root: images/SPLIT and annotations/SPLIT", required=True)
    split: str = option("validation", "split to evaluate", source="ADE20K layout: validation")
    output: str = option(
        "runs/segment_eval",
        "folder for metrics_SPLIT.json and the per-class table per_class_SPLIT.txt",
        source="ours: machinery, no effect on the results",
    )
    test_mode: str | None = option(
        None, "slide or whole (default: the checkpoint's)", choices=SEG_TEST_MODES, source="the checkpoint's"
    )
    test_stride: int | None = option(
        None, "sliding-window stride (default: the checkpoint's)", ge=1, source="the checkpoint's"
    )
    scale: tuple[int, int] | None = option(
        None,
        "test scale (long, short) (default: the checkpoint's)",
        ge=16,
        le=16384,
        what="two sizes",
        source="the checkpoint's",
    )
    ratios: tuple[float, ...] = option(
        (1.0,),
        "test-time scales, as ratios of --scale (multi-scale: 0.5 0.75 1.0 1.25 1.5 1.75)",
        gt=0,
        le=8,
        source="MMSegmentation: single scale (aug_test off)",
    )
    flip: bool = option(
        False, "also predict on the flipped image (averaged with the others)", source="MMSegmentation: flip off"
    )
    batch_size: int = option(1, "images per process per step", ge=1, source="MMSegmentation test samples_per_gpu 1")
    num_workers: int = _workers(4, source="MMSegmentation workers_per_gpu 4")

    def validate(self) -> None:
        if not self.checkpoint:
            raise UsageError("segmentation evaluation needs --checkpoint")
        if not self.data:
            raise UsageError("segmentation evaluation needs --data: an ADE20K-layout root")
        super().validate()


def check_ignore_index(ignore_index: int, num_classes: int) -> None:
    """The ignored label must not be one of the classes (it would silently drop one)."""
    if 0 <= ignore_index < num_classes:
        raise UsageError(
            f"bad config value ignore_index={ignore_index!r}: is one of the {num_classes} classes "
            f"(0..{num_classes - 1}); use a value outside them, e.g. 255"
        )
