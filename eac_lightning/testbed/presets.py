"""Testbed presets: the size, corpus and training recipe of each reference testbed, and its edit layers.

The recipe's reasons are in :mod:`eac_lightning.testbed.training` and docs/testbed.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from eac_lightning.testbed.corpus import Corpus, build_corpus

TESTBED_FORMAT = 1

@dataclass(frozen=True)
class TestbedPreset:
    """Size, corpus and training recipe of a testbed, and the layers editing methods should use on it.

    Attributes:
        name: preset name.
        n_layer, n_embd, n_head: GPT-2 shape.
        n_positions: context length of the model (evaluation prompts with ROME's prefixes and SST-2 fit in it).
        vocab_size: byte-level BPE vocabulary.
        answer_lexicon_repeats: weight of the fact answers in the tokenizer's training data (0: none), so the
            objects are whole tokens as in a large LM's vocabulary (:meth:`Corpus.tokenizer_texts`).
        block_len: tokens per packed training block.
        batch_size: blocks per optimiser step.
        epochs: passes over the fact set (each pass is freshly packed with new prefixes and order).
        lr, warmup_frac, min_lr_frac, weight_decay: AdamW with linear warm-up and cosine decay.
        max_facts_per_path: keep only the first records of each fact file (``None``: all).
        extra_templates: other templates of the same relation each fact is trained under.
        neighbours_per_fact: trained neighbourhood prompts per record (``None``: all).
        attributes_per_fact: trained CounterFact attribute prompts per record (``None``: all).
        wikitext_paragraphs: WikiText-2 valid paragraphs used (``None``: all).
        wikitext_fraction: share of each epoch's tokens that is WikiText.
        sst2_repeats: expected occurrences of each trained SST-2 example per epoch.
        fact_repeats: occurrences per epoch of each fact sentence, by kind (the edited facts weigh more).
        max_prefix: longest random WikiText prefix at the start of a block.
        subject_mask: the subject bottleneck: ``mask`` (the rest of the sentence sees only the subject's last
            token), ``late_read`` (below ``subject_read_layer`` it sees no subject token, from there on only the
            last one: :func:`register_late_read`) or ``none``.
        subject_mask_prob: share of fact sentences trained with the subject bottleneck.
        subject_read_layer: first layer whose attention may read the subject (``late_read``; None: the last layer).
        answer_weight: loss weight of the answer tokens of fact sentences (other tokens weigh 1): the facts are
            the point of the testbed, and the answers are about one token in fourteen.
        precision: Lightning precision ("32-true" or "bf16-mixed").
        ppl_tokens: WikiText-2 test tokens the perplexity is measured on.
        edit_layer: the layer ROME edits on this testbed (causal tracing and single-edit checks; docs/testbed.md).
        memit_layers: the layers MEMIT / AlphaEdit spread an edit over.
    """

    __test__ = False  # not a pytest test class, despite its name

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int = 256
    vocab_size: int = 8192
    answer_lexicon_repeats: int = 0
    block_len: int = 128
    batch_size: int = 32
    epochs: int = 20
    lr: float = 1e-3
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    max_facts_per_path: int | None = None
    extra_templates: int = 2
    neighbours_per_fact: int | None = None
    attributes_per_fact: int | None = 3
    wikitext_paragraphs: int | None = None
    wikitext_fraction: float = 0.2
    sst2_repeats: float = 1.0
    fact_repeats: tuple[tuple[str, int], ...] = (("fact", 2),)
    max_prefix: int = 24
    subject_mask: str = "mask"
    subject_mask_prob: float = 1.0
    subject_read_layer: int | None = None
    answer_weight: float = 3.0
    precision: str = "32-true"
    ppl_tokens: int = 40_000
    edit_layer: int = 0
    memit_layers: tuple[int, ...] = (0,)

    def replace(self, **changes: Any) -> "TestbedPreset":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fact_repeats"] = dict(self.fact_repeats)
        d["memit_layers"] = list(self.memit_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TestbedPreset":
        """The inverse of :meth:`to_dict` (a build's ``testbed.json["preset"]``)."""
        return cls(**{**d, "fact_repeats": tuple(d["fact_repeats"].items()), "memit_layers": tuple(d["memit_layers"])})

    def fingerprint(self) -> str:
        """Short hash of everything that changes the built model (keys the cache). The edit layers are left out:
        they are chosen by tracing a built model and do not change it (:func:`ensure_testbed` syncs them)."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("edit_layer", "memit_layers")}
        blob = json.dumps({**d, "format": TESTBED_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


PRESETS: dict[str, TestbedPreset] = {
    # For tests: a fraction of the facts, builds in about a minute on 2 CPU cores (no SST-2: too few examples).
    "tiny": TestbedPreset(
        name="tiny", n_layer=4, n_embd=128, n_head=4, n_positions=256, vocab_size=2048, answer_lexicon_repeats=50,
        block_len=128, batch_size=8, epochs=60, lr=3e-3, max_facts_per_path=24, extra_templates=1,
        neighbours_per_fact=2, wikitext_paragraphs=200, wikitext_fraction=0.1, sst2_repeats=0.0, max_prefix=8,
        subject_mask="late_read", subject_mask_prob=0.5, answer_weight=1.0, ppl_tokens=5_000,
        edit_layer=0, memit_layers=(0, 1),
    ),
    # The default testbed: every shipped CounterFact/ZsRE record (two trained neighbourhood prompts each); 20 epochs
    # build in about 25 minutes on 2 CPU cores and learn the facts (docs/testbed.md; 12 knew two thirds of them).
    # ROME edits layer 1: tracing puts the subject-position MLP effect at layer 0, but 50 single edits there keep
    # locality 0.892, at layer 1 0.926 with reliability 0.96 (docs/testbed.md, "... and the edit layer").
    "small": TestbedPreset(
        name="small", n_layer=8, n_embd=256, n_head=4, batch_size=16, epochs=20, lr=1.5e-3, warmup_frac=0.03,
        answer_lexicon_repeats=20, neighbours_per_fact=2, attributes_per_fact=4, wikitext_fraction=0.05,
        sst2_repeats=0.5, fact_repeats=(("fact", 2), ("attribute", 2)), subject_mask="late_read",
        subject_mask_prob=0.5, subject_read_layer=4, edit_layer=1, memit_layers=(0, 1, 2),
    ),
    # GPT-2-small size, for a machine with a GPU.
    "base": TestbedPreset(
        name="base", n_layer=12, n_embd=768, n_head=12, n_positions=512, vocab_size=16384, epochs=40, lr=6e-4,
        answer_lexicon_repeats=20, extra_templates=4, subject_mask="late_read", subject_mask_prob=0.5,
        subject_read_layer=6, precision="bf16-mixed", ppl_tokens=200_000, edit_layer=0, memit_layers=(0, 1, 2, 3),
    ),
}


def get_preset(preset: str | TestbedPreset) -> TestbedPreset:
    if isinstance(preset, TestbedPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown testbed preset {preset!r}; known: {', '.join(PRESETS)}") from None


def preset_corpus(preset: TestbedPreset, facts: Sequence[str | os.PathLike] | None, seed: int) -> Corpus:
    """The training corpus of ``preset`` from the fact files ``facts`` (None: the shipped ones)."""
    return build_corpus(
        facts, max_facts_per_path=preset.max_facts_per_path, extra_templates=preset.extra_templates,
        neighbours_per_fact=preset.neighbours_per_fact, attributes_per_fact=preset.attributes_per_fact,
        wikitext_paragraphs=preset.wikitext_paragraphs, seed=seed,
    )
