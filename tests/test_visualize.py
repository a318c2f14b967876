"""Tests of the pictures: reconstruction panels and their grid (``ummae visualize``), the mask
figure (``ummae masks``), training curves (``ummae plot``), the pre-training hook that draws
reconstructions every ``vis_every`` epochs, and the refusal of checkpoints without a decoder.

Tiny ``*_test`` models at 64 px on the CPU; the runs are real ``pretrain`` runs on a few small
images the tests write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers import write_colour_dataset, write_colour_images
from ummae.cli import main
from ummae.config import PretrainConfig
from ummae.models.mae import norm_pix_target, patchify, unnormalize_pix
from ummae.models.registry import create_model
from ummae.plot import plot_runs, read_metrics
from ummae.sampling import strategies
from ummae.tasks.pretrain import _spread, _vis_image_paths, pretrain
from ummae.visualize import (
    GAP,
    TITLE_H,
    TOKEN_RGB,
    compose_grid,
    grid_size,
    load_images,
    load_pretraining_model,
    panel_origin,
    panels_from_output,
    reconstruct,
    reconstruction_panels,
    to_display,
)
from ummae.weights.export import export
from ummae.weights.io import CheckpointError

S = 64  # the *_test models' image size
PANELS = [  # (model, options, titles)
    ("mae_swin_test", {}, ["original", "masked input (US)", "after SM", "reconstruction", "reconstruction + visible"]),
    ("mae_pvt_test", {}, ["original", "masked input (US)", "after SM", "reconstruction", "reconstruction + visible"]),
    (
        "mae_vit_test",
        dict(sampling="random", sm_ratio=0.0),
        ["original", "masked input (random)", "reconstruction", "reconstruction + visible"],
    ),
    ("simmim_swin_test", {}, ["original", "masked input (random)", "reconstruction"]),
]


def _model(name, **kw):
    torch.manual_seed(0)
    return create_model(name, **kw).eval()


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    """``n`` normalised images whose display values are exact 8-bit levels (like real files)."""
    rng = np.random.default_rng(seed)
    px = torch.from_numpy(rng.integers(0, 256, (n, 3, S, S))).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (px - mean) / std


def _unit_pixels(mask: torch.Tensor, unit: int) -> torch.Tensor:
    """Unit mask ``[N, L]`` -> pixel mask ``[N, S, S]``, written out plainly."""
    n, length = mask.shape
    g = int(length**0.5)
    return mask.view(n, g, 1, g, 1).expand(n, g, unit, g, unit).reshape(n, g * unit, g * unit)


def _cli(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr()


# ---------------------------------------------------------------- fixtures: real tiny runs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """An ImageFolder of 6 images (72 px), 2 per colour class."""
    return write_colour_images(tmp_path_factory.mktemp("vis_data"), per_class=2)


def _run(out: Path, data: Path, **kw) -> Path:
    values = dict(
        model="mae_swin_test",
        data=str(data),
        output=str(out),
        epochs=2,
        warmup_epochs=1,
        batch_size=3,
        blr=0.05,
        num_workers=0,
        log_every=1,
        keep_every=0,
        seed=0,
        device="cpu",
        vis_every=1,
    )
    values.update(kw)
    pretrain(PretrainConfig(**values))
    return out


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, data) -> Path:
    """UM-MAE (Swin) run of 2 epochs with a reconstruction picture after each."""
    return _run(tmp_path_factory.mktemp("run_a"), data)


@pytest.fixture(scope="module")
def run_b(tmp_path_factory, data) -> Path:
    """SimMIM run of 1 epoch, pictures off."""
    return _run(tmp_path_factory.mktemp("run_b"), data, model="simmim_swin_test", epochs=1, vis_every=0)


# ---------------------------------------------------------------- norm-pix inverse


def _flat_units(n: int = 2) -> torch.Tensor:
    """Units ``[n, L, 768]`` whose variance is near the norm-pix eps (flat image regions), where
    the eps decides the result, next to ordinary ones."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 8, 768, generator=g)
    x[:, :4] = 0.3 + 1e-3 * torch.randn(n, 4, 768, generator=g)  # variance 1e-6
    return x


def test_norm_pix_target__equals_the_formula_with_eps_1e6():
    """MAE's per-unit target: (x - mean) / sqrt(unbiased var + 1e-6), written out here."""
    x = _flat_units()
    n = x.shape[-1]
    mean = x.sum(-1, keepdim=True) / n
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / (n - 1)
    torch.testing.assert_close(norm_pix_target(x), (x - mean) / torch.sqrt(var + 1e-6), rtol=1e-5, atol=1e-6)
    # the eps matters on flat units: without it their target would be about 1.4x larger
    assert (norm_pix_target(x)[:, :4].std() / ((x - mean) / torch.sqrt(var))[:, :4].std()) < 0.8


