"""Fixed 2-D sin-cos position embeddings (MAE's ``get_2d_sincos_pos_embed``), evaluated at
arbitrary (row, col) positions so that compact maps (UM-MAE) get the embedding of their
tokens' true positions.

Channel layout is MAE's, on which every published checkpoint depends: the first half of the
channels encodes the column (w), the second half the row (h), each as ``[sin, cos]`` of
``dim/4`` frequencies. Computed in float64 like MAE's numpy code, then rounded to float32, so
the tables equal the ones stored in reference checkpoints to the last bit or so."""

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_2d(pos_hw: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """``pos_hw [..., 2]`` (row, col) -> ``[..., dim]`` float32: ``[sin(col), cos(col),
    sin(row), cos(row)]`` of ``dim/4`` frequencies each (MAE's channel order)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, device=pos_hw.device, dtype=torch.float64) / quarter)
    pos = pos_hw.double()
    out_r = pos[..., 0:1] * omega
    out_c = pos[..., 1:2] * omega
    return torch.cat([out_c.sin(), out_c.cos(), out_r.sin(), out_r.cos()], dim=-1).float()


def sincos_grid(h: int, w: int, dim: int) -> Tensor:
    """``[h*w, dim]`` embedding of a full row-major grid."""
    r = torch.arange(h).view(h, 1).expand(h, w)
    c = torch.arange(w).view(1, w).expand(h, w)
    return sincos_2d(torch.stack([r, c], -1).reshape(h * w, 2), dim)


def resize_pos_table(table: Tensor, h: int, w: int) -> Tensor:
    """Bicubic resize of a learnable position table ``[H, W, C]`` -> ``[h, w, C]`` (fine-tuning
    at another image size, as timm and MAE interpolate ViT position embeddings)."""
    t = table.permute(2, 0, 1).unsqueeze(0).float()
    t = F.interpolate(t, size=(h, w), mode="bicubic", align_corners=False)
    return t[0].permute(1, 2, 0).to(table.dtype)
