"""Evaluation layer: edit-metric maths on hand-made cases, Table 4 prompts, task data validation, scoring
functions, batched == unbatched, probes, the Evaluator and sharded reduction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES

from eac_lightning.data.requests import EditRequest
from eac_lightning.evaluation import edit_metrics as em
from eac_lightning.evaluation import metrics, probes, scoring, tasks
from eac_lightning.evaluation.evaluator import (
    Evaluator,
    EvaluatorConfig,
    format_table,
    summary_sections,
)
from eac_lightning.paths import data_dir


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models are dispatch-bound: one intra-op thread is faster, steadier on a shared 2-core machine, and keeps
    the tests' CPU use modest. Restored afterwards for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PAPER = Path(__file__).resolve().parents[2] / "shared" / "papers" / "eac-constraining-sequential-model-editing.txt"

# ---------------------------------------------------------------------------------------------------------------
# A hand-made world: a word-level tokenizer and a bigram "model" whose next token is a table lookup of the last
# token, so every metric's expected value can be worked out by hand, and an "edit" is a change of a table row.
# ---------------------------------------------------------------------------------------------------------------

WORDS = ["<eos>", "The", "Eiffel", "Tower", "is", "in", "located", "at", "Louvre", "lies", "city", "Paris", "Rome",
         "Tokyo", "near", "Mount", "Fuji", "Everest", "Japan", "Colosseum", "stands"]
IDX = {w: i for i, w in enumerate(WORDS)}


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(dict(IDX), unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>")
    tok.padding_side = "left"
    return tok


class _Out:
    def __init__(self, logits):
        self.logits = logits
        self.past_key_values = None


class BigramLM(torch.nn.Module):
    """logits[b, t] = 10 * onehot(table[input_ids[b, t]]): the prediction depends on the last token only."""

    def __init__(self, table: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(len(WORDS), len(WORDS)), requires_grad=False)
        self.calls = 0
        for a, b in table.items():
            self.set(a, b)

    def set(self, a: str, b: str) -> None:
        with torch.no_grad():
            self.weight[IDX[a]] = 0.0
            self.weight[IDX[a], IDX[b]] = 10.0

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False,
                past_key_values=None):
        self.calls += 1
        logits = self.weight[input_ids]
        return _Out(logits[:, -logits_to_keep:] if logits_to_keep else logits)


PRE = {"in": "Paris", "at": "Paris", "city": "Paris", "near": "Mount", "Mount": "Fuji", "stands": "Rome"}


def requests_world():
    r1 = EditRequest(
        prompt="{} is in", subject="The Eiffel Tower", target_new="Rome", target_true="Paris",
        paraphrase_prompts=["The Eiffel Tower is located at"],
        neighborhood_prompts=["The Louvre lies in city"], neighborhood_answers=["Paris"],
    )
    r2 = EditRequest(
        prompt="{} stands", subject="The Colosseum", target_new="Japan", target_true="Rome",
        paraphrase_prompts=["The Colosseum is in city"],  # "city" -> Tokyo after the edit: fails
        neighborhood_prompts=["Tokyo lies near"], neighborhood_answers=["Mount Fuji"],
    )
    return [r1, r2]


def edited_world(model: BigramLM) -> None:
    model.set("in", "Rome")        # r1 reliability: 1
    model.set("city", "Tokyo")     # r1 locality prompt flips (0); r2 paraphrase fails
    model.set("Mount", "Everest")  # r2 locality: first answer token unchanged, second flips (0.5)
    model.set("stands", "Japan")   # r2 reliability: 1


def p_hi_lo():
    z = math.exp(10.0) + len(WORDS) - 1
    return math.exp(10.0) / z, 1.0 / z


def test_metric_maths_by_hand():
    tok = word_tokenizer()
    model = BigramLM(PRE)
    reqs = requests_world()
    ref = em.compute_locality_reference(model, tok, reqs)
    assert ref["argmax"][em.locality_key("Tokyo lies near", "Mount Fuji")] == [IDX["Mount"], IDX["Fuji"]]
    assert ref["greedy"][em.locality_key("The Louvre lies in city", "Paris")] == [IDX["Paris"]]
    json.dumps(ref)  # the caller can save it

    before = em.evaluate_edit_metrics(model, tok, reqs, ref)
    assert before["locality"] == 1.0 and before["locality_gen"] == 1.0
    assert before["reliability"] == 0.0

    edited_world(model)
    res = em.evaluate_edit_metrics(model, tok, reqs, ref)
    assert res["reliability"] == 1.0 and res["reliability_gen"] == 1.0
    # r1 paraphrase ("at" -> Paris) and r2 paraphrase ("city" -> Tokyo) both fail
    assert res["generalization"] == 0.0 and res["generalization_gen"] == 0.0
    # r1 neighbour flips (0); r2 neighbour keeps "Mount" but flips "Fuji" -> "Everest" (1/2): mean 0.25
    assert res["locality"] == pytest.approx(0.25)
    assert res["locality_gen"] == 0.0
    # ROME scores: only r1 is CounterFact-style (neighbourhood answer == target_true)
    hi, lo = p_hi_lo()
    assert res["rome_efficacy_score"] == 1.0
    assert res["rome_efficacy_magnitude"] == pytest.approx(hi - lo)
    assert res["rome_paraphrase_score"] == 0.0  # "at" still says Paris
    assert res["rome_paraphrase_magnitude"] == pytest.approx(lo - hi)
    # neighbour "city" -> Tokyo: P(Paris) == P(Rome), ROME's strict ">" counts a tie as failure
    assert res["rome_neighborhood_score"] == 0.0
    assert res["rome_neighborhood_magnitude"] == pytest.approx(0.0)


def test_partial_token_accuracy_and_paraphrase_failure():
    tok = word_tokenizer()
    model = BigramLM({"near": "Mount", "Mount": "Everest", "at": "Rome"})
    req = EditRequest(prompt="{} lies near", subject="Tokyo", target_new="Mount Fuji",
                      paraphrase_prompts=["Tokyo is at", "Tokyo is near"])
    res = em.evaluate_edit_metrics(model, tok, [req], reference=None)
    assert res["reliability"] == pytest.approx(0.5)  # "Mount" right, "Fuji" wrong
    assert res["reliability_gen"] == 0.0
    # paraphrase 1: "Rome" != "Mount" (0) and "Everest" != "Fuji" (0); paraphrase 2: 0.5 -> mean 0.25
    assert res["generalization"] == pytest.approx(0.25)
    assert math.isnan(res["locality"])  # no neighbourhood prompts
    assert math.isnan(res["rome_efficacy_score"])  # not a CounterFact request


def test_token_agreement_metric_direct():
    loc = metrics.Locality()
    loc.update([[5, 9], [1]], [[5, 7], [1]])  # a locality case that flips one of two tokens
    assert float(loc.compute()) == pytest.approx((0.5 + 1.0) / 2)
    exact = metrics.Locality(exact=True)
    exact.update([[5, 9], [1]], [[5, 7], [1]])
    assert float(exact.compute()) == pytest.approx(0.5)
    gen = metrics.Generalization()
    gen.update([[3]], [[4]])  # a paraphrase that fails
    assert float(gen.compute()) == 0.0
    pc = metrics.ProbabilityComparison()
    pc.update([math.log(0.6), math.log(0.1)], [math.log(0.2), math.log(0.3)])
    out = pc.compute()
    assert float(out["score"]) == 0.5 and float(out["magnitude"]) == pytest.approx(((0.6 - 0.2) + (0.1 - 0.3)) / 2)


def test_missing_reference_names_the_request():
    tok = word_tokenizer()
    with pytest.raises(KeyError, match="Louvre"):
        em.evaluate_edit_metrics(BigramLM(PRE), tok, requests_world()[:1], reference={"argmax": {}})


def test_rome_length_normalisation():
    tok = word_tokenizer()
    model = BigramLM({"near": "Mount", "Mount": "Fuji"})
    s = scoring.score_targets(model, tok, ["Tokyo lies near"], ["Mount Fuji"])[0]
    hi, _ = p_hi_lo()
    assert s.sum_logprob == pytest.approx(2 * math.log(hi), rel=1e-4)
    assert s.mean_logprob == pytest.approx(math.log(hi), rel=1e-4)


def test_sharded_updates_sum_to_the_whole():
    """What DDP's reduction does: summing each rank's states gives the single-process metric."""
    tok = word_tokenizer()
    reqs = requests_world() * 3
    model = BigramLM(PRE)
    ref = em.compute_locality_reference(model, tok, reqs)
    edited_world(model)
    whole = em.EditMetrics()
    whole.update(model, tok, reqs, ref)
    parts = []
    for rank in range(2):
        m = em.EditMetrics()
        m.update(model, tok, metrics.shard(reqs, rank, 2), ref)
        parts.append(m)
    for name, metric in whole.metrics.items():
        for state in metric._defaults:
            total = sum(getattr(p.metrics[name], state) for p in parts)
            assert torch.allclose(total, getattr(metric, state)), (name, state)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = word_tokenizer()
        reqs = requests_world() * 3 + requests_world()[:1]
        model = BigramLM(PRE)
        ref = em.compute_locality_reference(model, tok, reqs)
        edited_world(model)
        res = em.evaluate_edit_metrics(model, tok, reqs, ref, rank=rank, world_size=world)
        Path(out_dir, f"{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def test_ddp_compute_reduces_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children inherit the imported modules (spawn would re-import torch/transformers: ~10x slower)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    tok = word_tokenizer()
    reqs = requests_world() * 3 + requests_world()[:1]
    model = BigramLM(PRE)
    ref = em.compute_locality_reference(model, tok, reqs)
    edited_world(model)
    single = em.evaluate_edit_metrics(model, tok, reqs, ref)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got.keys() == single.keys()
        for k, v in single.items():
            assert got[k] == pytest.approx(v, nan_ok=True), k


# ---------------------------------------------------------------------------------------------------------------
# Real tiny transformer: batched == one at a time, greedy equivalence
# ---------------------------------------------------------------------------------------------------------------

PROMPTS = ["The Eiffel Tower is located in", "Danielle Darrieux speaks", "Angola is located in the continent of",
           "Toko Yasuda plays", "Rome is the capital of", "Apple was founded by"]
TARGETS = ["Paris", "French", "Africa", "the guitar", "Italy", "Steve Jobs"]


def test_batched_equals_unbatched(tiny_gpt2, tokenizer):
    one = scoring.score_targets(tiny_gpt2, tokenizer, PROMPTS, TARGETS, batch_size=1)
    many = scoring.score_targets(tiny_gpt2, tokenizer, PROMPTS, TARGETS, batch_size=4)
    for a, b in zip(one, many):
        assert a.pred == b.pred and a.target == b.target
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    g1 = scoring.greedy_generate(tiny_gpt2, tokenizer, PROMPTS, 6, batch_size=1, stop_at_eos=False)
    g4 = scoring.greedy_generate(tiny_gpt2, tokenizer, PROMPTS, 6, batch_size=4, stop_at_eos=False)
    assert g1 == g4


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_scoring_equals_full_rows(tokenizer, family):
    """Prompt-level KV sharing (or its full-row fallback, e.g. Mistral's sliding-window cache) gives the numbers of
    scoring every pair on its own sequence, for every supported family."""
    from conftest import make_tiny_model

    model = make_tiny_model(family, len(tokenizer))
    prompts = PROMPTS[:3] * 2
    targets = TARGETS[:3] + ["the city of Rome", "Fr", "It"]
    shared = scoring.score_targets(model, tokenizer, prompts, targets, batch_size=2)
    full = scoring.score_targets(model, tokenizer, prompts, targets, batch_size=4, share_prompts=False)
    for a, b in zip(shared, full):
        assert a.pred == b.pred and a.target == b.target
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    for (p, t), s in zip(zip(prompts, targets), shared):  # and a plain single-sequence forward
        p_ids = tokenizer(p)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p_ids + s.target])).logits[0]
        assert s.pred == logits[len(p_ids) - 1:-1].argmax(-1).tolist()
    # the locality reference reuses the greedy decoder's prompt pass: same argmax as plain teacher forcing
    req = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome",
                      neighborhood_prompts=prompts[:3], neighborhood_answers=targets[3:])
    ref = em.compute_locality_reference(model, tokenizer, [req], batch_size=2)
    for p, a, s in zip(prompts[:3], targets[3:], full[3:]):
        assert ref["argmax"][em.locality_key(p, a)] == s.pred
    assert list(ref["greedy"].values()) == scoring.greedy_generate(model, tokenizer, prompts[:3],
                                                              [len(s.target) for s in full[3:]], stop_at_eos=False)


def test_target_positions_match_a_plain_forward(tiny_gpt2, tokenizer):
    """EasyEdit's definition: prompt + target in one sequence, argmax at each target position."""
    prompt, target = PROMPTS[3], TARGETS[3]
    p_ids = tokenizer(prompt)["input_ids"]
    t_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tiny_gpt2(torch.tensor([p_ids + t_ids])).logits[0]
    expect = logits[len(p_ids) - 1: len(p_ids) + len(t_ids) - 1].argmax(-1).tolist()
    s = scoring.score_targets(tiny_gpt2, tokenizer, [prompt, PROMPTS[0]], [target, TARGETS[0]])[0]
    assert s.target == t_ids and s.pred == expect
    lp = torch.log_softmax(logits, -1)[range(len(p_ids) - 1, len(p_ids) + len(t_ids) - 1), t_ids]
    assert s.logprobs == pytest.approx(lp.tolist(), abs=1e-4)


def test_exact_variant_equals_real_greedy_generation(tiny_gpt2, tokenizer):
    gens = scoring.greedy_generate(tiny_gpt2, tokenizer, PROMPTS, 4, batch_size=3, stop_at_eos=False)
    for prompt, g in zip(PROMPTS[:3], gens):
        ids = tokenizer(prompt, return_tensors="pt")
        out = tiny_gpt2.generate(**ids, max_new_tokens=4, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id)
        assert out[0, ids["input_ids"].shape[1]:].tolist() == g
    scores = scoring.score_targets(tiny_gpt2, tokenizer, PROMPTS, gens)
    assert all(s.exact == 1.0 for s in scores)  # teacher forcing on the greedy output reproduces it
    other = [g[:-1] + [(g[-1] + 1) % len(tokenizer)] for g in gens]
    assert all(s.exact == 0.0 for s in scoring.score_targets(tiny_gpt2, tokenizer, PROMPTS, other))


def test_edit_metrics_batched_equals_unbatched(tiny_gpt2, tokenizer):
    from eac_lightning.data.sources import load_requests

    reqs = load_requests(data_dir() / "counterfact" / "counterfact_500.json", limit=4)
    for r in reqs:  # keep it fast: 3 neighbours each
        r.neighborhood_prompts = r.neighborhood_prompts[:3]
    ref1 = em.compute_locality_reference(tiny_gpt2, tokenizer, reqs, batch_size=1)
    ref8 = em.compute_locality_reference(tiny_gpt2, tokenizer, reqs, batch_size=8)
    assert ref1 == ref8
    a = em.evaluate_edit_metrics(tiny_gpt2, tokenizer, reqs, ref8, batch_size=1)
    b = em.evaluate_edit_metrics(tiny_gpt2, tokenizer, reqs, ref8, batch_size=8)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), k
    assert b["locality"] == 1.0 and b["locality_gen"] == 1.0  # unedited model against its own reference


