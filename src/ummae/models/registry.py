"""One registry of named models: ``register_model`` / ``create_model`` / ``list_models``.

A registered function takes keyword overrides and returns an ``nn.Module``. ``create_model``
is the only door: it records ``model_name`` and ``model_args`` on the module so that
checkpoints carry what is needed to rebuild it (and to refuse a checkpoint of another model).

Two sorts of names:

* whole models, kind ``pretrain`` or ``classify`` (``mae_swin_tiny_256``, ``swin_tiny_256``);
* dense-task heads, kind ``detect`` or ``segment`` (``gfl``, ``upernet``): a model of theirs is
  named ``<head>_<backbone>`` after the registered classifier whose encoder it runs on
  (``gfl_swin_tiny_256``), and the head's function gets ``backbone=`` from the name.

The registered functions are in the family files (swin.py, pvt.py, vit.py) and the dense-task
files (detectors.py, upernet.py), which ``ummae.models`` imports.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

import torch.nn as nn

from ummae.errors import UsageError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_KINDS: dict[str, str] = {}
MODEL_KINDS = ("pretrain", "classify")
HEAD_KINDS = ("detect", "segment")  # named <head>_<backbone>


def register_model(kind: str) -> Callable:
    """Decorator: register ``fn`` under its own name; ``kind`` is one of :data:`MODEL_KINDS`
    (a whole model) or :data:`HEAD_KINDS` (a head, built on a backbone)."""
    if kind not in MODEL_KINDS + HEAD_KINDS:
        raise ValueError(f"unknown model kind {kind!r}")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        _KINDS[name] = kind
        return fn

    return wrap


def list_models(pattern: str = "*", kind: str | None = None) -> list[str]:
    """The whole models (pre-training, classifiers) matching ``pattern``; with ``kind`` a head
    kind, the heads of that kind."""
    return sorted(
        n for n in _MODELS if fnmatch.fnmatch(n, pattern) and (_KINDS[n] == kind if kind else _KINDS[n] in MODEL_KINDS)
    )


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


def create_model(name: str, **kwargs) -> nn.Module:
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
