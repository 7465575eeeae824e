"""EditingModule: one edit batch per Lightning step.

``training_step`` runs the method's target optimisation (two-phase for EAC, :func:`~eac_lightning.methods.edit.
optimise_targets`) and returns the targets; the :class:`~eac_lightning.lightning.callbacks.WeightUpdate` callback
receives them as the step's output, writes them (:func:`~eac_lightning.methods.edit.write_targets`) and hands the
result to :meth:`EditingModule.apply_written`, the one place the run's weights and deltas change. ``global_step``
advances once per edit batch, so checkpoint and logging cadence count edits (see :meth:`training_step`).

The run's weights and method state live in an :class:`~eac_lightning.session.EditSession` whose edit log is
``<run>/history`` (:mod:`eac_lightning.session.log`: one compact entry per edit step, snapshots, HEAD). Lightning's
checkpoint (``checkpoints/last.ckpt``) holds no weights: the id of the log entry it stands at, the stream position,
loop counters, the callbacks' records, the RNG state and what the run belongs to (base model, method, data).
Resuming replays the log to that entry, bit-identical to the run that wrote it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from eac_lightning.data.requests import EditRequest
from eac_lightning.lightning.checkpoint import (
    CheckpointMismatchError,
    data_fingerprint,
    method_spec,
    model_fingerprint,
    provenance,
    verify_provenance,
)
from eac_lightning.methods.base import Deltas, EditMethod, Written, snapshot
from eac_lightning.methods.edit import EditResult, optimise_targets
from eac_lightning.methods.rome import ROME
from eac_lightning.models.adapters import weight_view
from eac_lightning.models.loading import load_model, resolve_model_path
from eac_lightning.progress import PHASE_NAMES, PHASES, PhaseClock, phase
from eac_lightning.session import EditLog, EditSession
from eac_lightning.stats.covariance import CovarianceStore
from eac_lightning.validation import (
    context_limit,
    longest_template,
    validate_module_args,
)

CKPT_KEY = "eac_lightning"


class EditingModule(L.LightningModule):
    """Sequential model editing as a LightningModule.

    Args:
        model: ``testbed:tiny``, ``testbed:small`` (built offline on first use), a local Hugging Face folder or a
            hub id.
        method: the editing method (``configs/methods/*.yaml``); default ROME on the model's default layer.
        dtype: weights' dtype.
        adapter: module-name templates of a family without a built-in adapter (a dict of
            :class:`~eac_lightning.models.adapters.ArchSpec` fields or a YAML/JSON file; docs/models.md).
        stats_corpus: corpus of the key covariance C (local path or hub dataset name); default: a testbed's own
            training-stream sample, else WikiText-2.
        stats_tokens: tokens of that corpus averaged into C.
        stats_damping: ε of the damped solve (C + ε·tr(C)/d·I).
        method_settings: ``auto``: on a testbed, the method's measured testbed settings
            (``configs/testbed/<method>.yaml``) replace the preset's, except the settings you gave (the settings
            resolver, :mod:`eac_lightning.methods.settings`; summary.json records each source). Applied by the CLI
            and ``Editor.load`` before the method is built; a method object passed here is taken as given.
            ``as_given``: the method exactly as configured.
        allow_method_change: resume a checkpoint written by another method or other hyper-parameters
            (refused otherwise, naming the field that differs).
        device_map: place a model larger than one device with accelerate's big-model dispatch: ``auto`` or
            {module name: device index | "cpu" | "disk"} (docs/multi_device.md). The edited layers and the input
            embeddings must stay resident (a device or "cpu"); the run prints where each part went.
        offload_folder: where ``device_map``'s "disk" modules are kept.
        snapshot_every: edit steps between snapshots of the accumulated deltas and method state in the edit log
            (``history/snapshots``; one is also written at the end of fit, and only the newest is kept). A resume
            replays at most this many steps; a rollback to before the snapshot replays from the root. A snapshot
            is the size of the edited matrices (and AlphaEdit's r × r record of earlier keys): docs/benchmarks.md, "Edit log".
    """

    def __init__(
        self,
        model: str = "testbed:small",
        method: EditMethod | None = None,
        dtype: str = "float32",
        adapter: dict | str | None = None,
        stats_corpus: str | None = None,
        stats_tokens: int = 100_000,
        stats_damping: float = 1e-2,
        method_settings: str = "auto",
        allow_method_change: bool = False,
        snapshot_every: int = 100,
        device_map: str | dict[str, int | str] | None = None,
        offload_folder: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints carry deltas, not the base model's weights
        self.model_name = model
        # A testbed is built here, before any Trainer runs: building it inside a running fit would nest trainers.
        self.model_path = resolve_model_path(model)
        self.method = method or ROME()
        self.dtype_name = dtype
        self.adapter = adapter
        self.stats_corpus, self.stats_tokens, self.stats_damping = stats_corpus, stats_tokens, stats_damping
        if method_settings not in ("auto", "as_given"):
            raise ValueError(f"--model.method_settings must be 'auto' or 'as_given', not {method_settings!r}")
        self.method_settings = method_settings
        self.allow_method_change = allow_method_change
        validate_module_args(stats_tokens=stats_tokens, stats_damping=stats_damping)
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 0:
            raise ValueError(f"--model.snapshot_every must be an edit-step count >= 0, got {snapshot_every!r}")
        self.snapshot_every = snapshot_every
        if device_map is not None and not (device_map == "auto" or isinstance(device_map, dict)):
            raise ValueError(f"--model.device_map must be 'auto' or a mapping {{module: device}}, got {device_map!r}")
        if isinstance(device_map, dict) and "disk" in device_map.values() and not offload_folder:
            raise ValueError("--model.device_map puts modules on 'disk': give --model.offload_folder DIR for them")
        self.device_map, self.offload_folder = device_map, offload_folder
        self.lm = None
        self.tokenizer = None
        self.stats: CovarianceStore | None = None
        self.session: EditSession | None = None
        self.base_fingerprint: dict[str, Any] | None = None
        self.extra_state: dict[str, Any] = {}  # callbacks' state that must survive a resume
        self._resumed = False
        # Where the run's time goes (summary.json's phase_seconds): this process's share of the process clock from
        # here on, added to the earlier processes' of a resumed run (checkpointed in extra_state).
        self._phases_from = PHASES.totals()
        self._phases_earlier: dict[str, float] = {}
        self._step_phases_from: dict[str, float] | None = None

    # -- model -----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.lm is not None:
            return
        lm, self.tokenizer = load_model(self.model_path, dtype=self.dtype_name, adapter=self.adapter,
                                        device_map=self.device_map, offload_folder=self.offload_folder)
        for p in lm.parameters():
            p.requires_grad_(False)  # targets are optimised through hooks; weights change only by closed forms
        if self.device_map is None:
            self.lm = lm
        else:
            # A placed model is not a submodule: Lightning moves its module to one device, which would undo the
            # placement (and cannot move disk-offloaded weights).
            object.__setattr__(self, "lm", lm)
            self._report_placement()

    def _report_placement(self) -> None:
        placed: dict[str, list[str]] = {}
        for module, where in (getattr(self.lm, "hf_device_map", None) or {}).items():
            placed.setdefault(str(where), []).append(module or "(whole model)")
        if not self._trainer or self.trainer.global_rank == 0:
            print("model placement (--model.device_map): " + "; ".join(
                f"{where}: {', '.join(mods[:6])}{f' and {len(mods) - 6} more' if len(mods) > 6 else ''}"
                for where, mods in placed.items()), file=sys.stderr)

    def _check_resident(self) -> None:
        """The edited matrices are written in place and the inputs go where the embeddings are: neither may be
        offloaded to disk (accelerate keeps those weights on the meta device)."""
        embed = self.lm.get_input_embeddings()
        named = [(n, weight_view(self.lm, n)) for n in self.method.module_names]
        named.append(("input embeddings", embed.weight))
        off = [n for n, w in named if w.device.type == "meta"]
        if off:
            raise ValueError(f"--model.device_map offloads {', '.join(off)} to disk; the edited layers and the input "
                             "embeddings must stay on a device or 'cpu': map them (their decoder layers) to one")

    def setup(self, stage: str) -> None:
        with phase("setup"):  # the key statistics inside count as "statistics"
            self._setup(stage)

    def _setup(self, stage: str) -> None:
        self.configure_model()
        if self._trainer is not None and self.device_map is None:
            # Lightning moves the module to the accelerator only after setup(); the key statistics and context
            # templates below run forwards of the model, so it goes to its device first (same place, moved once).
            self.lm.to(self.trainer.strategy.root_device)
        if self.stats is None:
            self.stats = CovarianceStore(self.lm, self.tokenizer, corpus=self.stats_corpus,
                                         num_tokens=self.stats_tokens, damping=self.stats_damping)
        self.method.setup(self.lm, self.tokenizer, self.stats)
        if self.device_map is not None:
            self._check_resident()
        if self.session is None:  # the unedited matrices, copied before any delta is applied
            base = snapshot(self.lm, self.method.module_names)
            self.base_fingerprint = model_fingerprint(self.lm, base)
            self.session = EditSession(self.lm, self.method, EditLog(None), self.snapshot_every, base)
        dm = self._datamodule()
        if dm is not None:  # every record is checked against this model before the first edit
            dm.screen(self.tokenizer, context_limit(self.lm), longest_template(self.tokenizer, self.method))

    @property
    def base_weights(self) -> dict[str, torch.Tensor] | None:
        return None if self.session is None else self.session.base_weights

    @property
    def total_deltas(self) -> Deltas:
        """D, the accumulated change of every edited matrix (float32, CPU)."""
        return {} if self.session is None else self.session.deltas

    def materialise(self) -> None:
        """W = W_base + D for every edited matrix (:meth:`EditSession.materialise`)."""
        self.session.materialise()

    def identity(self) -> dict[str, Any]:
        """What the edit log's root entry records: the base model and the method (ask and export check them)."""
        return {"model": self.model_name, "dtype": self.dtype_name, "base_model": self.base_fingerprint,
                "method": method_spec(self.method)}

    def on_train_start(self) -> None:
        # A fresh run starts the run folder's edit log (rank 0 writes it; other ranks keep theirs in memory).
        if self._resumed:
            return
        trainer = self.trainer
        folder = Path(trainer.default_root_dir) / "history" if trainer.global_rank == 0 else None
        log = EditLog(folder)
        if log.exists():
            raise CheckpointMismatchError(
                f"{folder} holds the edit log of an earlier run; resume it with --ckpt_path last or choose another "
                "--trainer.default_root_dir (nothing was overwritten)")
        self.session.log = log
        self.session.start(self.identity())

    def configure_optimizers(self) -> None:
        # No optimizer: weights change only through the closed-form writes. Lightning then steps its no-op
        # ``_MockOptimizer``, which is what counts the edit batches (see training_step).
        return None

    # -- steps -----------------------------------------------------------------------------------------------
    def training_step(self, batch: list[EditRequest], batch_idx: int) -> dict[str, Any]:
        """Optimise the batch's targets (nothing is applied unless the whole batch is valid) and return them: the
        ``WeightUpdate`` callback receives them as ``outputs["targets"]`` and writes them."""
        with phase("target"):
            targets = optimise_targets(self.method, self.lm, self.tokenizer, batch)
        # In manual optimisation ``global_step`` counts optimizer steps and nothing else; this one step of
        # Lightning's no-op optimizer counts the edit batch, so checkpoint cadence, ``max_steps`` and resume count
        # edit batches. It changes no weight.
        self.optimizers().step()
        return {"targets": targets}

    def apply_written(self, result: EditResult, requests: list[EditRequest] = ()) -> str:
        """Append a write to the edit log and set W = W_base + D (called by ``WeightUpdate`` once the datamodule's
        position counts the batch). The entry keeps what a rollback to this step needs to resume from it: stream
        position, Lightning's loop counters (as ``ModelCheckpoint`` would save them now), RNG and data identity.
        Returns the entry's id."""
        trainer, dm = self._trainer, self._datamodule()
        resume: dict[str, Any] = {"rng": torch.get_rng_state()}
        if trainer is not None:
            resume.update(global_step=trainer.global_step, epoch=trainer.current_epoch,
                          loops=trainer._checkpoint_connector._get_loops_state_dict())
        if dm is not None:
            resume.update(datamodule=dm.state_dict(), data=data_fingerprint(dm, dm.position))
        with phase("write"):
            return self.session.commit(
                Written(result.deltas, None, result.factors), step=trainer.global_step if trainer else 0,
                position=dm.position if dm is not None else 0, requests=requests,
                refreshed=[rec.request for rec in result.records if rec.refreshed], resume=resume,
                sync=_from_rank_zero if trainer is not None and trainer.world_size > 1 else None)

    # -- where the time goes -----------------------------------------------------------------------------------
    def phase_seconds(self) -> dict[str, float]:
        """Wall seconds of each phase of the run so far (:data:`~eac_lightning.progress.PHASE_NAMES`; all its
        processes, a resumed run's earlier ones included): what ``summary.json`` reports as ``phase_seconds``."""
        mine = PhaseClock.difference(PHASES.totals(), self._phases_from)
        total = {k: self._phases_earlier.get(k, 0.0) + mine.get(k, 0.0) for k in {*mine, *self._phases_earlier}}
        return {k: round(total[k], 3) for k in sorted(total, key=_phase_order)}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if "phase_seconds_first_step" not in self.extra_state and not self._resumed:
            self._step_phases_from = PHASES.totals()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The first edit step alone (after the callbacks' writes): it pays what a run pays once (the Cholesky factor
        # of C at the first solve), so a reader can tell a stream's steady cost from it.
        if self._step_phases_from is not None:
            first = PhaseClock.difference(PHASES.totals(), self._step_phases_from)
            self.extra_state["phase_seconds_first_step"] = {k: round(first[k], 3)
                                                            for k in sorted(first, key=_phase_order)}
            self._step_phases_from = None

    def validation_step(self, batch, batch_idx: int) -> None:
        return None  # the Evaluation callback measures the model state at validation end

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def on_train_end(self) -> None:
        if self.session.log.folder is not None:
            self.session.save_snapshot()  # the next resume, rollback, ask or export replays nothing

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.extra_state["phase_seconds"] = self.phase_seconds()
        checkpoint["state_dict"] = {}  # the frozen base model is never written; the edits are in the edit log
        checkpoint[CKPT_KEY] = {
            "model": self.model_name,
            "dtype": self.dtype_name,
            "head": self.session.head,
            "extra_state": self.extra_state,
            "rng": {"torch": torch.get_rng_state()},
            "provenance": provenance(self, self._datamodule()),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        path = Path(getattr(trainer, "ckpt_path", None) or "(checkpoint)")
        state = checkpoint.get(CKPT_KEY)
        if state is None:
            raise CheckpointMismatchError(f"{path} was not written by eac-lightning (no 'eac_lightning' section)")
        if "head" not in state:
            raise CheckpointMismatchError(
                f"{path} holds its edits inside the checkpoint (an eac-lightning format before the edit log); this "
                "version reads runs whose edits are in <run>/history - re-run the stream with this version")
        if self.session is None:
            self.setup("fit")
        recorded = state.get("provenance") or {}
        dm = self._datamodule()
        applied = int(checkpoint.get(type(dm).__qualname__, {}).get("position", 0)) if dm is not None else 0
        current = {"base_model": self.base_fingerprint, "method": method_spec(self.method)}
        if dm is not None:
            current["data"] = data_fingerprint(dm, applied)
        verify_provenance(f"checkpoint {path}", recorded, current, self.allow_method_change)
        run = run_folder_of(path)
        fitting = trainer is not None and trainer.state.fn == "fit"
        if fitting and trainer.global_rank == 0 and not _same_folder(run, Path(trainer.default_root_dir)):
            raise CheckpointMismatchError(
                f"checkpoint {path} belongs to the run folder {run}, not to --trainer.default_root_dir "
                f"{trainer.default_root_dir}; resume it in its own folder (--trainer.default_root_dir {run})")
        self.session.log = EditLog(run / "history")
        if fitting and trainer.global_rank > 0:  # ranks > 0 replay rank 0's log read-only, then log in memory
            self.session.checkout(state["head"])
            self.session.continue_in_memory()
        else:
            moved = "resume" if fitting and self.session.log.head() != state["head"] else None
            self.session.checkout(state["head"], move_head=moved, checkpoint=str(path))
        self.extra_state = state.get("extra_state", {})
        self._phases_earlier = dict(self.extra_state.get("phase_seconds", {}))  # the processes before this one
        torch.set_rng_state(state["rng"]["torch"])
        self._resumed = True


def _phase_order(name: str) -> tuple[int, str]:
    return (PHASE_NAMES.index(name) if name in PHASE_NAMES else len(PHASE_NAMES), name)


def _from_rank_zero(t: torch.Tensor) -> None:
    """Overwrite ``t`` (CPU) with rank 0's: every rank adds rank 0's update, so the ranks stay bit-identical. The
    message is the log entry's factors, not the edited matrices."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":  # NCCL moves CUDA tensors only
        on_device = t.cuda()
        dist.broadcast(on_device, src=0)
        t.copy_(on_device.cpu())
    else:
        dist.broadcast(t, src=0)


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/last.ckpt``), symlinks resolved."""
    return Path(checkpoint).resolve().parent.parent


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False

