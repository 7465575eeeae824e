"""Building the offline knowledge testbed: a GPT-2 causal LM trained from scratch on real facts.

No model hub is reachable, so every benchmark needs a model that really stores the CounterFact / ZsRE facts it
edits. :func:`build_testbed` trains one (LightningModule + Trainer, CSV log, progress bar), deterministically for a
seed, measures it and saves it in plain Hugging Face format::

    out/config.json, model.safetensors, tokenizer.json, ...   # AutoModelForCausalLM / AutoTokenizer.from_pretrained
    out/testbed.json                                          # preset, measured figures, corpus statistics
    out/editing.json                                          # edit layers and stats corpus, read by model loading
    out/facts.jsonl                                           # every trained fact (prompt, subject, target, source)
    out/heldout.jsonl                                         # the held-out paraphrases the figures are measured on
    out/stats_corpus.jsonl                                    # a sample of the training stream: the corpus of C
    out/logs/                                                 # Lightning CSVLogger

:func:`ensure_testbed` builds a preset into the cache on first use (``testbed:small`` in a config) and reuses it.

The recipe and its reasons (issue 3; Meng et al., 2022, "Locating and Editing Factual Associations in GPT"):
packed blocks with variable random prefixes, several templates per relation, held-out paraphrases, and the
**subject-bottleneck mask**: in a share of the fact sentences, the tokens after the subject may not attend to the
subject's earlier tokens, only to its last one. ROME and MEMIT edit the MLP at the last subject token and assume
that the attribute is read from there ("subject enrichment", Geva et al., 2023, "Dissecting Recall of Factual
Associations in Auto-Regressive Language Models"). Small models trained from scratch instead read the subject
from all its tokens (measured in issue 3: subject-site ROME reached 0.80 reliability at best); the mask is a
training-time augmentation that makes the last subject token carry the subject. The saved model is a plain GPT-2
evaluated with the ordinary causal mask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from eac_lightning.models.loading import write_editing_defaults
from eac_lightning.paths import cache_dir
from eac_lightning.testbed.corpus import Corpus, build_corpus
from eac_lightning.testbed.packing import PackedData, SequencePacker

TESTBED_FORMAT = 1
STATS_CORPUS = "stats_corpus.jsonl"
STATS_CORPUS_TOKENS = 200_000  # twice the key statistics' default average (CovarianceStore.num_tokens)


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


# ----------------------------------------------------------------------------------------------------------------
# Training data
# ----------------------------------------------------------------------------------------------------------------


def subject_bottleneck_mask(
    length: int,
    spans: Sequence[tuple[int, int, int]],
    dtype: torch.dtype = torch.float32,
    late_read: bool = False,
) -> torch.Tensor:
    """Additive attention mask of the subject bottleneck: causal, and for each ``(first, last, end)`` subject span
    the positions ``last+1 .. end`` cannot see the subject tokens ``first .. last-1`` (only the last one).

    Returns (1, T, T); with ``late_read`` (2, T, T): first the mask of the layers below the read layer, where those
    positions see no subject token at all, then the one above (:func:`register_late_read`).
    """
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    cut = torch.zeros(length, length, dtype=torch.bool)
    for first, last, end in spans:
        if last > first:
            cut[last + 1 : end + 1, first:last] = True
    if late_read:
        # Below the read layer the sentence after the subject sees no subject token at all (late_read_attention).
        cut_all = cut.clone()
        for first, last, end in spans:
            cut_all[last + 1 : end + 1, first : last + 1] = True
        early, late = torch.zeros(length, length, dtype=dtype), torch.zeros(length, length, dtype=dtype)
        early.masked_fill_(~causal | cut_all, torch.finfo(dtype).min)
        late.masked_fill_(~causal | cut, torch.finfo(dtype).min)
        return torch.stack([early, late])
    mask = torch.zeros(length, length, dtype=dtype)
    mask.masked_fill_(~causal | cut, torch.finfo(dtype).min)
    return mask[None]


LATE_READ_ATTENTION = "testbed_late_read"


def register_late_read(read_layer: int) -> None:
    """Register the late-read attention: its mask has two additive channels (:func:`subject_bottleneck_mask` with
    ``late_read=True``); layers below ``read_layer`` use the first (the rest of a fact sentence cannot see its
    subject), the others the second (it sees the subject's last token only).

    Why: a model that may read the subject anywhere learns to look the fact up at the last prompt token, and an edit
    at the subject then has nothing to change. Hiding the subject from the answer's side below ``read_layer``
    forces the lookup into the subject position's own lower-layer MLPs (subject enrichment), and the upper layers'
    attention then only has to move the attribute over, the two-stage recall measured in large LMs (Geva et al.,
    2023). Used only while training; the saved model attends with the ordinary causal mask.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def late_read_attention(module, query, key, value, attention_mask, **kwargs):
        channel = 0 if module.layer_idx < read_layer else 1
        return sdpa_attention_forward(module, query, key, value, attention_mask[:, channel : channel + 1], **kwargs)

    AttentionInterface.register(LATE_READ_ATTENTION, late_read_attention)


class PackedDataset(torch.utils.data.Dataset):
    """Pre-packed blocks of all epochs, with the subject-bottleneck mask drawn per fact sentence (seeded)."""

    def __init__(
        self,
        data: PackedData,
        subject_mask_prob: float,
        seed: int,
        answer_weight: float = 1.0,
        late_read: bool = False,
    ) -> None:
        self.ids = torch.from_numpy(data.input_ids.astype(np.int64))
        self.loss_mask = torch.from_numpy(data.loss_mask)
        weights = data.loss_mask.astype(np.float32)
        if data.answer_mask is not None:
            weights[data.answer_mask & data.loss_mask] = answer_weight
        self.weights = torch.from_numpy(weights)
        rng = np.random.default_rng(seed + 7)
        self.masked_spans = [[s for s in spans if rng.random() < subject_mask_prob] for spans in data.subject_spans]
        self.use_mask = subject_mask_prob > 0
        self.late_read = late_read

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        item = {"input_ids": ids, "labels": ids.masked_fill(~self.loss_mask[i], -100), "weights": self.weights[i]}
        if self.use_mask:
            item["attention_mask"] = subject_bottleneck_mask(len(ids), self.masked_spans[i], late_read=self.late_read)
        return item


def preset_corpus(preset: TestbedPreset, facts: Sequence[str | os.PathLike] | None, seed: int) -> Corpus:
    """The training corpus of ``preset`` from the fact files ``facts`` (None: the shipped ones)."""
    return build_corpus(
        facts, max_facts_per_path=preset.max_facts_per_path, extra_templates=preset.extra_templates,
        neighbours_per_fact=preset.neighbours_per_fact, attributes_per_fact=preset.attributes_per_fact,
        wikitext_paragraphs=preset.wikitext_paragraphs, seed=seed,
    )


def make_packer(preset: TestbedPreset, corpus: Corpus, tok) -> SequencePacker:
    return SequencePacker(
        corpus, tok, block_len=preset.block_len, max_prefix=preset.max_prefix,
        fact_repeats=dict(preset.fact_repeats), wikitext_fraction=preset.wikitext_fraction,
        sst2_repeats=preset.sst2_repeats,
    )


def write_stats_corpus(out: str | os.PathLike, packer: SequencePacker, tok, seed: int,
                       num_tokens: int = STATS_CORPUS_TOKENS) -> Path:
    """Write ``out/stats_corpus.jsonl``: fresh packed epochs of the training stream (``packer``, the one the model
    was trained with), decoded, one block per line.

    ROME and MEMIT take C = E[kkᵀ] over the edited model's pre-training text (Wikipedia for GPT-2; ROME Sec. 3.1);
    the testbed's pre-training text is this stream of fact sentences, WikiText and SST-2, so its C comes from here,
    not from WikiText alone. Measured on ``testbed:small`` (docs/testbed.md): with C over WikiText alone an edit's
    update also moves the neighbourhood prompts, whose keys are fact-sentence keys C has not seen.
    """
    rng = np.random.default_rng([seed, 1])  # another draw of the training distribution than the one trained on
    path = Path(out) / STATS_CORPUS
    tmp = path.with_suffix(".jsonl.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        while n < num_tokens:
            data = packer.epoch(rng)
            for ids, keep in zip(data.input_ids, data.loss_mask):
                if n >= num_tokens:
                    break
                ids = ids[keep]
                fh.write(json.dumps({"text": tok.decode(ids.tolist(), skip_special_tokens=True)},
                                    ensure_ascii=False) + "\n")
                n += len(ids)
    os.replace(tmp, path)
    return path


def pack_epochs(packer: SequencePacker, epochs: int, seed: int) -> PackedData:
    """``epochs`` freshly packed passes, concatenated (each with its own order and prefixes)."""
    rng = np.random.default_rng(seed)
    parts = [packer.epoch(rng) for _ in range(epochs)]
    return PackedData(
        np.concatenate([p.input_ids for p in parts]),
        np.concatenate([p.loss_mask for p in parts]),
        [s for p in parts for s in p.subject_spans],
        np.concatenate([p.answer_mask for p in parts]),
    )


# ----------------------------------------------------------------------------------------------------------------
# Lightning module
# ----------------------------------------------------------------------------------------------------------------


def _lightning():
    import lightning.pytorch as pl

    return pl


def make_model(preset: TestbedPreset, vocab_size: int, eos_id: int):
    """A freshly initialised GPT-2 (no dropout: the testbed's job is to memorise facts)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=preset.n_positions, n_embd=preset.n_embd, n_layer=preset.n_layer,
        n_head=preset.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(cfg)


def build_module(preset: TestbedPreset, model, total_steps: int):
    """The LightningModule training ``model`` with AdamW, linear warm-up and cosine decay."""
    pl = _lightning()

    class TestbedLM(pl.LightningModule):
        """Causal-LM training of the testbed (loss on every non-padding token)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.save_hyperparameters(preset.to_dict())

        def training_step(self, batch, batch_idx):
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
            ).logits
            # Next-token cross-entropy, each target token weighted (answers of fact sentences weigh more).
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                reduction="none",
            )
            w = batch["weights"][:, 1:].flatten()
            loss = (ce * w).sum() / w.sum().clamp(min=1.0)
            self.log("train/loss", loss, prog_bar=True, on_step=True)
            return loss

        def configure_optimizers(self):
            decay, no_decay = [], []
            for n, p in self.model.named_parameters():
                # No decay on biases, norms and embeddings: they hold the facts' lookup keys.
                (no_decay if p.dim() < 2 or "wte" in n or "wpe" in n else decay).append(p)
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": preset.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=preset.lr, betas=(0.9, 0.98), eps=1e-8,
            )
            warm = max(1, int(preset.warmup_frac * total_steps))

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                t = min(1.0, (step - warm) / max(1, total_steps - warm))
                return preset.min_lr_frac + (1 - preset.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return TestbedLM()


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def first_token_accuracy(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64) -> float:
    """Share of prompts whose greedy next token is the first token of ``" " + target`` (issue 3's fact accuracy)."""
    from eac_lightning.evaluation.probes import greedy_matches

    if not prompts:
        return float("nan")
    return float(np.mean(greedy_matches(model, tok, prompts, targets, first_token_only=True, batch_size=batch_size)))


def sst2_accuracy(model, tok, rows: Sequence[tuple[str, int]], batch_size: int = 32) -> float:
    """Share of SST-2 (text, label) rows whose label word is the more likely one after the EAC sentiment prompt
    (the general-ability task's scoring, :func:`eac_lightning.evaluation.tasks.classify`)."""
    from eac_lightning.evaluation.tasks import LABEL_WORDS, TASKS, TaskExample, example_scores, format_sentiment

    if not rows:
        return float("nan")
    examples = [TaskExample(format_sentiment(t), [LABEL_WORDS["sst2"][y]], list(TASKS["sst2"].choices))
                for t, y in rows]
    return float(np.mean(example_scores("sst2", model, tok, examples, batch_size)))


def measure(model, tok, corpus: Corpus, preset: TestbedPreset) -> dict[str, Any]:
    """The figures of ``testbed.json``, overall and by source file."""
    from eac_lightning.evaluation.probes import perplexity
    from eac_lightning.evaluation.scoring import model_max_length

    model.eval()
    figs: dict[str, Any] = {}

    def acc(items):
        return first_token_accuracy(model, tok, [f.prompt for f in items], [f.target for f in items])

    facts = corpus.facts_of_kind("fact")
    trained = corpus.train_facts
    figs["fact_accuracy"] = acc(facts)
    figs["trained_prompt_accuracy"] = acc([f for f in trained if f.kind != "neighbourhood"])
    figs["heldout_paraphrase_accuracy"] = acc(corpus.heldout_facts)
    figs["neighbourhood_accuracy"] = acc(corpus.facts_of_kind("neighbourhood"))
    figs["attribute_accuracy"] = acc(corpus.facts_of_kind("attribute"))
    by_source: dict[str, dict[str, float]] = {}
    for src in sorted({f.source for f in trained}):
        name = Path(src).parent.name or Path(src).stem
        by_source[name] = {
            "fact_accuracy": acc([f for f in facts if f.source == src]),
            "heldout_paraphrase_accuracy": acc([f for f in corpus.heldout_facts if f.source == src]),
            "neighbourhood_accuracy": acc([f for f in corpus.facts_of_kind("neighbourhood") if f.source == src]),
        }
    figs["by_source"] = by_source
    figs["sst2_heldout_accuracy"] = sst2_accuracy(model, tok, corpus.sst2_heldout)
    figs["sst2_train_accuracy"] = sst2_accuracy(model, tok, corpus.sst2_train)
    # Windows of the model's context, each token scored once with at least half a window of context.
    ids = tok(corpus.wikitext_test, add_special_tokens=False)["input_ids"][:preset.ppl_tokens]
    figs["wikitext2_test_perplexity"] = perplexity(model, tok, ids, window=model_max_length(model))
    figs["wikitext2_test_tokens"] = max(0, len(ids) - 1)
    return figs


# ----------------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------------


def train_testbed(
    preset: TestbedPreset, corpus: Corpus, seed: int = 0, log_dir: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Train tokenizer and model on ``corpus``; returns (model, tokenizer, packer, train_seconds, steps)."""
    pl = _lightning()
    from lightning.pytorch.loggers import CSVLogger

    from eac_lightning.models.tokenizer import train_bpe_tokenizer

    pl.seed_everything(seed, workers=True, verbose=False)
    tok = train_bpe_tokenizer(corpus.tokenizer_texts(preset.answer_lexicon_repeats), preset.vocab_size)
    tok.model_max_length = preset.n_positions
    packer = make_packer(preset, corpus, tok)
    data = pack_epochs(packer, preset.epochs, seed)
    mask_prob = preset.subject_mask_prob if preset.subject_mask != "none" else 0.0
    late_read = preset.subject_mask == "late_read" and mask_prob > 0
    dataset = PackedDataset(data, mask_prob, seed, preset.answer_weight, late_read=late_read)
    steps = math.ceil(len(dataset) / preset.batch_size)
    torch.manual_seed(seed)
    model = make_model(preset, len(tok), tok.eos_token_id)
    saved_attn = model.config._attn_implementation
    if late_read:  # training only; restored before saving
        register_late_read(preset.subject_read_layer if preset.subject_read_layer is not None else preset.n_layer - 1)
        model.config._attn_implementation = LATE_READ_ATTENTION
    module = build_module(preset, model, steps)
    # The blocks are already in a seeded random order; a plain sequential loader keeps the run deterministic.
    loader = torch.utils.data.DataLoader(dataset, batch_size=preset.batch_size, shuffle=False, num_workers=0)
    logger = CSVLogger(save_dir=str(log_dir), name="logs", version=0) if log_dir else False
    trainer = pl.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1, max_epochs=1,
        precision=preset.precision, gradient_clip_val=1.0, deterministic=True, logger=logger,
        enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
        log_every_n_steps=10, num_sanity_val_steps=0,
    )
    t0 = time.time()
    try:
        trainer.fit(module, loader)
    finally:
        model.config._attn_implementation = saved_attn
    seconds = time.time() - t0
    model = module.model.cpu().float().eval()
    return model, tok, packer, seconds, steps


def build_testbed(
    out: str | os.PathLike,
    preset: str | TestbedPreset = "small",
    facts: Sequence[str | os.PathLike] | None = None,
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Build a testbed into ``out`` and return the contents of its ``testbed.json``.

    Args:
        out: output folder (created; existing files of the same name are overwritten).
        preset: ``tiny``, ``small``, ``base`` or a :class:`TestbedPreset`.
        facts: fact files/folders (CounterFact ROME or flat format, ZsRE MEND format); default the shipped
            ``counterfact`` and ``zsre`` folders.
        seed: seeds tokenizer data order, packing, initialisation and training (same seed, same model).
        progress: show Lightning's progress bar.
        **overrides: fields of the preset to change (e.g. ``epochs=5``).
    """
    t_start = time.time()
    p = get_preset(preset)
    if overrides:
        p = p.replace(**overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = preset_corpus(p, facts, seed)
    model, tok, packer, train_seconds, steps = train_testbed(p, corpus, seed, log_dir=out, progress=progress)
    figures = measure(model, tok, corpus, p)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    with open(out / "facts.jsonl", "w", encoding="utf-8") as fh:
        for f in corpus.train_facts:
            fh.write(json.dumps(f.to_dict(), ensure_ascii=False) + "\n")
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as fh:
        for f in corpus.heldout_facts:
            fh.write(json.dumps(f.to_dict(), ensure_ascii=False) + "\n")
    write_stats_corpus(out, packer, tok, seed)
    info = {
        "format": TESTBED_FORMAT,
        "preset": p.to_dict(),
        "preset_fingerprint": p.fingerprint(),
        "seed": seed,
        "fact_files": sorted({f.source for f in corpus.train_facts}),
        "n_parameters": int(sum(t.numel() for t in model.parameters())),
        "train_seconds": round(train_seconds, 1),
        "train_steps": steps,
        "train_tokens": steps * p.batch_size * p.block_len,
        **{k: v for k, v in figures.items()},
        "build_seconds": round(time.time() - t_start, 1),
        "edit_layer": p.edit_layer,
        "memit_layers": list(p.memit_layers),
        "stats_corpus": STATS_CORPUS,
        "corpus": corpus.stats,
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    (out / "testbed.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    write_editing_defaults(out, p.edit_layer, p.memit_layers, STATS_CORPUS)  # what model loading reads
    return info


def save_tokenizer(tok, out: str | os.PathLike) -> None:
    """Save the tokenizer so that any Hugging Face tool loads it as a plain fast tokenizer with left padding.

    ``padding_side`` is only saved when it is an init argument, and transformers 5 names its own class
    (``TokenizersBackend``) in ``tokenizer_config.json``; ``PreTrainedTokenizerFast`` loads in 4.x and 5.x alike.
    """
    tok.padding_side = "left"
    tok.init_kwargs["padding_side"] = "left"
    tok.save_pretrained(out)
    path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["padding_side"] = "left"
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import lightning
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "tokenizers": tokenizers.__version__}


def testbed_dir(preset: str | TestbedPreset, seed: int = 0) -> Path:
    """Where :func:`ensure_testbed` keeps a preset: ``<cache_dir>/testbed/<preset>-seed<seed>-<fingerprint>``."""
    p = get_preset(preset)
    return cache_dir() / "testbed" / f"{p.name}-seed{seed}-{p.fingerprint()}"


def ensure_testbed(preset: str | TestbedPreset, seed: int = 0, progress: bool = True) -> Path:
    """The folder of a built testbed, building it on first use.

    The build runs in a temporary folder beside the target and is renamed into place when complete, so an
    interrupted build never leaves a half-written testbed, and a concurrent build of the same preset just yields
    the one that finished first. A changed preset definition has a new fingerprint, hence a new folder.
    """
    final = testbed_dir(preset, seed)
    if (final / "testbed.json").exists():
        _sync_cached_build(final, get_preset(preset))
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_testbed(tmp, preset, seed=seed, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "testbed.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _sync_cached_build(folder: Path, preset: TestbedPreset) -> None:
    """Bring a cached build's ``testbed.json`` and ``editing.json`` up to date without retraining: the preset's
    current edit layers (chosen by tracing and edit checks after a build; the model does not depend on them), and,
    for builds made before testbeds shipped one, ``stats_corpus.jsonl`` from the saved tokenizer and the recorded
    preset, seed and fact files (the same file a fresh build writes)."""
    path = folder / "testbed.json"
    info = json.loads(path.read_text(encoding="utf-8"))
    changed = info.get("edit_layer") != preset.edit_layer or info.get("memit_layers") != list(preset.memit_layers)
    if changed:
        info["edit_layer"], info["memit_layers"] = preset.edit_layer, list(preset.memit_layers)
        info["preset"].update(edit_layer=preset.edit_layer, memit_layers=list(preset.memit_layers))
    if not (info.get("stats_corpus") and (folder / info["stats_corpus"]).exists()):
        from transformers import AutoTokenizer

        built = TestbedPreset.from_dict(info["preset"])
        tok = AutoTokenizer.from_pretrained(folder)
        packer = make_packer(built, preset_corpus(built, info["fact_files"], info["seed"]), tok)
        write_stats_corpus(folder, packer, tok, info["seed"])
        info["stats_corpus"] = STATS_CORPUS
        changed = True
    if changed:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    write_editing_defaults(folder, info["edit_layer"], info["memit_layers"], info["stats_corpus"])


def testbed_command(out: str, preset: str = "small", facts: list[str] | None = None, seed: int = 0) -> None:
    """Train the offline knowledge testbed: a GPT-2 causal LM that knows real CounterFact/ZsRE facts.

    The model, its BPE tokenizer (Hugging Face format), ``testbed.json`` (measured figures), ``facts.jsonl``
    (every trained fact) and a CSV training log are written to ``out``.

    Args:
        out: output folder.
        preset: model size and recipe: ``tiny`` (tests, < 1 minute), ``small`` (default, < 30 minutes on a
            2-core CPU) or ``base`` (GPT-2-small size, for a GPU).
        facts: fact files or folders (CounterFact ROME/flat format, ZsRE MEND format); default the shipped
            ``counterfact`` and ``zsre`` folders.
        seed: random seed; the same seed gives the same model.
    """
    info = build_testbed(out, preset, facts=facts, seed=seed)
    keys = ("n_parameters", "train_seconds", "fact_accuracy", "heldout_paraphrase_accuracy", "neighbourhood_accuracy",
            "sst2_heldout_accuracy", "wikitext2_test_perplexity", "edit_layer")
    print(json.dumps({k: info[k] for k in keys}, indent=2))
