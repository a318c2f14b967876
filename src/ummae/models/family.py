"""A model family registers itself in one call: :func:`register_family` of its :class:`Family`,
whose table of sizes gives every name the family has.

For each size ``S`` of family ``F`` (``swin`` / ``tiny_256``) it registers

* ``mae_F_S``: UM-MAE / MAE pre-training of the encoder with the size's decoder (and
  ``mae_F_S_<suffix>`` for each further decoder the size names: ``..._dec512d2b``);
* ``simmim_F_S``: SimMIM pre-training (pyramid families), the encoder with the full-map settings;
* ``F_S``: the classifier, the encoder with the full-map settings, with the family's
  fine-tuning defaults (stochastic depth, layer-wise lr decay) or the size's own;

and records that each pre-training model fine-tunes into ``F_S`` (``registry.classifier_for``).
The sizes' architecture tables are also what the importer (``ummae.weights.convert``) matches a
reference checkpoint's tensor shapes against (:func:`matching_models`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ummae.models.classifier import build_classifier
from ummae.models.mae import build_mae
from ummae.models.registry import ModelInfo, add_model
from ummae.models.simmim import build_simmim

# The shape-visible facts of an architecture (what a checkpoint's tensors show):
# patch: the patch-embedding kernel; stages: (width, blocks, heads or None where the tensors do
# not show them, MLP hidden width) per stage; pos_hidden: Swin's pos-MLP width (None elsewhere).
Signature = dict[str, Any]


@dataclass(frozen=True)
class Size:
    """One size of a family. ``arch``: the encoder's keyword arguments in pre-training (as timm
    writes a model's ``model_args``); ``img_size``: the default input; ``decoder``: the UM-MAE
    decoder (``mae.DECODER_*``); ``decoders``: further UM-MAE models, name suffix -> decoder;
    ``dense``: overrides of the family's full-map settings; ``finetune``: overrides of the
    family's fine-tuning defaults."""

    arch: dict[str, Any]
    img_size: int
    decoder: dict[str, int]
    decoders: dict[str, dict[str, int]] = field(default_factory=dict)
    dense: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """An encoder family: ``name`` the names' stem (``swin``), ``title`` for the docs,
    ``encoder`` its class, ``sizes`` its table (key -> :class:`Size`: the names' suffix).

    ``dense``: the encoder settings on the full token map (SimMIM, the classifier, dense tasks)
    where they differ from pre-training on the compact map (Swin's window 16, PVT's spatial
    reduction 8-4-2-1); ``tunable``: those a classifier's caller may change. ``backbone``: the
    settings the encoder takes as a detection / segmentation backbone only
    (``dense.build_stage_maps``: Swin pads its maps to the window), which a classifier's caller
    may give too. ``finetune``: the
    classifier's defaults, ``drop_path`` and ``layer_decay``: the family's reference fine-tuning
    recipe, which a size overrides where the reference ran it otherwise. ``simmim``: whether
    the family has SimMIM models; ``learnable_pos``: whether the classifier learns its position
    table. ``signature``: an ``arch`` -> its :data:`Signature`."""

    name: str
    title: str
    encoder: type
    sizes: dict[str, Size]
    finetune: dict[str, float]
    signature: Callable[[dict[str, Any]], Signature]
    dense: dict[str, Any] = field(default_factory=dict)
    tunable: tuple[str, ...] = ()
    backbone: dict[str, Any] = field(default_factory=dict)
    simmim: bool = True
    learnable_pos: bool = False

    def dense_arch(self, size: Size) -> dict[str, Any]:
        return {**size.arch, **self.dense, **size.dense}

    def finetune_defaults(self, size: Size) -> dict[str, float]:
        return {**self.finetune, **size.finetune}


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    """Register every model of ``family`` (module docstring)."""
    if family.name in _FAMILIES:
        raise ValueError(f"family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    for key, size in family.sizes.items():
        classifier = f"{family.name}_{key}"
        for suffix, decoder in {"": size.decoder, **size.decoders}.items():
            name = f"mae_{classifier}" + (f"_{suffix}" if suffix else "")
            info = _info(family, key, "UM-MAE", size.arch, _decoder_text(decoder), size.img_size, classifier)
            add_model(name, "pretrain", _mae_builder(name, family, size, decoder), info)
        if family.simmim:
            name = f"simmim_{classifier}"
            info = _info(family, key, "SimMIM", family.dense_arch(size), "one linear layer", size.img_size, classifier)
            add_model(name, "pretrain", _simmim_builder(name, family, size), info)
        defaults = family.finetune_defaults(size)
        head = f"linear head; drop path {defaults['drop_path']}, layer decay {defaults['layer_decay']}"
        info = _info(family, key, "classifier", family.dense_arch(size), head, size.img_size, classifier)
        add_model(classifier, "classify", _classifier_builder(classifier, family, size), info)


def families() -> dict[str, Family]:
    """The registered families by name (``swin``, ``pvt``, ``vit``)."""
    return dict(_FAMILIES)


def matching_models(family: str, method: str, found: Signature, decoder: tuple[int, int] | None) -> list[str]:
    """The registered models of ``family`` whose architecture has the shape-visible facts
    ``found``: ``method`` ``UM-MAE`` (then ``decoder`` = (width, blocks) must match too),
    ``SimMIM`` or ``classifier``."""
    fam = _FAMILIES[family]
    out = []
    for key, size in fam.sizes.items():
        if fam.signature(size.arch) != found:
            continue
        classifier = f"{family}_{key}"
        if method == "classifier":
            out.append(classifier)
        elif method == "SimMIM" and fam.simmim:
            out.append(f"simmim_{classifier}")
        elif method == "UM-MAE":
            for suffix, dec in {"": size.decoder, **size.decoders}.items():
                if (dec["decoder_dim"], dec["decoder_depth"]) == decoder:
                    out.append(f"mae_{classifier}" + (f"_{suffix}" if suffix else ""))
    return out


# --- the builders each registered name calls --------------------------------------------------


def _mae_builder(name: str, family: Family, size: Size, decoder: dict[str, int]):
    def build(**kw):
        return build_mae(name, family.encoder, size.arch, img_size=size.img_size, decoder=decoder, kw=kw)

    return build


def _simmim_builder(name: str, family: Family, size: Size):
    def build(**kw):
        return build_simmim(name, family.encoder, family.dense_arch(size), img_size=size.img_size, kw=kw)

    return build


def _classifier_builder(name: str, family: Family, size: Size):
    defaults = family.finetune_defaults(size)

    def build(**kw):
        return build_classifier(
            name,
            family.encoder,
            family.dense_arch(size),
            size.img_size,
            drop_path=defaults["drop_path"],
            layer_decay=defaults["layer_decay"],
            kw=kw,
            tunable=(*family.tunable, *family.backbone),
            learnable_pos=family.learnable_pos,
        )

    return build


# --- what the docs show --------------------------------------------------------------------------


def _info(family: Family, key: str, method: str, arch: dict, decoder: str, img_size: int, classifier: str):
    return ModelInfo(family.name, key, method, _arch_text(family.title, arch), decoder, img_size, classifier)


def _arch_text(title: str, arch: dict[str, Any]) -> str:
    """``Swin: embed_dim 96, depths 2-2-6-2, ...``: the keyword arguments as given."""

    def value(v):
        return "-".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)

    return f"{title}: " + ", ".join(f"{k} {value(v)}" for k, v in arch.items())


def _decoder_text(decoder: dict[str, int]) -> str:
    return f"{decoder['decoder_dim']}-d, {decoder['decoder_depth']} blocks, {decoder['decoder_heads']} heads"
