"""One entry point for everything the project measures after (or before) editing.

:class:`Evaluator` computes, for a model, its tokenizer, the requests edited so far and the pre-edit reference:

* ``edit/*`` — the edit metrics of EAC App. C.3 (Eqs. 10-12, EasyEdit's teacher-forced token accuracy as the
  headline ``edit/reliability``, ``edit/generalization``, ``edit/locality``), the live-decoding metrics
  ``edit/live_rel``, ``edit/live_gen``, ``edit/live_loc`` beside them (the WILD protocol,
  :mod:`eac_lightning.evaluation.live_metrics`), the exact-greedy variants ``edit/*_gen`` and, for
  CounterFact-style requests, ROME's ``edit/rome_*`` scores and magnitudes;
* ``general/*`` — the Table 4 tasks ``rte``, ``sst2``, ``nq_open``, ``samsum`` and the probes
  ``fact_retention`` and ``wikitext2_ppl``.

Sharding: pass this process's ``rank`` and ``world_size``. Each rank evaluates the examples with index
``i % world_size == rank`` (edit requests, task examples, perplexity windows); the torchmetrics states are summed
across ranks by ``compute()`` when ``torch.distributed`` is initialised, so every rank returns the same global
numbers. Every rank must call the same methods with the same arguments (same requests, same config). This module
does not import Lightning; the Lightning callback passes ``trainer.global_rank`` / ``trainer.world_size``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from eac_lightning.data.requests import EditRequest
from eac_lightning.evaluation.edit_metrics import (
    compute_locality_reference,
    evaluate_edit_metrics,
    is_counterfact,
)
from eac_lightning.evaluation.literature_metrics import evenly_spaced, literature_metrics
from eac_lightning.evaluation.live_metrics import (
    LIVE_KEYS,
    LIVE_MAX_NEW_TOKENS,
    live_edit_metrics,
    live_reference,
)
from eac_lightning.evaluation.metrics import shard
from eac_lightning.evaluation.probes import fact_retention, wikitext2_ppl
from eac_lightning.evaluation.tasks import (
    TASK_KEYS,
    TASKS,
    TaskExample,
    evaluate_task,
    load_task,
)
from eac_lightning.progress import progress
from eac_lightning.validation import check

PROBE_KEYS = ("fact_retention", "wikitext2_ppl")
HEADLINE_EDIT_KEYS = ("reliability", "generalization", "locality")
#: ``summary.json``'s ``edit_metrics``: the teacher-forced headline and, beside it, the live-decoding figures.
SUMMARY_EDIT_KEYS = HEADLINE_EDIT_KEYS + LIVE_KEYS
GENERAL_KEYS = TASK_KEYS + PROBE_KEYS


@dataclass
class EvaluatorConfig:
    """What an evaluation measures and how much of each dataset it reads.

    Args:
        tasks: general-ability tasks to run, a subset of ``rte``, ``sst2``, ``nq_open``, ``samsum`` (EAC Table 4).
            An empty list skips them.
        limits: per-task sample limit, e.g. ``{"samsum": 20}``: the first N examples (after ``start``) of the
            task's data. Tasks not named here use ``default_limit``.
        default_limit: sample limit of tasks missing from ``limits``; ``None`` evaluates every row.
        start: per-task number of rows to skip before the limit applies (e.g. the half of SST-2 dev a testbed was
            trained on).
        sources: per-task data source: a file, a folder or a hub dataset name (``name`` or ``name:config``).
            Default: the offline file in the offline data folder.
        batch_size: prompts per forward pass for every batched scoring and generation call.
        max_new_tokens: per-task greedy generation budget; defaults: rte 3, sst2 3, nq_open 16, samsum 64.
        classification_mode: ``logits`` (compare the log-probabilities of the two answer words) or ``generate``
            (greedy decoding, the first word must be the answer) for RTE and SST-2.
        probes: probes to run: ``fact_retention`` (needs ``retention_requests``) and ``wikitext2_ppl``.
        ppl_max_tokens: WikiText-2 test tokens the perplexity is computed on.
        ppl_window: tokens per perplexity window (default: the model's maximum length, at most 1024).
        ppl_stride: step between perplexity windows (default: half the window).
        ppl_batch_size: perplexity windows per forward pass (windows are long, so fewer than ``batch_size``).
        wikitext_path: WikiText-2 test file (default: ``wikitext/wikitext-2_test.txt`` in the offline data folder).
        edit_metrics: compute the edit metrics when requests are given.
        live_metrics: also compute the live-decoding edit metrics ``edit/live_rel``, ``edit/live_gen`` and
            ``edit/live_loc``: the model greedily decodes an answer to the edit prompt, each paraphrase and each
            neighbourhood prompt without being told the target's length, scored by exact match after SQuAD
            normalisation (the WILD protocol, Yang et al. 2025; :mod:`eac_lightning.evaluation.live_metrics`).
            ``live_loc`` compares with the unedited model's own answers, recorded by :meth:`Evaluator.reference`.
        live_max_new_tokens: the live decoding's budget of new tokens per prompt (WILD: 50); decoding stops
            earlier at the end of text, a line break or a sentence end.
        rome_scores: also compute ROME's CounterFact efficacy / paraphrase / neighbourhood scores and magnitudes.
        rome_length_normalized: ROME's P(target) is exp(mean token log-prob), as in ROME's code (True), or the
            joint probability exp(sum of token log-probs) (False).
        literature_metrics: also compute generation success and ROME's fluency (``edit/gen_efficacy``,
            ``edit/gen_paraphrase``, ``edit/fluency``; :mod:`eac_lightning.evaluation.literature_metrics`).
        fluency_prompts_per_edit: generation prompts per request that fluency samples from (None: all, as ROME).
        fluency_max_edits: fluency samples from at most this many of the evaluated edits, evenly spaced over the
            stream (None: every edit, as ROME). Fluency is a mean over texts, so a sample estimates it; on a long
            stream sampling 100 tokens per edit is most of an evaluation.
    """

    tasks: list[str] = field(default_factory=lambda: list(TASK_KEYS))
    limits: dict[str, int] = field(default_factory=dict)
    default_limit: int | None = 100
    start: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    batch_size: int = 32
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    classification_mode: str = "logits"
    probes: list[str] = field(default_factory=lambda: list(PROBE_KEYS))
    ppl_max_tokens: int = 4096
    ppl_window: int | None = None
    ppl_stride: int | None = None
    ppl_batch_size: int = 4
    wikitext_path: str | None = None
    edit_metrics: bool = True
    live_metrics: bool = True
    live_max_new_tokens: int = LIVE_MAX_NEW_TOKENS
    rome_scores: bool = True
    rome_length_normalized: bool = True
    literature_metrics: bool = True
    fluency_prompts_per_edit: int | None = 2
    fluency_max_edits: int | None = None

    def __post_init__(self) -> None:
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; known: {', '.join(TASK_KEYS)}")
        for p in self.probes:
            if p not in PROBE_KEYS:
                raise ValueError(f"unknown probe {p!r}; known: {', '.join(PROBE_KEYS)}")
        if self.classification_mode not in ("logits", "generate"):
            raise ValueError(f"classification_mode must be 'logits' or 'generate', got {self.classification_mode!r}")
        if self.batch_size < 1 or self.ppl_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.fluency_max_edits is not None:
            check("fluency_max_edits", self.fluency_max_edits, integer=True, positive=True)
        check("live_max_new_tokens", self.live_max_new_tokens, integer=True, positive=True)


class Evaluator:
    """Edit metrics, Table 4 tasks and probes for one model state, sharded over ``world_size`` ranks.

    Typical use in a sequential-editing loop::

        ev = Evaluator(EvaluatorConfig(default_limit=50), rank, world_size)
        ref = ev.reference(model, tok, requests)           # once, on the unedited model
        before = ev.evaluate(model, tok, retention_requests=probe_facts)
        ...apply edits 0..k...
        after = ev.evaluate(model, tok, requests[:k + 1], ref, retention_requests=probe_facts)
        print(format_table(after))
    """

    def __init__(self, config: EvaluatorConfig | None = None, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.config = config or EvaluatorConfig()
        self.rank = rank
        self.world_size = world_size
        self._examples: dict[str, list[TaskExample]] = {}
        self._warned_live_reference = False
        self.timings: dict[str, float] = {}
        """Seconds spent in each part of the last evaluation (not part of the results)."""

    # -- data ------------------------------------------------------------------------------------------------
    def examples(self, task: str) -> list[TaskExample]:
        """The task's validated examples after ``start`` and the limit (loaded once, then cached)."""
        if task not in self._examples:
            c = self.config
            self._examples[task] = load_task(task, c.sources.get(task), c.limits.get(task, c.default_limit),
                                             c.start.get(task, 0))
        return self._examples[task]

    # -- parts -----------------------------------------------------------------------------------------------
    def reference(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest]) -> dict[str, Any]:
        """The pre-edit locality reference of ``requests`` (call on the unedited model; keep and reuse it).

        Covers every request (not only this rank's), so the same dict serves any later evaluation whatever the
        world size. With ``live_metrics``, it also holds the unedited model's live answers to the neighbourhood
        prompts (``live``, what ``edit/live_loc`` compares with)."""
        c = self.config
        ref = compute_locality_reference(model, tok, requests, c.batch_size)
        if c.edit_metrics and c.live_metrics:
            ref.update(live_reference(model, tok, requests, c.live_max_new_tokens, c.batch_size))
        return ref

    def evaluate_edits(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest],
                       reference: dict[str, Any] | None) -> dict[str, float]:
        """``edit/*`` metrics of every request edited so far, measured on the current model (EAC Eqs. 10-12, and
        the live-decoding metrics with ``live_metrics``, :meth:`evaluate_live`)."""
        out = self._other_edit_metrics(model, tok, requests, reference)
        if self.config.live_metrics:
            out.update(self.evaluate_live(model, tok, requests, reference))
        return out

    def evaluate_live(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest],
                      reference: dict[str, Any] | None) -> dict[str, float]:
        """``edit/live_rel``, ``edit/live_gen``, ``edit/live_loc`` of every request edited so far (the WILD
        protocol, :mod:`eac_lightning.evaluation.live_metrics`); ``live_loc`` needs the live answers that
        :meth:`reference` records, and is left out (with a warning) when ``reference`` has none."""
        c = self.config
        if (reference is not None and "live" not in reference and not self._warned_live_reference
                and any(r.neighborhood_prompts for r in requests)):
            self._warned_live_reference = True
            warnings.warn("the locality reference holds no live answers of the unedited model (it was recorded "
                          "with live_metrics off): edit/live_loc is left out", stacklevel=2)
        res = live_edit_metrics(model, tok, shard(requests, self.rank, self.world_size), reference,
                                c.live_max_new_tokens, c.batch_size)
        return {f"edit/{k}": v for k, v in res.items()}

    def _other_edit_metrics(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest],
                        reference: dict[str, Any] | None) -> dict[str, float]:
        """The edit metrics other than the live ones: EAC Eqs. 10-12 and their variants, ROME's scores, generation
        success and fluency."""
        c = self.config
        res = evaluate_edit_metrics(model, tok, requests, reference, c.batch_size, self.rank, self.world_size,
                                    rome_scores=c.rome_scores, length_normalized=c.rome_length_normalized)
        if not any(is_counterfact(r) for r in requests):  # same decision on every rank: it reads all requests
            res = {k: v for k, v in res.items() if not k.startswith("rome_")}
        if c.literature_metrics:
            sampled = evenly_spaced(requests, c.fluency_max_edits)  # chosen from all, so any sharding agrees
            res.update(literature_metrics(model, tok, requests[self.rank::self.world_size], c.batch_size,
                                          fluency_prompts_per_edit=c.fluency_prompts_per_edit,
                                          fluency_requests=sampled[self.rank::self.world_size]))
        out = {f"edit/{k}": v for k, v in res.items()}
        out["edit/num_edits"] = float(len(requests))
        return out

    def evaluate(self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest] = (),
                 reference: dict[str, Any] | None = None,
                 retention_requests: Sequence[EditRequest] | None = None) -> dict[str, float]:
        """Everything configured, as one flat dict of floats (``edit/...``, ``general/...``).

        Args:
            requests: every request applied so far (sequential evaluation on the final model); empty before any
                edit, which skips the edit metrics.
            reference: :meth:`reference` of the unedited model (needed for locality when requests have
                neighbourhood prompts).
            retention_requests: unedited facts for the ``fact_retention`` probe (their ``target_true`` is the
                answer).
        """
        self.timings = {}
        if self.world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            warnings.warn(f"world_size={self.world_size} without an initialised torch.distributed process group: "
                          f"the results cover rank {self.rank}'s shard only", stacklevel=2)
        c = self.config
        parts: list[tuple[str, Callable[[], dict[str, float]]]] = []
        if c.edit_metrics and requests:
            parts.append(("edit_metrics", lambda: self._other_edit_metrics(model, tok, requests, reference)))
            if c.live_metrics:  # a part of its own, so that ``timings`` shows what live decoding costs
                parts.append(("live_metrics", lambda: self.evaluate_live(model, tok, requests, reference)))
        for task in c.tasks:
            parts.append((task, lambda task=task: {f"general/{task}": evaluate_task(
                task, model, tok, self.examples(task), c.batch_size, c.max_new_tokens.get(task),
                c.classification_mode, self.rank, self.world_size)}))
        if "fact_retention" in c.probes and retention_requests:
            parts.append(("fact_retention", lambda: {"general/fact_retention": fact_retention(
                model, tok, retention_requests, c.batch_size, self.rank, self.world_size)}))
        if "wikitext2_ppl" in c.probes:
            parts.append(("wikitext2_ppl", lambda: {"general/wikitext2_ppl": wikitext2_ppl(
                model, tok, c.wikitext_path, c.ppl_max_tokens, c.ppl_window, c.ppl_stride, c.ppl_batch_size,
                self.rank, self.world_size)}))
        out: dict[str, float] = {}
        with progress(total=len(parts), desc="evaluation", unit="part", leave=False,
                      disable=self.rank != 0 or not parts) as bar:
            for name, run in parts:
                bar.set_postfix_str(name)
                t0 = time.perf_counter()
                out.update(run())
                self.timings[name] = time.perf_counter() - t0
                bar.update()
        return out


