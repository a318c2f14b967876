"""The paper's claim at small scale, as one resumable table: UM-MAE vs SimMIM vs no
pre-training, with few labels and every label, each method pre-trained at the lr a held-out
sweep chose, with the ablations (Secondary Masking and its ratio, uniform vs random sampling).

    python experiments/minitable.py                       # the CPU table on imagenette_mini (parts sweep, few)
    python experiments/minitable.py --parts full          # ... and the rest of the full-label table
    python experiments/minitable.py --variant lowlr       # another few-label fine-tuning try, kept beside the first
    python experiments/minitable.py --scale paper --data /data/imagenet --out runs/table_in1k
    python experiments/minitable.py --dry-run             # the ummae commands, one per line
    python experiments/minitable.py --scale paper --data /data/imagenet --launch "torchrun --nproc_per_node 8"

Every cell is an ``ummae`` run (pretrain, finetune, linprobe, knn) with ``--resume auto`` in its
own folder under ``--out``; a finished run's figures go into ``--out/results.json`` at once, so
a table run that stops (killed, machine gone) continues with the run it was in, from that run's
last checkpoint, and never redoes a finished one. At the end (and after every run) the markdown
tables are written to ``--out/table.md`` and the plots to ``--img``. Several table processes may
share ``--out`` (one per GPU: ``CUDA_VISIBLE_DEVICES=1 python experiments/minitable.py ...``, or
two on a CPU whose cores one run does not fill): each takes the next run that no other one holds
(a lock file per run) and whose inputs are there (weights, the sweep's choice), and adds its
figures to ``results.json`` under a lock.

The parts (``--parts``; the runs a part needs come along):
- ``sweep``: per method (SimMIM, UM-MAE) and family (Swin, PVT), a short pre-training at each of
  three base lrs, scored by kNN top-1 on a class-balanced tenth of the training images held out
  of the bank (never val); the best lr feeds every row of that method and family.
- ``few``: rows 1 (no pre-training), 2, 3 (Swin SimMIM / UM-MAE), 6, 7 (PVT SimMIM / UM-MAE),
  pre-trained once on every training image (labels unused), then fine-tuned, probed and kNN'd on
  1 % and 10 % of the labels (``--label-fraction``: class-balanced subsets, one per seed, 3
  seeds; mean ± sd), evaluated on the full val split, and the same with every label (seed 0).
  The few-label fine-tuning tries (``--variant``) are kept side by side.
- ``full``: the rest of the full-label table: 4 UM-MAE SM 0 (US only), 5 UM-MAE SM 0.5 on
  Swin; 8 MAE random sampling and UM on ViT; rows 1-3's second seed; the budget curve (rows 2
  and 3 fine-tuned from their checkpoints after fewer pre-training epochs).

Scales: ``mini`` (the CPU table, docs/experiments.md) changes the recipes' sizes only, the same
way for every row: 64 px inputs with 8 px mask units (the 128 px / 16 px geometry halved), 30
pre-training epochs at batch 128 (the sweep: 10), fine-tuning 12 epochs at batch 128 without
Mixup / CutMix (a 12-epoch schedule on 4,000 images does not learn under them), linear probe 20
epochs at batch 256; few labels at about 200 optimiser steps a run (``_MINI_FEW``). ``paper`` is
the recipes as they are: Swin-T / PVT-S at 256 px, ViT-B at 224 px, 200 pre-training epochs,
100 fine-tuning epochs, MAE's 90-epoch linear probe at its total batch 16384 (the family's
``*_in1k_linprobe`` recipe, split over the processes), on the ImageNet-1k folder ``--data``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ummae.data.sources import folder_samples
from ummae.data.subset import balanced_subset, subset_lines

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class FewLabels:
    """The few-label columns: each fraction's fine-tuning and probing sizes (a subset of 40
    images needs a smaller batch and more epochs than one of 4,000), the seeds (each draws its
    own subset and trains with its own seed), and the fine-tuning tries (``--variant``)."""

    fractions: dict[float, dict[str, list[str]]]  # fraction -> {"finetune": flags, "linprobe": flags}
    seeds: tuple[int, ...] = (0, 1, 2)
    # name -> flags added to every few-label fine-tuning; the first is the table's, the others are
    # tries (`--variant NAME`) whose results are kept beside it, never overwritten
    variants: dict[str, list[str]] = field(default_factory=lambda: {"base": []})
    # the 100 % column's measures that part "few" runs (seed 0); the others come with part "full"
    full_label: tuple[str, ...] = ("finetune", "linprobe", "knn")


@dataclass(frozen=True)
class Sweep:
    """The pre-training lr sweep: a short run per base lr, method and family, the lr chosen
    by kNN top-1 on images held out of the training split (never val)."""

    blrs: tuple[float, ...]
    pretrain: list[str]  # flags after the scale's pre-training flags: the short schedule
    families: tuple[str, ...] = ("swin", "pvt")
    methods: tuple[str, ...] = ("simmim", "ummae")
    holdout: float = 0.1  # the class-balanced share of the training images held out
    holdout_seed: int = 0


@dataclass(frozen=True)
class Scale:
    """The sizes of one version of the table; everything else comes from the recipes."""

    data: str
    families: dict[str, dict[str, str]]  # family -> the models that replace the recipes' (mae, simmim, classifier)
    pretrain: list[str]  # flags added to every pre-training run
    finetune: list[str]  # ... to every fine-tuning run
    linprobe: list[str]
    knn: list[str]
    budget_epochs: tuple[int, ...]  # fewer pre-training epochs for the budget curve
    sweep: Sweep
    few: FewLabels
    parts: tuple[str, ...]  # the parts (PARTS) a table run runs unless --parts says otherwise
    img_size: int | None = None  # input size of every run (None: the recipe's / the model's)
    unit_size: int | None = None  # mask unit of the pyramid rows (None: the recipe's)

    def size_flags(self) -> list[str]:
        return ["--img-size", str(self.img_size)] if self.img_size else []

    def model_args(self) -> dict:
        """Options of the untrained pre-training model (row 1's encoder): the runs' sizes."""
        return {k: v for k, v in (("img_size", self.img_size), ("unit_size", self.unit_size)) if v}


# The parts of the table: the lr sweep; the few-label table (its rows' pre-training, 1 % / 10 %
# of the labels x seeds, and the 100 % column with one seed); the rest of the full-label table
# (second seeds, the SM-ratio and ViT rows, the budget curve).
PARTS = ("sweep", "few", "full")

# The recipes (`ummae recipes`) each family's rows start from, at every scale.
FAMILY_RECIPES = {
    "swin": dict(ummae="swin_tiny_ummae_in1k", simmim="swin_tiny_simmim_in1k", finetune="swin_tiny_ummae_in1k_finetune",
                 linprobe="swin_tiny_in1k_linprobe"),
    "pvt": dict(ummae="pvt_small_ummae_in1k", simmim="pvt_small_simmim_in1k", finetune="pvt_small_ummae_in1k_finetune",
                linprobe="pvt_small_in1k_linprobe"),
    "vit": dict(ummae="vit_base_ummae_in1k", mae="vit_base_mae_in1k", finetune="vit_base_ummae_in1k_finetune",
                linprobe="vit_base_in1k_linprobe"),
}  # fmt: skip
# Few labels at the CPU scale: the fine-tuning lr is the full-label column's (blr 5e-4 at batch 128:
# lr 2.5e-4), held fixed: the scaling rule would give 3.9e-5 at batch 20, under which a 1 % run's
# loss barely moves (2.30 -> 2.20 in 200 steps, 18 % top-1); about 200 optimiser steps per run.
_MINI_FEW = FewLabels(
    fractions={
        0.01: {"finetune": ["--epochs", "100", "--warmup-epochs", "10", "--batch-size", "20", "--lr", "2.5e-4",
                            "--eval-every", "50"],
               "linprobe": ["--epochs", "100", "--warmup-epochs", "10", "--batch-size", "20", "--eval-every", "50"]},
        0.1: {"finetune": ["--epochs", "30", "--warmup-epochs", "3", "--batch-size", "64", "--lr", "2.5e-4",
                           "--eval-every", "10"],
              "linprobe": ["--epochs", "20", "--warmup-epochs", "2", "--batch-size", "64", "--eval-every", "10"]},
    },
    variants={
        "base": [],
        "lowlr": ["--lr", "1e-4"],  # keep more of the pre-trained features
        "ld065": ["--layer-decay", "0.65"],  # the lower layers train at a smaller share of the lr
    },
    full_label=("finetune", "knn"),  # the 100 % probe (18 min of the 3 h) comes with part "full"
)  # fmt: skip
SCALES = {
    "mini": Scale(
        data=str(HERE.parent.parent / "shared" / "data" / "imagenette_mini"),
        families={
            "swin": dict(mae="mae_swin_nano_128", simmim="simmim_swin_nano_128", classifier="swin_nano_128"),
            "pvt": dict(mae="mae_pvt_nano_128", simmim="simmim_pvt_nano_128", classifier="pvt_nano_128"),
            "vit": dict(mae="mae_vit_nano_patch8_64", classifier="vit_nano_patch8_64"),
        },
        pretrain=["--epochs", "30", "--warmup-epochs", "3", "--batch-size", "128", "--accum-iter", "1",
                  "--blr", "1.5e-3", "--keep-every", "10", "--vis-every", "0"],
        finetune=["--epochs", "12", "--warmup-epochs", "2", "--batch-size", "128", "--accum-iter", "1",
                  "--mixup", "0", "--cutmix", "0", "--eval-every", "4", "--keep-every", "0"],
        linprobe=["--epochs", "20", "--warmup-epochs", "2", "--batch-size", "256", "--accum-iter", "1", "--lr", "6.4",
                  "--eval-every", "5", "--keep-every", "0"],
        knn=[],
        budget_epochs=(10, 20),
        sweep=Sweep(blrs=(5e-4, 1.5e-3, 4.5e-3), pretrain=["--epochs", "10", "--warmup-epochs", "1", "--keep-every", "0"]),
        few=_MINI_FEW,
        parts=("sweep", "few"),
        img_size=64,
        unit_size=8,
    ),
    "paper": Scale(
        data="",  # --data: an ImageNet-1k root with train/ and val/
        families={
            "swin": dict(mae="mae_swin_tiny_256", simmim="simmim_swin_tiny_256", classifier="swin_tiny_256"),
            "pvt": dict(mae="mae_pvt_small_256", simmim="simmim_pvt_small_256", classifier="pvt_small_256"),
            "vit": dict(mae="mae_vit_base_patch16_dec512d2b", classifier="vit_base_patch16"),
        },
        pretrain=["--keep-every", "50"],
        finetune=[],
        linprobe=[],  # the family's linear-probe recipe: MAE's total batch 16384, split over the processes
        knn=[],
        budget_epochs=(50, 100),
        sweep=Sweep(blrs=(7.5e-5, 1.5e-4, 3e-4), pretrain=["--epochs", "50", "--warmup-epochs", "5", "--keep-every", "0"]),
        # 12,811 / 128,116 images: a probe's total batch of 16384 would be more than the subset
        few=FewLabels(fractions={
            0.01: {"finetune": [], "linprobe": ["--batch-size", "128", "--accum-iter", "1"]},
            0.1: {"finetune": [], "linprobe": ["--batch-size", "512", "--accum-iter", "1"]},
        }),
        parts=PARTS,
    ),
    # A few seconds a run: the test of this script (tests/test_minitable.py), on tiny images.
    "test": Scale(
        data="",
        families={
            "swin": dict(mae="mae_swin_test", simmim="simmim_swin_test", classifier="swin_test"),
            "pvt": dict(mae="mae_pvt_test", simmim="simmim_pvt_test", classifier="pvt_test"),
            "vit": dict(mae="mae_vit_test", classifier="vit_test"),
        },
        pretrain=["--epochs", "2", "--warmup-epochs", "0", "--batch-size", "4", "--accum-iter", "1", "--keep-every",
                  "1", "--vis-every", "0"],
        finetune=["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", "--accum-iter", "1", "--mixup", "0",
                  "--cutmix", "0", "--keep-every", "0"],
        linprobe=["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", "--accum-iter", "1", "--keep-every",
                  "0"],
        knn=["--k", "2"],
        budget_epochs=(1,),
        sweep=Sweep(blrs=(1e-3, 1e-2), pretrain=["--epochs", "1"], families=("swin",), holdout=0.25),
        few=FewLabels(fractions={0.5: {"finetune": ["--batch-size", "2"], "linprobe": ["--batch-size", "2"]}},
                      seeds=(0, 1), variants={"base": [], "lowlr": ["--lr", "1e-4"]}),
        parts=PARTS,
        img_size=64,
        unit_size=8,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One row of the table: an encoder family, how it is pre-trained (None: not at all), the
    pre-training options that make the row, what is measured after it with every label, its
    seeds, whether it has the few-label columns, and whether the paper has no counterpart."""

    id: str
    label: str
    family: str
    method: str | None  # "ummae", "simmim", "mae" (random sampling) or None
    options: tuple[str, ...] = ()
    evals: tuple[str, ...] = ("finetune",)
    seeds: tuple[int, ...] = (0,)
    few: bool = False
    ours: bool = False  # no counterpart in the paper or the reference


ROWS = [
    Row("1", "Swin, no pre-training", "swin", None, evals=("finetune", "linprobe", "knn"), seeds=(0, 1), few=True,
        ours=True),
    Row("2", "Swin, SimMIM", "swin", "simmim", evals=("finetune", "linprobe", "knn"), seeds=(0, 1), few=True),
    Row("3", "Swin, UM-MAE (US + SM 0.25)", "swin", "ummae", ("--sm-ratio", "0.25"),
        evals=("finetune", "linprobe", "knn"), seeds=(0, 1), few=True),
    Row("4", "Swin, UM-MAE SM 0 (US only)", "swin", "ummae", ("--sm-ratio", "0"), evals=("finetune", "linprobe", "knn"),
        ours=True),
    Row("5", "Swin, UM-MAE SM 0.5", "swin", "ummae", ("--sm-ratio", "0.5"), ours=True),
    Row("6", "PVT, SimMIM", "pvt", "simmim", evals=("finetune", "linprobe", "knn"), few=True),
    Row("7", "PVT, UM-MAE (US + SM 0.25)", "pvt", "ummae", ("--sm-ratio", "0.25"),
        evals=("finetune", "linprobe", "knn"), few=True),
    Row("8a", "ViT, MAE random sampling", "vit", "mae"),
    Row("8b", "ViT, UM (US + SM 0.25)", "vit", "ummae", ("--sm-ratio", "0.25")),
]  # fmt: skip
BUDGET_ROWS = ("2", "3")  # fine-tuned (and kNN) after fewer pre-training epochs, seed 0
OURS_COLUMNS = ("kNN", "1 %", "10 %")  # headers of columns without a counterpart in the paper


@dataclass
class Job:
    key: str  # its name in results.json, and its folder under --out
    kind: str  # "init", "pretrain", "finetune", "linprobe", "knn"
    argv: list[str]  # the ummae command line (for "init": the model to save untrained)
    row: str
    seed: int
    part: str = "full"  # the part of the table (PARTS) it belongs to
    weights: str | None = None  # the pre-training checkpoint it starts from
    needs: tuple[str, ...] = ()  # the runs that must be done first (its weights, its swept lr)
    blr_from: tuple[str, str] | None = None  # (family, method): pre-trained at the sweep's lr


def _pretrain_argv(row: Row, scale: Scale, seed: int, out: Path, data: str, workers: list[str]) -> list[str]:
    fam = scale.families[row.family]
    recipe = FAMILY_RECIPES[row.family][row.method]
    model = fam["simmim"] if row.method == "simmim" else fam["mae"]
    argv = ["pretrain", "--config", recipe, "--model", model, "--data", f"{data}/train", *scale.size_flags(),
            *scale.pretrain]  # fmt: skip
    if scale.unit_size and row.family != "vit":  # ViT masks its own patches
        argv += ["--unit-size", str(scale.unit_size)]
    return [*argv, *row.options, "--seed", str(seed), *workers, "--output", str(out)]


# --- the lr sweep -------------------------------------------------------------------------------
SWEEP_ROWS = {("swin", "simmim"): "2", ("swin", "ummae"): "3", ("pvt", "simmim"): "6", ("pvt", "ummae"): "7"}


def _sweep_key(family: str, method: str, blr: float) -> str:
    return f"sweep_{family}_{method}_blr{blr:g}"


def holdout_lists(out: Path) -> tuple[Path, Path]:
    """The list files of the sweep's kNN: the bank (the training images not held out) and the
    held-out images it is scored on."""
    return out / "heldout" / "bank.txt", out / "heldout" / "holdout.txt"


def write_holdout_lists(sweep: Sweep, train: Path, out: Path) -> tuple[int, int]:
    """Hold the sweep's class-balanced share of the training images out (drawn once, by
    :func:`ummae.data.subset.balanced_subset`); write its list and the rest's. Returns their sizes."""
    samples, _, names = folder_samples(str(train))
    held = set(balanced_subset(samples, names, sweep.holdout, sweep.holdout_seed, "held-out split"))
    bank_path, held_path = holdout_lists(out)
    bank_path.parent.mkdir(parents=True, exist_ok=True)
    for path, keep in ((bank_path, [i for i in range(len(samples)) if i not in held]), (held_path, sorted(held))):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in subset_lines(samples, keep)))
        os.replace(tmp, path)  # a table run killed here leaves whole lists or none
    return len(samples) - len(held), len(held)


