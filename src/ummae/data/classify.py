"""Labelled data for fine-tuning, linear probing and evaluation.

The transforms follow MAE's fine-tuning and linear-probing recipes; datasets are the same
:class:`~ummae.data.dataset.ImageDataset` as pre-training (so keyed, seeded augmentation and
the handling of unreadable images carry over: in training, through ``build_train_loader``, an
unreadable image is replaced by the next readable one, with that one's own label; evaluation
skips it), but unlabelled data is refused: a flat folder or a list file line without a label
would otherwise train on label -1 or on meaningless folder names.
"""

from __future__ import annotations

import logging
import os

from PIL import Image, ImageOps
from timm.data import auto_augment as aa
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from torchvision import transforms as T

from ummae.data.collate import collate_skip_bad
from ummae.data.dataset import ImageDataset
from ummae.data.shards import ShardStream, is_shard_spec
from ummae.data.sources import folder_samples, list_file_samples
from ummae.errors import DataError

logger = logging.getLogger(__name__)

# Split folder names: a folder holding one of these is a dataset root, never an ImageFolder
# whose classes happen to be called "train" and "val".
SPLIT_NAMES = ("train", "val", "validation", "test")
_MAX_NAMED = 5  # class names quoted in an error message


def default_crop_pct(img_size: int) -> float:
    """MAE's evaluation crop: 224/256 up to 224 px, the whole resized image (1.0) above."""
    return 224 / 256 if img_size <= 224 else 1.0


def build_classify_transform(
    img_size: int,
    is_training: bool,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    crop_pct: float | None = None,
    simple: bool = False,
):
    """timm's create_transform with the MAE fine-tuning recipe.

    training: RandomResizedCrop(img_size, bicubic) + flip + RandAugment(auto_augment) +
    RandomErasing(re_prob, mode 'pixel', count 1), normalised with ImageNet mean/std;
    color_jitter=None (MAE: RandAugment already alters colour).
    simple=True (linear probing, MAE's recipe): RandomResizedCrop(img_size, scale (0.08, 1),
    bicubic) + flip + ToTensor + Normalize only (no RandAugment, no erasing: strong
    augmentation hurts a linear classifier on frozen features).
    eval: resize to int(img_size / crop_pct) bicubic, center crop img_size, normalise (timm
    create_transform is_training=False, crop_pct=crop_pct, interpolation='bicubic').
    ``crop_pct`` None is MAE's rule (``util/datasets.py``, which the reference keeps): 224/256 for
    inputs up to 224 px, 1.0 above (resize 256, center crop 256 for the 256-px models).
    ``simple`` only changes the training transform.
    """
    if img_size <= 0:
        raise DataError(f"img_size must be positive, got {img_size}")
    if crop_pct is None:
        crop_pct = default_crop_pct(img_size)
    if not 0.0 < crop_pct <= 1.0:
        raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if not 0.0 <= re_prob <= 1.0:
        raise DataError(f"re_prob must be in [0, 1], got {re_prob}")
    if not is_training:
        return create_transform(
            img_size,
            is_training=False,
            crop_pct=crop_pct,
            interpolation="bicubic",
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
        )
    if simple:
        return T.Compose(
            [
                T.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
            ]
        )
    transform = create_transform(
        img_size,
        is_training=True,
        color_jitter=None,
        auto_augment=auto_augment or None,
        interpolation="bicubic",
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    _patch_posterize(transform)
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op as it behaved with Pillow < 13: keeping 0 bits gives a black image.
    RandAugment's increasing posterize (``inc1``) asks for 0 bits at magnitude 10, which the
    recipe's ``mstd0.5`` noise reaches; Pillow 13 refuses ``bits=0`` (ValueError), which would
    stop a fine-tuning run in a data-loader worker."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit masked off: all zeros
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform) -> None:
    """Point the posterize ops of a timm RandAugment / AutoAugment inside ``transform`` at
    :func:`_posterize` (the ops are otherwise timm's own)."""
    stack = [transform]
    while stack:
        t = stack.pop()
        stack.extend(getattr(t, "transforms", []))
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is aa.posterize:
                op.aug_fn = _posterize


