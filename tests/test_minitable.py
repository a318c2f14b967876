"""experiments/minitable.py: the small-scale table's protocol (the same schedule and fine-tuning
recipe for every row, the paper's recipes at ``--scale paper``), commands the CLI accepts, and
a table run that stops and continues without redoing a finished run."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ummae.cli import COMMANDS, _parser
from ummae.config.flags import config_from_args
from ummae.config.recipes import RECIPES

ROOT = Path(__file__).resolve().parent.parent
SHARED_MINI = ROOT.parent / "shared" / "data" / "imagenette_mini"
_spec = importlib.util.spec_from_file_location("minitable", ROOT / "experiments" / "minitable.py")
mt = importlib.util.module_from_spec(_spec)
sys.modules["minitable"] = mt  # dataclasses look their module up
_spec.loader.exec_module(mt)

VARYING = {"--seed", "--output", "--pretrained"}  # what may differ between two rows' runs


def _config(argv: list[str]):
    """The validated config a job's command line gives (the CLI's own parser, nothing run)."""
    command = argv[0]
    args, unknown = _parser(command).parse_known_args(argv)
    assert not unknown, f"{argv}: unknown flags {unknown}"
    return config_from_args(COMMANDS[command].config, args)


def _jobs(scale: str, tmp_path: Path):
    return mt.plan(mt.SCALES[scale], tmp_path / "out", str(tmp_path / "data"), ["--num-workers", "2"])


@pytest.mark.parametrize("scale", ["mini", "paper", "test"])
def test_plan__every_command_is_one_the_cli_accepts(scale, tmp_path):
    for job in _jobs(scale, tmp_path):
        if job.kind != "init":
            _config(job.argv)


def test_plan__the_issue_rows_seeds_and_measures(tmp_path):
    keys = {job.key for job in _jobs("mini", tmp_path)}
    for row, seeds, evals in [("1", (0, 1), ("finetune", "linprobe", "knn")), ("2", (0, 1), ("finetune", "linprobe", "knn")),
                              ("3", (0, 1), ("finetune", "linprobe", "knn")), ("4", (0,), ("finetune", "linprobe", "knn")),
                              ("5", (0,), ("finetune",)), ("6", (0,), ("finetune",)), ("7", (0,), ("finetune",)),
                              ("8a", (0,), ("finetune",)), ("8b", (0,), ("finetune",))]:  # fmt: skip
        for seed in seeds:
            assert {f"row{row}_s{seed}_{ev}" for ev in evals} <= keys
            assert (f"row{row}_s{seed}_pretrain" in keys) == (row != "1")
    assert "row1_s1_init" in keys and "row5_s0_linprobe" not in keys
    for row in mt.BUDGET_ROWS:
        for n in mt.SCALES["mini"].budget_epochs:
            assert {f"row{row}_s0_pt{n}_finetune", f"row{row}_s0_pt{n}_knn"} <= keys


@pytest.mark.parametrize("scale", ["mini", "paper"])
def test_plan__one_schedule_and_one_finetuning_recipe_for_every_row(scale, tmp_path):
    jobs = _jobs(scale, tmp_path)
    pre = [_config(j.argv) for j in jobs if j.kind == "pretrain"]
    fields = ("epochs", "warmup_epochs", "blr", "weight_decay", "mask_ratio", "betas", "crop_scale", "seed")
    for name in fields[:-1]:
        assert len({str(getattr(c, name)) for c in pre}) == 1, f"pre-training {name} differs between rows"
    for family in ("swin", "pvt", "vit"):
        runs = [j for j in jobs if j.kind == "finetune" and mt.SCALES[scale].families[family]["classifier"] in j.argv]
        assert runs
        stripped = {tuple(a for i, a in enumerate(j.argv) if a not in VARYING and j.argv[i - 1] not in VARYING)
                    for j in runs}  # fmt: skip
        assert len(stripped) == 1, f"{family}: fine-tuning runs differ beyond seed, folder and weights"
    ft = [_config(j.argv) for j in jobs if j.kind == "finetune"]
    for name in ("epochs", "warmup_epochs", "blr", "mixup", "cutmix", "smoothing", "reprob", "auto_augment"):
        assert len({str(getattr(c, name)) for c in ft}) == 1, f"fine-tuning {name} differs between families"


def test_plan__paper_scale_is_the_recipes_as_published(tmp_path):
    for job in _jobs("paper", tmp_path):
        if job.kind not in ("pretrain", "finetune"):
            continue
        cfg = _config(job.argv)
        recipe = RECIPES[job.argv[job.argv.index("--config") + 1]].values
        assert cfg.img_size == recipe["img_size"] and cfg.epochs == recipe["epochs"]
        assert cfg.model == recipe["model"], f"{job.key}: {cfg.model} is not the recipe's {recipe['model']}"
    sizes = {_config(j.argv).img_size for j in _jobs("paper", tmp_path) if j.kind == "pretrain"}
    assert sizes == {224, 256}


def test_plan__rows_are_what_they_say(tmp_path):
    cfg = {j.key: _config(j.argv) for j in _jobs("mini", tmp_path) if j.kind == "pretrain"}
    assert [cfg[f"row{r}_s0_pretrain"].sm_ratio for r in ("3", "4", "5")] == [0.25, 0.0, 0.5]
    assert cfg["row2_s0_pretrain"].model.startswith("simmim_") and cfg["row6_s0_pretrain"].model.startswith("simmim_")
    assert cfg["row8a_s0_pretrain"].sampling == "random" and cfg["row8b_s0_pretrain"].sampling == "uniform"
    assert cfg["row8a_s0_pretrain"].sm_ratio == 0.0
    assert {c.unit_size for k, c in cfg.items() if not k.startswith("row8")} == {8}  # 16 px units at 128 px, halved
    assert cfg["row3_s1_pretrain"].seed == 1


def test_epoch_records__a_resumed_epoch_counts_once(tmp_path):
    lines = [{"epoch": 0, "train_loss": 2.0, "epoch_time_s": 10.0, "step": 3},
             {"epoch": 1, "step": 5, "loss": 1.0},  # a step record, not an epoch's
             {"epoch": 1, "train_loss": 1.5, "epoch_time_s": 99.0, "step": 6},  # killed after it, then redone:
             {"epoch": 1, "train_loss": 1.4, "epoch_time_s": 11.0, "step": 6}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    recs = mt._epoch_records(tmp_path)
    assert [r["epoch_time_s"] for r in recs] == [10.0, 11.0]


def test_markdown_table__two_seeds_give_their_mean_and_both_values():
    jobs = {"row3_s0_finetune": {"acc1": 40.0}, "row3_s1_finetune": {"acc1": 45.0}, "row5_s0_finetune": {"acc1": 41.25}}
    table = mt.markdown_table({"jobs": jobs})
    row3 = next(line for line in table.splitlines() if line.startswith("| 3 |"))
    assert "42.5 (40.0 / 45.0)" in row3
    assert "41.2" in next(line for line in table.splitlines() if line.startswith("| 5 |"))


@pytest.fixture
def tiny_folder(tmp_path):
    """Two classes, four photos each, in train/ and val/ (from the shared imagenette_mini)."""
    if not SHARED_MINI.is_dir():
        pytest.skip("../shared/data/imagenette_mini is not here")
    root = tmp_path / "tiny"
    for split in ("train", "val"):
        for cls in sorted(p.name for p in (SHARED_MINI / split).iterdir())[:2]:
            (root / split / cls).mkdir(parents=True)
            for f in sorted((SHARED_MINI / split / cls).iterdir())[:4]:
                shutil.copy(f, root / split / cls / f.name)
    return root


def _table(*extra, data, out, img):
    cmd = [sys.executable, str(ROOT / "experiments" / "minitable.py"), "--scale", "test", "--data", str(data),
           "--out", str(out), "--img", str(img), "--num-workers", "0", "--only", "3", "--no-budget", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True)


def test_table_run__stops_and_continues_without_redoing_a_finished_run(tiny_folder, tmp_path):
    out, img = tmp_path / "table", tmp_path / "img"
    first = _table("--max-jobs", "1", data=tiny_folder, out=out, img=img)
    assert first.returncode == 0, first.stderr[-2000:]
    done = json.loads((out / "results.json").read_text())["jobs"]
    assert list(done) == ["row3_s0_pretrain"]
    ckpt = out / "row3_s0_pretrain" / "checkpoint-last.pth"
    before = (ckpt.stat().st_mtime_ns, ckpt.read_bytes())
    assert done["row3_s0_pretrain"]["epochs"] == 2 and done["row3_s0_pretrain"]["peak_mem_mib"] > 0

    second = _table(data=tiny_folder, out=out, img=img)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "1 of 8 runs done, 7 to go" in second.stdout
    assert (ckpt.stat().st_mtime_ns, ckpt.read_bytes()) == before, "a finished pre-training run was run again"
    jobs = json.loads((out / "results.json").read_text())["jobs"]
    assert set(jobs) == {f"row3_s{s}_{k}" for s in (0, 1) for k in ("pretrain", "finetune", "linprobe", "knn")}
    assert all(0.0 <= jobs[f"row3_s{s}_{k}"]["acc1"] <= 100.0 for s in (0, 1) for k in ("finetune", "linprobe", "knn"))
    assert "| 3 | Swin, UM-MAE (US + SM 0.25) |" in (out / "table.md").read_text()
    assert (img / "minitable_test_budget.png").is_file() and (img / "minitable_test_sm_ratio.png").is_file()

    third = _table(data=tiny_folder, out=out, img=img)  # nothing left: no run starts
    assert third.returncode == 0 and "8 of 8 runs done, 0 to go" in third.stdout and "===" not in third.stdout


def test_table_run__two_processes_share_the_table_and_run_each_run_once(tiny_folder, tmp_path):
    out, img = tmp_path / "table", tmp_path / "img"
    cmd = [sys.executable, str(ROOT / "experiments" / "minitable.py"), "--scale", "test", "--data", str(tiny_folder),
           "--out", str(out), "--img", str(img), "--num-workers", "0", "--only", "3", "--no-budget"]  # fmt: skip
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    started = [line.split(":")[0][4:] for text, _ in outputs for line in text.splitlines() if line.startswith("=== ")]
    expected = {f"row3_s{s}_{k}" for s in (0, 1) for k in ("pretrain", "finetune", "linprobe", "knn")}
    assert sorted(started) == sorted(expected), "a run was started twice, or not at all"
    assert all(started.count(k) == 1 for k in expected)
    assert all("=== " in text for text, _ in outputs), "one process did nothing: the runs were not shared"
    assert set(json.loads((out / "results.json").read_text())["jobs"]) == expected  # none lost to the other's write


def test_table_run__refuses_another_scales_results(tiny_folder, tmp_path):
    out = tmp_path / "table"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"scale": "mini", "jobs": {}}))
    proc = _table(data=tiny_folder, out=out, img=tmp_path / "img")
    assert proc.returncode != 0 and "holds the 'mini' table, not 'test'" in proc.stderr


def test_table_run__a_missing_data_folder_is_one_line(tmp_path):
    proc = _table(data=tmp_path / "nowhere", out=tmp_path / "t", img=tmp_path / "img")
    assert proc.returncode == 2 and "needs a folder with train/ and val/" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("launch", "n"),
    [(sys.executable, 1), ("torchrun --nproc_per_node 8", 8), ("torchrun --nnodes=2 --nproc-per-node=4", 8),
     ("torchrun --nnodes 1:2 --nproc_per_node 4", 8)],
)  # fmt: skip
def test_world_size__the_processes_a_launcher_starts(launch, n):
    assert mt.world_size(launch.split()) == n


def test_pretrain_result__images_per_second_from_the_batch_the_run_used(tmp_path):
    """updates x per-process batch x accumulation x processes, over the summed epoch times."""
    (tmp_path / "config.yaml").write_text("batch_size: 16\naccum_iter: 2\n")
    recs = [{"epoch": e, "train_loss": 1.0, "epoch_time_s": 4.0, "step": 10 * (e + 1), "peak_mem_mib": 100.0 + e}
            for e in range(3)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = mt._pretrain_result(tmp_path, world_size=4)
    assert res["images_per_s"] == pytest.approx(30 * 16 * 2 * 4 / 12.0)
    assert res["cumulative_s"] == [4.0, 8.0, 12.0] and res["peak_mem_mib"] == 102.0 and res["epochs"] == 3
