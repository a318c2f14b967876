"""WebDataset tar shards from an image folder or a list file (``ummae shards``).

Reads what ``ummae pretrain --data`` / ``finetune --data`` accept (an ImageFolder tree, a flat
image folder, a list file of ``relative/path [label]`` lines, or a dataset root holding
``train/``, whose ``train/`` split is read) with the same listing functions, and writes
``DIR/shard-000000.tar``, ``shard-000001.tar``, ... of at most ``shard_size`` samples each,
then ``DIR/shards.json``. Format ``ummae-shards-1``:

- sample keys ``f"{i:09d}"``, ``i`` = position in the written order (a seeded permutation
  of the source order by default: an ImageFolder lists its images class by class, which a
  reader's shuffle buffer cannot mix);
- members ``KEY.EXT``: the image file's original bytes (never re-encoded) under its
  lower-cased extension (``jpeg`` -> ``jpg``), and ``KEY.cls``: the integer label as ASCII
  text, only for labelled sources (label >= 0);
- ``shards.json``: ``{"format", "num_samples", "shards": [{"name", "num_samples"}, ...],
  "classes": [names] or null, "source", "shuffled", "seed"}``, written last and atomically:
  a folder without it is not a finished set of shards.

Each shard is written under a temporary name (``.shard-000000.tar.tmp``) and renamed when it
is complete, so a killed run never leaves a torn ``.tar`` that looks whole. A source image
that is damaged is copied as it is (the reader skips it and counts it); a file that cannot
be read from disk at all is an error naming it.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import math
import os
import random
from collections.abc import Iterable

from webdataset import TarWriter

from ummae.data.sources import folder_samples, is_image_file, list_file_samples
from ummae.engine.progress import progress
from ummae.errors import DataError
from ummae.weights.io import write_atomic

logger = logging.getLogger(__name__)

FORMAT = "ummae-shards-1"
INDEX_NAME = "shards.json"
SHARD_DIGITS = 6
KEY_DIGITS = 9
MAX_SHARDS = 10**SHARD_DIGITS


def shard_name(index: int) -> str:
    """``shard-000042.tar``."""
    return f"shard-{index:0{SHARD_DIGITS}d}.tar"


def _temp_name(index: int) -> str:
    return f".{shard_name(index)}.tmp"


def shard_pattern(output: str, num_shards: int) -> str:
    """The ``--data`` value that names all ``num_shards`` shards of ``output``: webdataset's
    brace pattern ``output/shard-{000000..000009}.tar``, or the one file for one shard."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards == 1:
        return os.path.join(str(output), shard_name(0))
    last = f"{num_shards - 1:0{SHARD_DIGITS}d}"
    return os.path.join(str(output), f"shard-{{{'0' * SHARD_DIGITS}..{last}}}.tar")


def _member_ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _list_samples(src: str, data_root: str | None) -> tuple[list[tuple[str, int]], list[str] | None, str]:
    """``(samples, class names or None, the folder or file read)`` of ``src``, listed as
    ``pretrain --data`` lists it (:mod:`ummae.data.sources`)."""
    path = os.path.expanduser(str(src))
    if not os.path.exists(path):
        raise DataError(f"source not found: {src}")
    if os.path.isdir(path):
        if data_root is not None:
            raise DataError(f"--data-root applies to a list file only; {src} is a folder")
        if os.path.isdir(os.path.join(path, "train")):
            # as pretrain/finetune --data: a dataset root is read through its train/ split
            logger.info("%s has a train/ folder: writing shards of %s", path, os.path.join(path, "train"))
            path = os.path.join(path, "train")
        samples, _, classes = folder_samples(path)
        names = list(classes) or None  # an ImageFolder's class names; a flat folder: None
    else:
        samples, _, _ = list_file_samples(path, data_root)
        names = None
    for file, _ in samples:
        if not is_image_file(os.path.basename(file)):
            raise DataError(
                f"{file} is not an image file name (a non-hidden name ending in one of "
                f"jpg jpeg png bmp webp tif tiff gif, any case); fix the list {src}"
            )
    return samples, names, path


