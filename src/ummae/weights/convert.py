"""Foreign checkpoints -> ours: the one place where other code bases' weights are read.

Formats understood (detected from the keys and the checkpoint's ``args``):

* the UM-MAE reference code (implus/UM-MAE, the paper's published weights):
  ``{"model", "epoch", "args", ...}`` of ``main_pretrain.py`` / ``main_finetune.py``, for
  UM-MAE pre-training (``MaskedAutoencoderSwin`` / ``PVT`` / ``ViT``), SimMIM pre-training
  (``SimMIMSwin`` / ``SimMIMPVT``) and fine-tuned classifiers (``Swin``, ``PVT``, MAE's ViT);
* the MAE code base (facebookresearch/mae): its ViT pre-training, encoder-only and fine-tuned
  checkpoints, which have the same layout.

The SimMIM code base's own Swin / ViT (relative position bias tables, ``encoder.layers.*``)
is another architecture than ours and is refused, naming what cannot be mapped.

Layout transforms (METHOD.md "reference conventions"; everything else maps by name):

* flat ``blocks.{i}`` -> ``encoder.stages.{s}.{j}``; a stage starts at each block that holds
  the ``downsample`` (-> ``encoder.downsamples.{s-1}``);
* Swin ``attn.posmlp.{0,2}`` 1x1 convs -> ``attn.pos_bias.mlp.{0,2}`` Linear layers (the same
  weights, flattened; both take key minus query, so no sign change);
* PVT ``attn.norm`` -> ``attn.sr_norm``; ``patch_embed.norm`` -> ``encoder.patch_norm``;
* masking tokens ``[1, 1, C]`` -> ``sm_token`` / SimMIM ``mask_token`` ``[C]``;
* the decoder: ``decoder_blocks`` / ``decoder_norm`` / ``decoder_pred`` -> ``decoder.*``; the
  pixel-shuffle channel order of ``decoder_embed`` and SimMIM's ``decoder_pred`` is ours;
* fixed sin-cos tables stored as frozen parameters (``pos_embed`` of pre-training,
  ``decoder_pos_embed``) are checked against ours and dropped (we compute them); a table that
  differs is refused, since the weights were trained with it;
* learnable tables of fine-tuned models: PVT ``pos_embed [1, L, C]`` -> ``[H, W, C]``; ViT
  ``pos_embed [1, 1 + L, D]`` -> the cls slot ``pos_embed_cls`` + the ``[H, W, D]`` table.

The model is identified by the tensor shapes, matched against the registered families'
architecture tables (``ummae.models.family.matching_models``: stage widths, blocks, heads where
the tensors show them, MLP widths, Swin's pos-MLP width, the decoder's width and depth), not by
the ``args.model`` the checkpoint records (reported as its source): a Swin-S checkpoint is
Swin-S, whatever its width shares with Swin-T.

Nothing is guessed silently: every key is mapped, dropped with its reason, or the conversion
fails naming the keys it cannot place.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from ummae.errors import CheckpointError
from ummae.models.family import matching_models
from ummae.models.layers import sincos_grid

_FIXED_TABLE_TOL = 1e-5


def is_foreign(ckpt: dict[str, Any]) -> bool:
    """A checkpoint of another code base: every one ummae writes names its model."""
    return "model_name" not in ckpt


def _state_of(ckpt: dict[str, Any]) -> dict[str, Tensor]:
    state = ckpt["model"]
    state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _args_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def convert_checkpoint(ckpt: dict[str, Any], source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A foreign checkpoint (as read by ``torch.load``) -> ``(state, meta)`` in our format:
    ``meta`` has ``model_name`` (our registered model of the same architecture, identified by
    the tensor shapes; None when no registered size has them), ``found`` (that architecture, in
    words), ``model_args`` (what the checkpoint records: image size, masking, loss),
    ``source_model``, ``conversion`` (dropped source key -> why) and ``assumed`` (option the
    checkpoint does not record -> what is used)."""
    state = _state_of(ckpt)
    args = _args_of(ckpt)
    if not state:
        raise CheckpointError(f"{source} holds no weights (its 'model' entry has no tensors)")
    if any(k.startswith("encoder.layers.") or "relative_position_bias_table" in k for k in state):
        raise CheckpointError(
            f"{source} is a checkpoint of the SimMIM code base (Swin with relative position bias tables, "
            f"'encoder.layers.*'); ummae's Swin is the UM-MAE variant with a pos-MLP bias, another architecture: "
            f"these weights cannot be mapped. SimMIM baselines trained with the UM-MAE code (simmim_swin_tiny_256) convert."
        )
    family = _family(state, source)
    kind = _kind(state)
    out: dict[str, Tensor] = {}
    dropped: dict[str, str] = {}
    unmapped: list[str] = []
    stage_of = _stage_index(state) if family != "vit" else {}

    for k, v in state.items():
        mapped = _map_key(k, v, family, kind, stage_of)
        if mapped is None:
            unmapped.append(k)
        elif mapped is not _LATER:
            out[mapped[0]] = mapped[1]
    if unmapped:
        raise CheckpointError(
            f"{source}: {len(unmapped)} keys of this {family} {kind} checkpoint cannot be mapped onto ummae's model "
            f"(e.g. {', '.join(sorted(unmapped)[:5])})"
        )
    _pos_tables(state, family, kind, out, dropped, source)
    notes: dict[str, str] = {}
    name, found = _our_model(family, kind, state, stage_of, source)
    meta = {
        "model_name": name,
        "found": found,
        "model_args": _model_args(args, family, kind, state, notes),
        "source_model": f"{args.get('model', family)} (reference checkpoint)",
        "conversion": dropped,
        "assumed": notes,
    }
    return out, meta


