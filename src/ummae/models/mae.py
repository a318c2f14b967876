"""UM-MAE and MAE: masked autoencoders over Swin / PVT (Uniform Masking + compaction) and ViT
(any masking strategy of :mod:`ummae.sampling`: Uniform Sampling, MAE's random sampling, BEiT's
blocks). METHOD.md is the specification; the whole method is in this file: patchify, masking,
encoder, decoder, loss."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ummae.errors import UsageError
from ummae.models.base import PyramidBackbone, sizes_that_fit
from ummae.models.decoder import MAEDecoder
from ummae.models.layers import init_weights
from ummae.models.masking import block_choice, kept_unit_index, reference_unit_index, secondary_masking
from ummae.sampling import DEFAULT_MASK_RATIO, MaskingStrategy, get_strategy, strategies


def patchify(imgs: Tensor, unit: int) -> Tensor:
    """``[N, C, H, W]`` -> ``[N, L, unit*unit*C]`` (row-major units, pixels (dy, dx, c))."""
    n, c, h, w = imgs.shape
    # Channels last first, then whole unit rows of unit*c values: two moves with contiguous
    # runs, several times faster on CPU than one six-axis permute whose innermost axis steps
    # over whole channel planes (the same values: data movement only).
    x = imgs.permute(0, 2, 3, 1).reshape(n, h // unit, unit, w // unit, unit * c)
    return x.permute(0, 1, 3, 2, 4).reshape(n, (h // unit) * (w // unit), unit * unit * c)


def unpatchify(x: Tensor, unit: int, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify`."""
    n = x.shape[0]
    gh, gw = grid
    x = x.reshape(n, gh, gw, unit, unit, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, gh * unit, gw * unit)


