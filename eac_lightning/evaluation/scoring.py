"""The batched scoring engine: teacher-forced scores of many (prompt, target) pairs and greedy generation.

Everything the evaluation measures reduces to these two calls (edit metrics, general-ability tasks, probes, the
testbed's figures and causal tracing all use them). Prompts are left-padded (position ids computed from the
attention mask, so a row's result does not depend on its batch mates), sorted by length to minimise padding, and
many prompts share one forward pass. Identical (prompt, target) pairs are scored once, each distinct prompt runs
once with its targets continued on copies of its KV cache (:func:`score_targets`), and only the logits of target
positions are materialised (``logits_to_keep``).
"""

from __future__ import annotations

import inspect
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from eac_lightning.models.encoding import (
    encode_prompts,
    encode_targets,
    left_pad,
    pad_token_id,
    right_pad,
)


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


_CUT_NOTED = False


def note_cut_prompts(cut: int, total: int, room: int) -> None:
    """Say once per process that prompts were cut from the left to fit the model's context (every later cut goes
    unreported: the truncation is by design, docs/evaluation.md)."""
    global _CUT_NOTED
    if cut and not _CUT_NOTED:
        _CUT_NOTED = True
        warnings.warn(f"{cut} of {total} prompts are too long for the model's {room}-token context together with "
                      "their answer: they are cut from the left, keeping the end where the answer is asked for "
                      "(later cuts are not reported)", UserWarning, stacklevel=3)


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


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes a KV cache and its output returns one: ``cache`` where the
    forward declares it (transformers >= 5.24, which still accepts ``past_key_values`` with a FutureWarning until
    5.40), else ``past_key_values`` (transformers 5.15 - 5.23, and models written against them).

    A forward that declares neither (only ``**kwargs``) gets the name of the installed transformers release."""
    names = _accepted_kwargs(model)
    if "cache" in names:
        return "cache"
    if "past_key_values" in names or not _transformers_renamed_cache():
        return "past_key_values"
    return "cache"


_RENAMED_CACHE: bool | None = None


def _transformers_renamed_cache() -> bool:
    """Whether the installed transformers names the KV cache ``cache`` (5.24 and later)."""
    global _RENAMED_CACHE
    if _RENAMED_CACHE is None:
        try:
            import transformers
            from packaging.version import Version

            _RENAMED_CACHE = Version(transformers.__version__).release >= (5, 24)
        except (ImportError, ValueError):
            _RENAMED_CACHE = False
    return _RENAMED_CACHE


def output_cache(model: torch.nn.Module, out: Any) -> Any:
    """The KV cache a forward pass of ``model`` returned (None when it returned none), read under the name the
    output declares (:func:`cache_kwarg`), so no deprecated alias is touched."""
    name = cache_kwarg(model)
    fields = getattr(out, "__dataclass_fields__", None)
    if fields is not None and name not in fields:  # an output class that still declares the other name
        name = "past_key_values" if name == "cache" else "cache"
    return getattr(out, name, None)


def forward(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
            logits_to_keep: int = 0, cache: Any = None, **extra: Any) -> Any:
    """Call a causal LM with the optional arguments it supports.

    ``position_ids`` make left padding exact (otherwise a padded row would start at position > 0);
    ``logits_to_keep`` avoids computing the vocab projection for positions nobody reads; ``cache`` (a KV cache a
    previous call returned, read with :func:`output_cache`) is passed under the name the model declares
    (:func:`cache_kwarg`).
    """
    names = _accepted_kwargs(model)
    kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, **extra)
    if position_ids is not None and "position_ids" in names:
        kwargs["position_ids"] = position_ids
    if logits_to_keep and "logits_to_keep" in names:
        kwargs["logits_to_keep"] = logits_to_keep
    if cache is not None:
        kwargs[cache_kwarg(model)] = cache
    out = model(**kwargs)
    logits = out if isinstance(out, Tensor) else out.logits
    if logits_to_keep and logits.shape[1] > logits_to_keep:
        logits = logits[:, -logits_to_keep:]
    return out, logits


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


def select_cache(past: Any, index: Tensor) -> Any:
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


def continue_on_cache(model: torch.nn.Module, cache: Any, prev_mask: Tensor, conts: Sequence[Sequence[int]],
                      pad: int, device: torch.device) -> Tensor:
    """Logits of right-padded continuation tokens ``conts`` run on ``cache`` (rows already selected) after
    left-padded prompts with attention mask ``prev_mask``; position ids continue each prompt."""
    cont, cont_mask = right_pad(conts, pad, device)  # right-padded: each continuation starts right after its prompt
    full_mask = torch.cat([prev_mask, cont_mask], dim=1)
    # A real token's position is within the model's context (its prompt was cut to leave room); the padding after a
    # short continuation is masked and unread, but its position must exist too.
    cont_pos = (prev_mask.sum(-1, keepdim=True) + torch.arange(cont.shape[1], device=device)).clamp(
        max=model_max_length(model) - 1)
    _, logits = forward(model, cont, full_mask, cont_pos, cache=cache, use_cache=True)
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
    model are truncated from the left (the end of the prompt conditions the answer), which is said once per
    process (:func:`note_cut_prompts`).
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
    longest: dict[str, int] = {}
    for p, t in zip(prompts, target_ids):
        longest[p] = max(longest.get(p, 0), len(t))
    note_cut_prompts(sum(len(enc[p]) + n - 1 > max_len for p, n in longest.items()), len(longest), max_len)
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
        past = output_cache(model, out) if multi else None
        # Continuations are a few tokens long: take up to 4x more rows per pass, within the token count of a
        # batch of 16-token rows, so the fixed cost of a forward pass is spread over more targets.
        width = max((len(c_target[c]) - 1 for _, c in multi), default=1)
        step = max(batch_size, min(4 * batch_size, (16 * batch_size) // width))
        for k in range(0, len(multi), step):
            chunk = multi[k:k + step]
            index = torch.tensor([b for b, _ in chunk], device=device)
            cache = select_cache(past, index)
            if cache is None:
                leftover += [c for _, c in multi[k:]]
                break  # the model's cache cannot be copied: these carriers go to full rows
            cont_logits = continue_on_cache(model, cache, mask.index_select(0, index),
                                            [c_target[c][:-1] for _, c in chunk], pad, device)
            stacked = torch.cat([last.index_select(0, index).unsqueeze(1), cont_logits.float()], dim=1)
            _read_riders(stacked, [0] * len(chunk), [c for _, c in chunk], riders, target_ids, results)
    return leftover


def greedy_generate(model: torch.nn.Module, tok: Any, prompts: Sequence[str | Sequence[int]],
                    max_new_tokens: int | Sequence[int], batch_size: int = 16, stop_at_eos: bool = True,
                    stop_at_newline: bool = False,
                    on_prompt: Callable[[list[int], Any, Tensor, Tensor], None] | None = None,
                    stop_when: Callable[[str], bool] | None = None) -> list[list[int]]:
    """Batched greedy decoding with left padding and a KV cache; returns the new token ids of each prompt.

    Args:
        prompts: strings (tokenised with special tokens) or token id lists.
        max_new_tokens: one limit for all, or one per prompt.
        stop_at_eos: a row stops after emitting the eos token (which is kept).
        stop_at_newline: a row stops once it has emitted a newline after some non-blank text (answers are read up
            to the first line break, so the rest would be wasted compute).
        on_prompt: called after each batch's prompt pass as ``on_prompt(indices, cache, attention_mask,
            last_logits)`` (before decoding changes the cache), so a caller can reuse the prompt pass.
        stop_when: a row stops once ``stop_when(text)`` is true, ``text`` being its new tokens decoded so far
            (special tokens skipped): a stop rule on the text, whatever the tokenizer splits it into (e.g. a
            sentence end, which needs the token after a full stop).

    Position ids come from the attention mask, so a row decodes the same tokens alone or in a batch. A prompt too
    long for the model's context with its ``max_new_tokens`` is cut from the left (said once per process,
    :func:`note_cut_prompts`).
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
    note_cut_prompts(sum(len(ids) > max(1, max_len - lim) for ids, lim in zip(ids_list, limits)), len(ids_list),
                     max_len)
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
            past = output_cache(model, res)
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
                if stop_when is not None:
                    active = [r for r in range(len(batch)) if not done[r]]
                    # one batched decode of the live rows: the rule reads the text exactly as the caller will
                    texts = tok.batch_decode([out[batch[r]] for r in active], skip_special_tokens=True)
                    for r, text in zip(active, texts):
                        done[r] = stop_when(text)
                if all(done) or step == steps - 1:
                    break
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                # a row that is done decodes on unread; its position must stay within the model's context
                pos = (pos[:, -1:] + 1).clamp(max=max_len - 1)
                res, logits = forward(model, nxt.unsqueeze(-1), mask, pos, logits_to_keep=1,
                                      cache=past, use_cache=True)
                past = output_cache(model, res)
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
