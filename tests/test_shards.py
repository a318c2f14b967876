"""Sharded input (`--data` tar shards, webdataset) and the uint8 sample pipeline.

Shards: what `ummae shards` writes reads back to the same images and labels; an epoch over
two gloo ranks (two workers each) sees every sample once; a run resumed mid-epoch trains on the
same batches; a truncated tar and an undecodable sample are skipped, the one with a warning
naming it, the other counted. Pipeline: the uint8 path draws the crops and flips of MAE's PIL
transform (statistically, and draw for draw under one seed) and gives its pixels within
interpolation rounding on real JPEGs (`../shared/data/jpeg_fullres`; these must run in CI).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ummae.tasks.pretrain as train
from _helpers import assert_tensors_equal, tiny_pretrain_config, torchrun_command, write_image
from ummae.data import build_pretrain_dataset, build_train_loader
from ummae.data.decode import read_image
from ummae.data.shard_writer import write_shards
from ummae.data.shards import ShardStream
from ummae.data.transforms import augment_seeded, build_pretrain_transform, normalize_uint8

JPEGS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "jpeg_fullres" / "images"


def _labelled_list(root: Path, n: int) -> Path:
    """``n`` distinct noise images with label = their number (each sample identifiable)."""
    lines = []
    for i in range(n):
        write_image(root / "img" / f"{i:03d}.png", size=(24, 20), seed=i)
        lines.append(f"img/{i:03d}.png {i}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt"


@pytest.fixture(scope="module")
def shards24(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("shards")
    write_shards(str(_labelled_list(root, 24)), str(out), shard_size=6)
    return out


def _epoch(stream: ShardStream, workers: int, epoch: int = 0, start: int = 0):
    loader = stream.loader(workers)
    stream.set_epoch(epoch)
    stream.set_start_batch(start)
    return [(images.clone(), labels.tolist(), skipped) for images, labels, skipped in loader]


# ---------------------------------------------------------------- shards


def test_shards__read_back_the_written_images_and_labels(tmp_path):
    src = _labelled_list(tmp_path / "src", 10)
    write_shards(str(src), str(tmp_path / "sh"), shard_size=4, shuffle=True, seed=5)
    stream = ShardStream(str(tmp_path / "sh"), None, tensor_input=True, shuffle_buffer=0)
    assert len(stream.urls) == 3 and len(stream) == 10  # 4 + 4 + 2, counted from shards.json
    stream.configure(batch_size=1, num_replicas=1, rank=0, seed=0, num_workers=0)
    got = {label: image for image, label, skipped in stream}
    assert sorted(got) == list(range(10))
    for i, image in got.items():
        assert torch.equal(image, read_image(str(tmp_path / "src" / "img" / f"{i:03d}.png"), True))


def test_shards__two_gloo_ranks_see_every_sample_once_per_epoch(shards24, tmp_path):
    """4 shards of 6, 2 ranks x 2 workers, batch 3: each worker reads its own shard."""
    out = tmp_path / "seen.json"
    script = Path(__file__).resolve().parent / "_shard_ranks.py"
    cmd = torchrun_command([str(script), str(shards24), str(out), "2", "3"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["batches"] for r in ranks] == [4, 4]
    seen = ranks[0]["labels"] + ranks[1]["labels"]
    assert sorted(seen) == list(range(24))


def test_shards__an_epoch_split_unevenly_still_gives_every_rank_its_batches(shards24):
    """30 samples per epoch from 24: every rank makes the same number of batches (DDP's
    lockstep), reading its shards again where they run out."""
    counts = []
    for rank in (0, 1):
        stream = ShardStream(str(shards24), build_pretrain_transform(16), samples_per_epoch=30)
        stream.configure(batch_size=2, num_replicas=2, rank=rank, seed=0, num_workers=2)
        batches = _epoch(stream, 2)
        counts.append(len(batches))
        assert all(b[0].shape == (2, 3, 16, 16) and b[0].dtype == torch.uint8 for b in batches)
    assert counts == [7, 7]


def test_shards__a_resumed_epoch_gives_the_same_batches(shards24):
    """Batch t of an epoch is the same whether the epoch starts at 0 or, resumed, at k (odd
    k with 2 workers: the worker that owns batch k must deliver first)."""

    def stream():
        s = ShardStream(str(shards24), build_pretrain_transform(16), samples_per_epoch=24, shuffle_buffer=5)
        s.configure(batch_size=2, num_replicas=1, rank=0, seed=1, num_workers=2)
        return s

    full = _epoch(stream(), 2, epoch=1)
    assert len(full) == 12
    for k in (3, 6):
        resumed = _epoch(stream(), 2, epoch=1, start=k)
        assert len(resumed) == 12 - k
        for (a, la, _), (b, lb, _) in zip(full[k:], resumed, strict=True):
            assert la == lb and torch.equal(a, b)
    assert sorted(v for _, labels, _ in full for v in labels) == list(range(24))
    other = _epoch(stream(), 2, epoch=2)
    assert [b[1] for b in other] != [b[1] for b in full]  # each epoch its own order


def test_shards__truncated_tar_is_skipped_with_a_warning_naming_it(shards24, tmp_path, caplog):
    import shutil

    copy = tmp_path / "sh"
    shutil.copytree(shards24, copy)
    bad = copy / "shard-000001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2 + 100])
    stream = ShardStream(str(copy), build_pretrain_transform(16), samples_per_epoch=24)
    stream.configure(batch_size=4, num_replicas=1, rank=0, seed=0, num_workers=0)
    with caplog.at_level(logging.WARNING):
        batches = _epoch(stream, 0)
    assert len(batches) == 6  # the epoch is whole: the other shards are read again
    assert any("shard-000001.tar" in r.getMessage() for r in caplog.records), caplog.text


def test_shards__an_undecodable_sample_is_replaced_and_counted(tmp_path):
    src = tmp_path / "flat"
    for i in range(6):
        write_image(src / f"{i}.png", seed=i)
    (src / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write_shards(str(src), str(tmp_path / "sh"), shard_size=6, shuffle=False)
    stream = ShardStream(str(tmp_path / "sh"), build_pretrain_transform(16), shuffle_buffer=0)
    stream.configure(batch_size=3, num_replicas=1, rank=0, seed=0, num_workers=0)
    batches = _epoch(stream, 0)
    assert [b[0].shape[0] for b in batches] == [3, 3] and sum(b[2] for b in batches) == 1


def test_shards__bad_specs_are_one_clear_line(tmp_path, shards24):
    with pytest.raises(ValueError, match="do not exist"):
        ShardStream(str(tmp_path / "x-{000..003}.tar"))
    single = shards24 / "shard-000000.tar"
    other = tmp_path / "copy.tar"
    other.write_bytes(single.read_bytes())
    with pytest.raises(ValueError, match="--samples-per-epoch"):
        ShardStream(str(other))  # no shards.json beside it
    stream = ShardStream(str(shards24))
    with pytest.raises(ValueError, match="cannot feed"):
        stream.configure(batch_size=2, num_replicas=2, rank=0, seed=0, num_workers=4)
    with pytest.raises(ValueError, match="samples-per-epoch is for tar shards"):
        build_pretrain_dataset(str(tmp_path), 16, samples_per_epoch=10)


_pretrain_cfg = functools.partial(
    tiny_pretrain_config, epochs=2, num_workers=2, img_size=64, vis_every=0, save_every_steps=2
)


def test_pretrain_from_shards__a_killed_run_resumes_to_the_same_weights(shards24, tmp_path, monkeypatch):
    """Killed in its second epoch (after the checkpoint of step 2 of that epoch), the run
    resumes from the shards to the weights of the uninterrupted run, bit for bit."""
    full = _pretrain_cfg(tmp_path / "full", shards24)
    train.pretrain(full)
    real, calls = train.pretrain_step, {"n": 0}

    def dies(model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 6 + 3:  # 6 steps an epoch: the 3rd step of epoch 1
            raise KeyboardInterrupt
        return real(model, batch, generator)

    monkeypatch.setattr(train, "pretrain_step", dies)
    with pytest.raises(KeyboardInterrupt):
        train.pretrain(_pretrain_cfg(tmp_path / "part", shards24))
    monkeypatch.setattr(train, "pretrain_step", real)
    train.pretrain(_pretrain_cfg(tmp_path / "part", shards24, resume="auto"))
    a = torch.load(tmp_path / "full" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint-last.pth", weights_only=True)
    assert_tensors_equal(a["model"], b["model"], "model")
    assert b["data_order"] == {"shards": 4, "processes": 1, "workers": 2, "batch_size": 4, "samples_per_epoch": 24}


def test_pretrain_from_shards__resuming_with_other_workers_is_warned(shards24, tmp_path, caplog):
    train.pretrain(_pretrain_cfg(tmp_path / "run", shards24, epochs=1))
    with caplog.at_level(logging.WARNING, logger="ummae"):
        train.pretrain(_pretrain_cfg(tmp_path / "run", shards24, epochs=2, num_workers=1, resume="auto"))
    assert any("workers 2 -> 1" in m and "order of the data differs" in m for m in caplog.messages), caplog.messages


# ---------------------------------------------------------------- the uint8 pipeline


def _coordinate_image(w: int = 240, h: int = 200) -> Image.Image:
    """R = x, G = y, B = 128: a crop's box and flip can be read off its corners."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def _box(out: torch.Tensor) -> tuple[float, float, bool]:
    """(area share, log aspect ratio, flipped) of the crop ``out`` [3, S, S] was made from."""
    r, g = out[0].double(), out[1].double()
    left, right = float(r[:, 0].mean()), float(r[:, -1].mean())
    flipped = left > right
    width = abs(right - left) * out.shape[-1] / (out.shape[-1] - 1)
    height = float(g[-1].mean() - g[0].mean()) * out.shape[-2] / (out.shape[-2] - 1)
    return float(width * height / (240 * 200)), float(np.log(width / height)), flipped


