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
  key part (``key_memory`` η > 0, :class:`BEAC`) keeps each earlier edit's keys with its anchor dimensions, and
  MEMIT's solve keeps what those keys read in those rows (row j of ΔW_l solves
  λC + KKᵀ + η Σ_{o anchors j} w_o k_o k_oᵀ, w_o = ρ^age): a new batch does not overwrite earlier edits where
  they were written. The record, the batch counter and a per-batch history are in :meth:`state_dict`, so a
  resumed run behaves exactly like an uninterrupted one.

The planning is a mixin over MEMIT's code (no copy of it): :class:`BEAC` edits with MEMIT's solve,
:class:`BEACAlphaEdit` with AlphaEdit's null-space-projected solve (the per-row masking commutes with the
projection because both solves are row-separable in ΔW_l).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest
from eac_lightning.methods.alphaedit import AlphaEdit
from eac_lightning.methods.base import Deltas
from eac_lightning.methods.eac import EACHyperParams, anchor_count, explore, retrain
from eac_lightning.methods.memit import MEMIT, ResidualTarget
from eac_lightning.methods.target import ContextTemplateParams, TargetHyperParams
from eac_lightning.validation import check


@dataclass
class BEACHyperParams:
    """Layer-wise Anchor Selection and Rolling Anchor Refresh (docs/beac.md).

    Args:
        las: select the batch's anchors jointly per layer (bounded overlap, spread over layers) and let every layer
            write only its anchors; False: each edit's own top-k anchors compress z and every layer writes the
            whole remaining residual, as MEMIT-EAC (the "B-EAC w/o LAS" ablation).
        rar: keep the rolling usage record and penalise heavily used anchors; False plans every batch as if it
            were the first (the "B-EAC w/o RAR" ablation).
        max_overlap: c, the most edits of one batch that may share a (layer, dimension) anchor; None: automatic,
            ceil(overlap_slack · n · ceil(k·r/L) / d) for a batch of n edits (the smallest c that fits the batch,
            times the slack); c ≥ the batch size: no bound (each edit takes its top-k, still written per layer).
        overlap_slack: headroom of the automatic c (≥ 1).
        layers_per_anchor: r, in how many of the edited layers each anchor dimension of an edit is written
            (None: all L, MEMIT's spreading, the measured best: docs/beac.md § 5; 1: each dimension in one
            layer, the widest spread).
        min_anchor_fraction: an edit that cannot get all its k anchors under the overlap bound keeps the ones it
            got if they are at least this share of k; below it the batch is rejected (raise ``max_overlap``).
        decay: ρ, the per-batch decay of the usage record (its memory is about 1/(1-ρ) batches).
        penalty: β, the strength of the usage penalty π = 1/(1 + β·U/mean U).
        key_memory: η, the weight of RAR's anchor key record in the solve of :class:`BEAC` (docs/beac.md § 2.3,
            B5): row j of ΔW_l keeps what each earlier edit o with an anchor at dimension j reads, with weight
            η·ρ^age(o). 0: the usage record and penalty only. :class:`BEACAlphaEdit` keeps AlphaEdit's own record
            of earlier keys instead (needs 0).
    """

    las: bool = True
    rar: bool = True
    max_overlap: int | None = None
    overlap_slack: float = 2.0
    layers_per_anchor: int | None = None
    min_anchor_fraction: float = 0.5
    decay: float = 0.8
    penalty: float = 1.0
    key_memory: float = 1.0

    def __post_init__(self) -> None:
        check("max_overlap", self.max_overlap, integer=True, positive=True)
        check("overlap_slack", self.overlap_slack, low=1.0)
        check("layers_per_anchor", self.layers_per_anchor, integer=True, positive=True)
        check("min_anchor_fraction", self.min_anchor_fraction, low=0.0, high=1.0)
        check("decay", self.decay, low=0.0, high=1.0)
        check("penalty", self.penalty, nonnegative=True)
        check("key_memory", self.key_memory, nonnegative=True)


@dataclass
class LayeredTarget(ResidualTarget):
    """A MEMIT target with B-EAC's per-layer anchor plan: ``layer_masks`` (L, d) bool, row l for
    ``layers[l]``; ``anchors`` (z's mask) is their union."""

    layer_masks: torch.Tensor | None = None


