"""Tests of the training engine's distributed and numeric machinery: exact resume of a
2-process (torchrun, gloo) run killed with SIGKILL, for pre-training and for fine-tuning with
mixup/cutmix, and of a 4-process pre-training run one of whose ranks is killed; the fp16 grad
scaler (saved, restored, and skipping steps whose gradients overflow); bf16 autocast on CPU;
gradient clipping.

As in ``test_engine.py``: tiny ``*_test`` models on small images the tests write, one intra-op
thread everywhere, so that every run is bit-for-bit reproducible.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import ummae.tasks.pretrain as train
from _helpers import (
    _free_port,
    assert_tensors_equal,
    epoch_records,
    metrics_records,
    run_torchrun,
    smooth_images,
    stable,
    step_records,
    tiny_pretrain_config,
    write_colour_dataset,
)
from ummae.engine.seeds import mix_seed
from ummae.tasks.pretrain import pretrain
from ummae.weights import io as ckpt

# ---------------------------------------------------------------- data, runs, metrics


@pytest.fixture(scope="module")
def data24(tmp_path_factory) -> Path:
    return smooth_images(tmp_path_factory.mktemp("data24"), 24)


@pytest.fixture(scope="module")
def colour48(tmp_path_factory) -> Path:
    """Dataset root of the colour classes: 48 train images (16 per class), 6 val images."""
    return write_colour_dataset(tmp_path_factory.mktemp("colour48"), train_per_class=16, val_per_class=2)


_cfg = functools.partial(tiny_pretrain_config, vis_every=0)


def _assert_same_training(ref: Path, run: Path) -> None:
    """Same metrics records, step and epoch ones (wall-clock fields aside), and a bit-identical
    final model, optimiser and grad scaler."""
    rec_a, rec_b = stable(metrics_records(ref)), stable(metrics_records(run))
    assert [(r["epoch"], r["step"], "loss" in r) for r in rec_b] == [
        (r["epoch"], r["step"], "loss" in r) for r in rec_a
    ]
    for ra, rb in zip(rec_a, rec_b, strict=True):
        assert ra == rb, f"metrics differ at step {ra['step']}:\n{ra}\n{rb}"
    a = torch.load(Path(ref) / "checkpoint-last.pth", weights_only=True)
    b = torch.load(Path(run) / "checkpoint-last.pth", weights_only=True)
    assert_tensors_equal(a["model"], b["model"], "model")
    assert_tensors_equal(a["optimizer"], b["optimizer"], "optimizer")
    assert a["scaler"] == b["scaler"]
    assert (a["epoch"], a["update"]) == (b["epoch"], b["update"])


def _step_at(epoch: int, step: int, seed: int = 0, rank: int = 0) -> int:
    """The seed of the step generator at ``(epoch, step)`` of ``rank``: identifies a step in
    a step function, the same in a run and in its resumed continuation."""
    return mix_seed(seed, rank, epoch, step)


_REAL_PRETRAIN_STEP = train.pretrain_step


def _wrap_pretrain_step(monkeypatch, on_call):
    """Replace ``pretrain_step`` by ``on_call(model, batch, generator, real_step) -> dict``."""
    real = _REAL_PRETRAIN_STEP
    monkeypatch.setattr(train, "pretrain_step", lambda model, batch, generator: on_call(model, batch, generator, real))


class SimulatedCrash(Exception):
    pass


# ---------------------------------------------------------------- killing a torchrun run


def _children(pid: int) -> list:
    """Every live descendant of ``pid`` (from /proc: torchrun starts each worker in a session of
    its own, so killing torchrun's process group would leave the workers training)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _sigkill(pid: int) -> None:
    """SIGKILL ``pid`` and, when it leads one, its process group."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)


def _sigkill_run(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun launch and its workers, and wait until all of them are gone."""
    workers = _children(proc.pid)
    assert workers, "torchrun has no worker processes"
    for pid in workers:
        _sigkill(pid)
    _sigkill(proc.pid)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers):
        assert time.monotonic() < deadline, "workers survived SIGKILL"
        time.sleep(0.05)


