"""Two probes of general ability that stay informative on small models (where the Table 4 tasks sit near chance).

* :func:`fact_retention` — does the model still know facts that were *not* edited? Teacher-forced token accuracy
  (the EAC Eq. 10 measure, EasyEdit's definition) of the original object ``target_true`` after each probe
  request's prompt. The caller chooses the probe set (requests outside the edit stream).
* :func:`wikitext2_ppl` — perplexity on the start of the WikiText-2 test set with strided windows (the Hugging Face
  "perplexity of fixed-length models" recipe): each window re-reads up to ``window - stride`` tokens of context and
  scores only the tokens not scored before, so every token is scored exactly once with as much context as fits.

Both shard their work by ``i % world_size == rank`` and keep sum/count states that ``compute()`` reduces across
ranks under DDP.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from eac_lightning.data.requests import EditRequest
from eac_lightning.evaluation.metrics import Perplexity, SumCountMetric, shard
from eac_lightning.evaluation.scoring import (
    forward,
    inference,
    model_device,
    model_max_length,
    score_targets,
)
from eac_lightning.models.encoding import left_pad, pad_token_id
from eac_lightning.paths import data_dir, resolve_data_path


def fact_retention(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], batch_size: int = 32,
                   rank: int = 0, world_size: int = 1) -> float:
    """Mean teacher-forced token accuracy of ``target_true`` on each request's prompt (facts NOT edited).

    Requests without ``target_true`` are skipped; with none at all the result is NaN.
    """
    mine = [r for r in shard(requests, rank, world_size) if r.target_true and r.target_true.strip()]
    scores = score_targets(model, tok, [r.prompt_text for r in mine], [r.target_true for r in mine], batch_size)
    metric = SumCountMetric().to(model_device(model))
    metric.update([s.token_accuracy for s in scores])
    return float(metric.compute())


def greedy_matches(model: torch.nn.Module, tok: Any, prompts: Sequence[str], targets: Sequence[str],
                   first_token_only: bool = False, batch_size: int = 32) -> list[bool]:
    """Whether greedy decoding continues each prompt with ``" " + target``: every teacher-forced argmax is the
    target token (which is what greedy decoding reproduces), or with ``first_token_only`` its first token only."""
    scores = score_targets(model, tok, list(prompts), list(targets), batch_size)
    if first_token_only:
        return [s.pred[0] == s.target[0] for s in scores]
    return [s.pred == s.target for s in scores]


def known_facts(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest],
                batch_size: int = 32) -> list[EditRequest]:
    """The requests whose true object is the model's greedy continuation and whose new object differs from it:
    facts the model demonstrably knows, so that an edit of them has something to change."""
    known = greedy_matches(model, tok, [r.prompt_text for r in requests], [r.target_true for r in requests],
                           batch_size=batch_size)
    return [r for r, k in zip(requests, known)
            if k and r.target_new.strip().lower() != r.target_true.strip().lower()]


def wikitext2_tokens(tok: Any, path: str | os.PathLike | None = None, max_tokens: int = 4096) -> list[int]:
    """The first ``max_tokens`` tokens of the WikiText-2 test file (``wikitext/wikitext-2_test.txt`` in the offline
    data folder by default), read as raw text. Only a prefix of the text is tokenised (doubling until enough),
    and at most ``max_tokens + 1`` tokens of it (the one past the end shows the prefix was long enough): an
    explicit bound, so the tokenizer does not warn that the text is longer than the model's context (the
    perplexity reads it in windows that fit)."""
    file = resolve_data_path(path) if path is not None else data_dir() / "wikitext" / "wikitext-2_test.txt"
    if not file.exists():
        raise FileNotFoundError(f"{file}: WikiText-2 test file not found")
    text = file.read_text(encoding="utf-8")
    chars = max(1024, 8 * max_tokens)
    while True:
        ids = tok(text[:chars], add_special_tokens=False, truncation=True, max_length=max_tokens + 1)["input_ids"]
        if len(ids) > max_tokens or chars >= len(text):
            return list(ids[:max_tokens])
        chars *= 2


def strided_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) of each window: tokens ``[score_from, end)`` are scored, each from the context
    ``[begin, token)``. The first token has no context and is never scored."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    out, prev_end, begin = [], 1, 0
    while prev_end < n_tokens:
        # A window must start before the first token it scores, or that token would have no context
        # (with stride == window the plain recipe silently drops one token per window).
        begin = min(begin, prev_end - 1)
        end = min(begin + window, n_tokens)
        out.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    return out


def perplexity(model: torch.nn.Module, tok: Any, ids: Sequence[int], window: int | None = None,
               stride: int | None = None, batch_size: int = 4, rank: int = 0, world_size: int = 1) -> float:
    """Perplexity of the token sequence ``ids`` with strided windows (:func:`strided_windows`): every token but the
    first is scored exactly once.

    Args:
        window: tokens per window (default: the model's maximum length, capped at 1024).
        stride: step between windows (default: half the window), i.e. each scored token has at least
            ``window - stride`` tokens of context except at the start.
        batch_size: windows per forward pass.

    Windows are sharded across ranks; NLL sum and token count are reduced by ``compute()``.
    """
    window = min(window or min(model_max_length(model), 1024), model_max_length(model))
    stride = stride or max(1, window // 2)
    spans = shard(strided_windows(len(ids), window, stride), rank, world_size)
    metric = Perplexity().to(model_device(model))
    device = model_device(model)
    pad = pad_token_id(tok)
    metric.update(0.0, 0)  # a rank with no windows still joins the reduction without "compute before update"
    with inference(model):
        for k in range(0, len(spans), batch_size):
            batch = spans[k:k + batch_size]
            # Scored tokens are the last (end - score_from) of each row; with left padding their predicting
            # logits are the kept positions [-(n+1), -1).
            keep = max(end - frm for _, end, frm in batch) + 1
            inp, mask, pos = left_pad([ids[b:e] for b, e, _ in batch], pad, device)
            _, logits = forward(model, inp, mask, pos, logits_to_keep=keep, use_cache=False)
            logits = logits[:, -keep:].float()
            nll_sum, count = 0.0, 0
            for r, (b, e, frm) in enumerate(batch):
                n = e - frm
                target = torch.as_tensor(ids[frm:e], dtype=torch.long, device=logits.device)
                nll_sum += torch.nn.functional.cross_entropy(logits[r, keep - n - 1:keep - 1], target,
                                                             reduction="sum").item()
                count += n
            metric.update(nll_sum, count)
    return float(metric.compute())


def wikitext2_ppl(model: torch.nn.Module, tok: Any, path: str | os.PathLike | None = None, max_tokens: int = 4096,
                  window: int | None = None, stride: int | None = None, batch_size: int = 4, rank: int = 0,
                  world_size: int = 1) -> float:
    """:func:`perplexity` of the first ``max_tokens`` WikiText-2 test tokens (:func:`wikitext2_tokens`)."""
    return perplexity(model, tok, wikitext2_tokens(tok, path, max_tokens), window, stride, batch_size, rank,
                      world_size)