def test_pipeline__uint8_path_draws_the_crops_and_flips_of_the_pil_path():
    pil_t = build_pretrain_transform(48, pipeline="pil")
    tensor_t = build_pretrain_transform(48, pipeline="tensor")
    image = _coordinate_image()
    as_tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    from ummae.visualize import to_display

    old, new = [], []
    for seed in range(400):
        a = (to_display(augment_seeded(pil_t, image, seed)[None])[0] * 255).round()
        b = augment_seeded(tensor_t, as_tensor, seed)
        assert b.dtype == torch.uint8 and b.shape == (3, 48, 48)
        old.append(_box(a))
        new.append(_box(b))
    old_a, new_a = np.array([o[:2] for o in old]), np.array([n[:2] for n in new])
    # draw for draw: the same crop box (within interpolation at the edges) and the same flip
    assert [o[2] for o in old] == [n[2] for n in new]
    np.testing.assert_allclose(old_a, new_a, atol=0.02)
    # and so the law: scale in [0.2, 1], log-ratio in [log 3/4, log 4/3], half flipped
    assert new_a[:, 0].min() > 0.18 and new_a[:, 0].max() < 1.02
    assert abs(new_a[:, 1]).max() < np.log(4 / 3) + 0.03
    assert 0.4 < np.mean([n[2] for n in new]) < 0.6
    q = [0.1, 0.25, 0.5, 0.75, 0.9]  # the two samples' distributions, quantile by quantile
    np.testing.assert_allclose(np.quantile(old_a, q, axis=0), np.quantile(new_a, q, axis=0), atol=0.02)


