"""B-EAC's tensor algorithms, apart from any model: Layer-wise Anchor Selection (LAS) planning and the records of
Rolling Anchor Refresh (RAR). docs/beac.md states them as equations and pseudo-code; :mod:`eac_lightning.methods.beac`
runs them inside MEMIT's and AlphaEdit's edits.

* :func:`plan_anchors`: given the EAC saliency scores of a batch's edits (EAC Eq. 1), the boolean plan
  M_i ∈ {0,1}^{L×d} of each edit: k anchor dimensions, each placed in r of the L edited layers, at most c edits per
  (layer, dimension) cell, ranked under the RAR usage penalty π = 1 / (1 + β·U/mean U) (:func:`rar_penalty`).
* :class:`AnchorKeyRecord`: RAR's decaying record of earlier edits' keys and anchor dimensions at one layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
            (None: all L, MEMIT's spreading, the measured best: docs/beac.md § 5.6; 1: each dimension in one
            layer, the widest spread).
        min_anchor_fraction: an edit that cannot get all its k anchors under the overlap bound keeps the ones it
            got if they are at least this share of k; below it the batch is rejected (raise ``max_overlap``).
        decay: ρ, the per-batch decay of the usage record (its memory is about 1/(1-ρ) batches).
        penalty: β, the strength of the usage penalty π = 1/(1 + β·U/mean U).
        key_memory: η, the weight of RAR's anchor key record in the solve of :class:`BEACMEMIT` (docs/beac.md § 2.3,
            B5): row j of ΔW_l keeps what each earlier edit o with an anchor at dimension j reads, with weight
            η·ρ^age(o). 0: the usage record and penalty only. :class:`BEAC` keeps AlphaEdit's own record
            of earlier keys instead (needs 0).
        refresh: RAR's refresh share (docs/beac.md § 2.6): before each batch of n edits, up to ceil(refresh·n)
            earlier edits of the window whose bare prompt no longer yields their target on the current model
            (teacher-forced exact match; lowest token accuracy first, then oldest) join the batch and get their
            anchors re-planned and re-written. 0: no refresh (needs ``rar``).
        refresh_window: how many of the latest batches' edits the refresh checks; None: every earlier edit of the
            stream (each once, in the slot of the batch that last wrote it).
        refresh_checks: how many of the window's edits the refresh scores before a batch, drawn uniformly at
            random (seeded by the batch's number, so a resumed run draws the same); None: all of them. Bounds the
            cost of a whole-stream window (``refresh_window`` None) at a fixed number of prompts per batch.
        refresh_replaces_key: a refreshed edit's key takes the place of its earlier entry in AlphaEdit's record of
            earlier keys (docs/beac.md § 2.6, B8) instead of being added to it again: the record keeps each edit's
            key once, and the re-write is not held back by the record's wish to keep the edit's current (wrong)
            output. :class:`BEAC` only (the record is AlphaEdit's).
        record_weight: w, the weight of AlphaEdit's record of earlier keys in :class:`BEAC`'s solve,
            (wG + U₀ᵀKKᵀU₀ + αI)⁻¹U₀ᵀK (docs/beac.md § 2.6, B9; 1: AlphaEdit's Eq. 15): above 1 a batch moves less
            of what earlier edits read.
        alike_cosine: τ, LAS's separation of alike edits (docs/beac.md § 2.7): two edits of a batch whose keys at
            the first edited layer have |cos| ≥ τ in the metric of the key covariance (|k_iᵀC⁻¹k_j| normalised;
            one subject's corrections: ~1) take disjoint anchor dimensions while each can still fill its k;
            None: no separation.
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
    refresh: float = 0.0
    refresh_window: int | None = 10
    refresh_checks: int | None = None
    refresh_replaces_key: bool = False
    record_weight: float = 1.0
    alike_cosine: float | None = None

    def __post_init__(self) -> None:
        check("max_overlap", self.max_overlap, integer=True, positive=True)
        check("overlap_slack", self.overlap_slack, low=1.0)
        check("layers_per_anchor", self.layers_per_anchor, integer=True, positive=True)
        check("min_anchor_fraction", self.min_anchor_fraction, low=0.0, high=1.0)
        check("decay", self.decay, low=0.0, high=1.0)
        check("penalty", self.penalty, nonnegative=True)
        check("key_memory", self.key_memory, nonnegative=True)
        check("refresh", self.refresh, low=0.0)
        check("refresh_window", self.refresh_window, integer=True, positive=True)
        check("refresh_checks", self.refresh_checks, integer=True, positive=True)
        check("alike_cosine", self.alike_cosine, low=0.0, high=1.0)
        check("record_weight", self.record_weight, nonnegative=True)


@dataclass
class AnchorPlan:
    """The anchors of one batch: ``masks`` (n, L, d) bool, and figures of the plan.

    ``threshold`` is the refreshed admission threshold: the lowest penalised priority (score share · π) of an
    admitted anchor, median over the edits. ``overlap`` is the most edits sharing one (layer, dimension) cell;
    ``capacity`` the bound c it was planned under (None without LAS); ``alike_pairs`` the pairs of alike edits
    kept apart (LAS's separation).
    """

    masks: torch.Tensor
    threshold: float
    overlap: int
    capacity: int | None
    anchors_per_edit: list[int]
    alike_pairs: int = 0

    def summary(self) -> dict[str, float]:
        m = self.masks
        return {
            "threshold": self.threshold,
            "overlap": float(self.overlap),
            "capacity": float(self.capacity) if self.capacity is not None else float("nan"),
            "cells": float(m.any(0).sum()),
            "min_anchors": float(min(self.anchors_per_edit)) if self.anchors_per_edit else 0.0,
            "alike_pairs": float(self.alike_pairs),
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
    apart: torch.Tensor | None = None,
) -> AnchorPlan:
    """Plan the anchors of a batch (LAS, or per-edit top-k without it) under the RAR penalty of ``usage``.

    Args:
        scores: (n, d) EAC saliency scores (Eq. 1) of the batch's edits.
        k: anchor dimensions per edit.
        n_layers: L, the edited layers.
        hp: the switches and bounds.
        usage: (L, d) rolling usage record, or None.
        start: which edit picks first in the round-robin (rotated per batch).
        apart: (n, n) bool, the pairs of alike edits (LAS only): an edit does not take a dimension an edit alike to
            it holds, unless it has no other free anchor left (the separation gives way before the edit's k).
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
    # blocked[i, j]: an edit alike to i holds dimension j
    blocked = torch.zeros(n, d, dtype=torch.bool)
    apart = None if apart is None else apart.bool().cpu() & ~torch.eye(n, dtype=torch.bool)
    layer_rank = torch.arange(n_layers, dtype=torch.float64)[:, None]
    for t in range(k):
        # Every edit proposes its best slot on the state at the start of the round (one vectorised pass); in turn
        # order a proposal is taken if its cells are still under the bound, else the edit picks again on the
        # current state. (Its quota and its own anchors only change through its own pick, once per round.)
        proposals = _proposals(prio, pi, count, cap, per_layer, quota, taken | blocked, r, layer_rank)
        for s in range(n):
            i = (start + t + s) % n
            if stuck[i]:
                continue
            pick = proposals[i]
            if pick is None or bool((count[pick[1], pick[0]] >= cap).any()) or bool(blocked[i, pick[0]]):
                pick = _best_slot(prio[i], pi, count, cap, per_layer[i], quota, taken[i] | blocked[i], r, layer_rank)
            if pick is None:  # the quota per layer cannot be met: relax it, then the separation, before giving up
                pick = _best_slot(prio[i], pi, count, cap, None, quota, taken[i] | blocked[i], r, layer_rank)
            if pick is None and bool(blocked[i].any()):
                pick = _best_slot(prio[i], pi, count, cap, None, quota, taken[i], r, layer_rank)
            if pick is None:
                stuck[i] = True
                continue
            j, layers, value = pick
            if apart is not None:
                blocked[apart[i], j] = True
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
    pairs = 0 if apart is None else int(apart.triu(1).sum())
    return AnchorPlan(masks, thr, int(count.max()) if n else 0, cap, got, pairs)


def _layer_key(pi, count, cap, per_layer, quota, layer_rank):
    """Rank of the layers within each dimension: π first (RAR), then the layer where the edit has the fewest anchors
    (spread over layers), then the emptiest cell (fewest concurrent edits), then the index. ``per_layer`` (…, L)."""
    key = pi - 1e-9 * layer_rank - 1e-6 * count.double() / cap
    if per_layer is not None:
        key = key - 1e-3 * (per_layer.double() / quota)[..., None]
    return key


def _proposals(prio, pi, count, cap, per_layer, quota, excluded, r, layer_rank):
    """:func:`_best_slot` of every edit at once (n, L, d), under the per-layer quota; None where none is free."""
    free = (count < cap)[None] & (per_layer < quota)[:, :, None] & ~excluded[:, None, :]
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


def _best_slot(prio_i, pi, count, cap, per_layer_i, quota, excluded_i, r, layer_rank):
    """Edit i's best free anchor: the dimension j outside ``excluded_i`` (its own anchors and, under separation,
    those of alike edits) with the highest prio·mean π over its r best free layers; layers are ranked by π, then
    fewest edits in the cell, then index. None if none is free."""
    free = (count < cap) & ~excluded_i[None, :]
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
