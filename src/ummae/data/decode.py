"""Decoding image files: a path or encoded bytes (a shard member) -> an RGB image (PIL, or a
uint8 tensor from torchvision's decoders), or a JPEG left undecoded for the ``device`` pipeline."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file

from ummae.data.device_decode import read_encoded


def read_image_or_encoded(source: str | bytes, as_tensor: bool, encoded: bool, name: str = ""):
    """:func:`read_image`, or with ``encoded`` a JPEG left undecoded
    (:class:`~ummae.data.device_decode.EncodedJpeg`) when it is whole; other files decoded."""
    if encoded:
        jpeg = read_encoded(source, name)
        if jpeg is not None:
            return jpeg
    return read_image(source, as_tensor)


def read_image(source: str | bytes, as_tensor: bool = False):
    """The RGB image of a file path or of encoded bytes (a shard member): a PIL image, or with
    ``as_tensor`` uint8 ``[3, H, W]`` from torchvision's decoders (libjpeg-turbo, libpng,
    libwebp: the same pixels as Pillow's). A format torchvision has no decoder for (BMP,
    TIFF, ...) is read by Pillow. Raises whatever the decoders raise for a damaged file."""
    if as_tensor:
        data = read_file(source) if isinstance(source, str) else torch.frombuffer(bytearray(source), dtype=torch.uint8)
        try:
            return decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError:  # no decoder for the format, or damaged (then Pillow fails too)
            with Image.open(io.BytesIO(data.numpy().tobytes())) as f:
                return torch.from_numpy(np.array(f.convert("RGB"))).permute(2, 0, 1).contiguous()
    with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as f:
        return f.convert("RGB")  # also forces the full decode: truncation shows here
