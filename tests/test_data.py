"""Tests of ummae.data: datasets, collate, the resumable sampler and the loader; unreadable
images in training (replaced by the next readable one, never an empty or short batch); folder
scans through symlinked directories (each real directory once, link loops end)."""

from __future__ import annotations

import gc
import logging
import os
import random
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers import write_image
from ummae.data import (
    ImageDataset,
    NoReadableImageError,
    ResumableSampler,
    SubstituteUnreadable,
    build_pretrain_dataset,
    build_train_loader,
    collate_skip_bad,
)
from ummae.data.sources import scan_images
from ummae.data.transforms import normalize_uint8

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
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label == 0


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
    assert ds.samples == [(str(tmp_path / "imgs" / "a.png"), 3), (str(tmp_path / "imgs" / "b.png"), -1)]
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
    img = normalize_uint8(ds[0][0])  # the default pipeline normalises on the device
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = torch.tensor([(v / 255 - m) / s for v, m, s in zip((200, 100, 50), mean, std, strict=True)])
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

    tf = create_transform(
        32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, interpolation="bicubic"
    )
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
    for (x0, y0, n0), (x1, y1, n1) in zip(*runs, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and n0 == n1
        assert x0.shape == (4, 3, 16, 16)  # the bad image is replaced, not dropped
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


# ---------------------------------------------------------------- unreadable images in training


def _bad_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8 this is not a jpeg " * 10)
    return path


def _dataset_with_bad_file(kind: str, tmp_path: Path) -> tuple[ImageDataset, int, int]:
    """A pre-training dataset of ``kind`` with one unreadable sample; returns ``(dataset,
    index of the bad sample, index of the sample that must replace it)``."""
    if kind == "ImageFolder":
        for c in ("a", "b"):
            for i in range(3):
                write_image(tmp_path / c / f"{i}.png", seed=10 * ord(c) + i)
        _bad_file(tmp_path / "a" / "1bad.png")  # a/0 a/1 a/1bad a/2 b/0 ...: index 2 -> 3
        ds = build_pretrain_dataset(str(tmp_path), img_size=16)
    elif kind == "flat folder":
        for i in range(4):
            write_image(tmp_path / f"{i}.png", seed=i)
        _bad_file(tmp_path / "3bad.png")  # last in order: the search wraps around to 0.png
        ds = build_pretrain_dataset(str(tmp_path), img_size=16)
    elif kind == "list file":
        for i in range(3):
            write_image(tmp_path / "imgs" / f"{i}.png", seed=i)
        lst = tmp_path / "train.txt"
        # a damaged file, then a missing one, then readable ones: index 0 -> 2
        _bad_file(tmp_path / "imgs" / "bad.png")
        lst.write_text("imgs/bad.png 5\nimgs/missing.png 6\nimgs/0.png 7\nimgs/1.png 8\n")
        ds = build_pretrain_dataset(str(lst), img_size=16)
    else:  # the embedded demo, one of its entries pointed at a bad file
        ds = build_pretrain_dataset(None, img_size=16, demo_repeats=1)
        ds.samples[1] = (str(_bad_file(tmp_path / "broken.png")), -1)
    bad = next(i for i, (p, _) in enumerate(ds.samples) if "bad" in Path(p).name or "broken" in p)
    want = {"ImageFolder": 3, "flat folder": 0, "list file": 2, "demo": 2}[kind]
    return ds, bad, want


@pytest.mark.parametrize("kind", ["ImageFolder", "flat folder", "list file", "demo"])
def test_load_or_substitute__next_readable_image_takes_the_place(tmp_path, caplog, kind):
    ds, bad, want = _dataset_with_bad_file(kind, tmp_path)
    assert ds.kind.startswith(kind.replace("demo", "embedded demo"))
    assert ds[(bad, 3)] is None  # direct access (evaluation) still reports it
    assert ds.substitute_index(bad) == want
    with caplog.at_level(logging.WARNING, logger="ummae.data"):
        image, label, n_skipped = ds.load_or_substitute((bad, 3))
        ds.load_or_substitute((bad, 4))
    own_image, own_label = ds[(want, 3)]
    # the substitute's own image under the requested key's seed, and its own label
    assert torch.equal(image, own_image) and label == own_label == ds.samples[want][1]
    assert image.shape == (3, 16, 16) and n_skipped == 1
    # one warning naming the bad file (and its substitute), however often it comes up
    named = [
        r.getMessage()
        for r in caplog.records
        if ds.samples[bad][0] in r.getMessage() and "in its place" in r.getMessage()
    ]
    assert len(named) == 1 and ds.samples[want][0] in named[0]
    # a readable sample is itself, not counted
    good = (bad + 1) % len(ds) if kind != "list file" else 3
    image, label, n_skipped = ds.load_or_substitute((good, 3))
    assert n_skipped == 0 and torch.equal(image, ds[(good, 3)][0])
    assert SubstituteUnreadable(ds)[(bad, 3)][2] == 1 and len(SubstituteUnreadable(ds)) == len(ds)


def test_load_or_substitute__deterministic(tmp_path):
    """Same (index, seed) -> the same tensor, from a fresh dataset (as after a resume), whatever
    the global RNGs; another seed -> another crop of the same substitute."""
    ds, bad, _ = _dataset_with_bad_file("flat folder", tmp_path)
    a = ds.load_or_substitute((bad, 11))
    torch.rand(5)
    random.random()
    np.random.rand()
    b = ds.load_or_substitute((bad, 11))
    fresh, _, _ = _dataset_with_bad_file("flat folder", tmp_path)  # no memory of bad files
    c = fresh.load_or_substitute((bad, 11))
    for other in (b, c):
        assert torch.equal(a[0], other[0]) and a[1:] == other[1:]
    assert not torch.equal(a[0], ds.load_or_substitute((bad, 12))[0])


def test_collate_skip_bad__counts_substituted_items():
    x = torch.zeros(3, 4, 4)
    images, labels, n = collate_skip_bad([(x, 1, 0), (x + 1, 2, 1), (x + 2, 0, 1)])
    assert images.shape == (3, 3, 4, 4) and labels.tolist() == [1, 2, 0] and n == 2


def test_build_train_loader__batch_size_1_every_batch_full(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", seed=i)
    _bad_file(tmp_path / "1bad.png")
    ds = build_pretrain_dataset(str(tmp_path), img_size=16)
    loader, sampler = build_train_loader(ds, batch_size=1, num_workers=0, seed=3)
    batches = list(loader)
    assert len(batches) == 4 and all(x.shape == (1, 3, 16, 16) for x, _, _ in batches)
    assert sum(n for _, _, n in batches) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_build_train_loader__no_readable_image_fails_with_one_line(tmp_path, workers):
    for i in range(3):
        _bad_file(tmp_path / f"{i}.jpg")
    ds = build_pretrain_dataset(str(tmp_path), img_size=16)
    loader, _ = build_train_loader(ds, batch_size=2, num_workers=workers, seed=0)
    with pytest.raises(NoReadableImageError) as err:
        next(iter(loader))
    assert isinstance(err.value, ValueError)  # the CLI prints it as one error line, exit 2
    msg = str(err.value)
    del err  # its traceback holds the loader's iterator: free it (and its workers) now
    gc.collect()
    assert msg.startswith(f"no image of flat folder {tmp_path} can be read: all 3 files failed")
    assert "\n" not in msg
    assert re.search(r"\(e\.g\. .*[012]\.jpg: UnidentifiedImageError", msg)


def test_pretrain__batch_size_1_with_unreadable_image_finishes(tmp_path, monkeypatch):
    """The run that used to stop ("every image of batch ... was unreadable"): batch size 1
    over a folder with one bad file. It finishes, every batch is full, the skip is counted."""
    import ummae.tasks.pretrain as train
    from _helpers import epoch_records, smooth_images, step_records
    from ummae.config import PretrainConfig

    data = smooth_images(tmp_path / "data", 5, size=72)
    _bad_file(data / "img_002b.png")  # sorted between img_002 and img_003
    sizes, real = [], train.pretrain_step

    def step(model, batch, generator):
        sizes.append(batch[0].shape[0])
        return real(model, batch, generator)

    monkeypatch.setattr(train, "pretrain_step", step)
    out = tmp_path / "run"
    cfg = PretrainConfig(
        model="mae_swin_test",
        data=str(data),
        output=str(out),
        epochs=2,
        warmup_epochs=1,
        batch_size=1,
        blr=0.05,
        num_workers=0,
        log_every=1,
        keep_every=0,
        seed=0,
        device="cpu",
        vis_every=0,
    )
    train.pretrain(cfg)
    assert sizes == [1] * 12  # 6 samples x 2 epochs, none empty
    assert [r["skipped_images"] for r in epoch_records(out)] == [1, 1]
    steps = step_records(out)
    assert len(steps) == 12 and all(np.isfinite(r["loss"]) for r in steps)
    per_epoch = [steps[:6], steps[6:]]  # skipped_images of a step record: so far this epoch
    assert all(ep[-1]["skipped_images"] == 1 for ep in per_epoch)


def test_cli_pretrain__no_readable_image_one_error_line(tmp_path, capsys):
    from ummae.cli import main

    data = tmp_path / "data"
    for i in range(2):
        _bad_file(data / f"{i}.png")
    rc = main(
        [
            "pretrain",
            "--model",
            "mae_swin_test",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--batch-size",
            "1",
            "--num-workers",
            "2",
            "--device",
            "cpu",
            "--vis-every",
            "0",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"ummae pretrain: error: no image of flat folder {data} can be read")


# ---------------------------------------------------------------- folder scans and symlinks


def _symlink(target, link: Path) -> None:
    try:
        os.symlink(target, link, target_is_directory=True)
    except (OSError, NotImplementedError) as e:
        pytest.skip(f"cannot make directory symlinks here: {e}")


def _scan_in_thread(fn, timeout: float = 30.0):
    """``fn()`` in a daemon thread; fails the test if it does not return within ``timeout``."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the scan did not end within {timeout:.0f} s"
    return result["value"]


def _real_files(paths) -> list:
    return sorted(os.path.realpath(p) for p in paths)


def test_scan__loop_link_lists_each_image_once(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"{i}.png", seed=i)
    write_image(tmp_path / "sub" / "s.png")
    _symlink("..", tmp_path / "sub" / "loop")  # used to list every image 41 times
    ds = build_pretrain_dataset(str(tmp_path), img_size=8)
    assert len(ds) == 5
    assert _real_files(p for p, _ in ds.samples) == _real_files(
        [tmp_path / f"{i}.png" for i in range(4)] + [tmp_path / "sub" / "s.png"]
    )
    assert [p for p, _ in ds.samples] == [str(tmp_path / f"{i}.png") for i in range(4)] + [
        str(tmp_path / "sub" / "s.png")
    ]  # real paths, not paths through the link


def test_scan__imagefolder_links_to_parent_and_other_class(tmp_path):
    for c in ("a", "b"):
        for i in range(2):
            write_image(tmp_path / c / f"{i}.png", seed=i)
    _symlink("..", tmp_path / "a" / "loop")  # the top folder again, from inside a class
    (tmp_path / "a" / "deep").mkdir()
    _symlink("../../b", tmp_path / "a" / "deep" / "to_b")  # another class, from inside a
    write_image(tmp_path / "b" / "sub" / "s.png")
    _symlink("../b/sub", tmp_path / "a" / "b_sub")  # a folder inside another class
    ds = build_pretrain_dataset(str(tmp_path), img_size=8)
    labels = {os.path.relpath(p, tmp_path): lab for p, lab in ds.samples}
    # each image once, at its real path, under the class it really lies in
    assert labels == {"a/0.png": 0, "a/1.png": 0, "b/0.png": 1, "b/1.png": 1, "b/sub/s.png": 1}
    assert len(ds) == 5


def test_scan__two_loop_links_end(tmp_path):
    write_image(tmp_path / "x.png")
    write_image(tmp_path / "sub" / "y.png")
    _symlink("..", tmp_path / "sub" / "loop1")  # two loops: 2**40 paths with the old scan
    _symlink("..", tmp_path / "sub" / "loop2")
    _symlink(".", tmp_path / "sub" / "self")
    paths = _scan_in_thread(lambda: scan_images(str(tmp_path)))
    assert paths == [str(tmp_path / "x.png"), str(tmp_path / "sub" / "y.png")]
    ds = _scan_in_thread(lambda: build_pretrain_dataset(str(tmp_path), img_size=8))
    assert len(ds) == 2


def test_scan__link_to_outside_folder_followed_once(tmp_path):
    outside = tmp_path / "outside"
    write_image(outside / "o1.png", seed=1)
    write_image(outside / "deeper" / "o2.png", seed=2)
    data = tmp_path / "data"
    write_image(data / "x.png")
    _symlink(outside, data / "linked")  # a folder not yet visited: followed
    _symlink(outside, data / "linked_again")  # the same directory: read once only
    _symlink("../data", outside / "back")  # and a loop through it
    write_image(data / "z" / "deep" / "z.png")
    _symlink("z/deep", data / "a_link")  # into the tree: the real path is kept
    paths = _scan_in_thread(lambda: scan_images(str(data)))
    # the real tree first (a folder's own files, then its sub-folders, sorted), then the
    # trees reached through links
    assert paths == [
        str(data / "x.png"),
        str(data / "z" / "deep" / "z.png"),
        str(data / "linked" / "o1.png"),
        str(data / "linked" / "deeper" / "o2.png"),
    ]
    # an ImageFolder class that is itself a link to an outside folder
    os.unlink(outside / "back")
    tree = tmp_path / "tree"
    write_image(tree / "a" / "0.png")
    tree.joinpath("b").parent.mkdir(exist_ok=True)
    _symlink(outside, tree / "b")
    ds = build_pretrain_dataset(str(tree), img_size=8)
    assert {(os.path.relpath(p, tree), lab) for p, lab in ds.samples} == {
        ("a/0.png", 0),
        ("b/o1.png", 1),
        ("b/deeper/o2.png", 1),
    }
