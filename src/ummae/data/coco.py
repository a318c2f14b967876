"""COCO detection and instance segmentation: the dataset, large-scale jitter, collate and the
pycocotools evaluation helpers.

:class:`CocoDetection` reads the usual COCO layout (``root/<split>/*.jpg`` and
``root/annotations/instances_<split>.json``) on top of :class:`~ummae.data.dataset.ImageDataset`,
so it keeps its keyed, seeded augmentation (a pure function of ``(index, sample_seed)``) and its
handling of unreadable images (substituted in training, skipped in evaluation). Targets follow
torchvision's detection models: ``boxes`` xyxy in absolute pixels, ``labels`` 1..K (0 is the
background), ``masks`` uint8 ``[n, H, W]``.

Training follows what the COCO tool chains do (MMDetection's ``CocoDataset``, torchvision's
references): crowd regions and degenerate boxes are no targets, and images left without any
target are not trained on. Evaluation keeps every image and every annotation, since COCOeval
itself handles crowd regions and images without objects.

:class:`LargeScaleJitter` is the detection recipe of the paper (MMDetection's LSJ pipeline:
RandomResize with ratio range (0.1, 2.0), RandomCrop with recomputed boxes, FilterAnnotations,
RandomFlip, Pad). :func:`coco_results` and :func:`coco_evaluate` turn torchvision's outputs into
COCO result dicts and COCO AP.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.ops import masks_to_boxes as tight_boxes
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ummae.data.collate import readable_items
from ummae.data.dataset import ImageDataset, Key
from ummae.data.transforms import IMAGENET_MEAN_RGB, PairTransform, to_uint8_tensor
from ummae.errors import DataError
from ummae.weights.io import write_atomic

logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0..5]
# Per-instance fields of a target: whatever drops an instance drops its row in each of these.
INSTANCE_KEYS = ("boxes", "labels", "masks", "iscrowd", "area")
# COCO-stuff maps (the stuffthingmaps PNGs): classes 0..182, 255 unlabelled (ignored, and the padding)
STUFF_CLASSES = 183
STUFF_IGNORE = 255


# ---------------------------------------------------------------- annotation file


def _load_instances(ann_file: str, *, need_area: bool, need_masks: bool) -> dict:
    """The parsed ``instances_*.json``, checked to be a COCO instances file (raises a one-line
    :class:`~ummae.errors.DataError` naming ``ann_file`` and the first problem otherwise)."""
    if not os.path.isfile(ann_file):
        raise DataError(
            f"COCO annotation file not found: {ann_file} (expected the layout "
            f"root/annotations/instances_<split>.json next to root/<split>/)"
        )
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{ann_file} is not valid JSON ({detail}); is the file complete?") from None

    def bad(why: str) -> DataError:
        return DataError(f"{ann_file} is not a COCO instances file: {why}")

    sizes, cat_ids = _check_images_and_categories(data, bad)
    _check_annotations(data["annotations"], sizes, cat_ids, bad, need_area=need_area, need_masks=need_masks)
    return data


def _check_images_and_categories(data, bad: Callable[[str], DataError]) -> tuple[dict[int, tuple[int, int]], set]:
    """``({image id: (height, width)}, category ids)`` of a parsed instances file, checked
    (``bad(why)`` is the error to raise)."""
    if not isinstance(data, dict):
        raise bad(f"the top level is a {type(data).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise bad(f"no '{key}' list")
    sizes: dict[int, tuple[int, int]] = {}
    for k, img in enumerate(data["images"]):
        missing = [f for f in ("id", "file_name", "height", "width") if not isinstance(img, dict) or f not in img]
        if missing:
            raise bad(f"images[{k}] has no '{missing[0]}'")
        if img["id"] in sizes:
            raise bad(f"image id {img['id']} is listed twice")
        sizes[img["id"]] = (int(img["height"]), int(img["width"]))
    cat_ids = set()
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise bad(f"categories[{k}] needs an 'id' and a 'name'")
        if cat["id"] in cat_ids:
            raise bad(f"category id {cat['id']} is listed twice")
        cat_ids.add(cat["id"])
    if not cat_ids:
        raise bad("the 'categories' list is empty")
    return sizes, cat_ids


def _check_annotations(
    annotations: list,
    sizes: dict[int, tuple[int, int]],
    cat_ids: set,
    bad: Callable[[str], DataError],
    *,
    need_area: bool,
    need_masks: bool,
) -> None:
    """Check each annotation's fields, image and category (``bad(why)``: the error to raise)."""
    # COCOeval needs the GT 'area' (size ranges) and 'iscrowd'; training needs neither.
    required = ["id", "image_id", "category_id", "bbox"] + (["area"] if need_area else [])
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise bad(f"annotations[{k}] is not an object")
        name = f"annotation id {ann['id']}" if "id" in ann else f"annotations[{k}]"
        missing = [f for f in required if f not in ann]
        if missing:
            raise bad(f"{name} has no '{missing[0]}'")
        if ann["image_id"] not in sizes:
            raise bad(f"{name} points at image id {ann['image_id']}, which 'images' does not list")
        if ann["category_id"] not in cat_ids:
            raise bad(f"{name} has category id {ann['category_id']}, which 'categories' does not list")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise bad(f"{name}: 'bbox' must be [x, y, w, h], got {box!r:.60}")
        if need_masks:
            seg = ann.get("segmentation")
            if isinstance(seg, dict):
                h, w = sizes[ann["image_id"]]
                if "counts" not in seg or list(seg.get("size", ())) != [h, w]:
                    raise bad(
                        f"{name}: its RLE 'segmentation' needs 'counts' and a 'size' equal "
                        f"to the image's [height, width] = [{h}, {w}]"
                    )
            elif not isinstance(seg, list):
                raise bad(f"{name} has no 'segmentation' (polygons or RLE), needed for masks")