def _latest_step(metrics: Path) -> int:
    step = 0
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                step = max(step, json.loads(line).get("step", 0))
    return step


def _rank_of(pid: int) -> int | None:
    """The torchrun RANK of worker ``pid`` (from its environment), or None."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _torchrun_killed_mid_epoch(
    args: list, out: Path, kill_after_update: int, log: Path, nproc: int = 2, kill_rank: int | None = None
) -> dict:
    """Start ``torchrun --nproc_per_node=nproc -m ummae <args> --output out`` (which must
    checkpoint every update) and, as soon as metrics.jsonl shows update ``kill_after_update``,
    SIGKILL it and its workers (or only the worker of ``kill_rank``, after which torchrun stops
    the others); return the checkpoint the run left."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        "-m",
        "ummae",
        *args,
        "--output",
        str(out),
    ]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while _latest_step(out / "metrics.jsonl") < kill_after_update:
                if proc.poll() is not None:
                    pytest.fail(
                        f"the run ended (exit {proc.returncode}) before it could be killed. Log:\n{log.read_text()[-3000:]}"
                    )
                if time.monotonic() > deadline:
                    pytest.fail(f"update {kill_after_update} not reached after 300 s. Log:\n{log.read_text()[-3000:]}")
                time.sleep(0.01)
            if kill_rank is None:
                _sigkill_run(proc)
            else:
                (victim,) = [pid for pid in _children(proc.pid) if _rank_of(pid) == kill_rank]
                _sigkill(victim)
                assert proc.wait(timeout=120) != 0  # torchrun stops the other workers and fails
        finally:
            if proc.poll() is None:  # the test failed before the kill: leave nothing running
                for pid in _children(proc.pid):
                    _sigkill(pid)
                _sigkill(proc.pid)
                proc.wait()
    return ckpt.load(out / "checkpoint-last.pth")


def _assert_killed_inside_epoch(state: dict, epoch: int) -> None:
    # The kill must leave a checkpoint written inside an epoch, so that the resumed run starts
    # mid-epoch with partial sums. A margin of several steps makes this all but certain.
    assert state["epoch"] == epoch and state["step_in_epoch"] > 0, (
        f"the kill landed at epoch {state['epoch']}, step {state['step_in_epoch']}, not inside epoch {epoch}"
    )


# ---------------------------------------------------------------- exact resume under torchrun

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="finds torchrun's workers in /proc (Linux)"
)


@needs_proc
def test_torchrun_pretrain__exact_resume_after_sigkill(data24, tmp_path):
    """A 2-process gloo pre-training run killed with SIGKILL inside an epoch (checkpoint every
    update, a log window of 2 updates, so checkpoints fall inside log windows), resumed under
    torchrun with --resume auto, logs the same per-step losses and the same epoch aggregates
    (``train_loss`` of the resumed epoch averages every rank's own losses, as uninterrupted) and
    ends with bit-identical weights and optimiser as an uninterrupted 2-process run."""
    # 24 images, 1 per rank per step, 2 ranks: 12 updates per epoch, 24 in all.
    args = [
        "pretrain",
        "--model",
        "mae_swin_test",
        "--data",
        str(data24),
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--batch-size",
        "1",
        "--blr",
        "0.05",
        "--num-workers",
        "0",
        "--log-every",
        "2",
        "--keep-every",
        "0",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--vis-every",
        "0",
    ]
    killed = tmp_path / "killed"
    state = _torchrun_killed_mid_epoch([*args, "--save-every-steps", "1"], killed, 14, tmp_path / "killed.log")
    _assert_killed_inside_epoch(state, 1)
    # The ranks trained on other images, so their partial sums differ: a resume that gave both
    # ranks rank 0's sums would change the resumed epoch's train_loss (and the log window's).
    assert len(state["ranks"]) == 2 and state["ranks"][0]["epoch_loss_sum"] != state["ranks"][1]["epoch_loss_sum"]

    run_torchrun([*args, "--save-every-steps", "1", "--resume", "auto", "--output", str(killed)], timeout=300)
    ref = tmp_path / "ref"
    run_torchrun([*args, "--output", str(ref)], timeout=300)

    assert [r["step"] for r in step_records(ref)] == list(range(2, 25, 2))
    assert [r["replica_max_diff"] for r in epoch_records(ref)] == [0.0, 0.0]
    _assert_same_training(ref, killed)


