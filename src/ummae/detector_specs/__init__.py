"""The detectors of ``ummae detect``, one spec per file of this package (``gfl.py``,
``maskrcnn.py``...; a module named ``_*`` holds parts several specs share). A spec states what a
detector is: its name, the class that builds it, its feature pyramid, whether it predicts masks,
the options it takes and the configuration it follows. The rest is derived from the specs:
``--detector``'s choices and help, the detector options' flags and their refusals, the
registry's ``detect`` heads (:mod:`ummae.models.detectors`, ``ummae models --kind detect``),
box or box + mask AP, and the docs table (:func:`markdown_table`). Adding a detector is adding a
spec file and its name in the registration line below; no code compares detector names.

A spec also gives its own default of the options whose default is the detector's
(``DetectorSpec.defaults``: GFL's FPN BatchNorm, HTC's test score threshold 0.001 ...), the
builder's keyword of an option it names otherwise (``keywords``), and every way it differs from
the configuration it follows (``differences``: the differences page, :func:`differences_markdown`).
A checkpoint written before an option existed records none of it: :func:`recorded_options`
gives the value it was trained with (``DetectorOption.unrecorded``, ``DetectorSpec.unrecorded``,
an older key an option ``replaces``).

The package imports no torch: the command line reads it to build its flags (``ummae --help``
stays fast). A spec names its class as ``"module:Class"``; :mod:`ummae.models.detectors` imports
it when a model is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ummae.detector_specs._spec import ONNX_FORMS, OPTION_PARTS, P2_P6, P3_P7, DetectorOption, DetectorSpec, Pyramid
from ummae.errors import UsageError

__all__ = [
    "DETECTORS", "ONNX_FORMS", "OPTION_PARTS", "OPTIONS", "P2_P6", "P3_P7", "SPECS", "DetectorOption", "DetectorSpec", "Pyramid",
    "check_flags", "check_options", "detector_help", "detector_spec", "differences_markdown", "markdown_table", "option_help",
    "options_table", "per_detector_defaults", "recorded_options", "takers",
]  # fmt: skip


# The registered detectors: the spec files of this package, in --detector order (the default
# first). A new detector is one spec file and its name here.
_SPEC_FILES = ("gfl", "maskrcnn", "retinanet", "fcos", "cascade_maskrcnn", "htc", "fasterrcnn")
SPECS: dict[str, DetectorSpec] = {
    spec.name: spec for spec in (importlib.import_module(f"{__name__}.{f}").SPEC for f in _SPEC_FILES)
}
DETECTORS: tuple[str, ...] = tuple(SPECS)
# every detector-specific option, each once, in the order the specs list them
OPTIONS: dict[str, DetectorOption] = {o.name: o for s in SPECS.values() for o in s.options}
for _s in SPECS.values():  # a detector's own default is that of a per-detector option it takes
    for _name in (*_s.defaults, *_s.unrecorded):
        if not (_s.takes(_name) and OPTIONS[_name].per_detector):
            raise TypeError(f"spec {_s.name}: {_name} is not a per-detector option it takes")


def detector_spec(name: str) -> DetectorSpec:
    """The spec of detector ``name``; an unknown one is refused in one line."""
    if name not in SPECS:
        raise UsageError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    return SPECS[name]


def takers(option: str) -> tuple[str, ...]:
    """The detectors that take ``option``."""
    return tuple(s.name for s in SPECS.values() if s.takes(option))


def check_options(spec: DetectorSpec, given: Mapping[str, Any]) -> None:
    """Refuse, in one line, a detector option ``spec`` does not take: ``given`` maps option
    names to the values asked for (a builder's keywords)."""
    for name in given:
        if name in OPTIONS and not spec.takes(name):
            option = OPTIONS[name]
            what = f"{option.flag} (option {name})" if option.set_by else option.flag
            raise UsageError(f"{what} is an option of --detector {' / '.join(takers(name))}, not of {spec.name}")


def check_flags(spec: DetectorSpec, values: Mapping[str, Any]) -> None:
    """Refuse, in one line, a detector option's flag set (not at its default) for a detector
    that does not take it: ``values`` maps ``DetectConfig`` fields to their values."""
    check_options(spec, {o.name: 1 for o in OPTIONS.values() if values[o.field_name] != o.field_default})


def _ap(spec: DetectorSpec) -> str:
    return "box + mask AP" if spec.masks else "box AP"


def detector_help() -> str:
    """``--detector``'s help: each detector with its one-line summary and what it is evaluated by."""
    return ", ".join(f"{s.name} ({s.summary}; {_ap(s)})" for s in SPECS.values())


def option_help(option: str) -> str:
    """A detector option flag's help: the detectors that take it, then the option's help (and,
    for a per-detector option, each detector's default)."""
    help = f"{' / '.join(takers(option))}: {OPTIONS[option].help}"
    if OPTIONS[option].per_detector:
        help += f". Default: the detector's ({per_detector_defaults(option)})"
    return help


def per_detector_defaults(option: str) -> str:
    """``option``'s default of each detector that takes it, grouped: ``gfl bn; others none``."""
    by_value: dict[Any, list[str]] = {}
    for name in takers(option):
        by_value.setdefault(SPECS[name].default(option), []).append(name)
    common = OPTIONS[option].default
    parts = [f"{' / '.join(names)} {value}" for value, names in by_value.items() if value != common]
    if common in by_value:
        parts.append(f"{'others' if parts else 'all'} {common}")
    return "; ".join(parts)


def recorded_options(args: Mapping[str, Any]) -> dict[str, Any]:
    """A detection checkpoint's ``model_args`` with every option of its detector: one it does
    not record (written before the option) at the value it was trained with, an older key an
    option replaces mapped to that option."""
    spec = SPECS.get(args.get("detector"))  # type: ignore[arg-type]
    if spec is None:
        return dict(args)
    out = dict(args)
    for o in spec.options:
        older = o.replaces[0] if o.replaces else None
        if older in out:
            value = out.pop(older)
            out.setdefault(o.name, o.replaces[1][value])
        out.setdefault(o.name, spec.value_unrecorded(o.name))
    return out


def markdown_table() -> str:
    """The docs table of the detectors, one row per spec."""
    lines = [
        "| `--detector` | what it is | pyramid | evaluation | options | configuration it follows |",
        "|---|---|---|---|---|---|",
    ]
    for s in SPECS.values():
        options = ", ".join(f"`{OPTIONS[o.name].flag}`" for o in s.options) or "-"
        lines.append(f"| `{s.name}` | {s.summary} | {s.pyramid} | {_ap(s)} | {options} | {s.follows} |")
    return "\n".join(lines)


def options_table() -> str:
    """The docs table of the detector options: flag, choices, each detector's default, what it does."""
    lines = ["| flag | detectors | default | what it sets |", "|---|---|---|---|"]
    for o in OPTIONS.values():
        default = per_detector_defaults(o.name) if o.per_detector else o.field_default
        choices = f" ({' / '.join(o.choices)})" if o.choices else ""
        what = o.help.replace("|", "\\|").replace("<", "&lt;")  # a table cell's text, not HTML
        lines.append(f"| `{o.flag}`{choices} | {', '.join(takers(o.name))} | {default} | {what} |")
    return "\n".join(lines)


def differences_markdown() -> str:
    """The differences page's detector part: per detector, the configuration it follows and every
    way it differs from it (``DetectorSpec.differences``)."""
    parts = []
    for s in SPECS.values():
        items = "\n".join(f"- {d}" for d in s.differences) or "- none"
        parts.append(f"### `{s.name}`\n\nFollows {s.follows}; where it differs:\n\n{items}")
    return "\n\n".join(parts)
