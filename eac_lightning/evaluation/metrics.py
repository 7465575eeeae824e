"""The metric states of the evaluation, as torchmetrics: sums and counts that ``compute()`` reduces across ranks.

Every metric keeps float64 sum/count states with ``dist_reduce_fx="sum"``, so under DDP each rank scores its own
share of the examples (:func:`shard`: ``i % world_size == rank``) and ``compute()`` returns the global value.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def shard(items: Sequence[Any], rank: int = 0, world_size: int = 1) -> list[Any]:
    """The items of this rank: those with index ``i % world_size == rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return [x for i, x in enumerate(items) if i % world_size == rank]


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


class Perplexity(SumCountMetric):
    """exp(summed token NLL / token count), with both sums reduced across ranks under DDP.
    ``update(nll_sum, n_tokens)``."""

    higher_is_better = False

    def update(self, nll_sum: float | Tensor, n_tokens: int | Tensor) -> None:  # type: ignore[override]
        self.total += torch.as_tensor(nll_sum, dtype=torch.float64, device=self.total.device)
        self.count += torch.as_tensor(n_tokens, dtype=torch.float64, device=self.count.device)

    def compute(self) -> Tensor:  # type: ignore[override]
        return torch.exp(super().compute())
