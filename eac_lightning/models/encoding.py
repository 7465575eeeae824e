"""Token encoding and padding shared by the editing methods and the evaluation.

One convention throughout (ROME's and EasyEdit's): a prompt is tokenised with the tokenizer's special tokens, a
target (answer) as ``" " + target.strip()`` without them, apart from its prompt. Batches are padded on the right
where every row is read at known positions (edit batches), and on the left where rows are read at their end
(scoring, generation), with position ids that count real tokens only.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


def pad_token_id(tok: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token, else 0 (masked out anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            return int(value)
    return 0


def encode_prompts(tok: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts with the tokenizer's special tokens (a BOS for Llama-style tokenizers), as EasyEdit and
    ROME tokenise the prompt part.

    The ids come back whole, however long: every caller fits them to the model's context itself (the scoring
    engine cuts a long prompt from the left, keeping the end where the answer is asked for, and says so once), so
    the tokenizer's own check of their length (:func:`encode_long`) does not apply."""
    if not prompts:
        return []
    return encode_long(tok, prompts, add_special_tokens=True)


def encode_long(tok: Any, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of texts that may be longer than the model's context, for a caller that cuts or splits them into
    windows before any of them reaches the model (task prompts, a statistics corpus, a text to window).

    A tokenizer warns once that a sequence longer than its ``model_max_length`` "will result in indexing errors";
    that check is for ids fed to the model as they are, which these never are. ``verbose=False`` turns it off for
    this call only (in a tokenizer call it governs the messages about lengths, padding and truncation, nothing
    else); the caller handles the length."""
    return [list(ids) for ids in tok(list(texts), add_special_tokens=add_special_tokens, verbose=False)["input_ids"]]


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


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists into (input_ids, attention_mask): row i's tokens sit at positions ``0..len-1``
    (under a causal mask the padding after them changes nothing they compute)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def encode_right_padded(tok: Any, texts: Sequence[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Texts tokenised without special tokens (edit batches: their positions are counted the same way),
    right-padded into (input_ids, attention_mask)."""
    return right_pad([tok(t, add_special_tokens=False)["input_ids"] for t in texts], pad_token_id(tok), device)
