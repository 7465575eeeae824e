"""ROME (Meng et al., 2022): a rank-one closed-form edit of one MLP output projection.

EAC App. B Eq. 7:  Ŵ = W + Λ (C⁻¹k*)ᵀ,  Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*),

with k* the key averaged over prefix contexts (Eq. 8) and v* = W k* + δ*, δ* from the target optimisation
(Eq. 9; :mod:`eac_lightning.methods.target`) — plain, or compressed by EAC (:mod:`eac_lightning.methods.eac`).
Then Ŵ k* = v* exactly. Without ``mom2_adjustment`` C = I.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest
from eac_lightning.methods.base import Written
from eac_lightning.methods.eac import EACHyperParams, compress
from eac_lightning.methods.locate_then_edit import ROME_CONTEXT, ROME_TARGET, LocateThenEdit
from eac_lightning.methods.target import (
    ContextTemplateParams,
    TargetHyperParams,
    TargetProblem,
    compute_keys,
)
from eac_lightning.models.adapters import weight_view
from eac_lightning.models.loading import default_layers


@dataclass
class RankOneTarget:
    """What the optimisation found for one request: its value shift δ and (EAC) its anchors."""

    request: EditRequest
    delta: torch.Tensor
    anchors: torch.Tensor | None


def key_direction(key: torch.Tensor, cov=None) -> torch.Tensor:
    """C⁻¹k* / (k*ᵀC⁻¹k*) in float64: the rank-one update δ·(this)ᵀ writes (thisᵀk)·δ at a token whose key is k.

    ``cov`` is a :class:`eac_lightning.stats.covariance.Covariance` (damped Cholesky solve) or None for C = I.
    """
    k = key.double()
    u = cov.solve(k) if cov is not None else k
    return u / (u @ k)


def rank_one_update(weight: torch.Tensor, key: torch.Tensor, delta: torch.Tensor, cov=None) -> torch.Tensor:
    """ΔW = Λ uᵀ with u = C⁻¹k*, Λ = δ / (uᵀk*) (EAC App. B Eq. 7), so that (W + ΔW) k* = W k* + δ.

    Computed in float64 (:func:`key_direction`), cast once to the weight's dtype and device (with a dispatched
    model δ and k* may come from other devices than the weight's).
    """
    left, right = rank_one_factors(key, delta, cov)
    return torch.outer(left, right).to(weight)


def rank_one_factors(key: torch.Tensor, delta: torch.Tensor, cov=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(δ, C⁻¹k*/(k*ᵀC⁻¹k*)) in float64 on δ's device: :func:`rank_one_update` is their outer product, and the
    edit log stores the two vectors instead of the matrix."""
    return delta.double(), key_direction(key, cov).to(delta.device)


class ROME(LocateThenEdit):
    """ROME, optionally with EAC on its v* optimisation. Defaults: ROME's GPT2-XL hyper-parameters
    (:data:`~eac_lightning.methods.locate_then_edit.ROME_TARGET`, ``ROME_CONTEXT``; kmeng01/rome
    hparams/ROME/gpt2-xl.json, mom2_adjustment true). The layer is the model's.

    Args:
        layer: the edited decoder layer (its MLP output projection); None: the model's default
            (:func:`eac_lightning.models.loading.default_layers`).
        target: the v* optimisation (EAC App. B Eq. 9).
        context: the prefix contexts of Eq. 8-9.
        mom2_adjustment: use C⁻¹ (True, as published) or C = I.
        eac: Editing Anchor Compression of v*; None for plain ROME.
        write_aware: False optimises v* with δ at the last subject token only (as published). True optimises it
            with δ added at every token in the share the rank-one update will write there (c_t = uᵀk_t, u =
            C⁻¹k*/(k*ᵀC⁻¹k*)), so the optimised loss is that of the edited model. Same closed form, same cost;
            it matters where keys other than k* overlap k* in the C⁻¹ metric (small models, layer 0:
            docs/methods.md, "Write-aware target").
    """

    def __init__(
        self,
        layer: int | None = None,
        target: TargetHyperParams = ROME_TARGET,
        context: ContextTemplateParams = ROME_CONTEXT,
        mom2_adjustment: bool = True,
        eac: EACHyperParams | None = None,
        write_aware: bool = False,
    ) -> None:
        super().__init__(target, context, eac, write_aware)
        self.layer = layer
        self.mom2_adjustment = mom2_adjustment

    def edited_layers(self, model: nn.Module) -> list[int]:
        if self.layer is None:
            self.layer = default_layers(model).rome
        return [self.layer]

    def uses_covariance(self) -> bool:
        return self.mom2_adjustment

    def compute_targets(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> list[RankOneTarget]:
        self.ensure_setup(model, tok)
        out = []
        for r in requests:
            directions = {self.layer: self._key_direction(model, tok, r)} if self.write_aware else None
            problem = TargetProblem(model, tok, [r], self.layer, self.templates, self.target, site="mlp",
                                    write_directions=directions)
            delta, anchors = compress(problem, self.eac)
            out.append(RankOneTarget(r, delta[0], None if anchors is None else anchors[0]))
        return out

    def _covariance(self):
        cov = self.stats.get(self.module_names[0]) if (self.mom2_adjustment and self.stats is not None) else None
        if self.mom2_adjustment and cov is None:
            raise RuntimeError("ROME with mom2_adjustment needs covariance statistics: call setup(model, tok, stats)")
        return cov

    def _key_direction(self, model: nn.Module, tok, request: EditRequest) -> torch.Tensor:
        """:func:`key_direction` of the request's k* on the current weights (write-aware targets)."""
        key = compute_keys(model, tok, [request], self.layer, self.templates)[0]
        return key_direction(key, self._covariance()).float()

    def _write(self, model: nn.Module, tok, targets: list[RankOneTarget]) -> Written:
        name = self.module_names[0]
        cov = self._covariance()
        w = weight_view(model, name)
        total = torch.zeros_like(w)
        norms, lefts, rights = [], [], []
        for t in targets:  # several requests in one step are written one after another, as sequential ROME
            key = compute_keys(model, tok, [t.request], self.layer, self.templates)[0]  # k* on current weights
            left, right = rank_one_factors(key, t.delta, cov)
            d = torch.outer(left, right).to(w)  # rank_one_update, with its factors kept for the edit log
            with torch.no_grad():
                w.add_(d)
            total += d
            norms.append(float(d.double().norm()))
            lefts.append(left.cpu())
            rights.append(right.cpu())
        return Written({name: total}, norms, {name: (torch.stack(lefts, 1), torch.stack(rights))})
