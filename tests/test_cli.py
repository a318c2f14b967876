"""Tests of the ``ummae`` command line: help, ``models``, clear one-line errors with exit code
2, YAML + flag precedence, built-in configs, and the ``python -m ummae`` entry (torchrun's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ummae.tasks.pretrain as train
from ummae.cli import _parser, main
from ummae.config import PretrainConfig, config_from_args

PAPER_MODELS = [
    "mae_swin_tiny_256",
    "mae_swin_large_256",
    "mae_pvt_small_256",
    "simmim_swin_tiny_256",
    "simmim_pvt_small_256",
    "mae_vit_base_patch16",
]
TEST_MODELS = ["mae_swin_test", "mae_pvt_test", "mae_vit_test", "simmim_swin_test", "simmim_pvt_test"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Eight smooth 72 px RGB images."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        small = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
        small.resize((72, 72), Image.BICUBIC).save(folder / f"im{i}.png")
    return folder


def _error_line(capsys, argv) -> str:
    """Run ``main(argv)``: it must return 2 and print exactly one ``ummae pretrain: error:``
    line on stderr, with no traceback."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, f"exit {code}; stderr: {captured.err}"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ummae pretrain: error: "), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


# ---------------------------------------------------------------- help


def test_cli_help__top_level_lists_commands():
    exe = Path(sys.executable).with_name("ummae")
    exe = str(exe) if exe.exists() else shutil.which("ummae")
    if exe is None:
        pytest.skip("the `ummae` console script is not installed in this environment")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("usage: ummae", "models", "pretrain", "bench"):
        assert word in proc.stdout


def test_cli_help__pretrain_mentions_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--mask-ratio",
        "--sm-ratio",
        "--sampling",
        "--precision",
        "--resume",
        "--config",
        "--accum-iter",
        "--save-every-steps",
        "--data",
        "--output",
    ):
        assert flag in out, flag
    assert "demo" in out  # built-in config names are advertised


# ---------------------------------------------------------------- models


