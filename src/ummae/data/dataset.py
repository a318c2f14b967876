"""The image dataset every task reads through, and its training view.

:class:`ImageDataset` is a list of ``(path, label)`` samples (from :mod:`ummae.data.sources`)
plus an augmentation. It returns ``(image [3, S, S] float, label int)`` per sample, or ``None``
for an image that cannot be read (see :func:`~ummae.data.collate.collate_skip_bad`: evaluation
skips such images, so that each image is counted once). Training reads through
:class:`SubstituteUnreadable` instead, which puts the next readable image in the place of an
unreadable one, so a training batch always has its full size and one bad file never stops a run.

Samples are addressed by ``(index, sample_seed)`` keys from
:class:`~ummae.data.sampler.ResumableSampler`: the augmentation is a pure function of the key,
whatever the number of workers, which is what makes a resumed run see exactly the images it
would have seen.
"""

from __future__ import annotations

import logging

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ummae.data.decode import read_image_or_encoded
from ummae.data.transforms import augment_seeded
from ummae.errors import DataError

logger = logging.getLogger(__name__)

Key = int | tuple


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

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform,
        kind: str,
        source: str,
        num_classes: int = 0,
        note: str = "",
        class_names: list[str] | None = None,
        tensor_input: bool = False,
        encoded: bool = False,
    ):
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
        except Exception as e:  # see below
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
        :func:`~ummae.data.collate.collate_skip_bad` sums it into the batch's skip count
        (``skipped_images`` in the metrics). The result is a pure function of the key (and
        the files), so exact resume stays exact, and batches keep their full size, which
        keeps DDP ranks in lockstep and mixup's batches even. A warning names each bad file
        once (per process) with its substitute. Raises :class:`NoReadableImageError` (a
        :class:`~ummae.errors.DataError`) only when no image of the dataset can be read.
        """
        index, seed = self._split_key(key)
        j, img = self._readable_or_substitute(index)
        return self._augment(img, seed), self.samples[j][1], int(j != index)

    def _readable_or_substitute(self, index: int) -> tuple[int, Image.Image]:
        """:meth:`_first_readable`, with a warning (once per file) when it is a substitute."""
        j, img = self._first_readable(index)
        if j != index:
            path = self.samples[index][0]
            self._warn_once(
                path,
                "unreadable image %s (%s): training uses the next readable image, %s, in its place",
                path,
                self._bad[path],
                self.samples[j][0],
            )
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