@dataclass
class AnchorPlan:
    """The anchors of one batch: ``masks`` (n, L, d) bool, and figures of the plan.

    ``threshold`` is the refreshed admission threshold: the lowest penalised priority (score share · π) of an
    admitted anchor, median over the edits. ``overlap`` is the most edits sharing one (layer, dimension) cell;
    ``capacity`` the bound c it was planned under (None without LAS).
    """

    masks: torch.Tensor
    threshold: float
    overlap: int
    capacity: int | None
    anchors_per_edit: list[int]

    def summary(self) -> dict[str, float]:
        m = self.masks
        return {
            "threshold": self.threshold,
            "overlap": float(self.overlap),
            "capacity": float(self.capacity) if self.capacity is not None else float("nan"),
            "cells": float(m.any(0).sum()),
            "min_anchors": float(min(self.anchors_per_edit)) if self.anchors_per_edit else 0.0,
        }


def rar_penalty(usage: torch.Tensor | None, strength: float) -> torch.Tensor | None:
    """π = 1 / (1 + β·U/mean U) (L, d), or None when there is no usage yet (π ≡ 1)."""
    if usage is None or strength == 0:
        return None
    mean = usage.mean()
    if mean <= 0:
        return None
    return 1.0 / (1.0 + strength * usage / mean)


def auto_overlap(n: int, k: int, n_layers: int, dim: int, layers_per_anchor: int, slack: float) -> int:
    """The automatic c: the slack times the fewest edits per (layer, dimension) that fit n·ceil(k·r/L) anchors
    per layer into d dimensions."""
    q = math.ceil(k * layers_per_anchor / n_layers)
    return max(1, math.ceil(slack * n * q / dim))


