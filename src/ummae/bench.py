"""Training-step throughput and peak memory of pre-training models, side by side.

``run_bench`` times full optimiser steps (forward under autocast, backward through the grad
scaler, AdamW step) of each model in turn, in one process, on one synthetic random batch, and
reports images/s, ms/step, peak memory and the speed ratio to the first model. It is what
``ummae bench`` runs (``add_bench_args`` + ``bench_main``); ``benchmarks/run_bench.sh`` runs the
paper's comparisons (UM-MAE vs SimMIM on Swin-T and PVT-S).

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA. On CPU it is the growth of the
process's resident set size over its value just before the model is built, sampled every ~2 ms
by a background thread (``ru_maxrss`` is a process-wide high-water mark, useless for the second
model of a run); between models the memory of the previous one is handed back to the OS
(``gc.collect`` + glibc ``malloc_trim``) so that every model starts from a fair baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import itertools
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ummae.data import build_pretrain_dataset, build_train_loader
from ummae.data.device_decode import EncodedBatch, PlannedCrop, collate_encoded
from ummae.data.shards import ShardStream
from ummae.engine.optim import build_optimizer, pretrain_no_weight_decay
from ummae.engine.precision import autocast, grad_scaler, resolve_device, resolve_precision
from ummae.engine.progress import progress
from ummae.errors import UmmaeError, UsageError
from ummae.models.registry import create_model, model_kind

__all__ = ["run_bench", "run_input_bench", "format_table", "format_input_table", "add_bench_args", "bench_main"]

_MIB = 1024.0 * 1024.0
_SAMPLE_INTERVAL_S = 0.002


# ----------------------------------------------------------------------------- memory helpers


def _rss_reader() -> Callable[[], int] | None:
    """A function returning the current resident set size in bytes, or None if unavailable."""
    if os.path.exists("/proc/self/statm"):
        page = os.sysconf("SC_PAGE_SIZE")

        def read_statm() -> int:
            with open("/proc/self/statm", "rb") as f:
                fields = f.read().split()
                return (int(fields[1]) - int(fields[2])) * page

        try:
            read_statm()
            return read_statm
        except (OSError, ValueError, IndexError):
            pass
    try:  # not Linux: psutil, when it happens to be installed
        import psutil  # type: ignore

        proc = psutil.Process()
        return lambda: int(proc.memory_info().rss)
    except Exception:
        return None


class _RssPeakSampler:
    """Background thread recording the highest RSS seen while it runs."""

    def __init__(self, read: Callable[[], int], interval: float = _SAMPLE_INTERVAL_S):
        self._read = read
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ummae-bench-rss", daemon=True)
        self.peak = read()

    def sample(self) -> None:
        try:
            rss = self._read()
        except Exception:
            return
        if rss > self.peak:
            self.peak = rss

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> _RssPeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


_LIBC = None


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere)."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # musl and friends have no malloc_trim
        pass


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _malloc_trim()


# ----------------------------------------------------------------------------- environment


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _environment(device: torch.device) -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "device_name": _device_name(device),
        "num_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- benchmark


class _RuntimeWarmup(torch.nn.Module):
    """A throwaway module using the usual transformer ops (conv, norm, attention, MLP, gather)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, width, 4, 4)
        self.norm = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width)
        )

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.embed(imgs).flatten(2).transpose(1, 2)
        keep = torch.rand(x.shape[:2], device=x.device).argsort(dim=1)[:, : x.shape[1] // 2]
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[2]))
        q, k, v = self.qkv(self.norm(x)).reshape(x.shape[0], x.shape[1], 3, 4, -1).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + a.transpose(1, 2).reshape_as(x)
        x = x + self.mlp(x)
        return (x.float() - 1.0).pow(2).mean()


