"""The one resolution of a command's config (ummae.config.resolve): each level over the ones
before it, the provenance of every value, a frozen result; and each command reading a weights
file once (a reference checkpoint converted once)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import torch

from _helpers import tiny_finetune_config
from _reference_layout import reference_checkpoint
from ummae.cli import _parser
from ummae.config import EvalConfig, FinetuneConfig, config_from_args, resolve
from ummae.config.recipes import RECIPES
from ummae.errors import UsageError
from ummae.models.registry import create_model
from ummae.tasks.classify import FinetuneTask, finetune, run_eval
from ummae.weights import io as ckpt
from ummae.weights import load as weights_load

RECIPE = "swin_tiny_ummae_in1k_finetune"


def _user_config(*flags: str) -> FinetuneConfig:
    args = _parser().parse_args(["finetune", "--config", RECIPE, "--data", "/d", *flags])
    return config_from_args(FinetuneConfig, args)


def _interrupted_run(out: Path, **settings) -> None:
    """A checkpoint-last.pth in ``out`` whose run was started with ``settings`` (all a resume
    reads of it: its ``config``)."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_atomic({"model": {}, "config": settings}, out / "checkpoint-last.pth")


def test_resolve__each_level_over_the_ones_before_it_and_the_provenance_names_it(tmp_path):
    recipe = f"recipe {RECIPE}"
    assert (FinetuneConfig().epochs, RECIPES[RECIPE].values["epochs"]) == (100, 100)
    # no resume: defaults < recipe (and its batch split over 4 processes) < flags
    cfg, _ = resolve(_user_config("--epochs", "3", "--output", str(tmp_path)), world_size=4)
    assert (cfg.ema_decay, cfg.provenance.source("ema_decay")) == (0.9999, "default")
    assert (cfg.layer_decay, cfg.provenance.source("layer_decay")) == (0.85, recipe)
    assert (cfg.epochs, cfg.provenance.source("epochs")) == (3, "flag")
    assert (cfg.batch_size, cfg.accum_iter) == (64, 4)  # 1024 = 64 x 4 x 4
    assert cfg.provenance.source("batch_size") == f"{recipe} over 4 processes"

    # the resumed run: over the defaults and the split; a flag it may change stays
    _interrupted_run(tmp_path, seed=7, batch_size=32, accum_iter=8, epochs=100, layer_decay=0.85, ema_decay=0.9999)
    cfg, _ = resolve(_user_config("--epochs", "3", "--output", str(tmp_path), "--resume", "auto"), world_size=4)
    assert (cfg.seed, cfg.provenance.source("seed")) == (7, "resumed run")
    assert (cfg.batch_size, cfg.accum_iter, cfg.provenance.source("batch_size")) == (32, 8, "resumed run")
    assert (cfg.epochs, cfg.provenance.source("epochs")) == (3, "flag")  # set at every level: the flag wins
    assert (cfg.layer_decay, cfg.provenance.source("layer_decay")) == (0.85, recipe)
    assert (cfg.ema_decay, cfg.provenance.source("ema_decay")) == (0.9999, "default")

    # a flag that contradicts the resumed run is refused, in one line; so is a recipe value
    with pytest.raises(UsageError, match=r"--batch-size 16 \(the run has 32\)"):
        resolve(_user_config("--batch-size", "16", "--output", str(tmp_path), "--resume", "auto"), world_size=4)
    _interrupted_run(tmp_path, layer_decay=0.7)
    with pytest.raises(UsageError, match=r"--layer-decay 0.85 \(the run has 0.7\)"):
        resolve(_user_config("--output", str(tmp_path), "--resume", "auto"), world_size=4)


def test_resolve__the_weights_level_is_last_and_named(tmp_path, pretrain_ckpt):
    weights = str(pretrain_ckpt("mae_swin_test"))
    given = tiny_finetune_config(tmp_path / "o", tmp_path / "d", model=None, pretrained=weights)
    cfg, _ = resolve(given, weights=FinetuneTask().from_weights)
    assert (cfg.model, cfg.provenance.source("model")) == ("swin_test", "weights")  # mae_swin_test's classifier
    assert cfg.provenance.source("pretrained") == "flag"  # a config built in code: its values count as flags
    named, _ = resolve(dataclasses.replace(given, model="swin_test_b"), weights=FinetuneTask().from_weights)
    assert (named.model, named.provenance.source("model")) == ("swin_test_b", "flag")  # --model given: kept


def test_resolve__the_config_is_frozen_and_resolving_again_changes_nothing(tmp_path):
    cfg, _ = resolve(_user_config("--epochs", "3", "--output", str(tmp_path)), world_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'epochs'"):
        cfg.epochs = 4
    again, _ = resolve(cfg, world_size=8)
    assert again == cfg and again.provenance == cfg.provenance


def _count_reads(monkeypatch) -> tuple[Counter, Counter]:
    """(reads of each file by ummae.weights.io.load, conversions of each reference checkpoint)."""
    reads, conversions = Counter(), Counter()
    load, convert = ckpt.load, weights_load.convert_checkpoint

    def counted_load(path, *args, **kwargs):
        reads[Path(path).resolve()] += 1
        return load(path, *args, **kwargs)

    def counted_convert(ck, source):
        conversions[Path(source).resolve()] += 1
        return convert(ck, source)

    monkeypatch.setattr(ckpt, "load", counted_load)
    monkeypatch.setattr(weights_load, "convert_checkpoint", counted_convert)
    return reads, conversions


def test_finetune__reads_its_pretrained_file_once(tmp_path, colour_data, pretrain_ckpt, monkeypatch):
    """The check of --pretrained, the model it names (--model left out) and the build share one read."""
    weights = Path(pretrain_ckpt("mae_swin_test")).resolve()
    reads, _ = _count_reads(monkeypatch)
    finetune(tiny_finetune_config(tmp_path / "o", colour_data, model=None, pretrained=str(weights), eval_every=0))
    assert reads[weights] == 1


def test_finetune__converts_a_reference_checkpoint_once(tmp_path, colour_data, monkeypatch):
    swin_test = dict(family="swin", dims=[16, 32, 64, 128], depths=[2, 1, 1, 1], heads=[1, 2, 2, 4], posmlp=8)
    ref = tmp_path / "ref_mae.pth"
    args = dict(model="mae_swin_tiny_256", input_size=64, mask_regular=True, vis_mask_ratio=0.25, mask_ratio=0.75)
    torch.save(reference_checkpoint(dict(swin_test, img_size=64, kind="mae", decoder=(32, 1), sm=True), args), ref)
    reads, conversions = _count_reads(monkeypatch)
    finetune(tiny_finetune_config(tmp_path / "o", colour_data, pretrained=str(ref), eval_every=0))
    assert (reads[ref.resolve()], conversions[ref.resolve()]) == (1, 1)


def test_eval__reads_its_checkpoint_once(tmp_path, colour_data, save_checkpoint, monkeypatch):
    """--model left out: the model the checkpoint names and the model built from it, one read."""
    torch.manual_seed(0)
    path = save_checkpoint(create_model("swin_test", num_classes=3), tmp_path / "clf.pth").resolve()
    reads, _ = _count_reads(monkeypatch)
    run_eval(EvalConfig(checkpoint=str(path), data=str(colour_data), num_workers=0, device="cpu"))
    assert reads[path] == 1
