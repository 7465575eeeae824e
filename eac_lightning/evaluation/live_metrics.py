"""Live-decoding edit metrics: does the edited model *say* the new object when asked, with nothing given away?

Teacher-forced token accuracy (EAC Eqs. 10-12, :mod:`eac_lightning.evaluation.edit_metrics`) feeds the gold
prefix of the target at every position and reads as many positions as the target has, so it leaks both the
target's content and its length. Yang et al. 2025, "The Mirage of Model Editing: Revisiting Evaluation in the
Wild" (ACL 2025, arXiv 2502.11177; the WILD protocol) show that single-edit success reported at 96.8 % under teacher
forcing falls to 38.5 % when the edited model must produce the answer itself. This module measures that, following
WILD's ``test_prediction_acc_real`` (github.com/WanliYoung/Revisit-Editing-Evaluation,
``easyeditor/evaluate/evaluate_utils.py``) where it applies to a base LM:

* **Input**: the record's own prompt with the subject filled in, no template (WILD's default ``question-only``
  context): ZsRE's questions ("What is the product made by UniFirst?") and CounterFact's cloze prompts ("Angola is
  located in") alike, and each paraphrase prompt.
* **Decoding**: greedy, at most ``max_new_tokens`` new tokens (WILD: 50) whatever the target's length; a row stops
  at the end-of-text token, at a line break after some text, or at a sentence end. WILD stops at any ``.``; here a
  full stop ends the answer only when whitespace (or the end of the text) follows it, so a decimal or an
  abbreviation inside the answer survives ("29.2 points", "Will.i.am": 35 of the shipped ZsRE targets and
  locality answers hold a full stop); "St. Louis" is still cut after "St", as in WILD. Leading blank lines are
  skipped (the first non-blank line is the answer, as the general-ability tasks read theirs).
* **Scoring**: exact match after SQuAD v1.1 normalisation (:func:`~eac_lightning.evaluation.tasks.normalize_answer`:
  lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed) — WILD's ``exact_match``
  metric type (its alternative, a GPT-4o-mini judge, needs an API and is not used).

Keys (means over prompts, flat over all requests given):

* ``live_rel``: the edit prompt's answer equals ``target_new``;
* ``live_gen``: each paraphrase prompt's answer equals ``target_new``;
* ``live_loc``: each neighbourhood prompt's answer after editing equals the **unedited model's own answer** to it
  (decoded the same way by :func:`live_reference` before the first edit). This is what WILD's code does (its
  editor compares the post-edit output with the pre-edit output): locality asks whether the edit changed the
  model's behaviour on unrelated prompts, so the base model's own mistakes on them — frequent, a base LM rarely
  decodes exactly the dataset's answer — are not charged to the edit. The comparison is on normalised answers (WILD
  compares the token lists), so a change of case or punctuation alone is not a locality failure.

The states are :class:`~eac_lightning.evaluation.metrics.SumCountMetric` s, so under DDP each rank decodes its
share of the requests and ``compute()`` returns the global means.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from eac_lightning.data.requests import EditRequest
from eac_lightning.evaluation.edit_metrics import _locality_pairs, locality_key
from eac_lightning.evaluation.metrics import SumCountMetric
from eac_lightning.evaluation.scoring import greedy_generate, model_device
from eac_lightning.evaluation.tasks import normalize_answer

LIVE_KEYS = ("live_rel", "live_gen", "live_loc")
#: WILD's generation budget (``max_new_tokens=50`` in ``test_prediction_acc_real``).
LIVE_MAX_NEW_TOKENS = 50
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_SENTENCE_END_SEEN = re.compile(r"\.\s")


def answer_complete(text: str) -> bool:
    """Whether decoding can stop: the text holds, after its leading whitespace, a line break or a full stop followed
    by whitespace (a full stop at the very end may still be a decimal point or an abbreviation's)."""
    text = text.lstrip()
    return "\n" in text or _SENTENCE_END_SEEN.search(text) is not None


def live_answer(text: str) -> str:
    """The answer in a decoded continuation: its first non-blank line, cut at the first full stop followed by
    whitespace or ending the text, stripped."""
    line = text.lstrip().split("\n", 1)[0]
    end = _SENTENCE_END.search(line)
    return (line[:end.start()] if end else line).strip()


def same_answer(a: str, b: str) -> bool:
    """Exact match after SQuAD normalisation."""
    return normalize_answer(a) == normalize_answer(b)


def decode_answers(model: torch.nn.Module, tok: Any, prompts: Sequence[str],
                   max_new_tokens: int = LIVE_MAX_NEW_TOKENS, batch_size: int = 32) -> dict[str, str]:
    """Each distinct prompt's live answer (:func:`live_answer` of its greedy continuation), decoded once, batched
    with the project's greedy decoder (left padding, KV cache; a row decodes the same tokens alone or in a batch)."""
    unique = list(dict.fromkeys(prompts))
    outs = greedy_generate(model, tok, unique, max_new_tokens, batch_size, stop_at_eos=True,
                           stop_when=answer_complete)
    texts = tok.batch_decode(outs, skip_special_tokens=True) if outs else []
    return {p: live_answer(t) for p, t in zip(unique, texts)}


def _neighbourhood(request: EditRequest) -> list[tuple[str, str]]:
    """The request's neighbourhood (prompt, answer) pairs that locality is measured on (as the teacher-forced one)."""
    return _locality_pairs([request])


def live_reference(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest],
                   max_new_tokens: int = LIVE_MAX_NEW_TOKENS, batch_size: int = 32) -> dict[str, Any]:
    """The unedited model's live answers to every neighbourhood prompt of ``requests``, for ``live_loc``: call it
    on the unedited model, keep the result with the locality reference (``reference.update(...)``), and pass it
    to every later evaluation.

    Returns ``{"live": {locality_key: answer}, "live_max_new_tokens": max_new_tokens}`` (JSON-serialisable; keys
    as :func:`~eac_lightning.evaluation.edit_metrics.locality_key`)."""
    pairs = list(dict.fromkeys(p for r in requests for p in _neighbourhood(r)))
    answers = decode_answers(model, tok, [p for p, _ in pairs], max_new_tokens, batch_size)
    return {"live": {locality_key(p, a): answers[p] for p, a in pairs}, "live_max_new_tokens": max_new_tokens}