def test_unnormalize_pix__equals_the_formula():
    x, pred = _flat_units(), torch.randn(2, 8, 768, generator=torch.Generator().manual_seed(6))
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    torch.testing.assert_close(unnormalize_pix(pred, x), pred * torch.sqrt(var + 1e-6) + mean, rtol=1e-5, atol=1e-6)
    x = patchify(_images(2), 16)
    assert torch.allclose(unnormalize_pix(norm_pix_target(x), x), x, atol=1e-5)  # and it inverts the target


def test_panels__norm_pix_prediction_of_the_target_reconstructs_the_image():
    """A norm-pix model predicting its own target exactly draws the original image: the
    prediction is un-normalised with each unit's mean and variance."""
    model, imgs = _model("mae_swin_test"), _images(2)
    assert model.norm_pix_loss
    out = reconstruct(model, imgs, torch.Generator().manual_seed(0))
    out["pred"] = norm_pix_target(patchify(imgs, 16))
    _, panels = panels_from_output(model, imgs, out)
    assert torch.allclose(panels[:, 3], to_display(imgs), atol=1e-5)


def test_panels__without_norm_pix_the_prediction_is_drawn_as_is():
    model, imgs = _model("mae_swin_test", norm_pix_loss=False), _images(2)
    out = reconstruct(model, imgs, torch.Generator().manual_seed(0))
    out["pred"] = patchify(imgs, 16)
    _, panels = panels_from_output(model, imgs, out)
    assert torch.allclose(panels[:, 3], to_display(imgs), atol=1e-6)


# ---------------------------------------------------------------- panels and grid


@pytest.mark.parametrize("name,kw,titles", PANELS, ids=[p[0] + ("_rs" if p[1] else "") for p in PANELS])
def test_reconstruction_panels__panel_count_and_picture_size(name, kw, titles):
    n = 3
    got_titles, panels = reconstruction_panels(_model(name, **kw), _images(n), torch.Generator().manual_seed(0))
    assert got_titles == titles
    assert panels.shape == (n, len(titles), 3, S, S)
    assert panels.min() >= 0 and panels.max() <= 1
    picture = compose_grid(panels, got_titles)
    p = len(titles)
    assert picture.size == grid_size(n, p, S) == (GAP + p * (S + GAP), TITLE_H + n * (S + GAP))


def test_reconstruction_panels__same_seed_same_masks_other_seed_other_masks():
    model, imgs = _model("mae_swin_test"), _images(2)
    a = reconstruction_panels(model, imgs, torch.Generator().manual_seed(3))[1]
    b = reconstruction_panels(model, imgs, torch.Generator().manual_seed(3))[1]
    c = reconstruction_panels(model, imgs, torch.Generator().manual_seed(4))[1]
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 1], c[:, 1])


