"""Tests of the masking strategies (``--sampling``, :mod:`ummae.sampling`): the contract of the
interface for every registered strategy (taken from the registry, so a new strategy is tested
by registering it), and BEiT's block-wise masking against BEiT's MaskingGenerator written out
here from its definition.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import ummae.tasks.pretrain as train
from _helpers import assert_tensors_equal, crashing_at, metrics_records, smooth_images, stable, tiny_pretrain_config
from ummae.cli import main
from ummae.errors import UsageError
from ummae.models.registry import create_model
from ummae.sampling import get_strategy, markdown_table, names, strategies
from ummae.sampling.block import ATTEMPTS, min_block_units, place_blocks
from ummae.tasks.pretrain import pretrain
from ummae.visualize import reconstruction_panels
from ummae.weights import io as ckpt

STRATEGIES = strategies()
BLOCK = get_strategy("block")
IDS = [s.name for s in STRATEGIES]
GRIDS = [(4, 4), (8, 8), (14, 14), (6, 10)]  # even sides: every strategy can mask them


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the contract, every strategy


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("ratio", [0.75, 0.6, 0.4])
def test_strategy__every_image_keeps_exactly_its_visible_count(strategy, grid, ratio):
    gh, gw = grid
    assert strategy.grid_problem(gh, gw) is None
    ratio = strategy.mask_ratio(ratio)  # uniform: always 0.75
    length = gh * gw
    want = length - int(ratio * length)  # the reference's count: int(r L) units masked
    assert strategy.num_visible(gh, gw, ratio) == want
    mask = strategy.sample(200, gh, gw, ratio, generator=_gen(7))
    assert mask.shape == (200, length) and mask.dtype == torch.bool
    assert torch.all((~mask).sum(1) == want), (~mask).sum(1).unique()
    assert mask.float().mean(0).min() > 0 and mask.float().mean(0).max() < 1  # every unit masked sometimes


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_strategy__masks_are_a_function_of_the_generator_only(strategy):
    """The same generator state gives the same masks whatever happened to the global random
    states in between, and a draw consumes none of them (torch, Python, numpy)."""
    ratio = strategy.mask_ratio(0.75)
    a = strategy.sample(16, 8, 8, ratio, generator=_gen(3))
    torch.rand(1000)  # consume every global random state, then set them
    random.random()
    np.random.rand(10)
    torch.manual_seed(99)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    g = _gen(3)
    b = strategy.sample(16, 8, 8, ratio, generator=g)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    after = g.get_state()
    strategy.sample(16, 8, 8, ratio, generator=_gen(3))  # the generator ends in the same state
    g2 = _gen(3)
    strategy.sample(16, 8, 8, ratio, generator=g2)
    assert torch.equal(after, g2.get_state())
    assert not torch.equal(a, strategy.sample(16, 8, 8, ratio, generator=_gen(4)))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
@pytest.mark.parametrize("model", ["mae_swin_test", "mae_pvt_test"])
def test_strategy__pyramid_encoders_take_only_the_strategies_that_compact(strategy, model):
    if strategy.compacts:
        assert create_model(model, sampling=strategy.name).strategy is strategy
        return
    with pytest.raises(UsageError) as e:
        create_model(model, sampling=strategy.name)
    message = str(e.value)
    assert "\n" not in message
    assert f"{strategy.name} sampling leaves holes" in message and "pyramid encoder" in message
    compacting = [s.name for s in STRATEGIES if s.compacts]
    assert all(repr(name) in message for name in compacting), message


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if not s.compacts], ids=lambda s: s.name)
def test_cli_pretrain__pyramid_with_a_holed_strategy_is_one_error_line(strategy, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["pretrain", "--model", "mae_swin_test", "--sampling", strategy.name, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"ummae pretrain: error: {strategy.name} sampling leaves holes that a pyramid encoder")
    assert not out.exists()


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_strategy__vit_model_draws_with_it_and_records_its_name(strategy):
    """A ViT takes every strategy: its masks are the strategy's from the same generator, the
    checkpoint options record the name, and the picture titles carry the label."""
    torch.manual_seed(0)
    model = create_model("mae_vit_test", img_size=128, sampling=strategy.name).eval()  # an 8x8 grid
    ratio = strategy.mask_ratio(0.75)
    assert model.options()["sampling"] == strategy.name and model.mask_ratio == ratio
    mask, _ = model.sample_masks(3, "cpu", _gen(5))
    assert torch.equal(mask, strategy.sample(3, 8, 8, ratio, generator=_gen(5)))
    assert model.num_visible == strategy.num_visible(8, 8, ratio)
    imgs = torch.randn(3, 3, 128, 128)
    titles, _ = reconstruction_panels(model, imgs, _gen(5))
    assert titles[1] == f"masked input ({strategy.label})"


def test_registry__unknown_name_is_one_line_naming_the_choices():
    with pytest.raises(UsageError, match=r"^bad sampling 'grid': must be one of " + ", ".join(names()) + "$"):
        get_strategy("grid")


def test_registry__markdown_table_has_one_row_of_facts_per_strategy():
    lines = markdown_table().splitlines()
    assert len(lines) == 2 + len(STRATEGIES)
    for line, s in zip(lines[2:], STRATEGIES, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [f"`{s.name}`", s.label, s.encoders, f"`{s.visible}`", s.help]
    assert [s.label for s in STRATEGIES] == ["US", "random", "block"]
    assert [s.encoders for s in STRATEGIES] == ["any encoder", "ViT only", "ViT only"]


# ---------------------------------------------------------------- BEiT's block-wise masking


class BeitMaskingGenerator:
    """BEiT's MaskingGenerator (microsoft/unilm beit/masking_generator.py), written out from its
    definition, with Python's ``random`` replaced by rows of four uniforms from a torch generator
    (one row per attempt: area, aspect, top, left; ``uniform(a, b) = a + (b - a) u`` as Python's,
    ``randint(0, k) = floor(u (k + 1))``)."""

    def __init__(self, input_size, num_masking_patches, min_num_patches, max_num_patches=None, min_aspect=0.3):
        self.height, self.width = input_size
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask, max_mask_patches, rows):
        delta = 0
        for _attempt in range(10):
            u = next(rows)
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * u[0]
            lo, hi = self.log_aspect_ratio
            aspect_ratio = math.exp(lo + (hi - lo) * u[1])
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = math.floor(u[2] * (self.height - h + 1))
                left = math.floor(u[3] * (self.width - w + 1))
                num_masked = int(mask[top : top + h, left : left + w].sum())
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, rows):
        mask = torch.zeros(self.height, self.width, dtype=torch.long)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, rows)
            if delta == 0:
                break
            mask_count += delta
        return mask.bool().flatten()


def _beit_min_block(length: int) -> int:
    """The smallest block we chose: BEiT's 16 of 196 units as a share of the grid, at least 1."""
    return max(1, round(16 * length / 196))


