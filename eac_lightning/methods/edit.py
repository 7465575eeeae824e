"""The one edit path: validate → optimise targets → write atomically → measure each edit.

:func:`edit` runs a batch of requests through any :class:`~eac_lightning.methods.base.EditMethod`. The Lightning
layer runs its two halves in two places, since a Lightning step returns what it computed before callbacks act on it:
``training_step`` calls :func:`optimise_targets` and returns the targets; the ``WeightUpdate`` callback receives
them as the step's output and calls :func:`write_targets`. The notebook :class:`~eac_lightning.editor.Editor` and the
benchmarks call :func:`edit`. So every weight change of every entry point passes through :func:`write_targets`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest, validate_requests
from eac_lightning.methods.base import Deltas, EditMethod


@dataclass
class EditRecord:
    """One applied edit, measured right after its batch was written.

    Attributes:
        request: the edit.
        delta_norm: Frobenius norm of this edit's own share of the weight change (:class:`~eac_lightning.methods.
            base.Written`); None where the method writes one joint change for the batch (FT on several requests).
        success: the edited model predicts every target token, teacher-forced on the bare prompt (EasyEdit's
            reliability of this one edit, exact-match form).
        target_accuracy: the share of target tokens it predicts (EasyEdit's token accuracy, EAC Eq. 10).
        refreshed: an earlier edit written again with this batch (:attr:`Targets.refreshed`), not a new one.
    """

    request: EditRequest
    delta_norm: float | None
    success: bool
    target_accuracy: float
    refreshed: bool = False  # an earlier edit the method wrote again with this batch (B-EAC's refresh)


@dataclass
class EditResult:
    """What :func:`write_targets` applied: the batch's deltas per module, one record per request written (the batch's,
    then any refreshed earlier edits), and the deltas' low-rank factors where the method has them
    (:class:`~eac_lightning.methods.base.Written`)."""

    deltas: Deltas
    records: list[EditRecord]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def delta_norm(self) -> float:
        """Frobenius norm of the batch's whole weight change."""
        return sum(float(d.double().pow(2).sum()) for d in self.deltas.values()) ** 0.5


@dataclass
class Targets:
    """What :func:`optimise_targets` found for a batch, everything :func:`write_targets` needs."""

    requests: list[EditRequest]
    targets: Any  # the method's own (ROME: rank-one targets; MEMIT family: residual targets; FT: weight change)
    started: float  # time.perf_counter() when the batch began (seconds per edit cover optimisation and write)
    #: earlier edits the method writes again with the batch (B-EAC's refresh), after the batch's own
    refreshed: list[EditRequest] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def optimise_targets(method: EditMethod, model: nn.Module, tok, requests: Sequence[EditRequest]) -> Targets:
    """Validate the batch (a malformed request raises naming its field; nothing is applied) and run the method's
    target optimisation on the current weights. Gradients are enabled here whatever the caller's mode: Lightning runs
    ``training_step`` under its own grad mode, and the optimisations differentiate through the frozen model."""
    started = time.perf_counter()
    batch = validate_requests(list(requests), tok)
    with torch.enable_grad():
        targets = method.compute_targets(model, tok, batch)
    written = method.written_requests(targets)
    refreshed = list(written[len(batch):]) if written is not None and len(written) > len(batch) else []
    return Targets(batch, targets, started, refreshed)


def write_targets(method: EditMethod, model: nn.Module, tok, targets: Targets,
                  restore: Callable[[], None] | None = None) -> EditResult:
    """Write the batch's targets (atomic: a failed write restores every module it touched, with ``restore`` when
    the caller can, e.g. an edit session's W = W_base + D, else from a copy) and measure each edit on the edited
    model."""
    written = method.write(model, tok, targets.targets, restore)
    from eac_lightning.evaluation import (
        score_targets,  # evaluation builds on methods' requests, not the reverse
    )

    requests = targets.requests + targets.refreshed  # every request the write wrote, each measured and recorded
    scores = score_targets(model, tok, [r.prompt_text for r in requests],  # in eval mode, without grad
                           [r.target_new for r in requests])
    norms = written.edit_norms or [None] * len(requests)
    records = [EditRecord(r, n, bool(s.exact), float(s.token_accuracy), refreshed=i >= len(targets.requests))
               for i, (r, n, s) in enumerate(zip(requests, norms, scores))]
    return EditResult(written.deltas, records, written.factors)


def edit(method: EditMethod, model: nn.Module, tok, requests: EditRequest | Sequence[EditRequest],
         restore: Callable[[], None] | None = None) -> EditResult:
    """Apply one batch of edits with ``method`` (set up on ``model``): :func:`optimise_targets` then
    :func:`write_targets` (``restore``: as there)."""
    batch = [requests] if isinstance(requests, EditRequest) else list(requests)
    return write_targets(method, model, tok, optimise_targets(method, model, tok, batch), restore)
