"""Augmentations: the pre-training transforms of the three input pipelines, the uint8
normalisation done on the device, the (image, target) adapter and the seeded application that
makes an augmentation a pure function of the sample's seed."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import v2

from ummae.choices import INPUT_PIPELINES
from ummae.data.device_decode import DeviceCropPlan
from ummae.errors import DataError

# ImageNet mean colour (0.485, 0.456, 0.406) x 255: padding of this colour normalises to ~0,
# which is what MMDetection's and MMSegmentation's Pad (zeros, after normalisation) gives the
# network.
IMAGENET_MEAN_RGB = (124, 116, 104)


def build_pretrain_transform(img_size: int, crop_scale: Sequence[float] = (0.2, 1.0), pipeline: str = "tensor"):
    """The MAE / UM-MAE pre-training augmentation: RandomResizedCrop (``crop_scale``, aspect
    3/4-4/3, bicubic) and a horizontal flip.

    ``pipeline="tensor"`` (default): uint8 ``[3, H, W]`` (torchvision's decoders) -> uint8
    ``[3, S, S]``; the crop and flip run on uint8 (torchvision transforms v2: the same draws
    from torch's RNG as v1, so the same crops for the same seed, and bicubic with antialias as
    Pillow's: within 2 grey levels but for ~1e-5 of the pixels, at sharp edges, where Pillow
    clips its 8-bit result between the two passes), and :func:`normalize_uint8` normalises on
    the device, after a 4x smaller copy. ``"pil"``: MAE's transform on PIL images -> normalised
    float ``[3, S, S]``. ``"device"``: the draws of ``"tensor"``, the JPEG decode and the crop
    left to the training step (:mod:`ummae.data.device_decode`)."""
    if pipeline not in INPUT_PIPELINES:
        raise DataError(f"input pipeline must be one of {', '.join(INPUT_PIPELINES)}, got {pipeline!r}")
    if pipeline in ("tensor", "device"):
        tensor_transform = v2.Compose(
            [
                v2.RandomResizedCrop(
                    img_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC, antialias=True
                ),
                v2.RandomHorizontalFlip(),
            ]
        )
        if pipeline == "device":
            return DeviceCropPlan(tensor_transform)
        return tensor_transform
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


def normalize_uint8(images: Tensor) -> Tensor:
    """uint8 images ``[..., 3, H, W]`` (on any device) -> ImageNet-normalised float, as
    ``ToTensor`` + ``Normalize`` give: ``(x / 255 - mean) / std``. Float images pass unchanged."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(3, 1, 1) * 255
    return (images.float() - mean) / std


class PairTransform:
    """Adapts a ``transform(image, target) -> (image, target)`` (detection boxes, segmentation
    labels) to ImageDataset's one-argument ``transform``, so its seeding (``_augment``) applies
    unchanged. A class (not a lambda) so the dataset pickles into DataLoader workers."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, pair):
        return self.transform(*pair)


def to_uint8_tensor(img: Image.Image | Tensor, target):
    """The evaluation transform of a :class:`PairTransform` data set: the image at its own size
    as uint8 ``[3, H, W]`` (detectors resize by themselves; mIoU is computed at the original
    size), the target (boxes, label map) unchanged."""
    if isinstance(img, Image.Image):
        img = T.functional.pil_to_tensor(img)
    return img, target


def augment_seeded(transform, img, seed: int):
    """``transform(img)`` as a pure function of ``seed`` for all three RNGs augmentations draw
    from (torch's CPU generator, python ``random``, numpy's global state: timm's RandAugment
    and RandomErasing use the latter two); the caller's states of all three are restored."""
    seed = int(seed)
    # python random and numpy are saved and restored by hand (no fork_rng for them) so that,
    # with num_workers=0, keyed access leaves the training process's streams as they were.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds only
        # Seed only the CPU generator (torch.manual_seed would also reseed CUDA, which
        # fork_rng(devices=[]) does not restore, and so would disturb the training process's
        # GPU randomness when num_workers=0); fork_rng restores the CPU state.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return transform(img)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
