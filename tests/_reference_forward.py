"""Plain, unoptimised forwards of the encoders, written from the method's description
(METHOD.md and the reference's conventions) and independent of ummae's code paths: global
attention with an explicit mask of which pairs may attend (instead of window partition, cyclic
roll and region masks), a per-pair pos-MLP evaluated by its formula (instead of the offset
table), average pooling by reshape-and-mean, LayerNorm with the reference's eps written here.
Only the modules' weights are read from the model under test.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_EPS = 1e-5  # the reference builds Swin / PVT blocks (and PVT's kv norm) with nn.LayerNorm's default
EPS = 1e-6  # every other LayerNorm: the reference's norm_layer


def layer_norm(x: Tensor, norm, eps: float) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias


def linear(x: Tensor, layer) -> Tensor:
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def mlp(x: Tensor, m) -> Tensor:
    return linear(F.gelu(linear(x, m.fc1)), m.fc2)


def pos_mlp_bias(pos: Tensor, pos_bias) -> Tensor:
    """``pos [T, 2]`` -> ``[heads, T, T]``: the MLP of the offset key - query, pair by pair."""
    d = pos.unsqueeze(0) - pos.unsqueeze(1)  # [i (query), j (key), 2] = pos_j - pos_i
    feat = torch.sign(d) * torch.log(1.0 + d.abs())
    lin1, lin2 = pos_bias.mlp[0], pos_bias.mlp[2]
    return linear(torch.relu(linear(feat, lin1)), lin2).permute(2, 0, 1)


def swin_allowed(side: int, ws: int, shifted: bool) -> Tensor:
    """``[T, T]`` bool: which tokens of a ``side x side`` map attend to each other in a Swin
    block: the same (cyclically shifted) window, and, where a shifted window wraps around the
    map's edge, the same side of that edge (they were not neighbours before the shift)."""
    ws = min(ws, side)
    s = ws // 2 if shifted and side > ws else 0
    idx = torch.arange(side)
    win = ((idx - s) % side) // ws
    low = idx < s  # wrapped to the far edge by the shift
    r, c = torch.meshgrid(idx, idx, indexing="ij")
    win_r, win_c, low_r, low_c = win[r].flatten(), win[c].flatten(), low[r].flatten(), low[c].flatten()
    return (
        (win_r[:, None] == win_r[None])
        & (win_c[:, None] == win_c[None])
        & (low_r[:, None] == low_r[None])
        & (low_c[:, None] == low_c[None])
    )


