"""Tests of the training engine through ``ummae.tasks.pretrain.pretrain``: exact resume (after an
exception and after a real SIGKILL), DDP with two gloo processes, the non-finite-loss stop,
bad input, the optimiser and schedule, gradient accumulation, atomic checkpoints, metrics.

Runs use the tiny ``*_test`` models on small images written by the tests themselves, with one
intra-op thread (in-process and in subprocesses): a tiny model is fastest that way on a small
shared machine, and it keeps every run bit-for-bit reproducible.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import ummae.tasks.pretrain as train
from _helpers import (
    assert_tensors_equal,
    epoch_records,
    metrics_records,
    run_torchrun,
    smooth_images,
    stable,
    step_records,
    tiny_pretrain_config,
)
from ummae.data.transforms import normalize_uint8
from ummae.engine.optim import no_weight_decay, param_groups, pretrain_no_weight_decay
from ummae.engine.schedule import Schedule, warmup_cosine, warmup_poly
from ummae.errors import NonFiniteLossError, UsageError
from ummae.models.registry import create_model
from ummae.tasks.pretrain import pretrain
from ummae.weights import io as ckpt
from ummae.weights.io import CheckpointError

# ---------------------------------------------------------------- helpers and fixtures


def _stripe_images(folder: Path, n: int, seed: int = 0) -> Path:
    """64 px images of horizontal ramps with a 16 px period (one mask unit), a random phase,
    colour and offset per image: a masked unit is predictable from the visible ones."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y = np.arange(64)
    for i in range(n):
        ramp = ((y + rng.integers(0, 16)) % 16) / 15.0
        colour, offset = rng.uniform(0.2, 1.0, 3), rng.uniform(0.0, 0.3, 3)
        img = np.broadcast_to(offset + 0.7 * ramp[:, None, None] * colour, (64, 64, 3))
        Image.fromarray((img * 255).clip(0, 255).astype(np.uint8)).save(folder / f"s_{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def data24(tmp_path_factory) -> Path:
    return smooth_images(tmp_path_factory.mktemp("data24"), 24)


_cfg = tiny_pretrain_config


def _assert_same_training(out_a: Path, out_b: Path) -> None:
    """Same metrics (wall-clock fields aside) and bit-identical final model and optimiser."""
    rec_a, rec_b = stable(metrics_records(out_a)), stable(metrics_records(out_b))
    assert [r["step"] for r in rec_b] == [r["step"] for r in rec_a]
    for ra, rb in zip(rec_a, rec_b, strict=True):
        assert ra == rb, f"metrics differ at step {ra['step']}: {ra} vs {rb}"
    a = torch.load(Path(out_a) / "checkpoint-last.pth", weights_only=True)
    b = torch.load(Path(out_b) / "checkpoint-last.pth", weights_only=True)
    assert_tensors_equal(a["model"], b["model"], "model")
    assert_tensors_equal(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer.state")
    assert (a["epoch"], a["update"]) == (b["epoch"], b["update"])


def _assert_no_duplicate_steps(out: Path, n_updates: int, n_epochs: int) -> None:
    steps = [r["step"] for r in step_records(out)]
    assert steps == list(range(1, n_updates + 1)), f"step records are not one per update: {steps}"
    assert [r["epoch"] for r in epoch_records(out)] == list(range(n_epochs))


def _tmp_files(folder: Path) -> list:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


class SimulatedCrash(Exception):
    pass


def _step_wrapper(on_call):
    """A ``pretrain_step`` replacement: ``on_call(n, model, batch, generator)`` may raise or
    return a result; ``None`` means "run the real step"."""
    real = train.pretrain_step
    calls = {"n": 0}

    def step(model, batch, generator):
        calls["n"] += 1
        out = on_call(calls["n"], model, batch, generator)
        return real(model, batch, generator) if out is None else out

    return step


# ---------------------------------------------------------------- a reference run


BASE = dict(epochs=3, batch_size=4, save_every_steps=4, log_every=1)  # 24 images: 6 steps/epoch


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, data24) -> Path:
    out = tmp_path_factory.mktemp("run_a")
    pretrain(_cfg(out, data24, **BASE))
    return out


def test_pretrain__metrics_jsonl_and_tensorboard(run_a):
    steps, epochs = step_records(run_a), epoch_records(run_a)
    assert len(steps) == 18 and len(epochs) == 3
    for r in steps:
        assert {"epoch", "step", "loss", "lr", "images_per_s", "skipped_images"} <= set(r)
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0
    # the lr of each step follows the schedule: blr * batch / 256, 1 warm-up epoch (6 steps)
    # of linear rise from 0, then a half cosine to 0 over the other 12 (MAE's per-step rule)
    peak = 0.05 * 4 / 256
    for r in steps:
        t = r["step"] - 1  # the lr is set before the update
        want = peak * t / 6 if t < 6 else peak * 0.5 * (1 + math.cos(math.pi * (t - 6) / 12))
        assert r["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15), r
    for r in epochs:
        assert {"epoch", "step", "train_loss", "epoch_time_s", "skipped_images"} <= set(r)
        assert "replica_max_diff" not in r  # single process
        # the epoch loss is the mean of its steps' losses (log_every 1: one record per step)
        losses = [s["loss"] for s in steps if s["epoch"] == r["epoch"]]
        assert len(losses) == 6 and r["train_loss"] == pytest.approx(sum(losses) / 6, rel=1e-6)
    assert [r["step"] for r in epochs] == [6, 12, 18]
    assert sorted(os.listdir(run_a / "tensorboard"))[0].startswith("events.out.tfevents")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run_a / "tensorboard"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"train/loss", "train/lr", "epoch/train_loss"} <= tags
    assert [e.step for e in ev.Scalars("train/loss")] == list(range(1, 19))
    assert ev.Scalars("train/loss")[4].value == pytest.approx(steps[4]["loss"], rel=1e-6)
    assert sorted(p.name for p in run_a.glob("checkpoint-*.pth")) == ["checkpoint-2.pth", "checkpoint-last.pth"]
    assert _tmp_files(run_a) == []


# ---------------------------------------------------------------- exact resume


def test_pretrain__exact_resume_after_crash_mid_epoch(run_a, data24, tmp_path, monkeypatch):
    # Checkpoints at updates 4, 6 (epoch end), 8, ...; the crash hits the 11th step, so the
    # last checkpoint is update 8 (epoch 1, step 2) and steps 9-10 were logged after it.
    def crash(n, *_):
        if n == 11:
            raise SimulatedCrash("power cut at step 11")

    out = tmp_path / "b"
    monkeypatch.setattr(train, "pretrain_step", _step_wrapper(crash))
    with pytest.raises(SimulatedCrash):
        pretrain(_cfg(out, data24, **BASE))
    state = ckpt.load(out / "checkpoint-last.pth")
    assert (state["epoch"], state["step_in_epoch"], state["update"]) == (1, 2, 8)
    assert [r["step"] for r in step_records(out)][-2:] == [9, 10]  # lines past the checkpoint

    monkeypatch.undo()  # the real step again
    pretrain(_cfg(out, data24, resume="auto", **BASE))
    _assert_no_duplicate_steps(out, 18, 3)
    _assert_same_training(run_a, out)
    assert (out / "checkpoint-2.pth").is_file() and _tmp_files(out) == []


def test_pretrain__exact_resume_with_checkpoint_inside_log_window(data24, tmp_path, monkeypatch):
    kw = dict(epochs=1, save_every_steps=2, log_every=4)  # log at updates 4 and 6, checkpoint at 2
    pretrain(_cfg(tmp_path / "a", data24, **kw))

    def crash(n, *_):
        if n == 3:
            raise SimulatedCrash("crash inside a log window")

    monkeypatch.setattr(train, "pretrain_step", _step_wrapper(crash))
    with pytest.raises(SimulatedCrash):
        pretrain(_cfg(tmp_path / "b", data24, **kw))
    monkeypatch.undo()
    pretrain(_cfg(tmp_path / "b", data24, resume="auto", **kw))
    _assert_same_training(tmp_path / "a", tmp_path / "b")


def test_pretrain__resume_tolerates_torn_metrics_line(data24, tmp_path):
    out = tmp_path / "o"
    pretrain(_cfg(out, data24, epochs=1))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "step": 7, "lo')  # a line cut short by a crash
    pretrain(_cfg(out, data24, epochs=2, resume="auto"))
    _assert_no_duplicate_steps(out, 12, 2)


def test_pretrain__resume_auto_without_checkpoint_starts_fresh(run_a, data24, tmp_path):
    out = tmp_path / "fresh"
    pretrain(_cfg(out, data24, resume="auto", **BASE))
    _assert_same_training(run_a, out)


def test_pretrain__exact_resume_after_sigkill(data24, tmp_path):
    """A real ``python -m ummae pretrain`` killed with SIGKILL, resumed with --resume auto,
    trains exactly as a run that was never interrupted."""
    kw = dict(epochs=10, batch_size=2, save_every_steps=1, log_every=1)  # 12 steps/epoch, 120 in all
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "ummae",
        "pretrain",
        "--model",
        "mae_swin_test",
        "--data",
        str(data24),
        "--output",
        str(killed),
        "--epochs",
        "10",
        "--warmup-epochs",
        "1",
        "--batch-size",
        "2",
        "--blr",
        "0.05",
        "--num-workers",
        "0",
        "--log-every",
        "1",
        "--keep-every",
        "0",
        "--seed",
        "0",
        "--save-every-steps",
        "1",
    ]
    log_path = tmp_path / "killed.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while True:
                if proc.poll() is not None:
                    pytest.fail(
                        f"the run ended (exit {proc.returncode}) before it could be killed: make it "
                        f"longer. Log:\n{log_path.read_text()[-3000:]}"
                    )
                metrics = killed / "metrics.jsonl"
                if (
                    (killed / "checkpoint-last.pth").exists()
                    and metrics.exists()
                    and metrics.read_text().count("\n") >= 4
                ):
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"no checkpoint and metrics after 240 s. Log:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines_at_kill = step_records(killed)
    state = ckpt.load(killed / "checkpoint-last.pth")
    assert 1 <= state["update"] < 120, "the kill must land inside the run"
    assert len(lines_at_kill) < 120

    pretrain(_cfg(killed, data24, resume="auto", **kw))
    _assert_no_duplicate_steps(killed, 120, 10)

    # The uninterrupted reference (checkpoint frequency does not enter the numbers).
    ref = tmp_path / "ref"
    pretrain(_cfg(ref, data24, **{**kw, "save_every_steps": 0}))
    _assert_same_training(ref, killed)


