"""The one training engine, for pre-training and fine-tuning alike.

``Trainer`` owns: per-update warm-up + cosine (or poly) lr, gradient accumulation (DDP ``no_sync`` on
micro-steps), autocast + grad scaler, a non-finite-loss stop, metrics (JSON lines,
TensorBoard, progress bar), atomic checkpoints and exact resume (model, optimiser, scaler,
epoch, step, RNG states; data order and masks are pure functions of (seed, epoch, step)).

The task plugs in a ``step_fn(model, batch, generator) -> dict`` whose ``"loss"`` is trained,
and optionally an ``evaluate(model) -> dict`` run every ``eval_every`` epochs and after the
last one (and on an EMA of the weights, when one is kept): validation accuracy when
fine-tuning, reconstruction pictures when pre-training.

A config with ``iters`` makes the run iteration-based (MMSegmentation's ``IterBasedRunner``):
it ends after exactly ``iters`` optimiser updates, wherever that falls in a pass over the data,
and ``eval_every_iters`` evaluates and checkpoints every N updates; epochs are then just passes
over the data (each with its own permutation), and the lr schedule runs over the ``iters``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ummae.engine import dist as udist
from ummae.config import config_to_dict
from ummae.engine.seeds import mix_seed
from ummae.weights import io as ckpt
from ummae.engine.optim import SCHEDULES
from ummae.engine.precision import autocast, grad_scaler
from ummae.errors import DataError, NonFiniteLossError, UsageError

log = logging.getLogger("ummae")




def _run_files(out: Path) -> list[Path]:
    """What a run leaves in its folder (and a new run would mix with)."""
    found = [out / n for n in ("metrics.jsonl", "tensorboard", "pretrained_load.txt", "log.txt", "config.yaml") if (out / n).exists()]
    return found + sorted(out.glob("checkpoint-*.pth")) + sorted(out.glob("recon-epoch*.png"))


def claim_output(cfg) -> None:
    """Refuse an output folder that holds a run, unless the run resumes it (``--resume``) or
    replaces it (``--overwrite``): a new run would overwrite its checkpoints and append to its
    log. Every process checks before the process group exists, so before anything is written."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file, not a folder")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the run in the output folder and --overwrite deletes it: give one of them")
    # a run that trained (metrics or checkpoints); one that failed at its start left only its
    # config.yaml / log.txt, which the next attempt replaces / appends to
    held = [p for p in _run_files(out) if p.name == "metrics.jsonl" or p.suffix == ".pth"] if out.is_dir() else []
    if held and not cfg.resume and not cfg.overwrite:
        names = ", ".join(p.name for p in held[:3]) + (", ..." if len(held) > 3 else "")
        raise UsageError(f"output folder {out} holds a run ({names}); pass --resume auto to continue it, "
                         f"--overwrite to start over (its checkpoints and logs are deleted), or another --output")


@contextlib.contextmanager
def run_folder(cfg, dist_info: udist.DistInfo):
    """A run's folder: ``--overwrite``'s clean-up (rank 0), then the run's log lines are held
    in memory until training starts, when :class:`RunLog` writes them to ``log.txt`` first; a
    run refused before that writes nothing. Every process waits until rank 0 is ready."""
    if dist_info.is_main:
        clear_output(cfg)
        _early_lines.clear()
        log.addHandler(_early_handler)
    udist.barrier()
    try:
        yield
    finally:
        log.removeHandler(_early_handler)
        _early_lines.clear()


@contextlib.contextmanager
def training_run(cfg):
    """What every training command does before it builds its model: claim the output folder
    (:func:`claim_output`), join the process group (torchrun, or one process), open the run's
    folder (:func:`run_folder`), resolve the precision and seed every rank alike (DDP also
    broadcasts rank 0's weights). Yields ``(dist_info, device, precision)``."""
    from ummae.engine.precision import resolve_precision
    from ummae.engine.seeds import seed_everything

    claim_output(cfg)
    with udist.distributed(cfg.device) as (info, device), run_folder(cfg, info):
        precision = resolve_precision(cfg.precision, device)
        seed_everything(cfg.seed)
        yield info, device, precision


