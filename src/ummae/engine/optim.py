"""Optimiser and schedule: AdamW with the reference's weight-decay rules (pre-training: none on
biases and norms only; fine-tuning: none on biases, norms, tokens and position tables);
optional layer-wise lr decay; per-step linear warm-up then cosine (MAE's schedule, evaluated
per optimiser update)."""
from __future__ import annotations

import math

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


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, device: torch.device,
                    layer_decay: float | None = None, no_decay=no_weight_decay) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, weight_decay, layer_decay, no_decay), lr=lr, betas=tuple(betas), fused=device.type == "cuda"
    )


def warmup_cosine(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    if step < warmup:
        return base_lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_poly(step: int, total: int, warmup: int, base_lr: float, min_lr: float, power: float = 1.0,
                warmup_ratio: float = 1e-6) -> float:
    """MMSegmentation's iteration schedule (mmcv ``PolyLrUpdaterHook`` with linear warm-up, the
    segmentation recipe): ``(base - min) * (1 - step / total) ** power + min``, and during the
    ``warmup`` first steps that value times a factor rising linearly from ``warmup_ratio`` to 1
    (mmcv scales the poly value, not the base lr)."""
    lr = (base_lr - min_lr) * (1.0 - min(step, total) / max(1, total)) ** power + min_lr
    if step < warmup:
        lr *= 1.0 - (1.0 - step / warmup) * (1.0 - warmup_ratio)
    return lr


SCHEDULES = {"cosine": warmup_cosine, "poly": warmup_poly}
