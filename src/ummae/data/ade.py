"""Semantic segmentation in the ADE20K layout (ADEChallengeData2016): the dataset, MMSegmentation
0.x's ADE20K training pipeline, and collate.

:class:`SegmentationFolder` reads ``root/images/<split>/*.jpg`` with the label map of each image
at ``root/annotations/<split>/<same stem>.png`` on top of
:class:`~ummae.data.dataset.ImageDataset`, as :class:`~ummae.data.coco.CocoDetection` does, so
it keeps the keyed, seeded augmentation (a pure function of ``(index, sample_seed)``) and the
handling of unreadable files (substituted in training, skipped in evaluation). A label map that
cannot be decoded counts as an unreadable sample; a label map that decodes but does not fit the
declared classes (a value out of range, a size unlike its image's) is a :class:`LabelError`,
never a substitution: training on it would silently train on wrong targets.

Labels follow MMSegmentation's ``ADE20KDataset`` (the UM-MAE paper's protocol): the PNG values
are class indices, and with ``reduce_zero_label`` value 0 ("other") becomes the ignore index and
value ``v`` class ``v - 1`` (:func:`map_labels`), giving the 150 classes of
:data:`ADE20K_CLASSES`.

:class:`SegTrainTransform` is MMSegmentation's ADE20K training pipeline (Resize with ratio range,
RandomCrop with ``cat_max_ratio``, RandomFlip, PhotoMetricDistortion, Pad) with all randomness
drawn from torch's default CPU generator.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ummae.data.collate import readable_items
from ummae.data.dataset import ImageDataset, Key, WorkerSafeValueError
from ummae.data.sources import no_images_error, scan_images
from ummae.data.transforms import IMAGENET_MEAN_RGB, PairTransform, to_uint8_tensor
from ummae.errors import DataError

logger = logging.getLogger(__name__)

# The 150 classes of MMSegmentation's ADE20KDataset, in its order (label k = ADE value k + 1).
# mmseg spells the 8th 'bed ' with a stray trailing space; it is 'bed' here.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)
assert len(ADE20K_CLASSES) == 150


class LabelError(WorkerSafeValueError):
    """A label map that does not fit the declared classes (a value outside them, a size unlike
    its image's, not a single-channel map). An error, never a substitution: the data or the
    class settings are wrong, and training on them would learn wrong targets. One line, with
    and without DataLoader workers (:class:`~ummae.data.dataset.WorkerSafeValueError`)."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# ---------------------------------------------------------------- labels


def map_labels(raw: np.ndarray | Tensor, *, reduce_zero_label: bool, ignore_index: int) -> Tensor:
    """The training labels (int64, same shape) of raw label-map values ``raw``.

    ``reduce_zero_label`` (MMSegmentation's ``LoadAnnotations``, fixed on for ADE20K, whose value
    0 is "other", no class): 0 -> ``ignore_index``, ``v`` -> ``v - 1`` for 1..254, and 255 (the
    usual ignore value of the files) -> ``ignore_index``. Without it the values are unchanged.
    """
    if isinstance(raw, Tensor):
        if raw.dtype.is_floating_point or raw.dtype.is_complex or raw.dtype == torch.bool:
            raise ValueError(f"label values must be integers, got a {raw.dtype} tensor")
        lab = raw.to(torch.int64, copy=True)
    else:
        arr = np.asarray(raw)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"label values must be integers, got a {arr.dtype} array")
        lab = torch.from_numpy(arr.astype(np.int64))
    if reduce_zero_label:
        # uint8 arithmetic in mmseg (0 -> 255, then -1, then 254 -> 255): 0 and 255 both end
        # up ignored, everything else moves down by one.
        ignored = (lab == 0) | (lab == 255)
        lab -= 1
        lab[ignored] = int(ignore_index)
    return lab


