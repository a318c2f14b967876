"""Detection on torchvision (`ummae detect`): the backbone seam, every detector trains on real
COCO images with falling losses, runs save and resume exactly, evaluation gathers every
rank's images once, and the commands give one clear line for bad input.

Tiny configurations: test backbones, 128 px, 32-channel neck and FPN, a handful of
``../shared/data/coco_mini`` images (these tests must run in CI: they fail without it).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from _helpers import TINY_DETECTOR, coco_subset, epoch_records, run_torchrun, stable, step_records, tiny_detect_config
from ummae.cli import main
from ummae.detector_specs import SPECS
from ummae.models.dense import build_stage_maps
from ummae.models.detectors import build_detector
from ummae.tasks.detect import train


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return coco_subset(tmp_path_factory.mktemp("coco"), n_train=6, n_val=4)


_cfg = functools.partial(tiny_detect_config, backbone="swin_test", detector="gfl", warmup_steps=2)


@pytest.mark.parametrize("backbone", ["swin_test", "pvt_test"])
def test_stage_maps__four_maps_of_the_projected_width_at_strides_4_to_32(backbone):
    maps = build_stage_maps(backbone, 128, out_channels=24)
    out = maps(torch.randn(2, 3, 128, 128))
    assert list(out) == ["0", "1", "2", "3"]
    assert [tuple(v.shape) for v in out.values()] == [(2, 24, 128 // s, 128 // s) for s in (4, 8, 16, 32)]


def _plain_global_attention(block, x):
    """HTC++'s global block written out as a plain pre-norm transformer block: every token of
    ``x [N, C, H, W]`` attends to every token, ``softmax(q k^T / sqrt(d)) v`` per head (heads
    split off the channels in order), then the output projection and the residual; then
    LayerNorm, Linear, exact GELU, Linear and the residual."""
    n, c, h, w = x.shape
    heads, d = block.num_heads, c // block.num_heads
    t = x.reshape(n, c, h * w).permute(0, 2, 1)  # tokens in row-major order: [N, HW, C]
    ln1 = torch.nn.functional.layer_norm(t, (c,), block.norm1.weight, block.norm1.bias, 1e-5)
    qkv = ln1 @ block.qkv.weight.T + block.qkv.bias
    q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
    out = torch.zeros_like(t)
    for i in range(heads):
        qi, ki, vi = (z[..., i * d : (i + 1) * d] for z in (q, k, v))
        weights = torch.softmax(torch.einsum("bqd,bkd->bqk", qi, ki) / d**0.5, dim=-1)
        out[..., i * d : (i + 1) * d] = torch.einsum("bqk,bkd->bqd", weights, vi)
    t = t + out @ block.proj.weight.T + block.proj.bias
    ln2 = torch.nn.functional.layer_norm(t, (c,), block.norm2.weight, block.norm2.bias, 1e-5)
    hidden = torch.nn.functional.gelu(ln2 @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    t = t + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    return t.permute(0, 2, 1).reshape(n, c, h, w)


@pytest.mark.parametrize("backbone", ["swin_test", "pvt_test"])
def test_global_attn__only_the_last_stage_map_changes_by_a_plain_self_attention_block(backbone):
    """``global_attn``: the same backbone and projections with HTC++'s block give the same
    first three maps; the last is its projection of the plain block (written out above, with
    the last stage's heads) applied to the last stage's raw map; shapes are kept; gradients
    reach the block from the last map only."""
    torch.manual_seed(0)
    plain = build_stage_maps(backbone, 128, out_channels=24).eval()  # eval: no stochastic depth
    htcpp = build_stage_maps(backbone, 128, out_channels=24, global_attn=True).eval()
    missing, unexpected = htcpp.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("global_attn.") for k in missing)
    block = htcpp.global_attn
    assert block.num_heads == htcpp.encoder.stages[-1][0].attn.num_heads > 1
    with torch.no_grad():  # a block away from its initial near-identity, so that a bug shows
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 3, 128, 128)
    a, b = plain(x), htcpp(x)
    assert [v.shape for v in a.values()] == [v.shape for v in b.values()]
    for k in ("0", "1", "2"):
        assert torch.equal(a[k], b[k]), k
    raw = htcpp.encoder.forward_dense(x)[-1]
    assert block(raw).shape == raw.shape == (2, htcpp.encoder.embed_dims[-1], 4, 4)
    want = _plain_global_attention(block, raw)
    torch.testing.assert_close(block(raw), want, rtol=1e-5, atol=1e-5)
    proj = htcpp.proj["3"]
    torch.testing.assert_close(b["3"], proj(want.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a["3"], b["3"], atol=1e-3)
    # gradients: the first three maps do not reach the block, the last one reaches all of it
    sum(v.sum() for k, v in htcpp(x).items() if k != "3").backward()
    assert all(p.grad is None for p in block.parameters())
    htcpp(x)["3"].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_global_attn__a_detector_option_recorded_and_off_by_default():
    """Off: no block, no keys (checkpoints of before load unchanged); on: the block, recorded."""
    for detector in ("cascade_maskrcnn", "htc"):
        off = build_detector(detector, "swin_test", 81, **TINY_DETECTOR)
        assert off.backbone.body.global_attn is None and off.options()["global_attn"] is False
        assert not [k for k in off.state_dict() if "global_attn" in k]
        on = build_detector(detector, "swin_test", 81, global_attn=True, **TINY_DETECTOR)
        assert on.options()["global_attn"] is True
        assert {k.split(".global_attn.")[0] for k in on.state_dict() if ".global_attn." in k} == {"backbone.body"}
    with pytest.raises(ValueError, match="--global-attn is an option of --detector cascade_maskrcnn / htc, not of gfl"):
        build_detector("gfl", "swin_test", 81, global_attn=True, **TINY_DETECTOR)


def test_stage_maps__refuse_a_plain_vit_and_a_pretraining_name():
    with pytest.raises(ValueError, match="plain ViT"):
        build_stage_maps("vit_test", 64)
    with pytest.raises(ValueError, match="pre-training model"):
        build_stage_maps("mae_swin_test", 64)


@pytest.mark.parametrize("source", ["mae_swin_test", "simmim_pvt_test"])
def test_build_detector__backbone_weights_come_from_a_pretraining_checkpoint(pretrain_ckpt, source):
    """The seam classification uses: every encoder tensor of the checkpoint lands in the
    detector's backbone unchanged (PVT's position table resized to the new canvas)."""
    from ummae.weights import io as ckpt
    from ummae.weights.load import load_pretrained

    backbone = source.split("_", 1)[1]
    model = build_detector("gfl", backbone, 81, **TINY_DETECTOR)
    report = load_pretrained(model, pretrain_ckpt(source))
    saved = ckpt.load(pretrain_ckpt(source))["model"]
    own = model.backbone.body.state_dict()
    loaded = [k for k in own if k.startswith("encoder.") and k in saved and own[k].shape == saved[k].shape]
    assert loaded and report.loaded
    for k in loaded:
        assert torch.equal(own[k], saved[k]), k
    assert not [k for k in own if k.startswith("encoder.") and k not in saved and "pos_embed" not in k]


def _real_batch(coco: Path, masks: bool):
    from ummae.data.coco import CocoDetection, LargeScaleJitter, collate_detection

    ds = CocoDetection(
        str(coco), "train2017", train=True, with_masks=masks, transform=LargeScaleJitter(128, (1.0, 1.0), 0.0)
    )
    return collate_detection([ds.load_or_substitute((i, i)) for i in range(2)])


@pytest.mark.parametrize("detector", list(SPECS))
def test_every_detector__losses_are_finite_and_fall_on_real_coco_images(coco, detector):
    """Thirty AdamW steps on one batch of two coco_mini images: every loss term is finite,
    the total ends below its start and below 60 % of its peak (GFL's box terms are weighted by
    the predicted score, which starts at the 0.01 prior, so its total rises first), and every
    parameter gets a gradient."""
    from ummae.tasks.detect import DetectStep

    torch.manual_seed(0)
    images, targets, _ = _real_batch(coco, masks=SPECS[detector].masks)
    model = build_detector(detector, "swin_test", 81, drop_path=0.0, **TINY_DETECTOR)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    step = DetectStep()
    losses = []
    for i in range(30):
        out = step(model, [images, targets, 0], None)
        assert all(torch.isfinite(v) for v in out.values()), out
        opt.zero_grad()
        out["loss"].backward()
        if i == 0:
            no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0] and losses[-1] < 0.6 * max(losses), losses


def test_gfl_and_maskrcnn__a_killed_run_resumes_to_the_same_numbers(coco, tmp_path):
    for detector in ("gfl", "maskrcnn"):
        full = _cfg(tmp_path / f"{detector}_full", coco, detector=detector, max_steps_per_epoch=2)
        train(full)
        part = _cfg(tmp_path / f"{detector}_part", coco, detector=detector, max_steps_per_epoch=2, epochs=1)
        train(part)
        resumed = _cfg(tmp_path / f"{detector}_part", coco, detector=detector, max_steps_per_epoch=2, resume="auto")
        train(resumed)
        a = torch.load(Path(full.output) / "checkpoint-last.pth", weights_only=True)["model"]
        b = torch.load(Path(resumed.output) / "checkpoint-last.pth", weights_only=True)["model"]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{detector}: {k} differs after resume"
        assert stable(step_records(Path(full.output))) == stable(step_records(Path(resumed.output)))
        ev = epoch_records(Path(full.output))[-1]
        keys = ["bbox_AP", "bbox_AP50"] + (["segm_AP"] if SPECS[detector].masks else [])
        assert all(k in ev for k in keys), ev
        assert (Path(full.output) / "checkpoint-best.pth").exists()


def test_step_schedule__a_killed_run_resumes_to_the_same_numbers_and_lrs(coco, tmp_path):
    """HTC++'s step schedule (here x0.1 at epoch 1 of 2, a 3-update warm-up from 0.001 of the
    lr that crosses the epoch's end): a run stopped after its first epoch and resumed ends with
    the weights and metrics of the straight run, and every update's lr is mmcv's, written out:
    ``lr * 0.1 ** (epoch >= 1)``, times ``1 - (1 - u / 3) * (1 - 0.001)`` in the warm-up."""
    step = dict(schedule="step", lr_steps=(1,), warmup_steps=3, max_steps_per_epoch=2)
    full = _cfg(tmp_path / "full", coco, **step)
    train(full)
    train(_cfg(tmp_path / "part", coco, epochs=1, **step))
    resumed = _cfg(tmp_path / "part", coco, resume="auto", **step)
    train(resumed)
    a = torch.load(Path(full.output) / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(Path(resumed.output) / "checkpoint-last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = step_records(Path(full.output))
    assert stable(records) == stable(step_records(Path(resumed.output)))
    lr = 1.6e-2 * 2 / 256
    want = [lr * 0.1 ** (u >= 2) * (1 - (1 - u / 3) * (1 - 0.001) if u < 3 else 1.0) for u in range(4)]
    assert [r["lr"] for r in records] == pytest.approx(want, rel=1e-9)


def test_step_schedule__steps_out_of_order_refused(coco, tmp_path):
    with pytest.raises(ValueError, match="--lr-steps 69 63: give the epochs in increasing order"):
        _cfg(tmp_path, coco, schedule="step", lr_steps=(69, 63)).validate()


def _flag_value(option):
    """A value of a detector option's flag other than its default."""
    return next(c for c in option.choices if c != option.default) if option.choices else not option.default


