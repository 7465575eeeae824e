"""The edit log: a run's history as an append-only log of compact entries plus occasional snapshots.

The design databases use (a write-ahead log and snapshots). Every locate-then-edit update is low-rank per matrix
(ROME: u vᵀ per edit; MEMIT / AlphaEdit / B-EAC: R Aᵀ, (d × b)(b × d_k) for a batch of b), so an entry stores the
factors, not the matrix; FT's dense update, and any update whose factors would not be smaller than the matrix, is
stored dense. Beside the update an entry holds the method's state increment (AlphaEdit's and B-EAC's: the step's
keys, not the accumulated d_k × d_k matrix; small states whole) and what a resume needs at that step (stream
position, Lightning's loop counters, RNG state).

Layout under ``<run>/history/``::

    entries/<id>.safetensors     one entry: tensors + a JSON header (parent id, step, position, sha256 of each
                                 tensor); <id> is the sha256 of that header, so an entry names its content and
                                 its parent, and a branch is explicit
    snapshots/<id>.safetensors   the accumulated deltas D and the method's whole state after entry <id>
                                 (the newest only: a replay starts there, or at the root)
    HEAD                         the id of the current entry: the run's one current state
    log.jsonl                    the journal, one line per appended entry and per move of HEAD (rollback, resume
                                 from an older checkpoint)

Files are safetensors (tensors and a string header only): loading one never runs code. Every read checks the
header's id, each tensor's sha256, finiteness and shapes, and names the file when something is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "eac-lightning/edit-log/1"
HEADER_KEY = "eac_lightning"


class EditLogError(RuntimeError):
    """An edit-log file that is missing, damaged, altered or foreign; the message names the file."""


# -- plain-data <-> (JSON tree, tensors) ---------------------------------------------------------------------------
def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` (nested dicts, lists, tuples, tensors and plain values) as a JSON tree whose tensors are moved to
    ``tensors`` under path-like keys (``{"__tensor__": key}`` marks where each was)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()  # not copied: the log copies what it keeps in memory
        if any(t.untyped_storage().data_ptr() == u.untyped_storage().data_ptr() for u in tensors.values()):
            t = t.clone()  # safetensors stores each tensor's own bytes
        tensors[prefix] = t
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[flatten(k, f"{prefix}/k{i}", tensors), flatten(v, f"{prefix}/v{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"edit log: cannot store a {type(obj).__name__} at {prefix} (tensors and plain data only)")


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`flatten`."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__items__"}:
            return {_hashable(unflatten(k, tensors)): unflatten(v, tensors) for k, v in tree["__items__"]}
        if set(tree) == {"__tuple__"}:
            return tuple(unflatten(v, tensors) for v in tree["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


# -- updates ---------------------------------------------------------------------------------------------------
def compact_update(dense: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """How an entry stores one matrix's update: ``{"left", "right"}`` (ΔW = left @ right, float32) when the method
    gave factors smaller than the matrix, else ``{"dense"}`` (float32)."""
    out_dim, in_dim = dense.shape
    if factors is not None:
        left, right = factors
        rank = left.shape[1]
        if left.shape == (out_dim, rank) and right.shape == (rank, in_dim) and rank * (out_dim + in_dim) < out_dim * in_dim:
            return {"left": left.detach().float().cpu().contiguous(), "right": right.detach().float().cpu().contiguous()}
    return {"dense": dense.detach().float().cpu().contiguous()}


def expand_update(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW (float32, CPU) of a stored update."""
    if "dense" in parts:
        return parts["dense"]
    return parts["left"] @ parts["right"]


def add_update(total: torch.Tensor | None, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """D + ΔW in place (D = ``total``; a new tensor when None). The one place a stored update enters D: the live
    run and every replay add exactly this, which is why a replay is bit-identical to the run that wrote the log."""
    if total is None:
        return expand_update(parts).clone()
    if "dense" in parts:
        return total.add_(parts["dense"])
    return total.addmm_(parts["left"], parts["right"])


def check_parts(parts: dict[str, torch.Tensor], shape: tuple[int, ...], name: str, where: str) -> None:
    """Refuse a stored update that is not exactly ``shape`` (one that would merely broadcast too) or not finite."""
    got = tuple(parts["dense"].shape) if "dense" in parts else (
        parts["left"].shape[0], parts["right"].shape[1]) if parts["left"].shape[1] == parts["right"].shape[0] else None
    if got != tuple(shape):
        raise EditLogError(f"edit log {where}: the update of {name} has shape {got}, the matrix {tuple(shape)} "
                           "(another model's log?); nothing was loaded")
    if not all(torch.isfinite(t).all() for t in parts.values()):
        raise EditLogError(f"edit log {where}: the update of {name} holds NaN or inf; nothing was loaded")


# -- files -----------------------------------------------------------------------------------------------------
def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``: an interrupted or failed write leaves no partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) or "No space left" in str(err):
            raise OSError(getattr(err, "errno", None) or 28, f"cannot write {path} ({err}); nothing of this step "
                          "was recorded, the previous state is intact") from err
        raise


