"""Pre-training data: datasets, the resumable distributed sampler and the loader."""
from .datasets import build_pretrain_dataset
from .sampler import ResumableSampler, build_pretrain_loader, collate_skip_bad

__all__ = ["build_pretrain_dataset", "collate_skip_bad", "ResumableSampler",
           "build_pretrain_loader"]
