"""The named recipes (``--config NAME``, ``ummae recipes``) against the reference's own runs.

Every value is written out below with where the reference states it: its ``Makefile``
(implus/UM-MAE at 456329a6dc23d858ce3b47e1efd8957f3c8bd137, which PRETRAIN.md and FINETUNE.md
point to), ``main_finetune.py``'s argparse defaults (the values the Makefile leaves as they
are), and its MMDetection / MMSegmentation configs. Each reference run is 8 GPUs
(``--nproc_per_node=8``, ``dist_train.sh ... 8``): total batch = per-GPU batch x accum x 8.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from ummae.cli import _parser, main
from ummae.config import (
    DetectConfig,
    FinetuneConfig,
    LinprobeConfig,
    PretrainConfig,
    SegmentConfig,
    config_from_args,
    resolve,
)
from ummae.config.recipes import RECIPES, markdown_table, sources_markdown, split_batch
from ummae.errors import UsageError

MK = "Makefile"
FT_DEFAULT = "main_finetune.py argparse default"


def _pretrain(target, model, input_size, per_gpu, accum, epochs, warmup, method):
    """A `main_pretrain.py` row of the Makefile, option by option (our option: (value, where))."""
    rows = {
        "model": (model, f"{MK} {target}: --model"),
        # --input_size 256 for Swin / PVT; ViT: main_pretrain.py's default 224 (--token_size 14 = 224 / 16)
        "img_size": (input_size, f"{MK} {target}: --input_size / --token_size"),
        "mask_ratio": (0.75, f"{MK} {target}: --mask_ratio 0.75"),
        "epochs": (epochs, f"{MK} {target}: --epochs"),
        "warmup_epochs": (warmup, f"{MK} {target}: --warmup_epochs"),
        "blr": (1.5e-4, f"{MK} {target}: --blr 1.5e-4"),
        "weight_decay": (0.05, f"{MK} {target}: --weight_decay 0.05"),
    }
    if method == "ummae":
        rows["sampling"] = ("uniform", f"{MK} {target}: --mask_regular")
        rows["sm_ratio"] = (0.25, f"{MK} {target}: --vis_mask_ratio 0.25")
        rows["norm_pix_loss"] = (True, f"{MK} {target}: --norm_pix_loss")
    elif method == "mae":
        rows["sampling"] = ("random", f"{MK} {target}: no --mask_regular (MAE's random sampling)")
        rows["sm_ratio"] = (0.0, f"{MK} {target}: no --vis_mask_ratio")
        rows["norm_pix_loss"] = (True, f"{MK} {target}: --norm_pix_loss")
    return rows, per_gpu * accum * 8, per_gpu


def _finetune(target, model, input_size, per_gpu, accum, layer_decay, drop_path):
    rows = {
        "model": (model, f"{MK} {target}: --model"),
        "img_size": (input_size, f"{MK} {target}: --input_size (ViT: main_finetune.py's default 224)"),
        "epochs": (100, f"{MK} {target}: --epochs 100"),
        "blr": (5e-4, f"{MK} {target}: --blr 5e-4"),
        "layer_decay": (layer_decay, f"{MK} {target}: --layer_decay"),
        "weight_decay": (0.05, f"{MK} {target}: --weight_decay 0.05"),
        "drop_path": (drop_path, f"{MK} {target}: --drop_path"),
        "reprob": (0.25, f"{MK} {target}: --reprob 0.25"),
        "mixup": (0.8, f"{MK} {target}: --mixup 0.8"),
        "cutmix": (1.0, f"{MK} {target}: --cutmix 1.0"),
        "warmup_epochs": (5, f"{FT_DEFAULT} --warmup_epochs 5"),
        "min_lr": (1e-6, f"{FT_DEFAULT} --min_lr 1e-6"),
        "smoothing": (0.1, f"{FT_DEFAULT} --smoothing 0.1"),
        "auto_augment": ("rand-m9-mstd0.5-inc1", f"{FT_DEFAULT} --aa"),
        "mixup_prob": (1.0, f"{FT_DEFAULT} --mixup_prob 1.0"),
        "mixup_switch_prob": (0.5, f"{FT_DEFAULT} --mixup_switch_prob 0.5"),
    }
    return rows, per_gpu * accum * 8, per_gpu


def _linprobe(model, input_size):
    """MAE's main_linprobe.py: its defaults, at the total batch its README gives (16384)."""
    lp = "MAE main_linprobe.py argparse default"
    rows = {
        "model": (model, "the family's classifier at its fine-tuning input size"),
        "img_size": (input_size, "the fine-tuning input size (MAE: 224)"),
        "epochs": (90, f"{lp} --epochs 90"),
        "warmup_epochs": (10, f"{lp} --warmup_epochs 10"),
        "blr": (0.1, f"{lp} --blr 0.1"),
        "min_lr": (0.0, f"{lp} --min_lr 0"),
        "weight_decay": (0.0, f"{lp} --weight_decay 0"),
    }
    return rows, 16384, 512  # MAE LINPROBE.md: 512 per GPU x 32 GPUs


