"""Properties of the data pipelines that their docs promise, against plain formulations:

* tar shards (:class:`ummae.data.shards.ShardStream`): with equal shards, a multiple of
  ranks of them and ``samples_per_epoch`` their total, every sample is seen exactly once per
  epoch across all ranks and all DataLoader workers, for several (ranks, workers, batch) and
  epochs, also where the workers divide neither the shards nor the batches, and the epochs differ in who reads what (the shard permutation depends on
  the epoch, the same on every rank). Run in-process: each (rank, worker) role is iterated as
  the DataLoader worker would (``get_worker_info`` stood in for), so many layouts are cheap;
  ``tests/test_shards.py`` runs the real two-rank, two-worker case under torchrun.
* uint8 normalisation (``normalize_uint8``; the segmenter's own: test_properties_segment.py) equals torchvision's
  ``ToTensor`` + ``Normalize(ImageNet mean, std)`` on batches whose channels differ.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import ummae.data.shards as shards_mod
from _helpers import write_image
from ummae.data.shard_writer import write_shards
from ummae.data.shards import ShardStream
from ummae.data.transforms import normalize_uint8

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
N = 24


@pytest.fixture(scope="module")
def shards12(tmp_path_factory):
    """24 distinct images, label = number, in 12 shards of 2."""
    root = tmp_path_factory.mktemp("src")
    lines = []
    for i in range(N):
        write_image(root / "img" / f"{i:03d}.png", size=(8, 6), seed=i)
        lines.append(f"img/{i:03d}.png {i}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("shards")
    write_shards(str(root / "list.txt"), str(out), shard_size=2)
    return out


def _epoch_labels(spec, ranks: int, workers: int, batch: int, epoch: int, monkeypatch) -> dict:
    """{(rank, worker): labels it yields in ``epoch``}, each role iterated on its own."""
    seen = {}
    for rank in range(ranks):
        for wid in range(workers):
            stream = ShardStream(str(spec), None, shuffle_buffer=4)
            stream.configure(batch_size=batch, num_replicas=ranks, rank=rank, seed=3, num_workers=workers)
            stream.set_epoch(epoch)
            info = SimpleNamespace(num_workers=workers, id=wid) if workers > 1 else None
            monkeypatch.setattr(shards_mod, "get_worker_info", lambda info=info: info)
            seen[rank, wid] = [label for _, label, _ in stream]
    return seen


@pytest.mark.parametrize(
    "ranks, workers, batch", [(1, 1, 4), (2, 1, 3), (1, 3, 2), (2, 2, 3), (3, 2, 2), (2, 3, 2), (4, 3, 1)]
)
def test_shards__every_sample_exactly_once_per_epoch_across_ranks_and_workers(
    shards12, ranks, workers, batch, monkeypatch
):
    per_epoch = []
    for epoch in (0, 1):
        seen = _epoch_labels(shards12, ranks, workers, batch, epoch, monkeypatch)
        everything = [lab for labels in seen.values() for lab in labels]
        assert sorted(everything) == list(range(N)), (ranks, workers, batch, epoch, seen)
        # each rank makes the same number of samples (DDP's lockstep): N / ranks
        for rank in range(ranks):
            assert sum(len(seen[rank, w]) for w in range(workers)) == N // ranks
        per_epoch.append({k: frozenset(v) for k, v in seen.items()})
    if ranks * workers > 1:
        # a new split of the shards every epoch (the permutation is seeded by the epoch)
        assert per_epoch[0] != per_epoch[1]


def test_shards__ranks_split_one_permutation_and_workers_tile_their_ranks_batches(shards12):
    """``rank_shards``: rank r takes shards r, r + R, ... of one permutation of the list, seeded
    by the seed and the epoch only (so the ranks' lists interleaved are the one-rank order),
    with the index's sample counts. ``worker_range``: the ranges of a rank's W workers tile
    ``[0, num_batches x batch)`` in order, worker w's as long as its batches ``t % W == w``."""
    for ranks, workers, batch in ((2, 3, 1), (3, 2, 2), (4, 1, 3), (1, 3, 3), (1, 5, 2)):
        for epoch in (0, 5):
            lists = []
            for rank in range(ranks):
                stream = ShardStream(str(shards12), None)
                stream.configure(batch_size=batch, num_replicas=ranks, rank=rank, seed=9, num_workers=workers)
                stream.set_epoch(epoch)
                lists.append(stream.rank_shards())
                assert all(n == 2 for _, n in lists[-1])  # shards of 2 (shards.json)
                nb = N // (ranks * batch)
                ranges = [stream.worker_range(w, workers) for w in range(workers)]
                assert ranges[0][0] == 0 and ranges[-1][1] == nb * batch
                assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
                assert [b - a for a, b in ranges] == [batch * len(range(w, nb, workers)) for w in range(workers)]
            one = ShardStream(str(shards12), None)
            one.configure(batch_size=1, num_replicas=1, rank=0, seed=9, num_workers=1)
            one.set_epoch(epoch)
            interleaved = [lists[i % ranks][i // ranks][0] for i in range(len(one.urls))]
            assert interleaved == [u for u, _ in one.rank_shards()]
            assert sorted(interleaved) == sorted(one.urls)


def test_normalize_uint8__equals_totensor_normalize_on_a_batch_with_channels_that_differ():
    rng = np.random.default_rng(1)
    arrs = [rng.integers(0, 256, (9, 13, 3), dtype=np.uint8) for _ in range(3)]
    arrs[0][..., 0], arrs[0][..., 2] = 250, 5  # very different channels: a swapped mean or std shows
    want = torch.stack([T.Normalize(MEAN, STD)(T.ToTensor()(Image.fromarray(a))) for a in arrs])
    batch = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrs])
    torch.testing.assert_close(normalize_uint8(batch), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(normalize_uint8(batch[1]), want[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("ranks, workers, batch", [(1, 3, 3), (1, 2, 8), (2, 3, 1), (3, 2, 4)])
def test_shards__worker_w_makes_the_batches_t_with_t_mod_W_equal_w(shards12, ranks, workers, batch, monkeypatch):
    """Also where a rank's batches do not divide among its workers: worker w makes
    ``len(range(w, num_batches, W))`` batches, and the rank ``num_batches`` x batch samples."""
    seen = _epoch_labels(shards12, ranks, workers, batch, 0, monkeypatch)
    nb = N // (ranks * batch)
    for rank in range(ranks):
        assert [len(seen[rank, w]) for w in range(workers)] == [
            len(range(w, nb, workers)) * batch for w in range(workers)
        ]


@pytest.mark.parametrize("ranks, workers, batch", [(1, 3, 3), (1, 5, 2), (2, 5, 1), (3, 3, 2), (1, 7, 1)])
def test_shards__every_sample_once_also_when_the_batches_do_not_divide_among_the_workers(
    shards12, ranks, workers, batch, monkeypatch
):
    """E.g. 1 rank, 3 workers, batch 3: 12 shards of 2, 24 samples per epoch, 8 batches: the
    workers make 3, 3 and 2 of them (9, 9 and 6 samples), so their ranges cut shards in two.
    Also 5 and 7 workers, which divide neither the shards nor the batches."""
    for epoch in (0, 1):
        seen = _epoch_labels(shards12, ranks, workers, batch, epoch, monkeypatch)
        assert sorted(lab for labels in seen.values() for lab in labels) == list(range(N)), (epoch, seen)


# ------------------------------------------------------------------------- detection jitter


@pytest.mark.parametrize("with_masks", [False, True])
def test_lsj__a_flipped_sample_is_the_mirror_of_the_unflipped_one_in_the_valid_region(with_masks):
    """Under one seed, flip probability 1 and 0 give the same resize and crop (the flip is the
    last draw): the image and masks mirrored within the valid (unpadded) width ``W``, boxes
    ``x1' = W - x2``, ``x2' = W - x1``; with masks the boxes are also those of the masks.
    Non-square images of both orientations, scales below and above the canvas."""
    from ummae.data.coco import LargeScaleJitter, masks_to_boxes

    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(50, 90), (90, 50), (70, 70), (40, 120)]):
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        boxes, masks = [], []
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            x1, y1 = int(rng.integers(x0 + 5, w + 1)), int(rng.integers(y0 + 5, h + 1))
            boxes.append([x0, y0, x1, y1])
            m = torch.zeros(h, w, dtype=torch.uint8)
            m[y0:y1, x0:x1] = 1
            masks.append(m)
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.arange(1, 5)}
        if with_masks:
            target["masks"] = torch.stack(masks)
        for seed in range(6):
            runs = []
            for flip in (0.0, 1.0):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(100 * k + seed)
                    runs.append(LargeScaleJitter(64, (0.3, 1.8), flip_prob=flip)(image, target))
            (a, ta), (b, tb) = runs
            ch, cw = ta["img_shape"]
            assert tb["img_shape"] == (ch, cw)
            fa = ta["boxes"]
            want = torch.stack([cw - fa[:, 2], fa[:, 1], cw - fa[:, 0], fa[:, 3]], dim=1)
            torch.testing.assert_close(tb["boxes"], want)
            assert torch.equal(tb["labels"], ta["labels"])
            assert torch.equal(b[:, :ch, :cw], a[:, :ch, :cw].flip(-1))
            assert torch.equal(b[:, ch:], a[:, ch:]) and torch.equal(b[:, :, cw:], a[:, :, cw:])  # padding
            if with_masks:
                assert torch.equal(tb["masks"][:, :ch, :cw], ta["masks"][:, :ch, :cw].flip(-1))
                torch.testing.assert_close(tb["boxes"], masks_to_boxes(tb["masks"]))


def test_shards__without_an_index_equal_shards_are_assumed_and_every_sample_is_still_seen_once(
    shards12, tmp_path, monkeypatch
):
    """A brace pattern of shards with no ``shards.json`` beside them (``--samples-per-epoch``
    given): the workers' ranges are cut as if the shards were equal, which they are here, so
    3 workers with 8 batches of 3 (3, 3 and 2 each) still see every sample once."""
    import shutil

    for tar in sorted(shards12.glob("*.tar")):
        shutil.copy(tar, tmp_path / tar.name)
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert names[0] == "shard-000000.tar" and len(names) == 12
    spec = str(tmp_path / "shard-{000000..000011}.tar")
    seen = {}
    for wid in range(3):
        stream = ShardStream(spec, None, samples_per_epoch=N, shuffle_buffer=4)
        assert stream.shard_sizes == [N // len(names)] * len(names)
        stream.configure(batch_size=3, num_replicas=1, rank=0, seed=3, num_workers=3)
        stream.set_epoch(0)
        monkeypatch.setattr(shards_mod, "get_worker_info", lambda wid=wid: SimpleNamespace(num_workers=3, id=wid))
        seen[wid] = [label for _, label, _ in stream]
    assert [len(v) for v in seen.values()] == [9, 9, 6]
    assert sorted(lab for labels in seen.values() for lab in labels) == list(range(N))


def test_shards__shards_with_no_readable_sample_are_one_clear_error(tmp_path):
    """Every shard of the rank unreadable: one error naming them, not an endless search."""
    from ummae.data.dataset import NoReadableImageError

    for i in range(2):
        (tmp_path / f"bad-{i}.tar").write_bytes(b"not a tar file at all" * 40)
    stream = ShardStream(str(tmp_path / "bad-{0..1}.tar"), None, samples_per_epoch=4, shuffle_buffer=0)
    stream.configure(batch_size=2, num_replicas=1, rank=0, seed=0, num_workers=0)
    with pytest.raises(NoReadableImageError, match=r"bad-\d\.tar.*hold no sample that can be read"):
        list(stream)
