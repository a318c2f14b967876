"""Tests of carrying weights from pre-training into classifiers (``ummae.weights.load``):
the key report of every pre-training -> classifier pair, the settings that change between the
two (Swin window 8 -> 16, PVT sr 4-2-1-1 -> 8-4-2-1, fixed -> learnable positions, ViT tables
at another size), refusals with clear messages, and the safetensors export (ours and timm's).

Checkpoints are written in the Trainer's format from freshly initialised models (conftest);
the weights need not be trained for the loads to be checked exactly.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import _reference_forward as ref
import ummae
from ummae.cli import main
from ummae.config import FinetuneConfig
from ummae.detector_specs import DETECTORS
from ummae.engine.optim import build_optimizer
from ummae.models.classifier import Classifier, classifier_for
from ummae.models.registry import create_model, list_models
from ummae.tasks.classify import finetune
from ummae.weights import io as ckpt
from ummae.weights.export import export
from ummae.weights.io import CheckpointError
from ummae.weights.load import load_pretrained

PRETRAIN_TEST_MODELS = list_models("*_test", kind="pretrain")
PAIRS = [(name, classifier_for(name)) for name in PRETRAIN_TEST_MODELS]
PRETRAINING_ONLY = ("decoder.", "decoder_embed.", "sm_token", "mask_token")
HEAD_KEYS = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


def _state(path) -> dict:
    return ckpt.load(path)["model"]


def _pretraining_model(name: str, path) -> nn.Module:
    model = create_model(name)
    model.load_state_dict(_state(path))
    return model.eval()


def _imgs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _sincos_reference(side: int, dim: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table ``[side, side, dim]``, one position at a time: a quarter of
    the channels each sin(col * w_i), cos(col * w_i), sin(row * w_i), cos(row * w_i),
    w_i = 1e4^(-i/q) (MAE's ``get_2d_sincos_pos_embed`` puts the column first)."""
    q = dim // 4
    out = torch.zeros(side, side, dim)
    for r in range(side):
        for c in range(side):
            for i in range(q):
                w = 1.0 / 10000 ** (i / q)
                out[r, c, i], out[r, c, q + i] = math.sin(c * w), math.cos(c * w)
                out[r, c, 2 * q + i], out[r, c, 3 * q + i] = math.sin(r * w), math.cos(r * w)
    return out


def _params_without_grad(model: nn.Module) -> list:
    return [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]


# ---------------------------------------------------------------- the key report


def test_classifier_for__every_test_pretraining_model_has_one():
    assert {t for _, t in PAIRS} == set(list_models("*_test", kind="classify"))
    assert classifier_for("mae_swin_test") == "swin_test" and classifier_for("simmim_pvt_test") == "pvt_test"
    with pytest.raises(ValueError, match="no classifier is registered"):
        classifier_for("swin_test")


@pytest.mark.parametrize("source, target", PAIRS)
def test_load_pretrained__report_names_every_key(source, target, pretrain_ckpt):
    path = pretrain_ckpt(source)
    src = _state(path)
    torch.manual_seed(0)  # another init than the checkpoint's (seed 1)
    model = create_model(target, num_classes=5)
    report = load_pretrained(model, path)

    encoder = {k for k in src if k.startswith("encoder.")}
    final_norm = {"encoder.norm.weight", "encoder.norm.bias"}
    assert final_norm <= encoder
    assert len(report.loaded) == len(set(report.loaded))
    assert set(report.loaded) == encoder - final_norm
    pretraining_only = set(src) - encoder
    assert pretraining_only and all(k.startswith(PRETRAINING_ONLY) for k in pretraining_only)
    assert ("sm_token" if source.startswith("mae_") else "mask_token") in pretraining_only
    assert set(report.dropped) == pretraining_only | final_norm
    new = set(HEAD_KEYS)
    if target.startswith("pvt"):
        new |= {"encoder.pos_embed"}
    if target.startswith("vit"):
        new |= {"encoder.pos_embed", "encoder.pos_embed_cls"}
    assert set(report.new) == new
    assert report.adapted == {}

    own = model.state_dict()
    assert set(own) == set(report.loaded) | new  # nothing left unaccounted for
    differ = [k for k in report.loaded if not torch.equal(own[k], src[k])]
    assert not differ, f"loaded tensors differ from the checkpoint: {differ[:5]}"
    text = report.format()
    assert f"loaded {len(report.loaded)} tensors" in text and source in text and "fc_norm" in text


