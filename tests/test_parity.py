"""Reference parity: the reference code's own checkpoints and outputs (``../shared/parity``,
computed by implus/UM-MAE) load through the path a user's ``--pretrained`` / ``convert`` /
``--init`` takes, and our models compute the same loss, predictions and logits (fp32, CPU).

These tests must run in CI (it has ``../shared``); elsewhere they skip when it is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _reference_layout import reference_shapes
from ummae.models.classifier import Classifier
from ummae.models.mae import MaskedAutoencoder
from ummae.models.masking import block_choice, kept_unit_index, reference_unit_index
from ummae.models.pvt import PyramidVisionTransformer
from ummae.models.simmim import SimMIM
from ummae.models.swin import SwinTransformer
from ummae.models.vit import VisionTransformer
from ummae.weights import io as ckpt
from ummae.weights.io import CheckpointError, load_state_strict
from ummae.weights.load import load_pretrained, read_weights

PARITY = Path(__file__).resolve().parents[2] / "shared" / "parity"
if not PARITY.is_dir():
    if os.environ.get("CI"):
        raise RuntimeError(f"the parity cases must run in CI, but {PARITY} is missing")
    pytest.skip(f"{PARITY} is absent (the parity cases run where ../shared exists, as in CI)", allow_module_level=True)

CASES = sorted(p.name for p in PARITY.iterdir() if p.is_dir())
PRETRAIN_CASES = [c for c in CASES if not c.endswith("_finetuned")]
FINETUNED_CASES = [c for c in CASES if c.endswith("_finetuned")]
TOL = 1e-5


def test_parity_cases__all_ten_present():
    assert CASES == [
        "mae_pvt",
        "mae_swin",
        "mae_swin_us_only",
        "mae_vit_rs",
        "mae_vit_um",
        "pvt_finetuned",
        "simmim_pvt",
        "simmim_swin",
        "swin_finetuned",
        "vit_finetuned",
    ]


def _case(name: str):
    case = json.loads((PARITY / name / "case.json").read_text())
    tensors = load_file(PARITY / name / "case.safetensors")
    return case, tensors


def _spec(case: dict) -> dict:
    """The case's configuration in the terms of tests/_reference_layout.py."""
    kw, extra = case["reference_kwargs"], case["reference_kwargs_extra"]
    cls = case["reference_class"].split(".")[-1]
    kind = "mae" if cls.startswith("MaskedAutoencoder") else "simmim" if cls.startswith("SimMIM") else "classifier"
    family = "swin" if "Swin" in cls else "pvt" if "PVT" in cls else "vit"
    spec = dict(family=family, kind=kind, img_size=kw["img_size"])
    if family == "vit":
        spec.update(dim=kw["embed_dim"], depth=kw["depth"], heads=kw["num_heads"], patch=kw["patch_size"])
    elif family == "swin":
        spec.update(
            dims=[kw["embed_dim"] * 2**i for i in range(4)],
            depths=kw["depths"],
            heads=kw["num_heads"],
            posmlp=kw.get("posmlp_dim", 32),
            window=kw["window_size"],
        )
    else:
        spec.update(
            dims=kw["embed_dims"],
            depths=kw["depths"],
            heads=kw["num_heads"],
            mlp_ratios=kw["mlp_ratios"],
            sr=kw["sr_ratios"],
        )
    if kind == "mae":
        spec.update(
            decoder=(kw["decoder_embed_dim"], kw["decoder_depth"]),
            decoder_heads=kw["decoder_num_heads"],
            sm=extra["vis_mask_ratio"] > 0,
            sm_ratio=extra["vis_mask_ratio"],
            norm_pix=extra["norm_pix_loss"],
        )
    if kind == "classifier":
        spec["num_classes"] = kw["num_classes"]
    return spec


