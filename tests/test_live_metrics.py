"""Live-decoding edit metrics (the WILD protocol): the answer rules, exact match after SQuAD normalisation, batched
decoding equal to one prompt at a time, and on testbed:tiny an edit the model now says against a target that only
teacher forcing reaches."""

from __future__ import annotations

import pytest

from eac_lightning.data.requests import EditRequest
from eac_lightning.evaluation import Evaluator, EvaluatorConfig, summary_sections
from eac_lightning.evaluation.live_metrics import (
    LIVE_MAX_NEW_TOKENS,
    answer_complete,
    decode_answers,
    live_answer,
    live_edit_metrics,
    live_reference,
    same_answer,
)
from eac_lightning.evaluation.scoring import greedy_generate

EDIT_ONLY = dict(tasks=[], probes=[], literature_metrics=False, rome_scores=False)


@pytest.fixture(scope="module")
def tiny(tiny_testbed):
    from eac_lightning.models.loading import load_model

    return load_model(str(tiny_testbed))


@pytest.fixture(scope="module")
def known(tiny):
    """The first shipped CounterFact records: facts testbed:tiny was trained on."""
    from eac_lightning.data.sources import load_requests
    from eac_lightning.paths import data_dir

    return load_requests(data_dir() / "counterfact", limit=6)


@pytest.mark.parametrize("text, answer", [
    (" Africa.\nWhat is the name of", "Africa"),           # the testbed's own shape: answer, full stop, next fact
    ("\n\n  Paris, France. It is", "Paris, France"),       # leading blank lines skipped
    (" 29.2 points. The", "29.2 points"),                  # a decimal point is no sentence end
    (" Will.i.am", "Will.i.am"),                           # ... nor a full stop inside a word
    (" Washington, D.C.", "Washington, D.C"),              # a full stop at the end of the text ends the answer
    (" St. Louis", "St"),                                  # a full stop before a space does (as WILD's stop at ".")
    (" the violin and the piano", "the violin and the piano"),  # no stop: the whole budget is the answer
    ("", ""),
])
def test_the_answer_is_the_first_line_up_to_a_sentence_end(text, answer):
    assert live_answer(text) == answer


def test_decoding_stops_at_a_line_break_or_a_full_stop_followed_by_whitespace():
    assert answer_complete(" Africa.\n") and answer_complete(" Africa. It") and answer_complete(" Africa\n")
    assert not answer_complete(" Africa.")  # the next token decides: "Africa." or "29.2"
    assert not answer_complete(" 29.2") and not answer_complete("\n\n Africa")  # leading blank lines are no end


@pytest.mark.parametrize("prediction, target, same", [
    ("The Violin", "violin", True),           # case and the article
    ("violin!", "Violin", True),              # punctuation
    ("  New   York ", "new york", True),      # whitespace collapsed
    ("an apple", "apple", True),
    ("Washington, D.C", "Washington, D.C.", True),
    ("Theatre", "the atre", False),           # articles only as whole words
    ("Paris, France", "Paris", False),        # exact match: more words are wrong
    ("violins", "violin", False),
    ("", "violin", False),
])
def test_exact_match_after_squad_normalisation(prediction, target, same):
    assert same_answer(prediction, target) is same


def test_batched_decoding_equals_one_prompt_at_a_time(tiny, known, tiny_gpt2, tokenizer):
    model, tok = tiny
    prompts = [p for r in known for p in [r.prompt_text, *r.paraphrase_prompts, *r.neighborhood_prompts[:2]]]
    one = greedy_generate(model, tok, prompts, LIVE_MAX_NEW_TOKENS, batch_size=1, stop_when=answer_complete)
    many = greedy_generate(model, tok, prompts, LIVE_MAX_NEW_TOKENS, batch_size=7, stop_when=answer_complete)
    assert one == many
    assert max(map(len, one)) < LIVE_MAX_NEW_TOKENS  # the testbed ends its answers: rows stop early
    assert decode_answers(model, tok, prompts, batch_size=1) == decode_answers(model, tok, prompts, batch_size=7)
    # A random model rarely stops: rows run to the budget, batched still equals one at a time.
    rand = ["The Eiffel Tower is located in", "Toko Yasuda plays the", "Rome is the capital of Italy ."]
    assert (greedy_generate(tiny_gpt2, tokenizer, rand, 12, batch_size=1, stop_when=answer_complete)
            == greedy_generate(tiny_gpt2, tokenizer, rand, 12, batch_size=3, stop_when=answer_complete))


def test_the_rule_stops_decoding_where_the_answer_ends(tiny):
    model, tok = tiny
    (ids,) = greedy_generate(model, tok, ["Angola is located in"], LIVE_MAX_NEW_TOKENS, stop_when=answer_complete)
    text = tok.decode(ids)
    assert live_answer(text) == "Africa" and answer_complete(text)
    assert not answer_complete(tok.decode(ids[:-1]))  # it stopped at the first token that completed the answer


