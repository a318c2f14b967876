"""Training from WebDataset tar shards: ``--data "/data/in1k/shard-{000000..001023}.tar"``
(local paths, ``pipe:`` commands, or a folder written by ``ummae shards``).

Reading is webdataset's (``tarfile_samples``: tar iteration, grouping of a sample's members,
``pipe:`` / URL opening; ``_shuffle``: the shuffle buffer); this module decides which shards
each process reads in which order, so that an epoch is defined, DDP ranks stay in lockstep and a
run resumes exactly.

**An epoch** is ``samples_per_epoch`` samples (``--samples-per-epoch``; by default the
``num_samples`` of the shards' ``shards.json``), i.e. ``samples_per_epoch // (ranks x batch)``
batches per rank. At epoch ``e`` the shard list is permuted by ``(seed, e)`` (the same on every
rank) and rank ``r`` takes shards ``r, r + R, ...`` of it: the rank's *sequence* of samples is
those shards in that order, read again if an epoch needs more samples than they hold (each
later pass in an order of its own, seeded by ``(seed, e, r, pass)``). Each DataLoader worker
``w`` makes the batches ``t`` of its rank with ``t % W == w`` (the order in which the
DataLoader collects them), ``len(range(w, num_batches, W))`` of them, from its own contiguous
range of the sequence, as long as those batches: the ranges of the workers tile the first
``num_batches x batch`` samples, cut by the shards' sample counts (``shards.json``; without one,
shards of equal size are assumed), so a shard may be shared by two workers, each reading its
part. A worker reads its range through a shuffle buffer (``shuffle_buffer`` samples, seeded by
``(seed, e, r, w)``, flushed at the end of the range). So, where the counts are right, a
rank sees the first ``num_batches x batch`` samples of its sequence, none twice as long as its
shards hold that many; when every rank's shards hold ``samples_per_epoch / R`` samples (equal
shards, a multiple of ``R`` of them), ``samples_per_epoch`` is their total (the default) and a
multiple of ``R x batch``, every sample is seen exactly once per epoch, whatever the number of
workers.

**Resume** is exact, at the granularity of a batch: batch ``t`` of epoch ``e`` of rank ``r``
is a pure function of (the shard list, ``seed``, ``e``, ``r``, ``t``, ``R``, ``W``, the batch
size): a resumed run that started mid-epoch reads (without decoding) and drops the samples of
the batches already trained, and its workers take the roles that make the DataLoader deliver
batch ``t`` next. So it trains on the same crops as the uninterrupted run, provided the shards,
the number of ranks, of workers per rank (``--num-workers``, capped at the CPU count) and the
batch size are the same.

**Bad data.** A sample whose image cannot be decoded is replaced by the next decodable sample
of the stream and counted (``skipped_images``), as an unreadable file of a folder is; a tar that
ends early (truncated, unreadable) gives its samples up to the damage and a warning naming it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import tarfile_samples

from ummae.data.collate import collate_skip_bad
from ummae.data.dataset import NoReadableImageError
from ummae.data.decode import read_image, read_image_or_encoded
from ummae.data.sources import IMG_EXTENSIONS
from ummae.data.transforms import augment_seeded
from ummae.engine.seeds import mix_seed
from ummae.errors import DataError

logger = logging.getLogger(__name__)

INDEX_NAME = "shards.json"  # written by ummae shards (data/shard_writer.py)
IMAGE_MEMBERS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS) + ("jpg", "jpeg")


def is_shard_spec(data: str | None) -> bool:
    """Whether ``--data`` names tar shards: a ``pipe:`` command, a URL or path ending in
    ``.tar`` (with or without a brace pattern), or a folder holding ``shards.json``."""
    if not data:
        return False
    data = str(data)
    return (
        data.startswith("pipe:")
        or data.rstrip("/").endswith(".tar")
        or "://" in data
        or os.path.isfile(os.path.join(os.path.expanduser(data), INDEX_NAME))
    )


def _read_index(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read as the shards' index ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise DataError(f"{path} is not an index written by `ummae shards` (no 'shards' list)")
    return index


def expand_shards(spec: str) -> tuple[list[str], dict | None]:
    """The shard URLs of ``spec`` (webdataset's brace expansion; a folder: the shards its
    ``shards.json`` lists) and that index when there is one beside local shards. A local shard
    that does not exist is an error naming it."""
    spec = str(spec)
    folder = os.path.expanduser(spec)
    if os.path.isdir(folder):
        index = _read_index(os.path.join(folder, INDEX_NAME))
        if index is None:
            raise DataError(
                f"--data {spec}: a folder of shards needs the {INDEX_NAME} `ummae shards` writes; "
                f'or give the shards as a pattern, e.g. "{folder}/shard-{{000000..000099}}.tar"'
            )
        urls = [os.path.join(folder, s["name"]) for s in index["shards"]]
    else:
        urls = [os.path.expanduser(u) for u in braceexpand(spec)]
        index = None
        local = [u for u in urls if not u.startswith("pipe:") and "://" not in u]
        if local:
            missing = [u for u in local if not os.path.isfile(u)]
            if missing:
                raise DataError(
                    f"{len(missing)} of the {len(urls)} shards of --data {spec} do not exist, e.g. {missing[0]}"
                )
            parents = {os.path.dirname(os.path.abspath(u)) for u in local}
            if len(parents) == 1 and len(local) == len(urls):
                index = _read_index(os.path.join(parents.pop(), INDEX_NAME))
    if not urls:
        raise DataError(f"--data {spec} names no shards")
    return urls, index


def _image_member(sample: dict) -> bytes | None:
    for ext in IMAGE_MEMBERS:
        if ext in sample:
            return sample[ext]
    return None


def _label(sample: dict) -> int:
    raw = sample.get("cls")
    if raw is None:
        return -1
    try:
        return int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    except ValueError:
        return -1


class _WarnShard:
    """webdataset's error handler for tar reading: warn, naming the shard, and go on."""

    def __call__(self, exn: Exception) -> bool:
        where = next(
            (a for a in reversed(exn.args) if isinstance(a, str) and (".tar" in a or a.startswith("pipe:"))), "a shard"
        )
        logger.warning("skipping the rest of %s: %s: %s", where, type(exn).__name__, exn.args[0] if exn.args else exn)
        return True


