"""The fine-tuning recipe's parts against formulas written here: label smoothing, mixup seeded
by the step (not numpy's global state), MAE's LARS step, the EMA of the weights."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ummae.config import FinetuneConfig
from ummae.tasks.classify import classify_step, finetune, lars_optimizer
from ummae.weights import io as ckpt


class _Logits(nn.Module):
    """A 'model' whose output is its input's mean colour times a fixed matrix."""

    def __init__(self, k: int = 4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, k, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x.mean(dim=(2, 3)) @ self.w


def _batch(n=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, k, (n,), generator=g)


def test_label_smoothing__loss_is_the_formula():
    """No mixup, smoothing e: loss = (1 - e) * NLL(target) + e * mean over classes of -log p."""
    step = classify_step(FinetuneConfig(mixup=0.0, cutmix=0.0, smoothing=0.1), num_classes=4)
    model, (x, y) = _Logits(), _batch()
    loss = step(model, (x, y), torch.Generator().manual_seed(1))["loss"]
    logp = F.log_softmax(model(x), -1)
    want = (0.9 * -logp[torch.arange(6), y] + 0.1 * -logp.mean(-1)).mean()
    torch.testing.assert_close(loss, want)


def test_mixup__smoothed_soft_targets_for_a_lone_image():
    """A batch of one cannot be mixed: its target is the smoothed one-hot, e/K off and
    1 - e + e/K on, and the loss is the soft cross-entropy."""
    step = classify_step(FinetuneConfig(mixup=0.8, cutmix=1.0, smoothing=0.1), num_classes=4)
    model, (x, y) = _Logits(), _batch(n=1)
    loss = step(model, (x, y), torch.Generator().manual_seed(1))["loss"]
    target = torch.full((1, 4), 0.1 / 4)
    target[0, y] = 0.9 + 0.1 / 4
    torch.testing.assert_close(loss, (-target * F.log_softmax(model(x), -1)).sum(-1).mean())


def test_mixup__depends_on_the_step_seed_only():
    """The mixed batch is a function of (batch, step seed): numpy's global state, which other
    code (and a resumed run's restored state) moves, has no say."""
    step = classify_step(FinetuneConfig(mixup=0.8, cutmix=1.0, smoothing=0.1), num_classes=4)
    x, y = _batch(n=6)
    seen = []
    step.criterion = lambda logits, target: seen.append(target) or logits.sum()

    class Capture(nn.Module):
        def forward(self, images):
            seen.append(images)
            return images.mean(dim=(2, 3))

    for seed, global_seed in ((7, 0), (7, 12345), (8, 0)):
        np.random.seed(global_seed)
        step(Capture(), (x.clone(), y), torch.Generator().manual_seed(seed))  # (timm mixes in place)
    (img_a, tgt_a), (img_b, tgt_b), (img_c, tgt_c) = zip(seen[0::2], seen[1::2], strict=False)
    assert torch.equal(img_a, img_b) and torch.equal(tgt_a, tgt_b)
    assert not torch.equal(img_a, x)  # really mixed
    assert not (torch.equal(img_a, img_c) and torch.equal(tgt_a, tgt_c))  # another step mixes otherwise
    state = np.random.get_state()
    step(Capture(), (x.clone(), y), torch.Generator().manual_seed(7))
    assert np.array_equal(np.random.get_state()[1], state[1])  # and numpy's global state is left as it was


def test_lars__two_steps_equal_maes_update():
    """MAE's LARS: for the weight, g' = g * 0.001 * |w| / |g| (no weight decay), momentum
    buffer m = 0.9 m + g', w -= lr m; the bias takes plain momentum SGD."""
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    opt = lars_optimizer(head, lr=0.5, weight_decay=0.0)
    w, b = head.weight.detach().clone(), head.bias.detach().clone()
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(2):
        gw, gb = torch.randn(3, 5), torch.randn(3)
        head.weight.grad, head.bias.grad = gw.clone(), gb.clone()
        opt.step()
        mw = 0.9 * mw + gw * (0.001 * w.norm() / gw.norm())
        mb = 0.9 * mb + gb
        w, b = w - 0.5 * mw, b - 0.5 * mb
        torch.testing.assert_close(head.weight.detach(), w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(head.bias.detach(), b, rtol=1e-6, atol=1e-7)


def test_ema__weights_are_the_moving_average_of_every_update(colour_data, pretrain_ckpt, tmp_path, monkeypatch):
    """timm's ModelEmaV3 given the update count: the first update copies the weights
    (ema_1 = w_1), every later one averages, ema_t = d * ema_{t-1} + (1 - d) * w_t (w_t: the
    weights after update t, recorded as they are handed over)."""
    from timm.utils import ModelEmaV3

    seen = []
    orig = ModelEmaV3.update

    def update(self, model, step=None):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return orig(self, model, step=step)

    monkeypatch.setattr(ModelEmaV3, "update", update)
    d = 0.6
    out = tmp_path / "ft"
    finetune(
        FinetuneConfig(
            model="swin_test",
            pretrained=str(pretrain_ckpt("mae_swin_test")),
            data=str(colour_data),
            output=str(out),
            epochs=1,
            warmup_epochs=0,
            batch_size=6,
            lr=1e-3,
            num_workers=0,
            device="cpu",
            keep_every=0,
            ema=True,
            ema_decay=d,
            eval_every=0,
        )
    )
    assert len(seen) == 3  # 18 images / 6
    want = {k: v.double() for k, v in seen[0].items()}
    for w in seen[1:]:
        want = {k: d * want[k] + (1 - d) * w[k].double() for k in want}
    got = ckpt.load(out / "checkpoint-last.pth")["ema"]
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got["head.weight"], seen[-1]["head.weight"])  # an average, not the last weights
