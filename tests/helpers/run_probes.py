"""Callbacks that tests add to a CLI run through a config file (importable with PYTHONPATH=tests/helpers)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch


class KillAfter(L.Callback):
    """SIGKILL the process at the start of edit step ``steps`` (after ``steps`` edits were applied and saved)."""

    def __init__(self, steps: int = 2) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpWeights(L.Callback):
    """Write each rank's edited matrices to ``<dir>/weights-rank<r>.pt`` at the end of fit."""

    def __init__(self, dir: str) -> None:
        self.dir = dir

    def on_train_end(self, trainer, pl_module) -> None:
        from eac_lightning.models.adapters import weight_view

        w = {n: weight_view(pl_module.lm, n).detach().clone() for n in pl_module.base_weights}
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        torch.save(w, Path(self.dir) / f"weights-rank{trainer.global_rank}.pt")



class TermAtFirstCheckpoint(L.Callback):
    """SIGTERM the process while Lightning assembles the first checkpoint: the first edit is written and in the
    ledger, no checkpoint is on disk yet (the window an outside SIGTERM can fall into)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
