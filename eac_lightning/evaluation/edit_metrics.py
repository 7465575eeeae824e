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

Everything is batched: prompts are left-padded (position ids computed from the attention mask, so a row's result
does not depend on its batch mates), sorted by length to minimise padding, and many prompts share one forward pass.
Identical (prompt, target) pairs are scored once, each distinct prompt runs once with its targets continued on
copies of its KV cache (:func:`score_targets`), and only the logits of target positions are materialised
(``logits_to_keep``).

Every metric keeps sum/count states with ``dist_reduce_fx="sum"`` so ``compute()`` reduces across ranks under DDP;
callers shard examples with ``i % world_size == rank``.
"""

from __future__ import annotations

import inspect
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from eac_lightning.data.requests import EditRequest

# --------------------------------------------------------------------------------------------------------------
# Low-level batched scoring helpers (shared by tasks.py and probes.py)
# --------------------------------------------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_max_length(model: torch.nn.Module, default: int = 2048) -> int:
    """The longest sequence the model's position embeddings allow."""
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def pad_token_id(tok: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token, else 0 (masked out anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            return int(value)
    return 0


def encode_prompts(tok: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts with the tokenizer's special tokens (a BOS for Llama-style tokenizers), as EasyEdit and
    ROME tokenise the prompt part."""
    if not prompts:
        return []
    return [list(ids) for ids in tok(list(prompts))["input_ids"]]


def encode_target(tok: Any, target: str) -> list[int]:
    """Token ids of a target (answer) string: ``" " + target.strip()`` without special tokens.

    The leading space makes the first target token the word-initial token the model would emit after the prompt
    (the ROME/EasyEdit convention); tokenising prompt and target apart keeps BPE from merging across the boundary.
    """
    return list(tok(" " + target.strip(), add_special_tokens=False)["input_ids"])


def encode_targets(tok: Any, targets: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """:func:`encode_target` for many targets (token id lists pass through), one tokenizer call for the distinct
    strings."""
    strings = list(dict.fromkeys(t.strip() for t in targets if isinstance(t, str)))
    ids = tok([" " + t for t in strings], add_special_tokens=False)["input_ids"] if strings else []
    table = {t: list(i) for t, i in zip(strings, ids)}
    return [table[t.strip()] if isinstance(t, str) else [int(x) for x in t] for t in targets]


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the duration, restoring the training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


_ACCEPTS_CACHE: dict[type, set[str]] = {}


def _accepted_kwargs(model: torch.nn.Module) -> set[str]:
    cls = type(model)
    if cls not in _ACCEPTS_CACHE:
        params = inspect.signature(model.forward).parameters
        names = set(params)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            names.add("**")
        _ACCEPTS_CACHE[cls] = names
    return _ACCEPTS_CACHE[cls]


def forward(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
            logits_to_keep: int = 0, **extra: Any) -> Any:
    """Call a causal LM with the optional arguments it supports.

    ``position_ids`` make left padding exact (otherwise a padded row would start at position > 0);
    ``logits_to_keep`` avoids computing the vocab projection for positions nobody reads.
    """
    names = _accepted_kwargs(model)
    kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, **extra)
    if position_ids is not None and "position_ids" in names:
        kwargs["position_ids"] = position_ids
    if logits_to_keep and "logits_to_keep" in names:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(**kwargs)
    logits = out if isinstance(out, Tensor) else out.logits
    if logits_to_keep and logits.shape[1] > logits_to_keep:
        logits = logits[:, -logits_to_keep:]
    return out, logits


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask, position_ids).

    Position ids count real tokens only (0 at each row's first real token), so a padded row is computed exactly as
    it would be alone.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches, longest first, so rows of similar length share a batch (less padding, and an out-of-memory
    error, if any, comes on the first batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), max(1, batch_size))]


@dataclass
class TargetScore:
    """Teacher-forced result of one (prompt, target) pair.

    Attributes:
        pred: argmax token at each target position (the model's prediction given the gold prefix).
        target: the target token ids.
        logprobs: log-probability of each target token.
    """

    pred: list[int]
    target: list[int]
    logprobs: list[float]

    @property
    def token_accuracy(self) -> float:
        """Mean over target tokens of 1{argmax == target} (EasyEdit's per-prompt accuracy)."""
        return sum(p == t for p, t in zip(self.pred, self.target)) / len(self.target) if self.target else math.nan

    @property
    def exact(self) -> float:
        """1.0 when every target token is the argmax, i.e. greedy decoding reproduces the target exactly."""
        return float(bool(self.target) and self.pred == self.target)

    @property
    def sum_logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean_logprob(self) -> float:
        """ROME's length-normalised score: summed log-prob divided by the target's token count."""
        return float(sum(self.logprobs) / len(self.logprobs)) if self.logprobs else math.nan


def _carriers(prompts: Sequence[str], target_ids: list[list[int]]
              ) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Group (prompt, target) pairs into carrier rows: target B rides on carrier A of the same prompt when B's
    teacher-forcing context is a prefix of A's (``B[:-1] == A[:len(B) - 1]``), so B's predictions are A's first
    ``len(B)`` ones. Longest targets go first, so a carrier is never shorter than its riders."""
    c_prompt: list[str] = []
    c_target: list[list[int]] = []
    riders: list[list[int]] = []
    by_prompt: dict[str, list[int]] = {}
    for i in sorted(range(len(prompts)), key=lambda k: -len(target_ids[k])):
        ctx = target_ids[i][:-1]
        for c in by_prompt.get(prompts[i], []):
            if c_target[c][:len(ctx)] == ctx:
                riders[c].append(i)
                break
        else:
            by_prompt.setdefault(prompts[i], []).append(len(c_target))
            c_prompt.append(prompts[i])
            c_target.append(target_ids[i])
            riders.append([i])
    return c_prompt, c_target, riders


def _read_riders(logits: Tensor, first: Sequence[int], carriers: Sequence[int], riders: list[list[int]],
                 target_ids: list[list[int]], results: list[TargetScore | None]) -> None:
    """Fill ``results`` for the riders of ``carriers`` from ``logits`` [rows, positions, vocab], where row r holds
    carrier ``carriers[r]`` and its prediction of target token j sits at position ``first[r] + j``.

    Riders of one carrier share positions, so log-softmax and argmax run once per needed (row, position)."""
    slot: dict[tuple[int, int], int] = {}
    spans = []
    tok_slot: list[int] = []
    tok_id: list[int] = []
    for r, c in enumerate(carriers):
        for i in riders[c]:
            t = target_ids[i]
            spans.append((i, len(tok_slot)))
            for j, token in enumerate(t):
                tok_slot.append(slot.setdefault((r, first[r] + j), len(slot)))
                tok_id.append(token)
    dev = logits.device
    rows = torch.tensor([r for r, _ in slot], device=dev)
    cols = torch.tensor([p for _, p in slot], device=dev)
    logp = torch.log_softmax(logits[rows, cols].float(), dim=-1)  # [slots, vocab]
    argmax_l = logp.argmax(-1).cpu().tolist()
    ts = torch.tensor(tok_slot, device=dev)
    chosen_l = logp[ts, torch.tensor(tok_id, device=dev)].cpu().tolist()
    for i, at in spans:
        n = len(target_ids[i])
        results[i] = TargetScore([argmax_l[k] for k in tok_slot[at:at + n]], target_ids[i], chosen_l[at:at + n])


def _select_cache(past: Any, index: Tensor) -> Any:
    """A new cache holding rows ``index`` (repeats allowed) of a ``DynamicCache``; None when the model's cache is
    of another kind (the caller then falls back to full rows)."""
    try:
        from transformers.cache_utils import DynamicCache

        if type(past) is not DynamicCache:
            return None
        data = []
        for layer in past.layers:
            if getattr(layer, "is_sliding", False):
                return None
            data.append((layer.keys.index_select(0, index), layer.values.index_select(0, index)))
        return DynamicCache(ddp_cache_data=data)
    except (ImportError, AttributeError, TypeError):
        return None


def _continue(model: torch.nn.Module, cache: Any, prev_mask: Tensor, conts: Sequence[Sequence[int]], pad: int,
              device: torch.device) -> Tensor:
    """Logits of right-padded continuation tokens ``conts`` run on ``cache`` (rows already selected) after
    left-padded prompts with attention mask ``prev_mask``; position ids continue each prompt."""
    width = max(len(t) for t in conts)
    cont = torch.full((len(conts), width), pad, dtype=torch.long)
    cont_mask = torch.zeros((len(conts), width), dtype=torch.long)
    for r, t in enumerate(conts):  # right-padded: each continuation starts right after its prompt
        cont[r, :len(t)] = torch.as_tensor(list(t), dtype=torch.long)
        cont_mask[r, :len(t)] = 1
    full_mask = torch.cat([prev_mask, cont_mask.to(device)], dim=1)
    cont_pos = prev_mask.sum(-1, keepdim=True) + torch.arange(width, device=device)
    _, logits = forward(model, cont.to(device), full_mask, cont_pos, past_key_values=cache, use_cache=True)
    return logits.float()


def score_targets(model: torch.nn.Module, tok: Any, prompts: Sequence[str],
                  targets: Sequence[str | Sequence[int]], batch_size: int = 32,
                  share_prompts: bool = True) -> list[TargetScore]:
    """Teacher-forced scoring of many (prompt, target) pairs, batched with left padding.

    A target is a string (tokenised by :func:`encode_target`) or a list of token ids. A pair's predictions are the
    argmax / log-probs at positions ``len(prompt) - 1 + j`` of the sequence ``prompt_ids + target_ids`` (EasyEdit's
    definition: prompt and target in one sequence).

    Work is shared where the maths allows, which matters because evaluation asks many targets of the same prompt
    (CounterFact's new and true objects, a locality answer and its greedy reference, the two answer words of a
    classification prompt):

    * pairs whose targets extend one another's context share a row (:func:`_carriers`);
    * with ``share_prompts`` (default), each distinct prompt runs once: a left-padded batch of prompts gives every
      target's first prediction from its last position plus a KV cache, and the remaining target tokens of all its
      carriers run as short continuations on copies of that cache (position ids continue each prompt). This halves
      the tokens pushed through the model on CounterFact. Models whose cache is not a plain ``DynamicCache`` use
      full ``prompt + target[:-1]`` rows instead (``share_prompts=False`` forces that).

    Both paths give the same numbers as scoring each pair alone (up to float rounding); prompts too long for the
    model are truncated from the left (the end of the prompt conditions the answer).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    device = model_device(model)
    pad = pad_token_id(tok)
    max_len = model_max_length(model)
    unique = list(dict.fromkeys(prompts))
    enc = dict(zip(unique, encode_prompts(tok, unique)))
    target_ids = encode_targets(tok, targets)
    for i, p in enumerate(prompts):
        if not enc[p]:
            raise ValueError(f"prompt {p!r} tokenises to nothing: no position predicts the first target token")
        if not target_ids[i]:
            raise ValueError(f"target {targets[i]!r} of prompt {p!r} tokenises to nothing")
    c_prompt, c_target, riders = _carriers(prompts, target_ids)
    results: list[TargetScore | None] = [None] * len(prompts)
    with inference(model):
        if share_prompts:
            full_rows = _score_shared(model, enc, c_prompt, c_target, riders, target_ids, results, batch_size, pad,
                                      max_len, device)
        else:
            full_rows = list(range(len(c_target)))
        _score_full_rows(model, enc, c_prompt, c_target, riders, target_ids, results, full_rows, batch_size, pad,
                         max_len, device)
    return results  # type: ignore[return-value]


def _score_full_rows(model, enc, c_prompt, c_target, riders, target_ids, results, carriers, batch_size, pad, max_len,
                     device) -> None:
    """Carriers as ``prompt + target[:-1]`` rows; with left padding their predictions are the last positions."""
    rows = {c: (enc[c_prompt[c]] + c_target[c][:-1])[-max_len:] for c in carriers}
    for batch in length_sorted_batches([len(rows[c]) for c in carriers], batch_size):
        batch = [carriers[k] for k in batch]
        keep = max(len(c_target[c]) for c in batch)
        ids, mask, pos = left_pad([rows[c] for c in batch], pad, device)
        _, logits = forward(model, ids, mask, pos, logits_to_keep=keep, use_cache=False)
        logits = logits[:, -keep:].float()
        _read_riders(logits, [keep - len(c_target[c]) for c in batch], batch, riders, target_ids, results)


def _score_shared(model, enc, c_prompt, c_target, riders, target_ids, results, batch_size, pad, max_len,
                  device) -> list[int]:
    """Each distinct prompt once, then cached continuations; returns the carriers left for full rows (when the
    model's cache cannot be shared)."""
    leftover: list[int] = []
    by_prompt: dict[str, list[int]] = {}
    for c, p in enumerate(c_prompt):
        by_prompt.setdefault(p, []).append(c)
    prompts = list(by_prompt)
    # Room for the continuation: a prompt keeps at most max_len - (longest target - 1) tokens.
    p_ids = {p: enc[p][-max(1, max_len - max(len(c_target[c]) for c in by_prompt[p]) + 1):] for p in prompts}
    for batch in length_sorted_batches([len(p_ids[p]) for p in prompts], batch_size):
        batch_prompts = [prompts[k] for k in batch]
        multi = [(b, c) for b, p in enumerate(batch_prompts) for c in by_prompt[p] if len(c_target[c]) > 1]
        ids, mask, pos = left_pad([p_ids[p] for p in batch_prompts], pad, device)
        out, logits = forward(model, ids, mask, pos, logits_to_keep=1, use_cache=bool(multi))
        last = logits[:, -1].float()  # every target's first prediction
        single = [(b, c) for b, p in enumerate(batch_prompts) for c in by_prompt[p] if len(c_target[c]) == 1]
        if single:
            _read_riders(last[[b for b, _ in single]].unsqueeze(1), [0] * len(single), [c for _, c in single],
                         riders, target_ids, results)
        past = getattr(out, "past_key_values", None) if multi else None
        # Continuations are a few tokens long: take up to 4x more rows per pass, within the token count of a
        # batch of 16-token rows, so the fixed cost of a forward pass is spread over more targets.
        width = max((len(c_target[c]) - 1 for _, c in multi), default=1)
        step = max(batch_size, min(4 * batch_size, (16 * batch_size) // width))
        for k in range(0, len(multi), step):
            chunk = multi[k:k + step]
            index = torch.tensor([b for b, _ in chunk], device=device)
            cache = _select_cache(past, index)
            if cache is None:
                leftover += [c for _, c in multi[k:]]
                break  # the model's cache cannot be copied: these carriers go to full rows
            cont_logits = _continue(model, cache, mask.index_select(0, index), [c_target[c][:-1] for _, c in chunk],
                                    pad, device)
            stacked = torch.cat([last.index_select(0, index).unsqueeze(1), cont_logits.float()], dim=1)
            _read_riders(stacked, [0] * len(chunk), [c for _, c in chunk], riders, target_ids, results)
    return leftover


def greedy_generate(model: torch.nn.Module, tok: Any, prompts: Sequence[str | Sequence[int]],
                    max_new_tokens: int | Sequence[int], batch_size: int = 16, stop_at_eos: bool = True,
                    stop_at_newline: bool = False,
                    on_prompt: Callable[[list[int], Any, Tensor, Tensor], None] | None = None) -> list[list[int]]:
    """Batched greedy decoding with left padding and a KV cache; returns the new token ids of each prompt.

    Args:
        prompts: strings (tokenised with special tokens) or token id lists.
        max_new_tokens: one limit for all, or one per prompt.
        stop_at_eos: a row stops after emitting the eos token (which is kept).
        stop_at_newline: a row stops once it has emitted a newline after some non-blank text (answers are read up
            to the first line break, so the rest would be wasted compute).
        on_prompt: called after each batch's prompt pass as ``on_prompt(indices, cache, attention_mask,
            last_logits)`` (before decoding changes the cache), so a caller can reuse the prompt pass.

    Position ids come from the attention mask, so a row decodes the same tokens alone or in a batch.
    """
    if not len(prompts):
        return []
    device = model_device(model)
    pad = pad_token_id(tok)
    if isinstance(max_new_tokens, int):
        limits = [int(max_new_tokens)] * len(prompts)
    else:
        limits = [int(m) for m in max_new_tokens]
    ids_list: list[list[int]] = [[] if isinstance(p, str) else [int(x) for x in p] for p in prompts]
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    for i, enc in zip(texts, encode_prompts(tok, [prompts[i] for i in texts])):  # one batched tokenizer call
        ids_list[i] = enc
    max_len = model_max_length(model)
    ids_list = [ids[-max(1, max_len - lim):] for ids, lim in zip(ids_list, limits)]
    eos = getattr(tok, "eos_token_id", None) if stop_at_eos else None
    flags = _newline_flags(tok, model) if stop_at_newline else None
    out: list[list[int]] = [[] for _ in prompts]
    with inference(model):
        for batch in length_sorted_batches([len(x) for x in ids_list], batch_size):
            steps = max(limits[i] for i in batch)
            if steps <= 0:
                continue
            ids, mask, pos = left_pad([ids_list[i] for i in batch], pad, device)
            res, logits = forward(model, ids, mask, pos, logits_to_keep=1, use_cache=True)
            past = res.past_key_values
            if on_prompt is not None:
                on_prompt(batch, past, mask, logits[:, -1].float())
            done = [limits[i] <= 0 for i in batch]
            seen_text = [False] * len(batch)
            for step in range(steps):
                nxt = logits[:, -1].argmax(-1)
                nxt_l = nxt.tolist()
                for r, i in enumerate(batch):
                    if done[r]:
                        continue
                    t = nxt_l[r]
                    out[i].append(t)
                    if len(out[i]) >= limits[i] or (eos is not None and t == eos):
                        done[r] = True
                    elif flags is not None:
                        has_nl, text_before_nl, has_text = flags(t)
                        if has_nl and (seen_text[r] or text_before_nl):
                            done[r] = True
                        seen_text[r] = seen_text[r] or has_text
                if all(done) or step == steps - 1:
                    break
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                pos = pos[:, -1:] + 1
                res, logits = forward(model, nxt.unsqueeze(-1), mask, pos, logits_to_keep=1,
                                      past_key_values=past, use_cache=True)
                past = res.past_key_values
    return out


_NEWLINE_CACHE: dict[tuple[int, int], Callable[[int], tuple[bool, bool, bool]]] = {}


def _newline_flags(tok: Any, model: torch.nn.Module) -> Callable[[int], tuple[bool, bool, bool]]:
    """Per-token (has newline, non-blank text before its newline, has non-blank text), from decoding each vocab id
    once per tokenizer."""
    vocab = len(tok)
    key = (id(tok), vocab)
    if key not in _NEWLINE_CACHE:
        texts = tok.batch_decode([[i] for i in range(vocab)])
        table = []
        for s in texts:
            nl = s.find("\n")
            table.append((nl >= 0, nl > 0 and bool(s[:nl].strip()), bool(s.strip())))
        _NEWLINE_CACHE[key] = lambda t, _tab=table: _tab[t] if 0 <= t < len(_tab) else (False, False, True)
    return _NEWLINE_CACHE[key]


# --------------------------------------------------------------------------------------------------------------
# torchmetrics
# --------------------------------------------------------------------------------------------------------------


class SumCountMetric(Metric):
    """Mean of per-example values kept as a float64 sum and a count, both summed across ranks under DDP.

    An empty metric computes to NaN (nothing to measure) rather than raising, so a rank with no examples of its
    own still takes part in the reduction.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor | Sequence[float]) -> None:  # type: ignore[override]
        v = torch.as_tensor(values, dtype=torch.float64, device=self.total.device).reshape(-1)
        v = v[~torch.isnan(v)]  # EasyEdit drops NaN per-prompt scores (empty targets)
        self.total += v.sum()
        self.count += v.numel()

    def compute(self) -> Tensor:  # type: ignore[override]
        if self.count == 0:
            return torch.tensor(math.nan, dtype=torch.float64)
        return self.total / self.count


class TokenAgreement(SumCountMetric):
    """Per-sequence share of positions where ``preds`` equals ``refs`` (or 1{all equal} with ``exact=True``),
    averaged over sequences."""

    def __init__(self, exact: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exact = exact

    def update(self, preds: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> None:  # type: ignore[override]
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
        vals = []
        for p, r in zip(preds, refs):
            p, r = list(p), list(r)
            if len(p) != len(r):
                raise ValueError(f"prediction of {len(p)} tokens against a reference of {len(r)}")
            if not r:
                vals.append(math.nan)
            elif self.exact:
                vals.append(float(p == r))
            else:
                vals.append(sum(a == b for a, b in zip(p, r)) / len(r))
        super().update(vals)


class Reliability(TokenAgreement):
    """EAC Eq. 10: E over edits of 1{argmax_y f_θ(y | x_e) = y_e}, as teacher-forced token accuracy of target_new on
    the edit prompt. ``update(argmax_tokens, target_new_tokens)``."""


class Generalization(TokenAgreement):
    """EAC Eq. 11: the Eq. 10 accuracy on prompts of the equivalence neighbourhood N(x_e, y_e) (paraphrases).
    ``update(argmax_tokens, target_new_tokens)``."""


class Locality(TokenAgreement):
    """EAC Eq. 12: E over out-of-scope prompts O(x_e, y_e) of 1{f_θ_i(y|x) = f_θ_{i-1}(y|x)}, as the share of the
    locality answer's positions whose argmax token equals the pre-edit model's. ``update(post_argmax, pre_argmax)``."""


class ProbabilityComparison(Metric):
    """ROME's CounterFact score and magnitude for prompts where answer ``a`` should beat answer ``b``.

    ``update(logp_a, logp_b)`` takes per-prompt log-probabilities (length-normalised or summed, the caller's
    choice). ``compute()`` returns ``{"score": mean 1{logp_a > logp_b}, "magnitude": mean exp(logp_a) - exp(logp_b)}``
    (ROME ``summarize.py``: ``*_success`` and ``*_diff``).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("wins", "margin", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logp_a: Tensor | Sequence[float],  # type: ignore[override]
               logp_b: Tensor | Sequence[float]) -> None:
        a = torch.as_tensor(logp_a, dtype=torch.float64, device=self.count.device).reshape(-1)
        b = torch.as_tensor(logp_b, dtype=torch.float64, device=self.count.device).reshape(-1)
        if a.shape != b.shape:
            raise ValueError(f"{a.numel()} scores for a but {b.numel()} for b")
        self.wins += (a > b).double().sum()
        self.margin += (a.exp() - b.exp()).sum()
        self.count += a.numel()

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        if self.count == 0:
            nan = torch.tensor(math.nan, dtype=torch.float64)
            return {"score": nan, "magnitude": nan}
        return {"score": self.wins / self.count, "magnitude": self.margin / self.count}


# --------------------------------------------------------------------------------------------------------------
# Pre-edit reference and the sequential edit evaluation
# --------------------------------------------------------------------------------------------------------------

REFERENCE_FORMAT = "eac-locality-reference/1"


def locality_key(prompt: str, answer: str) -> str:
    """Key of a neighbourhood (prompt, answer) pair in the reference dict (JSON so the dict can be saved)."""
    return json.dumps([prompt, answer.strip()], ensure_ascii=False)


def _locality_pairs(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    """The neighbourhood (prompt, answer) pairs that locality is measured on (prompts without an answer have no
    positions to compare and are skipped)."""
    return [(p, a) for r in requests for p, a in r.neighborhood_pairs() if a and a.strip() and p and p.strip()]


def shard(items: Sequence[Any], rank: int = 0, world_size: int = 1) -> list[Any]:
    """The items of this rank: those with index ``i % world_size == rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return [x for i, x in enumerate(items) if i % world_size == rank]


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
            cache = _select_cache(past, index)
            if cache is None:
                return  # left to score_targets below
            cont = _continue(model, cache, mask.index_select(0, index), [answers[batch[r]][:-1] for r in rows],
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


def single_edit_metrics(model: torch.nn.Module, tok: Any, method: Any, requests: Sequence[EditRequest],
                        reference: dict[str, Any] | None) -> list[dict[str, float]]:
    """The single-edit setting (EAC Table 3): each request edited alone on the current weights, measured with
    :func:`evaluate_edit_metrics` (no ROME scores), and the edited matrices restored before the next one.
    ``method`` is a set-up :class:`eac_lightning.methods.base.EditMethod`."""
    from eac_lightning.methods.base import restore_weights, snapshot
    from eac_lightning.methods.edit import edit

    rows = []
    for r in requests:
        saved = snapshot(model, method.module_names)
        try:
            edit(method, model, tok, [r])
            rows.append(evaluate_edit_metrics(model, tok, [r], reference, rome_scores=False))
        finally:
            restore_weights(model, saved)
    return rows
