"""Training curves of one or several runs, from their ``metrics.jsonl`` (see
:class:`ummae.engine.run.MetricsLog`): one subplot per metric, one line per run.

Records with ``"loss"`` are step records (``loss``, ``lr``, ``images_per_s`` ...), records
with ``"train_loss"`` are epoch records (``train_loss``, ``vis_loss``, ``acc1`` ...). The x
axis is ``epoch_1000x / 1000``: epochs, comparable between runs of any batch size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ummae.errors import UsageError

log = logging.getLogger("ummae")

Record = dict[str, object]


def read_metrics(run_dir: str | Path) -> tuple[list[Record], list[Record]]:
    """``(step_records, epoch_records)`` of a run folder. Lines torn by a kill are skipped
    with a warning; a folder without ``metrics.jsonl`` raises ``ValueError`` naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{run_dir} holds no metrics.jsonl: is it the output folder of an ummae run?")
    steps, epochs = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s, line %d: unreadable, skipped", path, n)
            continue
        if "loss" in rec:
            steps.append(rec)
        elif "train_loss" in rec:
            epochs.append(rec)
    return steps, epochs


def _series(records: Sequence[Record], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["epoch_1000x"] / 1000, r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [x for x, _ in pts], [y for _, y in pts]


def plot_runs(
    run_dirs: Sequence[str | Path], output: str | Path, metrics: Sequence[str] = ("loss", "lr", "images_per_s")
) -> list[str]:
    """Write one figure (format from ``output``'s suffix, e.g. ``.png``, ``.pdf``) with one
    subplot per metric and one line per run, labelled by its folder name. A metric is read
    from the step records, else from the epoch records; an epoch-level ``acc1`` (fine-tuning
    runs) gets a subplot too. Returns the metrics plotted; a metric no run has is refused."""
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state

    if not run_dirs:
        raise UsageError("no run folders given")
    runs = {str(d): read_metrics(d) for d in run_dirs}
    names = [Path(d).name or str(d) for d in runs]
    labels = names if len(set(names)) == len(names) else list(runs)  # full paths when names clash
    metrics = [m for m in metrics if m]
    if not metrics:
        raise UsageError("no metrics given (e.g. loss,lr,images_per_s)")
    if any("acc1" in r for _, epochs in runs.values() for r in epochs) and "acc1" not in metrics:
        metrics.append("acc1")
    available = set().union(*(_numeric_keys(steps + epochs) for steps, epochs in runs.values()))
    missing = [m for m in metrics if m not in available]
    if missing:
        raise UsageError(f"no run has the metric(s) {', '.join(missing)}; available: {', '.join(sorted(available))}")
    fig = Figure(figsize=(5.0 * len(metrics), 3.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, key in zip(axes, metrics, strict=True):
        for label, (steps, epochs) in zip(labels, runs.values(), strict=True):
            x, y = _series(steps, key)
            if not x:
                x, y = _series(epochs, key)
            if x:
                ax.plot(x, y, label=label, marker="o" if len(x) < 20 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    return metrics


def _numeric_keys(records: Sequence[Record]) -> set:
    skip = {"epoch", "step", "epoch_1000x"}
    return {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k not in skip}