def _build(spec: dict, decoder_pos: str = "reference", sampling: str = "uniform"):
    """Our model in the case's configuration (the reference's constructor arguments)."""
    fam, kind = spec["family"], spec["kind"]
    learnable = "learnable" if kind == "classifier" else "sincos"
    if fam == "swin":
        enc = SwinTransformer(
            embed_dim=spec["dims"][0],
            depths=spec["depths"],
            num_heads=spec["heads"],
            window_size=spec["window"],
            pos_hidden=spec["posmlp"],
        )
    elif fam == "pvt":
        enc = PyramidVisionTransformer(
            embed_dims=spec["dims"],
            depths=spec["depths"],
            num_heads=spec["heads"],
            mlp_ratios=spec["mlp_ratios"],
            sr_ratios=spec["sr"],
            pos_embed=learnable,
            img_size=spec["img_size"],
        )
    else:
        enc = VisionTransformer(
            patch_size=spec["patch"],
            embed_dim=spec["dim"],
            depth=spec["depth"],
            num_heads=spec["heads"],
            pos_embed=learnable,
            img_size=spec["img_size"],
        )
    if kind == "classifier":
        return Classifier(enc, spec["num_classes"], img_size=spec["img_size"]).eval()
    if kind == "simmim":
        return SimMIM(enc, spec["img_size"]).eval()
    dim, depth = spec["decoder"]
    return MaskedAutoencoder(
        enc,
        spec["img_size"],
        sampling=sampling,
        sm_ratio=spec["sm_ratio"],
        norm_pix_loss=spec["norm_pix"],
        decoder_pos=decoder_pos,
        decoder_dim=dim,
        decoder_depth=depth,
        decoder_heads=spec["decoder_heads"],
    ).eval()


def _run(model, t):
    mask = t["mask"].bool()
    sm = t["sm_mask"].bool() if "sm_mask" in t and t["sm_mask"].any() else None
    with torch.no_grad():
        return model(t["imgs"], mask=mask, sm_mask=sm)


# ---------------------------------------------------------------- the cases


@pytest.mark.parametrize("name", CASES)
def test_reference_layout__generator_matches_the_reference_checkpoint(name):
    """tests/_reference_layout.py (used below for paper-size layouts and parameter counts)
    lists exactly the keys and shapes of the real reference checkpoint."""
    case, _ = _case(name)
    state = ckpt.load(PARITY / name / "reference.pth")["model"]
    assert {k: tuple(v.shape) for k, v in state.items()} == dict(reference_shapes(_spec(case)))


@pytest.mark.parametrize("name", PRETRAIN_CASES)
def test_parity__pretraining_loss_and_predictions_equal_the_reference(name):
    case, t = _case(name)
    spec = _spec(case)
    vit = spec["family"] == "vit"
    model = _build(
        spec,
        decoder_pos="true" if vit else "reference",  # ViT: the reference's order is right
        sampling="random" if name == "mae_vit_rs" else "uniform",
    )
    state, meta = read_weights(PARITY / name / "reference.pth")  # what --pretrained / --init / convert read
    load_state_strict(model, state, name)
    out = _run(model, t)
    assert abs(out["loss"].item() - t["loss"].item()) < TOL, (out["loss"].item(), t["loss"].item())
    if "pred_masked" in t:
        mask = t["mask"].bool()
        pred = out["pred"][mask].view(t["pred_masked"].shape)  # masked units, raster order
        torch.testing.assert_close(pred, t["pred_masked"], rtol=0, atol=TOL)
    else:
        torch.testing.assert_close(out["pred"], t["pred"], rtol=0, atol=TOL)
    # what the checkpoint records becomes our model options
    args = meta["model_args"]
    assert args["img_size"] == spec["img_size"]
    if spec["kind"] == "mae":
        assert args["sm_ratio"] == spec["sm_ratio"] and args["norm_pix_loss"] is True
        assert args["sampling"] == ("random" if name == "mae_vit_rs" else "uniform")
        assert args.get("decoder_pos") == (None if vit else "reference")


@pytest.mark.parametrize("name", FINETUNED_CASES)
def test_parity__finetuned_logits_equal_the_reference(name):
    case, t = _case(name)
    model = _build(_spec(case))
    report = load_pretrained(model, PARITY / name / "reference.pth")  # the --pretrained path
    assert report.new == {} and report.dropped == {} and report.adapted == {}  # a complete classifier
    with torch.no_grad():
        logits = model(t["imgs"])
    torch.testing.assert_close(logits, t["logits"], rtol=0, atol=TOL)


