"""Tests of ummae.data: datasets, collate, the resumable sampler and the loader."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers import write_image

from ummae.data import (
    ImageDataset,
    ResumableSampler,
    build_pretrain_dataset,
    build_train_loader,
    collate_skip_bad,
)

IMAGENETTE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette_mini"


# ---------------------------------------------------------------- datasets


def test_build_pretrain_dataset__imagefolder_labels(tmp_path):
    write_image(tmp_path / "b_dog" / "1.png")
    write_image(tmp_path / "b_dog" / "nested" / "2.JPG")  # recursive, any case
    write_image(tmp_path / "a_cat" / "3.jpeg")
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "a_cat" / ".hidden.png")
    ds = build_pretrain_dataset(str(tmp_path), img_size=16)
    labels = {Path(p).name: lab for p, lab in ds.samples}
    assert labels == {"3.jpeg": 0, "1.png": 1, "2.JPG": 1}
    assert "ImageFolder" in ds.describe() and "2 classes" in ds.describe()
    img, label = ds[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and label == 0


def test_build_pretrain_dataset__flat_folder(tmp_path):
    write_image(tmp_path / "x.png")
    write_image(tmp_path / "y.webp")
    write_image(tmp_path / "sub" / "z.bmp")  # top-level images present: flat, recursive
    ds = build_pretrain_dataset(str(tmp_path), img_size=8)
    assert sorted(Path(p).name for p, _ in ds.samples) == ["x.png", "y.webp", "z.bmp"]
    assert all(lab == -1 for _, lab in ds.samples)
    assert "flat folder" in ds.describe()


def test_build_pretrain_dataset__list_file(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "imgs" / "b.png")
    lst = tmp_path / "train.txt"
    lst.write_text("# comment\nimgs/a.png 3\n\nimgs/b.png\n")
    ds = build_pretrain_dataset(str(lst), img_size=8)
    assert ds.samples == [(str(tmp_path / "imgs" / "a.png"), 3),
                          (str(tmp_path / "imgs" / "b.png"), -1)]
    assert ds[0][0].shape == (3, 8, 8)


def test_build_pretrain_dataset__list_file_data_root(tmp_path):
    """The list's relative path is read under --data-root: a one-colour image there comes out
    as that colour, ImageNet-normalised, at every pixel of the crop."""
    (tmp_path / "root").mkdir()
    Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / "root" / "a.png")
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("a.png 0\n")
    ds = build_pretrain_dataset(str(lst), img_size=8, data_root=str(tmp_path / "root"))
    assert ds.samples == [(str(tmp_path / "root" / "a.png"), 0)]
    img = ds[0][0]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = torch.tensor([(v / 255 - m) / s for v, m, s in zip((200, 100, 50), mean, std)])
    assert img.shape == (3, 8, 8)
    torch.testing.assert_close(img, want.view(3, 1, 1).expand(3, 8, 8), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad_line", ["c.png cat", "c d.png 1"])
def test_build_pretrain_dataset__list_file_malformed_line(tmp_path, bad_line):
    lst = tmp_path / "train.txt"
    lst.write_text(f"a.png 0\n# ok\n{bad_line}\n")
    with pytest.raises(ValueError, match=r"train\.txt, line 3"):
        build_pretrain_dataset(str(lst), img_size=8)


def test_build_pretrain_dataset__empty_list_file(tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no images"):
        build_pretrain_dataset(str(lst), img_size=8)


def test_build_pretrain_dataset__missing_path(tmp_path):
    with pytest.raises(ValueError, match="data path not found"):
        build_pretrain_dataset(str(tmp_path / "nope"), img_size=8)


def test_build_pretrain_dataset__empty_folder(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images were found in .*\.jpg"):
        build_pretrain_dataset(str(tmp_path), img_size=8)


def test_build_pretrain_dataset__bad_crop_scale(tmp_path):
    write_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="crop_scale"):
        build_pretrain_dataset(str(tmp_path), img_size=8, crop_scale=(0.0, 1.0))


def test_build_pretrain_dataset__corrupt_image_skipped(tmp_path, caplog):
    write_image(tmp_path / "good.png")
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 this is not a jpeg " * 10)
    lst = tmp_path / "list.txt"
    lst.write_text("good.png 0\nx.jpg 1\nmissing.png 2\n")  # missing: bad at load time only
    ds = build_pretrain_dataset(str(lst), img_size=8)
    assert len(ds) == 3
    with caplog.at_level(logging.WARNING, logger="ummae.data"):
        items = [ds[(i, 123)] for i in range(3)]
    assert items[1] is None and items[2] is None
    assert "x.jpg" in caplog.text and "missing.png" in caplog.text
    images, labels, n_skipped = collate_skip_bad(items)
    assert images.shape == (1, 3, 8, 8) and labels.tolist() == [0] and n_skipped == 2


def test_build_pretrain_dataset__truncated_image_skipped(tmp_path, caplog):
    data = write_image(tmp_path / "t.png", size=(64, 64)).read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    ds = build_pretrain_dataset(str(tmp_path), img_size=8)
    with caplog.at_level(logging.WARNING, logger="ummae.data"):
        assert ds[0] is None
    assert "t.png" in caplog.text


def test_build_pretrain_dataset__embedded_demo():
    ds = build_pretrain_dataset(None, img_size=64, demo_repeats=2)
    photos = {p for p, _ in ds.samples}
    assert len(photos) >= 5 and len(ds) == 2 * len(photos)
    assert all(Path(p).is_file() for p in photos)
    img, label = ds[(0, 7)]
    assert img.shape == (3, 64, 64) and label == -1
    assert "embedded demo" in ds.describe()


def test_build_pretrain_dataset__augmentation_is_function_of_key(tmp_path):
    write_image(tmp_path / "x.png", size=(64, 48))
    ds = build_pretrain_dataset(str(tmp_path), img_size=16)
    torch.manual_seed(0)
    a = ds[(0, 5)][0]
    state = torch.get_rng_state()
    torch.rand(3)  # move the global RNG: must not matter
    b = ds[(0, 5)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(0, 6)][0])
    # the global RNG is untouched by keyed access
    torch.set_rng_state(state)
    expected = torch.rand(3)
    torch.set_rng_state(state)
    ds[(0, 9)]
    assert torch.equal(torch.rand(3), expected)


def test_image_dataset__timm_transform_is_function_of_key(tmp_path):
    # timm's RandomResizedCropAndInterpolation, RandAugment and RandomErasing draw from python
    # random and numpy too, not only torch: all three must follow the sample seed.
    from timm.data import create_transform

    tf = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                          re_prob=0.25, interpolation="bicubic")
    ds = ImageDataset([(str(write_image(tmp_path / "x.png", size=(64, 48))), 0)], tf, "test", "x")
    a = ds[(0, 2**40 + 5)][0]  # > 32 bits: numpy gets seed % 2**32
    random.random()
    np.random.rand()
    torch.rand(1)
    b = ds[(0, 2**40 + 5)][0]
    assert torch.equal(a, b)
    assert all(not torch.equal(a, ds[(0, s)][0]) for s in (6, 7, 8))
    # keyed access leaves the caller's python random and numpy streams where they were
    py_state, np_state = random.getstate(), np.random.get_state()
    expected = (random.random(), np.random.rand())
    random.setstate(py_state)
    np.random.set_state(np_state)
    ds[(0, 11)]
    assert (random.random(), np.random.rand()) == expected


def test_build_pretrain_dataset__imagenette_mini():
    train = IMAGENETTE / "train"
    if not train.is_dir():
        pytest.skip(f"{train} not present")
    ds = build_pretrain_dataset(str(train), img_size=32)
    assert len(ds) == 4000 and ds.num_classes == 10
    assert ds[(len(ds) - 1, 1)][1] == 9


# ---------------------------------------------------------------- collate


def test_collate_skip_bad__all_bad():
    images, labels, n = collate_skip_bad([None, None])
    assert images.shape[0] == 0 and labels.shape == (0,) and n == 2


# ---------------------------------------------------------------- sampler


def _pass(sampler):
    return list(iter(sampler))


def test_resumable_sampler__ranks_disjoint_and_cover():
    n, bs, world = 50, 4, 3
    parts = [_pass(ResumableSampler(n, bs, world, r, seed=1)) for r in range(world)]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == 16  # 50 // 12 * 4
    indices = [i for p in parts for i, _ in p]
    assert len(indices) == len(set(indices)) == 48
    seeds = [s for p in parts for _, s in p]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)


def test_resumable_sampler__pads_without_drop_last():
    parts = [_pass(ResumableSampler(10, 4, 3, r, drop_last=False)) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert {i for p in parts for i, _ in p} == set(range(10))


def test_resumable_sampler__deterministic_per_epoch():
    a, b = ResumableSampler(40, 4, seed=3), ResumableSampler(40, 4, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert _pass(a) == _pass(b)
    e2 = _pass(a)
    a.set_epoch(3)
    e3 = _pass(a)
    assert [i for i, _ in e2] != [i for i, _ in e3]
    assert not {s for _, s in e2} & {s for _, s in e3}


def test_resumable_sampler__start_batch_yields_tail():
    s = ResumableSampler(40, 4, num_replicas=2, rank=1, seed=5)
    s.set_epoch(1)
    full = _pass(s)
    assert len(s) == 20 and s.num_batches() == 5
    s.set_start_batch(2)
    assert len(s) == 12
    assert _pass(s) == full[8:]
    assert len(s) == 20 and _pass(s) == full  # reset after one pass


def test_resumable_sampler__too_small_dataset():
    with pytest.raises(ValueError, match="has 5 images but one global batch needs 8"):
        ResumableSampler(5, 4, num_replicas=2)


# ---------------------------------------------------------------- loader


def test_build_train_loader__workers_give_identical_batches(tmp_path):
    for i in range(12):
        write_image(tmp_path / f"{i:02d}.png", size=(32, 24), seed=i)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    ds = build_pretrain_dataset(str(tmp_path), img_size=16)
    runs = []
    for workers in (0, 2):
        loader, sampler = build_train_loader(ds, batch_size=4, num_workers=workers, seed=7)
        sampler.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(loader) == 3
        runs.append(batches)
    skipped = 0
    for (x0, y0, n0), (x1, y1, n1) in zip(*runs):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and n0 == n1
        assert x0.shape[1:] == (3, 16, 16) and x0.shape[0] + n0 == 4
        skipped += n0
    assert skipped == 1


def test_build_pretrain_dataset__dataset_root_uses_train_split(tmp_path):
    # MAE users pass the ImageNet root (train/ + val/): val images must not be pre-trained on.
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(d / f"{i}.png")
    ds = build_pretrain_dataset(str(tmp_path), img_size=32)
    assert len(ds) == 6 and all(f"{os.sep}train{os.sep}" in p for p, _ in ds.samples)
    assert sorted({label for _, label in ds.samples}) == [0, 1]
