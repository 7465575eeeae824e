"""The literature's edit metrics beside ours: ROME's n-gram entropy on hand-built texts, whole-word generation
success, seeded sampling, and their place in the evaluator's results."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model

from eac_lightning.data.requests import EditRequest
from eac_lightning.evaluation import Evaluator, EvaluatorConfig, summary_sections
from eac_lightning.evaluation import literature_metrics as literature_metrics_module
from eac_lightning.evaluation.literature_metrics import (
    evenly_spaced,
    literature_metrics,
    ngram_entropy,
    produces,
    sample_texts,
)


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return make_tiny_model("gpt2", len(tokenizer), seed=3)


def test_ngram_entropy_of_hand_built_texts():
    # words a b a b: bigrams ab, ba, ab (H₂ = h(1/3)), trigrams aba, bab (H₃ = 1 bit)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("the the the the the") == 0.0  # a degenerate repetition has no entropy
    varied = "Paris is the capital of France and home to the Louvre museum ."
    assert ngram_entropy(varied) > ngram_entropy("Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris")
    assert math.isnan(ngram_entropy("two words"))  # no trigram


def test_produces_matches_whole_normalised_words():
    assert produces(" the city of Rome, in Italy", "Rome")
    assert produces(" New York City", "new york")
    assert not produces(" Romeo and Juliet", "Rome")
    assert not produces(" Paris", "Rome")


def test_generation_success_counts_what_greedy_decoding_produces(gpt2, tokenizer, monkeypatch):
    """Hand-built continuations (greedy decoding replaced): the rewrite prompt produces the object in a phrase, one
    paraphrase produces it, the other produces another city."""
    said = {"The Eiffel Tower is located in": " the city of Rome , Italy", "The Eiffel Tower is in": " Rome",
            "The Eiffel Tower stands in": " Paris"}
    asked = []

    def fake_greedy(model, tok, prompts, limits, batch_size, stop_at_eos):
        asked.extend(zip(prompts, limits))
        return [tok(said[p], add_special_tokens=False)["input_ids"] for p in prompts]

    monkeypatch.setattr("eac_lightning.evaluation.literature_metrics.greedy_generate", fake_greedy)
    req = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome",
                      paraphrase_prompts=["The Eiffel Tower is in", "The Eiffel Tower stands in"],
                      source="test", source_index=0)
    res = literature_metrics(gpt2, tokenizer, [req], extra_tokens=5, fluency_length=24)
    assert res["gen_efficacy"] == 1.0 and res["gen_paraphrase"] == 0.5
    n_target = len(tokenizer(" Rome", add_special_tokens=False)["input_ids"])
    assert sorted(asked) == sorted((p, n_target + 5) for p in said)  # a few tokens beyond the target's own
    assert 0 <= res["fluency"] < 10


def test_sampled_texts_are_seeded_and_bounded(gpt2, tokenizer):
    prompts = ["The Eiffel Tower is", "Danielle Darrieux speaks", "Toko Yasuda plays the guitar and"]
    state = torch.get_rng_state()
    a = sample_texts(gpt2, tokenizer, prompts, max_length=20, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    assert a == sample_texts(gpt2, tokenizer, prompts, max_length=20, batch_size=2)
    assert a != sample_texts(gpt2, tokenizer, prompts, max_length=20, batch_size=2, seed=1)
    short = sample_texts(gpt2, tokenizer, prompts, max_length=8, batch_size=2)
    for p, t, s in zip(prompts, a, short):
        assert t.startswith(p) and s.startswith(p) and len(s) < len(t)  # prompt included; length counts it


def test_evaluator_reports_the_literature_metrics_among_the_edit_variants(gpt2, tokenizer):
    req = EditRequest(prompt="{} speaks", subject="Danielle Darrieux", target_new="English", target_true="French",
                      paraphrase_prompts=["Danielle Darrieux is a speaker of"],
                      generation_prompts=["Danielle Darrieux was born in", "Danielle Darrieux is known for"],
                      source="test", source_index=0)
    on = Evaluator(EvaluatorConfig(tasks=[], probes=[])).evaluate(gpt2, tokenizer, [req], {"argmax": {}})
    assert {"edit/gen_efficacy", "edit/gen_paraphrase", "edit/fluency"} <= set(on)
    assert set(summary_sections(on)["edit_metrics_variants"]) >= {"gen_efficacy", "gen_paraphrase", "fluency"}
    off = Evaluator(EvaluatorConfig(tasks=[], probes=[], literature_metrics=False)).evaluate(
        gpt2, tokenizer, [req], {"argmax": {}})
    assert not any(k in off for k in ("edit/gen_efficacy", "edit/fluency"))
    for k, v in off.items():  # our own metrics are unchanged by the flag
        assert v == on[k] or (math.isnan(v) and math.isnan(on[k])), k


def test_fluency_samples_evenly_spaced_edits_while_generation_success_covers_every_edit(gpt2, tokenizer,
                                                                                       monkeypatch):
    reqs = [EditRequest(prompt="{} speaks", subject=f"Person {i}", target_new="English",
                        generation_prompts=[f"Person {i} was born in"], source="test", source_index=i)
            for i in range(7)]
    sampled: list[str] = []
    real_sample = literature_metrics_module.sample_texts

    def spy(model, tok, prompts, *args, **kwargs):
        sampled.extend(prompts)
        return real_sample(model, tok, prompts, *args, **kwargs)

    monkeypatch.setattr(literature_metrics_module, "sample_texts", spy)
    config = EvaluatorConfig(tasks=[], probes=[], rome_scores=False, fluency_max_edits=3)
    res = Evaluator(config).evaluate(gpt2, tokenizer, reqs, {"argmax": {}})
    assert sampled == ["Person 0 was born in", "Person 2 was born in", "Person 4 was born in"]
    assert res["edit/num_edits"] == 7.0 and 0 <= res["edit/gen_efficacy"] <= 1
    assert evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7] and evenly_spaced([1, 2], 5) == [1, 2]
    with pytest.raises(ValueError, match="fluency_max_edits"):
        EvaluatorConfig(fluency_max_edits=0)