def _check_output(output: str, overwrite: bool) -> None:
    """Make ``output``; refuse one that holds shards or a shards.json unless ``overwrite``,
    which deletes them (the index first, so a half-cleaned folder never looks finished)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise DataError(f"--output {output} is a file, not a folder")
    os.makedirs(output, exist_ok=True)
    index = os.path.join(output, INDEX_NAME)
    old = sorted(
        glob.glob(os.path.join(glob.escape(output), "shard-*.tar"))
        + glob.glob(os.path.join(glob.escape(output), ".shard-*.tar.tmp"))
    )
    has_index = os.path.lexists(index)
    if not (old or has_index):
        return
    if not overwrite:
        what = " and ".join(([f"{len(old)} shard file(s)"] if old else []) + (["a shards.json"] if has_index else []))
        raise DataError(f"--output {output} already holds {what}; pass --overwrite to replace them")
    if has_index:
        os.remove(index)
    for path in old:
        os.remove(path)
    logger.info(
        "--overwrite: removed %d old shard file(s)%s from %s", len(old), " and shards.json" if has_index else "", output
    )


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _write_shard(output: str, index: int, items: Iterable[tuple[int, str, int]]) -> int:
    """Shard ``index`` of ``items`` (``(key number, path, label)``), written under its temporary
    name and renamed when complete. Returns the number of samples written."""
    count = 0
    tmp = os.path.join(output, _temp_name(index))
    try:
        with open(tmp, "wb") as f:
            # encoder=False: the members are the bytes given (no re-encoding); a fixed mtime
            # makes the same source and seed give byte-identical shards.
            with TarWriter(f, encoder=False, mtime=0) as sink:
                for i, path, label in items:
                    sample = {"__key__": f"{i:0{KEY_DIGITS}d}", _member_ext(path): _read_bytes(path)}
                    if label >= 0:
                        sample["cls"] = str(int(label)).encode("ascii")
                    sink.write(sample)
                    count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(output, shard_name(index)))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


def write_shards(
    src: str,
    output: str,
    shard_size: int = 1000,
    *,
    data_root: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write the images of ``src`` (an ImageFolder, flat folder, list file or dataset root with
    ``train/``: what ``pretrain --data`` reads) as WebDataset shards of at most ``shard_size``
    samples into ``output``; see the module docstring for the format. ``shuffle``: write them
    in a permutation seeded by ``seed`` (else in source order). ``overwrite``: replace the
    shards and shards.json already in ``output`` (refused otherwise). ``data_root``: the root
    of a list file's paths (default: the list file's folder).

    Returns the content of ``shards.json``. Raises :class:`~ummae.errors.DataError` (one line) for bad input and
    for a source file that cannot be read; the shards of a failed run are removed."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"--shard-size must be an integer >= 1, got {shard_size}")
    samples, classes, source = _list_samples(src, data_root)
    num_shards = math.ceil(len(samples) / shard_size)
    if num_shards > MAX_SHARDS:
        raise DataError(
            f"{len(samples)} images in shards of {shard_size} make {num_shards} shards, "
            f"more than {SHARD_DIGITS}-digit names allow; pass a larger --shard-size"
        )
    output = str(output)
    _check_output(output, overwrite)

    order = list(range(len(samples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    items = [(i, *samples[j]) for i, j in enumerate(order)]

    shards, written = [], []
    images = progress(items, desc="shards", unit="img")  # counts each image as it is written
    try:
        for k in range(num_shards):
            count = _write_shard(output, k, itertools.islice(images, shard_size))
            written.append(os.path.join(output, shard_name(k)))
            shards.append({"name": shard_name(k), "num_samples": count})
        next(images, None)  # past the last image: the progress report ends with its summary line
        info = {
            "format": FORMAT,
            "num_samples": len(items),
            "shards": shards,
            "classes": classes,
            "source": source,
            "shuffled": bool(shuffle),
            "seed": int(seed),
        }
        write_atomic(os.path.join(output, INDEX_NAME), lambda f: f.write(json.dumps(info, indent=1) + "\n"), mode="w")
    except BaseException:
        # no shards.json was written: the completed shards of this run are not a usable set
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        raise
    return info
