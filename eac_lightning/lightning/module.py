"""EditingModule: one edit batch per Lightning step.

``training_step`` runs the method's target optimisation (two-phase for EAC, :func:`~eac_lightning.methods.edit.
optimise_targets`) and returns the targets; the :class:`~eac_lightning.lightning.callbacks.WeightUpdate` callback
receives them as the step's output, writes them (:func:`~eac_lightning.methods.edit.write_targets`) and hands the
result to :meth:`EditingModule.apply_written`, the one place the run's weights and deltas change. ``global_step``
advances once per edit batch, so checkpoint and logging cadence count edits (see :meth:`training_step`).

Checkpoints hold only what editing changed, never the frozen base model: the accumulated delta of every edited
matrix, the method's state (context templates, AlphaEdit's K_pK_pᵀ, B-EAC's anchor record), the evaluation
reference, and the RNG states.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from eac_lightning.data.requests import EditRequest
from eac_lightning.evaluation.evaluator import EvaluatorConfig
from eac_lightning.lightning.checkpoint import (
    data_fingerprint,
    method_spec,
    model_fingerprint,
    provenance,
    verify_deltas,
    verify_provenance,
)
from eac_lightning.methods.base import Deltas, EditMethod, merge_deltas, snapshot
from eac_lightning.methods.edit import EditResult, optimise_targets
from eac_lightning.methods.rome import ROME
from eac_lightning.models.adapters import weight_view
from eac_lightning.models.loading import load_model, resolve_model_path
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
        evaluation: what the evaluation callback and ``validate`` measure.
        method_settings: ``auto``: on a testbed, the method's measured testbed settings
            (``configs/testbed/<method>.yaml``) replace the published preset values it still holds (values you set
            yourself are kept; summary.json lists what changed); ``as_given``: the method exactly as configured.
        allow_method_change: resume a checkpoint written by another method or other hyper-parameters
            (refused otherwise, naming the field that differs).
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
        evaluation: EvaluatorConfig | None = None,
        method_settings: str = "auto",
        allow_method_change: bool = False,
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
        self.evaluation = evaluation or EvaluatorConfig()
        if method_settings not in ("auto", "as_given"):
            raise ValueError(f"--model.method_settings must be 'auto' or 'as_given', not {method_settings!r}")
        self.method_settings = method_settings
        #: what ``method_settings: auto`` changed (set by the CLI, which applies it before the method is built)
        self.method_settings_applied: dict[str, Any] = {}
        self.allow_method_change = allow_method_change
        validate_module_args(stats_tokens=stats_tokens, stats_damping=stats_damping)
        self.lm = None
        self.tokenizer = None
        self.stats: CovarianceStore | None = None
        self.total_deltas: Deltas = {}
        self.base_weights: dict[str, torch.Tensor] | None = None
        self.base_fingerprint: dict[str, Any] | None = None
        self.extra_state: dict[str, Any] = {}  # callbacks' state that must survive a resume

    # -- model -----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.lm is not None:
            return
        self.lm, self.tokenizer = load_model(self.model_path, dtype=self.dtype_name, adapter=self.adapter)
        for p in self.lm.parameters():
            p.requires_grad_(False)  # targets are optimised through hooks; weights change only by closed forms

    def setup(self, stage: str) -> None:
        self.configure_model()
        if self._trainer is not None:
            # Lightning moves the module to the accelerator only after setup(); the key statistics and context
            # templates below run forwards of the model, so it goes to its device first (same place, moved once).
            self.lm.to(self.trainer.strategy.root_device)
        if self.stats is None:
            self.stats = CovarianceStore(self.lm, self.tokenizer, corpus=self.stats_corpus,
                                         num_tokens=self.stats_tokens, damping=self.stats_damping)
        self.method.setup(self.lm, self.tokenizer, self.stats)
        if self.base_weights is None:  # copies of the unedited matrices, taken before any delta is applied
            self.base_weights = snapshot(self.lm, self.method.module_names)
            self.base_fingerprint = model_fingerprint(self.lm, self.base_weights)
        dm = self._datamodule()
        if dm is not None:  # every record is checked against this model before the first edit
            dm.screen(self.tokenizer, context_limit(self.lm), longest_template(self.tokenizer, self.method))

    @torch.no_grad()
    def materialise(self) -> None:
        """W = W_base + D for every edited matrix.

        Done after each write and on resume, so an interrupted-and-resumed run holds bit-identical weights to an
        uninterrupted one (the in-place adds of a write round differently from one add of the accumulated D).
        """
        for name, d in self.total_deltas.items():
            w = weight_view(self.lm, name)
            w.copy_(self.base_weights[name].to(w.device) + d.to(w))

    def configure_optimizers(self) -> None:
        # No optimizer: weights change only through the closed-form writes. Lightning then steps its no-op
        # ``_MockOptimizer``, which is what counts the edit batches (see training_step).
        return None

    # -- steps -----------------------------------------------------------------------------------------------
    def training_step(self, batch: list[EditRequest], batch_idx: int) -> dict[str, Any]:
        """Optimise the batch's targets (nothing is applied unless the whole batch is valid) and return them: the
        ``WeightUpdate`` callback receives them as ``outputs["targets"]`` and writes them."""
        targets = optimise_targets(self.method, self.lm, self.tokenizer, batch)
        # In manual optimisation ``global_step`` counts optimizer steps and nothing else; this one step of
        # Lightning's no-op optimizer counts the edit batch, so checkpoint cadence, ``max_steps`` and resume count
        # edit batches. It changes no weight.
        self.optimizers().step()
        return {"targets": targets}

    def apply_written(self, result: EditResult) -> None:
        """Add a write's deltas to the run's accumulated D and set W = W_base + D (called by ``WeightUpdate``)."""
        merge_deltas(self.total_deltas, result.deltas)
        self.materialise()

    def validation_step(self, batch, batch_idx: int) -> None:
        return None  # the Evaluation callback measures the model state at validation end

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {}  # the frozen base model is never written
        checkpoint[CKPT_KEY] = {
            "model": self.model_name,
            "dtype": self.dtype_name,
            "deltas": {k: v.clone() for k, v in self.total_deltas.items()},
            "method_state": self.method.state_dict(),
            "extra_state": self.extra_state,
            "rng": {"torch": torch.get_rng_state()},
            "provenance": provenance(self, self._datamodule()),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        path = getattr(self._trainer, "ckpt_path", None) or "(checkpoint)"
        state = checkpoint.get(CKPT_KEY)
        if state is None:
            raise ValueError(f"{path} was not written by eac-lightning (no 'eac_lightning' section)")
        if self.base_weights is None:
            self.setup("fit")
        recorded = state.get("provenance") or {}
        verify_deltas(path, state["deltas"], recorded.get("deltas_sha256"))
        dm = self._datamodule()
        applied = int(checkpoint.get(type(dm).__qualname__, {}).get("position", 0)) if dm is not None else 0
        current = {"base_model": self.base_fingerprint, "method": method_spec(self.method)}
        if dm is not None:
            current["data"] = data_fingerprint(dm, applied)
        verify_provenance(path, recorded, current, self.allow_method_change)
        self.total_deltas = {k: v.float() for k, v in state["deltas"].items()}
        unknown = set(self.total_deltas) - set(self.base_weights)
        if unknown:
            raise ValueError(f"checkpoint edits {sorted(unknown)}, which this method does not edit")
        self.materialise()
        self.method.load_state_dict(state["method_state"])
        self.extra_state = state.get("extra_state", {})
        torch.set_rng_state(state["rng"]["torch"])