def _reference_block_masks(n, gh, gw, ratio, seed):
    """BEiT's masks and the exactly counted ones, from a generator seeded ``seed`` in the
    documented draw order: ``U [n, 10 * target, 4]`` (the attempts), then ``noise [n, L]``;
    the shortfall is filled with the unmasked units of lowest noise."""
    length = gh * gw
    target = int(ratio * length)
    g = _gen(seed)
    u = torch.rand(n, 10 * target, 4, generator=g)
    noise = torch.rand(n, length, generator=g)
    beit = BeitMaskingGenerator((gh, gw), target, _beit_min_block(length))
    blocks = torch.stack([beit(iter(u[i].tolist())) for i in range(n)])
    exact = blocks.clone()
    for i in range(n):
        free = sorted((noise[i, j].item(), j) for j in range(length) if not blocks[i, j])
        for _, j in free[: target - int(blocks[i].sum())]:
            exact[i, j] = True
    return u, blocks, exact


BLOCK_CASES = [(8, 8, 0.75), (14, 14, 0.75), (14, 14, 0.4), (4, 4, 0.75), (6, 10, 0.5)]


@pytest.mark.parametrize("gh,gw,ratio", BLOCK_CASES)
def test_block__beits_blocks_then_an_exact_top_up(gh, gw, ratio):
    n = 150
    u, blocks, exact = _reference_block_masks(n, gh, gw, ratio, seed=11)
    target = int(ratio * gh * gw)
    # the blocks, before the top-up, are BEiT's
    ours = [place_blocks(iter(u[i].tolist()), gh, gw, target, _beit_min_block(gh * gw))[0] for i in range(n)]
    assert torch.equal(torch.tensor(ours).view(n, -1), blocks)
    # the strategy's masks: BEiT's blocks, topped up to exactly the target with random free units
    got = BLOCK.sample(n, gh, gw, ratio, generator=_gen(11))
    assert torch.equal(got, exact)
    assert torch.all(got.sum(1) == target) and torch.all(got >= blocks)


