"""Test helpers: image files the tests write themselves (random-noise images, small labelled datasets of separable colour classes) and exact comparison of two runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tiny_pretrain_config(out: Path, data: Path, **overrides):
    """The tests' small pre-training run: ``mae_swin_test``, one epoch at batch 4 with one
    warm-up epoch, blr 0.05, no loader workers, a metrics line per step, no numbered
    checkpoints, seed 0; ``overrides`` change any of it."""
    from ummae.config import PretrainConfig

    values = dict(model="mae_swin_test", data=str(data), output=str(out), epochs=1, warmup_epochs=1, batch_size=4,
                  blr=0.05, num_workers=0, log_every=1, keep_every=0, seed=0)  # fmt: skip
    return PretrainConfig(**{**values, **overrides})


def tiny_finetune_config(out: Path, data: Path, **overrides):
    """The tests' small fine-tuning run: ``swin_test`` from scratch, one epoch at batch 6 without
    warm-up, lr 1e-3 on the CPU, no loader workers, a metrics line per step, no numbered
    checkpoints, seed 0; ``overrides`` change any of it."""
    from ummae.config import FinetuneConfig

    values = dict(model="swin_test", data=str(data), output=str(out), epochs=1, warmup_epochs=0, batch_size=6,
                  lr=1e-3, num_workers=0, device="cpu", log_every=1, keep_every=0, seed=0)  # fmt: skip
    return FinetuneConfig(**{**values, **overrides})


# A detector small enough for CPU tests: 128 px canvas, 32-channel neck and FPN.
TINY_DETECTOR = dict(img_size=128, neck_channels=32, fpn_channels=32)


def tiny_detect_config(out: Path, data: Path, **overrides):
    """The tests' small detection run on :data:`TINY_DETECTOR`: two epochs at batch 2, blr
    1.6e-2, no drop path, no loader workers, a metrics line per step; ``overrides`` set the
    backbone, detector and anything else."""
    from ummae.config import DetectConfig

    values = dict(output=str(out), data=str(data), epochs=2, batch_size=2, num_workers=0, log_every=1, blr=1.6e-2,
                  drop_path=0.0, **TINY_DETECTOR)  # fmt: skip
    return DetectConfig(**{**values, **overrides})


def crashing_at(call: int, step, error: type[BaseException]):
    """A training step function that runs ``step``, except that its ``call``-th call raises
    ``error`` (a simulated crash, for the resume tests)."""
    calls = {"n": 0}

    def crashing(model, batch, generator):
        calls["n"] += 1
        if calls["n"] == call:
            raise error(f"crash at step {call}")
        return step(model, batch, generator)

    return crashing


# Class name -> mean RGB: far apart, so that any encoder (even a random one) separates them.
COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def write_image(path: Path, size=(40, 30), seed=0) -> Path:
    """Write a small random RGB image (noise, so different crops give different tensors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_colour_images(folder: Path, per_class: int, seed: int = 0, size: int = 72) -> Path:
    """An ImageFolder ``folder/<colour>/*.png`` of ``per_class`` distinct images per class:
    the class colour, a random per-image shade and smooth texture, plus pixel noise.
    72 px: the eval transform at 64 px resizes to 73 and center-crops."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shade = rng.uniform(-30, 30, 3)
            low = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
            texture = (np.asarray(low, dtype=np.float64) - 128) * 0.25
            img = np.asarray(rgb, dtype=np.float64) + shade + texture + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / name / f"{name}_{i}.png")
    return folder


def write_colour_dataset(root: Path, train_per_class: int = 6, val_per_class: int = 3, seed: int = 0) -> Path:
    """A dataset root with ``train/`` and ``val/`` ImageFolders of the colour classes."""
    write_colour_images(root / "train", train_per_class, seed=seed)
    write_colour_images(root / "val", val_per_class, seed=seed + 1000)
    return root


def write_pattern_images(folder: Path, per_class: int, seed: int = 0, size: int = 72, period: int = 12) -> Path:
    """An ImageFolder of three classes told apart by structure only: ``horizontal`` and
    ``vertical`` stripes and a ``checker`` board, each image in two random colours with a
    random phase (so no colour statistic separates the classes; a crop or a flip keeps them)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    half = period // 2
    for name in ("checker", "horizontal", "vertical"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            phase = rng.integers(0, period)
            rows, cols = (y + phase) // half, (x + phase) // half
            on = {"horizontal": rows, "vertical": cols, "checker": rows + cols}[name] % 2
            img = np.where(on[..., None] == 1, a, b) + rng.normal(0, 8, (size, size, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / name / f"{name}_{i}.png")
    return folder


# --- comparing runs ----------------------------------------------------------------------------
VOLATILE = ("images_per_s", "epoch_time_s", "peak_mem_mib")  # wall-clock values: differ between runs


def stable(records: list) -> list:
    """Metrics records without their wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def assert_tensors_equal(a, b, where: str = "state") -> None:
    """Exact equality of two nested dicts/lists of tensors and plain values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tensors_equal(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype, f"{where}: tensor kind differs"
        assert torch.equal(a, b), f"{where}: values differ (max |diff| {(a.double() - b.double()).abs().max():.3e})"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(target: list[str], nproc: int = 2) -> list[str]:
    """The command line that runs ``target`` (a script and its arguments, or ``-m`` and a
    module) under torchrun with ``nproc`` processes on one node."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        *target,
    ]


def run_torchrun(args: list[str], timeout: float, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run ``ummae <args>`` under torchrun on one node (gloo on CPU) and assert it exited 0,
    showing the tail of both streams when it did not."""
    cmd = torchrun_command(["-m", "ummae", *args], nproc)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def brute_unit_orders(mask, grid):
    """Per image, by loops over the full unit grid: the unit each compact token really comes
    from (compact token t = block (t // (grid/2), t % (grid/2)), whose one visible unit it is),
    and the reference code's assignment (the t-th visible unit in raster order of the grid)."""
    half = grid // 2
    kept, raster = [], []
    for m in mask.tolist():
        own = []
        for t in range(half * half):
            bi, bj = divmod(t, half)
            units = [(2 * bi + a) * grid + 2 * bj + b for a in range(2) for b in range(2)]
            (u,) = [u for u in units if not m[u]]
            own.append(u)
        kept.append(own)
        raster.append([u for u in range(grid * grid) if not m[u]])
    return torch.tensor(kept), torch.tensor(raster)


def smooth_images(folder: Path, n: int, size: int = 80, seed: int = 0) -> Path:
    """``n`` smooth random RGB images (a 4x4 noise image, bicubic-upsampled)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        small.resize((size, size), Image.BICUBIC).save(folder / f"img_{i:03d}.png")
    return folder


def metrics_records(out: Path) -> list:
    """Every line of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_records(out: Path) -> list:
    return [r for r in metrics_records(out) if "loss" in r]


def epoch_records(out: Path) -> list:
    return [r for r in metrics_records(out) if "train_loss" in r]


COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_mini"


def coco_subset(root: Path, n_train: int, n_val: int, val_from: str = "val2017") -> Path:
    """``experiments/coco_subset.py`` on ``../shared/data/coco_mini``: detection tests train and
    evaluate on a few real images in seconds. Fails when coco_mini is absent (CI has it)."""
    import importlib.util

    assert COCO_MINI.is_dir(), f"{COCO_MINI} is missing: the detection tests need ../shared/data/coco_mini"
    path = Path(__file__).resolve().parents[1] / "experiments" / "coco_subset.py"
    spec = importlib.util.spec_from_file_location("coco_subset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.coco_subset(COCO_MINI, root, n_train, n_val, val_from)


SEMSEG_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_semseg_mini"


def semseg_subset(root: Path, n_train: int, n_val: int) -> Path:
    """An ADE20K-layout root with the first ``n_train`` / ``n_val`` (sorted) image and label
    pairs of ``../shared/data/coco_semseg_mini`` and its label_map.txt."""
    import shutil

    if not SEMSEG_MINI.is_dir():
        raise FileNotFoundError(f"{SEMSEG_MINI} is missing: the segmentation tests need ../shared")
    for split, n in (("training", n_train), ("validation", n_val)):
        for kind in ("images", "annotations"):
            (root / kind / split).mkdir(parents=True)
        for img in sorted((SEMSEG_MINI / "images" / split).iterdir())[:n]:
            shutil.copy(img, root / "images" / split / img.name)
            shutil.copy(SEMSEG_MINI / "annotations" / split / f"{img.stem}.png", root / "annotations" / split)
    shutil.copy(SEMSEG_MINI / "label_map.txt", root / "label_map.txt")
    return root