def sweep_jobs(scale: Scale, out: Path, data: str, workers: list[str]) -> list[Job]:
    """A short pre-training per (family, method, base lr) and its held-out kNN, lr by lr so that
    a table cut short has every method at its first lrs."""
    jobs = []
    bank, held = holdout_lists(out)
    for blr in scale.sweep.blrs:
        for family in scale.sweep.families:
            for method in scale.sweep.methods:
                row = next(r for r in ROWS if r.id == SWEEP_ROWS[family, method])
                key = _sweep_key(family, method, blr)
                folder = out / f"{key}_pretrain"
                argv = _pretrain_argv(row, scale, 0, folder, data, workers)
                argv[argv.index("--seed") : argv.index("--seed")] = [*scale.sweep.pretrain, "--blr", f"{blr:g}"]
                jobs.append(Job(f"{key}_pretrain", "pretrain", argv, row.id, 0, "sweep"))
                ckpt = str(folder / "checkpoint-last.pth")
                knn = ["knn", "--model", scale.families[family]["classifier"], "--data", str(bank), "--val-data",
                       str(held), "--data-root", f"{data}/train", *scale.size_flags(), *scale.knn, "--pretrained",
                       ckpt, *workers]  # fmt: skip
                jobs.append(Job(f"{key}_knn", "knn", knn, row.id, 0, "sweep", ckpt, (f"{key}_pretrain",)))
    return jobs


