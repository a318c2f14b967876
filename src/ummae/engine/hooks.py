"""What happens around the training loop, one hook per concern (detectron2's ``HookBase``):
the per-update lr (:class:`LrSchedule`), the task's evaluation (:class:`Evaluation`), metrics
and log lines (:class:`Metrics`), checkpoints and resume (:class:`Checkpoint`) and the best
model (:class:`BestCheckpoint`). The :class:`~ummae.engine.trainer.Trainer` calls its hooks in
their list's order (:func:`default_hooks`) at the points :class:`HookBase` names.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ummae.engine import dist as udist
from ummae.engine.progress import above_bar
from ummae.errors import NonFiniteLossError
from ummae.weights import io as ckpt

log = logging.getLogger("ummae")

Evaluate = Callable[[nn.Module], dict[str, float]]


class HookBase:
    """A hook of the Trainer (``self.trainer``, set when it is registered), called on every
    rank, in this order:

    - ``before_train``: once, before the first pass;
    - per pass over the data: ``before_epoch``, then per optimiser update ``before_step``
      (before its first micro-batch) and ``after_step`` (``trainer.update`` counts it), then
      ``after_epoch`` (``trainer.epoch`` counts the passes done; ``trainer.record`` is the
      pass's metrics record, which hooks may add to);
    - ``after_train``: once, at the end, also when the run stops on an error.

    ``trainer.current`` is the pass in progress (its running figures); ``trainer.evaluated``
    is the evaluation record of the update or pass just done (None when there was none)."""

    trainer: Any = None  # the Trainer (not imported: it imports this module)

    def before_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def after_train(self) -> None:
        pass


def default_hooks(evaluate: Evaluate | None, eval_every: int, eval_every_iters: int, metric: str) -> list[HookBase]:
    """The hooks of every run, in the order they are called: the lr first (it sets the lr the
    step trains with), the evaluation before the metrics (its figures are in the lines they
    write) and before the checkpoints (which hold the best figures so far and the RNG state
    the run goes on with)."""
    hooks: list[HookBase] = [LrSchedule()]
    if evaluate is not None:
        hooks.append(Evaluation(evaluate, eval_every, eval_every_iters, metric))
    hooks += [Metrics(metric), Checkpoint()]
    if evaluate is not None:
        hooks.append(BestCheckpoint(metric))
    return hooks


class LrSchedule(HookBase):
    """The lr of the Trainer's :class:`~ummae.engine.schedule.Schedule` at each update, each
    param group at its ``lr_scale`` of it (layer-wise decay)."""

    def before_train(self) -> None:
        t = self.trainer
        s = t.schedule
        if s.warmup_updates < s.total_updates or not t.dist.is_main:
            return
        warm = f"{s.warmup_updates} steps" if s.warmup_by_steps else f"{t.cfg.warmup_epochs:g} epochs"
        run = f"{t.iters} iterations" if t.iters else f"{t.cfg.epochs} epochs"
        log.warning(
            "warm-up (%s) is not shorter than the run (%s): the lr only rises, to %.0f%% of its peak; "
            "lower %s (the recipes' are for full-length runs)",
            warm,
            run,
            100 * s.peak_reached(),
            "--warmup-steps" if s.warmup_by_steps else "--warmup-epochs",
        )

    def before_step(self) -> None:
        t = self.trainer
        lr = t.schedule.lr(t.update)
        for g in t.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        t.current.lr = lr


class Evaluation(HookBase):
    """The task's ``evaluate(model) -> figures`` (and on the EMA weights, as ``ema_*``) every
    ``every`` passes and after the last, and in an iteration-based run every ``every_iters``
    updates (inside a pass, or at its end); ``trainer.best`` keeps the best ``metric`` figures
    so far, with the pass (and update) where each was reached."""

    def __init__(self, evaluate: Evaluate, every: int, every_iters: int, metric: str):
        self.evaluate, self.every, self.every_iters, self.metric = evaluate, every, every_iters, metric

    def after_step(self) -> None:
        t = self.trainer
        if self.every_iters and t.update % self.every_iters == 0 and t.step_in_epoch < t.current.steps:
            t.check_finite()
            t.evaluated = {"epoch": t.current.epoch, "step": t.update, **self._figures()}
            t.net.train()

    def after_epoch(self) -> None:
        t = self.trainer
        if t.epoch == t.num_epochs or self._due():
            t.record.update(self._figures())
            t.evaluated = t.record

    def _due(self) -> bool:
        """Whether the end of this pass (not the last) evaluates: every ``every`` passes, or in
        an iteration-based run when the update count is a multiple of ``every_iters``."""
        t = self.trainer
        by_iters = self.every_iters and t.update % self.every_iters == 0
        return bool(by_iters or (self.every and t.epoch % self.every == 0))

    def _figures(self) -> dict[str, Any]:
        """Validation figures of the weights (and of their EMA), plus the best so far."""
        t = self.trainer
        out = dict(self.evaluate(t.model))
        if t.ema is not None:
            out.update({f"ema_{k}": v for k, v in self.evaluate(t.ema.module).items()})
        _best_update(t.best, out, t.current.epoch, self.metric, t.update if t.iters else None)
        return {**out, **t.best}


class Metrics(HookBase):
    """metrics.jsonl and TensorBoard (``trainer.metrics``) and the log lines: every
    ``log_every`` updates and at a pass's end a training line (the mean loss over every rank's
    steps since the last one, the lr, the images per second, the time left), a line per
    evaluation inside a pass, and each pass's record; ``metric``: the figure they show."""

    def __init__(self, metric: str):
        self.metric = metric

    def after_step(self) -> None:
        t = self.trainer
        if t.update % t.cfg.log_every == 0 or t.step_in_epoch == t.current.steps:
            self._log_window()
        if t.evaluated is not None:
            t.metrics.write(t.evaluated, t.update, "eval")
            if t.dist.is_main:
                extra = ", ".join(f"{k} {v:.4g}" for k, v in t.evaluated.items() if k.endswith(self.metric))
                log.info("iteration %d: %s", t.update, extra or "evaluated")

    def _log_window(self) -> None:
        t = self.trainer
        p = t.current
        t.check_finite()
        mean_loss = float(udist.all_reduce_sum(p.window_loss.clone())) / (p.window_n * t.dist.world_size)
        ips = p.window_imgs * t.dist.world_size / max(time.time() - p.window_t0, 1e-9)
        rec = {
            "epoch": p.epoch,
            "step": t.update,
            "epoch_1000x": int(1000 * (p.epoch + t.step_in_epoch / t.steps_per_epoch)),
            "loss": mean_loss,
            "lr": p.lr,
            "images_per_s": ips,
            "skipped_images": t.epoch_skipped,
        }
        t.metrics.write(rec, t.update, "train")
        if p.bar is not None:
            p.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{p.lr:.2e}", img_s=f"{ips:.1f}")
        if t.dist.is_main:  # logged whether or not a bar is drawn
            per_update = t.cfg.batch_size * t.cfg.accum_iter * t.dist.world_size  # images
            left = (t.total_updates - t.update) * per_update / ips if ips > 0 else math.inf
            with above_bar(p.bar):
                log.info(
                    "epoch %d step %d/%d loss %.4f lr %.3e %.1f img/s, %s left",
                    p.epoch,
                    t.step_in_epoch,
                    p.steps,
                    mean_loss,
                    p.lr,
                    ips,
                    _duration(left),
                )
        p.new_window()

    def after_epoch(self) -> None:
        t = self.trainer
        record = t.record
        if record["skipped_images"]:
            log.warning("epoch %d: %d unreadable images were skipped", record["epoch"], record["skipped_images"])
        t.metrics.write(record, t.update, "epoch")
        if t.dist.is_main:
            extra = "".join(f", {k} {v:.4g}" for k, v in record.items() if k.endswith(self.metric))
            log.info(
                "epoch %d done: loss %.4f%s (%.1fs)",
                record["epoch"],
                record["train_loss"],
                extra,
                record["epoch_time_s"],
            )

    def after_train(self) -> None:
        self.trainer.metrics.close()