# ---------------------------------------------------------------------------------------------------------------
# Table 4 prompts, scoring functions
# ---------------------------------------------------------------------------------------------------------------


def test_table4_prompts_verbatim():
    expected = {
        "NLI": "{SENTENCE1} entails the {SENTENCE2}. True or False? answer:",
        "Open-domain QA": "Refer to the passage below and answer the following question. Passage: {DOCUMENT} "
                          "Question: {QUESTION}",
        "Summarization": "{DIALOGUE} TL;DR:",
        "Sentiment analysis": "For each snippet of text, label the sentiment of the text as positive or negative. "
                              "The answer should be exact 'positive' or 'negative'. text: {TEXT} answer:",
    }
    assert tasks.TABLE4_PROMPTS == expected
    if not PAPER.exists():
        pytest.skip(f"{PAPER} not present")
    lines = PAPER.read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("The prompts for each task were illustrated"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("Table 4:"))
    block = [ln for ln in lines[start + 1:end] if ln.strip()]
    paper = {block[i].rstrip(":"): block[i + 1] for i in range(0, len(block), 2)}
    assert paper == tasks.TABLE4_PROMPTS  # character for character


def test_prompt_filling():
    assert tasks.format_nli("A man runs.", "A person moves") == (
        "A man runs. entails the A person moves. True or False? answer:")
    assert tasks.format_qa("who?", "Some text.") == ("Refer to the passage below and answer the following question. "
                                                     "Passage: Some text. Question: who?")
    assert tasks.format_qa("who?") == "who?"
    assert tasks.format_summarization("A: hi\nB: yo") == "A: hi\nB: yo TL;DR:"
    assert tasks.format_sentiment("great").endswith("text: great answer:")


