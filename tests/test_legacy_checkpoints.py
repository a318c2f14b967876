"""Checkpoints written by main before the layout refactor still load, through the commands
that consume them, and give the numbers they gave then.

``tests/fixtures/legacy`` holds one small file of each kind (pretrain, finetune, detect,
segment, export), written through the command line by main at the commit named in its
MANIFEST.json, with what each consuming command printed then (``reference_metrics``);
``tests/fixtures/make_legacy_checkpoints.py`` made them and rebuilds their tiny data here. The
commands run in this process (``ummae.cli.main``, one thread, as the fixtures were made), in a
work folder holding that data. The data need ``../shared`` (coco_mini, coco_semseg_mini): CI has
it, so these tests fail, not skip, without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path

import pytest
import torch

from ummae.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LEGACY = FIXTURES / "legacy"
SHARED = Path(__file__).resolve().parents[2] / "shared"
MANIFEST = json.loads((LEGACY / "MANIFEST.json").read_text())
FILES = MANIFEST["files"]
REFS = MANIFEST["reference_metrics"]
TOL = {"rel": 1e-6, "abs": 1e-6}  # the metrics of the same weights on the same data, in float64 sums


def _load_maker():
    """make_legacy_checkpoints.py as a module: its data builders and the measures it recorded."""
    spec = importlib.util.spec_from_file_location("make_legacy_checkpoints", FIXTURES / "make_legacy_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maker = _load_maker()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The folder the recorded argv are relative to, with the fixtures' data rebuilt in it."""
    assert SHARED.is_dir(), (
        f"{SHARED} is missing: the legacy checkpoint tests need ../shared (coco_mini, coco_semseg_mini)"
    )
    folder = tmp_path_factory.mktemp("legacy_work")
    maker.build_data(folder, SHARED)
    return folder


def ummae(work: Path, argv: list) -> str:
    """Run ``ummae ARGV`` in ``work`` (``{fixtures}`` = the fixture folder); its stdout."""
    real = [a.replace("{fixtures}", str(LEGACY)) for a in argv]
    out, before = io.StringIO(), os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(out):
            code = main(real)
    finally:
        os.chdir(before)
    assert code == 0, f"ummae {' '.join(real)} exited {code}:\n{out.getvalue()[-2000:]}"
    return out.getvalue()


def result_line(stdout: str) -> dict:
    """The one JSON line an eval command prints."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def assert_same_numbers(got, want, where: str) -> None:
    """Equal structure and strings, equal integers, floats within TOL."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same_numbers(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_numbers(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, **TOL), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def kept(name: str) -> bool:
    return "not_kept" not in FILES[name]


def test_fixtures_are_the_recorded_files():
    """Not regenerated or altered by accident: each file has the size and sha256 of MANIFEST."""
    assert set(FILES) == set(REFS), "every fixture has a consuming command with its reference numbers"
    assert {f["kind"] for name, f in FILES.items() if kept(name)} == {
        "pretrain",
        "finetune",
        "detect",
        "segment",
        "export",
    }
    on_disk = {p.name for p in LEGACY.iterdir()} - {"MANIFEST.json"}
    assert on_disk == {name for name in FILES if kept(name)}
    for name in on_disk:
        path, entry = LEGACY / name, FILES[name]
        assert path.stat().st_size == entry["bytes"], name
        assert maker.sha256(path) == entry["sha256"], f"{name} differs from the file MANIFEST.json describes"
    assert sum(FILES[name]["bytes"] for name in on_disk) < 8e6


@pytest.fixture(scope="module")
def fixture_paths(work):
    """``{fixtures}/NAME`` -> a path, for each file: the fixture, or for a file not kept (see
    make_legacy_checkpoints.slim) the export written again now, by its recorded command, from
    its kept source (that it matches the record is test_export_again_writes_the_same_weights)."""
    paths = {}
    for name, entry in FILES.items():
        if kept(name):
            paths[name] = LEGACY / name
        else:
            assert entry["kind"] == "export" and kept(entry["export_of"]), name
            paths[name] = work / "exports" / name
            paths[name].parent.mkdir(exist_ok=True)
            ummae(work, with_paths(entry["argv"], {name: paths[name]}))
    return paths


def with_paths(argv: list, paths: dict) -> list:
    """``argv`` with ``{fixtures}/NAME`` replaced by ``paths[NAME]``, for each NAME of ``paths``."""
    swap = {"{fixtures}/" + name: str(path) for name, path in paths.items()}
    return [swap.get(a, a) for a in argv]


@pytest.mark.parametrize("name", ["finetune-swin_test.pth", "export-finetune-swin_test.safetensors"])
def test_eval_gives_the_recorded_accuracy(work, fixture_paths, name):
    ref = REFS[name]
    stdout = ummae(work, with_paths(ref["argv"], fixture_paths))
    assert_same_numbers(result_line(stdout), ref["result"], f"eval {name}")