# --- detection ---------------------------------------------------------------------------------


def _family(state: dict[str, Tensor], source: str) -> str:
    if any(".attn.posmlp." in k for k in state):
        return "swin"
    if any(".attn.sr." in k for k in state):
        return "pvt"
    if "cls_token" in state:
        return "vit"
    raise CheckpointError(
        f"{source}: cannot tell the model from its keys (no Swin pos-MLP, PVT spatial reduction or ViT cls token; "
        f"first keys: {', '.join(list(state)[:5])}); it is not a UM-MAE, MAE or SimMIM (UM-MAE code) checkpoint"
    )


def _kind(state: dict[str, Tensor]) -> str:
    if "decoder_embed.weight" in state:
        return "mae"
    if "decoder_pred.weight" in state:
        return "simmim"
    if "head.weight" in state or "fc_norm.weight" in state:
        return "classifier"
    return "encoder"


def _stage_index(state: dict[str, Tensor]) -> dict[int, tuple[int, int]]:
    """Flat block index -> (stage, index in stage): a stage starts at each block that holds
    the down-sampling layer."""
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    starts = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.downsample\.", k))}
    out, stage, j = {}, 0, 0
    for i in blocks:
        if i in starts:
            stage, j = stage + 1, 0
        out[i] = (stage, j)
        j += 1
    return out


# --- key mapping ---------------------------------------------------------------------------------

_LATER = object()  # position tables: checked / converted by _pos_tables
# The layers a block of each family has in the reference (anything else has no place in ours).
_VIT_BLOCK = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
_BLOCK = {
    "vit": _VIT_BLOCK,
    "swin": r"(norm1|norm2|attn\.qkv|attn\.proj|attn\.posmlp\.[02]|mlp\.fc1|mlp\.fc2|downsample\.norm|downsample\.proj)\.(weight|bias)",
    "pvt": r"(norm1|norm2|attn\.q|attn\.kv|attn\.proj|attn\.sr|attn\.norm|mlp\.fc1|mlp\.fc2|downsample\.proj)\.(weight|bias)",
}
_DECODER = {"decoder_norm": "decoder.norm", "decoder_pred": "decoder.pred", "decoder_embed": "decoder_embed"}


