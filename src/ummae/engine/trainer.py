"""The one training loop, for pre-training and fine-tuning alike.

``Trainer`` owns: gradient accumulation (DDP ``no_sync`` on micro-steps), autocast + grad
scaler, the per-update lr of its :class:`~ummae.engine.schedule.Schedule`, a non-finite-loss
stop, metrics (JSON lines, TensorBoard, progress bar; :mod:`ummae.engine.run`), atomic
checkpoints and exact resume (model, optimiser, scaler, epoch, step, RNG states; data order and
masks are pure functions of (seed, epoch, step)).

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
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ummae.engine import dist as udist
from ummae.engine.precision import autocast, grad_scaler
from ummae.engine.progress import above_bar, progress_bar
from ummae.engine.run import MetricsLog, config_record
from ummae.engine.schedule import Schedule
from ummae.engine.seeds import mix_seed
from ummae.errors import DataError, NonFiniteLossError, UsageError
from ummae.weights import io as ckpt

log = logging.getLogger("ummae")


@dataclass
class _Pass:
    """The running figures of one pass over the data. The sums are tensors on the device, read
    only at log and checkpoint points (a per-step ``.item()`` would sync the GPU)."""

    epoch: int
    steps: int  # steps of this pass (the last pass of an iteration-based run stops early)
    bad: torch.Tensor  # any non-finite loss since the pass began
    loss_sum: torch.Tensor  # float64: every loss of the pass, on this rank
    window_loss: torch.Tensor  # losses since the last metrics line
    window_n: int
    lr: float
    bar: Any  # a tqdm bar, or None
    window_imgs: int = 0
    window_t0: float = 0.0
    t0: float = 0.0

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.bad |= ~torch.isfinite(loss)
        self.window_loss += loss.float()
        self.loss_sum += loss.double()
        self.window_n += 1
        self.window_imgs += images

    def new_window(self) -> None:
        self.window_loss.zero_()
        self.window_n, self.window_imgs, self.window_t0 = 0, 0, time.time()


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
        step_fn: Callable[[nn.Module, Any, torch.Generator], dict[str, torch.Tensor]],
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        eval_every: int = 0,
        ema: nn.Module | None = None,
        best_metric: str = "acc1",
        schedule: Schedule | None = None,
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
        self.best: dict[str, Any] = {}
        self.best_metric = best_metric  # the val figure (higher = better) that picks checkpoint-best.pth
        self.scaler = grad_scaler(device, precision)
        self.out = Path(cfg.output)
        self._count_steps(cfg, sampler.num_batches())
        # Iteration-based runs (segmentation): ``iters`` updates in all, over as many passes
        # over the data as that takes; the last pass stops part-way.
        self.iters = getattr(cfg, "iters", None)
        self.eval_every_iters = getattr(cfg, "eval_every_iters", 0) or 0
        self.schedule = schedule or Schedule.from_config(cfg, self.updates_per_epoch, base_lr)
        self.total_updates = self.schedule.total_updates
        self.num_epochs = -(-self.total_updates // self.updates_per_epoch)
        self._warn_if_warmup_too_long()
        self.epoch, self.step_in_epoch, self.update = 0, 0, 0
        self.epoch_loss_sum, self.epoch_skipped = 0.0, 0
        # losses since the last metrics line; checkpointed so a resumed log line averages the
        # same steps as in an uninterrupted run
        self.window_loss_sum, self.window_n = 0.0, 0
        self.net = self._wrap(model)
        self.metrics = MetricsLog(self.out, dist_info.is_main, config_record(cfg))
        if dist_info.is_main:
            ckpt.remove_stale_temp(self.out)
        self.generator = torch.Generator(device=device)
        self.last_good: tuple[str, int, int] | None = None  # (path, epoch, step) of the last checkpoint written

    def _count_steps(self, cfg, batches: int) -> None:
        """Steps and optimiser updates per epoch: whole updates of ``accum_iter`` steps only."""
        steps = min(batches, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else batches
        if steps < cfg.accum_iter:
            raise UsageError(
                f"an epoch has {steps} steps, fewer than accum_iter={cfg.accum_iter}: no optimiser "
                f"update would ever happen; lower accum_iter or batch_size, or use more data"
            )
        self.updates_per_epoch = steps // cfg.accum_iter
        self.steps_per_epoch = self.updates_per_epoch * cfg.accum_iter

    def _wrap(self, model: nn.Module) -> nn.Module:
        """What the step runs: the model, compiled (``--compile``) and in DDP under torchrun.

        DDP's gradient buckets keep one layout for the whole run. By default DDP reduces the
        first step of a process in one bucket and then rebuilds its buckets in the order the
        gradients became ready; where a gradient sits in a bucket decides in which order the
        all-reduce sums the ranks' values, which with 3 or more ranks changes the float sum. So
        the first step after a resume was summed otherwise than the same step of the
        uninterrupted run (weights 1e-6 apart at 4 ranks). ``find_unused_parameters=True`` is
        what turns the rebuild off (its cost: one walk of the autograd graph per step, and a
        warning from DDP that every parameter was used)."""
        net = compiled(model, getattr(self.cfg, "compile_backend", "inductor")) if self.cfg.compile else model
        if self.dist.enabled:
            net = DDP(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None, find_unused_parameters=True
            )
        return net

    def _warn_if_warmup_too_long(self) -> None:
        s, cfg = self.schedule, self.cfg
        if s.warmup_updates < s.total_updates or not self.dist.is_main:
            return
        warm = f"{s.warmup_updates} steps" if s.warmup_by_steps else f"{cfg.warmup_epochs:g} epochs"
        run = f"{self.iters} iterations" if self.iters else f"{cfg.epochs} epochs"
        log.warning(
            "warm-up (%s) is not shorter than the run (%s): the lr only rises, to %.0f%% of its peak; "
            "lower %s (the recipes' are for full-length runs)",
            warm,
            run,
            100 * s.peak_reached(),
            "--warmup-steps" if s.warmup_by_steps else "--warmup-epochs",
        )

    # --- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
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
            "config": config_record(self.cfg),
            "world_size": self.dist.world_size,
            "rng": ckpt.rng_state(),
            "best": self.best,
            **({"ema": self.ema.module.state_dict()} if self.ema is not None else {}),
            **({"data_order": self.sampler.order_key()} if hasattr(self.sampler, "order_key") else {}),
        }

    def _rank_state(self) -> dict[str, Any]:
        """What each rank holds for itself: the partial sums of the images it trained on since
        the epoch (and log window) began, and its RNG streams."""
        return {
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_skipped": self.epoch_skipped,
            "window_loss_sum": self.window_loss_sum,
            "rng": ckpt.rng_state(),
        }

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
        tensors += [
            v
            for st in self.optimizer.state.values()
            for v in st.values()
            if torch.is_tensor(v) and v.is_floating_point()
        ]
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
        if self.dist.is_main:
            self._warn_resume_differences(state)
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step_in_epoch)

    def _warn_resume_differences(self, state: dict[str, Any]) -> None:
        """Say what makes the resumed run differ from the interrupted one: another number of
        processes, or (shards) another data order."""
        before = state.get("world_size", self.dist.world_size)
        if before != self.dist.world_size:
            per = self.cfg.batch_size * self.cfg.accum_iter
            log.warning(
                "resuming a run of %d processes with %d: the effective batch goes from %d to %d, the lr from "
                "%.3e to %.3e, and an epoch has %s steps; the data order of the rest of the epoch differs",
                before,
                self.dist.world_size,
                per * before,
                per * self.dist.world_size,
                self.cfg.effective_lr(before),
                self.base_lr,
                "more" if self.dist.world_size < before else "fewer",
            )
        if hasattr(self.sampler, "order_key") and "data_order" in state:
            order, now = state["data_order"], self.sampler.order_key()
            changed = [f"{k} {order.get(k)} -> {v}" for k, v in now.items() if order.get(k) != v]
            if changed:
                log.warning(
                    "resuming with %s: the order of the data differs from the interrupted run's (exact resume "
                    "over shards needs the same shards, processes, workers and batch size)",
                    ", ".join(changed),
                )

    # --- training ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        if self.cfg.resume:
            self.resume(self.cfg.resume)
        summary: dict[str, Any] = {}
        try:
            while self.epoch < self.num_epochs:
                try:
                    summary = self.train_one_epoch()
                except KeyboardInterrupt:  # Ctrl-C: drop the step in flight; what is on disk is whole
                    raise KeyboardInterrupt(
                        f"interrupted at epoch {self.epoch}, step {self.step_in_epoch}. "
                        f"{self._last_good_text()}; continue with --resume auto"
                    ) from None
            # Rank 0 may still be drawing pictures or writing the last checkpoint: no rank may
            # tear the process group down under it (gloo aborts the process if one does).
            udist.barrier()
        finally:
            self.metrics.close()
        return summary

    def _set_lr(self) -> float:
        lr = self.schedule.lr(self.update)
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

    def _run_evaluation(self) -> dict[str, Any]:
        """Validation metrics of the weights (and of their EMA), plus the best so far (with
        the epoch, and in an iteration-based run the update, where it was reached)."""
        out = dict(self.evaluate(self.model))
        if self.ema is not None:
            out.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
        _best_update(self.best, out, self.epoch, self.best_metric, self.update if self.iters else None)
        return {**out, **self.best}

    def _is_new_best(self, record: dict[str, Any]) -> bool:
        key = self.best_metric
        if key not in record:
            return False
        if self.iters:
            return self.best.get(f"best_{key}_iter") == self.update
        return self.best.get(f"best_{key}_epoch") == self.epoch

    def _evaluate_at_update(self) -> dict[str, Any]:
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

    def train_one_epoch(self) -> dict[str, Any]:
        """One pass over the data, from ``step_in_epoch`` (a resumed run starts mid-pass)."""
        p = self._begin_pass()
        for step, batch in enumerate(self.loader, start=self.step_in_epoch):
            if step >= p.steps:
                break
            last_micro = self._micro_step(p, step, batch)
            if last_micro:
                self._optimizer_step()
            self.step_in_epoch = step + 1
            if last_micro and (self.update % self.cfg.log_every == 0 or self.step_in_epoch == p.steps):
                self._log_window(p)
            if p.bar is not None:
                p.bar.update(1)
            if last_micro and self.step_in_epoch < p.steps:
                self._mid_pass_checkpoint(p)
        if p.bar is not None:
            p.bar.close()
        return self._end_pass(p)

    def _begin_pass(self) -> _Pass:
        epoch, start = self.epoch, self.step_in_epoch
        steps = self.steps_in_epoch(epoch)
        self.net.train()
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_batch(start)
        if start == 0:
            self.epoch_loss_sum, self.epoch_skipped = 0.0, 0
        now = time.time()
        return _Pass(
            epoch=epoch,
            steps=steps,
            bad=torch.zeros((), device=self.device, dtype=torch.bool),
            loss_sum=torch.tensor(self.epoch_loss_sum, device=self.device, dtype=torch.float64),
            window_loss=torch.tensor(self.window_loss_sum, device=self.device),
            window_n=self.window_n,
            lr=self._set_lr(),
            bar=progress_bar(steps, f"epoch {epoch}", initial=start, is_main=self.dist.is_main),
            window_t0=now,
            t0=now,
        )

    def _micro_step(self, p: _Pass, step: int, batch) -> bool:
        """Forward and backward of one batch under autocast, its loss scaled by 1/accum_iter;
        gradients are all-reduced (DDP) on the last micro-step of an update only. Returns
        whether this was that last micro-step."""
        cfg = self.cfg
        images, n_skipped = batch[0], batch[-1]
        if images.shape[0] == 0:
            raise DataError(
                f"every image of batch {step} of epoch {p.epoch} was unreadable; check the data (warnings above name the files)"
            )
        self.epoch_skipped += n_skipped
        micro = step % cfg.accum_iter
        if micro == 0:
            p.lr = self._set_lr()
        batch = [b.to(self.device, non_blocking=True) if torch.is_tensor(b) else b for b in batch]
        self.generator.manual_seed(mix_seed(cfg.seed, self.dist.rank, p.epoch, step))
        last_micro = micro == cfg.accum_iter - 1
        sync = contextlib.nullcontext() if (last_micro or not self.dist.enabled) else self.net.no_sync()
        with sync:
            with autocast(self.device, self.precision):
                loss = self.step_fn(self.net, batch, self.generator)["loss"]
            self.scaler.scale(loss / cfg.accum_iter).backward()
        p.add(loss.detach(), images.shape[0])
        return last_micro

    def _optimizer_step(self) -> None:
        """Clip (``--clip-grad``, on unscaled gradients), step through the grad scaler, then
        the EMA of the weights."""
        cfg = self.cfg
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.update += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.update)

    def _log_window(self, p: _Pass) -> None:
        """One metrics line (and log line) for the updates since the last one: the mean loss
        over every rank's steps, the lr, the images per second."""
        self._check_finite(p.bad)
        mean_loss = float(udist.all_reduce_sum(p.window_loss.clone())) / (p.window_n * self.dist.world_size)
        ips = p.window_imgs * self.dist.world_size / max(time.time() - p.window_t0, 1e-9)
        rec = {
            "epoch": p.epoch,
            "step": self.update,
            "epoch_1000x": int(1000 * (p.epoch + self.step_in_epoch / self.steps_per_epoch)),
            "loss": mean_loss,
            "lr": p.lr,
            "images_per_s": ips,
            "skipped_images": self.epoch_skipped,
        }
        self.metrics.write(rec, self.update, "train")
        if p.bar is not None:
            p.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{p.lr:.2e}", img_s=f"{ips:.1f}")
        if self.dist.is_main:  # logged whether or not a bar is drawn
            with above_bar(p.bar):
                log.info(
                    "epoch %d step %d/%d loss %.4f lr %.3e %.1f img/s",
                    p.epoch,
                    self.step_in_epoch,
                    p.steps,
                    mean_loss,
                    p.lr,
                    ips,
                )
        p.new_window()

    def _mid_pass_checkpoint(self, p: _Pass) -> None:
        """Inside a pass, after an update: evaluate every ``eval_every_iters`` updates
        (iteration-based runs) and checkpoint then and every ``save_every_steps`` updates."""
        evaluate_now = bool(
            self.eval_every_iters and self.evaluate is not None and self.update % self.eval_every_iters == 0
        )
        save_now = bool(self.cfg.save_every_steps and self.update % self.cfg.save_every_steps == 0)
        if not (evaluate_now or save_now):
            return
        self._check_finite(p.bad)
        self.epoch_loss_sum = float(p.loss_sum)
        self.window_loss_sum, self.window_n = float(p.window_loss), p.window_n
        record = self._evaluate_at_update() if evaluate_now else None
        # after the evaluation: the checkpoint holds the RNG state the run goes on with
        self.save()
        if record is not None and self._is_new_best(record):
            self.save_best()
        self.net.train()

    def _end_pass(self, p: _Pass) -> dict[str, Any]:
        """The epoch's record (mean loss over every rank's steps, time, skipped images,
        replica check, evaluation when due), its log line and checkpoints."""
        self._check_finite(p.bad)
        self.epoch_loss_sum = float(p.loss_sum)
        self.window_loss_sum, self.window_n = 0.0, 0  # the epoch's last step always logs
        epoch_loss = float(udist.all_reduce_sum(p.loss_sum.float())) / (p.steps * self.dist.world_size)
        skipped = int(udist.all_reduce_sum(torch.tensor(self.epoch_skipped, device=self.device)))
        record = {
            "epoch": p.epoch,
            "step": self.update,
            "epoch_1000x": 1000 * (p.epoch + 1),
            "train_loss": epoch_loss,
            "epoch_time_s": time.time() - p.t0,
            "peak_mem_mib": peak_memory_mib(self.device),
            "skipped_images": skipped,
        }
        if self.dist.enabled:
            record["replica_max_diff"] = udist.replica_max_diff(self.model)
        last = p.epoch + 1 == self.num_epochs
        new_best = False
        if self.evaluate is not None and (last or self._evaluation_due(p.epoch)):
            record.update(self._run_evaluation())
            new_best = self._is_new_best(record)
        if skipped:
            log.warning("epoch %d: %d unreadable images were skipped", p.epoch, skipped)
        self.epoch += 1
        self.step_in_epoch = 0
        self.metrics.write(record, self.update, "epoch")
        if self.dist.is_main:
            extra = "".join(f", {k} {v:.4g}" for k, v in record.items() if k.endswith(self.best_metric))
            log.info("epoch %d done: loss %.4f%s (%.1fs)", p.epoch, epoch_loss, extra, record["epoch_time_s"])
        if last or self.epoch % self.cfg.save_every == 0:
            self.save(keep=last or bool(self.cfg.keep_every and self.epoch % self.cfg.keep_every == 0))
        if new_best:
            self.save_best()
        return record

    def _evaluation_due(self, epoch: int) -> bool:
        """Whether the end of pass ``epoch`` (not the last) evaluates: every ``eval_every``
        epochs, or in an iteration-based run when the update count is a multiple of
        ``eval_every_iters``."""
        by_iters = self.eval_every_iters and self.update % self.eval_every_iters == 0
        return bool(by_iters or (self.eval_every and (epoch + 1) % self.eval_every == 0))

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
            where = (
                f"iteration {self.best[f'best_{key}_iter']}"
                if self.iters
                else f"epoch {self.best[f'best_{key}_epoch']}"
            )
            log.info(
                "val %s %.4g is the best so far (%s): wrote %s",
                key,
                self.best[f"best_{key}"],
                where,
                self.out / "checkpoint-best.pth",
            )


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far, for the epoch records: allocated tensors on CUDA; on CPU the
    process's resident high-water mark (``ru_maxrss``: Python, torch and data, not the
    DataLoader workers, which are other processes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def compiled(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``model`` under ``torch.compile`` (``--compile``), or the submodule a model names in its
    ``compile_region`` attribute compiled in place (a detector: its backbone and FPN, which
    always see the same canvas; the target matching, losses and box decoding around them are
    data-dependent Python). The step calls what this returns; checkpoints hold ``model``'s own
    keys either way.

    The pre-training step draws its masks outside the call (:mod:`ummae.tasks.pretrain`), so
    the compiled forward runs from masked inputs to the loss: one graph, no graph break, and
    no recompile from one batch, epoch, evaluation or resume to the next (tests/test_compile.py)."""
    region = getattr(model, "compile_region", None)
    if region is not None:
        model.get_submodule(region).compile(backend=backend)
        return model
    return torch.compile(model, backend=backend)


def _best_update(
    best: dict[str, Any], metrics: dict[str, float], epoch: int, metric: str = "acc1", update: int | None = None
) -> None:
    for k, v in metrics.items():
        if k.endswith(metric) and v >= best.get(f"best_{k}", float("-inf")):
            best[f"best_{k}"] = v
            best[f"best_{k}_epoch"] = epoch
            if update is not None:
                best[f"best_{k}_iter"] = update
