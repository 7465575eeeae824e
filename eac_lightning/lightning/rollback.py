"""Rollback: return a run to exactly its state after K edits, optionally dropping bad edits from the rest.

The run's edit log (``history/``) holds every edit step on HEAD's branch, and each entry keeps what resuming from it
needs. :func:`rollback` finds the entry after K edits on the current branch, replays the log to it (checking every
entry), moves HEAD there (journalled in ``history/log.jsonl``), writes ``checkpoints/last.ckpt`` standing at that
entry, cuts ``edits.jsonl``, ``metrics.csv`` and ``norms.csv`` back to edit K and appends a ``rollback`` event naming
every removed edit to the ledger. The removed entries stay in the log as an abandoned branch; a resumed run
(``fit --ckpt_path last``) continues from K as a new branch. Edits listed in ``drop`` are left out of the stream when
the run resumes, so an operator removes a bad edit and replays the rest:

    eac-lightning rollback runs/x --to-edit 40 --drop 41
    eac-lightning fit --config ... --ckpt_path last
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from eac_lightning.lightning.checkpoint import AtomicCheckpointIO, load_checkpoint_file
from eac_lightning.lightning.export import locate
from eac_lightning.lightning.run_folder import (
    RunLock,
    keep_csv_rows,
    ledger_until,
    read_ledger,
    trim_metrics,
    write_lines,
)
from eac_lightning.session import EditLog, EditLogError

DATAMODULE_KEY = "EditDataModule"
CKPT_KEY = "eac_lightning"


def rollback(run: str | os.PathLike, to_edit: int, drop: Sequence[int] = ()) -> dict[str, Any]:
    """Return the run folder ``run`` to its state after ``to_edit`` edits (see the module docstring).

    Args:
        run: the run folder (``--trainer.default_root_dir`` of the run).
        to_edit: edits kept (the ledger's edits ``0 .. to_edit-1``); must end an edit step.
        drop: stream positions (the ledger's ``edit`` numbers, each ≥ ``to_edit``) left out when the run resumes.

    Returns the ledger's rollback event.
    """
    root = Path(run)
    if not (root / "checkpoints" / "last.ckpt").is_file() or not (root / "history" / "HEAD").is_file():
        raise FileNotFoundError(f"{root} is not a run folder (no checkpoints/last.ckpt or history/HEAD)")
    if isinstance(to_edit, bool) or not isinstance(to_edit, int) or to_edit < 1:
        raise ValueError(f"--to-edit must be an edit count >= 1, got {to_edit!r} (to start over, start a new run)")
    bad = [d for d in drop if isinstance(d, bool) or not isinstance(d, int) or d < to_edit]
    if bad:
        raise ValueError(f"--drop {bad}: only edits at or after --to-edit {to_edit} can be dropped from the replay")
    lock = RunLock(root)
    lock.acquire()
    try:
        return _rollback(root.resolve(), to_edit, sorted(set(drop)))
    finally:
        lock.release()


def _rollback(root: Path, to_edit: int, drop: list[int]) -> dict[str, Any]:
    log = EditLog(root / "history")
    _, head = locate(root)
    line = [log.header(i) for i in log.lineage(head)]
    applied = line[-1]["position"]
    if to_edit > applied:
        raise ValueError(f"--to-edit {to_edit}: the run's current state holds only {applied} edits")
    at = [h for h in line if h["position"] == to_edit and h["kind"] == "step"]
    if not at:
        ends = [h["position"] for h in line if h["kind"] == "step"]
        raise ValueError(f"--to-edit {to_edit} falls inside an edit batch; the run's states are after "
                         f"{', '.join(map(str, ends[:20]))}{' ...' if len(ends) > 20 else ''} edits")
    target = at[-1]
    ledger_path = root / "edits.jsonl"
    ledger = read_ledger(ledger_path)
    edits = [r for r in ledger if "edit" in r and r["edit"] < applied]
    by_edit = {r["edit"]: [r.get("source"), r.get("source_index")] for r in edits}
    unknown = [d for d in drop if d not in by_edit]
    if unknown:
        raise ValueError(f"--drop {unknown}: not edits of this run's ledger (applied edits: 0..{applied - 1})")

    # Every entry up to the target is checked (checksums, finite updates) before anything in the folder changes.
    resume = log.verified_resume(target["id"])

    last = root / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint_file(last)
    state = ckpt.get(CKPT_KEY)
    if state is None or "head" not in state:
        raise EditLogError(f"{last} is not an eac-lightning checkpoint of the edit-log format")
    dm_state = dict(resume["datamodule"])
    # Records are named by (source, row): stream positions shift once a record is left out.
    dm_state["dropped"] = [list(x) for x in dm_state.get("dropped", [])] + [by_edit[d] for d in drop]
    ckpt[DATAMODULE_KEY] = dm_state
    ckpt["loops"] = resume["loops"]
    ckpt["global_step"], ckpt["epoch"] = resume["global_step"], resume["epoch"]
    extra = dict(state.get("extra_state", {}))
    for key in ("norms", "evaluations"):  # the callbacks' records after edit K belong to the removed branch
        if key in extra:
            extra[key] = [r for r in extra[key] if r.get("edits", 0) <= to_edit]
    state.update(head=target["id"], extra_state=extra, rng={"torch": resume["rng"]})
    state["provenance"] = {**state.get("provenance", {}), "data": resume["data"]}

    # The state rolled back from is kept beside the run (its entries stay in the log as a branch).
    aside = root / "rolled_back" / time.strftime(f"to-edit-{to_edit}-%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    shutil.copy2(last, aside / "last.ckpt")
    AtomicCheckpointIO().save_checkpoint(ckpt, last)
    log.move_head(target["id"], "rollback", to_edit=to_edit, dropped=drop)

    removed = [r for r in ledger if "edit" in r and r["edit"] >= to_edit]
    event = {
        "event": "rollback", "to_edit": to_edit, "step": target["step"], "entry": target["id"],
        "from_entry": head, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "moved_to": str(aside.relative_to(root)),
        "removed": [{k: r.get(k) for k in ("edit", "step", "source", "source_index", "case_id", "subject",
                                            "target_new")} for r in removed],
        "dropped_from_replay": drop,
    }
    write_lines(ledger_path, ledger_until(ledger, to_edit, target["step"]) + [event])
    trim_metrics(root / "metrics.csv", target["step"])
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
    print(f"rolled {run} back to {args.to_edit} edits (entry {event['entry'][:12]}); removed {len(event['removed'])} edits "
          f"(kept in {event['moved_to']}); dropped from the replay: {event['dropped_from_replay'] or 'none'}")
