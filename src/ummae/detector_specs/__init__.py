"""The detectors of ``ummae detect``, one spec per file of this package (``gfl.py``,
``maskrcnn.py``...; a module named ``_*`` holds parts several specs share). A spec states what a
detector is: its name, the class that builds it, its feature pyramid, whether it predicts masks,
the options it takes and the configuration it follows. The rest is derived from the specs:
``--detector``'s choices and help, the detector options' flags and their refusals, the
registry's ``detect`` heads (:mod:`ummae.models.detectors`, ``ummae models --kind detect``),
box or box + mask AP, and the docs table (:func:`markdown_table`). Adding a detector is adding a
spec file and its name in the registration line below; no code compares detector names.

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
    "DETECTORS", "ONNX_FORMS", "OPTION_PARTS", "OPTIONS", "P2_P6", "P3_P7", "SPECS", "DetectorOption", "DetectorSpec", "Pyramid", "check_flags",
    "check_options", "detector_help", "detector_spec", "markdown_table", "option_help", "takers",
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
    """A detector option flag's help: the detectors that take it, then the option's help."""
    return f"{' / '.join(takers(option))}: {OPTIONS[option].help}"


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
