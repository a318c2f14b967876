import torch.nn as nn
from torch import Tensor


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding, channels-last output ``[N, H/p, W/p, C]``.

    No norm here: the pre-training wrappers replace tokens (SM / SimMIM mask token) between
    the projection and the encoder's patch LayerNorm, so the token is normalised like a patch.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        return self.proj(x).permute(0, 2, 3, 1)
