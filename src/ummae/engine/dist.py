"""Distributed helpers for ``torchrun`` (DDP: NCCL on GPU, gloo on CPU). No print patching:
only rank 0 logs and writes files, by checking ``is_main``."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from ummae.engine.precision import resolve_device


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


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def cleanup() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``[n_r, ...]`` tensor (``n_r`` may differ) in rank order."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    torch_dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def _initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def is_main_process() -> bool:
    return not _initialized() or torch_dist.get_rank() == 0


def all_gather_object(obj):
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a single process."""
    if not _initialized():
        return [obj]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    if not _initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def distributed(device_name: str = "auto"):
    """``with distributed(cfg.device) as (info, device):`` a run's process group, always
    destroyed at the end (an error included), so a failed run never hangs its peers."""
    info, device = init_distributed(device_name)
    try:
        yield info, device
    except BaseException:
        cleanup()  # at once: a peer may never reach a barrier
        raise
    # Every rank finishes its work before any tears the group down: rank 0 hosts the store,
    # and a gloo rank still talking to it when it goes away aborts ("terminate called ...").
    with contextlib.suppress(RuntimeError):  # a peer failed after the last collective: it reports its own error
        barrier()
    cleanup()


def loader_workers(requested: int) -> int:
    """Data-loader worker processes for ``--num-workers requested``: no more than this
    machine has CPUs (more only add start-up time and memory)."""
    return min(requested, os.cpu_count() or 1)