@pytest.mark.parametrize("name,kw", [("mae_swin_test", {}), ("mae_vit_test", dict(sampling="random", sm_ratio=0.0))])
def test_reconstruction_panels__pasted_panel_keeps_every_visible_unit_exactly(name, kw, tmp_path):
    """'reconstruction + visible': every unit that is not US-masked (SM units included) holds
    the input's own pixels, exactly, in the float panels and in the written PNG; every
    US-masked unit holds the reconstruction."""
    model, imgs = _model(name, **kw), _images(3)
    out = reconstruct(model, imgs, torch.Generator().manual_seed(0))
    titles, panels = panels_from_output(model, imgs, out)
    masked = _unit_pixels(out["mask"], 16).unsqueeze(1).expand(-1, 3, -1, -1)
    original, recon, pasted = panels[:, 0], panels[:, titles.index("reconstruction")], panels[:, -1]
    assert torch.equal(pasted[~masked], original[~masked])
    assert torch.equal(pasted[masked], recon[masked])
    if out["sm_mask"] is not None:  # SM units are among the kept ones
        assert out["sm_mask"].any() and not (out["sm_mask"] & out["mask"]).any()

    path = tmp_path / "recon.png"
    compose_grid(panels, titles).save(path)
    png = np.asarray(Image.open(path).convert("RGB"))
    for i in range(3):
        crops = []
        for j in (0, len(titles) - 1):
            x, y = panel_origin(i, j, S)
            crops.append(png[y : y + S, x : x + S])
        visible = ~masked[i, 0].numpy()
        assert np.array_equal(crops[1][visible], crops[0][visible])
        # and those are the input file's pixels: the 8-bit levels the test images were made of
        expected = (to_display(imgs[i : i + 1])[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(crops[0], expected)


def test_panels__masked_units_grey_sm_units_token_coloured():
    model, imgs = _model("mae_swin_test"), _images(2)
    out = reconstruct(model, imgs, torch.Generator().manual_seed(0))
    _, panels = panels_from_output(model, imgs, out)
    us = _unit_pixels(out["mask"], 16)
    sm = _unit_pixels(out["sm_mask"], 16)
    masked_in, after_sm = panels[:, 1].permute(0, 2, 3, 1), panels[:, 2].permute(0, 2, 3, 1)
    assert torch.all(masked_in[us] == 0.5)
    assert torch.equal(masked_in[~us], to_display(imgs).permute(0, 2, 3, 1)[~us])
    assert torch.all(after_sm[sm] == torch.tensor(TOKEN_RGB))
    assert torch.equal(after_sm[~sm], masked_in[~sm])


def test_compose_grid__rejects_mismatched_titles():
    with pytest.raises(ValueError, match="titles"):
        compose_grid(torch.zeros(1, 2, 3, 8, 8), ["one"])


# ---------------------------------------------------------------- loading


def test_load_pretraining_model__rebuilds_the_checkpoint(pretrain_ckpt):
    path = pretrain_ckpt("simmim_swin_test")
    model = load_pretraining_model(path)
    saved = torch.load(path, weights_only=True)["model"]
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_load_pretraining_model__refuses_an_exported_encoder(pretrain_ckpt, tmp_path):
    st = tmp_path / "enc.safetensors"
    export(pretrain_ckpt("mae_swin_test"), st)
    with pytest.raises(CheckpointError, match=r"safetensors.*pre-training checkpoint with its decoder"):
        load_pretraining_model(st)
    renamed = tmp_path / "enc.pth"  # recognised by its contents too
    renamed.write_bytes(st.read_bytes())
    with pytest.raises(CheckpointError, match="safetensors"):
        load_pretraining_model(renamed)


def test_load_pretraining_model__refuses_a_classifier_checkpoint(save_checkpoint, tmp_path):
    path = save_checkpoint(create_model("swin_test"), tmp_path / "ft.pth")
    with pytest.raises(CheckpointError, match=r"classifier swin_test.*pre-training checkpoint with its decoder"):
        load_pretraining_model(path)


def test_load_pretraining_model__refuses_weights_without_decoder(tmp_path, pretrain_ckpt):
    from ummae.weights import io as ckpt

    state = torch.load(pretrain_ckpt("mae_swin_test"), weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if k.startswith("encoder.")}
    ckpt.save_atomic(state, tmp_path / "enc_only.pth")
    with pytest.raises(CheckpointError, match="without its decoder"):
        load_pretraining_model(tmp_path / "enc_only.pth")


def test_load_images__folder_sorted_and_bad_files_named(data, tmp_path):
    imgs = load_images([data], S)
    assert imgs.shape == (6, 3, S, S)
    first = load_images([data / "blue" / "blue_0.png"], S)
    assert torch.equal(imgs[:1], first)  # blue/ sorts first
    with pytest.raises(ValueError, match="missing.png"):
        load_images([tmp_path / "missing.png"], S)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_images([tmp_path / "broken.png"], S)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_images([tmp_path / "empty"], S)


# ---------------------------------------------------------------- command line


def test_cli_visualize__writes_the_picture_of_a_real_run(capsys, run_a, data, tmp_path):
    out = tmp_path / "sub" / "recon.png"
    code, cap = _cli(
        capsys,
        [
            "visualize",
            "--checkpoint",
            str(run_a / "checkpoint-last.pth"),
            "--images",
            str(data),
            "--output",
            str(out),
            "--max-images",
            "4",
            "--device",
            "cpu",
        ],
    )
    assert code == 0, cap.err
    assert "4 image(s) x 5 panels" in cap.out
    assert Image.open(out).size == grid_size(4, 5, S)


def test_cli_visualize__classifier_checkpoint_gets_a_clear_error(capsys, save_checkpoint, data, tmp_path):
    path = save_checkpoint(create_model("swin_test"), tmp_path / "ft.pth")
    code, cap = _cli(
        capsys, ["visualize", "--checkpoint", str(path), "--images", str(data), "--output", str(tmp_path / "r.png")]
    )
    assert code == 2
    assert cap.err.startswith("ummae visualize: error: ") and "pre-training checkpoint" in cap.err
    assert "Traceback" not in cap.err and not (tmp_path / "r.png").exists()


def test_cli_masks__a_panel_per_strategy(capsys, tmp_path, data):
    # original | each strategy (one that compacts: also + SM and the compact map) | SimMIM
    panels = 2 + sum(3 if s.compacts else 1 for s in strategies())
    out = tmp_path / "masks.png"
    code, cap = _cli(capsys, ["masks", "--img-size", "64", "--unit-size", "16", "--output", str(out)])
    assert code == 0, cap.err
    assert Image.open(out).size == grid_size(1, panels, 64)
    code, cap = _cli(
        capsys, ["masks", "--img-size", "128", "--image", str(data / "red" / "red_1.png"), "--output", str(out)]
    )
    assert code == 0, cap.err
    assert Image.open(out).size == grid_size(1, panels, 128)


def test_cli_masks__odd_unit_grid_refused(capsys, tmp_path):
    code, cap = _cli(capsys, ["masks", "--img-size", "48", "--output", str(tmp_path / "m.png")])
    assert code == 2
    assert cap.err.startswith("ummae masks: error: ") and "3x3 unit grid" in cap.err


def test_cli_plot__two_real_runs(capsys, run_a, run_b, tmp_path):
    steps, epochs = read_metrics(run_a)
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and len(epochs) == 2
    out = tmp_path / "curves.png"
    code, cap = _cli(capsys, ["plot", str(run_a), str(run_b), "--output", str(out)])
    assert code == 0, cap.err
    assert "loss, lr, images_per_s of 2 run(s)" in cap.out
    assert Image.open(out).size[0] > 0
    # epoch-level metrics plot too; one no run has is refused with the list of those there are
    assert plot_runs([run_a], tmp_path / "v.pdf", ["train_loss", "vis_loss"]) == ["train_loss", "vis_loss"]
    with pytest.raises(ValueError, match="no run has the metric.*acc9.*available:.*vis_loss"):
        plot_runs([run_a, run_b], tmp_path / "x.png", ["acc9"])


def test_plot__fine_tuning_run_gets_its_acc1(finetuned, tmp_path):
    assert plot_runs([finetuned], tmp_path / "ft.png") == ["loss", "lr", "images_per_s", "acc1"]


def test_cli_plot__folder_without_metrics_refused(capsys, run_a, tmp_path):
    code, cap = _cli(capsys, ["plot", str(run_a), str(tmp_path), "--output", str(tmp_path / "c.png")])
    assert code == 2
    assert cap.err.startswith("ummae plot: error: ") and str(tmp_path) in cap.err and "metrics.jsonl" in cap.err


# ---------------------------------------------------------------- the pre-training hook


def test_pretrain_hook__pictures_and_vis_loss_every_epoch(run_a, data):
    pictures = sorted(p.name for p in run_a.glob("recon-epoch*.png"))
    assert pictures == ["recon-epoch0001.png", "recon-epoch0002.png"]
    assert Image.open(run_a / pictures[-1]).size == grid_size(6, 5, S)  # all 6 images (vis_images 8)
    _, epochs = read_metrics(run_a)
    assert all(isinstance(r["vis_loss"], float) for r in epochs)
    # fixed images and fixed masks: the last picture's loss is the final weights' loss on the
    # data's images (sorted) under the masks of seed 0
    model = load_pretraining_model(run_a / "checkpoint-last.pth")
    out = reconstruct(model, load_images([data], S), torch.Generator().manual_seed(0))
    assert float(out["loss"]) == pytest.approx(epochs[-1]["vis_loss"], rel=1e-6)


def test_pretrain_hook__off_with_vis_every_0(run_b):
    assert not list(run_b.glob("recon-*.png"))
    assert all("vis_loss" not in r for r in read_metrics(run_b)[1])


def test_pretrain_hook__images_from_val_split_when_there_is_one(tmp_path):
    root = write_colour_dataset(tmp_path / "ds", train_per_class=1, val_per_class=1)
    cfg = PretrainConfig(data=str(root))
    paths, source = _vis_image_paths(cfg, dataset=None)
    assert source == str(root / "val")
    assert [Path(p).relative_to(root).as_posix() for p in paths] == [
        "val/blue/blue_0.png",
        "val/green/green_0.png",
        "val/red/red_0.png",
    ]


def test_spread__evenly_spaced_first_and_last():
    paths = [str(i) for i in range(10)]
    assert _spread(paths, 4) == ["0", "3", "6", "9"]
    assert _spread(paths, 1) == ["0"]
    assert _spread(paths[:3], 8) == ["0", "1", "2"]


@pytest.mark.parametrize("field,value", [("vis_every", -1), ("vis_images", 0)])
def test_config__vis_options_validated(field, value):
    with pytest.raises(ValueError, match=field):
        PretrainConfig(**{field: value}).validate()