@needs_proc
def test_torchrun_pretrain__exact_resume_at_four_ranks_after_one_rank_is_killed(tmp_path):
    """4 gloo processes, rank 2 SIGKILLed inside an epoch, resumed with --resume auto: the
    same step and epoch records and bit-identical weights and optimiser as an uninterrupted
    4-process run. With 3 or more ranks the order in which the all-reduce sums the ranks'
    gradients depends on DDP's bucket layout, which must not change on the first step after a
    resume (at 2 ranks a sum has one order, so only this test sees it)."""
    data = smooth_images(tmp_path / "data", 16)
    # 16 images, 1 per rank per step, 4 ranks: 4 updates per epoch, 8 in all.
    args = [
        "pretrain",
        "--model",
        "mae_swin_test",
        "--data",
        str(data),
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--batch-size",
        "1",
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
        "--device",
        "cpu",
        "--vis-every",
        "0",
    ]
    killed = tmp_path / "killed"
    state = _torchrun_killed_mid_epoch(
        [*args, "--save-every-steps", "1"], killed, 6, tmp_path / "killed.log", nproc=4, kill_rank=2
    )
    _assert_killed_inside_epoch(state, 1)
    assert len(state["ranks"]) == 4

    run_torchrun([*args, "--save-every-steps", "1", "--resume", "auto", "--output", str(killed)], timeout=300, nproc=4)
    ref = tmp_path / "ref"
    run_torchrun([*args, "--output", str(ref)], timeout=300, nproc=4)

    assert [r["step"] for r in step_records(ref)] == list(range(1, 9))
    assert [r["replica_max_diff"] for r in epoch_records(ref)] == [0.0, 0.0]
    _assert_same_training(ref, killed)


@needs_proc
def test_torchrun_finetune__exact_resume_after_sigkill_with_mixup_cutmix(colour48, tmp_path):
    """The same for fine-tuning (RandAugment, random erasing, drop path, mixup and cutmix
    switching per batch, label smoothing, val evaluation every epoch): killed with SIGKILL
    inside an epoch and resumed under torchrun, it logs the same step losses, the same epoch
    records (train loss, val accuracy and loss) and ends with bit-identical weights as an
    uninterrupted 2-process run."""
    # 48 images, 2 per rank per step, 2 ranks: 12 updates per epoch, 24 in all.
    args = [
        "finetune",
        "--model",
        "swin_test",
        "--data",
        str(colour48),
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--num-workers",
        "0",
        "--log-every",
        "1",
        "--keep-every",
        "0",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--mixup",
        "0.8",
        "--cutmix",
        "1.0",
        "--mixup-prob",
        "1.0",
        "--mixup-switch-prob",
        "0.5",
    ]
    killed = tmp_path / "killed"
    state = _torchrun_killed_mid_epoch([*args, "--save-every-steps", "1"], killed, 14, tmp_path / "killed.log")
    _assert_killed_inside_epoch(state, 1)

    run_torchrun([*args, "--save-every-steps", "1", "--resume", "auto", "--output", str(killed)], timeout=300)
    ref = tmp_path / "ref"
    run_torchrun([*args, "--output", str(ref)], timeout=300)

    assert [r["step"] for r in step_records(ref)] == list(range(1, 25))
    epochs = epoch_records(ref)
    assert [r["epoch"] for r in epochs] == [0, 1] and all("acc1" in r and r["val_images"] == 6 for r in epochs)
    _assert_same_training(ref, killed)


# ---------------------------------------------------------------- mixed precision


def _allow_fp16_on_cpu(monkeypatch):
    """The CLI refuses fp16 on CPU; the engine itself runs it (CPU autocast in float16 and a
    CPU GradScaler), which is how its grad-scaler path is tested without a GPU."""
    from ummae.engine import precision

    real = precision.resolve_precision  # training_run looks it up there on every run
    monkeypatch.setattr(precision, "resolve_precision", lambda p, device: p if p == "fp16" else real(p, device))


