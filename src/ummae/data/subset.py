"""Few labels: a class-balanced fraction of a labelled training split, drawn once per seed
(``--label-fraction F --label-seed S`` of ``finetune``, ``linprobe`` and ``knn``; the held-out
split of ``experiments/minitable.py``).

The draw takes ``n = round(F x N)`` of the ``N`` images, spread over the ``C`` classes as evenly
as they go: every class gives ``n // C`` images and ``n mod C`` of the classes one more. Which
classes give the extra one, and which images each class gives, follow a hash of the seed and
the class name / the image's path relative to the split: the subset is a pure function of the
seed and the split's files (not of the listing order, the machine, or a library's random
stream), so the same seed on the same folder draws the same subset wherever it runs, and
a resumed run can check that it trains on the images it started with.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from ummae.errors import UsageError

SUBSET_FILE = "label_subset.txt"  # the drawn images, in a run's output folder (a list file)


def _rank(seed: int, text: str) -> bytes:
    """The draw's order key of ``text`` (a class name or a relative path) under ``seed``."""
    return hashlib.sha256(f"{seed}\0{text}".encode()).digest()


def relative_paths(samples: Sequence[tuple[str, int]]) -> list[str]:
    """Each sample's path relative to the folder all of them lie under, with '/' separators: the
    names the draw hashes and the list file records (the same wherever the data set is)."""
    paths = [os.path.abspath(p) for p, _ in samples]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])  # one file: its folder
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]


def balanced_subset(
    samples: Sequence[tuple[str, int]], class_names: Sequence[str], fraction: float, seed: int, flag: str
) -> list[int]:
    """The indices (ascending) of the class-balanced ``fraction`` of ``samples`` that ``seed``
    draws; one line naming ``flag`` when the fraction is out of (0, 1), leaves a class without
    an image, or asks a class for more images than it has."""
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"{flag} {fraction}: must be in (0, 1) (leave it out to train on every label)")
    n = round(fraction * len(samples))
    n_classes = len(class_names)
    if n < n_classes:
        raise UsageError(
            f"{flag} {fraction} of {len(samples)} images is {n} images, fewer than the {n_classes} classes: a "
            f"class would have no image; give a fraction of at least {n_classes / len(samples):.4g}"
        )
    by_class: dict[int, list[int]] = {label: [] for label in range(n_classes)}
    for i, (_, label) in enumerate(samples):
        by_class[label].append(i)
    names = relative_paths(samples)
    base, extra = divmod(n, n_classes)
    favoured = set(sorted(range(n_classes), key=lambda c: _rank(seed, f"class {class_names[c]}"))[:extra])
    chosen: list[int] = []
    for label, members in by_class.items():
        need = base + (label in favoured)
        if len(members) < need:
            raise UsageError(
                f"{flag} {fraction}: class {class_names[label]} has {len(members)} images, fewer than the {need} a "
                f"class-balanced subset of {n} images takes from each class"
            )
        chosen += sorted(members, key=lambda i: _rank(seed, names[i]))[:need]
    return sorted(chosen)


def subset_lines(samples: Sequence[tuple[str, int]], indices: Sequence[int]) -> list[str]:
    """The list-file lines (``relative/path label``) of ``samples[indices]``: what a run records
    and what ``--data FILE --data-root SPLIT`` reads back."""
    names = relative_paths(samples)
    return [f"{names[i]} {samples[i][1]}" for i in indices]
