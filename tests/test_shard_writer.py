"""``ummae shards`` / :func:`ummae.data.shard_writer.write_shards`: WebDataset tar shards of an
ImageFolder, a flat folder or a list file, with the original bytes, the labels, a seeded
order, shards.json, and one-line errors."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from _helpers import COCO_MINI, write_colour_images, write_image
from ummae.cli import main
from ummae.data.shard_writer import shard_pattern, write_shards
from ummae.data.sources import folder_samples

JPEG_FULLRES = COCO_MINI.parent / "jpeg_fullres" / "images"


def read_shards(out: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of ``out``'s shards, in shard then member order: ``(key, {ext: bytes})``."""
    info = json.loads((out / "shards.json").read_text())
    samples: list[tuple[str, dict]] = []
    for shard in info["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            keys: list[str] = []
            members: dict[str, dict] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if key not in members:
                    keys.append(key)
                    members[key] = {}
                members[key][ext] = tar.extractfile(m).read()
            assert len(keys) == shard["num_samples"], shard
            samples.extend((k, members[k]) for k in keys)
    return samples


def image_member(members: dict[str, bytes]) -> tuple[str, bytes]:
    (ext,) = [e for e in members if e != "cls"]
    return ext, members[ext]


@pytest.fixture
def folder(tmp_path) -> Path:
    """An ImageFolder of 13 images: 4 PNGs per colour class, plus one ``.JPEG`` in ``red``."""
    src = write_colour_images(tmp_path / "src", per_class=4, size=16)
    write_image(src / "red" / "extra.JPEG", size=(20, 12), seed=5)
    return src


def test_imagefolder_round_trip(tmp_path, folder):
    out = tmp_path / "shards"
    info = write_shards(str(folder), str(out), 5)
    samples, _, classes = folder_samples(str(folder))
    assert len(samples) == 13
    assert info == json.loads((out / "shards.json").read_text())
    assert info == {
        "format": "ummae-shards-1",
        "num_samples": 13,
        "shards": [
            {"name": "shard-000000.tar", "num_samples": 5},
            {"name": "shard-000001.tar", "num_samples": 5},
            {"name": "shard-000002.tar", "num_samples": 3},
        ],
        "classes": ["blue", "green", "red"],
        "source": str(folder),
        "shuffled": True,
        "seed": 0,
    }
    assert sorted(p.name for p in out.iterdir()) == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
        "shards.json",
    ]  # no temp files left
    written = read_shards(out)
    assert [k for k, _ in written] == [f"{i:09d}" for i in range(13)]  # unique, in written order
    by_bytes = {Path(p).read_bytes(): (p, label) for p, label in samples}
    assert len(by_bytes) == 13
    seen = set()
    for _, members in written:
        assert set(members) in ({"png", "cls"}, {"jpg", "cls"})
        ext, data = image_member(members)
        path, label = by_bytes[data]  # the original bytes
        assert ext == ("jpg" if path.endswith(".JPEG") else "png")
        assert members["cls"] == str(label).encode()
        seen.add(path)
    assert len(seen) == 13  # every image exactly once


def test_webdataset_reads_the_shards(tmp_path, folder):
    import webdataset as wds

    out = tmp_path / "shards"
    info = write_shards(str(folder), str(out), 4)
    ds = wds.WebDataset(shard_pattern(str(out), len(info["shards"])), shardshuffle=False)
    got = list(ds)
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(13)]
    assert all(int(s["cls"]) in (0, 1, 2) for s in got)


def test_real_jpegs_flat_folder(tmp_path):
    if not JPEG_FULLRES.is_dir():
        pytest.fail(f"the real JPEG test data is missing: expected {JPEG_FULLRES} (../shared/data/jpeg_fullres)")
    files = sorted(JPEG_FULLRES.glob("*.jpg"))[:12]
    assert len(files) == 12, f"{JPEG_FULLRES} holds fewer than 12 .jpg files"
    src = tmp_path / "flat"
    src.mkdir()
    for f in files:
        shutil.copyfile(f, src / f.name)
    out = tmp_path / "shards"
    info = write_shards(str(src), str(out), 5)
    assert info["classes"] is None and [s["num_samples"] for s in info["shards"]] == [5, 5, 2]
    written = read_shards(out)
    assert all(set(m) == {"jpg"} for _, m in written)  # no cls: unlabelled
    assert sorted(m["jpg"] for _, m in written) == sorted(f.read_bytes() for f in files)


def test_list_file_labels_kept_and_data_root(tmp_path):
    root = tmp_path / "root"
    paths = [write_image(root / "a" / f"img{i}.png", seed=i) for i in range(4)]
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text("# path label\n" + "".join(f"{p.relative_to(root)} {7 - i}\n" for i, p in enumerate(paths)))
    out = tmp_path / "shards"
    info = write_shards(str(listing), str(out), 3, data_root=str(root), shuffle=False)
    assert info["classes"] is None and info["shuffled"] is False
    written = read_shards(out)
    assert [(m["png"], m["cls"]) for _, m in written] == [
        (p.read_bytes(), str(7 - i).encode()) for i, p in enumerate(paths)
    ]