def test_cli_models__one_name_per_line(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert names == sorted(names) and len(names) == len(set(names))
    assert all(n and n.strip() == n and " " not in n for n in names)
    for name in PAPER_MODELS + TEST_MODELS + ["mae_swin_nano_128"]:
        assert name in names


def test_cli_models__pattern_filters(capsys):
    assert main(["models", "mae_pvt*"]) == 0
    assert capsys.readouterr().out.splitlines() == ["mae_pvt_nano_128", "mae_pvt_small_256", "mae_pvt_test"]
    assert main(["models", "*_test", "--kind", "pretrain"]) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == sorted(TEST_MODELS)
    assert main(["models", "*_test", "--kind", "classify"]) == 0
    assert capsys.readouterr().out.splitlines() == ["pvt_test", "swin_test", "vit_test"]
    assert main(["models", "no_such_thing*"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_module_entry__python_m_ummae_models():
    proc = subprocess.run(
        [sys.executable, "-m", "ummae", "models", "*_256"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.splitlines()
    assert "mae_swin_tiny_256" in names and "simmim_pvt_small_256" in names
    assert all(n.endswith("_256") for n in names)


# ---------------------------------------------------------------- bad input


def test_cli_pretrain__missing_data_path_subprocess(tmp_path):
    """At process level: exit code 2, one error line, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ummae",
            "pretrain",
            "--model",
            "mae_swin_test",
            "--data",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "out"),
            "--num-workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"ummae pretrain: error: data path not found: {tmp_path / 'missing'}"], proc.stderr
    assert proc.stdout == ""


def test_cli_pretrain__missing_data_path(capsys, tmp_path):
    line = _error_line(
        capsys,
        ["pretrain", "--model", "mae_swin_test", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
    )
    assert "data path not found" in line and "nope" in line


def test_cli_pretrain__odd_unit_grid(capsys, tmp_path, images):
    line = _error_line(
        capsys,
        [
            "pretrain",
            "--model",
            "mae_swin_test",
            "--img-size",
            "80",
            "--data",
            str(images),
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert "5x5" in line and "even" in line and "80" in line


def test_cli_pretrain__bad_precision(capsys, tmp_path, images):
    line = _error_line(
        capsys,
        [
            "pretrain",
            "--model",
            "mae_swin_test",
            "--precision",
            "fp8",
            "--data",
            str(images),
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert "precision='fp8'" in line and "bf16" in line


def test_cli_pretrain__bad_flag_type(capsys, tmp_path):
    line = _error_line(capsys, ["pretrain", "--epochs", "two", "--output", str(tmp_path / "o")])
    assert "epochs='two'" in line and "int" in line


def test_cli_pretrain__unknown_yaml_key(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: mae_swin_test\nepoch: 3\n")
    line = _error_line(capsys, ["pretrain", "--config", str(cfg), "--output", str(tmp_path / "o")])
    assert "unknown option 'epoch'" in line and "run.yaml" in line and "epochs" in line


def test_cli_pretrain__missing_config_file(capsys, tmp_path):
    line = _error_line(capsys, ["pretrain", "--config", str(tmp_path / "nope.yaml")])
    assert "config file not found" in line and "demo" in line


def test_cli_pretrain__unknown_model_suggests(capsys, tmp_path, images):
    line = _error_line(
        capsys, ["pretrain", "--model", "mae_swin_tst", "--data", str(images), "--output", str(tmp_path / "o")]
    )
    assert "unknown model 'mae_swin_tst'" in line and "Did you mean mae_swin_test" in line
    assert not (tmp_path / "o").exists()


def test_cli_pretrain__non_finite_loss_exit_3(capsys, tmp_path, images, monkeypatch):
    real = train.pretrain_step

    def nan_step(model, batch, generator):
        out = real(model, batch, generator)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(train, "pretrain_step", nan_step)
    code = main(
        [
            "pretrain",
            "--model",
            "mae_swin_test",
            "--data",
            str(images),
            "--output",
            str(tmp_path / "o"),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
            "--log-every",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3, err
    assert err.startswith("ummae pretrain: error: non-finite loss") and "Traceback" not in err


def test_cli_pretrain__runs(capsys, tmp_path, images):
    out = tmp_path / "o"
    assert (
        main(
            [
                "pretrain",
                "--model",
                "mae_vit_test",
                "--data",
                str(images),
                "--output",
                str(out),
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--num-workers",
                "0",
                "--log-every",
                "1",
                "--blr",
                "1e-3",
                "--crop-scale",
                "0.5",
                "1.0",
            ]
        )
        == 0
    )
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [2, 4]
    assert {"checkpoint-last.pth", "checkpoint-1.pth"} <= set(os.listdir(out))
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert state["model_name"] == "mae_vit_test" and state["config"]["crop_scale"] == [0.5, 1.0]


# ---------------------------------------------------------------- configs


def test_config_from_args__yaml_then_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("model: mae_pvt_test\nepochs: 1\nbatch_size: 4\ncrop-scale: [0.5, 1.0]\nnorm_pix_loss: false\n")
    args = _parser().parse_args(["pretrain", "--config", str(cfg_file), "--batch-size", "2", "--sm-ratio", "0"])
    cfg = config_from_args(PretrainConfig, args)
    assert cfg.model == "mae_pvt_test"
    assert cfg.epochs == 1  # from the file
    assert cfg.batch_size == 2  # the flag wins over the file
    assert cfg.crop_scale == (0.5, 1.0) and cfg.norm_pix_loss is False and cfg.sm_ratio == 0.0
    assert cfg.blr == PretrainConfig().blr  # neither: the default
    args = _parser().parse_args(["pretrain", "--config", str(cfg_file)])
    assert config_from_args(PretrainConfig, args).batch_size == 4


def test_config_from_args__builtin_demo():
    args = _parser().parse_args(["pretrain", "--config", "demo", "--epochs", "2"])
    cfg = config_from_args(PretrainConfig, args)
    assert cfg.model == "mae_swin_nano_128"
    assert cfg.data is None  # the embedded photos
    assert cfg.epochs == 2 and cfg.batch_size == 32


def test_config_from_args__builtin_paper_recipe():
    cfg = config_from_args(PretrainConfig, _parser().parse_args(["pretrain", "--config", "swin_tiny_ummae_in1k"]))
    assert (cfg.model, cfg.batch_size, cfg.accum_iter, cfg.blr, cfg.sm_ratio) == (
        "mae_swin_tiny_256",
        128,
        4,
        1.5e-4,
        0.25,
    )


def test_builtin_configs__each_listed_for_the_commands_it_fits():
    from ummae.config import EvalConfig, FinetuneConfig, PretrainConfig, builtin_configs, load_yaml

    assert "demo" in builtin_configs(PretrainConfig) and "demo" not in builtin_configs(FinetuneConfig)
    # a recipe is offered to its own command only: a linear-probe recipe's options are also
    # pre-training and fine-tuning options
    from ummae.config import LinprobeConfig
    from ummae.config.recipes import RECIPES

    assert builtin_configs(LinprobeConfig) == [n for n, r in RECIPES.items() if r.command == "linprobe"] != []
    assert not set(builtin_configs(LinprobeConfig)) & (
        set(builtin_configs(PretrainConfig)) | set(builtin_configs(FinetuneConfig))
    )
    assert builtin_configs(FinetuneConfig) == [
        "vit_base_mae_in1k_finetune",
        "vit_base_ummae_in1k_finetune",
        "swin_tiny_ummae_in1k_finetune",
        "swin_tiny_simmim_in1k_finetune",
        "pvt_small_ummae_in1k_finetune",
        "pvt_small_simmim_in1k_finetune",
        "swin_large_ummae_in1k_finetune",
    ]
    assert builtin_configs(EvalConfig) == []
    for cls in (PretrainConfig, FinetuneConfig):
        for name in builtin_configs(cls):
            cfg = cls(**load_yaml(cls, name))  # every option parses into the config it is listed for
            assert cfg.model
    with pytest.raises(ValueError, match=r"built-in configs: vit_base_mae_in1k_finetune, .*_finetune\)"):
        load_yaml(FinetuneConfig, "no_such_config")
    with pytest.raises(ValueError, match="swin_tiny_ummae_in1k is a recipe of `ummae pretrain`, not of this command"):
        load_yaml(FinetuneConfig, "swin_tiny_ummae_in1k")
