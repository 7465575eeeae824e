"""The Python API: edit a model in a notebook in five lines.

    from eac_lightning import Editor, EditRequest
    editor = Editor.load("testbed:small", method="rome-eac")
    editor.edit(EditRequest(prompt="{} is located in", subject="Angola", target_new="Antarctica"))
    print(editor.evaluate())
    editor.undo()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest, validate_requests
from eac_lightning.methods.base import EditMethod, Written, restore_weights, snapshot
from eac_lightning.methods.edit import EditResult, edit
from eac_lightning.methods.settings import apply_model_settings, check_renamed, leaves
from eac_lightning.models.loading import load_model
from eac_lightning.paths import CONFIGS_DIR
from eac_lightning.session import EditLog, EditSession
from eac_lightning.stats.covariance import CovarianceStore

METHOD_PRESETS = CONFIGS_DIR / "methods"


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def method_from_preset(name_or_path: str, *overlays: str | Path | dict, model: str | None = None) -> EditMethod:
    """Instantiate the method of ``configs/methods/<name>.yaml`` (or of a YAML file's ``model.method``), with the
    ``model.method`` of each overlay file (e.g. ``configs/testbed/rome.yaml``) merged over it in order, as a second
    ``--config`` does on the command line; a dict overlay is such a ``model.method`` itself (``{"init_args": ...}``).
    With ``model``, the settings resolver (:func:`eac_lightning.methods.settings.apply_model_settings`) puts the
    settings measured for that model in place of the preset's, except those you gave: a dict overlay's and those of
    an overlay file outside the project's configs. The method's ``method_settings`` records each source."""
    import yaml
    from jsonargparse import ArgumentParser

    path = Path(name_or_path)
    if not path.exists():
        path = METHOD_PRESETS / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in METHOD_PRESETS.glob("*.yaml")))
        raise FileNotFoundError(f"no method preset {name_or_path!r} (known: {known})")
    spec = yaml.safe_load(path.read_text())["model"]["method"]
    given: set[tuple[str, ...]] = set()
    package = CONFIGS_DIR.resolve()
    for overlay in overlays:
        over = overlay if isinstance(overlay, dict) else yaml.safe_load(Path(overlay).read_text())["model"]["method"]
        if isinstance(overlay, dict) or package not in Path(overlay).resolve().parents:
            given |= {leaf for leaf, _ in leaves(over.get("init_args") or {})}
        spec = _merged(spec, over)
    check_renamed(spec, str(path))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=EditMethod)
    applied: dict[str, Any] = {}
    if model is not None:
        # every setting at its value, the class defaults filled in, as the command line's parser hands it to the
        # resolver (the record names a measured setting's preset value even where the preset file leaves it out)
        spec = parser.parse_object({"method": spec}).method.as_dict()
        spec, applied = apply_model_settings(model, spec, given)
    method = parser.instantiate_classes(parser.parse_object({"method": spec})).method
    method.method_settings = applied
    return method


class Editor:
    """A model, its tokenizer and an editing method, with exact undo.

    The weights and the method's state live in an :class:`~eac_lightning.session.EditSession` with an in-memory edit
    log: each :meth:`edit` stores its update in low-rank form (ROME: two vectors per edit) and the method's state
    increment, not a copy of the edited matrices, and :meth:`undo` replays the log from the nearest snapshot.

    Args:
        model, tokenizer: the model to edit (in place; it must be unedited).
        method: an :class:`EditMethod` instance.
        stats: key statistics; when omitted, over a testbed's own training-stream sample, else WikiText-2.
        snapshot_every: take a snapshot of the accumulated deltas and method state every this many edits (only the
            newest is kept: one copy of the edited matrices), so an undo replays at most that many edits, or from
            the unedited model when it goes back past the snapshot; 0: no snapshot.
    """

    def __init__(self, model: nn.Module, tokenizer, method: EditMethod, stats: CovarianceStore | None = None,
                 snapshot_every: int = 100):
        self.model, self.tokenizer, self.method = model, tokenizer, method
        self.stats = stats if stats is not None else CovarianceStore(model, tokenizer)
        self.method.setup(model, tokenizer, self.stats)
        self.session = EditSession(model, method, EditLog(None), snapshot_every)
        self.session.start({"model": type(model).__name__, "method": type(method).__name__})
        self.requests: list[EditRequest] = []
        self.reference: dict[str, Any] = {}  # pre-edit locality reference (EAC Eq. 12) of every request

    @classmethod
    def load(cls, model: str = "testbed:small", method: str | EditMethod = "rome-eac", device: str | None = None,
             dtype: str | torch.dtype = "float32", adapter: dict | str | Path | None = None,
             method_settings: str = "auto", **stats_kwargs: Any) -> "Editor":
        """Load ``model`` (``testbed:<preset>``, a folder or a hub id) and a method (preset name or instance).

        A preset name on a testbed gets the settings measured there (``method_settings="auto"``, as on the command
        line; ``editor.method.method_settings`` says where each setting came from); ``"as_given"`` keeps the preset's values.

        ``device``: where the model, keys and statistics live (default: CUDA when available, else the CPU);
        ``dtype``: the weights' dtype (``"bfloat16"``...; keys, statistics and solves stay float32/float64 and
        each update is cast to it once); ``adapter``: module names of a family without a built-in adapter
        (docs/models.md). Other keyword arguments go to :class:`CovarianceStore` (``corpus``, ``num_tokens``...).
        """
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        m, tok = load_model(model, dtype=dtype, device=device, adapter=adapter)
        if method_settings not in ("auto", "as_given"):
            raise ValueError(f"method_settings must be 'auto' or 'as_given', not {method_settings!r}")
        if isinstance(method, str):
            meth = method_from_preset(method, model=model if method_settings == "auto" else None)
        else:
            meth = method
        return cls(m, tok, meth, CovarianceStore(m, tok, **stats_kwargs))

    def edit(self, requests: EditRequest | Sequence[EditRequest]) -> EditResult:
        """Apply one batch of edits (:func:`eac_lightning.methods.edit.edit`) and log it; returns its deltas and
        per-edit records (norm of each edit's delta, whether the model now predicts its target)."""
        batch = [requests] if isinstance(requests, EditRequest) else list(requests)
        if not batch:
            raise ValueError("Editor.edit needs at least one EditRequest (got an empty batch); nothing was changed")
        validate_requests(batch, self.tokenizer)  # before the locality reference: a malformed record names its field
        self._add_reference(batch)
        try:
            result = edit(self.method, self.model, self.tokenizer, batch, restore=self.session.materialise)
        except FloatingPointError:
            # a write refused after the method recorded it (AlphaEdit's keys, B-EAC's records): the log's state back
            self.session.checkout(self.session.head)
            raise
        self.session.commit(Written(result.deltas, None, result.factors), step=self.session.depth + 1,
                            position=len(self.requests) + len(batch), requests=batch,
                            refreshed=[rec.request for rec in result.records if rec.refreshed])
        self.requests.extend(batch)
        return result

    def undo(self) -> None:
        """Return the weights (bit-exactly) and the method's state to what they were before the last :meth:`edit`
        (the log replayed from the nearest snapshot)."""
        head = self.session.head
        parent = self.session.parent(head)
        if parent is None:
            raise IndexError("nothing to undo")
        n = len(self.session.log.header(head)["requests"])
        self.session.checkout(parent, move_head="undo")
        self.session.log.discard(head)  # an undone edit is gone: the in-memory log keeps one branch
        del self.requests[len(self.requests) - n:]

    @property
    def edits_logged(self) -> int:
        """Edit steps on the current branch of the in-memory log (what :meth:`undo` can take back)."""
        return self.session.depth

    def _add_reference(self, batch: list[EditRequest]) -> None:
        """Record the unedited model's predictions on the batch's out-of-scope prompts (locality is measured
        against the unedited model, as EasyEdit does), swapping the original weights in if edits were made."""
        from eac_lightning.evaluation.edit_metrics import compute_locality_reference

        edited = bool(self.session.deltas)
        if edited:
            restore_weights(self.model, self.session.base_weights)
        try:
            ref = compute_locality_reference(self.model, self.tokenizer, batch)
        finally:
            if edited:
                self.session.materialise()
        for key, value in ref.items():  # merge the per-prompt tables: a later batch must not replace them
            if isinstance(value, dict):
                self.reference.setdefault(key, {}).update(value)
            else:
                self.reference[key] = value

    def evaluate(self, requests: Sequence[EditRequest] | None = None) -> dict[str, float]:
        """Reliability, generalization and locality (EasyEdit's teacher-forced token accuracy, EAC Eq. 10-12)
        and their variants, over every edit so far (or ``requests``), measured on the current model."""
        from eac_lightning.evaluation.edit_metrics import evaluate_edit_metrics

        return evaluate_edit_metrics(self.model, self.tokenizer, list(requests or self.requests), self.reference)


def single_edit_metrics(model: nn.Module, tok, method: EditMethod, requests: Sequence[EditRequest],
                        reference: dict[str, Any] | None) -> list[dict[str, float]]:
    """The single-edit setting (EAC Table 3): each request edited alone on the current weights, measured with
    :func:`~eac_lightning.evaluation.edit_metrics.evaluate_edit_metrics` (no ROME scores), and the edited matrices
    restored before the next one. ``method`` is set up (:meth:`EditMethod.setup`)."""
    from eac_lightning.evaluation.edit_metrics import evaluate_edit_metrics

    rows = []
    for r in requests:
        saved = snapshot(model, method.module_names)
        try:
            edit(method, model, tok, [r])
            rows.append(evaluate_edit_metrics(model, tok, [r], reference, rome_scores=False))
        finally:
            restore_weights(model, saved)
    return rows
