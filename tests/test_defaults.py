"""Every documented default, pinned: each command's options (every field of the config of every
command of ``ummae.cli.COMMANDS``) and the model builders' keyword defaults the docs state,
against tables written out here. A changed default fails here until the table is changed too;
the docs' defaults tables (``tools/gen_docs.py``, block ``defaults``) print the same values with
the source each field declares (``option(..., source=...)``), so code, test and docs move
together. A command, or a field, missing from the tables fails too.
"""

from __future__ import annotations

import pytest

from ummae.cli import COMMANDS

# Shared by every command that runs: where and how (ours unless said).
_MACHINERY = dict(precision="auto", device="auto", num_workers=8)
# Shared by every training run (RunConfig, IterationRunConfig): run control, MAE's where it has one.
_RUN_CONTROL = dict(
    seed=0, save_every=1, keep_every=20, save_every_steps=0, resume=None, overwrite=False, log_every=20,
    max_steps_per_epoch=None, compile=False, compile_backend="inductor",
)  # fmt: skip
_OPTIMISATION = dict(accum_iter=1, lr=None, min_lr=0.0, weight_decay=0.05, clip_grad=None)
_DETECT_TEST = dict(test_scales=None, test_flip=False)  # one test at the img_size canvas (the plain test)
_CLASSIFY_DATA = dict(model=None, data=None, val_data=None, data_root=None, img_size=None, crop_pct=None)
_FEW_LABELS = dict(label_fraction=None, label_seed=0)  # every label (finetune, linprobe, knn)

# command -> option -> its default
DEFAULTS: dict[str, dict[str, object]] = {
    "pretrain": {
        **_MACHINERY, **_RUN_CONTROL, **_OPTIMISATION,
        "output": "runs/pretrain", "epochs": 200, "warmup_epochs": 10, "batch_size": 128, "blr": 1.5e-4,
        "model": "mae_swin_tiny_256", "data": None, "data_root": None, "init": None,
        # None: the model's own (BUILDERS["MaskedAutoencoder"])
        "img_size": None, "unit_size": None, "sampling": None, "mask_ratio": None, "sm_ratio": None,
        "norm_pix_loss": None, "decoder_pos": None, "drop_path": None,
        "betas": (0.9, 0.95), "crop_scale": (0.2, 1.0), "samples_per_epoch": None, "input_pipeline": "tensor",
        "demo_repeats": 8, "vis_every": 20, "vis_images": 8,
    },
    "finetune": {
        **_MACHINERY, **_RUN_CONTROL, **_OPTIMISATION, **_CLASSIFY_DATA, **_FEW_LABELS,
        "output": "runs/finetune", "epochs": 100, "warmup_epochs": 5, "batch_size": 128, "blr": 5e-4,
        "min_lr": 1e-6, "pretrained": None, "num_classes": None, "samples_per_epoch": None,
        "drop_path": None, "window_size": None, "layer_decay": None,  # the model's (FAMILY_FINETUNE)
        "betas": (0.9, 0.999), "smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5, "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "ema": False,
        "ema_decay": 0.9999, "eval_every": 1,
    },
    "linprobe": {
        **_MACHINERY, **_RUN_CONTROL, **_OPTIMISATION, **_CLASSIFY_DATA, **_FEW_LABELS,
        "output": "runs/linprobe", "epochs": 90, "warmup_epochs": 10, "batch_size": 256, "blr": 0.1,
        "weight_decay": 0.0, "pretrained": None, "eval_every": 1,
    },
    "eval": {
        **_MACHINERY, **_CLASSIFY_DATA, "batch_size": 128, "checkpoint": None, "split": "val", "ema": False,
    },
    "knn": {
        **_MACHINERY, **_CLASSIFY_DATA, **_FEW_LABELS, "batch_size": 128, "pretrained": None, "k": 20, "temperature": 0.07,
    },
    "detect train": {
        **_MACHINERY, **_RUN_CONTROL, **_OPTIMISATION,
        "num_workers": 4, "log_every": 50, "keep_every": 5,
        "output": "runs/detect", "backbone": "swin_tiny_256", "detector": "gfl",
        "fpn_norm": None, "test_score_thr": None, "rpn_assign": None,  # None: the detector's (its spec)
        "box_head": "2fc", "box_norm": "none", "box_reg": "agnostic", "box_loss": "smooth_l1", "box_loss_weight": 1.0,
        "test_nms": "nms", "test_nms_iou": 0.5, "global_attn": False, "stuff_maps": None,
        "pretrained": None, "data": None, "train_split": "train2017", "val_split": "val2017",
        "img_size": 1024, "scale_range": (0.1, 2.0), "train_resize": "lsj", "short_range": (400, 1400),
        "flip_prob": 0.5, "drop_path": 0.1, "window_size": None, "neck_channels": 768, "fpn_channels": 256,
        "epochs": 25, "warmup_epochs": 0, "warmup_steps": 2000, "schedule": "cosine", "lr_steps": None,
        "warmup_ratio": 0.001, "batch_size": 2, "blr": 1.6e-3, "min_lr": 1e-6, "betas": (0.9, 0.999), "eval_every": 1,
        **_DETECT_TEST,
    },
    "detect eval": {
        **_MACHINERY, "num_workers": 4, "checkpoint": None, "data": None, "split": "val2017",
        "output": "runs/detect_eval", "batch_size": 2, **_DETECT_TEST,
    },
    "segment train": {
        **_MACHINERY, **_RUN_CONTROL, **_OPTIMISATION,
        "num_workers": 4, "log_every": 50, "keep_every": 0,
        "output": "runs/segment", "backbone": "swin_tiny_256", "pretrained": None, "data": None,
        "train_split": "training", "val_split": "validation", "num_classes": 150, "reduce_zero_label": True,
        "ignore_index": 255, "crop_size": 512, "scale": (2048, 512), "ratio_range": (0.5, 2.0),
        "cat_max_ratio": 0.75, "flip_prob": 0.5, "photometric": True, "drop_path": 0.1, "window_size": None,
        "neck_channels": 768, "head_channels": 768, "aux_channels": 256, "aux_weight": 0.4, "layer_decay": 1.0,
        "iters": 160000, "eval_every_iters": 16000, "schedule": "poly", "warmup_steps": 1500, "batch_size": 2,
        "blr": 1.6e-3, "min_lr": 0.0, "betas": (0.9, 0.999), "test_mode": "slide", "test_stride": None,
    },
    "segment eval": {
        **_MACHINERY, "num_workers": 4, "checkpoint": None, "data": None, "split": "validation",
        "output": "runs/segment_eval", "test_mode": None, "test_stride": None, "scale": None, "ratios": (1.0,),
        "flip": False, "batch_size": 1,
    },
}  # fmt: skip