def chosen_blr(jobs: dict, sweep: Sweep, family: str, method: str) -> float | None:
    """The sweep's base lr for ``method`` on ``family``: the highest held-out kNN top-1 (the
    lowest lr among equals); None until every lr of the sweep has its kNN."""
    scores = [(jobs.get(f"{_sweep_key(family, method, blr)}_knn", {}).get("acc1"), blr) for blr in sweep.blrs]
    if any(acc is None for acc, _ in scores):
        return None
    return max(scores, key=lambda s: (s[0], -s[1]))[1]


# --- the plan -----------------------------------------------------------------------------------
def plan(scale: Scale, out: Path, data: str, workers: list[str], variant: str | None = None) -> list[Job]:
    """Every run of the table, in the order it runs: the lr sweep; the few-label rows' encoders
    (pre-trained once, seed 0; row 1's untrained one per seed), their 1 % / 10 % columns seed
    by seed (a table cut short still compares the methods) and their 100 % column; then the
    rest of the full-label table (second seeds, the ablation rows, the budget curve).
    ``variant``: the few-label fine-tuning try (default: the first of ``scale.few.variants``)."""
    variant = variant or next(iter(scale.few.variants))
    encoders, few, full_labels, later, budget = [], [], [], [], []
    for row in ROWS:
        swept = row.family in scale.sweep.families and row.method in scale.sweep.methods
        blr_from = (row.family, row.method) if swept else None
        sweep_knns = tuple(f"{_sweep_key(row.family, row.method, b)}_knn" for b in scale.sweep.blrs) if swept else ()
        for seed in sorted({*row.seeds, *(scale.few.seeds if row.few else ())}):
            part = "few" if row.few and seed == 0 else "full"
            own = encoders if part == "few" else later
            weights = None
            if row.method is None:
                weights = str(out / f"row{row.id}_s{seed}_init" / "checkpoint-last.pth")
                if row.few or ({"linprobe", "knn"} & set(row.evals) and seed in row.seeds):
                    init_part = "few" if row.few else part  # every few-label seed probes its own
                    init = Job(f"row{row.id}_s{seed}_init", "init", [scale.families[row.family]["mae"]], row.id, seed,
                               init_part)  # fmt: skip
                    (encoders if init_part == "few" else own).append(init)
            elif seed in row.seeds:
                pt = f"row{row.id}_s{seed}_pretrain"
                weights = str(out / pt / "checkpoint-last.pth")
                argv = _pretrain_argv(row, scale, seed, out / pt, data, workers)
                own.append(Job(pt, "pretrain", argv, row.id, seed, part, needs=sweep_knns, blr_from=blr_from))
            if seed in row.seeds:
                for ev in row.evals:
                    from_weights = ev != "finetune" or row.method is not None
                    ev_part = part if ev in scale.few.full_label else "full"
                    job = _eval_job(f"row{row.id}_s{seed}_{ev}", ev, row.family, scale, seed, out, data, workers,
                                    weights if from_weights else None, row.id, ev_part)  # fmt: skip
                    (full_labels if ev_part == "few" else later).append(job)
            if row.few:  # pre-trained once: every seed's subset starts from the seed-0 encoder
                start = weights if row.method is None else str(out / f"row{row.id}_s0_pretrain" / "checkpoint-last.pth")
                few += _few_jobs(row, scale, seed, out, data, workers, start, variant)
    few.sort(key=lambda job: job.seed)  # seed by seed: every row and fraction at seed 0 first
    # The budget curve by pre-training epochs first, then row, kNN first: a table cut short has
    # both methods at its first point.
    for n in scale.budget_epochs:
        for row in (r for r in ROWS if r.id in BUDGET_ROWS):
            ckpt = str(out / f"row{row.id}_s0_pretrain" / f"checkpoint-{n - 1}.pth")
            for ev in ("knn", "finetune"):
                key = f"row{row.id}_s0_pt{n}_{ev}"
                budget.append(_eval_job(key, ev, row.family, scale, 0, out, data, workers, ckpt, row.id, "full"))
    return sweep_jobs(scale, out, data, workers) + encoders + few + full_labels + later + budget