def _warm_runtime(device: torch.device, precision: str) -> None:
    """Run a few training steps of a throwaway model before measuring anything.

    The first training step in a process pays one-time costs (thread pools, allocator arenas,
    kernel libraries' lazy set-up) that would otherwise be charged to the first model's peak
    memory and speed. The RNG state is saved and restored, so results do not depend on this.
    """
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    model = _RuntimeWarmup().to(device).train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    scaler = grad_scaler(device, precision)
    imgs = torch.randn(4, 3, 32, 32, device=device)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = model(imgs)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del model, opt, scaler, imgs, loss
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


def _validate(
    models: list[str], batch_size: int, img_size: int | None, steps: int, warmup: int, unit_size: int | None = None
) -> None:
    if isinstance(models, str):
        raise UsageError("models must be a list of model names, not a string")
    if not models:
        raise UsageError("no models to benchmark")
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    if warmup < 0:
        raise UsageError(f"warmup must be >= 0, got {warmup}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if img_size is not None and img_size < 1:
        raise UsageError(f"img_size must be >= 1, got {img_size}")
    if unit_size is not None and unit_size < 1:
        raise UsageError(f"unit_size must be >= 1, got {unit_size}")
    for name in models:  # all names checked before anything runs
        kind = model_kind(name)  # raises UsageError naming an unknown model
        if kind != "pretrain":
            raise UsageError(f"model {name!r} is a {kind} model; bench times pre-training models")


def _loss_of(out) -> torch.Tensor:
    if isinstance(out, dict):
        return out["loss"]
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"model returned {type(out).__name__}; expected a dict with a 'loss' entry")


def _time_steps(
    name: str,
    batch_size: int,
    img_size: int | None,
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str,
    seed: int,
    compile: bool = False,
    flops: bool = False,
    backend: str = "inductor",
    unit_size: int | None = None,
) -> dict[str, object]:
    """Build model ``name`` (at ``img_size`` and mask ``unit_size``; None: the model's) and run
    ``warmup`` untimed then ``steps`` timed training steps on one synthetic batch; ``img_size``,
    ``unit_size``, ``mask_units`` (per image, of the masks drawn), ``elapsed`` (seconds of the timed steps), last ``loss`` and ``params_m``. The masks are drawn before the model call, as the training step draws them.

    ``compile``: the model call under ``torch.compile``; its first step is timed apart
    (``first_step_s``: compilation and one step) and counts as a warm-up step. ``flops``: one
    more (eager) step under ``FlopCounterMode`` gives ``flops_per_image`` (forward + backward)."""
    cuda = device.type == "cuda"
    torch.manual_seed(seed)  # same init and mask stream on every run
    model = create_model(name, img_size=img_size, unit_size=unit_size).to(device).train()
    size = img_size if img_size is not None else getattr(model, "default_img_size", None)
    if size is None:
        raise UsageError(f"model {name!r} has no default_img_size; pass img_size")
    n_params = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, 1e-4, 0.05, (0.9, 0.95), device, no_decay=pretrain_no_weight_decay)  # pre-training's
    scaler = grad_scaler(device, precision)
    # The same batch for every model (of one size): drawn from its own seeded generator.
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch_size, 3, size, size, generator=gen).to(device)
    call = torch.compile(model, backend=backend) if compile else model

    mask_units = []  # the units per image of the masks the steps drew (the grid the model masks)

    def step(call=call) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        mask, sm_mask = model.sample_masks(imgs.shape[0], imgs.device)  # outside the compiled call
        mask_units[:] = [mask.shape[-1]]
        with autocast(device, precision):
            loss = _loss_of(call(imgs, mask=mask, sm_mask=sm_mask, validate=False))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    first_step_s = None
    if compile:
        warmup = max(warmup, 1)
    t0 = 0.0
    label = f"bench {name}{' compiled' if compile else ''} ({warmup} warm-up + {steps} timed)"
    for i in progress(range(warmup + steps), desc=label, unit="step"):
        if i == warmup:  # the timed steps start here
            sync()
            t0 = time.perf_counter()
        if i == 0 and compile:
            t_first = time.perf_counter()
            loss = step()
            sync()
            first_step_s = time.perf_counter() - t_first
            continue
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    out = {
        "img_size": int(size),
        "unit_size": getattr(model, "unit_size", None),
        "mask_units": mask_units[0],
        "elapsed": elapsed,
        "loss": float(loss.float().item()),
        "params_m": n_params / 1e6,
    }
    out["first_step_s"] = first_step_s
    if flops:
        with FlopCounterMode(display=False) as counter:
            step(model)
        out["flops_per_image"] = counter.get_total_flops() / batch_size
    return out