# ---------------------------------------------------------------- pre-training -> fine-tuning settings


def test_load_pretrained__swin_window_8_to_16_same_weights_same_numbers(pretrain_ckpt):
    path = pretrain_ckpt("mae_swin_nano_128")
    pre = _pretraining_model("mae_swin_nano_128", path)
    torch.manual_seed(0)
    clf = create_model("swin_nano_128", num_classes=4, drop_path=0.0)
    assert pre.encoder.window_size == 8 and clf.encoder.window_size == 16
    assert all(blk.window_size == 16 for stage in clf.encoder.stages for blk in stage)
    load_pretrained(clf, path)

    pos_mlp = {k: v for k, v in pre.encoder.state_dict().items() if ".pos_bias." in k}
    assert len(pos_mlp) == 4 * sum(pre.encoder.depths)  # two linears (weight, bias) per block
    clf_encoder = clf.encoder.state_dict()
    assert all(torch.equal(clf_encoder[k], v) for k, v in pos_mlp.items())

    x = _imgs(2, 128)
    clf.eval()
    with torch.no_grad():
        feats = clf.forward_features(x)
        pre.encoder.norm = nn.Identity()  # the classifier norms pooled features instead
        at_8 = pre.encoder.forward_dense(x)[-1]
        pre.encoder.set_window_size(16)
        at_16 = pre.encoder.forward_dense(x)[-1]
    assert feats.shape == (2, 256, 4, 4)
    torch.testing.assert_close(feats, at_16, atol=1e-5, rtol=0)
    assert (feats - at_8).abs().max() > 1e-3  # the window matters: the classifier runs at 16

    clf.train()
    logits = clf(x)
    assert logits.shape == (2, 4)
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    assert not _params_without_grad(clf)


def test_load_pretrained__pvt_sr_4211_to_8421_learnable_positions(pretrain_ckpt):
    path = pretrain_ckpt("mae_pvt_test")
    pre = _pretraining_model("mae_pvt_test", path)
    torch.manual_seed(0)
    clf = create_model("pvt_test", num_classes=3, drop_path=0.0)
    report = load_pretrained(clf, path)
    enc = clf.encoder
    assert pre.encoder.sr_ratios == [4, 2, 1, 1] and pre.encoder.pos_embed is None
    assert enc.sr_ratios == [8, 4, 2, 1]
    assert [blk.attn.sr_ratio for stage in enc.stages for blk in stage] == [8, 4, 2, 1]
    assert "encoder.pos_embed" in report.new
    # one table, at stage 1 (64 px / 4 px patches), as the reference's PVT
    dim = enc.embed_dims[0]
    assert enc.pos_embed.shape == (16, 16, dim) and enc.pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed.detach(), _sincos_reference(16, dim), atol=1e-5, rtol=0)

    x = _imgs(2, 64)
    clf.eval()
    with torch.no_grad():
        feats = clf.forward_features(x)
        pre.encoder.norm = nn.Identity()
        at_4211 = pre.encoder.forward_dense(x)[-1]
        pre.encoder.set_sr_ratios((8, 4, 2, 1))
        at_8421 = pre.encoder.forward_dense(x)[-1]
    torch.testing.assert_close(feats, at_8421, atol=1e-5, rtol=0)
    assert (feats - at_4211).abs().max() > 1e-3  # the reduction matters: the classifier runs 8-4-2-1

    clf.train()
    optimizer = build_optimizer(clf, 1e-3, 0.05, (0.9, 0.999), torch.device("cpu"), clf.default_layer_decay)
    before = enc.pos_embed.detach().clone()
    F.cross_entropy(clf(x), torch.tensor([0, 2])).backward()
    assert not _params_without_grad(clf)
    optimizer.step()
    assert not torch.equal(before, enc.pos_embed), "the position table did not train"


