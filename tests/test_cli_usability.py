"""What users of the MAE / timm code bases expect of the command line: ``--model`` taken from
the checkpoint, ``config.yaml`` + ``log.txt`` + ``checkpoint-best.pth`` in every run folder,
``--version``, choices and required flags in ``--help``, a fast ``--help`` (no torch), MAE's
``--batch_size`` spellings answered in one line, and step log lines that never depend on the
progress bar."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _helpers import smooth_images
from ummae.cli import _parser, main
from ummae.sampling import names

# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Eight smooth 80 px RGB images (pre-training data)."""
    return smooth_images(tmp_path_factory.mktemp("usability_images"), 8)


def _one_error_line(capsys, argv, command: str) -> str:
    """``main(argv)`` returns 2 and prints exactly one ``ummae <command>: error:`` line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}; stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ummae {command}: error: "), lines[0]
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


PRETRAIN_ARGS = [
    "--model",
    "mae_swin_test",
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--num-workers",
    "0",
    "--log-every",
    "1",
    "--vis-every",
    "0",
    "--device",
    "cpu",
]


# ---------------------------------------------------------------- 1. --model from the checkpoint


def test_knn__model_taken_from_a_pretraining_checkpoint(capsys, caplog, colour_data, pretrain_ckpt):
    """No --model: a pre-training checkpoint's classifier (mae_swin_test -> swin_test), said in the log."""
    with caplog.at_level(logging.INFO, logger="ummae"):
        code = main(
            [
                "knn",
                "--pretrained",
                str(pretrain_ckpt("mae_swin_test")),
                "--data",
                str(colour_data),
                "--k",
                "3",
                "--num-workers",
                "0",
                "--device",
                "cpu",
            ]
        )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["val_images"] == 9
    said = [m for m in caplog.messages if m.startswith("--model swin_test")]
    assert said and "mae_swin_test" in said[0] and "pre-training" in said[0], caplog.messages


