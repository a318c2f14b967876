"""One registry of named models: ``register_model`` / ``create_model`` / ``list_models``.

A registered function takes keyword overrides and returns an ``nn.Module``. ``create_model``
is the only door: it records ``model_name`` and ``model_args`` on the module so that
checkpoints carry what is needed to rebuild it (and to refuse a checkpoint of another model).
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Dict, List

import torch.nn as nn
from ummae.errors import UsageError

_MODELS: Dict[str, Callable[..., nn.Module]] = {}
_KINDS: Dict[str, str] = {}


def register_model(kind: str) -> Callable:
    """Decorator: register ``fn`` under its own name. ``kind`` is 'pretrain' or 'classify'."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        _KINDS[name] = kind
        return fn

    return wrap


def _ensure_loaded() -> None:
    # Importing the model modules runs their @register_model decorators.
    from ummae.models import classifier, zoo  # noqa: F401


def list_models(pattern: str = "*", kind: str | None = None) -> List[str]:
    _ensure_loaded()
    return sorted(
        n for n in _MODELS if fnmatch.fnmatch(n, pattern) and (kind is None or _KINDS[n] == kind)
    )


def model_kind(name: str) -> str:
    _ensure_loaded()
    _check_name(name)
    return _KINDS[name]


def _check_name(name: str) -> None:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown model {name!r}.{hint} `ummae models` lists the registered ones.")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; ``None``-valued kwargs mean "the model's default"."""
    _ensure_loaded()
    _check_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = _MODELS[name](**kwargs)
    model.model_name = name
    # Record the resolved options (defaults included), so that an option given explicitly
    # with its default value is recognised as the same model.
    resolved = model.options() if hasattr(model, "options") else {}
    model.model_args = {**kwargs, **resolved}
    return model