def test_load_pretrained__vit_position_table_resized_for_another_size(tmp_path, save_checkpoint):
    torch.manual_seed(0)
    tuned = create_model("vit_test", num_classes=5)
    with torch.no_grad():  # a fine-tuned table: no longer the sin-cos it started from
        tuned.encoder.pos_embed.add_(0.1 * torch.randn_like(tuned.encoder.pos_embed))
    path = save_checkpoint(tuned, tmp_path / "vit64.pth")
    src = tuned.state_dict()

    big = create_model("vit_test", num_classes=5, img_size=96)
    report = load_pretrained(big, path)
    assert list(report.adapted) == ["encoder.pos_embed"] and "4x4 -> 6x6" in report.adapted["encoder.pos_embed"]
    assert report.new == {} and report.dropped == {}
    assert set(report.loaded) == set(src) - {"encoder.pos_embed"}  # the head too: same classes
    table = big.encoder.pos_embed.detach()
    assert table.shape == (6, 6, 32)
    torch.testing.assert_close(table, ref.bicubic_resize(src["encoder.pos_embed"], 6, 6), rtol=1e-5, atol=1e-5)
    assert big(_imgs(1, 96)).shape == (1, 5)

    same = create_model("vit_test", num_classes=5)
    report = load_pretrained(same, path)
    assert report.adapted == {} and report.new == {} and report.dropped == {}
    assert all(torch.equal(v, src[k]) for k, v in same.state_dict().items())


def test_load_pretrained__pvt_position_tables_resized_for_another_size(tmp_path, save_checkpoint):
    torch.manual_seed(0)
    path = save_checkpoint(create_model("pvt_test", num_classes=3), tmp_path / "pvt64.pth")
    big = create_model("pvt_test", num_classes=3, img_size=128)
    report = load_pretrained(big, path)
    assert set(report.adapted) == {"encoder.pos_embed"} and "16x16 -> 32x32" in report.adapted["encoder.pos_embed"]
    src = ckpt.load(path)["model"]["encoder.pos_embed"]
    torch.testing.assert_close(big.encoder.pos_embed.detach(), ref.bicubic_resize(src, 32, 32), rtol=1e-5, atol=1e-5)
    assert report.new == {} and big(_imgs(1, 128)).shape == (1, 3)
    # the loaded table serves the other size: features equal the source model's on the
    # resized table at 128 px (same weights, table resized by the same rule)
    small = create_model("pvt_test", num_classes=3)
    load_pretrained(small, path)
    with torch.no_grad():
        small.encoder.pos_embed = torch.nn.Parameter(ref.bicubic_resize(src, 32, 32))
        x = _imgs(1, 128)
        torch.testing.assert_close(big(x), small(x), rtol=1e-5, atol=1e-5)


def test_load_pretrained__classifier_with_other_classes_gets_a_new_head(tmp_path, save_checkpoint):
    torch.manual_seed(0)
    path = save_checkpoint(create_model("swin_test", num_classes=5), tmp_path / "five.pth")
    report = load_pretrained(create_model("swin_test", num_classes=3), path)
    assert set(report.dropped) == {"head.weight", "head.bias"} and "other classes" in report.dropped["head.weight"]
    assert set(report.new) == {"head.weight", "head.bias"}
    assert {"fc_norm.weight", "fc_norm.bias"} <= set(report.loaded)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "source, target",
    [
        ("mae_pvt_test", "swin_test"),  # another family
        ("mae_swin_test", "swin_nano_128"),  # same family, other width
        ("simmim_swin_test", "vit_test"),
    ],
)
def test_load_pretrained__other_encoder_refused_naming_both_models(source, target, pretrain_ckpt):
    path = pretrain_ckpt(source)
    model = create_model(target, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, path)
    msg = str(err.value)
    assert source in msg and target in msg and str(path) in msg
    assert f"Its classifier is {classifier_for(source)}" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a refused load changed weights"


