"""The masking strategy interface (:class:`MaskingStrategy`) and its one registry.

A strategy is everything the code knows about one ``--sampling`` value: how it draws masks,
how many units it leaves visible, which encoders accept it, its label in pictures and its help
line. The model (models/mae.py), the config's ``--sampling`` choices and help, ``ummae
visualize`` and ``ummae masks`` all read the strategy object; none compares names.

Nothing here imports torch at import time: ``ummae pretrain --help`` lists the choices from
this registry, and must stay fast (tests/test_cli_usability.py). The strategy files import
torch inside the functions that draw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ummae.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# the MAE paper's masked fraction, the default of every strategy with a free mask ratio
DEFAULT_MASK_RATIO = 0.75


class MaskingStrategy:
    """How a pre-training model chooses the units its encoder never sees (True = masked in a
    bool mask ``[N, L]`` over the ``L = grid_h * grid_w`` units, row-major).

    The contract of :meth:`sample`, which tests/test_masking_strategies.py checks for every
    registered strategy:

    * every image of a draw keeps exactly :meth:`num_visible` units visible: MAE's loss, the
      Secondary Masking count and the ViT's gather of the visible tokens take one count for the
      whole batch;
    * the masks come from the ``generator`` given and nothing else (no global torch, Python or
      numpy random state): they are a function of its state, so a resumed run, which restores
      the step's generator, draws them again.
    """

    name: ClassVar[str]  # the --sampling value, recorded in checkpoints
    label: ClassVar[str]  # in picture titles: "masked input (US)"
    help: ClassVar[str]  # what it is, for --sampling's help and the docs table
    # True: every 2x2 block of units keeps exactly one, so the visible units compact into a dense
    # half-size map (UM-MAE's path, which pyramid encoders need). False: the masks leave holes;
    # only a ViT, which gathers its visible tokens, accepts them.
    compacts: ClassVar[bool] = False
    visible: ClassVar[str] = "L - int(r*L)"  # :meth:`num_visible` in words, for the docs table
    fixed_ratio: ClassVar[float | None] = None  # a mask ratio the strategy always has; None: the model's

    @property
    def encoders(self) -> str:
        return "any encoder" if self.compacts else "ViT only"

    def mask_ratio(self, requested: float) -> float:
        """The mask ratio a model with ``mask_ratio=requested`` masks at."""
        return requested if self.fixed_ratio is None else self.fixed_ratio

    def ratio_problem(self, mask_ratio: float) -> str | None:
        """Why ``mask_ratio`` cannot be used with this strategy (None if it can)."""
        if not 0.0 < mask_ratio < 1.0:
            return f"bad mask_ratio {mask_ratio}: must be in (0, 1)"
        return None

    def grid_problem(self, grid_h: int, grid_w: int) -> str | None:
        """Why a ``grid_h x grid_w`` unit grid cannot be masked (None if it can)."""
        return None

    def num_visible(self, grid_h: int, grid_w: int, mask_ratio: float) -> int:
        """Units every image keeps visible: :func:`num_kept` of the grid."""
        return num_kept(grid_h * grid_w, mask_ratio)

    def sample(
        self, n: int, grid_h: int, grid_w: int, mask_ratio: float, *, generator: torch.Generator | None, device=None
    ) -> Tensor:
        """``n`` masks ``[n, grid_h * grid_w]`` (bool, True = masked) drawn from ``generator``,
        on its device (``device`` when no generator is given: torch's default one then)."""
        raise NotImplementedError


def num_kept(length: int, ratio: float) -> int:
    """Visible units of a fixed-ratio random mask, as the reference's mask generator counts
    them: ``int(r * L)`` units masked, the rest visible (49 of 196 at 0.75)."""
    return length - int(ratio * length)


def draw_device(generator: torch.Generator | None, device) -> torch.device:
    """Where masks are drawn: the generator's device, else ``device`` (default the CPU)."""
    import torch  # not at the top: the registry is read without torch (`--help`)

    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


# --- the registry -----------------------------------------------------------------------------

_STRATEGIES: dict[str, MaskingStrategy] = {}


def register(cls: type[MaskingStrategy]) -> type[MaskingStrategy]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.name in _STRATEGIES:
        raise ValueError(f"masking strategy {cls.name!r} registered twice")
    _STRATEGIES[cls.name] = cls()
    return cls


def strategies() -> tuple[MaskingStrategy, ...]:
    """Every registered strategy, in registration order (the default, uniform, first)."""
    return tuple(_STRATEGIES.values())


def names() -> tuple[str, ...]:
    """The ``--sampling`` choices."""
    return tuple(_STRATEGIES)


def get_strategy(name: str) -> MaskingStrategy:
    """The strategy registered as ``name``; a bad name is a :class:`UsageError` naming the choices."""
    try:
        return _STRATEGIES[name]
    except (KeyError, TypeError):
        raise UsageError(f"bad sampling {name!r}: must be one of {', '.join(names())}") from None


def help_text() -> str:
    """``--sampling``'s help: each strategy's name and help line."""
    return "; ".join(f"{s.name}: {s.help}, {s.encoders}" for s in strategies())


def markdown_table() -> str:
    """The docs' table of the strategies, one row each (``L`` units, mask ratio ``r``)."""
    lines = [
        "| `--sampling` | label in pictures | encoders | visible units per image | what it is |",
        "|---|---|---|---|---|",
    ]
    for s in strategies():
        lines.append(f"| `{s.name}` | {s.label} | {s.encoders} | `{s.visible}` | {s.help} |")
    return "\n".join(lines)
