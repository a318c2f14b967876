"""The Trainer is a loop plus hooks (ummae.engine.hooks): a hook sees the calls in the order
HookBase documents, with the update and pass counts it promises; the default hooks come in
their documented order."""

from __future__ import annotations

import pytest

from _helpers import smooth_images, tiny_pretrain_config
from ummae.engine.hooks import BestCheckpoint, Checkpoint, Evaluation, HookBase, LrSchedule, Metrics, default_hooks
from ummae.tasks.base import run
from ummae.tasks.pretrain import PretrainTask


class Recorder(HookBase):
    """Writes down each call with the Trainer's position (pass, step in it, updates) and lr."""

    def __init__(self):
        self.calls = []

    def _note(self, event: str) -> None:
        t = self.trainer
        self.calls.append((event, t.epoch, t.step_in_epoch, t.update))

    def before_train(self):
        self._note("before_train")

    def before_epoch(self):
        self._note("before_epoch")

    def before_step(self):
        self._note("before_step")
        t = self.trainer  # the lr hook, called before this one, has set the update's lr
        assert t.optimizer.param_groups[0]["lr"] == t.schedule.lr(t.update)

    def after_step(self):
        self._note("after_step")

    def after_epoch(self):
        self._note("after_epoch")

    def after_train(self):
        self._note("after_train")


class RecordedPretrain(PretrainTask):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def started(self, trainer) -> None:
        super().started(trainer)
        trainer.register([self.recorder])


def _expected(epochs: int, steps: int, accum: int) -> list[tuple]:
    """The calls written out: per pass, before_epoch; per update, before_step at its first
    micro-batch and after_step once it is counted; after_epoch once the pass is counted."""
    calls = [("before_train", 0, 0, 0)]
    update = 0
    for epoch in range(epochs):
        calls.append(("before_epoch", epoch, 0, update))
        for first in range(0, steps, accum):
            calls.append(("before_step", epoch, first, update))
            update += 1
            calls.append(("after_step", epoch, first + accum, update))
        calls.append(("after_epoch", epoch + 1, 0, update))
    return calls + [("after_train", epochs, 0, update)]


@pytest.mark.parametrize("accum", [1, 2])
def test_hooks__called_in_the_documented_order(tmp_path, accum):
    data = smooth_images(tmp_path / "data", 16, size=64)
    recorder = Recorder()
    cfg = tiny_pretrain_config(
        tmp_path / "run", data, epochs=2, warmup_epochs=0, max_steps_per_epoch=4, accum_iter=accum, vis_every=0,
        model="mae_swin_test", img_size=64,
    )  # fmt: skip
    run(RecordedPretrain(recorder), cfg)
    assert recorder.calls == _expected(epochs=2, steps=4, accum=accum)


def test_default_hooks__in_their_documented_order():
    """The lr first, the evaluation before the metrics (its figures are in their lines) and
    before the checkpoints (which hold its best figures); no evaluation, no best checkpoint."""
    kinds = [type(h) for h in default_hooks(lambda m: {}, 1, 0, "acc1")]
    assert kinds == [LrSchedule, Evaluation, Metrics, Checkpoint, BestCheckpoint]
    assert [type(h) for h in default_hooks(None, 0, 0, "acc1")] == [LrSchedule, Metrics, Checkpoint]
