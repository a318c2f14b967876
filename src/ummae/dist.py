"""Distributed helpers for ``torchrun`` (DDP: NCCL on GPU, gloo on CPU). No print patching:
only rank 0 logs and writes files, by checking ``is_main``."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from .engine.precision import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto"):
    """Read torchrun's environment; start the process group when there is more than one
    process. Returns ``(DistInfo, torch.device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(t)
    return t


def replica_max_diff(model: torch.nn.Module) -> float:
    """Largest difference between this rank's parameters and rank 0's, as a float64 checksum
    per tensor (DDP must keep replicas identical; this proves it on every epoch)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return 0.0
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    ref = sums.clone()
    torch_dist.broadcast(ref, 0)
    diff = (sums - ref).abs().max()
    torch_dist.all_reduce(diff, op=torch_dist.ReduceOp.MAX)
    return float(diff)


def cleanup() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
