"""The training step's semantics, each against a formulation written out here: gradient
accumulation is one step over the concatenated batch (the loss scaled by 1/accum_iter, the
clipping applied to the effective batch's gradient); fine-tuning's Mixup / CutMix draws are
timm's ``Mixup`` sequence (mix with ``--mixup-prob``, CutMix with ``--mixup-switch-prob``, lam
from Beta(alpha, alpha), targets label-smoothed), seeded by the step; a step's masks are a
function of (seed, rank, epoch, step) only, whatever else draws random numbers in between.
(The EMA against its formula: tests/test_finetune_parts.py::test_ema__weights_are_...)"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ummae.config import FinetuneConfig, PretrainConfig
from ummae.data.sampler import build_train_loader
from ummae.engine.dist import DistInfo
from ummae.engine.seeds import mix_seed
from ummae.engine.trainer import Trainer
from ummae.models import create_model
from ummae.tasks.classify import classify_step
from ummae.tasks.pretrain import pretrain_step


class _GradsAtStep(torch.optim.SGD):
    """Plain SGD that keeps a copy of the gradients it is asked to step with."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


class _Items(torch.utils.data.Dataset):
    """Fixed items; the resumable sampler's keys are (index, augmentation seed)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        return self.items[key[0]]


def _items(n: int, dim: int = 5, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(dim, generator=g), int(torch.randint(0, 3, (), generator=g))) for _ in range(n)]


def _fit(cfg, model, items, step_fn, optimizer=None, rank: int = 0):
    """The engine's Trainer over ``items`` (the real resumable loader), ``step_fn`` as a task's."""
    loader, sampler = build_train_loader(_Items(items), cfg.batch_size, 0, 1, 0, cfg.seed)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = Trainer(
        cfg, model, optimizer, loader, sampler, torch.device("cpu"), "fp32", 0.1, DistInfo(rank=rank), step_fn
    )
    trainer.fit()
    return optimizer


@pytest.mark.parametrize("clip_grad", [None, 0.05])
def test_accumulation__n_micro_steps_are_one_step_over_the_concatenated_batch(tmp_path, clip_grad):
    """accum_iter 3 at batch 2: the gradient the optimiser steps with is the gradient of the
    mean loss over the 6 images of the three micro-batches (each micro-batch's mean loss /3),
    clipped as one: g * min(1, c / (|g| + 1e-6)) over all parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    reference = [p.detach().clone() for p in model.parameters()]
    cfg = FinetuneConfig(data="unused", output=str(tmp_path), epochs=1, warmup_epochs=0, batch_size=2, accum_iter=3,
                         lr=0.1, clip_grad=clip_grad, device="cpu", num_workers=0, keep_every=0, log_every=1)  # fmt: skip
    seen_batches = []

    def step(net, batch, generator):
        x, y = batch[0], batch[1]
        seen_batches.append((x.clone(), y.clone()))
        return {"loss": F.cross_entropy(net(x), y)}

    opt = _fit(cfg, model, _items(6), step, _GradsAtStep(model.parameters(), lr=0.1))
    assert len(seen_batches) == 3 and len(opt.seen) == 1  # 6 images / batch 2: one update of 3 micro-steps

    # the independent formulation: the same weights, one batch of the 6 images, plain autograd
    params = [p.clone().requires_grad_() for p in reference]
    x = torch.cat([b[0] for b in seen_batches])
    y = torch.cat([b[1] for b in seen_batches])
    hidden = torch.tanh(x @ params[0].T + params[1])
    loss = F.cross_entropy(hidden @ params[2].T + params[3], y)
    grads = torch.autograd.grad(loss, params)
    if clip_grad is not None:
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        assert norm > clip_grad  # the clip bites
        grads = [g * min(1.0, clip_grad / (float(norm) + 1e-6)) for g in grads]
    for got, want in zip(opt.seen[0], grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- Mixup / CutMix
def _timm_draws(seed: int, prob: float, switch_prob: float, mixup_alpha: float, cutmix_alpha: float):
    """timm's ``Mixup._params_per_batch`` written out: from numpy seeded with the step's seed,
    u < prob mixes; then, both alphas on, u' < switch_prob picks CutMix; lam ~ Beta(a, a) of
    the one picked. -> (mixed, cutmix, lam)."""
    rng = np.random.RandomState(seed % 2**32)
    if not rng.rand() < prob:
        return False, False, 1.0
    cutmix = rng.rand() < switch_prob
    alpha = cutmix_alpha if cutmix else mixup_alpha
    return True, cutmix, float(rng.beta(alpha, alpha))


def _smoothed(y: torch.Tensor, k: int, e: float) -> torch.Tensor:
    return F.one_hot(y, k).double() * (1 - e) + e / k


def test_mixup__the_draws_and_the_targets_are_timms_mixup_with_the_options_given():
    """Over 60 step seeds, with every option away from its default: a batch is left alone, mixed
    (x lam + flipped x (1 - lam)) or cut (each pixel from x or the flipped batch, lam the share
    from x) exactly as the written-out draws say, and its targets are the label-smoothed
    one-hots mixed with the same lam."""
    k, e, prob, switch, a_mix, a_cut = 5, 0.2, 0.6, 0.3, 0.4, 2.0
    cfg = FinetuneConfig(data="x", smoothing=e, mixup=a_mix, cutmix=a_cut, mixup_prob=prob, mixup_switch_prob=switch)
    step = classify_step(cfg, num_classes=k)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8, generator=g).double(), torch.tensor([0, 1, 2, 4])
    seen = {}

    class Capture(nn.Module):
        def forward(self, images):
            seen["images"] = images
            return torch.zeros(images.shape[0], k)

    step.criterion = lambda logits, target: seen.__setitem__("target", target) or logits.sum()
    kinds = []
    for seed in range(60):
        step(Capture(), (x.clone(), y), torch.Generator().manual_seed(seed))
        mixed, cutmix, lam = _timm_draws(seed, prob, switch, a_mix, a_cut)
        images, target = seen["images"], seen["target"].double()
        soft, soft_flipped = _smoothed(y, k, e), _smoothed(y.flip(0), k, e)
        if not mixed:
            assert torch.equal(images, x)
        elif not cutmix:
            torch.testing.assert_close(images, x * lam + x.flip(0) * (1 - lam))
        else:
            from_x, from_flip = images == x, images == x.flip(0)
            assert bool((from_x | from_flip).all())
            lam = float(from_x[0, 0].double().mean())  # timm's lam corrected to the box it cut
        torch.testing.assert_close(target, soft * lam + soft_flipped * (1 - lam), rtol=1e-5, atol=1e-6)
        kinds.append("cutmix" if cutmix else "mixup" if mixed else "none")
    assert {"none", "mixup", "cutmix"} <= set(kinds)  # every branch was checked


def test_mixup__the_probabilities_over_many_steps():
    """The shares of mixed and of cut batches over 2000 seeds of the Mixup the options build
    are --mixup-prob and --mixup-prob x --mixup-switch-prob (within 4 standard errors)."""
    prob, switch = 0.7, 0.25
    mix = classify_step(FinetuneConfig(data="x", mixup_prob=prob, mixup_switch_prob=switch), num_classes=3).mixup
    n, mixed, cut = 2000, 0, 0
    for seed in range(n):
        np.random.seed(seed)
        lam, cutmix = mix._params_per_batch()
        mixed += lam != 1.0
        cut += cutmix
    for share, p in ((mixed / n, prob), (cut / n, prob * switch)):
        assert abs(share - p) < 4 * (p * (1 - p) / n) ** 0.5, (share, p)


# --------------------------------------------------------------------------- masks
def _mask_run(tmp_path, rank: int = 0, disturb: bool = False):
    """The masks (US, SM) of every step of two epochs of a real pre-training model under the
    Trainer, and the model; ``disturb``: every step first draws from torch's, numpy's and
    Python's global RNGs."""
    model = create_model("mae_swin_test")
    cfg = PretrainConfig(data="x", output=str(tmp_path / f"r{rank}{disturb}"), epochs=2, warmup_epochs=0,
                         batch_size=2, lr=1e-3, device="cpu", num_workers=0, keep_every=0, vis_every=0, seed=3)  # fmt: skip
    masks = []
    sample = model.sample_masks

    def recording(n, device, generator=None):
        out = sample(n, device, generator)
        masks.append((out[0].clone(), out[1].clone()))
        return out

    model.sample_masks = recording

    def step(net, batch, generator):
        if disturb:
            torch.rand(7), np.random.rand(3), random.random()
        return pretrain_step(net, batch, generator)

    items = [(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), 0) for _ in range(4)]
    _fit(cfg, model, items, step, torch.optim.SGD(model.parameters(), lr=0.0), rank=rank)
    return masks, model


def test_masks__a_function_of_seed_rank_epoch_and_step_only(tmp_path):
    masks, model = _mask_run(tmp_path)
    assert len(masks) == 4  # 2 epochs x 2 steps
    for i, (mask, sm_mask) in enumerate(masks):
        epoch, step = divmod(i, 2)
        # the model's own draw (its class's method: the instance's is the recording one) from
        # a generator seeded with the step's key and nothing else
        g = torch.Generator().manual_seed(mix_seed(3, 0, epoch, step))
        want, want_sm = type(model).sample_masks(model, 2, torch.device("cpu"), g)
        assert torch.equal(mask, want) and torch.equal(sm_mask, want_sm), (epoch, step)
    disturbed, _ = _mask_run(tmp_path, disturb=True)
    for (a, sa), (b, sb) in zip(masks, disturbed, strict=True):
        assert torch.equal(a, b) and torch.equal(sa, sb)
    other_rank, _ = _mask_run(tmp_path, rank=1)
    assert not torch.equal(masks[0][0], other_rank[0][0])  # each rank draws its own
