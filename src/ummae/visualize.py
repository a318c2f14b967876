"""Pictures of what a masked-image model learned (METHOD.md, "Visualisation"): reconstructions
by a pre-training checkpoint, and the masking strategies side by side.

A reconstruction picture has one row per image and these panels (columns):

* ``original``;
* ``masked input (US)`` (the label of the model's masking strategy: ``US``, ``random``,
  ``block``): the units the encoder never sees are grey;
* ``after SM`` (only when the model uses Secondary Masking): the visible units whose embedding
  is replaced by the shared SM token are magenta;
* ``reconstruction``: the decoder's prediction of every unit;
* ``reconstruction + visible``: the prediction on the US-masked units, the input's own pixels
  on every other unit. SM units count as visible here: their pixels are part of the input
  image (SM only hides them from the encoder), and the loss never trains the prediction there.

SimMIM checkpoints give ``original | masked input (random) | reconstruction``; SimMIM feeds its
masked units to the encoder as a learnable mask token, so they are magenta.

Colour code everywhere: grey = removed from the encoder; magenta = seen by the encoder as a
learnable token instead of its pixels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision import transforms as T

from ummae.data.sources import no_images_error, scan_images
from ummae.errors import UsageError
from ummae.models.mae import MaskedAutoencoder, patchify, unnormalize_pix, unpatchify
from ummae.models.masking import block_choice, compact_image, secondary_masking, unit_mask_to_tokens
from ummae.models.simmim import SimMIM
from ummae.sampling import DEFAULT_MASK_RATIO, MaskingStrategy, strategies
from ummae.sampling.random import RandomSampling, random_masking
from ummae.weights.build import WrongKindError, build_from_checkpoint
from ummae.weights.io import CheckpointError

log = logging.getLogger("ummae")

REMOVED_RGB = (0.5, 0.5, 0.5)  # unit removed from the encoder (US / random masked)
TOKEN_RGB = (0.85, 0.2, 0.75)  # unit replaced by a learnable token (SM token, SimMIM mask token);
# magenta: rare in photos (a blue token read as sky)
GAP = 4  # white pixels around and between panels
TITLE_H = 16  # height of the title strip above the first row
DEMO_PHOTO = "chelsea.png"  # the default picture of `ummae masks`, from scikit-image's wheel

_NEEDS = (
    "reconstructions need a pre-training checkpoint with its decoder (e.g. checkpoint-last.pth of `ummae pretrain`)"
)


# --- loading ----------------------------------------------------------------------------------


def load_pretraining_model(path: str | Path) -> nn.Module:
    """Rebuild the pre-training model (UM-MAE, MAE or SimMIM, decoder included) of an ummae
    or reference checkpoint (converted on the fly), in eval mode on the CPU. Anything else (an
    exported ``.safetensors``, a classifier checkpoint, weights without a decoder) is refused
    with a message saying what the file is."""
    path = Path(path)
    if path.is_file() and _is_safetensors(path):
        raise CheckpointError(
            f"{path} is an exported safetensors file (encoder or classifier weights, no decoder); {_NEEDS}"
        )
    try:
        model, _ = build_from_checkpoint(path, "pretrain")
    except WrongKindError as e:
        raise WrongKindError(f"{e}; {_NEEDS}") from None
    return model.eval()


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and a JSON header; torch
    checkpoints are zip files."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def display_transform(img_size: int):
    """Deterministic: shorter side resized to ``img_size`` (bicubic), center crop, then the
    ImageNet normalisation the models are trained with."""
    return T.Compose(
        [
            T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


def read_rgb(path: str | Path) -> Image.Image:
    """One image file, decoded to RGB; a missing or unreadable file raises ``ValueError``
    naming it."""
    if not os.path.isfile(path):
        raise UsageError(f"image not found: {path}")
    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except Exception as e:
        raise UsageError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def load_image(path: str | Path, img_size: int) -> Tensor:
    """One image file -> normalised ``[3, S, S]`` (see :func:`display_transform`); a missing or
    unreadable file raises ``ValueError`` naming it."""
    return display_transform(img_size)(read_rgb(path))


def image_paths(paths_or_folders: Sequence[str | Path]) -> list[str]:
    """Files as given, folders expanded to their image files (recursive, sorted)."""
    out: list[str] = []
    for p in map(str, paths_or_folders):
        if os.path.isdir(p):
            found = scan_images(p)
            if not found:
                raise no_images_error(p)
            out.extend(found)
        else:
            out.append(p)
    return out


def load_images(paths_or_folders: Sequence[str | Path], img_size: int) -> Tensor:
    """Image files and/or folders -> normalised ``[N, 3, S, S]``, in the order given (a folder
    contributes its image files sorted)."""
    paths = image_paths(paths_or_folders)
    if not paths:
        raise UsageError("no images given")
    return torch.stack([load_image(p, img_size) for p in paths])


# --- reconstructions --------------------------------------------------------------------------


def to_display(x: Tensor) -> Tensor:
    """ImageNet-normalised ``[N, 3, H, W]`` -> RGB in [0, 1]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() * std + mean).clamp(0.0, 1.0)


