"""Carrying pre-trained weights into a classifier, and exporting them.

Sources: an ummae checkpoint (``.pth``: pre-training, UM-MAE / MAE / SimMIM, or fine-tuning)
read with ``weights_only=True``, or a ``.safetensors`` file written by :func:`export`.

What changes between pre-training and fine-tuning (METHOD.md), and how the load handles it:

* decoder, SM token, SimMIM mask token: pre-training only, dropped;
* the encoder's final norm: replaced by the norm after pooling (``fc_norm``), dropped;
* Swin window 8 -> 16: the pos-MLP bias is a function of offsets, nothing to convert;
* PVT sr 4-2-1-1 -> 8-4-2-1: pooling has no weights, nothing to convert;
* PVT / ViT fixed sin-cos position -> learnable table: the table starts as that same sin-cos
  (new in the report); a learnable table of another size (a fine-tuned checkpoint used at
  another image size) is resized bicubically (adapted);
* head: new, unless the source is a classifier with the same number of classes.

Anything else that differs (another family, depth or width) is refused with the differences
named: a silent partial load would look like a pre-trained run and train like a scratch one.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from ummae.weights.convert import convert_checkpoint, describe, is_foreign
from ummae.weights import io as ckpt
from ummae.weights.io import CheckpointError
from ummae.models.layers import resize_pos_table
from ummae.models.registry import list_models, model_kind

log = logging.getLogger("ummae")

EXPORT_FORMAT = "ummae-weights-1"
_HEAD_PREFIXES = ("fc_norm.", "head.")


def _is_pos_table(key: str) -> bool:
    return key.startswith("encoder.pos_embed")


@dataclass
class LoadReport:
    """Exactly what a load did with every key (checked by tests, printed by the commands)."""

    source: str
    source_model: str | None
    converted: str = ""  # what the conversion of a reference checkpoint dropped, and why
    loaded: List[str] = field(default_factory=list)
    adapted: Dict[str, str] = field(default_factory=dict)  # key -> how
    new: Dict[str, str] = field(default_factory=dict)  # key -> how initialised
    dropped: Dict[str, str] = field(default_factory=dict)  # source key -> why

    def format(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} (model {self.source_model})"]
        if self.converted:
            lines += ["converted from the reference layout (ummae.weights.convert): source tensors not carried over, options not recorded:",
                      self.converted]
        for title, items in (("adapted", self.adapted), ("newly initialised", self.new), ("dropped", self.dropped)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {k}: {why}" for k, why in _group(items).items()]
        return "\n".join(lines)


def _group(items: Dict[str, str]) -> Dict[str, str]:
    """Collapse ``decoder.blocks.0.attn.qkv.weight`` ... into ``decoder.*`` lines per reason."""
    out: Dict[str, str] = {}
    counts: Dict[Tuple[str, str], int] = {}
    for k, why in items.items():
        top = k.split(".")[0]
        group = k if top in ("encoder",) or "." not in k else f"{top}.*"
        counts[(group, why)] = counts.get((group, why), 0) + 1
    for (group, why), n in counts.items():
        out[group] = why if n == 1 else f"{why} ({n} tensors)"
    return out


def read_weights(path: str | Path, ema: bool = False, tensors: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(state_dict, meta)`` of an ummae ``.pth`` checkpoint or exported ``.safetensors``, or
    of a reference (UM-MAE / MAE code base) checkpoint converted to ours (:mod:`ummae.weights.convert`);
    ``meta`` has ``model_name`` and ``model_args`` when the file records them. ``ema``: the
    EMA weights a fine-tuning run with ``--ema`` keeps beside the raw ones. ``tensors=False``:
    ``meta`` without reading the weights (a safetensors file's header; a ``.pth`` mapped, not
    loaded), for commands that only need to know what the file holds."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        if ema:
            raise CheckpointError(f"{path} is an exported file with one set of weights; --ema applies to fine-tuning checkpoints (.pth)")

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
        info: Dict[str, Any] = {"model_name": meta.get("model_name"), "source_model": meta.get("source_model"),
                                "contents": meta.get("contents")}
        if "model_args" in meta:
            try:
                info["model_args"] = json.loads(meta["model_args"])
            except ValueError:
                info["model_args"] = None
            if not isinstance(info["model_args"], dict):
                raise CheckpointError(f"{path}: its metadata model_args is not a JSON mapping of options")
        return state, info
    ck = ckpt.load(path, mmap=not tensors)
    if is_foreign(ck):  # the reference's / MAE's published weights: converted on the fly
        if ema:
            raise CheckpointError(f"{path} is a reference checkpoint with one set of weights; --ema applies to ummae fine-tuning checkpoints")
        return convert_checkpoint(ck, str(path))
    if ema and "ema" not in ck:
        raise CheckpointError(f"{path} holds no EMA weights (its run was not started with --ema)")
    return ck["ema" if ema else "model"], {"model_name": ck.get("model_name"), "model_args": ck.get("model_args", {}),
                         "source_model": ck.get("model_name")}


def log_load_report(report: "LoadReport | None", out: Path, what: str = "the model") -> None:
    """A run's record of its ``--pretrained`` load: the report in the log and in
    ``pretrained_load.txt`` of its folder (rank 0 only)."""
    if report is None:
        log.info("no --pretrained: %s starts from scratch", what)
        return
    text = report.format()
    log.info("pre-trained weights:\n%s", text)
    (Path(out) / "pretrained_load.txt").write_text(text + "\n")


def load_pretrained(model: nn.Module, path: str | Path, ema: bool = False) -> LoadReport:
    """Load pre-trained (or fine-tuned) weights into classifier ``model``; see the module doc."""
    return load_weights(model, *read_weights(path, ema), path)


def load_weights(model: nn.Module, state: Dict[str, torch.Tensor], meta: Dict[str, Any], path: str | Path) -> LoadReport:
    """:func:`load_pretrained` of weights already read by :func:`read_weights` from ``path``."""
    source_model = meta.get("source_model") or meta.get("model_name")
    report = LoadReport(str(path), source_model, describe(meta))
    own = model.state_dict()
    target_name = getattr(model, "model_name", type(model).__name__)
    merged = dict(own)
    missing, unexpected, shapes = [], [], []

    for k, v in state.items():
        if not k.startswith("encoder."):
            if k.startswith(_HEAD_PREFIXES):
                if k in own and own[k].shape == v.shape:
                    merged[k] = v
                    report.loaded.append(k)
                elif k in own:
                    report.dropped[k] = f"shape {tuple(v.shape)} vs the model's {tuple(own[k].shape)} (other classes)"
                else:
                    report.dropped[k] = "a head of another form (e.g. a linear probe's): the model's head is new"
            else:
                report.dropped[k] = "pre-training only (decoder / masking token)"
            continue
        if k.startswith("encoder.norm."):
            report.dropped[k] = "the encoder's final norm: the classifier norms pooled features (fc_norm)"
            continue
        if k not in own:
            unexpected.append(k)
        elif own[k].shape == v.shape:
            merged[k] = v
            report.loaded.append(k)
        elif _is_pos_table(k) and v.ndim == own[k].ndim == 3 and v.shape[-1] == own[k].shape[-1]:
            h, w = own[k].shape[:2]
            merged[k] = resize_pos_table(v, h, w)
            report.adapted[k] = f"position table resized {v.shape[0]}x{v.shape[1]} -> {h}x{w} (bicubic)"
        else:
            shapes.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")

    done = set(report.loaded) | set(report.adapted)
    for k in own:
        if k in done:
            continue
        if k == "encoder.pos_embed_cls" and k not in state:
            report.new[k] = "the cls token's learnable position, initialised to 0 (its fixed position in pre-training)"
        elif _is_pos_table(k) and k not in state:
            report.new[k] = "learnable position table, initialised to the fixed sin-cos it replaces"
        elif k.startswith(_HEAD_PREFIXES):
            report.new[k] = "head (weights: trunc normal std 2e-5, bias 0)" if k.startswith("head.") else "fc_norm (1, 0)"
        elif k.startswith("encoder.") and k not in state:
            missing.append(k)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} encoder tensors missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(
            f"{path} holds the encoder of {source_model or 'an unknown model'}, which does not match {target_name}: "
            f"{'; '.join(parts)}{_suggest(source_model)}"
        )
    model.load_state_dict(merged)
    return report


def _suggest(source_model: str | None) -> str:
    from ummae.models.classifier import classifier_for

    try:
        return f". Its classifier is {classifier_for(source_model)}" if source_model else ""
    except ValueError:
        return ""


def export(checkpoint: str | Path, output: str | Path, encoder_only: bool = False, ema: bool = False) -> Dict[str, str]:
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


def check_weights_fit(state: Dict[str, torch.Tensor], meta: Dict[str, Any], path) -> None:
    """The tensors must be those of the model the file names (built with its recorded options),
    so that nothing with the wrong shapes is passed on under that name."""
    from ummae.models.registry import create_model

    name = meta["model_name"]
    args = model_args_within_bounds(meta.get("model_args") or {}, path)
    if model_kind(name) == "classify":
        args = {k: v for k, v in args.items() if k in ("img_size", "window_size", "sr_ratios", "num_classes")}
        if "head.weight" in state:
            args["num_classes"] = state["head.weight"].shape[0]
    own = create_model(name, **args).state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    # an encoder export keeps pre-training's final norm, which a classifier replaces (fc_norm)
    unknown = [k for k in state if k not in own and not k.startswith("encoder.norm.")]
    if bad or unknown:
        raise CheckpointError(f"{path} does not hold weights of {name}: " + "; ".join(
            ([f"{len(bad)} of another shape (e.g. {', '.join(bad[:2])})"] if bad else [])
            + ([f"{len(unknown)} unknown (e.g. {', '.join(unknown[:2])})"] if unknown else [])))


MAX_IMG_SIZE = 2048  # what a checkpoint's recorded options may ask a model to be built at


def model_args_within_bounds(args: Dict[str, Any], path) -> Dict[str, Any]:
    """Options read from a checkpoint are untrusted input too: refuse sizes no real run has
    (a 4096 px model would take many GB before anything is checked)."""
    size = args.get("img_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 16 <= size <= MAX_IMG_SIZE):
        raise CheckpointError(f"{path} records img_size={size!r}; a model is built only at 16 to {MAX_IMG_SIZE} px")
    return args


def write_export(state: Dict[str, torch.Tensor], meta: Dict[str, Any], output: str | Path, encoder_only: bool = False,
                 weights: str = "raw") -> Dict[str, str]:
    """:func:`export` of weights already read (or converted): ``meta`` names the model."""
    from safetensors.torch import save_file

    from ummae.models.classifier import classifier_for

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
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    save_file(out, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the usual file mode, as checkpoints get
    tmp.replace(output)  # atomic, like every checkpoint we write
    log.info("wrote %d tensors (%s of %s) to %s", len(out), metadata["contents"], metadata["source_model"], output)
    return metadata