def swin_block(x: Tensor, pos: Tensor, blk, ws: int, shifted: bool) -> Tensor:
    """``x [N, H, W, C]``, ``pos [N or 1, H, W, 2]`` -> the block's output."""
    n, h, w, c = x.shape
    heads = blk.attn.num_heads
    hd = c // heads
    allowed = swin_allowed(h, ws, shifted)
    y = layer_norm(x, blk.norm1, BLOCK_EPS).reshape(n, h * w, c)
    qkv = linear(y, blk.attn.qkv).view(n, h * w, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    out = torch.zeros(n, heads, h * w, hd)
    for b in range(n):
        bias = pos_mlp_bias(pos[b if pos.shape[0] > 1 else 0].reshape(h * w, 2).float(), blk.attn.pos_bias)
        logits = q[b] @ k[b].transpose(-1, -2) / math.sqrt(hd) + bias
        out[b] = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ v[b]
    x = x + linear(out.transpose(1, 2).reshape(n, h, w, c), blk.attn.proj)
    return x + mlp(layer_norm(x, blk.norm2, BLOCK_EPS), blk.mlp)


def sr_attention(x: Tensor, attn, sr: int) -> Tensor:
    """PVT spatial-reduction attention: keys and values from the map average-pooled by ``sr``,
    then a 1x1 conv and a LayerNorm."""
    n, h, w, c = x.shape
    heads = attn.num_heads
    hd = c // heads
    q = linear(x, attn.q).reshape(n, h * w, heads, hd).transpose(1, 2)
    pooled = x.reshape(n, h // sr, sr, w // sr, sr, c).mean(dim=(2, 4)).reshape(n, -1, c)
    y = pooled @ attn.sr.weight[:, :, 0, 0].T + attn.sr.bias
    y = layer_norm(y, attn.sr_norm, BLOCK_EPS)
    kv = linear(y, attn.kv).reshape(n, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ kv[0].transpose(-1, -2) / math.sqrt(hd), -1)
    return linear((att @ kv[1]).transpose(1, 2).reshape(n, h, w, c), attn.proj)


def patch_conv(x: Tensor, conv) -> Tensor:
    """A non-overlapping conv (patch embedding, 2x2 down-sampling) as a matmul per patch:
    ``[N, C, H, W]`` -> ``[N, H/p, W/p, C_out]``."""
    n, c, h, w = x.shape
    p = conv.kernel_size[0]
    patches = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h // p, w // p, c * p * p)
    return patches @ conv.weight.reshape(conv.weight.shape[0], -1).T + conv.bias


def swin_dense(enc, imgs: Tensor, window: int) -> list[Tensor]:
    """The four stage maps ``[N, C, h, w]`` of a Swin encoder on the full image."""
    x = layer_norm(patch_conv(imgs, enc.patch_embed.proj), enc.patch_norm, EPS)
    side = x.shape[1]
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([r, c], -1)[None].float()
    outs = []
    for s, stage in enumerate(enc.stages):
        if s > 0:
            ds = enc.downsamples[s - 1]
            x = patch_conv(layer_norm(x, ds.norm, EPS).permute(0, 3, 1, 2), ds.reduction)
            pos = pos[:, ::2, ::2] / 2
        for j, blk in enumerate(stage):
            x = swin_block(x, pos, blk, window, shifted=j % 2 == 1)
        if s == len(enc.stages) - 1:
            x = layer_norm(x, enc.norm, EPS)
        outs.append(x.permute(0, 3, 1, 2))
    return outs


def pvt_dense(enc, imgs: Tensor, pos_table: Tensor, srs) -> list[Tensor]:
    """The four stage maps of a PVT encoder on the full image; ``pos_table [H, W, C]`` is the
    stage-1 position embedding (fixed sin-cos in pre-training), ``srs`` the reductions."""
    x = patch_conv(imgs, enc.patch_embed.proj) + pos_table
    outs = []
    for s, stage in enumerate(enc.stages):
        if s > 0:
            x = patch_conv(x.permute(0, 3, 1, 2), enc.downsamples[s - 1].proj)
        for blk in stage:
            x = x + sr_attention(layer_norm(x, blk.norm1, BLOCK_EPS), blk.attn, srs[s])
            x = x + mlp(layer_norm(x, blk.norm2, BLOCK_EPS), blk.mlp)
        if s == len(enc.stages) - 1:
            x = layer_norm(x, enc.norm, EPS)
        outs.append(x.permute(0, 3, 1, 2))
    return outs


def bicubic_resize(table: Tensor, h: int, w: int, a: float = -0.75) -> Tensor:
    """``[H, W, C]`` -> ``[h, w, C]``: Keys' cubic convolution (a = -0.75), pixel centres
    aligned (source x = (x_out + 0.5) * in / out - 0.5), edge taps clamped: the resize timm and
    MAE apply to position tables, written out tap by tap."""

    def weights(t: float) -> list[float]:
        def near(d):  # |d| <= 1
            return ((a + 2) * d - (a + 3)) * d * d + 1

        def far(d):  # 1 < |d| < 2
            return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    def along(x: Tensor, out: int, dim: int) -> Tensor:
        n_in = x.shape[dim]
        rows = []
        for i in range(out):
            src = (i + 0.5) * n_in / out - 0.5
            x0 = math.floor(src)
            acc = 0
            for tap, wt in zip(range(x0 - 1, x0 + 3), weights(src - x0), strict=True):
                acc = acc + wt * x.select(dim, min(max(tap, 0), n_in - 1))
            rows.append(acc)
        return torch.stack(rows, dim)

    return along(along(table.double(), h, 0), w, 1).to(table.dtype)
