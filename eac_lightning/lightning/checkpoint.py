"""Checkpoint I/O that never leaves a half-written file and names the file it cannot read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupted or not a checkpoint)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to ``<path>.tmp`` and renames it over ``path``: an interrupted write leaves the previous
    checkpoint intact. Reading a damaged file raises :class:`CorruptCheckpointError` naming it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=False)
        except Exception as err:
            raise CorruptCheckpointError(
                f"checkpoint {path} is truncated or corrupt and cannot be loaded ({type(err).__name__}: {err}); "
                "nothing was changed - resume from another checkpoint"
            ) from err