def test_exact_match_normalisation():
    assert tasks.normalize_answer("  The Beatles!! ") == "beatles"
    assert tasks.normalize_answer("An apple, a day") == "apple day"
    assert tasks.normalize_answer("Rock-and-roll") == "rockandroll"
    assert tasks.exact_match("the beatles.", ["Beatles"]) == 1.0
    assert tasks.exact_match("December 1972", ["14 December 1972 UTC", "December 1972"]) == 1.0
    assert tasks.exact_match("1972", ["14 December 1972 UTC", "December 1972"]) == 0.0
    assert tasks.exact_match("Theatre", ["the atre"]) == 0.0  # articles only as whole words
    assert tasks.first_line("\n  Paris\nFrance") == "Paris"


def test_rouge_matches_rouge_score():
    from rouge_score import rouge_scorer

    pred, ref = "the cat sat on the mat", "the cat lay on the mat"
    # by hand: ROUGE-1 F = 5/6, ROUGE-2 F = 3/5, ROUGE-L F (LCS "the cat on the mat") = 5/6
    assert tasks.rouge_mean(pred, ref) == pytest.approx((5 / 6 + 3 / 5 + 5 / 6) / 3)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = [("Amanda will text Larry about it.", "Hannah needs Betty's number but Amanda doesn't have it."),
             ("They are meeting tomorrow at noon", "The meeting is tomorrow at 12"), ("", "anything")]
    for p, r in pairs:
        s = scorer.score(r, p)
        assert tasks.rouge_mean(p, r) == pytest.approx(
            (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3)


# ---------------------------------------------------------------------------------------------------------------
# Task data loading and validation
# ---------------------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_offline_task_files_load():
    rte = tasks.load_task("rte", limit=3)
    assert len(rte) == 3 and rte[0].answers == ["False"] and rte[1].answers == ["True"]  # label 1, 0
    sst = tasks.load_task("sst2", limit=2)
    assert sst[0].answers == ["positive"] and sst[1].answers == ["negative"]
    assert sst[0].prompt == tasks.format_sentiment("it 's a charming and often affecting journey .")
    nq = tasks.load_task("nq_open", limit=1, start=1)
    assert nq[0].prompt == "who wrote he ain't heavy he's my brother lyrics" and nq[0].answers == ["Bobby Scott",
                                                                                                  "Bob Russell"]
    sam = tasks.load_task("samsum", limit=1)
    assert sam[0].prompt.endswith(" TL;DR:") and sam[0].answers[0].startswith("Hannah needs Betty's number")


def test_tsv_quoting_off_and_passage_prompt(tmp_path):
    f = _write(tmp_path / "sst.tsv", 'text\tlabel\nhe said "great\t1\n"quoted" start\t0\n')
    ex = tasks.load_task("sst2", f)
    assert "text: he said \"great answer:" in ex[0].prompt and ex[1].answers == ["negative"]
    q = _write(tmp_path / "qa.jsonl", json.dumps({"question": "who?", "answer": ["Bob"], "passage": "Bob did."}) + "\n")
    assert tasks.load_task("nq_open", q)[0].prompt == tasks.format_qa("who?", "Bob did.")


@pytest.mark.parametrize(
    "task,name,content,row,field_name",
    [
        ("rte", "missing.tsv", "sentence1\tsentence2\tidx\nA\tB\t0\n", 0, "label"),
        ("rte", "empty.tsv", "sentence1\tsentence2\tlabel\tidx\nA\tB\t0\t0\nC\tD\t1\t1\n\tE\t0\t2\n", 2, "sentence1"),
        ("rte", "badlabel.tsv", "sentence1\tsentence2\tlabel\tidx\nA\tB\t0\t0\nC\tD\t5\t1\n", 1, "label"),
        ("sst2", "sst.tsv", "text\tlabel\ngood\t1\nbad\tpositive\n", 1, "label"),
        ("nq_open", "nq.jsonl", '{"question": "q1", "answer": ["a"]}\n{"question": "q2", "answer": []}\n', 1,
         "answer"),
        ("samsum", "sam.jsonl", '{"dialogue": "A: hi", "summary": "hi"}\n{"dialogue": "B: yo"}\n', 1, "summary"),
    ],
)
def test_malformed_task_data_names_file_row_field(tmp_path, task, name, content, row, field_name):
    f = _write(tmp_path / name, content)
    with pytest.raises(tasks.TaskDataError) as err:
        tasks.load_task(task, f)
    msg = str(err.value)
    assert str(f) in msg and f"row {row}" in msg and f"'{field_name}'" in msg


def test_unreadable_task_file_names_file(tmp_path):
    f = _write(tmp_path / "ragged.tsv", "sentence1\tsentence2\tlabel\nA\tB\t0\nC\tD\t1\textra\tmore\n")
    with pytest.raises(tasks.TaskDataError, match="ragged.tsv"):
        tasks.load_task("rte", f)


# ---------------------------------------------------------------------------------------------------------------
# Running tasks and probes on the tiny model
# ---------------------------------------------------------------------------------------------------------------


def test_logit_classification_matches_manual(tiny_gpt2, tokenizer):
    ex = tasks.load_task("rte", limit=4)
    preds = tasks.classify(tiny_gpt2, tokenizer, ex, batch_size=3)
    for e, p in zip(ex, preds):
        s = scoring.score_targets(tiny_gpt2, tokenizer, [e.prompt, e.prompt], ["True", "False"], batch_size=1)
        assert p == ("True" if s[0].sum_logprob >= s[1].sum_logprob else "False")
    gen = tasks.classify(tiny_gpt2, tokenizer, ex, batch_size=3, mode="generate", max_new_tokens=2)
    assert all(g in ("", "True", "False") for g in gen)


def test_task_scores_batched_equal_unbatched_and_shard(tiny_gpt2, tokenizer):
    for task, n, budget in [("sst2", 6, None), ("nq_open", 4, 4), ("samsum", 3, 6)]:
        ex = tasks.load_task(task, limit=n)
        one = tasks.example_scores(task, tiny_gpt2, tokenizer, ex, batch_size=1, max_new_tokens=budget)
        many = tasks.example_scores(task, tiny_gpt2, tokenizer, ex, batch_size=8, max_new_tokens=budget)
        assert one == pytest.approx(many), task
        shards = [tasks.example_scores(task, tiny_gpt2, tokenizer, metrics.shard(ex, r, 2), 8, budget) for r in range(2)]
        assert sum(map(sum, shards)) == pytest.approx(sum(many))
        whole = tasks.evaluate_task(task, tiny_gpt2, tokenizer, ex, 8, budget)
        assert whole == pytest.approx(sum(many) / len(many))


def test_strided_windows_score_every_token_once():
    for n, window, stride in [(100, 16, 8), (100, 16, 16), (17, 16, 5), (5, 16, 8)]:
        spans = probes.strided_windows(n, window, stride)
        scored = [t for _, e, f in spans for t in range(f, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= window and b < f for b, e, f in spans)


def test_wikitext_ppl(tiny_gpt2, tokenizer):
    ids = probes.wikitext2_tokens(tokenizer, max_tokens=100)
    assert len(ids) == 100
    with torch.no_grad():
        loss = tiny_gpt2(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    one_window = probes.wikitext2_ppl(tiny_gpt2, tokenizer, max_tokens=100, window=100)
    assert one_window == pytest.approx(math.exp(loss.item()), rel=1e-4)
    a = probes.wikitext2_ppl(tiny_gpt2, tokenizer, max_tokens=200, window=32, stride=16, batch_size=1)
    b = probes.wikitext2_ppl(tiny_gpt2, tokenizer, max_tokens=200, window=32, stride=16, batch_size=5)
    assert a == pytest.approx(b, rel=1e-5) and a > 1.0


def test_fact_retention_by_hand():
    tok = word_tokenizer()
    model = BigramLM({"in": "Paris", "near": "Mount", "Mount": "Everest"})
    facts = [EditRequest(prompt="{} is in", subject="The Louvre", target_new="Rome", target_true="Paris"),
             EditRequest(prompt="{} lies near", subject="Tokyo", target_new="Rome", target_true="Mount Fuji"),
             EditRequest(prompt="{} is in", subject="The Colosseum", target_new="Japan")]  # no target_true: skipped
    assert probes.fact_retention(model, tok, facts) == pytest.approx((1.0 + 0.5) / 2)


# ---------------------------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------------------------


def test_evaluator_end_to_end(tiny_gpt2, tokenizer):
    from eac_lightning.data.sources import load_requests

    reqs = load_requests(data_dir() / "counterfact" / "counterfact_500.json", limit=6)
    for r in reqs:
        r.neighborhood_prompts = r.neighborhood_prompts[:2]
    cfg = EvaluatorConfig(limits={"rte": 4, "sst2": 4, "nq_open": 2, "samsum": 2},
                          max_new_tokens={"nq_open": 4, "samsum": 8}, batch_size=8, ppl_max_tokens=150,
                          ppl_window=64)
    ev = Evaluator(cfg)
    ref = ev.reference(tiny_gpt2, tokenizer, reqs[:3])
    before = ev.evaluate(tiny_gpt2, tokenizer, retention_requests=reqs[3:])
    after = ev.evaluate(tiny_gpt2, tokenizer, reqs[:3], ref, retention_requests=reqs[3:])
    assert all(isinstance(v, float) for v in after.values())
    for k in ["edit/reliability", "edit/generalization", "edit/locality", "edit/reliability_gen",
              "edit/rome_efficacy_score", "general/rte", "general/sst2", "general/nq_open", "general/samsum",
              "general/fact_retention", "general/wikitext2_ppl"]:
        assert k in after, k
    assert after["edit/locality"] == 1.0 and after["edit/live_loc"] == 1.0  # nothing edited
    assert after["general/wikitext2_ppl"] == pytest.approx(before["general/wikitext2_ppl"])
    summary = summary_sections(after, before)
    assert list(summary["edit_metrics"]) == ["reliability", "generalization", "locality", "live_rel", "live_gen",
                                             "live_loc"]
    assert list(summary["general"]) == ["rte", "sst2", "nq_open", "samsum", "fact_retention", "wikitext2_ppl"]
    assert summary["general"]["rte"] == {"before": before["general/rte"], "after": after["general/rte"]}
    table = format_table(after, before)
    assert table.splitlines()[2].startswith("| edit/reliability |") and "general/wikitext2_ppl" in table
    with pytest.raises(ValueError, match="unknown task"):
        EvaluatorConfig(tasks=["mnli"])
