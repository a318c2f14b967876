"""``ummae predict``: a classifier's top-k classes per image, against a softmax of the model's
logits computed here on images transformed here (timm's evaluation transform written out)."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

from ummae.cli import main
from ummae.models.registry import create_model
from ummae.weights import io as ckpt

IMAGENETTE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette_mini"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as timm's transforms use


def _classifier(path: Path, record: bool = True, crop_pct: float = 0.9) -> tuple[Path, torch.nn.Module, list[str]]:
    """A 64 px swin_test classifier of imagenette_mini's 10 classes, its head drawn with std 1 so that
    its probabilities are far apart (a fresh head gives nearly equal ones); ``record``: with the
    class names and crop fine-tuning records."""
    names = sorted(p.name for p in (IMAGENETTE / "val").iterdir())
    torch.manual_seed(3)
    model = create_model("swin_test", num_classes=len(names), img_size=64).eval()
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0)
    args = dict(model.model_args)
    if record:
        args.update(class_names=names, crop_pct=crop_pct)
    ckpt.save_atomic({"model": model.state_dict(), "model_name": model.model_name, "model_args": args}, path)
    return path, model, names


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six imagenette_mini images of two classes, and a damaged one in the middle (sorted)."""
    folder = tmp_path_factory.mktemp("images")
    for cls in sorted((IMAGENETTE / "val").iterdir())[:2]:
        for f in sorted(cls.iterdir())[:3]:
            shutil.copy(f, folder / f"{cls.name}_{f.name}")
    (folder / "n01_damaged.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def _expected(model, paths: list[Path], names: list[str], crop_pct: float, k: int) -> list[dict]:
    """timm's evaluation transform (resize the short side to floor(S / crop_pct), bicubic;
    center crop S; normalise), the logits, their softmax sorted, the first k."""
    size = model.img_size
    tf = transforms.Compose(
        [
            transforms.Resize(math.floor(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    rows = []
    with torch.no_grad():
        for p in paths:
            probs = torch.softmax(model(tf(Image.open(p).convert("RGB"))[None]).double(), -1)[0]
            order = sorted(range(len(names)), key=lambda c: -probs[c].item())[:k]
            rows.append(
                {"image": str(p), "classes": [names[c] for c in order], "probs": [probs[c].item() for c in order]}
            )
    return rows


def _good(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if "damaged" not in p.name)


def test_predict__jsonl_is_the_softmax_top_k_and_a_damaged_image_is_skipped(tmp_path, images, capsys, caplog):
    path, model, names = _classifier(tmp_path / "clf.pth", crop_pct=0.9)
    out = tmp_path / "top3.jsonl"
    with caplog.at_level(logging.WARNING, logger="ummae"):
        rc = main(["predict", "--checkpoint", str(path), "--images", str(images), "--output", str(out), "--topk", "3",
                   "--batch-size", "4"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = _expected(model, _good(images), names, 0.9, 3)
    assert [r["image"] for r in rows] == [e["image"] for e in expected]
    for r, e in zip(rows, expected, strict=True):
        assert r["classes"] == e["classes"]
        assert r["probs"] == pytest.approx(e["probs"], abs=1e-5)
    assert max(r["probs"][0] for r in rows) > 0.5  # probabilities far apart: a wrong order would show
    damaged = str(images / "n01_damaged.jpg")
    assert any(damaged in m for m in caplog.messages)
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in printed and damaged in printed


def test_predict__csv_holds_the_same_rows(tmp_path, images):
    path, model, names = _classifier(tmp_path / "clf.pth", crop_pct=0.9)
    out = tmp_path / "top2.csv"
    assert (
        main(["predict", "--checkpoint", str(path), "--images", str(images), "--output", str(out), "--topk", "2"]) == 0
    )
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    expected = _expected(model, _good(images), names, 0.9, 2)
    assert list(table[0]) == ["image", "class_1", "prob_1", "class_2", "prob_2"]
    for row, e in zip(table, expected, strict=True):
        assert row["image"] == e["image"]
        assert [row["class_1"], row["class_2"]] == e["classes"]
        assert [float(row["prob_1"]), float(row["prob_2"])] == pytest.approx(e["probs"], abs=2e-6)


def test_predict__list_file_and_old_checkpoint_without_class_names(tmp_path, images, capsys, caplog):
    """A checkpoint written before classes were recorded names them by index, with MAE's crop
    for its size (224/256), and says so; a list file's paths are read relative to it."""
    path, model, names = _classifier(tmp_path / "old.pth", record=False)
    listed = _good(images)[:2]
    (images / "some.txt").write_text("".join(f"{p.name}\n" for p in listed))
    out = tmp_path / "old.jsonl"
    try:
        with caplog.at_level(logging.WARNING, logger="ummae"):
            rc = main(
                ["predict", "--checkpoint", str(path), "--images", str(images / "some.txt"), "--output", str(out)]
            )
    finally:
        (images / "some.txt").unlink()
    assert rc == 0
    assert any("records no class names" in m for m in caplog.messages)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = _expected(model, listed, [str(i) for i in range(len(names))], 224 / 256, 5)
    assert [Path(r["image"]).name for r in rows] == [p.name for p in listed]
    assert [r["classes"] for r in rows] == [e["classes"] for e in expected]


def test_predict__the_legacy_fine_tuning_checkpoint_names_classes_by_index(tmp_path, images, caplog):
    """The fine-tuning checkpoint main wrote before classes were recorded (tests/fixtures/legacy)."""
    legacy = Path(__file__).parent / "fixtures" / "legacy" / "finetune-swin_test.pth"
    out = tmp_path / "legacy.jsonl"
    with caplog.at_level(logging.WARNING, logger="ummae"):
        assert main(["predict", "--checkpoint", str(legacy), "--images", str(images), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    num_classes = ckpt.load(legacy)["model"]["head.weight"].shape[0]
    assert len(rows) == len(_good(images))
    indices = {str(i) for i in range(num_classes)}
    assert all(set(r["classes"]) <= indices and len(r["classes"]) == min(5, num_classes) for r in rows)
    assert any("records no class names" in m for m in caplog.messages)


def test_finetune__records_class_names_and_crop_and_the_export_predicts_the_same(finetuned, colour_data, tmp_path):
    state = ckpt.load(finetuned / "checkpoint-last.pth")
    assert state["model_args"]["class_names"] == ["blue", "green", "red"]  # colour_data's folders, sorted
    assert state["model_args"]["crop_pct"] == 224 / 256
    export = tmp_path / "clf.safetensors"
    assert main(["export", "--checkpoint", str(finetuned / "checkpoint-last.pth"), "--output", str(export)]) == 0
    outs = []
    for src in (finetuned / "checkpoint-last.pth", export):
        outs.append(tmp_path / f"{src.suffix[1:]}.jsonl")
        args = ["predict", "--checkpoint", str(src), "--images", str(colour_data / "val"), "--output", str(outs[-1])]
        assert main(args) == 0
    rows = [[json.loads(line) for line in o.read_text().splitlines()] for o in outs]
    assert rows[0] == rows[1]
    assert {c for r in rows[0] for c in r["classes"]} == {"blue", "green", "red"}


@pytest.mark.parametrize(
    "args, says",
    [
        (["--output", "top.txt"], "the suffix picks the format"),
        (["--topk", "0"], "--topk must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--crop-pct", "1.5"], "--crop-pct must be in (0, 1]"),
    ],
)
def test_predict__bad_flags_are_one_line(tmp_path, images, capsys, args, says):
    path, _, _ = _classifier(tmp_path / "clf.pth")
    rc = main(
        ["predict", "--checkpoint", str(path), "--images", str(images), "--output", str(tmp_path / "o.csv"), *args]
    )
    err = capsys.readouterr().err
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1


def test_predict__a_pretraining_checkpoint_is_refused(pretrain_ckpt, images, tmp_path, capsys):
    rc = main(["predict", "--checkpoint", str(pretrain_ckpt("mae_swin_test")), "--images", str(images),
               "--output", str(tmp_path / "o.csv")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "holds no classifier head" in err