def few_key(row_id: str, fraction: float, seed: int, ev: str, variant: str | None = None) -> str:
    """``row2_f1_s0_finetune``: row 2, 1 % of the labels, seed 0; a fine-tuning try other than
    the first variant adds ``_vNAME``."""
    return f"row{row_id}_f{fraction * 100:g}_s{seed}_{ev}" + (f"_v{variant}" if variant else "")


def _few_jobs(row, scale, seed, out, data, workers, weights, variant) -> list[Job]:
    """Row ``row``'s few-label runs with ``seed``: per fraction, the fine-tuning (of the try
    ``variant``), the probe and the kNN on the subset ``--label-seed seed`` draws."""
    jobs = []
    first_variant = next(iter(scale.few.variants))
    for fraction, flags in scale.few.fractions.items():
        subset = ["--label-fraction", f"{fraction:g}", "--label-seed", str(seed)]
        for ev in ("finetune", "linprobe", "knn"):
            tried = variant if ev == "finetune" and variant != first_variant else None
            key = few_key(row.id, fraction, seed, ev, tried)
            extra = [*subset, *flags.get(ev, []), *(scale.few.variants[variant] if ev == "finetune" else [])]
            from_weights = ev != "finetune" or row.method is not None
            jobs.append(_eval_job(key, ev, row.family, scale, seed, out, data, workers,
                                  weights if from_weights else None, row.id, "few", extra))  # fmt: skip
    return jobs


def _eval_job(key, ev, family, scale, seed, out, data, workers, weights, row_id, part, extra=()) -> Job:
    classifier = scale.families[family]["classifier"]
    recipe = {"finetune": FAMILY_RECIPES[family]["finetune"], "linprobe": FAMILY_RECIPES[family]["linprobe"]}
    config = ["--config", recipe[ev]] if ev in recipe else []
    argv = [ev, *config, "--model", classifier, "--data", data, *scale.size_flags(), *getattr(scale, ev), *extra]
    if ev != "knn":
        argv += ["--seed", str(seed), "--output", str(out / key)]
    if weights:
        argv += ["--pretrained", weights]
    argv += workers
    needs = (Path(weights).parent.name,) if weights else ()
    return Job(key, ev, argv, row_id, seed, part, weights, needs)


