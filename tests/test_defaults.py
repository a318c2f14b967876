"""Every documented default, pinned: each command's options (every field of the config of every
command of ``ummae.cli.COMMANDS``) and the model builders' keyword defaults the docs state,
against tables written out here. A changed default fails here until the table is changed too;
the docs' defaults tables (``tools/gen_docs.py``, block ``defaults``) print the same values with
the source each field declares (``option(..., source=...)``), so code, test and docs move
together. A command, or a field, missing from the tables fails too.
"""

from __future__ import annotations

import inspect

import pytest

from ummae.cli import COMMANDS

MODEL = "the model's default (None: the builder's, pinned in BUILDERS below)"

# Shared by every command that runs: where and how (ours unless said).
_MACHINERY = dict(precision="auto", device="auto", num_workers=8)
# Shared by every training run (RunConfig, IterationRunConfig): run control, MAE's where it has one.
_RUN_CONTROL = dict(
    seed=0, save_every=1, keep_every=20, save_every_steps=0, resume=None, overwrite=False, log_every=20,
    max_steps_per_epoch=None, compile=False, compile_backend="inductor",
)  # fmt: skip
_OPTIMISATION = dict(accum_iter=1, lr=None, min_lr=0.0, weight_decay=0.05, clip_grad=None)
_CLASSIFY_DATA = dict(model=None, data=None, val_data=None, data_root=None, img_size=None, crop_pct=None)

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
        **_MACHINERY, **_RUN_CONTROL, **_OPTIMISATION, **_CLASSIFY_DATA,
        "output": "runs/finetune", "epochs": 100, "warmup_epochs": 5, "batch_size": 128, "blr": 5e-4,
        "min_lr": 1e-6, "pretrained": None, "num_classes": None, "samples_per_epoch": None,
        "drop_path": None, "window_size": None, "layer_decay": None,  # the model's (FAMILY_FINETUNE)
        "betas": (0.9, 0.999), "smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5, "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "ema": False,
        "ema_decay": 0.9999, "eval_every": 1,
    },
    "linprobe": {
        **_MACHINERY, **_RUN_CONTROL, **_OPTIMISATION, **_CLASSIFY_DATA,
        "output": "runs/linprobe", "epochs": 90, "warmup_epochs": 10, "batch_size": 256, "blr": 0.1,
        "weight_decay": 0.0, "pretrained": None, "eval_every": 1,
    },
    "eval": {
        **_MACHINERY, **_CLASSIFY_DATA, "batch_size": 128, "checkpoint": None, "split": "val", "ema": False,
    },
    "knn": {
        **_MACHINERY, **_CLASSIFY_DATA, "batch_size": 128, "pretrained": None, "k": 20, "temperature": 0.07,
    },
    "detect train": {
        **_MACHINERY, **_RUN_CONTROL, **_OPTIMISATION,
        "num_workers": 4, "log_every": 50, "keep_every": 5,
        "output": "runs/detect", "backbone": "swin_tiny_256", "detector": "gfl",
        "box_head": "2fc", "box_norm": "none", "soft_nms": False, "stuff_maps": None,
        "pretrained": None, "data": None, "train_split": "train2017", "val_split": "val2017",
        "img_size": 1024, "scale_range": (0.1, 2.0), "train_resize": "lsj", "short_range": (400, 1400),
        "flip_prob": 0.5, "drop_path": 0.1, "window_size": None, "neck_channels": 768, "fpn_channels": 256,
        "epochs": 25, "warmup_epochs": 0, "warmup_steps": 2000, "batch_size": 2, "blr": 1.6e-3,
        "min_lr": 1e-6, "betas": (0.9, 0.999), "eval_every": 1,
    },
    "detect eval": {
        **_MACHINERY, "num_workers": 4, "checkpoint": None, "data": None, "split": "val2017",
        "output": "runs/detect_eval", "batch_size": 2,
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


def _builders():
    # imported here: the models load torch, which the config tables above do not need
    from ummae.models.classifier import Classifier
    from ummae.models.dense import build_stage_maps
    from ummae.models.detectors import Detector
    from ummae.models.mae import MaskedAutoencoder
    from ummae.models.upernet import FCNHead, Segmenter, UperHead, upernet

    return {
        "MaskedAutoencoder": MaskedAutoencoder.__init__,
        "UperHead": UperHead.__init__,
        "FCNHead": FCNHead.__init__,
        "Segmenter": Segmenter.__init__,
        "upernet": upernet,
        "Detector": Detector.__init__,
        "build_stage_maps": build_stage_maps,
        "Classifier": Classifier.__init__,
    }


# builder -> keyword -> (default, source)
BUILDERS: dict[str, dict[str, tuple[object, str]]] = {
    "MaskedAutoencoder": {
        "unit_size": (16, "UM-MAE: 16 px mask units"),
        "sampling": ("uniform", "UM-MAE: Uniform Sampling"),
        "mask_ratio": (0.75, "MAE main_pretrain.py --mask_ratio 0.75"),
        "sm_ratio": (0.25, "UM-MAE main_pretrain.py --vis_mask_ratio 0.25"),
        "norm_pix_loss": (True, "UM-MAE pre-training scripts: --norm_pix_loss"),
        "decoder_pos": ("true", "ours: each visible token at its own unit (docs: differences)"),
        "decoder_dim": (512, "UM-MAE: decoder 512d2b"),
        "decoder_depth": (2, "UM-MAE: decoder 512d2b"),
        "decoder_heads": (16, "MAE: decoder_num_heads 16"),
    },
    "UperHead": {
        "pool_scales": ((1, 2, 3, 6), "MMSegmentation UPerHead pool_scales (1, 2, 3, 6)"),
        "dropout": (0.1, "MMSegmentation decode_head dropout_ratio 0.1"),
    },
    "FCNHead": {"dropout": (0.1, "MMSegmentation auxiliary_head dropout_ratio 0.1")},
    "Segmenter": {
        "head_channels": (768, "UM-MAE upernet config: decode_head channels 768"),
        "aux_channels": (256, "MMSegmentation auxiliary_head channels 256"),
        "aux_weight": (0.4, "MMSegmentation auxiliary_head loss_weight 0.4"),
        "ignore_index": (255, "MMSegmentation ignore_index 255"),
    },
    "upernet": {
        "crop_size": (512, "UM-MAE upernet config: crop_size 512"),
        "neck_channels": (768, "UM-MAE SEG backbones: fpn1..4 at 768"),
        "head_channels": (768, "UM-MAE upernet config: decode_head channels 768"),
        "aux_channels": (256, "MMSegmentation auxiliary_head channels 256"),
        "aux_weight": (0.4, "MMSegmentation auxiliary_head loss_weight 0.4"),
        "ignore_index": (255, "MMSegmentation ignore_index 255"),
        "drop_path": (None, "the backbone's"),
        "window_size": (None, "the backbone's"),
        "neck": ("conv", "UM-MAE SEG backbones: a 1x1 convolution per stage"),
        "pos_embed_mode": ("resize", "UM-MAE SEG/pvt.py: the table resized once"),
    },
    "Detector": {
        "img_size": (1024, "UM-MAE gfl config: 1024x1024"),
        "neck_channels": (768, "UM-MAE DET backbones: LayerNorm + Linear to 768"),
        "fpn_channels": (256, "MMDetection FPN out_channels 256"),
        "drop_path": (None, "the backbone's"),
        "window_size": (None, "the backbone's"),
        "neck": ("ln_linear", "UM-MAE DET backbones: LayerNorm + Linear"),
        "pos_embed_mode": ("interpolate", "UM-MAE DET/pvt.py: interpolated on every forward"),
    },
    "build_stage_maps": {
        "out_channels": (768, "UM-MAE transfer: 768-channel stage maps"),
        "drop_path": (None, "the backbone's"),
        "window_size": (None, "the backbone's"),
        "stages": ((0, 1, 2, 3), "all four stages"),
        "neck": ("ln_linear", "UM-MAE DET backbones"),
        "pos_embed_mode": ("resize", "UM-MAE SEG/pvt.py"),
    },
    "Classifier": {
        "num_classes": (1000, "ImageNet-1K"),
        "img_size": (256, "UM-MAE fine-tuning: 256 px"),
        "drop_rate": (0.0, "timm's head dropout 0"),
        "layer_decay": (0.75, "MAE main_finetune.py --layer_decay 0.75"),
    },
}

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
    params = inspect.signature(_builders()[builder]).parameters
    actual = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    table = {n: v for n, (v, _source) in BUILDERS[builder].items()}
    assert set(actual) == set(table), "keywords with a default the table does not pin, or the reverse"
    actual = {n: tuple(v) if isinstance(v, list) else v for n, v in actual.items()}
    assert actual == table


def test_defaults__the_families_fine_tuning_defaults():
    from ummae.models.family import families

    assert {name: dict(f.finetune) for name, f in families().items()} == FAMILY_FINETUNE