def _gfl(backbone, config):
    c = f"DET/configs/gfl/{config}"
    rows = {
        "backbone": (backbone, f"{c}: model.pretrained = finetune_mae_{backbone}_..._checkpoint-99.pth"),
        "detector": ("gfl", f"{c}: model.type='GFL'"),
        "img_size": (1024, f"{c}: size = 1024 (Resize img_scale, RandomCrop crop_size, Pad size)"),
        "scale_range": ((0.1, 2.0), f"{c}: Resize ratio_range=(0.1, 2.0)"),
        "flip_prob": (0.5, f"{c}: RandomFlip flip_ratio=0.5"),
        "drop_path": (0.1, f"{c}: backbone drop_path_rate=0.1"),
        "neck_channels": (768, f"{c}: neck in_channels=[768, 768, 768, 768]"),
        "fpn_channels": (256, f"{c}: neck out_channels=256"),
        "epochs": (25, f"{c}: runner max_epochs=25"),
        "warmup_steps": (2000, f"{c}: lr_config warmup_iters=2000"),
        # lr=0.0001 at 2 per GPU x 8 GPUs (_base_/datasets/coco_detection.py samples_per_gpu=2)
        "blr": (0.0001 * 256 / 16, f"{c}: optimizer lr=0.0001 at total batch 16"),
        "min_lr": (0.0001 * 0.01, f"{c}: lr_config min_lr_ratio=0.01"),
        "weight_decay": (0.05, f"{c}: optimizer weight_decay=0.05"),
        "keep_every": (5, f"{c}: checkpoint_config interval=5"),
    }
    return rows, 2 * 8, 2


def _upernet(backbone, config):
    c = f"SEG/configs/upernet/{config}"
    rows = {
        "backbone": (backbone, f"{c}: model.pretrained = finetune_mae_{backbone}_..._checkpoint-99.pth"),
        "num_classes": (150, f"{c}: decode_head num_classes=150"),
        "crop_size": (512, f"{c}: crop_size = (512, 512)"),
        "scale": ((2048, 512), "_base_/datasets/ade20k.py: img_scale=(2048, 512)"),
        "ratio_range": ((0.5, 2.0), "_base_/datasets/ade20k.py: ratio_range=(0.5, 2.0)"),
        "drop_path": (0.1, f"{c}: backbone drop_path_rate=0.1"),
        "neck_channels": (768, f"{c}: backbone fpn_out_dim=768"),
        "head_channels": (768, f"{c}: decode_head channels=768"),
        "aux_weight": (0.4, "_base_/models/upernet_beit.py: auxiliary_head loss_weight=0.4"),
        "layer_decay": (1.0, f"{c}: paramwise_cfg layer_decay_rate=1."),
        "iters": (160000, "_base_/schedules/schedule_160k.py: max_iters=160000"),
        "eval_every_iters": (16000, "_base_/schedules/schedule_160k.py: evaluation interval=16000"),
        "schedule": ("poly", f"{c}: lr_config policy='poly', power=1.0"),
        "warmup_steps": (1500, f"{c}: lr_config warmup_iters=1500"),
        "blr": (1e-4 * 256 / 16, f"{c}: optimizer lr=1e-4 at samples_per_gpu=2 x 8 GPUs"),
        "min_lr": (0.0, f"{c}: lr_config min_lr=0.0"),
        "weight_decay": (0.05, f"{c}: optimizer weight_decay=0.05"),
        "test_mode": ("slide", f"{c}: test_cfg mode='slide'"),
        "test_stride": (341, f"{c}: test_cfg stride=(341, 341)"),
    }
    return rows, 2 * 8, 2