# --- running and reading the runs ---------------------------------------------------------------
def _epoch_records(folder: Path) -> list[dict]:
    """The last record of each epoch in ``metrics.jsonl`` (a resumed run may repeat one)."""
    by_epoch: dict[int, dict] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train_loss" in rec:
            by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def _pretrain_result(folder: Path, world_size: int) -> dict:
    recs = _epoch_records(folder)
    wall = sum(r["epoch_time_s"] for r in recs)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())  # the batch the run used (a recipe splits its own)
    images = recs[-1]["step"] * cfg["batch_size"] * cfg["accum_iter"] * world_size  # updates x images per update
    return {
        "epochs": len(recs),
        "wall_s": wall,
        "cumulative_s": [sum(r["epoch_time_s"] for r in recs[: i + 1]) for i in range(len(recs))],
        "images_per_s": images / wall,
        "peak_mem_mib": max(r.get("peak_mem_mib", 0.0) for r in recs),
        "final_loss": recs[-1]["train_loss"],
    }


def _classify_result(folder: Path) -> dict:
    epochs = _epoch_records(folder)
    recs = [r for r in epochs if "acc1" in r]
    return {"acc1": recs[-1]["acc1"], "best_acc1": max(r["acc1"] for r in recs),
            "curve": [[r["epoch"] + 1, r["acc1"]] for r in recs],
            "wall_s": sum(r["epoch_time_s"] for r in epochs)}  # fmt: skip