def test_load_pretrained__unreadable_files_refused(tmp_path):
    model = create_model("swin_test", num_classes=3)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*corrupt.pth"):
        load_pretrained(model, corrupt)
    with pytest.raises(CheckpointError, match="not found: .*missing.pth"):
        load_pretrained(model, tmp_path / "missing.pth")
    foreign = tmp_path / "foreign.pth"
    torch.save({"foo": 1}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pth is not an ummae checkpoint"):
        load_pretrained(model, foreign)
    bad_st = tmp_path / "corrupt.safetensors"
    bad_st.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*corrupt.safetensors"):
        load_pretrained(model, bad_st)


def test_load_pretrained__safetensors_of_another_model_refused(pretrain_ckpt, tmp_path):
    exported = tmp_path / "pvt.safetensors"
    export(pretrain_ckpt("mae_pvt_test"), exported)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(create_model("swin_test", num_classes=3), exported)
    assert "mae_pvt_test" in str(err.value) and "swin_test" in str(err.value)

    alien = tmp_path / "alien.safetensors"  # some other library's weights
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, str(alien))
    with pytest.raises(
        CheckpointError, match=r"unknown model, which does not match swin_test: \d+ encoder tensors missing"
    ):
        load_pretrained(create_model("swin_test", num_classes=3), alien)