def plan_anchors(
    scores: torch.Tensor,
    k: int,
    n_layers: int,
    hp: BEACHyperParams,
    usage: torch.Tensor | None = None,
    start: int = 0,
) -> AnchorPlan:
    """Plan the anchors of a batch (LAS, or per-edit top-k without it) under the RAR penalty of ``usage``.

    Args:
        scores: (n, d) EAC saliency scores (Eq. 1) of the batch's edits.
        k: anchor dimensions per edit.
        n_layers: L, the edited layers.
        hp: the switches and bounds.
        usage: (L, d) rolling usage record, or None.
        start: which edit picks first in the round-robin (rotated per batch).
    """
    n, d = scores.shape
    k = min(k, d)
    prio = scores.detach().abs().double().cpu()
    prio = prio / prio.amax(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    pen = rar_penalty(usage.double().cpu() if (hp.rar and usage is not None) else None, hp.penalty)
    pi = pen if pen is not None else torch.ones(n_layers, d, dtype=torch.float64)
    masks = torch.zeros(n, n_layers, d, dtype=torch.bool)
    if not hp.las:
        value = prio * pi.mean(0)  # (n, d)
        top = torch.topk(value, k, dim=1)
        for i in range(n):
            masks[i, :, top.indices[i]] = True
        counts = masks.sum(0)
        thr = float(top.values[:, -1].median()) if n else float("nan")
        return AnchorPlan(masks, thr, int(counts.max()) if n else 0, None, [k] * n)

    r = n_layers if hp.layers_per_anchor is None else max(1, min(hp.layers_per_anchor, n_layers))
    quota = math.ceil(k * r / n_layers)
    cap = hp.max_overlap if hp.max_overlap is not None else auto_overlap(n, k, n_layers, d, r, hp.overlap_slack)
    if cap < 1:
        raise ValueError(f"B-EAC: max_overlap must be at least 1, got {cap}")
    need = math.ceil(hp.min_anchor_fraction * k)
    if n * need * r > n_layers * d * cap:
        raise ValueError(
            f"B-EAC: a batch of {n} edits needs at least {n * need * r} anchor slots ({need} anchors × {r} layers "
            f"each) but {n_layers} layers × {d} dimensions × max_overlap {cap} hold {n_layers * d * cap}; raise "
            "max_overlap, lower layers_per_anchor or min_anchor_fraction, or edit smaller batches"
        )
    count = torch.zeros(n_layers, d, dtype=torch.long)
    per_layer = torch.zeros(n, n_layers, dtype=torch.long)
    taken = torch.zeros(n, d, dtype=torch.bool)
    got = [0] * n
    stuck = [False] * n
    floor = [math.inf] * n
    layer_rank = torch.arange(n_layers, dtype=torch.float64)[:, None]
    for t in range(k):
        # Every edit proposes its best slot on the state at the start of the round (one vectorised pass); in turn
        # order a proposal is taken if its cells are still under the bound, else the edit picks again on the
        # current state. (Its quota and its own anchors only change through its own pick, once per round.)
        proposals = _proposals(prio, pi, count, cap, per_layer, quota, taken, r, layer_rank)
        for s in range(n):
            i = (start + t + s) % n
            if stuck[i]:
                continue
            pick = proposals[i]
            if pick is None or bool((count[pick[1], pick[0]] >= cap).any()):
                pick = _best_slot(prio[i], pi, count, cap, per_layer[i], quota, taken[i], r, layer_rank)
            if pick is None:  # the quota per layer cannot be met: relax it before giving up
                pick = _best_slot(prio[i], pi, count, cap, None, quota, taken[i], r, layer_rank)
            if pick is None:
                stuck[i] = True
                continue
            j, layers, value = pick
            masks[i, layers, j] = True
            count[layers, j] += 1
            per_layer[i, layers] += 1
            taken[i, j] = True
            got[i] += 1
            floor[i] = min(floor[i], value)
    short = [i for i in range(n) if got[i] < need]
    if short:
        raise ValueError(
            f"B-EAC: edits {short} of the batch got fewer than {need} anchors under max_overlap {cap}; raise "
            "max_overlap (or lower min_anchor_fraction)"
        )
    thr = float(torch.tensor(floor, dtype=torch.float64).median()) if n else float("nan")
    return AnchorPlan(masks, thr, int(count.max()) if n else 0, cap, got)


def _layer_key(pi, count, cap, per_layer, quota, layer_rank):
    """Rank of the layers within each dimension: π first (RAR), then the layer where the edit has the fewest anchors
    (spread over layers), then the emptiest cell (fewest concurrent edits), then the index. ``per_layer`` (…, L)."""
    key = pi - 1e-9 * layer_rank - 1e-6 * count.double() / cap
    if per_layer is not None:
        key = key - 1e-3 * (per_layer.double() / quota)[..., None]
    return key


def _proposals(prio, pi, count, cap, per_layer, quota, taken, r, layer_rank):
    """:func:`_best_slot` of every edit at once (n, L, d), under the per-layer quota; None where none is free."""
    free = (count < cap)[None] & (per_layer < quota)[:, :, None] & ~taken[:, None, :]
    key = _layer_key(pi[None], count[None], cap, per_layer, quota, layer_rank[None])
    key = torch.where(free, key, torch.full_like(key, -math.inf))
    top, idx = torch.topk(key, r, dim=1)  # (n, r, d)
    ok = torch.isfinite(top).all(1)  # (n, d)
    value = prio * torch.gather(pi[None].expand(len(prio), -1, -1), 1, idx).mean(1)
    value = torch.where(ok, value, torch.full_like(value, -math.inf))
    best = torch.argmax(value, dim=1)
    out = []
    for i, j in enumerate(best.tolist()):
        out.append((j, idx[i, :, j], float(value[i, j])) if bool(ok[i, j]) else None)
    return out


def _best_slot(prio_i, pi, count, cap, per_layer_i, quota, taken_i, r, layer_rank):
    """Edit i's best free anchor: the dimension j (not yet its anchor) with the highest prio·mean π over its r
    best free layers; layers are ranked by π, then fewest edits in the cell, then index. None if none is free."""
    free = (count < cap) & ~taken_i[None, :]
    if per_layer_i is not None:
        free &= (per_layer_i < quota)[:, None]
    if not free.any():
        return None
    key = _layer_key(pi, count, cap, per_layer_i, quota, layer_rank)
    key = torch.where(free, key, torch.full_like(key, -math.inf))
    top, idx = torch.topk(key, r, dim=0)  # (r, d)
    ok = torch.isfinite(top).all(0)
    if not ok.any():
        return None
    layers_pi = torch.gather(pi, 0, idx)  # π of the chosen layers
    value = prio_i * layers_pi.mean(0)
    value = torch.where(ok, value, torch.full_like(value, -math.inf))
    j = int(torch.argmax(value))
    return j, idx[:, j], float(value[j])


class BatchAnchorMixin:
    """B-EAC's planning, over any MEMIT-family method (MEMIT's z, keys and residual spreading; the subclass's
    per-layer solve). Mix in before the base class: ``class X(BatchAnchorMixin, MEMIT)``."""

    beac: BEACHyperParams
    usage: torch.Tensor | None
    batches: int
    history: list[dict[str, float]]
    last_plan: AnchorPlan | None

    base_label: str

    @property
    def label(self) -> str:
        """The name in summaries, with the components switched off ("B-EAC w/o LAS"), as the benchmark names them."""
        off = [name for name, on in (("LAS", self.beac.las), ("RAR", self.beac.rar)) if not on]
        return self.base_label + "".join(f" w/o {name}" for name in off)

    def _init_beac(self, beac: BEACHyperParams | None) -> None:
        if self.eac is None:
            raise ValueError("B-EAC needs EAC hyper-parameters (eac: ...) for its anchor scores and retraining")
        if self.eac.anchors == "none":
            raise ValueError("B-EAC selects anchors; eac.anchors='none' (elastic net only) has none to plan")
        self.beac = beac or BEACHyperParams()
        self.usage = None
        self.batches = 0
        self.history = []
        self.last_plan = None

    def compute_targets(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> list[LayeredTarget]:
        if self.templates is None:
            self.setup(model, tok, self.stats)
        problems, explorations = [], []
        for r in requests:  # phase 1 of every edit on the same (current) model, as MEMIT computes a batch
            problem = self._problem(model, tok, r)
            problems.append(problem)
            explorations.append(explore(problem, self.eac))
        scores = torch.stack([e.score.detach() for e in explorations])
        d = scores.shape[1]
        usage = self.usage if (self.beac.rar and self.usage is not None) else None
        plan = plan_anchors(
            scores, anchor_count(d, self.eac.gamma), len(self.layers), self.beac, usage,
            start=self.batches % max(1, len(requests)),
        )
        self.last_plan = plan
        out = []
        for i, (r, problem, exploration) in enumerate(zip(requests, problems, explorations)):
            layer_masks = plan.masks[i].to(problem.v0.device)
            anchors = layer_masks.any(0)
            delta = retrain(problem, exploration, anchors, self.eac)  # phase 2 on z's anchors (EAC Eq. 3-6)
            out.append(LayeredTarget(r, problem.v0, delta, anchors, layer_masks=layer_masks))
        return out

    def _layer_residual(self, i: int, targets: list[ResidualTarget], resid: torch.Tensor) -> torch.Tensor:
        """With LAS, layer i writes only the batch's anchors planned there (the per-dimension spreading above);
        without it, MEMIT's spreading of the whole remaining residual (Eq. 16)."""
        if not self.beac.las or not all(isinstance(t, LayeredTarget) and t.layer_masks is not None for t in targets):
            return super()._layer_residual(i, targets, resid)
        masks = torch.stack([t.layer_masks for t in targets]).to(resid.device)  # (n, L, d)
        here = masks[:, i].to(resid.dtype)  # (n, d)
        left = masks[:, i:].sum(1).clamp_min(1).to(resid.dtype)  # layers from this one on that hold the anchor
        return resid * (here / left).T

    def _write(self, model: nn.Module, tok, targets: list[ResidualTarget]) -> Deltas:
        deltas = super()._write(model, tok, targets)
        masks = [t.layer_masks for t in targets if isinstance(t, LayeredTarget) and t.layer_masks is not None]
        if masks:  # the record changes only once the whole batch is written (a failed write leaves no trace)
            used = torch.stack(masks).sum(0).double().cpu()
            if self.beac.rar:
                self.usage = used if self.usage is None else self.beac.decay * self.usage + used
            summary = {"batch": float(self.batches), "edits": float(len(masks))}
            if self.last_plan is not None and self.last_plan.masks.shape[0] == len(masks):
                summary.update(self.last_plan.summary())
            self.history.append(summary)
            self.batches += 1
        return deltas

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "beac": {
                "layers": list(self.layers) if self.layers is not None else None,
                "usage": None if self.usage is None else self.usage.clone(),
                "batches": self.batches,
                "history": [dict(h) for h in self.history],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        b = state.get("beac")
        if b is None:
            return
        if self.layers is not None and b.get("layers") is not None and list(b["layers"]) != list(self.layers):
            raise ValueError(f"B-EAC state was recorded for layers {b['layers']}, this method edits {self.layers}")
        if self.layers is None and b.get("layers") is not None:
            self.layers = list(b["layers"])
        self.usage = None if b.get("usage") is None else b["usage"].clone().double()
        self.batches = int(b.get("batches", 0))
        self.history = [dict(h) for h in b.get("history", [])]


@dataclass
class AnchorKeyRecord:
    """RAR's record of earlier edits at one edited layer (docs/beac.md § 2.3): the keys the edits of recent batches
    were written with, their decayed weights (1 for the last batch, ρ for the one before, …) and each one's anchor
    dimensions (z's mask), the rows of W_l where it is kept."""

    keys: torch.Tensor  # (N, d_k) float64
    weight: torch.Tensor  # (N,) float64
    cells: torch.Tensor  # (N, d) bool

    # Entries whose weight decays below this are dropped (ρ = 0.8: after 21 batches).
    FLOOR = 0.01

    def rolled(self, decay: float, keys: torch.Tensor, cells: torch.Tensor) -> "AnchorKeyRecord":
        """The record after a batch: old weights × ρ, faded entries dropped, the batch's keys appended at 1 (B3')."""
        weight = self.weight * decay
        keep = weight >= self.FLOOR
        return AnchorKeyRecord(
            torch.cat([self.keys[keep], keys]),
            torch.cat([weight[keep], torch.ones(len(keys), dtype=torch.float64)]),
            torch.cat([self.cells[keep], cells]),
        )

    def state(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys.clone(), "weight": self.weight.clone(), "cells": self.cells.clone()}

    @classmethod
    def from_state(cls, name: str, state: dict[str, torch.Tensor]) -> "AnchorKeyRecord":
        """The record of module ``name`` from :meth:`state`; a malformed one raises naming the module."""
        try:
            keys, weight, cells = state["keys"], state["weight"], state["cells"]
            ok = keys.dim() == 2 and weight.shape == (len(keys),) and cells.dim() == 2 and len(cells) == len(keys)
        except (KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"B-EAC checkpoint: key_record of {name} is malformed ({e!r})") from e
        if not ok:
            raise ValueError(f"B-EAC checkpoint: key_record of {name} has inconsistent shapes: keys "
                             f"{tuple(keys.shape)}, weight {tuple(weight.shape)}, cells {tuple(cells.shape)}")
        return cls(keys.clone().double(), weight.clone().double(), cells.clone().bool())


class BEAC(BatchAnchorMixin, MEMIT):
    """B-EAC on MEMIT: EAC-compressed z, anchors planned per batch and layer (LAS) under a rolling record of earlier
    edits (RAR), written with MEMIT's solve (row by row where the record holds earlier edits' anchors).

    Args:
        layers, z, context, mom2_update_weight: as :class:`~eac_lightning.methods.memit.MEMIT`.
        eac: EAC's scoring and retraining (Eq. 1-6); the anchor count per edit is EAC's (γ).
        beac: LAS / RAR switches and bounds.
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        z: TargetHyperParams | None = None,
        context: ContextTemplateParams | None = None,
        mom2_update_weight: float = 20000.0,
        eac: EACHyperParams | None = None,
        beac: BEACHyperParams | None = None,
    ) -> None:
        MEMIT.__init__(self, layers=layers, z=z, context=context, mom2_update_weight=mom2_update_weight,
                       eac=eac or EACHyperParams())
        self._init_beac(beac)
        self.key_record: dict[str, AnchorKeyRecord] = {}  # per edited module (RAR)

    base_label = "B-EAC"

    def _remembers_keys(self) -> bool:
        return self.beac.rar and self.beac.key_memory > 0

    def _layer_update(self, i: int, name: str, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """Row j of ΔW_l solves MEMIT's problem plus, for every earlier edit o with an anchor at dimension j,
        η·w_o·(Δw_j·k_o)²: the new batch keeps what o's key reads in o's own anchor rows (B5),

            Δw_j = r_j Kᵀ (λC + KKᵀ + η Σ_{o: m_o[j]} w_o k_o k_oᵀ)⁻¹   (m_o: o's anchor dimensions),

        computed from MEMIT's Woodbury solve with one small (|o in row j|)² system per row. Rows no earlier edit
        anchors get MEMIT's update unchanged."""
        record = self.key_record.get(name) if self._remembers_keys() else None
        if record is None or not len(record.weight):
            return super()._layer_update(i, name, keys, resid)
        dev = keys.device
        old = record.keys.to(dev).T  # (d_k, N)
        adjoint, y = self._metric_solve(name, keys, old)  # B⁻¹K, B⁻¹K_old with B = λC + KKᵀ
        upd = resid @ adjoint.T  # MEMIT's update (Eq. 14); corrected below in the rows earlier edits anchor
        g, h = old.T @ y, old.T @ adjoint  # K_oldᵀ B⁻¹ K_old (N, N), K_oldᵀ B⁻¹ K (N, n)
        scale = (self.beac.key_memory * record.weight.to(dev)).sqrt()
        cells = record.cells.to(dev)
        rows = torch.nonzero(cells.any(0) & (resid != 0).any(1)).flatten().tolist()
        for j in rows:  # Woodbury per row: B_j⁻¹ = B⁻¹ − B⁻¹U(I + UᵀB⁻¹U)⁻¹UᵀB⁻¹, U = scaled K_old[:, S_j]
            sel = torch.nonzero(cells[:, j]).flatten()
            sc = scale[sel]
            inner = torch.eye(len(sel), dtype=torch.float64, device=dev) + sc[:, None] * g[sel][:, sel] * sc[None]
            t = torch.linalg.solve(inner, sc * (h[sel] @ resid[j]))
            upd[j] -= (t * sc) @ y[:, sel].T
        return upd

    def _after_write(self, model: nn.Module, tok, targets: list[ResidualTarget],
                     keys: dict[str, torch.Tensor] | None) -> None:
        super()._after_write(model, tok, targets, keys)
        if not self._remembers_keys():
            return
        # After the whole batch is written: a failed write leaves no trace (B3'). Row j of every edited layer
        # writes residual dimension j, so an edit is kept in the rows of all its anchors (z's mask) at every layer.
        cells = torch.stack([t.anchors for t in targets]).cpu()  # (n, d)
        for name, k in self._written_keys(model, tok, targets, keys).items():
            record = self.key_record.get(name)
            self.key_record[name] = (AnchorKeyRecord(k.T, torch.ones(k.shape[1], dtype=torch.float64), cells)
                                     if record is None else record.rolled(self.beac.decay, k.T, cells))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["beac"]["key_record"] = {n: r.state() for n, r in self.key_record.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Parsed first: a malformed record raises before any of the method's state changes.
        records = {n: AnchorKeyRecord.from_state(n, r)
                   for n, r in state.get("beac", {}).get("key_record", {}).items()}
        super().load_state_dict(state)
        self.key_record = records


class BEACAlphaEdit(BatchAnchorMixin, AlphaEdit):
    """B-EAC on AlphaEdit: B-EAC's anchors written with AlphaEdit's null-space-projected solve (and its
    accumulated keys of earlier edits).

    Args:
        layers, z, context, nullspace_threshold, l2: as :class:`~eac_lightning.methods.alphaedit.AlphaEdit`.
        eac: EAC's scoring and retraining.
        beac: LAS / RAR switches and bounds.
    """

    base_label = "B-EAC (AlphaEdit)"

    def __init__(
        self,
        layers: list[int] | None = None,
        z: TargetHyperParams | None = None,
        context: ContextTemplateParams | None = None,
        nullspace_threshold: float = 2e-2,
        l2: float = 10.0,
        eac: EACHyperParams | None = None,
        beac: BEACHyperParams | None = None,
    ) -> None:
        AlphaEdit.__init__(self, layers=layers, z=z, context=context, nullspace_threshold=nullspace_threshold,
                           l2=l2, eac=eac or EACHyperParams())
        self._init_beac(beac or BEACHyperParams(key_memory=0.0))
        if self.beac.key_memory > 0:
            raise ValueError(
                "BEACAlphaEdit keeps AlphaEdit's own record of earlier keys (past_kkt); beac.key_memory applies to "
                "BEAC (MEMIT's solve) only: set it to 0"
            )
