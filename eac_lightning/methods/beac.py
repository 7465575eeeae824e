"""B-EAC: batch-sequential Editing Anchor Compression with Layer-wise Anchor Selection (LAS) and Rolling Anchor
Refresh (RAR). The design is ours (only the abstract of the B-EAC paper is public); docs/beac.md states it as
equations and pseudo-code, what each part protects against and what it costs.

MEMIT-EAC compresses each edit's target z = v₀ + δ into its own anchors (EAC Eq. 1-6) but then writes it as MEMIT
does: after the first edited layer is written, the residual z − h^L is dense again (the change passes through the
layers above it), so the later layers write every row of W_l for every edit of the batch, and the edits of a batch
pile onto the same rows, batch after batch. B-EAC selects the anchors of a whole batch jointly, per edited layer:

* **LAS** (``las``), Layer-wise Anchor Selection. Each edit i gets k = ceil((100-γ)% · d) anchor dimensions (EAC's
  budget), and each anchor dimension j is placed in r (``layers_per_anchor``) of the L edited layers: a boolean plan
  M_i ∈ {0,1}^{L×d}, whose union over the layers is z's mask (EAC Eq. 3). Every layer writes only its anchors;
  MEMIT's residual spreading (Eq. 16) becomes per dimension:

      R_l[j, i] = M_i[l, j] · (z_i − h_i^L)[j] / Σ_{l' ≥ l} M_i[l', j]

  so a row of W_l that no edit of the batch anchors at layer l is never written (ΔW_l[j, :] = 0 exactly), and the
  last layer holding an anchor writes whatever is left of it. The plan is filled round-robin over the edits of the
  batch (each takes its best remaining anchor in turn, the first edit rotating per batch), with at most c
  (``max_overlap``) edits per (layer, dimension) cell and at most ceil(k·r/L) anchors per edit and layer, so
  concurrent edits do not collide and every edit is spread over the edited layers. Within a dimension, layers are
  ranked by the RAR penalty, then by the edit's own anchors there, then by the edits already in the cell. Without
  LAS each edit takes its top-k anchors for z and every layer writes the whole remaining residual (MEMIT-EAC's
  write; without RAR too, B-EAC is MEMIT-EAC).
* **RAR** (``rar``): a rolling, decaying record of the earlier batches' anchors. Its usage part U ∈ R^{L×d} counts
  the edits each (layer, dimension) anchor has carried (U ← ρ·U + Σ_i M_i after every batch); new anchors are
  ranked by the penalised priority |score_i[j]| / max|score_i| · π[l, j], π = 1 / (1 + β·U/mean(U)), so heavily
  used anchors are avoided, and the admission threshold is the order statistic of that priority that yields the
  batch's budget (n·k anchors, n·k·r/L per layer), refreshed every batch rather than fixed on the raw score. Its
  key part (``key_memory`` η > 0, :class:`BEACMEMIT`) keeps each earlier edit's keys with its anchor dimensions, and
  MEMIT's solve keeps what those keys read in those rows (row j of ΔW_l solves
  λC + KKᵀ + η Σ_{o anchors j} w_o k_o k_oᵀ, w_o = ρ^age): a new batch does not overwrite earlier edits where
  they were written. Its refresh (``refresh`` > 0) re-checks earlier edits (of the last batches, or a seeded
  draw over the whole stream) on the current model before each batch: those whose prompt no longer yields their
  target join the batch, so their anchors are re-planned on today's weights and written again. The records, the batch counter and a per-batch history are in
  :meth:`state_dict`, so a resumed run behaves exactly like an uninterrupted one.

The planning itself and RAR's key record are tensor code apart from any model (:mod:`eac_lightning.methods.beac_plan`).
Here they run as a mixin over MEMIT's code (no copy of it): :class:`BEACMEMIT` edits with MEMIT's solve,
:class:`BEAC` with AlphaEdit's null-space-projected solve (the per-row masking commutes with the
projection because both solves are row-separable in ΔW_l).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest
from eac_lightning.methods.alphaedit import AlphaEdit
from eac_lightning.methods.beac_plan import (
    AnchorKeyRecord,
    AnchorPlan,
    BEACHyperParams,
    plan_anchors,
)
from eac_lightning.methods.eac import EACHyperParams, anchor_count, check_result, explore, retrain
from eac_lightning.methods.memit import MEMIT, MEMIT_CONTEXT, MEMIT_TARGET, ResidualTarget
from eac_lightning.methods.nas import NASHyperParams
from eac_lightning.methods.target import ContextTemplateParams, TargetHyperParams, compute_keys
from eac_lightning.models.adapters import mlp_out_name


@dataclass
class LayeredTarget(ResidualTarget):
    """A MEMIT target with B-EAC's per-layer anchor plan: ``layer_masks`` (L, d) bool, row l for
    ``layers[l]``; ``anchors`` (z's mask) is their union."""

    layer_masks: torch.Tensor | None = None


class BatchAnchorMixin:
    """B-EAC's planning, over any MEMIT-family method (MEMIT's z, keys and residual spreading; the subclass's
    per-layer solve). Mix in before the base class: ``class X(BatchAnchorMixin, MEMIT)``."""

    beac: BEACHyperParams
    usage: torch.Tensor | None
    batches: int
    history: list[dict[str, float]]
    last_plan: AnchorPlan | None
    refresh_record: list[list[EditRequest]]  # RAR's refresh window: the edits of the latest batches, oldest first
    pending: tuple[list[EditRequest], list[EditRequest]] | None  # (new, refreshed) of the batch being edited

    base_label: str

    def _base_label(self) -> str:
        """The name in summaries, with the components switched off ("B-EAC w/o LAS"), as the benchmark names them
        (" + NAS" follows with NAS on, MEMIT's ``label``)."""
        off = [name for name, on in (("LAS", self.beac.las), ("RAR", self.beac.rar)) if not on]
        return self.base_label + "".join(f" w/o {name}" for name in off)

    def _init_beac(self, beac: BEACHyperParams | None) -> None:
        if self.eac is None:
            raise ValueError("B-EAC needs EAC hyper-parameters (eac: ...) for its anchor scores and retraining")
        if self.eac.anchors == "none":
            raise ValueError("B-EAC selects anchors; eac.anchors='none' (elastic net only) has none to plan")
        self.beac = copy.deepcopy(beac) if beac is not None else BEACHyperParams()
        self.usage = None
        self.batches = 0
        self.history = []
        self.last_plan = None
        self.refresh_record = []
        self.pending = None

    def _refreshing(self) -> bool:
        return self.beac.rar and self.beac.refresh > 0

    def _refresh_requests(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """RAR's refresh (docs/beac.md § 2.6): the earlier edits of the window whose bare prompt no longer yields
        their target on the current model (teacher-forced exact match), lowest token accuracy first, then oldest; at
        most ceil(refresh·n) for a batch of n. An earlier edit of a prompt the batch edits again is superseded."""
        from eac_lightning.evaluation import score_targets  # evaluation builds on methods, not the reverse

        budget = math.ceil(self.beac.refresh * len(requests))
        again = {r.prompt_text for r in requests}
        window = [r for batch in self.refresh_record for r in batch if r.prompt_text not in again]
        if not budget or not window:
            return []
        checks = self.beac.refresh_checks
        if checks is not None and len(window) > checks:
            # a uniform draw over the window, seeded by the batch's number: a resumed run draws what this one does
            drawn = sorted(random.Random(self.batches).sample(range(len(window)), checks))
            window = [window[i] for i in drawn]
        scores = score_targets(model, tok, [r.prompt_text for r in window], [r.target_new for r in window])
        failing = sorted((s.token_accuracy, i) for i, s in enumerate(scores) if not s.exact)
        return [window[i] for _, i in failing[:budget]]

    def _check_write_aware(self) -> None:
        if self.write_aware and self.beac.layers_per_anchor not in (None, len(self.layers)):
            raise ValueError(
                f"B-EAC: write_aware writes every anchor in every edited layer (δ/L each, docs/beac.md § 2.5); "
                f"beac.layers_per_anchor={self.beac.layers_per_anchor} plans fewer: set it to null or write_aware "
                "to false")

    def _solve_targets(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> list[LayeredTarget]:
        """The batch's z (and any refreshed earlier edits'), anchors planned jointly (MEMIT's ``compute_targets``
        runs this, then NAS's rescale when it is on)."""
        self._check_write_aware()
        refreshed = self._refresh_requests(model, tok, requests) if self._refreshing() else []
        self.pending = (list(requests), refreshed)
        requests = list(requests) + refreshed  # refreshed edits are planned, retrained and written with the batch
        # phase 1 of the whole batch on the same (current) model, in chunks of requests_per_forward; write-aware
        # targets are one problem (the write directions couple the batch, docs/beac.md § 2.5)
        keys = self._batch_keys(model, tok, requests) if self.write_aware else None
        if self.write_aware:
            directions = self._write_directions(model, keys)
            problems = [self._problem(model, tok, requests, directions)]
        else:
            directions = None
            problems = [self._problem(model, tok, chunk) for chunk in self._chunks(requests)]
        explorations = [explore(problem, self.eac) for problem in problems]
        scores = torch.cat([e.score.detach() for e in explorations])
        d = scores.shape[1]
        usage = self.usage if (self.beac.rar and self.usage is not None) else None
        plan = plan_anchors(
            scores, anchor_count(d, self.eac.gamma), len(self.layers), self.beac, usage,
            start=self.batches % max(1, len(requests)), apart=self._alike(model, tok, requests, keys),
        )
        self.last_plan = plan
        out, start = [], 0
        for problem, exploration in zip(problems, explorations):
            rows = slice(start, start + len(problem.requests))
            layer_masks = plan.masks[rows].to(problem.v0.device)  # (n, L, d)
            anchors = layer_masks.any(1)
            deltas = check_result(problem, retrain(problem, exploration, anchors, self.eac))  # phase 2, Eq. 3-6
            out += [LayeredTarget(r, problem.v0[i], deltas[i], anchors[i],
                                  None if directions is None else {l: a[:, i] for l, a in directions.items()},
                                  layer_masks=layer_masks[i])
                    for i, r in enumerate(problem.requests)]
            start = rows.stop
        return out

    def _alike(self, model: nn.Module, tok, requests: Sequence[EditRequest],
               keys: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
        """(n, n) bool: the pairs of the batch whose keys at the first edited layer have |cos| ≥ τ in the key
        covariance's metric, |k_iᵀC⁻¹k_j| / sqrt(k_iᵀC⁻¹k_i · k_jᵀC⁻¹k_j) (LAS's separation, docs/beac.md § 2.7);
        None without it. ``keys``: the batch's keys (:meth:`_batch_keys`) when the write-aware targets already
        read them."""
        if not self.beac.las or self.beac.alike_cosine is None or len(requests) < 2:
            return None
        layer = self.layers[0]
        keys = keys[layer] if keys is not None else compute_keys(model, tok, requests, layer, self.templates).double().T
        gram = keys.T @ self.stats.get(mlp_out_name(model, layer)).solve(keys)
        norm = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny).sqrt()
        return (gram.abs() / norm[:, None] / norm[None, :] >= self.beac.alike_cosine).cpu()

    def _layer_residual(self, i: int, targets: list[ResidualTarget], resid: torch.Tensor) -> torch.Tensor:
        """With LAS, layer i writes only the batch's anchors planned there (the per-dimension spreading above);
        without it, MEMIT's spreading of the whole remaining residual (Eq. 16)."""
        if not self.beac.las or not all(isinstance(t, LayeredTarget) and t.layer_masks is not None for t in targets):
            return super()._layer_residual(i, targets, resid)
        masks = torch.stack([t.layer_masks for t in targets]).to(resid.device)  # (n, L, d)
        here = masks[:, i].to(resid.dtype)  # (n, d)
        left = masks[:, i:].sum(1).clamp_min(1).to(resid.dtype)  # layers from this one on that hold the anchor
        return resid * (here / left).T

    def _after_write(self, model: nn.Module, tok, targets: list[ResidualTarget],
                     keys: dict[str, torch.Tensor] | None) -> None:
        super()._after_write(model, tok, targets, keys)
        masks = [t.layer_masks for t in targets if isinstance(t, LayeredTarget) and t.layer_masks is not None]
        if masks:  # the record changes only once the whole batch is written (a failed write leaves no trace)
            used = torch.stack(masks).sum(0).double().cpu()
            if self.beac.rar:
                self.usage = used if self.usage is None else self.beac.decay * self.usage + used
            summary = {"batch": float(self.batches), "edits": float(len(masks))}
            if self.last_plan is not None and self.last_plan.masks.shape[0] == len(masks):
                summary.update(self.last_plan.summary())
            if self.pending is not None and self._refreshing():
                new, refreshed = self.pending
                summary["refreshed"] = float(len(refreshed))
                # the batch's edits (refreshed ones too) become the newest slot of the window
                self._roll_refresh_record(new + refreshed)
            self.pending = None
            self.history.append(summary)
            self.batches += 1

    def _roll_refresh_record(self, slot: list[EditRequest]) -> None:
        """RAR's window after a batch: ``slot`` (the batch's edits and the refreshed ones) becomes the newest slot,
        earlier slots lose the prompts it writes again, and only the latest ``refresh_window`` slots are kept."""
        moved = {r.prompt_text for r in slot}
        kept = [[r for r in batch if r.prompt_text not in moved] for batch in self.refresh_record]
        window = self.beac.refresh_window
        self.refresh_record = (kept + [list(slot)])[-window:] if window is not None else kept + [list(slot)]

    def step_state(self) -> dict[str, Any]:
        """The logged step's state with RAR's window replaced by the slot the batch added (a window of every earlier
        edit would otherwise be logged whole at every step); :meth:`replay_step` rolls the window by it."""
        return self._as_step(super().step_state())

    def _as_step(self, state: dict[str, Any]) -> dict[str, Any]:
        beac = dict(state["beac"])
        beac.pop("refresh_record", None)
        slot = self.refresh_record[-1] if self.refresh_record and self._refreshing() else None
        return {**state, "beac": beac, "beac_refresh_slot": None if slot is None else [asdict(r) for r in slot]}

    def replay_step(self, state: dict[str, Any]) -> None:
        state = dict(state)
        slot = state.pop("beac_refresh_slot", None)
        super().replay_step(state)
        if slot is not None:
            self._roll_refresh_record([EditRequest(**r) for r in slot])

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "beac": {
                "layers": list(self.layers) if self.layers is not None else None,
                "usage": None if self.usage is None else self.usage.clone(),
                "batches": self.batches,
                "history": [dict(h) for h in self.history],
                "refresh_record": [[asdict(r) for r in batch] for batch in self.refresh_record],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checked first: a foreign or malformed record raises before any of the method's state changes.
        b = state.get("beac")
        if b is not None:
            if self.layers is not None and b.get("layers") is not None and list(b["layers"]) != list(self.layers):
                raise ValueError(f"B-EAC state was recorded for layers {b['layers']}, this method edits {self.layers}")
            try:  # a logged step holds the slot it added instead (replay_step): the current window is kept
                window = (None if "refresh_record" not in b
                          else [[EditRequest(**r) for r in batch] for batch in b["refresh_record"]])
            except TypeError as e:
                raise ValueError(f"B-EAC checkpoint: refresh_record is malformed ({e})") from e
        super().load_state_dict(state)
        if b is None:
            return
        if self.layers is None and b.get("layers") is not None:
            self.layers = list(b["layers"])
        self.usage = None if b.get("usage") is None else b["usage"].clone().double()
        self.batches = int(b.get("batches", 0))
        self.history = [dict(h) for h in b.get("history", [])]
        if window is not None:
            self.refresh_record = window


class BEACMEMIT(BatchAnchorMixin, MEMIT):
    """B-EAC on MEMIT: EAC-compressed z, anchors planned per batch and layer (LAS) under a rolling record of earlier
    edits (RAR), written with MEMIT's solve (row by row where the record holds earlier edits' anchors).

    Args:
        layers, target, context, mom2_update_weight: as :class:`~eac_lightning.methods.memit.MEMIT`.
        eac: EAC's scoring and retraining (Eq. 1-6); the anchor count per edit is EAC's (γ).
        beac: LAS / RAR switches and bounds.
        write_aware: optimise z under the update that will be written (as MEMIT's; needs ``key_memory`` 0).
        nas: Norm-Anchor Scaling of the solved value vectors (as MEMIT's ``nas``).
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        target: TargetHyperParams = MEMIT_TARGET,
        context: ContextTemplateParams = MEMIT_CONTEXT,
        mom2_update_weight: float = 20000.0,
        eac: EACHyperParams | None = EACHyperParams(),
        beac: BEACHyperParams | None = None,
        write_aware: bool = False,
        nas: NASHyperParams | None = None,
    ) -> None:
        super().__init__(layers=layers, target=target, context=context, mom2_update_weight=mom2_update_weight,
                         eac=eac or EACHyperParams(), write_aware=write_aware, nas=nas)
        self._init_beac(beac)
        if self.beac.refresh_replaces_key or self.beac.record_weight != 1.0:
            raise ValueError("B-EAC (MEMIT): beac.refresh_replaces_key and beac.record_weight act on AlphaEdit's "
                             "record of earlier keys, which MEMIT's solve has not: leave them at false and 1.0 (or "
                             "use BEAC)")
        if write_aware and self._remembers_keys():
            raise ValueError("B-EAC: the write-aware write is MEMIT's solve for every layer at once and does not "
                             "use RAR's anchor key record: set beac.key_memory to 0 or write_aware to false")
        self.key_record: dict[str, AnchorKeyRecord] = {}  # per edited module (RAR)
        self._step_record: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the last batch's, for the edit log

    base_label = "B-EAC (MEMIT)"

    def _remembers_keys(self) -> bool:
        return self.beac.rar and self.beac.key_memory > 0

    def _layer_factors(self, i: int, name: str, keys: torch.Tensor,
                       resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row j of ΔW_l solves MEMIT's problem plus, for every earlier edit o with an anchor at dimension j,
        η·w_o·(Δw_j·k_o)²: the new batch keeps what o's key reads in o's own anchor rows (B5),

            Δw_j = r_j Kᵀ (λC + KKᵀ + η Σ_{o: m_o[j]} w_o k_o k_oᵀ)⁻¹   (m_o: o's anchor dimensions),

        computed from MEMIT's Woodbury solve with one small (|o in row j|)² system per row. Rows no earlier edit
        anchors get MEMIT's update unchanged. Each row's correction lies in the span of B⁻¹K_old, so ΔW_l =
        [R | T] [Aᵀ; (B⁻¹K_old)ᵀ] (rank ≤ n + N; T holds each row's correction coefficients), the factors the edit
        log stores. The update is linear in R, so request i's own term is the update of R's column i alone; its
        squared norm is returned per request, as MEMIT's."""
        record = self.key_record.get(name) if self._remembers_keys() else None
        if record is None or not len(record.weight):
            return super()._layer_factors(i, name, keys, resid)
        dev = keys.device
        old = record.keys.to(dev).T  # (d_k, N)
        adjoint, y = self._metric_solve(name, keys, old)  # B⁻¹K, B⁻¹K_old with B = λC + KKᵀ
        coef = torch.zeros(resid.shape[0], old.shape[1], dtype=torch.float64, device=dev)  # T: rows' corrections
        edit_sq = resid.pow(2).sum(0) * adjoint.pow(2).sum(0)  # per request, as if no row were corrected
        g, h = old.T @ y, old.T @ adjoint  # K_oldᵀ B⁻¹ K_old (N, N), K_oldᵀ B⁻¹ K (N, n)
        scale = (self.beac.key_memory * record.weight.to(dev)).sqrt()
        cells = record.cells.to(dev)
        rows = torch.nonzero(cells.any(0) & (resid != 0).any(1)).flatten().tolist()
        for j in rows:  # Woodbury per row: B_j⁻¹ = B⁻¹ − B⁻¹U(I + UᵀB⁻¹U)⁻¹UᵀB⁻¹, U = scaled K_old[:, S_j]
            sel = torch.nonzero(cells[:, j]).flatten()
            sc = scale[sel]
            inner = torch.eye(len(sel), dtype=torch.float64, device=dev) + sc[:, None] * g[sel][:, sel] * sc[None]
            t = torch.linalg.solve(inner, sc * (h[sel] @ resid[j]))
            coef[j, sel] = -(t * sc)
            # Request i's row j is resid[j, i]·(a_i − c_i) with c the same correction for a unit residual.
            own = adjoint.T - (torch.linalg.solve(inner, sc[:, None] * h[sel]) * sc[:, None]).T @ y[:, sel].T
            edit_sq += resid[j].pow(2) * (own.pow(2).sum(1) - adjoint.pow(2).sum(0))
        return torch.cat([resid, coef], 1), torch.cat([adjoint.T, y.T], 0), edit_sq.clamp_min(0)

    def _after_write(self, model: nn.Module, tok, targets: list[ResidualTarget],
                     keys: dict[str, torch.Tensor] | None) -> None:
        super()._after_write(model, tok, targets, keys)
        if not self._remembers_keys():
            return
        # After the whole batch is written: a failed write leaves no trace (B3'). Row j of every edited layer
        # writes residual dimension j, so an edit is kept in the rows of all its anchors (z's mask) at every layer.
        cells = torch.stack([t.anchors for t in targets]).cpu()  # (n, d)
        # Keys are float32 values (compute_keys), so the log stores them as float32 without loss.
        self._step_record = {name: (k.T.float().contiguous(), cells)
                             for name, k in self._written_keys(model, tok, targets, keys).items()}
        self._roll_key_record(self._step_record)

    def _roll_key_record(self, step: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add one batch's keys (n, d_k) and anchor cells (n, d) per module to RAR's record (the live write and the
        edit log's replay both come here)."""
        for name, (keys, cells) in step.items():
            k, record = keys.double(), self.key_record.get(name)
            self.key_record[name] = (AnchorKeyRecord(k, torch.ones(len(k), dtype=torch.float64), cells)
                                     if record is None else record.rolled(self.beac.decay, k, cells))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["beac"]["key_record"] = {n: r.state() for n, r in self.key_record.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Parsed first: a malformed record raises before any of the method's state changes. A logged step holds no
        # record (its batch's keys instead, :meth:`replay_step`): the current one is kept.
        held = state.get("beac", {})
        records = None if "key_record" not in held else {
            n: AnchorKeyRecord.from_state(n, r) for n, r in held["key_record"].items()}
        super().load_state_dict(state)
        if records is not None:
            self.key_record = records

    def step_state(self) -> dict[str, Any]:
        """The state without RAR's key record (up to 21 batches of keys, not even copied), plus this batch's keys and
        cells."""
        state = self._as_step(BatchAnchorMixin.state_dict(self))  # the mixin's state: RAR's key record not copied
        state["beac_step_keys"] = {n: {"keys": k, "cells": c} for n, (k, c) in self._step_record.items()}
        return state

    def replay_step(self, state: dict[str, Any]) -> None:
        state = dict(state)
        step = state.pop("beac_step_keys", {})
        super().replay_step(state)
        self._roll_key_record({n: (v["keys"], v["cells"]) for n, v in step.items()})


#: B-EAC's settings over AlphaEdit's solve, the ``beac`` preset's (ours, not published: only B-EAC's abstract is
#: public). AlphaEdit keeps its own record of earlier keys, so RAR's key record is off (key_memory 0); RAR refreshes
#: earlier edits of the whole stream that no longer hold, up to a whole batch's worth, from a seeded draw of 1,000
#: of them per batch (docs/beac.md § 2.6; 0.2 and 0.5 level at 500 edits, § 5.3; 1.0 against 0.5 at 2,000 edits in
#: batches of 100, where the budget of 0.5 is spent from the 7th batch on, § 5.5); its solve weighs AlphaEdit's
#: record of earlier keys twice (record_weight 2 against 1 and 4 at 2,000 edits: the most reliability and
#: generalisation, and retention between the two, § 2.6 B9, § 5.5); LAS keeps alike edits apart, keys with
#: |cos| >= 0.9 in C⁻¹ such as one subject's corrections (§ 2.7, § 5.4). The rest are BEACHyperParams' defaults,
#: B-EAC over MEMIT's solve's too.
BEAC_SETTINGS = BEACHyperParams(key_memory=0.0, refresh=1.0, refresh_window=None, refresh_checks=1000,
                                alike_cosine=0.9, record_weight=2.0)


class BEAC(BatchAnchorMixin, AlphaEdit):
    """B-EAC on AlphaEdit, the recommended batch-sequential editor and the ``beac`` preset: B-EAC's anchors written
    with AlphaEdit's null-space-projected solve (and its accumulated keys of earlier edits). Defaults: AlphaEdit's
    (z, contexts, null space, α), EAC's (:class:`~eac_lightning.methods.eac.EACHyperParams`), :data:`BEAC_SETTINGS`
    and the write-aware z (docs/beac.md § 2.5, § 5.2).

    Args:
        layers, target, context, nullspace_threshold, l2: as :class:`~eac_lightning.methods.alphaedit.AlphaEdit`.
        eac: EAC's scoring and retraining.
        beac: LAS / RAR switches and bounds.
        write_aware: optimise z under the update that will be written (as AlphaEdit's ``write_aware``; on by
            default here: B-EAC's anchors are planned per layer, and the write-aware z is optimised for them).
        nas: Norm-Anchor Scaling of the solved value vectors (as AlphaEdit's ``nas``; docs/beac.md § 2.5).
    """

    base_label = "B-EAC"

    def __init__(
        self,
        layers: list[int] | None = None,
        target: TargetHyperParams = MEMIT_TARGET,
        context: ContextTemplateParams = MEMIT_CONTEXT,
        nullspace_threshold: float = 2e-2,
        l2: float = 10.0,
        eac: EACHyperParams | None = EACHyperParams(),
        beac: BEACHyperParams = BEAC_SETTINGS,
        write_aware: bool = True,
        nas: NASHyperParams | None = None,
    ) -> None:
        super().__init__(layers=layers, target=target, context=context, nullspace_threshold=nullspace_threshold,
                         l2=l2, eac=eac or EACHyperParams(), write_aware=write_aware, nas=nas)
        self._init_beac(beac if beac is not None else BEAC_SETTINGS)
        if self.beac.key_memory > 0:
            raise ValueError(
                "BEAC keeps AlphaEdit's own record of earlier keys (null_kkt); beac.key_memory applies to "
                "BEACMEMIT (MEMIT's solve) only: set it to 0"
            )

    def _replaced(self) -> int:
        """How many of the batch being edited are re-written earlier edits whose key replaces their entry in
        AlphaEdit's record (``refresh_replaces_key``; they come last in the batch, :meth:`_solve_targets`)."""
        if not (self.beac.refresh_replaces_key and self._refreshing() and self.pending is not None):
            return 0
        return len(self.pending[1])

    def _record_weight(self) -> float:
        return self.beac.record_weight

    def _new_keys(self, n: int) -> int | None:
        """B8 (docs/beac.md § 2.6): a re-written edit's key is already in G from its first write, so the solve is
        (G + K_new K_newᵀ + αI)⁻¹ U₀ᵀK, every key of the batch on the right, only the new edits' in KKᵀ: the record
        no longer holds the re-written edit's current output in place while the batch moves it."""
        m = self._replaced()
        return n - m if m else None

    def _written_keys(self, model: nn.Module, tok, targets: list[ResidualTarget],
                      keys: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The keys AlphaEdit's record adds after the write: the batch's new edits' only when re-written edits
        replace their entry (their earlier key stays in the record, once)."""
        written = super()._written_keys(model, tok, targets, keys)
        m = self._replaced()
        return {name: k[:, :k.shape[1] - m] for name, k in written.items()} if m else written
