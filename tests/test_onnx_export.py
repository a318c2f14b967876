"""``ummae export --format onnx``: for each exported kind (classifier, UperNet segmenter, each
detector whose spec names an ONNX form), onnxruntime's outputs on real images equal what the
PyTorch model computes on the same input, within the stated tolerance; ``--validate``; the
refusals."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.models.detection.image_list import ImageList
from torchvision.transforms.functional import pil_to_tensor

from _helpers import COCO_MINI, SEMSEG_MINI, TINY_DETECTOR
from ummae.cli import main
from ummae.detector_specs import SPECS
from ummae.models.registry import create_model, list_models
from ummae.tasks.onnx_export import (
    DEFAULT_OPSET,
    TOLERANCE,
    load_exportable,
    markdown_table,
    validate_onnx,
    validation_images,
)
from ummae.weights import io as ckpt

IMAGENETTE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette_mini"
EXPORTABLE = [name for name, spec in SPECS.items() if spec.onnx]
NOT_EXPORTABLE = [name for name, spec in SPECS.items() if not spec.onnx]
TINY_SEGMENTER = dict(crop_size=64, neck_channels=32, head_channels=16, aux_channels=8)


def _save(model, path: Path, **recorded) -> Path:
    args = {**model.model_args, **recorded}
    ckpt.save_atomic({"model": model.state_dict(), "model_name": model.model_name, "model_args": args}, path)
    return path


def _images(folder: Path, n: int) -> list[Path]:
    return sorted(p for p in folder.rglob("*.jpg"))[:n]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _assert_close(theirs, ours: torch.Tensor) -> None:
    """The stated tolerance: max |onnxruntime - PyTorch| <= TOLERANCE * max(1, max |PyTorch|)."""
    ours = ours.detach().double().numpy()
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= TOLERANCE * max(1.0, np.abs(ours).max())


def _export(checkpoint: Path, out: Path, *extra: str) -> None:
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(out), *extra]) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [DEFAULT_OPSET]


@pytest.mark.parametrize("name", list_models("*_test", kind="classify"))
def test_onnx__classifier_logits_equal_pytorch_on_imagenette_with_any_batch(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, img_size=64).eval()
    path = _save(model, tmp_path / "clf.pth", class_names=[str(i) for i in range(10)], crop_pct=0.875)
    _export(path, tmp_path / "clf.onnx")
    tf = transforms.Compose(
        [
            transforms.Resize(math.floor(64 / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(64),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in _images(IMAGENETTE / "val", 3)])  # batch 3, traced at 1
    (logits,) = _session(tmp_path / "clf.onnx").run(None, {"images": x.numpy()})
    with torch.no_grad():
        _assert_close(logits, model(x))


def test_onnx__segmenter_logits_equal_pytorch_on_coco_semseg(tmp_path, caplog):
    """The pyramid pooling of scales 3 and 6 on a 2 x 2 map (what ONNX's pooling cannot do) is
    in the graph; the test mode the checkpoint records (slide) is said to be left out."""
    torch.manual_seed(0)
    model = create_model("upernet_swin_test", num_classes=5, **TINY_SEGMENTER).eval()
    path = _save(model, tmp_path / "seg.pth", test_mode="slide", test_stride=32, scale=[64, 64])
    with caplog.at_level(logging.WARNING, logger="ummae"):
        _export(path, tmp_path / "seg.onnx")
    assert [m for m in caplog.messages if "sliding-window inference (crop 64, stride 32)" in m]
    images = [pil_to_tensor(Image.open(p).convert("RGB")) for p in _images(SEMSEG_MINI / "images" / "validation", 2)]
    x = torch.stack([torch.nn.functional.interpolate(im[None].float(), (64, 64), mode="bilinear")[0] for im in images])
    (logits,) = _session(tmp_path / "seg.onnx").run(None, {"images": x.numpy()})
    with torch.no_grad():
        _assert_close(logits, model(x))


@pytest.mark.parametrize("detector", EXPORTABLE)
def test_onnx__detector_outputs_equal_pytorch_on_coco(detector, tmp_path):
    torch.manual_seed(0)
    model = create_model(
        f"{detector}_swin_test", num_classes=4, **TINY_DETECTOR, class_names=["a", "b", "c"], cat_ids=[1, 2, 3]
    ).eval()
    path = _save(model, tmp_path / "det.pth")
    _export(path, tmp_path / "det.onnx")
    session = _session(tmp_path / "det.onnx")
    images = [pil_to_tensor(Image.open(p).convert("RGB")).float() / 255 for p in _images(COCO_MINI / "val2017", 2)]
    with torch.no_grad():
        if SPECS[detector].onnx == "raw":  # the canvas of the model's own transform, both images at once
            canvas = model.transform(images)[0].tensors
            theirs = session.run(None, {"canvas": canvas.numpy()})
            head = model.head(list(model.backbone(canvas).values()))
            _assert_close(theirs[0], head["cls_logits"])
            _assert_close(theirs[1], head["bbox_regression"])
            feats = list(model.backbone(canvas).values())
            anchors = model.anchor_generator(ImageList(canvas, [tuple(canvas.shape[-2:])] * 2), feats)[0]
            _assert_close(theirs[2], anchors)
        else:  # torchvision's export: one image of its own size per run
            for image in images:
                det = model([image])[0]
                theirs = session.run(None, {"image": image.numpy()})
                keys = ["boxes", "labels", "scores"] + (["masks"] if SPECS[detector].masks else [])
                assert len(det["boxes"]) > 0
                for got, key in zip(theirs, keys, strict=True):
                    _assert_close(got, det[key])


def test_onnx__validate_prints_the_max_difference_and_fails_beyond_the_tolerance(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("swin_test", num_classes=10, img_size=64).eval()
    path = _save(model, tmp_path / "clf.pth")
    images = [str(p) for p in _images(IMAGENETTE / "val", 2)]
    _export(path, tmp_path / "clf.onnx", "--validate", "--images", *images)
    printed = capsys.readouterr().out
    diff, allowed = (float(v) for v in printed.split("max |onnxruntime - PyTorch| ")[1].split(" <= "))
    assert 0 <= diff <= allowed == TOLERANCE
    # the graph of these weights against a model whose weights moved by 1e-2: refused
    clf, form = load_exportable(str(path), None, False)
    with torch.no_grad():
        clf.model.head.bias.add_(1e-2)
    with pytest.raises(Exception, match="beyond the tolerance"):
        validate_onnx(clf, form, str(tmp_path / "clf.onnx"), validation_images(images, None))


@pytest.mark.parametrize(
    "args, says",
    [
        (["--format", "onnx", "--output", "m.safetensors"], "--output must name a .onnx file with --format onnx"),
        (["--output", "m.onnx"], "--output must name a .safetensors file"),
        (["--output", "m.safetensors", "--validate"], "--validate applies to --format onnx"),
        (["--output", "m.safetensors", "--opset", "18"], "--opset applies to --format onnx"),
        (
            ["--format", "onnx", "--output", "m.onnx", "--encoder-only"],
            "--encoder-only applies to --format safetensors",
        ),
        (["--format", "onnx", "--output", "m.onnx", "--opset", "11"], "opset 17 or later"),
        (["--format", "onnx", "--output", "m.onnx", "--images", "x.jpg"], "give --validate too"),
    ],
)
def test_export__refused_combinations_are_one_line(tmp_path, capsys, args, says):
    torch.manual_seed(0)
    path = _save(create_model("swin_test", num_classes=3, img_size=64), tmp_path / "clf.pth")
    args = [a if not a.startswith("m.") else str(tmp_path / a) for a in args]
    rc = main(["export", "--checkpoint", str(path), *args])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("detector", NOT_EXPORTABLE)
def test_export__a_detector_without_an_onnx_form_is_refused(detector, tmp_path, capsys):
    model = create_model(f"{detector}_swin_test", num_classes=4, **TINY_DETECTOR, class_names=["a", "b", "c"])
    path = _save(model, tmp_path / "det.pth")
    rc = main(["export", "--checkpoint", str(path), "--format", "onnx", "--output", str(tmp_path / "d.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and f"a {detector} detector cannot be exported to ONNX" in err
    assert not (tmp_path / "d.onnx").exists()


def test_export__detector_img_size_and_pretraining_checkpoints_are_refused(tmp_path, pretrain_ckpt, capsys):
    det = create_model(f"{EXPORTABLE[0]}_swin_test", num_classes=4, **TINY_DETECTOR, class_names=["a", "b", "c"])
    cases = [
        (_save(det, tmp_path / "det.pth"), ["--img-size", "256"], "a detector's canvas is fixed"),
        (pretrain_ckpt("mae_swin_test"), [], "is a pre-training checkpoint"),
    ]
    for path, extra, says in cases:
        rc = main(
            ["export", "--checkpoint", str(path), "--format", "onnx", "--output", str(tmp_path / "x.onnx"), *extra]
        )
        assert rc == 2 and says in capsys.readouterr().err


def test_export__without_the_onnx_packages_names_the_extra(tmp_path, capsys, monkeypatch):
    path = _save(create_model("swin_test", num_classes=3, img_size=64), tmp_path / "clf.pth")
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` meets when it is not installed
    rc = main(["export", "--checkpoint", str(path), "--format", "onnx", "--output", str(tmp_path / "x.onnx")])
    assert rc == 2 and 'pip install "ummae[onnx]"' in capsys.readouterr().err


def test_onnx__the_docs_table_has_a_row_per_kind_and_detector():
    table = markdown_table()
    for name, spec in SPECS.items():
        row = next(line for line in table.splitlines() if f"`{name}` detector" in line)
        assert ("not exportable" in row) == (not spec.onnx)
    assert "| classifier |" in table and "| UperNet segmenter |" in table
