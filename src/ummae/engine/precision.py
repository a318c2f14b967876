"""Device and mixed-precision choices shared by training and benchmarking."""

from __future__ import annotations

import contextlib

import torch

from ummae.errors import UsageError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def is_device_name(name: str) -> bool:
    """auto, cpu, cuda or cuda:N."""
    return name in ("auto", "cpu") or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())


def resolve_device(name: str = "auto") -> torch.device:
    if not is_device_name(name):
        raise UsageError(f"bad device {name!r}: must be auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in _DTYPES:
        raise UsageError(f"bad precision {precision!r}: must be auto, bf16, fp16 or fp32")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast context for the forward pass; fp32 runs without autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A grad scaler that is active only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
