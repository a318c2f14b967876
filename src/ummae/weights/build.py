"""The one door from a checkpoint to a model (as timm's builder with its
``checkpoint_filter_fn``): :func:`build_from_checkpoint` reads the file (ours with
``weights_only``, a safetensors export, or a reference checkpoint converted on the fly), checks
that it holds a model of the kind the command takes, bounds the options it records, rebuilds
that model through the registry with them (plus the caller's overrides) and loads it strictly.

Every command that turns a checkpoint into a model goes through it: ``eval`` / ``predict`` of
each task, ``visualize``, ``convert``. Weights carried INTO a new model (``--pretrained``:
a classifier or a dense backbone) go through the other door, :func:`.load.load_pretrained`,
which adapts rather than rebuilds; ``pretrain --init`` loads into the model it trains with
:func:`load_strict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ummae.detector_specs import recorded_options
from ummae.models.registry import create_model, model_kind
from ummae.weights.io import CheckpointError, load_state_strict
from ummae.weights.load import LoadReport, load_weights, model_args_within_bounds, read_weights

KINDS = ("pretrain", "classify", "detect", "segment")
State = dict[str, torch.Tensor]


class WrongKindError(CheckpointError):
    """The file holds no model of the kind asked for (another kind, or no registered model)."""


def build_from_checkpoint(
    path: str | Path, kind: str, *, ema: bool = False, name: str | None = None, **overrides: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, meta)``: the ``kind`` model the checkpoint at ``path`` holds, rebuilt with
    its recorded options (``overrides`` win; None means "as recorded") and loaded strictly.
    ``ema``: a fine-tuning checkpoint's EMA weights; ``name``: the registered model to build
    (default: the one the file records)."""
    state, meta = read_weights(path, ema)
    return build_from_weights(state, meta, path, kind, name=name, **overrides), meta


def build_from_weights(
    state: State,
    meta: dict[str, Any],
    path: str | Path,
    kind: str,
    *,
    name: str | None = None,
    need_head: bool = True,
    **overrides: Any,
) -> nn.Module:
    """:func:`build_from_checkpoint` of weights already read (or converted) from ``path``.
    ``need_head`` (classifiers): refuse a file without a trained head (eval); False builds
    the classifier with a new head (an encoder-only file, for ``ummae convert``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; one of {KINDS}")
    name = name or meta.get("model_name")
    _check_kind(state, meta, path, kind, name, need_head)
    args = model_args_within_bounds(meta.get("model_args") or {}, path)
    options = {**_rebuild_options(kind, args, state), **{k: v for k, v in overrides.items() if v is not None}}
    model = create_model(name, **options)
    if kind == "classify" and "head.1.weight" in state:
        model.use_probe_head()
    load_strict(model, state, meta, path, kind, need_head)
    return model


def load_strict(
    model: nn.Module, state: State, meta: dict[str, Any], path: str | Path, kind: str, need_head: bool = True
) -> LoadReport | None:
    """Every tensor of ``model`` from ``state`` and nothing else, the key differences in the
    error otherwise. A classifier may take a position table of another size (resized, as
    fine-tuning does): its report says so."""
    if kind != "classify":
        load_state_strict(model, state, path)
        return None
    report = load_weights(model, state, meta, path)
    if report.dropped or (need_head and report.new):
        raise CheckpointError(f"{path} does not hold a complete {model.model_name} classifier:\n{report.format()}")
    return report


def _rebuild_options(kind: str, args: dict[str, Any], state: State) -> dict[str, Any]:
    """The recorded options a model is rebuilt with. A classifier: its head's classes (a
    probe's head is added after), its size and the options without weights (Swin window,
    PVT spatial reduction); the rest (stochastic depth, head dropout) is for training."""
    if kind in ("detect", "segment"):
        # written before the projections and the position table were recorded (issue 25):
        # LayerNorm + Linear in both tasks, a PVT table built at the input size
        old_forms: dict[str, Any] = {"neck": "ln_linear"}
        if any(k.endswith("encoder.pos_embed") for k in state):
            old_forms["pos_embed_mode"] = "resize"
        # a detector's options written before they were (issue 34): as it was trained
        return {**old_forms, **(recorded_options(args) if kind == "detect" else args)}
    if kind != "classify":
        return dict(args)
    options = {k: args[k] for k in ("img_size", "window_size", "sr_ratios", "num_classes") if k in args}
    for head in ("head.weight", "head.1.weight"):
        if head in state:
            options["num_classes"] = state[head].shape[0]
    return options


def _check_kind(state: State, meta: dict[str, Any], path, kind: str, name: str | None, need_head: bool) -> None:
    if kind == "classify" and need_head and "head.weight" not in state and "head.1.weight" not in state:
        raise WrongKindError(
            f"{path} holds no classifier head (model {meta.get('source_model') or meta.get('model_name')}): it is a "
            f"pre-training or encoder-only file; fine-tune it (`ummae finetune --pretrained`) or use `ummae knn`"
        )
    found = _kind_of(name)
    if found == kind:
        if kind == "pretrain" and not any(k.startswith("decoder") for k in state):
            raise WrongKindError(f"{path} holds the weights of {name} without its decoder")
        return
    if kind in ("detect", "segment"):
        raise WrongKindError(
            f"{path} is not a checkpoint of `ummae {kind} train` (it holds {name or 'no model name'}); "
            f"a backbone checkpoint goes to `ummae {kind} train --pretrained`"
        )
    if found is None:
        raise WrongKindError(f"{path} does not name a registered ummae model (found {name!r})")
    if kind == "pretrain" and found == "classify":
        raise WrongKindError(
            f"{path} is a checkpoint of the classifier {name} (fine-tuning or probing), which has no decoder"
        )
    raise WrongKindError(f"{path} holds a {found} model ({name}), not a {kind} one")


def _kind_of(name: Any) -> str | None:
    """The kind of the model ``name`` (None: not a registered model)."""
    if not isinstance(name, str):
        return None
    try:
        return model_kind(name)
    except ValueError:
        return None
