"""Editing Anchor Compression (EAC, Xu et al.): a two-phase wrapper around any target optimisation.

Phase 1 runs the base optimiser (:mod:`eac_lightning.methods.target`) for the first part of its steps and keeps
the gradient of the loss w.r.t. the optimised vector at every step. Then

    score = v* ⊙ ∇L(z)                                            (EAC Eq. 1)
    m_S   = 1(|score| ≥ γ),  γ = P_x(|score|)                      (EAC Eq. 2, Table 2 percentiles)

Phase 2 retrains only the anchor dimensions (the others are exactly zero, Eq. 3) under the scored elastic net

    L_r(z) = L(z) + λ Σ_i α_i |z_i| + μ ‖z‖²,   α = 1/(|score| + ε)   (EAC Eq. 4-6)

for the remaining steps, so EAC costs no more steps than its base method (Table 1).

Choices the paper leaves open are configurable and documented in docs/methods.md: which gradient (mean over
phase 1 or last), whether the score multiplies the full value v* = v₀ + δ or only δ, warm or zero start of
phase 2, and whether the penalties are taken literally (``penalty_scale="absolute"``: the paper's λ=5e-7,
μ=0.5 for GPT2-XL) or relative to the scale of the target vector (``"relative"``: ‖z‖₁,α/(‖v₀‖₁·mean α) and
‖z‖²/‖v₀‖², as ROME's own weight decay is relative). Ablations (EAC Fig. 7-8) are switches: anchor choice by
weighted gradient, gradient only, magnitude only or random; saliency map off (elastic net only) or
elastic net off (saliency only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args, get_type_hints

import torch

from eac_lightning.methods.target import (
    EditOptimisationError,
    TargetProblem,
    adam_descent,
    optimise_plain,
)
from eac_lightning.validation import check

# Any object with ``v0`` (the vector or flattened weights being changed), ``hparams`` (num_steps, lr, early_stop),
# ``loss(delta) -> (loss, NLL, each request's loss)``, ``clamp(delta)``, ``check(loss, step)`` and ``last_update`` can be
# compressed: :class:`TargetProblem` (ROME's v*, MEMIT's z: a batch's (n, d) δ, anchors per row) and
# :class:`eac_lightning.methods.ft.FTProblem`.


@dataclass
class EACHyperParams:
    """Editing Anchor Compression (EAC Eq. 1-6, Table 2, App. C.5). Defaults: the method presets'
    (``configs/methods/*-eac.yaml``): P85, half the steps in phase 1, λ = 0.1 and μ = 0.05 relative to the target's
    scale; the paper's absolute λ = 5e-7, μ = 0.5 (GPT2-XL) are in ``configs/published/gpt2-xl/*-eac.yaml``.

    Args:
        gamma: percentile x of the anchor threshold γ = P_x(|score|); anchors are the dimensions at or above it
            (Table 2: P80/P85/P90/P95 by model, dataset and method).
        phase1_fraction: share of the base method's steps spent in phase 1 (paper: 10 of 20).
        lam: λ, weight of the scored L1 norm (0.1 relative; App. C.5: 5e-7 absolute).
        mu: μ, weight of the squared L2 norm (0.05 relative; App. C.5: 0.5 absolute for GPT2-XL, 1e-3 for
            LLaMA-3-8B).
        eps: ε in α = 1/(|score| + ε), relative to the mean |score| of the anchors.
        penalty_scale: "absolute" takes λ, μ literally; "relative" divides the L1 term by ‖v₀‖₁·mean(α) and the
            L2 term by ‖v₀‖² so the same values work across model sizes.
        gradient: "mean" of the phase-1 gradients or the "last" one.
        score_on: multiply the gradient by the full "value" v₀+δ (Eq. 1 literally) or by the "delta" only.
        phase2_start: "warm" starts phase 2 from δ restricted to the anchors, "zero" from zero.
        anchors: anchor choice: "weighted_gradient" (Eq. 1), "gradient", "magnitude", "random" (Fig. 8), or
            "none" (all dimensions: elastic net only, Fig. 7).
        elastic_net: False retrains the anchors without the elastic net (saliency map only, Fig. 7).
        seed: seed of the "random" anchor ablation.
    """

    gamma: float = 85.0
    phase1_fraction: float = 0.5
    lam: float = 0.1
    mu: float = 0.05
    eps: float = 1e-3
    penalty_scale: Literal["absolute", "relative"] = "relative"
    gradient: Literal["mean", "last"] = "mean"
    score_on: Literal["value", "delta"] = "value"
    phase2_start: Literal["warm", "zero"] = "warm"
    anchors: Literal["weighted_gradient", "gradient", "magnitude", "random", "none"] = "weighted_gradient"
    elastic_net: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check("gamma", self.gamma, low=0.0, low_open=True, high=100.0)
        check("phase1_fraction", self.phase1_fraction, low=0.0, low_open=True, high=1.0)
        check("lam", self.lam, nonnegative=True)
        check("mu", self.mu, nonnegative=True)
        check("eps", self.eps, positive=True)
        check("seed", self.seed, integer=True)
        hints = get_type_hints(EACHyperParams)
        for name in ("penalty_scale", "gradient", "score_on", "phase2_start", "anchors"):
            allowed = get_args(hints[name])
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")


@dataclass
class Exploration:
    """Result of phase 1 for one request."""

    delta: torch.Tensor  # δ after phase 1
    grad: torch.Tensor  # mean or last ∇L(z) over phase 1
    score: torch.Tensor  # EAC Eq. 1 (or its ablation)
    steps: int


def explore(problem: TargetProblem, hp: EACHyperParams) -> Exploration:
    """Phase 1: the base optimiser for ``phase1_fraction`` of the steps, recording ∇L at every step."""
    steps = max(1, round(problem.hparams.num_steps * hp.phase1_fraction))
    grad_sum = torch.zeros_like(problem.v0)
    last: list[torch.Tensor] = []

    def record(grad: torch.Tensor) -> None:
        grad_sum.add_(grad)
        last[:] = [grad]

    delta = adam_descent(problem, torch.zeros_like(problem.v0, requires_grad=True), steps, early_stop=False,
                         on_grad=record, last_update=True)  # phase 2 continues: every phase-1 forward updates
    g = grad_sum / steps if hp.gradient == "mean" else last[0]
    return Exploration(delta=delta, grad=g, score=saliency(problem.v0, delta, g, hp), steps=steps)


def saliency(v0: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, hp: EACHyperParams) -> torch.Tensor:
    """EAC Eq. 1 (score = v* ⊙ ∇L) and the anchor-choice ablations of Fig. 8."""
    value = v0 + delta if hp.score_on == "value" else delta
    if hp.anchors in ("weighted_gradient", "none"):
        return value * grad
    if hp.anchors == "gradient":
        return grad.clone()
    if hp.anchors == "magnitude":
        return value.clone()
    if hp.anchors == "random":
        gen = torch.Generator().manual_seed(hp.seed)
        return torch.rand(value.shape, generator=gen).to(value)
    raise ValueError(f"unknown anchor choice {hp.anchors!r}")


def anchor_mask(score: torch.Tensor, hp: EACHyperParams) -> torch.Tensor:
    """EAC Eq. 2: m_S = 1(|score| ≥ P_γ(|score|)), as a bool mask; all-true for the elastic-net-only ablation.

    Exactly ``round((100-γ)% · d)`` anchors are kept (ties broken by index), so the count matches the percentile;
    a (n, d) score (a batch optimised together) gets that many per row.
    """
    if hp.anchors == "none":
        return torch.ones_like(score, dtype=torch.bool)
    k = anchor_count(score.shape[-1], hp.gamma)
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(-1, torch.topk(score.abs(), k, dim=-1).indices, True)
    return mask


def anchor_count(dim: int, gamma: float) -> int:
    """Number of dimensions at or above the γ-th percentile."""
    return max(1, int(round(dim * (100.0 - gamma) / 100.0)))


def retrain(
    problem: TargetProblem, exploration: Exploration, mask: torch.Tensor, hp: EACHyperParams
) -> torch.Tensor:
    """Phase 2: retrain only the anchors under the scored elastic net (EAC Eq. 3-6). Returns δ with every
    dimension outside ``mask`` exactly zero."""
    base = problem.hparams
    steps = max(0, base.num_steps - exploration.steps)
    m = mask.to(problem.v0.dtype)
    start = exploration.delta * m if hp.phase2_start == "warm" else torch.zeros_like(exploration.delta)
    free = start.clone().requires_grad_(True)
    score = exploration.score.abs()
    anchor_mean = (score * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)  # per request (row)
    alpha = 1.0 / (score + hp.eps * anchor_mean)  # EAC Eq. 5
    if hp.penalty_scale == "relative":  # per request (row) when a batch is optimised together
        mean_alpha = (alpha * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)
        l1_scale = 1.0 / (problem.v0.abs().sum(-1, keepdim=True) * mean_alpha)
        l2_scale = 1.0 / problem.v0.pow(2).sum(-1, keepdim=True)
    else:
        l1_scale = l2_scale = 1.0

    def objective(free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = free * m  # EAC Eq. 3: non-anchors stay exactly zero
        loss, nll, total = problem.loss(z)  # the stopping rule reads the request's own loss, without the net's terms
        if hp.elastic_net:
            loss = loss + hp.lam * (l1_scale * alpha * z.abs()).sum() + hp.mu * (l2_scale * z.pow(2)).sum()  # Eq. 4-6
        return loss, nll, total

    return adam_descent(problem, free, steps, objective, first_step=exploration.steps) * m


def compress(problem: TargetProblem, hp: EACHyperParams | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The δ of one problem: EAC's two phases, or the plain optimiser when ``hp`` is None.

    Returns (δ, anchor mask or None).
    """
    if hp is None:
        return check_result(problem, optimise_plain(problem)), None
    exploration = explore(problem, hp)
    mask = anchor_mask(exploration.score, hp)
    return check_result(problem, retrain(problem, exploration, mask, hp)), mask


def _names(problem, rows: torch.Tensor | None = None) -> str:
    requests = problem.requests if rows is None else [r for r, bad in zip(problem.requests, rows.tolist()) if bad]
    return ", ".join(r.name for r in requests)


def check_result(problem, delta: torch.Tensor) -> torch.Tensor:
    """Refuse a degenerate optimisation result before anything is written: a δ with NaN/inf, or a δ (a row of a
    batch's δ) that is exactly zero although the target is not yet reached (NLL above ``early_stop``: a
    zero clamp radius or a step so large that nothing usable survived)."""
    if not torch.isfinite(delta).all():
        raise EditOptimisationError(f"{_names(problem)}: the optimised target holds NaN/inf (check lr, num_steps and "
                                    "clamp_norm_factor); the edit was rejected and nothing was applied")
    zero = ~delta.any(-1)
    if zero.any():
        with torch.no_grad():
            nll = problem.loss(delta)[1]
        bad = zero & ~(nll < problem.hparams.early_stop)  # FT: one joint NLL for its single flattened δ
        if bad.any():
            raise EditOptimisationError(
                f"{_names(problem, bad.reshape(-1) if bad.dim() else None)}: the optimised target is zero although "
                f"the target NLL is {nll.max().item():.3g} (above early_stop {problem.hparams.early_stop}); "
                "the edit was rejected and nothing was applied"
            )
    return delta