def summary_sections(results: dict[str, float], before: dict[str, float] | None = None) -> dict[str, Any]:
    """The nested structure of ``summary.json`` from a flat result dict.

    Returns ``{"edit_metrics": {reliability, generalization, locality, live_rel, live_gen, live_loc},
    "edit_metrics_variants": {...other edit keys...}, "general": {rte, sst2, nq_open, samsum, fact_retention,
    wikitext2_ppl}}`` with the keys present in ``results``. With ``before`` (the pre-edit results), each general
    entry becomes ``{"before": b, "after": a}``.
    """
    edit = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith("edit/")}
    general_after = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith("general/")}
    headline = {k: edit[k] for k in SUMMARY_EDIT_KEYS if k in edit}
    variants = {k: v for k, v in edit.items() if k not in SUMMARY_EDIT_KEYS}
    ordered = [k for k in GENERAL_KEYS if k in general_after] + [k for k in general_after if k not in GENERAL_KEYS]
    if before is None:
        general: dict[str, Any] = {k: general_after[k] for k in ordered}
    else:
        general = {k: {"before": before.get(f"general/{k}", math.nan), "after": general_after[k]} for k in ordered}
    return {"edit_metrics": headline, "edit_metrics_variants": variants, "general": general}


def _fmt(key: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if key.endswith("ppl"):
        return f"{value:.2f}"
    if key.endswith("num_edits"):
        return f"{int(value)}"
    return f"{value:.4f}"


def format_table(results: dict[str, float], before: dict[str, float] | None = None) -> str:
    """A markdown table of a flat result dict (optionally with a ``before`` column), headline metrics first."""
    order = [f"edit/{k}" for k in SUMMARY_EDIT_KEYS] + [f"general/{k}" for k in GENERAL_KEYS]
    keys = [k for k in order if k in results] + sorted(k for k in results if k not in order)
    if before is None:
        lines = ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(k, results[k])} |" for k in keys]
    else:
        lines = ["| metric | before | after |", "|---|---:|---:|"]
        lines += [f"| {k} | {_fmt(k, before[k]) if k in before else ''} | {_fmt(k, results[k])} |" for k in keys]
    return "\n".join(lines)
