"""Where a pre-training step of the small-scale table spends its time, UM-MAE against SimMIM.

    python benchmarks/pretrain_phases.py                     # the mini table's four pre-training rows
    python benchmarks/pretrain_phases.py --repeats 20 --epoch-rounds 3 --json phases.json

The rows are the table's own (``experiments/minitable.py``, ``--scale mini``: Swin and PVT, SimMIM
and UM-MAE with SM 0.25), each built from the very command line the table runs, resolved as
``ummae pretrain`` resolves it (recipe, 64 px inputs, 8 px mask units, batch 128, fp32).

**Model step by phase.** Every row is built in this process, with one torch thread, and the rows
take one training step each in turn, round after round (``--warmup`` rounds untimed, then
``--repeats`` timed), so that a busy machine slows every row alike; the table gives the median
ms per step of each phase:

* ``data``: one batch of the row's training loader read in this process (JPEG decode, crop,
  flip, collate, normalise): the input pipeline's work per step on one core, which DataLoader
  workers do on other cores while the model steps;
* ``mask``: the masks drawn (``sample_masks``, as the training step draws them);
* ``to input``: from the model call to the patch embedding: the masks applied to the input
  (UM-MAE: the kept unit of each block and the compaction of the image; SimMIM: the unit mask
  to a token mask);
* ``encoder``: from the patch embedding to the decoder's input (UM-MAE: with the true
  positions of the compact tokens and the linear map to the decoder's width);
* ``decoder+loss``: the decoder (UM-MAE: transformer blocks on every unit of the grid;
  SimMIM: one linear layer) and the loss;
* ``back dec``, ``back enc``: the backward pass down to the decoder's input, then the rest;
* ``optimiser``: the AdamW step (through the grad scaler) and the zeroing of the gradients.

``model step`` is the sum of the phases after ``data``, and ``images/s`` the batch over it.
``vs SimMIM`` (here and for the epochs) is the median over the rounds of the UM-MAE row's
images/s over the SimMIM row's in the same round: a round the machine was busier in slows
both sides of its ratio.

**Whole epochs.** Then each row's ``ummae pretrain`` command, one at a time (nothing else of
this script runs meanwhile), with ``--epochs`` epochs, the same ``--workers`` and
``OMP_NUM_THREADS`` for every row, rows in turn for ``--epoch-rounds`` rounds. An epoch's
images/s is its images over its ``epoch_time_s`` (``metrics.jsonl``); the first epoch of every
run is left out (worker start-up); the figure is the median of the rest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ummae.cli import command_parser
from ummae.config import PretrainConfig, config_from_args, resolve
from ummae.data import build_train_loader
from ummae.data.device_decode import EncodedBatch
from ummae.data.transforms import normalize_uint8
from ummae.engine.dist import DistInfo
from ummae.engine.precision import autocast, grad_scaler, resolve_device, resolve_precision
from ummae.tasks.base import RunContext
from ummae.tasks.pretrain import PretrainTask

REPO = Path(__file__).resolve().parent.parent
# The table's pre-training rows timed here: (family, method), SimMIM first in each family.
ROWS = (("swin", "simmim"), ("swin", "ummae"), ("pvt", "simmim"), ("pvt", "ummae"))
PHASES = ("data", "mask", "to input", "encoder", "decoder+loss", "back dec", "back enc", "optimiser")


def _minitable():
    spec = importlib.util.spec_from_file_location("minitable", REPO / "experiments" / "minitable.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["minitable"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def table_commands(scale: str, data: str | None, workers: int, out: Path) -> list[tuple[str, list[str]]]:
    """``(row label, ummae pretrain argv)`` of the table's rows in :data:`ROWS` (seed 0): the
    first row of the table with that family and method, as ``minitable.py`` plans it."""
    mt = _minitable()
    sc = mt.SCALES[scale]
    data = str(Path(data or sc.data).resolve())
    jobs = {j.key: j for j in mt.plan(sc, out, data, ["--num-workers", str(workers)]) if j.kind == "pretrain"}
    found = []
    for family, method in ROWS:
        row = next(r for r in mt.ROWS if (r.family, r.method) == (family, method))
        found.append((f"row {row.id}: {row.label}", jobs[f"row{row.id}_s0_pretrain"].argv))
    return found


def resolved_config(argv: list[str]) -> PretrainConfig:
    """The config ``ummae pretrain`` runs ``argv`` (``pretrain ...``) with, on one process."""
    args = command_parser("pretrain").parse_args(argv[1:])
    return resolve(config_from_args(PretrainConfig, args), 1)[0]


class PhaseClock:
    """Marks the moments inside one training step that the model's own calls reveal: the patch
    embedding's call, the decoder's call, and the gradient reaching the decoder's input (the
    backward pass of the decoder and loss done). Hooks only: the model runs unchanged."""

    def __init__(self, model: torch.nn.Module, sync):
        self.sync, self.marks = sync, {}
        model.encoder.patch_embed.register_forward_pre_hook(self._at_embed)
        model.decoder.register_forward_pre_hook(self._at_decoder)

    def mark(self, name: str) -> None:
        self.sync()
        self.marks[name] = time.perf_counter()

    def _at_embed(self, mod, args) -> None:  # None: the module's inputs unchanged
        self.mark("embed")

    def _at_decoder(self, mod, args) -> None:
        self.mark("decoder")
        if torch.is_grad_enabled() and args[0].requires_grad:
            args[0].register_hook(lambda grad: self.mark("back decoder"))


@dataclass
class Row:
    """One table row built for stepping: its model, optimiser and in-process loader."""

    label: str
    argv: list[str]
    device: torch.device
    precision: str
    steps: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self):
        cfg = self.cfg = resolved_config(self.argv)
        task = PretrainTask()
        parts = task.build(cfg, RunContext(DistInfo(), self.device, self.precision, 0))
        self.model = parts.model.to(self.device).train()
        self.optimizer = task.optimizer(cfg, self.model, cfg.effective_lr(1), self.device)
        self.scaler = grad_scaler(self.device, self.precision)
        collate = {"collate_fn": parts.collate} if parts.collate is not None else {}
        self.loader, self.sampler = build_train_loader(parts.train, cfg.batch_size, 0, seed=cfg.seed, **collate)
        self.epoch, self.batches = 0, iter(self.loader)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.clock = PhaseClock(self.model, self.sync)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:  # a new pass over the data
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> dict[str, float]:
        """One training step as ``ummae pretrain`` takes it (``tasks.pretrain.pretrain_step``
        inside ``Trainer._micro_step`` and ``_optimizer_step``, spelled out to time its
        phases): seconds of each of :data:`PHASES`."""
        self.sync()
        t0 = time.perf_counter()
        images = self.next_batch()[0]
        if isinstance(images, EncodedBatch):
            images = images.decode(self.device)
        images = normalize_uint8(images.to(self.device))
        self.sync()
        t1 = time.perf_counter()
        mask, sm_mask = self.model.sample_masks(images.shape[0], images.device, self.generator)
        self.clock.marks = {}
        self.clock.mark("call")
        with autocast(self.device, self.precision):
            loss = self.model(images, mask=mask, sm_mask=sm_mask, validate=False)["loss"]
        self.clock.mark("loss")
        self.scaler.scale(loss).backward()
        self.clock.mark("backward")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.clock.mark("optimiser")
        m = self.clock.marks
        ends = [
            t0,
            t1,
            m["call"],
            m["embed"],
            m["decoder"],
            m["loss"],
            m["back decoder"],
            m["backward"],
            m["optimiser"],
        ]
        times = {phase: ends[i + 1] - ends[i] for i, phase in enumerate(PHASES)}  # consecutive: they add up
        self.steps.append(times)
        return times

    def medians(self) -> dict[str, float]:
        """Median ms per step of every phase, of the model step and of the whole step."""
        out = {p: 1000 * statistics.median(s[p] for s in self.steps) for p in PHASES}
        out["model step"] = 1000 * statistics.median(sum(s[p] for p in PHASES[1:]) for s in self.steps)
        out["with data"] = 1000 * statistics.median(sum(s.values()) for s in self.steps)
        return out


def model_phases(rows: list[Row], warmup: int, repeats: int) -> list[dict[str, object]]:
    """The rows stepped in turn, ``warmup`` untimed rounds then ``repeats`` timed ones."""
    for r in range(warmup + repeats):
        if r == warmup:
            for row in rows:
                row.steps.clear()
        for row in rows:
            row.step()
        print(f"  round {r + 1 - warmup if r >= warmup else 'warm-up'} of {repeats}", file=sys.stderr, flush=True)
    results = []
    for row in rows:
        ms = row.medians()
        batch = row.cfg.batch_size
        results.append(
            {
                "row": row.label,
                "model": row.cfg.model,
                "batch_size": batch,
                "img_size": row.model.img_size,
                "unit_size": row.model.unit_size,
                "phases_ms": {p: ms[p] for p in PHASES},
                "model_step_ms": ms["model step"],
                "model_images_per_s": 1000 * batch / ms["model step"],
                "with_data_images_per_s": 1000 * batch / ms["with data"],
                "model_images_per_s_rounds": [batch / sum(s[p] for p in PHASES[1:]) for s in row.steps],
                "repeats": len(row.steps),
            }
        )
    return results


def _epoch_rates(folder: Path) -> list[float]:
    """Images/s of every epoch after the first of the run in ``folder``."""
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "epoch_time_s" in r]
    return [
        (b["step"] - a["step"]) * cfg["batch_size"] * cfg["accum_iter"] / b["epoch_time_s"]
        for a, b in zip(recs, recs[1:], strict=False)
    ]


def whole_epochs(
    commands: list[tuple[str, list[str]]], epochs: int, rounds: int, threads: int, out: Path
) -> dict[str, list[float]]:
    """Each row's ``ummae pretrain`` for ``epochs`` epochs, alone, rows in turn for ``rounds``
    rounds: by row, the images/s of each round's run (the median of its epochs after the first)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    rates: dict[str, list[float]] = {label: [] for label, _ in commands}
    for r in range(rounds):
        for i, (label, argv) in enumerate(commands):
            folder = out / f"round{r}_row{i}"
            run = [*argv, "--epochs", str(epochs), "--warmup-epochs", "0", "--keep-every", "0", "--vis-every", "0"]
            run += ["--output", str(folder)]
            print(f"  round {r + 1} of {rounds}: {label}", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, "-m", "ummae", *run], env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"pretrain_phases: {label} failed:\n{proc.stderr[-2000:]}")
            rates[label].append(statistics.median(_epoch_rates(folder)))
    return rates


