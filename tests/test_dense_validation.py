"""The validation step detection and segmentation share (:func:`ummae.tasks.dense.validation`):
what it measures is passed on unchanged, and a val split that is the training folder is
flagged ``val_is_train`` with a warning on rank 0 at every evaluation, so that no figure
measured on the training images passes for a validation one."""

from __future__ import annotations

import logging

from torch import nn

from ummae.tasks.dense import validation


def test_validation__the_measured_figures_unchanged_when_val_is_its_own_folder(tmp_path, caplog):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    evaluate = validation(lambda m: {"mIoU": 0.25}, str(tmp_path / "val"), str(tmp_path / "train"), "val", True)
    with caplog.at_level(logging.INFO, logger="ummae"):
        assert evaluate(nn.Identity()) == {"mIoU": 0.25}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("mIoU 0.2500" in r.getMessage() for r in caplog.records)


def test_validation__the_training_folder_as_val_is_flagged_and_warned_at_every_evaluation(tmp_path, caplog):
    (tmp_path / "train").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "train")  # the same folder under another name
    evaluate = validation(lambda m: {"mIoU": 0.5}, str(tmp_path / "link"), str(tmp_path / "train"), "train", True)
    with caplog.at_level(logging.WARNING, logger="ummae"):
        for _ in range(2):
            assert evaluate(nn.Identity()) == {"mIoU": 0.5, "val_is_train": 1.0}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("TRAINING images" in w and "train" in w for w in warnings)


def test_validation__only_rank_0_logs(tmp_path, caplog):
    (tmp_path / "train").mkdir()
    evaluate = validation(lambda m: {"AP": 0.1}, str(tmp_path / "train"), str(tmp_path / "train"), "train", False)
    with caplog.at_level(logging.INFO, logger="ummae"):
        assert evaluate(nn.Identity()) == {"AP": 0.1, "val_is_train": 1.0}  # flagged on every rank
    assert not caplog.records
