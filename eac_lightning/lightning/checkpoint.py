"""Checkpoints that cannot run code, never leave a half-written file, and carry what they belong to.

Reading: ``torch.load(weights_only=True)``, PyTorch's restricted unpickler that admits tensors and plain
containers only, so a checkpoint holding any other pickled object is refused before it can execute anything.

Provenance (:func:`provenance`, written by ``EditingModule.on_save_checkpoint``): the base model's fingerprint
(its config and the unedited bytes of every edited matrix), the method's class and hyper-parameters, the data
source's hash, seed and the order of the applied edits. The edits themselves are in the run's edit log, whose
entries carry their own checksums (:mod:`eac_lightning.session.log`). Resume checks the provenance
(:func:`verify_provenance`) and refuses a mismatch naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import inspect
import json
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from eac_lightning.session.log import tensor_sha256


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupted or not a checkpoint)."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint holding pickled objects other than tensors and plain data: refused unexecuted."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint written for another model, method or data stream than the run loading it."""


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that name the file: unsafe content and damage differ."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
            first = str(err).split("\n\n")[-1].strip().splitlines()[0] if str(err).strip() else ""
            raise UnsafeCheckpointError(
                f"checkpoint {path} holds pickled objects other than tensors and plain data and was refused "
                f"without running them ({first}); eac-lightning checkpoints never contain such objects"
            ) from None
        raise CorruptCheckpointError(_corrupt(path, err)) from err
    except Exception as err:
        raise CorruptCheckpointError(_corrupt(path, err)) from err


def _corrupt(path: Path, err: BaseException) -> str:
    return (f"checkpoint {path} is truncated or corrupt and cannot be loaded ({type(err).__name__}: {err}); "
            "nothing was changed - resume from another checkpoint")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to ``<path>.tmp`` and renames it over ``path``: an interrupted or failed write (a full disk) leaves
    the previous checkpoint intact and no ``.tmp``. Reading is :func:`load_checkpoint_file`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            tmp.unlink(missing_ok=True)
            full = isinstance(err, OSError) and err.errno == errno.ENOSPC or "unexpected pos" in str(err)
            why = "the disk is full" if full else f"{type(err).__name__}: {err}"
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          f"cannot write checkpoint {path} ({why}); the previous checkpoint was kept") from err

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"refusing to load {path} with weights_only=False: eac-lightning checkpoints hold "
                             "tensors and plain data only and are always loaded with weights_only=True")
        return load_checkpoint_file(path, map_location)


# -- fingerprints ----------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A hyper-parameter as JSON-comparable plain data."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _field_defaults(kind: type) -> dict[str, Any]:
    """The plain default of each field of a dataclass type (nested dataclasses as their own fields' defaults)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(kind):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = _field_defaults(type(value)) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def method_spec(method: Any) -> dict[str, Any]:
    """The method's class and its constructor arguments as they stand (defaults resolved by ``setup``), and
    ``added``: what a setting this version has and an older checkpoint lacks means when it is left alone (a
    constructor argument's default; a settings dataclass's field default), so that such a checkpoint resumes."""
    params = inspect.signature(type(method).__init__).parameters
    hparams = {n: _plain(getattr(method, n, None)) for n in params if n != "self"}
    added: dict[str, Any] = {}
    for n, p in params.items():
        value = getattr(method, n, None)
        if dataclasses.is_dataclass(value):
            added[n] = _field_defaults(type(value))
        elif n != "self" and p.default is not inspect.Parameter.empty:
            added[n] = _plain(p.default)
    return {"class": f"{type(method).__module__}.{type(method).__qualname__}", "hparams": hparams, "added": added}


def _first_difference(was: Any, now: Any, added: Any, path: str) -> tuple | None:
    """The first setting (its dotted path, then the recorded and the current value) that differs between a recorded
    and a current method spec, and for a setting the recorded one lacks how to continue the run as it was; such a
    setting counts as the same where the current value is what leaving it alone means (``added``): settings
    introduced after the checkpoint was written, at their default."""
    if not (isinstance(was, dict) and isinstance(now, dict)):
        return None if was == now else (path, was, now)
    added = added if isinstance(added, dict) else {}
    for key in sorted(set(was) | set(now)):
        where = f"{path}.{key}"
        if key not in was and key in added:
            if now[key] == added[key]:
                continue
            flag = "--model.method.init_args." + where.removeprefix("method.")
            return (where, "absent", now[key],
                    f" (a setting added since that checkpoint was written; {flag} {added[key]!r} continues the run "
                    "as it was)")
        if key not in was or key not in now:
            return where, was.get(key), now.get(key)
        found = _first_difference(was[key], now[key], added.get(key), where)
        if found is not None:
            return found
    return None


def model_fingerprint(lm: torch.nn.Module, base_weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The base model's identity: a hash of its architecture config and of each unedited edited matrix."""
    cfg = lm.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
                     "_attn_implementation_autoset"):
        cfg.pop(volatile, None)
    config = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    return {"config_sha256": config, "weights_sha256": {n: tensor_sha256(w) for n, w in base_weights.items()}}


