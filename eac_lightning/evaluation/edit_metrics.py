"""Edit metrics of the EAC paper (Appendix C.3) as torchmetrics, with batched teacher-forced scoring.

Headline definitions (EasyEdit's, so numbers compare with published tables):

* **Reliability** (EAC Eq. 10): teacher-forced token accuracy of ``target_new`` after the edit prompt. The prompt
  and the target form one sequence; at each target position the argmax of the next-token distribution is compared
  with the target token; the mean over the target's tokens is the prompt's score; the metric is the mean over
  prompts.
* **Generalization** (EAC Eq. 11): the same accuracy on the paraphrase prompts (the equivalence neighbourhood).
* **Locality** (EAC Eq. 12): on each out-of-scope (neighbourhood) prompt with its answer, the share of the answer's
  positions whose argmax token is unchanged against the pre-edit model. The pre-edit argmax tokens are recorded once
  by :func:`compute_locality_reference` on the unedited model; the caller keeps that dict and reuses it after every
  edit.

Variants, under their own keys:

* ``*_gen``: exact greedy generation. A prompt counts 1 only when greedy decoding of ``len(target)`` tokens
  reproduces the target exactly. This equals "every teacher-forced argmax is right" (greedy decoding feeds back its
  own argmax, which is the target token at every step iff all teacher-forced argmaxes are right), so it comes from
  the same forward pass; the tests check the equivalence against real greedy decoding. For locality the pre-edit
  greedy continuation is stored in the reference and the post-edit model must reproduce it exactly.
* ``rome_*``: ROME's CounterFact scores (Meng et al. 2022, ``experiments/py/eval_utils_counterfact.py`` and
  ``summarize.py``): efficacy and paraphrase score = share of prompts with P(new) > P(true); neighbourhood score =
  share with P(true) > P(new); magnitudes = mean of P(new) - P(true) (resp. P(true) - P(new)). P is ROME's
  length-normalised probability exp(mean token log-prob) by default (ROME divides the summed NLL by the target's
  token count); ``length_normalized=False`` uses the summed log-prob (joint probability) instead.

Sequential evaluation (EAC Sec. 6.2, "Editing Performance"): after a stream of edits, every edit applied so far is
measured on the final model — pass all requests edited so far.

All (prompt, target) pairs of an evaluation are scored together by the batched engine
(:func:`eac_lightning.evaluation.scoring.score_targets`); the states are the torchmetrics of
:mod:`eac_lightning.evaluation.metrics`, so ``compute()`` reduces across ranks under DDP (callers shard requests
with ``i % world_size == rank``).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from eac_lightning.data.requests import EditRequest
from eac_lightning.evaluation.metrics import (
    Generalization,
    Locality,
    ProbabilityComparison,
    Reliability,
    shard,
)
from eac_lightning.evaluation.scoring import (
    TargetScore,
    continue_on_cache,
    greedy_generate,
    model_device,
    score_targets,
    select_cache,
)
from eac_lightning.models.encoding import encode_targets, pad_token_id

REFERENCE_FORMAT = "eac-locality-reference/1"


def locality_key(prompt: str, answer: str) -> str:
    """Key of a neighbourhood (prompt, answer) pair in the reference dict (JSON so the dict can be saved)."""
    return json.dumps([prompt, answer.strip()], ensure_ascii=False)


def _locality_pairs(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    """The neighbourhood (prompt, answer) pairs that locality is measured on (prompts without an answer have no
    positions to compare and are skipped)."""
    return [(p, a) for r in requests for p, a in r.neighborhood_pairs() if a and a.strip() and p and p.strip()]


def compute_locality_reference(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest],
                               batch_size: int = 32, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Record the unedited model's behaviour on every neighbourhood prompt of ``requests`` (EAC Eq. 12 compares
    against it).

    Returns a JSON-serialisable dict ``{"format", "argmax": {key: ids}, "greedy": {key: ids}}`` keyed by
    :func:`locality_key`: ``argmax`` holds the teacher-forced argmax token at each position of the locality answer
    (the headline locality), ``greedy`` the greedy continuation of the same length (the ``locality_gen`` variant).
    Compute it once, before the first edit, and pass the same dict to every later evaluation. With
    ``world_size > 1`` only this rank's requests (``i % world_size == rank``) are covered, which is what the
    sharded evaluation of the same request list reads.

    Both come from one prompt pass per batch: the greedy decoder's prompt pass also gives the first teacher-forced
    prediction, and the rest of each answer runs as a continuation on a copy of its KV cache.
    """
    pairs = list(dict.fromkeys(_locality_pairs(shard(requests, rank, world_size))))
    prompts = [p for p, _ in pairs]
    answers = encode_targets(tok, [a for _, a in pairs])
    for (p, a), t in zip(pairs, answers):
        if not t:
            raise ValueError(f"locality answer {a!r} of prompt {p!r} tokenises to nothing")
    device = model_device(model)
    pad = pad_token_id(tok)
    argmax: list[list[int] | None] = [None] * len(pairs)

    def teacher(batch: list[int], past: Any, mask: Tensor, last: Tensor) -> None:
        first = last.argmax(-1).tolist()
        multi = [r for r, i in enumerate(batch) if len(answers[i]) > 1]
        for r, i in enumerate(batch):
            if len(answers[i]) == 1:
                argmax[i] = [first[r]]
        for k in range(0, len(multi), batch_size):
            rows = multi[k:k + batch_size]
            index = torch.tensor(rows, device=device)
            cache = select_cache(past, index)
            if cache is None:
                return  # left to score_targets below
            cont = continue_on_cache(model, cache, mask.index_select(0, index), [answers[batch[r]][:-1] for r in rows],
                             pad, device).argmax(-1).tolist()
            for j, r in enumerate(rows):
                n = len(answers[batch[r]])
                argmax[batch[r]] = [first[r]] + cont[j][:n - 1]

    greedy = greedy_generate(model, tok, prompts, [len(t) for t in answers], batch_size, stop_at_eos=False,
                             on_prompt=teacher)
    missing = [i for i, a in enumerate(argmax) if a is None]
    if missing:  # a model whose KV cache cannot be copied: plain teacher-forced rows
        scores = score_targets(model, tok, [prompts[i] for i in missing], [answers[i] for i in missing], batch_size)
        for i, s in zip(missing, scores):
            argmax[i] = s.pred
    return {
        "format": REFERENCE_FORMAT,
        "argmax": {locality_key(p, a): ids for (p, a), ids in zip(pairs, argmax)},
        "greedy": {locality_key(p, a): g for (p, a), g in zip(pairs, greedy)},
    }


