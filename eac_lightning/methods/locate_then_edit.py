"""What ROME, MEMIT and the methods built on MEMIT (AlphaEdit, B-EAC) share: they edit the MLP output projections
of located layers so that the keys k* of the edited subject (EAC App. B Eq. 8) read new values, found by the
target optimisation of Eq. 9 (:mod:`eac_lightning.methods.target`, plain or compressed by EAC).

:class:`LocateThenEdit` holds their common settings (``target``, ``context``, ``eac``, ``write_aware``) and their
per-run state: the prefix contexts sampled once from the unedited model (kept in :meth:`state_dict`, so a resumed run
uses the same ones) and the key statistics.

Each method's published ``target`` and ``context`` are its signature's defaults (:data:`ROME_TARGET` here,
``MEMIT_TARGET`` in :mod:`eac_lightning.methods.memit`): dataclass instances, so the config parser fills a partly
given ``target`` or ``context`` from the method's own values, not from the dataclass's (configs/methods/README.md).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from eac_lightning.methods.base import EditMethod
from eac_lightning.methods.eac import EACHyperParams
from eac_lightning.methods.target import (
    ContextTemplateParams,
    TargetHyperParams,
    generate_context_templates,
)
from eac_lightning.models.adapters import mlp_out_name

#: ROME's published v* optimisation, the dataclass's own defaults (kmeng01/rome hparams/ROME/gpt2-xl.json:
#: v_num_grad_steps 20, v_lr 0.5, v_weight_decay 0.5, clamp_norm_factor 4, kl_factor 0.0625).
ROME_TARGET = TargetHyperParams()
#: ROME's prefix contexts (kmeng01/rome rome/rome_main.py: [(5, 10), (10, 10)], "{}" + 20 generated texts).
ROME_CONTEXT = ContextTemplateParams()


class LocateThenEdit(EditMethod):
    """Shared setup of ROME and the MEMIT family (subclasses say which layers they edit).

    Args:
        target: the target optimisation (EAC App. B Eq. 9); None: ``default_target()`` (the method's published one).
        context: the prefix contexts of Eq. 8-9; None: ``default_context()``.
        eac: Editing Anchor Compression of the target; None for the plain method.
        write_aware: optimise the target under the update that will be written (docs/methods.md,
            "Write-aware target").
    """

    def __init__(self, target: TargetHyperParams | None, context: ContextTemplateParams | None,
                 eac: EACHyperParams | None, write_aware: bool) -> None:
        # copies: a signature's default instance is shared by every method built without the argument
        self.target = copy.deepcopy(target) if target is not None else self.default_target()
        self.context = copy.deepcopy(context) if context is not None else self.default_context()
        self.eac = copy.deepcopy(eac)
        self.write_aware = write_aware
        self.templates: list[str] | None = None
        self.stats = None
        self.module_names: list[str] = []

    @staticmethod
    def default_target() -> TargetHyperParams:
        """The method's published target optimisation (ROME's; MEMIT overrides it)."""
        return copy.deepcopy(ROME_TARGET)

    @staticmethod
    def default_context() -> ContextTemplateParams:
        """The method's published prefix contexts (ROME's; MEMIT overrides them)."""
        return copy.deepcopy(ROME_CONTEXT)

    def edited_layers(self, model: nn.Module) -> list[int]:
        """The decoder layers whose MLP output projection is edited (resolving a default from ``model``)."""
        raise NotImplementedError

    def uses_covariance(self) -> bool:
        """Whether the write solves with the key covariance C (its statistics are then prefetched in setup)."""
        return True

    def setup(self, model: nn.Module, tok, stats=None) -> None:
        self.module_names = [mlp_out_name(model, layer) for layer in self.edited_layers(model)]
        if self.templates is None:
            self.templates = generate_context_templates(model, tok, self.context)
        self.stats = stats
        if stats is not None and self.uses_covariance():
            stats.prefetch(self.module_names)

    def ensure_setup(self, model: nn.Module, tok) -> None:
        """Set up on first use when the caller did not (the templates need the unedited model)."""
        if self.templates is None:
            self.setup(model, tok, self.stats)

    def state_dict(self) -> dict[str, Any]:
        return {"templates": self.templates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.templates = state.get("templates")
