"""Tests of ummae.data.classify: labelled datasets, their transforms and the eval loader."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers import write_image
from ummae.data import (
    ImageDataset,
    NoReadableImageError,
    build_classify_dataset,
    build_classify_transform,
    build_eval_loader,
    build_train_loader,
)

IMAGENETTE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette_mini"


def _tree(root: Path, classes=("a", "b", "c"), per_class=2) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i}.png", seed=10 * c + i)
    return root


@pytest.fixture
def eval_tf():
    return build_classify_transform(32, is_training=False)


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("is_training, simple", [(True, False), (True, True), (False, False)])
def test_build_classify_transform__output_shape(tmp_path, is_training, simple):
    tf = build_classify_transform(32, is_training=is_training, simple=simple)
    img = Image.open(write_image(tmp_path / "x.png", size=(70, 50))).convert("RGB")
    out = tf(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_build_classify_transform__recipes():
    def names(tf):
        return [type(t).__name__ for t in tf.transforms]

    train = names(build_classify_transform(32, is_training=True))
    assert train[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in train
    assert train[-1] == "RandomErasing" and "ColorJitter" not in train
    simple = names(build_classify_transform(32, is_training=True, simple=True))
    assert simple == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    ev = build_classify_transform(32, is_training=False, crop_pct=0.875).transforms
    assert ev[0].size == int(32 / 0.875) and type(ev[1]).__name__ == "CenterCrop"


def test_build_classify_transform__bad_crop_pct():
    with pytest.raises(ValueError, match="crop_pct"):
        build_classify_transform(32, is_training=False, crop_pct=1.5)


# ---------------------------------------------------------------- datasets


def test_build_classify_dataset__split_folders(tmp_path, eval_tf, caplog):
    _tree(tmp_path / "train", per_class=3)
    _tree(tmp_path / "val", per_class=1)
    with caplog.at_level(logging.INFO, logger="ummae.data"):
        train = build_classify_dataset(str(tmp_path), "train", eval_tf)
        val = build_classify_dataset(str(tmp_path), "val", eval_tf, class_names=train.class_names)
    assert isinstance(train, ImageDataset)
    assert len(train) == 9 and len(val) == 3
    assert all(f"{os.sep}val{os.sep}" in p for p, _ in val.samples)
    assert train.num_classes == val.num_classes == 3
    assert train.class_names == val.class_names == ["a", "b", "c"]
    assert [label for _, label in val.samples] == [0, 1, 2]
    img, label = val[2]
    assert img.shape == (3, 32, 32) and label == 2


def test_build_classify_dataset__imagefolder_used_as_is(tmp_path, eval_tf, caplog):
    _tree(tmp_path, classes=("dog", "cat"))
    with caplog.at_level(logging.INFO, logger="ummae.data"):
        ds = build_classify_dataset(str(tmp_path), "val", eval_tf)
    assert "no val/ folder" in caplog.text and "as is" in caplog.text
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 4


def test_build_classify_dataset__other_split_only_refused(tmp_path, eval_tf):
    # a root with train/ but no val/: its splits must not be read as two classes
    _tree(tmp_path / "train")
    with pytest.raises(ValueError, match=r"has no val/ folder \(it holds train/\)"):
        build_classify_dataset(str(tmp_path), "val", eval_tf)


def test_build_classify_dataset__list_file_with_labels(tmp_path, eval_tf):
    for n in "abc":
        write_image(tmp_path / "imgs" / f"{n}.png")
    lst = tmp_path / "val.txt"
    lst.write_text("# comment\nimgs/a.png 0\n\nimgs/b.png 3\nimgs/c.png 1\n")
    ds = build_classify_dataset(str(lst), "val", eval_tf)
    assert ds.num_classes == 4 and ds.class_names == ["0", "1", "2", "3"]
    assert [label for _, label in ds.samples] == [0, 3, 1]
    assert ds[1][0].shape == (3, 32, 32) and ds[1][1] == 3
    # against the training classes: the count is checked, and the names are taken over
    named = build_classify_dataset(str(lst), "val", eval_tf, class_names=list("vwxyz"))
    assert named.num_classes == 5 and named.class_names == list("vwxyz")
    with pytest.raises(ValueError, match=r"labels up to 3 but the training data has 3 classes"):
        build_classify_dataset(str(lst), "val", eval_tf, class_names=list("xyz"))


def test_build_classify_dataset__list_file_data_root(tmp_path, eval_tf):
    write_image(tmp_path / "root" / "a.png")
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("a.png 1\n")
    ds = build_classify_dataset(str(lst), "train", eval_tf, data_root=str(tmp_path / "root"))
    assert ds.samples == [(str(tmp_path / "root" / "a.png"), 1)] and ds.num_classes == 2


@pytest.mark.parametrize("bad_line, problem", [("b.png", "has no label"), ("b.png -1", "has negative label -1")])
def test_build_classify_dataset__list_file_line_without_label(tmp_path, eval_tf, bad_line, problem):
    lst = tmp_path / "train.txt"
    lst.write_text(f"a.png 0\n{bad_line}\n")
    with pytest.raises(ValueError, match=rf"train\.txt, line 2: b\.png {problem}"):
        build_classify_dataset(str(lst), "train", eval_tf)


def test_build_classify_dataset__flat_folder_refused(tmp_path, eval_tf):
    write_image(tmp_path / "x.png")
    write_image(tmp_path / "sub" / "y.png")
    with pytest.raises(
        ValueError,
        match=rf"{tmp_path.name} has no class sub-folders: "
        r"fine-tuning needs labelled data",
    ):
        build_classify_dataset(str(tmp_path), "train", eval_tf)


def test_build_classify_dataset__missing_path_refused(tmp_path, eval_tf):
    with pytest.raises(ValueError, match=r"data path not found: .*nope"):
        build_classify_dataset(str(tmp_path / "nope"), "train", eval_tf)


def test_build_classify_dataset__folder_without_images_refused(tmp_path, eval_tf):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=rf"no images were found in .*{tmp_path.name}"):
        build_classify_dataset(str(tmp_path), "train", eval_tf)


def test_build_classify_dataset__val_classes_mismatch_refused(tmp_path, eval_tf):
    train = build_classify_dataset(str(_tree(tmp_path / "train", ("a", "b", "c"))), "train", eval_tf)
    _tree(tmp_path / "val", ("a", "c"))  # "b" missing: "c" would read as label 1
    with pytest.raises(ValueError, match=r"differ from the training classes .*missing here: b"):
        build_classify_dataset(str(tmp_path), "val", eval_tf, class_names=train.class_names)


def test_build_classify_dataset__imagenette_mini(eval_tf):
    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"{IMAGENETTE} not present")
    train = build_classify_dataset(str(IMAGENETTE), "train", eval_tf)
    val = build_classify_dataset(str(IMAGENETTE), "val", eval_tf, class_names=train.class_names)
    assert train.num_classes == 10 and len(train.class_names) == 10
    assert val.class_names == train.class_names and len(val) == 500
    img, label = val[len(val) - 1]
    assert img.shape == (3, 32, 32) and label == 9


# ---------------------------------------------------------------- eval loader


@pytest.mark.parametrize("world", [1, 2, 3])
def test_build_eval_loader__shards_disjoint_and_cover(tmp_path, eval_tf, world):
    n = 7  # not divisible by 2 or 3: no padding, no duplicates
    ds = ImageDataset(
        [(str(write_image(tmp_path / f"{i}.png", seed=i)), i) for i in range(n)], eval_tf, "test", str(tmp_path)
    )
    shards = []
    for rank in range(world):
        loader = build_eval_loader(ds, batch_size=2, num_workers=0, num_replicas=world, rank=rank)
        labels = [y for _, ys, _ in loader for y in ys.tolist()]
        assert labels == list(range(rank, n, world))  # sequential within the shard
        shards.append(labels)
    everything = [y for s in shards for y in s]
    assert len(everything) == len(set(everything)) == n


def test_build_eval_loader__corrupt_image_skipped(tmp_path, eval_tf, caplog):
    _tree(tmp_path / "val", ("a", "b"), per_class=2)
    (tmp_path / "val" / "b" / "0bad.jpg").write_bytes(b"\xff\xd8 not a jpeg " * 10)
    ds = build_classify_dataset(str(tmp_path), "val", eval_tf)  # a0 a1 b0 b0bad b1
    with caplog.at_level(logging.WARNING, logger="ummae.data"):
        batches = list(build_eval_loader(ds, batch_size=2, num_workers=0))
    assert "0bad.jpg" in caplog.text
    assert [n for _, _, n in batches] == [0, 1, 0]
    assert [x.shape[0] for x, _, _ in batches] == [2, 1, 1]
    assert [y.tolist() for _, y, _ in batches] == [[0, 0], [1], [1]]


def test_build_eval_loader__bad_rank():
    with pytest.raises(ValueError, match="rank must be in"):
        build_eval_loader([0, 1], batch_size=1, num_workers=0, num_replicas=2, rank=2)


def test_build_classify_transform__randaugment_posterize_at_full_magnitude():
    """RandAugment 'inc1' posterize keeps 0 bits at magnitude 10 (reached by the recipe's
    mstd0.5 noise); Pillow >= 13 refuses bits=0. The transform must keep working, with the
    old result (a black image) for that op."""
    import random

    from PIL import Image

    from ummae.data.classify import _posterize

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(_posterize(img, 0)), np.zeros((40, 40, 3), np.uint8))
    assert np.array_equal(np.asarray(_posterize(img, 8)), np.asarray(img))
    t = build_classify_transform(32, True, auto_augment="rand-m10-mstd0-inc1", re_prob=0.0)
    random.seed(0)
    for _ in range(300):  # 2 of ~15 ops per image: posterize at 0 bits comes up many times
        assert t(img).shape == (3, 32, 32)


# ---------------------------------------------------------------- unreadable images in training


def test_build_train_loader__classify_unreadable_replaced_with_its_own_label(tmp_path, eval_tf):
    _tree(tmp_path / "train", ("a", "b"), per_class=2)
    # sorted: a/0 a/1 a/2bad b/0 b/1: the bad "a" image is replaced by b/0, labelled b
    (tmp_path / "train" / "a" / "2bad.jpg").write_bytes(b"\xff\xd8 not a jpeg " * 10)
    ds = build_classify_dataset(str(tmp_path), "train", eval_tf)
    bad = [os.path.basename(p) for p, _ in ds.samples].index("2bad.jpg")
    assert ds.substitute_index(bad) == bad + 1 and ds.samples[bad + 1][1] == 1
    image, label, n_skipped = ds.load_or_substitute((bad, 9))
    assert label == 1 and n_skipped == 1 and torch.equal(image, ds[(bad + 1, 9)][0])
    for batch_size in (1, 5):  # every sample once per epoch (5 images, drop_last)
        loader, sampler = build_train_loader(ds, batch_size=batch_size, num_workers=0, seed=4)
        batches = list(loader)
        assert all(x.shape == (batch_size, 3, 32, 32) for x, _, _ in batches)  # never short
        assert sum(n for _, _, n in batches) == 1
        assert sorted(y for _, ys, _ in batches for y in ys.tolist()) == [0, 0, 1, 1, 1]
    # evaluation still leaves it out (a substitute would be counted twice)
    assert [x.shape[0] for x, _, _ in build_eval_loader(ds, batch_size=5, num_workers=0)] == [4]


def test_build_train_loader__classify_all_unreadable_refused(tmp_path, eval_tf):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.png").write_bytes(b"garbage")
    ds = build_classify_dataset(str(tmp_path), "train", eval_tf)
    loader, _ = build_train_loader(ds, batch_size=2, num_workers=0)
    with pytest.raises(
        NoReadableImageError,
        match=rf"no image of ImageFolder {tmp_path} can be "
        r"read: all 2 files failed",
    ):
        next(iter(loader))


# ---------------------------------------------------------------- folder scans and symlinks


def test_build_classify_dataset__symlink_loops_each_image_once(tmp_path, eval_tf):
    import threading

    _tree(tmp_path / "train", ("a", "b"), per_class=2)
    _tree(tmp_path / "val", ("a", "b"), per_class=1)
    try:
        os.symlink("..", tmp_path / "train" / "a" / "loop")  # back to train/
        os.symlink("../..", tmp_path / "train" / "b" / "up")  # to the dataset root
        os.symlink("../..", tmp_path / "train" / "b" / "up2")  # two loops: endless before
    except (OSError, NotImplementedError) as e:
        pytest.skip(f"cannot make directory symlinks here: {e}")
    result = {}
    thread = threading.Thread(
        daemon=True, target=lambda: result.setdefault("ds", build_classify_dataset(str(tmp_path), "train", eval_tf))
    )
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the scan did not end within 30 s"
    ds = result["ds"]
    samples = {(os.path.relpath(p, tmp_path), label) for p, label in ds.samples}
    # train/ images once each, under their own class; val/ (reached through b/up) too, as
    # it is a directory of its own that the links lead to, but only once
    train = {(f"train/{c}/{i}.png", lab) for lab, c in enumerate("ab") for i in range(2)}
    assert train <= samples and len(ds.samples) == len(samples)
    assert samples - train == {("train/b/up/val/a/0.png", 1), ("train/b/up/val/b/0.png", 1)}