def _ratio_to_simmim(results: list[dict[str, object]], key: str) -> None:
    """``key``'s ratio of each row to the SimMIM row of its family (the row before it): the
    median over the rounds of the ratio within each round (``key_rounds``), so that a round the
    machine was busier in slows both sides of its ratio."""
    for simmim, ummae in zip(results[::2], results[1::2], strict=True):
        pairs = zip(ummae[f"{key}_rounds"], simmim[f"{key}_rounds"], strict=True)
        simmim[f"{key}_ratio"] = 1.0
        ummae[f"{key}_ratio"] = statistics.median(u / s for u, s in pairs)


def format_phases(results: list[dict[str, object]]) -> str:
    header = ["model", *PHASES, "model step", "images/s", "vs SimMIM"]
    lines = [header]
    for r in results:
        ms = r["phases_ms"]
        lines.append(
            [
                r["model"],
                *(f"{ms[p]:.1f}" for p in PHASES),
                f"{r['model_step_ms']:.1f}",
                f"{r['model_images_per_s']:.0f}",
            ]
            + [f"{r['model_images_per_s_ratio']:.2f}x"]
        )
    return _table(lines)


def format_summary(results: list[dict[str, object]], workers: int, threads: int) -> str:
    header = [
        "row",
        "model step images/s (1 thread)",
        "vs SimMIM",
        f"epoch images/s ({workers} workers, {threads} thr)",
    ]
    header += ["vs SimMIM"]
    lines = [header]
    for r in results:
        epoch = r.get("epoch_images_per_s")
        lines.append(
            [r["row"], f"{r['model_images_per_s']:.0f}", f"{r['model_images_per_s_ratio']:.2f}x"]
            + ([f"{epoch:.0f}", f"{r['epoch_images_per_s_ratio']:.2f}x"] if epoch else ["-", "-"])
        )
    return _table(lines)