def _atomic_write(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def _write_record(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """Write a safetensors file whose header carries ``header`` plus each tensor's sha256 and the header's own id;
    returns the id."""
    header = {**header, "format": FORMAT, "tensors": {k: tensor_sha256(t) for k, t in sorted(tensors.items())}}
    ident = hashlib.sha256(_canonical(header)).hexdigest()
    if path.name == "{id}.safetensors":
        path = path.with_name(f"{ident}.safetensors")
    meta = {HEADER_KEY: json.dumps({**header, "id": ident}, allow_nan=True)}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))  # streamed: no copy of a large snapshot
    return ident


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of an entry or snapshot file, checked against its id (no tensor is read)."""
    if not path.is_file():
        raise EditLogError(f"edit log file {path} does not exist (the run folder lost part of history/)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        header = json.loads(meta[HEADER_KEY])
    except Exception as err:  # noqa: BLE001 - any damage is reported the same way
        raise EditLogError(f"edit log file {path} is truncated or corrupt ({type(err).__name__}: {err}); "
                           "nothing was loaded") from None
    ident = header.pop("id", None)
    if header.get("format") != FORMAT:
        raise EditLogError(f"{path} is not an eac-lightning edit-log file (format {header.get('format')!r})")
    if ident != hashlib.sha256(_canonical(header)).hexdigest():
        raise EditLogError(f"edit log file {path}: its header does not match its id (altered or corrupt); "
                           "nothing was loaded")
    header["id"] = ident
    return header


def read_record(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header and tensors of an entry or snapshot file, every tensor checked against its sha256."""
    header = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # noqa: BLE001
        raise EditLogError(f"edit log file {path} is truncated or corrupt ({type(err).__name__}: {err}); "
                           "nothing was loaded") from None
    if set(tensors) != set(header["tensors"]):
        raise EditLogError(f"edit log file {path}: holds tensors {sorted(tensors)[:4]}... but its header names "
                           f"{sorted(header['tensors'])[:4]}...; nothing was loaded")
    for key, t in tensors.items():
        if tensor_sha256(t) != header["tensors"][key]:
            raise EditLogError(f"edit log file {path}: tensor '{key}' does not match its sha256 (the file was "
                               "corrupted or altered); nothing was loaded")
    return header, tensors