# ---------------------------------------------------------------- DDP


def test_pretrain__torchrun_two_gloo_processes_keep_replicas_identical(data24, tmp_path):
    out = tmp_path / "ddp"
    # 24 images, 2 per rank, 2 ranks: 6 steps per epoch; accum 2 exercises DDP no_sync.
    run_torchrun(
        [
            "pretrain",
            "--model",
            "mae_swin_test",
            "--data",
            str(data24),
            "--output",
            str(out),
            "--epochs",
            "2",
            "--warmup-epochs",
            "1",
            "--batch-size",
            "2",
            "--accum-iter",
            "2",
            "--blr",
            "0.05",
            "--num-workers",
            "0",
            "--log-every",
            "1",
            "--save-every-steps",
            "2",
            "--device",
            "cpu",
        ],
        timeout=400,
    )

    epochs = epoch_records(out)
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert [r["replica_max_diff"] for r in epochs] == [0.0, 0.0]
    assert all(math.isfinite(r["train_loss"]) for r in epochs)
    # rank 0 alone writes: one line per update, nothing twice, one event file
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    _assert_no_duplicate_steps(out, 6, 2)
    assert len(os.listdir(out / "tensorboard")) == 1
    # (and one reconstruction picture, after the last epoch: vis_every 20 > 2 epochs)
    assert sorted(os.listdir(out)) == [
        "checkpoint-1.pth",
        "checkpoint-last.pth",
        "config.yaml",
        "log.txt",
        "metrics.jsonl",
        "recon-epoch0002.png",
        "tensorboard",
    ]
    assert [("vis_loss" in r) for r in epochs] == [False, True]
    state = ckpt.load(out / "checkpoint-last.pth")
    assert state["update"] == 6 and not any(k.startswith("module.") for k in state["model"])
    # the logged lr is the one of the effective batch: 2 per rank x 2 ranks x accum 2
    assert max(r["lr"] for r in step_records(out)) == pytest.approx(0.05 * 8 / 256, rel=1e-12)


