"""``ummae convert``, ``pretrain --init``, ``visualize`` and ``eval`` on reference checkpoints
(made here in the reference's layout by tests/_reference_layout.py: the real ones are tested in
test_parity.py against the reference's outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from _reference_layout import SWIN_T, frozen_keys, reference_checkpoint, reference_shapes
from ummae.cli import main
from ummae.config import PretrainConfig
from ummae.models.registry import create_model
from ummae.tasks.pretrain import pretrain
from ummae.weights import io as ckpt
from ummae.weights.convert import convert_checkpoint
from ummae.weights.io import CheckpointError, load_state_strict
from ummae.weights.load import load_pretrained, read_weights

# our mae_swin_test / swin_test, in the reference's terms
SWIN_TEST = dict(family="swin", dims=[16, 32, 64, 128], depths=[2, 1, 1, 1], heads=[1, 2, 2, 4], posmlp=8, img_size=64)
MAE_ARGS = dict(
    model="mae_swin_tiny_256",
    input_size=64,
    mask_regular=True,
    vis_mask_ratio=0.25,
    norm_pix_loss=True,
    mask_ratio=0.75,
)


@pytest.fixture(scope="module")
def ref_mae(tmp_path_factory) -> Path:
    """A reference UM-MAE pre-training checkpoint of mae_swin_test's architecture (its args
    name the paper's model, as a reference run at another size would)."""
    path = tmp_path_factory.mktemp("ref") / "ref_mae.pth"
    torch.save(reference_checkpoint(dict(SWIN_TEST, kind="mae", decoder=(32, 1), sm=True), MAE_ARGS, seed=3), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        arr = (torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(folder / f"im{i}.png")
    return folder


def _run(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_convert__writes_an_ummae_checkpoint_that_computes_the_same(capsys, ref_mae, tmp_path):
    out = tmp_path / "converted.pth"
    code, stdout, err = _run(capsys, ["convert", str(ref_mae), "--output", str(out), "--model", "mae_swin_test"])
    assert code == 0, err
    assert "mae_swin_test" in stdout and "decoder_pos_embed" not in stdout
    saved = ckpt.load(out)
    assert saved["model_name"] == "mae_swin_test"
    assert saved["model_args"]["decoder_pos"] == "reference"  # the reference decoder learned its own order
    assert saved["model_args"]["sm_ratio"] == 0.25 and saved["model_args"]["img_size"] == 64
    assert set(saved["conversion"]) == {"decoder_pos_embed"}
    # the file is the on-the-fly conversion, written: the same tensors, the same model
    state, _ = convert_checkpoint(ckpt.load(ref_mae), str(ref_mae))
    assert saved["model"].keys() == state.keys() and all(torch.equal(saved["model"][k], v) for k, v in state.items())
    model = create_model("mae_swin_test", **saved["model_args"])
    load_state_strict(model, saved["model"], out)
    ref = ckpt.load(ref_mae)["model"]
    assert torch.equal(
        model.encoder.stages[0][0].attn.pos_bias.mlp[0].weight, ref["blocks.0.attn.posmlp.0.weight"][..., 0, 0]
    )
    assert torch.equal(model.encoder.downsamples[0].reduction.weight, ref["blocks.2.downsample.proj.weight"])
    assert torch.equal(model.sm_token, ref["vis_mask_token"].flatten())


def test_cli_convert__safetensors_export_loads_as_pretrained(capsys, ref_mae, tmp_path):
    out = tmp_path / "enc.safetensors"
    code, _, err = _run(capsys, ["convert", str(ref_mae), "--output", str(out), "--model", "mae_swin_test"])
    assert code == 0, err
    clf = create_model("swin_test", num_classes=3)
    report = load_pretrained(clf, out)
    assert not report.dropped or set(report.dropped) <= {"encoder.norm.weight", "encoder.norm.bias"}
    direct = create_model("swin_test", num_classes=3)
    load_pretrained(direct, ref_mae)  # the reference file itself, converted on the fly
    enc, enc2 = clf.encoder.state_dict(), direct.encoder.state_dict()
    assert all(torch.equal(enc[k], enc2[k]) for k in enc)


def test_cli_convert__the_tensors_name_the_model_not_the_args(capsys, ref_mae, tmp_path):
    """Its args name the paper's Swin-T (the reference function a resized run kept), its
    tensors are mae_swin_test's: the tensors decide, the args are reported as the source."""
    out = tmp_path / "x.pth"
    code, stdout, err = _run(capsys, ["convert", str(ref_mae), "--output", str(out)])
    assert code == 0, err
    saved = ckpt.load(out)
    assert saved["model_name"] == "mae_swin_test" and "mae_swin_test" in stdout
    assert read_weights(ref_mae, tensors=False)[1]["source_model"] == "mae_swin_tiny_256 (reference checkpoint)"


def test_cli_convert__clear_errors(capsys, ref_mae, tmp_path, save_checkpoint):
    code, _, err = _run(
        capsys, ["convert", str(ref_mae), "--output", str(tmp_path / "x.pth"), "--model", "mae_pvt_test"]
    )
    assert code == 2 and "do not fit mae_pvt_test" in err and "does not match the model" in err
    assert not (tmp_path / "x.pth").exists()  # nothing written when the weights do not fit
    ours = save_checkpoint(create_model("mae_swin_test"), tmp_path / "ours.pth")
    code, _, err = _run(capsys, ["convert", str(ours), "--output", str(tmp_path / "y.pth")])
    assert code == 2 and "already an ummae checkpoint" in err
    out = tmp_path / "z.pth"
    out.write_bytes(b"keep me")
    code, _, err = _run(capsys, ["convert", str(ref_mae), "--output", str(out), "--model", "mae_swin_test"])
    assert code == 2 and "exists" in err and out.read_bytes() == b"keep me"
    code, _, err = _run(
        capsys, ["convert", str(ref_mae), "--output", str(out), "--model", "mae_swin_test", "--overwrite"]
    )
    assert code == 0, err
    code, _, err = _run(
        capsys, ["convert", str(ref_mae), "--output", str(tmp_path / "z.bin"), "--model", "mae_swin_test"]
    )
    assert code == 2 and ".pth" in err and len(err.strip().splitlines()) == 1


def test_cli_convert__paper_size_checkpoint_names_its_model(capsys, tmp_path):
    """A reference checkpoint of the paper's Swin-T: the model comes from its ``args``."""
    src = tmp_path / "swin_t.pth"
    torch.save(
        reference_checkpoint(dict(SWIN_T, kind="mae", decoder=(512, 2), sm=True), dict(MAE_ARGS, input_size=256)), src
    )
    out = tmp_path / "swin_t_ummae.pth"
    code, stdout, err = _run(capsys, ["convert", str(src), "--output", str(out)])
    assert code == 0, err
    assert ckpt.load(out)["model_name"] == "mae_swin_tiny_256"
    code, stdout, err = _run(
        capsys,
        [
            "visualize",
            "--checkpoint",
            str(src),
            "--images",
            str(_one_image(tmp_path)),
            "--output",
            str(tmp_path / "r.png"),
        ],
    )
    assert code == 0, err  # visualize reads the reference file directly
    assert Image.open(tmp_path / "r.png").size[0] > 256


# Swin-S (Swin's paper; timm's swin_small): Swin-T's widths and heads, 18 blocks in stage 3
SWIN_S = dict(
    family="swin", dims=[96, 192, 384, 768], depths=[2, 2, 18, 2], heads=[3, 6, 12, 24], posmlp=32, img_size=256
)


def _shapes_only(spec: dict) -> dict:
    """A reference checkpoint of ``spec`` with "meta" tensors (shapes, no memory), without
    its sin-cos tables (whose values the conversion checks)."""
    shapes = reference_shapes(spec)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items() if k not in frozen_keys(spec)}
    return {"model": state, "args": {}}


def test_convert__swin_small_is_identified_by_its_shapes_without_args_model():
    """Swin-S shares Swin-T's widths and heads: its 18 stage-3 blocks tell them apart, for every
    kind of reference checkpoint; its UM-MAE weights load strictly."""
    ref = reference_checkpoint(dict(SWIN_S, kind="mae", decoder=(512, 2), sm=True), dict(MAE_ARGS, input_size=256))
    del ref["args"].model
    state, meta = convert_checkpoint(ref, "swin_s.pth")
    assert meta["model_name"] == "mae_swin_small_256" and meta["source_model"] == "swin (reference checkpoint)"
    load_state_strict(create_model("mae_swin_small_256"), state, "swin_s.pth")
    for kind, ours in [
        ("simmim", "simmim_swin_small_256"),
        ("classifier", "swin_small_256"),
        ("encoder", "swin_small_256"),
    ]:
        _, meta = convert_checkpoint(_shapes_only(dict(SWIN_S, kind=kind)), f"swin_s_{kind}.pth")
        assert meta["model_name"] == ours, kind
    # and Swin-T is still Swin-T
    _, meta = convert_checkpoint(_shapes_only(dict(SWIN_T, kind="mae", decoder=(512, 2), sm=True)), "swin_t.pth")
    assert meta["model_name"] == "mae_swin_tiny_256"


def test_cli_convert__a_size_we_do_not_register_is_refused_in_one_line(capsys, tmp_path):
    """Swin-test widths with 2-1-2-1 blocks: no registered model has them; the one error line
    names what the tensors show and points at --model."""
    src = tmp_path / "odd.pth"
    torch.save(
        reference_checkpoint(dict(SWIN_TEST, depths=[2, 1, 2, 1], kind="mae", decoder=(32, 1), sm=True), MAE_ARGS), src
    )
    code, _, err = _run(capsys, ["convert", str(src), "--output", str(tmp_path / "x.pth")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "cannot tell which ummae model" in err and "--model" in err
    assert "16x2x1x64, 32x1x2x128, 64x2x2x256, 128x1x4x512; pos-MLP width 8; decoder 32-d, 1 blocks" in err
    assert not (tmp_path / "x.pth").exists()


def _one_image(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (300, 280), (120, 30, 200)).save(path)
    return path


def test_pretrain_init__starts_from_the_reference_weights_with_a_fresh_optimiser(ref_mae, images, tmp_path):
    """``--init``: weights from the reference checkpoint, optimiser and schedule new; with a
    negligible lr the trained weights are still the reference's."""
    out = tmp_path / "run"
    cfg = PretrainConfig(
        model="mae_swin_test",
        init=str(ref_mae),
        data=str(images),
        output=str(out),
        epochs=1,
        warmup_epochs=0,
        batch_size=4,
        lr=1e-12,
        num_workers=0,
        keep_every=0,
        vis_every=0,
    )
    pretrain(cfg)
    saved = ckpt.load(out / "checkpoint-last.pth")
    want, _ = read_weights(ref_mae)
    for k, v in want.items():
        torch.testing.assert_close(saved["model"][k], v, rtol=0, atol=1e-6)
    assert saved["epoch"] == 1 and len(saved["optimizer"]["state"]) > 0
    # the run's own options rule: our default decoder positions, not the reference's
    assert saved["model_args"]["decoder_pos"] == "true"


def test_pretrain_init__weights_of_another_model_refused(ref_mae, images, tmp_path):
    cfg = PretrainConfig(
        model="mae_pvt_test",
        init=str(ref_mae),
        data=str(images),
        output=str(tmp_path / "r"),
        epochs=1,
        batch_size=4,
        num_workers=0,
    )
    with pytest.raises(CheckpointError, match="--init: .* does not hold the weights of mae_pvt_test"):
        pretrain(cfg)


def test_cli_eval__reference_finetuned_checkpoint(capsys, tmp_path, colour_data):
    """A reference fine-tuned classifier evaluates directly (converted on the fly)."""
    src = tmp_path / "ref_clf.pth"
    torch.save(
        reference_checkpoint(
            dict(SWIN_TEST, kind="classifier", num_classes=3), dict(model="swin_tiny_256", input_size=64, nb_classes=3)
        ),
        src,
    )
    code, stdout, err = _run(
        capsys,
        [
            "eval",
            "--model",
            "swin_test",
            "--checkpoint",
            str(src),
            "--data",
            str(colour_data),
            "--num-workers",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["val_images"] == 9


VIT_TEST = dict(family="vit", dim=32, depth=2, heads=2, patch=16, img_size=64)
MAE_CODEBASE_ARGS = dict(model="mae_vit_base_patch16", input_size=64, mask_ratio=0.75, norm_pix_loss=True)


def test_mae_codebase_vit_checkpoints(tmp_path):
    """The MAE code base's checkpoints (no UM options in their args): a pre-training one is MAE
    random sampling without SM; an encoder-only one fine-tunes with the usual key report."""
    full = tmp_path / "mae_full.pth"
    torch.save(reference_checkpoint(dict(VIT_TEST, kind="mae", decoder=(32, 1), sm=False), MAE_CODEBASE_ARGS), full)
    state, meta = read_weights(full)
    # its args name ViT-B, its tensors are mae_vit_test's: the tensors decide
    assert meta["model_name"] == "mae_vit_test" and meta["assumed"] == {}
    assert meta["model_args"] == {
        "img_size": 64,
        "sampling": "random",
        "mask_ratio": 0.75,
        "sm_ratio": 0.0,
        "norm_pix_loss": True,
    }
    model = create_model("mae_vit_test", **meta["model_args"])
    load_state_strict(model, state, full)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert out["mask"].sum(1).tolist() == [12, 12] and torch.isfinite(out["loss"])

    enc_only = tmp_path / "mae_pretrain_vit.pth"
    ck = reference_checkpoint(
        dict(VIT_TEST, kind="encoder"), {k: v for k, v in MAE_CODEBASE_ARGS.items() if k != "input_size"}
    )
    torch.save(ck, enc_only)
    clf = create_model("vit_test", num_classes=3)
    report = load_pretrained(clf, enc_only)
    assert set(report.new) == {
        "encoder.pos_embed",
        "encoder.pos_embed_cls",
        "fc_norm.weight",
        "fc_norm.bias",
        "head.weight",
        "head.bias",
    }
    assert set(report.dropped) == {"encoder.norm.weight", "encoder.norm.bias"}
    text = report.format()
    assert "pos_embed: fixed 2-D sin-cos" in text and "option img_size: not recorded" in text
    assert torch.equal(clf.encoder.cls_token, ck["model"]["cls_token"])
