"""SimMIM baseline (METHOD.md, the reference's ``models_simmim_swin`` / ``models_simmim_pvt``):
the pyramid encoder runs densely on the FULL token map, with the settings of the dense map
(Swin window 16, PVT sr 8-4-2-1), and the masked 16 px units' normalised patch embeddings
replaced by a learnable mask token; one linear layer + pixel shuffle predicts the pixels of
every unit; L1 loss on the masked units (raw normalised pixels, as the paper's SimMIM runs)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ummae.errors import UsageError
from ummae.models.base import PyramidBackbone
from ummae.models.layers import init_weights
from ummae.models.mae import masked_mean, patchify, pop_drop_path
from ummae.models.masking import unit_mask_to_tokens
from ummae.sampling.random import random_masking


class SimMIM(nn.Module):
    def __init__(self, encoder: PyramidBackbone, img_size: int, unit_size: int = 16, mask_ratio: float = 0.75):
        super().__init__()
        if not isinstance(encoder, PyramidBackbone):
            raise UsageError("SimMIM is implemented for pyramid encoders (Swin, PVT)")
        if img_size % unit_size or unit_size % encoder.patch_size:
            raise UsageError(
                f"image size {img_size} must be a multiple of the mask unit {unit_size}, itself a multiple of the {encoder.patch_size}px patch"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise UsageError(f"bad mask_ratio {mask_ratio}: must be in (0, 1)")
        encoder.check_image_size(img_size, f"image size {img_size}")
        self.encoder = encoder
        self.img_size = self.default_img_size = img_size
        self.unit_size = unit_size
        self.grid = (img_size // unit_size, img_size // unit_size)
        self.mask_ratio = mask_ratio
        stride = encoder.feature_info[-1]["reduction"]
        if stride % unit_size:
            raise UsageError(f"the mask unit {unit_size} must divide the encoder's output stride {stride}")
        self.shuffle = stride // unit_size
        self.mask_token = nn.Parameter(torch.zeros(encoder.embed_dims[0]))
        # One linear map from each last-stage token to its r x r units' pixels (r = 2 at 16 px
        # units), channels ordered (unit pixels, r, r) as the reference's, then pixel shuffle
        # onto the unit grid.
        self.decoder = nn.Linear(encoder.num_features, self.shuffle**2 * unit_size**2 * 3)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def options(self) -> dict[str, object]:
        return dict(
            img_size=self.img_size,
            unit_size=self.unit_size,
            mask_ratio=self.mask_ratio,
            drop_path=self.encoder.drop_path_rate,
        )

    def sample_masks(self, n: int, device, generator: torch.Generator | None = None):
        gh, gw = self.grid
        return random_masking(n, gh * gw, self.mask_ratio, device=device, generator=generator), None

    def forward(
        self,
        imgs: Tensor,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
        sm_mask=None,
        validate: bool = True,
    ) -> dict[str, Tensor]:
        """Masks as :meth:`ummae.models.mae.MaskedAutoencoder.forward` takes them (a SimMIM
        mask needs no check: ``validate`` is accepted for the same call)."""
        if imgs.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"model {getattr(self, 'model_name', '')} was built for {self.img_size}px images, got {tuple(imgs.shape[-2:])}"
            )
        if mask is None:
            mask, _ = self.sample_masks(imgs.shape[0], imgs.device, generator)
        k = self.unit_size // self.encoder.patch_size
        token_mask = unit_mask_to_tokens(mask, *self.grid, k)
        feat = self.encoder.forward_dense(imgs, token_mask, self.mask_token)[-1]
        units = F.pixel_shuffle(self.decoder(feat.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), self.shuffle)
        pred = units.flatten(2).transpose(1, 2)  # [N, L, u*u*3], units row-major
        target = patchify(imgs, self.unit_size)
        loss = masked_mean((pred.float() - target.float()).abs().mean(dim=-1), mask)
        return {"loss": loss, "pred": pred, "mask": mask, "sm_mask": None}


def build_simmim(name: str, encoder_cls, arch: dict[str, object], img_size: int, kw: dict[str, object]) -> SimMIM:
    """``name`` as registered: SimMIM on ``encoder_cls(**arch)`` (the dense-map settings);
    ``kw`` the caller's options (image and unit size, mask ratio, ``drop_path``)."""
    drop_path = pop_drop_path(kw, ("img_size", "unit_size", "mask_ratio"), name)
    img_size = kw.pop("img_size", img_size)
    return SimMIM(encoder_cls(drop_path=drop_path, **arch), img_size, **kw)
