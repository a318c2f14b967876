"""Bad input through the command line: every case gets one line naming the problem on
stderr, a non-zero exit, and no traceback (issue: "one clear line for every mistake")."""

from __future__ import annotations

import argparse
import errno
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from _helpers import smooth_images, write_colour_dataset
from ummae.cli import main
from ummae.models.registry import create_model
from ummae.weights import io as ckpt


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    return smooth_images(tmp_path_factory.mktemp("imgs"), 8)


def _pre(imgs, out, *extra):
    return [
        "pretrain",
        "--model",
        "mae_swin_test",
        "--data",
        str(imgs),
        "--output",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--vis-every",
        "0",
        *extra,
    ]


def _yaml(tmp, text):
    path = tmp / "run.yaml"
    path.write_text(text)
    return ["--config", str(path)]


def _ckpt(tmp, name, obj):
    path = tmp / name
    torch.save(obj, path)
    return path


def _jpeg(tmp):
    path = tmp / "photo.jpg"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(path)
    return path


def _bad_meta_export(tmp):
    from safetensors.torch import save_file

    path = tmp / "enc.safetensors"
    save_file(
        {"encoder.patch_embed.proj.bias": torch.zeros(16)},
        str(path),
        metadata={"model_name": "swin_test", "model_args": "{not json"},
    )
    return path


def _huge_args(tmp):
    model = create_model("mae_swin_test")
    return _ckpt(
        tmp,
        "huge.pth",
        {
            "model": model.state_dict(),
            "model_name": "mae_swin_test",
            "model_args": {**model.model_args, "img_size": 4096},
        },
    )


