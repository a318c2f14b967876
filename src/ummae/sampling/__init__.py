"""Masking strategies (``--sampling``): one file per strategy, one registry (:mod:`.base`).

* :mod:`.uniform`: Uniform Sampling, UM-MAE's (any encoder: its masks compact);
* :mod:`.random`: MAE's random sampling (ViT only);
* :mod:`.block`: BEiT's block-wise masking (ViT only).

A new strategy is one file here (a :class:`MaskingStrategy` subclass under ``@register``) and
its import below. Importing this package loads no torch (``--help`` reads the choices).
"""

# Importing the strategy files runs their @register decorators, in this order (the default first).
# isort: off
from ummae.sampling import uniform, random, block  # noqa: F401

# isort: on
from ummae.sampling.base import (
    DEFAULT_MASK_RATIO,
    MaskingStrategy,
    get_strategy,
    help_text,
    markdown_table,
    names,
    num_kept,
    register,
    strategies,
)

__all__ = [
    "DEFAULT_MASK_RATIO",
    "MaskingStrategy",
    "get_strategy",
    "help_text",
    "markdown_table",
    "names",
    "num_kept",
    "register",
    "strategies",
]