def test_cli_finetune__wrong_pretrained_one_error_line(capsys, tmp_path, colour_data, pretrain_ckpt):
    out = tmp_path / "ft"
    code = main(
        [
            "finetune",
            "--model",
            "swin_test",
            "--pretrained",
            str(pretrain_ckpt("mae_pvt_test")),
            "--data",
            str(colour_data),
            "--output",
            str(out),
            "--epochs",
            "1",
            "--num-workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ummae finetune: error: ") and "mae_pvt_test" in lines[0] and "swin_test" in lines[0]
    assert not out.exists()  # refused before anything was written


# ---------------------------------------------------------------- export


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_export__pretraining_checkpoint_holds_only_the_encoder(pretrain_ckpt, tmp_path):
    path = pretrain_ckpt("mae_swin_test")
    out = tmp_path / "enc.safetensors"
    export(path, out)
    src = ckpt.load(path)
    weights = load_file(str(out))
    assert set(weights) == {k for k in src["model"] if k.startswith("encoder.")}
    assert all(torch.equal(v, src["model"][k]) for k, v in weights.items())
    meta = _metadata(out)
    assert (meta["model_name"], meta["timm_model_name"], meta["source_model"], meta["contents"]) == (
        "swin_test",
        "ummae_swin_test",
        "mae_swin_test",
        "encoder",
    )
    assert json.loads(meta["model_args"]) == json.loads(json.dumps(src["model_args"]))
    assert [p.name for p in tmp_path.iterdir()] == ["enc.safetensors"]  # no temp file left


def test_export__pretrained_safetensors_fine_tunes_like_the_pth(pretrain_ckpt, colour_data, tmp_path):
    pth = pretrain_ckpt("mae_swin_test")
    st = tmp_path / "enc.safetensors"
    export(pth, st)
    a = load_pretrained(create_model("swin_test", num_classes=3), pth)
    b = load_pretrained(create_model("swin_test", num_classes=3), st)
    assert sorted(a.loaded) == sorted(b.loaded) and a.new == b.new
    assert set(b.dropped) == {"encoder.norm.weight", "encoder.norm.bias"}
    outs = {}
    for kind, weights in (("pth", pth), ("st", st)):
        outs[kind] = tmp_path / kind
        finetune(
            FinetuneConfig(
                model="swin_test",
                pretrained=str(weights),
                data=str(colour_data),
                output=str(outs[kind]),
                epochs=1,
                max_steps_per_epoch=1,
                batch_size=6,
                num_workers=0,
                device="cpu",
                eval_every=0,
            )
        )
    ma, mb = _state(outs["pth"] / "checkpoint-last.pth"), _state(outs["st"] / "checkpoint-last.pth")
    assert set(ma) == set(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert f"loaded {len(b.loaded)} tensors from {st}" in (outs["st"] / "pretrained_load.txt").read_text()


def test_export__encoder_loads_into_timm_with_only_head_missing(pretrain_ckpt, tmp_path):
    out = tmp_path / "enc.safetensors"
    export(pretrain_ckpt("mae_swin_test"), out)
    ummae.register_timm()  # the documented step before timm.create_model("ummae_...")
    model = timm.create_model("ummae_swin_test", pretrained=False, num_classes=3)
    result = model.load_state_dict(load_file(str(out)), strict=False)
    assert sorted(result.missing_keys) == sorted(HEAD_KEYS)
    assert sorted(result.unexpected_keys) == ["encoder.norm.bias", "encoder.norm.weight"]


def test_export__fine_tuned_classifier_loads_strictly_into_timm(finetuned, tmp_path):
    path = finetuned / "checkpoint-last.pth"
    out = tmp_path / "clf.safetensors"
    meta = export(path, out)
    assert (meta["contents"], meta["model_name"], meta["source_model"]) == ("classifier", "swin_test", "swin_test")
    weights = load_file(str(out))
    assert set(weights) >= HEAD_KEYS and not any(k.startswith(("decoder", "sm_token")) for k in weights)

    ummae.register_timm()
    timm_model = timm.create_model("ummae_swin_test", pretrained=False, num_classes=3)
    timm_model.load_state_dict(weights, strict=True)
    ours = create_model("swin_test", num_classes=3)
    ours.load_state_dict(_state(path))
    x = _imgs(4, 64)
    with torch.no_grad():
        a, b = timm_model.eval()(x), ours.eval()(x)
    assert torch.equal(a, b)
    assert (a - a.mean(0)).abs().max() > 0  # the images get different logits: a real comparison

    enc = tmp_path / "enc.safetensors"
    assert export(path, enc, encoder_only=True)["contents"] == "encoder"
    assert set(load_file(str(enc))) == {k for k in weights if k.startswith("encoder.")}


def test_export__refuses_a_checkpoint_without_an_ummae_model(tmp_path):
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "model_name": "resnet50"}, foreign)
    with pytest.raises(CheckpointError, match="does not name a registered ummae model .*resnet50"):
        export(foreign, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_timm_create_model__pretrained_true_refused():
    ummae.register_timm()
    with pytest.raises(ValueError, match="ummae downloads no weights.*load_state_dict"):
        timm.create_model("ummae_swin_test", pretrained=True)
    assert isinstance(timm.create_model("ummae_swin_test", pretrained=False), Classifier)


# ---------------------------------------------------------------- the one door: build_from_checkpoint

# What `ummae detect train` / `ummae segment train` recorded before detectors and segmenters were
# registered (model_name composed by hand, these exact model_args): such checkpoints must load.
OLD_DETECTOR_ARGS = {
    "detector": "gfl",
    "backbone": "swin_test",
    "num_classes": 4,
    "img_size": 128,
    "neck_channels": 16,
    "fpn_channels": 16,
    "drop_path": 0.0,
    "window_size": 8,
    "cat_ids": [1, 2, 3],
    "class_names": ["a", "b", "c"],
}
OLD_SEGMENTER_ARGS = {
    "backbone": "pvt_test",
    "num_classes": 5,
    "crop_size": 64,
    "neck_channels": 16,
    "head_channels": 8,
    "aux_channels": 8,
    "aux_weight": 0.4,
    "ignore_index": 255,
    "drop_path": 0.1,
    "reduce_zero_label": True,
    "scale": [128, 64],
    "test_mode": "slide",
    "test_stride": 32,
    "class_names": ["a", "b", "c", "d", "e"],
}


@pytest.mark.parametrize(
    "name, args, kind",
    [("gfl_swin_test", OLD_DETECTOR_ARGS, "detect"), ("upernet_pvt_test", OLD_SEGMENTER_ARGS, "segment")],
)
def test_build_from_checkpoint__loads_a_dense_checkpoint_of_the_old_naming(tmp_path, name, args, kind):
    from ummae.weights.build import build_from_checkpoint

    torch.manual_seed(0)
    built = {k: v for k, v in args.items() if k not in ("detector", "backbone")}
    # the forms of then (issue 25 records them): LayerNorm + Linear projections, PVT's table at the input size
    old_forms = {"neck": "ln_linear", "pos_embed_mode": "resize"}
    weights = create_model(name, **built, **old_forms).state_dict()
    path = tmp_path / f"{kind}.pth"
    ckpt.save_atomic({"model": weights, "model_name": name, "model_args": args, "epoch": 1}, path)
    model, meta = build_from_checkpoint(path, kind, drop_path=0.0)
    assert model.model_name == name and meta["model_name"] == name
    recorded = {**args, "drop_path": 0.0, "neck": "ln_linear"}  # recorded by create_model, not by hand
    if args["backbone"].startswith("pvt"):  # a position table: its form too
        recorded["pos_embed_mode"] = "resize"
    if kind == "detect":  # written before GFL's options (issue 34): rebuilt, and recorded, as it trained
        recorded.update(fpn_norm="bn", test_score_thr=0.05)
    assert model.model_args == recorded
    assert set(model.state_dict()) == set(weights)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_create_model__dense_models_record_what_rebuilds_them():
    model = create_model("gfl_swin_test", num_classes=4, img_size=128, neck_channels=16, fpn_channels=16)
    assert model.model_name == "gfl_swin_test"
    assert model.model_args["detector"] == "gfl" and model.model_args["backbone"] == "swin_test"
    assert model.model_args["window_size"] == 8 and model.model_args["drop_path"] == 0.1  # swin_test's own
    assert list_models(kind="detect") == sorted(DETECTORS)  # every spec of ummae.detector_specs
    # a head name with an underscore resolves (<head>_<backbone>) and records the cascade options
    cascade = create_model("cascade_maskrcnn_swin_test", num_classes=4, img_size=128, neck_channels=16, fpn_channels=32)
    assert cascade.model_args["detector"] == "cascade_maskrcnn" and cascade.model_args["backbone"] == "swin_test"
    assert cascade.model_args["box_head"] == "2fc" and cascade.model_args["test_nms"] == "nms"
    assert "box_head" not in model.model_args
    assert list_models(kind="segment") == ["upernet"] and "gfl" not in list_models()
    with pytest.raises(ValueError, match="built on backbone 'swin_test', not 'pvt_test'"):
        create_model("gfl_swin_test", backbone="pvt_test", num_classes=4)


def test_build_from_checkpoint__refuses_another_kind_naming_both(tmp_path, pretrain_ckpt, save_checkpoint):
    from ummae.weights.build import WrongKindError, build_from_checkpoint

    classifier = save_checkpoint(create_model("swin_test"), tmp_path / "ft.pth")
    with pytest.raises(WrongKindError, match=r"not a checkpoint of `ummae detect train` \(it holds swin_test\)"):
        build_from_checkpoint(classifier, "detect")
    with pytest.raises(WrongKindError, match=r"not a checkpoint of `ummae segment train` \(it holds mae_swin_test\)"):
        build_from_checkpoint(pretrain_ckpt("mae_swin_test"), "segment")
    detector = create_model("gfl_swin_test", num_classes=4, img_size=128, neck_channels=8, fpn_channels=8)
    path = save_checkpoint(detector, tmp_path / "det.pth")
    with pytest.raises(WrongKindError, match=r"holds a detect model \(gfl_swin_test\), not a pretrain one"):
        build_from_checkpoint(path, "pretrain")
    with pytest.raises(WrongKindError, match=r"holds no classifier head \(model mae_swin_test\)"):
        build_from_checkpoint(pretrain_ckpt("mae_swin_test"), "classify", name="swin_test")


def test_build_from_checkpoint__rebuilds_with_recorded_options_and_overrides(tmp_path, save_checkpoint):
    from ummae.weights.build import build_from_checkpoint

    torch.manual_seed(0)
    trained = create_model("pvt_test", num_classes=7, sr_ratios=[4, 2, 1, 1])
    path = save_checkpoint(trained, tmp_path / "ft.pth")
    model, meta = build_from_checkpoint(path, "classify", drop_path=0.0)
    assert model.num_classes == 7 and model.encoder.sr_ratios == [4, 2, 1, 1] and model.encoder.drop_path_rate == 0.0
    assert meta["model_name"] == "pvt_test"
    x = _imgs(2, 64)
    assert torch.equal(model.eval()(x), trained.eval()(x))
    bigger, _ = build_from_checkpoint(path, "classify", img_size=128)  # the position table resized to fit
    assert bigger.img_size == 128 and bigger.encoder.pos_embed.shape[:2] == (32, 32)