class EditLog:
    """Entries, snapshots and HEAD of one run, in ``folder`` (``<run>/history``) or, with ``folder=None``, in memory
    (the Python API's :class:`~eac_lightning.editor.Editor`). See the module docstring for the layout."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self._entries: dict[str, tuple[dict, dict]] = {}  # in memory: id -> (header, tensors)
        self._snapshots: dict[str, tuple[dict, dict]] = {}
        self._head: str | None = None
        self._headers: dict[str, dict] = {}  # cache of read headers (entries are immutable)

    # -- paths ---------------------------------------------------------------------------------------------
    def entry_path(self, ident: str) -> Path:
        return self.folder / "entries" / f"{ident}.safetensors"

    def snapshot_path(self, ident: str) -> Path:
        return self.folder / "snapshots" / f"{ident}.safetensors"

    def exists(self) -> bool:
        return self._head is not None if self.folder is None else (self.folder / "HEAD").is_file()

    # -- writing -------------------------------------------------------------------------------------------
    def append(self, header: dict[str, Any], tensors: dict[str, torch.Tensor], journal: dict | None = None) -> str:
        """Store an entry (its header names its parent) and move HEAD to it; returns its id."""
        if self.folder is None:
            full = {**header, "format": FORMAT, "tensors": {k: tensor_sha256(t) for k, t in sorted(tensors.items())}}
            ident = hashlib.sha256(_canonical(full)).hexdigest()
            self._entries[ident] = ({**full, "id": ident}, {k: t.detach().cpu().clone() for k, t in tensors.items()})
            self._head = ident
            return ident
        tmp = self.folder / "entries" / "{id}.safetensors"
        ident = _write_record(tmp, header, tensors)
        self._journal({"entry": ident, "parent": header.get("parent"), "step": header.get("step"),
                       "position": header.get("position"), "bytes": self.entry_path(ident).stat().st_size,
                       **(journal or {})})
        self._set_head(ident)
        return ident

    def save_snapshot(self, ident: str, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Store the full state after entry ``ident`` and drop the older snapshots: one is kept, so the log grows
        by its entries alone (a checkout from before it replays from the root)."""
        header = {**header, "entry": ident}
        if self.folder is None:
            self._snapshots = {ident: (header, {k: t.detach().cpu().clone() for k, t in tensors.items()})}
            return
        _write_record(self.snapshot_path(ident), header, tensors)
        for old in (self.folder / "snapshots").glob("*.safetensors"):
            if old.name != f"{ident}.safetensors":
                old.unlink(missing_ok=True)

    def move_head(self, ident: str, reason: str, **details: Any) -> None:
        """Point HEAD at an existing entry (rollback; resume from an older checkpoint), recorded in the journal."""
        self.header(ident)  # must exist and be intact
        before = self.head()
        if before == ident:
            return
        if self.folder is not None:
            self._journal({"event": "head", "from": before, "to": ident, "reason": reason, **details})
        self._set_head(ident)

    def _set_head(self, ident: str) -> None:
        self._head = ident
        if self.folder is not None:
            _atomic_write(self.folder / "HEAD", (ident + "\n").encode())

    def _journal(self, record: dict[str, Any]) -> None:
        record = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(self.folder / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    # -- reading -------------------------------------------------------------------------------------------
    def head(self) -> str | None:
        """The current entry's id (read from ``HEAD`` each time: a rollback in another process moves it)."""
        if self.folder is None:
            return self._head
        path = self.folder / "HEAD"
        if not path.is_file():
            return None
        ident = path.read_text(encoding="utf-8").strip()
        if len(ident) != 64 or any(c not in "0123456789abcdef" for c in ident):
            raise EditLogError(f"{path} does not hold an entry id ({ident[:80]!r}); the run's current state is "
                               "unknown - restore the file or roll back with 'eac-lightning rollback'")
        self._head = ident
        return ident

    def header(self, ident: str) -> dict[str, Any]:
        if self.folder is None:
            if ident not in self._entries:
                raise EditLogError(f"the edit log holds no entry {ident[:16]}")
            return self._entries[ident][0]
        if ident not in self._headers:
            self._headers[ident] = read_header(self.entry_path(ident))
            if self._headers[ident]["id"] != ident:
                raise EditLogError(f"{self.entry_path(ident)} holds entry {self._headers[ident]['id'][:16]}, not "
                                   f"{ident[:16]}")
        return self._headers[ident]

    def entry(self, ident: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.folder is None:
            header, tensors = self._entries[ident] if ident in self._entries else (self.header(ident), {})
            return header, tensors
        return read_record(self.entry_path(ident))

    def snapshot(self, ident: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        if self.folder is None:
            return self._snapshots.get(ident)
        path = self.snapshot_path(ident)
        return read_record(path) if path.is_file() else None

    def has_snapshot(self, ident: str) -> bool:
        return ident in self._snapshots if self.folder is None else self.snapshot_path(ident).is_file()

    def lineage(self, ident: str) -> list[str]:
        """The ids from the root to ``ident`` (inclusive), following parent links: one branch, whatever others
        the log holds."""
        out = []
        seen = set()
        cur: str | None = ident
        while cur is not None:
            if cur in seen:
                raise EditLogError(f"the edit log's parent links loop at {cur[:16]}")
            seen.add(cur)
            out.append(cur)
            cur = self.header(cur).get("parent")
        return out[::-1]

    def verified_resume(self, ident: str) -> dict[str, Any]:
        """Check every entry from the root to ``ident`` (checksums, finite updates) and return ``ident``'s resume
        record (stream position, loop counters, RNG), as rollback needs before it changes anything."""
        header, tensors = {}, {}
        for i in self.lineage(ident):
            header, tensors = self.entry(i)
            for key, t in tensors.items():
                if key.startswith("update/") and not torch.isfinite(t).all():
                    raise EditLogError(f"edit log entry {i[:16]}: {key} holds NaN or inf; nothing was changed")
        return unflatten(header.get("resume", {}), tensors)

    def discard(self, ident: str) -> None:
        """Drop an in-memory entry (and its snapshot) that is no longer on any branch (the Python API's undo)."""
        if self.folder is None and ident != self._head:
            self._entries.pop(ident, None)
            self._snapshots.pop(ident, None)