# builder (ummae.models.defaults.SOURCES: "module:attribute") -> keyword -> its default
BUILDERS: dict[str, dict[str, object]] = {
    "ummae.models.mae:MaskedAutoencoder": {
        "unit_size": 16, "sampling": "uniform", "mask_ratio": 0.75, "sm_ratio": 0.25, "norm_pix_loss": True,
        "decoder_pos": "true", "decoder_dim": 512, "decoder_depth": 2, "decoder_heads": 16,
    },
    "ummae.models.classifier:Classifier": {"num_classes": 1000, "img_size": 256, "drop_rate": 0.0, "layer_decay": 0.75},
    "ummae.models.dense:build_stage_maps": {
        "out_channels": 768, "drop_path": None, "window_size": None, "stages": (0, 1, 2, 3), "neck": "ln_linear",
        "pos_embed_mode": "resize", "global_attn": False,
    },
    "ummae.models.upernet:upernet": {
        "crop_size": 512, "neck_channels": 768, "head_channels": 768, "aux_channels": 256, "aux_weight": 0.4,
        "ignore_index": 255, "drop_path": None, "window_size": None, "neck": "conv", "pos_embed_mode": "resize",
    },
    "ummae.models.upernet:Segmenter": {"head_channels": 768, "aux_channels": 256, "aux_weight": 0.4, "ignore_index": 255},
    "ummae.models.upernet:UperHead": {"pool_scales": (1, 2, 3, 6), "dropout": 0.1},
    "ummae.models.upernet:FCNHead": {"dropout": 0.1},
    "ummae.models.detectors:Detector": {
        "img_size": 1024, "neck_channels": 768, "fpn_channels": 256, "drop_path": None, "window_size": None,
        "neck": "ln_linear", "pos_embed_mode": "interpolate",
    },
}  # fmt: skip

# family -> the classifier's fine-tuning defaults (drop_path, layer_decay), the reference's recipes
FAMILY_FINETUNE = {
    "swin": {"drop_path": 0.1, "layer_decay": 0.85},  # UM-MAE Swin-T fine-tuning
    "pvt": {"drop_path": 0.1, "layer_decay": 0.85},  # UM-MAE PVT-S fine-tuning
    "vit": {"drop_path": 0.1, "layer_decay": 0.75},  # MAE main_finetune.py defaults
}


def _configs():
    return {name: c.config for name, c in COMMANDS.items() if c.config is not None}


def test_defaults__the_table_names_every_command_with_a_config():
    assert set(DEFAULTS) == set(_configs())


@pytest.mark.parametrize("command", sorted(_configs()))
def test_defaults__every_option_of_the_command_as_the_table_says(command):
    cls = _configs()[command]
    actual = {f.name: f.default for f in cls.options()}
    table = DEFAULTS[command]
    assert sorted(set(actual) - set(table)) == [], "options the table does not pin (add them with their value)"
    assert sorted(set(table) - set(actual)) == [], "pinned options the config does not have"
    differ = {name: (actual[name], table[name]) for name in table if actual[name] != table[name]}
    assert differ == {}, "defaults that differ from the table: option: (code, table)"
    # a float default is not an int in disguise, nor the reverse (1 != 1.0 in a config.yaml)
    kinds = {
        name: (type(actual[name]), type(table[name])) for name in table if type(actual[name]) is not type(table[name])
    }
    assert kinds == {}


@pytest.mark.parametrize("command", sorted(_configs()))
def test_defaults__every_option_states_its_source(command):
    """The docs' tables print it: an option without one would print an empty cell."""
    missing = [f.name for f in _configs()[command].options() if not f.metadata.get("source", "").strip()]
    assert missing == []


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_defaults__the_builders_keyword_defaults(builder):
    """The values against the table; every keyword default has its source (the docs print it)."""
    from ummae.models.defaults import SOURCES, keyword_defaults  # torch: the builders' modules load it

    actual = {n: tuple(v) if isinstance(v, list) else v for n, v in keyword_defaults(builder).items()}
    assert sorted(set(actual) ^ set(BUILDERS[builder])) == [], "keyword defaults the table does not pin, or the reverse"
    assert actual == BUILDERS[builder]
    assert sorted(set(actual) ^ set(SOURCES[builder])) == [], "keyword defaults without a source, or the reverse"


def test_defaults__the_table_names_every_builder_that_states_its_sources():
    from ummae.models.defaults import SOURCES

    assert set(BUILDERS) == set(SOURCES)


def test_defaults__the_families_fine_tuning_defaults():
    from ummae.models.family import families

    assert {name: dict(f.finetune) for name, f in families().items()} == FAMILY_FINETUNE