def _htcpp():
    """HTC++ (Swin paper, appendix A2.2), the detector of the paper's Swin-L COCO figure: no
    reference config exists (UM-MAE's is private, implus/UM-MAE issue 4), so each value is
    written out with the pieces its source must name: the paper's section and words, or a
    public config file and its key (Swin's Cascade Mask R-CNN configs, CBNetV2's Swin HTC
    configs, MMDetection's schedule_1x that they inherit)."""
    paper = "Swin paper A2.2"
    cascade = "cascade_mask_rcnn_swin_base_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py"
    htc = "htc_cbv2_swin_base_patch4_window7_mstrain_400-1400_adamw_20e_coco.py"
    htc_giou = "htc_cbv2_swin_base_patch4_window7_mstrain_400-1400_giou_4conv1f_adamw_20e_coco.py"
    step = "_base_/schedules/schedule_1x.py"
    tta = "htc_cbv2_swin_large_patch4_window7_mstrain_400-1400_giou_4conv1f_adamw_1x_coco_tta.py"
    rows = {
        "backbone": ("swin_large_256", ("METHOD.md", "Swin-L")),
        "detector": ("htc", (paper, "improved HTC", htc, "HybridTaskCascade")),
        "box_head": ("4conv1fc", (cascade, htc_giou, "num_shared_convs=4", "num_shared_fcs=1")),
        "box_norm": ("bn", (cascade, htc_giou, "SyncBN")),
        "box_reg": ("class", (cascade, "reg_class_agnostic=False")),
        "box_loss": ("giou", (cascade, htc_giou, "GIoULoss", "reg_decoded_bbox=True")),
        "box_loss_weight": (10.0, (cascade, htc_giou, "loss_weight=10.0")),
        "fpn_norm": ("none", (htc, "without norm_cfg")),
        "test_score_thr": (0.001, (htc, "score_thr=0.001")),
        "test_nms": ("soft_linear", (paper, "soft-NMS", htc, "type='soft_nms'", "linear")),
        "test_nms_iou": (0.5, (htc, "iou_threshold=0.5")),
        "test_scales": (
            ("1600x1000", "1600x1400", "1800x1200", "1800x1600"),
            (tta, "(1600, 1000), (1600, 1400), (1800, 1200), (1800, 1600)"),
        ),
        "test_flip": (True, (tta, "flip=True")),
        "global_attn": (True, (paper, "global self-attention layer appended at the output of last stage")),
        "train_resize": ("range", (paper, "400-1400", htc, "multiscale_mode='range'")),
        "img_size": (1600, (paper, "at most 1600", htc, "(1600, 400), (1600, 1400)")),
        "short_range": ((400, 1400), (paper, "between 400 and 1400", htc)),
        "flip_prob": (0.5, (htc, "flip_ratio=0.5")),
        "drop_path": (0.2, (paper, "stochastic depth with ratio of 0.2")),
        "epochs": (72, (paper, "72 epochs")),
        "schedule": ("step", (paper, "factor of 0.1", step, "policy='step'")),
        "lr_steps": ((63, 69), (paper, "epochs 63 and 69")),
        "warmup_steps": (500, (step, "warmup='linear'", "warmup_iters=500")),
        "warmup_ratio": (0.001, (step, "warmup_ratio=0.001")),
        # lr 1e-4 at 2 per GPU x 8 GPUs: blr = lr * 256 / 16
        "blr": (0.0001 * 256 / 16, (cascade, "lr=0.0001", "total batch 16")),
        "weight_decay": (0.05, (cascade, "weight_decay=0.05")),
        "betas": ((0.9, 0.999), (cascade, "betas=(0.9, 0.999)")),
    }
    return rows, 2 * 8, 2


