"""Resumable, distributed sampling with per-sample augmentation seeds, and the loader."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ummae.data.collate import collate_skip_bad
from ummae.data.dataset import SubstituteUnreadable
from ummae.data.shards import ShardStream
from ummae.engine.seeds import mix_seed
from ummae.errors import DataError

logger = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Augmentation seed (63-bit, non-negative) of the sample at ``position`` of the global
    permutation of ``epoch``. Chained hashing, rather than a linear combination, so that no two
    (epoch, position) pairs of a run share a seed by arithmetic coincidence."""
    return mix_seed(seed, epoch, position)


class ResumableSampler(Sampler):
    """Yields ``(index, sample_seed)`` for this rank; use it with ``DataLoader(sampler=...)``.

    Epoch ``e`` uses one permutation from ``torch.Generator().manual_seed(seed + e)`` shared by
    all ranks, padded (by repeating it) or truncated like ``DistributedSampler`` so every rank
    gets the same count, then split as ``perm[rank::num_replicas]``. With ``drop_last`` the
    per-rank count is rounded down to a multiple of ``batch_size`` so all ranks take the same
    number of steps. ``set_start_batch(k)`` makes the next pass skip this rank's first ``k``
    batches, which resumes a run mid-epoch on exactly the samples and crops it would have seen.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank {rank} of {num_replicas}")
        global_batch = batch_size * num_replicas
        if drop_last and dataset_len < global_batch:
            raise DataError(
                f"the dataset has {dataset_len} images but one global batch needs "
                f"{global_batch} ({batch_size} per rank x {num_replicas} ranks); use a smaller "
                f"batch size or more data"
            )
        if dataset_len < 1:
            raise DataError("the dataset is empty")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        if drop_last:
            self.num_samples = dataset_len // global_batch * batch_size
        else:
            self.num_samples = math.ceil(dataset_len / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self._start_batch: int | None = None  # pending: consumed by the next __iter__
        self._active_start = 0  # start batch of the pass in progress

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._active_start = 0  # a new epoch's pass starts from its first batch by default

    def set_start_batch(self, k: int) -> None:
        """Skip this rank's first ``k`` batches in the next pass only (resume mid-epoch)."""
        if not 0 <= k <= self.num_batches():
            raise ValueError(f"start batch must be in [0, {self.num_batches()}], got {k}")
        self._start_batch = k

    def num_batches(self) -> int:
        """Batches of this rank in a full epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __len__(self) -> int:
        """Samples of the pass about to start (or in progress), after any skipped batches."""
        start = self._start_batch if self._start_batch is not None else self._active_start
        return max(self.num_samples - start * self.batch_size, 0)

    def epoch_positions(self) -> Tensor:
        """``[num_samples]`` global positions, in the padded permutation, of this rank's
        samples (the position, not the index, sets the augmentation seed)."""
        return torch.arange(self.rank, self.total_size, self.num_replicas)

    def epoch_indices(self) -> Tensor:
        """``[num_samples]`` dataset indices of this rank for the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.dataset_len, generator=g)
        else:
            perm = torch.arange(self.dataset_len)
        if self.total_size > self.dataset_len:  # pad by repeating, as DistributedSampler does
            perm = perm.repeat(math.ceil(self.total_size / self.dataset_len))
        return perm[: self.total_size][self.epoch_positions()]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self._start_batch or 0
        self._start_batch = None
        self._active_start = start
        # Resolved now, not lazily in the generator, so set_* calls made after iter() apply to
        # the next pass only.
        indices = self.epoch_indices().tolist()
        positions = self.epoch_positions().tolist()
        return self._generate(indices, positions, start * self.batch_size)

    def _generate(self, indices, positions, first) -> Iterator[tuple[int, int]]:
        seed, epoch = self.seed, self.epoch
        for j in range(first, len(indices)):
            yield indices[j], sample_seed(seed, epoch, positions[j])
        self._active_start = 0


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    num_replicas: int = 1,
    rank: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable[[list], Any] = collate_skip_bad,
) -> tuple[DataLoader, ResumableSampler]:
    """Training loader (pre-training and fine-tuning): shuffled, resumable, drop_last.

    Loader of ``(images [B, 3, S, S], labels [B], n_skipped)`` batches for this rank, and
    its sampler (call ``set_epoch`` / ``set_start_batch`` on it). No worker_init_fn is needed:
    augmentation seeds travel with the indices, so batches do not depend on ``num_workers``.

    An :class:`~ummae.data.dataset.ImageDataset` is read through
    :class:`~ummae.data.dataset.SubstituteUnreadable`: an unreadable image is replaced by the
    next readable one in dataset order (a pure function of the index, so resume stays exact)
    and counted in ``n_skipped``, so every batch has exactly ``batch_size`` images (DDP ranks
    stay in lockstep, mixup gets even batches); only a dataset of which no image can be read
    stops the run (``NoReadableImageError``, a :class:`~ummae.errors.DataError`). Other datasets are used as
    they are (``None`` items are dropped and counted).

    ``collate_fn`` builds the batches from the items (``(image, label, n_skipped)`` with an
    ImageDataset); detection passes :func:`~ummae.data.coco.collate_detection`, whose targets
    are a list of dicts.
    """
    if isinstance(dataset, ShardStream):  # its own split of the shards over ranks and workers
        dataset.configure(batch_size, num_replicas, rank, seed, num_workers)
        return dataset.loader(num_workers, pin_memory, collate_fn), dataset
    if hasattr(dataset, "load_or_substitute"):
        dataset = SubstituteUnreadable(dataset)
    sampler = ResumableSampler(len(dataset), batch_size, num_replicas, rank, seed, shuffle=True, drop_last=True)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        # Its own generator: starting an epoch's iterator must not draw from torch's global
        # RNG, which drop path uses and a resumed run restores (else masks shift by one draw).
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler
