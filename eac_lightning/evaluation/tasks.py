"""The four general-ability tasks of the EAC paper (Appendix C.4) with the Table 4 prompts verbatim.

* ``rte`` — GLUE RTE, prompt ``NLI_PROMPT``; two-way accuracy, label 0 (entailment) -> "True".
* ``sst2`` — GLUE SST-2, prompt ``SENTIMENT_PROMPT``; two-way accuracy, label 1 -> "positive".
* ``nq_open`` — NQ-open, prompt ``QA_PROMPT`` (passage) or the question alone; exact match after SQuAD-style
  normalisation, maximum over the gold answers.
* ``samsum`` — SAMSum, prompt ``SUMMARIZATION_PROMPT``; mean of ROUGE-1, ROUGE-2 and ROUGE-L F.

Data is read with ``datasets`` from the offline data folder (:func:`eac_lightning.paths.data_dir`) by
default, or from any local file/folder, or from a hub dataset name (``"glue:rte"`` = name ``glue``, config
``rte``). Every row is validated before any model call: a missing column, an empty field or a label outside the
task's values raises :class:`TaskDataError` naming the file, the row and the field.

Choices (documented in docs/evaluation.md):

* Classification (RTE, SST-2) compares, by default, the log-probability of the two answer words after the prompt
  (``" True"``/``" False"``, ``" positive"``/``" negative"``, tokenised like edit targets) — batched teacher-forced
  scoring, no answer parsing. ``mode="generate"`` instead decodes greedily and counts a prediction right when the
  first word of the normalised output is the gold word (anything else is wrong).
* NQ-open has no passages; when a row has a passage field (``passage``/``document``/``context``) the Table 4
  passage prompt is used, otherwise the question alone (``{QUESTION}``), as PROVENANCE.md notes.
* Generated answers are read up to the first line break (first non-blank line), whitespace stripped.
* ROUGE uses ``rouge_score.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)``; the per-example score
  is the mean of the three F-measures, the task score the mean over examples. Scores are in [0, 1].
* A sample limit takes the first ``limit`` rows after an optional ``start`` offset (deterministic, no shuffling).
"""

from __future__ import annotations

import csv
import os
import re
import string
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from eac_lightning.evaluation.metrics import SumCountMetric, shard
from eac_lightning.evaluation.scoring import (
    greedy_generate,
    model_device,
    score_targets,
)
from eac_lightning.paths import data_dir, resolve_data_path

# --- Table 4 of the EAC paper, character for character -------------------------------------------------------
NLI_PROMPT = "{SENTENCE1} entails the {SENTENCE2}. True or False? answer:"
QA_PROMPT = "Refer to the passage below and answer the following question. Passage: {DOCUMENT} Question: {QUESTION}"
SUMMARIZATION_PROMPT = "{DIALOGUE} TL;DR:"
SENTIMENT_PROMPT = (
    "For each snippet of text, label the sentiment of the text as positive or negative. "
    "The answer should be exact 'positive' or 'negative'. text: {TEXT} answer:"
)
TABLE4_PROMPTS = {
    "NLI": NLI_PROMPT,
    "Open-domain QA": QA_PROMPT,
    "Summarization": SUMMARIZATION_PROMPT,
    "Sentiment analysis": SENTIMENT_PROMPT,
}
# Not in the paper: NQ-open ships no passages, so the offline QA prompt is the question alone (PROVENANCE.md).
QA_QUESTION_ONLY_PROMPT = "{QUESTION}"

TASK_KEYS = ("rte", "sst2", "nq_open", "samsum")
PASSAGE_FIELDS = ("passage", "document", "context")


class TaskDataError(ValueError):
    """A task data file that cannot be evaluated; the message names the file, the row and the field."""


def format_nli(sentence1: str, sentence2: str) -> str:
    return NLI_PROMPT.replace("{SENTENCE1}", sentence1).replace("{SENTENCE2}", sentence2)


def format_qa(question: str, passage: str | None = None) -> str:
    if passage:
        return QA_PROMPT.replace("{DOCUMENT}", passage).replace("{QUESTION}", question)
    return QA_QUESTION_ONLY_PROMPT.replace("{QUESTION}", question)


def format_summarization(dialogue: str) -> str:
    return SUMMARIZATION_PROMPT.replace("{DIALOGUE}", dialogue)


def format_sentiment(text: str) -> str:
    return SENTIMENT_PROMPT.replace("{TEXT}", text)


# --- scoring functions ----------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation (as in Chen et al. 2017 / Lee et al. 2019): lower case, drop punctuation, drop the
    articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


_ROUGE_SCORER = None


def rouge_mean(prediction: str, reference: str) -> float:
    """Mean of the ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score, Porter stemmer)."""
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = _ROUGE_SCORER.score(reference, prediction)  # rouge-score takes (target, prediction)
    return (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3.0


def first_line(text: str) -> str:
    """The first non-blank line of a generation, stripped (answers end at the first line break)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


# --- task definitions and loading -----------------------------------------------------------------------------


@dataclass
class TaskExample:
    """One evaluation example.

    Attributes:
        prompt: the Table 4 prompt filled with the example.
        answers: gold answers (classification: the gold answer word; QA: every accepted answer; summary: the
            reference summary).
        choices: the two answer words of a classification task (empty for generation tasks).
        source: the file (or hub dataset) it came from.
        row: its 0-based data row there.
    """

    prompt: str
    answers: list[str]
    choices: list[str] = field(default_factory=list)
    source: str = ""
    row: int = 0


@dataclass(frozen=True)
class TaskSpec:
    """How a task is read and scored.

    Attributes:
        key: task key (``rte``, ``sst2``, ``nq_open``, ``samsum``).
        local_path: default file under the offline data folder.
        hub: (name, config, split) used when a hub name is given without its own config.
        kind: ``classification`` or ``generation``.
        max_new_tokens: default generation budget.
        choices: the answer words of a classification task, in label order of ``label_map``'s values.
    """

    key: str
    local_path: str
    hub: tuple[str, str | None, str]
    kind: str
    max_new_tokens: int
    choices: tuple[str, ...] = ()


TASKS: dict[str, TaskSpec] = {
    "rte": TaskSpec("rte", "rte/dev.tsv", ("glue", "rte", "validation"), "classification", 3, ("True", "False")),
    "sst2": TaskSpec("sst2", "sst2/dev.tsv", ("glue", "sst2", "validation"), "classification", 3,
                     ("positive", "negative")),
    "nq_open": TaskSpec("nq_open", "nq_open/NQ-open.dev.jsonl", ("nq_open", None, "validation"), "generation", 16),
    "samsum": TaskSpec("samsum", "samsum/test.jsonl", ("samsum", None, "test"), "generation", 64),
}

# Label values accepted per task -> answer word. RTE: 0 = entailment -> "True" (GLUE's label order, and the
# string labels of the original GLUE TSVs). SST-2: 1 = positive.
LABEL_WORDS: dict[str, dict[Any, str]] = {
    "rte": {0: "True", 1: "False", "0": "True", "1": "False", "entailment": "True", "not_entailment": "False"},
    "sst2": {1: "positive", 0: "negative", "1": "positive", "0": "negative"},
}


def _read_rows(source: str | os.PathLike, spec: TaskSpec, split: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Rows of a local TSV/CSV/JSON(L) file (or the single data file in a folder) or of a hub dataset."""
    import datasets

    path = resolve_data_path(source)
    if path.exists():
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".tsv", ".csv", ".json", ".jsonl"))
            if len(files) != 1:
                raise TaskDataError(f"{path}: expected one .tsv/.csv/.json/.jsonl data file, found {len(files)}")
            path = files[0]
        try:
            if path.suffix in (".tsv", ".csv"):
                # GLUE TSVs are not quoted (SST-2 text holds bare quote characters): quoting off; na_filter off
                # keeps literal strings such as "NA" and leaves empty cells as "" for the empty-field check.
                ds = datasets.load_dataset(
                    "csv", data_files=str(path), split="train", delimiter="\t" if path.suffix == ".tsv" else ",",
                    quoting=csv.QUOTE_NONE, na_filter=False,
                )
            else:
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as err:  # datasets wraps pandas/arrow parse errors in several types
            raise TaskDataError(f"{path}: cannot be read as a {spec.key} data file ({err})") from err
        return str(path), [dict(r) for r in ds]
    name, _, config = str(source).partition(":")
    hub_name, hub_config, hub_split = spec.hub
    if config == "" and name == hub_name:
        config = hub_config or ""
    ds = datasets.load_dataset(name, config or None, split=split or hub_split)
    return str(source), [dict(r) for r in ds]