def _save_untrained(model: str, seed: int, path: Path, model_args: dict) -> None:
    """Row 1's encoder for the linear probe and kNN: the pre-training model, initialised with
    the seed and never trained (the floor the pre-trained encoders are read against)."""
    code = (
        "import sys, json, torch\n"
        "from ummae.models import create_model\n"
        "from ummae.weights.io import save_atomic\n"
        "torch.manual_seed(int(sys.argv[2]))\n"
        "m = create_model(sys.argv[1], **json.loads(sys.argv[4]))\n"
        "save_atomic({'model': m.state_dict(), 'model_name': m.model_name, 'model_args': m.model_args}, sys.argv[3])\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, model, str(seed), str(path), json.dumps(model_args)], check=True)


def command(job: Job, scale: Scale, jobs: dict) -> list[str]:
    """The ummae command line of ``job`` as it runs: a row pre-trained at the sweep's lr gets
    the lr the sweep chose (``--blr <swept ...>`` while the sweep is not done)."""
    if job.blr_from is None:
        return list(job.argv)
    blr = chosen_blr(jobs, scale.sweep, *job.blr_from)
    at = job.argv.index("--seed")  # after the scale's --blr: the later flag wins
    return [*job.argv[:at], "--blr", f"{blr:g}" if blr else "<swept: {} {}>".format(*job.blr_from), *job.argv[at:]]


def run_job(job: Job, scale: Scale, out: Path, launch: list[str], argv: list[str]) -> dict:
    folder = out / job.key
    if job.kind == "init":
        _save_untrained(job.argv[0], job.seed, folder / "checkpoint-last.pth", scale.model_args())
        return {}
    argv = [*launch, "-m", "ummae", *argv]
    if job.kind != "knn":
        argv += ["--resume", "auto"]
    print(f"\n=== {job.key}: {shlex.join(argv)}", flush=True)
    t0 = time.time()
    if job.kind == "knn":
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode:
            raise SystemExit(f"minitable: {job.key} failed (exit {proc.returncode}); rerun to continue")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        return {"acc1": result["knn_acc1"], "wall_s": time.time() - t0}
    rc = subprocess.run(argv).returncode
    if rc:
        raise SystemExit(f"minitable: {job.key} failed (exit {rc}); rerun to continue from its last checkpoint")
    return _pretrain_result(folder, world_size(launch)) if job.kind == "pretrain" else _classify_result(folder)


def world_size(launch: list[str]) -> int:
    """The processes a launcher starts (torchrun's --nproc_per_node x --nnodes; 1 otherwise)."""
    n = 1
    for i, a in enumerate(launch):
        for flag in ("--nproc_per_node", "--nproc-per-node", "--nnodes"):
            if a == flag and i + 1 < len(launch):
                n *= int(launch[i + 1].split(":")[-1])
            elif a.startswith(flag + "="):
                n *= int(a.split("=", 1)[1].split(":")[-1])
    return n


def load_results(path: Path, scale_name: str) -> dict:
    if not path.exists():
        return {"scale": scale_name, "jobs": {}}
    results = json.loads(path.read_text())
    if results.get("scale") != scale_name:
        raise SystemExit(f"minitable: {path} holds the {results.get('scale')!r} table, not {scale_name!r}")
    return results


def record_result(path: Path, scale_name: str, key: str, value: dict) -> dict:
    """Add one finished run to ``results.json``, under a lock: several table processes (one
    per GPU or machine, sharing ``--out``) each add theirs without losing the others'."""
    with open(path.with_name(".results.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path, scale_name)
        results["jobs"][key] = value
        save_results(results, path)
    return results


def _next_job(left: list[Job], results: dict, out: Path):
    """The first run not done whose weights are there and that no other table process runs
    (it holds the run's lock file while it runs it), with its lock; (None, None) if none is."""
    for job in left:
        if any(key not in results["jobs"] for key in job.needs):
            continue
        lock = open(out / f".{job.key}.lock", "a")  # noqa: SIM115 (held while the run runs)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        if job.key in load_results(out / "results.json", results["scale"])["jobs"]:  # finished meanwhile
            lock.close()
            continue
        return job, lock
    return None, None


def save_results(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a kill mid-write keeps the previous results


# --- the table ----------------------------------------------------------------------------------
def _cell(results: dict, row: Row, ev: str) -> str:
    vals = [results[k]["acc1"] for k in (f"row{row.id}_s{s}_{ev}" for s in row.seeds) if k in results]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{sum(vals) / len(vals):.1f} ({' / '.join(f'{v:.1f}' for v in vals)})"


def _median_epoch(pt: dict) -> float:
    """The median epoch time of a pre-training run: its pace with the spikes of a shared
    machine left out (the sum is the wall-clock as it happened)."""
    c = [0.0, *pt["cumulative_s"]]
    times = sorted(b - a for a, b in zip(c, c[1:], strict=False))
    return times[len(times) // 2]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """The seeds' mean and sample standard deviation (n - 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, sd


def mean_std(values: list[float], planned: int = 0) -> str:
    """``mean ± sd`` of the seeds' top-1, one decimal; a single value as it is; ``(n of N)``
    while fewer than the ``planned`` seeds are done."""
    if not values:
        return "-"
    mean, sd = _mean_sd(values)
    text = f"{mean:.1f}" + (f" ± {sd:.1f}" if len(values) > 1 else "")
    return text + (f" ({len(values)} of {planned})" if len(values) < planned else "")


def _ours(text: str, ours: bool) -> str:
    return f"{text} †" if ours else text


OURS_NOTE = "† ours: no counterpart in the paper or its reference code."


def markdown_table(results: dict) -> str:
    """The full-label table (every training label): pre-training cost, fine-tuning (last and
    best epoch), probe and kNN per row, and the budget curve."""
    jobs = results["jobs"]
    lines = [
        "| row | encoder, pre-training | pre-training time (median epoch) | images/s | peak MiB | fine-tune top-1 | "
        "fine-tune best epoch | linear probe | kNN † |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        pts = [jobs[k] for k in (f"row{row.id}_s{s}_pretrain" for s in row.seeds) if k in jobs]
        if row.method is None:
            time_s, rate, mem = "0", "-", "-"
        elif pts:
            time_s = " / ".join(f"{p['wall_s'] / 60:.1f} min ({_median_epoch(p):.1f} s)" for p in pts)
            rate = " / ".join(f"{p['images_per_s']:.0f}" for p in pts)
            mem = f"{max(p['peak_mem_mib'] for p in pts):.0f}"
        else:
            time_s = rate = mem = "-"
        cells = [_cell(jobs, row, ev) if ev in row.evals else "" for ev in ("finetune", "linprobe", "knn")]
        best = [jobs[k].get("best_acc1") for k in (f"row{row.id}_s{s}_finetune" for s in row.seeds) if k in jobs]
        cells.insert(1, " / ".join(f"{b:.1f}" for b in best if b is not None) or "-")
        lines.append(f"| {row.id} | {_ours(row.label, row.ours)} | {time_s} | {rate} | {mem} | {' | '.join(cells)} |")
    budget = [k for k in jobs if "_pt" in k and k.endswith("_finetune")]
    if budget:
        lines += ["", "Budget curve † (seed 0): fine-tune top-1 / kNN after N pre-training epochs", "",
                  "| row | epochs | pre-training time (epochs x median epoch) | fine-tune top-1 | kNN |", "|---|---|---|---|---|"]  # fmt: skip
        for row_id in BUDGET_ROWS:
            pt = jobs.get(f"row{row_id}_s0_pretrain")
            for key in sorted(k for k in budget if k.startswith(f"row{row_id}_")):
                n = int(key.split("_pt")[1].split("_")[0])
                knn = jobs.get(key.replace("_finetune", "_knn"), {}).get("acc1")
                t = f"{n * _median_epoch(pt) / 60:.1f} min" if pt else "-"
                lines.append(
                    f"| {row_id} | {n} | {t} | {jobs[key]['acc1']:.1f} | {knn if knn is None else f'{knn:.1f}'} |"
                )
    return "\n".join([*lines, "", OURS_NOTE]) + "\n"


def sweep_table(results: dict, scale: Scale) -> str:
    """Held-out kNN top-1 per base lr of the sweep, the chosen lr in bold."""
    jobs = results["jobs"]
    sweep = scale.sweep
    lines = [f"| family, method | {' | '.join(f'blr {b:g}' for b in sweep.blrs)} | chosen |",
             "|---|" + "---|" * (len(sweep.blrs) + 1)]  # fmt: skip
    for family in sweep.families:
        for method in sweep.methods:
            chosen = chosen_blr(jobs, sweep, family, method)
            cells = []
            for blr in sweep.blrs:
                acc = jobs.get(f"{_sweep_key(family, method, blr)}_knn", {}).get("acc1")
                cell = "-" if acc is None else f"{acc:.1f}"
                cells.append(f"**{cell}**" if blr == chosen else cell)
            lines.append(f"| {family}, {method} | {' | '.join(cells)} | {'-' if chosen is None else f'{chosen:g}'} |")
    return "\n".join(lines) + "\n"


def _few_values(jobs: dict, row: Row, fraction: float, ev: str, seeds, variant, what="acc1") -> list[float]:
    keys = (few_key(row.id, fraction, s, ev, variant) for s in seeds)
    return [jobs[k][what] for k in keys if k in jobs and what in jobs[k]]


def _tried(scale: Scale, variant: str | None) -> str | None:
    """The few-label try whose fine-tuning cells a table or plot shows: None for the first
    (the table's own)."""
    return variant if variant and variant != next(iter(scale.few.variants)) else None


def few_label_table(results: dict, scale: Scale, variant: str | None = None) -> str:
    """Top-1 with 1 % / 10 % of the labels (mean ± sd over the seeds; fine-tuning: last epoch,
    best epoch in brackets) and with every label (seed 0), for the few-label rows."""
    jobs, few = results["jobs"], scale.few
    tried = _tried(scale, variant)
    head = ["row", "encoder, pre-training"]
    for fraction in few.fractions:
        pct = f"{fraction * 100:g} % †"
        head += [f"{pct} fine-tune (best)", f"{pct} probe", f"{pct} kNN"]
    head += ["100 % fine-tune (best)", "100 % probe", "100 % kNN †"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in (r for r in ROWS if r.few):
        cells = [row.id, _ours(row.label, row.ours)]
        for fraction in few.fractions:
            final = mean_std(_few_values(jobs, row, fraction, "finetune", few.seeds, tried), len(few.seeds))
            best = mean_std(_few_values(jobs, row, fraction, "finetune", few.seeds, tried, "best_acc1"))
            cells.append(f"{final} ({best})" if final != "-" else final)
            cells += [mean_std(_few_values(jobs, row, fraction, ev, few.seeds, None), len(few.seeds))
                      for ev in ("linprobe", "knn")]  # fmt: skip
        ft = jobs.get(f"row{row.id}_s0_finetune", {})
        cells.append(f"{ft['acc1']:.1f} ({ft['best_acc1']:.1f})" if "best_acc1" in ft else "-")
        cells += [
            mean_std([jobs[k]["acc1"]] if k in jobs else [])
            for k in (f"row{row.id}_s0_{ev}" for ev in ("linprobe", "knn"))
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tries_table(results: dict, scale: Scale) -> str:
    """Every few-label fine-tuning try (``--variant``) found in the results, row by row: the
    last-epoch top-1, mean ± sd over the seeds."""
    jobs, few = results["jobs"], scale.few
    first = next(iter(few.variants))
    head = ["try (flags)", "row", *(f"{f * 100:g} % fine-tune" for f in few.fractions)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, flags in few.variants.items():
        tried = None if name == first else name
        for row in (r for r in ROWS if r.few):
            vals = [_few_values(jobs, row, f, "finetune", few.seeds, tried) for f in few.fractions]
            if any(vals):
                cells = [
                    f"{name} ({shlex.join(flags) or 'the table'})",
                    row.id,
                    *(mean_std(v, len(few.seeds)) for v in vals),
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(results: dict, scale: Scale, variant: str | None = None) -> str:
    """table.md: the sweep, the few-label table and its tries, the full-label table. The
    few-label table's fine-tuning cells are ``variant``'s (the run's try); its heading says so."""
    name = _tried(scale, variant)
    tried = f"; fine-tuning: try {name}" if name else ""
    return "\n".join([
        "## Pre-training lr sweep † (kNN top-1 on the held-out training images; bold: chosen)", "",
        sweep_table(results, scale),
        f"## Few labels (mean ± sd over seeds {', '.join(map(str, scale.few.seeds))}; val top-1{tried})", "",
        few_label_table(results, scale, variant),
        "### Few-label fine-tuning tries", "", tries_table(results, scale),
        "## Every label", "", markdown_table(results),
    ])  # fmt: skip


def _budget_panel(ax, jobs: dict, ev: str) -> None:
    """``ev``'s top-1 against pre-training hours: row 1 as a line at 0 h, rows 2 and 3 through
    their budget points (seed 0) to the end of pre-training, seed 1's end as a cross."""
    floor = [jobs[k]["acc1"] for k in (f"row1_s0_{ev}", f"row1_s1_{ev}") if k in jobs]
    if floor:
        ax.axhline(sum(floor) / len(floor), color="grey", ls="--", label="row 1: no pre-training")
    for row_id, name in (("2", "SimMIM"), ("3", "UM-MAE")):
        pt = jobs.get(f"row{row_id}_s0_pretrain")
        if not pt:
            continue
        points = [(n * _median_epoch(pt) / 3600, jobs[f"row{row_id}_s0_pt{n}_{ev}"]["acc1"])
                  for n in sorted({int(k.split("_pt")[1].split("_")[0]) for k in jobs if k.startswith(f"row{row_id}_s0_pt")})
                  if f"row{row_id}_s0_pt{n}_{ev}" in jobs]  # fmt: skip
        # every seed at seed 0's pace: the same method and epochs (seed 1 may have shared the machine)
        ends = [(jobs[f"row{row_id}_s{s}_pretrain"]["epochs"] * _median_epoch(pt) / 3600, jobs[f"row{row_id}_s{s}_{ev}"]["acc1"])
                for s in (0, 1) if f"row{row_id}_s{s}_{ev}" in jobs and f"row{row_id}_s{s}_pretrain" in jobs]  # fmt: skip
        line = ax.plot(*zip(*(points + ends[:1]), strict=True), "o-", label=f"row {row_id}: {name}") if (
            points or ends) else None  # fmt: skip
        if line and len(ends) > 1:
            ax.plot([ends[1][0]], [ends[1][1]], "x", color=line[0].get_color(), label=f"row {row_id}: seed 1")


def plots(results: dict, img: Path, scale_name: str, scale: Scale, variant: str | None = None) -> list[Path]:
    """Accuracy vs pre-training time for rows 1-3 (budget points and final), the SM-ratio
    curve (rows 3, 4, 5) and accuracy vs the share of labels (the few-label rows). The budget
    and SM-ratio plots are written only when their runs are in the results: a run of the
    default parts would otherwise replace the full-label table's figures with near-empty ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs, written = results["jobs"], []
    img.mkdir(parents=True, exist_ok=True)
    if any("_pt" in k for k in jobs):
        written.append(_budget_plot(plt, jobs, img, scale_name))
    if any(k.startswith(("row4_", "row5_")) for k in jobs):
        written.append(_sm_ratio_plot(plt, jobs, img, scale_name))
    written.append(_few_label_plot(plt, results, scale, img, scale_name, variant))
    return written


def _budget_plot(plt, jobs: dict, img: Path, scale_name: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, ev, what in ((axes[0], "finetune", "fine-tune top-1 (%)"), (axes[1], "knn", "kNN top-1 (%)")):
        _budget_panel(ax, jobs, ev)
        ax.set_xlabel("pre-training hours on this machine (epochs x median epoch time)")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Accuracy vs pre-training time, rows 1-3 ({scale_name} table)")
    path = img / f"minitable_{scale_name}_budget.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sm_ratio_plot(plt, jobs: dict, img: Path, scale_name: str) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for ev, marker in (("finetune", "o-"), ("linprobe", "s--"), ("knn", "^:")):
        pts = [(sm, jobs[f"row{r}_s0_{ev}"]["acc1"]) for r, sm in (("4", 0.0), ("3", 0.25), ("5", 0.5))
               if f"row{r}_s0_{ev}" in jobs]  # fmt: skip
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=ev)
    ax.set_xlabel("secondary masking ratio")
    ax.set_ylabel("top-1 (%)")
    ax.set_xticks([0.0, 0.25, 0.5])
    ax.set_title(f"UM-MAE Swin: SM ratio ({scale_name} table, seed 0)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = img / f"minitable_{scale_name}_sm_ratio.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _few_label_plot(plt, results: dict, scale: Scale, img: Path, scale_name: str, variant) -> Path:
    """Top-1 against the share of labels (log axis: the fractions and every label), one line
    per few-label row, the seeds' mean with their standard deviation as error bars."""
    jobs, few = results["jobs"], scale.few
    tried = _tried(scale, variant)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, ev, what in zip(axes, ("finetune", "linprobe", "knn"), ("fine-tune", "linear probe", "kNN"), strict=True):
        for row in (r for r in ROWS if r.few):
            xs, means, sds = [], [], []
            for fraction in few.fractions:
                vals = _few_values(jobs, row, fraction, ev, few.seeds, tried if ev == "finetune" else None)
                if vals:
                    mean, sd = _mean_sd(vals)
                    xs, means, sds = [*xs, fraction * 100], [*means, mean], [*sds, sd]
            if f"row{row.id}_s0_{ev}" in jobs:
                xs, means, sds = [*xs, 100.0], [*means, jobs[f"row{row.id}_s0_{ev}"]["acc1"]], [*sds, 0.0]
            if xs:
                ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=f"{row.id}: {row.label}")
        ax.set_xscale("log")
        ax.set_xlabel("labelled training images (%)")
        ax.set_ylabel(f"{what} top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fine_tuning = f"; fine-tuning: try {tried}" if tried else ""
    fig.suptitle(
        f"Few labels: top-1 on the val split ({scale_name} table; mean ± sd over seeds, 100 %: seed 0{fine_tuning})"
    )
    path = img / f"minitable_{scale_name}_few_labels.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def select(jobs: list[Job], parts, only: str, no_budget: bool) -> list[Job]:
    """The runs of ``parts`` and those they need first (the sweep before a swept row, a row's
    pre-training before its evaluations), in the plan's order; then ``--only`` / ``--no-budget``."""
    by_key = {job.key: job for job in jobs}
    wanted = {job.key for job in jobs if job.part in parts}
    todo = list(wanted)
    while todo:
        for need in by_key[todo.pop()].needs:
            if need in by_key and need not in wanted:
                wanted.add(need)
                todo.append(need)
    jobs = [job for job in jobs if job.key in wanted]
    if no_budget:
        jobs = [j for j in jobs if "_pt" not in j.key or j.key.endswith("_pretrain")]
    if only:
        keys = set(only.split(","))
        jobs = [j for j in jobs if j.key in keys or j.row in keys]
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="mini")
    p.add_argument("--data", help="root with train/ and val/ ImageFolders (mini: ../shared/data/imagenette_mini)")
    p.add_argument("--out", default=None, help="runs and results.json (default runs/minitable_SCALE)")
    p.add_argument("--img", default=str(HERE.parent / "docs" / "img"), help="folder of the plots")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading processes of every run")
    p.add_argument("--parts", default=None,
                   help=f"comma-separated parts of the table, of {', '.join(PARTS)} (default: the scale's; mini: "
                        f"{','.join(SCALES['mini'].parts)}); the runs they need come along")  # fmt: skip
    p.add_argument("--variant", default=None,
                   help="the few-label fine-tuning try to run (default: the scale's first; mini: "
                        f"{', '.join(SCALES['mini'].few.variants)}); every try's results stay in the table")  # fmt: skip
    p.add_argument("--only", default="", help="comma-separated job keys or row ids (e.g. 1,2,3): run only those")
    p.add_argument("--max-jobs", type=int, default=0, help="stop after running this many (0: all)")
    p.add_argument("--no-budget", action="store_true", help="leave out the budget curve's runs")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    p.add_argument(
        "--launch",
        default=sys.executable,
        help="what runs `-m ummae ...` (default: this Python); several GPUs: 'torchrun --nproc_per_node 8'",
    )
    args = p.parse_args(argv)
    scale = SCALES[args.scale]
    data = args.data or scale.data
    if not data or not (Path(data) / "train").is_dir() or not (Path(data) / "val").is_dir():
        p.error(f"--data {data or '(none)'}: needs a folder with train/ and val/ image folders")
    parts = tuple(args.parts.split(",")) if args.parts else scale.parts
    if set(parts) - set(PARTS):
        p.error(f"--parts {args.parts}: the parts are {', '.join(PARTS)}")
    if args.variant is not None and args.variant not in scale.few.variants:
        p.error(f"--variant {args.variant}: the {args.scale} table's tries are {', '.join(scale.few.variants)}")
    out = Path(args.out or f"runs/minitable_{args.scale}").resolve()
    workers = ["--num-workers", str(args.num_workers)] if args.num_workers is not None else []
    data = str(Path(data).resolve())
    jobs = select(plan(scale, out, data, workers, args.variant), parts, args.only, args.no_budget)
    path = out / "results.json"
    results = load_results(path, args.scale)
    if args.dry_run:
        prefix = ["ummae"] if args.launch == sys.executable else [*shlex.split(args.launch), "-m", "ummae"]
        for job in jobs:
            argv = command(job, scale, results["jobs"])
            print(
                f"{job.key}: " + (f"(untrained {job.argv[0]})" if job.kind == "init" else shlex.join([*prefix, *argv]))
            )
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if any(job.part == "sweep" for job in jobs):
        n_bank, n_held = write_holdout_lists(scale.sweep, Path(data) / "train", out)
        print(f"minitable: the sweep's kNN: bank {n_bank} training images, {n_held} held out ({out / 'heldout'})")
    left = [j for j in jobs if j.key not in results["jobs"]]
    print(f"minitable ({args.scale}): {len(jobs) - len(left)} of {len(jobs)} runs done, {len(left)} to go; {out}")
    missing = {n for j in left for n in j.needs} - {j.key for j in jobs} - set(results["jobs"])
    if missing:
        p.error(f"runs that are not done and not selected are needed first: {', '.join(sorted(missing))}")
    ran = 0
    while left and not (args.max_jobs and ran == args.max_jobs):
        job, lock = _next_job(left, results, out)
        if job is None:  # the rest is being run, or waits for a run, in another table process
            time.sleep(10)
        else:
            try:
                t0 = time.time()
                argv = command(job, scale, results["jobs"])
                result = run_job(job, scale, out, shlex.split(args.launch), argv)
                value = {**result, "kind": job.kind, "row": job.row, "seed": job.seed,
                         "command": ["ummae", *argv] if job.kind != "init" else job.argv, "job_s": time.time() - t0}  # fmt: skip
                results = record_result(path, args.scale, job.key, value)
            finally:
                lock.close()  # releases the run's lock
            ran += 1
            (out / "table.md").write_text(report(results, scale, args.variant))
            print(f"minitable: {job.key} done in {time.time() - t0:.0f} s", flush=True)
        results = load_results(path, args.scale)
        left = [j for j in jobs if j.key not in results["jobs"]]
    (out / "table.md").write_text(report(results, scale, args.variant))
    for img in plots(results, Path(args.img), args.scale, scale, args.variant):
        print(f"minitable: wrote {img}")
    print(report(results, scale, args.variant))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
