"""Tests of ummae.data.ade on coco_semseg_mini (80 training / 80 validation COCO images in the
ADE20K layout, long side 256, raw label 0 = ignore, 1 = background, 2..81 = things): loading,
label mapping and checking (LabelError, also through a DataLoader worker), the MMSegmentation
training pipeline (shapes, seeding, padding, nearest labels, cat_max_ratio), collate, and bad
input (missing folders or label maps, sizes that differ, unreadable files)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from _helpers import COCO_MINI, write_image
from ummae.data import build_train_loader
from ummae.data.ade import (
    ADE20K_CLASSES,
    IMAGENET_MEAN_RGB,
    LabelError,
    SegmentationFolder,
    SegTrainTransform,
    collate_segmentation,
    collate_segmentation_eval,
    map_labels,
)
from ummae.data.dataset import NoReadableImageError, SubstituteUnreadable, WorkerSafeValueError

SEMSEG_MINI = COCO_MINI.parent / "coco_semseg_mini"
IGNORE = 255


def _root() -> Path:
    if not (SEMSEG_MINI / "label_map.txt").is_file():
        pytest.fail(
            f"the coco_semseg_mini test data is missing: expected {SEMSEG_MINI} with "
            f"images/{{training,validation}}/, annotations/{{training,validation}}/ "
            f"and label_map.txt"
        )
    return SEMSEG_MINI


@pytest.fixture(scope="module")
def train_ds():
    return SegmentationFolder(_root(), train=True, num_classes=81, transform=SegTrainTransform(128))


@pytest.fixture(scope="module")
def val_ds():
    return SegmentationFolder(_root(), "validation", train=False, num_classes=81)


def _raw(ds: SegmentationFolder, index: int) -> np.ndarray:
    return np.array(Image.open(ds.ann_paths[index]))


def _mirror(tmp_path: Path, n: int = 3, split: str = "training") -> Path:
    """The first ``n`` samples of coco_semseg_mini's ``split`` in ``tmp_path``: images and
    label maps as symlinks (so one can be deleted or replaced), label_map.txt copied."""
    root = tmp_path / "semseg"
    for kind in ("images", "annotations"):
        (root / kind / split).mkdir(parents=True)
    for img in sorted((_root() / "images" / split).iterdir())[:n]:
        (root / "images" / split / img.name).symlink_to(img)
        png = img.with_suffix(".png").name
        (root / "annotations" / split / png).symlink_to(_root() / "annotations" / split / png)
    (root / "label_map.txt").write_bytes((_root() / "label_map.txt").read_bytes())
    return root


def _tiny_root(
    tmp_path: Path, labels: list[np.ndarray], split: str = "training", image_sizes: list[tuple[int, int]] | None = None
) -> Path:
    """A root of ``len(labels)`` noise images with the given label maps (mode L PNGs); each
    image has its label map's size unless ``image_sizes`` (w, h) says otherwise."""
    root = tmp_path / "tiny"
    for k, lab in enumerate(labels):
        size = image_sizes[k] if image_sizes else (lab.shape[1], lab.shape[0])
        write_image(root / "images" / split / f"s{k}.jpg", size=size, seed=k)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        png = root / "annotations" / split / f"s{k}.png"
        Image.fromarray(lab.astype(np.uint8), mode="L").save(png)
    return root


def _seeded(transform, img, label, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img, label)


# ---------------------------------------------------------------- loading and labels


def test_loads_both_splits_with_label_map_names(train_ds, val_ds):
    for ds, split in ((train_ds, "training"), (val_ds, "validation")):
        assert len(ds) == 80 and ds.split == split and ds.num_classes == 81
        assert ds.img_dir == str(_root() / "images" / split)
        assert ds.ann_dir == str(_root() / "annotations" / split)
        assert [label for _, label in ds.samples] == list(range(80))
        assert all(Path(a).stem == Path(p).stem for (p, _), a in zip(ds.samples, ds.ann_paths, strict=True))
        # label_map.txt: raw 1 background -> label 0, raw 2 person -> label 1 (raw 0 ignore)
        assert len(ds.class_names) == 81
        assert ds.class_names[:3] == ["background", "person", "bicycle"]
        assert ds.class_names[-1] == "toothbrush"
    image, label, path = val_ds[0]
    assert image.dtype == torch.uint8 and label.dtype == torch.int64
    assert image.shape[1:] == label.shape and max(image.shape[1:]) == 256
    assert path == val_ds.samples[0][0]
    assert torch.equal(label, val_ds.label(0))


