"""Argument checks with messages that name the argument, and the limits a record must fit in a model.

Hyper-parameter dataclasses call :func:`check` from ``__post_init__``, so a bad value (``lr: inf``, ``gamma:
101``) is refused when the config is parsed, before any model is loaded.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def check(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False, finite: bool = True,
          low: float | None = None, high: float | None = None, integer: bool = False,
          low_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a number meeting every given bound.

    ``low``/``high`` are inclusive unless ``low_open`` (then ``value > low``)."""
    if value is None:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if low is not None and not (value > low if low_open else value >= low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and not value <= high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def validate_module_args(stats_tokens: int, stats_damping: float) -> None:
    check("model.stats_tokens", stats_tokens, positive=True, integer=True)
    check("model.stats_damping", stats_damping, nonnegative=True)


def context_limit(lm: Any) -> int | None:
    """The most tokens the model takes in one sequence (``None``: no fixed limit)."""
    cfg = lm.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def longest_template(tok: Any, method: Any) -> str:
    """The method's context template with the most tokens (``"{}"`` when it has none): the prefix every
    prompt gets in the target optimisation (EAC App. B Eq. 8-9)."""
    templates: Sequence[str] = getattr(method, "templates", None) or ["{}"]
    return max(templates, key=lambda t: len(tok(t.replace("{}", ""), add_special_tokens=False)["input_ids"]))
