"""The one seam between encoders and tasks.

A pyramid encoder embeds 4 px patches, then runs four stages (strides 4, 8, 16, 32 of the
grid it is given). Every token carries its true (row, col) on the full patch grid
(``pos_hw [P, H, W, 2]`` float, ``P`` = 1 when shared by the batch), so the same weights run

* compactly (UM-MAE): on the dense half-side map of the kept units (``forward_compact``), and
* densely (SimMIM, fine-tuning, detection, segmentation): ``forward_dense`` -> 4 maps.

Each down-sampling gives a merged token the position of its top-left token divided by 2
exactly (the reference's rule): on the compact map the last stage's tokens sit at
half-integer positions, which is where they really are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ummae.errors import UsageError
from ummae.models.layers import LayerNorm, PatchEmbed
from ummae.models.masking import compact_image, compact_positions, dense_positions, kept_unit_index


def sizes_that_fit(fits, near: int, n: int = 4) -> str:
    """The ``n`` image sizes nearest to ``near`` (multiples of 16 up to 2048) for which
    ``fits(size)`` holds, for error messages: "image size 200 ...; sizes that fit: 128, 256"."""
    found = [s for s in sorted(range(32, 2049, 16), key=lambda s: (abs(s - near), s)) if fits(s)][:n]
    return ", ".join(map(str, sorted(found))) or "none up to 2048"


def _fits(check, side: int) -> bool:
    try:
        check(side, "")
        return True
    except ValueError:
        return False


class PyramidBackbone(nn.Module):
    patch_size = 4

    def __init__(self, embed_dims: Sequence[int], in_chans: int = 3, patch_norm: bool = True):
        super().__init__()
        self.embed_dims = list(embed_dims)
        self.num_features = self.embed_dims[-1]
        self.patch_embed = PatchEmbed(self.patch_size, in_chans, self.embed_dims[0])
        # Swin normalises the patch embedding; the reference's PVT does not.
        self.patch_norm = LayerNorm(self.embed_dims[0]) if patch_norm else nn.Identity()
        self.feature_info = [
            dict(num_chs=c, reduction=self.patch_size * 2**i, module=f"stages.{i}")
            for i, c in enumerate(self.embed_dims)
        ]

    # family-specific ---------------------------------------------------------------------
    def forward_stages(self, x: Tensor, pos: Tensor, extent: int, frac_bits: Sequence[int]) -> list[Tensor]:
        """``x [N, H, W, C]`` normalised patch tokens, ``pos [P, H, W, 2]`` (float) their true
        positions on a full grid of side ``extent``; at stage ``s`` every position is a
        multiple of ``2 ** -frac_bits[s]``. Returns the 4 stage maps ``[N, C, h, w]`` (the last
        one after the final norm)."""
        raise NotImplementedError

    @property
    def size_divisor(self) -> int:
        """What every side of an image of any size must be a multiple of to run densely through
        the stages: the patch and the three 2x down-samplings (32)."""
        return self.patch_size * 2 ** (len(self.embed_dims) - 1)

    def check_map_size(self, side: int, what: str) -> None:
        """Raise ValueError if a token map of this side cannot run through the stages."""
        if side % 8:
            raise UsageError(f"{what}: token map side {side} must be divisible by 8 (three 2x down-samplings)")

    def check_image_size(self, img_size: int, what: str, compact: bool = False) -> None:
        """Raise ValueError (naming sizes that fit) if images of this size cannot run through
        the stages: densely (a map of side S/4) or, ``compact``, on UM-MAE's map of side S/8."""
        div = 8 if compact else 4
        if img_size > 0 and img_size % div == 0 and _fits(self.check_map_size, img_size // div):
            return
        fits = sizes_that_fit(lambda s: s % div == 0 and _fits(self.check_map_size, s // div), img_size)
        try:
            self.check_map_size(img_size // div, what)
            problem = f"{what}: not a multiple of {div * 8} px"
        except ValueError as e:
            problem = str(e)
        raise UsageError(f"{problem}; sizes that fit this model: {fits}")

    # shared -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return sum(self.depths)

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` for layer-wise lr decay (BEiT / MAE, as the reference
        applies it to its flat list of blocks): 0 for the patch embedding and position table,
        1..num_layers for the blocks in order, a down-sampling layer with the first block after
        it (the reference keeps it inside that block), ``num_layers + 1`` for the final norm
        (and, in a classifier, the head)."""
        parts = name.split(".")
        if parts[0] in ("patch_embed", "patch_norm"):
            return 0
        if parts[0] == "stages":
            s, j = int(parts[1]), int(parts[2])
            return sum(self.depths[:s]) + j + 1
        if parts[0] == "downsamples":
            return sum(self.depths[: int(parts[1]) + 1]) + 1
        if parts[0] == "pos_embed":  # added to the patch embedding
            return 0
        return self.num_layers + 1

    def forward_tokens(
        self, tokens: Tensor, pos: Tensor, extent: int, frac_bits: Sequence[int] | None = None
    ) -> list[Tensor]:
        """The stages on any token map: ``tokens [N, H, W, C]`` patch embeddings (before the
        patch norm), ``pos [P, H, W, 2]`` their true positions. Without ``frac_bits`` every stage
        allows the finest step positions can have after its halvings (``2**-s``): always exact,
        at the cost of a larger pos-MLP table than the compact or dense forward need."""
        if frac_bits is None:
            frac_bits = list(range(len(self.embed_dims)))
        return self.forward_stages(self.patch_norm(tokens), pos.float(), extent, frac_bits)

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
        pos = compact_positions(choice, k).float()
        if sm_mask is not None and sm_token is not None:
            # Replaced before the patch norm: the reference normalises the SM token like a patch.
            bh, bw = choice.shape[1:]
            sm_c = sm_mask.gather(1, kept_unit_index(choice)).view(n, bh, bw)
            sm_c = sm_c.repeat_interleave(k, 1).repeat_interleave(k, 2)
            tokens = torch.where(sm_c.unsqueeze(-1), sm_token.to(tokens.dtype), tokens)
        extent = imgs.shape[-2] // self.patch_size
        # A 2x2 group of compact tokens lies inside one kept unit for the first log2(k)
        # merges; after that it spans blocks, and each merge halves the position step.
        frac_bits = [max(0, s - (k.bit_length() - 1)) for s in range(len(self.embed_dims))]
        return self.forward_stages(self.patch_norm(tokens), pos, extent, frac_bits)[-1]

    def forward_dense(
        self, imgs: Tensor, token_mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> list[Tensor]:
        """Dense run on the full image: the four stage maps ``[N, C_i, S/4/2^i, S/4/2^i]``.

        token_mask ``[N, S/4, S/4]`` True = replace the normalised patch embedding by
        ``mask_token`` (SimMIM: the reference inserts it after the patch norm)."""
        tokens = self.patch_norm(self.patch_embed(imgs))
        if token_mask is not None and mask_token is not None:
            tokens = torch.where(token_mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
        h, w = tokens.shape[1:3]
        pos = dense_positions(1, h, w, device=imgs.device).float()
        return self.forward_stages(tokens, pos, max(h, w), [0] * len(self.embed_dims))

    def forward_features(self, imgs: Tensor) -> Tensor:
        return self.forward_dense(imgs)[-1]