def _map_key(k: str, v: Tensor, family: str, kind: str, stage_of) -> tuple[str, Tensor] | object | None:
    """``(our key, tensor)``, ``_LATER`` for position tables, None if there is no place for it."""
    if k in ("pos_embed", "decoder_pos_embed"):
        return _LATER
    if k == "cls_token":
        return "encoder.cls_token", v
    if k == "vis_mask_token":
        return "sm_token", v.reshape(-1)
    if k == "mask_token":
        return ("mask_token", v.reshape(-1)) if kind == "simmim" else ("decoder.mask_token", v)
    if k.startswith("patch_embed.proj."):
        return "encoder." + k, v
    if k.startswith("patch_embed.norm."):
        return "encoder.patch_norm." + k.rsplit(".", 1)[1], v
    if k.startswith("norm."):
        return "encoder." + k, v
    if k.startswith(("fc_norm.", "head.")):
        return k, v
    m = re.match(r"decoder_blocks\.(\d+)\.(.+)$", k)
    if m is not None:
        return (f"decoder.blocks.{m.group(1)}.{m.group(2)}", v) if re.fullmatch(_VIT_BLOCK, m.group(2)) else None
    top, _, leaf = k.partition(".")
    if top in _DECODER and leaf in ("weight", "bias"):
        return ("decoder." + leaf if kind == "simmim" and top == "decoder_pred" else f"{_DECODER[top]}.{leaf}"), v
    m = re.match(r"blocks\.(\d+)\.(.+)$", k)
    if m is None:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if not re.fullmatch(_BLOCK[family], rest):
        return None
    if family == "vit":
        return f"encoder.blocks.{i}.{rest}", v
    s, j = stage_of[i]
    if rest.startswith("downsample."):
        layer, leaf = rest[len("downsample.") :].split(".", 1)
        layer = {"proj": "reduction" if family == "swin" else "proj", "norm": "norm"}[layer]
        return f"encoder.downsamples.{s - 1}.{layer}.{leaf}", v
    if rest.startswith("attn.posmlp."):  # 1x1 convs [out, in, 1, 1] -> Linear [out, in]
        rest = rest.replace("attn.posmlp.", "attn.pos_bias.mlp.")
        v = v.reshape(v.shape[0], -1) if v.ndim == 4 else v
    if family == "pvt":
        rest = re.sub(r"^attn\.norm\.", "attn.sr_norm.", rest)
    return f"encoder.stages.{s}.{j}.{rest}", v


def _grid_of(length: int, source: str, key: str) -> int:
    g = math.isqrt(length)
    if g * g != length:
        raise CheckpointError(f"{source}: {key} has {length} positions, not a square grid")
    return g


def _check_fixed(table: Tensor, want: Tensor, key: str, source: str) -> None:
    diff = (table.float() - want).abs().max().item()
    if diff > _FIXED_TABLE_TOL:
        raise CheckpointError(
            f"{source}: the frozen table {key} differs from the 2-D sin-cos embedding by {diff:.3g}; the weights were "
            f"trained with another position embedding, which ummae does not reproduce"
        )


def _pos_tables(state, family, kind, out, dropped, source) -> None:
    """Check fixed sin-cos tables (dropped: we compute them) and convert learnable ones."""
    if "decoder_pos_embed" in state:
        t = state["decoder_pos_embed"][0]
        extra = 1 if family == "vit" else 0  # MAE's ViT decoder has a cls slot, position 0
        g = _grid_of(t.shape[0] - extra, source, "decoder_pos_embed")
        want = sincos_grid(g, g, t.shape[1])
        if extra:
            want = torch.cat([torch.zeros(1, t.shape[1]), want])
        _check_fixed(t, want, "decoder_pos_embed", source)
        dropped["decoder_pos_embed"] = "fixed 2-D sin-cos of the decoder (checked: equal to ours, which computes it)"
    if "pos_embed" not in state:
        return
    t = state["pos_embed"][0]
    extra = 1 if family == "vit" else 0
    g = _grid_of(t.shape[0] - extra, source, "pos_embed")
    if kind == "classifier":  # learnable in fine-tuning
        if extra:
            out["encoder.pos_embed_cls"] = t[:1].reshape(1, 1, -1)
        out["encoder.pos_embed"] = t[extra:].reshape(g, g, -1)
        return
    want = sincos_grid(g, g, t.shape[1])
    if extra:
        want = torch.cat([torch.zeros(1, t.shape[1]), want])
    _check_fixed(t, want, "pos_embed", source)
    dropped["pos_embed"] = "fixed 2-D sin-cos of the encoder (checked: equal to ours, which computes it)"


# --- which of our models, built how -----------------------------------------------------------


_METHOD = {"mae": "UM-MAE", "simmim": "SimMIM", "classifier": "classifier", "encoder": "classifier"}


def _our_model(family, kind, state, stage_of, source) -> tuple[str | None, str]:
    """Our registered model of the checkpoint's architecture, found by matching its tensor
    shapes against the registered families' tables (the checkpoint's ``args.model`` names the
    reference's function, which a run may have resized: the tensors are what holds), or None
    when no registered size has them; and what the shapes show, in words. An encoder-only or
    classifier checkpoint names the classifier."""
    found = _signature(family, state, stage_of)
    decoder = _decoder_shape(state) if kind == "mae" else None
    names = matching_models(family, _METHOD[kind], found, decoder)
    text = _found_text(family, kind, found, decoder)
    if len(names) > 1:
        raise CheckpointError(f"{source}: {text} fits several registered models ({', '.join(names)}); name one")
    return (names[0] if names else None), text


