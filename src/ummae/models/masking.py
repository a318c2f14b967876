"""Masks as plain functions (METHOD.md: Secondary Masking, compaction), after the first mask.

Convention everywhere: a mask is a bool tensor ``[N, L]`` over the ``L = gh * gw`` mask units
of an image in row-major order, and **True = masked** (removed from the encoder, predicted by
the decoder). Masks are drawn on the tensor's device for the whole batch at once; pass a
``torch.Generator`` to make them reproducible from a seed.

The first mask is drawn by a masking strategy (``--sampling``), one file each in
:mod:`ummae.sampling`, below the models so that the command line reads their choices without
torch: Uniform Sampling (:func:`~ummae.sampling.uniform.uniform_sampling`), MAE's random
sampling (:func:`~ummae.sampling.random.random_masking`) and BEiT's block-wise masking.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ummae.sampling.uniform import check_uniform_grid


def block_choice(mask: Tensor, grid_h: int, grid_w: int, validate: bool = True) -> Tensor:
    """Inverse of :func:`mask_from_choice`: which unit of each 2x2 block is kept.

    With ``validate`` (for masks from outside), raises if a block does not keep exactly one
    unit; the check costs a host sync, so masks drawn by :func:`uniform_sampling` skip it.
    """
    check_uniform_grid(grid_h, grid_w)
    n = mask.shape[0]
    keep = (~mask).view(n, grid_h // 2, 2, grid_w // 2, 2).permute(0, 1, 3, 2, 4)
    keep = keep.reshape(n, grid_h // 2, grid_w // 2, 4)
    if validate and not torch.equal(keep.sum(-1), torch.ones_like(keep[..., 0], dtype=torch.long)):
        raise ValueError("mask does not keep exactly one unit per 2x2 block")
    return keep.float().argmax(-1)


def secondary_masking(
    mask: Tensor, ratio: float, *, generator: torch.Generator | None = None, num_visible: int | None = None
) -> Tensor:
    """Secondary Masking: of the ``V`` visible units of each image choose exactly
    ``V - int(V * (1 - ratio))`` at random, the reference's count (it keeps
    ``int(V * (1 - ratio))`` visible): ``V * ratio`` when that is whole (16 of 64 at 256 px),
    one more than its floor otherwise (13 of ViT-B's 49 at 224 px). Returns a bool ``[N, L]``,
    True = visible unit whose patch embedding is replaced by the shared learnable token. The
    loss ignores these units.

    Every image of the batch must have the same number of visible units (true for uniform and
    for fixed-ratio random masks). A caller that knows it passes ``num_visible`` and skips the
    check, which costs a host sync."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"secondary masking ratio must be in [0, 1), got {ratio}")
    n, length = mask.shape
    v = num_visible
    if v is None:
        visible = (~mask).sum(1)
        v = int(visible[0])
        if not torch.all(visible == v):
            raise ValueError("secondary masking needs the same number of visible units per image")
    k = v - int(v * (1.0 - ratio))  # the same float expression as the reference's
    if k == 0:
        return torch.zeros_like(mask)
    noise = torch.rand(n, length, device=mask.device, generator=generator)
    noise = noise.masked_fill(mask, 2.0)  # masked units sort after every visible one
    chosen = noise.argsort(dim=1)[:, :k]
    sm = torch.zeros_like(mask)
    sm.scatter_(1, chosen, True)
    return sm


def unit_mask_to_tokens(mask: Tensor, grid_h: int, grid_w: int, k: int) -> Tensor:
    """Unit mask ``[N, L]`` -> token mask ``[N, grid_h*k, grid_w*k]`` (each unit = k x k tokens)."""
    m = mask.view(-1, grid_h, grid_w)
    return m.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)


# --- compaction ("reorganisation", METHOD.md) -------------------------------------------------


def compact_image(x: Tensor, choice: Tensor, unit: int) -> Tensor:
    """Gather the kept unit of every 2x2 block into a dense half-size image.

    ``x [N, C, H, W]``, ``choice [N, H/(2u), W/(2u)]`` -> ``[N, C, H/2, W/2]``. The kept unit
    lands at its block's position and keeps its own pixels, so patch-embedding the compact image
    (stride 4 inside 16 px units) equals compacting the patch tokens of the full image, at a
    quarter of the cost.
    """
    n, c, h, w = x.shape
    bh, bw = choice.shape[1:]
    # The flat pixel index (row * w + col) of every compact pixel, shared by the channels, and
    # one gather: several times faster on CPU than gathering whole units out of an 8-axis
    # permuted copy of the image (the same values: indexing only).
    off = torch.arange(unit, device=x.device)
    rows = (2 * torch.arange(bh, device=x.device).view(1, bh, 1) + choice // 2) * unit  # kept unit's top row
    cols = (2 * torch.arange(bw, device=x.device).view(1, 1, bw) + choice % 2) * unit  # ... and left column
    rows = rows.view(n, bh, 1, bw, 1) + off.view(1, 1, unit, 1, 1)
    cols = cols.view(n, bh, 1, bw, 1) + off.view(1, 1, 1, 1, unit)
    index = (rows * w + cols).view(n, 1, bh * unit * bw * unit).expand(n, c, -1)
    return x.reshape(n, c, h * w).gather(2, index).view(n, c, bh * unit, bw * unit)


def compact_positions(choice: Tensor, k: int) -> Tensor:
    """True (row, col) on the full token grid of every token of the compact map.

    ``choice [N, bh, bw]``, ``k`` tokens per unit side -> ``pos_hw [N, bh*k, bw*k, 2]`` (long).
    Compact token ``(i, j)`` comes from block ``(i//k, j//k)``, offset ``(i%k, j%k)`` inside the
    kept unit ``(2*bi + choice//2, 2*bj + choice%2)``.
    """
    n, bh, bw = choice.shape
    dev = choice.device
    rows = torch.arange(bh * k, device=dev)
    cols = torch.arange(bw * k, device=dev)
    c_rep = choice.repeat_interleave(k, 1).repeat_interleave(k, 2)  # [N, bh*k, bw*k]
    r = (2 * (rows // k)).view(1, -1, 1) * k + (c_rep // 2) * k + (rows % k).view(1, -1, 1)
    c = (2 * (cols // k)).view(1, 1, -1) * k + (c_rep % 2) * k + (cols % k).view(1, 1, -1)
    return torch.stack([r, c], dim=-1)


def dense_positions(n: int, h: int, w: int, device=None) -> Tensor:
    """``pos_hw [n, h, w, 2]`` of a full (uncompacted) token grid."""
    r = torch.arange(h, device=device).view(1, h, 1).expand(n, h, w)
    c = torch.arange(w, device=device).view(1, 1, w).expand(n, h, w)
    return torch.stack([r, c], dim=-1)


def kept_unit_index(choice: Tensor) -> Tensor:
    """Index (row-major on the full unit grid) of the kept unit of each block, in compact
    row-major order: ``[N, bh*bw]``."""
    n, bh, bw = choice.shape
    gw = 2 * bw
    br = torch.arange(bh, device=choice.device).view(1, bh, 1)
    bc = torch.arange(bw, device=choice.device).view(1, 1, bw)
    idx = (2 * br + choice // 2) * gw + 2 * bc + choice % 2
    return idx.reshape(n, bh * bw)


def reference_unit_index(choice: Tensor) -> Tensor:
    """The reference code's (flawed) assignment: compact token ``k`` gets the ``k``-th visible
    unit in row-major order of the FULL grid. Kept only for the named compatibility option."""
    return kept_unit_index(choice).sort(dim=1).values