class ShardStream(IterableDataset):
    """Samples of WebDataset shards for one training process (see the module docstring).

    Yields ``(image, label, n_skipped)`` like :meth:`ImageDataset.load_or_substitute`:
    ``transform(image)`` of each sample (a PIL image, or with ``tensor_input`` a uint8 tensor,
    as :func:`read_image` decodes it), under a seed that is a pure function of the sample's
    place in the epoch. Also the resumable-sampler interface the Trainer drives
    (``set_epoch``, ``set_start_batch``, ``num_batches``), after :meth:`configure`."""

    def __init__(
        self,
        spec: str,
        transform: Callable | None = None,
        *,
        samples_per_epoch: int | None = None,
        tensor_input: bool = True,
        shuffle_buffer: int = 1000,
        encoded: bool = False,
    ):
        self.source = str(spec)
        self.urls, index = expand_shards(spec)
        if samples_per_epoch is None:
            if index is None or "num_samples" not in index:
                raise DataError(
                    f"--data {spec}: give --samples-per-epoch (the shards have no {INDEX_NAME} to count their samples)"
                )
            names = {os.path.basename(u) for u in self.urls}
            samples_per_epoch = sum(int(s["num_samples"]) for s in index["shards"] if s["name"] in names)
        if samples_per_epoch < 1:
            raise DataError(f"--samples-per-epoch must be >= 1, got {samples_per_epoch}")
        if shuffle_buffer < 0:
            raise DataError(f"shuffle buffer must be >= 0, got {shuffle_buffer}")
        self.samples_per_epoch = int(samples_per_epoch)
        # samples per shard (the index's counts), which cut the workers' ranges; without an
        # index, equal shards are assumed
        counts = {s["name"]: int(s["num_samples"]) for s in index["shards"] if "num_samples" in s} if index else {}
        names = [os.path.basename(u) for u in self.urls]
        if all(n in counts for n in names) and sum(counts[n] for n in names) > 0:
            self.shard_sizes = [counts[n] for n in names]
        else:
            self.shard_sizes = [max(1, self.samples_per_epoch // len(self.urls))] * len(self.urls)
        classes = index.get("classes") if index else None
        self.class_names = list(classes) if classes else []
        self.num_classes = len(self.class_names)
        self.transform = transform
        self.tensor_input = tensor_input
        self.encoded = encoded  # --input-pipeline device: JPEGs decoded by the training step
        self.shuffle_buffer = shuffle_buffer
        self.kind = "shards"
        self.batch_size, self.num_replicas, self.rank, self.seed, self.num_workers = 1, 1, 0, 0, 0
        self.epoch, self._start_batch = 0, 0

    # --- what the Trainer and the logs see -----------------------------------------------
    def __len__(self) -> int:
        return self.samples_per_epoch

    def describe(self) -> str:
        classes = f"{self.num_classes} classes" if self.num_classes else "labels as the shards hold them"
        return f"shards {self.source}: {len(self.urls)} shards, {self.samples_per_epoch} samples per epoch, {classes}"

    def configure(self, batch_size: int, num_replicas: int, rank: int, seed: int, num_workers: int) -> None:
        if len(self.urls) < num_replicas * max(1, num_workers):
            raise DataError(
                f"{len(self.urls)} shards cannot feed {num_replicas} process(es) x {max(1, num_workers)} data-loading "
                f"worker(s) (at least one shard each): write more, smaller shards (ummae shards --shard-size) or use "
                f"fewer --num-workers"
            )
        if self.num_batches_for(batch_size, num_replicas) < 1:
            raise DataError(
                f"--samples-per-epoch {self.samples_per_epoch} is less than one global batch "
                f"({batch_size} x {num_replicas} processes)"
            )
        self.batch_size, self.num_replicas, self.rank, self.seed = batch_size, num_replicas, rank, seed
        self.num_workers = num_workers

    def order_key(self) -> dict:
        """What the order of the batches depends on besides the seed (kept in checkpoints: a
        resumed run with other values is warned that it does not continue exactly)."""
        return {
            "shards": len(self.urls),
            "processes": self.num_replicas,
            "workers": max(1, self.num_workers),
            "batch_size": self.batch_size,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def num_batches_for(self, batch_size: int, num_replicas: int) -> int:
        return self.samples_per_epoch // (batch_size * num_replicas)

    def num_batches(self) -> int:
        """Batches of this rank per epoch."""
        return self.num_batches_for(self.batch_size, self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._start_batch = 0

    def set_start_batch(self, k: int) -> None:
        if not 0 <= k <= self.num_batches():
            raise ValueError(f"start batch must be in [0, {self.num_batches()}], got {k}")
        self._start_batch = k

    # --- the stream ----------------------------------------------------------------------
    def _role(self) -> tuple[int, int]:
        """(this worker's role, number of workers). Roles are rotated by the start batch, so
        that the DataLoader, which collects from worker 0 first, delivers batch ``start``
        first (its owner is role ``start % W``)."""
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return (wid + self._start_batch) % workers, workers

    def rank_shards(self, pass_: int = 0) -> list[tuple[str, int]]:
        """(url, samples) of the shards of this rank in pass ``pass_`` over them in this epoch:
        shards ``r, r + R, ...`` of the epoch's permutation (the same on every rank); a later
        pass in an order of its own, the same for all the rank's workers."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(len(self.urls), generator=g).tolist()
        mine = perm[self.rank :: self.num_replicas]
        if pass_:
            random.Random(mix_seed(self.seed, self.epoch, self.rank, pass_)).shuffle(mine)
        return [(self.urls[i], self.shard_sizes[i]) for i in mine]

    def worker_range(self, role: int, workers: int) -> tuple[int, int]:
        """[start, stop) of the rank's sequence that worker ``role`` reads: the samples of its
        batches ``t % W == role``, after those of the workers before it."""
        nb, b = self.num_batches(), self.batch_size
        start = b * sum(len(range(v, nb, workers)) for v in range(role))
        return start, start + b * len(range(role, nb, workers))

    def _rank_samples(self, start: int) -> Iterator[dict]:
        """The rank's sequence from position ``start`` on, pass after pass over its shards.
        Positions follow the recorded counts (a shard with more samples gives only that many),
        so the workers' ranges meet exactly; a shard with fewer (truncated) shortens the stream."""
        pos = 0
        for pass_ in range(1 << 30):
            shards, read, found = self.rank_shards(pass_), False, 0
            for url, n in shards:
                if pos + n > start:
                    read, skip = True, max(start - pos, 0)
                    for k, sample in enumerate(tarfile_samples([{"url": url}], handler=_WarnShard())):
                        if k >= n:
                            break
                        found += 1
                        if k >= skip:
                            yield sample
                pos += n
            if read and not found:
                names = [u for u, _ in shards]
                raise NoReadableImageError(
                    f"the shards {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} "
                    f"hold no sample that can be read"
                )

    def _worker_samples(self, role: int, workers: int) -> Iterator[dict]:
        """Worker ``role``'s range of the rank's sequence through its shuffle buffer (flushed
        at the end of the range), then, only if shards held fewer samples than recorded or
        some were undecodable, the sequence after it."""
        start, stop = self.worker_range(role, workers)
        raw = self._rank_samples(start)
        own: Iterator[dict] = itertools.islice(raw, stop - start)
        if self.shuffle_buffer > 1:
            rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, role, 0))
            own = _shuffle(own, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        yield from own
        yield from raw

    def _decode(self, sample: dict) -> Any | None:
        data = _image_member(sample)
        if data is None:
            return None
        try:
            return read_image_or_encoded(data, self.tensor_input, self.encoded, str(sample.get("__key__", "")))
        except Exception:  # the decoders' zoo of errors, as ImageDataset._read
            return None

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        role, workers = self._role()
        start, nb, b = self._start_batch, self.num_batches(), self.batch_size
        mine = len(range(role, nb, workers)) * b  # samples this worker makes this epoch
        done = len(range(role, start, workers)) * b  # ... of which a resumed run already trained
        raw = self._worker_samples(role, workers)
        ahead: deque = deque()  # samples read ahead to replace an undecodable one
        for pos in range(mine):
            sample = ahead.popleft() if ahead else next(raw)
            if pos < done:
                continue  # trained before the run was resumed: read, not decoded
            image, skipped = self._decode(sample), 0
            if image is None:  # the next decodable sample of the stream takes its place
                skipped = 1
                logger.warning(
                    "undecodable sample %s in %s: the next one is used in its place",
                    sample.get("__key__"),
                    sample.get("__url__"),
                )
                for _ in range(1 << 20):
                    nxt = next(raw)
                    ahead.append(nxt)
                    image = self._decode(nxt)
                    if image is not None:
                        sample = nxt
                        break
                else:
                    raise NoReadableImageError(f"no decodable image in the shards of {self.source}")
            seed = mix_seed(self.seed, self.epoch, self.rank, role, pos)
            out = augment_seeded(self.transform, image, seed) if self.transform is not None else image
            yield out, _label(sample), skipped

    def preview(self, n: int) -> list:
        """The first ``n`` decodable images (PIL) of the first shard, in its order: what the
        pre-training pictures show."""
        out = []
        for sample in tarfile_samples([{"url": self.urls[0]}], handler=_WarnShard()):
            data = _image_member(sample)
            if data is None:
                continue
            try:
                out.append(read_image(data, False))
            except Exception:  # skipped, as in training
                continue
            if len(out) >= n:
                break
        return out

    def loader(
        self, num_workers: int, pin_memory: bool = False, collate_fn: Callable[[list], Any] = collate_skip_bad
    ) -> DataLoader:
        """The DataLoader of this rank (after :meth:`configure`). Workers are started anew each
        epoch (not persistent): they take the epoch and start batch set since."""
        return DataLoader(
            self,
            batch_size=self.batch_size,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=True,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.seed),
        )
