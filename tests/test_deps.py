"""The project at whatever end of its dependency ranges is installed: no deprecated call, no tokenizer noise.

A deprecation that transformers raises because of a call of ours is raised inside transformers (pyproject's
module-filtered ``error::...:eac_lightning`` entries do not see it), and some reach the user as log lines rather
than warnings. So these tests record every warning and every transformers log line around the calls and assert that
none is a deprecation or a "will result in indexing errors" (scripts/check_deps.sh runs them at the lower bounds).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, make_tiny_model

from eac_lightning.evaluation import scoring
from eac_lightning.evaluation.edit_metrics import compute_locality_reference
from eac_lightning.evaluation.probes import wikitext2_tokens
from eac_lightning.models.encoding import encode_long, encode_prompts

REPO = Path(__file__).resolve().parents[1]

LONG = " ".join(["The Eiffel Tower is located in Paris ."] * 60)  # ~ 480 tokens of the test tokenizer


class _Log(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def watched():
    """Every warning (each time raised) and every transformers log line of the block."""
    log = _Log()
    logger = logging.getLogger("transformers")
    logger.addHandler(log)
    once = getattr(logging.Logger, "warning_once", None)  # transformers logs some deprecations once per process
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught, log.messages
    finally:
        logger.removeHandler(log)


def deprecations(caught, messages) -> list[str]:
    out = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
           if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))]
    return out + [m for m in messages if "deprecat" in m.lower() or "indexing errors" in m]


def test_cached_scoring_and_decoding_make_no_deprecated_call(tokenizer):
    """Every path of the scoring engine that runs a KV cache: shared prompts with continuations on copied cache
    rows, greedy decoding, and the locality reference's prompt-pass hook."""
    from eac_lightning.data.requests import EditRequest

    model = make_tiny_model("gpt2", len(tokenizer))
    prompts = ["The Eiffel Tower is located in", "Rome is the capital of", "The Eiffel Tower is located in"]
    targets = ["Paris . Danielle", "Italy", "Africa . Angola"]
    request = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome",
                          target_true="Paris", neighborhood_prompts=["Angola is located in"],
                          neighborhood_answers=["Africa . Rome"])
    with watched() as (caught, messages):
        shared = scoring.score_targets(model, tokenizer, prompts, targets)
        scoring.greedy_generate(model, tokenizer, prompts, 5)
        compute_locality_reference(model, tokenizer, [request])
    assert deprecations(caught, messages) == []
    full = scoring.score_targets(model, tokenizer, prompts, targets, share_prompts=False)
    for a, b in zip(shared, full):
        assert a.pred == b.pred and a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_returns_its_cache_under_the_name_it_takes(family, tokenizer):
    """The cache comes back under the name the installed transformers uses, no deprecated alias is read, and a
    plain DynamicCache can be copied row by row (the shared-prompt fast path, not the fallback)."""
    model = make_tiny_model(family, len(tokenizer))
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with watched() as (caught, messages):
        out, _ = scoring.forward(model, ids, torch.ones_like(ids), use_cache=True)
        cache = scoring.output_cache(model, out)
        copy = scoring.select_cache(cache, torch.tensor([1, 1, 0]))
        if copy is not None:
            scoring.continue_on_cache(model, copy, torch.ones(3, 3, dtype=torch.long), [[7], [8, 9], [10]], 0,
                                      torch.device("cpu"))
    assert cache is not None
    assert deprecations(caught, messages) == []
    from transformers.cache_utils import DynamicCache

    if type(cache) is DynamicCache and not any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        assert copy is not None


def test_long_texts_tokenise_without_the_length_warning(tokenizer):
    """A prompt the scoring engine will cut, or a text cut into windows, is longer than the tokenizer's
    model_max_length on purpose: no "will result in indexing errors"."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()),
                                  eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token, model_max_length=64)
    with watched() as (caught, messages):
        (ids,) = encode_prompts(tok, [LONG])
        (long_ids,) = encode_long(tok, [LONG])
        text = wikitext2_tokens(tok, max_tokens=300)
    assert len(ids) > 64 and long_ids == ids
    assert len(text) == 300
    assert [m for m in messages if "indexing errors" in m] == []
    assert deprecations(caught, messages) == []
    # what the tokenizer itself says about the same text, for comparison: the check the calls above leave out
    with watched() as (_, messages):
        tok(LONG)
    assert any("indexing errors" in m for m in messages)


def test_prompts_cut_to_the_context_are_scored_and_reported_once(tokenizer, monkeypatch):
    """A prompt longer than the model's context is cut from the left (said once per process), also beside rows
    whose longer continuation or decoding runs past its own end (their padding must stay within the positions)."""
    monkeypatch.setattr(scoring, "_CUT_NOTED", False)
    model = make_tiny_model("gpt2", len(tokenizer))  # 128 positions
    prompts = [LONG, LONG, "Rome is the capital of"]
    targets = ["Paris", "Paris . Danielle", "Italy . Rome is the capital of Italy"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shared = scoring.score_targets(model, tokenizer, prompts, targets)
        full = scoring.score_targets(model, tokenizer, prompts, targets, share_prompts=False)
        gens = scoring.greedy_generate(model, tokenizer, [LONG, "Rome is the capital of"], [2, 8], stop_at_eos=False)
    notes = [str(w.message) for w in caught if "cut from the left" in str(w.message)]
    assert len(notes) == 1 and notes[0].startswith("1 of 2 prompts")
    for a, b in zip(shared, full):
        assert a.pred == b.pred and a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert [len(g) for g in gens] == [2, 8]
    (alone,) = scoring.greedy_generate(model, tokenizer, [LONG], 2, stop_at_eos=False)
    assert gens[0] == alone


@pytest.mark.slow
def test_a_quickstart_fit_prints_no_deprecation_and_no_length_warning(tmp_path):
    """The README's main job, 3 edits on testbed:tiny, through scripts/audit_warnings.py: it must finish, with no
    FutureWarning or DeprecationWarning of ours, no transformers deprecation and no "indexing errors"."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "audit_warnings.py"), "fit", "--config", "configs/quickstart.yaml",
         "--model.model", "testbed:tiny", "--data.num_edits", "3", "--model.stats_tokens", "20000",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "audit: 0 forbidden warning(s)" in proc.stderr
    assert "indexing errors" not in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "summary.json").exists()
