"""``--resume``: a resumed run keeps the settings it was started with, read from its
checkpoint (whose ``config`` is :func:`ummae.engine.run.config_record`)."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path

from ummae.errors import UsageError

# What a resumed run may change: where and how it runs, how long, how often it logs and saves.
# Everything else defines the run (model, data order, optimisation) and comes from the checkpoint.
MAY_CHANGE_ON_RESUME = frozenset({
    "epochs", "num_workers", "device", "precision", "compile", "compile_backend", "output", "resume", "overwrite",
    "log_every", "save_every", "keep_every", "save_every_steps", "max_steps_per_epoch", "vis_every", "vis_images",
    "eval_every", "data", "data_root", "val_data", "init", "pretrained", "iters", "eval_every_iters",
})  # fmt: skip


def given_fields(cfg) -> set:
    """Options the user set: flags and YAML keys (:func:`ummae.config.config_from_args` records
    them); for a config built in code, the fields that differ from their defaults."""
    given = getattr(cfg, "_given", None)
    if given is not None:
        return set(given)
    return {f.name for f in fields(cfg) if f.default is not dataclasses.MISSING and getattr(cfg, f.name) != f.default}


def settings_from_checkpoint(cfg, logger=None):
    """``--resume``: the run continues with the settings it was started with, read from its
    checkpoint. An option left out takes the checkpoint's value; one given that contradicts it
    is refused, unless it is one a resumed run may change (MAY_CHANGE_ON_RESUME); every
    difference is logged."""
    if not cfg.resume:
        return cfg
    path = Path(cfg.output) / "checkpoint-last.pth" if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume == "auto" and not path.exists():
        return cfg
    # imported here: the checkpoint reader loads torch, which `ummae --help` must not
    from ummae.weights import io as ckpt

    saved = ckpt.load(path, mmap=True).get("config") or {}
    taken, changed, conflicts = _compare_with_saved(cfg, saved)
    if conflicts:
        raise UsageError(
            f"--resume {path}: {'; '.join(conflicts)}: a resumed run keeps the settings it was started with; only "
            f"where, how long and how often it runs may change. Leave the option out, or start a new run "
            f"(--init {path} to start from its weights)"
        )
    if logger is not None:
        if taken:
            logger.info("resume: the run's settings from %s: %s", path, ", ".join(taken))
        if changed:
            logger.info("resume: changed for the rest of the run: %s", ", ".join(changed))
    return cfg


def _compare_with_saved(cfg, saved: dict) -> tuple[list[str], list[str], list[str]]:
    """Takes the checkpoint's value of every option the user left out; returns the options
    taken, those changed (allowed) and those that contradict the run, each as flag text."""
    given = given_fields(cfg)
    # model options whose None means "the model's default": an explicit default is the same
    # model, which the resume itself checks on the resolved options (ckpt.check_compatible)
    model_options = set(cfg.model_kwargs()) if hasattr(cfg, "model_kwargs") else set()
    taken, changed, conflicts = [], [], []
    for f in fields(cfg):
        if f.name not in saved:
            continue
        theirs = tuple(saved[f.name]) if isinstance(saved[f.name], list) else saved[f.name]
        ours = getattr(cfg, f.name)
        if ours == theirs or (f.name in model_options and f.name in given and None in (ours, theirs)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in MAY_CHANGE_ON_RESUME:
            changed.append(f"{flag} {theirs!r} -> {ours!r}")
        elif f.name in given:
            conflicts.append(f"{flag} {ours!r} (the run has {theirs!r})")
        else:
            setattr(cfg, f.name, theirs)
            taken.append(f"{flag} {theirs!r}")
    return taken, changed, conflicts
