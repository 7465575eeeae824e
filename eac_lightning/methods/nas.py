"""Norm-Anchor Scaling (NAS; Liu, Zhu, Miao and Fujisawa, "Norm Anchors Make Model Edits Last", arXiv 2602.02543,
2026; code: SasyaTitech/NAS): a plug-in for the MEMIT family that keeps long edit streams from collapsing.

In a sequential locate-then-edit stream the solved value vectors and the edited MLP weights feed each other: a larger
weight gives larger MLP outputs, the next target is solved from them and is larger again, and its write grows the
weight further (the paper's norm-feedback loop, approximately exponential norm growth). NAS cuts the loop where the
value vector is solved. With z = h + δ the target at the last critical layer L (MEMIT Eq. 16), m the MLP output of
layer L at the last subject token (so h − m is the residual stream before the MLP) and v* = m + δ the solved value
vector, NAS writes

    z' = (h − m) + ρ · v* / ‖v*‖                      (the rescale of v* to the reference norm ρ)

instead of z, i.e. δ' = ρ·v*/‖v*‖ − m. ρ is one number per model: the mean norm of the value vectors that the same z
optimisation finds on the *unedited* model, over requests drawn from the edited dataset (reference code
``util/vstar_stats.py``: 1,000 CounterFact rewrites drawn with seed 0, bare prompts without prefix contexts, the
largest 5 % of the norms left out of the mean; measured once per model and layer and cached). A v* longer than
2ρ is not written at all (v* = m, so the request's residual is zero; reference code ``NAS/compute_z.py``).

:func:`measure_norm_anchor` measures ρ, :func:`norm_anchored` rescales a batch's targets. The methods keep ρ in their
state (:class:`NormAnchor`): measured in ``setup`` on the unedited model (or read from the statistics cache), and
restored from the run's own state when it resumes, rolls back or replays its log, never measured on edited weights
(:class:`~eac_lightning.methods.memit.MEMIT`'s ``nas`` switch; docs/methods.md, "NAS").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from eac_lightning.data.requests import EditRequest, MalformedRequestError
from eac_lightning.methods.target import TargetHyperParams, TargetProblem, optimise_plain, subject_last_index
from eac_lightning.models.adapters import mlp_out_name
from eac_lightning.models.encoding import encode_right_padded
from eac_lightning.models.tracing import capture, through_layer
from eac_lightning.validation import check


@dataclass
class NASHyperParams:
    """Norm-Anchor Scaling's settings (arXiv 2602.02543; reference code SasyaTitech/NAS ``util/vstar_stats.py`` and
    ``NAS/compute_z.py``, whose values are the defaults).

    Args:
        reference_data: the requests whose value vectors on the unedited model set the reference norm ρ (a data path
            as ``--data.path`` takes it). Default ``counterfact``: the shipped CounterFact sample, the dataset the
            paper edits (its code draws from MultiCounterFact, 20,877 records).
        reference_requests: how many of them, drawn at random with ``seed`` (reference code ``nas_restart``: 1000);
            all of them when the data holds fewer (the shipped sample: 500).
        seed: the draw's seed (reference code: 0).
        trim_quantile: ρ is the mean of the norms up to this quantile: the largest ⌊(1 − q)·n⌋ are left out
            (reference code: 0.95, its outlier policy "drop").
        skip_ratio: a solved value vector longer than ``skip_ratio``·ρ is not written (v* = m, the request's
            residual is zero) instead of rescaled (reference code: 2); null rescales every one.
    """

    reference_data: str = "counterfact"
    reference_requests: int = 1000
    seed: int = 0
    trim_quantile: float = 0.95
    skip_ratio: float | None = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.reference_data, str) or not self.reference_data:
            raise ValueError(f"nas.reference_data must be a data path, got {self.reference_data!r}")
        check("reference_requests", self.reference_requests, integer=True, positive=True)
        check("seed", self.seed, integer=True)
        if not isinstance(self.trim_quantile, (int, float)) or not 0 < self.trim_quantile <= 1:
            raise ValueError(f"nas.trim_quantile must be in (0, 1], got {self.trim_quantile!r}")
        if self.skip_ratio is not None:
            check("skip_ratio", self.skip_ratio, positive=True)


#: the reference code's settings, the ``nas`` preset's (a signature default: the config parser fills a partly given
#: ``nas`` from them)
NAS_SETTINGS = NASHyperParams()


@dataclass
class NormAnchor:
    """The reference norm ρ of one model's z layer, as measured (a method's state: it is never measured again).

    Attributes:
        norm: ρ, the trimmed mean of ‖v*‖ over the reference requests.
        layer: the decoder layer whose value vectors were measured (the method's last critical layer).
        requests: how many value vectors were measured.
        dropped: how many of the largest were left out of the mean.
        raw_mean: the mean of all of them (what ρ would be without the trim).
    """

    norm: float
    layer: int
    requests: int
    dropped: int
    raw_mean: float

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "NormAnchor":
        try:
            anchor = cls(float(state["norm"]), int(state["layer"]), int(state["requests"]), int(state["dropped"]),
                         float(state["raw_mean"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"NAS state is malformed ({type(e).__name__}: {e}); expected the fields of NormAnchor, "
                             f"got {state!r}") from e
        if not (math.isfinite(anchor.norm) and anchor.norm > 0):
            raise ValueError(f"NAS state: the reference norm must be positive and finite, got {anchor.norm!r}")
        return anchor


def mlp_output_at_subject(model: nn.Module, tok, requests: Sequence[EditRequest], layer: int) -> torch.Tensor:
    """m: the MLP output of ``layer`` at the last subject token of each bare prompt, (n, d) float32. One forward
    through ``layer``. (NAS's v₀; the residual h of MEMIT's z holds it: h − m is the stream before the MLP.)"""
    texts = [r.prompt_text for r in requests]
    device = next(model.parameters()).device
    ids, mask = encode_right_padded(tok, texts, device)
    idx = torch.tensor([subject_last_index(tok, t, r.subject) for t, r in zip(texts, requests)], device=device)
    name = mlp_out_name(model, layer)
    with torch.no_grad(), capture(model, [name]) as rec, through_layer(model, layer):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return rec[name].output[torch.arange(len(texts), device=device), idx].float()


def rescaled_shift(mlp_out: torch.Tensor, delta: torch.Tensor, norm: float,
                   skip_ratio: float | None = None) -> torch.Tensor:
    """NAS's rescale: δ' with m + δ' = ρ·v*/‖v*‖ for v* = m + δ (rows of (n, d)), so that z' = h + δ' = (h − m) +
    ρ·v*/‖v*‖ (the rescale of the module docstring); a row with ‖v*‖ > ``skip_ratio``·ρ keeps v* = m (δ' = m − m,
    nothing to write) and a zero v* is left as it is. Computed in float64, returned in ``delta``'s dtype."""
    m, d = mlp_out.double(), delta.double().to(mlp_out.device)
    v = m + d
    length = v.norm(dim=-1, keepdim=True)
    scaled = torch.where(length > 0, v * (norm / length.clamp_min(torch.finfo(v.dtype).tiny)), v)
    if skip_ratio is not None:
        scaled = torch.where(length > skip_ratio * norm, m, scaled)
    return (scaled - m).to(delta)


def norm_anchored(model: nn.Module, tok, targets: list, layer: int, anchor: NormAnchor,
                  skip_ratio: float | None) -> list:
    """The batch's MEMIT-family targets (``.request``, ``.delta``: the shift of z at ``layer``) with each δ replaced
    by NAS's δ' (:func:`rescaled_shift`), m measured on the current weights (those the targets were solved on)."""
    if not targets:
        return targets
    m = mlp_output_at_subject(model, tok, [t.request for t in targets], layer)
    delta = torch.stack([t.delta for t in targets])
    shifted = rescaled_shift(m.to(delta.device), delta, anchor.norm, skip_ratio)
    for t, d in zip(targets, shifted):
        t.delta = d
    return targets


def reference_requests(params: NASHyperParams, tok) -> list[EditRequest]:
    """The requests ρ is measured on: ``reference_requests`` of ``reference_data`` drawn with ``seed`` (all of them,
    in file order, when it holds fewer), leaving out those the tokenizer cannot edit (reference code: a random
    sample of the dataset's rewrites)."""
    from eac_lightning.data.sources import load_requests

    pool = []
    for r in load_requests(params.reference_data, skip_malformed=True):
        try:
            pool.append(r.validate(tok))
        except MalformedRequestError:
            continue
    if not pool:
        raise ValueError(f"nas.reference_data {params.reference_data!r} holds no request this tokenizer can edit; "
                         "give NAS a CounterFact-style file (nas.reference_data)")
    if params.reference_requests >= len(pool):
        return pool
    return random.Random(params.seed).sample(pool, params.reference_requests)


def trimmed_mean(values: torch.Tensor, quantile: float) -> tuple[float, int]:
    """(mean of ``values`` without the largest ⌊(1 − quantile)·n⌋, how many were left out) in float64."""
    v = torch.sort(values.double().flatten()).values
    drop = int(math.floor((1.0 - quantile) * len(v) + 1e-9))
    kept = v[:len(v) - drop] if drop else v
    return float(kept.mean()), drop


def measure_norm_anchor(model: nn.Module, tok, layer: int, target: TargetHyperParams, params: NASHyperParams,
                        requests: Sequence[EditRequest] | None = None) -> NormAnchor:
    """ρ for ``model``'s z at ``layer``: each reference request's z shift δ is optimised as the method optimises
    its own (``target``, MEMIT's plain optimisation at the residual stream, chunks of ``requests_per_forward``), on
    the bare prompt ("{}", no prefix contexts: the reference code's ``prompt_mode`` "bare"), and ρ is the trimmed
    mean of ‖m + δ‖. Call it on the unedited model. ``requests``: the reference requests (default
    :func:`reference_requests`)."""
    from eac_lightning.progress import progress

    requests = list(requests) if requests is not None else reference_requests(params, tok)
    norms = []
    # bare prompts: 2 prompts per request instead of the 6 of MEMIT's contexts, so 3x the requests per forward
    k = 3 * target.requests_per_forward
    bar = progress(total=len(requests), desc=f"NAS reference norm (layer {layer})", unit="request")
    try:
        for i in range(0, len(requests), k):
            chunk = requests[i:i + k]
            problem = TargetProblem(model, tok, chunk, layer, ["{}"], target, site="residual")
            delta = optimise_plain(problem)
            m = mlp_output_at_subject(model, tok, chunk, layer)
            norms.append((m.double() + delta.double().to(m.device)).norm(dim=-1).cpu())
            bar.update(len(chunk))
    finally:
        bar.close()
    values = torch.cat(norms)
    if not torch.isfinite(values).all():
        raise FloatingPointError("NAS: a reference value vector is not finite; the reference norm cannot be measured")
    norm, dropped = trimmed_mean(values, params.trim_quantile)
    return NormAnchor(norm=norm, layer=int(layer), requests=len(values), dropped=dropped,
                      raw_mean=float(values.double().mean()))


def cache_file(stats, layer: int, target: TargetHyperParams, params: NASHyperParams) -> Path | None:
    """Where ρ is cached beside the key statistics (as the reference code caches it per model and layer): the
    statistics store's folder, under the unedited model's fingerprint and a hash of everything ρ depends on (the
    layer, the z optimisation, the reference requests and their data, the trim). None without such a store."""
    folder, fingerprint = getattr(stats, "directory", None), getattr(stats, "fingerprint", None)
    if folder is None or fingerprint is None:
        return None
    from eac_lightning.data.sources import source_sha256

    what = {"layer": int(layer), "target": {k: v for k, v in asdict(target).items() if k != "requests_per_forward"},
            "reference": {k: v for k, v in asdict(params).items() if k != "skip_ratio"},
            "data_sha256": source_sha256(params.reference_data)}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"{fingerprint}-nas-{key}.json"


def norm_anchor(model: nn.Module, tok, layer: int, target: TargetHyperParams, params: NASHyperParams,
                stats=None) -> NormAnchor:
    """ρ for ``model`` (unedited) at ``layer``: read from the statistics store's cache (:func:`cache_file`) or
    measured (:func:`measure_norm_anchor`) and cached there."""
    path = cache_file(stats, layer, target, params)
    if path is not None and path.exists():
        try:
            return NormAnchor.from_state(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise RuntimeError(f"NAS reference-norm cache {path} is unreadable ({err}); delete it to measure again"
                               ) from err
    anchor = measure_norm_anchor(model, tok, layer, target, params)
    print(f"NAS: reference norm {anchor.norm:.4g} at layer {layer} (trimmed mean of {anchor.requests} value "
          f"vectors of the unedited model, {anchor.dropped} largest left out)", file=sys.stderr)
    if path is not None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(anchor.state()) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return anchor
