"""A config field declared once: its default, its flag's help, and the values it accepts, as
field metadata that one validator, :func:`check_fields`, checks and words its refusal from.

    epochs: int = option(200, "training epochs", ge=1)          -> "must be >= 1"
    drop_path: float | None = option(None, "...", ge=0, lt=1)   -> "must be in [0, 1)"
    blr: float = option(1.5e-4, "...", gt=0, below=1e9)         -> "must be > 0 and below 1e9"
    crop_scale: tuple[float, float] = option(..., check=ordered_range(0, 1))
    precision: str = option("auto", "...", choices=PRECISIONS)  -> "must be one of auto, ..."

Rules between fields (a stride no larger than the crop, a required data set) stay in the
configs' ``validate`` methods, written out.

Every command's config derives from :class:`Options`: frozen (a config is resolved once,
:func:`ummae.config.resolve.resolve`, and never assigned to afterwards), with its
:class:`Provenance`, where each option's value came from, as a declared field.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any

from ummae.errors import UsageError

# bound name -> (test of a value against the bound, the words for it)
BOUNDS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "ge": (operator.ge, ">="),
    "gt": (operator.gt, ">"),
    "le": (operator.le, "<="),
    "lt": (operator.lt, "<"),
    # a sanity cap rather than the end of a range (a typo's 1e39): worded "and below X"
    "below": (operator.lt, "below"),
}


@dataclass(frozen=True)
class Rule:
    """A named check of one field's value, for what bounds cannot say, and its refusal."""

    accepts: Callable[[Any], bool]
    why: str


def option(default, help_: str, *, source: str | None = None, required: bool = False, **accepts):
    """A config field, its flag's help and the ``source`` of its default: the reference's file
    and key, MAE's or MMDetection's default, "the model's" (None: the model builder's own default, :mod:`ummae.models.defaults`)
    or "ours: why" (shown in the docs' defaults tables, :func:`defaults_table`; the values
    themselves are pinned by ``tests/test_defaults.py``); a required option has none to give.
    ``accepts`` declares the values it takes:

    - ``ge`` / ``gt`` / ``le`` / ``lt``: bounds of the number, or of each number of a tuple;
      both ends given read as an interval (``ge=0, lt=1``: "in [0, 1)");
    - ``below``: a sanity cap beside a lower bound ("> 0 and below 1e9");
    - ``what``: what the values are, for the refusal ("two sizes in [16, 16384]");
    - ``choices``: the values, shown in ``--help`` (``--precision {auto,bf16,fp16,fp32}``);
    - ``check``: a :class:`Rule` (:func:`ordered_range`, :data:`DEVICE`, ...).

    ``None`` is always accepted: an optional field's "the default" (a required one, shown
    without brackets in the usage line, is checked by its command with its own words, since
    a ``--config`` file may give it)."""
    unknown = set(accepts) - {*BOUNDS, "what", "choices", "check"}
    assert not unknown, f"unknown field metadata {unknown}"
    assert source or required, "an option's default needs its source"
    source = source or "required"
    return field(default=default, metadata={"help": help_, "required": required, "source": source, **accepts})


# Where an option's value came from (Provenance.sources): the levels of
# :func:`ummae.config.resolve.resolve`, lowest first. A ``--config`` value's source names the
# recipe (``recipe NAME``) or the YAML file (``config FILE``).
DEFAULT = "default"
FLAG = "flag"
RESUMED = "resumed run"
WEIGHTS = "weights"


@dataclass(frozen=True)
class Provenance:
    """Where each option of a config came from: ``sources`` maps an option to its level
    (:data:`DEFAULT` when it is not named), ``config`` is the ``--config`` given (a recipe's
    name or a YAML file), ``recipe`` the recipe among them, whose total batch the run splits
    over its processes."""

    sources: Mapping[str, str] = field(default_factory=dict)
    config: str | None = None
    recipe: str | None = None

    def source(self, name: str) -> str:
        return self.sources.get(name, DEFAULT)

    def config_source(self) -> str:
        """The source of the ``--config`` values: ``recipe NAME`` or ``config FILE``."""
        return f"recipe {self.recipe}" if self.recipe else f"config {self.config}"

    def given(self) -> set[str]:
        """The options the user set (``--config`` and flags): what a resumed run refuses to
        see contradicted. A value derived from them (a recipe's batch split) is not one."""
        return {name for name, source in self.sources.items() if source in (FLAG, self.config_source())}

    def flagged(self) -> set[str]:
        return {name for name, source in self.sources.items() if source == FLAG}