def _shape(state, key: str) -> tuple[int, ...] | None:
    return tuple(state[key].shape) if key in state else None


def _signature(family, state, stage_of) -> dict[str, Any]:
    """The shape-visible facts of the checkpoint's encoder, in the form of
    ``ummae.models.family.Signature``: the stages' widths, blocks, heads (Swin's pos-MLP
    outputs; None where the tensors do not show them) and MLP widths."""
    if family == "vit":
        stage_of = {int(m.group(1)): (0, 0) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    blocks: dict[int, list[int]] = defaultdict(list)
    for i, (s, _) in sorted(stage_of.items()):
        blocks[s].append(i)
    stages = []
    for s in sorted(blocks):
        first = f"blocks.{blocks[s][0]}"
        heads = _shape(state, f"{first}.attn.posmlp.2.weight")
        stages.append(
            (
                (_shape(state, f"{first}.norm1.weight") or (None,))[0],
                len(blocks[s]),
                heads[0] if heads else None,
                (_shape(state, f"{first}.mlp.fc1.weight") or (None,))[0],
            )
        )
    pos = _shape(state, "blocks.0.attn.posmlp.0.weight")
    patch = _shape(state, "patch_embed.proj.weight")
    return dict(patch=patch[-1] if patch else None, stages=tuple(stages), pos_hidden=pos[0] if pos else None)


def _decoder_shape(state) -> tuple[int, int] | None:
    """(width, blocks) of a pre-training checkpoint's decoder."""
    norm = _shape(state, "decoder_norm.weight")
    depth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
    return (norm[0], depth) if norm else None


def _found_text(family, kind, found, decoder) -> str:
    """``a swin mae checkpoint (patch 4; stages width x blocks x heads x MLP: 96x2x3x384, ...)``"""
    stages = ", ".join("x".join("?" if v is None else str(v) for v in st) for st in found["stages"])
    text = f"a {family} {kind} checkpoint (patch {found['patch']}; stages width x blocks x heads x MLP: {stages}"
    if found["pos_hidden"] is not None:
        text += f"; pos-MLP width {found['pos_hidden']}"
    if decoder is not None:
        text += f"; decoder {decoder[0]}-d, {decoder[1]} blocks"
    return text + ")"


def _model_args(args, family, kind, state, notes: dict[str, str]) -> dict[str, Any]:
    """Our model options from the checkpoint's ``args``; what they do not record is said in
    ``notes`` (option -> what is used instead), never filled in silently."""
    out: dict[str, Any] = {}
    if args.get("input_size"):
        out["img_size"] = int(args["input_size"])
    else:
        notes["img_size"] = "not recorded: the model's default input size"
    if kind == "classifier" and "head.weight" in state:
        out["num_classes"] = state["head.weight"].shape[0]
    if kind == "mae":
        uniform = bool(args.get("mask_regular", False))
        out["sampling"] = "uniform" if uniform else "random"
        if not uniform and "mask_ratio" in args:
            out["mask_ratio"] = float(args["mask_ratio"])
        if "vis_mask_ratio" in args:
            out["sm_ratio"] = float(args["vis_mask_ratio"])
        elif "vis_mask_token" in state:
            out["sm_ratio"] = 0.25
            notes["sm_ratio"] = "not recorded, but the checkpoint has an SM token: the paper's 0.25"
        else:
            out["sm_ratio"] = 0.0  # no SM token: MAE's code base, or UM without SM
        if "norm_pix_loss" in args:
            out["norm_pix_loss"] = bool(args["norm_pix_loss"])
        else:
            notes["norm_pix_loss"] = "not recorded: the model's default (on)"
        if family != "vit":
            # The reference's decoder learned its own (flawed) visible-token positions.
            out["decoder_pos"] = "reference"
    elif kind == "simmim" and "mask_ratio" in args:
        out["mask_ratio"] = float(args["mask_ratio"])
    return out


def describe(meta: dict[str, Any]) -> str:
    """Lines for the key report: what the conversion dropped and why, grouped, and the options
    the checkpoint did not record."""
    groups: dict[str, list[str]] = defaultdict(list)
    for k, why in meta.get("conversion", {}).items():
        groups[why].append(k)
    lines = [f"  {', '.join(ks)}: {why}" for why, ks in groups.items()]
    lines += [f"  option {k}: {why}" for k, why in meta.get("assumed", {}).items()]
    return "\n".join(lines)
