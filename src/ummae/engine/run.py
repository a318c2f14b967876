"""A training run's folder and records: claiming the output folder (refusing one that holds a
run), ``--overwrite``'s clean-up, the run's ``config.yaml`` and ``log.txt``, and its metrics
(JSON lines and TensorBoard). :func:`training_run` is what every training command does before
it builds its model.

The log lines a run writes before its folder may be written to (a run refused at its start
writes nothing) are held by an :class:`EarlyLines` handler on the ``ummae`` logger, which
:class:`RunLog` replays into ``log.txt`` and removes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from ummae.engine import dist as udist
from ummae.engine import precision, seeds
from ummae.errors import UsageError

log = logging.getLogger("ummae")

RUN_FILE_NAMES = ("metrics.jsonl", "tensorboard", "pretrained_load.txt", "log.txt", "config.yaml")


def config_record(cfg) -> dict[str, Any]:
    """A config dataclass as plain values (tuples as lists): what ``config.yaml`` and a
    checkpoint's ``config`` hold, and what ``--config`` and ``--resume`` read back: its options,
    not their provenance."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.option_values().items()}


def run_files(out: Path) -> list[Path]:
    """What a run leaves in its folder (and a new run would mix with)."""
    found = [out / n for n in RUN_FILE_NAMES if (out / n).exists()]
    return found + sorted(out.glob("checkpoint-*.pth")) + sorted(out.glob("recon-epoch*.png"))


def claim_output(cfg) -> None:
    """Refuse an output folder that holds a run, unless the run resumes it (``--resume``) or
    replaces it (``--overwrite``): a new run would overwrite its checkpoints and append to its
    log. Every process checks before the process group exists, so before anything is written."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file, not a folder")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the run in the output folder and --overwrite deletes it: give one of them")
    # a run that trained (metrics or checkpoints); one that failed at its start left only its
    # config.yaml / log.txt, which the next attempt replaces / appends to
    held = [p for p in run_files(out) if p.name == "metrics.jsonl" or p.suffix == ".pth"] if out.is_dir() else []
    if held and not cfg.resume and not cfg.overwrite:
        names = ", ".join(p.name for p in held[:3]) + (", ..." if len(held) > 3 else "")
        raise UsageError(
            f"output folder {out} holds a run ({names}); pass --resume auto to continue it, "
            f"--overwrite to start over (its checkpoints and logs are deleted), or another --output"
        )


def clear_output(cfg) -> None:
    """``--overwrite``: delete the previous run's files (rank 0 only, before anything is written)."""
    if not cfg.overwrite:
        return
    for p in run_files(Path(cfg.output)):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    log.info("--overwrite: removed the previous run's files from %s", cfg.output)


class EarlyLines(logging.Handler):
    """Holds the log lines of a run before its folder is written to (see :func:`run_folder`),
    until :class:`RunLog` takes them over."""

    LIMIT = 10_000  # a run that logs more before it trains is broken; keep memory bounded

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.LIMIT:
            self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        """The lines held so far; the handler leaves the logger and holds no more."""
        log.removeHandler(self)
        records, self.records = self.records, []
        return records


def _early_lines_handler() -> EarlyLines | None:
    return next((h for h in log.handlers if isinstance(h, EarlyLines)), None)


@contextlib.contextmanager
def run_folder(cfg, dist_info: udist.DistInfo):
    """A run's folder: ``--overwrite``'s clean-up (rank 0), then the run's log lines are held
    in memory (:class:`EarlyLines`) until training starts, when :class:`RunLog` writes them to
    ``log.txt`` first; a run refused before that writes nothing. Every process waits until
    rank 0 is ready."""
    early = EarlyLines()
    if dist_info.is_main:
        clear_output(cfg)
        log.addHandler(early)
    udist.barrier()
    try:
        yield
    finally:
        early.take()


@contextlib.contextmanager
def training_run(cfg):
    """What every training command does before it builds its model: claim the output folder
    (:func:`claim_output`), join the process group (torchrun, or one process), open the run's
    folder (:func:`run_folder`), resolve the precision and seed every rank alike (DDP also
    broadcasts rank 0's weights). Yields ``(dist_info, device, precision)``."""
    claim_output(cfg)
    with udist.distributed(cfg.device) as (info, device), run_folder(cfg, info):
        resolved = precision.resolve_precision(cfg.precision, device)  # looked up at each run: tests patch it
        seeds.seed_everything(cfg.seed)
        yield info, device, resolved


class RunLogHandler(logging.FileHandler):
    """The ``log.txt`` handler of a run (a class of its own, so a stale one can be told apart)."""


class RunLog:
    """A run's own record in its folder, on rank 0: ``config.yaml``, the resolved configuration
    (``--config`` reads it back), and ``log.txt``, every line of the ``ummae`` logger while the
    run lasts (a resumed run appends), starting with the lines held since the run began.
    :meth:`close` removes the handler."""

    def __init__(self, out: Path, config: dict[str, Any]):
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(out / "config.yaml")
        for stale in [h for h in log.handlers if isinstance(h, RunLogHandler)]:  # of a run that failed early
            log.removeHandler(stale)
            stale.close()
        self.handler: logging.Handler | None = RunLogHandler(out / "log.txt", mode="a", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        early = _early_lines_handler()
        for record in early.take() if early is not None else []:
            self.handler.handle(record)
        log.addHandler(self.handler)

    def close(self) -> None:
        if self.handler is not None:
            log.removeHandler(self.handler)
            self.handler.close()
            self.handler = None


class MetricsLog:
    """JSON lines + TensorBoard on rank 0 (and, given the run's ``config``, its :class:`RunLog`)."""

    def __init__(self, out: Path, enabled: bool, config: dict[str, Any] | None = None):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        self.run_log = RunLog(out, config) if enabled and config is not None else None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: see the warning below

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; stay usable without it
                log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run wrote after its last checkpoint, so the log reads
        as one uninterrupted run."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                if json.loads(ln).get("step", 0) <= step:
                    keep.append(ln)
            except json.JSONDecodeError:  # a line torn by the kill
                log.warning("dropping an unreadable line of %s: %.60s", self.path, ln)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any], step: int, prefix: str) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.run_log is not None:
            self.run_log.close()