def live_edit_metrics(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest],
                      reference: dict[str, Any] | None, max_new_tokens: int = LIVE_MAX_NEW_TOKENS,
                      batch_size: int = 32) -> dict[str, float]:
    """``live_rel``, ``live_gen`` and ``live_loc`` of ``requests`` (this rank's share) on the current model.

    ``live_loc`` needs the unedited model's answers (:func:`live_reference`, under ``reference["live"]``); without
    them it is left out. Raises ``KeyError`` naming the request and the prompt when the reference lacks one of
    their neighbourhood prompts, and ``ValueError`` when it was decoded with another budget than
    ``max_new_tokens`` (its answers would not be comparable)."""
    live_ref = (reference or {}).get("live")
    if live_ref is not None:
        budget = reference.get("live_max_new_tokens", max_new_tokens)
        if budget != max_new_tokens:
            raise ValueError(f"the locality reference's live answers were decoded with at most {budget} new tokens, "
                             f"this evaluation decodes {max_new_tokens}: evaluate with live_max_new_tokens {budget} "
                             "(--eval.live_max_new_tokens), or start the run again")
    device = model_device(model)
    metrics = {k: SumCountMetric().to(device) for k in LIVE_KEYS if k != "live_loc" or live_ref is not None}
    prompts = [p for r in requests for p in [r.prompt_text, *r.paraphrase_prompts]]
    if live_ref is not None:
        prompts += [p for r in requests for p, _ in _neighbourhood(r)]
    answers = decode_answers(model, tok, prompts, max_new_tokens, batch_size)
    rel, gen, loc = [], [], []
    for r in requests:
        rel.append(float(same_answer(answers[r.prompt_text], r.target_new)))
        gen += [float(same_answer(answers[p], r.target_new)) for p in r.paraphrase_prompts]
        if live_ref is None:
            continue
        for p, a in _neighbourhood(r):
            key = locality_key(p, a)
            if key not in live_ref:
                raise KeyError(f"{r.name}: no pre-edit live answer for neighbourhood prompt {p!r}; compute "
                               "live_reference(unedited_model, tok, requests) before the first edit and pass it with "
                               "the locality reference to every evaluation")
            loc.append(float(same_answer(answers[p], live_ref[key])))
    metrics["live_rel"].update(rel)
    metrics["live_gen"].update(gen)
    if "live_loc" in metrics:
        metrics["live_loc"].update(loc)
    return {k: float(m.compute()) for k, m in metrics.items()}
