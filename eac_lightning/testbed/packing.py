"""Packing the testbed corpus into fixed-length training blocks.

Training sequences are packed: a random-length prefix (from nothing to a few dozen WikiText tokens), then fact
sentences, WikiText snippets and SST-2 examples in random order until the block is full. The variable prefixes put
facts at every position, so ROME's prefix-averaged keys ("{random text}. {prompt}") are in distribution. Each block
records where its fact sentences' subjects and answers are, for the subject-bottleneck mask and the answer weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from eac_lightning.testbed.corpus import KINDS, Corpus, FactItem


def _encode_all(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    texts = list(texts)
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@dataclass
class PackedData:
    """Training blocks and, per block, where the subjects of its fact sentences are.

    ``subject_spans[i]`` lists ``(first, last, end)`` token positions of every fact sentence's subject in block
    ``i`` (``end`` = the sentence's last token), used by the subject-bottleneck attention mask; ``answer_mask``
    marks the tokens of the answers, which the training loss may weigh more.
    """

    input_ids: np.ndarray  # (n_blocks, block_len) int32
    loss_mask: np.ndarray  # (n_blocks, block_len) bool — False on padding
    subject_spans: list[list[tuple[int, int, int]]]
    answer_mask: np.ndarray | None = None  # (n_blocks, block_len) bool — the answer tokens of fact sentences


class SequencePacker:
    """Packs tokenised corpus texts into fixed-length training blocks, deterministically for a seed.

    Args:
        corpus: the corpus.
        tokenizer: a tokenizer (the testbed's BPE).
        block_len: tokens per training block.
        max_prefix: longest random WikiText prefix at the start of a block.
        fact_repeats: how many times each trained fact sentence occurs per epoch, by kind.
        wikitext_fraction: share of an epoch's tokens that is WikiText.
        sst2_repeats: expected occurrences of each SST-2 training example per epoch (fractions sample).
        space_prob: share of items joined to the previous one by a space (the rest follow a line break).
    """

    def __init__(
        self,
        corpus: Corpus,
        tokenizer,
        block_len: int = 128,
        max_prefix: int = 24,
        fact_repeats: dict[str, int] | None = None,
        wikitext_fraction: float = 0.25,
        sst2_repeats: float = 1.0,
        space_prob: float = 0.5,
    ) -> None:
        self.block_len = block_len
        self.max_prefix = max_prefix
        self.eos = tokenizer.eos_token_id
        self.fact_repeats = {**{k: 1 for k in KINDS}, **(fact_repeats or {})}
        self.wikitext_fraction = wikitext_fraction
        self.sst2_repeats = sst2_repeats
        self.space_prob = space_prob
        facts = corpus.train_facts
        self.fact_kinds = [f.kind for f in facts]
        # Each text in two tokenisations: bare (as at the start of a prompt, how edits are evaluated) and with a
        # leading space (as after "<text>. ", how ROME's context templates present the prompt). Byte-level BPE gives
        # the first word a different token in each, and the model must know the subject both ways.
        texts = [f.text for f in facts]
        self.fact_ids = {sp: _encode_all(tokenizer, [sp + t for t in texts]) for sp in ("", " ")}
        self.fact_subject = {sp: self._subject_spans(tokenizer, facts, sp) for sp in ("", " ")}
        self.fact_answer = {sp: self._answer_spans(tokenizer, facts, sp) for sp in ("", " ")}
        sst = corpus.sst2_texts()
        self.sst_ids = {sp: _encode_all(tokenizer, [sp + t for t in sst]) for sp in ("", " ")}
        # Texts longer than a block (with its separator) are left out, and counted.
        self.too_long = 0
        for table in (self.fact_ids, self.sst_ids):
            for i in range(len(table[""])):
                if max(len(table[""][i]) + 1, len(table[" "][i])) > block_len:
                    table[""][i] = table[" "][i] = None
                    self.too_long += 1
        self.newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.wiki_ids = [t for ids in _encode_all(tokenizer, corpus.wikitext_train) for t in ids + [self.eos]]

    @staticmethod
    def _answer_spans(tokenizer, facts: list[FactItem], lead: str) -> list[tuple[int, int]]:
        """Token span (first, last) of each fact's answer (the target, between the prompt and the full stop)."""
        if not facts:
            return []
        enc = tokenizer([lead + f.text for f in facts], add_special_tokens=False, return_offsets_mapping=True)
        spans = []
        for k, f in enumerate(facts):
            start = len(lead) + len(f.prompt) + 1
            end = start + len(f.target)
            toks = [t for t, (s, e) in enumerate(enc["offset_mapping"][k]) if s < end and e > start]
            spans.append((toks[0], toks[-1]) if toks else (0, -1))
        return spans

    @staticmethod
    def _subject_spans(tokenizer, facts: list[FactItem], lead: str) -> list[tuple[int, int] | None]:
        """Token span (first, last) of each fact's subject, from the fast tokenizer's character offsets."""
        if not facts:
            return []
        enc = tokenizer([lead + f.text for f in facts], add_special_tokens=False, return_offsets_mapping=True)
        spans: list[tuple[int, int] | None] = []
        for k, f in enumerate(facts):
            span = None
            if f.subject and f.subject in f.prompt:
                start = len(lead) + f.prompt.index(f.subject)
                end = start + len(f.subject)
                toks = [t for t, (s, e) in enumerate(enc["offset_mapping"][k]) if s < end and e > start]
                if toks:
                    span = (toks[0], toks[-1])
            spans.append(span)
        return spans

    def epoch(self, rng: np.random.Generator) -> PackedData:
        """One epoch of blocks: every fact sentence ``fact_repeats`` times, SST-2 and WikiText mixed in."""
        items: list[tuple[str, int]] = []
        for i, kind in enumerate(self.fact_kinds):
            items += [("fact", i)] * self.fact_repeats.get(kind, 1)
        # A fractional repeat count is an inclusion probability (the tiny preset sees a sample of SST-2 per epoch).
        n_sst = len(self.sst_ids[""])
        reps = int(self.sst2_repeats) + (rng.random(n_sst) < self.sst2_repeats - int(self.sst2_repeats))
        items += [("sst", i) for i in range(n_sst) for _ in range(int(reps[i]))]
        n_fact_tokens = sum(
            len((self.fact_ids if k == "fact" else self.sst_ids)[""][i] or []) for k, i in items
        )
        # WikiText snippets of 16-48 tokens fill the requested share of the epoch.
        wiki_tokens = int(n_fact_tokens * self.wikitext_fraction / max(1e-6, 1 - self.wikitext_fraction))
        n_snip = wiki_tokens // 32 if self.wiki_ids else 0
        items += [("wiki", -1)] * n_snip
        order = rng.permutation(len(items))

        blocks: list[list[int]] = []
        masks: list[list[bool]] = []
        spans: list[list[tuple[int, int, int]]] = []
        cur: list[int] = []
        cur_spans: list[tuple[int, int, int]] = []

        def wiki_snippet(n: int) -> list[int]:
            if n <= 0 or not self.wiki_ids:
                return []
            s = int(rng.integers(0, max(1, len(self.wiki_ids) - n)))
            return self.wiki_ids[s : s + n]

        answers: list[list[bool]] = []
        cur_answers: list[int] = []

        def flush() -> None:
            nonlocal cur, cur_spans, cur_answers
            if not cur:
                return
            pad = self.block_len - len(cur)
            # Top up with WikiText rather than padding: every trained position counts.
            cur = cur + wiki_snippet(pad)
            pad = self.block_len - len(cur)
            blocks.append(cur + [self.eos] * pad)
            masks.append([True] * len(cur) + [False] * pad)
            spans.append(cur_spans)
            row = [False] * self.block_len
            for t in cur_answers:
                row[t] = True
            answers.append(row)
            cur, cur_spans, cur_answers = [], [], []

        def start_block() -> None:
            nonlocal cur
            # Variable random prefix: none in a quarter of the blocks (prompts at position 0, as evaluated),
            # otherwise a WikiText fragment of random length.
            n = 0 if rng.random() < 0.25 else int(rng.integers(1, self.max_prefix + 1))
            cur = wiki_snippet(n)

        def place(kind: str, i: int, spaced: bool) -> tuple[str, list[int], list[int]]:
            # Joined after a space (the spaced tokenisation) or after a line break (the bare one); the first
            # item of an unprefixed block is bare, exactly like an evaluated prompt.
            lead = " " if spaced else ""
            sep = [] if (spaced or not cur) else list(self.newline)
            table = self.fact_ids if kind == "fact" else self.sst_ids
            return lead, sep, table[lead][i]

        start_block()
        for j in order:
            kind, i = items[j]
            if kind == "wiki":
                ids = wiki_snippet(int(rng.integers(16, 49)))[: self.block_len - len(cur)]
                cur += ids
                if len(cur) >= self.block_len:
                    flush()
                    start_block()
                continue
            if (self.fact_ids if kind == "fact" else self.sst_ids)[""][i] is None:
                continue  # longer than a block
            spaced = rng.random() < self.space_prob
            lead, sep, ids = place(kind, i, spaced and bool(cur))
            if len(cur) + len(sep) + len(ids) > self.block_len:
                flush()
                start_block()
                lead, sep, ids = place(kind, i, spaced and bool(cur))
                if len(cur) + len(sep) + len(ids) > self.block_len:
                    cur = []
                    lead, sep, ids = place(kind, i, False)
            cur += sep
            off = len(cur)
            if kind == "fact" and self.fact_subject[lead][i] is not None:
                a, b = self.fact_subject[lead][i]
                cur_spans.append((off + a, off + b, off + len(ids) - 1))
            if kind == "fact":
                a, b = self.fact_answer[lead][i]
                cur_answers.extend(range(off + a, off + b + 1))
            cur += ids
        flush()
        return PackedData(
            np.asarray(blocks, dtype=np.int32), np.asarray(masks, dtype=bool), spans, np.asarray(answers, dtype=bool)
        )
