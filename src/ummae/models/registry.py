"""One registry of named models: ``create_model`` / ``list_models`` / ``model_kind`` /
``classifier_for`` / ``markdown_table``.

A registered builder takes keyword overrides and returns an ``nn.Module``. ``create_model``
is the only door: it records ``model_name`` and ``model_args`` on the module so that
checkpoints carry what is needed to rebuild it (and to refuse a checkpoint of another model).

Two sorts of names (the kinds are :data:`ummae.choices.MODEL_KINDS` / ``HEAD_KINDS``):

* whole models, kind ``pretrain`` or ``classify`` (``mae_swin_tiny_256``, ``swin_tiny_256``),
  registered a family at a time by :func:`ummae.models.family.register_family` (swin.py,
  pvt.py, vit.py): each comes with its :class:`ModelInfo`, which says which classifier a
  pre-training model fine-tunes into (:func:`classifier_for`) and fills :func:`markdown_table`;
* dense-task heads, kind ``detect`` or ``segment`` (``gfl``, ``upernet``), registered with
  :func:`register_model`: a model of theirs is named ``<head>_<backbone>`` after the
  registered classifier whose encoder it runs on (``gfl_swin_tiny_256``), and the head's
  function gets ``backbone=`` from the name.

``ummae.models`` imports the family and dense-task files, which fills the registry.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ummae.choices import HEAD_KINDS, MODEL_KINDS
from ummae.errors import UsageError

__all__ = ["HEAD_KINDS", "MODEL_KINDS", "ModelInfo", "add_model", "classifier_for", "create_model", "list_models"]


@dataclass(frozen=True)
class ModelInfo:
    """What a family registration states about one of its models."""

    family: str  # the family's name stem: "swin"
    size: str  # the size's key in the family's table: "tiny_256"
    method: str  # "UM-MAE", "SimMIM" or "classifier"
    encoder: str  # the encoder's architecture, as the docs show it
    decoder: str  # the pre-training decoder (or the classifier's head), as the docs show it
    img_size: int  # the default input size
    classifier: str  # the classifier that carries this model's encoder (a classifier: itself)


_MODELS: dict[str, Callable[..., nn.Module]] = {}
_KINDS: dict[str, str] = {}
_INFO: dict[str, ModelInfo] = {}


def add_model(name: str, kind: str, build: Callable[..., nn.Module], info: ModelInfo | None = None) -> None:
    """Register ``build`` under ``name``; ``kind`` is one of :data:`MODEL_KINDS` (a whole model,
    with its ``info``) or :data:`HEAD_KINDS` (a head, built on a backbone)."""
    if kind not in MODEL_KINDS + HEAD_KINDS:
        raise ValueError(f"unknown model kind {kind!r}")
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    if (info is None) != (kind in HEAD_KINDS):
        raise ValueError(f"model {name!r}: a whole model is registered with its ModelInfo, a head without")
    _MODELS[name] = build
    _KINDS[name] = kind
    if info is not None:
        _INFO[name] = info


def register_model(kind: str) -> Callable:
    """Decorator: register a head's function under its own name (:func:`add_model`)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        add_model(fn.__name__, kind, fn)
        return fn

    return wrap


def list_models(pattern: str = "*", kind: str | None = None) -> list[str]:
    """The whole models (pre-training, classifiers) matching ``pattern``; with ``kind`` the
    models of that kind (a head kind: the heads)."""
    return sorted(
        n for n in _MODELS if fnmatch.fnmatch(n, pattern) and (_KINDS[n] == kind if kind else _KINDS[n] in MODEL_KINDS)
    )


def registered_kinds() -> set[str]:
    """The kinds of the registered models and heads (``ummae models --kind`` offers
    :data:`MODEL_KINDS` + :data:`HEAD_KINDS`, torch-free: a test checks they are these)."""
    return set(_KINDS.values())


def model_info(name: str) -> ModelInfo:
    """The registration's statement about a whole model; unknown names are refused."""
    entry, _ = _resolve(name)
    if entry not in _INFO:
        raise UsageError(f"{name!r} is a {_KINDS[entry]} head, not a whole model")
    return _INFO[entry]


def classifier_for(pretrain_name: str) -> str:
    """The classifier that carries a pre-training model's encoder, as its family registered it
    (``mae_swin_tiny_256`` -> ``swin_tiny_256``, ``mae_vit_base_patch16_dec512d2b`` ->
    ``vit_base_patch16``: UM-MAE, MAE and SimMIM share the encoder; the decoder does not matter)."""
    if _KINDS.get(pretrain_name) != "pretrain":
        raise UsageError(f"no classifier is registered for the encoder of {pretrain_name!r}: not a pre-training model")
    return _INFO[pretrain_name].classifier


def _resolve(name: str) -> tuple[str, dict[str, str]]:
    """The registered entry that builds ``name``, and the arguments its name gives."""
    if name in _MODELS and _KINDS[name] in MODEL_KINDS:
        return name, {}
    # <head>_<backbone>, where a head's name may have underscores itself (cascade_maskrcnn);
    # any registered backbone name resolves: the head's builder refuses one that is no classifier
    parts = name.split("_")
    for i in range(1, len(parts)):
        head, backbone = "_".join(parts[:i]), "_".join(parts[i:])
        if _KINDS.get(head) in HEAD_KINDS and _KINDS.get(backbone) in MODEL_KINDS:
            return head, {"backbone": backbone}
    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UsageError(f"unknown model {name!r}.{hint} `ummae models` lists the registered ones.")


def model_kind(name: str) -> str:
    """``pretrain``, ``classify``, ``detect`` or ``segment``; unknown names are refused."""
    return _KINDS[_resolve(name)[0]]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; ``None``-valued kwargs mean "the model's default"."""
    entry, from_name = _resolve(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for k, v in from_name.items():
        if kwargs.setdefault(k, v) != v:
            raise UsageError(f"model {name!r} is built on {k} {v!r}, not {kwargs[k]!r}")
    model = _MODELS[entry](**kwargs)
    model.model_name = name
    # Record the resolved options (defaults included), so that an option given explicitly
    # with its default value is recognised as the same model.
    resolved = model.options() if hasattr(model, "options") else {}
    model.model_args = {**kwargs, **resolved}
    return model


def parameter_count(name: str) -> int:
    """The parameters of a model as registered (a classifier with 1000 classes), counted on
    the "meta" device: shapes only, no memory, no initialisation."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name).parameters())


def markdown_table() -> str:
    """The docs' table of the whole models, from their registrations (the dense-task heads'
    models are ``<head>_<classifier>``: ``ummae models --kind detect``)."""
    rows = [
        "| name | kind | encoder | method | decoder / head | default input | params | fine-tunes as |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in list_models():
        i = _INFO[name]
        params = f"{parameter_count(name) / 1e6:.1f} M"
        rows.append(
            f"| `{name}` | {_KINDS[name]} | {i.encoder} | {i.method} | {i.decoder} | {i.img_size} | {params} "
            f"| `{i.classifier}` |"
        )
    return "\n".join(rows)
