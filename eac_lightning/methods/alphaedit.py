"""AlphaEdit (Fang et al., 2025): MEMIT's update projected onto the null space of preserved knowledge.

P_l projects onto the span of the eigenvectors of C_l = E[k kᵀ] whose eigenvalues fall below
``nullspace_threshold`` (AlphaEdit Eq. 12; its code uses 2e-2 on the mean-normalised C). Keys in the
protected subspace (range of I − P) are left unchanged by construction. Earlier edits' keys are accumulated
in K_p K_pᵀ so a sequence of batches does not overwrite itself (AlphaEdit Eq. 15):

    ΔW_l ᵀ = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ        (α = ``l2``)

Targets (z) and the layer-by-layer residual spreading are MEMIT's; only the per-layer solve differs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from eac_lightning.methods.eac import EACHyperParams
from eac_lightning.methods.memit import MEMIT, MEMIT_CONTEXT, MEMIT_TARGET, ResidualTarget
from eac_lightning.methods.nas import NAS_SETTINGS, NASHyperParams
from eac_lightning.methods.target import ContextTemplateParams, TargetHyperParams
from eac_lightning.validation import check


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀U₀ᵀ over the eigenvectors of ``cov`` with eigenvalue < ``threshold`` (float64)."""
    evals, evecs = torch.linalg.eigh(cov.double())
    small = evecs[:, evals < threshold]
    if small.shape[1] == 0:
        raise ValueError(
            f"AlphaEdit: no eigenvalue of the key covariance is below nullspace_threshold={threshold} "
            f"(smallest {evals.min().item():.3g}); raise the threshold"
        )
    return small @ small.T


class AlphaEdit(MEMIT):
    """AlphaEdit: null-space-projected MEMIT with accumulated keys of earlier edits. Defaults: AlphaEdit's GPT2-XL
    hyper-parameters (jianghoucheng/AlphaEdit hparams/AlphaEdit/gpt2-xl.json: MEMIT's z and contexts,
    nullspace_threshold 2e-2, L2 10).

    Args:
        layers: the critical layers (as MEMIT).
        target: the z optimisation.
        context: prefix contexts.
        nullspace_threshold: eigenvalues of C below this span the null space (AlphaEdit code: 2e-2).
        l2: α, the ridge term of the solve (AlphaEdit code: 10).
        eac: Editing Anchor Compression of z (AlphaEdit-EAC); None for plain AlphaEdit.
        write_aware: optimise z under the update that will be written (as MEMIT's ``write_aware``).
        nas: Norm-Anchor Scaling of the solved value vectors (as MEMIT's ``nas``); AlphaEdit with it is
            :class:`NAS`.
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        target: TargetHyperParams = MEMIT_TARGET,
        context: ContextTemplateParams = MEMIT_CONTEXT,
        nullspace_threshold: float = 2e-2,
        l2: float = 10.0,
        eac: EACHyperParams | None = None,
        write_aware: bool = False,
        nas: NASHyperParams | None = None,
    ) -> None:
        super().__init__(layers=layers, target=target, context=context, eac=eac, write_aware=write_aware, nas=nas)
        check("nullspace_threshold", nullspace_threshold, nonnegative=True)
        check("l2", l2, nonnegative=True)
        self.nullspace_threshold = nullspace_threshold
        self.l2 = l2
        self.projectors: dict[str, torch.Tensor] = {}
        self.past_kkt: dict[str, torch.Tensor] = {}  # K_p K_pᵀ per edited module
        self._step_keys: dict[str, torch.Tensor] = {}  # the last batch's keys, what the edit log stores

    def setup(self, model: nn.Module, tok, stats=None) -> None:
        super().setup(model, tok, stats)
        if stats is not None:
            for name in self.module_names:
                if name not in self.projectors:
                    self.projectors[name] = null_space_projector(stats.get(name).matrix, self.nullspace_threshold)

    def _key_adjoint(self, i: int, name: str, keys: torch.Tensor) -> torch.Tensor:
        """A = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K (AlphaEdit Eq. 15), so that ΔW_l = R Aᵀ."""
        P = self.projectors.get(name)
        if P is None:
            raise RuntimeError("AlphaEdit needs covariance statistics: call setup(model, tok, stats)")
        P = P.to(keys.device)
        d = keys.shape[0]
        past = self.past_kkt.get(name, torch.zeros(d, d, dtype=torch.float64)).to(keys.device)
        lhs = P @ (keys @ keys.T + past) + self.l2 * torch.eye(d, dtype=torch.float64, device=keys.device)
        return torch.linalg.solve(lhs, P @ keys)

    def _after_write(self, model: nn.Module, tok, targets: list[ResidualTarget],
                     keys: dict[str, torch.Tensor] | None) -> None:
        # AlphaEdit accumulates the keys after the whole batch is written: a failed write leaves no trace.
        super()._after_write(model, tok, targets, keys)
        # Keys are float32 values (compute_keys), so the log stores them as float32 without loss.
        self._step_keys = {n: k.float().contiguous() for n, k in self._written_keys(model, tok, targets, keys).items()}
        self._accumulate_keys(self._step_keys)

    def _accumulate_keys(self, keys: dict[str, torch.Tensor]) -> None:
        """K_pK_pᵀ += KKᵀ per module (the live write and the edit log's replay both come here)."""
        for name, k in keys.items():
            k = k.double()
            self.past_kkt[name] = self.past_kkt.get(name, 0) + k @ k.T

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "past_kkt": dict(self.past_kkt)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "past_kkt" in state:  # a logged step holds the batch's keys instead (replay_step)
            self.past_kkt = dict(state["past_kkt"])

    def step_state(self) -> dict[str, Any]:
        """The state with the batch's keys K (d_k × n per module) in place of K_pK_pᵀ (d_k × d_k)."""
        state = super().step_state()
        state.pop("past_kkt", None)
        return {**state, "written_keys": dict(self._step_keys)}

    def replay_step(self, state: dict[str, Any]) -> None:
        state = dict(state)
        keys = state.pop("written_keys", {})
        super().replay_step(state)
        self._accumulate_keys(keys)


class NAS(AlphaEdit):
    """NAS as the paper evaluates it (Liu et al., 2026, arXiv 2602.02543; reference code ``NAS/NAS_main.py`` is
    AlphaEdit's): AlphaEdit whose solved value vectors are rescaled to the unedited model's reference norm
    (:mod:`eac_lightning.methods.nas`). The ``nas`` preset; its own name so that its measured settings on a testbed
    are chosen for it (``configs/testbed/auto.yaml``). Defaults: AlphaEdit's (SasyaTitech/NAS
    hparams/NAS/gpt2-xl.json holds AlphaEdit's values, for every model) and the reference code's NAS settings
    (:class:`~eac_lightning.methods.nas.NASHyperParams`).

    Args:
        layers, target, context, nullspace_threshold, l2, write_aware: as :class:`AlphaEdit`.
        nas: NAS's settings.
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        target: TargetHyperParams = MEMIT_TARGET,
        context: ContextTemplateParams = MEMIT_CONTEXT,
        nullspace_threshold: float = 2e-2,
        l2: float = 10.0,
        write_aware: bool = False,
        nas: NASHyperParams = NAS_SETTINGS,
    ) -> None:
        if nas is None:
            raise ValueError("NAS needs its settings (nas: {...}); AlphaEdit without them is the alphaedit preset")
        super().__init__(layers=layers, target=target, context=context, nullspace_threshold=nullspace_threshold,
                         l2=l2, write_aware=write_aware, nas=copy.deepcopy(nas))

    def _base_label(self) -> str:
        return "AlphaEdit"
