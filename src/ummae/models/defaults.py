"""The model builders' keyword defaults that the docs state, each with its source (the
reference's file and key, MAE's or MMDetection's / MMSegmentation's default, or ours with the
reason). The values are read from the builders' signatures: :func:`markdown_table` prints them
for the docs, ``tests/test_defaults.py`` pins them against a table of its own and refuses a
keyword default without a source here."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

_BACKBONE = "the backbone's (None: the classifier's own)"

# builder ("module:attribute", a class's __init__ or a function) -> keyword -> the source of its default
SOURCES: dict[str, dict[str, str]] = {
    "ummae.models.mae:MaskedAutoencoder": {
        "unit_size": "UM-MAE: 16 px mask units",
        "sampling": "UM-MAE: Uniform Sampling",
        "mask_ratio": "MAE main_pretrain.py --mask_ratio 0.75",
        "sm_ratio": "UM-MAE main_pretrain.py --vis_mask_ratio 0.25",
        "norm_pix_loss": "UM-MAE pre-training scripts: --norm_pix_loss",
        "decoder_pos": "ours: each visible token at its own unit (the reference's ordering: 'reference')",
        "decoder_dim": "UM-MAE: decoder 512d2b",
        "decoder_depth": "UM-MAE: decoder 512d2b",
        "decoder_heads": "MAE: decoder_num_heads 16",
    },
    "ummae.models.classifier:Classifier": {
        "num_classes": "ImageNet-1K",
        "img_size": "UM-MAE fine-tuning: 256 px",
        "drop_rate": "MAE models_vit.py: no head dropout",
        "layer_decay": "MAE main_finetune.py --layer_decay 0.75 (a family's own: its fine-tuning recipe)",
    },
    "ummae.models.dense:build_stage_maps": {
        "out_channels": "UM-MAE transfer: 768-channel stage maps",
        "drop_path": _BACKBONE,
        "window_size": _BACKBONE,
        "stages": "all four stages",
        "neck": "UM-MAE DET backbones: LayerNorm + Linear per stage",
        "pos_embed_mode": "UM-MAE SEG/pvt.py: the position table resized once",
        "global_attn": "the UM-MAE DET and SEG backbones: no block after the last stage (HTC++'s is an option)",
    },
    "ummae.models.upernet:upernet": {
        "crop_size": "UM-MAE upernet config: crop_size 512",
        "neck_channels": "UM-MAE SEG backbones: fpn1..4 at 768",
        "head_channels": "UM-MAE upernet config: decode_head channels 768",
        "aux_channels": "MMSegmentation upernet config: auxiliary_head channels 256",
        "aux_weight": "MMSegmentation upernet config: auxiliary loss_weight 0.4",
        "ignore_index": "MMSegmentation: ignore_index 255",
        "drop_path": _BACKBONE,
        "window_size": _BACKBONE,
        "neck": "UM-MAE SEG backbones: a 1x1 convolution per stage",
        "pos_embed_mode": "UM-MAE SEG/pvt.py: the position table resized once",
    },
    "ummae.models.upernet:Segmenter": {
        "head_channels": "UM-MAE upernet config: decode_head channels 768",
        "aux_channels": "MMSegmentation upernet config: auxiliary_head channels 256",
        "aux_weight": "MMSegmentation upernet config: auxiliary loss_weight 0.4",
        "ignore_index": "MMSegmentation: ignore_index 255",
    },
    "ummae.models.upernet:UperHead": {
        "pool_scales": "MMSegmentation UPerHead: pool_scales (1, 2, 3, 6)",
        "dropout": "MMSegmentation decode_head: dropout_ratio 0.1",
    },
    "ummae.models.upernet:FCNHead": {"dropout": "MMSegmentation auxiliary_head: dropout_ratio 0.1"},
    "ummae.models.detectors:Detector": {
        "img_size": "UM-MAE gfl config: 1024x1024",
        "neck_channels": "UM-MAE DET backbones: LayerNorm + Linear to 768",
        "fpn_channels": "MMDetection FPN: out_channels 256",
        "drop_path": _BACKBONE,
        "window_size": _BACKBONE,
        "neck": "UM-MAE DET backbones: LayerNorm + Linear per stage",
        "pos_embed_mode": "UM-MAE DET/pvt.py: the position table interpolated on every forward",
    },
}


def builder(name: str):
    """The callable ``name`` ("module:attribute") names: a function, or a class's ``__init__``."""
    module, attribute = name.split(":")
    obj = getattr(importlib.import_module(module), attribute)
    return obj.__init__ if inspect.isclass(obj) else obj


def keyword_defaults(name: str) -> dict[str, Any]:
    """The keywords of builder ``name`` that have a default, and the defaults."""
    params = inspect.signature(builder(name)).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def markdown_table() -> str:
    """Every builder's keyword defaults with their sources (the docs' models page)."""
    rows = ["| builder | keyword | default | source |", "|---|---|---|---|"]
    for name, sources in SOURCES.items():
        defaults = keyword_defaults(name)
        for keyword, source in sources.items():
            rows.append(f"| `{name.split(':')[1]}` | `{keyword}` | `{defaults[keyword]}` | {source} |")
    return "\n".join(rows)
