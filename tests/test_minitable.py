"""experiments/minitable.py: the small-scale table's protocol (the same schedule and fine-tuning
recipe for every row, the paper's recipes at ``--scale paper``), commands the CLI accepts, and
a table run that stops and continues without redoing a finished run."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from _helpers import write_colour_dataset
from ummae.cli import COMMANDS, _parser
from ummae.config import resolve
from ummae.config.flags import config_from_args
from ummae.config.recipes import RECIPES
from ummae.data.sources import folder_samples

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


def _jobs(scale: str, tmp_path: Path, variant=None):
    return mt.plan(mt.SCALES[scale], tmp_path / "out", str(tmp_path / "data"), ["--num-workers", "2"], variant)


def _full_label(job) -> bool:
    """A run of the full-label table (not the sweep, not a few-label column)."""
    return job.part != "sweep" and not re.search(r"_f[0-9.]+_s", job.key)


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
    jobs = [j for j in _jobs(scale, tmp_path) if _full_label(j)]
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
        if job.kind not in ("pretrain", "finetune") or job.part == "sweep":
            continue
        cfg = _config(job.argv)
        recipe = RECIPES[job.argv[job.argv.index("--config") + 1]].values
        assert cfg.img_size == recipe["img_size"] and cfg.epochs == recipe["epochs"]
        assert cfg.model == recipe["model"], f"{job.key}: {cfg.model} is not the recipe's {recipe['model']}"
    sizes = {_config(j.argv).img_size for j in _jobs("paper", tmp_path) if j.kind in ("pretrain", "linprobe")}
    assert sizes == {224, 256}


def test_plan__rows_are_what_they_say(tmp_path):
    cfg = {j.key: _config(j.argv) for j in _jobs("mini", tmp_path) if j.kind == "pretrain"}
    assert [cfg[f"row{r}_s0_pretrain"].sm_ratio for r in ("3", "4", "5")] == [0.25, 0.0, 0.5]
    assert cfg["row2_s0_pretrain"].model.startswith("simmim_") and cfg["row6_s0_pretrain"].model.startswith("simmim_")
    assert cfg["row8a_s0_pretrain"].sampling == "random" and cfg["row8b_s0_pretrain"].sampling == "uniform"
    assert cfg["row8a_s0_pretrain"].sm_ratio == 0.0
    assert {c.unit_size for k, c in cfg.items() if not k.startswith("row8")} == {8}  # 16 px units at 128 px, halved
    assert cfg["row3_s1_pretrain"].seed == 1


def test_plan__the_sweep_every_lr_family_and_method_scored_on_held_out_training_images(tmp_path):
    scale = mt.SCALES["mini"]
    jobs = {j.key: j for j in _jobs("mini", tmp_path)}
    bank, held = mt.holdout_lists(tmp_path / "out")
    for family in scale.sweep.families:
        for method in scale.sweep.methods:
            for blr in scale.sweep.blrs:
                pre = _config(jobs[f"sweep_{family}_{method}_blr{blr:g}_pretrain"].argv)
                assert pre.blr == blr and pre.epochs == 10 and pre.data.endswith("/train")
                assert pre.model.startswith("simmim_" if method == "simmim" else "mae_")
                knn = _config(jobs[f"sweep_{family}_{method}_blr{blr:g}_knn"].argv)
                assert (knn.data, knn.val_data) == (str(bank), str(held))  # never the val split
                assert knn.pretrained.endswith(f"sweep_{family}_{method}_blr{blr:g}_pretrain/checkpoint-last.pth")
            # the row pre-trained with this method waits for the whole sweep and takes its lr
            row = jobs[f"row{mt.SWEEP_ROWS[family, method]}_s0_pretrain"]
            assert row.blr_from == (family, method)
            assert set(row.needs) == {f"sweep_{family}_{method}_blr{b:g}_knn" for b in scale.sweep.blrs}
    assert jobs["row8a_s0_pretrain"].blr_from is None  # ViT is not swept: the scale's blr


@pytest.mark.parametrize("variant", [None, "lowlr"])
def test_plan__few_labels_every_row_fraction_and_seed_on_the_full_val_split(tmp_path, variant):
    scale = mt.SCALES["mini"]
    jobs = {j.key: j for j in _jobs("mini", tmp_path, variant)}
    few_rows = [r for r in mt.ROWS if r.few]
    assert [r.id for r in few_rows] == ["1", "2", "3", "6", "7"]  # scratch / SimMIM / UM-MAE Swin, SimMIM / UM-MAE PVT
    assert set(scale.few.fractions) == {0.01, 0.1} and scale.few.seeds == (0, 1, 2)
    tried = variant if variant else None
    for row in few_rows:
        for fraction in scale.few.fractions:
            for seed in scale.few.seeds:
                for ev in ("finetune", "linprobe", "knn"):
                    key = f"row{row.id}_f{fraction * 100:g}_s{seed}_{ev}" + (
                        f"_v{tried}" if tried and ev == "finetune" else ""
                    )
                    cfg = _config(jobs[key].argv)
                    assert (cfg.label_fraction, cfg.label_seed) == (fraction, seed)
                    assert cfg.data == str(tmp_path / "data") and cfg.val_data is None  # evaluated on all of val/
                    if ev != "knn":
                        assert cfg.seed == seed
                    if row.method is not None:  # pre-trained once: every seed starts from seed 0's encoder
                        assert cfg.pretrained.endswith(f"row{row.id}_s0_pretrain/checkpoint-last.pth")
                    elif ev == "finetune":
                        assert cfg.pretrained is None
                    else:
                        assert cfg.pretrained.endswith(f"row1_s{seed}_init/checkpoint-last.pth")
                    if ev == "finetune" and tried:
                        assert cfg.lr == 1e-4  # the try's flags come last
    ft = _config(jobs["row2_f1_s0_finetune" + (f"_v{tried}" if tried else "")].argv)
    assert (ft.batch_size, ft.epochs) == (20, 100) and ft.model == "swin_nano_128"


def test_select__a_part_brings_the_runs_it_needs(tmp_path):
    jobs = _jobs("mini", tmp_path)
    few = mt.select(jobs, ("few",), "", False)
    keys = {j.key for j in few}
    assert {j.key for j in jobs if j.part == "sweep"} <= keys  # the swept lr comes first
    assert "row2_s1_pretrain" not in keys and "row8a_s0_finetune" not in keys
    assert {"row2_s0_finetune", "row2_s0_knn"} <= keys and "row2_s0_linprobe" not in keys  # 100 %: probe in "full"
    assert [j.key for j in few] == [j.key for j in jobs if j.key in keys]  # the plan's order
    assert {j.part for j in mt.select(jobs, ("sweep",), "", False)} == {"sweep"}


def test_chosen_blr__the_argmax_of_the_held_out_knn():
    sweep = mt.Sweep(blrs=(1e-4, 1e-3, 1e-2), pretrain=[])
    rng = __import__("random").Random(0)
    for _ in range(20):
        scores = {blr: rng.choice([20.0, 25.5, 31.0, 31.0]) for blr in sweep.blrs}
        jobs = {f"sweep_pvt_ummae_blr{b:g}_knn": {"acc1": a} for b, a in scores.items()}
        best = max(scores.values())
        assert mt.chosen_blr(jobs, sweep, "pvt", "ummae") == min(b for b, a in scores.items() if a == best)
        assert mt.chosen_blr(jobs, sweep, "pvt", "simmim") is None  # another method's sweep
        del jobs["sweep_pvt_ummae_blr0.001_knn"]
        assert mt.chosen_blr(jobs, sweep, "pvt", "ummae") is None  # not every lr done yet


def test_command__a_swept_row_pretrains_at_the_chosen_lr(tmp_path):
    scale = mt.SCALES["mini"]
    job = next(j for j in _jobs("mini", tmp_path) if j.key == "row3_s0_pretrain")
    assert "<swept: swin ummae>" in mt.command(job, scale, {})
    done = {
        f"sweep_swin_ummae_blr{b:g}_knn": {"acc1": a} for b, a in zip(scale.sweep.blrs, (30.0, 28.0, 35.5), strict=True)
    }
    assert _config(mt.command(job, scale, done)).blr == scale.sweep.blrs[2]


def test_write_holdout_lists__a_class_balanced_tenth_held_out_once(tmp_path):
    write_colour_dataset(tmp_path / "d", train_per_class=20, val_per_class=1)
    train = tmp_path / "d" / "train"
    sweep = mt.SCALES["mini"].sweep
    assert mt.write_holdout_lists(sweep, train, tmp_path / "o") == (54, 6)
    bank, held = (path.read_text().splitlines() for path in mt.holdout_lists(tmp_path / "o"))
    samples, _, names = folder_samples(str(train))
    every = {f"{Path(p).relative_to(train).as_posix()} {label}" for p, label in samples}
    assert set(bank) | set(held) == every and not set(bank) & set(held)
    assert sorted(line.split("/")[0] for line in held) == sorted(names * 2)  # 2 of each class's 20
    mt.write_holdout_lists(sweep, train, tmp_path / "again")
    assert (tmp_path / "again" / "heldout" / "holdout.txt").read_text().splitlines() == held


def test_mean_std__the_seeds_mean_and_sample_standard_deviation():
    for values in ([40.0, 45.0], [31.2, 33.4, 30.0], [50.0, 50.0, 50.0]):
        assert mt.mean_std(values, 3) == f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" + (
            " (2 of 3)" if len(values) == 2 else "")  # fmt: skip
    assert mt.mean_std([41.25]) == "41.2" and mt.mean_std([]) == "-"


def test_few_label_table__mean_sd_per_cell_and_every_try_kept():
    scale = mt.SCALES["mini"]
    jobs = {}
    for seed, acc in zip(scale.few.seeds, (30.0, 32.0, 34.0), strict=True):
        jobs[f"row3_f1_s{seed}_finetune"] = {"acc1": acc, "best_acc1": acc + 1}
        jobs[f"row3_f1_s{seed}_finetune_vlowlr"] = {"acc1": acc - 10, "best_acc1": acc - 9}
        jobs[f"row3_f10_s{seed}_knn"] = {"acc1": acc + 5}
    table = mt.few_label_table({"jobs": jobs}, scale)
    row3 = next(line for line in table.splitlines() if line.startswith("| 3 |"))
    assert "| 32.0 ± 2.0 (33.0 ± 2.0) |" in row3 and "| 37.0 ± 2.0 |" in row3
    tried = mt.few_label_table({"jobs": jobs}, scale, "lowlr")
    assert "| 22.0 ± 2.0 (23.0 ± 2.0) |" in next(line for line in tried.splitlines() if line.startswith("| 3 |"))
    tries = mt.tries_table({"jobs": jobs}, scale).splitlines()
    assert any(line.startswith("| base (the table) | 3 | 32.0 ± 2.0 |") for line in tries)
    assert any(line.startswith("| lowlr (--lr 1e-4) | 3 | 22.0 ± 2.0 |") for line in tries)
    assert "1 % †" in table and "100 % kNN †" in table  # no counterpart in the paper: ours
    # table.md names the try whose fine-tuning cells it shows; the first try's is unnamed
    assert "val top-1; fine-tuning: try lowlr)" in mt.report({"jobs": jobs}, scale, "lowlr")
    assert "try" not in mt.report({"jobs": jobs}, scale, "base").split("## Few labels")[1].splitlines()[0]


def test_plots__a_plot_without_its_runs_leaves_the_file_there(tmp_path):
    """The default parts have no budget points and no SM-ratio rows: their plots (the
    full-label table's figures) must stay as they are, only the few-label plot is written."""
    scale, few_only = mt.SCALES["mini"], {}
    for seed in scale.few.seeds:
        few_only[f"row3_f1_s{seed}_finetune"] = {"acc1": 30.0 + seed, "best_acc1": 31.0}
    kept = tmp_path / "minitable_mini_budget.png"
    kept.write_bytes(b"the full-label table's figure")
    written = mt.plots({"jobs": few_only}, tmp_path, "mini", scale)
    assert [p.name for p in written] == ["minitable_mini_few_labels.png"]
    assert kept.read_bytes() == b"the full-label table's figure"
    assert not (tmp_path / "minitable_mini_sm_ratio.png").exists()
    with_budget = {**few_only, "row2_s0_pt10_knn": {"acc1": 20.0}, "row4_s0_knn": {"acc1": 21.0}}
    names = {p.name for p in mt.plots({"jobs": with_budget}, tmp_path, "mini", scale)}
    assert names == {"minitable_mini_budget.png", "minitable_mini_sm_ratio.png", "minitable_mini_few_labels.png"}
    assert kept.read_bytes() != b"the full-label table's figure"


@pytest.mark.parametrize("world", [1, 8, 64])
def test_plan__paper_scale_probe_is_maes_total_batch_split_over_the_processes(tmp_path, world):
    for job in (j for j in _jobs("paper", tmp_path) if j.kind == "linprobe" and _full_label(j)):
        cfg, _ = resolve(_config(job.argv), world)
        assert cfg.batch_size * cfg.accum_iter * world == 16384
        assert cfg.effective_lr(world) == pytest.approx(0.1 * 16384 / 256)  # MAE: blr 0.1, lr 6.4
        assert (cfg.epochs, cfg.warmup_epochs, cfg.weight_decay) == (90, 10, 0.0)


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


def _table(*extra, data, out, img, parts="few"):
    cmd = [sys.executable, str(ROOT / "experiments" / "minitable.py"), "--scale", "test", "--data", str(data),
           "--out", str(out), "--img", str(img), "--num-workers", "0", "--only", "3", "--no-budget", "--parts", parts,
           *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True)


def _planned(parts: tuple[str, ...], tmp_path: Path) -> list[str]:
    return [j.key for j in mt.select(_jobs("test", tmp_path), parts, "3", True)]


def test_table_run__stops_and_continues_without_redoing_a_finished_run(tiny_folder, tmp_path):
    out, img = tmp_path / "table", tmp_path / "img"
    planned = _planned(("few",), tmp_path)
    first = _table("--max-jobs", "1", data=tiny_folder, out=out, img=img)
    assert first.returncode == 0, first.stderr[-2000:]
    done = json.loads((out / "results.json").read_text())["jobs"]
    assert list(done) == ["sweep_swin_ummae_blr0.001_pretrain"] == planned[:1]
    ckpt = out / "sweep_swin_ummae_blr0.001_pretrain" / "checkpoint-last.pth"
    before = (ckpt.stat().st_mtime_ns, ckpt.read_bytes())
    assert done["sweep_swin_ummae_blr0.001_pretrain"]["peak_mem_mib"] > 0

    second = _table(data=tiny_folder, out=out, img=img)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"1 of {len(planned)} runs done, {len(planned) - 1} to go" in second.stdout
    assert (ckpt.stat().st_mtime_ns, ckpt.read_bytes()) == before, "a finished pre-training run was run again"
    jobs = json.loads((out / "results.json").read_text())["jobs"]
    assert set(jobs) == set(planned)
    assert all(0.0 <= v["acc1"] <= 100.0 for k, v in jobs.items() if not k.endswith(("_pretrain", "_init")))
    # the row pre-trained at the lr its held-out kNN chose, and the few-label runs on their recorded subsets
    chosen = mt.chosen_blr(jobs, mt.SCALES["test"].sweep, "swin", "ummae")
    cmd = jobs["row3_s0_pretrain"]["command"]
    assert chosen is not None and cmd[len(cmd) - 1 - cmd[::-1].index("--blr") + 1] == f"{chosen:g}"
    for seed in (0, 1):
        lines = (out / f"row3_f50_s{seed}_finetune" / "label_subset.txt").read_text().splitlines()
        assert sorted(Counter(line.split("/")[0] for line in lines).values()) == [2, 2]  # half of 2 x 4, balanced
    table = (out / "table.md").read_text()
    assert (
        "## Pre-training lr sweep" in table
        and "## Few labels" in table
        and "| 3 | Swin, UM-MAE (US + SM 0.25) |" in table
    )
    assert (img / "minitable_test_few_labels.png").is_file()
    assert (img / "minitable_test_budget.png").is_file() == any("_pt" in key for key in planned)

    third = _table(data=tiny_folder, out=out, img=img)  # nothing left: no run starts
    assert third.returncode == 0 and f"{len(planned)} of {len(planned)} runs done, 0 to go" in third.stdout
    assert "===" not in third.stdout


def test_table_run__two_processes_share_the_table_and_run_each_run_once(tiny_folder, tmp_path):
    out, img = tmp_path / "table", tmp_path / "img"
    cmd = [sys.executable, str(ROOT / "experiments" / "minitable.py"), "--scale", "test", "--data", str(tiny_folder),
           "--out", str(out), "--img", str(img), "--num-workers", "0", "--only", "3", "--no-budget", "--parts", "full"]  # fmt: skip
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    started = [line.split(":")[0][4:] for text, _ in outputs for line in text.splitlines() if line.startswith("=== ")]
    expected = set(_planned(("full",), tmp_path)) - {k for k in _planned(("full",), tmp_path) if k.endswith("_init")}
    assert {"row3_s1_pretrain", "row3_s1_finetune", "sweep_swin_ummae_blr0.01_knn"} <= expected
    assert sorted(started) == sorted(expected), "a run was started twice, or not at all"
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