def paint_units(img: Tensor, mask: Tensor, grid: tuple[int, int], unit: int, rgb) -> Tensor:
    """``img [N, 3, H, W]`` with the units where ``mask [N, L]`` is True filled with ``rgb``."""
    px = unit_mask_to_tokens(mask, *grid, unit).unsqueeze(1)  # [N, 1, H, W]
    colour = torch.tensor(rgb, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return torch.where(px, colour, img)


@torch.no_grad()
def reconstruct(model: nn.Module, imgs: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The model's own forward on ``imgs`` with masks drawn by its own sampler from
    ``generator`` (same seed, same masks) -> ``{"loss", "pred", "mask", "sm_mask"}``."""
    mask, sm_mask = model.sample_masks(imgs.shape[0], imgs.device, generator)
    return model(imgs, mask=mask, sm_mask=sm_mask)


@torch.no_grad()
def panels_from_output(model: nn.Module, imgs: Tensor, out: dict[str, Tensor]) -> tuple[list[str], Tensor]:
    """``(titles, panels [N, P, 3, S, S])`` in [0, 1] from a forward output (see the module
    doc for the panels)."""
    unit, grid = model.unit_size, model.grid
    mask, sm_mask = out["mask"], out["sm_mask"]
    pred = out["pred"].float()
    if isinstance(model, MaskedAutoencoder) and model.norm_pix_loss:
        # Back from per-unit normalised pixels with each unit's own mean and variance.
        pred = unnormalize_pix(pred, patchify(imgs.float(), unit))
    original = to_display(imgs)
    recon = to_display(unpatchify(pred, unit, grid))
    if isinstance(model, SimMIM):
        masked = paint_units(original, mask, grid, unit, TOKEN_RGB)
        titles = ["original", f"masked input ({RandomSampling.label})", "reconstruction"]
        return titles, torch.stack([original, masked, recon], 1)
    masked = paint_units(original, mask, grid, unit, REMOVED_RGB)
    titles, panels = ["original", f"masked input ({model.strategy.label})"], [original, masked]
    if sm_mask is not None:
        titles.append("after SM")
        panels.append(paint_units(masked, sm_mask, grid, unit, TOKEN_RGB))
    pasted = torch.where(unit_mask_to_tokens(mask, *grid, unit).unsqueeze(1), recon, original)
    titles += ["reconstruction", "reconstruction + visible"]
    panels += [recon, pasted]
    return titles, torch.stack(panels, 1)


def reconstruction_panels(
    model: nn.Module, imgs: Tensor, generator: torch.Generator | None = None
) -> tuple[list[str], Tensor]:
    """``(titles, panels [N, P, 3, S, S])`` in [0, 1]: P = 5 for UM-MAE, 4 without SM (MAE
    random sampling), 3 for SimMIM. ``imgs`` are ImageNet-normalised, on the model's device."""
    return panels_from_output(model, imgs, reconstruct(model, imgs, generator))


# --- pictures ---------------------------------------------------------------------------------


def panel_origin(row: int, col: int, s: int) -> tuple[int, int]:
    """Top-left pixel ``(x, y)`` of panel ``(row, col)`` in a :func:`compose_grid` picture."""
    return GAP + col * (s + GAP), TITLE_H + row * (s + GAP)


def grid_size(n: int, p: int, s: int) -> tuple[int, int]:
    """``(width, height)`` of a :func:`compose_grid` picture of ``n`` rows of ``p`` panels of
    ``s x s`` pixels: ``(GAP + p * (s + GAP), TITLE_H + n * (s + GAP))``."""
    return GAP + p * (s + GAP), TITLE_H + n * (s + GAP)


def to_uint8(panels: Tensor) -> Tensor:
    """[0, 1] floats -> uint8, as written to the picture."""
    return (panels.float().clamp(0.0, 1.0) * 255).round().to(torch.uint8)


def compose_grid(panels: Tensor, titles: Sequence[str]) -> Image.Image:
    """``panels [N, P, 3, S, S]`` in [0, 1] -> one RGB picture: rows = images, columns =
    panels, white gaps, the titles in a strip on top (PIL's default font). Geometry:
    :func:`grid_size`, :func:`panel_origin`."""
    n, p, c, s, s2 = panels.shape
    if c != 3 or s != s2 or len(titles) != p:
        raise ValueError(
            f"expected panels [N, P, 3, S, S] and P titles, got {tuple(panels.shape)} and {len(titles)} titles"
        )
    canvas = Image.new("RGB", grid_size(n, p, s), "white")
    pixels = to_uint8(panels).permute(0, 1, 3, 4, 2).cpu().numpy()
    for i in range(n):
        for j in range(p):
            canvas.paste(Image.fromarray(pixels[i, j]), panel_origin(i, j, s))
    draw = ImageDraw.Draw(canvas)
    font = _title_font(titles, s - 2)
    for j, title in enumerate(titles):
        x, _ = panel_origin(0, j, s)
        draw.text((x + s / 2, TITLE_H / 2), _shorten(title, font, s - 2), fill="black", font=font, anchor="mm")
    return canvas


def _title_font(titles: Sequence[str], width: int):
    """PIL's default font at the largest size (11 down to 6 px) at which every title fits."""
    for size in (11, 10, 9, 8, 7, 6):
        try:
            font = ImageFont.load_default(size=size)
        except (ImportError, OSError, TypeError):  # Pillow without FreeType: one bitmap size
            return ImageFont.load_default()
        if all(font.getlength(t) <= width for t in titles):
            return font
    return font


def _shorten(text: str, font, width: int) -> str:
    """``text``, cut and ended with '..' if it is wider than ``width`` (tiny panels)."""
    if font.getlength(text) <= width:
        return text
    while len(text) > 1 and font.getlength(text + "..") > width:
        text = text[:-1]
    return text + ".."


def demo_photo(name: str = DEMO_PHOTO) -> str:
    """Path of a photo shipped inside scikit-image's wheel (never downloaded)."""
    import skimage.data  # slow to import (all of scikit-image): only the demo photo needs it

    path = os.path.join(os.path.dirname(skimage.data.__file__), name)
    if not os.path.isfile(path):
        raise UsageError(f"scikit-image's sample photo {name} is not installed ({path}); pass --image PATH")
    return path


def mask_figure(
    image: str | Path | None = None, img_size: int = 256, unit_size: int = 16, seed: int = 0
) -> Image.Image:
    """One row: original | each masking strategy (``--sampling``, in its registry's order) at
    its mask ratio (0.75 where the ratio is free), and after a strategy whose masks compact
    (Uniform Sampling) its mask with Secondary Masking 0.25 and the compact map a pyramid
    encoder sees (at its true half size: a quarter of the area, centred) | SimMIM random 75%
    (mask tokens, so 100% of the units reach the encoder).

    ``image``: a file (default: scikit-image's ``chelsea.png``); masks are drawn from ``seed``,
    one generator for the panels in their order."""
    if img_size <= 0 or unit_size <= 0 or img_size % unit_size:
        raise UsageError(f"image size {img_size} must be a positive multiple of the mask unit size {unit_size}")
    g = img_size // unit_size
    for strategy in strategies():
        problem = strategy.grid_problem(g, g)
        if problem:
            raise UsageError(f"image size {img_size} with {unit_size}px units gives a {g}x{g} unit grid: {problem}")
    path = str(image) if image is not None else demo_photo()
    original = to_display(load_image(path, img_size)[None])
    gen = torch.Generator().manual_seed(seed)
    titles, panels = ["original"], [original]
    for strategy in strategies():
        strategy_titles, strategy_panels = _strategy_panels(strategy, original, unit_size, gen)
        titles += strategy_titles
        panels += strategy_panels
    simmim_mask = random_masking(1, g * g, DEFAULT_MASK_RATIO, generator=gen)
    titles.append(f"SimMIM {RandomSampling.label} {DEFAULT_MASK_RATIO:.0%}")
    panels.append(paint_units(original, simmim_mask, (g, g), unit_size, TOKEN_RGB))
    return compose_grid(torch.stack(panels, 1), titles)


def _strategy_panels(
    strategy: MaskingStrategy, original: Tensor, unit_size: int, gen: torch.Generator
) -> tuple[list[str], list[Tensor]]:
    """The :func:`mask_figure` panels of one strategy: its mask; for one that compacts, also
    Secondary Masking 0.25 on it and the compact map."""
    g = original.shape[-1] // unit_size
    ratio = strategy.mask_ratio(DEFAULT_MASK_RATIO)
    mask = strategy.sample(1, g, g, ratio, generator=gen)
    masked = paint_units(original, mask, (g, g), unit_size, REMOVED_RGB)
    if not strategy.compacts:
        return [f"{strategy.label} {ratio:.0%}"], [masked]
    um = paint_units(masked, secondary_masking(mask, 0.25, generator=gen), (g, g), unit_size, TOKEN_RGB)
    compact = compact_image(um, block_choice(mask, g, g), unit_size)  # [1, 3, S/2, S/2]
    compact_panel = torch.full_like(original, 0.92)  # light grey: the full image area, for scale
    lo, half = original.shape[-1] // 4, original.shape[-1] // 2
    compact_panel[..., lo : lo + half, lo : lo + half] = compact
    titles = [f"{strategy.label} {ratio:.0%}", f"{strategy.label} + SM 25%", "compact (encoder input)"]
    return titles, [masked, um, compact_panel]