def test_finetune_then_eval__model_taken_from_the_checkpoints(tmp_path, capsys, caplog, colour_data, pretrain_ckpt):
    """finetune without --model runs swin_test (the classifier of the mae_swin_test weights) and
    records it; eval without --model takes the classifier the checkpoint holds."""
    out = tmp_path / "ft"
    with caplog.at_level(logging.INFO, logger="ummae"):
        assert (
            main(
                [
                    "finetune",
                    "--pretrained",
                    str(pretrain_ckpt("mae_swin_test")),
                    "--data",
                    str(colour_data),
                    "--output",
                    str(out),
                    "--epochs",
                    "1",
                    "--warmup-epochs",
                    "0",
                    "--batch-size",
                    "6",
                    "--lr",
                    "1e-3",
                    "--num-workers",
                    "0",
                    "--device",
                    "cpu",
                    "--keep-every",
                    "0",
                ]
            )
            == 0
        )
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["model_name"] == "swin_test"
    assert yaml.safe_load((out / "config.yaml").read_text())["model"] == "swin_test"
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="ummae"):
        assert (
            main(
                [
                    "eval",
                    "--checkpoint",
                    str(out / "checkpoint-last.pth"),
                    "--data",
                    str(colour_data),
                    "--num-workers",
                    "0",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_images"] == 9
    said = [m for m in caplog.messages if m.startswith("--model swin_test")]
    assert said and "classifier" in said[0], caplog.messages


def test_model_fallback__nothing_names_a_model_is_one_clear_line(tmp_path, capsys, colour_data, pretrain_ckpt):
    """An export without metadata (or no weights at all) names no model: one line asking for --model."""
    from safetensors.torch import save_file

    from ummae.weights.load import read_weights

    state, _ = read_weights(pretrain_ckpt("mae_swin_test"))
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("encoder.")}, str(bare))  # no metadata
    common = ["--data", str(colour_data), "--num-workers", "0", "--device", "cpu"]
    for command, flag in (("knn", "--pretrained"), ("linprobe", "--pretrained"), ("eval", "--checkpoint")):
        extra = ["--output", str(tmp_path / command)] if command == "linprobe" else []
        line = _one_error_line(capsys, [command, flag, str(bare), *common, *extra], command)
        assert "names no model" in line and "--model" in line and str(bare) in line, line
        assert not (tmp_path / command).exists()
    line = _one_error_line(capsys, ["finetune", *common, "--output", str(tmp_path / "scratch")], "finetune")
    assert "--model" in line and "from scratch" in line, line


# ---------------------------------------------------------------- 2. config.yaml, log.txt, checkpoint-best.pth


def test_pretrain__writes_config_yaml_and_log_txt(tmp_path, capsys, caplog, images):
    out = tmp_path / "pt"
    before = list(logging.getLogger("ummae").handlers)
    with caplog.at_level(logging.INFO, logger="ummae"):
        assert main(["pretrain", *PRETRAIN_ARGS, "--data", str(images), "--output", str(out), "--seed", "3"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == "mae_swin_test" and saved["seed"] == 3 and saved["epochs"] == 1
    assert saved["betas"] == [0.9, 0.95] and saved["output"] == str(out)
    text = (out / "log.txt").read_text()
    assert "epoch 0 step 2/2 loss" in text and "epoch 0 done" in text, text
    assert logging.getLogger("ummae").handlers == before  # the file handler is gone with the run
    # --overwrite starts a fresh log.txt
    with caplog.at_level(logging.INFO, logger="ummae"):
        assert main(["pretrain", *PRETRAIN_ARGS, "--data", str(images), "--output", str(out), "--overwrite"]) == 0
    assert (out / "log.txt").read_text().count("epoch 0 done") == 1


def test_finetune__checkpoint_best_follows_val_top1(tmp_path, colour_data, pretrain_ckpt, monkeypatch):
    """Val top-1 of 50, 60, 40 %: checkpoint-best.pth holds the state after epoch 1, exactly as
    the checkpoint-last.pth of that moment (kept as checkpoint-1.pth)."""
    import ummae.tasks.classify as ft

    scripted = iter([50.0, 60.0, 40.0])
    real = ft.evaluate

    def fake_evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "acc1": next(scripted)}

    monkeypatch.setattr(ft, "evaluate", fake_evaluate)
    out = tmp_path / "ft"
    ft.finetune(
        ft.FinetuneConfig(
            model="swin_test",
            pretrained=str(pretrain_ckpt("mae_swin_test")),
            data=str(colour_data),
            output=str(out),
            epochs=3,
            warmup_epochs=0,
            batch_size=6,
            lr=1e-3,
            num_workers=0,
            device="cpu",
            keep_every=1,
        )
    )
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    kept = torch.load(out / "checkpoint-1.pth", weights_only=True)
    last = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert best["epoch"] == 2 and last["epoch"] == 3
    assert best["best"]["best_acc1"] == 60.0 and best["best"]["best_acc1_epoch"] == 1
    assert set(best) == set(kept)
    for key in ("epoch", "update", "best", "config", "model_name", "model_args"):
        assert best[key] == kept[key], key
    assert all(torch.equal(best["model"][k], kept["model"][k]) for k in kept["model"])
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert (out / "config.yaml").exists() and (out / "log.txt").exists()


# ---------------------------------------------------------------- 3. --version, descriptions, choices, required flags


def test_cli__version(capsys):
    from importlib.metadata import version

    assert _help(capsys, ["--version"]).strip() == f"ummae {version('ummae')}"


def test_cli__every_subcommand_has_help_and_description():
    import argparse

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(sub.choices)
    for name, parser in sub.choices.items():
        assert helps[name], name
        assert parser.description, name


def test_cli__fixed_value_options_show_their_values(capsys):
    text = " ".join(_help(capsys, ["pretrain", "--help"]).split())
    sampling = f"--sampling {{{','.join(names())}}}"  # the registry's strategies, in its order
    for shown in ("--precision {auto,bf16,fp16,fp32}", sampling, "--decoder-pos {true,reference}"):
        assert shown in text, shown
    assert "--device {" not in text  # free text: cuda:N
    assert "--precision {auto,bf16,fp16,fp32}" in " ".join(_help(capsys, ["eval", "--help"]).split())


def test_cli__required_flags_shown_without_brackets(capsys, tmp_path):
    for argv, flag in (
        (["eval", "--help"], "--checkpoint"),
        (["knn", "--help"], "--pretrained"),
        (["linprobe", "--help"], "--pretrained"),
        (["finetune", "--help"], "--data"),
    ):
        usage = " ".join(_help(capsys, argv).split("\n\n")[0].split())
        assert f" {flag} " in usage and f"[{flag} " not in usage, usage
        assert "[--output " in usage or argv[0] in ("eval", "knn")  # optional ones keep theirs
    # still given by a YAML file just as well: argparse itself does not require them
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("checkpoint: x.pth\ndata: somewhere\n")
    assert _parser().parse_args(["eval", "--config", str(cfg)]).config == str(cfg)


# ---------------------------------------------------------------- 4. --help without torch


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"], ["eval", "--help"], ["--version"]])
def test_cli__help_does_not_import_torch(argv):
    code = (
        f"import sys\nfrom ummae.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------- 5. MAE / timm spellings


@pytest.mark.parametrize(
    "argv, typed, meant",
    [
        (["pretrain", "--batch_size", "4"], "--batch_size", "--batch-size"),
        (["pretrain", "--mask_ratio=0.75"], "--mask_ratio", "--mask-ratio"),
        (["pretrain", "--output_dir", "runs/x"], "--output_dir", "--output"),
        (["finetune", "--data_path", "/imagenet"], "--data_path", "--data"),
        (["finetune", "--finetune", "ckpt.pth"], "--finetune", "--pretrained"),
        (["finetune", "--nb_classes", "10"], "--nb_classes", "--num-classes"),
        (["linprobe", "--warmup_epochs", "1"], "--warmup_epochs", "--warmup-epochs"),
        (["finetune", "--model-ema"], "--model-ema", "--ema"),
        (["eval", "--resume", "ckpt.pth"], "--resume", "--checkpoint"),
        (["pretrain", "--epochz", "3"], "--epochz", "--epochs"),
    ],
)
def test_cli__mae_spellings_answered_in_one_line(capsys, argv, typed, meant):
    line = _one_error_line(capsys, argv, argv[0])
    assert line == f"ummae {argv[0]}: error: unknown option {typed}; did you mean {meant}?"


def test_cli__unknown_option_without_a_match_is_one_line_too(capsys):
    line = _one_error_line(capsys, ["knn", "--frobnicate", "1"], "knn")
    assert "unknown option --frobnicate" in line and "ummae knn --help" in line


def test_cli__mae_spellings_that_are_ours_still_work():
    args = _parser().parse_args(["finetune", "--blr", "1e-3", "--resume", "auto", "--model", "swin_test"])
    assert (args.blr, args.resume, args.model) == ("1e-3", "auto", "swin_test")


# ---------------------------------------------------------------- 6. step log lines never depend on the bar


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("columns, bar", [("0", False), ("120", True)])
def test_pretrain__step_lines_logged_with_or_without_a_bar(tmp_path, caplog, images, monkeypatch, columns, bar):
    from ummae.config import PretrainConfig
    from ummae.tasks.pretrain import pretrain

    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("COLUMNS", columns)
    with caplog.at_level(logging.INFO, logger="ummae"):
        pretrain(
            PretrainConfig(
                model="mae_swin_test",
                data=str(images),
                output=str(tmp_path / "o"),
                epochs=1,
                batch_size=4,
                num_workers=0,
                log_every=1,
                vis_every=0,
                device="cpu",
            )
        )
    steps = [m for m in caplog.messages if m.startswith("epoch 0 step ")]
    assert [m.split(" loss")[0] for m in steps] == ["epoch 0 step 1/2", "epoch 0 step 2/2"], caplog.messages
    drawn = terminal.getvalue()
    assert ("epoch 0:" in drawn) == bar, repr(drawn)
