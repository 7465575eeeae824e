"""Progress that reads well in a terminal and in a log file, stops promptly on Ctrl-C or SIGTERM, and records where
a run's time goes (:data:`PHASES`).

In a terminal, tqdm redraws one line. Written to a file, a redrawn line becomes one endless line of carriage
returns that ``tail`` shows late or never; there the same tqdm status (count, total, rate, ETA) is written as a
plain line every ``file_interval`` seconds instead.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

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


#: The phases of an editing run that :data:`PHASES` times, in the order a run reports them.
PHASE_NAMES = ("statistics", "setup", "target", "keys", "solve", "write", "evaluation", "norms")


class PhaseClock:
    """Wall seconds per named phase, exclusive: time inside a nested phase counts for the inner phase only, so the
    phases of a run add up to (at most) its wall time.

    The editing run enters them where the work happens (docs/real_width.md, "Where the time goes"): ``statistics``
    (the key covariance C: computed or read from the cache), ``setup`` (the rest of a method's setup: prefix contexts,
    AlphaEdit's null-space projectors), ``target`` (the target optimisation of an edit step), ``keys`` (forwards that
    read keys or residuals at an edited layer, wherever a method runs them), ``solve`` (the closed-form write: the
    linear algebra and W += ΔW), ``write`` (the edit-log entry and W = W_base + D), ``evaluation`` (the check of each
    edit right after its write and the evaluation callback) and ``norms`` (the norm tracker). Two clock reads per
    phase entered: cheap enough to stay on. Each thread keeps its own nesting; the totals are shared.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._local = threading.local()

    def _stack(self) -> list[list]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @property
    def current(self) -> str | None:
        """The innermost phase this thread is in (None outside every phase)."""
        stack = self._stack()
        return stack[-1][0] if stack else None

    def enter(self, name: str) -> None:
        stack, now = self._stack(), time.perf_counter()
        if stack:  # the enclosing phase stops counting while the nested one runs
            outer = stack[-1]
            self.seconds[outer[0]] = self.seconds.get(outer[0], 0.0) + now - outer[1]
        stack.append([name, now])

    def exit(self) -> None:
        stack, now = self._stack(), time.perf_counter()
        name, since = stack.pop()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since
        if stack:
            stack[-1][1] = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def totals(self) -> dict[str, float]:
        """Seconds per phase so far, the innermost running phase included up to now (the phases around it are paused
        and already counted)."""
        out, stack = dict(self.seconds), self._stack()
        if stack:
            name, since = stack[-1]
            out[name] = out.get(name, 0.0) + time.perf_counter() - since
        return out

    @staticmethod
    def difference(later: dict[str, float], earlier: dict[str, float]) -> dict[str, float]:
        """``later - earlier`` per phase (two :meth:`totals`)."""
        return {k: v - earlier.get(k, 0.0) for k, v in later.items() if v - earlier.get(k, 0.0) > 0}


#: The process's phase clock (what ``summary.json``'s ``phase_seconds`` reports).
PHASES = PhaseClock()


def phase(name: str):
    """``with phase("keys"): ...`` times the block as that phase of :data:`PHASES`."""
    return PHASES.phase(name)
