"""Assembling runs: config -> model, data, optimiser -> the one :class:`Trainer`."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict

from . import dist as udist
from .config import PretrainConfig
from .data import build_pretrain_dataset, build_train_loader
from .engine.loop import Trainer
from .engine.optim import build_optimizer
from .engine.precision import resolve_precision
from .registry import create_model, model_kind
from .seeds import seed_everything

log = logging.getLogger("ummae")


def pretrain_step(model, batch, generator):
    """Pre-training ignores labels; masks are drawn from the step's generator."""
    return model(batch[0], generator=generator)


def pretrain(cfg: PretrainConfig) -> Dict[str, Any]:
    cfg.validate()
    if model_kind(cfg.model) != "pretrain":
        raise ValueError(f"{cfg.model!r} is not a pre-training model; `ummae models` lists them")
    with udist.distributed(cfg.device) as (info, device):
        precision = resolve_precision(cfg.precision, device)
        seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        model = create_model(cfg.model, **cfg.model_kwargs()).to(device)
        dataset = build_pretrain_dataset(cfg.data, model.img_size, cfg.crop_scale, cfg.data_root, cfg.demo_repeats)
        workers = min(cfg.num_workers, os.cpu_count() or 1)
        loader, sampler = build_train_loader(
            dataset, cfg.batch_size, workers, info.world_size, info.rank, cfg.seed, pin_memory=device.type == "cuda"
        )
        eff_batch = cfg.batch_size * cfg.accum_iter * info.world_size
        lr = cfg.effective_lr(info.world_size)
        optimizer = build_optimizer(model, lr, cfg.weight_decay, cfg.betas, device)
        if info.is_main:
            Path(cfg.output).mkdir(parents=True, exist_ok=True)
            log.info("model %s (%.1fM params)", cfg.model, sum(p.numel() for p in model.parameters()) / 1e6)
            log.info("device %s x%d, precision %s, effective batch %d, lr %.3e", device, info.world_size, precision, eff_batch, lr)
        trainer = Trainer(cfg, model, optimizer, loader, sampler, device, precision, lr, info, pretrain_step)
        summary = trainer.fit()
        if info.is_main:
            log.info("done: checkpoints and metrics.jsonl in %s", cfg.output)
        return summary