def _make_coco(data: dict) -> COCO:
    """A pycocotools ``COCO`` over already-parsed ``data`` (the file is not read twice)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # "creating index..." prints
        coco.createIndex()
    return coco


def _is_training_target(ann: dict, height: int, width: int) -> bool:
    """MMDetection's ``CocoDataset._parse_ann_info`` rule: crowd regions are ignored (not
    targets), and so are boxes under 1 px wide or high, with no area, or outside the image."""
    if ann.get("iscrowd", 0):
        return False
    x, y, w, h = ann["bbox"]
    inter_w = max(0.0, min(x + w, width) - max(x, 0.0))
    inter_h = max(0.0, min(y + h, height) - max(y, 0.0))
    if inter_w * inter_h == 0:
        return False
    return w >= 1 and h >= 1 and ann.get("area", w * h) > 0


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict | None:
    """A COCO ``segmentation`` (polygons, uncompressed RLE or compressed RLE) as a compressed
    RLE, or ``None`` for polygons that enclose nothing."""
    if isinstance(segmentation, list):
        # Polygons need 3 points (6 coordinates) to enclose anything; pycocotools would also
        # read a first polygon of exactly 4 coordinates as a box.
        polys = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE (crowd regions)
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation  # compressed RLE: counts a str or bytes, taken by decode as is


def decode_segmentations(segmentations: Sequence[Any], height: int, width: int) -> np.ndarray:
    """COCO ``segmentation`` fields (polygons, uncompressed or compressed RLE) as uint8
    ``[n, height, width]`` masks."""
    masks = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    rles = [segmentation_to_rle(s, height, width) for s in segmentations]
    filled = [k for k, rle in enumerate(rles) if rle is not None]
    if filled:
        # one decode call per image: it returns [H, W, n]
        masks[filled] = mask_utils.decode([rles[k] for k in filled]).transpose(2, 0, 1)
    return masks


# ---------------------------------------------------------------- dataset


class CocoDetection(ImageDataset):
    """COCO instances of ``root/<split>`` for detection (and instance segmentation).

    ``train=True``: only images with at least one training target are used (MMDetection's
    ``filter_empty_gt``, torchvision references' ``_coco_remove_images_without_annotations``);
    their targets leave out crowd regions and degenerate boxes (:func:`_is_training_target`).
    Read through :meth:`load_or_substitute` (``build_train_loader`` does), which substitutes an
    unreadable image as :class:`ImageDataset` does. ``transform`` defaults to
    :class:`LargeScaleJitter` ``()``.

    ``train=False``: every image of the JSON, every annotation (crowd ones with ``iscrowd``
    1). ``dataset[key]`` is ``(image uint8 [3, H, W], target)``, or ``None`` for an unreadable
    image; ``transform`` defaults to :func:`to_uint8_tensor` (the original size).

    ``transform(pil_image, target) -> (uint8 image, target)`` runs under ImageDataset's
    seeding: with a key ``(index, sample_seed)`` it is a pure function of the key.

    Attributes: ``coco`` (pycocotools ``COCO`` of the file), ``ids`` (image ids used, sorted;
    sample ``i`` is image ``ids[i]``), ``cat_ids`` (sorted category ids), ``class_names``
    (their names: label ``l`` is ``class_names[l - 1]``), ``num_classes`` (``len(cat_ids)``;
    a torchvision detector takes ``num_classes + 1`` with the background).

    ``stuff_dir`` (HTC's semantic branch): the COCO-stuff maps, ``stuff_dir/<image file stem>.png``;
    each target gets them as ``semantic`` (:meth:`stuff_map`), transformed with the image.

    Raises a one-line :class:`~ummae.errors.DataError` naming the file for a missing or malformed annotation file,
    for images it lists that are missing on disk, and for a missing or misshapen stuff map.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train2017",
        *,
        train: bool,
        with_masks: bool = False,
        transform: Callable | None = None,
        stuff_dir: str | os.PathLike | None = None,
    ):
        root = os.path.expanduser(str(root))
        self.root = root
        self.stuff_dir = os.path.expanduser(str(stuff_dir)) if stuff_dir else None
        self.split = split
        self.train = bool(train)
        self.with_masks = bool(with_masks)
        self.ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
        self.img_dir = os.path.join(root, split)
        data = _load_instances(self.ann_file, need_area=not self.train, need_masks=self.with_masks)
        self._check_images_on_disk(data["images"])
        self.coco = _make_coco(data)
        self.cat_ids = sorted(self.coco.cats)
        self._label_of = {cid: k + 1 for k, cid in enumerate(self.cat_ids)}
        self.ids, note = self._select_images(data)
        if self.stuff_dir:
            self._check_stuff_maps()
        if transform is None:
            transform = LargeScaleJitter() if self.train else to_uint8_tensor
        self.pair_transform = transform
        samples = [(os.path.join(self.img_dir, self.coco.imgs[i]["file_name"]), i) for i in self.ids]
        names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        super().__init__(
            samples,
            PairTransform(transform),
            "COCO",
            self.img_dir,
            num_classes=len(self.cat_ids),
            note=note,
            class_names=names,
        )
        logger.info("%s data: %s", split, self.describe())

    def _check_images_on_disk(self, images: list[dict]) -> None:
        """Every image the annotations list is on disk: one line naming the first missing one."""
        if not os.path.isdir(self.img_dir):
            raise DataError(f"image folder {self.img_dir} not found (the images of {self.ann_file})")
        missing = [
            os.path.join(self.img_dir, img["file_name"])
            for img in images
            if not os.path.exists(os.path.join(self.img_dir, img["file_name"]))
        ]
        if missing:
            raise DataError(
                f"{len(missing)} of the {len(images)} images listed in "
                f"{self.ann_file} are missing on disk, e.g. {missing[0]}"
            )

    def stuff_path(self, image_id: int) -> str:
        """The COCO-stuff map of ``image_id``: ``stuff_dir/<image file stem>.png``."""
        return os.path.join(self.stuff_dir, Path(self.coco.imgs[image_id]["file_name"]).stem + ".png")

    def _check_stuff_maps(self) -> None:
        """Every image used has a single-channel stuff map of its size (headers only): one line
        naming the first that is missing or wrong."""
        if not os.path.isdir(self.stuff_dir):
            raise DataError(f"stuff map folder {self.stuff_dir} not found")
        missing = [self.stuff_path(i) for i in self.ids if not os.path.isfile(self.stuff_path(i))]
        if missing:
            raise DataError(
                f"{len(missing)} of the {len(self.ids)} images of {self.ann_file} have no stuff map "
                f"(<file stem>.png) in {self.stuff_dir}, e.g. {missing[0]}"
            )
        for image_id in self.ids:
            path = self.stuff_path(image_id)
            h, w = self._size(image_id)
            try:
                with Image.open(path) as im:
                    size, mode = im.size, im.mode
            except OSError as e:
                raise DataError(f"stuff map {path} cannot be read: {e}") from None
            if size != (w, h) or mode not in ("L", "P"):
                raise DataError(
                    f"stuff map {path} is {size[0]}x{size[1]} {mode}: it must be a single-channel (L or P) "
                    f"map of the image's {w}x{h}"
                )

    def stuff_map(self, image_id: int) -> Tensor:
        """The uint8 ``[H, W]`` COCO-stuff labels of ``image_id``: classes 0..182, 255 ignored
        (any other value is a :class:`~ummae.errors.DataError`)."""
        path = self.stuff_path(image_id)
        with Image.open(path) as im:
            labels = torch.from_numpy(np.array(im, dtype=np.uint8))
        bad = (labels >= STUFF_CLASSES) & (labels != STUFF_IGNORE)
        if bad.any():
            raise DataError(
                f"stuff map {path} has label {int(labels[bad][0])}: COCO-stuff labels are 0..{STUFF_CLASSES - 1} "
                f"and {STUFF_IGNORE} (ignored)"
            )
        return labels

    def _select_images(self, data: dict) -> tuple[list[int], str]:
        """The image ids to use and a note of what was left out. Training keeps the images with
        at least one training target (non-crowd, box at least 1x1 px), evaluation all of them."""
        ids = sorted(self.coco.imgs)
        n_crowd = sum(1 for a in data["annotations"] if a.get("iscrowd", 0))
        if not self.train:
            self._anns = {i: list(self.coco.imgToAnns.get(i, [])) for i in ids}
            return ids, f"{len(data['annotations'])} annotations ({n_crowd} crowd)"
        self._anns = {
            i: [a for a in self.coco.imgToAnns.get(i, []) if _is_training_target(a, *self._size(i))] for i in ids
        }
        kept = [i for i in ids if self._anns[i]]
        if not kept:
            raise DataError(f"no image of {self.ann_file} has a training annotation (non-crowd, box at least 1x1 px)")
        n_targets = sum(len(self._anns[i]) for i in kept)
        note = f"{n_targets} training targets; {len(ids) - len(kept)} images without one left out; {n_crowd} crowd regions ignored"
        return kept, note

    def _size(self, image_id: int) -> tuple[int, int]:
        img = self.coco.imgs[image_id]
        return int(img["height"]), int(img["width"])

    def label_to_cat_id(self, label: int) -> int:
        """The COCO category id of model label ``label`` (1..num_classes)."""
        label = int(label)
        if not 1 <= label <= len(self.cat_ids):
            raise DataError(
                f"label {label} is not a class of {self.ann_file} (labels are "
                f"1..{len(self.cat_ids)}; 0 is the background)"
            )
        return self.cat_ids[label - 1]

    def target(self, index: int) -> dict:
        """The target of sample ``index`` at the image's original size: ``boxes`` float32
        ``[n, 4]`` xyxy pixels, ``labels`` int64 ``[n]`` (1..num_classes), ``iscrowd`` int64
        ``[n]``, ``area`` float32 ``[n]``, ``image_id`` int, ``orig_size`` ``(h, w)``, with
        ``with_masks`` ``masks`` uint8 ``[n, h, w]`` and with ``stuff_dir`` ``semantic`` uint8
        ``[h, w]`` (:meth:`stuff_map`)."""
        image_id = self.ids[index]
        h, w = self._size(image_id)
        anns = self._anns[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # COCO [x, y, w, h] -> [x1, y1, x2, y2]
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([int(bool(a.get("iscrowd", 0))) for a in anns], dtype=torch.int64),
            "area": torch.tensor(
                [float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns], dtype=torch.float32
            ),
            "image_id": int(image_id),
            "orig_size": (h, w),
        }
        if self.with_masks:
            target["masks"] = torch.from_numpy(decode_segmentations([a["segmentation"] for a in anns], h, w))
        if self.stuff_dir:
            target["semantic"] = self.stuff_map(image_id)
        return target

    def _read(self, index: int) -> Image.Image | None:
        img = super()._read(index)
        if img is None:
            return None
        h, w = self._size(self.ids[index])
        if img.size != (w, h):
            # Boxes and masks are in the JSON's pixel frame: a resized or rotated copy of the
            # image would be trained and evaluated on misplaced targets.
            path = self.samples[index][0]
            self._bad[path] = f"its size {img.size[0]}x{img.size[1]} differs from the {w}x{h} of {self.ann_file}"
            return None
        return img

    def __getitem__(self, key: Key) -> tuple[Tensor, dict] | None:
        """Evaluation access: ``(image, target)`` (image uint8 ``[3, H, W]`` with the default
        transform), or ``None`` when the image cannot be read (warned once)."""
        index, seed = self._split_key(key)
        img = self._read(index)
        if img is None:
            path = self.samples[index][0]
            self._warn_once(path, "skipping unreadable image %s: %s", path, self._bad[path])
            return None
        return self._augment((img, self.target(index)), seed)

    def load_or_substitute(self, key: Key) -> tuple[Tensor, dict, int]:
        """Training access: ``(image uint8 [3, S, S], target, n_skipped)``, never ``None``; an
        unreadable image is replaced by the next readable one with its own target (see
        :meth:`ImageDataset.load_or_substitute`)."""
        index, seed = self._split_key(key)
        j, img = self._readable_or_substitute(index)
        image, target = self._augment((img, self.target(j)), seed)
        return image, target, int(j != index)


# ---------------------------------------------------------------- large-scale jitter


def masks_to_boxes(masks: Tensor) -> Tensor:
    """``[n, 4]`` float32 xyxy boxes around uint8/bool ``[n, H, W]`` masks, pixel edges
    included (x2 = last column + 1, as MMDetection's ``BitmapMasks.get_bboxes``; torchvision's
    ``masks_to_boxes`` gives the last column's index); an empty mask gets ``[0, 0, 0, 0]``."""
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    has = (masks != 0).flatten(1).any(dim=1) if masks.shape[0] else torch.zeros(0, dtype=torch.bool)
    if has.any():
        boxes[has] = tight_boxes(masks[has] != 0).float() + torch.tensor([0.0, 0.0, 1.0, 1.0])
    return boxes


def _nearest_indices(start: int, length: int, in_size: int, out_size: int) -> Tensor:
    """Source rows (or columns) of output rows ``start .. start + length - 1`` of a nearest
    resize from ``in_size`` to ``out_size``: PyTorch's ``nearest`` rule, floor(i * in / out)
    in float32, so gathering them equals ``interpolate(mode="nearest")`` then a crop."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    idx = (torch.arange(start, start + length, dtype=torch.float32) * scale).floor().long()
    return idx.clamp_(max=in_size - 1)


def _select(target: dict, keep: Tensor) -> None:
    for k in INSTANCE_KEYS:
        if k in target:
            target[k] = target[k][keep]


class LargeScaleJitter:
    """Large-scale jitter (the detection recipe, MMDetection's LSJ pipeline):
    ``(PIL image, target) -> (uint8 [3, img_size, img_size], target)``.

    1. resize, keeping the aspect ratio, so the long side is ``r * img_size`` with
       ``r ~ U(scale_range)`` (RandomResize, keep_ratio); bilinear, antialiased; boxes scaled,
       masks resized (nearest);
    2. crop ``img_size x img_size`` at a uniform random offset where the image is larger
       (RandomCrop, allow_negative_crop: a crop without objects is kept); boxes shifted and
       clipped, or, with masks, recomputed from the cropped masks (recompute_bbox);
    3. drop instances whose box is now 1e-2 px or less wide or high (FilterAnnotations);
    4. flip horizontally with probability ``flip_prob`` (RandomFlip);
    5. pad bottom and right to ``img_size x img_size`` with ``pad_value`` (Pad).

    A ``semantic`` stuff map ``[H, W]`` in the target (HTC's semantic branch) goes through the
    same resize (nearest), crop and flip as the masks, and is padded with 255 (ignored).
    The target gets ``img_shape`` ``(h, w)`` of the unpadded region, its ``area`` becomes the
    mask area (or box area without masks), other keys are kept. The random draws come from
    torch's default CPU generator only, always the same four in the same order, so under
    ImageDataset's seeding the output is a pure function of the sample seed.
    """

    def __init__(
        self,
        img_size: int = 1024,
        scale_range: Sequence[float] = (0.1, 2.0),
        flip_prob: float = 0.5,
        pad_value: Sequence[int] = IMAGENET_MEAN_RGB,
    ):
        if int(img_size) < 1:
            raise DataError(f"img_size must be positive, got {img_size}")
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise DataError(f"scale_range must be (low, high) with 0 < low <= high, got {tuple(scale_range)}")
        if not 0.0 <= flip_prob <= 1.0:
            raise DataError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if len(pad_value) != 3 or not all(0 <= int(v) <= 255 for v in pad_value):
            raise DataError(f"pad_value must be 3 values in 0..255, got {tuple(pad_value)}")
        self.img_size = int(img_size)
        self.scale_range = (lo, hi)
        self.flip_prob = float(flip_prob)
        self.pad_value = tuple(int(v) for v in pad_value)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(img_size={self.img_size}, scale_range="
            f"{self.scale_range}, flip_prob={self.flip_prob}, pad_value={self.pad_value})"
        )

    def __call__(self, img: Image.Image | Tensor, target: dict) -> tuple[Tensor, dict]:
        size = self.img_size
        image = TF.pil_to_tensor(img) if isinstance(img, Image.Image) else img
        target = dict(target)
        h, w = image.shape[-2:]
        has_masks = "masks" in target
        has_semantic = "semantic" in target

        # 1. RandomResize(ratio_range, keep_ratio): rounded as mmcv's rescale_size
        nh, nw = self.draw_size(h, w)
        image = TF.resize(image, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
        sx, sy = nw / w, nh / h
        boxes = target["boxes"].to(torch.float32) * torch.tensor([sx, sy, sx, sy])

        # 2. RandomCrop(crop_size, allow_negative_crop=True, recompute_bbox=True)
        oy = int(torch.randint(0, max(nh - size, 0) + 1, ()))
        ox = int(torch.randint(0, max(nw - size, 0) + 1, ()))
        ch, cw = min(nh, size), min(nw, size)
        image = image[:, oy : oy + ch, ox : ox + cw]
        boxes = boxes - torch.tensor([ox, oy, ox, oy], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
        if has_masks or has_semantic:
            # Nearest resize and crop in one gather of the crop's source pixels: the same
            # masks as resizing whole (up to 2x img_size per side, per instance) then cropping,
            # without the large intermediate.
            rows = _nearest_indices(oy, ch, h, nh)
            cols = _nearest_indices(ox, cw, w, nw)
        if has_semantic:
            target["semantic"] = target["semantic"][rows][:, cols]
        if has_masks:
            target["masks"] = target["masks"][:, rows][:, :, cols]
            boxes = masks_to_boxes(target["masks"])
        target["boxes"] = boxes

        # 3. FilterAnnotations(min_gt_bbox_wh=(1e-2, 1e-2)): strictly larger, as MMDetection
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-2) & ((boxes[:, 3] - boxes[:, 1]) > 1e-2)
        _select(target, keep)

        # 4. RandomFlip, inside the valid region (flipping comes before padding)
        if float(torch.rand(())) < self.flip_prob:
            image = image.flip(-1)
            b = target["boxes"]
            target["boxes"] = torch.stack([cw - b[:, 2], b[:, 1], cw - b[:, 0], b[:, 3]], dim=1)
            if has_masks:
                target["masks"] = target["masks"].flip(-1)
            if has_semantic:
                target["semantic"] = target["semantic"].flip(-1)

        # 5. Pad to size x size (bottom and right)
        canvas = torch.tensor(self.pad_value, dtype=torch.uint8).view(3, 1, 1).repeat(1, size, size)
        canvas[:, :ch, :cw] = image
        if has_masks:
            m = target["masks"]
            padded = m.new_zeros((m.shape[0], size, size))
            padded[:, :ch, :cw] = m
            target["masks"] = padded
        if has_semantic:
            stuff = torch.full((size, size), STUFF_IGNORE, dtype=torch.uint8)
            stuff[:ch, :cw] = target["semantic"]
            target["semantic"] = stuff
        if "area" in target:
            b = target["boxes"]
            target["area"] = (
                target["masks"].sum(dim=(1, 2)).to(torch.float32)
                if has_masks
                else (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            )
        target["img_shape"] = (ch, cw)
        return canvas, target

    def draw_size(self, h: int, w: int) -> tuple[int, int]:
        """The resized ``(height, width)`` of an ``h x w`` image: long side ``r * img_size``,
        ``r ~ U(scale_range)`` (one draw), rounded as mmcv's ``rescale_size``."""
        lo, hi = self.scale_range
        r = lo + (hi - lo) * float(torch.rand(()))
        scale = r * self.img_size / max(h, w)
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


class RangeResize(LargeScaleJitter):
    """MMDetection's ``Resize(img_scale=[(long, short_lo), (long, short_hi)],
    multiscale_mode='range', keep_ratio=True)`` (HTC++ as Swin trains it: shorter side
    400-1400, longer side at most 1600), then flip and pad as :class:`LargeScaleJitter`:
    ``(PIL image, target) -> (uint8 [3, img_size, img_size], target)``.

    The shorter-side bound is drawn uniformly from the integers ``short_range[0] ..
    short_range[1]`` (``np.random.randint(lo, hi + 1)``), the longer-side bound is ``img_size``
    (MMDetection draws it from ``[long, long]``), and the image is scaled by
    ``min(img_size / long side, short / short side)`` (mmcv's ``rescale_size``), so it always
    fits the ``img_size`` canvas: the crop of step 2 takes all of it.
    """

    def __init__(
        self,
        img_size: int = 1600,
        short_range: Sequence[int] = (400, 1400),
        flip_prob: float = 0.5,
        pad_value: Sequence[int] = IMAGENET_MEAN_RGB,
    ):
        super().__init__(img_size, (1.0, 1.0), flip_prob, pad_value)
        lo, hi = (int(v) for v in short_range)
        if not 0 < lo <= hi:
            raise DataError(f"short_range must be (low, high) with 0 < low <= high, got {tuple(short_range)}")
        self.short_range = (lo, hi)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(img_size={self.img_size}, short_range={self.short_range}, "
            f"flip_prob={self.flip_prob}, pad_value={self.pad_value})"
        )

    def draw_size(self, h: int, w: int) -> tuple[int, int]:
        lo, hi = self.short_range
        short = int(torch.randint(lo, hi + 1, ()))
        scale = min(self.img_size / max(h, w), short / min(h, w))
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


# ---------------------------------------------------------------- collate and loader


def collate_detection(batch: list) -> tuple[Tensor, list[dict], int]:
    """Training batches: items ``(image uint8 [3, S, S], target, n_skipped)`` ->
    ``(images uint8 [B, 3, S, S], targets, n_skipped)`` (targets a list of dicts; torchvision's
    detection models take them so). ``None`` items, if any, are dropped and counted."""
    good, n_skipped = readable_items(batch)
    if not good:
        return torch.empty(0, dtype=torch.uint8), [], n_skipped
    shapes = {tuple(item[0].shape) for item in good}
    if len(shapes) > 1:
        raise ValueError(
            f"training images of one batch must have one size to be stacked, got "
            f"{sorted(shapes)}; use a fixed-size transform such as "
            f"LargeScaleJitter"
        )
    # default_collate stacks straight into shared memory inside workers (one copy fewer)
    images = default_collate([item[0] for item in good])
    return images, [item[1] for item in good], n_skipped


def collate_detection_eval(batch: list) -> tuple[list[Tensor], list[dict], int]:
    """Evaluation batches: items ``(image [3, H, W], target)`` or ``None`` (unreadable) ->
    ``(images, targets, n_skipped)``: lists (the sizes differ), ``None`` items dropped and
    counted in ``n_skipped``."""
    good = [item for item in batch if item is not None]
    return [item[0] for item in good], [item[1] for item in good], len(batch) - len(good)


# ---------------------------------------------------------------- results and evaluation


def coco_results(
    image_ids: Sequence[int | Mapping], predictions: Sequence[Mapping[str, Tensor]], dataset: CocoDetection
) -> list[dict]:
    """COCO result dicts of torchvision detection outputs.

    ``image_ids[i]``: the image id of ``predictions[i]``, or its target (a dict with
    ``image_id``). ``predictions[i]``: ``boxes`` ``[n, 4]`` xyxy and ``scores``, ``labels``
    ``[n]`` at the original image size (as torchvision's models return them), optionally
    ``masks`` ``[n, 1, H, W]`` (or ``[n, H, W]``) probabilities. ``dataset`` maps labels back to
    category ids (:meth:`CocoDetection.label_to_cat_id`) and knows the image sizes.

    Returns one dict per detection: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``
    floats, ``score``, and with masks ``segmentation``: the compressed RLE of ``mask > 0.5``
    (torchvision references' threshold) with ``counts`` a str, so it can be written as JSON.
    """
    if len(image_ids) != len(predictions):
        raise ValueError(f"{len(image_ids)} image ids but {len(predictions)} predictions")
    results: list[dict] = []
    for ref, pred in zip(image_ids, predictions, strict=True):
        image_id = int(ref["image_id"] if isinstance(ref, Mapping) else ref)
        if image_id not in dataset.coco.imgs:
            raise ValueError(f"image id {image_id} is not an image of {dataset.ann_file}")
        boxes = pred["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
        if boxes.shape[0] == 0:
            continue
        scores = pred["scores"].detach().to("cpu", torch.float64).tolist()
        cats = [dataset.label_to_cat_id(label) for label in pred["labels"].detach().cpu().tolist()]
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        rles = None
        if "masks" in pred:
            masks = pred["masks"].detach().cpu()
            if masks.dim() == 4:
                masks = masks[:, 0]
            h, w = dataset._size(image_id)
            if masks.shape[-2:] != (h, w):
                raise ValueError(
                    f"masks of image {image_id} are {tuple(masks.shape[-2:])} but "
                    f"the image is ({h}, {w}): masks must be at the original size"
                )
            binary = (masks.to(torch.float32) > 0.5).numpy().astype(np.uint8)
            # pycocotools encodes [H, W, n] Fortran-ordered arrays
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for k in range(len(xywh)):
            r = {"image_id": image_id, "category_id": cats[k], "bbox": xywh[k], "score": scores[k]}
            if rles is not None:
                counts = rles[k]["counts"]
                r["segmentation"] = {
                    "size": list(rles[k]["size"]),
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                }
            results.append(r)
    return results


def coco_evaluate(
    coco_gt: COCO,
    results: Sequence[dict],
    iou_types: str | Iterable[str] = ("bbox",),
    image_ids: Iterable[int] | None = None,
    *,
    summaries: dict[str, str] | None = None,
) -> dict[str, float]:
    """COCO AP of ``results`` (as :func:`coco_results` makes them) against ``coco_gt``.

    For each of ``iou_types`` ("bbox", "segm") runs COCOeval over ``image_ids`` (default: every
    image of ``coco_gt``; images without any detection count, as misses) and returns
    ``{f"{t}_AP", f"{t}_AP50", f"{t}_AP75", f"{t}_APs", f"{t}_APm", f"{t}_APl"}``: COCOeval's
    ``stats[0..5]``, on its 0-1 scale (-1 where the split has no object of that size). No
    result at all gives 0.0 everywhere and a warning (pycocotools cannot load an empty list).

    pycocotools' prints are kept off stdout: its summary table is logged at INFO and, if
    ``summaries`` is a dict, stored there under the iou type; the rest is logged at DEBUG.
    """
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    for t in iou_types:
        if t not in IOU_TYPES:
            raise ValueError(f"unknown iou type {t!r}; expected one of {', '.join(IOU_TYPES)}")
    img_ids = sorted(coco_gt.getImgIds() if image_ids is None else {int(i) for i in image_ids})
    if not img_ids:
        raise ValueError("no image ids to evaluate")
    unknown = {int(r["image_id"]) for r in results} - set(coco_gt.imgs)
    if unknown:
        raise ValueError(f"{len(unknown)} result image id(s) are not images of the ground truth, e.g. {min(unknown)}")
    metrics: dict[str, float] = {}
    for t in iou_types:
        if t == "segm":
            if any("segmentation" not in r for r in results):
                raise ValueError("segm evaluation needs a 'segmentation' in every result (a model that predicts masks)")
            # Without 'bbox', loadRes takes the mask area as the detection's area, so the
            # small/medium/large split is by mask area, as for the ground truth (Detectron2
            # drops the box for the same reason).
            keys = ("image_id", "category_id", "segmentation", "score")
        else:
            keys = ("image_id", "category_id", "bbox", "score")
        # fresh dicts: loadRes writes 'id', 'area' and 'iscrowd' into the ones it gets
        dets = [{k: r[k] for k in keys} for r in results]
        if not dets:
            logger.warning("COCO %s evaluation: no detections on the %d images; every AP is 0", t, len(img_ids))
            metrics.update({f"{t}_{m}": 0.0 for m in METRIC_NAMES})
            if summaries is not None:
                summaries[t] = "no detections"
            continue
        chatter, table = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(chatter):
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, t)
            ev.params.imgIds = img_ids
            ev.evaluate()
            ev.accumulate()
        with contextlib.redirect_stdout(table):
            ev.summarize()
        logger.debug("pycocotools (%s): %s", t, chatter.getvalue().strip())
        text = table.getvalue().rstrip()
        logger.info("COCO %s evaluation, %d images, %d detections:\n%s", t, len(img_ids), len(dets), text)
        if summaries is not None:
            summaries[t] = text
        metrics.update({f"{t}_{m}": float(ev.stats[k]) for k, m in enumerate(METRIC_NAMES)})
    return metrics


def write_results_json(results: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write COCO results as JSON atomically (temp file in the same folder + rename, so a kill
    never leaves a torn file); the parent folder is made if needed. Returns the path."""
    write_atomic(path, lambda f: json.dump(list(results), f), "w")
    return Path(path)
