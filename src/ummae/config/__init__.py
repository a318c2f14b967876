"""Run configuration: one small dataclass per command, a YAML file, and command-line flags
generated from the dataclass fields (one flag per field, so nothing is declared twice).

- :mod:`~ummae.config.fields`: ``option(default, help, ge=..., choices=...)``, a field that
  declares the values it accepts, and ``check_fields``, the one validator;
- :mod:`~ummae.config.commands`: the configs (``PretrainConfig``, ``FinetuneConfig``, ...);
- :mod:`~ummae.config.flags`: YAML files, flags, and ``config_from_args`` joining them;
- :mod:`~ummae.config.resume`: the settings a resumed run takes from its checkpoint;
- :mod:`~ummae.config.resolve`: ``resolve``, the one resolution of a command's config, frozen.

Precedence: dataclass default < ``--config`` (a YAML file or a recipe) < explicit command-line
flag < a resumed run's settings < what the weights name (:func:`~ummae.config.resolve.resolve`
states the order). Importing the config loads no torch (``ummae --help`` stays fast).
"""

from ummae.choices import INPUT_PIPELINES, PRECISIONS, SEG_TEST_MODES
from ummae.config.commands import (
    ClassifyData,
    DetectConfig,
    DetectEvalConfig,
    DetectTestConfig,
    EvalConfig,
    FinetuneConfig,
    InferenceConfig,
    IterationRunConfig,
    KnnConfig,
    LinprobeConfig,
    Machinery,
    PretrainConfig,
    RunConfig,
    SegmentConfig,
    SegmentEvalConfig,
)
from ummae.config.fields import Options, Provenance, check_fields, option
from ummae.config.flags import BUILTIN_CONFIGS, add_dataclass_flags, builtin_configs, config_from_args, load_yaml
from ummae.config.resolve import resolve
from ummae.config.resume import MAY_CHANGE_ON_RESUME, settings_from_checkpoint
from ummae.detector_specs import DETECTORS

__all__ = [
    "BUILTIN_CONFIGS",
    "DETECTORS",
    "INPUT_PIPELINES",
    "MAY_CHANGE_ON_RESUME",
    "PRECISIONS",
    "SEG_TEST_MODES",
    "ClassifyData",
    "DetectConfig",
    "DetectEvalConfig",
    "DetectTestConfig",
    "EvalConfig",
    "FinetuneConfig",
    "InferenceConfig",
    "IterationRunConfig",
    "KnnConfig",
    "LinprobeConfig",
    "Machinery",
    "Options",
    "PretrainConfig",
    "Provenance",
    "RunConfig",
    "SegmentConfig",
    "SegmentEvalConfig",
    "add_dataclass_flags",
    "builtin_configs",
    "check_fields",
    "config_from_args",
    "load_yaml",
    "option",
    "resolve",
    "settings_from_checkpoint",
]