def test_pretrain__fp16_on_cpu_is_refused(data24, tmp_path):
    """``--precision fp16`` without a GPU is refused with a message, so the grad-scaler tests
    below reach the engine's fp16 path on CPU by lifting that refusal."""
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        pretrain(_cfg(tmp_path / "o", data24, precision="fp16", device="cpu"))


FP16 = dict(epochs=2, batch_size=4, warmup_epochs=0, precision="fp16", device="cpu")  # 6 updates per epoch
OVERFLOW_AT = (0, 2)  # (epoch, step): update 3


def _fp16_step(seen: dict, crash_at=None):
    """A pre-training step whose loss at OVERFLOW_AT is multiplied by 1e30: finite in fp32,
    but its scaled gradients overflow fp16. Records the weights around that step."""

    def step(model, batch, generator, real):
        seed = generator.initial_seed()
        if crash_at is not None and seed == _step_at(*crash_at):
            raise SimulatedCrash(f"crash at {crash_at}")
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if "after_overflow" not in seen and "before_overflow" in seen:
            seen["after_overflow"] = weights
        elif "after_overflow" in seen and "after_next" not in seen:
            seen["after_next"] = weights
        out = real(model, batch, generator)
        if seed == _step_at(*OVERFLOW_AT):
            seen["before_overflow"] = weights
            seen["overflow_loss"] = float(out["loss"].detach()) * 1e30
            return {**out, "loss": out["loss"] * 1e30}
        return out

    return step


def test_pretrain__fp16_grad_scaler_skips_overflow_and_resumes_exactly(data24, tmp_path, monkeypatch):
    """fp16 runs through the grad scaler: a step whose scaled gradients overflow is skipped
    (weights unchanged, AdamW's step count not advanced) and halves the scale, while the next
    step trains; the scaler's state is saved in the checkpoint (scale 2^15 after the overflow)
    and restored by --resume, so a crashed and resumed fp16 run equals the uninterrupted one,
    scaler state included."""
    _allow_fp16_on_cpu(monkeypatch)
    seen: dict = {}
    _wrap_pretrain_step(monkeypatch, _fp16_step(seen))
    ref = tmp_path / "ref"
    pretrain(_cfg(ref, data24, **FP16))

    assert seen["overflow_loss"] < 1e35  # the loss itself is finite: no non-finite-loss stop
    assert_tensors_equal(seen["before_overflow"], seen["after_overflow"], "weights across the overflowed step")
    changed = [k for k in seen["after_overflow"] if not torch.equal(seen["after_overflow"][k], seen["after_next"][k])]
    assert len(changed) > 10, "the step after the overflow must update the weights"
    state = ckpt.load(ref / "checkpoint-last.pth")
    assert state["update"] == 12
    assert state["scaler"]["scale"] == 2.0**15  # init 2^16, one backoff, < 2000 good steps since
    assert state["scaler"]["_growth_tracker"] == 12 - 3  # good steps since the overflow
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {11}  # one of 12 updates skipped
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())

    # The same run, crashed at epoch 1, step 3 (last checkpoint: update 9), then resumed.
    out = tmp_path / "crashed"
    _wrap_pretrain_step(monkeypatch, _fp16_step({}, crash_at=(1, 3)))
    with pytest.raises(SimulatedCrash):
        pretrain(_cfg(out, data24, save_every_steps=1, **FP16))
    state = ckpt.load(out / "checkpoint-last.pth")
    assert (state["epoch"], state["step_in_epoch"], state["update"]) == (1, 3, 9)
    assert state["scaler"] == {**state["scaler"], "scale": 2.0**15, "_growth_tracker": 9 - 3}
    _wrap_pretrain_step(monkeypatch, _fp16_step({}))
    pretrain(_cfg(out, data24, save_every_steps=1, resume="auto", **FP16))
    _assert_same_training(ref, out)


