"""The state-dict layout of the reference code's models (implus/UM-MAE, MAE's ViT), written
from their architecture, independently of ummae's models and of ummae.weights.convert.

``reference_shapes(spec)`` lists ``key -> shape`` in the reference's names;
``reference_checkpoint(spec)`` fills them (random weights; the frozen sin-cos tables with MAE's
values, computed here in numpy as MAE does) and wraps them as the reference's training scripts
save them. The parity tests check these shapes against the real reference checkpoints in
``../shared/parity``, so the paper-size layouts (and parameter counts) derived from them are
the reference's.

A spec: ``family`` (swin | pvt | vit), ``kind`` (mae | simmim | classifier | encoder),
``img_size`` and the architecture (``dims`` per stage or ``dim``, ``depths`` or ``depth``,
``heads``, ``mlp_ratios``, ``posmlp``, ``decoder`` = (dim, depth), ``sm``, ``num_classes``,
``patch`` (ViT), ``unit`` (mask unit, 16)).
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import numpy as np
import torch


def _norm(out, key, c):
    out[f"{key}.weight"] = (c,)
    out[f"{key}.bias"] = (c,)


def _linear(out, key, c_out, c_in):
    out[f"{key}.weight"] = (c_out, c_in)
    out[f"{key}.bias"] = (c_out,)


def _vit_block(out, key, c, mlp=4):
    _norm(out, f"{key}.norm1", c)
    _linear(out, f"{key}.attn.qkv", 3 * c, c)
    _linear(out, f"{key}.attn.proj", c, c)
    _norm(out, f"{key}.norm2", c)
    _linear(out, f"{key}.mlp.fc1", int(mlp * c), c)
    _linear(out, f"{key}.mlp.fc2", c, int(mlp * c))


def reference_shapes(spec: dict) -> OrderedDict[str, tuple[int, ...]]:
    fam, kind = spec["family"], spec["kind"]
    unit = spec.get("unit", 16)
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    if fam == "vit":
        d, p = spec["dim"], spec["patch"]
        n = (spec["img_size"] // p) ** 2
        if kind == "mae" and spec.get("sm"):
            out["vis_mask_token"] = (1, 1, d)
        out["cls_token"] = (1, 1, d)
        out["pos_embed"] = (1, n + 1, d)
        out["patch_embed.proj.weight"] = (d, 3, p, p)
        out["patch_embed.proj.bias"] = (d,)
        for i in range(spec["depth"]):
            _vit_block(out, f"blocks.{i}", d)
        last = d
    else:
        dims, depths = spec["dims"], spec["depths"]
        n = (spec["img_size"] // 4) ** 2
        if kind == "mae" and spec.get("sm"):
            out["vis_mask_token"] = (1, 1, dims[0])
        if kind == "simmim":
            out["mask_token"] = (1, 1, dims[0])
        if fam == "pvt":
            out["pos_embed"] = (1, n, dims[0])
        out["patch_embed.proj.weight"] = (dims[0], 3, 4, 4)
        out["patch_embed.proj.bias"] = (dims[0],)
        if fam == "swin":
            _norm(out, "patch_embed.norm", dims[0])
        i = 0
        for s, depth in enumerate(depths):
            c = dims[s]
            for j in range(depth):
                key = f"blocks.{i}"
                if s > 0 and j == 0:  # the block that opens a stage holds the down-sampling
                    if fam == "swin":
                        _norm(out, f"{key}.downsample.norm", dims[s - 1])
                    out[f"{key}.downsample.proj.weight"] = (c, dims[s - 1], 2, 2)
                    out[f"{key}.downsample.proj.bias"] = (c,)
                _norm(out, f"{key}.norm1", c)
                if fam == "swin":
                    pm, h = spec.get("posmlp", 32), spec["heads"][s]
                    out[f"{key}.attn.posmlp.0.weight"] = (pm, 2, 1, 1)
                    out[f"{key}.attn.posmlp.0.bias"] = (pm,)
                    out[f"{key}.attn.posmlp.2.weight"] = (h, pm, 1, 1)
                    out[f"{key}.attn.posmlp.2.bias"] = (h,)
                    _linear(out, f"{key}.attn.qkv", 3 * c, c)
                    _linear(out, f"{key}.attn.proj", c, c)
                    mlp = 4
                else:
                    _linear(out, f"{key}.attn.q", c, c)
                    _linear(out, f"{key}.attn.kv", 2 * c, c)
                    _linear(out, f"{key}.attn.proj", c, c)
                    out[f"{key}.attn.sr.weight"] = (c, c, 1, 1)
                    out[f"{key}.attn.sr.bias"] = (c,)
                    _norm(out, f"{key}.attn.norm", c)
                    mlp = spec["mlp_ratios"][s]
                _norm(out, f"{key}.norm2", c)
                _linear(out, f"{key}.mlp.fc1", int(mlp * c), c)
                _linear(out, f"{key}.mlp.fc2", c, int(mlp * c))
                i += 1
        last = dims[-1]
    if kind == "classifier":
        _norm(out, "fc_norm", last)
        _linear(out, "head", spec.get("num_classes", 1000), last)
        return out
    _norm(out, "norm", last)
    pix = unit * unit * 3
    if kind == "simmim":
        _linear(out, "decoder_pred", 4 * pix, last)
    elif kind == "mae":
        dd, depth = spec["decoder"]
        units = (spec["img_size"] // unit) ** 2 + (1 if fam == "vit" else 0)
        out["mask_token"] = (1, 1, dd)
        out["decoder_pos_embed"] = (1, units, dd)
        _linear(out, "decoder_embed", dd if fam == "vit" else 4 * dd, last)
        for k in range(depth):
            _vit_block(out, f"decoder_blocks.{k}", dd)
        _norm(out, "decoder_norm", dd)
        _linear(out, "decoder_pred", pix, dd)
    return out


def frozen_keys(spec: dict) -> set:
    """Tables the reference stores as parameters with ``requires_grad=False``."""
    keys = {"decoder_pos_embed"}
    if spec["kind"] != "classifier":
        keys.add("pos_embed")  # fixed sin-cos in pre-training, learnable in fine-tuning
    return keys


def trainable_count(spec: dict) -> int:
    frozen = frozen_keys(spec)
    return sum(int(np.prod(s)) for k, s in reference_shapes(spec).items() if k not in frozen)


def mae_sincos(dim: int, grid: int, cls: bool) -> np.ndarray:
    """MAE's 2-D sin-cos table: float64 frequencies, the first half of the channels for the
    column, the second for the row; an all-zero row first for a cls token."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")

    def one(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one(cols), one(rows)], axis=1)
    if cls:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb


