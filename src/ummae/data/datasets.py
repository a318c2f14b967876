"""Image datasets: the embedded demo photos, ImageFolder, flat folders and list files.

This module builds the pre-training dataset; :mod:`ummae.data.classify` builds the labelled
ones (fine-tuning, probing, evaluation) on the same :class:`ImageDataset`. Every dataset
returns ``(image [3, S, S] float, label int)`` per sample, or ``None`` for an image that
cannot be read (see :func:`collate_skip_bad`: evaluation skips such images, so that each
image is counted once). Training reads through :class:`SubstituteUnreadable` instead, which
puts the next readable image in the place of an unreadable one, so a training batch always
has its full size and one bad file never stops a run.

Samples are addressed by ``(index, sample_seed)`` keys from :class:`ResumableSampler`: the
augmentation is a pure function of the key, whatever the number of workers, which is
what makes a resumed run see exactly the images it would have seen.

Folder scans follow symlinked directories (dataset trees are often assembled from links) but
read each real directory once, so a link back to a parent neither repeats images nor loops
(:func:`_scan_trees`).
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from ummae.choices import INPUT_PIPELINES
from ummae.errors import DataError

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

# Real photographs shipped inside scikit-image's wheel (the embedded default data). Synthetic
# images (chessboard, logo, text, page, phantom, color chart, binary horse) are left out, and
# so is microaneurysms.png (102x102 px: too small to crop from).
DEMO_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "moon.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)
MIN_DEMO_PHOTOS = 5

Key = int | tuple


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name with one of :data:`IMG_EXTENSIONS` (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _dir_key(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the directory ``path`` resolves to (symlinks followed), or
    ``None`` if it cannot be stat'ed (a broken link, no permission)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _scan_trees(folders: list[str], visited: set) -> list[list[str]]:
    """The image files below each of ``folders`` (recursive, hidden files and folders skipped),
    one list per folder, in a fixed order so the sample order is the same on every machine.

    Symlinked folders are followed, since dataset trees are often assembled from links, but
    every real directory is read once: ``visited`` holds the ``(st_dev, st_ino)`` of the
    directories already claimed (updated in place), and a folder whose key is in it is not
    entered again. The real (non-link) sub-folders of all ``folders`` are claimed first, and
    symlinked folders are followed only after that, in rounds (a linked tree's own links wait
    for the next round): so a link back to a parent (``sub/loop -> ..``) or into another
    part of the tree neither lists images twice nor makes the walk endless, an image inside
    the tree keeps its real path (and, for an ImageFolder, the label of the class folder it
    really lies in), and a link to a directory outside is followed once. Each folder's list
    holds the images of its real tree (``os.walk`` top-down order, names sorted), then those
    reached through links. ``folders`` themselves are always scanned."""
    found: list[list[str]] = [[] for _ in folders]
    pending = list(enumerate(folders))  # (owner, directory) trees to walk without links
    revisits = 0
    while pending:
        links = []
        for owner, top in pending:
            for root, dirs, files in os.walk(top):  # followlinks=False: links listed, not entered
                keep = []
                for d in sorted(dirs):
                    path = os.path.join(root, d)
                    if d.startswith("."):
                        continue
                    if os.path.islink(path):
                        links.append((owner, path))  # followed once the real trees are claimed
                        continue
                    key = _dir_key(path)
                    if key is None or key in visited:  # unreadable, or a bind-mounted repeat
                        continue
                    visited.add(key)
                    keep.append(d)
                dirs[:] = keep  # os.walk descends into these only, in this order
                found[owner].extend(os.path.join(root, f) for f in sorted(files)
                                    if is_image_file(f))
        pending = []
        for owner, path in links:
            key = _dir_key(path)
            if key is None:
                continue  # a broken link
            if key in visited:
                revisits += 1
                continue
            visited.add(key)
            pending.append((owner, path))
    if revisits:
        logger.info("%s: %d folder link(s) lead to directories already scanned (a link loop "
                    "or a second path); each directory is read once",
                    folders[0] if len(folders) == 1 else os.path.dirname(folders[0]), revisits)
    return found


def _scan_images(folder: str, visited: set | None = None) -> list[str]:
    """All image files below ``folder``, each real directory read once; see
    :func:`_scan_trees` (``visited``: directory keys already claimed, updated in place;
    ``folder``'s own key is added)."""
    visited = set() if visited is None else visited
    top = _dir_key(folder)
    if top is not None:
        visited.add(top)
    return _scan_trees([folder], visited)[0]


def _no_images_error(folder: str) -> ValueError:
    return ValueError(
        f"no images were found in {folder} (looked for {' '.join(IMG_EXTENSIONS)}, any case)"
    )


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
        from torchvision.transforms import v2

        tensor_transform = v2.Compose([
            v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC,
                                 antialias=True),
            v2.RandomHorizontalFlip(),
        ])
        if pipeline == "device":
            from ummae.data.device_decode import DeviceCropPlan

            return DeviceCropPlan(tensor_transform)
        return tensor_transform
    return T.Compose([
        T.RandomResizedCrop(
            img_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC
        ),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def normalize_uint8(images: Tensor) -> Tensor:
    """uint8 images ``[..., 3, H, W]`` (on any device) -> ImageNet-normalised float, as
    ``ToTensor`` + ``Normalize`` give: ``(x / 255 - mean) / std``. Float images pass unchanged."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(3, 1, 1) * 255
    return (images.float() - mean) / std


def read_image_or_encoded(source: str | bytes, as_tensor: bool, encoded: bool, name: str = ""):
    """:func:`read_image`, or with ``encoded`` a JPEG left undecoded
    (:class:`~ummae.data.device_decode.EncodedJpeg`) when it is whole; other files decoded."""
    if encoded:
        from ummae.data.device_decode import read_encoded

        jpeg = read_encoded(source, name)
        if jpeg is not None:
            return jpeg
    return read_image(source, as_tensor)


def read_image(source: str | bytes, as_tensor: bool = False):
    """The RGB image of a file path or of encoded bytes (a shard member): a PIL image, or with
    ``as_tensor`` uint8 ``[3, H, W]`` from torchvision's decoders (libjpeg-turbo, libpng,
    libwebp: the same pixels as Pillow's). A format torchvision has no decoder for (BMP,
    TIFF, ...) is read by Pillow. Raises whatever the decoders raise for a damaged file."""
    import io

    if as_tensor:
        from torchvision.io import ImageReadMode, decode_image, read_file

        data = read_file(source) if isinstance(source, str) else torch.frombuffer(bytearray(source), dtype=torch.uint8)
        try:
            return decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError:  # no decoder for the format, or damaged (then Pillow fails too)
            with Image.open(io.BytesIO(data.numpy().tobytes())) as f:
                return torch.from_numpy(np.array(f.convert("RGB"))).permute(2, 0, 1).contiguous()
    with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as f:
        return f.convert("RGB")  # also forces the full decode: truncation shows here


class WorkerSafeValueError(DataError):
    """A :class:`DataError` that reads as the same one line with and without DataLoader workers.

    A user error (so the command line prints it as one ``error:`` line and exits 2). Raised
    inside a DataLoader worker, it reaches the main process as a new instance of its own class
    built from "Caught <Name> in DataLoader worker process N. Original Traceback..."; the
    constructor keeps only the original message from that. Subclass it for data errors that
    workers raise."""

    def __init__(self, message: str = ""):
        name = type(self).__name__
        if message.startswith(f"Caught {name} ") and "\n" in message:
            last = message.rstrip().splitlines()[-1]
            _, sep, original = last.partition(f"{name}: ")
            if sep:
                message = original
        super().__init__(message)


class NoReadableImageError(WorkerSafeValueError):
    """No image of a dataset can be read: the one case a bad file stops a training run (one
    line with and without workers: see :class:`WorkerSafeValueError`)."""


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


class ImageDataset(Dataset):
    """A list of ``(path, label)`` samples (label -1 = unlabelled) plus the augmentation.

    ``dataset[(index, sample_seed)]`` -> ``(image [3, S, S] float, label int)``, or ``None``
    when the file cannot be read (a warning names the path, once per file and process): the
    evaluation loaders skip such images, so each image is counted once. Training reads through
    :meth:`load_or_substitute` (:class:`SubstituteUnreadable`) instead, which never returns
    ``None``. With a key the transform is a pure function of ``sample_seed`` for all three RNGs
    augmentations draw from (torch's CPU generator, python ``random`` and numpy's global state:
    timm's RandAugment and RandomErasing use the latter two), and the caller's states of all
    three are restored. A plain int index is also accepted; the augmentation then draws from
    the global RNGs.

    Files found unreadable are remembered (per process: each DataLoader worker has its own
    copy) and not opened again. ``class_names[label]`` names a label (empty when unlabelled).
    """

    def __init__(self, samples: list[tuple[str, int]], transform, kind: str, source: str,
                 num_classes: int = 0, note: str = "",
                 class_names: list[str] | None = None, tensor_input: bool = False, encoded: bool = False):
        self.samples = samples
        self.tensor_input = tensor_input  # decode to uint8 tensors (read_image) rather than PIL
        self.encoded = encoded  # JPEGs left undecoded (device_decode.read_encoded): decoded by the step
        self.transform = transform
        self.kind = kind
        self.source = source
        self.num_classes = num_classes
        self.note = note
        self.class_names = list(class_names) if class_names is not None else []
        self._bad: dict[str, str] = {}  # path -> why it cannot be read
        self._warned: set[tuple[str, str]] = set()  # (warning, path) already logged

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self) -> str:
        """One line for the log: kind, source, number of images, number of classes."""
        classes = f"{self.num_classes} classes" if self.num_classes else "unlabelled"
        note = f" ({self.note})" if self.note else ""
        return f"{self.kind} {self.source}: {len(self.samples)} images, {classes}{note}"

    def _read(self, index: int) -> Image.Image | Tensor | None:
        """The decoded RGB image of sample ``index`` (PIL, or uint8 ``[3, H, W]`` with
        ``tensor_input``), or ``None`` if it cannot be read."""
        path = self.samples[index][0]
        if path in self._bad:
            return None
        try:
            return read_image_or_encoded(path, self.tensor_input, self.encoded)
        except Exception as e:  # noqa: BLE001 (see below)
            # Pillow raises a zoo of types for damaged files (OSError, SyntaxError, EOFError,
            # struct.error, DecompressionBombError...); only open + decode run under this
            # catch, so it hides no bug of ours and one bad file never stops a long run.
            self._bad[path] = f"{type(e).__name__}: {e}"
            return None

    def _warn_once(self, path: str, message: str, *args) -> None:
        """Log ``message % args`` the first time it is about ``path`` (in this process)."""
        if (message, path) not in self._warned:
            self._warned.add((message, path))
            logger.warning(message, *args)

    def _augment(self, img: Image.Image, seed) -> Tensor:
        if seed is None:
            return self.transform(img)
        return augment_seeded(self.transform, img, seed)

    @staticmethod
    def _split_key(key: Key) -> tuple[int, int | None]:
        if isinstance(key, tuple):
            index, seed = key
            return int(index), seed
        return int(key), None

    def __getitem__(self, key: Key) -> tuple[Tensor, int] | None:
        index, seed = self._split_key(key)
        img = self._read(index)
        path, label = self.samples[index]
        if img is None:
            self._warn_once(path, "skipping unreadable image %s: %s", path, self._bad[path])
            return None
        return self._augment(img, seed), label

    def _first_readable(self, index: int) -> tuple[int, Image.Image]:
        """The first sample at or after ``index`` in dataset order (wrapping around) whose
        image can be read, and that image. Raises :class:`NoReadableImageError`, naming the
        data, when no file of the dataset can be read."""
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            img = self._read(j)
            if img is not None:
                return j, img
        path = self.samples[index][0]
        note = f" ({self.note})" if self.note else ""
        raise NoReadableImageError(
            f"no image of {self.kind} {self.source}{note} can be read: all {n} files failed "
            f"(e.g. {path}: {self._bad.get(path, 'unreadable')}); check the data"
        )

    def substitute_index(self, index: int) -> int:
        """The sample that training reads in place of sample ``index``: ``index`` itself if its
        image can be read, else the next readable sample in dataset order (wrapping around).
        A pure function of ``index`` and the files."""
        return self._first_readable(int(index))[0]

    def load_or_substitute(self, key: Key) -> tuple[Tensor, int, int]:
        """Training access: ``(image [3, S, S], label, n_skipped)``, never ``None``.

        If sample ``index``'s file cannot be read, the next readable sample in dataset order
        (wrapping around; :meth:`substitute_index`) takes its place, with its own label and
        augmented with the requested key's ``sample_seed``, and ``n_skipped`` is 1 (else 0):
        :func:`~ummae.data.sampler.collate_skip_bad` sums it into the batch's skip count
        (``skipped_images`` in the metrics). The result is a pure function of the key (and
        the files), so exact resume stays exact, and batches keep their full size, which
        keeps DDP ranks in lockstep and mixup's batches even. A warning names each bad file
        once (per process) with its substitute. Raises :class:`NoReadableImageError` (a
        ``ValueError``) only when no image of the dataset can be read.
        """
        index, seed = self._split_key(key)
        j, img = self._readable_or_substitute(index)
        return self._augment(img, seed), self.samples[j][1], int(j != index)

    def _readable_or_substitute(self, index: int) -> tuple[int, Image.Image]:
        """:meth:`_first_readable`, with a warning (once per file) when it is a substitute."""
        j, img = self._first_readable(index)
        if j != index:
            path = self.samples[index][0]
            self._warn_once(path, "unreadable image %s (%s): training uses the next readable "
                            "image, %s, in its place", path, self._bad[path], self.samples[j][0])
        return j, img


class SubstituteUnreadable(Dataset):
    """Training view of an :class:`ImageDataset`: ``view[key]`` is
    ``dataset.load_or_substitute(key)``, i.e. ``(image, label, n_skipped)`` with an
    unreadable sample replaced by the next readable one (see there). The loaders of
    :func:`~ummae.data.sampler.build_train_loader` read through it; evaluation reads the
    dataset itself and skips unreadable images instead (a substitute would be counted twice)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key) -> tuple[Tensor, int, int]:
        return self.dataset.load_or_substitute(key)


def _demo_samples(repeats: int) -> tuple[list[tuple[str, int]], str, str]:
    import skimage.data  # imported here: only the demo needs it

    folder = os.path.dirname(skimage.data.__file__)
    # Only files already in the wheel are opened: never skimage's fetch/download helpers.
    photos = [os.path.join(folder, n) for n in DEMO_PHOTOS
              if os.path.isfile(os.path.join(folder, n))]
    if len(photos) < MIN_DEMO_PHOTOS:
        raise DataError(
            f"embedded demo data: found only {len(photos)} of the {len(DEMO_PHOTOS)} sample "
            f"photos in {folder} (need at least {MIN_DEMO_PHOTOS}); reinstall scikit-image or "
            f"pass a data path"
        )
    if repeats < 1:
        raise DataError(f"demo_repeats must be >= 1, got {repeats}")
    samples = [(p, -1) for _ in range(repeats) for p in photos]
    return samples, folder, f"{len(photos)} scikit-image photos x {repeats} repeats"


def _folder_samples(folder: str) -> tuple[list[tuple[str, int]], str, list[str]]:
    """ImageFolder layout if the top level holds only class sub-folders; otherwise (any image
    directly in ``folder``) a flat unlabelled folder, searched recursively with label -1:
    top-level images mean the sub-folders are not a class split.

    Returns ``(samples, kind, class_names)``: kind ``"ImageFolder"`` with the sorted class
    folder names (label = index in them), or ``"flat folder"`` with ``[]``."""
    entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    top_images = [e for e in entries if is_image_file(e)
                  and os.path.isfile(os.path.join(folder, e))]
    if top_images:
        paths = _scan_images(folder)
        return [(p, -1) for p in paths], "flat folder", []

    classes = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
    # One scan of all classes, with the top folder and every class folder claimed from the
    # start and every real sub-folder claimed before any link is followed: a link inside one
    # class to the top, to another class or into it is not followed, so each image is listed
    # once, under the class folder it really lies in.
    class_dirs = [os.path.join(folder, name) for name in classes]
    visited = {k for k in map(_dir_key, [folder] + class_dirs) if k is not None}
    per_class = _scan_trees(class_dirs, visited)
    samples, direct = [], False
    for label, (class_dir, paths) in enumerate(zip(class_dirs, per_class)):
        # labels = index in the sorted names, as ImageNet
        if not paths:
            logger.warning("class folder %s holds no images (its label %d stays unused)",
                           class_dir, label)
        direct = direct or any(os.path.dirname(p) == class_dir for p in paths)
        samples.extend((p, label) for p in paths)
    if not samples:
        raise _no_images_error(folder)
    if not direct:
        # e.g. the dataset root with train/ and val/ was passed instead of train/
        logger.warning("no class folder of %s holds images directly; its sub-folders (%s) are "
                       "used as classes - is this the parent of the split folders?",
                       folder, ", ".join(classes[:5]))
    return samples, "ImageFolder", classes


def _list_file_samples(list_file: str, data_root: str | None,
                       require_labels: bool = False) -> tuple[list, str, int]:
    """``relative/path [label]`` per line (the reference's IN1K/train.txt); blank lines and
    lines starting with ``#`` are skipped. Paths may not contain spaces. Files are not checked
    here (ImageNet lists have 1.28M lines): a missing one reads as a bad image later.

    ``require_labels`` (labelled data: fine-tuning, evaluation) refuses a line without a
    label or with a negative one, naming it, since label -1 would otherwise be trained on.
    Returns ``(samples, root, number of distinct labels)``."""
    root = data_root if data_root is not None else os.path.dirname(os.path.abspath(list_file))
    if not os.path.isdir(root):
        raise DataError(f"data root not found: {root} (for list file {list_file})")
    if os.path.splitext(list_file)[1].lower() in IMG_EXTENSIONS:
        raise DataError(f"--data {list_file} is an image file; give the folder that holds the images, or a list file")
    samples = []
    with open(list_file, encoding="utf-8") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError:
            raise DataError(f"--data {list_file} is not a text list file (it is not UTF-8 text); give an image "
                             f"folder or a list file of 'relative/path label' lines") from None
        for lineno, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 2:
                raise DataError(
                    f"{list_file}, line {lineno}: expected 'path [label]', got {len(fields)} "
                    f"fields (paths may not contain spaces)"
                )
            label = -1
            if len(fields) == 2:
                try:
                    label = int(fields[1])
                except ValueError:
                    raise DataError(
                        f"{list_file}, line {lineno}: label {fields[1]!r} is not an integer"
                    ) from None
            if require_labels and label < 0:
                problem = "has no label" if len(fields) == 1 else f"has negative label {label}"
                raise DataError(
                    f"{list_file}, line {lineno}: {fields[0]} {problem}; labelled data needs "
                    f"'path label' with an integer label >= 0 on every line"
                )
            samples.append((os.path.join(root, fields[0]), label))
    if not samples:
        raise DataError(f"list file {list_file} lists no images")
    return samples, root, len({lab for _, lab in samples if lab >= 0})


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

    from ummae.data.shards import ShardStream, is_shard_spec

    if is_shard_spec(data):
        ds = ShardStream(data, transform, samples_per_epoch=samples_per_epoch, tensor_input=tensor_input,
                         encoded=encoded)
        logger.info("pre-training data: %s", ds.describe())
        return ds
    if samples_per_epoch is not None:
        raise DataError("--samples-per-epoch is for tar shards; an epoch of a folder or list file is all its images")
    if data is None:
        samples, folder, note = _demo_samples(demo_repeats)
        ds = ImageDataset(samples, transform, "embedded demo", folder, note=note, tensor_input=tensor_input,
                          encoded=encoded)
    else:
        path = os.path.expanduser(str(data))
        if not os.path.exists(path):
            raise DataError(f"data path not found: {data}")
        if os.path.isdir(path) and os.path.isdir(os.path.join(path, "train")):
            # MAE's convention: --data names the dataset root; pre-training reads its train
            # split (never val/, which would leak evaluation images into pre-training).
            logger.info("%s has a train/ folder: pre-training on %s", path, os.path.join(path, "train"))
            path = os.path.join(path, "train")
        if os.path.isdir(path):
            samples, kind, classes = _folder_samples(path)
            ds = ImageDataset(samples, transform, kind, path, len(classes), class_names=classes,
                              tensor_input=tensor_input, encoded=encoded)
        else:
            samples, root, n_classes = _list_file_samples(path, data_root)
            ds = ImageDataset(samples, transform, "list file", path, n_classes,
                              note=f"root {root}", tensor_input=tensor_input, encoded=encoded)
    logger.info("pre-training data: %s", ds.describe())
    return ds