def test_a_target_only_teacher_forcing_reaches_scores_zero_live(tiny, known):
    """testbed:tiny says "Africa" after "Angola is located in": the multi-token target "Africa Minor" gets its first
    token right under teacher forcing (token accuracy > 0), but decoding ends the answer after "Africa"."""
    model, tok = tiny
    angola = known[0]
    assert angola.prompt_text == "Angola is located in"
    target = "Africa Minor"
    assert tok(" " + target, add_special_tokens=False)["input_ids"][0] == tok(" Africa", add_special_tokens=False)[
        "input_ids"][0]
    req = EditRequest(prompt=angola.prompt, subject=angola.subject, target_new=target, source="test", source_index=0)
    ev = Evaluator(EvaluatorConfig(**EDIT_ONLY))
    res = ev.evaluate(model, tok, [req], ev.reference(model, tok, [req]))
    assert res["edit/reliability"] > 0 and res["edit/live_rel"] == 0.0
    said = EditRequest(prompt=angola.prompt, subject=angola.subject, target_new="Africa", source="test",
                       source_index=1)
    assert live_edit_metrics(model, tok, [said], None)["live_rel"] == 1.0


def test_an_edited_fact_the_model_now_says_counts_live(tiny_testbed, known):
    """ROME (testbed:tiny's measured settings) writes "Angola is located in Antarctica": the edited model decodes
    "Antarctica" on its own, so live_rel is 1 for it; before the edit it said "Africa" (live_rel 0)."""
    from eac_lightning.editor import Editor

    editor = Editor.load(str(tiny_testbed), "rome", num_tokens=4096)
    model, tok = editor.model, editor.tokenizer
    req = known[0]
    assert req.target_new == "Antarctica"
    ev = Evaluator(EvaluatorConfig(**EDIT_ONLY))
    ref = ev.reference(model, tok, [req])
    before = ev.evaluate(model, tok, [req], ref)
    assert before["edit/live_rel"] == 0.0 and before["edit/live_loc"] == 1.0  # unedited: its own answers
    editor.edit(req)
    assert decode_answers(model, tok, [req.prompt_text])[req.prompt_text] == "Antarctica"
    after = ev.evaluate(model, tok, [req], ref)
    assert after["edit/live_rel"] == 1.0
    assert 0.0 <= after["edit/live_loc"] <= 1.0 and 0.0 <= after["edit/live_gen"] <= 1.0
    summary = summary_sections(after)["edit_metrics"]
    assert list(summary) == ["reliability", "generalization", "locality", "live_rel", "live_gen", "live_loc"]


def test_live_locality_compares_with_the_unedited_models_own_answers(tiny, known):
    model, tok = tiny
    ref = live_reference(model, tok, known[:2])
    assert ref["live_max_new_tokens"] == LIVE_MAX_NEW_TOKENS
    res = live_edit_metrics(model, tok, known[:2], ref)
    assert res["live_loc"] == 1.0  # the same model: every answer kept, whether or not it is the dataset's
    wrong = {**ref, "live": {k: "something else" for k in ref["live"]}}
    assert live_edit_metrics(model, tok, known[:2], wrong)["live_loc"] == 0.0
    assert "live_loc" not in live_edit_metrics(model, tok, known[:2], {"argmax": {}})  # no live answers: left out
    with pytest.raises(KeyError, match="row 0, case_id 20952.*no pre-edit live answer"):
        live_edit_metrics(model, tok, known[:2], {**ref, "live": {}})
    with pytest.raises(ValueError, match="at most 50 new tokens, this evaluation decodes 8"):
        live_edit_metrics(model, tok, known[:2], ref, max_new_tokens=8)


def test_the_evaluator_switch_and_a_reference_without_live_answers(tiny, known):
    model, tok = tiny
    off = Evaluator(EvaluatorConfig(**EDIT_ONLY, live_metrics=False))
    ref = off.reference(model, tok, known[:2])
    assert "live" not in ref
    assert not any(k.startswith("edit/live_") for k in off.evaluate(model, tok, known[:2], ref))
    on = Evaluator(EvaluatorConfig(**EDIT_ONLY))
    with pytest.warns(UserWarning, match="no live answers"):
        res = on.evaluate(model, tok, known[:2], ref)  # e.g. a run whose reference was recorded with it off
    assert "edit/live_rel" in res and "edit/live_loc" not in res
    assert set(on.timings) == {"edit_metrics", "live_metrics"}  # timed apart: what live decoding costs
    with pytest.raises(ValueError, match="live_max_new_tokens"):
        EvaluatorConfig(live_max_new_tokens=0)


def test_sharded_live_metrics_sum_to_the_whole(tiny, known):
    """Each rank decodes its share; the states are sums and counts, so two shards added equal one process."""
    model, tok = tiny
    ref = live_reference(model, tok, known)
    whole = live_edit_metrics(model, tok, known, ref)
    parts = [live_edit_metrics(model, tok, known[r::2], ref) for r in range(2)]
    n_rel = [len(known[r::2]) for r in range(2)]
    assert whole["live_rel"] == pytest.approx(sum(p["live_rel"] * n for p, n in zip(parts, n_rel)) / len(known))