def test_block__top_up_is_often_needed_and_small_at_0_75_on_beits_grid():
    """At MAE's ratio on BEiT's 14x14 grid, BEiT's loop falls short of its 147 units in about a
    third of the images (a block that does not fit in 10 attempts ends it), by under 1% of the
    target on average: the top-up matters, and leaves the masks BEiT's blocks."""
    _, blocks, exact = _reference_block_masks(400, 14, 14, 0.75, seed=4)
    short = (147 - blocks.sum(1)).double()
    assert 0.2 < (short > 0).double().mean() < 0.6, short
    assert short.mean() < 0.02 * 147, short.mean()
    assert torch.equal(BLOCK.sample(400, 14, 14, 0.75, generator=_gen(4)), exact)


@pytest.mark.parametrize("gh,gw,ratio", BLOCK_CASES)
def test_block__masks_are_unions_of_rectangles_within_the_aspect_bounds(gh, gw, ratio):
    length = gh * gw
    target = int(ratio * length)
    u = torch.rand(300, ATTEMPTS * target, 4, generator=_gen(5))
    for i in range(300):
        mask, blocks = place_blocks(iter(u[i].tolist()), gh, gw, target, _beit_min_block(length))
        union = [[False] * gw for _ in range(gh)]
        added = 0
        for top, left, h, w in blocks:
            assert 1 <= h < gh and 1 <= w < gw and top >= 0 and left >= 0 and top + h <= gh and left + w <= gw
            # h, w are rounded sides of a rectangle of aspect in [0.3, 1/0.3]
            assert (h + 0.5) / max(w - 0.5, 1e-9) >= 0.3 - 1e-12 and (h - 0.5) / (w + 0.5) <= 1 / 0.3 + 1e-12
            new = sum(not union[r][c] for r in range(top, top + h) for c in range(left, left + w))
            assert new >= 1  # every kept block masks a new unit
            added += new
            for r in range(top, top + h):
                for c in range(left, left + w):
                    union[r][c] = True
        assert mask == union and added <= target


def test_block__smallest_block_is_beits_share_of_the_grid():
    assert [min_block_units(L) for L in (16, 64, 196, 256, 1)] == [1, 5, 16, 21, 1]


def test_block__vit_pretraining_step_loss_finite_and_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("mae_vit_test", img_size=128, sampling="block")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    # smooth images (upsampled 4x4 noise): a masked unit is predictable from the visible ones
    imgs = torch.nn.functional.interpolate(torch.randn(4, 3, 4, 4, generator=_gen(1)), size=128, mode="bicubic")
    losses = []
    for _ in range(15):
        out = model(imgs, generator=_gen(0))  # the same masks every step
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------- exact resume, a ViT per strategy


class _Crash(Exception):
    pass


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_pretrain__vit_resumed_run_repeats_the_masks_of_a_straight_one(strategy, tmp_path, monkeypatch):
    """The step's generator is saved and restored, and the masks come only from it: a run
    crashed at its 8th step and resumed from its checkpoint (update 6, inside the second
    epoch) ends bit-identical to one that ran straight through."""
    data = smooth_images(tmp_path / "data", 16)
    kw = dict(model="mae_vit_test", sampling=strategy.name, epochs=2, save_every_steps=3)  # 4 steps per epoch
    pretrain(tiny_pretrain_config(tmp_path / "a", data, **kw))
    monkeypatch.setattr(train, "pretrain_step", crashing_at(8, train.pretrain_step, _Crash))
    with pytest.raises(_Crash):
        pretrain(tiny_pretrain_config(tmp_path / "b", data, **kw))
    assert ckpt.load(tmp_path / "b" / "checkpoint-last.pth")["update"] == 6
    monkeypatch.undo()
    pretrain(tiny_pretrain_config(tmp_path / "b", data, resume="auto", **kw))
    assert stable(metrics_records(tmp_path / "a")) == stable(metrics_records(tmp_path / "b"))
    a, b = (torch.load(tmp_path / run / "checkpoint-last.pth", weights_only=True) for run in "ab")
    assert_tensors_equal(a["model"], b["model"], "model")
    assert a["model_args"]["sampling"] == strategy.name