def requests_sha256(requests: Sequence[Any], h: Any = None) -> str:
    """sha256 of a list of edit requests in order (their identity and content); ``h``: a running hash to continue."""
    h = hashlib.sha256() if h is None else h
    for r in requests:
        h.update(json.dumps([r.source, r.source_index, r.case_id, r.prompt, r.subject, r.target_new],
                            default=str).encode() + b"\n")
    return h.hexdigest()


class _AppliedHash:
    """:func:`requests_sha256` of a stream's first n requests, continued from the last n asked for: every edit step
    and checkpoint asks for the next prefix, and hashing the whole prefix each time is quadratic in the stream."""

    def __init__(self) -> None:
        self.requests: Sequence[Any] | None = None
        self.n, self.h = 0, hashlib.sha256()

    def __call__(self, requests: Sequence[Any], n: int) -> str:
        if requests is not self.requests or n < self.n:
            self.requests, self.n, self.h = requests, 0, hashlib.sha256()
        requests_sha256(requests[self.n:n], self.h)
        self.n = n
        return self.h.hexdigest()


def provenance(module: Any, datamodule: Any | None) -> dict[str, Any]:
    """What a checkpoint of ``module`` belongs to (see the module docstring)."""
    out = {"base_model": module.base_fingerprint, "method": method_spec(module.method)}
    if datamodule is not None:
        out["data"] = data_fingerprint(datamodule, datamodule.position)
    return out


def data_fingerprint(datamodule: Any, applied: int) -> dict[str, Any]:
    """The edit stream's source, seed and order, and the identity of its first ``applied`` edits."""
    running = datamodule.__dict__.setdefault("_applied_hash", _AppliedHash())
    return {"source_sha256": datamodule.source_sha256, "seed": datamodule.seed, "shuffle": datamodule.shuffle,
            "applied": applied, "applied_sha256": running(datamodule.requests, applied)}


def verify_provenance(path: Any, recorded: dict[str, Any], current: dict[str, Any],
                      allow_method_change: bool = False) -> None:
    """Refuse a checkpoint written for another base model, method or data stream, naming the field."""

    def refuse(field: str, was: Any, now: Any, hint: str = "") -> None:
        raise CheckpointMismatchError(f"{path} belongs to another run: field '{field}' was {was!r} "
                                      f"there but is {now!r} here{hint}; nothing was loaded")

    was_m, now_m = recorded["method"], current["method"]
    if not allow_method_change:
        hint = " (pass --model.allow_method_change true to change the method deliberately)"
        if was_m["class"] != now_m["class"]:
            refuse("method", was_m["class"], now_m["class"], hint)
        found = _first_difference(was_m["hparams"], now_m["hparams"], now_m.get("added"), "method")
        if found is not None:
            refuse(*found[:3], (found[3] if len(found) > 3 else "") + hint)
    was_b, now_b = recorded["base_model"], current["base_model"]
    if was_b["config_sha256"] != now_b["config_sha256"]:
        refuse("base_model.config_sha256", was_b["config_sha256"][:16], now_b["config_sha256"][:16])
    for name in sorted(set(was_b["weights_sha256"]) & set(now_b["weights_sha256"])):
        if was_b["weights_sha256"][name] != now_b["weights_sha256"][name]:
            refuse(f"base_model.weights_sha256[{name}]", was_b["weights_sha256"][name][:16],
                   now_b["weights_sha256"][name][:16])
    if "data" in recorded and "data" in current:
        was_d, now_d = recorded["data"], current["data"]
        for key in ("source_sha256", "seed", "shuffle", "applied_sha256"):
            if was_d[key] != now_d[key]:
                refuse(f"data.{key}", was_d[key], now_d[key])
