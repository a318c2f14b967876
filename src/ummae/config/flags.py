"""Options from a YAML file and from command-line flags generated from the config's fields (one
flag per field, so nothing is declared twice), coerced to the fields' types.

Precedence: dataclass default < ``--config file.yaml`` (or a recipe) < explicit command-line flag;
the levels above those (a resumed run's settings, what the weights name) are
:func:`ummae.config.resolve.resolve`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ummae.config.fields import FLAG, Provenance
from ummae.config.recipes import RECIPES
from ummae.errors import UsageError

BUILTIN_CONFIGS = Path(__file__).parent.parent / "configs"


def _base_type(tp):
    """(python type, is_tuple) of a field annotation, unwrapping ``X | None``. ``is_tuple`` is 0
    for one value, the number of values for a fixed tuple (``tuple[int, int]``: 2) and -1 for
    one or more (``tuple[float, ...]``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is tuple:
        args = typing.get_args(tp)
        return args[0], -1 if args[-1] is Ellipsis else len(args)
    return tp, 0


def _coerce(cls, name: str, value: Any) -> Any:
    """A flag's text or a YAML value -> the field's type, refusing what would be misread: a
    missing value for a required option, a list or mapping where one value belongs, YAML's
    true/false as a number, and infinite or NaN numbers."""
    hints = typing.get_type_hints(cls)
    tp, is_tuple = _base_type(hints[name])
    optional = type(None) in typing.get_args(hints[name])
    if value is None:
        if optional:
            return None
        raise UsageError(f"bad config value {name}=None: a value is required ({tp.__name__})")
    if not is_tuple and isinstance(value, (list, tuple, dict)):
        raise UsageError(f"bad config value {name}={value!r}: expected one {tp.__name__}, not a {type(value).__name__}")
    if tp in (int, float) and isinstance(value, bool):
        raise UsageError(f"bad config value {name}={value!r}: expected a number, not true/false")
    out = _convert(name, value, tp, is_tuple)
    for v in out if is_tuple else (out,):
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"bad config value {name}={value!r}: must be a finite number")
    return out


def _convert(name: str, value: Any, tp, is_tuple: int) -> Any:
    count = {0: "", -1: "one or more values of type "}.get(is_tuple, f"{is_tuple} values of type ")
    try:
        if is_tuple:
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            value = tuple(tp(v) for v in value)
            if len(value) != is_tuple and not (is_tuple == -1 and value):
                raise UsageError(value)
            return value
        if tp is bool:
            return _convert_bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise UsageError(value)
        return tp(value)
    except (TypeError, ValueError):
        raise UsageError(f"bad config value {name}={value!r}: expected {count}{tp.__name__}") from None


def _convert_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(value)
    return bool(value)


def builtin_configs(cls=None):
    """Names of the built-in configs: the YAML files, then the recipes (:mod:`ummae.config.recipes`);
    with ``cls``, only those whose options all belong to it (a pre-training config is no
    fine-tuning config), and of the recipes those of its command (``cls.recipe_command``: a
    linear-probe recipe's options are fine-tuning options too, but not its recipe)."""
    names = sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))
    if cls is None:
        return names + list(RECIPES)
    known = {f.name for f in cls.options()}
    names = [n for n in names if set(yaml.safe_load((BUILTIN_CONFIGS / f"{n}.yaml").read_text()) or {}) <= known]
    command = getattr(cls, "recipe_command", None)
    return names + [n for n, r in RECIPES.items() if r.command == command and set(r.options()) <= known]


def load_yaml(cls, path: str | Path) -> dict[str, Any]:
    """Load a YAML file of options, or a built-in config by name (``demo``, a recipe, ...). A
    recipe gives its batch split for the reference's 8 processes; the run derives the split
    for its own number (:func:`ummae.config.recipes.split_recipe_batch`)."""
    if str(path) in RECIPES and not Path(path).is_file():
        recipe = RECIPES[str(path)]
        if str(path) not in builtin_configs(cls):
            raise UsageError(f"--config {path} is a recipe of `ummae {recipe.command}`, not of this command")
        return {name: _coerce(cls, name, value) for name, value in recipe.options().items()}
    path = Path(path)
    if not path.is_file() and (BUILTIN_CONFIGS / f"{path}.yaml").is_file():
        path = BUILTIN_CONFIGS / f"{path}.yaml"
    if not path.is_file():
        raise UsageError(
            f"config file not found: {path} (built-in configs: {', '.join(builtin_configs(cls)) or 'none'})"
        )
    data = _read_options_file(path)
    known = {f.name for f in cls.options()}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in getattr(cls, "retired_options", ()):
            continue
        if name not in known:
            raise UsageError(f"unknown option {key!r} in {path}; valid options: {', '.join(sorted(known))}")
        out[name] = _coerce(cls, name, value)
    return out


