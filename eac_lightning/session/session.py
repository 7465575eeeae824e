"""EditSession: the one place an editing run's weights and method state change, whoever drives it.

It keeps the base weights (one copy of each edited matrix, taken before any edit), the accumulated deltas D, the
:class:`~eac_lightning.session.log.EditLog` and its HEAD. The edited model always holds W = W_base + D, and D is the
in-order sum of the stored updates on HEAD's branch, each added by :func:`~eac_lightning.session.log.add_update`,
so a replay of the log equals the run that wrote it bit for bit. The LightningModule, the notebook
:class:`~eac_lightning.editor.Editor`, ``ask`` and ``export`` go through it; ``rollback`` reads the same log.

    session = EditSession(model, method, EditLog(run / "history"))
    session.start(identity)              # the root entry: base model, method, its state after setup
    session.commit(written, step=1, position=1, requests=batch)   # after method.write(...)
    session.checkout(session.parent())   # undo: replay from the nearest snapshot
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from eac_lightning.methods.base import Deltas, EditMethod, Written, snapshot
from eac_lightning.models.adapters import weight_view
from eac_lightning.session.log import (
    EditLog,
    EditLogError,
    add_update,
    check_parts,
    compact_update,
    flatten,
    unflatten,
)


def _request_identity(r: Any) -> list:
    return [r.source, r.source_index, r.case_id, r.subject, r.target_new]


class EditSession:
    """Base weights, current deltas, the edit log and the method state of one editing run.

    Args:
        model: the model being edited (in place).
        method: the editing method, set up on ``model`` (its ``module_names`` are the edited matrices).
        log: where entries and snapshots go (a run folder's ``history/`` or memory).
        snapshot_every: write a snapshot of D and the method state every this many entries on a branch (0: only
            when :meth:`save_snapshot` is called). A checkout replays at most this many entries.
        base_weights: the unedited matrices when the caller already holds them (else copied from ``model`` now,
            which must then be unedited).
    """

    def __init__(self, model: nn.Module, method: EditMethod, log: EditLog, snapshot_every: int = 0,
                 base_weights: dict[str, torch.Tensor] | None = None) -> None:
        self.model, self.method, self.log = model, method, log
        self.snapshot_every = snapshot_every
        self.base_weights = base_weights if base_weights is not None else snapshot(model, method.module_names)
        self.deltas: Deltas = {}
        self.depth = 0  # entries from the root to HEAD

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def head(self) -> str | None:
        return self.log.head()

    @torch.no_grad()
    def materialise(self) -> None:
        """W = W_base + D for every edited matrix (the in-place adds of a write round differently from one add of
        the accumulated D, so the weights are always set from D)."""
        for name, w0 in self.base_weights.items():
            w = weight_view(self.model, name)
            d = self.deltas.get(name)
            if d is None:
                w.copy_(w0)
            else:
                torch.add(w0.to(w.device), d.to(w), out=w)  # no temporary of the matrix's size

    # -- writing ---------------------------------------------------------------------------------------------
    def start(self, identity: dict[str, Any]) -> str:
        """The root entry: ``identity`` (base-model fingerprint, method spec...) and the method's state after setup.
        Idempotent: the same identity and state give the same root id."""
        tensors: dict[str, torch.Tensor] = {}
        header = {"kind": "root", "parent": None, "step": 0, "position": 0, "identity": identity,
                  "method": flatten(self.method.state_dict(), "method", tensors)}
        ident = self.log.append(header, tensors, journal={"kind": "root"})
        self.deltas, self.depth = {}, 0
        self.materialise()
        return ident

    def continue_in_memory(self) -> None:
        """Keep logging in memory from the current state (DDP ranks > 0, which write no files): a root entry with a
        snapshot of D and the method state."""
        self.log = EditLog(None)
        tensors: dict[str, torch.Tensor] = {}
        header = {"kind": "root", "parent": None, "step": 0, "position": 0, "identity": {"continued": True},
                  "method": flatten(self.method.state_dict(), "method", tensors)}
        self.log.append(header, tensors)
        self.depth = 0
        self.save_snapshot()

    def commit(self, written: Written, *, step: int, position: int, requests: Sequence[Any] = (),
               refreshed: Sequence[Any] = (), resume: dict[str, Any] | None = None,
               journal: dict[str, Any] | None = None, sync: Callable[[torch.Tensor], None] | None = None) -> str:
        """Append the step the method just wrote (``method.write``'s :class:`Written`) and set W = W_base + D.

        ``requests`` are the step's new edits, ``refreshed`` the earlier ones it wrote again (B-EAC's refresh).
        ``resume`` is what continuing from this step needs besides weights and method state (stream position,
        loop counters, RNG); it is kept in the entry for ``rollback``. ``sync`` replaces each stored update tensor in
        place with one process's (DDP: a broadcast from rank 0), so every rank adds the same update. If the entry
        cannot be stored (a full disk), the weights and the method state return to HEAD's and the error is raised:
        nothing of the step remains."""
        tensors: dict[str, torch.Tensor] = {}
        updates: dict[str, dict[str, torch.Tensor]] = {}
        factors = written.factors or {}
        for name, d in written.deltas.items():
            if name not in self.base_weights:
                raise EditLogError(f"the method wrote {name}, which this session does not edit")
            updates[name] = compact_update(d, factors.get(name))
            for part, t in updates[name].items():
                if sync is not None:
                    sync(t)
                tensors[f"update/{name}/{part}"] = t
        header = {
            "kind": "step", "parent": self.head, "step": int(step), "position": int(position),
            "requests": [_request_identity(r) for r in requests],
            "refreshed": [_request_identity(r) for r in refreshed],
            "updates": {n: "dense" if "dense" in p else "low_rank" for n, p in updates.items()},
            "method": flatten(self.method.step_state(), "method", tensors),
            "resume": flatten(resume or {}, "resume", tensors),
        }
        try:
            ident = self.log.append(header, tensors, journal)
        except BaseException:
            head = self.head
            if head is not None:
                self.checkout(head)  # the method's own state moved with its write: replayed back
            raise
        for name, parts in updates.items():
            self.deltas[name] = add_update(self.deltas.get(name), parts)
        self.depth += 1
        self.materialise()
        if self.snapshot_every and self.depth % self.snapshot_every == 0:
            self.save_snapshot()
        return ident

    def save_snapshot(self) -> None:
        """Store D and the method's whole state at HEAD (a later checkout replays from here)."""
        head = self.head
        if head is None or self.log.has_snapshot(head):
            return
        tensors = {f"delta/{n}": d for n, d in self.deltas.items()}
        header = {"method": flatten(self.method.state_dict(), "method", tensors), "depth": self.depth}
        self.log.save_snapshot(head, header, tensors)

    # -- reading ---------------------------------------------------------------------------------------------
    def parent(self, ident: str | None = None) -> str | None:
        ident = ident or self.head
        return None if ident is None else self.log.header(ident).get("parent")

    def checkout(self, ident: str, move_head: str | None = None, **details: Any) -> dict[str, Any]:
        """Replay the log from the nearest snapshot (or the root) to entry ``ident``: D, the method state and the
        weights become exactly those of the run right after that entry. With ``move_head`` (a reason), HEAD then
        points there and the move is journalled. Returns the entry's header with its ``resume`` unflattened."""
        line = self.log.lineage(ident)
        start = max((i for i, e in enumerate(line) if self.log.has_snapshot(e)), default=None)
        if start is not None:
            header, tensors = self.log.snapshot(line[start])
            deltas = {k[len("delta/"):]: t.clone() for k, t in tensors.items() if k.startswith("delta/")}
            where = f"snapshot {line[start][:16]}"
            for name, d in deltas.items():
                self._check_update(name, {"dense": d}, where)
            state = unflatten(header["method"], tensors)
        else:
            start = 0
            header, tensors = self.log.entry(line[0])
            if header.get("kind") != "root":
                raise EditLogError(f"the edit log's first entry {line[0][:16]} is not a root entry")
            deltas, state = {}, unflatten(header["method"], tensors)
        self.method.load_state_dict(state)
        for ident_i in line[start + 1:]:
            header, tensors = self.log.entry(ident_i)
            for name in header["updates"]:
                parts = {p: tensors[f"update/{name}/{p}"] for p in ("dense", "left", "right")
                         if f"update/{name}/{p}" in tensors}
                self._check_update(name, parts, f"entry {ident_i[:16]}")
                deltas[name] = add_update(deltas.get(name), parts)
            self.method.replay_step(unflatten(header["method"], tensors))
        for name, d in deltas.items():  # factors were finite; their products could still overflow
            if not torch.isfinite(d).all():
                raise EditLogError(f"edit log: replaying to {ident[:16]} makes the delta of {name} non-finite; "
                                   "nothing was loaded")
        self.deltas, self.depth = deltas, len(line) - 1
        self.materialise()
        if move_head:
            self.log.move_head(ident, move_head, **details)
        if len(line) - 1 == start:  # the entry itself was not read above
            header, tensors = self.log.entry(ident)
        out = dict(header)
        if "resume" in header:
            out["resume"] = unflatten(header["resume"], tensors)
        return out

    def _check_update(self, name: str, parts: dict[str, torch.Tensor], where: str) -> None:
        w0 = self.base_weights.get(name)
        if w0 is None:
            raise EditLogError(f"edit log {where} updates {name}, which this method does not edit "
                               f"({', '.join(self.base_weights)})")
        check_parts(parts, tuple(w0.shape), name, where)