@pytest.mark.parametrize("name", ["mae_swin", "mae_pvt"])
def test_parity__default_decoder_positions_change_only_the_decoder_input(name):
    """Our default (each visible token at the unit it came from) and the reference's ordering
    share every weight and the encoder output; only where the decoder places the visible
    tokens differs (the same visible units, in another order), and so the prediction."""
    case, t = _case(name)
    spec = _spec(case)
    state, _ = read_weights(PARITY / name / "reference.pth")
    seen = {}
    for mode in ("reference", "true"):
        model = _build(spec, decoder_pos=mode)
        load_state_strict(model, state, name)
        hooks = [
            model.encoder.norm.register_forward_hook(lambda m, a, o, k=mode: seen.__setitem__(("enc", k), o.clone())),
            model.decoder.register_forward_pre_hook(lambda m, a, k=mode: seen.__setitem__(("dec", k), a)),
        ]
        seen[("out", mode)] = _run(model, t)
        for h in hooks:
            h.remove()
    assert torch.equal(seen[("enc", "true")], seen[("enc", "reference")])
    (vis_t, idx_t, _), (vis_r, idx_r, _) = seen[("dec", "true")], seen[("dec", "reference")]
    assert torch.equal(vis_t, vis_r)  # the same tokens reach the decoder...
    mask = t["mask"].bool()
    choice = block_choice(mask, 8, 8)
    assert torch.equal(idx_t, kept_unit_index(choice)) and torch.equal(idx_r, reference_unit_index(choice))
    for b in range(2):  # ...for the same visible units...
        assert sorted(idx_t[b].tolist()) == sorted(idx_r[b].tolist()) == (~mask[b]).nonzero().flatten().tolist()
    moved = (idx_t != idx_r).float().mean().item()
    assert moved > 0.25  # ...but many are placed at another unit's position by the reference
    out_t, out_r = seen[("out", "true")], seen[("out", "reference")]
    assert abs(out_r["loss"].item() - t["loss"].item()) < TOL
    assert not torch.allclose(out_t["pred"], out_r["pred"], atol=1e-3)


@pytest.mark.parametrize("name", ["mae_swin", "mae_pvt", "mae_vit_um"])
def test_parity__pretrained_encoder_carries_into_a_classifier(name):
    """``--pretrained reference.pth`` into a classifier: the decoder and masking tokens are
    dropped with their reasons, and the classifier's features are the pre-trained encoder's
    on the full image (dense, with the classifier's window / sr)."""
    case, t = _case(name)
    spec = _spec(case)
    pre = _build(spec)
    load_state_strict(pre, read_weights(PARITY / name / "reference.pth")[0], name)
    clf_spec = {**spec, "kind": "classifier", "num_classes": 10, "window": 16, "sr": [8, 4, 2, 1]}
    clf = _build(clf_spec)
    report = load_pretrained(clf, PARITY / name / "reference.pth")
    assert "decoder_pos_embed" in report.converted  # the conversion names what it dropped
    assert all(k.startswith(("decoder", "sm_token", "encoder.norm.")) for k in report.dropped)
    assert set(report.new) <= {
        "head.weight",
        "head.bias",
        "fc_norm.weight",
        "fc_norm.bias",
        "encoder.pos_embed",
        "encoder.pos_embed_cls",
    }
    enc = pre.encoder
    if isinstance(enc, SwinTransformer):
        enc.set_window_size(16)
    if isinstance(enc, PyramidVisionTransformer):
        enc.set_sr_ratios((8, 4, 2, 1))
    enc.norm = torch.nn.Identity()
    with torch.no_grad():
        want = enc.forward_features(t["imgs"])
        got = clf.forward_features(t["imgs"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- what cannot be converted


def _write(tmp_path, ck, name="ref.pth"):
    path = tmp_path / name
    torch.save(ck, path)
    return path


def test_convert__refuses_what_it_cannot_map(tmp_path):
    base = ckpt.load(PARITY / "mae_swin" / "reference.pth")
    odd = {**base, "model": {**base["model"], "blocks.0.attn.rel_bias": torch.zeros(3)}}
    with pytest.raises(CheckpointError, match="cannot be mapped.*blocks.0.attn.rel_bias"):
        read_weights(_write(tmp_path, odd))
    table = dict(base["model"])
    table["decoder_pos_embed"] = table["decoder_pos_embed"] + 0.01
    with pytest.raises(CheckpointError, match="decoder_pos_embed differs from the 2-D sin-cos"):
        read_weights(_write(tmp_path, {**base, "model": table}, "table.pth"))
    simmim_codebase = {
        "model": {
            "encoder.layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(3, 3),
            "encoder.mask_token": torch.zeros(1, 1, 8),
        }
    }
    with pytest.raises(CheckpointError, match="SimMIM code base.*cannot be mapped"):
        read_weights(_write(tmp_path, simmim_codebase, "simmim.pth"))
    unknown = {"model": {"backbone.conv.weight": torch.zeros(2)}}
    with pytest.raises(CheckpointError, match="cannot tell the model"):
        read_weights(_write(tmp_path, unknown, "unknown.pth"))


def test_convert__checkpoint_with_other_classes_refused_by_weights_only(tmp_path):
    """Only ``argparse.Namespace`` is allowed beside tensors: any other class (which could run
    code when unpickled) is refused."""
    from fractions import Fraction

    path = _write(tmp_path, {"model": {"cls_token": torch.zeros(1, 1, 4)}, "args": Fraction(1, 3)}, "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_weights(path)