def test_pipeline__same_pixels_as_pil_for_a_fixed_crop_on_real_jpegs():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    from torchvision.transforms.v2 import functional as F2

    files = sorted(JPEGS.glob("*.jpg"))[:12]
    assert len(files) == 12, f"{JPEGS} is missing: these tests need ../shared/data/jpeg_fullres"
    worst, mean = 0.0, []
    for f in files:
        pil = read_image(str(f))
        tensor = read_image(str(f), as_tensor=True)
        assert torch.equal(tensor, torch.from_numpy(np.array(pil)).permute(2, 0, 1))  # the same decoded pixels
        box = (17, 23, pil.height - 60, pil.width - 90)  # top, left, height, width
        a = torch.from_numpy(np.array(TF.resized_crop(pil, *box, [256, 256], InterpolationMode.BICUBIC))).permute(
            2, 0, 1
        )
        b = F2.resized_crop(tensor, *box, [256, 256], interpolation=InterpolationMode.BICUBIC, antialias=True)
        d = (a.int() - b.int()).abs()
        # Pillow rounds and clips to uint8 between its horizontal and vertical passes, so at
        # sharp edges (bicubic overshoot) a few pixels differ by several levels
        worst, mean = max(worst, float((d > 2).float().mean())), mean + [float(d.float().mean())]
        assert int(d.max()) <= 10
    assert worst < 1e-3 and np.mean(mean) < 0.05, (worst, np.mean(mean))


