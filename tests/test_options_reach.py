"""Every option reaches what it sets: for each training command, every field of its config is
set to a value other than the tests' baseline and looked for where it lands in the run the task
builds (the model's attributes or modules, the optimiser's groups, the data pipeline, the lr
schedule, the loss step, the EMA, the evaluation), not in the config. A field with no entry
fails the walk, so a new option needs one; a field with no effect to see at this size (where
the run writes, how it checkpoints) says why, naming the test that shows its effect where one
does (checked to exist). The inference commands (eval, knn, detect eval, segment eval) run whole,
once per option: the option is looked for in what the command passed to the real functions it
calls (wrapped to record their arguments and results, and call through) and in what it wrote.

The bug this guards against: an option dropped between the config and what it configures (the
built model keeps its own default, and an ablation's row is silently the baseline)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import ummae.config as configs
import ummae.tasks.classify as classify
import ummae.tasks.detect as detect
import ummae.tasks.knn as knn
import ummae.tasks.segment as segment
from _helpers import coco_subset, semseg_subset, write_colour_dataset, write_image
from ummae.cli import COMMANDS
from ummae.config import DetectConfig, FinetuneConfig, LinprobeConfig, PretrainConfig, SegmentConfig, resolve
from ummae.data import build_classify_dataset
from ummae.data.subset import balanced_subset
from ummae.engine.dist import DistInfo
from ummae.engine.schedule import Schedule
from ummae.models.registry import create_model
from ummae.models.upernet import SegmenterInference
from ummae.tasks.base import RunContext
from ummae.tasks.classify import FinetuneTask, LinprobeTask
from ummae.tasks.detect import DetectTask
from ummae.tasks.pretrain import PretrainTask
from ummae.tasks.segment import SegmentTask
from ummae.weights import io as ckpt

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent
UPDATES_PER_EPOCH = 10  # the schedule is read at this many updates per epoch


@dataclass(frozen=True)
class Reach:
    """Setting the option to ``value`` makes ``where(built run)`` ``want``: a value, or a
    function of the resolved config (default: ``value`` itself). The baseline's must differ.
    ``also``: options set in both (where the option needs another model to act on)."""

    value: Any
    where: Callable[[SimpleNamespace], Any]
    want: Any = None
    also: dict[str, Any] = dataclasses.field(default_factory=dict)


def _built(task, cfg) -> SimpleNamespace:
    """What ``run`` builds before it trains (:func:`ummae.tasks.base._trainer`), without the
    loader and the Trainer: the resolved config, the task's parts, optimiser, loss step, EMA,
    evaluation and the lr schedule."""
    cfg, _ = resolve(cfg, 1, task.from_weights)
    task.check(cfg)
    ctx = RunContext(DistInfo(), CPU, "fp32", 0)
    parts = task.build(cfg, ctx)
    lr = cfg.effective_lr(1)
    evaluate, eval_every = task.evaluator(cfg, ctx, parts)
    return SimpleNamespace(
        cfg=cfg, model=parts.model, train=parts.train, val=parts.val, lr=lr, step=task.step(cfg, parts),
        optimizer=task.optimizer(cfg, parts.model, lr, CPU), ema=task.ema(cfg, parts.model), eval_every=eval_every,
        schedule=Schedule.from_config(cfg, UPDATES_PER_EPOCH, lr),
    )  # fmt: skip


def _training(task_cls) -> Callable[[Any], SimpleNamespace]:
    return lambda cfg: _built(task_cls(), cfg)


def _walk(build: Callable[[Any], SimpleNamespace], base, table: dict[str, Reach | str]) -> None:
    """``build(cfg)``: what a run of ``cfg`` builds (a training run's parts) or does (an
    inference command's calls); each entry's ``where`` reads its option there."""
    names = {f.name for f in base.options()}
    assert sorted(names - set(table)) == [], "options without an entry: add where each lands (or why it cannot be seen)"
    assert sorted(set(table) - names) == [], "entries of options the config does not have"
    baseline = build(base)
    failures = []
    for name, entry in table.items():
        if isinstance(entry, str):
            assert entry.strip(), name
            for file, test in re.findall(r"(tests/\w+\.py)::(\w+)", entry):  # a renamed or deleted test fails
                assert re.search(rf"^def {test}\(", (ROOT / file).read_text(), re.M), f"{name}: {file}::{test} is gone"
            continue
        before_cfg = dataclasses.replace(base, **entry.also) if entry.also else base
        before = entry.where(build(before_cfg) if entry.also else baseline)
        changed = build(dataclasses.replace(before_cfg, **{name: entry.value}))
        want = entry.value if entry.want is None else entry.want
        want = want(changed.cfg) if callable(want) else want
        got = entry.where(changed)
        if got != want or before == want:
            failures.append(f"{name}={entry.value!r}: lands as {got!r} (want {want!r}; the baseline's {before!r})")
    assert failures == []


# --- where things land -------------------------------------------------------------------------
def _drop_path(b) -> float:
    """The deepest block's stochastic depth rate (the rate rises linearly to it; float32)."""
    return round(max((float(m.drop_prob) for m in b.model.modules() if type(m).__name__ == "DropPath"), default=0.0), 6)


def _group(key: str):
    """The values of ``key`` over the optimiser's param groups."""
    return lambda b: sorted({g[key] for g in b.optimizer.param_groups})


def _transform_attr(attr: str, transform=lambda b: b.train.transform):
    """An attribute of the training pipeline's step that has it (torchvision's Compose, ours)."""

    def where(b):
        t = transform(b)
        for step in [t, *getattr(t, "transforms", [])]:
            if hasattr(step, attr):
                value = getattr(step, attr)
                return tuple(value) if isinstance(value, list) else value
        return None

    return where


def _final_lr(b) -> float:
    return round(b.schedule.lr(b.schedule.total_updates), 12)


_MACHINERY = {
    "output": "where the run writes: tests/test_engine.py (checkpoints, metrics.jsonl in --output)",
    "precision": "fp32 on the CPU; bf16/fp16 are the device's (tests/test_engine.py, the GPU check)",
    "device": "the CPU here; the device the run trains on (tests/test_engine.py)",
    "num_workers": "loader processes: batches do not depend on them (tests/test_data.py)",
}
_RUN_CONTROL = {
    "seed": "data order, augmentation and masks: tests/test_step_semantics.py (masks from the seed)",
    "save_every": "checkpoint cadence: tests/test_engine.py",
    "keep_every": "numbered checkpoints: tests/test_engine.py",
    "save_every_steps": "mid-epoch checkpoints: tests/test_engine.py",
    "resume": "a resumed run: tests/test_engine.py (resume equals the uninterrupted run)",
    "overwrite": "an output folder's old run deleted: tests/test_engine.py",
    "log_every": "metrics lines: tests/test_engine.py",
    "max_steps_per_epoch": "the steps of an epoch: tests/test_hooks.py",
    "compile": "torch.compile: tests/test_compile.py",
    "compile_backend": "torch.compile's backend: tests/test_compile.py",
    "clip_grad": "the optimiser step: tests/test_step_semantics.py (clipping at the effective batch)",
}


def _optimisation(batch: int) -> dict[str, Reach]:
    return {
        "batch_size": Reach(batch * 2, lambda b: b.lr, lambda c: c.blr * c.batch_size / 256),
        "accum_iter": Reach(3, lambda b: b.lr, lambda c: c.blr * c.batch_size * 3 / 256),
        "blr": Reach(3e-3, lambda b: b.lr, lambda c: 3e-3 * c.batch_size / 256),
        "lr": Reach(0.02, lambda b: b.lr),
        "min_lr": Reach(1e-5, _final_lr),
        "weight_decay": Reach(0.11, lambda b: max(_group("weight_decay")(b))),
        "betas": Reach((0.8, 0.9), _group("betas"), [(0.8, 0.9)]),
    }


def _epochs() -> dict[str, Reach]:
    return {
        "epochs": Reach(3, lambda b: b.schedule.total_updates, 3 * UPDATES_PER_EPOCH),
        "warmup_epochs": Reach(2, lambda b: b.schedule.warmup_updates, 2 * UPDATES_PER_EPOCH),
    }


# --- pre-training ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noise")
    for i in range(5):
        write_image(folder / f"{i}.png", size=(80, 72), seed=i)
    return folder


VIT = dict(model="mae_vit_test")  # random sampling and any ratio: a plain ViT's


def test_pretrain__every_option_reaches_what_it_sets(tmp_path, noise_folder):
    base = PretrainConfig(model="mae_swin_test", output=str(tmp_path), device="cpu", num_workers=0, epochs=1,
                          warmup_epochs=0, batch_size=4, blr=0.05)  # fmt: skip

    def masked_units(b):
        return int(b.model.sample_masks(1, CPU, torch.Generator().manual_seed(0))[0].sum())

    def sm_units(b):  # the SM units of one image's masks: V - int(V (1 - r)) of V visible
        _, sm = b.model.sample_masks(1, CPU, torch.Generator().manual_seed(0))
        return None if sm is None else int(sm.sum())

    _walk(_training(PretrainTask), base, {
        **_MACHINERY, **_RUN_CONTROL, **_optimisation(4), **_epochs(),
        "model": Reach("mae_pvt_test", lambda b: type(b.model.encoder).__name__, "PyramidVisionTransformer"),
        "data": Reach(str(noise_folder), lambda b: len(b.train), 5),
        "data_root": "the root of a list file's paths: tests/test_data.py (list files)",
        "init": "weights copied in: tests/test_engine.py (--init)",
        "img_size": Reach(128, lambda b: (b.model.img_size, tuple(b.train[(0, 0)][0].shape)), (128, (3, 128, 128))),
        "unit_size": Reach(8, lambda b: (b.model.unit_size, b.model.grid), (8, (8, 8))),
        "sampling": Reach("random", lambda b: b.model.strategy.name, also=VIT),
        "mask_ratio": Reach(0.5, masked_units, 8, also=dict(model="mae_vit_test", sampling="random")),
        "sm_ratio": Reach(0.5, sm_units, 2),
        "norm_pix_loss": Reach(False, lambda b: b.model.norm_pix_loss),
        "decoder_pos": Reach("reference", lambda b: b.model.decoder_pos),
        "drop_path": Reach(0.2, _drop_path),
        "crop_scale": Reach((0.5, 0.9), _transform_attr("scale")),
        "samples_per_epoch": "tar shards only: tests/test_shards.py",
        "input_pipeline": Reach("pil", lambda b: b.train.tensor_input, False),
        "demo_repeats": Reach(2, lambda b: len(b.train), lambda c: 17 * 2),
        "vis_every": Reach(3, lambda b: b.eval_every),
        "vis_images": "the reconstruction picture's rows: tests/test_visualize.py",
    })  # fmt: skip


# --- classification ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_colours(tmp_path_factory):
    """Another labelled dataset than ``colour_data``: 2 training, 1 validation image per class."""
    return write_colour_dataset(tmp_path_factory.mktemp("small_colours"), train_per_class=2, val_per_class=1)


def _steps_of(cls_name: str):
    """The training pipeline holds a step of this class (timm's RandAugment, ...)."""
    return lambda b: any(type(t).__name__ == cls_name for t in getattr(b.train.transform, "transforms", []))


def _layer_decay(b) -> float:
    """The ratio of the two lowest lr scales of the groups: the layer-wise decay."""
    scales = sorted({g.get("lr_scale", 1.0) for g in b.optimizer.param_groups})
    return round(scales[0] / scales[1], 6) if len(scales) > 1 else 1.0


def _classify_data(small_colours) -> dict[str, Reach | str]:
    return {
        "model": Reach("pvt_test", lambda b: type(b.model.encoder).__name__, "PyramidVisionTransformer"),
        "data": Reach(str(small_colours), lambda b: (len(b.train), len(b.val)), (6, 3)),
        "val_data": Reach(str(small_colours / "val"), lambda b: len(b.val), 3),
        "data_root": "the root of a list file's paths: tests/test_data_classify.py (list files)",
        "img_size": Reach(128, lambda b: (b.model.img_size, tuple(b.train[(0, 0)][0].shape)), (128, (3, 128, 128))),
        "crop_pct": Reach(0.5, lambda b: tuple(b.val[(0, 0)][0].shape) + (_transform_attr("size", lambda b: b.val.transform)(b),), (3, 64, 64, 128)),
    }  # fmt: skip


def _few_labels() -> dict[str, Reach]:
    """--label-fraction keeps half of colour_data's 18 training images; --label-seed which half
    (the draw of that seed over every training image)."""

    def drawn(cfg) -> list[str]:
        ds = build_classify_dataset(cfg.data, "train", None)
        return sorted(ds.samples[i][0] for i in balanced_subset(ds.samples, ds.class_names, 0.5, cfg.label_seed, ""))

    return {
        "label_fraction": Reach(0.5, lambda b: len(b.train), 9),
        "label_seed": Reach(1, lambda b: sorted(p for p, _ in b.train.samples), drawn, also=dict(label_fraction=0.5)),
    }


def test_finetune__every_option_reaches_what_it_sets(tmp_path, colour_data, small_colours):
    base = FinetuneConfig(model="swin_test", data=str(colour_data), output=str(tmp_path), device="cpu", num_workers=0,
                          epochs=1, warmup_epochs=0, batch_size=6, blr=0.05)  # fmt: skip
    mixup = lambda attr: lambda b: getattr(b.step.mixup, attr)  # noqa: E731 (timm's Mixup in the loss step)
    _walk(_training(FinetuneTask), base, {
        **_MACHINERY, **_RUN_CONTROL, **_optimisation(6), **_epochs(), **_classify_data(small_colours), **_few_labels(),
        "pretrained": "weights loaded into the encoder: tests/test_classify.py, tests/test_transfer.py",
        "num_classes": Reach(7, lambda b: (b.model.num_classes, b.model.head.out_features), (7, 7)),
        "samples_per_epoch": "labelled tar shards only: tests/test_shards.py",
        "drop_path": Reach(0.3, _drop_path),
        "window_size": Reach(4, lambda b: {m.window_size for m in b.model.modules() if type(m).__name__ == "SwinBlock"}, {4}),
        "layer_decay": Reach(0.5, _layer_decay),
        "smoothing": Reach(0.3, mixup("label_smoothing")),
        "mixup": Reach(0.3, mixup("mixup_alpha")),
        "cutmix": Reach(0.4, mixup("cutmix_alpha")),
        "mixup_prob": Reach(0.6, mixup("mix_prob")),
        "mixup_switch_prob": Reach(0.2, mixup("switch_prob")),
        "auto_augment": Reach("none", _steps_of("RandAugment"), False),
        "reprob": Reach(0.6, _transform_attr("probability")),
        "ema": Reach(True, lambda b: b.ema is not None),
        "ema_decay": Reach(0.5, lambda b: b.ema.decay, also=dict(ema=True)),
        "eval_every": Reach(3, lambda b: b.eval_every),
    })  # fmt: skip


def test_linprobe__every_option_reaches_what_it_sets(tmp_path, colour_data, small_colours, pretrain_ckpt):
    base = LinprobeConfig(pretrained=str(pretrain_ckpt("mae_swin_test")), data=str(colour_data), output=str(tmp_path),
                          device="cpu", num_workers=0, epochs=1, warmup_epochs=0, batch_size=6, blr=0.05)  # fmt: skip
    table = {
        **_MACHINERY, **_RUN_CONTROL, **_optimisation(6), **_epochs(), **_classify_data(small_colours), **_few_labels(),
        "model": "taken from --pretrained (its classifier): tests/test_classify.py; another model refuses the weights",
        "pretrained": "weights loaded into the frozen encoder: tests/test_classify.py (linear probing)",
        "weight_decay": Reach(0.11, _group("weight_decay"), [0.11]),  # LARS on the head
        "eval_every": Reach(3, lambda b: b.eval_every),
    }  # fmt: skip
    del table["betas"]  # LARS has none
    _walk(_training(LinprobeTask), base, table)


def _iteration_schedule() -> dict[str, Reach]:
    return {
        "iters": Reach(20, lambda b: b.schedule.total_updates),
        "warmup_steps": Reach(5, lambda b: b.schedule.warmup_updates),
    }


# --- segmentation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def semseg(tmp_path_factory):
    return semseg_subset(tmp_path_factory.mktemp("semseg"), n_train=4, n_val=2)


@pytest.fixture(scope="module")
def semseg_other(tmp_path_factory):
    return semseg_subset(tmp_path_factory.mktemp("semseg_other"), n_train=3, n_val=1)


def test_segment_train__every_option_reaches_what_it_sets(tmp_path, semseg, semseg_other):
    base = SegmentConfig(backbone="swin_test", data=str(semseg), output=str(tmp_path), num_classes=81, iters=7,
                         batch_size=2, num_workers=0, warmup_steps=2, blr=1.6e-2, drop_path=0.0, scale=(128, 64),
                         test_stride=43, crop_size=64, neck_channels=32, head_channels=16, aux_channels=8)  # fmt: skip
    pipeline = lambda attr: _transform_attr(attr, lambda b: b.train.pair_transform)  # noqa: E731
    recorded = lambda key: lambda b: b.model.model_args[key]  # noqa: E731 (what `segment eval` rebuilds from)
    table = {
        **_MACHINERY, **_RUN_CONTROL, **_optimisation(2), **_iteration_schedule(),
        "backbone": Reach("pvt_test", lambda b: b.model.model_name, "upernet_pvt_test"),
        "pretrained": "backbone weights loaded: tests/test_transfer.py",
        "data": Reach(str(semseg_other), lambda b: (len(b.train), len(b.val)), (3, 1)),
        "train_split": Reach("validation", lambda b: len(b.train), 2),
        "val_split": Reach("training", lambda b: len(b.val), 4),
        "num_classes": Reach(90, lambda b: (b.model.num_classes, b.model.decode_head.classifier.out_channels), (90, 90)),
        "reduce_zero_label": Reach(False, lambda b: (b.train.reduce_zero_label, b.val.reduce_zero_label, recorded("reduce_zero_label")(b)), (False,) * 3),
        "ignore_index": Reach(254, lambda b: (b.model.ignore_index, b.train.ignore_index, pipeline("ignore_index")(b)), (254,) * 3),
        "crop_size": Reach(128, lambda b: (pipeline("crop_size")(b), recorded("crop_size")(b)), (128, 128)),
        "scale": Reach((256, 128), lambda b: (pipeline("scale")(b), tuple(recorded("scale")(b))), ((256, 128),) * 2),
        "ratio_range": Reach((0.8, 1.2), pipeline("ratio_range")),
        "cat_max_ratio": Reach(0.5, pipeline("cat_max_ratio")),
        "flip_prob": Reach(0.2, pipeline("flip_prob")),
        "photometric": Reach(False, pipeline("photometric")),
        "drop_path": Reach(0.3, _drop_path),
        "window_size": Reach(4, lambda b: {m.window_size for m in b.model.modules() if type(m).__name__ == "SwinBlock"}, {4}),
        "neck_channels": Reach(24, lambda b: b.model.backbone.out_channels),
        "head_channels": Reach(12, lambda b: b.model.decode_head.fuse[0].out_channels),
        "aux_channels": Reach(4, lambda b: b.model.aux_head.conv[0].out_channels),
        "aux_weight": Reach(0.0, lambda b: (b.model.aux_weight, b.model.aux_head), (0.0, None)),
        "layer_decay": Reach(0.5, _layer_decay),
        "eval_every_iters": "the Trainer's Evaluation hook (cfg.eval_every_iters): tests/test_segment.py",
        "schedule": Reach("cosine", lambda b: b.schedule.kind),
        "test_mode": Reach("whole", recorded("test_mode")),
        "test_stride": Reach(21, recorded("test_stride")),
    }  # fmt: skip
    _walk(_training(SegmentTask), base, table)


# --- detection ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return coco_subset(tmp_path_factory.mktemp("coco"), n_train=3, n_val=2)


CASCADE = dict(detector="cascade_maskrcnn")


def test_detect_train__every_option_reaches_what_it_sets(tmp_path, coco):
    base = DetectConfig(backbone="swin_test", data=str(coco), output=str(tmp_path), epochs=1, batch_size=2,
                        num_workers=0, blr=1.6e-2, drop_path=0.0, warmup_steps=2, img_size=128, neck_channels=32,
                        fpn_channels=32)  # fmt: skip

    def jitter(attr: str):  # LargeScaleJitter / RangeResize: the training data's resize
        return _transform_attr(attr, lambda b: b.train.pair_transform)

    heads = lambda b: b.model.roi_heads  # noqa: E731
    table = {
        **_MACHINERY, **_RUN_CONTROL, **_optimisation(2), **_epochs(),
        "backbone": Reach("pvt_test", lambda b: type(b.model.backbone.body.encoder).__name__, "PyramidVisionTransformer"),
        "detector": Reach("retinanet", lambda b: b.model.spec.name),
        "box_head": Reach("4conv1fc", lambda b: len(heads(b).box_heads[0].convs), 4, also=CASCADE),
        "box_norm": Reach("gn", lambda b: {type(m).__name__ for m in heads(b).box_heads.modules()} >= {"GroupNorm"}, True,
                          also=dict(CASCADE, box_head="4conv1fc")),
        "fpn_norm": Reach("bn", lambda b: any(isinstance(m, torch.nn.BatchNorm2d) for m in b.model.backbone.fpn.modules()),
                          True, also=dict(detector="retinanet")),
        "test_score_thr": Reach(0.3, lambda b: b.model.score_thresh),
        "rpn_assign": Reach("mmdet", lambda b: type(b.model.rpn).__name__, "MMDetRPN", also=dict(detector="maskrcnn")),
        "box_reg": Reach("class", lambda b: (lambda h: h.reg.out_features == 4 * (h.cls.out_features - 1))(heads(b).box_heads[0]),
                         True, also=CASCADE),
        "box_loss": Reach("giou", lambda b: heads(b).box_loss_kind, also=CASCADE),
        "box_loss_weight": Reach(10.0, lambda b: heads(b).box_loss_weight, also=CASCADE),
        "test_nms": Reach("soft_linear", lambda b: heads(b).test_nms, also=CASCADE),
        "test_nms_iou": Reach(0.3, lambda b: heads(b).nms_thresh, also=CASCADE),
        "global_attn": Reach(True, lambda b: b.model.backbone.body.global_attn is not None, also=CASCADE),
        "schedule": Reach("step", lambda b: b.schedule.kind, also=dict(lr_steps=(1,))),
        "lr_steps": Reach((1,), lambda b: b.schedule.steps, (UPDATES_PER_EPOCH,), also=dict(schedule="step", lr_steps=(2,))),
        "warmup_ratio": Reach(0.01, lambda b: b.schedule.warmup_ratio, also=dict(schedule="step", lr_steps=(1,))),
        "stuff_maps": "HTC's semantic branch from COCO-stuff maps: tests/test_htc_semantic.py",
        "pretrained": "backbone weights loaded: tests/test_detect.py, tests/test_transfer.py",
        "data": "the COCO root read: every test of tests/test_detect.py (only one such root here)",
        "train_split": Reach("val2017", lambda b: len(b.train), 2),
        "val_split": Reach("train2017", lambda b: len(b.val), 3),
        "img_size": Reach(64, lambda b: (jitter("img_size")(b), b.model.transform.min_size[0]), (64, 64)),
        "scale_range": Reach((0.5, 1.5), jitter("scale_range")),
        "train_resize": Reach("range", lambda b: type(b.train.pair_transform).__name__, "RangeResize"),
        "short_range": Reach((50, 90), jitter("short_range"), also=dict(train_resize="range")),
        "flip_prob": Reach(0.2, jitter("flip_prob")),
        "drop_path": Reach(0.3, _drop_path),
        "window_size": Reach(4, lambda b: {m.window_size for m in b.model.modules() if type(m).__name__ == "SwinBlock"}, {4}),
        "neck_channels": Reach(24, lambda b: b.model.backbone.body.out_channels),
        "fpn_channels": Reach(16, lambda b: b.model.backbone.out_channels),
        "warmup_steps": Reach(5, lambda b: b.schedule.warmup_updates),
        "eval_every": Reach(3, lambda b: b.eval_every),
        "test_scales": "the evaluation's scales: tests/test_detect_tta.py::test_detect_train__evaluates_at_its_test_scales_and_flip",
        "test_flip": "the evaluation's flip: tests/test_detect_tta.py::test_detect_train__evaluates_at_its_test_scales_and_flip",
    }  # fmt: skip
    # --warmup-steps takes precedence over --warmup-epochs: seen with it off
    table["warmup_epochs"] = Reach(
        2, lambda b: b.schedule.warmup_updates, 2 * UPDATES_PER_EPOCH, also=dict(warmup_steps=None)
    )
    _walk(_training(DetectTask), base, table)


# --- inference commands ------------------------------------------------------------------------
# One function each runs them whole: their options are looked for in the arguments the command
# passes to the real functions it calls (wrapped to record them and call through) and in what
# those return (the loaded model, the dataset, the transform, the loader, the files written).
class Calls:
    """The calls of the functions ``wrap``ped (``module.name``, a class's method too): each
    call's ``args``, ``kwargs`` and ``result``, per name (in the run :func:`_command_run` made last)."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.of = monkeypatch, {}

    def wrap(self, owner, name: str) -> None:
        real = getattr(owner, name)

        def recording(*args, **kwargs):
            result = real(*args, **kwargs)
            self.of.setdefault(name, []).append(SimpleNamespace(args=args, kwargs=kwargs, result=result))
            return result

        self.monkeypatch.setattr(owner, name, recording)

    def last(self, name: str) -> SimpleNamespace:
        return self.of[name][-1]


def _command_run(run, calls: Calls) -> Callable[[Any], SimpleNamespace]:
    """``cfg ->`` the calls ``run(cfg)`` made (and its result)."""

    def build(cfg):
        calls.of = {}
        return SimpleNamespace(cfg=cfg, result=run(cfg), calls=calls)

    return build


def _files(folder) -> list[str]:
    """The files written in ``folder`` (none when the command wrote elsewhere)."""
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).is_dir() else []


def _fingerprint(state: dict) -> float:
    """A sum over a state dict's floating tensors: tells two sets of weights apart."""
    return round(float(sum(v.double().sum() for _, v in sorted(state.items()) if v.is_floating_point())), 6)


def _weights_of(loaded: str) -> Callable[[SimpleNamespace], float]:
    """The fingerprint of the model the call ``loaded`` returned."""
    return lambda b: _fingerprint(b.calls.last(loaded).result.state_dict())


def _saved_weights(cfg) -> float:
    """The fingerprint of ``cfg.checkpoint``'s weights."""
    return _fingerprint(ckpt.load(cfg.checkpoint)["model"])


def _loader_batch(b) -> int:
    return b.calls.last("shard_loader").result.batch_size


_INFERENCE_MACHINERY = {
    "precision": "fp32 on the CPU; the inference loop's autocast: tests/test_evaluation.py::test_inference_loop__eval_mode_no_grad_precision_and_the_mode_restored",
    "device": "the CPU here; the inference loop's device: tests/test_evaluation.py::test_inference_loop__eval_mode_no_grad_precision_and_the_mode_restored",
    "num_workers": "loader processes (slow to start here): the figures do not depend on them (tests/test_data_classify.py::test_build_eval_loader__shards_disjoint_and_cover)",
    "batch_size": Reach(2, _loader_batch),
}


def _classify_inference(other_colours) -> dict[str, Reach | str]:
    """ClassifyData's options in eval and kNN (base: ``small_colours``, 2 train / 1 val image
    per class; ``other_colours``: 1 / 2)."""
    dataset = lambda b: b.calls.of["build_classify_dataset"]  # noqa: E731 (eval: one call; kNN: train, val)
    transform_call = lambda b: b.calls.last("build_classify_transform")  # noqa: E731 (its args[0]: the model's input size)
    transform = lambda b: transform_call(b).result  # noqa: E731
    return {
        **_INFERENCE_MACHINERY,
        "model": "the checkpoint's (swin_test; another model refuses its weights): tests/test_cli_usability.py::test_knn__model_taken_from_a_pretraining_checkpoint",
        "data": Reach(str(other_colours), lambda b: len(dataset(b)[0].result), lambda c: 3 * (2 if c.what == "evaluation" else 1)),
        "data_root": Reach("/somewhere", lambda b: {c.args[3] for c in dataset(b)}, {"/somewhere"}),
        "img_size": Reach(128, lambda b: (transform_call(b).args[0], tuple(dataset(b)[-1].result[(0, 0)][0].shape)), (128, (3, 128, 128))),
        "crop_pct": Reach(0.5, _transform_attr("size", transform), 128),
    }  # fmt: skip


def _classify_calls(monkeypatch, module, *names: str) -> Calls:
    """Calls wrapping the data functions of ``module`` (eval's, kNN's) and ``names``."""
    calls = Calls(monkeypatch)
    for name in ("build_classify_dataset", "build_classify_transform", "shard_loader", *names):
        calls.wrap(module, name)
    return calls


@pytest.fixture(scope="module")
def other_colours(tmp_path_factory):
    return write_colour_dataset(tmp_path_factory.mktemp("other_colours"), train_per_class=1, val_per_class=2)


def _classifier_checkpoint(path, seed: int, ema_bias: float | None = None):
    """A swin_test classifier (3 classes) of seed ``seed``; with ``ema_bias``, EMA weights beside
    it whose head bias is that constant."""
    torch.manual_seed(seed)
    model = create_model("swin_test", num_classes=3, drop_path=0.0)
    state = {"model": model.state_dict(), "model_name": model.model_name, "model_args": model.model_args}
    if ema_bias is not None:
        state["ema"] = {**model.state_dict(), "head.bias": torch.full((3,), ema_bias)}
    ckpt.save_atomic(state, path)
    return str(path)


def test_eval__every_option_reaches_what_it_sets(tmp_path, monkeypatch, small_colours, other_colours):
    calls = _classify_calls(monkeypatch, classify, "load_classifier")
    model = lambda b: b.calls.last("load_classifier").result  # noqa: E731
    base = configs.EvalConfig(checkpoint=_classifier_checkpoint(tmp_path / "a.pth", 0, ema_bias=0.25), data=str(small_colours),
                              device="cpu", num_workers=0, batch_size=4)  # fmt: skip
    _walk(_command_run(classify.run_eval, calls), base, {
        **_classify_inference(other_colours),
        "val_data": Reach(str(other_colours / "val"), lambda b: b.result["val_images"], 6),
        "checkpoint": Reach(_classifier_checkpoint(tmp_path / "b.pth", 1), _weights_of("load_classifier"), _saved_weights),
        "split": Reach("train", lambda b: b.result["val_images"], 6),
        "ema": Reach(True, lambda b: model(b).head.bias.tolist(), [0.25] * 3),
    })  # fmt: skip


def test_knn__every_option_reaches_what_it_sets(
    tmp_path, monkeypatch, small_colours, other_colours, pretrain_ckpt, save_checkpoint
):
    calls = _classify_calls(monkeypatch, knn, "load_pretrained", "KnnEvaluator")
    torch.manual_seed(2)
    other = str(save_checkpoint(create_model("mae_swin_test"), tmp_path / "other.pth"))
    evaluator = lambda b: b.calls.last("KnnEvaluator").result  # noqa: E731
    base = configs.KnnConfig(pretrained=str(pretrain_ckpt("mae_swin_test")), data=str(small_colours),
                             device="cpu", num_workers=0, batch_size=4)  # fmt: skip
    _walk(_command_run(knn.run_knn, calls), base, {
        **_classify_inference(other_colours),
        "val_data": Reach(str(other_colours / "val"), lambda b: b.result["val_images"], 6),
        "pretrained": Reach(other, lambda b: b.calls.last("load_pretrained").args[1]),
        "label_fraction": Reach(0.5, lambda b: b.result["train_images"], 3),  # the bank: 1 of each class's 2
        "label_seed": "which images of the bank: the draw fine-tuning takes too (take_label_subset), "
        "tests/test_fewlabel.py::test_subset__other_seeds_draw_other_images",
        "k": Reach(3, lambda b: evaluator(b).k),
        "temperature": Reach(0.5, lambda b: evaluator(b).temperature),
    })  # fmt: skip


@pytest.fixture(scope="module")
def coco_other(tmp_path_factory):
    return coco_subset(tmp_path_factory.mktemp("coco_other"), n_train=1, n_val=1)


def _trained_like(task_cls, cfg, path, seed: int, save) -> str:
    """A checkpoint of the model ``cfg`` builds (seed ``seed``), in the Trainer's format."""
    torch.manual_seed(seed)
    return str(save(_built(task_cls(), cfg).model, path))


def test_detect_eval__every_option_reaches_what_it_sets(tmp_path, monkeypatch, coco, coco_other, save_checkpoint):
    calls = Calls(monkeypatch)
    for name in ("load_detector", "CocoDetection", "shard_loader", "evaluate_coco"):
        calls.wrap(detect, name)
    test = lambda b: b.calls.last("evaluate_coco").kwargs["test"]  # noqa: E731 (the multi-scale + flip test)
    train = DetectConfig(backbone="swin_test", data=str(coco), output=str(tmp_path), img_size=64, neck_channels=16,
                         fpn_channels=16)  # fmt: skip
    ckpts = [_trained_like(DetectTask, train, tmp_path / f"{i}.pth", i, save_checkpoint) for i in (0, 1)]
    base = configs.DetectEvalConfig(checkpoint=ckpts[0], data=str(coco), output=str(tmp_path / "eval"), device="cpu",
                                    num_workers=0)  # fmt: skip
    _walk(_command_run(detect.run_eval, calls), base, {
        **_INFERENCE_MACHINERY,
        "batch_size": Reach(1, _loader_batch),
        "checkpoint": Reach(ckpts[1], _weights_of("load_detector"), _saved_weights),
        "data": Reach(str(coco_other), lambda b: len(b.calls.last("CocoDetection").result), 1),
        "split": Reach("train2017", lambda b: len(b.calls.last("CocoDetection").result), 3),
        "output": Reach(str(tmp_path / "elsewhere"), lambda b: _files(tmp_path / "elsewhere"), ["detections_val2017.json", "metrics_val2017.json"]),
        "test_scales": Reach(("96x64",), lambda b: test(b).scales, ((96, 64),)),
        "test_flip": Reach(True, lambda b: test(b).flip),
    })  # fmt: skip


def test_segment_eval__every_option_reaches_what_it_sets(tmp_path, monkeypatch, semseg, semseg_other, save_checkpoint):
    calls = Calls(monkeypatch)
    for name in ("load_segmenter", "SegmentationFolder", "shard_loader"):
        calls.wrap(segment, name)
    calls.wrap(SegmenterInference, "predict_probs")  # where the test settings are used, per image
    train = SegmentConfig(backbone="swin_test", data=str(semseg), output=str(tmp_path), num_classes=81, scale=(128, 64),
                          crop_size=64, test_stride=43, neck_channels=16, head_channels=8, aux_channels=8)  # fmt: skip
    ckpts = [_trained_like(SegmentTask, train, tmp_path / f"{i}.pth", i, save_checkpoint) for i in (0, 1)]
    setting = lambda key: lambda b: {c.kwargs[key] for c in b.calls.of["predict_probs"]}  # noqa: E731 (every image's)
    base = configs.SegmentEvalConfig(checkpoint=ckpts[0], data=str(semseg), output=str(tmp_path / "eval"), device="cpu",
                                     num_workers=0)  # fmt: skip
    _walk(_command_run(segment.run_eval, calls), base, {
        **_INFERENCE_MACHINERY,
        "checkpoint": Reach(ckpts[1], _weights_of("load_segmenter"), _saved_weights),
        "data": Reach(str(semseg_other), lambda b: len(b.calls.last("SegmentationFolder").result), 1),
        "split": Reach("training", lambda b: len(b.calls.last("SegmentationFolder").result), 4),
        "output": Reach(str(tmp_path / "elsewhere"), lambda b: _files(tmp_path / "elsewhere"), ["metrics_validation.json", "per_class_validation.txt"]),
        "test_mode": Reach("whole", setting("mode"), {"whole"}),
        "test_stride": Reach(21, setting("stride"), {21}),
        "scale": Reach((96, 48), setting("scale"), {(96, 48)}),
        "ratios": Reach((0.5, 1.0), setting("ratios"), {(0.5, 1.0)}),
        "flip": Reach(True, setting("flip"), {True}),
    })  # fmt: skip


INFERENCE = ("eval", "knn", "detect eval", "segment eval")  # walked above, each in its own test


def test_every_command_with_a_config_is_walked():
    """The commands with a config are the ones walked in this file (a new one: walk it)."""
    assert sorted(c for c, spec in COMMANDS.items() if spec.config) == sorted(
        {"pretrain", "finetune", "linprobe", "segment train", "detect train", *INFERENCE}
    )


def test_knn__k_reaches_the_vote(tmp_path, pretrain_ckpt):
    """Training images 6 blue, 2 green, 2 red; near-uniform weights (T = 100): k = 1 takes the
    nearest image's class (the colours separate: every val image right), k = 10 the majority of
    all ten (blue: one val image in three right)."""
    from _helpers import write_colour_images
    from ummae.tasks.knn import run_knn

    root = tmp_path / "data"
    write_colour_images(root / "train", 2)
    write_colour_images(tmp_path / "more", 4, seed=7)
    for i, path in enumerate(sorted((tmp_path / "more" / "blue").iterdir())):
        path.rename(root / "train" / "blue" / f"more_{i}.png")
    write_colour_images(root / "val", 2, seed=1000)
    cfg = configs.KnnConfig(pretrained=str(pretrain_ckpt("mae_swin_test")), data=str(root), device="cpu", num_workers=0,
                    batch_size=4, temperature=100.0)  # fmt: skip
    accuracy = {k: run_knn(dataclasses.replace(cfg, k=k))["knn_acc1"] for k in (1, 10)}
    assert accuracy == pytest.approx({1: 100.0, 10: 100 / 3})
