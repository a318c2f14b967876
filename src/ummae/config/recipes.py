"""The paper's runs as named recipes: one row per run of the reference code (its ``Makefile``,
which PRETRAIN.md and FINETUNE.md point to, and its MMDetection / MMSegmentation configs), value
for value, with the figure the paper / the reference README publishes for it (METHOD.md,
"Reference results").

A recipe states the *total* batch of the reference run (per-GPU batch x accumulation x 8
GPUs); the command derives the per-process batch and accumulation from the number of
processes (:func:`split_batch`), so 1, 8 or 64 processes train with the same total batch and
the same lr. ``--config NAME`` takes a recipe's values; flags override them (precedence:
dataclass default < recipe < flag). ``ummae recipes`` prints :data:`RECIPES`, and docs/recipes.md's
recipe section is :func:`markdown_table` (written by tools/gen_docs.py, checked by tests/test_docs.py).

A recipe gathered from several sources (HTC++: the Swin paper and the public configs that
follow it) names the source of each value (``Recipe.sources``) and what it cannot reproduce
(``Recipe.notes``): ``ummae recipes NAME`` prints them, and :func:`sources_markdown` is
docs/recipes.md's table of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ummae.errors import UsageError

REFERENCE_GPUS = 8  # every reference run: `torch.distributed.launch --nproc_per_node=8` / `dist_train.sh ... 8`

# main_finetune.py's own defaults, which the Makefile's fine-tuning rows leave as they are
_FINETUNE_DEFAULTS = dict(
    warmup_epochs=5, min_lr=1e-6, smoothing=0.1, auto_augment="rand-m9-mstd0.5-inc1", mixup_prob=1.0,
    mixup_switch_prob=0.5,
)  # fmt: skip
_GFL = dict(
    detector="gfl", img_size=1024, scale_range=(0.1, 2.0), flip_prob=0.5, drop_path=0.1, neck_channels=768,
    fpn_channels=256, epochs=25, warmup_steps=2000, blr=1.6e-3, min_lr=1e-6, weight_decay=0.05, keep_every=5,
)  # fmt: skip
_UPERNET = dict(
    num_classes=150, crop_size=512, scale=(2048, 512), ratio_range=(0.5, 2.0), drop_path=0.1, neck_channels=768,
    head_channels=768, aux_weight=0.4, layer_decay=1.0, iters=160000, eval_every_iters=16000, schedule="poly",
    warmup_steps=1500, blr=1.6e-3, min_lr=0.0, weight_decay=0.05, test_mode="slide", test_stride=341,
)  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """One run of the reference: the command that runs it, its total batch (``ref_batch`` per
    GPU x accumulation x 8 GPUs in the reference), the options it sets, where they come from,
    and the published figure."""

    name: str
    command: str  # "pretrain", "finetune", "detect train", "segment train"
    total_batch: int
    ref_batch: int  # the reference's per-GPU batch: kept per process where it divides
    values: dict[str, Any] = field(hash=False)
    source: str  # the Makefile target or config file
    published: str  # the paper's figure for this row (METHOD.md / the reference README)
    # option -> where its value comes from (config file and key, or paper section); empty: ``source``, for all
    sources: dict[str, str] = field(default_factory=dict, hash=False)
    notes: tuple[str, ...] = ()  # what the run of the paper did that this recipe does not (and why)

    def options(self, world_size: int = REFERENCE_GPUS) -> dict[str, Any]:
        """The config options: ``values`` plus the per-process batch and accumulation that give
        ``total_batch`` on ``world_size`` processes."""
        batch, accum = split_batch(self.total_batch, self.ref_batch, world_size, self.name)
        return {**self.values, "batch_size": batch, "accum_iter": accum}


def _pretrain(name, model, img_size, source, published, *, method="ummae", ref_batch=128, epochs=200, warmup=10):
    values: dict[str, Any] = dict(model=model, img_size=img_size, mask_ratio=0.75)
    if method == "ummae":  # --mask_regular --vis_mask_ratio 0.25 --norm_pix_loss
        values.update(sampling="uniform", sm_ratio=0.25, norm_pix_loss=True)
    elif method == "mae":  # MAE's random sampling: no --mask_regular, no secondary masking
        values.update(sampling="random", sm_ratio=0.0, norm_pix_loss=True)
    values.update(epochs=epochs, warmup_epochs=warmup, blr=1.5e-4, weight_decay=0.05, output=f"runs/{name}")
    return Recipe(name, "pretrain", 4096, ref_batch, values, f"Makefile: {source}", published)


def _finetune(name, model, img_size, source, published, *, layer_decay=0.85, drop_path=0.1, ref_batch=64):
    values: dict[str, Any] = dict(
        model=model, img_size=img_size, epochs=100, blr=5e-4, layer_decay=layer_decay, weight_decay=0.05,
        drop_path=drop_path, reprob=0.25, mixup=0.8, cutmix=1.0, **_FINETUNE_DEFAULTS, output=f"runs/{name}",
    )  # fmt: skip
    return Recipe(name, "finetune", 1024, ref_batch, values, f"Makefile: {source}", published)


def _linprobe(name, model, img_size):
    """MAE's linear probe (``main_linprobe.py``'s defaults; its README's total batch 16384 = 512
    per GPU x 32 GPUs, here 512 x 4 accumulation x 8): the UM-MAE reference has no probing run,
    so every family and method is probed the way MAE probes."""
    values: dict[str, Any] = dict(
        model=model, img_size=img_size, epochs=90, warmup_epochs=10, blr=0.1, min_lr=0.0, weight_decay=0.0,
        output=f"runs/{name}",
    )  # fmt: skip
    source = "MAE main_linprobe.py defaults; MAE LINPROBE: total batch 16384 (512 per GPU x 32 GPUs)"
    return Recipe(name, "linprobe", 16384, 512, values, source, _NOT_PUBLISHED)


def _dense(name, command, backbone, defaults, source, published):
    values = dict(backbone=backbone, **defaults, output=f"runs/{name}")
    return Recipe(name, command, 16, 2, values, source, published)


def _sourced(name, command, total_batch, ref_batch, rows, source, published, notes=()):
    """A recipe whose ``rows`` give each option as ``(value, where it comes from)``."""
    values = {k: v for k, (v, _) in rows.items()}
    sources = {k: where for k, (_, where) in rows.items()}
    values["output"] = f"runs/{name}"
    return Recipe(name, command, total_batch, ref_batch, values, source, published, sources, tuple(notes))


# HTC++ (Swin paper, appendix A2.2), the detector of the paper's Swin-L COCO figure. UM-MAE's own
# HTC++ config is private (implus/UM-MAE issue 4) and Swin's authors released none, so each value
# comes from the Swin paper or a public config that follows it: Swin's Cascade Mask R-CNN configs
# (the 4conv1fc GIoU box heads, AdamW) and CBNetV2's Swin HTC configs (the HTC++ data pipeline).
_SWIN = "Swin paper A2.2 (HTC++)"
_SWIN_CASCADE = (
    "Swin-Transformer-Object-Detection configs/swin/cascade_mask_rcnn_swin_base_patch4_window7_mstrain_480-800_giou_"
    "4conv1f_adamw_3x_coco.py"
)
_CBNET_HTC = "CBNetV2 configs/cbnet/htc_cbv2_swin_base_patch4_window7_mstrain_400-1400_adamw_20e_coco.py"
_CBNET_HTC_GIOU = (
    "CBNetV2 configs/cbnet/htc_cbv2_swin_base_patch4_window7_mstrain_400-1400_giou_4conv1f_adamw_20e_coco.py"
)
_MMDET_1X = "MMDetection configs/_base_/schedules/schedule_1x.py (Swin's configs inherit it)"
_HTCPP = dict(
    backbone=("swin_large_256", "METHOD.md: Swin-L UM-MAE with HTC++ on COCO"),
    detector=("htc", f"{_SWIN}: an improved HTC; {_CBNET_HTC}: model type HybridTaskCascade"),
    box_head=("4conv1fc", f"{_SWIN_CASCADE} and {_CBNET_HTC_GIOU}: bbox_head ConvFCBBoxHead num_shared_convs=4, "
                          "num_shared_fcs=1"),
    box_norm=("bn", f"{_SWIN_CASCADE} and {_CBNET_HTC_GIOU}: bbox_head norm_cfg=dict(type='SyncBN')"),
    box_reg=("class", f"{_SWIN_CASCADE}: bbox_head reg_class_agnostic=False (CBNetV2's HTC GIoU config: True)"),
    box_loss=("giou", f"{_SWIN_CASCADE} and {_CBNET_HTC_GIOU}: loss_bbox=dict(type='GIoULoss', loss_weight=10.0), "
                      "reg_decoded_bbox=True"),
    box_loss_weight=(10.0, f"{_SWIN_CASCADE} and {_CBNET_HTC_GIOU}: GIoULoss loss_weight=10.0"),
    fpn_norm=("none", f"{_CBNET_HTC} (_base_/models/htc_without_semantic_swin_fpn.py): neck=dict(type='FPN') "
                      "without norm_cfg"),
    test_score_thr=(0.001, f"{_CBNET_HTC}: test_cfg rcnn score_thr=0.001"),
    test_nms=("soft_linear", f"{_SWIN}: soft-NMS; {_CBNET_HTC}: test_cfg rcnn nms=dict(type='soft_nms') (mmcv's "
                             "soft_nms, method 'linear' by default)"),
    test_nms_iou=(0.5, f"{_CBNET_HTC}: test_cfg rcnn nms iou_threshold=0.5 (_base_/models/htc_without_semantic_swin_fpn.py)"),
    test_scales=(("1600x1000", "1600x1400", "1800x1200", "1800x1600"),
                 "CBNetV2 configs/cbnet/htc_cbv2_swin_large_patch4_window7_mstrain_400-1400_giou_4conv1f_adamw_1x_coco_tta"
                 ".py: MultiScaleFlipAug img_scale=[(1600, 1000), (1600, 1400), (1800, 1200), (1800, 1600)]"),
    test_flip=(True, "CBNetV2 configs/cbnet/htc_cbv2_swin_large_patch4_window7_mstrain_400-1400_giou_4conv1f_adamw_1x_"
                     "coco_tta.py: MultiScaleFlipAug flip=True"),
    global_attn=(True, f"{_SWIN}: an extra global self-attention layer appended at the output of last stage"),
    train_resize=("range", f"{_SWIN}: shorter side in 400-1400; {_CBNET_HTC}: Resize multiscale_mode='range'"),
    img_size=(1600, f"{_SWIN}: longer side at most 1600; {_CBNET_HTC}: Resize img_scale=[(1600, 400), (1600, 1400)]"),
    short_range=((400, 1400), f"{_SWIN}: shorter side between 400 and 1400; {_CBNET_HTC}: Resize img_scale"),
    flip_prob=(0.5, f"{_CBNET_HTC}: RandomFlip flip_ratio=0.5"),
    drop_path=(0.2, f"{_SWIN}: stochastic depth with ratio of 0.2 for all Swin Transformer models"),
    epochs=(72, f"{_SWIN}: 6x schedule (72 epochs)"),
    schedule=("step", f"{_SWIN}: the learning rate decayed by a factor of 0.1; {_MMDET_1X}: lr_config policy='step'"),
    lr_steps=((63, 69), f"{_SWIN}: decayed at epochs 63 and 69"),
    warmup_steps=(500, f"{_MMDET_1X}: lr_config warmup='linear', warmup_iters=500"),
    warmup_ratio=(0.001, f"{_MMDET_1X}: lr_config warmup_ratio=0.001"),
    blr=(0.0001 * 256 / 16, f"{_SWIN_CASCADE}: optimizer AdamW lr=0.0001 at total batch 16 (2 per GPU x 8)"),
    weight_decay=(0.05, f"{_SWIN_CASCADE}: optimizer weight_decay=0.05"),
    betas=((0.9, 0.999), f"{_SWIN_CASCADE}: optimizer betas=(0.9, 0.999)"),
)  # fmt: skip
_HTCPP_NOTES = (
    "InstaBoost (Swin paper A2.2) is not implemented here: the training data are not augmented by it.",
    "ImageNet-22K initialisation (Swin paper A2.2) is Swin's; the published UM-MAE figure is ImageNet-1K only "
    "(METHOD.md): give --pretrained the checkpoint of swin_large_ummae_in1k_finetune.",
    "HTC's semantic branch reads COCO-stuff maps: give --stuff-maps COCO/stuffthingmaps/train2017 (CBNetV2's HTC "
    "configs: seg_prefix stuffthingmaps/train2017); without it the run is htc_without_semantic.",
    "The global self-attention block is built from the Swin paper's words (no public HTC++ code has it): a pre-norm "
    "transformer block over the whole last-stage map with the last stage's heads (ummae.models.dense).",
    "UM-MAE's HTC++ config is private (implus/UM-MAE issue 4): the values are the Swin paper's and those of the "
    "public configs that follow it; the backbone keeps UM-MAE's transfer form (window 16, LayerNorm + Linear to "
    "768 channels per stage).",
    "The published figure stands beside Swin-L HTC++'s single-scale mini-val row (57.1 / 49.5, Swin paper Table "
    "2(c)); Swin's multi-scale test gave 58.0 / 50.4.",
)

_DET = "DET/configs/gfl/gfl_mae_{}_256_mask_vmr025_200e_100e_fpn_25ep_1024x1024_coco.py"
_SEG = "SEG/configs/upernet/upernet_mae_{}_256_mask_vmr025_200e_100e_512_slide_160k_ade20k_lr1e4_lrd1_pt.py"
_NOT_PUBLISHED = "not published (the paper gives no figure for this run in METHOD.md)"

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        _pretrain("vit_base_mae_in1k", "mae_vit_base_patch16_dec512d2b", 224,
                  "pretrain_mae_vit_base_patch16_dec512d2b_224_200e", "82.88 top-1 after vit_base_mae_in1k_finetune",
                  method="mae"),
        _pretrain("vit_base_ummae_in1k", "mae_vit_base_patch16_dec512d2b", 224,
                  "pretrain_mae_vit_base_patch16_dec512d2b_224_mask_vmr025_200e",
                  "82.88 top-1 after vit_base_ummae_in1k_finetune"),
        _pretrain("swin_tiny_ummae_in1k", "mae_swin_tiny_256", 256, "pretrain_mae_swin_tiny_256_mask_vmr025_200e",
                  "25.0 h on 8 GPUs; 82.04 top-1 after swin_tiny_ummae_in1k_finetune"),
        _pretrain("swin_tiny_simmim_in1k", "simmim_swin_tiny_256", 256, "pretrain_simmim_swin_tiny_256_200e",
                  "49.3 h on 8 GPUs; 82.20 top-1 after swin_tiny_simmim_in1k_finetune", method="simmim", ref_batch=64),
        _pretrain("pvt_small_ummae_in1k", "mae_pvt_small_256", 256, "pretrain_mae_pvt_small_256_mask_vmr025_200e",
                  "21.3 h on 8 GPUs; 79.31 top-1 after pvt_small_ummae_in1k_finetune"),
        _pretrain("pvt_small_simmim_in1k", "simmim_pvt_small_256", 256, "pretrain_simmim_pvt_small_256_200e",
                  "38.0 h on 8 GPUs; 79.28 top-1 after pvt_small_simmim_in1k_finetune", method="simmim"),
        _pretrain("swin_large_ummae_in1k", "mae_swin_large_256", 256, "pretrain_mae_swin_large_256_mask_vmr025_800e",
                  "85.2 top-1 after swin_large_ummae_in1k_finetune", ref_batch=64, epochs=800, warmup=40),
        _finetune("vit_base_mae_in1k_finetune", "vit_base_patch16", 224,
                  "finetune_mae_vit_base_patch16_dec512d2b_200e_100e", "82.88 top-1", layer_decay=0.8),
        _finetune("vit_base_ummae_in1k_finetune", "vit_base_patch16", 224,
                  "finetune_mae_vit_base_patch16_dec512d2b_mask_vmr025_200e_100e", "82.88 top-1", layer_decay=0.8),
        _finetune("swin_tiny_ummae_in1k_finetune", "swin_tiny_256", 256,
                  "finetune_mae_swin_tiny_256_mask_vmr025_200e_100e", "82.04 top-1"),
        _finetune("swin_tiny_simmim_in1k_finetune", "swin_tiny_256", 256, "finetune_simmim_swin_tiny_256_200e_100e",
                  "82.20 top-1"),
        _finetune("pvt_small_ummae_in1k_finetune", "pvt_small_256", 256,
                  "finetune_mae_pvt_small_256_mask_vmr025_200e_100e", "79.31 top-1"),
        _finetune("pvt_small_simmim_in1k_finetune", "pvt_small_256", 256, "finetune_simmim_pvt_small_256_200e_100e",
                  "79.28 top-1"),
        _finetune("swin_large_ummae_in1k_finetune", "swin_large_256", 256,
                  "finetune_mae_swin_large_256_mask_vmr025_200e_100e", "85.2 top-1", layer_decay=0.7, drop_path=0.2,
                  ref_batch=32),
        _linprobe("vit_base_in1k_linprobe", "vit_base_patch16", 224),
        _linprobe("swin_tiny_in1k_linprobe", "swin_tiny_256", 256),
        _linprobe("pvt_small_in1k_linprobe", "pvt_small_256", 256),
        _dense("swin_tiny_ummae_gfl_coco", "detect train", "swin_tiny_256", _GFL, _DET.format("swin_tiny"),
               _NOT_PUBLISHED),
        _dense("pvt_small_ummae_gfl_coco", "detect train", "pvt_small_256", _GFL, _DET.format("pvt_small"),
               _NOT_PUBLISHED),
        _sourced("swin_large_ummae_htcpp_coco", "detect train", 16, 2, _HTCPP,
                 f"{_SWIN}; {_SWIN_CASCADE}; {_CBNET_HTC_GIOU}",
                 "57.4 box AP / 49.8 mask AP on COCO (METHOD.md: Swin-L UM-MAE, ImageNet-1K only, HTC++)",
                 _HTCPP_NOTES),
        _dense("swin_tiny_ummae_upernet_ade20k", "segment train", "swin_tiny_256", _UPERNET, _SEG.format("swin_tiny"),
               _NOT_PUBLISHED),
        _dense("pvt_small_ummae_upernet_ade20k", "segment train", "pvt_small_256", _UPERNET, _SEG.format("pvt_small"),
               _NOT_PUBLISHED),
    ]
}  # fmt: skip


def split_batch(total: int, ref_batch: int, world_size: int, name: str = "") -> tuple[int, int]:
    """``(per-process batch, accumulation)`` giving ``total`` images per update on
    ``world_size`` processes: the reference's per-GPU batch where it divides each process's
    share, else the largest batch under it that does. A world size that does not divide the
    total is refused (its lr and schedule would not be the recipe's)."""
    if world_size < 1 or total % world_size:
        raise UsageError(
            f"recipe {name}: {world_size} processes cannot make its total batch of {total} (use a number of "
            f"processes that divides {total}, or give --batch-size and --accum-iter)"
        )
    share = total // world_size
    batch = max(b for b in range(1, min(ref_batch, share) + 1) if share % b == 0)
    return batch, share // batch


def recipes_for(command: str) -> list[str]:
    """The names of the recipes ``command`` runs."""
    return [name for name, r in RECIPES.items() if r.command == command]


def describe_split(recipe: Recipe, batch: int, accum: int, world_size: int) -> str:
    """The log line of a recipe's batch: ``recipe X: total batch 4096 = 128 per process x 4
    accumulation x 8 processes``."""
    return (
        f"recipe {recipe.name}: total batch {batch * accum * world_size} = {batch} per process x {accum} "
        f"accumulation x {world_size} processes"
    )


def _cell(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def markdown_table() -> str:
    """The recipe table of docs/recipes.md, one row per recipe (what ``ummae recipes`` prints, as Markdown)."""
    lines = [
        "| `--config NAME` | command | total batch (reference: per GPU x accumulation x GPUs) | values | reference "
        "| published |",
        "|---|---|---|---|---|---|",
    ]
    for r in RECIPES.values():
        values = ", ".join(f"{k}={_cell(v)}" for k, v in r.values.items() if k != "output")
        split = " x ".join(map(str, (*split_batch(r.total_batch, r.ref_batch, REFERENCE_GPUS), REFERENCE_GPUS)))
        lines.append(
            f"| `{r.name}` | `ummae {r.command}` | {r.total_batch} ({split}) | {values} | `{r.source}` | {r.published} |"
        )
    return "\n".join(lines)


def sources_markdown() -> str:
    """docs/recipes.md's section of the recipes that name a source per value: for each, its
    options with their values and sources, then its notes."""
    parts = []
    for r in RECIPES.values():
        if not r.sources:
            continue
        lines = [f"#### `{r.name}`: {r.published}", "", "| option | value | source |", "|---|---|---|"]
        lines += [f"| `{k}` | `{_cell(r.values[k])}` | {where} |" for k, where in r.sources.items()]
        lines += ["", *(f"- {note}" for note in r.notes)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def split_recipe_batch(cfg, world_size: int) -> tuple[dict[str, int], list[str]]:
    """A run of a recipe (``--config NAME``, in ``cfg.provenance``): the per-process batch and
    accumulation for ``world_size`` processes that keep the recipe's total batch. A flag given
    for one of the two fixes it and the other is derived; both given override the total.
    Returns ``(the derived values, the log lines)``: the split, and the recipe values the flags
    overrode. A config not from a recipe derives nothing (no lines)."""
    name = cfg.provenance.recipe
    if name is None:
        return {}, []
    recipe, flags = RECIPES[name], cfg.provenance.flagged()
    lines = []
    overridden = _overridden(cfg, recipe)
    if overridden:
        lines.append(
            f"recipe {name}: flags override "
            + ", ".join(f"{k}={_cell(v)} (recipe: {_cell(recipe.values.get(k, recipe.options().get(k)))})"
                        for k, v in overridden.items())
        )  # fmt: skip
    if {"batch_size", "accum_iter"} <= flags:
        total = cfg.batch_size * cfg.accum_iter * world_size
        lines.append(
            f"recipe {name}: total batch {total} = {cfg.batch_size} per process x {cfg.accum_iter} accumulation x "
            f"{world_size} processes, given by flags (the recipe's: {recipe.total_batch})"
        )
        return {}, lines
    if world_size < 1 or recipe.total_batch % world_size:
        split_batch(recipe.total_batch, recipe.ref_batch, world_size, name)  # refuses, in one line
    share = recipe.total_batch // world_size
    if "batch_size" in flags and "accum_iter" not in flags:
        if share % cfg.batch_size:
            raise UsageError(
                f"recipe {name}: --batch-size {cfg.batch_size} does not divide the {share} images per process of its "
                f"total batch {recipe.total_batch} on {world_size} processes (give --accum-iter too to change the total)"
            )
        derived = {"accum_iter": share // cfg.batch_size}
    elif "accum_iter" in flags and "batch_size" not in flags:
        if share % cfg.accum_iter:
            raise UsageError(
                f"recipe {name}: --accum-iter {cfg.accum_iter} does not divide the {share} images per process of its "
                f"total batch {recipe.total_batch} on {world_size} processes (give --batch-size too to change the "
                f"total)"
            )
        derived = {"batch_size": share // cfg.accum_iter}
    else:
        batch, accum = split_batch(recipe.total_batch, recipe.ref_batch, world_size, name)
        derived = {"batch_size": batch, "accum_iter": accum}
    split = {"batch_size": cfg.batch_size, "accum_iter": cfg.accum_iter, **derived}
    lines.append(describe_split(recipe, split["batch_size"], split["accum_iter"], world_size))
    return derived, lines


def _overridden(cfg, recipe: Recipe) -> dict[str, Any]:
    """The flags of ``cfg`` that replaced a value of ``recipe`` (as written for its 8
    processes), in the order of the options."""
    theirs = recipe.options()
    flags = cfg.provenance.flagged()
    return {
        f.name: getattr(cfg, f.name)
        for f in cfg.options()
        if f.name in flags and f.name in theirs and theirs[f.name] != getattr(cfg, f.name)
    }


def recipes_text(name: str | None = None) -> str:
    """``ummae recipes``: one line per recipe (name, command, total batch, published figure);
    with ``name``, that recipe's values and sources."""
    if name is None:
        width = max(map(len, RECIPES))
        return "\n".join(
            f"{r.name:<{width}}  ummae {r.command:<13}  total batch {r.total_batch:<5}  {r.published}"
            for r in RECIPES.values()
        )
    if name not in RECIPES:
        raise UsageError(f"no recipe {name!r}; recipes: {', '.join(RECIPES)}")
    r = RECIPES[name]
    batch, accum = split_batch(r.total_batch, r.ref_batch, REFERENCE_GPUS, name)
    lines = [
        f"{r.name}: ummae {r.command} --config {r.name} (flags override its values)",
        f"  source: {r.source}",
        f"  published: {r.published}",
        f"  total batch: {r.total_batch} (the reference: {batch} per GPU x {accum} accumulation x {REFERENCE_GPUS} "
        f"GPUs; each run splits it over its own processes)",
    ]
    lines += [f"  {k}: {_cell(v)}" + (f"  ({r.sources[k]})" if k in r.sources else "") for k, v in r.values.items()]
    lines += [f"  note: {note}" for note in r.notes]
    return "\n".join(lines)
