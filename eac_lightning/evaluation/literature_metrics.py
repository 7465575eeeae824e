"""Edit metrics the literature reports beside ROME's probability scores (those, ``edit/rome_*``, live in
:mod:`eac_lightning.evaluation.edit_metrics`):

* **Generation success** (``gen_efficacy``, ``gen_paraphrase``): greedy decoding of the target's length plus
  ``extra_tokens`` tokens after the rewrite prompt (resp. each paraphrase prompt) produces the new object: the
  SQuAD-normalised object occurs as a whole-word sequence in the normalised continuation. Teacher-forced accuracy
  conditions every target token on the gold prefix and so overstates edits (Yang et al. 2025, "The Mirage of Model
  Editing"); here the model must produce the object on its own, and may phrase it ("the city of Rome" counts).
* **Fluency** (``fluency``): ROME's generation entropy (Meng et al. 2022, ``experiments/py/eval_utils_counterfact.py``
  ``n_gram_entropy``): texts sampled from the edited model (top-k 5, as ROME's ``generate_fast``, seeded) from each
  request's ``generation_prompts`` (the rewrite prompt when a record has none) up to ``fluency_length`` tokens in
  all, prompt included; per text the weighted n-gram entropy

      H = mean_n (w_n · H_n),   H_n = −Σ_g f_g log₂ f_g  over the n-grams g of the text's words,  n = 2, 3,
      w = (2/3, 4/3)

  averaged over the texts. Words are NLTK's word tokens of the whole text (``preserve_line``: ROME splits sentences
  first with Punkt, which is not available offline; only sentence-final periods attach differently).

Every value is a :class:`~eac_lightning.evaluation.edit_metrics.SumCountMetric`, so sharded ranks reduce to the
global mean.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Sequence

import torch

from eac_lightning.data.requests import EditRequest
from eac_lightning.evaluation.metrics import SumCountMetric
from eac_lightning.evaluation.scoring import (
    greedy_generate,
    inference,
    length_sorted_batches,
    model_device,
)
from eac_lightning.evaluation.tasks import normalize_answer
from eac_lightning.models.encoding import (
    encode_prompts,
    encode_targets,
    left_pad,
    pad_token_id,
)

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)  # ROME's compute_n_gram_entropy defaults


def ngram_entropy(text: str, orders: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """ROME's weighted n-gram entropy of one text: the arithmetic mean over n of w_n·H_n (bits); NaN for a text
    with no n-gram of some order n."""
    import nltk

    words = nltk.word_tokenize(text, preserve_line=True)
    terms = []
    for n, w in zip(orders, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        if total == 0:
            return math.nan
        terms.append(w * -sum(c / total * math.log2(c / total) for c in counts.values()))
    return sum(terms) / len(terms)


def produces(continuation: str, target: str) -> bool:
    """The normalised target occurs as a whole-word sequence in the normalised continuation."""
    want = normalize_answer(target)
    return bool(want) and re.search(rf"(^| ){re.escape(want)}( |$)", normalize_answer(continuation)) is not None


def sample_texts(model: torch.nn.Module, tok: Any, prompts: Sequence[str], max_length: int, batch_size: int = 32,
                 top_k: int = 5, seed: int = 0) -> list[str]:
    """ROME's ``generate_fast``: top-k sampling until each text is ``max_length`` tokens long, prompt included;
    returns the decoded texts with their prompts. Seeded (the global RNG is left as it was), batched with left
    padding."""
    if not prompts:
        return []
    device = model_device(model)
    pad = pad_token_id(tok)
    encoded = encode_prompts(tok, prompts)
    texts: list[str] = [""] * len(prompts)
    with inference(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in length_sorted_batches([len(e) for e in encoded], batch_size):
            ids, mask, _ = left_pad([encoded[i] for i in batch], pad, device)
            new = max(1, max_length - ids.shape[1])
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=top_k,
                                 max_new_tokens=new, pad_token_id=pad)
            for row, i in enumerate(batch):
                texts[i] = tok.decode(out[row, ids.shape[1] - len(encoded[i]):], skip_special_tokens=True)
    return texts


def evenly_spaced(items: Sequence, most: int | None) -> list:
    """At most ``most`` of ``items``, evenly spaced from the first (all of them when ``most`` is None or enough)."""
    if most is None or len(items) <= most:
        return list(items)
    return [items[i * len(items) // most] for i in range(most)]


def literature_metrics(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], batch_size: int = 32,
                       extra_tokens: int = 5, fluency_length: int = 100,
                       fluency_prompts_per_edit: int | None = None,
                       fluency_requests: Sequence[EditRequest] | None = None) -> dict[str, float]:
    """``gen_efficacy``, ``gen_paraphrase`` and ``fluency`` of ``requests`` (this rank's share) on ``model``.

    Args:
        extra_tokens: greedy tokens decoded beyond the target's own length.
        fluency_length: total tokens of each sampled text (ROME: ``max_out_len`` 100).
        fluency_prompts_per_edit: the first this many generation prompts of each request (None: all, as ROME).
        fluency_requests: the requests fluency samples from (None: ``requests``), a sample of them on long streams.
    """
    metrics = {k: SumCountMetric().to(model_device(model)) for k in ("gen_efficacy", "gen_paraphrase", "fluency")}
    jobs = [("gen_efficacy", r.prompt_text, r.target_new) for r in requests]
    jobs += [("gen_paraphrase", p, r.target_new) for r in requests for p in r.paraphrase_prompts]
    if jobs:
        lengths = [len(t) + extra_tokens for t in encode_targets(tok, [t for _, _, t in jobs])]
        unique = list(dict.fromkeys((p, n) for (_, p, _), n in zip(jobs, lengths)))
        outs = greedy_generate(model, tok, [p for p, _ in unique], [n for _, n in unique], batch_size,
                               stop_at_eos=True)
        decoded = {key: tok.decode(o, skip_special_tokens=True) for key, o in zip(unique, outs)}
        for kind in ("gen_efficacy", "gen_paraphrase"):
            metrics[kind].update([float(produces(decoded[(p, n)], t))
                                  for (k, p, t), n in zip(jobs, lengths) if k == kind])
    prompts = []
    for r in requests if fluency_requests is None else fluency_requests:
        own = r.generation_prompts or [r.prompt_text]
        prompts += own[:fluency_prompts_per_edit] if fluency_prompts_per_edit is not None else own
    metrics["fluency"].update([ngram_entropy(t) for t in sample_texts(model, tok, prompts, fluency_length,
                                                                     batch_size)])
    return {k: float(m.compute()) for k, m in metrics.items()}
