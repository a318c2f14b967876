"""The config's one validator, stated against an independent formulation: for every field of
every command's config that declares bounds, a value just outside a bound is refused in one
line that names the field, and a value just on the inside is accepted; every field with
``choices`` refuses any other value. The fields are read from the dataclasses, not listed."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing

import pytest

from ummae.config import DetectConfig, FinetuneConfig, Machinery, PretrainConfig, SegmentConfig, SegmentEvalConfig
from ummae.config.fields import bounds_wording
from ummae.detector_specs import OPTIONS
from ummae.detector_specs import takers as takers_of
from ummae.errors import UsageError


def _leaves(cls) -> list[type]:
    subclasses = cls.__subclasses__()
    return [cls] if not subclasses else [leaf for sub in subclasses for leaf in _leaves(sub)]


COMMANDS = sorted(set(_leaves(Machinery)), key=lambda c: c.__name__)  # one config per command


def test_commands__every_command_config_is_found():
    names = {c.__name__ for c in COMMANDS}
    assert {
        "PretrainConfig",
        "FinetuneConfig",
        "LinprobeConfig",
        "EvalConfig",
        "KnnConfig",
        "DetectConfig",
        "DetectEvalConfig",
        "SegmentConfig",
        "SegmentEvalConfig",
    } <= names


def _valid(cls, **changes):
    """A config of ``cls`` that passes, its required options given, with ``changes``; a
    detector's own option set goes with the first detector that takes it."""
    required = {f.name: "x" for f in dataclasses.fields(cls) if f.metadata.get("required")}
    takers = [takers_of(o.name) for o in OPTIONS.values() if o.field_name in changes]
    if takers and "detector" in {f.name for f in dataclasses.fields(cls)}:
        required["detector"] = takers[0][0]
    return cls(**{**required, **changes})