def test_pipeline__normalising_on_the_device_equals_totensor_and_normalize():
    from torchvision import transforms as T

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    want = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(T.ToTensor()(image))
    got = normalize_uint8(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert normalize_uint8(want) is want  # float input passes unchanged


def test_finetune_from_labelled_shards__classes_from_the_index_and_val_from_a_folder(colour_data, tmp_path, caplog):
    from ummae.config import FinetuneConfig
    from ummae.tasks.classify import finetune

    index = write_shards(str(colour_data / "train"), str(tmp_path / "sh"), shard_size=6)
    assert index["classes"] == ["blue", "green", "red"]
    cfg = dict(
        model="swin_test",
        data=str(tmp_path / "sh"),
        output=str(tmp_path / "ft"),
        epochs=1,
        warmup_epochs=0,
        batch_size=6,
        lr=1e-3,
        num_workers=0,
        device="cpu",
        log_every=1,
        keep_every=0,
        seed=0,
    )
    with pytest.raises(ValueError, match="--val-data"):
        finetune(FinetuneConfig(**cfg))
    summary = finetune(FinetuneConfig(**{**cfg, "val_data": str(colour_data / "val"), "overwrite": True}))
    assert "acc1" in summary and summary["train_loss"] > 0


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_device_pipeline__decoding_in_the_step_gives_the_tensor_pipeline_batch(tmp_path, source):
    """On the CPU the ``device`` pipeline (workers draw, the step decodes the batch) is the
    ``tensor`` pipeline bit for bit; the float resize used on CUDA is within rounding of it.
    A PNG (no JPEG to leave undecoded) is cropped in the worker as before."""
    import shutil

    from ummae.data.device_decode import EncodedBatch, collate_encoded

    files = sorted(JPEGS.glob("*.jpg"))[:7]
    assert len(files) == 7, f"{JPEGS} is missing: these tests need ../shared/data/jpeg_fullres"
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in files:
        shutil.copy(f, flat / f.name)
    write_image(flat / "zz.png", size=(120, 90), seed=1)
    data = str(flat)
    if source == "shards":
        write_shards(data, str(tmp_path / "sh"), shard_size=8, shuffle=False)
        data = str(tmp_path / "sh")
    batches = {}
    for pipeline in ("tensor", "device"):
        ds = build_pretrain_dataset(data, 64, pipeline=pipeline)
        extra = {"collate_fn": collate_encoded(64)} if pipeline == "device" else {}
        loader, sampler = build_train_loader(ds, 8, 0, seed=4, **extra)
        sampler.set_epoch(0)
        batches[pipeline] = next(iter(loader))[0]
    encoded = batches["device"]
    assert isinstance(encoded, EncodedBatch) and encoded.shape == (8, 3, 64, 64)
    assert sum(type(it).__name__ == "PlannedCrop" for it in encoded.items) == 7  # the PNG was cropped in the worker
    assert torch.equal(encoded.decode("cpu"), batches["tensor"])
    d = (encoded.decode("cpu", exact_cpu=False).int() - batches["tensor"].int()).abs()
    # the uint8 kernel rounds between its passes (as Pillow does), the float one does not
    assert d.max() <= 8 and (d > 1).float().mean() < 1e-3, (int(d.max()), float((d > 1).float().mean()))


def test_pretrain_with_the_device_pipeline_runs_and_counts_a_truncated_jpeg(tmp_path):
    import shutil

    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(JPEGS.glob("*.jpg"))[:8]:
        shutil.copy(f, flat / f.name)
    broken = flat / "broken.jpg"
    broken.write_bytes(sorted(JPEGS.glob("*.jpg"))[9].read_bytes()[:5000])  # no end marker: decoded in the worker
    summary = train.pretrain(
        _pretrain_cfg(
            tmp_path / "run", flat, input_pipeline="device", epochs=1, num_workers=0, batch_size=3, save_every_steps=0
        )
    )
    assert summary["skipped_images"] == 1 and math.isfinite(summary["train_loss"])


def test_shards__pipe_urls_are_read_through_webdataset(shards24):
    """``pipe:`` commands (e.g. ``pipe:aws s3 cp s3://b/shard-{0..9}.tar -``) are opened by
    webdataset; without a shards.json beside them the epoch is --samples-per-epoch."""
    spec = f"pipe:cat {shards24}/shard-{{000000..000003}}.tar"
    with pytest.raises(ValueError, match="--samples-per-epoch"):
        ShardStream(spec)
    stream = ShardStream(spec, None, samples_per_epoch=24, shuffle_buffer=0)
    assert len(stream.urls) == 4 and all(u.startswith("pipe:cat ") for u in stream.urls)
    stream.configure(batch_size=4, num_replicas=1, rank=0, seed=0, num_workers=0)
    assert sorted(label for _, label, _ in stream) == list(range(24))
