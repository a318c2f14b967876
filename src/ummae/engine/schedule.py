"""The learning-rate schedule, per optimiser update: linear warm-up, then cosine (MAE's), poly
(MMSegmentation's) or step (MMDetection's). One :class:`Schedule` holds everything that decides the lr of an update;
:meth:`Schedule.from_config` reads it from a training config once."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ummae.errors import UsageError


def warmup_cosine(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    if step < warmup:
        return base_lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_poly(
    step: int, total: int, warmup: int, base_lr: float, min_lr: float, power: float = 1.0, warmup_ratio: float = 1e-6
) -> float:
    """MMSegmentation's iteration schedule (mmcv ``PolyLrUpdaterHook`` with linear warm-up, the
    segmentation recipe): ``(base - min) * (1 - step / total) ** power + min``, and during the
    ``warmup`` first steps that value times a factor rising linearly from ``warmup_ratio`` to 1
    (mmcv scales the poly value, not the base lr)."""
    lr = (base_lr - min_lr) * (1.0 - min(step, total) / max(1, total)) ** power + min_lr
    if step < warmup:
        lr *= 1.0 - (1.0 - step / warmup) * (1.0 - warmup_ratio)
    return lr


def warmup_step(
    step: int, warmup: int, base_lr: float, steps: tuple[int, ...], gamma: float = 0.1, warmup_ratio: float = 1e-3
) -> float:
    """MMDetection's step schedule (mmcv ``StepLrUpdaterHook``, ``lr_config=dict(policy='step',
    warmup='linear', ...)``): ``base * gamma ** k``, ``k`` the number of ``steps`` (updates at
    which the lr drops: the epochs of ``step=[...]`` times the updates per epoch) already reached;
    during the ``warmup`` first updates that value times a factor rising linearly from
    ``warmup_ratio`` to 1 (mmcv's ``get_warmup_lr`` scales the regular lr)."""
    lr = base_lr * gamma ** sum(step >= s for s in steps)
    if step < warmup:
        lr *= 1.0 - (1.0 - step / warmup) * (1.0 - warmup_ratio)
    return lr


KINDS = ("cosine", "poly", "step")


@dataclass(frozen=True)
class Schedule:
    """The lr of every optimiser update of a run.

    ``kind``: ``cosine`` (warm-up from 0), ``poly`` (power 1; warm-up scales the poly value
    from ``warmup_ratio`` of it) or ``step`` (x ``gamma`` at each update of ``steps``; warm-up
    from ``warmup_ratio`` of the lr, as poly's). ``warmup_by_steps`` records whether the warm-up
    was given in updates (detection and segmentation recipes) or in epochs, for the warning's
    wording."""

    kind: str
    total_updates: int
    warmup_updates: int
    base_lr: float
    min_lr: float = 0.0
    warmup_ratio: float = 1e-6
    warmup_by_steps: bool = False
    steps: tuple[int, ...] = ()  # step: the updates at which the lr is multiplied by gamma
    gamma: float = 0.1  # mmcv StepLrUpdaterHook's default

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UsageError(f"unknown lr schedule {self.kind!r}; known: {', '.join(KINDS)}")

    @classmethod
    def from_config(cls, cfg, updates_per_epoch: int, base_lr: float) -> Schedule:
        """The schedule a training config asks for: over ``cfg.iters`` updates when it has them
        (iteration-based runs), else over ``cfg.epochs`` epochs of ``updates_per_epoch``; the
        warm-up in updates (``cfg.warmup_steps``) when given, else in epochs. A step schedule's
        ``cfg.lr_steps`` are epochs (MMDetection's ``step=[...]``): the lr drops at the first
        update of each; its warm-up starts at ``cfg.warmup_ratio`` of the lr."""
        iters = getattr(cfg, "iters", None)
        total = iters if iters else cfg.epochs * updates_per_epoch
        by_steps = getattr(cfg, "warmup_steps", None) is not None
        warmup = cfg.warmup_steps if by_steps else int(round(cfg.warmup_epochs * updates_per_epoch))
        kind = getattr(cfg, "schedule", "cosine")
        extra = {}
        if kind == "step":
            epochs = getattr(cfg, "lr_steps", None) or ()
            extra = dict(steps=tuple(e * updates_per_epoch for e in epochs), warmup_ratio=cfg.warmup_ratio)
        return cls(kind, total, warmup, base_lr, cfg.min_lr, warmup_by_steps=by_steps, **extra)

    def lr(self, update: int) -> float:
        """The lr of optimiser update ``update`` (0-based)."""
        if self.kind == "step":
            return warmup_step(update, self.warmup_updates, self.base_lr, self.steps, self.gamma, self.warmup_ratio)
        if self.kind == "poly":
            return warmup_poly(
                update,
                self.total_updates,
                self.warmup_updates,
                self.base_lr,
                self.min_lr,
                warmup_ratio=self.warmup_ratio,
            )
        return warmup_cosine(update, self.total_updates, self.warmup_updates, self.base_lr, self.min_lr)

    def peak_reached(self) -> float:
        """The highest lr the run reaches, as a fraction of ``base_lr`` (below 1 only when the
        warm-up is not shorter than the run)."""
        if self.warmup_updates < self.total_updates:
            return 1.0
        unit = dataclasses.replace(self, base_lr=1.0, min_lr=0.0)
        return unit.lr(self.total_updates - 1)
