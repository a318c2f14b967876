"""The pre-training dataset of a ``--data`` value: a dataset root, an image folder, a list file,
tar shards or (no value) the embedded demo photos."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ummae.data.dataset import ImageDataset
from ummae.data.shards import ShardStream, is_shard_spec
from ummae.data.sources import demo_samples, folder_samples, list_file_samples
from ummae.data.transforms import build_pretrain_transform
from ummae.errors import DataError

logger = logging.getLogger(__name__)


def build_pretrain_dataset(
    data: str | None,
    img_size: int,
    crop_scale: Sequence[float] = (0.2, 1.0),
    data_root: str | None = None,
    demo_repeats: int = 8,
    pipeline: str = "tensor",
    samples_per_epoch: int | None = None,
) -> ImageDataset:
    """Build the pre-training dataset from ``data``:

    - a dataset root holding ``train/`` (ImageNet: ``train/`` + ``val/``): its ``train/`` split,
      as MAE's ``--data_path``;
    - ``None``: the embedded demo (real photos from scikit-image's wheel, each listed
      ``demo_repeats`` times per epoch, label -1);
    - a folder of class sub-folders: ImageFolder, label = index of the sorted class name;
    - a folder with images at its top level: flat, searched recursively, label -1;
    - a file: list of ``relative/path [label]`` lines, relative to ``data_root`` (default: the
      list file's folder);
    - WebDataset tar shards (a ``.tar`` path or brace pattern, ``pipe:``, a folder written by
      ``ummae shards``): a :class:`~ummae.data.shards.ShardStream` of ``samples_per_epoch``
      samples per epoch (default: its ``shards.json``'s count).

    Samples give ``(image [3, img_size, img_size], label)`` (uint8 with the default
    ``pipeline="tensor"``, normalised float with ``"pil"``: :func:`build_pretrain_transform`);
    see :class:`ImageDataset`.
    """
    if img_size <= 0:
        raise DataError(f"img_size must be positive, got {img_size}")
    lo, hi = crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise DataError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
    transform = build_pretrain_transform(img_size, crop_scale, pipeline)
    tensor_input, encoded = pipeline in ("tensor", "device"), pipeline == "device"

    if is_shard_spec(data):
        ds = ShardStream(
            data, transform, samples_per_epoch=samples_per_epoch, tensor_input=tensor_input, encoded=encoded
        )
        logger.info("pre-training data: %s", ds.describe())
        return ds
    if samples_per_epoch is not None:
        raise DataError("--samples-per-epoch is for tar shards; an epoch of a folder or list file is all its images")
    decoding = {"tensor_input": tensor_input, "encoded": encoded}
    if data is None:
        samples, folder, note = demo_samples(demo_repeats)
        ds = ImageDataset(samples, transform, "embedded demo", folder, note=note, **decoding)
    else:
        ds = _local_dataset(data, data_root, transform, decoding)
    logger.info("pre-training data: %s", ds.describe())
    return ds


def _local_dataset(data: str, data_root: str | None, transform, decoding: dict) -> ImageDataset:
    """The dataset of a dataset root (its ``train/``), an image folder or a list file."""
    path = os.path.expanduser(str(data))
    if not os.path.exists(path):
        raise DataError(f"data path not found: {data}")
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "train")):
        # MAE's convention: --data names the dataset root; pre-training reads its train
        # split (never val/, which would leak evaluation images into pre-training).
        logger.info("%s has a train/ folder: pre-training on %s", path, os.path.join(path, "train"))
        path = os.path.join(path, "train")
    if os.path.isdir(path):
        samples, kind, classes = folder_samples(path)
        return ImageDataset(samples, transform, kind, path, len(classes), class_names=classes, **decoding)
    samples, root, n_classes = list_file_samples(path, data_root)
    return ImageDataset(samples, transform, "list file", path, n_classes, note=f"root {root}", **decoding)
