"""BEiT's block-wise masking (Bao et al. 2021, beit/masking_generator.py), for ViT: masked
units come in rectangles, so a masked unit's neighbours are often masked too and the decoder
cannot copy them.

BEiT's rule, per image: while fewer than ``target`` units are masked, place one block: up to 10
attempts, each a rectangle of area ``A ~ U(min_block, room)`` (``room``: the units still to
mask) and aspect ratio ``a = exp(U(log 0.3, log 1/0.3))``, ``h = round(sqrt(A a))``,
``w = round(sqrt(A / a))``, tried only if ``h < grid_h`` and ``w < grid_w``, at a uniform random
top-left; the first attempt that masks between 1 and ``room`` new units is kept. A block that
masks nothing in its 10 attempts ends the loop.

Our choices:

* **Exact count.** BEiT can stop short of its target (a block that finds no room in its 10
  attempts); MAE's loss, Secondary Masking and the ViT's gather of visible tokens need every
  image of the batch to keep the same number of visible units, ``num_kept(L, r)`` as random
  masking counts. So the shortfall is topped up with units chosen uniformly at random among
  the unmasked ones. Placing more blocks instead would have no bound on its attempts (a
  shortfall of one unit needs a 1x1 rectangle, rare when blocks are at least ``min_block``),
  and its last units would not be blocks either; the top-up is bounded, exact, and small: at
  0.75 on 14x14 about a third of the images fall short, by 0.7 units on average (0.5% of the
  147 masked), and 12% of the images by 0.16 units on 8x8.
* **Target**: ``int(r * L)`` units for the model's ``mask_ratio`` r (0.75 by default, as MAE;
  BEiT masks 40%), so ``--sampling block`` compares with ``random`` at the same ratio.
* **Smallest block** (:func:`min_block_units`): BEiT's 16 units of its 14x14 grid, scaled to keep
  the same share of the image (16/196, about 8%), at least one unit: 5 on the 8x8 grid of
  64 px at 8 px units, 21 on 16x16, 1 on 4x4. A fixed 16 would make every block of an 8x8 grid
  at least a quarter of the image; the share keeps BEiT's block sizes relative to the image at
  any resolution. The largest block is the room left, as BEiT's default.
* **Randomness** comes only from the ``generator`` (no Python ``random``, no numpy), in a fixed
  order: first ``U [n, 10 * target, 4]``, one row of four per attempt (area, aspect, top, left:
  ``top = floor(u * (grid_h - h + 1))``; the number of attempts never exceeds ``10 * target``,
  since every kept block masks at least one unit), then ``noise [n, L]`` for the top-up. The
  draws do not depend on the masks, so the generator ends in the same state for every mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from ummae.sampling.base import MaskingStrategy, draw_device, num_kept, register

if TYPE_CHECKING:
    from torch import Tensor

ATTEMPTS = 10  # tries to place one block (BEiT's)
MIN_ASPECT, MAX_ASPECT = 0.3, 1 / 0.3  # BEiT's aspect ratio bounds of a block
BEIT_MIN_BLOCK, BEIT_UNITS = 16, 14 * 14  # BEiT's smallest block on its grid (224 px, 16 px patches)


@register
class BlockMasking(MaskingStrategy):
    """BEiT's block-wise masking with an exact count (see the module doc)."""

    name = "block"
    label = "block"
    help = "BEiT's block-wise masking, rectangles of random size and aspect topped up to int(r*L) units"

    def sample(self, n, grid_h, grid_w, mask_ratio, *, generator, device=None) -> Tensor:
        """``n`` block-wise masks, exactly ``int(mask_ratio * L)`` units masked per image."""
        import torch  # not at the top: the registry is read without torch (`--help`)

        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
        length = grid_h * grid_w
        target = length - num_kept(length, mask_ratio)
        if target == 0:
            raise ValueError(f"mask ratio {mask_ratio} masks no unit out of {length}")
        dev = draw_device(generator, device)
        attempts = torch.rand(n, ATTEMPTS * target, 4, device=dev, generator=generator).cpu()
        noise = torch.rand(n, length, device=dev, generator=generator)
        smallest = min_block_units(length)
        blocks = [place_blocks(_rows(attempts[i]), grid_h, grid_w, target, smallest)[0] for i in range(n)]
        return top_up(torch.tensor(blocks, dtype=torch.bool).view(n, length).to(dev), noise, target)


def min_block_units(length: int) -> int:
    """The smallest block on a grid of ``length`` units: BEiT's share of its grid, at least 1."""
    return max(1, round(BEIT_MIN_BLOCK * length / BEIT_UNITS))


def _rows(u: Tensor, chunk: int = 64) -> Iterator[list[float]]:
    """The attempts' uniforms as Python floats, a chunk at a time (most of the budget goes unused)."""
    for start in range(0, u.shape[0], chunk):
        yield from u[start : start + chunk].tolist()


def place_blocks(
    attempts: Iterator[Sequence[float]], grid_h: int, grid_w: int, target: int, smallest: int
) -> tuple[list[list[bool]], list[tuple[int, int, int, int]]]:
    """BEiT's loop on one image: ``(mask rows, blocks kept as (top, left, h, w))``, at most
    ``target`` units masked. ``attempts`` yields four uniforms in [0, 1) per attempt."""
    mask = [[False] * grid_w for _ in range(grid_h)]
    blocks: list[tuple[int, int, int, int]] = []
    count = 0
    while count < target:
        added = _place_block(mask, attempts, target - count, smallest, blocks)
        if added == 0:
            break
        count += added
    return mask, blocks


def _place_block(mask, attempts, room: int, smallest: int, blocks: list) -> int:
    """Up to :data:`ATTEMPTS` tries at one block masking 1 to ``room`` new units: the number it
    masked (0: none fitted)."""
    grid_h, grid_w = len(mask), len(mask[0])
    log_lo, log_hi = math.log(MIN_ASPECT), math.log(MAX_ASPECT)
    for _ in range(ATTEMPTS):
        u_area, u_aspect, u_top, u_left = next(attempts)
        area = smallest + (room - smallest) * u_area
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if h >= grid_h or w >= grid_w:
            continue
        top, left = int(u_top * (grid_h - h + 1)), int(u_left * (grid_w - w + 1))
        new = [(i, j) for i in range(top, top + h) for j in range(left, left + w) if not mask[i][j]]
        if 0 < len(new) <= room:
            for i, j in new:
                mask[i][j] = True
            blocks.append((top, left, h, w))
            return len(new)
    return 0


def top_up(mask: Tensor, noise: Tensor, target: int) -> Tensor:
    """``mask [N, L]`` (at most ``target`` units masked per image) with its shortfall filled by
    the unmasked units of lowest ``noise [N, L]``: uniformly random units, exactly ``target``
    masked per image."""
    ranks = noise.masked_fill(mask, -1.0).argsort(dim=1).argsort(dim=1)  # masked units rank first
    return ranks < target
