"""``--input-pipeline device``: JPEGs decoded on the training device (nvJPEG on CUDA), batched.

The DataLoader workers then only read the files (or shard members), parse the JPEG header for
the image size and draw the crop and the flip, exactly as the ``tensor`` pipeline draws them
(the same calls on torch's RNG under the same sample seed); the step decodes the whole batch
with one ``torchvision.io.decode_jpeg(list, device=...)`` call and crops, resizes and flips
there. On the CPU the result is the ``tensor`` pipeline's, bit for bit (the same decoder and
kernels); on CUDA, nvJPEG's IDCT and a float resize differ from it by rounding.

A file that is not a JPEG (PNG, WebP, ...) or whose data does not end with the JPEG end
marker (a truncated file) is decoded in the worker instead, through the ``tensor`` pipeline, so
that unreadable files are still replaced and counted there as with every other pipeline.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from ummae.data.collate import readable_items
from ummae.errors import DataError

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


@dataclass
class EncodedJpeg:
    """A JPEG's bytes (uint8 ``[n]``) and its size, from the header."""

    data: Tensor
    height: int
    width: int
    name: str = ""


@dataclass
class PlannedCrop:
    """A JPEG to decode on the device, with the crop ``(top, left, height, width)`` and flip
    drawn for it in the worker."""

    data: Tensor
    box: tuple[int, int, int, int]
    flip: bool
    name: str = ""


def read_encoded(source: str | bytes, name: str = "") -> EncodedJpeg | None:
    """The undecoded JPEG of a path or bytes, or None when it is not a whole baseline/
    progressive JPEG that a header parse can size (the caller decodes it on the CPU)."""
    if isinstance(source, str):
        name = name or source
        with open(source, "rb") as f:
            source = f.read()
    if not (source.startswith(_SOI) and source.rstrip(b"\x00\r\n ").endswith(_EOI)):
        return None
    try:
        with Image.open(io.BytesIO(source)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L", "CMYK", "YCbCr"):
                return None
            width, height = im.size
    except Exception:  # a header Pillow cannot parse: decoded, or refused, on the CPU
        return None
    return EncodedJpeg(torch.frombuffer(bytearray(source), dtype=torch.uint8), height, width, name)


class DeviceCropPlan:
    """The ``device`` pipeline's worker transform: an :class:`EncodedJpeg` -> a
    :class:`PlannedCrop`, drawing RandomResizedCrop's box and the flip as ``tensor_transform``
    (the ``tensor`` pipeline: transforms v2 RandomResizedCrop + RandomHorizontalFlip) would;
    an image decoded already (not a JPEG) goes through ``tensor_transform`` itself."""

    def __init__(self, tensor_transform):
        self.tensor_transform = tensor_transform
        self.crop, self.flip = tensor_transform.transforms

    def __call__(self, image):
        if not isinstance(image, EncodedJpeg):
            return self.tensor_transform(image)
        # v2's own parameter draw, on a tensor of the image's size (allocated, never filled)
        params = self.crop.make_params([torch.empty((3, image.height, image.width), dtype=torch.uint8)])
        flip = bool(torch.rand(1) < self.flip.p)  # RandomHorizontalFlip: no flip when rand >= p
        box = (params["top"], params["left"], params["height"], params["width"])
        return PlannedCrop(image.data, box, flip, image.name)


class EncodedBatch:
    """A training batch of :class:`PlannedCrop` and finished uint8 crops, as collated in the
    worker; :meth:`decode` makes it ``[N, 3, S, S]`` uint8 on the device."""

    def __init__(self, items: list, img_size: int):
        self.items = items
        self.img_size = img_size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.items), 3, self.img_size, self.img_size)

    def pin_memory(self) -> EncodedBatch:
        return self

    def decode(self, device: torch.device | str, exact_cpu: bool | None = None) -> Tensor:
        device = torch.device(device)
        planned = [(i, it) for i, it in enumerate(self.items) if isinstance(it, PlannedCrop)]
        out = [None] * len(self.items)
        for i, it in enumerate(self.items):
            if not isinstance(it, PlannedCrop):
                out[i] = it.to(device, non_blocking=True)
        if planned:
            data = [it.data for _, it in planned]
            try:
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad file fails the batch: find it
                images = []
                for _, it in planned:
                    try:
                        images.append(decode_jpeg(it.data, mode=ImageReadMode.RGB, device=device))
                    except RuntimeError as e:
                        raise DataError(
                            f"{it.name or 'a JPEG'} cannot be decoded on {device} ({str(e).splitlines()[0]}); "
                            f"--input-pipeline tensor decodes on the CPU, where unreadable files are "
                            f"replaced and counted"
                        ) from None
            # uint8 bicubic with antialias runs on the CPU (the tensor pipeline's kernel: the
            # same pixels); elsewhere the resize is in float, rounded back
            uint8_resize = device.type == "cpu" if exact_cpu is None else exact_cpu
            size = [self.img_size, self.img_size]
            for (i, it), image in zip(planned, images, strict=True):
                x = image if uint8_resize else image.float()
                x = F2.resized_crop(x, *it.box, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
                if not uint8_resize:
                    x = x.round_().clamp_(0, 255).to(torch.uint8)
                out[i] = x.flip(-1) if it.flip else x
        return torch.stack(out)


def collate_encoded(img_size: int):
    """A DataLoader collate for the ``device`` pipeline: items ``(PlannedCrop or uint8 crop,
    label, n_skipped)`` -> ``(EncodedBatch, labels, n_skipped)``."""
    return _CollateEncoded(img_size)


class _CollateEncoded:
    def __init__(self, img_size: int):
        self.img_size = img_size

    def __call__(self, batch: list):
        good, n_skipped = readable_items(batch)
        if not good:
            return torch.empty(0), torch.empty(0, dtype=torch.long), n_skipped
        labels = default_collate([item[1] for item in good])
        return EncodedBatch([item[0] for item in good], self.img_size), labels.long(), n_skipped
