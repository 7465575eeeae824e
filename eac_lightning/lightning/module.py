"""EditingModule: one edit batch per Lightning step.

``training_step`` runs the method's target optimisation (two-phase for EAC) with manual optimisation; the
closed-form write that changes the weights is done by :class:`~eac_lightning.lightning.callbacks.WeightUpdate`,
so every weight change passes through one place that records it. ``global_step`` advances once per edit batch,
so checkpoint and logging cadence count edits.

Checkpoints hold only what editing changed, never the frozen base model: the accumulated delta of every edited
matrix, the method's state (context templates, AlphaEdit's K_pK_pᵀ, B-EAC's anchor record), the evaluation
reference, and the RNG states.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from eac_lightning.data.requests import EditRequest, validate_requests
from eac_lightning.evaluation.evaluator import EvaluatorConfig
from eac_lightning.methods.base import Deltas, EditMethod, merge_deltas, snapshot
from eac_lightning.methods.rome import ROME
from eac_lightning.models.adapters import weight_view
from eac_lightning.models.loading import load_model, resolve_model_path
from eac_lightning.stats.covariance import CovarianceStore

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
        self.lm = None
        self.tokenizer = None
        self.stats: CovarianceStore | None = None
        self.total_deltas: Deltas = {}
        self.pending: Any = None  # targets of the current step, written by the WeightUpdate callback
        self.pending_requests: list[EditRequest] = []
        self.step_started = 0.0
        self.edit_clock = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.base_weights: dict[str, torch.Tensor] | None = None
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

    @torch.no_grad()
    def materialise(self) -> None:
        """W = W_base + D for every edited matrix.

        Done after each write and on resume, so an interrupted-and-resumed run holds bit-identical weights to an
        uninterrupted one (the in-place adds of a write round differently from one add of the accumulated D).
        """
        for name, d in self.total_deltas.items():
            w = weight_view(self.lm, name)
            w.copy_(self.base_weights[name].to(w.device) + d.to(w))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Weights change only through closed forms, but in manual optimisation ``global_step`` counts
        # ``optimizer.step()`` calls: one no-op step per edit batch makes checkpoint/log cadence count edits.
        return torch.optim.SGD([self.edit_clock], lr=0.0)

    # -- steps -----------------------------------------------------------------------------------------------
    def training_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        self.step_started = time.perf_counter()
        validate_requests(batch, self.tokenizer)  # nothing is applied unless the whole batch is valid
        with torch.enable_grad():
            self.pending = self.method.compute_targets(self.lm, self.tokenizer, batch)
        self.pending_requests = batch
        self.optimizers().step()  # advances global_step by one edit batch (see configure_optimizers)
        return None

    def write_pending(self) -> Deltas:
        """The closed-form write of this step's targets (called by the WeightUpdate callback)."""
        deltas = self.method.write(self.lm, self.tokenizer, self.pending)
        merge_deltas(self.total_deltas, deltas)
        self.materialise()
        self.pending = None
        return deltas

    def validation_step(self, batch, batch_idx: int) -> None:
        return None  # the Evaluation callback measures the model state at validation end

    # -- checkpoints -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {}  # the frozen base model is never written
        checkpoint[CKPT_KEY] = {
            "model": self.model_name,
            "deltas": {k: v.clone() for k, v in self.total_deltas.items()},
            "method_state": self.method.state_dict(),
            "extra_state": self.extra_state,
            "rng": {"torch": torch.get_rng_state()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CKPT_KEY)
        if state is None:
            raise ValueError("this checkpoint was not written by eac-lightning (no 'eac_lightning' section)")
        if self.base_weights is None:
            self.setup("fit")
        self.total_deltas = {k: v.float() for k, v in state["deltas"].items()}
        unknown = set(self.total_deltas) - set(self.base_weights)
        if unknown:
            raise ValueError(f"checkpoint edits {sorted(unknown)}, which this method does not edit")
        self.materialise()
        self.method.load_state_dict(state["method_state"])
        self.extra_state = state.get("extra_state", {})
        torch.set_rng_state(state["rng"]["torch"])
