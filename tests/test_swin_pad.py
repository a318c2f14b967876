"""Swin's padding to the window in the dense backbone (``SwinBlock.pad_to_window``, set by
``dense.build_stage_maps``) against Swin's own detection backbone
(Swin-Transformer-Object-Detection, ``SwinTransformerBlock.forward`` and ``BasicLayer``'s
``img_mask``), written out below as a plain loop over windows: the normed map padded with
zeros on the right and bottom to multiples of the window, rolled, each window's attention with
the shift mask of the PADDED map's regions, rolled back, cropped. Positions of the padded
tokens continue the grid. Elsewhere (pre-training, fine-tuning, classification) a map the
window does not tile is still refused.
"""

from __future__ import annotations

import math

import pytest
import torch

from ummae.errors import UsageError
from ummae.models.dense import build_stage_maps
from ummae.models.masking import dense_positions
from ummae.models.registry import create_model, list_models
from ummae.models.swin import SwinBlock


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def swin_padded_block(blk: SwinBlock, x: torch.Tensor, window: int) -> torch.Tensor:
    """Swin's dense block, one window at a time, on a dense map ``x [B, H, W, C]`` whose tokens
    sit at (row, col); the window clipped to the short side (ours, Swin's classification rule),
    the shift on when the short side exceeds the window."""
    b, h, w, c = x.shape
    ws = min(window, h, w)
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    shift = ws // 2 if blk.shift and min(h, w) > ws else 0
    padded = torch.zeros(b, hp, wp, c)
    padded[:, :h, :w] = blk.norm1(x)
    rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    pos = torch.stack([rows, cols], -1).float()  # the grid continued over the padding
    region = torch.zeros(hp, wp)  # Swin's img_mask, over the padded size, in the shifted frame
    if shift:
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                region[hs, wsl] = cnt
                cnt += 1
    rolled = torch.roll(padded, (-shift, -shift), dims=(1, 2))
    pos = torch.roll(pos, (-shift, -shift), dims=(0, 1))
    heads = blk.attn.num_heads
    out = torch.zeros_like(rolled)
    for i in range(0, hp, ws):
        for j in range(0, wp, ws):
            tokens = rolled[:, i : i + ws, j : j + ws].reshape(b, ws * ws, c)
            p = pos[i : i + ws, j : j + ws].reshape(-1, 2)
            r = region[i : i + ws, j : j + ws].reshape(-1)
            q, k, v = blk.attn.qkv(tokens).view(b, ws * ws, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            bias = blk.attn.pos_bias.mlp_of_offsets(p[None, :] - p[:, None]).permute(2, 0, 1)  # key - query
            mask = torch.where(r[:, None] != r[None, :], float("-inf"), 0.0)
            logits = q @ k.transpose(-1, -2) / math.sqrt(c // heads) + bias + mask
            attended = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, ws * ws, c)
            out[:, i : i + ws, j : j + ws] = blk.attn.proj(attended).view(b, ws, ws, c)
    y = torch.roll(out, (shift, shift), dims=(1, 2))[:, :h, :w]
    x = x + y
    return x + blk.mlp(blk.norm2(x))


def _block(window: int, shift: bool, pad: bool) -> SwinBlock:
    torch.manual_seed(0)
    blk = SwinBlock(8, 2, window, shift=shift, pos_hidden=8, pad_to_window=pad)
    for p in blk.parameters():  # away from the init, so that every weight matters
        torch.nn.init.normal_(p, std=0.5)
    return blk


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize(
    ("h", "w", "window"),
    [
        (6, 10, 4),  # both sides padded
        (10, 12, 4),  # the height only
        (5, 7, 4),  # odd sides
        (3, 10, 4),  # shorter than the window: one window of 3, the width padded, no shift
        (25, 25, 16),  # the HTC++ recipe's window on a map it does not tile
    ],
)
def test_padded_block__equals_swin_s_padded_windows(h, w, window, shift):
    blk = _block(window, shift, pad=True)
    x = torch.randn(2, h, w, 8, generator=_gen(1))
    with torch.no_grad():
        got = blk(x, dense_positions(1, h, w).float(), max(h, w))
        want = swin_padded_block(blk, x, window)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shift", [False, True])
def test_padding_on__a_map_the_window_tiles_gives_the_unpadded_output_exactly(shift):
    x = torch.randn(2, 8, 12, 8, generator=_gen(2))
    pos = dense_positions(1, 8, 12).float()
    with torch.no_grad():
        padded, plain = (_block(4, shift, pad)(x, pos, 12) for pad in (True, False))
    assert torch.equal(padded, plain)


def test_without_padding__the_block_refuses_a_map_its_window_does_not_tile():
    with pytest.raises(ValueError, match="does not tile"):
        _block(4, True, pad=False)(torch.zeros(1, 6, 8, 8), dense_positions(1, 6, 8).float(), 8)


def test_htcpp_backbone__swin_large_at_1600_with_window_16_builds():
    """The HTC++ recipe's backbone (its 200 x 200 stage-2 map is not a multiple of 16), built
    on the meta device (shapes only); its divisor is the patch and merges' 32."""
    with torch.device("meta"):
        maps = build_stage_maps("swin_large_256", 1600, window_size=16)
    assert maps.encoder.pad_to_window and maps.encoder.size_divisor == 32


def test_dense_backbone__runs_on_maps_window_16_does_not_tile():
    """swin_test at window 16 on 96 x 160 px: every stage map is padded, 24 x 40 to 32 x 48,
    then 12 x 20, 6 x 10 and 3 x 5 to 12 x 24, 6 x 12 and 3 x 6 (windows of their short side);
    each comes out cropped to its own size."""
    maps = build_stage_maps("swin_test", 96, 32, 0.0, window_size=16).eval()
    with torch.no_grad():
        out = maps(torch.rand(1, 3, 96, 160))
    assert [tuple(m.shape[-2:]) for m in out.values()] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    assert all(torch.isfinite(m).all() for m in out.values())


@pytest.mark.parametrize("name", list_models("*swin_test*"))
def test_outside_the_dense_backbone__a_size_the_window_does_not_tile_is_refused(name):
    """Pre-training (UM-MAE's compact map, SimMIM) and classification: 192 px leaves a 12 x 12
    (UM-MAE's compact map: 6 x 6) stage-3 map that window 8 (UM-MAE: 4) does not tile: a wrong
    configuration there, refused in one line."""
    with pytest.raises(UsageError, match="does not tile"):
        create_model(name, img_size=192)