@pytest.mark.parametrize("name", ["pretrain-mae_swin_test.pth", "export-mae_swin_test.safetensors"])
def test_finetune_from_pretrained_weights(work, fixture_paths, name):
    """``finetune --pretrained`` of the pre-training checkpoint and of its export (the classifier
    named by the file): the same load report, and the same losses after 2 steps."""
    ref = REFS[name]
    ummae(work, with_paths(ref["argv"], fixture_paths))
    out = work / ref["argv"][ref["argv"].index("--output") + 1]
    report = maker.load_report((out / "pretrained_load.txt").read_text(), LEGACY)
    assert report["text"] == ref["load_report"]["text"]
    assert_same_numbers(report, ref["load_report"], f"load report of {name}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if "train_loss" in r][-1]
    epoch = {k: v for k, v in epoch.items() if k not in ("images_per_s", "epoch_time_s", "peak_mem_mib")}  # measured
    assert_same_numbers(epoch, ref["epoch_record"], f"epoch record of finetune --pretrained {name}")


def test_finetune_fixture_is_made_again(work):
    """The fine-tuning fixture's own command, on the pre-training fixture: the same weights."""
    entry, source = FILES["finetune-swin_test.pth"], FILES["pretrain-mae_swin_test.pth"]["copied_from"]
    assert source in entry["argv"], "the fine-tuning fixture was made from the pre-training one"
    argv = [str(LEGACY / "pretrain-mae_swin_test.pth") if a == source else a for a in entry["argv"]]
    ummae(work, argv)
    out = work / argv[argv.index("--output") + 1]
    state = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    fixture = torch.load(LEGACY / "finetune-swin_test.pth", map_location="cpu", weights_only=True)["model"]
    assert maker.tensors_sha256(fixture) == entry["contents"]["model_sha256"], "the fixture is the one recorded"
    # The same weights up to float rounding, not bit for bit: two optimizer steps on the pinned torch
    # but another timm / Pillow / numpy give differences of ~2e-6 (measured); a wrong computation
    # (another lr, a dropped group, other data) moves them by far more than the tolerance.
    assert state["model"].keys() == fixture.keys()
    for key, want in fixture.items():
        torch.testing.assert_close(state["model"][key], want, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", ["export-mae_swin_test.safetensors", "export-finetune-swin_test.safetensors"])
def test_export_again_writes_the_same_weights(work, name):
    """``ummae export`` of the legacy checkpoint now: the recorded export's weights and metadata."""
    entry = FILES[name]
    target = work / "exports-again" / name
    target.parent.mkdir(exist_ok=True)
    ummae(work, with_paths(entry["argv"], {name: target}))
    got, want = maker.describe_safetensors(target), entry["contents"]
    assert got["metadata"] == want["metadata"]
    assert got["model_sha256"] == want["model_sha256"], f"the export of {entry['export_of']} has other weights"


def test_detect_eval_gives_the_recorded_box_ap(work):
    ref = REFS["detect-gfl-pvt_test.pth"]
    assert_same_numbers(result_line(ummae(work, ref["argv"])), ref["result"], "detect eval")
    detections = work / ref["argv"][ref["argv"].index("--output") + 1] / "detections_val2017.json"
    assert_same_numbers(maker.detections_summary(detections), ref["detections"], "detections")


def test_segment_eval_gives_the_recorded_miou(work):
    ref = REFS["segment-upernet-pvt_test.pth"]
    assert_same_numbers(result_line(ummae(work, ref["argv"])), ref["result"], "segment eval")
    out = work / ref["argv"][ref["argv"].index("--output") + 1]
    per_class = json.loads((out / "metrics_validation.json").read_text())["IoU"]
    present = {k: v for k, v in per_class.items() if v == v}  # NaN: a class in no image
    assert_same_numbers(present, ref["IoU_present_classes"], "per-class IoU")


def test_visualize_the_pretrain_checkpoint(work):
    """``ummae visualize`` rebuilds the pre-training model, decoder included, from the file."""
    picture = work / "recon-legacy.png"
    ummae(
        work,
        [
            "visualize",
            "--checkpoint",
            "{fixtures}/pretrain-mae_swin_test.pth",
            "--images",
            "data/pretrain",
            "--max-images",
            "2",
            "--output",
            str(picture),
            "--device",
            "cpu",
        ],
    )
    assert picture.stat().st_size > 0


@pytest.mark.parametrize("name", ["pretrain-mae_swin_test.pth", "finetune-swin_test.pth"])
def test_resume_from_the_checkpoint(work, name):
    """``--resume`` of a legacy training checkpoint goes on from the epoch it holds, and only
    that one (the fixtures' optimiser moments are emptied, see make_legacy_checkpoints.slim: the
    losses are not the uninterrupted run's, so only the resumed position is checked)."""
    entry = FILES[name]
    argv = [
        str(LEGACY / "pretrain-mae_swin_test.pth") if a == FILES["pretrain-mae_swin_test.pth"]["copied_from"] else a
        for a in entry["argv"]
    ]
    out = f"runs/resumed-{entry['kind']}"
    argv[argv.index("--output") + 1] = out
    next_epoch = entry["contents"]["epoch"]  # a checkpoint holds the epoch to run next
    argv[argv.index("--epochs") + 1] = str(next_epoch + 1)
    ummae(work, [*argv, "--resume", f"{{fixtures}}/{name}"])
    records = [json.loads(line) for line in (work / out / "metrics.jsonl").read_text().splitlines()]
    epochs = sorted({r["epoch"] for r in records if "train_loss" in r})
    assert epochs == [next_epoch], f"resumed epochs {epochs}"
