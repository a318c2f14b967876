"""Writing our formats from weights: ``ummae export`` (the inference weights as safetensors,
named for ours and timm's ``ummae_<name>``) and ``ummae convert`` (a reference checkpoint as an
ummae checkpoint or export). Every file is written atomically (:func:`.io.write_atomic`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from ummae.models.classifier import classifier_for
from ummae.models.registry import create_model, list_models, model_kind
from ummae.weights import io as ckpt
from ummae.weights.build import build_from_weights
from ummae.weights.convert import convert_checkpoint, is_foreign
from ummae.weights.io import CheckpointError
from ummae.weights.load import model_args_within_bounds, read_weights

log = logging.getLogger("ummae")

EXPORT_FORMAT = "ummae-weights-1"


def export(checkpoint: str | Path, output: str | Path, encoder_only: bool = False, ema: bool = False) -> dict[str, str]:
    """Write the inference weights of an ummae checkpoint as safetensors: the encoder of a
    pre-training checkpoint (decoder and masking tokens dropped), or a whole fine-tuned
    classifier (``encoder_only`` strips its head; ``ema``: its EMA weights). The metadata names the classifier that
    loads it (ours and timm's ``ummae_<name>``) and the model options."""
    state, meta = read_weights(checkpoint, ema)
    name = meta.get("model_name")
    if name is None or name not in list_models():
        raise CheckpointError(f"{checkpoint} does not name a registered ummae model (found {name!r})")
    check_weights_fit(state, meta, checkpoint)
    return write_export(state, meta, output, encoder_only, "ema" if ema else "raw")


def check_weights_fit(state: dict[str, torch.Tensor], meta: dict[str, Any], path) -> None:
    """The tensors must be those of the model the file names (built with its recorded options),
    so that nothing with the wrong shapes is passed on under that name."""
    name = meta["model_name"]
    args = model_args_within_bounds(meta.get("model_args") or {}, path)
    if model_kind(name) == "classify":
        args = {k: v for k, v in args.items() if k in ("img_size", "window_size", "sr_ratios", "num_classes")}
        if "head.weight" in state:
            args["num_classes"] = state["head.weight"].shape[0]
    own = create_model(name, **args).state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    # an encoder export keeps pre-training's final norm, which a classifier replaces (fc_norm)
    unknown = [k for k in state if k not in own and not k.startswith("encoder.norm.")]
    if bad or unknown:
        raise CheckpointError(
            f"{path} does not hold weights of {name}: "
            + "; ".join(
                ([f"{len(bad)} of another shape (e.g. {', '.join(bad[:2])})"] if bad else [])
                + ([f"{len(unknown)} unknown (e.g. {', '.join(unknown[:2])})"] if unknown else [])
            )
        )


def write_export(
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    output: str | Path,
    encoder_only: bool = False,
    weights: str = "raw",
) -> dict[str, str]:
    """:func:`export` of weights already read (or converted): ``meta`` names the model."""
    name = meta["model_name"]
    pretraining = model_kind(name) == "pretrain"
    has_head = any(k.startswith("head.") for k in state)
    keep = "encoder." if (pretraining or encoder_only or not has_head) else ""
    out = {k: v.contiguous() for k, v in state.items() if k.startswith(keep)}
    classifier = classifier_for(name) if pretraining else name
    metadata = {
        "format": EXPORT_FORMAT,
        "model_name": classifier,
        "timm_model_name": f"ummae_{classifier}",
        "source_model": meta.get("source_model") or name,
        "model_args": json.dumps(meta.get("model_args", {}), sort_keys=True),
        "contents": "encoder" if keep else "classifier",
        "weights": weights,
    }
    ckpt.write_atomic(output, lambda f: f.write(safetensors_bytes(out, metadata=metadata)))
    log.info("wrote %d tensors (%s of %s) to %s", len(out), metadata["contents"], metadata["source_model"], output)
    return metadata


def convert_file(src: str, output: str, model: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``ummae convert``: a reference checkpoint -> our checkpoint (``.pth``: loads with
    ``--pretrained``, ``--init``, ``visualize``, ``eval``) or a safetensors export. The
    converted weights are loaded into the model they name (``model`` overrides the name the
    checkpoint's ``args`` give, for runs of other sizes) before anything is written, so a
    file that does not fit exactly is refused, not written."""
    out = Path(output)
    if out.suffix not in (".pth", ".safetensors"):
        raise CheckpointError(
            f"--output must end in .pth (an ummae checkpoint) or .safetensors (an export), got {output}"
        )
    if out.exists() and not overwrite:
        raise CheckpointError(f"{output} exists; pass --overwrite to replace it")
    ck = ckpt.load(src)
    if not is_foreign(ck):
        raise CheckpointError(
            f"{src} is already an ummae checkpoint (model {ck.get('model_name')}); nothing to convert"
        )
    state, meta = convert_checkpoint(ck, src)
    name = meta["model_name"] = model or meta["model_name"]
    if name is None:
        raise CheckpointError(
            f"{src}: cannot tell which ummae model holds these weights: {meta['found']}, which no registered model "
            f"has (its args name {meta['source_model']!r}); name one with --model (`ummae models`)"
        )
    kind = model_kind(name)
    hint = "" if model else "; for a run of another size, name the registered model that has it with --model"
    try:  # an encoder-only file leaves a classifier's head new; anything else must fit exactly
        net = build_from_weights(state, meta, src, kind, need_head=False)
    except CheckpointError as e:
        raise CheckpointError(f"the weights of {src} do not fit {name}: {e}{hint}") from None
    meta["model_args"] = net.model_args
    if out.suffix == ".safetensors":
        write_export(state, meta, out)
    else:
        ckpt.save_atomic(
            {
                "model": state,
                "model_name": name,
                "model_args": net.model_args,
                "converted_from": str(src),
                "conversion": meta["conversion"],
                "assumed": meta["assumed"],
            },
            out,
        )
    return {
        "model_name": name,
        "kind": kind,
        "tensors": len(state),
        "source_model": meta["source_model"],
        "dropped": meta["conversion"],
        "assumed": meta["assumed"],
    }
