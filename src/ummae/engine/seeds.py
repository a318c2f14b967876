"""Deterministic seeds. Data order, augmentation and masks are pure functions of
(seed, epoch, step/position, rank), which is what makes a resumed run exact."""

from __future__ import annotations

import random

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a bijective scramble of a 64-bit int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*xs: int) -> int:
    """A 63-bit non-negative seed from integers, by chained hashing (not a linear combination,
    so that no two tuples share a seed by arithmetic coincidence)."""
    h = _mix64(xs[0] & _MASK64)
    for x in xs[1:]:
        h = _mix64(h ^ (x & _MASK64))
    return h >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
