"""``--label-fraction`` / ``--label-seed`` (:mod:`ummae.data.subset`): a class-balanced subset
of the training labels, drawn once per seed, recorded in the run folder and in the run's
settings, kept by a resume; checked against a draw written out here."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from _helpers import COLOURS, write_colour_dataset
from ummae.cli import main
from ummae.config import FinetuneConfig
from ummae.data import build_classify_dataset
from ummae.data.subset import SUBSET_FILE, balanced_subset, subset_lines
from ummae.engine.dist import DistInfo
from ummae.errors import UsageError
from ummae.tasks.base import RunContext
from ummae.tasks.classify import FinetuneTask, finetune, take_label_subset
from ummae.weights import io as ckpt

FLAG = "--label-fraction"


def _samples(per_class: dict[str, int]) -> tuple[list[tuple[str, int]], list[str]]:
    names = sorted(per_class)
    return [(f"/data/train/{c}/img_{i:04d}.jpg", label) for label, c in enumerate(names)
            for i in range(per_class[c])], names  # fmt: skip


def _expected_draw(samples, names, fraction, seed) -> set[str]:
    """The draw as the module documents it, written out: round(F x N) images, n // C per class
    and one more for the n mod C classes first in sha256('seed\\0class NAME') order; in each
    class the images first in sha256('seed\\0relative/path') order."""
    key = lambda text: hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()  # noqa: E731
    n = round(fraction * len(samples))
    base, extra = divmod(n, len(names))
    lucky = sorted(names, key=lambda c: key(f"class {c}"))[:extra]
    chosen = set()
    for label, c in enumerate(names):
        rel = [p.removeprefix("/data/train/") for p, lab in samples if lab == label]
        chosen |= set(sorted(rel, key=key)[: base + (c in lucky)])
    return chosen


def _drawn(samples, names, fraction, seed) -> set[str]:
    return {line.split()[0] for line in subset_lines(samples, balanced_subset(samples, names, fraction, seed, FLAG))}


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.37])
@pytest.mark.parametrize("per_class", [{"a": 400, "b": 400, "c": 400}, {"a": 130, "b": 97, "c": 300, "d": 55}])
def test_subset__balanced_within_one_image_and_the_documented_draw(fraction, per_class):
    samples, names = _samples(per_class)
    for seed in (0, 1, 7):
        drawn = _drawn(samples, names, fraction, seed)
        assert drawn == _expected_draw(samples, names, fraction, seed)
        counts = Counter(p.split("/")[0] for p in drawn)
        assert sum(counts.values()) == round(fraction * len(samples))
        assert set(counts) == set(names) and max(counts.values()) - min(counts.values()) <= 1


def test_subset__the_same_seed_draws_the_same_images_in_any_listing_order():
    samples, names = _samples({"a": 50, "b": 50, "c": 50})
    shuffled = list(samples)
    random.Random(3).shuffle(shuffled)
    assert _drawn(samples, names, 0.1, 4) == _drawn(shuffled, names, 0.1, 4) == _drawn(samples, names, 0.1, 4)
    moved = [(p.replace("/data/train/", "/elsewhere/x/"), label) for p, label in samples]
    assert _drawn(moved, names, 0.1, 4) == _drawn(samples, names, 0.1, 4)  # relative paths, not absolute ones


def test_subset__other_seeds_draw_other_images():
    samples, names = _samples({"a": 100, "b": 100, "c": 100})
    draws = [_drawn(samples, names, 0.1, seed) for seed in range(4)]
    assert all(a != b for i, a in enumerate(draws) for b in draws[i + 1 :])


@pytest.mark.parametrize(
    ("fraction", "per_class", "words"),
    [(0.0, {"a": 9, "b": 9}, "must be in (0, 1)"), (1.0, {"a": 9, "b": 9}, "must be in (0, 1)"),
     (0.05, {"a": 9, "b": 9, "c": 9}, "a class would have no image"),
     (0.5, {"a": 20, "b": 1}, "class b has 1 images, fewer than the 5")],
)  # fmt: skip
def test_subset__a_fraction_that_cannot_be_drawn_is_refused(fraction, per_class, words):
    samples, names = _samples(per_class)
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        balanced_subset(samples, names, fraction, 0, FLAG)


def test_cli__a_fraction_that_leaves_a_class_empty_is_one_line(tmp_path, capsys):
    data = write_colour_dataset(tmp_path / "d", train_per_class=4, val_per_class=1)
    argv = ["finetune", "--model", "swin_test", "--data", str(data), "--label-fraction", "0.1", "--device", "cpu",
            "--num-workers", "0", "--output", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a class would have no image" in err[0] and "Traceback" not in err[0]
    assert main([*argv[:-2], "--label-fraction", "1.5", "--output", str(tmp_path / "o")]) == 2
    assert "label_fraction=1.5: must be in (0, 1)" in capsys.readouterr().err


def _cfg(out: Path, data: Path, **kw) -> FinetuneConfig:
    values = dict(model="swin_test", data=str(data), output=str(out), epochs=1, warmup_epochs=0, batch_size=2,
                  lr=1e-3, num_workers=0, device="cpu", keep_every=0, seed=0, mixup=0.0, cutmix=0.0,
                  label_fraction=0.5, label_seed=3)  # fmt: skip
    return FinetuneConfig(**{**values, **kw})


def test_run__trains_on_the_recorded_list_which_a_resume_keeps(tmp_path):
    data = write_colour_dataset(tmp_path / "d", train_per_class=6, val_per_class=1)
    out = tmp_path / "run"
    finetune(_cfg(out, data))
    recorded = (out / SUBSET_FILE).read_text().splitlines()
    assert len(recorded) == 9 and Counter(line.split("/")[0] for line in recorded) == dict.fromkeys(COLOURS, 3)
    all_images = [(str(p), sorted(COLOURS).index(p.parent.name)) for p in (data / "train").rglob("*.png")]
    assert {line.split()[0] for line in recorded} == _expected_draw(
        [(p.replace(f"{data}/train/", "/data/train/"), lab) for p, lab in all_images], sorted(COLOURS), 0.5, 3
    )
    settings = ckpt.load(out / "checkpoint-last.pth")["config"]
    assert (settings["label_fraction"], settings["label_seed"]) == (0.5, 3)

    # the images the task trains on are the recorded ones, with their labels
    parts = FinetuneTask().build(_cfg(out, data, resume="auto"), RunContext(DistInfo(), torch.device("cpu"), "fp32", 0))
    used = sorted(f"{Path(p).relative_to(data / 'train').as_posix()} {label}" for p, label in parts.train.samples)
    assert used == sorted(recorded)

    # a resume left without the options takes them from the checkpoint and trains on the same list
    assert main(["finetune", "--data", str(data), "--output", str(out), "--resume", "auto", "--epochs", "2",
                 "--device", "cpu", "--num-workers", "0"]) == 0  # fmt: skip
    assert (out / SUBSET_FILE).read_text().splitlines() == recorded
    assert ckpt.load(out / "checkpoint-last.pth")["config"]["label_seed"] == 3
    # another seed contradicts the run; a training folder whose images changed too
    assert main(["finetune", "--data", str(data), "--output", str(out), "--resume", "auto", "--epochs", "3",
                 "--label-seed", "4", "--device", "cpu", "--num-workers", "0"]) == 2  # fmt: skip
    (data / "train" / recorded[0].split()[0]).unlink()
    with pytest.raises(UsageError, match="the training images changed"):
        take_label_subset(build_classify_dataset(str(data), "train", None), _cfg(out, data, resume="auto"), out)