# ---------------------------------------------------------------- non-finite loss


def test_pretrain__nan_loss_stops_and_keeps_last_good_checkpoint(data24, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    seen = {}

    def poison(n, model, batch, generator):
        if n == 3:  # after the checkpoint of update 2; found at the next check (step 4)
            seen["bytes"] = (out / "checkpoint-last.pth").read_bytes()
            loss = model(normalize_uint8(batch[0]), generator=generator)["loss"]
            return {"loss": loss * float("nan")}
        return None

    monkeypatch.setattr(train, "pretrain_step", _step_wrapper(poison))
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(_cfg(out, data24, epochs=2, save_every_steps=2, log_every=100))
    msg = str(err.value)
    assert "non-finite loss" in msg and "intact" in msg
    assert f"last good checkpoint is {out / 'checkpoint-last.pth'} (written at epoch 0, step 2)" in msg
    assert (out / "checkpoint-last.pth").read_bytes() == seen["bytes"]
    state = ckpt.load(out / "checkpoint-last.pth")
    assert state["update"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert _tmp_files(out) == []
    assert not (out / "metrics.jsonl").exists()  # log_every=100: nothing logged, NaN neither


def test_pretrain__diverged_weights_are_never_checkpointed(data24, tmp_path):
    """A huge lr drives the weights to inf/NaN while a step's loss can still be finite: no
    checkpoint is written from them, and the message names the checkpoint that really is
    good (finite weights and optimiser state)."""
    out = tmp_path / "diverged"
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(_cfg(out, data24, epochs=2, blr=1e6, save_every_steps=1, log_every=100, warmup_epochs=0))
    msg = str(err.value)
    last = out / "checkpoint-last.pth"
    assert last.exists(), "the first update's checkpoint was good and must be there"
    state = ckpt.load(last)
    bad = [k for k, t in state["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    bad += [
        f"optimizer {i}.{n}"
        for i, st in state["optimizer"]["state"].items()
        for n, t in st.items()
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()
    ]
    assert bad == []
    assert f"last good checkpoint is {last}" in msg and f"step {state['step_in_epoch']}" in msg
    assert state["update"] >= 1


def test_pretrain__diverging_before_any_checkpoint_says_none_was_written(data24, tmp_path, monkeypatch):
    out = tmp_path / "nan0"

    def poison(n, model, batch, generator):
        loss = model(normalize_uint8(batch[0]), generator=generator)["loss"]
        return {"loss": loss * float("nan")}

    monkeypatch.setattr(train, "pretrain_step", _step_wrapper(poison))
    with pytest.raises(NonFiniteLossError, match="No checkpoint of this run was written"):
        pretrain(_cfg(out, data24, epochs=1, log_every=1))
    assert not (out / "checkpoint-last.pth").exists()


def test_pretrain__used_output_folder_refused_unless_resume_or_overwrite(data24, tmp_path, capsys):
    out = tmp_path / "used"
    pretrain(_cfg(out, data24, epochs=1))
    first = (out / "checkpoint-last.pth").read_bytes()
    log_lines = (out / "metrics.jsonl").read_text().splitlines()
    with pytest.raises(ValueError, match=r"holds a run \(metrics.jsonl.*--resume auto.*--overwrite"):
        pretrain(_cfg(out, data24, epochs=1, seed=5))
    assert (out / "checkpoint-last.pth").read_bytes() == first  # untouched
    assert (out / "metrics.jsonl").read_text().splitlines() == log_lines
    # the CLI says it in one line
    from ummae.cli import main

    assert (
        main(
            [
                "pretrain",
                "--model",
                "mae_swin_test",
                "--data",
                str(data24),
                "--output",
                str(out),
                "--epochs",
                "1",
                "--num-workers",
                "0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run" in err[0]
    # --overwrite: a clean log, a new checkpoint
    pretrain(_cfg(out, data24, epochs=1, seed=5, overwrite=True))
    steps = step_records(out)
    assert [r["step"] for r in steps] == list(range(1, 7))  # each step once: the old log is gone
    assert (out / "checkpoint-last.pth").read_bytes() != first
    with pytest.raises(ValueError, match="give one of them"):
        pretrain(_cfg(out, data24, epochs=1, resume="auto", overwrite=True))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        pretrain(_cfg(tmp_path / "afile", data24, epochs=1))
    # a run refused at its start (here: no such data) writes nothing; the corrected command
    # then logs from its first line on
    failed = tmp_path / "failed"
    with pytest.raises(ValueError, match="not found"):
        pretrain(_cfg(failed, tmp_path / "no-such-data", epochs=1))
    assert not failed.exists() or not any(failed.iterdir())
    logging.getLogger("ummae").setLevel(logging.INFO)  # as the CLI sets it
    try:
        pretrain(_cfg(failed, data24, epochs=1))
    finally:
        logging.getLogger("ummae").setLevel(logging.NOTSET)
    assert "model mae_swin_test" in (failed / "log.txt").read_text()  # from the first lines on


def test_pretrain__warm_up_not_shorter_than_the_run_is_warned(data24, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="ummae"):
        pretrain(_cfg(tmp_path / "short", data24, epochs=2, warmup_epochs=10, log_every=100))
    warned = [m for m in caplog.messages if "warm-up" in m]
    # 12 updates of a 60-update warm-up: the last lr is 11/60 of the peak
    assert len(warned) == 1 and "not shorter than the run (2 epochs)" in warned[0] and "18%" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ummae"):
        pretrain(_cfg(tmp_path / "fine", data24, epochs=2, warmup_epochs=1, log_every=100))
    assert not [m for m in caplog.messages if "warm-up" in m]


def test_pretrain__resume_takes_the_runs_settings_from_its_checkpoint(data24, tmp_path, capsys, caplog):
    """Left out on --resume, --blr comes from the checkpoint (the lr does not silently fall
    back to the default); given and different, it is refused in one line; --epochs may change."""
    from ummae.cli import main

    out = tmp_path / "r"
    common = [
        "pretrain",
        "--model",
        "mae_swin_test",
        "--data",
        str(data24),
        "--output",
        str(out),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--log-every",
        "1",
        "--keep-every",
        "0",
        "--vis-every",
        "0",
        "--warmup-epochs",
        "1",
    ]
    assert main(common + ["--epochs", "1", "--blr", "0.05"]) == 0
    with caplog.at_level("INFO", logger="ummae"):
        assert main(common + ["--epochs", "2", "--resume", "auto"]) == 0
    assert any("--blr 0.05" in m and "settings from" in m for m in caplog.messages)
    assert any("--epochs 1 -> 2" in m for m in caplog.messages)
    peak = 0.05 * 4 / 256  # the run's blr, not the default 1.5e-4
    for r in step_records(out)[6:]:
        t = r["step"] - 1
        assert r["lr"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (t - 6) / 6)), rel=1e-9)
    capsys.readouterr()
    assert main(common + ["--epochs", "3", "--resume", "auto", "--blr", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--blr 0.01 (the run has 0.05)" in err[0]


def test_pretrain__resume_with_another_number_of_processes_says_so(data24, tmp_path, caplog):
    out = tmp_path / "ws"
    pretrain(_cfg(out, data24, epochs=1, max_steps_per_epoch=2, save_every_steps=1))
    state = ckpt.load(out / "checkpoint-last.pth")
    state["world_size"] = 2  # as if written by a 2-process run
    state["ranks"] = state["ranks"] * 2
    state["epoch"], state["step_in_epoch"] = 0, 1
    ckpt.save_atomic(state, out / "checkpoint-last.pth")
    with caplog.at_level("WARNING", logger="ummae"):
        pretrain(_cfg(out, data24, epochs=1, max_steps_per_epoch=2, save_every_steps=1, resume="auto"))
    warned = [m for m in caplog.messages if "resuming a run of 2 processes with 1" in m]
    assert len(warned) == 1 and "effective batch goes from 8 to 4" in warned[0]


# ---------------------------------------------------------------- bad input


def test_pretrain__missing_data_path(tmp_path):
    with pytest.raises(ValueError, match="data path not found: .*nowhere"):
        pretrain(_cfg(tmp_path / "o", tmp_path / "nowhere"))


def test_pretrain__empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images were found in .*empty"):
        pretrain(_cfg(tmp_path / "o", tmp_path / "empty"))


def test_pretrain__corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    data = smooth_images(tmp_path / "data", 8)
    (data / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 20)
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING):
        pretrain(_cfg(out, data, batch_size=3))  # 9 images: every one is drawn once per epoch
    (epoch,) = epoch_records(out)
    assert epoch["skipped_images"] == 1 and math.isfinite(epoch["train_loss"])
    assert step_records(out)[-1]["skipped_images"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("broken.jpg" in w and "unreadable" in w for w in warnings), warnings
    assert (out / "checkpoint-last.pth").is_file()


@pytest.mark.parametrize(
    "field, value",
    [("epochs", 0), ("precision", "fp8"), ("crop_scale", (0.9, 0.1)), ("batch_size", 0), ("accum_iter", 0)],
)
def test_pretrain__bad_config_value_names_the_field(tmp_path, data24, field, value):
    with pytest.raises(ValueError, match=rf"bad config value {field}="):
        pretrain(_cfg(tmp_path / "o", data24, **{field: value}))
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def small_ckpts(tmp_path_factory, data24) -> dict:
    """One-step checkpoints of a few model variants."""
    made = {}
    for key, kw in {"pvt": dict(model="mae_pvt_test"), "swin_sm0": dict(sm_ratio=0.0), "swin_default": dict()}.items():
        out = tmp_path_factory.mktemp(key)
        pretrain(_cfg(out, data24, max_steps_per_epoch=1, **kw))
        made[key] = out / "checkpoint-last.pth"
    return made


def test_pretrain__resume_checkpoint_of_another_model_refused(tmp_path, data24, small_ckpts):
    with pytest.raises(ValueError, match=r"--model 'mae_swin_test' \(the run has 'mae_pvt_test'\)") as err:
        pretrain(_cfg(tmp_path / "o", data24, resume=str(small_ckpts["pvt"])))
    assert str(small_ckpts["pvt"]) in str(err.value)
    # the model's own check stands behind it (a checkpoint whose settings were not recorded)
    state = ckpt.load(small_ckpts["pvt"])
    del state["config"]
    bare = tmp_path / "bare.pth"
    ckpt.save_atomic(state, bare)
    with pytest.raises(CheckpointError, match="written for model 'mae_pvt_test'.*'mae_swin_test'"):
        pretrain(_cfg(tmp_path / "o2", data24, resume=str(bare)))


def test_pretrain__resume_checkpoint_with_other_options_refused(tmp_path, data24, small_ckpts):
    with pytest.raises(ValueError, match=r"--sm-ratio 0\.25 \(the run has 0\.0\)"):
        pretrain(_cfg(tmp_path / "o", data24, sm_ratio=0.25, resume=str(small_ckpts["swin_sm0"])))


def test_pretrain__resume_with_explicit_default_option_accepted(tmp_path, data24, small_ckpts):
    # small_ckpts["swin_default"] was built with sm_ratio left at its default, 0.25
    out = tmp_path / "o"
    pretrain(_cfg(out, data24, sm_ratio=0.25, epochs=2, max_steps_per_epoch=1, resume=str(small_ckpts["swin_default"])))
    assert [r["epoch"] for r in epoch_records(out)] == [1]


def test_pretrain__resume_corrupt_checkpoint_refused(tmp_path, data24):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*bad.pth"):
        pretrain(_cfg(tmp_path / "o", data24, resume=str(bad)))


def test_pretrain__resume_foreign_file_refused(tmp_path, data24):
    other = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not an ummae checkpoint"):
        pretrain(_cfg(tmp_path / "o", data24, resume=str(other)))


def test_pretrain__resume_missing_checkpoint_refused(tmp_path, data24):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        pretrain(_cfg(tmp_path / "o", data24, resume=str(tmp_path / "nope.pth")))


# ---------------------------------------------------------------- optimiser and schedule


def test_progress_bar__drawn_on_a_terminal_of_unknown_height(tmp_path):
    """A pseudo-terminal nobody sized (``script``, some CI runners) reports 0 lines, from
    which tqdm concludes that no line is free and draws nothing: the training bar is drawn
    there all the same. (In a process of its own, whose real stderr is that terminal.)"""
    code = (
        "import sys; from ummae.engine.progress import progress_bar; "
        "bar = progress_bar(3, 'epoch 0'); bar.update(1); bar.refresh(); bar.close()"
    )
    master, slave = os.openpty()
    try:
        assert os.get_terminal_size(slave).lines == 0
        subprocess.run(
            [sys.executable, "-c", code],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            check=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "100"},
        )
        os.close(slave)
        slave = -1
        drawn = b""
        while True:  # until the terminal is drained (Linux: EIO once no process holds it)
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert "epoch 0:" in drawn.decode() and "1/3" in drawn.decode(), repr(drawn)


def test_warmup_cosine__shape():
    base, low, warm, total = 1e-3, 1e-5, 10, 100
    lrs = [warmup_cosine(s, total, warm, base, low) for s in range(total + 1)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(base / 2)
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1 : warm + 1], strict=True))  # linear rise
    assert lrs[warm] == pytest.approx(base, rel=1e-12)
    assert lrs[total] == pytest.approx(low, rel=1e-12)
    assert all(a > b for a, b in zip(lrs[warm:total], lrs[warm + 1 : total + 1], strict=True))  # strictly falling
    assert lrs[(warm + total) // 2 + 0] == pytest.approx((base + low) / 2, rel=1e-9)  # cosine midpoint
    assert warmup_cosine(total + 5, total, warm, base, low) == pytest.approx(low)  # stays at the floor
    assert warmup_cosine(0, 10, 0, base, low) == base  # no warm-up


def test_schedule__from_config_reads_epochs_iterations_and_warm_up_steps():
    """Schedule.from_config decides what the config asks: an epoch run over epochs x updates
    with the warm-up in epochs; an iteration run over ``iters`` with ``warmup_steps`` and the
    config's schedule kind; the lr of each update is the schedule function's."""
    from types import SimpleNamespace

    epochs = SimpleNamespace(epochs=4, warmup_epochs=1.5, min_lr=1e-6)
    s = Schedule.from_config(epochs, updates_per_epoch=10, base_lr=1e-3)
    assert (s.kind, s.total_updates, s.warmup_updates, s.base_lr, s.min_lr, s.warmup_by_steps) == (
        "cosine",
        40,
        15,
        1e-3,
        1e-6,
        False,
    )
    assert [s.lr(u) for u in range(41)] == [warmup_cosine(u, 40, 15, 1e-3, 1e-6) for u in range(41)]
    assert s.peak_reached() == 1.0

    iters = SimpleNamespace(epochs=1, iters=100, warmup_steps=10, warmup_epochs=0.0, min_lr=0.0, schedule="poly")
    p = Schedule.from_config(iters, updates_per_epoch=7, base_lr=1e-2)
    assert (p.kind, p.total_updates, p.warmup_updates, p.warmup_by_steps) == ("poly", 100, 10, True)
    assert [p.lr(u) for u in range(101)] == [warmup_poly(u, 100, 10, 1e-2, 0.0) for u in range(101)]

    long_warmup = Schedule("cosine", total_updates=4, warmup_updates=8, base_lr=1.0)
    assert long_warmup.peak_reached() == pytest.approx(3 / 8)
    with pytest.raises(UsageError, match="unknown lr schedule 'exp'"):
        Schedule("exp", 10, 0, 1.0)


def _mmcv_step_lr(it: int, iters_per_epoch: int, base: float, steps, warmup_iters: int, warmup_ratio: float) -> float:
    """mmcv's StepLrUpdaterHook with linear warm-up, by_epoch=True, written out: the regular lr
    of the epoch (``runner.epoch`` 0-based) is ``base * 0.1 ** (the number of steps <= epoch)``
    (``get_lr``: the first ``i`` with ``progress < step[i]``); before iteration ``warmup_iters``
    it is scaled by ``1 - k``, ``k = (1 - it / warmup_iters) * (1 - warmup_ratio)``
    (``get_warmup_lr``, 'linear')."""
    epoch = it // iters_per_epoch
    exp = len(steps)
    for i, s in enumerate(steps):
        if epoch < s:
            exp = i
            break
    regular = base * 0.1**exp
    if it < warmup_iters:
        k = (1 - it / warmup_iters) * (1 - warmup_ratio)
        return regular * (1 - k)
    return regular


def test_step_schedule__mmcv_step_with_linear_warmup():
    """The HTC++ 6x schedule at a small scale: steps at epochs 3 and 5 of 6, 4 updates an
    epoch, a 6-update warm-up from 0.001 of the lr (it crosses the first epoch's end)."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(epochs=6, warmup_steps=6, warmup_epochs=0.0, min_lr=1e-6, schedule="step",
                          lr_steps=(3, 5), warmup_ratio=0.001)  # fmt: skip
    s = Schedule.from_config(cfg, updates_per_epoch=4, base_lr=2e-4)
    assert (s.kind, s.total_updates, s.warmup_updates, s.steps) == ("step", 24, 6, (12, 20))
    want = [_mmcv_step_lr(u, 4, 2e-4, (3, 5), 6, 0.001) for u in range(24)]
    assert [s.lr(u) for u in range(24)] == pytest.approx(want, rel=1e-12, abs=0)
    assert s.lr(0) == pytest.approx(2e-7) and s.lr(6) == s.lr(11) == 2e-4  # from 0.001 of the lr; then flat
    assert s.lr(12) == pytest.approx(2e-5) and s.lr(20) == pytest.approx(2e-6)  # x0.1 at epochs 3 and 5
    # a step inside the warm-up: the warm-up scales the stepped lr (mmcv scales the regular lr)
    early = Schedule("step", 24, 6, 1.0, steps=(4,), warmup_ratio=0.5)
    assert early.lr(5) == pytest.approx(0.1 * (1 - (1 - 5 / 6) * 0.5))
    # no steps (mmcv's step=[]): flat after the warm-up
    flat = Schedule.from_config(SimpleNamespace(**{**vars(cfg), "lr_steps": None}), 4, 1.0)
    assert [flat.lr(u) for u in (6, 12, 23)] == [1.0, 1.0, 1.0]
    assert s.peak_reached() == 1.0


@pytest.mark.parametrize("name", ["mae_swin_test", "mae_vit_test", "simmim_swin_test"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_param_groups__no_decay_on_biases_norms_and_fine_tuning_tokens(name, stage):
    """The reference's rules: pre-training (MAE's add_weight_decay) exempts only 1-d tensors,
    so its [1, 1, C] tokens are decayed; fine-tuning also exempts tokens and position tables."""
    model = create_model(name)
    rule = pretrain_no_weight_decay if stage == "pretrain" else no_weight_decay
    decay, no_decay = param_groups(model, 0.05, no_decay=rule)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    in_decay = {names[id(p)] for p in decay["params"]}
    in_no_decay = {names[id(p)] for p in no_decay["params"]}
    assert not in_decay & in_no_decay
    assert in_decay | in_no_decay == set(names.values())
    tokens = {n for n in names.values() if n.split(".")[-1] in ("sm_token", "mask_token", "cls_token")}
    assert tokens, "expected learnable tokens"
    assert tokens <= (in_decay if stage == "pretrain" else in_no_decay)
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if getattr(mod, "bias", None) is not None and isinstance(mod.bias, nn.Parameter):
            assert prefix + "bias" in in_no_decay
        if isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)) and mod.weight is not None:
            assert prefix + "weight" in in_no_decay
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            assert prefix + "weight" in in_decay
    assert any("proj" in n or "conv" in n for n in in_decay)


# ---------------------------------------------------------------- gradient accumulation


def test_pretrain__accumulation_halves_updates_and_scales_lr(tmp_path):
    data = smooth_images(tmp_path / "data", 16)
    out = tmp_path / "o"
    pretrain(_cfg(out, data, epochs=2, batch_size=2, accum_iter=2, blr=0.1, min_lr=0.0))
    epochs, steps = epoch_records(out), step_records(out)
    assert [r["step"] for r in epochs] == [4, 8]  # 8 micro-steps per epoch, 4 updates
    assert [r["step"] for r in steps] == list(range(1, 9))  # one record per update
    base_lr = 0.1 * 2 * 2 / 256
    # update 5 (the first of epoch 1) is the end of the 1-epoch warm-up
    assert steps[4]["lr"] == pytest.approx(base_lr, rel=1e-12)
    assert steps[0]["lr"] == 0.0
    assert max(r["lr"] for r in steps) == pytest.approx(base_lr, rel=1e-12)
    assert ckpt.load(out / "checkpoint-last.pth")["update"] == 8


# ---------------------------------------------------------------- atomic checkpoints


def _failing_save(fail_on: int):
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == fail_on:
            f.write(b"half a checkpoint")
            raise OSError("No space left on device (simulated)")
        return real(obj, f, *a, **kw)

    return save


def test_save_atomic__failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    first = {"model": {"w": torch.arange(6.0)}, "epoch": 1}
    monkeypatch.setattr(ckpt.torch, "save", _failing_save(2))
    ckpt.save_atomic(first, path)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_atomic({"model": {"w": torch.zeros(6)}, "epoch": 2}, path)
    loaded = ckpt.load(path)
    assert_tensors_equal(loaded, first)
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_pretrain__failed_checkpoint_write_keeps_last_checkpoint(tmp_path, data24, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setattr(ckpt.torch, "save", _failing_save(2))
    with pytest.raises(OSError, match="No space left"):
        pretrain(_cfg(out, data24, save_every_steps=1))
    state = ckpt.load(out / "checkpoint-last.pth")
    assert (state["update"], state["step_in_epoch"]) == (1, 1)
    assert _tmp_files(out) == []
    monkeypatch.undo()
    pretrain(_cfg(out, data24, save_every_steps=1, resume="auto"))  # and it resumes from there
    _assert_no_duplicate_steps(out, 6, 1)


# ---------------------------------------------------------------- learning


def test_pretrain__loss_falls(tmp_path):
    data = _stripe_images(tmp_path / "data", 16)
    out = tmp_path / "o"
    pretrain(_cfg(out, data, epochs=10, batch_size=4, blr=0.1, crop_scale=(1.0, 1.0), log_every=100))
    losses = [r["train_loss"] for r in epoch_records(out)]
    assert len(losses) == 10
    assert losses[-1] < 0.85 * losses[0], losses
    assert min(losses[-3:]) < min(losses[:3]), losses


def test_trainer__removes_temp_files_left_by_a_killed_save(data24, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    stale = out / ".checkpoint-last.pth.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    pretrain(_cfg(out, data24, epochs=1))
    assert not stale.exists() and _tmp_files(out) == []


def test_pretrain__accumulation_longer_than_an_epoch_refused(data24, tmp_path):
    # 24 images / batch 4 = 6 steps per epoch: accumulating over 8 would never update.
    with pytest.raises(ValueError, match="fewer than accum_iter=8"):
        pretrain(_cfg(tmp_path / "o", data24, accum_iter=8))
