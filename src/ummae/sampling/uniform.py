"""Uniform Sampling (UM-MAE, METHOD.md): in every 2x2 block of units keep exactly one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ummae.sampling.base import MaskingStrategy, draw_device, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor

RATIO = 0.75  # one unit of four kept


@register
class UniformSampling(MaskingStrategy):
    name = "uniform"
    label = "US"
    help = "Uniform Sampling, one unit kept per 2x2 block, mask ratio 0.75 (UM-MAE)"
    compacts = True
    visible = "L/4"
    fixed_ratio = RATIO

    def ratio_problem(self, mask_ratio: float) -> str | None:
        if abs(mask_ratio - RATIO) > 1e-9:
            return (
                f"uniform sampling keeps one unit per 2x2 block, so the mask ratio is 0.75; got mask_ratio={mask_ratio}"
            )
        return None

    def grid_problem(self, grid_h: int, grid_w: int) -> str | None:
        try:
            check_uniform_grid(grid_h, grid_w)
        except ValueError as e:
            return str(e)
        return None

    def num_visible(self, grid_h: int, grid_w: int, mask_ratio: float) -> int:
        return grid_h * grid_w // 4

    def sample(self, n, grid_h, grid_w, mask_ratio, *, generator, device=None) -> Tensor:
        return uniform_sampling(n, grid_h, grid_w, device=device, generator=generator)


def check_uniform_grid(grid_h: int, grid_w: int) -> None:
    if grid_h % 2 or grid_w % 2 or grid_h <= 0 or grid_w <= 0:
        raise ValueError(
            f"uniform sampling keeps one unit per 2x2 block, so the unit grid must have an even "
            f"number of rows and columns; got a {grid_h}x{grid_w} grid "
            f"(image size / mask unit size must be even)"
        )


def uniform_sampling(
    n: int, grid_h: int, grid_w: int, *, device=None, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform Sampling: in every 2x2 block of units keep exactly one, chosen uniformly and
    independently per block and per image (the paper's rule, not the reference's pooled
    sampler). Returns the bool mask ``[n, grid_h * grid_w]``, True = masked (75%)."""
    import torch  # not at the top: the registry is read without torch (`--help`)

    check_uniform_grid(grid_h, grid_w)
    dev = draw_device(generator, device)
    bh, bw = grid_h // 2, grid_w // 2
    choice = torch.randint(0, 4, (n, bh, bw), device=dev, generator=generator)
    return mask_from_choice(choice)


def mask_from_choice(choice: Tensor) -> Tensor:
    """``choice [N, bh, bw]`` in 0..3 (row-major inside the 2x2 block) -> mask ``[N, L]``."""
    import torch  # not at the top: the registry is read without torch (`--help`)

    n, bh, bw = choice.shape
    keep = torch.nn.functional.one_hot(choice, 4).bool()  # [N, bh, bw, 4]
    keep = keep.view(n, bh, bw, 2, 2).permute(0, 1, 3, 2, 4).reshape(n, 2 * bh * 2 * bw)
    return ~keep