def _bench_one(
    name: str,
    batch_size: int,
    img_size: int | None,
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str,
    seed: int,
    rss: Callable[[], int] | None,
    compile: bool = False,
    flops: bool = False,
    backend: str = "inductor",
    unit_size: int | None = None,
) -> dict[str, object]:
    """The result row of model ``name``: :func:`_time_steps` with its peak memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    sampler = _RssPeakSampler(rss) if rss is not None and not cuda else None
    baseline = sampler.peak if sampler is not None else 0
    with sampler if sampler is not None else contextlib.nullcontext():
        out = _time_steps(
            name, batch_size, img_size, steps, warmup, device, precision, seed, compile, flops, backend, unit_size
        )
    if cuda:
        peak_mb: float | None = torch.cuda.max_memory_allocated(device) / _MIB
    elif sampler is not None:
        peak_mb = max(0, sampler.peak - baseline) / _MIB
    else:
        peak_mb = None

    elapsed = max(out["elapsed"], 1e-12)
    step_s = elapsed / steps
    first = out["first_step_s"]
    extra = {"flops_per_image": out["flops_per_image"]} if "flops_per_image" in out else {}
    return {
        "model": name,
        "compiled": compile,
        "compile_backend": backend if compile else None,
        # the first compiled step less one steady step: the time compilation cost
        "compile_s": max(0.0, first - step_s) if first is not None else None,
        **extra,
        "batch_size": batch_size,
        "img_size": out["img_size"],
        "unit_size": out["unit_size"],
        "mask_units": out["mask_units"],
        "steps": steps,
        "device": str(device),
        "precision": precision,
        "images_per_s": batch_size * steps / elapsed,
        "step_time_ms": 1000.0 * elapsed / steps,
        "peak_mem_mb": peak_mb,
        "loss": out["loss"],
        "params_m": out["params_m"],
    }


def run_bench(
    models: list[str],
    batch_size: int,
    img_size: int | None,
    steps: int,
    warmup: int,
    device: str,
    precision: str,
    seed: int = 0,
    compile: bool = False,
    flops: bool = False,
    compile_backend: str = "inductor",
    unit_size: int | None = None,
) -> list[dict[str, object]]:
    """Time ``steps`` full training steps of each model (after ``warmup`` untimed ones).

    ``compile``: each model twice, eager then under ``torch.compile`` (rows side by side; the
    compiled row has ``compile_s``, apart from its step rate, and ``speedup``, its images/s over
    the eager row's; ``compile_backend`` as ``--compile-backend``). ``flops``: ``flops_per_image`` of each row (FlopCounterMode, one step).

    Returns one dict per model, in order: ``model``, ``images_per_s``, ``step_time_ms``,
    ``peak_mem_mb`` (MiB; CUDA: peak allocated, CPU: peak RSS growth), ``ratio`` (images/s over
    the first model's), ``batch_size``, ``img_size``, ``unit_size`` (the mask unit: ``unit_size``,
    None: each model's own), ``mask_units`` (units per image of the masks drawn), ``steps``, ``device``, ``precision``,
    ``loss`` (last step), ``params_m`` and the environment (``torch``, ``device_name``,
    ``num_threads``). Raises UsageError for unknown models and bad sizes or counts.
    """
    models = list(models) if not isinstance(models, str) else models
    _validate(models, batch_size, img_size, steps, warmup, unit_size)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    env = _environment(dev)
    rss = None if dev.type == "cuda" else _rss_reader()

    _warm_runtime(dev, prec)
    results: list[dict[str, object]] = []
    for name in models:
        for compiled in (False, True) if compile else (False,):
            _release_memory(dev)  # previous model's memory back to the OS: a fair baseline
            res = _bench_one(
                name,
                batch_size,
                img_size,
                steps,
                warmup,
                dev,
                prec,
                seed,
                rss,
                compiled,
                flops,
                compile_backend,
                unit_size,
            )
            res.update(env)
            if compiled:
                eager = results[-1]["images_per_s"]
                res["speedup"] = res["images_per_s"] / eager if eager > 0 else None
            results.append(res)
    _release_memory(dev)

    first = results[0]["images_per_s"]
    for res in results:
        res["ratio"] = res["images_per_s"] / first if first > 0 else None
    return results


# ----------------------------------------------------------------------------- input pipeline


def _samples(dataset, n: int, seed: int):
    """Training samples of ``dataset`` read in this process, epoch after epoch: at least ``n``."""
    if isinstance(dataset, ShardStream):
        dataset.configure(1, 1, 0, seed, 0)
        for epoch in range(n):  # epochs until n samples
            dataset.set_epoch(epoch)
            yield from (item[0] for item in dataset)
    else:
        for i in range(len(dataset) * n):
            yield dataset.load_or_substitute((i % len(dataset), seed + i))[0]


def _time_samples(
    dataset, n: int, seed: int, img_size: int, device: torch.device, desc: str = "", report: bool = True
) -> tuple[int, float]:
    """(samples, seconds) of reading ``n`` training samples in this process (decode + augment;
    for the ``device`` pipeline also the batched decode on ``device``, 32 at a time), with
    progress reported as ``desc`` when ``report``."""
    t0 = time.perf_counter()
    count, pending = 0, []
    for item in progress(
        itertools.islice(_samples(dataset, n, seed), n), total=n, desc=desc, unit="img", is_main=report
    ):
        pending.append(item)
        count += 1
        if len(pending) == 32 or count >= n:
            if any(isinstance(x, PlannedCrop) for x in pending):
                EncodedBatch(pending, img_size).decode(device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            pending = []
    return count, time.perf_counter() - t0


def _batches(loader, sampler, epochs: int):
    """The batches of ``loader``, epoch after epoch."""
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        yield from loader


def _time_loader(
    data: str, img_size: int, pipeline: str, workers: int, images: int, batch_size: int, seed: int, device: torch.device
) -> float | None:
    """Images/s of the training loader with ``workers`` workers over ``images`` samples (the
    first batch untimed: it waits for the workers to start); None when no batch was timed."""
    ds = build_pretrain_dataset(data, img_size, pipeline=pipeline)
    extra = {"collate_fn": collate_encoded(img_size)} if pipeline == "device" else {}
    loader, sampler = build_train_loader(ds, batch_size, workers, seed=seed, **extra)
    n_batches = 1 + math.ceil(images / batch_size)  # every training batch is full (drop_last)
    seen, t0 = 0, None
    for batch in progress(
        itertools.islice(_batches(loader, sampler, images), n_batches),
        total=n_batches,
        desc=f"input {pipeline}, {workers} workers",
        unit="batch",
    ):
        if t0 is None:
            t0 = time.perf_counter()
            continue
        if isinstance(batch[0], EncodedBatch):
            batch[0].decode(device)
        seen += batch[0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - t0) if seen else None


def run_input_bench(
    data: str,
    img_size: int = 256,
    pipelines=("pil", "tensor"),
    workers: int = 0,
    images: int = 200,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
) -> list[dict[str, object]]:
    """Images/s of the pre-training sample pipeline alone (read, decode, RandomResizedCrop,
    flip, and for ``pil`` the float normalisation; ``tensor`` normalises on the device) on
    ``data`` (any ``pretrain --data``: a folder, a list file, tar shards).

    ``per_core``: ``images`` samples read in this process with one torch thread (after a few
    untimed ones). ``total``: with ``workers`` DataLoader workers (0: skipped), the batches of
    ``images`` samples as training reads them (the first batch untimed: worker start-up).
    One dict per pipeline: ``pipeline``, ``per_core_images_per_s``, ``workers``,
    ``total_images_per_s``, ``images``, ``img_size``, ``data``. The ``device`` pipeline's
    figures include its batched decode on ``device`` (nvJPEG on CUDA) in this process."""
    dev = resolve_device(device)

    if images < 1 or img_size < 16 or workers < 0 or batch_size < 1:
        raise UsageError(
            f"bad input bench settings: images {images}, img_size {img_size}, workers {workers}, "
            f"batch size {batch_size}"
        )
    threads = torch.get_num_threads()
    results = []
    try:
        for pipeline in pipelines:
            torch.set_num_threads(1)
            ds = build_pretrain_dataset(data, img_size, pipeline=pipeline)
            _time_samples(ds, min(8, images), seed + 1, img_size, dev, report=False)  # warm caches and lazy imports
            n, dt = _time_samples(ds, images, seed, img_size, dev, desc=f"input {pipeline}, one core")
            row = {
                "pipeline": pipeline,
                "per_core_images_per_s": n / dt,
                "workers": workers,
                "total_images_per_s": None,
                "images": n,
                "img_size": img_size,
                "data": str(data),
            }
            if workers:
                torch.set_num_threads(threads)
                row["total_images_per_s"] = _time_loader(
                    data, img_size, pipeline, workers, images, batch_size, seed, dev
                )
            results.append(row)
    finally:
        torch.set_num_threads(threads)
    return results


def format_input_table(results: list[dict[str, object]]) -> str:
    header = ["pipeline", "img", "images/s per core", "workers", "images/s total", "ratio per core"]
    first = results[0]["per_core_images_per_s"]
    rows = [
        [
            str(r["pipeline"]),
            str(r["img_size"]),
            _fmt(r["per_core_images_per_s"], ".1f"),
            str(r["workers"]),
            _fmt(r["total_images_per_s"], ".1f"),
            _fmt(r["per_core_images_per_s"] / first, ".2f"),
        ]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in [header, ["-" * w for w in widths]] + rows
    )


# ----------------------------------------------------------------------------- output


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def format_table(results: list[dict[str, object]]) -> str:
    """A plain text table: model, batch, img, unit (the mask unit), images/s, ms/step, peak MiB, ratio; with compiled
    rows also the compile time and the speed-up over eager."""
    compiled = any(r.get("compiled") for r in results)
    header = ["model", "batch", "img", "unit", "images/s", "ms/step", "peak MiB", "ratio"]
    header += ["compile s", "speedup"] if compiled else []
    rows = [
        [
            str(r["model"]) + (" (compiled)" if r.get("compiled") else ""),
            str(r["batch_size"]),
            str(r["img_size"]),
            _fmt(r.get("unit_size"), "d"),
            _fmt(r["images_per_s"], ".2f"),
            _fmt(r["step_time_ms"], ".1f"),
            _fmt(r["peak_mem_mb"], ".1f"),
            _fmt(r.get("ratio"), ".3f"),
        ]
        + ([_fmt(r.get("compile_s"), ".1f"), _fmt(r.get("speedup"), ".3f")] if compiled else [])
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])  # model name left, numbers right
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first] + rest).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _model_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated model names")
    return names


def add_bench_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``ummae bench`` flags to ``parser`` (and return it)."""
    parser.add_argument(
        "--models",
        type=_model_list,
        default=None,
        help="comma-separated registered models, e.g. simmim_swin_tiny_256,mae_swin_tiny_256; "
        "ratio is relative to the first (required unless --data is given)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="time the pre-training input pipeline alone on this data (a folder, list file or tar "
        "shards): images/s per core and with --workers, beside the models' step rate",
    )
    parser.add_argument(
        "--pipelines",
        default="pil,tensor",
        help="with --data: input pipelines to time, comma-separated: pil, tensor, device (its "
        "batched JPEG decode on --device) (default pil,tensor)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="with --data: also time a DataLoader with this many workers (default 0: per core only)",
    )
    parser.add_argument("--images", type=int, default=200, help="with --data: images timed per pipeline (default 200)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: each model's own)")
    parser.add_argument(
        "--unit-size",
        type=int,
        default=None,
        help="mask unit size in pixels, as `ummae pretrain --unit-size` (default: each model's own, 16 px for the "
        "pyramid models)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (grad scaler) or fp32",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the input batch, init and masks (default 0)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="time each model eager and under torch.compile, side by side (compile time apart from the step rate)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="with --compile: torch.compile's backend (default inductor; aot_eager / eager skip code generation)",
    )
    parser.add_argument(
        "--flops",
        action="store_true",
        help="also count each model's training FLOPs per image (FlopCounterMode, one extra step): for MFU",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the results as a JSON list to PATH (folders are created)",
    )
    return parser


def bench_main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; print the table(s); write JSON. Returns an exit
    code. With ``--models`` and ``--data`` the input pipeline is timed at the first model's
    input size, and a last line says which of the two limits training."""
    data = getattr(args, "data", None)
    if args.models is None and not data:
        print(
            "ummae bench: error: give --models (training-step speed), --data (input pipeline speed) or both",
            file=sys.stderr,
        )
        return 2
    results: list[dict[str, object]] = []
    inputs: list[dict[str, object]] = []
    try:
        if args.models is not None:
            models = args.models if isinstance(args.models, list) else _model_list(args.models)
            results = run_bench(
                models,
                batch_size=args.batch_size,
                img_size=args.img_size,
                steps=args.steps,
                warmup=args.warmup,
                device=args.device,
                precision=args.precision,
                seed=args.seed,
                compile=getattr(args, "compile", False),
                flops=getattr(args, "flops", False),
                compile_backend=getattr(args, "compile_backend", "inductor"),
                unit_size=getattr(args, "unit_size", None),
            )
            r0 = results[0]
            print(
                f"torch {r0['torch']} | device {r0['device']} ({r0['device_name']}) | "
                f"threads {r0['num_threads']} | precision {r0['precision']} | "
                f"steps {r0['steps']} (+{args.warmup} warm-up)"
            )
            print(format_table(results))
        if data:
            pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
            size = args.img_size or (int(results[0]["img_size"]) if results else 256)
            inputs = run_input_bench(
                data, size, pipelines, args.workers, args.images, args.batch_size, args.seed, args.device
            )
            print(
                f"input pipeline on {data} ({inputs[0]['images']} images, {os.cpu_count()} CPUs here; per core: "
                f"one process, one torch thread)"
            )
            print(format_input_table(inputs))
    except UmmaeError as e:  # a user error: one line (anything else is a bug: its traceback)
        print(f"ummae bench: error: {e}", file=sys.stderr)
        return 2
    if results and inputs:
        feed = max((r["total_images_per_s"] or r["per_core_images_per_s"]) for r in inputs)
        need = max(float(r["images_per_s"]) for r in results)
        how = f"{args.workers} workers" if args.workers else "one core"
        which = "the input pipeline" if feed < need else "the model"
        print(f"limit: {which} (input {feed:.1f} images/s with {how}, fastest model step {need:.1f} images/s)")
    _write_json(args, results + inputs)
    return 0


def _write_json(args: argparse.Namespace, rows: list[dict[str, object]]) -> None:
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
        print(f"wrote {path}")