class _EarlyLines(logging.Handler):
    """Holds the log lines of a run before its folder is written to (see :func:`run_folder`)."""

    def emit(self, record: logging.LogRecord) -> None:
        if len(_early_lines) < 10_000:
            _early_lines.append(record)


_early_lines: list = []
_early_handler = _EarlyLines()


def clear_output(cfg) -> None:
    """``--overwrite``: delete the previous run's files (rank 0 only, before anything is written)."""
    if not cfg.overwrite:
        return
    import shutil

    for p in _run_files(Path(cfg.output)):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    log.info("--overwrite: removed the previous run's files from %s", cfg.output)


class _RunLogHandler(logging.FileHandler):
    """The ``log.txt`` handler of a run (a class of its own, so a stale one can be told apart)."""


class RunLog:
    """A run's own record in its folder, on rank 0: ``config.yaml``, the resolved configuration
    (``--config`` reads it back), and ``log.txt``, every line of the ``ummae`` logger while the
    run lasts (a resumed run appends). :meth:`close` removes the handler."""

    def __init__(self, out: Path, cfg):
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        tmp.replace(out / "config.yaml")
        for stale in [h for h in log.handlers if isinstance(h, _RunLogHandler)]:  # of a run that failed early
            log.removeHandler(stale)
            stale.close()
        self.handler: logging.Handler | None = _RunLogHandler(out / "log.txt", mode="a", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        for record in _early_lines:  # the lines logged since the run began (run_folder)
            self.handler.handle(record)
        _early_lines.clear()
        log.removeHandler(_early_handler)
        log.addHandler(self.handler)

    def close(self) -> None:
        if self.handler is not None:
            log.removeHandler(self.handler)
            self.handler.close()
            self.handler = None


class MetricsLog:
    """JSON lines + TensorBoard on rank 0 (and, given the run's ``cfg``, its :class:`RunLog`)."""

    def __init__(self, out: Path, enabled: bool, cfg=None):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        self.run_log = RunLog(out, cfg) if enabled and cfg is not None else None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; stay usable without it
                log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run wrote after its last checkpoint, so the log reads
        as one uninterrupted run."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                if json.loads(ln).get("step", 0) <= step:
                    keep.append(ln)
            except json.JSONDecodeError:  # a line torn by the kill
                log.warning("dropping an unreadable line of %s: %.60s", self.path, ln)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        tmp.replace(self.path)

    def write(self, record: Dict[str, Any], step: int, prefix: str) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.run_log is not None:
            self.run_log.close()


class Trainer:
    def __init__(
        self,
        cfg,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader,
        sampler,
        device: torch.device,
        precision: str,
        base_lr: float,
        dist_info: udist.DistInfo,
        step_fn: Callable[[nn.Module, Any, torch.Generator], Dict[str, torch.Tensor]],
        evaluate: Callable[[nn.Module], Dict[str, float]] | None = None,
        eval_every: int = 0,
        ema: nn.Module | None = None,
        best_metric: str = "acc1",
    ):
        self.cfg = cfg
        self.model = model  # unwrapped: what checkpoints hold
        self.optimizer = optimizer
        self.loader, self.sampler = loader, sampler
        self.device, self.precision = device, precision
        self.base_lr = base_lr
        self.dist = dist_info
        self.step_fn = step_fn
        self.evaluate = evaluate
        self.eval_every = eval_every  # 0: after the last epoch only
        self.ema = ema  # timm ModelEmaV3: updated after every optimiser step
        self.best: Dict[str, Any] = {}
        self.best_metric = best_metric  # the val figure (higher = better) that picks checkpoint-best.pth
        self.scaler = grad_scaler(device, precision)
        self.out = Path(cfg.output)
        self.steps_per_epoch = sampler.num_batches()
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        if self.steps_per_epoch < cfg.accum_iter:
            raise UsageError(
                f"an epoch has {self.steps_per_epoch} steps, fewer than accum_iter={cfg.accum_iter}: no optimiser "
                f"update would ever happen; lower accum_iter or batch_size, or use more data"
            )
        self.updates_per_epoch = self.steps_per_epoch // cfg.accum_iter
        self.steps_per_epoch = self.updates_per_epoch * cfg.accum_iter  # whole updates only
        # Iteration-based runs (segmentation): ``iters`` updates in all, over as many passes
        # over the data as that takes; the last pass stops part-way.
        self.iters = getattr(cfg, "iters", None)
        self.eval_every_iters = getattr(cfg, "eval_every_iters", 0) or 0
        if self.iters:
            self.total_updates = self.iters
            self.num_epochs = -(-self.iters // self.updates_per_epoch)
        else:
            self.total_updates = cfg.epochs * self.updates_per_epoch
            self.num_epochs = cfg.epochs
        self.schedule = SCHEDULES[getattr(cfg, "schedule", "cosine")]
        self.warmup_updates = int(round(cfg.warmup_epochs * self.updates_per_epoch))
        if getattr(cfg, "warmup_steps", None) is not None:  # detection recipes count warm-up in iterations
            self.warmup_updates = cfg.warmup_steps
        if self.warmup_updates >= self.total_updates and dist_info.is_main:
            reached = self.schedule(self.total_updates - 1, self.total_updates, self.warmup_updates, 1.0, 0.0)
            by_steps = getattr(cfg, "warmup_steps", None) is not None
            warm = f"{cfg.warmup_steps} steps" if by_steps else f"{cfg.warmup_epochs:g} epochs"
            run = f"{self.iters} iterations" if self.iters else f"{cfg.epochs} epochs"
            log.warning("warm-up (%s) is not shorter than the run (%s): the lr only rises, to %.0f%% of its peak; "
                        "lower %s (the recipes' are for full-length runs)", warm, run, 100 * reached,
                        "--warmup-steps" if by_steps else "--warmup-epochs")
        self.epoch, self.step_in_epoch, self.update = 0, 0, 0
        self.epoch_loss_sum, self.epoch_skipped = 0.0, 0
        # losses since the last metrics line; checkpointed so a resumed log line averages the
        # same steps as in an uninterrupted run
        self.window_loss_sum, self.window_n = 0.0, 0
        self.net: nn.Module = model
        if cfg.compile:
            self.net = torch.compile(self.net)
        if dist_info.enabled:
            self.net = DDP(self.net, device_ids=[device.index] if device.type == "cuda" else None)
        self.metrics = MetricsLog(self.out, dist_info.is_main, cfg)
        if dist_info.is_main:
            ckpt.remove_stale_temp(self.out)
        self.generator = torch.Generator(device=device)
        self.last_good: tuple[str, int, int] | None = None  # (path, epoch, step) of the last checkpoint written

    # --- checkpoints ------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "model_name": getattr(self.model, "model_name", None),
            "model_args": getattr(self.model, "model_args", {}),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "update": self.update,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_skipped": self.epoch_skipped,
            "window_loss_sum": self.window_loss_sum,
            "window_n": self.window_n,
            "config": config_to_dict(self.cfg),
            "world_size": self.dist.world_size,
            "rng": ckpt.rng_state(),
            "best": self.best,
            **({"ema": self.ema.module.state_dict()} if self.ema is not None else {}),
            **({"data_order": self.sampler.order_key()} if hasattr(self.sampler, "order_key") else {}),
        }

    def _rank_state(self) -> Dict[str, Any]:
        """What each rank holds for itself: the partial sums of the images it trained on since
        the epoch (and log window) began, and its RNG streams."""
        return {"epoch_loss_sum": self.epoch_loss_sum, "epoch_skipped": self.epoch_skipped,
                "window_loss_sum": self.window_loss_sum, "rng": ckpt.rng_state()}

    def save(self, keep: bool = False) -> None:
        """checkpoint-last.pth (what --resume auto reads); with ``keep`` also a numbered copy
        named after the last finished epoch. Weights or optimiser state that are not finite are
        never written: the run stops instead, naming the checkpoint that is really good."""
        if not self._all_finite():
            raise NonFiniteLossError(
                f"the weights or optimiser state became non-finite by epoch {self.epoch}, step {self.step_in_epoch} "
                f"(update {self.update}): stopping without writing them. {self._last_good_text()}; try a lower lr, "
                f"--precision bf16/fp32 or --clip-grad"
            )
        # numbered after the last finished epoch, or in an iteration-based run the update
        numbered = f"checkpoint-iter{self.update}.pth" if self.iters else f"checkpoint-{self.epoch - 1}.pth"
        names = ["checkpoint-last.pth"] + ([numbered] if keep else [])
        self._write(names)
        self.last_good = (str(self.out / "checkpoint-last.pth"), self.epoch, self.step_in_epoch)

    def _write(self, names: list[str]) -> None:
        """Write the training state to each of ``names`` in the output folder. Called on every
        rank: each rank's own state goes into the checkpoint (``ranks``, in rank order), which
        rank 0 alone writes."""
        ranks = udist.all_gather_object(self._rank_state())
        if self.dist.is_main:
            state = {**self.state(), "ranks": ranks}
            for name in names:
                ckpt.save_atomic(state, self.out / name)

    def _all_finite(self) -> bool:
        """Whether every rank's weights, optimiser state and EMA weights are finite (one
        reduction per checkpoint, not per step)."""
        return bool(udist.all_reduce_sum(self._finite_flag()) == self.dist.world_size)

    def _finite_flag(self) -> torch.Tensor:
        """1.0 if every weight, optimiser state tensor and EMA weight is finite, else 0.0 (one
        reduction per checkpoint, not per step)."""
        tensors = [p.detach() for p in self.model.parameters()]
        tensors += [v for st in self.optimizer.state.values() for v in st.values()
                    if torch.is_tensor(v) and v.is_floating_point()]
        if self.ema is not None:
            tensors += [v for v in self.ema.module.state_dict().values() if v.is_floating_point()]
        ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
        return ok.float().to(self.device)

    def _last_good_text(self) -> str:
        if self.last_good is None:
            return f"No checkpoint of this run was written (nothing in {self.out} is from it)"
        path, epoch, step = self.last_good
        where = f"epoch {epoch}, step {step}" if step else f"the end of epoch {epoch - 1}"
        return f"The last good checkpoint is {path} (written at {where}), intact"

    def resume(self, path: str) -> None:
        if path == "auto":
            last = self.out / "checkpoint-last.pth"
            if not last.exists():
                log.info("resume auto: no checkpoint in %s, starting fresh", self.out)
                return
            path = str(last)
        state = ckpt.load(path)
        ckpt.check_run_state(state, path)
        ckpt.check_compatible(state, path, self.model.model_name, self.model.model_args)
        ckpt.load_state_strict(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.update = state["epoch"], state["step_in_epoch"], state["update"]
        # Each rank gets its own partial sums and RNG streams back (a checkpoint written by
        # another number of processes, or before they were kept per rank: rank 0's).
        ranks = state.get("ranks")
        own = ranks[self.dist.rank] if ranks is not None and len(ranks) == self.dist.world_size else state
        self.epoch_loss_sum, self.epoch_skipped = own["epoch_loss_sum"], own["epoch_skipped"]
        self.window_loss_sum, self.window_n = own["window_loss_sum"], state["window_n"]
        ckpt.set_rng_state(own["rng"])
        self.best = state.get("best", {})
        if self.ema is not None:
            if "ema" not in state:
                raise ckpt.CheckpointError(f"checkpoint {path} holds no EMA weights, but this run keeps an EMA (--ema)")
            ckpt.load_state_strict(self.ema.module, state["ema"], path)
        self.metrics.truncate_after(self.update)
        self.last_good = (str(path), self.epoch, self.step_in_epoch)
        before = state.get("world_size", self.dist.world_size)
        if before != self.dist.world_size and self.dist.is_main:
            per = self.cfg.batch_size * self.cfg.accum_iter
            log.warning("resuming a run of %d processes with %d: the effective batch goes from %d to %d, the lr from "
                        "%.3e to %.3e, and an epoch has %s steps; the data order of the rest of the epoch differs",
                        before, self.dist.world_size, per * before, per * self.dist.world_size,
                        self.cfg.effective_lr(before), self.base_lr, "more" if self.dist.world_size < before else "fewer")
        if hasattr(self.sampler, "order_key") and "data_order" in state and self.dist.is_main:
            before, now = state["data_order"], self.sampler.order_key()
            changed = [f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v]
            if changed:
                log.warning("resuming with %s: the order of the data differs from the interrupted run's (exact resume "
                            "over shards needs the same shards, processes, workers and batch size)", ", ".join(changed))
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step_in_epoch)

    # --- training ---------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        if self.cfg.resume:
            self.resume(self.cfg.resume)
        summary: Dict[str, Any] = {}
        try:
            while self.epoch < self.num_epochs:
                try:
                    summary = self.train_one_epoch()
                except KeyboardInterrupt:  # Ctrl-C: drop the step in flight; what is on disk is whole
                    raise KeyboardInterrupt(f"interrupted at epoch {self.epoch}, step {self.step_in_epoch}. "
                                            f"{self._last_good_text()}; continue with --resume auto") from None
            # Rank 0 may still be drawing pictures or writing the last checkpoint: no rank may
            # tear the process group down under it (gloo aborts the process if one does).
            udist.barrier()
        finally:
            self.metrics.close()
        return summary

    def _set_lr(self) -> float:
        lr = self.schedule(self.update, self.total_updates, self.warmup_updates, self.base_lr, self.cfg.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def _check_finite(self, bad: torch.Tensor) -> None:
        # Checked at log and checkpoint points only: a per-step .item() would sync the GPU.
        if bool(udist.all_reduce_sum(bad.clone().float()) > 0):
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.epoch}, step {self.step_in_epoch}: stopping. {self._last_good_text()}; "
                f"try a lower lr, --precision bf16/fp32 or --clip-grad"
            )

    def _run_evaluation(self) -> Dict[str, Any]:
        """Validation metrics of the weights (and of their EMA), plus the best so far (with
        the epoch, and in an iteration-based run the update, where it was reached)."""
        out = dict(self.evaluate(self.model))
        if self.ema is not None:
            out.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
        _best_update(self.best, out, self.epoch, self.best_metric, self.update if self.iters else None)
        return {**out, **self.best}

    def _is_new_best(self, record: Dict[str, Any]) -> bool:
        key = self.best_metric
        if key not in record:
            return False
        if self.iters:
            return self.best.get(f"best_{key}_iter") == self.update
        return self.best.get(f"best_{key}_epoch") == self.epoch

    def _evaluate_at_update(self) -> Dict[str, Any]:
        """Evaluation inside a pass (iteration-based runs): one metrics line of its own."""
        record = {"epoch": self.epoch, "step": self.update, **self._run_evaluation()}
        self.metrics.write(record, self.update, "eval")
        if self.dist.is_main:
            extra = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k.endswith(self.best_metric))
            log.info("iteration %d: %s", self.update, extra or "evaluated")
        return record

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of pass ``epoch``: a full epoch, except the last pass of an iteration-based run,
        which stops at update ``iters``."""
        left = (self.total_updates - epoch * self.updates_per_epoch) * self.cfg.accum_iter
        return max(0, min(self.steps_per_epoch, left))

    def train_one_epoch(self) -> Dict[str, Any]:
        cfg, epoch = self.cfg, self.epoch
        epoch_steps = self.steps_in_epoch(epoch)
        self.net.train()
        self.sampler.set_epoch(epoch)
        start = self.step_in_epoch
        self.sampler.set_start_batch(start)
        if start == 0:
            self.epoch_loss_sum, self.epoch_skipped = 0.0, 0
        bad = torch.zeros((), device=self.device, dtype=torch.bool)
        epoch_loss = torch.tensor(self.epoch_loss_sum, device=self.device, dtype=torch.float64)
        window_loss = torch.tensor(self.window_loss_sum, device=self.device)
        window_n, window_imgs, t0 = self.window_n, 0, time.time()
        epoch_t0 = time.time()
        bar = _progress(epoch_steps, start, epoch, self.dist.is_main)
        lr = self._set_lr()
        for step, batch in enumerate(self.loader, start=start):
            if step >= epoch_steps:
                break
            images, n_skipped = batch[0], batch[-1]
            if images.shape[0] == 0:
                raise DataError(f"every image of batch {step} of epoch {epoch} was unreadable; check the data (warnings above name the files)")
            self.epoch_skipped += n_skipped
            micro = step % cfg.accum_iter
            if micro == 0:
                lr = self._set_lr()
            batch = [b.to(self.device, non_blocking=True) if torch.is_tensor(b) else b for b in batch]
            self.generator.manual_seed(mix_seed(cfg.seed, self.dist.rank, epoch, step))
            last_micro = micro == cfg.accum_iter - 1
            sync = contextlib.nullcontext() if (last_micro or not self.dist.enabled) else self.net.no_sync()
            with sync:
                with autocast(self.device, self.precision):
                    out = self.step_fn(self.net, batch, self.generator)
                loss = out["loss"]
                bad |= ~torch.isfinite(loss.detach())
                self.scaler.scale(loss / cfg.accum_iter).backward()
            if last_micro:
                if cfg.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.update += 1
                if self.ema is not None:
                    self.ema.update(self.model, step=self.update)
            window_loss += loss.detach().float()
            epoch_loss += loss.detach().double()
            window_n += 1
            window_imgs += images.shape[0]
            self.step_in_epoch = step + 1
            if last_micro and (self.update % cfg.log_every == 0 or self.step_in_epoch == epoch_steps):
                self._check_finite(bad)
                mean_loss = float(udist.all_reduce_sum(window_loss.clone())) / (window_n * self.dist.world_size)
                dt = max(time.time() - t0, 1e-9)
                ips = window_imgs * self.dist.world_size / dt
                rec = {"epoch": epoch, "step": self.update, "epoch_1000x": int(1000 * (epoch + self.step_in_epoch / self.steps_per_epoch)),
                       "loss": mean_loss, "lr": lr, "images_per_s": ips, "skipped_images": self.epoch_skipped}
                self.metrics.write(rec, self.update, "train")
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                if self.dist.is_main:  # logged whether or not a bar is drawn
                    with _above_bar(bar):
                        log.info("epoch %d step %d/%d loss %.4f lr %.3e %.1f img/s", epoch, self.step_in_epoch, epoch_steps, mean_loss, lr, ips)
                window_loss.zero_()
                window_n, window_imgs, t0 = 0, 0, time.time()
            if bar is not None:
                bar.update(1)
            mid_epoch = self.step_in_epoch < epoch_steps
            evaluate_now = (last_micro and mid_epoch and self.eval_every_iters and self.evaluate is not None
                            and self.update % self.eval_every_iters == 0)
            if evaluate_now or (last_micro and mid_epoch and cfg.save_every_steps
                                and self.update % cfg.save_every_steps == 0):
                self._check_finite(bad)
                self.epoch_loss_sum = float(epoch_loss)
                self.window_loss_sum, self.window_n = float(window_loss), window_n
                record = self._evaluate_at_update() if evaluate_now else None
                # after the evaluation: the checkpoint holds the RNG state the run goes on with
                self.save()
                if record is not None and self._is_new_best(record):
                    self.save_best()
                self.net.train()
        if bar is not None:
            bar.close()
        self._check_finite(bad)
        self.epoch_loss_sum = float(epoch_loss)
        self.window_loss_sum, self.window_n = 0.0, 0  # the epoch's last step always logs
        epoch_loss = float(udist.all_reduce_sum(epoch_loss.float())) / (epoch_steps * self.dist.world_size)
        skipped = int(udist.all_reduce_sum(torch.tensor(self.epoch_skipped, device=self.device)))
        record = {"epoch": epoch, "step": self.update, "epoch_1000x": 1000 * (epoch + 1), "train_loss": epoch_loss,
                  "epoch_time_s": time.time() - epoch_t0, "skipped_images": skipped}
        if self.dist.enabled:
            record["replica_max_diff"] = udist.replica_max_diff(self.model)
        last = epoch + 1 == self.num_epochs
        new_best = False
        by_iters = self.eval_every_iters and self.update % self.eval_every_iters == 0
        if self.evaluate is not None and (last or by_iters or (self.eval_every and (epoch + 1) % self.eval_every == 0)):
            record.update(self._run_evaluation())
            new_best = self._is_new_best(record)
        if skipped:
            log.warning("epoch %d: %d unreadable images were skipped", epoch, skipped)
        self.epoch += 1
        self.step_in_epoch = 0
        self.metrics.write(record, self.update, "epoch")
        if self.dist.is_main:
            extra = "".join(f", {k} {v:.4g}" for k, v in record.items() if k.endswith(self.best_metric))
            log.info("epoch %d done: loss %.4f%s (%.1fs)", epoch, epoch_loss, extra, record["epoch_time_s"])
        if last or self.epoch % cfg.save_every == 0:
            self.save(keep=last or bool(cfg.keep_every and self.epoch % cfg.keep_every == 0))
        if new_best:
            self.save_best()
        return record

    def save_best(self) -> None:
        """checkpoint-best.pth: what checkpoint-last.pth holds (the same state, written the same
        atomic way) at the end of the epoch whose ``best_metric`` (val top-1, ``acc1``, for
        classifiers; box AP for detectors) is the best so far.
        Called on every rank, like :meth:`save`; weights that are not finite are never kept."""
        if not self._all_finite():
            if self.dist.is_main:
                log.warning("the weights are not finite: checkpoint-best.pth is not replaced by them")
            return
        self._write(["checkpoint-best.pth"])
        if self.dist.is_main:
            key = self.best_metric
            where = (f"iteration {self.best[f'best_{key}_iter']}" if self.iters
                     else f"epoch {self.best[f'best_{key}_epoch']}")
            log.info("val %s %.4g is the best so far (%s): wrote %s", key, self.best[f"best_{key}"], where,
                     self.out / "checkpoint-best.pth")


def _best_update(best: Dict[str, Any], metrics: Dict[str, float], epoch: int, metric: str = "acc1",
                 update: int | None = None) -> None:
    for k, v in metrics.items():
        if k.endswith(metric) and v >= best.get(f"best_{k}", float("-inf")):
            best[f"best_{k}"] = v
            best[f"best_{k}_epoch"] = epoch
            if update is not None:
                best[f"best_{k}_iter"] = update


MIN_BAR_COLUMNS = 40  # narrower, tqdm draws nothing useful (at 0 columns: nothing at all)


def _terminal_columns(stream) -> int:
    """Columns of the terminal ``stream`` writes to: ``$COLUMNS`` when set (as
    ``shutil.get_terminal_size`` reads it), else the terminal's own; 0 when unknown."""
    env = os.environ.get("COLUMNS", "").strip()
    if env:
        try:
            return int(env)
        except ValueError:
            pass
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _progress(total: int, start: int, epoch: int, is_main: bool):
    """A tqdm bar on rank 0's stderr when it is a terminal wide enough for one; else None. The
    step lines are logged either way (:func:`_above_bar`)."""
    if not (is_main and sys.stderr.isatty()):
        return None
    columns = _terminal_columns(sys.stderr)
    if columns < MIN_BAR_COLUMNS:
        return None
    from tqdm import tqdm

    width = {"ncols": columns} if os.environ.get("COLUMNS", "").strip() else {"dynamic_ncols": True}
    return tqdm(total=total, initial=start, desc=f"epoch {epoch}", leave=False, file=sys.stderr, **width)


def _above_bar(bar):
    """Context of a log line written while ``bar`` may be drawn: the bar is cleared first and
    drawn again after, so the line does not land in the middle of it."""
    return bar.external_write_mode(file=sys.stderr) if bar is not None else contextlib.nullcontext()