def _duration(seconds: float) -> str:
    """``1:02:03`` for 3723 s; ``?`` when it cannot be told."""
    return str(datetime.timedelta(seconds=round(seconds))) if seconds < 1e9 else "?"


class Checkpoint(HookBase):
    """checkpoint-last.pth (what ``--resume auto`` reads): written atomically (a temporary
    file, then renamed), never with weights or optimiser state that are not finite, every
    ``save_every`` passes and after the last (with a numbered copy every ``keep_every`` and
    at the end), and inside a pass every ``save_every_steps`` updates and after each
    evaluation there (iteration-based runs). ``before_train`` resumes ``--resume``'s run."""

    def before_train(self) -> None:
        t = self.trainer
        if t.dist.is_main:
            ckpt.remove_stale_temp(t.out)
        if t.cfg.resume:
            self.resume(t.cfg.resume)

    def after_step(self) -> None:
        t = self.trainer
        every = t.cfg.save_every_steps
        if t.step_in_epoch < t.current.steps and (t.evaluated is not None or (every and t.update % every == 0)):
            t.check_finite()
            t.keep_pass_figures()
            self.save()

    def after_epoch(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        last = t.epoch == t.num_epochs
        if last or t.epoch % cfg.save_every == 0:
            self.save(keep=last or bool(cfg.keep_every and t.epoch % cfg.keep_every == 0))

    def save(self, keep: bool = False) -> None:
        """checkpoint-last.pth; with ``keep`` also a numbered copy named after the last
        finished epoch (in an iteration-based run, the update). Weights or optimiser state that
        are not finite are never written: the run stops instead, naming the checkpoint that is
        really good."""
        t = self.trainer
        if not all_finite(t):
            raise NonFiniteLossError(
                f"the weights or optimiser state became non-finite by epoch {t.epoch}, step {t.step_in_epoch} "
                f"(update {t.update}): stopping without writing them. {t.last_good_text()}; try a lower lr, "
                f"--precision bf16/fp32 or --clip-grad"
            )
        numbered = f"checkpoint-iter{t.update}.pth" if t.iters else f"checkpoint-{t.epoch - 1}.pth"
        write_checkpoint(t, ["checkpoint-last.pth"] + ([numbered] if keep else []))
        t.last_good = (str(t.out / "checkpoint-last.pth"), t.epoch, t.step_in_epoch)

    def resume(self, path: str) -> None:
        t = self.trainer
        if path == "auto":
            last = t.out / "checkpoint-last.pth"
            if not last.exists():
                log.info("resume auto: no checkpoint in %s, starting fresh", t.out)
                return
            path = str(last)
        state = ckpt.load(path)
        ckpt.check_run_state(state, path)
        ckpt.check_compatible(state, path, t.model.model_name, t.model.model_args)
        t.load_state(state, path)
        t.metrics.truncate_after(t.update)
        t.last_good = (str(path), t.epoch, t.step_in_epoch)
        if t.dist.is_main:
            self._warn_resume_differences(state)
        log.info("resumed from %s at epoch %d, step %d", path, t.epoch, t.step_in_epoch)

    def _warn_resume_differences(self, state: dict[str, Any]) -> None:
        """Say what makes the resumed run differ from the interrupted one: another number of
        processes, or (shards) another data order."""
        t = self.trainer
        before = state.get("world_size", t.dist.world_size)
        if before != t.dist.world_size:
            per = t.cfg.batch_size * t.cfg.accum_iter
            log.warning(
                "resuming a run of %d processes with %d: the effective batch goes from %d to %d, the lr from "
                "%.3e to %.3e, and an epoch has %s steps; the data order of the rest of the epoch differs",
                before,
                t.dist.world_size,
                per * before,
                per * t.dist.world_size,
                t.cfg.effective_lr(before),
                t.base_lr,
                "more" if t.dist.world_size < before else "fewer",
            )
        if hasattr(t.sampler, "order_key") and "data_order" in state:
            order, now = state["data_order"], t.sampler.order_key()
            changed = [f"{k} {order.get(k)} -> {v}" for k, v in now.items() if order.get(k) != v]
            if changed:
                log.warning(
                    "resuming with %s: the order of the data differs from the interrupted run's (exact resume "
                    "over shards needs the same shards, processes, workers and batch size)",
                    ", ".join(changed),
                )


class BestCheckpoint(HookBase):
    """checkpoint-best.pth: what checkpoint-last.pth holds (the same state, written the same
    atomic way) when an evaluation reaches the best ``metric`` so far (val top-1, ``acc1``,
    for classifiers; box AP for detectors); weights that are not finite are never kept."""

    def __init__(self, metric: str):
        self.metric = metric

    def after_step(self) -> None:
        self._save_if_best()

    def after_epoch(self) -> None:
        self._save_if_best()

    def _save_if_best(self) -> None:
        t = self.trainer
        if t.evaluated is None or not self._is_new_best(t.evaluated):
            return
        if not all_finite(t):
            if t.dist.is_main:
                log.warning("the weights are not finite: checkpoint-best.pth is not replaced by them")
            return
        write_checkpoint(t, ["checkpoint-best.pth"])
        if t.dist.is_main:
            key = self.metric
            where = f"iteration {t.best[f'best_{key}_iter']}" if t.iters else f"epoch {t.best[f'best_{key}_epoch']}"
            log.info(
                "val %s %.4g is the best so far (%s): wrote %s",
                key,
                t.best[f"best_{key}"],
                where,
                t.out / "checkpoint-best.pth",
            )

    def _is_new_best(self, record: dict[str, Any]) -> bool:
        t, key = self.trainer, self.metric
        if key not in record:
            return False
        if t.iters:
            return t.best.get(f"best_{key}_iter") == t.update
        return t.best.get(f"best_{key}_epoch") == record["epoch"]


def write_checkpoint(trainer, names: list[str]) -> None:
    """Write the training state to each of ``names`` in the output folder. Called on every
    rank: each rank's own state goes into the checkpoint (``ranks``, in rank order), which
    rank 0 alone writes."""
    ranks = udist.all_gather_object(trainer.rank_state())
    if trainer.dist.is_main:
        state = {**trainer.state(), "ranks": ranks}
        for name in names:
            ckpt.save_atomic(state, trainer.out / name)


def all_finite(trainer) -> bool:
    """Whether every rank's weights, optimiser state and EMA weights are finite (one
    reduction per checkpoint, not per step)."""
    tensors = [p.detach() for p in trainer.model.parameters()]
    tensors += [
        v
        for st in trainer.optimizer.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.is_floating_point()
    ]
    if trainer.ema is not None:
        tensors += [v for v in trainer.ema.module.state_dict().values() if v.is_floating_point()]
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
    return bool(udist.all_reduce_sum(ok.float().to(trainer.device)) == trainer.dist.world_size)


def _best_update(
    best: dict[str, Any], metrics: dict[str, float], epoch: int, metric: str = "acc1", update: int | None = None
) -> None:
    for k, v in metrics.items():
        if k.endswith(metric) and v >= best.get(f"best_{k}", float("-inf")):
            best[f"best_{k}"] = v
            best[f"best_{k}_epoch"] = epoch
            if update is not None:
                best[f"best_{k}_iter"] = update