def _keep_the_top_detections(model, n: int = 5):
    """The ``n`` best detections per image, whatever their score (random weights score below
    the 0.05 default), from ``n`` candidates (per level of a one-stage detector, proposals of a
    two-stage one): few, so that masks are pasted and soft-NMS runs quickly."""
    for m in model.modules():
        if hasattr(m, "score_thresh"):
            m.score_thresh, m.detections_per_img = 0.0, n
        if hasattr(m, "topk_candidates"):
            m.topk_candidates = n
        if hasattr(m, "_post_nms_top_n"):  # torchvision's RPN
            m._post_nms_top_n = {**m._post_nms_top_n, "testing": n}
    return model.eval()


@pytest.fixture(scope="module")
def coco_one_val(tmp_path_factory):
    """Two training images, one validation image: a mask detector's evaluation of random
    weights pastes and scores 100 masks per image."""
    return coco_subset(tmp_path_factory.mktemp("coco1"), n_train=2, n_val=1)


@pytest.mark.parametrize("detector", list(SPECS))
def test_every_detector__trains_is_evaluated_by_its_spec_s_ap_and_its_checkpoint_reloads_exactly(
    coco_one_val, tmp_path, capsys, detector
):
    """`detect train` for one step on coco_mini with the spec's options off their defaults
    (a folder option aside: it needs its data): finite losses; box AP, and mask AP exactly for a
    spec with masks, both at the run's evaluation and from `detect eval` of its checkpoint, with
    the same numbers; and the checkpoint, rebuilt from what it records, predicts what a model
    built from the run's options with the same weights predicts, every detection kept.
    64 FPN channels: FCOS's GroupNorm(32) on the 1 x 1 P7."""
    spec = SPECS[detector]
    options = {o.field_name: _flag_value(o) for o in spec.options if not o.set_by}
    coco = coco_one_val
    cfg = _cfg(tmp_path / "run", coco, detector=detector, epochs=1, fpn_channels=64, **options)
    train(cfg)
    out = Path(cfg.output)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in step_records(out))
    measured = {k.split("_")[0] for k in epoch_records(out)[-1] if k.startswith(("bbox_", "segm_"))}
    assert measured == set(spec.iou_types) == ({"bbox", "segm"} if spec.masks else {"bbox"})
    ckpt = out / "checkpoint-last.pth"
    capsys.readouterr()
    argv = ["detect", "eval", "--checkpoint", str(ckpt), "--data", str(coco), "--output", str(tmp_path / "ev")]
    assert main([*argv, "--num-workers", "0"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k.split("_")[0] for k in printed} == measured
    assert printed == pytest.approx({k: epoch_records(out)[-1][k] for k in printed}, abs=1e-6)

    from ummae.tasks.detect import load_detector

    saved = torch.load(ckpt, weights_only=True)
    asked = build_detector(detector, cfg.backbone, saved["model_args"]["num_classes"], **cfg.model_kwargs())
    asked.load_state_dict(saved["model"])
    images = [im.float() / 255 for im in _real_batch(coco, masks=False)[0]]
    with torch.no_grad():
        want = _keep_the_top_detections(asked)(images)
        got = _keep_the_top_detections(load_detector(str(ckpt)))(images)
    assert len(want[0]["boxes"]) > 0
    for w, g in zip(want, got, strict=True):
        assert w.keys() == g.keys() and ("masks" in w) == spec.masks
        for k in w:
            assert torch.equal(w[k], g[k]), f"{detector}: {k} differ after reloading"


def test_detect_cli__train_eval_predict(coco, tmp_path, capsys):
    # 256 px: torchvision's FCOS head norms with GroupNorm(32), which needs P7 (1/128) > 1x1
    out = tmp_path / "run"
    args = [
        "detect",
        "train",
        "--data",
        str(coco),
        "--backbone",
        "pvt_test",
        "--detector",
        "fcos",
        "--output",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--img-size",
        "256",
        "--neck-channels",
        "32",
        "--fpn-channels",
        "32",
        "--max-steps-per-epoch",
        "2",
        "--warmup-steps",
        "1",
    ]
    assert main(args) == 0
    assert main(args) == 2  # the folder holds a run
    assert "holds a run" in capsys.readouterr().err
    ckpt = out / "checkpoint-last.pth"
    assert (
        main(
            [
                "detect",
                "eval",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(coco),
                "--output",
                str(tmp_path / "ev"),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) >= {"bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl"}
    results = json.loads((tmp_path / "ev" / "detections_val2017.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score"} <= set(r) for r in results)
    pics = tmp_path / "vis"
    images = sorted((coco / "val2017").iterdir())[:2]
    assert (
        main(
            [
                "detect",
                "predict",
                "--checkpoint",
                str(ckpt),
                "--images",
                *map(str, images),
                "--output",
                str(pics),
                "--score-thresh",
                "0.0",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in pics.iterdir()) == sorted(p.stem + ".png" for p in images)


@pytest.mark.parametrize("test_flags", [[], ["--test-scales", "128", "96x64", "--test-flip"]], ids=["plain", "tta"])
def test_detect_eval__two_ranks_give_the_one_rank_numbers(coco, tmp_path, capsys, test_flags):
    """Each image is evaluated once: the COCO results and AP of two gloo ranks are those of
    one process, in the plain test and in the multi-scale + flip one (each image tested at
    every scale and flipped by the rank that holds it)."""
    model = build_detector(
        "gfl", "swin_test", 81, drop_path=0.0, cat_ids=list(range(1, 81)), class_names=[""] * 80, **TINY_DETECTOR
    )
    # a checkpoint as `detect train` writes one, with the real categories
    from ummae.data.coco import CocoDetection

    ds = CocoDetection(str(coco), "val2017", train=False)
    model.model_args.update(cat_ids=list(ds.cat_ids), class_names=list(ds.class_names))
    with torch.no_grad():  # scores near 0.5 rather than the 0.01 prior: detections above the 0.05 threshold
        model.head.gfl_cls.bias.zero_()
    path = tmp_path / "det.pth"
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_args": model.model_args}, path)
    common = [
        "detect",
        "eval",
        "--checkpoint",
        str(path),
        "--data",
        str(coco),
        "--num-workers",
        "0",
        "--batch-size",
        "1",
        *test_flags,
    ]
    assert main([*common, "--output", str(tmp_path / "one")]) == 0
    run_torchrun([*common, "--output", str(tmp_path / "two")], timeout=300)
    one = json.loads((tmp_path / "one" / "detections_val2017.json").read_text())
    two = json.loads((tmp_path / "two" / "detections_val2017.json").read_text())
    key = lambda r: (r["image_id"], r["category_id"], round(r["score"], 4), [round(v, 2) for v in r["bbox"]])  # noqa: E731
    assert len(one) > 0 and sorted(map(key, one)) == sorted(map(key, two))
    assert json.loads((tmp_path / "one" / "metrics_val2017.json").read_text()) == pytest.approx(
        json.loads((tmp_path / "two" / "metrics_val2017.json").read_text()), abs=1e-6
    )


def test_detect__bad_inputs_get_one_line(coco, tmp_path, capsys):
    base = ["detect", "train", "--output", str(tmp_path / "x"), "--num-workers", "0"]
    assert main([*base, "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main([*base, "--data", str(coco), "--backbone", "vit_test"]) == 2
    assert "plain ViT" in capsys.readouterr().err
    assert main([*base, "--data", str(coco), "--detector", "yolo"]) == 2
    assert "detector" in capsys.readouterr().err
    broken = coco_subset(tmp_path / "broken", n_train=2, n_val=2)
    ann = broken / "annotations" / "instances_train2017.json"
    ann.write_text(ann.read_text()[:500])
    assert main([*base, "--data", str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(ann) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    missing = coco_subset(tmp_path / "missing", n_train=2, n_val=2)
    gone = sorted((missing / "train2017").iterdir())[0]
    gone.unlink()
    assert main([*base, "--data", str(missing), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert gone.name in err and len(err.strip().splitlines()) == 1
    not_det = tmp_path / "cls.pth"
    torch.save({"model": {}, "model_name": "swin_test", "model_args": {}}, not_det)
    assert main(["detect", "eval", "--checkpoint", str(not_det), "--data", str(coco)]) == 2
    assert "not a checkpoint of `ummae detect train`" in capsys.readouterr().err


def test_detect_train__two_ranks_keep_one_model(coco, tmp_path):
    """torchrun + DDP (gloo): two ranks train GFL in lockstep and end with the same weights."""
    out = tmp_path / "ddp"
    run_torchrun(
        [
            "detect",
            "train",
            "--data",
            str(coco),
            "--backbone",
            "swin_test",
            "--output",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--num-workers",
            "0",
            "--img-size",
            "128",
            "--neck-channels",
            "32",
            "--fpn-channels",
            "32",
            "--max-steps-per-epoch",
            "1",
            "--warmup-steps",
            "1",
            "--eval-every",
            "0",
        ],
        timeout=300,
    )
    record = epoch_records(out)[-1]
    assert record["replica_max_diff"] == 0.0 and "bbox_AP" in record