def _read_options_file(path: Path) -> dict:
    """The mapping of a YAML options file, refusing what no options file holds: megabytes of
    text, aliases (which can expand exponentially: a "YAML bomb") and anything but a mapping."""
    text = path.read_text(errors="replace")
    if len(text) > 1_000_000:
        raise UsageError(f"config file {path} is {len(text)} characters long: not an options file")
    try:
        if any(isinstance(t, yaml.AliasToken) for t in yaml.scan(text)):
            raise UsageError(f"config file {path} uses YAML aliases (*name): write the values out")
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    return data


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per dataclass field; defaults are left unset (SUPPRESS) so that only
    flags the user typed override the YAML file. A field's ``choices`` are shown as the flag's
    values (``--precision {auto,bf16,fp16,fp32}``) and checked by the config (one clear line,
    for a YAML value too); a ``required`` one is shown without brackets in the usage line, but
    argparse does not demand it: a ``--config`` file may give it (the config checks it)."""
    hints = typing.get_type_hints(cls)
    shown_required = False
    for f in cls.options():
        action = _add_flag(parser, f, hints[f.name])
        if f.metadata.get("required"):
            action.shown_required = True
            shown_required = True
    if shown_required and not issubclass(parser.formatter_class, _UsageShowsRequired):
        parser.formatter_class = type("UsageShowsRequired", (_UsageShowsRequired, parser.formatter_class), {})


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, annotation) -> argparse.Action:
    tp, is_tuple = _base_type(annotation)
    flag = "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else None
    help_ = f.metadata.get("help", "")
    if default is not None:  # None defaults are explained by the help text itself
        help_ += f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
    if tp is bool:
        return parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
    if is_tuple:
        return parser.add_argument(flag, nargs="+", type=str, default=argparse.SUPPRESS, help=help_, metavar="V")
    choices = f.metadata.get("choices")
    metavar = "{" + ",".join(choices) + "}" if choices else tp.__name__.upper()
    return parser.add_argument(flag, type=str, default=argparse.SUPPRESS, help=help_, metavar=metavar)


class _UsageShowsRequired(argparse.HelpFormatter):
    """Writes the usage line with the flags marked ``shown_required`` as argparse writes
    required ones (no brackets); parsing is unchanged."""

    def _format_usage(self, usage, actions, groups, prefix):
        flipped = [a for a in actions if getattr(a, "shown_required", False) and not a.required]
        for a in flipped:
            a.required = True
        try:
            return super()._format_usage(usage, actions, groups, prefix)
        finally:
            for a in flipped:
                a.required = False


def config_from_args(cls, args: argparse.Namespace):
    """The user's config of ``cls`` from parsed args: defaults < ``--config`` (a YAML file or
    a recipe) < explicit flags, validated, with the source of every value the user set in its
    provenance. What a run derives beyond that (a recipe's batch split, a resumed run's
    settings, the model the weights name) is :func:`ummae.config.resolve.resolve`'s."""
    name = getattr(args, "config", None)
    values = load_yaml(cls, name) if name else {}
    flags = {f.name: _coerce(cls, f.name, getattr(args, f.name)) for f in cls.options() if hasattr(args, f.name)}
    recipe = name if name in RECIPES and not Path(name).is_file() else None  # load_yaml checked its command
    from_config = Provenance(config=name, recipe=recipe).config_source()
    sources = {**dict.fromkeys(values, from_config), **dict.fromkeys(flags, FLAG)}
    cfg = cls(**{**values, **flags}, provenance=Provenance(sources, name, recipe))
    cfg.validate()
    return cfg