def _wrong_shape_export(tmp):
    from safetensors.torch import save_file

    path = tmp / "wrong.safetensors"
    save_file(
        {"encoder.patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)},
        str(path),
        metadata={"model_name": "swin_test", "model_args": "{}"},
    )
    return path


# (id, argv builder (tmp, imgs) -> argv, text the one line must contain)
CASES = [
    ("yaml_epochs_null", lambda t, i: _pre(i, t / "o") + _yaml(t, "epochs: null\n"), "epochs=None"),
    (
        "yaml_output_list",
        lambda t, i: ["pretrain", "--data", str(i)] + _yaml(t, "output: [a, b]\n"),
        "expected one str",
    ),
    ("yaml_epochs_true", lambda t, i: _pre(i, t / "o")[:-6] + _yaml(t, "epochs: true\n"), "not true/false"),
    (
        "yaml_alias_bomb",
        lambda t, i: _pre(i, t / "o") + _yaml(t, "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"),
        "aliases",
    ),
    ("warmup_inf", lambda t, i: _pre(i, t / "o", "--warmup-epochs", "inf"), "finite"),
    ("drop_path_big", lambda t, i: _pre(i, t / "o", "--drop-path", "1.5"), "drop_path"),
    ("drop_path_negative", lambda t, i: _pre(i, t / "o", "--drop-path", "-1"), "drop_path"),
    ("min_lr_inf", lambda t, i: _pre(i, t / "o", "--min-lr", "inf"), "finite"),
    ("lr_huge", lambda t, i: _pre(i, t / "o", "--lr", "1e39"), "below 1e9"),
    ("lr_negative_exponent", lambda t, i: _pre(i, t / "o", "--lr", "-1e-3"), "lr=-0.001"),
    ("img_size_1", lambda t, i: _pre(i, t / "o", "--img-size", "1"), "img_size"),
    ("img_size_unfit", lambda t, i: _pre(i, t / "o", "--img-size", "100"), "sizes that fit this model: 64, 128"),
    (
        "finetune_img_size_unfit",
        lambda t, i: [
            "finetune",
            "--model",
            "swin_tiny_256",
            "--img-size",
            "200",
            "--data",
            str(write_colour_dataset(t / "c", 1, 1)),
            "--output",
            str(t / "o"),
        ],
        "sizes that fit this model: 32, 64, 128, 256",
    ),
    ("masks_img_size_huge", lambda t, i: ["masks", "--img-size", "100000", "--output", str(t / "m.png")], "4096"),
    (
        "auto_augment_garbage",
        lambda t, i: [
            "finetune",
            "--model",
            "swin_test",
            "--data",
            str(i),
            "--output",
            str(t / "o"),
            "--auto-augment",
            "garbage",
        ],
        "auto_augment",
    ),
    (
        "data_is_an_image",
        lambda t, i: ["pretrain", "--model", "mae_swin_test", "--data", str(_jpeg(t)), "--output", str(t / "o")],
        "is an image file",
    ),
    ("output_is_a_file", lambda t, i: (t / "f").write_text("x") and _pre(i, t / "f"), "is a file"),
    ("resume_jpeg", lambda t, i: _pre(i, t / "o", "--resume", str(_jpeg(t))), "is an image"),
    (
        "resume_reference_ckpt",
        lambda t, i: _pre(
            i,
            t / "o",
            "--resume",
            str(
                _ckpt(
                    t,
                    "ref.pth",
                    {"model": {"cls_token": torch.zeros(1, 1, 4)}, "epoch": 3, "args": argparse.Namespace(model="x")},
                )
            ),
        ),
        "not an ummae training checkpoint",
    ),
    (
        "resume_model_list",
        lambda t, i: _pre(i, t / "o", "--resume", str(_ckpt(t, "l.pth", {"model": [1, 2]}))),
        "not an ummae checkpoint",
    ),
    (
        "resume_epoch_text",
        lambda t, i: _pre(
            i, t / "o", "--resume", str(_ckpt(t, "e.pth", {"model": {}, "model_name": "mae_swin_test", "epoch": "abc"}))
        ),
        "epoch='abc'",
    ),
    (
        "resume_folder",
        lambda t, i: (t / "o" / "checkpoint-last.pth").mkdir(parents=True) or _pre(i, t / "o", "--resume", "auto"),
        "is a folder",
    ),
    (
        "eval_bad_metadata",
        lambda t, i: [
            "eval",
            "--model",
            "swin_test",
            "--checkpoint",
            str(_bad_meta_export(t)),
            "--data",
            str(write_colour_dataset(t / "c", 1, 1)),
        ],
        "not a JSON mapping",
    ),
    (
        "visualize_4096",
        lambda t, i: [
            "visualize",
            "--checkpoint",
            str(_huge_args(t)),
            "--images",
            str(i),
            "--output",
            str(t / "v.png"),
        ],
        "img_size=4096",
    ),
    (
        "export_wrong_shape",
        lambda t, i: ["export", "--checkpoint", str(_wrong_shape_export(t)), "--output", str(t / "x.safetensors")],
        "another shape",
    ),
    (
        "export_not_safetensors",
        lambda t, i: ["export", "--checkpoint", str(_wrong_shape_export(t)), "--output", str(t / "x.pth")],
        "must name a .safetensors file",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input__one_line_no_traceback(case, tmp_path, imgs, capsys):
    _, argv, text = case
    code = main(argv(tmp_path, imgs))
    err = capsys.readouterr().err.strip().splitlines()
    assert code not in (0, None), err
    assert "Traceback" not in "\n".join(err)
    lines = [line for line in err if " INFO " not in line and " WARNING " not in line]  # log lines aside
    assert len(lines) == 1, err
    assert lines[0].startswith("ummae ") and "error:" in lines[0], lines[0]
    assert text in lines[0], lines[0]


def test_cli__full_disk_one_line(tmp_path, imgs, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "checkpoint-last.pth"))

    monkeypatch.setattr(ckpt.torch, "save", full)
    assert main(_pre(imgs, tmp_path / "o")) == 2
    err = [
        line
        for line in capsys.readouterr().err.strip().splitlines()
        if " INFO " not in line and " WARNING " not in line
    ]
    assert err == [f"ummae pretrain: error: No space left on device: {tmp_path / 'o' / 'checkpoint-last.pth'}"]


def test_cli__ctrl_c_stops_cleanly(tmp_path, imgs, capsys, monkeypatch):
    """Ctrl-C mid-run: exit 130, one line that names the last checkpoint, which is whole and
    resumes."""
    import ummae.tasks.pretrain as train

    real = train.pretrain_step
    calls = {"n": 0}

    def step(model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(model, batch, generator)

    monkeypatch.setattr(train, "pretrain_step", step)
    out = tmp_path / "o"
    code = main(_pre(imgs, out, "--save-every-steps", "1", "--batch-size", "2"))
    err = [
        line
        for line in capsys.readouterr().err.strip().splitlines()
        if " INFO " not in line and " WARNING " not in line
    ]
    assert code == 130 and len(err) == 1, err
    assert "interrupted at epoch 0, step 1" in err[0] and str(out / "checkpoint-last.pth") in err[0]
    monkeypatch.setattr(train, "pretrain_step", real)
    assert main(_pre(imgs, out, "--save-every-steps", "1", "--batch-size", "2", "--resume", "auto")) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 0


def test_export__usual_file_mode_and_a_reexported_encoder_stays_an_encoder(tmp_path, capsys):
    import os

    model = create_model("mae_swin_test")
    src = tmp_path / "pt.pth"
    ckpt.save_atomic({"model": model.state_dict(), "model_name": "mae_swin_test", "model_args": model.model_args}, src)
    first, again = tmp_path / "enc.safetensors", tmp_path / "again.safetensors"
    assert main(["export", "--checkpoint", str(src), "--output", str(first)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o666 & ~umask
    assert main(["export", "--checkpoint", str(first), "--output", str(again)]) == 0
    from safetensors import safe_open

    with safe_open(str(again), framework="pt") as f:
        assert f.metadata()["contents"] == "encoder"


# Every command reads what its weights file holds (cheaply: no tensors) before it scans any data
# or builds a model: a wrong file is refused at once, not minutes into an ImageNet scan.
SCANNERS = [
    ("ummae.tasks.classify", "build_classify_dataset"),
    ("ummae.tasks.knn", "build_classify_dataset"),
    ("ummae.tasks.pretrain", "build_pretrain_dataset"),
    ("ummae.tasks.detect", "CocoDetection"),
    ("ummae.tasks.segment", "SegmentationFolder"),
]
WEIGHTS_FIRST = [
    ("knn", lambda t, i, w: ["knn", "--pretrained", w, "--data", i]),
    ("knn_model_given", lambda t, i, w: ["knn", "--model", "swin_test", "--pretrained", w, "--data", i]),
    (
        "finetune",
        lambda t, i, w: ["finetune", "--model", "swin_test", "--pretrained", w, "--data", i, "--output", str(t / "o")],
    ),
    (
        "linprobe",
        lambda t, i, w: ["linprobe", "--model", "swin_test", "--pretrained", w, "--data", i, "--output", str(t / "o")],
    ),
    ("eval", lambda t, i, w: ["eval", "--model", "swin_test", "--checkpoint", w, "--data", i]),
    ("pretrain_init", lambda t, i, w: _pre(i, t / "o", "--init", w)),
    (
        "detect_train",
        lambda t, i, w: [
            "detect",
            "train",
            "--backbone",
            "swin_test",
            "--pretrained",
            w,
            "--data",
            i,
            "--output",
            str(t / "o"),
        ],
    ),
    ("detect_eval", lambda t, i, w: ["detect", "eval", "--checkpoint", w, "--data", i, "--output", str(t / "o")]),
    (
        "segment_train",
        lambda t, i, w: [
            "segment",
            "train",
            "--backbone",
            "swin_test",
            "--pretrained",
            w,
            "--data",
            i,
            "--output",
            str(t / "o"),
        ],
    ),
    ("segment_eval", lambda t, i, w: ["segment", "eval", "--checkpoint", w, "--data", i, "--output", str(t / "o")]),
]


LEGACY = Path(__file__).parent / "fixtures" / "legacy"
# (id, argv builder (tmp, data, weights) -> argv, weights file (tmp) -> path, text the one line must contain)
WRONG_WEIGHTS = [(name, argv, lambda t: str(_jpeg(t)), "is an image") for name, argv in WEIGHTS_FIRST] + [
    (
        "knn_detect_checkpoint",
        WEIGHTS_FIRST[0][1],
        lambda t: str(LEGACY / "detect-gfl-pvt_test.pth"),
        "is a checkpoint of `ummae detect train`",
    ),
    (
        "finetune_segment_checkpoint",
        WEIGHTS_FIRST[2][1],
        lambda t: str(LEGACY / "segment-upernet-pvt_test.pth"),
        "is a checkpoint of `ummae segment train`",
    ),
    (
        "segment_train_detect_checkpoint",
        WEIGHTS_FIRST[8][1],
        lambda t: str(LEGACY / "detect-gfl-pvt_test.pth"),
        "is a checkpoint of `ummae detect train`",
    ),
]


@pytest.mark.parametrize("case", WRONG_WEIGHTS, ids=[c[0] for c in WRONG_WEIGHTS])
def test_cli__weights_file_refused_before_the_data_is_scanned(case, tmp_path, imgs, capsys, monkeypatch):
    import importlib

    def scanned(*a, **k):
        raise AssertionError("the data was scanned before the weights file was checked")

    for module, name in SCANNERS:
        monkeypatch.setattr(importlib.import_module(module), name, scanned)
    _, argv, weights, text = case
    path = weights(tmp_path)
    code = main(argv(tmp_path, str(imgs), path))
    err = [
        line
        for line in capsys.readouterr().err.strip().splitlines()
        if " INFO " not in line and " WARNING " not in line
    ]
    assert code == 2 and len(err) == 1, err
    assert path in err[0] and text in err[0], err[0]
