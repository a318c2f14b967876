"""The one resolution of a command's config: every option from the highest level that sets it,
then frozen, with the source of every value in its provenance (:func:`resolve`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ummae.config.fields import FLAG, RESUMED, WEIGHTS, Provenance
from ummae.config.recipes import split_recipe_batch
from ummae.config.resume import settings_from_checkpoint

# ``weights(values) -> {option: value}``: what a command derives from the weights files its
# options name (the classifier --pretrained holds, when --model is left out)
FromWeights = Callable[[dict[str, Any]], dict[str, Any]]


def resolve(cfg, world_size: int = 1, weights: FromWeights | None = None, logger=None):
    """``(config, recipe lines)``: ``cfg`` resolved, once, in this order, each level over the
    ones before it:

    1. the defaults (the dataclass fields'; source ``default``);
    2. ``--config``: a recipe's values (``recipe NAME``) or a YAML file's (``config FILE``),
       and a recipe's total batch split over ``world_size`` processes (the batch size and
       accumulation the flags leave out: ``recipe NAME over N processes``; derived, not given:
       a run resumed on another number of processes keeps the split it was started with);
    3. the flags (``flag``);
    4. the resumed run's settings (``--resume``; ``resumed run``): every option the user left
       out (levels 1 and the split) takes the checkpoint's value; one the user set (2, 3) that
       contradicts it is refused, unless a resumed run may change it (``MAY_CHANGE_ON_RESUME``:
       then the value given stays, and the change is logged);
    5. values derived from the weights files the options name (``weights``), the last: the
       classifier ``--pretrained`` holds when ``--model`` is left out.

    Levels 1 to 3 are the user's config (:func:`ummae.config.flags.config_from_args`, which
    records them in ``cfg.provenance``); a config built in code counts its values that are not
    the defaults as flags. The result is a new frozen config of the same class, validated,
    whose provenance names the source of every value. The recipe lines (the split, the flags
    that override the recipe) are returned for the run's log; the resumed settings go to
    ``logger`` at once. Resolving a resolved config again gives the same config."""
    cfg.validate()
    provenance = cfg.provenance if cfg.provenance != Provenance() else _built_in_code(cfg)
    cfg = dataclasses.replace(cfg, provenance=provenance)
    values, sources = cfg.option_values(), dict(provenance.sources)
    split, lines = split_recipe_batch(cfg, world_size)
    _take(values, sources, split, f"recipe {provenance.recipe} over {world_size} processes")
    given = dataclasses.replace(provenance, sources=sources).given()  # not the split: a resumed run keeps its own
    _take(values, sources, settings_from_checkpoint(cfg, values, given, logger), RESUMED)
    if weights is not None:
        derived = weights(dict(values))
        _take(values, sources, {k: v for k, v in derived.items() if v != values[k]}, WEIGHTS)
    out = type(cfg)(**values, provenance=dataclasses.replace(provenance, sources=sources))
    out.validate()
    return out, lines


def _take(values: dict[str, Any], sources: dict[str, str], level: dict[str, Any], source: str) -> None:
    values.update(level)
    sources.update(dict.fromkeys(level, source))


def _built_in_code(cfg) -> Provenance:
    """A config built in code: the values that are not the defaults count as flags."""
    return Provenance({f.name: FLAG for f in cfg.options() if getattr(cfg, f.name) != f.default})