def test_label_maps_reduce_zero_label(train_ds):
    # a map with crowd (raw 0) pixels: they become the ignore index
    index = next(i for i in range(len(train_ds)) if (_raw(train_ds, i) == 0).any())
    raw = _raw(train_ds, index)
    label = train_ds.label(index)
    assert label.dtype == torch.int64 and label.shape == raw.shape
    assert (label[torch.from_numpy(raw == 0)] == IGNORE).all()
    assert torch.equal(label[torch.from_numpy(raw > 0)], torch.from_numpy(raw[raw > 0] - 1).long())


def test_label_maps_kept_without_reduce_zero_label():
    ds = SegmentationFolder(_root(), train=False, num_classes=82, reduce_zero_label=False, ignore_index=IGNORE)
    assert torch.equal(ds.label(3), torch.from_numpy(_raw(ds, 3)).long())
    assert ds.class_names[:3] == ["ignore", "background", "person"]


def test_map_labels():
    raw = np.array([[0, 1, 2], [128, 254, 255]], dtype=np.uint8)
    expect = torch.tensor([[IGNORE, 0, 1], [127, 253, IGNORE]])
    assert torch.equal(map_labels(raw, reduce_zero_label=True, ignore_index=IGNORE), expect)
    out = map_labels(torch.from_numpy(raw), reduce_zero_label=True, ignore_index=-1)
    assert out.dtype == torch.int64 and out.tolist() == [[-1, 0, 1], [127, 253, -1]]
    kept = map_labels(raw, reduce_zero_label=False, ignore_index=IGNORE)
    assert kept.dtype == torch.int64 and kept.tolist() == raw.tolist()
    with pytest.raises(ValueError, match="integers"):
        map_labels(raw.astype(np.float32), reduce_zero_label=True, ignore_index=IGNORE)


def test_palette_label_map_reads_indices_not_colours(tmp_path):
    root = _tiny_root(tmp_path, [np.ones((8, 10))])
    png = root / "annotations" / "training" / "s0.png"
    lab = Image.fromarray(np.tile(np.array([3, 4, 5, 6], dtype=np.uint8), (8, 3))[:, :10], mode="L")
    lab = lab.convert("P")
    lab.putpalette([200, 10, 10] * 256)  # every index the same colour: only indices tell apart
    lab.save(png)
    ds = SegmentationFolder(root, train=False, num_classes=10)
    assert Image.open(png).mode == "P"
    assert torch.equal(ds.label(0), torch.from_numpy(np.array(Image.open(png))).long() - 1)


def test_class_names_defaults_and_disagreeing_label_map(tmp_path, caplog):
    root = _tiny_root(tmp_path, [np.ones((8, 10))])
    assert list(SegmentationFolder(root, train=False).class_names) == list(ADE20K_CLASSES)
    three = SegmentationFolder(root, train=False, num_classes=3)
    assert three.class_names == ["class0", "class1", "class2"]
    (root / "label_map.txt").write_text("0\tother\n1\tsky\n2\ttree\n5\tfar\n")
    with caplog.at_level(logging.WARNING, logger="ummae.data.ade"):
        ds = SegmentationFolder(root, train=False, num_classes=3)
    assert ds.class_names == ["sky", "tree", "class2"]
    assert "beyond the 3 classes" in caplog.text and "names no class for 1" in caplog.text
    (root / "label_map.txt").write_text("one\tsky\n")
    with pytest.raises(ValueError, match=r"label_map.txt, line 1: 'one' is not an integer"):
        SegmentationFolder(root, train=False, num_classes=3)


def test_ade20k_classes():
    assert len(ADE20K_CLASSES) == 150 == len(set(ADE20K_CLASSES))
    assert ADE20K_CLASSES[:5] == ("wall", "building", "sky", "floor", "tree")
    assert ADE20K_CLASSES[7] == "bed" and ADE20K_CLASSES[12] == "person"
    assert ADE20K_CLASSES[-3:] == ("glass", "clock", "flag")


# ---------------------------------------------------------------- label errors


