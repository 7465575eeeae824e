"""Progress that reads well in a terminal and in a log file, and stops promptly on Ctrl-C or SIGTERM.

In a terminal, tqdm redraws one line. Written to a file, a redrawn line becomes one endless line of carriage
returns that ``tail`` shows late or never; there the same tqdm status (count, total, rate, ETA) is written as a
plain line every ``file_interval`` seconds instead.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any, Iterable

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from tqdm.auto import tqdm

#: seconds between progress lines when output goes to a file
FILE_INTERVAL = 15.0


def _interactive(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class _LineWriter:
    """A file-like object for tqdm that turns a redraw into one complete line, at most one per ``interval``
    seconds (and the final 100 % one): Lightning's bar redraws on every step, whatever tqdm's own interval."""

    def __init__(self, stream=None, interval: float = FILE_INTERVAL) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.last = float("-inf")

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        now = time.monotonic()
        if s and (now - self.last >= self.interval or "100%" in s):
            self.stream.write(s + "\n")
            self.last = now

    def flush(self) -> None:
        self.stream.flush()


def tqdm_kwargs(**kwargs: Any) -> dict[str, Any]:
    """tqdm arguments for the current output: a redrawn bar in a terminal, a line every ``FILE_INTERVAL`` s in a
    file (``kwargs`` win)."""
    if _interactive():
        return kwargs
    return {"file": _LineWriter(), "mininterval": FILE_INTERVAL, "maxinterval": FILE_INTERVAL, "ascii": True,
            "dynamic_ncols": False, "ncols": 100, **kwargs}


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", **kwargs: Any) -> tqdm:
    """tqdm with a total and an ETA, readable in a terminal and in a log file."""
    return tqdm(iterable, total=total, desc=desc, **tqdm_kwargs(**kwargs))


class LineProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar; when output goes to a file, a line with count, total and ETA every
    ``FILE_INTERVAL`` seconds (Lightning's own bar only redraws one line)."""

    def _lines(self, bar: Tqdm, leave: bool) -> Tqdm:
        if _interactive(sys.stdout):
            return bar
        kwargs = {"desc": bar.desc, "disable": bar.disable, "leave": leave, "smoothing": 0,
                  "bar_format": self.BAR_FORMAT, **tqdm_kwargs()}
        bar.close()
        return Tqdm(**{**kwargs, "file": _LineWriter(sys.stdout)})

    def init_train_tqdm(self) -> Tqdm:
        return self._lines(super().init_train_tqdm(), leave=True)

    def init_validation_tqdm(self) -> Tqdm:
        return self._lines(super().init_validation_tqdm(), leave=self.trainer.state.fn == "validate")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """Make SIGTERM behave as Ctrl-C: long loops (testbed build, statistics, evaluation, the edit stream) stop
    within seconds through their KeyboardInterrupt paths, which leave no half-written file (Lightning alone only
    stops at the end of an epoch, and a testbed build is one epoch)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
