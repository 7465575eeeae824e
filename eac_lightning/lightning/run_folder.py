"""The run folder: one writer at a time (a lock file), and history files that survive a resume whole.

- :class:`RunLock`: ``<run>/.lock`` holds the writing process's pid and host; a second run into the same folder is
  refused while that process lives, and a lock left by a dead process (``kill -9``) is taken over.
- :class:`RunCSVLogger`: Lightning's CSV logger deletes ``metrics.csv`` when it opens; this one keeps the rows
  already there (the unedited baseline included), and :func:`trim_metrics` drops those logged after the
  checkpoint a run resumes from.
- :func:`read_ledger`: ``edits.jsonl`` lines, tolerating a last line cut short by a crash (dropped, with a notice).
- :func:`set_aside_unfinished_start`: the records of a run stopped before its first checkpoint move aside, so
  ``--ckpt_path last`` starts it over instead of refusing.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger

LOCK_NAME = ".lock"


class RunFolderLockedError(RuntimeError):
    """Another live process is writing to this run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder (see the module docstring). ``acquire`` raises
    :class:`RunFolderLockedError` naming the holder; ``release`` removes the lock if this process holds it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self.holder()
                if held and held.get("pid") == me["pid"] and held.get("host") == me["host"]:
                    self.held = True
                    return
                if held and held.get("host") == me["host"] and _alive(int(held.get("pid", -1))):
                    raise RunFolderLockedError(self._in_use(int(held["pid"]))) from None
                if held and held.get("host") != me["host"]:
                    raise RunFolderLockedError(
                        f"run folder {self.root} is locked by process {held.get('pid')} on host {held.get('host')} "
                        f"({self.path}); remove the lock file if that run is over (nothing was written)"
                    ) from None
                warnings.warn(f"taking over the stale lock {self.path} of process "
                              f"{held.get('pid') if held else '?'}, which no longer runs", stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise RunFolderLockedError(f"could not lock run folder {self.root}: its lock file {self.path} was "
                                   "replaced by another process while this one took it over; run again, or choose "
                                   "another --trainer.default_root_dir")

    @staticmethod
    def command_line(pid: int) -> str | None:
        """The command line of a live process of this host (``/proc/<pid>/cmdline``), ``None`` where unreadable."""
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return " ".join(a.decode("utf-8", "replace") for a in raw.split(b"\0") if a) or None

    def _in_use(self, pid: int) -> str:
        """The refusal for a lock held by the live process ``pid`` of this host: what runs there (when
        ``/proc`` tells), and how to clear the lock if that process is not an eac-lightning run on this folder."""
        cmd = self.command_line(pid)
        clear = (f"if no eac-lightning run is using this folder, delete {self.path} and run again "
                 "(nothing was written)")
        if cmd is None:
            return (f"run folder {self.root} is in use by process {pid} (lock file {self.path}); wait for it to "
                    f"finish or choose another --trainer.default_root_dir; {clear}")
        shown = cmd if len(cmd) <= 60 else cmd[:57] + "..."
        if "eac_lightning" in cmd or "eac-lightning" in cmd:
            return (f"run folder {self.root} is in use by process {pid} ({shown}; lock file {self.path}); wait for "
                    f"it to finish or choose another --trainer.default_root_dir; {clear}")
        if "python" in Path(cmd.split(" ", 1)[0]).name.lower():
            # A Python process may run eac-lightning in-process (a test, a notebook): not taken over.
            return (f"run folder {self.root} is in use by process {pid} ({shown}; lock file {self.path}), a Python "
                    f"process that may run eac-lightning from Python; {clear}")
        return (f"run folder {self.root} is in use by process {pid} ({shown}; lock file {self.path}), which is not "
                "an eac-lightning run: the lock was probably left by a run that ended and its process id reused; "
                f"{clear}")

    def release(self) -> None:
        held = self.holder()
        if self.held and held and held.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


class _KeepingWriter(_ExperimentWriter):
    """Lightning's CSV writer, except that opening keeps an existing ``metrics.csv`` and its header."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = list(csv.DictReader(fh).fieldnames or [])


class RunCSVLogger(CSVLogger):
    """``metrics.csv`` in the run folder, kept whole across resumes (see the module docstring)."""

    @property
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


def keep_csv_rows(path: Path, keep: Callable[[dict[str, str]], bool]) -> None:
    """Rewrite a history CSV with only the rows ``keep`` accepts (atomically; untouched when all are kept)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        keys, rows = list(reader.fieldnames or []), list(reader)
    kept = [r for r in rows if keep(r)]
    if len(kept) == len(rows):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the rows of ``metrics.csv`` logged at or before ``last_step`` (a fresh run: ``-1``, none)."""
    keep_csv_rows(path, lambda r: r.get("step") not in (None, "") and int(float(r["step"])) <= last_step)


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The records of ``edits.jsonl``. A last line cut short (a crash mid-write) is dropped with a notice; a
    damaged line before it raises naming the file and the line."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines):
                warnings.warn(f"{path} line {i} is cut short (an interrupted write); dropped", stacklevel=2)
                continue
            raise ValueError(f"{path} line {i} is not valid JSON ({err}); the ledger is damaged") from err
    return out


def ledger_until(records: list[dict[str, Any]], edits: int, step: int) -> list[dict[str, Any]]:
    """The ledger lines of a run standing after ``edits`` edits (edit step ``step``): its edits, the refreshed
    edits written up to that step, and every event (a rollback)."""
    def kept(r: dict[str, Any]) -> bool:
        if "edit" in r:
            return r["edit"] < edits
        if r.get("refreshed"):
            return int(r.get("step", 0)) <= step
        return True

    return [r for r in records if kept(r)]


def write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite a JSONL file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def set_aside_unfinished_start(root: Path) -> Path | None:
    """A run stopped during its first edit step (before the first checkpoint) leaves an edit log, a ledger line or
    metrics that no checkpoint stands at. Everything in ``root`` but its lock moves to
    ``root/interrupted/<time>/`` (kept, not deleted), so the run can start over in the same folder. Returns that
    folder, or None when ``root`` holds no edit log (nothing was started there). The caller holds the run's lock."""
    if not (root / "history" / "HEAD").is_file():
        return None
    aside = root / "interrupted" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for entry in sorted(root.iterdir()):
        if entry.name not in (LOCK_NAME, "interrupted", "checkpoints"):
            os.replace(entry, aside / entry.name)
    return aside
