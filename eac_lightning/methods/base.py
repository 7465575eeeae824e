"""What every editing method shares: per-module weight deltas that are applied in place and returned, and the
two-step method interface (optimise targets, write them) that :mod:`eac_lightning.methods.edit` runs.

Deltas are kept in (out, in) layout for every architecture (see :func:`eac_lightning.models.adapters.weight_view`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest
from eac_lightning.models.adapters import weight_view

Deltas = dict[str, torch.Tensor]


@torch.no_grad()
def apply_deltas(model: nn.Module, deltas: Deltas) -> None:
    """W ← W + ΔW for each module (in place)."""
    for name, d in deltas.items():
        w = weight_view(model, name)
        w.add_(d.to(w.dtype))


def snapshot(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the named modules' weights, to restore them bit-exactly."""
    return {n: weight_view(model, n).detach().clone() for n in names}


@torch.no_grad()
def restore_weights(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for n, w in saved.items():
        weight_view(model, n).copy_(w)


def merge_deltas(into: Deltas, new: Deltas) -> Deltas:
    """Accumulate ``new`` into ``into`` (float32 on CPU, the checkpointed form)."""
    for n, d in new.items():
        d = d.detach().float().cpu()
        into[n] = into[n] + d if n in into else d.clone()
    return into


@dataclass
class Written:
    """What one write changed.

    Attributes:
        deltas: the batch's weight change per module, (out, in) layout.
        edit_norms: per request of the batch, the Frobenius norm of its own share of ``deltas`` over all modules
            (ROME: its rank-one update; MEMIT family: its column's term r_i a_iᵀ of every layer's R Aᵀ); None
            where the method writes one joint change for the batch that no request owns (FT on several requests).
        factors: per module, (left (out, r), right (r, in)) with left @ right = the module's delta: the low-rank
            form the edit log stores (ROME: the edits' Λ and C⁻¹k* directions; MEMIT family: R and Aᵀ). None or a
            missing module: stored dense (FT).
    """

    deltas: Deltas
    edit_norms: list[float] | None
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


class EditMethod:
    """An editing method, split the way :func:`eac_lightning.methods.edit.edit` runs it.

    ``compute_targets`` is the optimisation (in Lightning: ``training_step``); ``write`` is the closed-form update
    that changes weights in place (in Lightning: the ``WeightUpdate`` callback). ``write`` is atomic: if it fails,
    every module it touched is restored.
    """

    #: where this method's settings came from, as the settings resolver recorded it (:mod:`eac_lightning.methods.settings`;
    #: summary.json's ``method_settings``): the measured settings it changed and the ones you gave
    method_settings: dict[str, Any] = {}
    #: the modules this method edits, known after :meth:`setup`
    module_names: list[str]

    @property
    def label(self) -> str:
        """The method's name in summaries: the class name, "-EAC" when it compresses with EAC ("ROME-EAC")."""
        return type(self).__name__ + ("-EAC" if getattr(self, "eac", None) else "")

    def setup(self, model: nn.Module, tok, stats) -> None:
        """Prepare per-run state (context templates, statistics) before the first edit."""

    def compute_targets(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> Any:
        raise NotImplementedError

    def _write(self, model: nn.Module, tok, targets: Any) -> Written:
        raise NotImplementedError

    def write(self, model: nn.Module, tok, targets: Any, restore: Callable[[], None] | None = None) -> Written:
        """The closed-form update; refused (weights restored) if a written delta or weight holds NaN/inf.

        ``restore`` puts the edited modules back as they were before the write (an edit session's W = W_base + D);
        without it the modules are copied first (a copy of every edited matrix for the duration of the write)."""
        if restore is None:
            saved = snapshot(model, self.module_names)

            def restore() -> None:
                restore_weights(model, saved)
        try:
            written = self._write(model, tok, targets)
            bad = [n for n, d in written.deltas.items()
                   if not (torch.isfinite(d).all() and torch.isfinite(weight_view(model, n)).all())]
            if bad:
                raise FloatingPointError(f"the update of {', '.join(bad)} holds NaN/inf; the edit was rejected and "
                                         "the weights were restored")
            return written
        except BaseException:
            restore()
            raise

    def state_dict(self) -> dict[str, Any]:
        """Method state that a resumed run needs (context templates, accumulated statistics, anchor history)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def written_requests(self, targets: Any) -> list[EditRequest] | None:
        """The requests ``targets`` write, in order: the batch's, then any earlier edits the method writes again with
        it (B-EAC's refresh), so every write is measured and recorded. Default: a list of per-request targets'
        ``request`` fields; None (the batch alone) for a method whose targets are one joint change (FT)."""
        if isinstance(targets, list) and all(hasattr(t, "request") for t in targets):
            return [t.request for t in targets]
        return None

    def step_state(self) -> dict[str, Any]:
        """What the edit log stores of the method's state after a write, for :meth:`replay_step` to reproduce
        :meth:`state_dict` exactly. Default: the whole (small) state. Methods whose state grows with the stream
        store the step's increment instead (AlphaEdit: the batch's keys, not its r × r record of earlier keys)."""
        return self.state_dict()

    def replay_step(self, state: dict[str, Any]) -> None:
        """Advance the state by one logged step (:meth:`step_state`'s output); default: load it."""
        self.load_state_dict(state)
