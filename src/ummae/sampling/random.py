"""MAE's random sampling (and SimMIM's random mask): a fixed number of units, uniformly at random."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ummae.sampling.base import MaskingStrategy, draw_device, num_kept, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor


@register
class RandomSampling(MaskingStrategy):
    name = "random"
    label = "random"
    help = "MAE's random sampling, int(r*L) units masked uniformly at random"

    def sample(self, n, grid_h, grid_w, mask_ratio, *, generator, device=None) -> Tensor:
        return random_masking(n, grid_h * grid_w, mask_ratio, device=device, generator=generator)


def random_masking(
    n: int, length: int, ratio: float, *, device=None, generator: torch.Generator | None = None
) -> Tensor:
    """MAE random sampling / SimMIM random mask: exactly ``int(ratio * length)`` units masked
    per image (the reference's count), uniformly at random."""
    import torch  # not at the top: the registry is read without torch (`--help`)

    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    dev = draw_device(generator, device)
    num_keep = num_kept(length, ratio)
    if num_keep == length:  # int(ratio * length) == 0: nothing to predict, a loss over no unit
        raise ValueError(f"mask ratio {ratio} masks no unit out of {length}")
    noise = torch.rand(n, length, device=dev, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks >= num_keep