# recipe -> (option -> the pieces its source names); only the recipes that carry a source per value
SOURCED = {"swin_large_ummae_htcpp_coco": {k: where for k, (_, where) in _htcpp()[0].items()}}
# recipe -> what its notes must name: what the paper's run did that it does not
NOTES = {"swin_large_ummae_htcpp_coco": ("InstaBoost", "ImageNet-22K", "--stuff-maps", "private")}


GFL = "gfl_mae_{}_256_mask_vmr025_200e_100e_fpn_25ep_1024x1024_coco.py"
UPERNET = "upernet_mae_{}_256_mask_vmr025_200e_100e_512_slide_160k_ade20k_lr1e4_lrd1_pt.py"

# recipe -> (its options with their sources, total batch, the reference's per-GPU batch)
REFERENCE = {
    "vit_base_mae_in1k": _pretrain(
        "pretrain_mae_vit_base_patch16_dec512d2b_224_200e", "mae_vit_base_patch16_dec512d2b", 224, 128, 4, 200, 10,
        "mae",
    ),
    "vit_base_ummae_in1k": _pretrain(
        "pretrain_mae_vit_base_patch16_dec512d2b_224_mask_vmr025_200e", "mae_vit_base_patch16_dec512d2b", 224, 128,
        4, 200, 10, "ummae",
    ),
    "swin_tiny_ummae_in1k": _pretrain(
        "pretrain_mae_swin_tiny_256_mask_vmr025_200e", "mae_swin_tiny_256", 256, 128, 4, 200, 10, "ummae"
    ),
    "swin_tiny_simmim_in1k": _pretrain(
        "pretrain_simmim_swin_tiny_256_200e", "simmim_swin_tiny_256", 256, 64, 8, 200, 10, "simmim"
    ),
    "pvt_small_ummae_in1k": _pretrain(
        "pretrain_mae_pvt_small_256_mask_vmr025_200e", "mae_pvt_small_256", 256, 128, 4, 200, 10, "ummae"
    ),
    "pvt_small_simmim_in1k": _pretrain(
        "pretrain_simmim_pvt_small_256_200e", "simmim_pvt_small_256", 256, 128, 4, 200, 10, "simmim"
    ),
    "swin_large_ummae_in1k": _pretrain(
        "pretrain_mae_swin_large_256_mask_vmr025_800e", "mae_swin_large_256", 256, 64, 8, 800, 40, "ummae"
    ),
    "vit_base_mae_in1k_finetune": _finetune(
        "finetune_mae_vit_base_patch16_dec512d2b_200e_100e", "vit_base_patch16", 224, 64, 2, 0.8, 0.1
    ),
    "vit_base_ummae_in1k_finetune": _finetune(
        "finetune_mae_vit_base_patch16_dec512d2b_mask_vmr025_200e_100e", "vit_base_patch16", 224, 64, 2, 0.8, 0.1
    ),
    "swin_tiny_ummae_in1k_finetune": _finetune(
        "finetune_mae_swin_tiny_256_mask_vmr025_200e_100e", "swin_tiny_256", 256, 64, 2, 0.85, 0.1
    ),
    "swin_tiny_simmim_in1k_finetune": _finetune(
        "finetune_simmim_swin_tiny_256_200e_100e", "swin_tiny_256", 256, 64, 2, 0.85, 0.1
    ),
    "pvt_small_ummae_in1k_finetune": _finetune(
        "finetune_mae_pvt_small_256_mask_vmr025_200e_100e", "pvt_small_256", 256, 64, 2, 0.85, 0.1
    ),
    "pvt_small_simmim_in1k_finetune": _finetune(
        "finetune_simmim_pvt_small_256_200e_100e", "pvt_small_256", 256, 64, 2, 0.85, 0.1
    ),
    "swin_large_ummae_in1k_finetune": _finetune(
        "finetune_mae_swin_large_256_mask_vmr025_200e_100e", "swin_large_256", 256, 32, 4, 0.7, 0.2
    ),
    "vit_base_in1k_linprobe": _linprobe("vit_base_patch16", 224),
    "swin_tiny_in1k_linprobe": _linprobe("swin_tiny_256", 256),
    "pvt_small_in1k_linprobe": _linprobe("pvt_small_256", 256),
    "swin_tiny_ummae_gfl_coco": _gfl("swin_tiny_256", GFL.format("swin_tiny")),
    "pvt_small_ummae_gfl_coco": _gfl("pvt_small_256", GFL.format("pvt_small")),
    "swin_large_ummae_htcpp_coco": _htcpp(),
    "swin_tiny_ummae_upernet_ade20k": _upernet("swin_tiny_256", UPERNET.format("swin_tiny")),
    "pvt_small_ummae_upernet_ade20k": _upernet("pvt_small_256", UPERNET.format("pvt_small")),
}  # fmt: skip

