"""The paper-size models are the reference's architectures: exactly its trainable parameter
counts, and a checkpoint in the reference's layout (tests/_reference_layout.py, checked against
the real reference checkpoints in test_parity.py) converts onto every one of their tensors.
Needs no ../shared."""

from __future__ import annotations

import pytest
import torch

from _reference_layout import PVT_S, SWIN_L, SWIN_T, VIT_B, VIT_L, reference_checkpoint, trainable_count
from ummae.models.registry import create_model
from ummae.weights.convert import convert_checkpoint
from ummae.weights.io import load_state_strict

PAPER = {  # our name: (the reference's architecture, its trainable parameters)
    "mae_swin_tiny_256": (dict(SWIN_T, kind="mae", decoder=(512, 2), sm=True), 35_774_346),
    "mae_swin_large_256": (dict(SWIN_L, kind="mae", decoder=(512, 8), sm=True), 223_698_612),
    "mae_pvt_small_256": (dict(PVT_S, kind="mae", decoder=(512, 2), sm=True), 28_522_560),
    "mae_vit_base_patch16": (dict(VIT_B, kind="mae", decoder=(512, 8), sm=True), 111_656_448),
    "mae_vit_base_patch16_dec512d2b": (dict(VIT_B, kind="mae", decoder=(512, 2), sm=True), 92_742_144),
    "simmim_swin_tiny_256": (dict(SWIN_T, kind="simmim"), 29_861_514),
    "simmim_pvt_small_256": (dict(PVT_S, kind="simmim"), 22_347_584),
    "swin_tiny_256": (dict(SWIN_T, kind="classifier"), 28_268_050),
    "swin_large_256": (dict(SWIN_L, kind="classifier"), 196_473_052),
    "pvt_small_256": (dict(PVT_S, kind="classifier"), 21_546_728),
    "vit_base_patch16": (dict(VIT_B, kind="classifier"), 86_567_656),  # = timm's vit_base_patch16_224
    "vit_large_patch16": (dict(VIT_L, kind="classifier"), 304_326_632),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_models__reference_parameters_exactly(name):
    """Our paper-size models have the reference's trainable parameter count, and a reference
    checkpoint of that architecture converts onto every one of their tensors (strict)."""
    spec, count = PAPER[name]
    assert trainable_count(spec) == count
    torch.manual_seed(0)
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
    ref = reference_checkpoint(
        spec,
        {
            "model": name,
            "input_size": spec["img_size"],
            "mask_regular": True,
            "vis_mask_ratio": 0.25,
            "norm_pix_loss": True,
            "mask_ratio": 0.75,
        },
    )
    state, meta = convert_checkpoint(ref, name)
    load_state_strict(model, state, name)
    assert meta["model_name"] == name


def test_reference_names_mean_the_reference_architectures():
    assert create_model("mae_swin_large_256").decoder.blocks.__len__() == 8
    assert create_model("mae_swin_large_256").encoder.stages[0][0].attn.pos_bias.mlp[0].out_features == 64
    assert len(create_model("mae_swin_tiny_256").decoder.blocks) == 2
    assert len(create_model("mae_vit_base_patch16").decoder.blocks) == 8
    assert len(create_model("mae_vit_base_patch16_dec512d2b").decoder.blocks) == 2
    assert create_model("simmim_swin_tiny_256").encoder.window_size == 16
    assert create_model("simmim_pvt_small_256").encoder.sr_ratios == [8, 4, 2, 1]
    assert create_model("mae_pvt_small_256").encoder.sr_ratios == [4, 2, 1, 1]