def _field(rows: list[dict[str, Any]], i: int, where: str, names: Sequence[str], required: bool = True) -> Any:
    row = rows[i]
    for n in names:
        if n in row:
            value = row[n]
            if value is None or (isinstance(value, str) and not value.strip()):
                raise TaskDataError(f"{where} row {i}: field '{n}' is empty or missing")
            if isinstance(value, list) and not [v for v in value if isinstance(v, str) and v.strip()]:
                raise TaskDataError(f"{where} row {i}: field '{n}' has no non-empty answer")
            return value
    if required:
        raise TaskDataError(f"{where} row {i}: missing field '{names[0]}' (columns: {sorted(row)})")
    return None


def _label(rows: list[dict[str, Any]], i: int, where: str, task: str) -> str:
    value = _field(rows, i, where, ["label"])
    key = value.strip() if isinstance(value, str) else value
    if isinstance(key, float) and key.is_integer():
        key = int(key)
    if isinstance(key, bool) or key not in LABEL_WORDS[task]:
        allowed = sorted({str(k) for k in LABEL_WORDS[task]})
        raise TaskDataError(f"{where} row {i}: field 'label' has wrong value {value!r} (allowed: {', '.join(allowed)})")
    return LABEL_WORDS[task][key]


def _examples(task: str, where: str, rows: list[dict[str, Any]]) -> list[TaskExample]:
    out: list[TaskExample] = []
    for i in range(len(rows)):
        if task == "rte":
            s1 = str(_field(rows, i, where, ["sentence1"])).strip()
            s2 = str(_field(rows, i, where, ["sentence2"])).strip()
            out.append(TaskExample(format_nli(s1, s2), [_label(rows, i, where, task)], ["True", "False"], where, i))
        elif task == "sst2":
            text = str(_field(rows, i, where, ["text", "sentence"])).strip()
            out.append(TaskExample(format_sentiment(text), [_label(rows, i, where, task)], ["positive", "negative"],
                                   where, i))
        elif task == "nq_open":
            q = str(_field(rows, i, where, ["question"])).strip()
            ans = _field(rows, i, where, ["answer", "answers"])
            ans = [ans] if isinstance(ans, str) else [str(a).strip() for a in ans if isinstance(a, str) and a.strip()]
            passage = _field(rows, i, where, PASSAGE_FIELDS, required=False)
            out.append(TaskExample(format_qa(q, str(passage).strip() if passage else None), ans, [], where, i))
        elif task == "samsum":
            dialogue = str(_field(rows, i, where, ["dialogue"])).strip()
            summary = str(_field(rows, i, where, ["summary"])).strip()
            out.append(TaskExample(format_summarization(dialogue), [summary], [], where, i))
        else:
            raise KeyError(task)
    return out


