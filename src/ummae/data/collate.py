"""Collating training and evaluation batches of images, counting the unreadable ones."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import default_collate


def readable_items(batch: list) -> tuple[list, int]:
    """The training items of ``batch`` that are not ``None`` (an unreadable image), and the
    unreadable images of the batch: the ``None`` items plus each item's own ``n_skipped``
    (its third field: 1 where a substitute took an unreadable image's place). What every
    training collate counts into ``skipped_images``."""
    good = [item for item in batch if item is not None]
    return good, len(batch) - len(good) + sum(int(item[2]) for item in good if len(item) > 2)


def collate_skip_bad(batch: list) -> tuple[Tensor, Tensor, int]:
    """Collate a batch of items, counting the unreadable images.

    Items are ``(image [3, S, S], label)`` or ``None`` (an unreadable image, from
    ``ImageDataset[key]``: evaluation), or ``(image, label, n_skipped)`` (from
    :class:`~ummae.data.dataset.SubstituteUnreadable`: training, where an unreadable image
    was replaced by a readable one and ``n_skipped`` is 1). ``None`` items are dropped.

    Returns ``(images [B, 3, S, S] float, labels [B] long, n_skipped)``: ``B`` the number of
    items that are not ``None`` (so a training batch always has its full size) and
    ``n_skipped`` the unreadable images of the batch (dropped or replaced). If every item is
    ``None`` the size is unknown, so ``images`` is ``torch.empty(0)`` (``images.shape[0] == 0``
    still holds) and ``labels`` is ``[0]``.
    """
    good, n_skipped = readable_items(batch)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), n_skipped
    # default_collate stacks straight into shared memory inside workers (one copy fewer)
    images, labels = default_collate([(item[0], item[1]) for item in good])
    return images, labels.long(), n_skipped
