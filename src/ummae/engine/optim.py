"""The optimiser: AdamW with the reference's weight-decay rules (pre-training: none on biases and
norms only; fine-tuning: none on biases, norms, tokens and position tables) and optional
layer-wise lr decay. The lr of each update is :mod:`ummae.engine.schedule`'s."""

from __future__ import annotations

import torch
import torch.nn as nn


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Fine-tuning (the reference's ``param_groups_lrd``): 1-d tensors (biases, norm scales)
    and the model's ``no_weight_decay`` set (position tables, ViT's cls token)."""
    return p.ndim <= 1 or name.endswith("token") or "pos_embed" in name


def pretrain_no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Pre-training (MAE's ``add_weight_decay``, which the reference uses): 1-d tensors only.
    The reference's tokens (mask, SM, cls) are ``[1, 1, C]`` and so decayed; ours that are
    stored 1-d (SM token, SimMIM mask token) are decayed too."""
    return p.ndim <= 1 and not name.endswith("token")


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None, no_decay=no_weight_decay):
    """AdamW groups. With ``layer_decay`` (fine-tuning, BEiT/MAE), a parameter at depth ``i``
    of ``model.layer_id`` gets ``lr_scale = layer_decay ** (num_layers + 1 - i)``: the patch
    embedding learns slowest, the head at the full lr. The Trainer applies ``lr_scale``."""
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if no_decay(name, p) else weight_decay
        scale, layer = 1.0, 0
        if layer_decay is not None:
            layer = model.layer_id(name)
            scale = layer_decay ** (model.num_layers + 1 - layer)
        groups.setdefault((layer, wd), {"params": [], "weight_decay": wd, "lr_scale": scale})["params"].append(p)
    return [g for _, g in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1]))]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas,
    device: torch.device,
    layer_decay: float | None = None,
    no_decay=no_weight_decay,
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, weight_decay, layer_decay, no_decay), lr=lr, betas=tuple(betas), fused=device.type == "cuda"
    )
