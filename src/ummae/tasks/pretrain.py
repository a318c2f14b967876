"""Assembling runs: config -> model, data, optimiser -> the one :class:`Trainer`."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn

from ummae.config import PretrainConfig, settings_from_checkpoint
from ummae.data import build_pretrain_dataset, build_train_loader
from ummae.data.datasets import _scan_images, normalize_uint8
from ummae.data.device_decode import EncodedBatch, collate_encoded
from ummae.engine.trainer import Trainer, training_run
from ummae.engine.optim import build_optimizer, pretrain_no_weight_decay
from ummae.models.registry import create_model, model_kind
from ummae.visualize import compose_grid, display_transform, load_image, panels_from_output, reconstruct
from ummae.errors import UsageError

log = logging.getLogger("ummae")


def pretrain_step(model, batch, generator):
    """Pre-training ignores labels; masks are drawn from the step's generator. uint8 images
    (the default input pipeline) are normalised here, on the device; JPEGs of the ``device``
    pipeline are decoded and cropped here first."""
    images = batch[0]
    if isinstance(images, EncodedBatch):
        images = images.decode(generator.device)
    return model(normalize_uint8(images), generator=generator)


class ReconstructionPictures:
    """The pre-training ``evaluate`` callback, run every ``vis_every`` epochs and after the
    last: a reconstruction picture (``ummae visualize``'s layout) of fixed images under fixed
    masks (drawn from ``cfg.seed``, the same every time, so the pictures of successive epochs
    compare), written to ``output/recon-epochEEEE.png`` (E = epochs done) and to TensorBoard
    (``recon``). Returns ``{"vis_loss": the model's loss on those images and masks}``.

    Rank 0 only; on the other ranks it returns ``{}``. The images are picked and loaded once,
    up front (see :func:`_vis_image_paths`); unreadable ones are skipped with a warning."""

    def __init__(self, cfg: PretrainConfig, dataset, img_size: int, device: torch.device, is_main: bool):
        self.trainer: Trainer | None = None  # set once the Trainer exists
        self.out, self.device, self.seed = Path(cfg.output), device, cfg.seed
        self.images = None
        if is_main:
            paths, source = _vis_image_paths(cfg, dataset)
            loaded = []
            if paths is None:  # tar shards: the first images of the first shard
                loaded = [display_transform(img_size)(im) for im in dataset.preview(cfg.vis_images)]
            for path in _spread(paths or [], cfg.vis_images):
                try:
                    loaded.append(load_image(path, img_size))
                except ValueError as e:
                    log.warning("reconstruction pictures: %s; skipped", e)
            if loaded:
                self.images = torch.stack(loaded)
                log.info("reconstruction pictures of %d images of %s every %d epochs", len(loaded), source, cfg.vis_every)
            else:
                log.warning("reconstruction pictures: no readable image in %s; none will be drawn", source)

    def __call__(self, model: nn.Module) -> Dict[str, float]:
        if self.images is None:
            return {}
        model.eval()  # the Trainer sets train mode again at the next epoch's start
        imgs = self.images.to(self.device)
        out = reconstruct(model, imgs, torch.Generator(device=self.device).manual_seed(self.seed))
        titles, panels = panels_from_output(model, imgs, out)
        picture = compose_grid(panels, titles)
        path = self.out / f"recon-epoch{self.trainer.epoch + 1:04d}.png"
        picture.save(path)
        if self.trainer.metrics.tb is not None:
            self.trainer.metrics.tb.add_image("recon", np.asarray(picture), self.trainer.update, dataformats="HWC")
        log.info("wrote %s", path)
        return {"vis_loss": float(out["loss"])}


def _vis_image_paths(cfg: PretrainConfig, dataset) -> Tuple[List[str] | None, str]:
    """Where the pictures' images come from: the ``val/`` split of a dataset root that has one
    (images pre-training never trains on), else the training images themselves (for the
    embedded demo: its photos, each once; for tar shards, None: ``dataset.preview``)."""
    if cfg.data:
        val = os.path.join(os.path.expanduser(cfg.data), "val")
        if os.path.isdir(val):
            return _scan_images(val), val
    if not hasattr(dataset, "samples"):
        return None, f"the first shard of {dataset.source}"
    return list(dict.fromkeys(path for path, _ in dataset.samples)), dataset.source


def _spread(paths: List[str], n: int) -> List[str]:
    """``n`` paths evenly spaced through the (sorted) list, first and last included: an
    ImageFolder split shows several classes rather than ``n`` images of its first one."""
    if len(paths) <= n:
        return list(paths)
    if n == 1:
        return [paths[0]]
    return [paths[round(i * (len(paths) - 1) / (n - 1))] for i in range(n)]


def init_weights_from(model: nn.Module, path: str, verbose: bool) -> None:
    """``--init``: every weight of the pre-training model from ``path`` (ours, or a reference
    checkpoint converted by :mod:`ummae.weights.convert`), nothing else: the optimiser, schedule and
    epoch start fresh. The weights must be those of this very model; options without weights
    that differ (e.g. the reference's decoder positions) are logged."""
    from ummae.weights.io import CheckpointError, load_state_strict
    from ummae.weights.load import read_weights

    state, meta = read_weights(path)
    try:
        load_state_strict(model, state, path)
    except CheckpointError as e:
        source = meta.get("source_model") or meta.get("model_name")
        raise CheckpointError(f"--init: {path} (model {source}) does not hold the weights of {model.model_name}: {e}") from None
    if verbose:
        theirs = meta.get("model_args") or {}
        differ = {k: (v, model.model_args.get(k)) for k, v in theirs.items() if k in model.model_args and model.model_args[k] != v}
        log.info("initialised %s from %s (model %s, %d tensors); fresh optimiser and schedule", model.model_name, path,
                 meta.get("source_model") or meta.get("model_name"), len(state))
        for k, (a, b) in sorted(differ.items()):
            log.info("  %s: %r in %s, %r in this run", k, a, path, b)


def pretrain(cfg: PretrainConfig) -> Dict[str, Any]:
    cfg.validate()
    if model_kind(cfg.model) != "pretrain":
        raise UsageError(f"{cfg.model!r} is not a pre-training model; `ummae models` lists them")
    settings_from_checkpoint(cfg, log)
    with training_run(cfg) as (info, device, precision):
        model = create_model(cfg.model, **cfg.model_kwargs())
        if cfg.init:
            init_weights_from(model, cfg.init, info.is_main)
        model = model.to(device)
        dataset = build_pretrain_dataset(cfg.data, model.img_size, cfg.crop_scale, cfg.data_root, cfg.demo_repeats,
                                         cfg.input_pipeline, cfg.samples_per_epoch)
        workers = min(cfg.num_workers, os.cpu_count() or 1)
        extra = {"collate_fn": collate_encoded(model.img_size)} if cfg.input_pipeline == "device" else {}
        loader, sampler = build_train_loader(
            dataset, cfg.batch_size, workers, info.world_size, info.rank, cfg.seed, pin_memory=device.type == "cuda",
            **extra)
        eff_batch = cfg.batch_size * cfg.accum_iter * info.world_size
        lr = cfg.effective_lr(info.world_size)
        optimizer = build_optimizer(model, lr, cfg.weight_decay, cfg.betas, device, no_decay=pretrain_no_weight_decay)
        if info.is_main:
            Path(cfg.output).mkdir(parents=True, exist_ok=True)
            log.info("model %s (%.1fM params)", cfg.model, sum(p.numel() for p in model.parameters()) / 1e6)
            log.info("device %s x%d, precision %s, effective batch %d, lr %.3e", device, info.world_size, precision, eff_batch, lr)
        pictures = ReconstructionPictures(cfg, dataset, model.img_size, device, info.is_main) if cfg.vis_every else None
        trainer = Trainer(cfg, model, optimizer, loader, sampler, device, precision, lr, info, pretrain_step,
                          evaluate=pictures, eval_every=cfg.vis_every)
        if pictures is not None:
            pictures.trainer = trainer  # the pictures are named by its epoch, logged at its step
        summary = trainer.fit()
        if info.is_main:
            log.info("done: checkpoints and metrics.jsonl in %s", cfg.output)
        return summary