def _assert_label_error(err, png: str, value: int):
    message = str(err.value)
    assert type(err.value) is LabelError and isinstance(err.value, ValueError)
    assert "\n" not in message, message
    assert message.startswith(f"label {value} ") and png in message, message
    assert "--num-classes 20" in message and "check --num-classes" in message, message


def _first_batch_error(loader) -> tuple[type | None, str]:
    """The type and message of the error the loader's first batch raises. Caught here, so the
    iterator (held by the traceback) and its worker are shut down on return, not at a later
    garbage collection."""
    try:
        next(iter(loader))
    except Exception as e:
        return type(e), str(e)
    return None, ""


def test_label_above_declared_classes_is_an_error(tmp_path):
    ds = SegmentationFolder(_root(), train=True, num_classes=20, transform=SegTrainTransform(64))
    index = next(i for i in range(len(ds)) if _raw(ds, i).max() > 21)
    worst = int(_raw(ds, index).max()) - 1
    with pytest.raises(LabelError) as err:
        ds.label(index)
    _assert_label_error(err, ds.ann_paths[index], worst)
    # reading it for training is the same error, never a substitute
    with pytest.raises(LabelError) as err:
        ds.load_or_substitute((index, 0))
    _assert_label_error(err, ds.ann_paths[index], worst)
    # and through a DataLoader worker: still a LabelError of one line
    loader = DataLoader(
        SubstituteUnreadable(ds), batch_size=1, num_workers=1, sampler=[(index, 0)], collate_fn=collate_segmentation
    )
    kind, message = _first_batch_error(loader)
    assert kind is LabelError and "\n" not in message, message
    assert message.startswith(f"label {worst} ") and ds.ann_paths[index] in message, message


def test_crafted_label_value_is_named(tmp_path):
    lab = np.ones((12, 16))
    lab[3, 4] = 200
    ds = SegmentationFolder(_tiny_root(tmp_path, [lab]), train=False, num_classes=20)
    with pytest.raises(
        LabelError,
        match=r"^label 199 \(value 200 in the file\) in .*s0\.png is "
        r"outside the 20 classes declared",
    ):
        ds[0]


def test_label_size_unlike_image_is_an_error(tmp_path):
    root = _tiny_root(tmp_path, [np.ones((12, 16)), np.ones((12, 16))], image_sizes=[(16, 12), (17, 12)])
    ds = SegmentationFolder(root, train=False, num_classes=5)
    assert ds[0][1].shape == (12, 16)
    for read in (lambda: ds[1], lambda: ds.label(1)):
        with pytest.raises(
            LabelError,
            match=r"label map .*s1\.png is 16x12 but its image "
            r".*s1\.jpg is 17x12",
        ):
            read()


def test_rgb_label_map_is_an_error(tmp_path):
    root = _tiny_root(tmp_path, [np.ones((12, 16))])
    Image.new("RGB", (16, 12), (1, 1, 1)).save(root / "annotations" / "training" / "s0.png")
    with pytest.raises(LabelError, match="mode RGB"):
        SegmentationFolder(root, train=False, num_classes=5).label(0)


def test_worker_safe_errors():
    assert issubclass(LabelError, WorkerSafeValueError)
    assert issubclass(NoReadableImageError, WorkerSafeValueError)
    wrapped = (
        "Caught LabelError in DataLoader worker process 0.\nOriginal Traceback (most "
        "recent call last):\n  ...\nummae.data.ade.LabelError: label 3 in x.png\n"
    )
    assert str(LabelError(wrapped)) == "label 3 in x.png"
    assert str(LabelError("plain")) == "plain"


# ---------------------------------------------------------------- constructor errors