def load_task(task: str, source: str | os.PathLike | None = None, limit: int | None = None, start: int = 0,
              split: str | None = None) -> list[TaskExample]:
    """Load and validate a task's examples.

    Args:
        task: one of :data:`TASK_KEYS`.
        source: a file or folder (relative paths are also tried under the offline data folder) or a hub dataset
            name, optionally ``name:config``; default: the offline file under ``data_dir()``.
        limit: keep at most this many examples (the first ones after ``start``); ``None`` keeps all.
        start: skip this many rows first (e.g. the rows a testbed was trained on).
        split: hub split (default: the task's evaluation split).

    Every row of the file is validated (not only the kept ones), so a broken file fails whatever the limit.
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASK_KEYS)}")
    spec = TASKS[task]
    src = source if source is not None else data_dir() / spec.local_path
    where, rows = _read_rows(src, spec, split)
    if not rows:
        raise TaskDataError(f"{where}: no rows")
    examples = _examples(task, where, rows)[start:]
    return examples if limit is None else examples[:limit]


# --- running a task -------------------------------------------------------------------------------------------


def classify(model: torch.nn.Module, tok: Any, examples: Sequence[TaskExample], batch_size: int = 16,
             mode: str = "logits", max_new_tokens: int = 3) -> list[str]:
    """Predicted answer word of each classification example.

    ``logits``: the choice with the highest summed log-probability of its tokens (``" " + word``) after the prompt.
    ``generate``: greedy decoding; the first word of the normalised output if it is a choice, else ``""``.
    """
    if not examples:
        return []
    if mode == "logits":
        prompts = [ex.prompt for ex in examples for _ in ex.choices]
        words = [c for ex in examples for c in ex.choices]
        scores = score_targets(model, tok, prompts, words, batch_size)
        out, k = [], 0
        for ex in examples:
            sub = scores[k:k + len(ex.choices)]
            k += len(ex.choices)
            best = max(range(len(sub)), key=lambda j: sub[j].sum_logprob)
            out.append(ex.choices[best])
        return out
    if mode == "generate":
        gens = greedy_generate(model, tok, [ex.prompt for ex in examples], max_new_tokens, batch_size,
                               stop_at_newline=True)
        out = []
        for ex, g in zip(examples, gens):
            words = normalize_answer(first_line(tok.decode(g, skip_special_tokens=True))).split()
            first = words[0] if words else ""
            out.append(next((c for c in ex.choices if c.lower() == first), ""))
        return out
    raise ValueError(f"classification mode must be 'logits' or 'generate', got {mode!r}")


def generate_answers(model: torch.nn.Module, tok: Any, examples: Sequence[TaskExample], batch_size: int = 16,
                     max_new_tokens: int = 16) -> list[str]:
    """Batched greedy generation (left padding), each answer read up to its first line break."""
    gens = greedy_generate(model, tok, [ex.prompt for ex in examples], max_new_tokens, batch_size,
                           stop_at_newline=True)
    return [first_line(tok.decode(g, skip_special_tokens=True)) for g in gens]


def example_scores(task: str, model: torch.nn.Module, tok: Any, examples: Sequence[TaskExample],
                   batch_size: int = 16, max_new_tokens: int | None = None, mode: str = "logits") -> list[float]:
    """Per-example scores of ``task``: 0/1 accuracy (rte, sst2), 0/1 exact match (nq_open), ROUGE mean (samsum)."""
    spec = TASKS[task]
    budget = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
    if spec.kind == "classification":
        preds = classify(model, tok, examples, batch_size, mode, budget)
        return [float(p == ex.answers[0]) for p, ex in zip(preds, examples)]
    preds = generate_answers(model, tok, examples, batch_size, budget)
    if task == "nq_open":
        return [exact_match(p, ex.answers) for p, ex in zip(preds, examples)]
    return [rouge_mean(p, ex.answers[0]) for p, ex in zip(preds, examples)]


def evaluate_task(task: str, model: torch.nn.Module, tok: Any, examples: Sequence[TaskExample],
                  batch_size: int = 16, max_new_tokens: int | None = None, mode: str = "logits", rank: int = 0,
                  world_size: int = 1) -> float:
    """A task's score over ``examples``: this rank scores ``i % world_size == rank`` and the sum/count states are
    reduced across ranks by ``compute()`` under DDP."""
    metric = SumCountMetric().to(model_device(model))
    metric.update(example_scores(task, model, tok, shard(examples, rank, world_size), batch_size, max_new_tokens,
                                 mode))
    return float(metric.compute())


__all__ = [
    "NLI_PROMPT", "QA_PROMPT", "QA_QUESTION_ONLY_PROMPT", "SUMMARIZATION_PROMPT", "SENTIMENT_PROMPT",
    "TABLE4_PROMPTS", "TASK_KEYS", "TASKS", "TaskDataError", "TaskExample", "TaskSpec", "load_task",
    "normalize_answer", "exact_match", "rouge_mean", "first_line", "classify", "generate_answers",
    "example_scores", "evaluate_task", "LABEL_WORDS", "format_nli", "format_qa", "format_summarization", "format_sentiment",
]