def _load_png(path: str) -> tuple[np.ndarray, str]:
    """The raw values of label map ``path`` (palette indices for mode P: never converted to
    RGB) and its mode. Only open and decode: any exception means the file cannot be read."""
    with Image.open(path) as f:
        f.load()  # forces the full decode: truncation shows here
        return np.array(f), f.mode


def _read_label_map_names(path: str) -> dict[int, str]:
    """``value -> name`` of a ``label_map.txt`` (lines ``value<TAB>name``; blank lines and
    ``#`` comments skipped). A malformed line is a one-line :class:`~ummae.errors.DataError` naming the file."""
    names: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            fields = text.split("\t", 1) if "\t" in text else text.split(None, 1)
            try:
                value = int(fields[0])
            except ValueError:
                raise DataError(
                    f"{path}, line {lineno}: {fields[0]!r} is not an integer label value (expected 'value<TAB>name')"
                ) from None
            names[value] = fields[1].strip() if len(fields) > 1 else f"value{value}"
    return names


# ---------------------------------------------------------------- dataset


class SegmentationFolder(ImageDataset):
    """Semantic segmentation data in the ADE20K layout: ``root/images/<split>/`` (any image
    extension, searched recursively) and ``root/annotations/<split>/<same relative stem>.png``
    (8-bit label maps, mode L or P, read as raw values).

    ``train=True``: read through :meth:`load_or_substitute` (``build_train_loader`` does),
    which substitutes an unreadable sample as :class:`ImageDataset` does; ``transform``
    defaults to :class:`SegTrainTransform` ``(ignore_index=ignore_index)``.
    ``train=False``: ``dataset[key]`` is ``(image uint8 [3, H, W], label int64 [H, W], path)``
    at the original size, or ``None`` for an unreadable image or label map (warned once);
    ``transform`` defaults to :func:`to_uint8_tensor`. ``transform(pil_image, label) ->
    (uint8 image, int64 label)`` runs under ImageDataset's seeding.

    Labels are :func:`map_labels` of the PNG values, checked on every read: each must be in
    ``[0, num_classes)`` or ``ignore_index``, and the map must have its image's size; else a
    one-line :class:`LabelError` names the file and what to check.

    ``class_names``: from ``root/label_map.txt`` (``value<TAB>name`` lines, names of the raw
    values) if present, else :data:`ADE20K_CLASSES` for 150 classes, else ``class<i>``; always
    ``num_classes`` entries. Samples are ``(image path, index)`` (the label field is unused);
    ``ann_paths[i]`` is the label map of sample ``i``.

    The constructor raises a one-line :class:`~ummae.errors.DataError` for missing folders, no images, images
    without a label map, ``num_classes < 1`` and an ``ignore_index`` inside the classes.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "training",
        *,
        train: bool,
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        ignore_index: int = 255,
        transform: Callable | None = None,
    ):
        root = os.path.expanduser(str(root))
        if int(num_classes) < 1:
            raise DataError(f"num_classes must be at least 1, got {num_classes}")
        num_classes, ignore_index = int(num_classes), int(ignore_index)
        if 0 <= ignore_index < num_classes:
            raise DataError(
                f"ignore_index {ignore_index} is one of the {num_classes} classes "
                f"(0..{num_classes - 1}); use a value outside them, e.g. 255"
            )
        self.root = root
        self.split = split
        self.train = bool(train)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.ignore_index = ignore_index
        self.img_dir = os.path.join(root, "images", split)
        self.ann_dir = os.path.join(root, "annotations", split)
        images = self._image_and_label_paths(split)
        if transform is None:
            transform = SegTrainTransform(ignore_index=ignore_index) if self.train else to_uint8_tensor
        t_ignore = getattr(transform, "ignore_index", ignore_index)
        if t_ignore != ignore_index:
            # Its padding would be a class (or a class would be padding) to the loss.
            raise DataError(
                f"the transform's ignore_index {t_ignore} differs from the "
                f"dataset's {ignore_index}; give both the same value"
            )
        self.pair_transform = transform
        self.label_map_file = os.path.join(root, "label_map.txt")
        names = self._class_names(num_classes)
        note = (
            f"labels in {self.ann_dir}, reduce_zero_label "
            f"{'on' if self.reduce_zero_label else 'off'}, ignore index {ignore_index}"
        )
        samples = [(p, i) for i, p in enumerate(images)]
        super().__init__(
            samples,
            PairTransform(transform),
            "segmentation",
            self.img_dir,
            num_classes=num_classes,
            note=note,
            class_names=names,
        )
        logger.info("%s data: %s", split, self.describe())

    def _image_and_label_paths(self, split: str) -> list[str]:
        """The split's images, sorted, each with its label map (``self.ann_paths``): refused in one
        line when a folder, every image or one label map is missing."""
        layout = f"expected the ADE20K layout root/images/{split}/ + root/annotations/{split}/"
        for folder in (self.img_dir, self.ann_dir):
            if not os.path.isdir(folder):
                raise DataError(f"folder {folder} not found ({layout})")
        images = scan_images(self.img_dir)
        if not images:
            raise no_images_error(self.img_dir)
        stems = [os.path.splitext(os.path.relpath(p, self.img_dir))[0] for p in images]
        self.ann_paths = [os.path.join(self.ann_dir, stem + ".png") for stem in stems]
        missing = [(p, a) for p, a in zip(images, self.ann_paths, strict=True) if not os.path.isfile(a)]
        if missing:
            raise DataError(
                f"{len(missing)} of the {len(images)} images in {self.img_dir} have "
                f"no label map, e.g. {missing[0][0]} (expected {missing[0][1]})"
            )
        return images

    def _class_names(self, num_classes: int) -> list[str]:
        """``num_classes`` names: label_map.txt's (padded / truncated with a warning when it
        disagrees), else ADE20K's for 150 classes, else ``class<i>``."""
        names = [f"class{i}" for i in range(num_classes)]
        if not os.path.isfile(self.label_map_file):
            return list(ADE20K_CLASSES) if num_classes == 150 else names
        by_label = {}
        for value, name in _read_label_map_names(self.label_map_file).items():
            (label,) = map_labels(
                np.array([value]), reduce_zero_label=self.reduce_zero_label, ignore_index=self.ignore_index
            ).tolist()
            if label != self.ignore_index:
                by_label[label] = name
        extra = sorted(k for k in by_label if not 0 <= k < num_classes)
        absent = [k for k in range(num_classes) if k not in by_label]
        if extra:
            logger.warning(
                "%s names %d label(s) beyond the %d classes declared (e.g. label %d, %r): left out",
                self.label_map_file,
                len(extra),
                num_classes,
                extra[0],
                by_label[extra[0]],
            )
        if absent:
            logger.warning(
                "%s names no class for %d of the %d labels (e.g. label %d): named class<i>",
                self.label_map_file,
                len(absent),
                num_classes,
                absent[0],
            )
        for k, name in by_label.items():
            if 0 <= k < num_classes:
                names[k] = name
        return names

    def _checked_label(self, raw: np.ndarray, mode: str, index: int, image_size: tuple[int, int] | None) -> Tensor:
        """:func:`map_labels` of sample ``index``'s raw map, after checking its kind and its
        size (``image_size`` ``(w, h)``, ``None``: not checked) and then its values."""
        png = self.ann_paths[index]
        if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
            raise LabelError(
                f"label map {png} is a mode {mode} image ({raw.dtype}, shape "
                f"{raw.shape}); expected a single-channel PNG of class indices "
                f"(mode L or P)"
            )
        if image_size is not None and (raw.shape[1], raw.shape[0]) != tuple(image_size):
            raise LabelError(
                f"label map {png} is {raw.shape[1]}x{raw.shape[0]} but its image "
                f"{self.samples[index][0]} is {image_size[0]}x{image_size[1]}: a "
                f"label map must have the size of its image"
            )
        lab = map_labels(raw, reduce_zero_label=self.reduce_zero_label, ignore_index=self.ignore_index)
        bad = ((lab < 0) | (lab >= self.num_classes)) & (lab != self.ignore_index)
        if bool(bad.any()):
            worst = int(lab[bad].max())
            raw_value = int(torch.from_numpy(raw.astype(np.int64))[bad].max())
            raise LabelError(
                f"label {worst} (value {raw_value} in the file) in {png} is outside the "
                f"{self.num_classes} classes declared (--num-classes {self.num_classes}, "
                f"--reduce-zero-label {'on' if self.reduce_zero_label else 'off'}, ignore "
                f"index {self.ignore_index}): check --num-classes / --reduce-zero-label"
            )
        return lab

    def label(self, index: int) -> Tensor:
        """The labels of sample ``index``: int64 ``[H, W]`` at the original size, mapped and
        checked (:class:`LabelError`). A label map that cannot be decoded is a one-line
        :class:`~ummae.errors.DataError` naming it."""
        index = int(index)
        png = self.ann_paths[index]
        try:
            raw, mode = _load_png(png)
        except Exception as e:  # Pillow's zoo of decode errors, as in _read
            raise DataError(f"label map {png} cannot be read ({_one_line(e)})") from None
        try:
            with Image.open(self.samples[index][0]) as f:  # the header only: its size
                size = f.size
        except Exception:  # an unreadable image is reported where it is read
            size = None
        return self._checked_label(raw, mode, index, size)

    def _read(self, index: int) -> tuple[Image.Image, Tensor] | None:
        """The decoded RGB image and checked labels of sample ``index``, or ``None`` (the
        reason in ``_bad``) if the image or its label map cannot be decoded. A label map that
        decodes but does not fit raises :class:`LabelError`."""
        img = super()._read(index)
        if img is None:
            return None
        path, png = self.samples[index][0], self.ann_paths[index]
        try:
            raw, mode = _load_png(png)
        except Exception as e:  # only open + decode run under this catch
            self._bad[path] = f"its label map {png} cannot be read ({_one_line(e)})"
            return None
        return img, self._checked_label(raw, mode, index, img.size)

    def __getitem__(self, key: Key) -> tuple[Tensor, Tensor, str] | None:
        """Evaluation access: ``(image, label, image path)`` (uint8 ``[3, H, W]`` and int64
        ``[H, W]`` at the original size with the default transform), or ``None`` when the image
        or its label map cannot be read (warned once)."""
        index, seed = self._split_key(key)
        pair = self._read(index)
        path = self.samples[index][0]
        if pair is None:
            self._warn_once(path, "skipping unreadable image %s: %s", path, self._bad[path])
            return None
        image, label = self._augment(pair, seed)
        return image, label, path

    def load_or_substitute(self, key: Key) -> tuple[Tensor, Tensor, int]:
        """Training access: ``(image uint8 [3, c, c], label int64 [c, c], n_skipped)``, never
        ``None``; an unreadable sample is replaced by the next readable one with its own labels
        (see :meth:`ImageDataset.load_or_substitute`)."""
        index, seed = self._split_key(key)
        j, pair = self._readable_or_substitute(index)
        image, label = self._augment(pair, seed)
        return image, label, int(j != index)


