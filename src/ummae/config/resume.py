"""``--resume``: a resumed run keeps the settings it was started with, read from its
checkpoint (whose ``config`` is :func:`ummae.engine.run.config_record`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ummae.errors import UsageError

# What a resumed run may change: where and how it runs, how long, how often it logs and saves.
# Everything else defines the run (model, data order, optimisation) and comes from the checkpoint.
MAY_CHANGE_ON_RESUME = frozenset({
    "epochs", "num_workers", "device", "precision", "compile", "compile_backend", "output", "resume", "overwrite",
    "log_every", "save_every", "keep_every", "save_every_steps", "max_steps_per_epoch", "vis_every", "vis_images",
    "eval_every", "data", "data_root", "val_data", "init", "pretrained", "iters", "eval_every_iters",
    "test_scales", "test_flip",
})  # fmt: skip


def settings_from_checkpoint(cfg, values: dict[str, Any], given: set[str], logger=None) -> dict[str, Any]:
    """``--resume``: the run continues with the settings it was started with, read from its
    checkpoint. Returns the checkpoint's value of every option of ``values`` (the options of
    ``cfg`` so far) the user left out (not in ``given``); one given that contradicts it is
    refused, unless it is one a resumed run may change (MAY_CHANGE_ON_RESUME); every
    difference is logged."""
    if not values.get("resume"):  # not resumed, or a command that does not train
        return {}
    path = Path(values["output"]) / "checkpoint-last.pth" if values["resume"] == "auto" else Path(values["resume"])
    if values["resume"] == "auto" and not path.exists():
        return {}
    # imported here: the checkpoint reader loads torch, which `ummae --help` must not
    from ummae.weights import io as ckpt

    saved = ckpt.load(path, mmap=True).get("config") or {}
    taken, changed, conflicts = _compare_with_saved(cfg, values, given, saved)
    if conflicts:
        raise UsageError(
            f"--resume {path}: {'; '.join(conflicts)}: a resumed run keeps the settings it was started with; only "
            f"where, how long and how often it runs may change. Leave the option out, or start a new run "
            f"(--init {path} to start from its weights)"
        )
    if logger is not None:
        if taken:
            logger.info(
                "resume: the run's settings from %s: %s", path, ", ".join(_flag(k, v) for k, v in taken.items())
            )
        if changed:
            logger.info("resume: changed for the rest of the run: %s", ", ".join(changed))
    return taken


def _flag(name: str, value: Any) -> str:
    return f"--{name.replace('_', '-')} {value!r}"


def _compare_with_saved(cfg, values: dict[str, Any], given: set[str], saved: dict) -> tuple[dict, list, list]:
    """The checkpoint's value of every option the user left out; the options changed
    (allowed) and those that contradict the run, each as flag text."""
    # model options whose None means "the model's default": an explicit default is the same
    # model, which the resume itself checks on the resolved options (ckpt.check_compatible)
    model_options = set(cfg.model_kwargs()) if hasattr(cfg, "model_kwargs") else set()
    taken, changed, conflicts = {}, [], []
    for name, ours in values.items():
        if name not in saved:
            continue
        theirs = tuple(saved[name]) if isinstance(saved[name], list) else saved[name]
        if ours == theirs or (name in model_options and name in given and None in (ours, theirs)):
            continue
        if name in MAY_CHANGE_ON_RESUME:
            changed.append(f"{_flag(name, theirs)} -> {ours!r}")
        elif name in given:
            conflicts.append(f"{_flag(name, ours)} (the run has {theirs!r})")
        else:
            taken[name] = theirs
    return taken, changed, conflicts
