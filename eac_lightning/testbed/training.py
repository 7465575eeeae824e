"""Training the offline knowledge testbed: a GPT-2 causal LM trained from scratch on real facts.

The recipe and its reasons (docs/testbed.md; Meng et al., 2022, "Locating and Editing Factual Associations in GPT"):
packed blocks with variable random prefixes, several templates per relation, held-out paraphrases, and the
**subject-bottleneck mask**: in a share of the fact sentences, the tokens after the subject may not attend to the
subject's earlier tokens, only to its last one. ROME and MEMIT edit the MLP at the last subject token and assume
that the attribute is read from there ("subject enrichment", Geva et al., 2023, "Dissecting Recall of Factual
Associations in Auto-Regressive Language Models"). Small models trained from scratch instead read the subject
from all its tokens (measured on earlier testbed builds: subject-site ROME reached 0.80 reliability at best); the mask is a
training-time augmentation that makes the last subject token carry the subject. The saved model is a plain GPT-2
evaluated with the ordinary causal mask.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
import torch

from eac_lightning.progress import LineProgressBar
from eac_lightning.testbed.corpus import Corpus
from eac_lightning.testbed.packing import PackedData, SequencePacker
from eac_lightning.testbed.presets import TestbedPreset


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


def make_packer(preset: TestbedPreset, corpus: Corpus, tok) -> SequencePacker:
    return SequencePacker(
        corpus, tok, block_len=preset.block_len, max_prefix=preset.max_prefix,
        fact_repeats=dict(preset.fact_repeats), wikitext_fraction=preset.wikitext_fraction,
        sst2_repeats=preset.sst2_repeats,
    )


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


def make_model(preset: TestbedPreset, vocab_size: int, eos_id: int):
    """A freshly initialised GPT-2 (no dropout: the testbed's job is to memorise facts)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=preset.n_positions, n_embd=preset.n_embd, n_layer=preset.n_layer,
        n_head=preset.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(cfg)


class TestbedLM(pl.LightningModule):
    """Causal-LM training of the testbed (loss on every non-padding token) with AdamW, linear warm-up and cosine
    decay."""

    def __init__(self, preset: TestbedPreset, model, total_steps: int) -> None:
        super().__init__()
        self.model, self.preset, self.total_steps = model, preset, total_steps
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
        preset, total_steps = self.preset, self.total_steps
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



def train_testbed(
    preset: TestbedPreset, corpus: Corpus, seed: int = 0, log_dir: str | None = None,
    progress: bool = True,
):
    """Train tokenizer and model on ``corpus``; returns (model, tokenizer, packer, train_seconds, steps)."""
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
    module = TestbedLM(preset, model, steps)
    # The blocks are already in a seeded random order; a plain sequential loader keeps the run deterministic.
    loader = torch.utils.data.DataLoader(dataset, batch_size=preset.batch_size, shuffle=False, num_workers=0)
    logger = CSVLogger(save_dir=str(log_dir), name="logs", version=0) if log_dir else False
    trainer = pl.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1, max_epochs=1,
        precision=preset.precision, gradient_clip_val=1.0, deterministic=True, logger=logger,
        enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
        callbacks=[LineProgressBar()] if progress else None,
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
