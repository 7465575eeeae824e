"""Rollback: return a run to exactly its state after K edits, optionally dropping bad edits from the rest.

Every edit step leaves ``checkpoints/edit-step=S.ckpt`` (the default ``ModelCheckpoint`` keeps them all), so the
state after K edits is a file, bit-identical to what a run stopped there saved. :func:`rollback` makes it
``last.ckpt``, moves the later checkpoints to ``rolled_back/``, cuts ``edits.jsonl``, ``metrics.csv`` and
``norms.csv`` back to edit K and appends a ``rollback`` event naming every removed edit to the ledger. Edits listed
in ``drop`` are left out of the stream when the run resumes (``fit --ckpt_path last``), so an operator removes a bad
edit and replays the rest:

    eac-lightning rollback runs/x --to_edit 40 --drop [41]
    eac-lightning fit --config ... --ckpt_path last
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from eac_lightning.lightning.checkpoint import (
    AtomicCheckpointIO,
    load_checkpoint_file,
    verify_deltas,
)
from eac_lightning.lightning.run_folder import RunLock, keep_csv_rows, read_ledger, trim_metrics, write_lines

DATAMODULE_KEY = "EditDataModule"


def _step_checkpoints(root: Path) -> dict[int, Path]:
    out = {}
    for p in (root / "checkpoints").glob("edit-step=*.ckpt"):
        try:
            out[int(p.stem.split("=", 1)[1].split("-")[0])] = p
        except ValueError:
            continue
    return out


def rollback(run: str | os.PathLike, to_edit: int, drop: Sequence[int] = ()) -> dict[str, Any]:
    """Return the run folder ``run`` to its state after ``to_edit`` edits (see the module docstring).

    Args:
        run: the run folder (``--trainer.default_root_dir`` of the run).
        to_edit: edits kept (the ledger's edits ``0 .. to_edit-1``); must end an edit step.
        drop: stream positions (the ledger's ``edit`` numbers, each ≥ ``to_edit``) left out when the run resumes.

    Returns the ledger's rollback event.
    """
    root = Path(run)
    if not (root / "checkpoints").is_dir():
        raise FileNotFoundError(f"{root} is not a run folder (no checkpoints/)")
    if isinstance(to_edit, bool) or not isinstance(to_edit, int) or to_edit < 1:
        raise ValueError(f"--to_edit must be an edit count >= 1, got {to_edit!r} (to start over, start a new run)")
    bad = [d for d in drop if isinstance(d, bool) or not isinstance(d, int) or d < to_edit]
    if bad:
        raise ValueError(f"--drop {bad}: only edits at or after --to-edit {to_edit} can be dropped from the replay")
    lock = RunLock(root)
    lock.acquire()
    try:
        return _rollback(root, to_edit, sorted(set(drop)))
    finally:
        lock.release()


def _rollback(root: Path, to_edit: int, drop: list[int]) -> dict[str, Any]:
    ledger_path = root / "edits.jsonl"
    ledger = read_ledger(ledger_path)
    edits = [r for r in ledger if "edit" in r]
    steps_at = {}  # edits applied -> the step that completed them
    for r in edits:
        steps_at[r["edit"] + 1] = r["step"]
    applied = max(steps_at, default=0)
    if to_edit > applied:
        raise ValueError(f"--to_edit {to_edit}: {ledger_path} records only {applied} edits")
    ends = sorted(k for k in steps_at if steps_at.get(k + 1) != steps_at[k])
    if to_edit not in ends:
        raise ValueError(f"--to_edit {to_edit} falls inside an edit batch; the run's states are after "
                         f"{', '.join(map(str, ends[:20]))}{' ...' if len(ends) > 20 else ''} edits")
    step = steps_at[to_edit]
    ckpts = _step_checkpoints(root)
    if step not in ckpts:
        raise FileNotFoundError(f"{root}/checkpoints/edit-step={step}.ckpt (the state after {to_edit} edits) does "
                                "not exist; rollback needs the per-step checkpoints the default ModelCheckpoint keeps")
    source = ckpts[step]
    ckpt = load_checkpoint_file(source)
    state = ckpt["eac_lightning"]
    verify_deltas(source, state["deltas"], (state.get("provenance") or {}).get("deltas_sha256"))
    dm_state = ckpt.get(DATAMODULE_KEY, {})
    if int(dm_state.get("position", -1)) != to_edit:
        raise ValueError(f"{source} holds the state after {dm_state.get('position')} edits, not {to_edit}; "
                         "the ledger and the checkpoints disagree")
    by_edit = {r["edit"]: [r.get("source"), r.get("source_index")] for r in edits}
    unknown = [d for d in drop if d not in by_edit]
    if unknown:
        raise ValueError(f"--drop {unknown}: not edits of this run's ledger (applied edits: 0..{applied - 1})")
    # Records are named by (source, row): stream positions shift once a record is left out.
    dm_state["dropped"] = [list(x) for x in dm_state.get("dropped", [])] + [by_edit[d] for d in drop]
    ckpt[DATAMODULE_KEY] = dm_state

    # Later states are moved aside, not deleted: a rollback can itself be undone by hand.
    aside = root / "rolled_back" / time.strftime(f"to-edit-{to_edit}-%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for s, p in ckpts.items():
        if s > step:
            shutil.move(str(p), aside / p.name)
    last = root / "checkpoints" / "last.ckpt"
    if last.exists():
        shutil.copy2(last, aside / "last.ckpt")
    AtomicCheckpointIO().save_checkpoint(ckpt, last)

    removed = [r for r in edits if r["edit"] >= to_edit]
    event = {
        "event": "rollback", "to_edit": to_edit, "step": step, "checkpoint": source.name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "moved_to": str(aside.relative_to(root)),
        "removed": [{k: r.get(k) for k in ("edit", "step", "source", "source_index", "case_id", "subject",
                                            "target_new")} for r in removed],
        "dropped_from_replay": drop,
    }
    write_lines(ledger_path, [r for r in ledger if r.get("edit", -1) < to_edit] + [event])
    trim_metrics(root / "metrics.csv", step)
    keep_csv_rows(root / "norms.csv", lambda r: int(float(r["edits"])) <= to_edit)
    summary = root / "summary.json"
    if summary.exists():
        shutil.move(str(summary), aside / "summary.json")  # it describes the state rolled back from
    return event


def rollback_command(argv: Sequence[str]) -> None:
    """``eac-lightning rollback RUN --to-edit K [--drop E ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="eac-lightning rollback", description=rollback.__doc__.split("\n")[0])
    parser.add_argument("run", help="the run folder")
    parser.add_argument("--to-edit", type=int, required=True, help="edits kept (ledger edits 0 .. K-1)")
    parser.add_argument("--drop", type=int, nargs="*", default=[],
                        help="ledger edit numbers (>= K, rolled back) to leave out when the run resumes")
    args = parser.parse_args(list(argv))
    run, event = args.run, rollback(args.run, args.to_edit, args.drop)
    print(f"rolled {run} back to {args.to_edit} edits ({event['checkpoint']}); removed {len(event['removed'])} edits "
          f"(kept in {event['moved_to']}); dropped from the replay: {event['dropped_from_replay'] or 'none'}")
