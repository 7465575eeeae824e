"""MEMIT (Meng et al., 2023): a batch of edits spread over several MLP layers.

For each request, z = h^L + δ* at the residual stream of the last critical layer L (δ* from the target
optimisation, plain or EAC-compressed). Then for each critical layer l (in order), with K the keys of the
batch at l (averaged over prefix contexts) and R the remaining residual at L divided by the number of layers
left (MEMIT Eq. 14-16):

    ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹

solved in float64. With the cached Cholesky factor of the damped C (:class:`~eac_lightning.stats.covariance.
Covariance`) and Woodbury's identity, (λC + KKᵀ)⁻¹K = C⁻¹K (λI + KᵀC⁻¹K)⁻¹, so each batch costs a
triangular solve and an n×n solve instead of a fresh d×d inverse.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest
from eac_lightning.methods.base import Deltas, EditMethod, Written
from eac_lightning.methods.eac import EACHyperParams, compress
from eac_lightning.methods.locate_then_edit import LocateThenEdit
from eac_lightning.methods.nas import NASHyperParams, NormAnchor, norm_anchor, norm_anchored
from eac_lightning.methods.target import (
    ContextTemplateParams,
    TargetHyperParams,
    TargetProblem,
    compute_keys,
    subject_last_index,
)
from eac_lightning.models.adapters import get_spec, mlp_out_name, weight_view
from eac_lightning.models.encoding import encode_right_padded
from eac_lightning.models.loading import default_layers
from eac_lightning.models.tracing import capture, through_layer
from eac_lightning.validation import check


@dataclass
class ResidualTarget:
    """One request's target at the last critical layer: z = v₀ + δ (and EAC's anchors)."""

    request: EditRequest
    v0: torch.Tensor
    delta: torch.Tensor
    anchors: torch.Tensor | None
    # Write-aware targets: per critical layer, this request's column of A_l / len(layers) (:meth:`MEMIT.
    # _write_directions`); layer l then receives δ·columnᵀ, exactly the update the target was optimised under.
    write_columns: dict[int, torch.Tensor] | None = None


def residual_at_subject(model: nn.Module, tok, requests: Sequence[EditRequest], layer: int) -> torch.Tensor:
    """The residual stream after ``layer`` at the last subject token of each bare prompt, (n, d)."""
    texts = [r.prompt_text for r in requests]
    device = next(model.parameters()).device
    ids, mask = encode_right_padded(tok, texts, device)
    idx = torch.tensor([subject_last_index(tok, t, r.subject) for t, r in zip(texts, requests)], device=device)
    name = get_spec(model).layer(layer)
    with torch.no_grad(), capture(model, [name]) as rec, through_layer(model, layer):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return rec[name].output[torch.arange(len(texts), device=device), idx]


def _apply_update(model: nn.Module, name: str, upd: torch.Tensor) -> torch.Tensor:
    """W += ΔW in place for one layer; a non-finite ΔW raises before anything of this layer changes."""
    if not torch.isfinite(upd).all():
        raise FloatingPointError(f"MEMIT update of {name} is not finite; the batch was not applied")
    w = weight_view(model, name)
    upd = upd.to(w)  # cast once to the weight's dtype (and device, for a dispatched model)
    with torch.no_grad():
        w.add_(upd)
    return upd


#: MEMIT's published z optimisation: ROME's except the clamp (kmeng01/memit hparams/MEMIT/gpt2-xl.json, the same in
#: jianghoucheng/AlphaEdit hparams/MEMIT/gpt2-xl.json: v_num_grad_steps 20, v_lr 0.5, v_weight_decay 0.5,
#: clamp_norm_factor 0.75, kl_factor 0.0625). AlphaEdit's and B-EAC's default too.
MEMIT_TARGET = TargetHyperParams(clamp_norm_factor=0.75)
#: MEMIT's prefix contexts (kmeng01/memit memit/memit_main.py get_context_templates: [(10, 5)], "{}" + 5 texts);
#: AlphaEdit's code uses the same.
MEMIT_CONTEXT = ContextTemplateParams(length_count=[[10, 5]])


class MEMIT(LocateThenEdit):
    """MEMIT, optionally with EAC on its z optimisation. Defaults: MEMIT's GPT2-XL hyper-parameters
    (:data:`MEMIT_TARGET`, :data:`MEMIT_CONTEXT`, λ 20000); the layers are the model's.

    Args:
        layers: the critical layers, ascending; z is optimised at the last one. None: the model's default.
        target: the z optimisation (EAC App. B Eq. 9 at the residual stream); default MEMIT's (clamp 0.75).
        context: prefix contexts for keys and z; default MEMIT's ([[10, 5]]).
        mom2_update_weight: λ of (λC + KKᵀ) (GPT2-XL 20000, GPT-J and LLaMA-3-8B 15000).
        eac: Editing Anchor Compression of z; None for plain MEMIT.
        write_aware: False optimises z with δ at the last subject token of layer L only (as published). True
            inserts δ at every critical layer's MLP output in the share that layer's update will write at each
            token (A_l = (λC_l + K_lK_lᵀ)⁻¹K_l over the number of layers, keys of the unedited model), and
            writes exactly that update, ΔW_l = δᵀA_lᵀ/len(layers), so the optimised loss is the edited model's
            own (docs/methods.md, "Write-aware target"). Since A_l couples the batch, its δs are optimised
            together.
        nas: Norm-Anchor Scaling (arXiv 2602.02543, :mod:`eac_lightning.methods.nas`): each solved value vector is
            rescaled to the unedited model's reference norm before the write; None (the default) writes z as
            solved. AlphaEdit with it is the paper's NAS (the ``nas`` preset).
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        target: TargetHyperParams = MEMIT_TARGET,
        context: ContextTemplateParams = MEMIT_CONTEXT,
        mom2_update_weight: float = 20000.0,
        eac: EACHyperParams | None = None,
        write_aware: bool = False,
        nas: NASHyperParams | None = None,
    ) -> None:
        check("mom2_update_weight", mom2_update_weight, positive=True)
        super().__init__(target, context, eac, write_aware)
        self.layers = sorted(layers) if layers is not None else None
        self.mom2_update_weight = mom2_update_weight
        self.nas = nas
        self.norm_anchor: NormAnchor | None = None  # NAS's ρ, measured once on the unedited model (state)

    @property
    def label(self) -> str:
        """The name in summaries; with NAS on, " + NAS" after it ("B-EAC + NAS"), and AlphaEdit + NAS is "NAS"
        (the paper's name for it)."""
        base = self._base_label()
        if self.nas is None:
            return base
        return "NAS" if base == "AlphaEdit" else f"{base} + NAS"

    def _base_label(self) -> str:
        return EditMethod.label.fget(self)

    def setup(self, model: nn.Module, tok, stats=None) -> None:
        super().setup(model, tok, stats)
        if self.nas is not None and self.norm_anchor is None:
            # on the unedited model (setup's contract), once: a resumed run reads it from the statistics cache and
            # then from its own state (load_state_dict), never from its edited weights
            self.norm_anchor = norm_anchor(model, tok, self.layers[-1], self.target, self.nas, stats)

    @staticmethod
    def default_target() -> TargetHyperParams:
        return copy.deepcopy(MEMIT_TARGET)

    @staticmethod
    def default_context() -> ContextTemplateParams:
        return copy.deepcopy(MEMIT_CONTEXT)

    def edited_layers(self, model: nn.Module) -> list[int]:
        if self.layers is None:
            self.layers = list(default_layers(model).memit)
        return self.layers

    def _problem(self, model: nn.Module, tok, requests: Sequence[EditRequest],
                 directions: dict[int, torch.Tensor] | None = None) -> TargetProblem:
        """The batch's z optimisation at the last critical layer: all its requests in one forward per step."""
        return TargetProblem(model, tok, requests, self.layers[-1], self.templates, self.target, site="residual",
                             write_directions=directions)

    def _batch_keys(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> dict[int, torch.Tensor]:
        """{critical layer l: K_l (d_k, n), float64}: the batch's keys on the current weights."""
        return {layer: compute_keys(model, tok, requests, layer, self.templates).double().T for layer in self.layers}

    def _write_directions(self, model: nn.Module, keys: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{layer l: A_l / len(layers)} with A_l (d_k, n) the solve of :meth:`_key_adjoint` for the batch's keys
        (:meth:`_batch_keys`): when every layer writes its even share of the residual δ, ΔW_l = δᵀA_lᵀ/len(layers)
        adds δᵀA_lᵀk/len(layers) at a token with key k (write-aware targets)."""
        return {layer: self._key_adjoint(i, mlp_out_name(model, layer), keys[layer]).float() / len(self.layers)
                for i, layer in enumerate(self.layers)}

    def compute_targets(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> list[ResidualTarget]:
        """The batch's targets (:meth:`_solve_targets`), rescaled by NAS when it is on."""
        self.ensure_setup(model, tok)
        targets = self._solve_targets(model, tok, requests)
        if self.nas is None:
            return targets
        if self.norm_anchor is None:
            raise RuntimeError("NAS has no reference norm: call setup(model, tok, stats) on the unedited model first")
        return norm_anchored(model, tok, targets, self.layers[-1], self.norm_anchor, self.nas.skip_ratio)

    def _solve_targets(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> list[ResidualTarget]:
        """z = v₀ + δ of every request at the last critical layer (plain or EAC-compressed, write-aware or not)."""
        if self.write_aware:  # the write directions couple the batch: one problem
            directions = self._write_directions(model, self._batch_keys(model, tok, requests))
            problem = self._problem(model, tok, requests, directions)
            deltas, anchors = compress(problem, self.eac)
            return [ResidualTarget(r, problem.v0[i], deltas[i], None if anchors is None else anchors[i],
                                   {l: a[:, i] for l, a in directions.items()}) for i, r in enumerate(requests)]
        out = []
        for chunk in self._chunks(requests):
            problem = self._problem(model, tok, chunk)
            deltas, anchors = compress(problem, self.eac)
            out += [ResidualTarget(r, problem.v0[i], deltas[i], None if anchors is None else anchors[i])
                    for i, r in enumerate(chunk)]
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.nas is not None:
            state["nas"] = None if self.norm_anchor is None else self.norm_anchor.state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Parsed first: a malformed or foreign record raises before any of the method's state changes.
        anchor = None if state.get("nas") is None else NormAnchor.from_state(state["nas"])
        if anchor is not None and self.layers is not None and anchor.layer != self.layers[-1]:
            raise ValueError(f"NAS state was measured at layer {anchor.layer}, this method solves z at layer "
                             f"{self.layers[-1]}")
        super().load_state_dict(state)
        if anchor is not None and self.nas is not None:
            self.norm_anchor = anchor  # the logged ρ, measured on the unedited model

    def _chunks(self, requests: Sequence[EditRequest]) -> list[list[EditRequest]]:
        """The batch in chunks of ``target.requests_per_forward`` (independent targets: chunking changes nothing)."""
        k = self.target.requests_per_forward
        return [list(requests[i:i + k]) for i in range(0, len(requests), k)]

    def _key_adjoint(self, i: int, name: str, keys: torch.Tensor) -> torch.Tensor:
        """A_l = (λC + KKᵀ)⁻¹K (d_k, n; float64) of MEMIT Eq. 14, so that ΔW_l = R Aᵀ. Keys (d_k, n)."""
        return self._metric_solve(name, keys)[0]

    def _metric_solve(self, name: str, keys: torch.Tensor, other: torch.Tensor | None = None):
        """(λC + KKᵀ)⁻¹K and, given ``other`` (d_k, m), (λC + KKᵀ)⁻¹·other, float64. With the cached Cholesky
        factor of C and Woodbury's identity, (λC + KKᵀ)⁻¹ = (C⁻¹ − C⁻¹K(λI + KᵀC⁻¹K)⁻¹KᵀC⁻¹)/λ: a triangular
        solve and an n×n solve instead of a fresh d_k×d_k inverse."""
        if self.stats is None:
            raise RuntimeError("MEMIT needs covariance statistics: call setup(model, tok, stats)")
        cov = self.stats.get(name)
        ck = cov.solve(keys)  # C⁻¹K through the cached factor
        n = keys.shape[1]
        small = self.mom2_update_weight * torch.eye(n, dtype=torch.float64, device=keys.device) + keys.T @ ck
        adjoint = torch.linalg.solve(small, ck.T).T  # C⁻¹K (λI + KᵀC⁻¹K)⁻¹
        if other is None:
            return adjoint, None
        co = cov.solve(other)
        return adjoint, (co - ck @ torch.linalg.solve(small, keys.T @ co)) / self.mom2_update_weight

    def _layer_residual(self, i: int, targets: list[ResidualTarget], resid: torch.Tensor) -> torch.Tensor:
        """The share of the remaining residual ``resid`` = z − h^L (d, n; float64) that layer ``self.layers[i]``
        writes. MEMIT spreads it evenly over the layers left (Eq. 16); subclasses may mask or weight it per
        request and dimension (B-EAC's layer-wise anchors, :mod:`eac_lightning.methods.beac`)."""
        return resid / (len(self.layers) - i)

    def _write(self, model: nn.Module, tok, targets: list[ResidualTarget]) -> Written:
        if all(t.write_columns is not None for t in targets):
            written = self._write_planned(model, targets)
            self._after_write(model, tok, targets, None)
            return written
        requests = [t.request for t in targets]
        zs = torch.stack([t.v0 + t.delta for t in targets])  # (n, d)
        deltas: Deltas = {}
        factors = {}
        edit_sq = torch.zeros(len(targets), dtype=torch.float64)
        solved_with: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            name = mlp_out_name(model, layer)
            # solved on the device of the layer's keys (a dispatched model spreads the layers over devices)
            keys = compute_keys(model, tok, requests, layer, self.templates).double().T  # (d_k, n)
            cur = residual_at_subject(model, tok, requests, self.layers[-1])
            resid = self._layer_residual(i, targets, (zs - cur.to(zs.device)).double().T.to(keys.device))  # Eq. 16
            left, right, sq = self._layer_factors(i, name, keys, resid)
            deltas[name] = _apply_update(model, name, left @ right)
            factors[name] = (left.cpu(), right.cpu())
            edit_sq += sq.cpu()
            solved_with[name] = keys
        # A layer's keys depend only on the layers below it, so the keys each layer was solved with are the batch's
        # keys on the edited model.
        self._after_write(model, tok, targets, solved_with)
        return Written(deltas, edit_sq.sqrt().tolist(), factors)

    def _after_write(self, model: nn.Module, tok, targets: list[ResidualTarget],
                     keys: dict[str, torch.Tensor] | None) -> None:
        """Called once the whole batch is written (a failed write never gets here), with the batch's keys on the
        edited weights {module: K (d_k, n)}, or None after a write-aware write (see :meth:`_written_keys`). The
        records of earlier edits (AlphaEdit's, B-EAC's) grow here."""

    def _layer_update(self, i: int, name: str, keys: torch.Tensor,
                      resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW_l = R Kᵀ(λC + KKᵀ)⁻¹ (MEMIT Eq. 14) = R Aᵀ, for keys (d_k, n) and the layer's residual share R (d, n),
        and per request i the squared norm of its own term r_i a_iᵀ (‖r_i‖²‖a_i‖², the ledger's per-edit norm)."""
        left, right, sq = self._layer_factors(i, name, keys, resid)
        return left @ right, sq

    def _layer_factors(self, i: int, name: str, keys: torch.Tensor,
                       resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_layer_update` as (left, right, per-request squared norms) with ΔW_l = left @ right (here R and
        Aᵀ, rank n: what the edit log stores). Subclasses may solve per row (B-EAC's anchor key record,
        :mod:`eac_lightning.methods.beac`)."""
        adjoint = self._key_adjoint(i, name, keys)
        return resid, adjoint.T, resid.pow(2).sum(0) * adjoint.pow(2).sum(0)

    def _write_planned(self, model: nn.Module, targets: list[ResidualTarget]) -> Written:
        """Write-aware write: ΔW_l = Σ_i δ_i a_{l,i}ᵀ with the columns the targets were optimised under."""
        deltas: Deltas = {}
        factors = {}
        delta = torch.stack([t.delta for t in targets]).double()  # (n, d)
        edit_sq = torch.zeros(len(targets), dtype=torch.float64)
        for layer in self.layers:
            name = mlp_out_name(model, layer)
            cols = torch.stack([t.write_columns[layer] for t in targets]).double().to(delta.device)  # (n, d_k)
            deltas[name] = _apply_update(model, name, delta.T @ cols)
            factors[name] = (delta.T.cpu(), cols.cpu())
            edit_sq += (delta.pow(2).sum(1) * cols.pow(2).sum(1)).cpu()
        return Written(deltas, edit_sq.sqrt().tolist(), factors)

    def _written_keys(self, model: nn.Module, tok, targets: list[ResidualTarget],
                      keys: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """{module: K (d_k, n), float64, CPU}: the batch's keys at every critical layer on the edited weights, those
        :meth:`_write` solved with when it has them (a write-aware write writes every layer at once, so they are
        computed afresh)."""
        if keys is not None:
            return {name: k.cpu() for name, k in keys.items()}
        requests = [t.request for t in targets]
        return {mlp_out_name(model, layer): compute_keys(model, tok, requests, layer, self.templates).double().T.cpu()
                for layer in self.layers}