def test_constructor_errors(tmp_path):
    root = _tiny_root(tmp_path, [np.ones((8, 10)), np.ones((8, 10))])
    (root / "annotations" / "training" / "s1.png").unlink()
    with pytest.raises(
        ValueError,
        match=r"^1 of the 2 images in .* have no label map, e\.g\. "
        r".*s1\.jpg \(expected .*annotations/training/s1\.png\)$",
    ):
        SegmentationFolder(root, train=True)
    with pytest.raises(ValueError, match=r"^folder .*annotations/validation not found \(expected"):
        (root / "images" / "validation").mkdir()
        SegmentationFolder(root, "validation", train=False)
    with pytest.raises(ValueError, match=r"^folder .*images/nosplit not found"):
        SegmentationFolder(root, "nosplit", train=False)
    (root / "annotations" / "validation").mkdir()
    with pytest.raises(ValueError, match=r"^no images were found in .*images/validation"):
        SegmentationFolder(root, "validation", train=False)
    with pytest.raises(ValueError, match="num_classes must be at least 1"):
        SegmentationFolder(root, train=False, num_classes=0)
    with pytest.raises(ValueError, match=r"ignore_index 5 is one of the 10 classes"):
        SegmentationFolder(root, train=False, num_classes=10, ignore_index=5)
    (root / "annotations" / "training" / "s1.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"transform's ignore_index 255 differs .* -1"):
        SegmentationFolder(root, train=True, ignore_index=-1, transform=SegTrainTransform(8))


def test_transform_argument_errors():
    for kwargs, match in (
        ({"crop_size": 0}, "crop_size"),
        ({"ratio_range": (2.0, 1.0)}, "ratio_range"),
        ({"scale": (512,)}, "scale"),
        ({"cat_max_ratio": 0}, "cat_max_ratio"),
        ({"flip_prob": 1.5}, "flip_prob"),
    ):
        with pytest.raises(ValueError, match=match):
            SegTrainTransform(**kwargs)
    text = repr(SegTrainTransform(64))
    assert text.startswith("SegTrainTransform(crop_size=64, scale=(2048, 512)"), text


# ---------------------------------------------------------------- training pipeline


def test_train_transform_shapes_and_seeding(train_ds):
    image, label, skipped = train_ds.load_or_substitute((5, 11))
    assert image.shape == (3, 128, 128) and image.dtype == torch.uint8
    assert label.shape == (128, 128) and label.dtype == torch.int64 and skipped == 0
    again = train_ds.load_or_substitute((5, 11))
    assert torch.equal(image, again[0]) and torch.equal(label, again[1])
    others = [train_ds.load_or_substitute((5, s)) for s in (12, 13)]
    assert all(not torch.equal(image, o[0]) for o in others)
    # the default training transform is mmseg's ADE20K pipeline
    default = SegmentationFolder(_root(), train=True, num_classes=81)
    assert default.pair_transform.crop_size == 512 and default.pair_transform.scale == (2048, 512)


def test_train_labels_are_nearest_input_values(train_ds):
    for index in range(4):
        allowed = set(train_ds.label(index).unique().tolist()) | {IGNORE}
        for seed in range(3):
            _, label, _ = train_ds.load_or_substitute((index, seed))
            assert set(label.unique().tolist()) <= allowed


def test_padding_when_smaller_than_the_crop(train_ds):
    # ratio 0.1: (204, 51) target -> 51 px short side, far below the 128 crop
    t = SegTrainTransform(128, ratio_range=(0.1, 0.1))
    img = Image.open(train_ds.samples[0][0]).convert("RGB")
    w, h = img.size
    factor = min(204 / max(h, w), 51 / min(h, w))
    nh, nw = int(h * factor + 0.5), int(w * factor + 0.5)
    for seed in range(3):
        image, label = _seeded(t, img, train_ds.label(0), seed)
        mean = torch.tensor(IMAGENET_MEAN_RGB, dtype=torch.uint8).view(3, 1)
        assert (image[:, nh:, :].flatten(1) == mean).all()
        assert (image[:, :, nw:].flatten(1) == mean).all()
        assert (label[nh:, :] == IGNORE).all() and (label[:, nw:] == IGNORE).all()
        assert (label[:nh, :nw] != IGNORE).any()


def test_photometric_changes_colours_not_labels(train_ds):
    img = Image.open(train_ds.samples[1][0]).convert("RGB")
    lab = train_ds.label(1)
    plain, with_pm = SegTrainTransform(96), SegTrainTransform(96, photometric=False)
    changed = 0
    for seed in range(4):
        a, la = _seeded(plain, img, lab, seed)
        b, lb = _seeded(with_pm, img, lab, seed)
        assert torch.equal(la, lb)  # the geometric draws come first: same crop and flip
        changed += int(not torch.equal(a, b))
    assert changed >= 3


def _max_share(label: Tensor) -> float:
    _, counts = torch.unique(label[label != IGNORE], return_counts=True)
    return float(counts.max()) / float(counts.sum()) if counts.numel() > 1 else 1.0


def test_cat_max_ratio_prefers_mixed_crops():
    # one dominant class with a 60x60 square of another in the middle of 200x200: a 100 px
    # crop passes mmseg's test (largest class < 75%) only where it holds enough of the square,
    # 52% of the 101 x 101 offsets (counted exhaustively)
    lab = torch.ones(200, 200, dtype=torch.int64)
    lab[70:130, 70:130] = 2
    lab[:5] = IGNORE  # ignored pixels count for no class
    img = Image.fromarray(np.zeros((200, 200, 3), dtype=np.uint8))
    kwargs = {"scale": (200, 200), "ratio_range": (1.0, 1.0), "photometric": False}
    checked = SegTrainTransform(100, **kwargs)
    unchecked = SegTrainTransform(100, cat_max_ratio=1.0, **kwargs)
    ok_checked = [_max_share(_seeded(checked, img, lab, s)[1]) < 0.75 for s in range(60)]
    ok_unchecked = [_max_share(_seeded(unchecked, img, lab, s)[1]) < 0.75 for s in range(60)]
    assert all(ok_checked), sum(ok_checked)  # 11 draws all failing: 0.48 ** 11 = 0.03%
    assert sum(ok_unchecked) <= 42, sum(ok_unchecked)  # one draw: 31 of 60 expected


# ---------------------------------------------------------------- collate and unreadable files


def test_collate_segmentation():
    def item(v, s):
        return torch.full((3, 4, 4), v, dtype=torch.uint8), torch.full((4, 4), v), s

    images, labels, skipped = collate_segmentation([item(1, 0), None, item(2, 1)])
    assert images.shape == (2, 3, 4, 4) and images.dtype == torch.uint8
    assert labels.shape == (2, 4, 4) and labels.dtype == torch.int64 and skipped == 2
    assert labels[1].eq(2).all()
    images, labels, skipped = collate_segmentation([None])
    assert images.numel() == 0 and labels.numel() == 0 and skipped == 1
    small = (torch.zeros(3, 2, 2, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="one size to be stacked"):
        collate_segmentation([item(1, 0), small])
    images, labels, paths, skipped = collate_segmentation_eval(
        [(torch.zeros(3, 5, 6), torch.zeros(5, 6), "a.jpg"), None, (torch.zeros(3, 2, 2), torch.zeros(2, 2), "b.jpg")]
    )
    assert [i.shape[1:] for i in images] == [(5, 6), (2, 2)] and len(labels) == 2
    assert paths == ["a.jpg", "b.jpg"] and skipped == 1


def test_train_loader_batches(train_ds):
    loader, _ = build_train_loader(train_ds, batch_size=4, num_workers=0, collate_fn=collate_segmentation)
    images, labels, skipped = next(iter(loader))
    assert images.shape == (4, 3, 128, 128) and labels.shape == (4, 128, 128) and skipped == 0


@pytest.mark.parametrize("broken", ["image", "label map"])
def test_unreadable_sample_substituted_in_training_skipped_in_eval(tmp_path, broken, caplog):
    root = _mirror(tmp_path)
    train = SegmentationFolder(root, train=True, num_classes=81, transform=SegTrainTransform(64))
    bad = Path(train.samples[1][0]) if broken == "image" else Path(train.ann_paths[1])
    bad.unlink()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n cut" if broken == "label map" else b"\xff\xd8\xff cut")
    image, label, skipped = train.load_or_substitute((1, 0))
    assert skipped == 1 and image.shape == (3, 64, 64) and label.shape == (64, 64)
    substitute = train.load_or_substitute((2, 0))  # the next readable sample, same seed
    assert torch.equal(image, substitute[0]) and torch.equal(label, substitute[1])
    evaluation = SegmentationFolder(root, train=False, num_classes=81)
    with caplog.at_level(logging.WARNING):
        assert evaluation[1] is None
    assert f"skipping unreadable image {train.samples[1][0]}" in caplog.text
    assert evaluation[0] is not None and evaluation[2] is not None
    images, labels, paths, skipped = collate_segmentation_eval([evaluation[k] for k in range(3)])
    assert len(images) == 2 and skipped == 1
    if broken == "label map":
        with pytest.raises(ValueError, match=r"^label map .*\.png cannot be read"):
            evaluation.label(1)