def reference_checkpoint(spec: dict, args: dict, seed: int = 0) -> dict:
    """A checkpoint as the reference's ``main_pretrain.py`` / ``main_finetune.py`` save it."""
    g = torch.Generator().manual_seed(seed)
    model = OrderedDict()
    for k, shape in reference_shapes(spec).items():
        model[k] = 0.05 * torch.randn(shape, generator=g)
    vit = spec["family"] == "vit"
    for key in frozen_keys(spec) & set(model):
        n = model[key].shape[1] - (1 if vit else 0)
        model[key] = torch.from_numpy(mae_sincos(model[key].shape[2], int(round(n**0.5)), vit)).float()[None]
    return {"model": model, "epoch": 199, "args": argparse.Namespace(**args)}


# The paper-size models, as the reference's model functions build them.
SWIN_T = dict(
    family="swin", dims=[96, 192, 384, 768], depths=[2, 2, 6, 2], heads=[3, 6, 12, 24], posmlp=32, img_size=256
)
SWIN_L = dict(
    family="swin", dims=[192, 384, 768, 1536], depths=[2, 2, 18, 2], heads=[6, 12, 24, 48], posmlp=64, img_size=256
)
PVT_S = dict(
    family="pvt",
    dims=[64, 128, 320, 512],
    depths=[3, 4, 6, 3],
    heads=[1, 2, 5, 8],
    mlp_ratios=[8, 8, 4, 4],
    img_size=256,
)
VIT_B = dict(family="vit", dim=768, depth=12, heads=12, patch=16, img_size=224)
VIT_L = dict(family="vit", dim=1024, depth=24, heads=16, patch=16, img_size=224)