def is_counterfact(request: EditRequest) -> bool:
    """CounterFact-style: the neighbourhood prompts' answer is the original object (ROME's neighbourhood score
    compares P(true) with P(new) there); ZsRE's locality questions are unrelated, so they get no such score."""
    if not request.target_true:
        return False
    answers = {a.strip() for _, a in request.neighborhood_pairs()}
    return bool(answers) and answers == {request.target_true.strip()}


class EditMetrics:
    """The edit metrics of one evaluation: the torchmetrics objects and the batched update that fills them.

    Args:
        rome_scores: also compute ROME's CounterFact scores (for CounterFact-style requests: ``target_true`` set and
            the neighbourhood answers equal to it; others add nothing to them).
        length_normalized: ROME's P is exp(mean token log-prob) (True, as ROME's code) or the joint probability
            exp(summed log-prob) (False).
        device: where the metric states live (the model's device, so DDP backends like NCCL can reduce them).
    """

    HEADLINE = ("reliability", "generalization", "locality")

    def __init__(self, rome_scores: bool = True, length_normalized: bool = True,
                 device: torch.device | str = "cpu") -> None:
        self.rome_scores = rome_scores
        self.length_normalized = length_normalized
        self.metrics: dict[str, Metric] = {
            "reliability": Reliability(),
            "generalization": Generalization(),
            "locality": Locality(),
            "reliability_gen": Reliability(exact=True),
            "generalization_gen": Generalization(exact=True),
            "locality_gen": Locality(exact=True),
        }
        if rome_scores:
            for name in ("rome_efficacy", "rome_paraphrase", "rome_neighborhood"):
                self.metrics[name] = ProbabilityComparison()
        for m in self.metrics.values():
            m.to(device)

    def _lp(self, s: TargetScore) -> float:
        return s.mean_logprob if self.length_normalized else s.sum_logprob

    def update(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest],
               reference: dict[str, Any] | None, batch_size: int = 32) -> None:
        """Score ``requests`` (this rank's share) on ``model`` and add them to the metric states.

        All (prompt, target) pairs of all requests are collected first and scored in shared batches; pairs that
        occur more than once (e.g. CounterFact's neighbourhood answer is also the original object) are scored once.
        """
        jobs: dict[tuple[str, tuple[int, ...] | str], int] = {}
        job_prompts: list[str] = []
        job_targets: list[str | list[int]] = []

        def job(prompt: str, target: str | list[int]) -> int:
            key = (prompt, tuple(target) if isinstance(target, list) else target.strip())
            if key not in jobs:
                jobs[key] = len(job_prompts)
                job_prompts.append(prompt)
                job_targets.append(target)
            return jobs[key]

        plan: list[tuple[str, Any]] = []  # (kind, indices) in request order
        for r in requests:
            plan.append(("rel", job(r.prompt_text, r.target_new)))
            for p in r.paraphrase_prompts:
                plan.append(("gen", job(p, r.target_new)))
            cf = self.rome_scores and is_counterfact(r)
            if cf:
                plan.append(("rome_efficacy", (job(r.prompt_text, r.target_new), job(r.prompt_text, r.target_true))))
                for p in r.paraphrase_prompts:
                    plan.append(("rome_paraphrase", (job(p, r.target_new), job(p, r.target_true))))
            for p, a in r.neighborhood_pairs():
                if not (a and a.strip() and p and p.strip()):
                    continue
                key = locality_key(p, a)
                if reference is None or key not in reference.get("argmax", {}):
                    raise KeyError(
                        f"{r.name}: no pre-edit reference for neighbourhood prompt {p!r} (answer {a!r}); compute "
                        "it with compute_locality_reference(unedited_model, tok, requests) before the first edit "
                        "and pass the same dict to every evaluation"
                    )
                plan.append(("loc", (job(p, a), reference["argmax"][key])))
                greedy_ref = reference.get("greedy", {}).get(key)
                if greedy_ref:
                    plan.append(("loc_gen", (job(p, list(greedy_ref)), greedy_ref)))
                if cf:
                    # P(true) should still beat P(new) on the neighbours: "a" is the original object.
                    plan.append(("rome_neighborhood", (job(p, r.target_true), job(p, r.target_new))))

        scores = score_targets(model, tok, job_prompts, job_targets, batch_size)
        buckets: dict[str, list[Any]] = {}
        for kind, idx in plan:
            buckets.setdefault(kind, []).append(idx)

        m = self.metrics
        rel = [scores[i] for i in buckets.get("rel", [])]
        m["reliability"].update([s.pred for s in rel], [s.target for s in rel])
        m["reliability_gen"].update([s.pred for s in rel], [s.target for s in rel])
        gen = [scores[i] for i in buckets.get("gen", [])]
        m["generalization"].update([s.pred for s in gen], [s.target for s in gen])
        m["generalization_gen"].update([s.pred for s in gen], [s.target for s in gen])
        loc = buckets.get("loc", [])
        m["locality"].update([scores[i].pred for i, _ in loc], [list(ref) for _, ref in loc])
        loc_gen = buckets.get("loc_gen", [])
        m["locality_gen"].update([scores[i].pred for i, _ in loc_gen], [list(ref) for _, ref in loc_gen])
        if self.rome_scores:
            for kind in ("rome_efficacy", "rome_paraphrase", "rome_neighborhood"):
                pairs = buckets.get(kind, [])
                m[kind].update([self._lp(scores[a]) for a, _ in pairs], [self._lp(scores[b]) for _, b in pairs])

    def compute(self) -> dict[str, float]:
        """Reduce (across ranks under DDP) and return a flat dict of floats; ROME entries become
        ``rome_<kind>_score`` and ``rome_<kind>_magnitude``."""
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            if isinstance(value, dict):
                for k, v in value.items():
                    out[f"{name}_{k}"] = float(v)
            else:
                out[name] = float(value)
        return out


def evaluate_edit_metrics(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest],
                          reference: dict[str, Any] | None, batch_size: int = 32, rank: int = 0, world_size: int = 1,
                          rome_scores: bool = True, length_normalized: bool = True) -> dict[str, float]:
    """Sequential evaluation (EAC Sec. 6.2, metrics of App. C.3): every request edited so far, measured on the
    current (final) model.

    Each rank scores requests ``i % world_size == rank``; ``compute()`` sums the states across ranks when
    ``torch.distributed`` is initialised, so every rank returns the global values. ``reference`` comes from
    :func:`compute_locality_reference` on the unedited model. Returns reliability / generalization / locality
    (EAC Eqs. 10-12, teacher-forced token accuracy), their ``*_gen`` exact-greedy variants and, with
    ``rome_scores``, ``rome_{efficacy,paraphrase,neighborhood}_{score,magnitude}``.
    """
    metrics = EditMetrics(rome_scores=rome_scores, length_normalized=length_normalized, device=model_device(model))
    metrics.update(model, tok, shard(requests, rank, world_size), reference, batch_size)
    return metrics.compute()
