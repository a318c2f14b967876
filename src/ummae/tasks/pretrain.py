"""``ummae pretrain``: the pre-training task (model, data, loss step, reconstruction pictures)
on the one run set-up (:func:`ummae.tasks.base.run`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ummae.config import PretrainConfig
from ummae.data import build_pretrain_dataset
from ummae.data.device_decode import EncodedBatch, collate_encoded
from ummae.data.sources import scan_images
from ummae.data.transforms import normalize_uint8
from ummae.engine.optim import build_optimizer, pretrain_no_weight_decay
from ummae.engine.trainer import Trainer
from ummae.errors import CheckpointError, UsageError
from ummae.models.registry import create_model, model_kind
from ummae.tasks.base import Parts, RunContext, Task, check_weights_file, run
from ummae.visualize import compose_grid, display_transform, load_image, panels_from_output, reconstruct
from ummae.weights.build import load_strict
from ummae.weights.load import read_weights

log = logging.getLogger("ummae")


def pretrain_step(model, batch, generator):
    """Pre-training ignores labels; masks are drawn from the step's generator. uint8 images
    (the default input pipeline) are normalised here, on the device; JPEGs of the ``device``
    pipeline are decoded and cropped here first.

    The masks are drawn here, before the model call (the same draws as the model's own
    forward makes): generator draws and data-dependent Python stay outside what ``--compile``
    compiles, the model call from masked inputs to the loss."""
    images = batch[0]
    if isinstance(images, EncodedBatch):
        images = images.decode(generator.device)
    mask, sm_mask = unwrapped(model).sample_masks(images.shape[0], images.device, generator)
    return model(normalize_uint8(images), mask=mask, sm_mask=sm_mask, validate=False)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP and ``torch.compile``'s wrappers."""
    while isinstance(model, (DDP, torch._dynamo.eval_frame.OptimizedModule)):
        model = model.module if isinstance(model, DDP) else model._orig_mod
    return model


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
                log.info(
                    "reconstruction pictures of %d images of %s every %d epochs", len(loaded), source, cfg.vis_every
                )
            else:
                log.warning("reconstruction pictures: no readable image in %s; none will be drawn", source)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        if self.images is None:
            return {}
        model.eval()  # the Trainer sets train mode again at the next epoch's start
        imgs = self.images.to(self.device)
        out = reconstruct(model, imgs, torch.Generator(device=self.device).manual_seed(self.seed))
        titles, panels = panels_from_output(model, imgs, out)
        picture = compose_grid(panels, titles)
        path = self.out / f"recon-epoch{self.trainer.epoch:04d}.png"  # run after a pass: epochs done
        picture.save(path)
        if self.trainer.metrics.tb is not None:
            self.trainer.metrics.tb.add_image("recon", np.asarray(picture), self.trainer.update, dataformats="HWC")
        log.info("wrote %s", path)
        return {"vis_loss": float(out["loss"])}


def _vis_image_paths(cfg: PretrainConfig, dataset) -> tuple[list[str] | None, str]:
    """Where the pictures' images come from: the ``val/`` split of a dataset root that has one
    (images pre-training never trains on), else the training images themselves (for the
    embedded demo: its photos, each once; for tar shards, None: ``dataset.preview``)."""
    if cfg.data:
        val = os.path.join(os.path.expanduser(cfg.data), "val")
        if os.path.isdir(val):
            return scan_images(val), val
    if not hasattr(dataset, "samples"):
        return None, f"the first shard of {dataset.source}"
    return list(dict.fromkeys(path for path, _ in dataset.samples)), dataset.source


def _spread(paths: list[str], n: int) -> list[str]:
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
    state, meta = read_weights(path)
    try:
        load_strict(model, state, meta, path, "pretrain")
    except CheckpointError as e:
        source = meta.get("source_model") or meta.get("model_name")
        raise CheckpointError(
            f"--init: {path} (model {source}) does not hold the weights of {model.model_name}: {e}"
        ) from None
    if verbose:
        theirs = meta.get("model_args") or {}
        differ = {
            k: (v, model.model_args.get(k))
            for k, v in theirs.items()
            if k in model.model_args and model.model_args[k] != v
        }
        log.info(
            "initialised %s from %s (model %s, %d tensors); fresh optimiser and schedule",
            model.model_name,
            path,
            meta.get("source_model") or meta.get("model_name"),
            len(state),
        )
        for k, (a, b) in sorted(differ.items()):
            log.info("  %s: %r in %s, %r in this run", k, a, path, b)


class PretrainTask(Task):
    """``ummae pretrain``: UM-MAE, MAE or SimMIM pre-training of an encoder."""

    def __init__(self):
        self.pictures: ReconstructionPictures | None = None

    def check(self, cfg: PretrainConfig) -> None:
        if model_kind(cfg.model) != "pretrain":
            raise UsageError(f"{cfg.model!r} is not a pre-training model; `ummae models` lists them")
        check_weights_file(cfg.init, "--init")

    def build(self, cfg: PretrainConfig, ctx: RunContext) -> Parts:
        model = create_model(cfg.model, **cfg.model_kwargs())
        if cfg.init:
            init_weights_from(model, cfg.init, ctx.is_main)
        dataset = build_pretrain_dataset(
            cfg.data,
            model.img_size,
            cfg.crop_scale,
            cfg.data_root,
            cfg.demo_repeats,
            cfg.input_pipeline,
            cfg.samples_per_epoch,
        )
        collate = collate_encoded(model.img_size) if cfg.input_pipeline == "device" else None
        return Parts(model, dataset, collate=collate)

    def optimizer(self, cfg: PretrainConfig, model: nn.Module, lr: float, device: torch.device):
        return build_optimizer(model, lr, cfg.weight_decay, cfg.betas, device, no_decay=pretrain_no_weight_decay)

    def step(self, cfg: PretrainConfig, parts: Parts):
        return pretrain_step

    def describe(self, cfg: PretrainConfig, ctx: RunContext, parts: Parts, lr: float) -> None:
        eff_batch = cfg.batch_size * cfg.accum_iter * ctx.info.world_size
        log.info("model %s (%.1fM params)", cfg.model, sum(p.numel() for p in parts.model.parameters()) / 1e6)
        log.info(
            "device %s x%d, precision %s, effective batch %d, lr %.3e",
            ctx.device,
            ctx.info.world_size,
            ctx.precision,
            eff_batch,
            lr,
        )

    def evaluator(self, cfg: PretrainConfig, ctx: RunContext, parts: Parts):
        if not cfg.vis_every:
            return None, 0
        self.pictures = ReconstructionPictures(cfg, parts.train, parts.model.img_size, ctx.device, ctx.is_main)
        return self.pictures, cfg.vis_every

    def started(self, trainer: Trainer) -> None:
        if self.pictures is not None:
            self.pictures.trainer = trainer  # the pictures are named by its epoch, logged at its step

    def finished(self, cfg: PretrainConfig, summary: dict[str, Any]) -> None:
        log.info("done: checkpoints and metrics.jsonl in %s", cfg.output)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """``ummae pretrain``."""
    return run(PretrainTask(), cfg)