def _order(out: Path) -> list[bytes]:
    return [image_member(m)[1] for _, m in read_shards(out)]


def test_order_seeded_reproducible_and_no_shuffle_keeps_source_order(tmp_path, folder):
    source = [Path(p).read_bytes() for p, _ in folder_samples(str(folder))[0]]
    orders = {}
    for name, kwargs in {"s0": {"seed": 0}, "s0b": {"seed": 0}, "s1": {"seed": 1}, "plain": {"shuffle": False}}.items():
        write_shards(str(folder), str(tmp_path / name), 4, **kwargs)
        orders[name] = _order(tmp_path / name)
    assert orders["plain"] == source
    assert sorted(orders["s0"]) == sorted(source) and orders["s0"] != source  # a permutation
    assert orders["s0"] == orders["s0b"]  # reproducible
    assert orders["s1"] != orders["s0"]  # depends on the seed
    assert (tmp_path / "s0" / "shard-000000.tar").read_bytes() == (tmp_path / "s0b" / "shard-000000.tar").read_bytes()


def test_existing_shards_refused_and_overwrite_replaces_them(tmp_path, folder):
    out = tmp_path / "shards"
    write_shards(str(folder), str(out), 2)  # 7 shards
    with pytest.raises(ValueError, match="already holds 7 shard file.*--overwrite"):
        write_shards(str(folder), str(out), 5)
    (out / ".shard-000003.tar.tmp").write_bytes(b"torn")  # left by a killed run
    (out / "notes.txt").write_text("kept")
    info = write_shards(str(folder), str(out), 100, overwrite=True)
    assert [s["name"] for s in info["shards"]] == ["shard-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shard-000000.tar", "shards.json"]
    (out / "shard-000000.tar").unlink()  # a lone shards.json is refused too
    with pytest.raises(ValueError, match="a shards.json"):
        write_shards(str(folder), str(out), 5)


def test_bad_inputs_are_one_line_errors(tmp_path, folder):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="shard-size"):
        write_shards(str(folder), out, 0)
    with pytest.raises(ValueError, match="not found"):
        write_shards(str(tmp_path / "nope"), out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        write_shards(str(tmp_path / "empty"), out)
    listing = tmp_path / "list.txt"
    listing.write_text("src/red/red_0.png 1\nnotes.txt 2\n")
    with pytest.raises(ValueError, match="notes.txt is not an image"):
        write_shards(str(listing), out)


def test_unreadable_file_is_named_and_leaves_no_shards(tmp_path):
    root = tmp_path / "root"
    for i in range(5):
        write_image(root / f"{i}.png", seed=i)
    listing = root / "train.txt"
    listing.write_text("".join(f"{i}.png\n" for i in range(5)) + "gone.png\n")
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match=r"cannot read .*gone\.png") as err:
        write_shards(str(listing), str(out), 2, shuffle=False)  # shards 0 and 1 complete first
    assert "\n" not in str(err.value)
    assert list(out.iterdir()) == []  # no torn shard, no stale temp, no half set


def test_corrupt_image_is_copied_as_is(tmp_path):
    src = tmp_path / "flat"
    write_image(src / "good.png")
    (src / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "shards"
    write_shards(str(src), str(out), 10, shuffle=False)
    assert [sorted(m.items()) for _, m in read_shards(out)] == [
        [("jpg", b"\xff\xd8 not really a jpeg")],
        [("png", (src / "good.png").read_bytes())],
    ]


def test_shard_pattern():
    assert shard_pattern("d", 1) == "d/shard-000000.tar"
    assert shard_pattern("d", 12) == "d/shard-{000000..000011}.tar"


def test_cli_writes_shards_and_prints_the_pattern(tmp_path, folder, capsys):
    from braceexpand import braceexpand

    out = tmp_path / "shards"
    assert main(["shards", str(folder), "--output", str(out), "--shard-size", "5"]) == 0
    line = capsys.readouterr().out.strip()
    pattern = f"{out}/shard-{{000000..000002}}.tar"
    assert line == f'wrote 13 samples in 3 shards to {out}; train with --data "{pattern}"'
    assert sorted(braceexpand(pattern)) == sorted(str(p) for p in out.glob("shard-*.tar"))
    assert len(list(braceexpand(pattern))) == 3

    assert main(["shards", str(folder), "--output", str(tmp_path / "one"), "--no-shuffle", "--seed", "3"]) == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(f'in 1 shard to {tmp_path / "one"}; train with --data "{tmp_path / "one" / "shard-000000.tar"}"')
    )
    assert json.loads((tmp_path / "one" / "shards.json").read_text())["shuffled"] is False


@pytest.mark.parametrize(
    "extra, says", [(["--shard-size", "0"], "--shard-size must be an integer >= 1"), ([], "already holds")]
)
def test_cli_errors_are_one_line_exit_2(tmp_path, folder, capsys, extra, says):
    out = tmp_path / "shards"
    if not extra:
        assert main(["shards", str(folder), "--output", str(out)]) == 0
        capsys.readouterr()
    assert main(["shards", str(folder), "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ummae shards: error: ") and says in err[0], err