# the paper's figures (METHOD.md, "Reference results"): fine-tuned ImageNet-1K top-1
PUBLISHED_TOP1 = {
    "vit_base_mae_in1k": "82.88", "vit_base_ummae_in1k": "82.88", "pvt_small_simmim_in1k": "79.28",
    "pvt_small_ummae_in1k": "79.31", "swin_tiny_simmim_in1k": "82.20", "swin_tiny_ummae_in1k": "82.04",
    "swin_large_ummae_in1k": "85.2",
}  # fmt: skip
CONFIGS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "linprobe": LinprobeConfig, "detect train": DetectConfig,
           "segment train": SegmentConfig}  # fmt: skip


def test_recipes__one_per_reference_run():
    assert set(RECIPES) == set(REFERENCE)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_recipe__every_value_is_the_references(name):
    rows, total, per_gpu = REFERENCE[name]
    recipe = RECIPES[name]
    values = {k: v for k, v in recipe.values.items() if k != "output"}
    assert set(values) == set(rows), f"{name}: options without a reference value, or missing"
    for option, (want, source) in rows.items():
        got = values[option]
        ok = got == pytest.approx(want, rel=1e-12) if isinstance(want, float) else got == want
        assert ok, f"{name}: {option}={got!r}, the reference's {want!r} ({source})"
    assert (recipe.total_batch, recipe.ref_batch) == (total, per_gpu)
    # on the reference's 8 GPUs the split is the reference's own
    assert split_batch(recipe.total_batch, recipe.ref_batch, 8) == (per_gpu, total // per_gpu // 8)
    # every option parses into the command's config and passes its checks
    needs = {"pretrained": "/encoder.pth"} if recipe.command == "linprobe" else {}  # the encoder to probe
    cfg = CONFIGS[recipe.command](**{**recipe.options(), "data": "/data", **needs})
    cfg.validate()


@pytest.mark.parametrize("name", list(REFERENCE))
def test_recipe__a_source_for_every_value_where_it_has_them_and_its_notes(name):
    """A recipe gathered from several sources names each value's (every piece written out
    above, in its text) and has notes of what it cannot reproduce; the others have neither."""
    recipe = RECIPES[name]
    if name not in SOURCED:
        assert recipe.sources == {} and recipe.notes == ()
        return
    assert set(recipe.sources) == set(SOURCED[name])
    for option, pieces in SOURCED[name].items():
        missing = [p for p in pieces if p not in recipe.sources[option]]
        assert missing == [], f"{name}: the source of {option} does not name {missing}"
    assert all(any(word in note for note in recipe.notes) for word in NOTES[name])


def test_recipe_htcpp__the_published_figure_and_what_ummae_recipes_prints(capsys):
    recipe = RECIPES["swin_large_ummae_htcpp_coco"]
    assert "57.4 box AP / 49.8 mask AP" in recipe.published
    assert main(["recipes", "swin_large_ummae_htcpp_coco"]) == 0
    out = capsys.readouterr().out
    assert "  lr_steps: 63 69  (Swin paper A2.2 (HTC++): decayed at epochs 63 and 69)" in out.splitlines()
    assert all(f"  note: {note}" in out for note in recipe.notes)


def test_recipes_page__sources_section_is_the_sources_table():
    page = (Path(__file__).parent.parent / "docs" / "recipes.md").read_text()
    m = re.search(r"<!-- recipe_sources: begin.*?-->\n(.*?)\n<!-- recipe_sources: end -->", page, re.S)
    assert m, "docs/recipes.md has no recipe sources section"
    assert m.group(1).strip() == sources_markdown()
    for name in SOURCED:
        assert f"`{name}`" in m.group(1) and all(note in m.group(1) for note in RECIPES[name].notes)


@pytest.mark.parametrize("name", list(PUBLISHED_TOP1))
def test_recipe__pretraining_and_finetuning_show_the_published_top1(name):
    assert PUBLISHED_TOP1[name] in RECIPES[name].published
    assert PUBLISHED_TOP1[name] in RECIPES[f"{name}_finetune"].published


def _brute_split(total, ref_batch, world):
    """Every (batch, accum) with batch x accum x world = total and batch <= the reference's:
    the largest batch (the fewest accumulation steps) wins."""
    pairs = [(b, a) for b in range(1, ref_batch + 1) for a in range(1, total + 1) if b * a * world == total]
    return max(pairs) if pairs else None


@pytest.mark.parametrize("world", [1, 8, 64])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_split_batch__keeps_the_total_for_1_8_and_64_processes(name, world):
    r = RECIPES[name]
    want = _brute_split(r.total_batch, r.ref_batch, world)
    if want is None:  # 16 images (detection, segmentation) cannot be made by 64 processes
        with pytest.raises(UsageError, match=f"recipe {name}: {world} processes cannot make its total batch of 16"):
            split_batch(r.total_batch, r.ref_batch, world, name)
        return
    batch, accum = split_batch(r.total_batch, r.ref_batch, world, name)
    assert (batch, accum) == want and batch * accum * world == r.total_batch


def test_split_batch__written_out():
    # Swin-T UM-MAE: 4096 = 128 x 4 x 8 (the Makefile); 1 process accumulates 32; 64 processes take 64 each
    assert [split_batch(4096, 128, w) for w in (1, 8, 64)] == [(128, 32), (128, 4), (64, 1)]
    # SimMIM Swin-T: 64 per GPU x 8 x 8
    assert [split_batch(4096, 64, w) for w in (1, 8, 64)] == [(64, 64), (64, 8), (64, 1)]
    assert [split_batch(1024, 64, w) for w in (1, 8, 64)] == [(64, 16), (64, 2), (16, 1)]
    with pytest.raises(UsageError, match="3 processes cannot make its total batch of 4096"):
        split_batch(4096, 128, 3, "x")


def _cfg(argv):
    args = _parser().parse_args(argv)
    return config_from_args({"pretrain": PretrainConfig, "finetune": FinetuneConfig}[argv[0]], args)


@pytest.mark.parametrize("world, batch, accum", [(1, 128, 32), (8, 128, 4), (64, 64, 1)])
def test_resolve__sets_the_recipe_split_and_says_so(world, batch, accum):
    cfg, lines = resolve(_cfg(["pretrain", "--config", "swin_tiny_ummae_in1k"]), world)
    assert (cfg.batch_size, cfg.accum_iter) == (batch, accum)
    assert cfg.effective_lr(world) == pytest.approx(1.5e-4 * 4096 / 256)  # the same lr on any number
    assert lines == [
        f"recipe swin_tiny_ummae_in1k: total batch 4096 = {batch} per process x {accum} accumulation x {world} "
        f"processes"
    ]


def test_resolve__flags_override_the_recipe_and_the_log_says_which():
    cfg = _cfg(["finetune", "--config", "swin_tiny_ummae_in1k_finetune", "--data", "/d", "--epochs", "3",
                "--batch-size", "32", "--model", "swin_tiny_256"])  # fmt: skip
    assert cfg.epochs == 3 and cfg.layer_decay == 0.85  # the flag wins; the rest is the recipe's
    cfg, lines = resolve(cfg, 8)
    assert (cfg.batch_size, cfg.accum_iter) == (32, 4)  # the batch given, the total kept: 32 x 4 x 8 = 1024
    assert (
        lines[0]
        == "recipe swin_tiny_ummae_in1k_finetune: flags override epochs=3 (recipe: 100), batch_size=32 (recipe: 64)"
    )
    assert lines[1].endswith("total batch 1024 = 32 per process x 4 accumulation x 8 processes")
    both, lines = resolve(
        _cfg(["pretrain", "--config", "swin_tiny_ummae_in1k", "--batch-size", "8", "--accum-iter", "1"]), 2
    )
    assert (
        lines[0] == "recipe swin_tiny_ummae_in1k: flags override batch_size=8 (recipe: 128), accum_iter=1 (recipe: 4)"
    )
    assert "total batch 16 = 8 per process x 1 accumulation x 2 processes, given by flags" in lines[1]
    assert (both.batch_size, both.accum_iter) == (8, 1)
    odd = _cfg(["pretrain", "--config", "swin_tiny_ummae_in1k", "--batch-size", "96"])
    with pytest.raises(UsageError, match="--batch-size 96 does not divide the 512 images per process"):
        resolve(odd, 8)
    plain, lines = resolve(_cfg(["pretrain", "--batch-size", "8"]), 8)  # no recipe: nothing changes
    assert lines == [] and (plain.batch_size, plain.accum_iter) == (8, 1)


def test_recipes_page__recipe_section_is_the_table():
    page = (Path(__file__).parent.parent / "docs" / "recipes.md").read_text()
    m = re.search(r"<!-- recipes: begin.*?-->\n(.*?)\n<!-- recipes: end -->", page, re.S)
    assert m, "docs/recipes.md has no recipe section"
    assert m.group(1).strip() == markdown_table()


def test_cli_recipes__lists_every_recipe(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(RECIPES)
    assert main(["recipes", "swin_large_ummae_in1k"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 800" in out and "64 per GPU x 8 accumulation x 8 GPUs" in out


def test_pretrain_run__logs_the_recipe_split(tmp_path, monkeypatch, caplog):
    """A real (one-step) run of a recipe with its model swapped for a small one: the log line."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    out = tmp_path / "run"
    argv = ["pretrain", "--config", "swin_tiny_ummae_in1k", "--model", "mae_swin_test", "--img-size", "64",
            "--batch-size", "2", "--accum-iter", "1", "--epochs", "1", "--warmup-epochs", "0", "--max-steps-per-epoch", "1",
            "--output", str(out), "--device", "cpu", "--num-workers", "0", "--vis-every", "0", "--demo-repeats", "1"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="ummae"):
        assert main(argv) == 0
    text = (out / "log.txt").read_text()
    assert (
        "recipe swin_tiny_ummae_in1k: total batch 2 = 2 per process x 1 accumulation x 1 processes, given by flags"
        in text
    )
    assert "recipe swin_tiny_ummae_in1k: flags override output=" in text
    assert "model=mae_swin_test (recipe: mae_swin_tiny_256)" in text