def _table(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    rows = [lines[0], ["-" * w for w in widths], *lines[1:]]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="mini", help="the table's scale whose rows are timed (default mini)")
    p.add_argument("--data", default=None, help="root with train/ (default: the scale's data)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds of model steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before them (default 2)")
    p.add_argument("--epoch-rounds", type=int, default=3, help="rounds of whole-epoch runs (default 3; 0: none)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each run; the first is left out (default 2)")
    p.add_argument("--workers", type=int, default=2, help="data-loading workers of the runs (default 2, the table's)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs (default 1, the table's)")
    p.add_argument("--device", default="cpu", help="device of the model steps (default cpu)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.epoch_rounds < 0 or args.epochs < 2:
        p.error("need --repeats >= 1, --warmup >= 0, --epoch-rounds >= 0 and --epochs >= 2")
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    with tempfile.TemporaryDirectory(prefix="pretrain_phases_") as tmp:
        commands = table_commands(args.scale, args.data, args.workers, Path(tmp))
        print(f"model steps: {len(commands)} rows in turn, {args.warmup} + {args.repeats} rounds", file=sys.stderr)
        rows = [Row(label, cmd, device, precision) for label, cmd in commands]
        results = model_phases(rows, args.warmup, args.repeats)
        del rows
        rates = whole_epochs(commands, args.epochs, args.epoch_rounds, args.threads, Path(tmp))
    for res, (label, cmd) in zip(results, commands, strict=True):
        res["command"] = ["ummae", *cmd[:-2]]  # without the temporary --output
        res["epoch_images_per_s"] = statistics.median(rates[label]) if rates[label] else None
        res["epoch_images_per_s_rounds"] = rates[label]
    _ratio_to_simmim(results, "model_images_per_s")
    if args.epoch_rounds:
        _ratio_to_simmim(results, "epoch_images_per_s")
    r0 = results[0]
    print(
        f"torch {torch.__version__} | {device} | model steps: 1 thread, batch {r0['batch_size']}, "
        f"{r0['img_size']} px, {r0['unit_size']} px units, median of {r0['repeats']} rounds (ms per step)"
    )
    print(format_phases(results))
    print()
    print(format_summary(results, args.workers, args.threads))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
