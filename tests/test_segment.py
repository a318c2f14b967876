"""Semantic segmentation (`ummae segment`): UperNet on the stage maps, sliding-window and
whole-image inference, the mIoU metrics, the iteration-based poly schedule, training with
falling loss and exact resume, distributed evaluation and the commands.

Tiny configurations: test backbones, 64 px crops, 32-channel neck, 16-channel head, a handful
of ``../shared/data/coco_semseg_mini`` images (these tests must run in CI: they fail without it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _helpers import metrics_records, run_torchrun, semseg_subset, stable, step_records
from ummae.cli import main
from ummae.config import SegmentConfig
from ummae.engine.schedule import warmup_poly
from ummae.evaluation.segmentation import confusion_matrix, segmentation_metrics
from ummae.models.upernet import keep_ratio_size
from ummae.tasks import segment
from ummae.tasks.segment import build_segmenter, train

TINY = dict(crop_size=64, neck_channels=32, head_channels=16, aux_channels=8)
K = 81  # coco_semseg_mini: background + 80 things, after reduce-zero-label


@pytest.fixture(scope="module")
def semseg(tmp_path_factory):
    return semseg_subset(tmp_path_factory.mktemp("semseg"), n_train=6, n_val=3)


def _model(backbone="swin_test", num_classes=5, **kw):
    args = {**TINY, **kw}
    model, _ = build_segmenter(
        backbone, num_classes, drop_path=0.0, scale=[128, 64], test_mode="slide", test_stride=43, **args
    )
    return model.eval()


def _cfg(out: Path, data: Path, **kw) -> SegmentConfig:
    base = dict(
        output=str(out),
        data=str(data),
        backbone="swin_test",
        num_classes=K,
        iters=7,
        eval_every_iters=2,
        batch_size=2,
        num_workers=0,
        warmup_steps=2,
        log_every=1,
        blr=1.6e-2,
        drop_path=0.0,
        scale=(128, 64),
        test_stride=43,
        **TINY,
    )
    base.update(kw)
    return SegmentConfig(**base)


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("backbone", ["swin_test", "pvt_test"])
def test_segmenter__quarter_resolution_logits_and_every_parameter_learns(backbone):
    model = _model(backbone).train()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[0, :16] = 255
    losses = model(images, labels)
    assert set(losses) == {"loss", "loss_decode", "loss_aux"}
    assert torch.allclose(losses["loss"], losses["loss_decode"] + losses["loss_aux"])
    losses["loss"].backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.eval()
    assert model(images).shape == (2, 5, 16, 16)


def test_segmenter__loss_is_the_mean_over_all_pixels_with_ignored_ones_zero():
    """MMSegmentation 0.x's cross-entropy (the reference's): ignored pixels add 0 and count."""
    model = _model(aux_weight=0.0)
    logits = torch.randn(1, 5, 8, 8)
    labels = torch.randint(0, 5, (1, 8, 8))
    labels[0, :4] = 255
    per_pixel = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    assert torch.allclose(model._ce(logits, labels), per_pixel.sum() / 64)


def test_segmenter__layer_ids_for_layer_decay_put_the_heads_on_top():
    model = _model()
    n = model.num_layers
    assert model.layer_id("backbone.encoder.patch_embed.proj.weight") == 0
    assert 1 <= model.layer_id("backbone.encoder.stages.0.0.attn.qkv.weight") <= n
    assert model.layer_id("decode_head.classifier.weight") == n + 1
    assert model.layer_id("backbone.proj.0.1.weight") == n + 1


# ---------------------------------------------------------------- inference


def test_keep_ratio_size__keeps_the_aspect_and_fits_both_sides():
    assert keep_ratio_size(512, 683, (2048, 512)) == (512, 683)
    assert keep_ratio_size(300, 2000, (2048, 512)) == (307, 2048)
    assert keep_ratio_size(180, 256, (128, 64)) == (64, 91)


@pytest.mark.parametrize("backbone", ["swin_test", "pvt_test"])
def test_slide__equals_whole_image_inference_where_one_window_covers_the_image(backbone):
    model = _model(backbone)
    for h, w in [(64, 64), (50, 64), (64, 40)]:
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
        slide = model.predict_probs(image, "slide", 64, 43, (h, w) if h >= w else (w, h))
        whole = model.predict_probs(image, "whole", 64, 43, (h, w) if h >= w else (w, h))
        assert slide.shape == (5, h, w)
        assert torch.allclose(slide, whole, atol=1e-6), (h, w)


def test_slide__windows_that_tile_the_image_are_each_the_model_on_that_window():
    model = _model()
    x = model.normalize(torch.randint(0, 256, (1, 3, 64, 128), dtype=torch.uint8))
    out = model.slide_logits(x, 64, 64)
    for x1 in (0, 64):
        alone = torch.nn.functional.interpolate(model.logits(x[..., x1 : x1 + 64]), size=(64, 64), mode="bilinear")
        assert torch.allclose(out[..., x1 : x1 + 64], alone, atol=1e-5)
    # overlapping windows (stride 43 < 64): every pixel covered, the overlap averaged
    over = model.slide_logits(x, 64, 43)
    assert torch.allclose(over[..., :21], out[..., :21], atol=1e-5)  # only the first window covers these


def test_predict_probs__multi_scale_and_flip_average_probabilities():
    model = _model()
    image = torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8)
    probs = model.predict_probs(image, "slide", 64, 43, (128, 64), ratios=(0.5, 1.0), flip=True)
    assert probs.shape == (5, 48, 80)
    assert torch.allclose(probs.sum(0), torch.ones(48, 80), atol=1e-5)
    single = model.predict_probs(image, "slide", 64, 43, (128, 64))
    assert not torch.allclose(single, probs)
    x = model.normalize(torch.nn.functional.interpolate(image[None].float(), size=(38, 64), mode="bilinear"))
    assert model.whole_logits(x).shape == (1, 5, 38, 64)


# ---------------------------------------------------------------- metrics


def _metrics(pred: torch.Tensor, label: torch.Tensor, k: int) -> dict:
    cm = confusion_matrix(k, 255)
    cm.update(pred.flatten(), label.flatten())
    return segmentation_metrics(cm.compute())


def test_metrics__predictions_equal_to_labels_give_miou_one():
    label = torch.randint(0, 6, (3, 20, 30))
    label[:, :5] = 255
    pred = label.clone()
    pred[label == 255] = 2  # whatever is predicted where the label is ignored does not count
    m = _metrics(pred, label, 6)
    assert m["mIoU"] == 1.0 and m["mAcc"] == 1.0 and m["aAcc"] == 1.0


def test_metrics__a_hand_built_case_with_an_ignored_region():
    label = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 4], [2, 0, 1, 2]])
    m = _metrics(pred, label, 5)
    # class 0: TP 1, labelled 2, predicted 2 -> IoU 1/3, Acc 1/2; class 1: TP 2, labelled 2,
    # predicted 3 -> 2/3, 1; class 2: TP 1, labelled 2, predicted 1 -> 1/2, 1/2; classes 3
    # and 4 neither labelled nor predicted outside the ignored pixels: no IoU, left out
    assert m["IoU"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert all(math.isnan(v) for v in m["IoU"][3:])
    assert m["mIoU"] == pytest.approx(0.5)
    assert m["mAcc"] == pytest.approx(2 / 3)
    assert m["aAcc"] == pytest.approx(4 / 6)
    # a class predicted but never labelled has IoU 0 (it counts), and no accuracy
    m = _metrics(torch.tensor([3, 0]), torch.tensor([0, 0]), 5)
    assert m["IoU"][3] == 0.0 and math.isnan(m["Acc"][3]) and m["mIoU"] == pytest.approx(0.25)


def test_poly_schedule__mmcv_values():
    base = 1e-4
    assert warmup_poly(0, 100, 10, base, 0.0) == pytest.approx(base * 1e-6)
    # warm-up scales the poly value: (1 - (1 - 5/10)(1 - 1e-6)) * base * (1 - 5/100)
    assert warmup_poly(5, 100, 10, base, 0.0) == pytest.approx((1 - 0.5 * (1 - 1e-6)) * base * 0.95)
    assert warmup_poly(10, 100, 10, base, 0.0) == pytest.approx(base * 0.9)
    assert warmup_poly(100, 100, 10, base, 0.0) == 0.0
    assert warmup_poly(50, 100, 0, base, 1e-6, power=2) == pytest.approx((base - 1e-6) * 0.25 + 1e-6)


# ---------------------------------------------------------------- training


def test_segment_train__loss_falls_on_real_images(semseg, tmp_path):
    cfg = _cfg(
        tmp_path / "run",
        semseg,
        iters=30,
        eval_every_iters=0,
        batch_size=2,
        photometric=False,
        ratio_range=(1.0, 1.0),
        blr=3.0,
        warmup_steps=3,
    )
    train(cfg)
    losses = [r["loss"] for r in step_records(Path(cfg.output))]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses


def test_segment_train__iterations_evaluations_and_an_interrupted_run_resume_exactly(semseg, tmp_path, monkeypatch):
    """6 images at batch 2: 3 iterations a pass. 7 iterations with evaluation every 2: at 2 and 4
    inside a pass, 6 at the end of one, and 7, the end, one iteration into the third pass."""
    full = _cfg(tmp_path / "full", semseg)
    train(full)
    records = metrics_records(Path(full.output))
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 8))
    evaluated = [r["step"] for r in records if "mIoU" in r]
    assert evaluated == [2, 4, 6, 7]
    assert all(0 <= r["mIoU"] <= 1 and "mAcc" in r and "aAcc" in r for r in records if "mIoU" in r)
    assert (Path(full.output) / "checkpoint-best.pth").exists()
    assert torch.load(Path(full.output) / "checkpoint-last.pth", weights_only=True)["update"] == 7

    # the same run killed at its 6th iteration (after the checkpoint of iteration 4), resumed
    calls = {"n": 0}
    step = segment.SegmentStep.__call__

    def dies_at_six(self, model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return step(self, model, batch, generator)

    monkeypatch.setattr(segment.SegmentStep, "__call__", dies_at_six)
    part = _cfg(tmp_path / "part", semseg)
    with pytest.raises(KeyboardInterrupt):
        train(part)
    monkeypatch.setattr(segment.SegmentStep, "__call__", step)
    assert torch.load(Path(part.output) / "checkpoint-last.pth", weights_only=True)["update"] == 4
    train(_cfg(tmp_path / "part", semseg, resume="auto"))
    a = torch.load(Path(full.output) / "checkpoint-last.pth", weights_only=True)
    b = torch.load(Path(part.output) / "checkpoint-last.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"
    assert stable(metrics_records(Path(full.output))) == stable(metrics_records(Path(part.output)))


# ---------------------------------------------------------------- commands


def test_segment_cli__train_eval_predict(semseg, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="ummae")
    out = tmp_path / "run"
    args = [
        "segment",
        "train",
        "--data",
        str(semseg),
        "--backbone",
        "pvt_test",
        "--output",
        str(out),
        "--num-classes",
        str(K),
        "--iters",
        "2",
        "--eval-every-iters",
        "0",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--crop-size",
        "64",
        "--scale",
        "128",
        "64",
        "--neck-channels",
        "32",
        "--head-channels",
        "16",
        "--aux-channels",
        "8",
        "--warmup-steps",
        "1",
        "--test-stride",
        "43",
    ]
    assert main(args) == 0
    assert main(args) == 2  # the folder holds a run
    assert "holds a run" in capsys.readouterr().err
    ckpt = out / "checkpoint-last.pth"
    ev = tmp_path / "ev"
    assert (
        main(
            [
                "segment",
                "eval",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(semseg),
                "--output",
                str(ev),
                "--num-workers",
                "0",
                "--ratios",
                "0.75",
                "1.0",
                "--flip",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"mIoU", "mAcc", "aAcc"}
    n_val = len(list((semseg / "images" / "validation").iterdir()))
    evals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("segmentation eval: ")]
    # the sliding-window evaluation reports per image (no terminal here: log lines), in training and in eval
    assert [m.split(" in ")[0] for m in evals] == [f"segmentation eval: {n_val} img"] * 2, evals
    saved = json.loads((ev / "metrics_validation.json").read_text())
    assert saved["mIoU"] == printed["mIoU"] and len(saved["IoU"]) == K and "person" in saved["IoU"]
    table = (ev / "per_class_validation.txt").read_text()
    assert table.splitlines()[0].split() == ["class", "IoU", "Acc"] and "background" in table
    pics = tmp_path / "vis"
    images = sorted((semseg / "images" / "validation").iterdir())[:2]
    assert (
        main(["segment", "predict", "--checkpoint", str(ckpt), "--images", *map(str, images), "--output", str(pics)])
        == 0
    )
    names = sorted(p.name for p in pics.iterdir())
    assert names == sorted([f"{p.stem}.png" for p in images] + [f"{p.stem}_labels.png" for p in images])
    from PIL import Image

    for p in images:
        with Image.open(p) as im, Image.open(pics / f"{p.stem}_labels.png") as lab:
            assert lab.size == im.size and lab.mode == "L"
            assert min(lab.getextrema()) >= 1 and max(lab.getextrema()) <= K  # the data set's 1..K


def test_segment_cli__labels_beyond_the_declared_classes_are_one_clear_line(semseg, tmp_path, capsys):
    for workers in ("0", "1"):
        code = main(
            [
                "segment",
                "train",
                "--data",
                str(semseg),
                "--backbone",
                "swin_test",
                "--output",
                str(tmp_path / f"run{workers}"),
                "--num-classes",
                "20",
                "--iters",
                "1",
                "--batch-size",
                "2",
                "--num-workers",
                workers,
                "--crop-size",
                "64",
                "--scale",
                "128",
                "64",
                "--neck-channels",
                "32",
                "--head-channels",
                "16",
                "--aux-channels",
                "8",
            ]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1, err
        assert "20 classes" in err and ".png" in err and "--num-classes" in err


def test_segment_cli__bad_options_are_one_clear_line(semseg, tmp_path, capsys):
    base = ["segment", "train", "--data", str(semseg), "--output", str(tmp_path / "r")]
    for extra, words in [
        (["--ignore-index", "3"], "ignore_index"),
        (["--test-stride", "600"], "test_stride"),
        (["--num-classes", "0"], "num_classes"),
        (
            [
                "--batch-size",
                "1",
                "--num-classes",
                "81",
                "--crop-size",
                "64",
                "--scale",
                "128",
                "64",
                "--backbone",
                "swin_test",
            ],
            "at least 2 images",
        ),
    ]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert main(["segment", "eval", "--checkpoint", str(tmp_path / "none.pth"), "--data", str(semseg)]) == 2
    assert "none.pth" in capsys.readouterr().err
    assert (
        main(
            [
                "segment",
                "eval",
                "--checkpoint",
                str(tmp_path / "none.pth"),
                "--data",
                str(semseg),
                "--ratios",
                "1.0",
                "0",
            ]
        )
        == 2
    )
    assert "ratios" in capsys.readouterr().err


def test_segment_eval__refuses_a_checkpoint_of_another_task(semseg, tmp_path, capsys, pretrain_ckpt):
    assert (
        main(
            [
                "segment",
                "eval",
                "--checkpoint",
                str(pretrain_ckpt("mae_swin_test")),
                "--data",
                str(semseg),
                "--output",
                str(tmp_path / "ev"),
            ]
        )
        == 2
    )
    assert "not a checkpoint of `ummae segment train`" in capsys.readouterr().err


def test_segment_eval__two_ranks_give_the_one_rank_numbers(semseg, tmp_path, capsys):
    cfg = _cfg(tmp_path / "run", semseg, iters=1, eval_every_iters=0)
    train(cfg)
    ckpt = str(Path(cfg.output) / "checkpoint-last.pth")
    args = ["segment", "eval", "--checkpoint", ckpt, "--data", str(semseg), "--num-workers", "0", "--device", "cpu"]
    assert main(args + ["--output", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    proc = run_torchrun(args + ["--output", str(tmp_path / "two")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1])
    assert two == pytest.approx(one)


def test_segment_train__two_ranks_keep_one_model(semseg, tmp_path):
    """torchrun + DDP (gloo): two ranks train UperNet (both heads through DDP's forward) in
    lockstep, evaluate a shard each, and end with the same weights."""
    out = tmp_path / "ddp"
    proc = run_torchrun(
        [
            "segment",
            "train",
            "--data",
            str(semseg),
            "--backbone",
            "swin_test",
            "--output",
            str(out),
            "--num-classes",
            str(K),
            "--iters",
            "3",
            "--eval-every-iters",
            "2",
            "--batch-size",
            "2",
            "--num-workers",
            "0",
            "--crop-size",
            "64",
            "--scale",
            "128",
            "64",
            "--neck-channels",
            "32",
            "--head-channels",
            "16",
            "--aux-channels",
            "8",
            "--warmup-steps",
            "1",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics_records(out)
    assert [r["step"] for r in records if "mIoU" in r] == [2, 3]
    passes = [r for r in records if "train_loss" in r]
    assert passes and all(r["replica_max_diff"] == 0.0 for r in passes)


@pytest.mark.parametrize("source", ["mae_swin_test", "simmim_pvt_test"])
def test_build_segmenter__backbone_weights_come_from_a_pretraining_checkpoint(pretrain_ckpt, source):
    from ummae.weights import io as ckpt

    model, report = build_segmenter(source.split("_", 1)[1], 5, pretrained=str(pretrain_ckpt(source)), **TINY)
    saved = ckpt.load(pretrain_ckpt(source))["model"]
    own = model.backbone.state_dict()
    loaded = [k for k in own if k.startswith("encoder.") and k in saved and own[k].shape == saved[k].shape]
    assert loaded and report.loaded
    assert all(torch.equal(own[k], saved[k]) for k in loaded)
