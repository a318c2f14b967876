"""The one seam between encoders and tasks.

A pyramid encoder embeds 4 px patches, then runs four stages (strides 4, 8, 16, 32 of the
grid it is given). Every token carries its true (row, col) on the full patch grid
(``pos_hw [P, H, W, 2]``, ``P`` = 1 when shared by the batch), so the same weights run

* compactly (UM-MAE): on the dense half-side map of the kept units (``forward_compact``), and
* densely (SimMIM, fine-tuning, detection, segmentation): ``forward_dense`` -> 4 maps.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..layers import PatchEmbed
from ..masking import compact_image, compact_positions, dense_positions, kept_unit_index


class PyramidBackbone(nn.Module):
    patch_size = 4

    def __init__(self, embed_dims: Sequence[int], in_chans: int = 3):
        super().__init__()
        self.embed_dims = list(embed_dims)
        self.num_features = self.embed_dims[-1]
        self.patch_embed = PatchEmbed(self.patch_size, in_chans, self.embed_dims[0])
        self.patch_norm = nn.LayerNorm(self.embed_dims[0])
        self.feature_info = [
            dict(num_chs=c, reduction=self.patch_size * 2**i, module=f"stages.{i}")
            for i, c in enumerate(self.embed_dims)
        ]

    # family-specific ---------------------------------------------------------------------
    def forward_stages(self, x: Tensor, pos: Tensor, extent: int) -> list[Tensor]:
        """``x [N, H, W, C]`` normalised patch tokens, ``pos [P, H, W, 2]`` their true
        positions on a full grid of side ``extent``. Returns the 4 stage maps ``[N, C, h, w]``
        (the last one after the final norm)."""
        raise NotImplementedError

    def check_map_size(self, side: int, what: str) -> None:
        """Raise ValueError if a token map of this side cannot run through the stages."""
        if side % 8:
            raise ValueError(f"{what}: token map side {side} must be divisible by 8 (three 2x down-samplings)")

    # shared -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return sum(self.depths)

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` for layer-wise lr decay (BEiT / SimMIM / MAE): 0 for the
        patch embedding, 1..num_layers for the blocks in order, a down-sampling layer with the
        last block before it, ``num_layers + 1`` for the final norm (and, in a classifier, the
        head)."""
        parts = name.split(".")
        if parts[0] in ("patch_embed", "patch_norm"):
            return 0
        if parts[0] == "stages":
            s, j = int(parts[1]), int(parts[2])
            return sum(self.depths[:s]) + j + 1
        if parts[0] == "downsamples":
            return sum(self.depths[: int(parts[1]) + 1])
        if parts[0] == "pos_embeds":  # added at the start of its stage
            return sum(self.depths[: int(parts[1])])
        return self.num_layers + 1

    def forward_tokens(self, tokens: Tensor, pos: Tensor, extent: int) -> list[Tensor]:
        return self.forward_stages(self.patch_norm(tokens), pos, extent)

    def forward_compact(
        self,
        imgs: Tensor,
        choice: Tensor,
        unit: int,
        sm_mask: Tensor | None = None,
        sm_token: Tensor | None = None,
    ) -> Tensor:
        """UM-MAE encoder: run on the compact map of the kept units only.

        imgs ``[N, 3, S, S]``; choice ``[N, S/2u, S/2u]`` (kept unit of each 2x2 block);
        sm_mask ``[N, L]`` True = visible unit replaced by ``sm_token`` (pre-norm embedding).
        Returns the last stage map ``[N, C, S/64, S/64]`` (normed)."""
        n = imgs.shape[0]
        k = unit // self.patch_size
        tokens = self.patch_embed(compact_image(imgs, choice, unit))  # a quarter of the pixels
        pos = compact_positions(choice, k)
        if sm_mask is not None and sm_token is not None:
            bh, bw = choice.shape[1:]
            sm_c = sm_mask.gather(1, kept_unit_index(choice)).view(n, bh, bw)
            sm_c = sm_c.repeat_interleave(k, 1).repeat_interleave(k, 2)
            tokens = torch.where(sm_c.unsqueeze(-1), sm_token.to(tokens.dtype), tokens)
        extent = imgs.shape[-2] // self.patch_size
        return self.forward_tokens(tokens, pos, extent)[-1]

    def forward_dense(
        self, imgs: Tensor, token_mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> list[Tensor]:
        """Dense run on the full image: the four stage maps ``[N, C_i, S/4/2^i, S/4/2^i]``.

        token_mask ``[N, S/4, S/4]`` True = replace the patch embedding by ``mask_token``
        (SimMIM)."""
        tokens = self.patch_embed(imgs)
        if token_mask is not None and mask_token is not None:
            tokens = torch.where(token_mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
        h, w = tokens.shape[1:3]
        pos = dense_positions(1, h, w, device=imgs.device)
        return self.forward_tokens(tokens, pos, max(h, w))

    def forward_features(self, imgs: Tensor) -> Tensor:
        return self.forward_dense(imgs)[-1]

    def forward_feature_maps(self, imgs: Tensor) -> OrderedDict[str, Tensor]:
        """torchvision's backbone seam: ``OrderedDict`` '0'..'3' of the stage maps."""
        return OrderedDict((str(i), f) for i, f in enumerate(self.forward_dense(imgs)))