def test_pretrain__bf16_autocast_on_cpu_keeps_fp32_weights(data24, tmp_path, monkeypatch):
    """With --precision bf16 on CPU the step runs under bf16 autocast: every Linear of the
    model computes in bf16 (its output dtype, seen by a forward hook) from fp32 weights; the
    gradients the optimiser applies and the saved weights stay fp32. With fp32 the same hooks
    see fp32 outputs (so the hook does tell the two apart)."""

    def run(precision: str) -> dict:
        seen = {"outputs": set(), "weights": set(), "grads": set(), "autocast": set()}

        def hook(module, inputs, output):
            seen["outputs"].add(output.dtype)
            seen["weights"].add(module.weight.dtype)

        def step(model, batch, generator, real):
            if not seen["outputs"]:
                for m in model.modules():
                    if isinstance(m, nn.Linear):
                        m.register_forward_hook(hook)
            seen["autocast"].add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return real(model, batch, generator)

        def build_optimizer(*a, **kw):
            opt = real_build(*a, **kw)
            opt.register_step_pre_hook(
                lambda o, *_: seen["grads"].update(
                    p.grad.dtype for g in o.param_groups for p in g["params"] if p.grad is not None
                )
            )
            return opt

        real_build = train.build_optimizer
        with monkeypatch.context() as m:
            m.setattr(train, "build_optimizer", build_optimizer)
            _wrap_pretrain_step(m, step)
            out = tmp_path / precision
            pretrain(_cfg(out, data24, precision=precision, device="cpu", max_steps_per_epoch=2))
        state = ckpt.load(out / "checkpoint-last.pth")
        seen["saved"] = {t.dtype for t in state["model"].values() if t.is_floating_point()}
        return seen

    bf16 = run("bf16")
    assert bf16["autocast"] == {(True, torch.bfloat16)}
    assert bf16["outputs"] == {torch.bfloat16}
    assert bf16["weights"] == bf16["grads"] == bf16["saved"] == {torch.float32}
    fp32 = run("fp32")
    assert fp32["autocast"] == {(False, torch.get_autocast_dtype("cpu"))}
    assert fp32["outputs"] == fp32["weights"] == fp32["grads"] == fp32["saved"] == {torch.float32}


# ---------------------------------------------------------------- gradient clipping


def _grad_norms(monkeypatch, out: Path, data: Path, **kw) -> tuple:
    """Run a short pre-training and return (total gradient norm the optimiser received at
    each update, the gradients of the first update)."""
    norms, first = [], {}

    def build_optimizer(*a, **kwargs):
        opt = real_build(*a, **kwargs)

        def hook(o, *_):
            grads = [p.grad for g in o.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            if not first:
                first.update({i: g.clone() for i, g in enumerate(grads)})

        opt.register_step_pre_hook(hook)
        return opt

    real_build = train.build_optimizer
    with monkeypatch.context() as m:
        m.setattr(train, "build_optimizer", build_optimizer)
        pretrain(_cfg(out, data, epochs=1, warmup_epochs=0, max_steps_per_epoch=4, **kw))
    return norms, first


def test_pretrain__clip_grad_bounds_the_norm_the_optimiser_applies(data24, tmp_path, monkeypatch):
    """With clip_grad=c every update's gradient, as the optimiser receives it, has total norm
    at most c, and the first update's gradient is the unclipped one scaled by c / norm (clipped,
    not otherwise changed); without clip_grad the same run's gradient norms all exceed c."""
    free, free_first = _grad_norms(monkeypatch, tmp_path / "free", data24)
    assert len(free) == 4
    c = min(free) / 4
    clipped, clipped_first = _grad_norms(monkeypatch, tmp_path / "clipped", data24, clip_grad=c)
    assert len(clipped) == 4
    assert all(n > c for n in free), (free, c)
    assert all(n <= c * (1 + 1e-5) for n in clipped), (clipped, c)
    assert clipped[0] == pytest.approx(c, rel=1e-5)  # every step is above c: each is clipped to c
    factor = c / (free[0] + 1e-6)  # clip_grad_norm_'s coefficient
    for i, g in free_first.items():
        torch.testing.assert_close(clipped_first[i], g * factor, rtol=1e-5, atol=1e-12)