# ---------------------------------------------------------------- training pipeline


class SegTrainTransform:
    """MMSegmentation 0.x's ADE20K training pipeline:
    ``(PIL image, int64 labels [H, W]) -> (uint8 [3, c, c], int64 [c, c])``.

    1. Resize(img_scale=scale, ratio_range, keep_ratio=True): ``r ~ U(ratio_range)``, target
       ``(long, short) = (int(scale_long * r), int(scale_short * r))``, scale factor
       ``min(long / max(h, w), short / min(h, w))``, sizes rounded as mmcv's ``rescale_size``;
       the image bilinear with antialias, the labels nearest;
    2. RandomCrop(crop_size, cat_max_ratio): a uniform offset where the image is larger; as
       mmseg, a crop is redrawn (up to 10 times, the 11th draw kept unchecked) unless its
       labels hold more than one class (ignore excluded) with the largest under
       ``cat_max_ratio`` of the non-ignored pixels (``cat_max_ratio >= 1``: the first crop);
    3. RandomFlip(prob=flip_prob), horizontal;
    4. PhotoMetricDistortion (``photometric``): brightness, contrast (first or last),
       saturation, hue, each with probability 0.5;
    5. Pad bottom and right to ``crop_size`` x ``crop_size``: the image with
       :data:`IMAGENET_MEAN_RGB` (zero after normalisation, as mmseg's Pad after Normalize),
       the labels with ``ignore_index``.

    All randomness comes from torch's default CPU generator, so under ImageDataset's seeding
    the output is a pure function of the sample seed.
    """

    def __init__(
        self,
        crop_size: int = 512,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        ignore_index: int = 255,
    ):
        if int(crop_size) < 1:
            raise DataError(f"crop_size must be positive, got {crop_size}")
        if len(scale) != 2 or min(int(s) for s in scale) < 1:
            raise DataError(f"scale must be two positive sizes (long, short), got {tuple(scale)}")
        lo, hi = (float(r) for r in ratio_range)
        if not 0 < lo <= hi:
            raise DataError(f"ratio_range must be (low, high) with 0 < low <= high, got {tuple(ratio_range)}")
        if not float(cat_max_ratio) > 0:
            raise DataError(f"cat_max_ratio must be positive (1 or more: no check), got {cat_max_ratio}")
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise DataError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.crop_size = int(crop_size)
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (lo, hi)
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = bool(photometric)
        self.ignore_index = int(ignore_index)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(crop_size={self.crop_size}, scale={self.scale}, "
            f"ratio_range={self.ratio_range}, cat_max_ratio={self.cat_max_ratio}, "
            f"flip_prob={self.flip_prob}, photometric={self.photometric}, "
            f"ignore_index={self.ignore_index})"
        )

    def _crop_ok(self, crop: Tensor) -> bool:
        """mmseg's RandomCrop test: more than one class and none over ``cat_max_ratio``."""
        _, counts = torch.unique(crop[crop != self.ignore_index], return_counts=True)
        return counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def __call__(self, img: Image.Image | Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        c = self.crop_size
        image = TF.pil_to_tensor(img) if isinstance(img, Image.Image) else img
        label = torch.as_tensor(label)
        h, w = image.shape[-2:]
        if tuple(label.shape) != (h, w):
            raise DataError(f"labels {tuple(label.shape)} do not match the image's {h}x{w}")

        # 1. Resize(img_scale, ratio_range, keep_ratio=True), rounded as mmcv's rescale_size
        lo, hi = self.ratio_range
        r = lo + (hi - lo) * float(torch.rand(()))
        target = (int(self.scale[0] * r), int(self.scale[1] * r))
        factor = min(max(target) / max(h, w), min(target) / min(h, w))
        nh, nw = max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))
        image = TF.resize(image, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
        label = TF.resize(label[None], [nh, nw], interpolation=InterpolationMode.NEAREST)[0]

        # 2. RandomCrop(crop_size, cat_max_ratio)
        def offsets() -> tuple[int, int]:
            return (int(torch.randint(0, max(nh - c, 0) + 1, ())), int(torch.randint(0, max(nw - c, 0) + 1, ())))

        oy, ox = offsets()
        if self.cat_max_ratio < 1 and (nh > c or nw > c):  # else every crop is the same
            for _ in range(10):
                if self._crop_ok(label[oy : oy + c, ox : ox + c]):
                    break
                oy, ox = offsets()
        image = image[:, oy : oy + c, ox : ox + c]
        label = label[oy : oy + c, ox : ox + c]

        # 3. RandomFlip
        if float(torch.rand(())) < self.flip_prob:
            image, label = image.flip(-1), label.flip(-1)

        # 4. PhotoMetricDistortion
        if self.photometric:
            image = _photometric_distortion(image)

        # 5. Pad bottom and right
        ch, cw = label.shape
        canvas = torch.tensor(IMAGENET_MEAN_RGB, dtype=torch.uint8).view(3, 1, 1).repeat(1, c, c)
        canvas[:, :ch, :cw] = image
        padded = torch.full((c, c), self.ignore_index, dtype=torch.int64)
        padded[:ch, :cw] = label
        return canvas, padded


def _coin() -> bool:
    return bool(torch.randint(2, ()))


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _photometric_distortion(
    image: Tensor,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> Tensor:
    """mmseg's PhotoMetricDistortion on a uint8 ``[3, H, W]`` image, in float. Each step is
    clamped to [0, 255] and truncated, as mmseg's ``convert`` returns uint8 after each."""
    x = image.to(torch.float32)

    def done(y: Tensor) -> Tensor:
        return y.clamp(0, 255).floor()

    def contrast(y: Tensor) -> Tensor:
        return done(y * _uniform(*contrast_range)) if _coin() else y

    if _coin():  # brightness
        x = done(x + _uniform(-brightness_delta, brightness_delta))
    mode = int(torch.randint(2, ()))  # contrast first (1) or last (0)
    if mode == 1:
        x = contrast(x)
    if _coin():
        # torchvision blends with the grayscale image; mmseg scales S in HSV. Both leave grays
        # gray and scale colourfulness; the colours differ slightly.
        x = done(TF.adjust_saturation(x / 255, _uniform(*saturation_range)) * 255)
    if _coin():
        # OpenCV hue is in half-degrees (0..180 a full turn); mmseg draws an integer delta in
        # [-hue_delta, hue_delta) (numpy's randint excludes the high end).
        delta = int(torch.randint(-hue_delta, hue_delta, ()))
        x = done(TF.adjust_hue(x / 255, delta / 180) * 255)
    if mode == 0:
        x = contrast(x)
    return x.to(torch.uint8)


# ---------------------------------------------------------------- collate


def collate_segmentation(batch: list) -> tuple[Tensor, Tensor, int]:
    """Training batches: items ``(image uint8 [3, c, c], label int64 [c, c], n_skipped)`` ->
    ``(images uint8 [B, 3, c, c], labels int64 [B, c, c], n_skipped)``. ``None`` items, if any,
    are dropped and counted."""
    good, n_skipped = readable_items(batch)
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), n_skipped
    shapes = {(tuple(item[0].shape), tuple(item[1].shape)) for item in good}
    if len(shapes) > 1 or any(img[-2:] != lab for img, lab in shapes):
        raise ValueError(
            f"training images and labels of one batch must have one size to be "
            f"stacked, got (image, label) shapes {sorted(shapes)}; use a "
            f"fixed-size transform such as SegTrainTransform"
        )
    # default_collate stacks straight into shared memory inside workers (one copy fewer)
    images = default_collate([item[0] for item in good])
    labels = default_collate([item[1] for item in good])
    return images, labels.long(), n_skipped


def collate_segmentation_eval(batch: list) -> tuple[list[Tensor], list[Tensor], list[str], int]:
    """Evaluation batches: items ``(image [3, H, W], label [H, W], path)`` or ``None``
    (unreadable) -> ``(images, labels, paths, n_skipped)``: lists (the sizes differ), ``None``
    items dropped and counted in ``n_skipped``."""
    good = [item for item in batch if item is not None]
    return ([item[0] for item in good], [item[1] for item in good], [item[2] for item in good], len(batch) - len(good))
