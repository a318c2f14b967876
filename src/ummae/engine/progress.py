"""One progress mechanism for every loop a user waits on: a tqdm bar with rate and ETA on a
terminal wide enough for one, otherwise a log line every ``log_every`` items or ``log_seconds``
seconds (whichever comes first), as MMDetection's and MMSegmentation's ``test.py`` print.
Only the main process reports."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger("ummae")
T = TypeVar("T")
MIN_BAR_COLUMNS = 40  # narrower, tqdm draws nothing useful (at 0 columns: nothing at all)


def terminal_columns(stream) -> int:
    """Columns of the terminal ``stream`` writes to: ``$COLUMNS`` when set (as
    ``shutil.get_terminal_size`` reads it), else the terminal's own; 0 when unknown."""
    env = os.environ.get("COLUMNS", "").strip()
    if env:
        try:
            return int(env)
        except ValueError:
            pass
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def progress_bar(total: int | None, desc: str, initial: int = 0, is_main: bool = True, unit: str = "it"):
    """A tqdm bar on stderr when it is a terminal wide enough for one (main process only);
    else None (the caller logs lines instead)."""
    if not (is_main and sys.stderr.isatty()):
        return None
    columns = terminal_columns(sys.stderr)
    if columns < MIN_BAR_COLUMNS:
        return None
    width = {"ncols": columns} if os.environ.get("COLUMNS", "").strip() else {"dynamic_ncols": True}
    if _terminal_lines(sys.stderr) <= 0:  # a terminal of unknown size (``script``, some CI): tqdm would draw nothing
        width["nrows"] = 20
    return tqdm(total=total, initial=initial, desc=desc, leave=False, file=sys.stderr, unit=unit, **width)


def _terminal_lines(stream) -> int:
    """Lines of the terminal ``stream`` writes to; 0 when unknown."""
    try:
        return os.get_terminal_size(stream.fileno()).lines
    except (AttributeError, OSError, ValueError):
        return 0


def above_bar(bar):
    """Context of a log line written while ``bar`` may be drawn: the bar is cleared first and
    drawn again after, so the line does not land in the middle of it."""
    return bar.external_write_mode(file=sys.stderr) if bar is not None else contextlib.nullcontext()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60:02d}:{seconds % 60:02d}"
    )


def progress(
    items: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    is_main: bool = True,
    log_every: int = 50,
    log_seconds: float = 30.0,
) -> Iterator[T]:
    """Yield ``items`` while reporting progress: a bar on a terminal, else ``desc: n/total
    (rate unit/s, ETA m:ss)`` lines every ``log_every`` items or ``log_seconds`` seconds, and
    a last line with the elapsed time."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = progress_bar(total, desc, is_main=is_main, unit=unit)
    start = last = time.perf_counter()
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            if bar is not None:
                bar.update(1)
                continue
            now = time.perf_counter()
            if is_main and (done % log_every == 0 or now - last >= log_seconds) and done != total:
                last = now
                rate = done / max(now - start, 1e-9)
                eta = f", ETA {_clock((total - done) / rate)}" if total else ""
                log.info("%s: %d%s %s (%.2f %s/s%s)", desc, done, f"/{total}" if total else "", unit, rate, unit, eta)
    finally:
        if bar is not None:
            bar.close()
    if is_main and done:
        elapsed = time.perf_counter() - start
        log.info("%s: %d %s in %s (%.2f %s/s)", desc, done, unit, _clock(elapsed), done / max(elapsed, 1e-9), unit)
