"""Reading a run's current model: ``eac-lightning export`` and what ``ask`` shares with it.

:func:`load_edited_model` opens a run folder (or one of its checkpoints), loads the base model the run's edit log
names, checks it is the model the run edited (config and the unedited bytes of every edited matrix), and replays the
log to HEAD (or to the checkpoint's entry): every entry's checksums, finiteness and shapes are checked on the way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from eac_lightning.lightning.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint_file,
    model_fingerprint,
    verify_provenance,
)
from eac_lightning.methods.base import EditMethod, snapshot
from eac_lightning.session import EditLog, EditLogError, EditSession

CKPT_KEY = "eac_lightning"


class _Weights(EditMethod):
    """A stand-in method for readers: the edit log's updates are replayed, the method's own state is not needed."""

    def __init__(self, names: list[str]) -> None:
        self.module_names = names


@dataclass
class EditedModel:
    """A run's model at one entry of its edit log."""

    model: nn.Module
    tokenizer: Any
    run: Path
    head: str
    identity: dict[str, Any]
    session: EditSession


def locate(run_or_checkpoint: str | Path) -> tuple[Path, str]:
    """(run folder, entry id): a run folder's HEAD, or the entry a checkpoint of it stands at."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        run = path.resolve()
        log = EditLog(run / "history")
        head = log.head()
        if head is None:
            raise FileNotFoundError(f"{path} is not a run folder with an edit log (no history/HEAD); give the "
                                    "--trainer.default_root_dir of an eac-lightning fit")
        return run, head
    if not path.is_file():
        raise FileNotFoundError(f"{path}: neither a run folder nor a checkpoint")
    state = load_checkpoint_file(path).get(CKPT_KEY)
    if state is None:
        raise CheckpointMismatchError(f"{path} was not written by eac-lightning (no '{CKPT_KEY}' section)")
    if "head" not in state:
        raise CheckpointMismatchError(f"{path} holds its edits inside the checkpoint (an eac-lightning format before "
                                      "the edit log); re-run the stream with this version")
    return path.resolve().parent.parent, state["head"]


def load_edited_model(run_or_checkpoint: str | Path, device: str = "cpu") -> EditedModel:
    """The run's current model (see the module docstring); refuses a damaged log or another base model."""
    from eac_lightning.models.loading import load_model

    run, head = locate(run_or_checkpoint)
    log = EditLog(run / "history")
    root = log.header(log.lineage(head)[0])
    identity = root.get("identity") or {}
    if "base_model" not in identity:
        raise EditLogError(f"{log.entry_path(root['id'])} does not name the run's base model")
    model, tok = load_model(identity["model"], dtype=identity.get("dtype", "float32"), device=device)
    names = list(identity["base_model"]["weights_sha256"])
    base = snapshot(model, names)
    where = f"the edit log {run / 'history'} (base model {identity['model']})"
    verify_provenance(where, {"base_model": identity["base_model"], "method": identity["method"]},
                      {"base_model": model_fingerprint(model, base), "method": identity["method"]})
    session = EditSession(model, _Weights(names), log, base_weights=base)
    session.checkout(head)
    return EditedModel(model, tok, run, head, identity, session)


def export_command(run: str, out_dir: str, overwrite: bool = False) -> None:
    """Save a run's current model in Hugging Face format (base model + the edit log replayed; tokenizer included).

    Args:
        run: a run folder (its current state, HEAD) or one of its checkpoints (``.../checkpoints/last.ckpt``).
        out_dir: output folder, loadable with ``AutoModelForCausalLM.from_pretrained``; must not exist or be empty.
        overwrite: write into an existing, non-empty ``out_dir`` (files of the same names are replaced).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; export writes a folder - choose another OUT_DIR")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose an empty or new folder, or pass --overwrite true to "
                              "replace the model files in it")
    edited = load_edited_model(run)
    edited.model.save_pretrained(out)
    edited.tokenizer.save_pretrained(out)
    print(f"exported {edited.identity['model']} at edit-log entry {edited.head[:12]} "
          f"({edited.session.depth} edit steps, {len(edited.session.deltas)} edited matrices) to {out}")