@dataclass(frozen=True)
class Options:
    """The root of every command's config: frozen, and the provenance of its values. Its
    options are its fields but ``provenance`` (:meth:`options`)."""

    provenance: Provenance = field(default=Provenance(), compare=False, repr=False, kw_only=True)

    @classmethod
    def options(cls) -> list[Field]:
        """The option fields (each a flag, a YAML key and a ``config.yaml`` entry)."""
        return [f for f in fields(cls) if f.name != "provenance"]

    def option_values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.options()}


def defaults_table(cls: type[Options]) -> str:
    """The options of the config class ``cls`` with their defaults and sources, a Markdown table
    (the docs' defaults page; ``tests/test_defaults.py`` pins the values)."""
    rows = ["| option | default | source |", "|---|---|---|"]
    for f in cls.options():
        default = "required" if f.metadata.get("required") else f"`{_words(f.default)}`"
        rows.append(f"| `{f.name}` | {default} | {f.metadata['source'].replace('|', '/')} |")
    return "\n".join(rows)


def _words(value) -> str:
    """A default as the flag takes it: a tuple space-separated, None as "None" (the default of
    a later level: the model's, the checkpoint's, the data's)."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_fields(cfg) -> None:
    """The one validator: every option of ``cfg`` against what its metadata accepts."""
    for f in cfg.options():
        value = getattr(cfg, f.name)
        why = refusal(f.metadata, value)
        if why is not None:
            raise UsageError(f"bad config value {f.name}={value!r}: {why}")


def refusal(meta, value) -> str | None:
    """Why ``meta`` (a field's metadata) refuses ``value``, or None when it accepts it."""
    if value is None:
        return None
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(choices)}"
    rule = meta.get("check")
    if rule is not None and not rule.accepts(value):
        return rule.why
    bounds = {name: meta[name] for name in BOUNDS if name in meta}
    if bounds:
        numbers = value if isinstance(value, tuple) else (value,)
        if not numbers or not all(BOUNDS[name][0](v, limit) for v in numbers for name, limit in bounds.items()):
            return bounds_wording(bounds, meta.get("what"))
    return None


def bounds_wording(bounds: dict[str, Any], what: str | None = None) -> str:
    """ "must be >= 1", "must be in (0, 1]", "must be > 0 and below 1e9", ...: the bounds in words."""
    lower = next((name for name in ("ge", "gt") if name in bounds), None)
    upper = next((name for name in ("le", "lt") if name in bounds), None)
    if lower and upper:
        text = (
            f"in {'[' if lower == 'ge' else '('}{_number(bounds[lower])}, "
            f"{_number(bounds[upper])}{']' if upper == 'le' else ')'}"
        )
    else:
        text = " and ".join(f"{BOUNDS[name][1]} {_number(bounds[name])}" for name in (lower, upper) if name)
    if "below" in bounds:
        text += f" and below {_number(bounds['below'])}"
    return f"must be {what + ' ' if what else ''}{text}"


def _number(x) -> str:
    """1 -> "1", 0.0 -> "0", 1e9 -> "1e9"."""
    return format(x, "g").replace("e+0", "e").replace("e+", "e")


def ordered_range(lo: float, hi: float) -> Rule:
    """A (min, max) pair with ``lo < min <= max <= hi``: a crop scale, a resize ratio range."""
    return Rule(lambda v: lo < v[0] <= v[1] <= hi, f"must satisfy {_number(lo)} < min <= max <= {_number(hi)}")


def is_device_name(name: str) -> bool:
    """auto, cpu, cuda or cuda:N (:func:`ummae.engine.precision.is_device_name`)."""
    # imported when a config is checked: the module loads torch, which `ummae --help` must not
    from ummae.engine.precision import is_device_name as check

    return check(name)


def is_rand_augment_policy(policy: str) -> bool:
    """``policy`` is 'none' / '' (off) or a RandAugment policy timm parses: parsed now, since
    timm would fail in a loader worker, mid-run."""
    if policy.lower() in ("", "none"):
        return True
    if not policy.startswith("rand"):
        return False
    # timm (and torch) are loaded only when a fine-tuning config is checked, not by `ummae --help`
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(policy, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except Exception:  # timm refuses a bad policy with AssertionError, ValueError or KeyError
        return False
    return True


DEVICE = Rule(is_device_name, "must be auto, cpu, cuda or cuda:N")
RAND_AUGMENT = Rule(
    is_rand_augment_policy, "expected a timm RandAugment policy such as 'rand-m9-mstd0.5-inc1', or 'none'"
)