def _names(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
    return ", ".join(names[:_MAX_NAMED]) + more


def _resolve_split(data: str, split: str) -> str:
    """``data/<split>`` if it exists; else ``data`` itself (a split-less ImageFolder or a list
    file). A folder holding other split folders but not this one is refused: its splits
    would otherwise be read as classes."""
    path = os.path.expanduser(str(data))
    if not os.path.exists(path):
        raise DataError(f"data path not found: {data}")
    if not os.path.isdir(path):
        return path
    split_dir = os.path.join(path, split)
    if os.path.isdir(split_dir):
        logger.info("%s has a %s/ folder: reading the %s split from %s", path, split, split, split_dir)
        return split_dir
    others = [s for s in SPLIT_NAMES if os.path.isdir(os.path.join(path, s))]
    if others:
        raise DataError(
            f"{path} has no {split}/ folder (it holds {', '.join(o + '/' for o in others)}); "
            f"pass the {split} split's folder or list file"
        )
    logger.info("%s has no %s/ folder: using it as is for the %s split", path, split, split)
    return path


def build_classify_dataset(
    data: str,
    split: str,
    transform,
    data_root: str | None = None,
    class_names: list[str] | None = None,
    samples_per_epoch: int | None = None,
) -> ImageDataset:
    """Labelled ``split`` ("train", "val", ...) of ``data``, for fine-tuning, probing or eval:

    - a folder holding ``<split>/`` (the ImageNet root with ``train/`` and ``val/``): its
      ``<split>`` folder, read as an ImageFolder;
    - an ImageFolder (class sub-folders) without ``<split>/``: used as is, whatever the split;
    - a list file of ``relative/path label`` lines, relative to ``data_root`` (default: the
      list file's folder); every line needs a label.

    ``class_names`` (pass the training split's ``dataset.class_names`` when building val) is
    checked against this split's classes: labels are indices of sorted folder names, so a val
    folder missing a class would silently shift every later label. For list files only the
    count can be checked (labels must be < ``len(class_names)``), and the dataset then takes
    ``class_names`` as its own.

    The dataset has ``num_classes`` and ``class_names`` (sorted folder names, or ``"0"``,
    ``"1"``, ... for a list file); see :class:`ImageDataset` for samples.

    Labelled tar shards (``ummae shards`` of an ImageFolder or a labelled list file) are a
    training split only: a :class:`~ummae.data.shards.ShardStream` of ``samples_per_epoch``
    samples an epoch (default: all of them); the validation images come from ``--val-data``.
    """
    if is_shard_spec(data):
        ds = _shard_split(data, split, transform, class_names, samples_per_epoch)
    elif samples_per_epoch is not None:
        raise DataError("--samples-per-epoch is for tar shards; an epoch of a folder or list file is all its images")
    else:
        path = _resolve_split(data, split)
        if os.path.isdir(path):
            ds = _folder_split(path, split, transform, class_names)
        else:
            ds = _list_split(path, split, transform, class_names, data_root)
    logger.info("%s data: %s", split, ds.describe())
    return ds


def _shard_split(
    data: str, split: str, transform, class_names: list[str] | None, samples_per_epoch: int | None
) -> ShardStream:
    """Labelled tar shards: a training split only, with the classes of their shards.json."""
    if split != "train":
        raise DataError(
            f"--data {data} is tar shards, a training stream: give the {split} images with "
            f"--val-data (an ImageFolder or a list file)"
        )
    ds = ShardStream(data, transform, samples_per_epoch=samples_per_epoch, tensor_input=False)
    if not ds.num_classes:
        raise DataError(
            f"the shards of {data} list no classes in their shards.json: fine-tuning needs "
            f"labelled shards (ummae shards of an ImageFolder or of a list file with labels)"
        )
    if class_names is not None and list(class_names) != ds.class_names:
        raise DataError(f"the classes of the shards {data} differ from the training classes")
    return ds


def _folder_split(path: str, split: str, transform, class_names: list[str] | None) -> ImageDataset:
    """An ImageFolder split, its class folders checked against ``class_names``."""
    samples, kind, names = folder_samples(path)
    if kind != "ImageFolder":
        raise DataError(
            f"{path} has no class sub-folders: fine-tuning needs labelled data (an "
            f"ImageFolder tree or a list file with labels)"
        )
    if class_names is not None and list(class_names) != names:
        missing = set(class_names) - set(names)
        extra = set(names) - set(class_names)
        detail = []
        if missing:
            detail.append(f"missing here: {_names(missing)}")
        if extra:
            detail.append(f"not in the training classes: {_names(extra)}")
        if not detail:
            detail.append("same names in another order")
        raise DataError(
            f"the {split} classes of {path} differ from the training classes "
            f"({len(names)} vs {len(class_names)}; {'; '.join(detail)}): labels are "
            f"indices of the sorted class names, so they would not match"
        )
    return ImageDataset(samples, transform, kind, path, len(names), class_names=names)


def _list_split(path: str, split: str, transform, class_names: list[str] | None, data_root: str | None) -> ImageDataset:
    """A labelled list file split; its labels must lie below ``len(class_names)``."""
    samples, root, _ = list_file_samples(path, data_root, require_labels=True)
    num_classes = max(label for _, label in samples) + 1
    names = [str(i) for i in range(num_classes)]
    if class_names is not None:
        if num_classes > len(class_names):
            raise DataError(
                f"the {split} list file {path} has labels up to {num_classes - 1} but the "
                f"training data has {len(class_names)} classes (labels 0..."
                f"{len(class_names) - 1})"
            )
        names = list(class_names)  # a val list may not reach the last training labels
    return ImageDataset(samples, transform, "list file", path, len(names), note=f"root {root}", class_names=names)


def build_eval_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
    collate_fn=collate_skip_bad,
) -> DataLoader:
    """Sequential loader over this rank's shard: indices rank, rank+R, rank+2R, ... (no
    padding and no duplicates, unlike DistributedSampler, so counts summed over ranks are
    exact); collate_fn=collate_skip_bad (batches are (images, labels, n_skipped)): an
    unreadable image is left out of its batch and counted, never replaced (a substitute would
    be counted twice in accuracies and kNN banks), so a batch may be short or even empty;
    drop_last=False. Ranks may get one batch more or fewer: sum results with an all-reduce
    after the loop, never a collective per batch. Detection passes its own ``collate_fn``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas), got rank {rank} of {num_replicas}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    indices = list(range(rank, len(dataset), num_replicas))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices,  # any sized iterable of indices; no shuffling
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=False,
    )
