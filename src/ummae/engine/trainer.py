"""The one training loop, for pre-training and fine-tuning alike: a loop plus hooks.

``Trainer`` owns the loop: gradient accumulation (DDP ``no_sync`` on micro-steps), autocast +
grad scaler, gradient clipping, the EMA of the weights, a non-finite-loss stop, and the state
a checkpoint holds (model, optimiser, scaler, epoch, step, partial sums, RNG states; data order
and masks are pure functions of (seed, epoch, step)). Everything around it is a hook
(:mod:`ummae.engine.hooks`, called in order at before_train / before_epoch / before_step /
after_step / after_epoch / after_train): the per-update lr, the evaluation, metrics and log
lines, atomic checkpoints and exact resume, the best model.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ummae.engine import dist as udist
from ummae.engine.hooks import Evaluate, HookBase, default_hooks
from ummae.engine.precision import autocast, grad_scaler
from ummae.engine.progress import progress_bar
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
    bar: Any  # a tqdm bar, or None
    lr: float = 0.0  # of the update in progress (hooks.LrSchedule)
    window_imgs: int = 0
    window_t0: float = 0.0
    t0: float = 0.0

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.bad |= ~torch.isfinite(loss)
        self.window_loss += loss.float()
        self.loss_sum += loss.double()
        self.window_n += 1
        self.window_imgs += images
        if self.bar is not None:
            self.bar.update(1)

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
        evaluate: Evaluate | None = None,
        eval_every: int = 0,
        ema: nn.Module | None = None,
        best_metric: str = "acc1",
        schedule: Schedule | None = None,
        hooks: Iterable[HookBase] = (),
    ):
        """``eval_every``: evaluate every N epochs (0: after the last only); ``ema``: timm's
        ModelEmaV3, updated after every optimiser step; ``best_metric``: the val figure (higher
        = better) that picks checkpoint-best.pth; ``hooks``: called after the default ones
        (:func:`~ummae.engine.hooks.default_hooks`)."""
        self.cfg = cfg
        self.model = model  # unwrapped: what checkpoints hold
        self.optimizer = optimizer
        self.loader, self.sampler = loader, sampler
        self.device, self.precision = device, precision
        self.base_lr = base_lr
        self.dist = dist_info
        self.step_fn = step_fn
        self.ema = ema
        self.scaler = grad_scaler(device, precision)
        self.out = Path(cfg.output)
        self._count_steps(cfg, sampler.num_batches())
        # Iteration-based runs (segmentation): ``iters`` updates in all, over as many passes
        # over the data as that takes; the last pass stops part-way.
        self.iters = getattr(cfg, "iters", None)
        self.schedule = schedule or Schedule.from_config(cfg, self.updates_per_epoch, base_lr)
        self.total_updates = self.schedule.total_updates
        self.num_epochs = -(-self.total_updates // self.updates_per_epoch)
        self.epoch, self.step_in_epoch, self.update = 0, 0, 0
        self.epoch_loss_sum, self.epoch_skipped = 0.0, 0
        # losses since the last metrics line; checkpointed so a resumed log line averages the
        # same steps as in an uninterrupted run
        self.window_loss_sum, self.window_n = 0.0, 0
        self.best: dict[str, Any] = {}  # the best val figures so far (hooks.Evaluation)
        self.net = self._wrap(model)
        self.metrics = MetricsLog(self.out, dist_info.is_main, config_record(cfg))
        self.generator = torch.Generator(device=device)
        self.last_good: tuple[str, int, int] | None = None  # (path, epoch, step) of the last checkpoint written
        self.current: _Pass | None = None  # the pass in progress
        self.record: dict[str, Any] = {}  # the last pass's record: what fit() returns
        self.evaluated: dict[str, Any] | None = None  # the evaluation of the update or pass just done
        self.hooks: list[HookBase] = []
        self.register(default_hooks(evaluate, eval_every, getattr(cfg, "eval_every_iters", 0) or 0, best_metric))
        self.register(hooks)

    def register(self, hooks: Iterable[HookBase]) -> None:
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)()

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until the last update; returns the last pass's record."""
        try:
            self._call("before_train")  # a resumed run is loaded here (hooks.Checkpoint)
            while self.epoch < self.num_epochs:
                try:
                    self.train_one_epoch()
                except KeyboardInterrupt:  # Ctrl-C: drop the step in flight; what is on disk is whole
                    raise KeyboardInterrupt(
                        f"interrupted at epoch {self.epoch}, step {self.step_in_epoch}. "
                        f"{self.last_good_text()}; continue with --resume auto"
                    ) from None
            # Rank 0 may still be drawing pictures or writing the last checkpoint: no rank may
            # tear the process group down under it (gloo aborts the process if one does).
            udist.barrier()
        finally:
            self._call("after_train")
        return self.record

    def train_one_epoch(self) -> None:
        """One pass over the data, from ``step_in_epoch`` (a resumed run starts mid-pass)."""
        p = self.current = self._begin_pass()
        self._call("before_epoch")
        for step, batch in enumerate(self.loader, start=self.step_in_epoch):
            if step >= p.steps:
                break
            if step % self.cfg.accum_iter == 0:
                self._call("before_step")
            self._micro_step(p, step, batch)
            self.step_in_epoch = step + 1
            if self.step_in_epoch % self.cfg.accum_iter == 0:
                self._optimizer_step()
                self._call("after_step")
        self._end_pass(p)
        self._call("after_epoch")

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
            bar=progress_bar(steps, f"epoch {epoch}", initial=start, is_main=self.dist.is_main),
            window_t0=now,
            t0=now,
        )

    def _micro_step(self, p: _Pass, step: int, batch) -> None:
        """Forward and backward of one batch under autocast, its loss scaled by 1/accum_iter;
        gradients are all-reduced (DDP) on the last micro-step of an update only."""
        cfg = self.cfg
        images, n_skipped = batch[0], batch[-1]
        if images.shape[0] == 0:
            raise DataError(
                f"every image of batch {step} of epoch {p.epoch} was unreadable; check the data (warnings above name the files)"
            )
        self.epoch_skipped += n_skipped
        batch = [b.to(self.device, non_blocking=True) if torch.is_tensor(b) else b for b in batch]
        self.generator.manual_seed(mix_seed(cfg.seed, self.dist.rank, p.epoch, step))
        last_micro = (step + 1) % cfg.accum_iter == 0
        sync = contextlib.nullcontext() if (last_micro or not self.dist.enabled) else self.net.no_sync()
        with sync:
            with autocast(self.device, self.precision):
                loss = self.step_fn(self.net, batch, self.generator)["loss"]
            self.scaler.scale(loss / cfg.accum_iter).backward()
        p.add(loss.detach(), images.shape[0])

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
        self.evaluated = None  # nothing evaluated at this update yet (hooks.Evaluation)

    def _end_pass(self, p: _Pass) -> None:
        """The pass's record (its mean loss over every rank's steps, time, skipped images,
        replica check), for the after_epoch hooks; the position moves to the next pass."""
        if p.bar is not None:
            p.bar.close()
        self.check_finite()
        self.epoch_loss_sum = float(p.loss_sum)
        self.window_loss_sum, self.window_n = 0.0, 0  # the epoch's last step always logs
        epoch_loss = float(udist.all_reduce_sum(p.loss_sum.float())) / (p.steps * self.dist.world_size)
        skipped = int(udist.all_reduce_sum(torch.tensor(self.epoch_skipped, device=self.device)))
        self.record = {
            "epoch": p.epoch,
            "step": self.update,
            "epoch_1000x": 1000 * (p.epoch + 1),
            "train_loss": epoch_loss,
            "epoch_time_s": time.time() - p.t0,
            "peak_mem_mib": peak_memory_mib(self.device),
            "skipped_images": skipped,
        }
        if self.dist.enabled:
            self.record["replica_max_diff"] = udist.replica_max_diff(self.model)
        self.evaluated = None
        self.epoch += 1
        self.step_in_epoch = 0

    # --- the loop's figures -----------------------------------------------------------------
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

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of pass ``epoch``: a full epoch, except the last pass of an iteration-based run,
        which stops at update ``iters``."""
        left = (self.total_updates - epoch * self.updates_per_epoch) * self.cfg.accum_iter
        return max(0, min(self.steps_per_epoch, left))

    def check_finite(self) -> None:
        """Stop on a non-finite loss of the pass so far, on any rank. Checked at log and
        checkpoint points only: a per-step .item() would sync the GPU."""
        if bool(udist.all_reduce_sum(self.current.bad.clone().float()) > 0):
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.epoch}, step {self.step_in_epoch}: stopping. {self.last_good_text()}; "
                f"try a lower lr, --precision bf16/fp32 or --clip-grad"
            )

    def keep_pass_figures(self) -> None:
        """The running sums of the pass in progress into the state a checkpoint holds."""
        p = self.current
        self.epoch_loss_sum = float(p.loss_sum)
        self.window_loss_sum, self.window_n = float(p.window_loss), p.window_n

    def last_good_text(self) -> str:
        if self.last_good is None:
            return f"No checkpoint of this run was written (nothing in {self.out} is from it)"
        path, epoch, step = self.last_good
        where = f"epoch {epoch}, step {step}" if step else f"the end of epoch {epoch - 1}"
        return f"The last good checkpoint is {path} (written at {where}), intact"

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

    # --- the state a checkpoint holds (written and read by hooks.Checkpoint) -----------------
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

    def rank_state(self) -> dict[str, Any]:
        """What each rank holds for itself: the partial sums of the images it trained on since
        the epoch (and log window) began, and its RNG streams."""
        return {
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_skipped": self.epoch_skipped,
            "window_loss_sum": self.window_loss_sum,
            "rng": ckpt.rng_state(),
        }

    def load_state(self, state: dict[str, Any], path) -> None:
        """The training state of checkpoint ``state`` (read from ``path``), to go on from."""
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
