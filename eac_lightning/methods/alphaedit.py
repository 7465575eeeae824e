"""AlphaEdit (Fang et al., 2025): MEMIT's update projected onto the null space of preserved knowledge.

P_l projects onto the span of the eigenvectors of C_l = E[k kᵀ] whose eigenvalues fall below
``nullspace_threshold`` (AlphaEdit Eq. 12; its code uses 2e-2 on the mean-normalised C). Keys in the
protected subspace (range of I − P) are left unchanged by construction. Earlier edits' keys are accumulated
in K_p K_pᵀ so a sequence of batches does not overwrite itself (AlphaEdit Eq. 15):

    ΔW_l ᵀ = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ        (α = ``l2``)

Targets (z) and the layer-by-layer residual spreading are MEMIT's; only the per-layer solve differs.

The solve is carried out in the null space itself. With P = U₀U₀ᵀ (U₀: d_k × r, orthonormal) and M = KKᵀ + K_pK_pᵀ,
(PM + αI) U₀Y = U₀(U₀ᵀMU₀ + αI)Y, so

    (P M + α I)⁻¹ P K = U₀ (U₀ᵀ M U₀ + α I_r)⁻¹ U₀ᵀ K

exactly: an r × r symmetric positive-definite system instead of a d_k × d_k product and a general solve (the
published code forms P·M, 2d_k³ FLOPs per layer and batch, then an LU solve). Only G = U₀ᵀK_pK_pᵀU₀ is kept of the
earlier keys (r × r, accumulated as G += (U₀ᵀK)(U₀ᵀK)ᵀ), and U₀ in place of P: the method holds less than the d_k ×
d_k pair and a batch's solve costs r³/3 + O(d_k·r·n) FLOPs.
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


def null_space_basis(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """U₀ (d_k × r, float64, orthonormal columns): the eigenvectors of ``cov`` with eigenvalue < ``threshold``, so that
    AlphaEdit's projector is P = U₀U₀ᵀ (AlphaEdit Eq. 12)."""
    evals, evecs = torch.linalg.eigh(cov.double())
    small = evecs[:, evals < threshold]
    if small.shape[1] == 0:
        raise ValueError(
            f"AlphaEdit: no eigenvalue of the key covariance is below nullspace_threshold={threshold} "
            f"(smallest {evals.min().item():.3g}); raise the threshold"
        )
    return small.contiguous()


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀U₀ᵀ over the eigenvectors of ``cov`` with eigenvalue < ``threshold`` (float64)."""
    basis = null_space_basis(cov, threshold)
    return basis @ basis.T


def null_space_solve(basis: torch.Tensor, null_kkt: torch.Tensor, keys: torch.Tensor, l2: float,
                     counted: int | None = None, weight: float = 1.0) -> torch.Tensor:
    """(P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K (AlphaEdit Eq. 15) as U₀ (G + (U₀ᵀK)(U₀ᵀK)ᵀ + αI)⁻¹ U₀ᵀK, with
    G = U₀ᵀK_pK_pᵀU₀ (module docstring). float64; Cholesky for the positive-definite system (α > 0), least squares
    where α = 0 leaves it singular. ``counted``: only the first ``counted`` keys enter KKᵀ, the others are already
    in G (B-EAC's re-written edits whose key replaces their entry in the record, docs/beac.md B8). ``weight``: G's
    weight w in the system (B-EAC's record weight, B9)."""
    projected = basis.T @ keys.double()  # U₀ᵀK: r × n
    own = projected if counted is None else projected[:, :counted]
    lhs = torch.addmm(null_kkt, own, own.T, beta=weight)  # w·G + KKᵀ in one r × r allocation
    lhs.diagonal().add_(l2)
    factor, info = torch.linalg.cholesky_ex(lhs)
    y = (torch.cholesky_solve(projected, factor) if int(info) == 0
         else torch.linalg.lstsq(lhs, projected).solution)
    return basis @ y


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
        self.null_bases: dict[str, torch.Tensor] = {}  # U₀ per edited module (P = U₀U₀ᵀ)
        self.null_kkt: dict[str, torch.Tensor] = {}  # G = U₀ᵀK_pK_pᵀU₀ per edited module (r × r)
        self._unprojected: dict[str, torch.Tensor] = {}  # K_pK_pᵀ of a state saved before G, until U₀ is known
        self._step_keys: dict[str, torch.Tensor] = {}  # the last batch's keys, what the edit log stores

    def setup(self, model: nn.Module, tok, stats=None) -> None:
        super().setup(model, tok, stats)
        if stats is not None:
            for name in self.module_names:
                if name not in self.null_bases:
                    self.null_bases[name] = null_space_basis(stats.get(name).matrix, self.nullspace_threshold)
        self._project_saved_kkt()

    def projector(self, name: str) -> torch.Tensor:
        """P = U₀U₀ᵀ of a module (d_k × d_k, built on each call: for inspection; the solve never forms it)."""
        basis = self.null_bases[name]
        return basis @ basis.T

    def _key_adjoint(self, i: int, name: str, keys: torch.Tensor) -> torch.Tensor:
        """A = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K (AlphaEdit Eq. 15), so that ΔW_l = R Aᵀ (:func:`null_space_solve`)."""
        basis = self.null_bases.get(name)
        if basis is None:
            raise RuntimeError("AlphaEdit needs covariance statistics: call setup(model, tok, stats)")
        # U₀ stays where setup made it (the host) and comes to the keys' device per call: at LLaMA-3-8B width it is
        # up to 14336 × r float64 (~1.6 GB) per edited layer, a ~0.1 s copy over PCIe against minutes of z
        # optimisation per batch, where keeping it resident would hold ~1.6 GB of device memory per layer.
        basis = basis.to(keys.device)
        r = basis.shape[1]
        past = self.null_kkt.get(name, torch.zeros(r, r, dtype=torch.float64)).to(keys.device)
        return null_space_solve(basis, past, keys, self.l2, self._new_keys(keys.shape[1]), self._record_weight())

    def _record_weight(self) -> float:
        """The weight of the record of earlier keys in the solve (AlphaEdit's: 1; B-EAC's ``record_weight``)."""
        return 1.0

    def _new_keys(self, n: int) -> int | None:
        """How many of a batch's n keys (the first ones) enter the solve's KKᵀ; None: all (B-EAC may hold its
        re-written edits' keys out, :meth:`~eac_lightning.methods.beac.BEAC._new_keys`)."""
        return None

    def _after_write(self, model: nn.Module, tok, targets: list[ResidualTarget],
                     keys: dict[str, torch.Tensor] | None) -> None:
        # AlphaEdit accumulates the keys after the whole batch is written: a failed write leaves no trace.
        super()._after_write(model, tok, targets, keys)
        # Keys are float32 values (compute_keys), so the log stores them as float32 without loss.
        self._step_keys = {n: k.float().contiguous() for n, k in self._written_keys(model, tok, targets, keys).items()}
        self._accumulate_keys(self._step_keys)

    def _accumulate_keys(self, keys: dict[str, torch.Tensor]) -> None:
        """K_pK_pᵀ += KKᵀ per module, kept as G += (U₀ᵀK)(U₀ᵀK)ᵀ (the live write and the edit log's replay both come
        here)."""
        for name, k in keys.items():
            basis = self.null_bases.get(name)
            if basis is None:
                raise RuntimeError("AlphaEdit needs covariance statistics: call setup(model, tok, stats)")
            projected = basis.T @ k.double().to(basis.device)
            self.null_kkt[name] = self.null_kkt.get(name, 0) + projected @ projected.T

    def _project_saved_kkt(self) -> None:
        """A state written before the record was kept in the null space holds K_pK_pᵀ: G = U₀ᵀ(K_pK_pᵀ)U₀ once U₀
        is known (it is after setup)."""
        for name in [n for n in self._unprojected if n in self.null_bases]:
            basis = self.null_bases[name]
            self.null_kkt[name] = basis.T @ self._unprojected.pop(name).double().to(basis.device) @ basis

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "null_kkt": dict(self.null_kkt)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "null_kkt" in state:  # a logged step holds the batch's keys instead (replay_step)
            self.null_kkt, self._unprojected = dict(state["null_kkt"]), {}
        elif "past_kkt" in state:  # saved as K_pK_pᵀ (d_k × d_k): projected now or at setup
            self.null_kkt, self._unprojected = {}, dict(state["past_kkt"])
            self._project_saved_kkt()

    def step_state(self) -> dict[str, Any]:
        """The state with the batch's keys K (d_k × n per module) in place of G (r × r)."""
        state = super().step_state()
        state.pop("null_kkt", None)
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
