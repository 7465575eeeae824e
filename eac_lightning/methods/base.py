"""What every editing method shares: per-module weight deltas that are applied in place, returned, and
can be undone; and the two-step method interface used by the Lightning layer.

Deltas are kept in (out, in) layout for every architecture (see :func:`eac_lightning.models.adapters.weight_view`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest, validate_requests
from eac_lightning.models.adapters import weight_view

Deltas = dict[str, torch.Tensor]


@torch.no_grad()
def apply_deltas(model: nn.Module, deltas: Deltas, sign: float = 1.0) -> None:
    """W ← W + sign·ΔW for each module (in place)."""
    for name, d in deltas.items():
        w = weight_view(model, name)
        w.add_(d.to(w.dtype) * sign)


def undo_deltas(model: nn.Module, deltas: Deltas) -> None:
    """Undo :func:`apply_deltas` (exact up to floating-point rounding of the add; see ``restore_weights``)."""
    apply_deltas(model, deltas, sign=-1.0)


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


class EditMethod:
    """A locate-then-edit method split the way the Lightning layer runs it.

    ``compute_targets`` is the optimisation (runs in ``training_step``); ``write`` is the closed-form update
    that changes weights in place and returns the deltas (runs in the weight-update callback). ``edit`` does
    both, for the Python API. ``write`` is atomic: if it fails, every module it touched is restored.
    """

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

    def _write(self, model: nn.Module, tok, targets: Any) -> Deltas:
        raise NotImplementedError

    def write(self, model: nn.Module, tok, targets: Any) -> Deltas:
        """The closed-form update; refused (weights restored) if a written delta or weight holds NaN/inf."""
        saved = snapshot(model, self.module_names)
        try:
            deltas = self._write(model, tok, targets)
            bad = [n for n, d in deltas.items()
                   if not (torch.isfinite(d).all() and torch.isfinite(weight_view(model, n)).all())]
            if bad:
                raise FloatingPointError(f"the update of {', '.join(bad)} holds NaN/inf; the edit was rejected and "
                                         "the weights were restored")
            return deltas
        except BaseException:
            restore_weights(model, saved)
            raise

    def edit(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> Deltas:
        """Validate, optimise and write a batch of requests; return the applied deltas."""
        validate_requests(list(requests), tok)
        return self.write(model, tok, self.compute_targets(model, tok, requests))

    def state_dict(self) -> dict[str, Any]:
        """Method state that a resumed run needs (context templates, accumulated statistics, anchor history)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