def _element_type(annotation) -> tuple[type, int]:
    """(number type, how many values: 0 for a single one) of a field annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        return args[0], 1 if args[-1] is Ellipsis else len(args)
    return annotation, 0


def _edges(meta, tp) -> list[tuple[object, object]]:
    """(just outside, just inside) of every bound the metadata declares, worked out here from
    the bound's meaning: ``ge=a`` takes a and no less, ``gt=a`` more than a, ``le`` / ``lt`` /
    ``below`` likewise from above."""

    def below(x):
        return x - 1 if tp is int else math.nextafter(x, -math.inf)

    def above(x):
        return x + 1 if tp is int else math.nextafter(x, math.inf)

    out = []
    for name, limit in meta.items():
        if name == "ge":
            out.append((below(limit), limit))
        elif name == "gt":
            out.append((limit, above(limit)))
        elif name == "le":
            out.append((above(limit), limit))
        elif name in ("lt", "below"):
            out.append((limit, below(limit)))
    return [(tp(a), tp(b)) for a, b in out]


BOUNDED = [
    pytest.param(cls, f.name, id=f"{cls.__name__}.{f.name}")
    for cls in COMMANDS
    for f in dataclasses.fields(cls)
    if {"ge", "gt", "le", "lt", "below"} & set(f.metadata)
]


def test_bounded__fields_are_found():
    assert len(BOUNDED) > 100  # every command has its bounded fields; a lost metadata key shows here


@pytest.mark.parametrize("cls, name", BOUNDED)
def test_validate__refuses_just_outside_each_bound_accepts_just_inside(cls, name):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    tp, count = _element_type(typing.get_type_hints(cls)[name])
    for outside, inside in _edges(f.metadata, tp):
        values_in = (inside,) * count if count else inside
        _valid(cls, **{name: values_in}).validate()  # accepted
        for position in range(max(count, 1)):  # the bad value in each place of a tuple
            value = values_in[:position] + (outside,) + values_in[position + 1 :] if count else outside
            with pytest.raises(UsageError) as refused:
                _valid(cls, **{name: value}).validate()
            message = str(refused.value)
            assert "\n" not in message
            assert message.startswith(f"bad config value {name}={value!r}: must be "), message


CHOICES = [
    pytest.param(cls, f.name, id=f"{cls.__name__}.{f.name}")
    for cls in COMMANDS
    for f in dataclasses.fields(cls)
    if f.metadata.get("choices")
]


@pytest.mark.parametrize("cls, name", CHOICES)
def test_validate__choices_accept_theirs_and_refuse_any_other(cls, name):
    choices = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"]
    for value in choices:
        _valid(cls, **{name: value}).validate()
    for value in [v for v in ("", choices[0].upper(), choices[0] + "x", "none") if v not in choices]:
        with pytest.raises(UsageError, match=rf"^bad config value {name}={value!r}: must be one of "):
            _valid(cls, **{name: value}).validate()


@pytest.mark.parametrize("bounds, what, words", [
    ({"ge": 1}, None, "must be >= 1"),
    ({"gt": 0}, None, "must be > 0"),
    ({"gt": 0, "below": 1e9}, None, "must be > 0 and below 1e9"),
    ({"ge": 0, "below": 1e9}, None, "must be >= 0 and below 1e9"),
    ({"ge": 0, "lt": 1}, None, "must be in [0, 1)"),
    ({"gt": 0, "le": 1}, None, "must be in (0, 1]"),
    ({"gt": 0, "lt": 1}, None, "must be in (0, 1)"),
    ({"ge": 16, "le": 4096}, None, "must be in [16, 4096]"),
    ({"ge": 16, "le": 16384}, "two sizes", "must be two sizes in [16, 16384]"),
])  # fmt: skip
def test_bounds_wording__reads_as_the_refusals_always_have(bounds, what, words):
    assert bounds_wording(bounds, what) == words


@pytest.mark.parametrize("cls, name, value, words", [
    (PretrainConfig, "crop_scale", (0.9, 0.1), "must satisfy 0 < min <= max <= 1"),
    (PretrainConfig, "crop_scale", (0.0, 1.0), "must satisfy 0 < min <= max <= 1"),
    (DetectConfig, "scale_range", (0.5, 10.5), "must satisfy 0 < min <= max <= 10"),
    (SegmentConfig, "ratio_range", (2.0, 1.0), "must satisfy 0 < min <= max <= 10"),
    (PretrainConfig, "device", "gpu", "must be auto, cpu, cuda or cuda:N"),
    (SegmentEvalConfig, "device", "cuda:x", "must be auto, cpu, cuda or cuda:N"),
    (FinetuneConfig, "auto_augment", "garbage", "expected a timm RandAugment policy"),
    (SegmentConfig, "test_stride", 0, "must be in [1, --crop-size 512]"),
    (SegmentConfig, "test_stride", 513, "must be in [1, --crop-size 512]"),
    (SegmentConfig, "ignore_index", 3, "is one of the 150 classes (0..149)"),
])  # fmt: skip
def test_validate__named_checks_and_rules_between_fields(cls, name, value, words):
    with pytest.raises(UsageError, match="^" + re.escape(f"bad config value {name}={value!r}: {words}")):
        _valid(cls, **{name: value}).validate()


def test_machinery__defined_once_with_each_commands_worker_default():
    """precision / device / num_workers come from one place; only the workers' default differs."""
    assert {c.__name__: _valid(c).num_workers for c in COMMANDS} == {
        "PretrainConfig": 8, "FinetuneConfig": 8, "LinprobeConfig": 8, "EvalConfig": 8, "KnnConfig": 8,
        "DetectConfig": 4, "DetectEvalConfig": 4, "SegmentConfig": 4, "SegmentEvalConfig": 4,
    }  # fmt: skip
    for name in ("precision", "device"):  # one Field object, inherited by every command
        assert len({id(next(f for f in dataclasses.fields(c) if f.name == name)) for c in COMMANDS}) == 1, name


def test_segment__has_no_epochs_to_set(capsys):
    """Segmentation counts iterations: no --epochs / --warmup-epochs that would do nothing."""
    from ummae.cli import main

    names = {f.name for f in dataclasses.fields(SegmentConfig)}
    assert not {"epochs", "warmup_epochs"} & names
    with pytest.raises(SystemExit):
        main(["segment", "train", "--help"])
    text = capsys.readouterr().out
    assert "--iters" in text and "--epochs" not in text and "--warmup-epochs" not in text


def test_segment__config_yaml_of_an_earlier_run_reads_back(tmp_path):
    """A segmentation run's config.yaml written before the epochs went holds them: ignored."""
    from ummae.config import load_yaml

    path = tmp_path / "config.yaml"
    path.write_text("iters: 7\nepochs: 1\nwarmup_epochs: 0\n")
    assert load_yaml(SegmentConfig, path) == {"iters": 7}
    path.write_text("iters: 7\nepochz: 1\n")
    with pytest.raises(UsageError, match="unknown option 'epochz'"):
        load_yaml(SegmentConfig, path)