def norm_pix_target(target: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-unit normalised pixels (MAE's norm_pix_loss): subtract the unit's mean, divide by
    sqrt(var + eps) over its ``unit*unit*3`` values."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def unnormalize_pix(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Inverse of :func:`norm_pix_target`: per-unit normalised ``pred [N, L, u*u*3]`` back to
    the pixel space of ``target`` (same shape), with each unit's own mean and variance taken
    from ``target``. For a picture of a norm-pix model's prediction (MAE's visualisation does
    the same): the model predicts a unit's pattern, not its mean colour or contrast."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + eps) ** 0.5 + mean


def masked_mean(per_unit: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``per_unit [N, L]`` over the masked units (True = masked)."""
    m = mask.to(per_unit.dtype)
    return (per_unit * m).sum() / m.sum()


class MaskedAutoencoder(nn.Module):
    """``forward(imgs) -> {"loss", "pred" [N, L, u*u*3], "mask" [N, L], "sm_mask" [N, L]}``;
    masks: True = masked (mask) / True = visible unit replaced by the SM token (sm_mask)."""

    def __init__(
        self,
        encoder: nn.Module,
        img_size: int,
        unit_size: int = 16,
        sampling: str = "uniform",
        mask_ratio: float = DEFAULT_MASK_RATIO,
        sm_ratio: float = 0.25,
        norm_pix_loss: bool = True,
        decoder_pos: str = "true",
        decoder_dim: int = 512,
        decoder_depth: int = 2,
        decoder_heads: int = 16,
    ):
        super().__init__()
        self.pyramid = isinstance(encoder, PyramidBackbone)
        self.strategy = get_strategy(sampling)  # how the first mask is drawn (ummae.sampling)
        _validate(encoder, self.pyramid, img_size, unit_size, self.strategy, mask_ratio, sm_ratio, decoder_pos)
        self.encoder = encoder
        self.img_size = self.default_img_size = img_size
        self.unit_size = unit_size
        self.grid = (img_size // unit_size, img_size // unit_size)
        self.sampling = sampling
        self.mask_ratio = self.strategy.mask_ratio(mask_ratio)
        self.num_visible = self.strategy.num_visible(*self.grid, self.mask_ratio)
        self.sm_ratio = sm_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder_pos = decoder_pos
        if self.pyramid:
            # Last compact map is S/64 a side; the unit-block grid is S/(2u): upsample by 32/u
            # with a Linear to D * r * r channels (the reference's channel order) + pixel shuffle.
            self.shuffle = 32 // unit_size
            self.decoder_embed = nn.Linear(encoder.num_features, self.shuffle**2 * decoder_dim)
            token_dim = encoder.embed_dims[0]
        else:
            self.shuffle = 1
            self.decoder_embed = nn.Linear(encoder.num_features, decoder_dim)
            token_dim = encoder.num_features
        # One shared learnable token for every SM unit; absent when SM is off, so that no
        # parameter goes without a gradient (DDP would need find_unused_parameters).
        self.sm_token = nn.Parameter(torch.zeros(token_dim)) if sm_ratio > 0 else None
        self.decoder = MAEDecoder(self.grid, unit_size * unit_size * 3, decoder_dim, decoder_depth, decoder_heads)
        self.apply(init_weights)
        if self.sm_token is not None:
            nn.init.normal_(self.sm_token, std=0.02)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        if not self.pyramid:
            nn.init.normal_(encoder.cls_token, std=0.02)

    def options(self) -> dict[str, object]:
        """The method options this model was built with (recorded in checkpoints)."""
        return dict(
            img_size=self.img_size,
            unit_size=self.unit_size,
            sampling=self.sampling,
            mask_ratio=self.mask_ratio,
            sm_ratio=self.sm_ratio,
            norm_pix_loss=self.norm_pix_loss,
            decoder_pos=self.decoder_pos,
            drop_path=self.encoder.drop_path_rate,
        )

    def sample_masks(self, n: int, device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        mask = self.strategy.sample(n, *self.grid, self.mask_ratio, generator=generator, device=device)
        sm_mask = None
        if self.sm_ratio > 0:
            sm_mask = secondary_masking(mask, self.sm_ratio, generator=generator, num_visible=self.num_visible)
        return mask, sm_mask

    def forward_encoder(
        self, imgs: Tensor, mask: Tensor, sm_mask: Tensor | None, validate: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> decoder-width tokens of the visible units ``[N, V, D]``, their unit indices, and
        the tokens without a unit (ViT's cls ``[N, 1, D]``; None for Swin / PVT)."""
        if not self.pyramid:
            # Masks this model drew have a known visible count: no host sync to find it.
            num_visible = None if validate else self.num_visible
            feats, index = self.encoder.forward_visible(imgs, mask, sm_mask, self.sm_token, num_visible)
            x = self.decoder_embed(feats)
            return x[:, 1:], index, x[:, :1]
        choice = block_choice(mask, *self.grid, validate=validate)
        feat = self.encoder.forward_compact(imgs, choice, self.unit_size, sm_mask, self.sm_token)
        # Linear to D*r*r, then pixel-shuffle: one token per 2x2 block, compact row-major.
        x = self.decoder_embed(feat.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = F.pixel_shuffle(x, self.shuffle).flatten(2).transpose(1, 2)
        if self.decoder_pos == "reference":
            index = reference_unit_index(choice)  # the reference code's flaw, on request only
        else:
            index = kept_unit_index(choice)
        return x, index, None

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """MSE on the US-masked units only (SM units are visible and carry no loss)."""
        target = patchify(imgs, self.unit_size)
        if self.norm_pix_loss:
            target = norm_pix_target(target)
        return masked_mean((pred.float() - target.float()).pow(2).mean(dim=-1), mask)

    def forward(
        self,
        imgs: Tensor,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
        sm_mask: Tensor | None = None,
        validate: bool = True,
    ) -> dict[str, Tensor]:
        """Masks drawn from ``generator`` (:meth:`sample_masks`), or the ``mask`` / ``sm_mask``
        given, checked unless ``validate=False``: masks :meth:`sample_masks` drew need no check
        (a host sync). The training step draws them first and passes them so, which keeps mask
        generation out of the region ``--compile`` compiles: from masked inputs to the loss."""
        if imgs.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"model {getattr(self, 'model_name', '')} was built for {self.img_size}px images, got {tuple(imgs.shape[-2:])}"
            )
        given = mask is not None
        if not given:
            mask, sm_mask = self.sample_masks(imgs.shape[0], imgs.device, generator)
        visible, index, prefix = self.forward_encoder(imgs, mask, sm_mask, validate=given and validate)
        pred = self.decoder(visible, index, prefix)
        loss = self.forward_loss(imgs, pred, mask)
        return {"loss": loss, "pred": pred, "mask": mask, "sm_mask": sm_mask}


def _validate(encoder, pyramid, img_size, unit, strategy: MaskingStrategy, mask_ratio, sm_ratio, decoder_pos) -> None:
    if decoder_pos not in ("true", "reference"):
        raise UsageError(f"bad decoder_pos {decoder_pos!r}: must be 'true' or 'reference'")
    if not 0.0 <= sm_ratio < 1.0:
        raise UsageError(f"bad sm_ratio {sm_ratio}: must be in [0, 1)")
    problem = strategy.ratio_problem(mask_ratio)
    if problem:
        raise UsageError(problem)
    if pyramid:
        if not strategy.compacts:
            compacting = " or ".join(repr(s.name) for s in strategies() if s.compacts)
            raise UsageError(
                f"{strategy.name} sampling leaves holes that a pyramid encoder (Swin, PVT) cannot compact into a "
                f"dense map; use sampling={compacting}, or a ViT model for {strategy.name} sampling"
            )
        if unit <= 0 or unit % encoder.patch_size or 32 % unit:
            raise UsageError(
                f"mask unit size {unit} must be a multiple of the {encoder.patch_size}px patch and divide 32 (4, 8, 16 or 32)"
            )
    elif unit != encoder.patch_size:
        raise UsageError(
            f"ViT masks whole patches: the mask unit size must equal the patch size {encoder.patch_size}, got {unit}"
        )
    problem = _size_problem(encoder, pyramid, img_size, unit, strategy)
    if problem:
        fits = sizes_that_fit(lambda s: not _size_problem(encoder, pyramid, s, unit, strategy), img_size)
        raise UsageError(f"{problem}; sizes that fit this model: {fits}")


def _size_problem(encoder, pyramid, img_size, unit, strategy: MaskingStrategy) -> str | None:
    """Why ``img_size`` does not fit (None if it does): whole units, a unit grid the strategy
    can mask (uniform sampling: even), a compact map the pyramid's stages (and Swin's windows)
    can run on."""
    if img_size <= 0 or img_size % unit:
        return f"image size {img_size} is not a multiple of the mask unit size {unit}"
    grid = img_size // unit
    problem = strategy.grid_problem(grid, grid)
    if problem:
        return f"image size {img_size} with {unit}px mask units gives a {grid}x{grid} unit grid: {problem}"
    if pyramid:
        try:
            encoder.check_map_size(img_size // 8, f"image size {img_size} (compact map of side {img_size // 8})")
        except ValueError as e:
            return str(e)
    return None


# --- building the registered models (models/family.py registers them) ------------------------
# Decoders by the reference's names: dec512d2b is the paper's (METHOD.md), dec512d8b MAE's
# (and the paper's Swin-L run).
DECODER_512D2B = dict(decoder_dim=512, decoder_depth=2, decoder_heads=16)
DECODER_512D8B = dict(decoder_dim=512, decoder_depth=8, decoder_heads=16)
DECODER_NANO = dict(decoder_dim=128, decoder_depth=2, decoder_heads=4)
DECODER_TEST = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)
MAE_OPTIONS = ("img_size", "unit_size", "sampling", "mask_ratio", "sm_ratio", "norm_pix_loss", "decoder_pos")


def pop_drop_path(kw: dict[str, object], allowed, model: str) -> float:
    """Refuse options ``model`` does not take; its stochastic depth (popped from ``kw``)."""
    unknown = sorted(set(kw) - set(allowed) - {"drop_path"})
    if unknown:
        raise UsageError(
            f"option(s) {', '.join(unknown)} do not apply to {model}; it takes "
            f"{', '.join(sorted(allowed))} and drop_path"
        )
    return kw.pop("drop_path", 0.0)


def build_mae(
    name: str, encoder_cls, arch: dict[str, object], img_size: int, decoder: dict[str, int], kw: dict[str, object]
) -> MaskedAutoencoder:
    """``name`` as registered: ``encoder_cls(**arch)`` under a masked autoencoder with
    ``decoder``; ``kw`` the caller's method options (:data:`MAE_OPTIONS`, ``drop_path``). A
    ViT's mask unit defaults to its patch."""
    drop_path = pop_drop_path(kw, MAE_OPTIONS, name)
    img_size = kw.pop("img_size", img_size)
    if "patch_size" in arch:
        kw.setdefault("unit_size", arch["patch_size"])
    encoder = encoder_cls(drop_path=drop_path, **arch)
    return MaskedAutoencoder(encoder, img_size, **{**decoder, **kw})
