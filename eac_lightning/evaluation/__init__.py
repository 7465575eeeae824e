"""Evaluation: the batched scoring engine (``scoring``), the torchmetrics states (``metrics``), the edit metrics
(EAC Eqs. 10-12, ROME's CounterFact scores, the live-decoding metrics of the WILD protocol), the Table 4
general-ability tasks, the fact-retention and WikiText-2 perplexity probes, and the sharded :class:`Evaluator` that
runs them all."""

from eac_lightning.evaluation.edit_metrics import (
    EditMetrics,
    compute_locality_reference,
    evaluate_edit_metrics,
)
from eac_lightning.evaluation.evaluator import (
    Evaluator,
    EvaluatorConfig,
    format_table,
    summary_sections,
)
from eac_lightning.evaluation.live_metrics import (
    LIVE_KEYS,
    live_answer,
    live_edit_metrics,
    live_reference,
)
from eac_lightning.evaluation.metrics import (
    Generalization,
    Locality,
    Perplexity,
    ProbabilityComparison,
    Reliability,
    SumCountMetric,
    TokenAgreement,
)
from eac_lightning.evaluation.probes import fact_retention, known_facts, wikitext2_ppl
from eac_lightning.evaluation.scoring import TargetScore, greedy_generate, score_targets
from eac_lightning.evaluation.tasks import (
    TABLE4_PROMPTS,
    TASK_KEYS,
    TaskDataError,
    TaskExample,
    evaluate_task,
    exact_match,
    load_task,
    normalize_answer,
    rouge_mean,
)

__all__ = [
    "EditMetrics", "Generalization", "Locality", "ProbabilityComparison", "Reliability", "SumCountMetric",
    "TargetScore", "TokenAgreement", "compute_locality_reference", "evaluate_edit_metrics", "greedy_generate",
    "score_targets", "Evaluator", "EvaluatorConfig", "format_table", "summary_sections", "Perplexity",
    "fact_retention", "known_facts", "wikitext2_ppl", "TABLE4_PROMPTS", "TASK_KEYS", "TaskDataError", "TaskExample",
    "evaluate_task", "exact_match", "load_task", "normalize_answer", "rouge_mean", "LIVE_KEYS", "live_answer",
    "live_edit_metrics", "live_reference",
]
