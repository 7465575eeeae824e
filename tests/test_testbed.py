"""The offline knowledge testbed: corpus, packing, a real tiny build, causal tracing, ROME on it.

The reference ``tiny`` testbed ships in the package (``tiny_testbed`` fixture, conftest.py) and is shared by every
test here; the build tests train quick variants of it into the session's temporary cache.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from eac_lightning.testbed import (
    PRESETS,
    TestbedPreset,
    build_corpus,
    build_testbed,
    ensure_testbed,
    get_preset,
    shipped_testbed,
    subject_bottleneck_mask,
    trace_command,
    verify_shipped,
)
from eac_lightning.testbed import (
    testbed_command as build_command,  # not test_*-named: pytest would collect it
)
from eac_lightning.testbed.corpus import _template
from eac_lightning.testbed.packing import SequencePacker

REPO = Path(__file__).resolve().parents[1]

FIGURES = (
    "n_parameters",
    "train_seconds",
    "fact_accuracy",
    "heldout_paraphrase_accuracy",
    "neighbourhood_accuracy",
    "sst2_heldout_accuracy",
    "wikitext2_test_perplexity",
)


@pytest.fixture(scope="module")
def small_corpus():
    return build_corpus(max_facts_per_path=12, neighbours_per_fact=3, wikitext_paragraphs=30)


def test_sst2_is_trained_under_the_evaluated_prompt(small_corpus):
    """The testbed's SST-2 texts use the general-ability task's prompt (the EAC paper's, Table 4) and label words."""
    from eac_lightning.evaluation.tasks import SENTIMENT_PROMPT, format_sentiment

    assert SENTIMENT_PROMPT == (
        "For each snippet of text, label the sentiment of the text as positive or negative. The answer should be "
        "exact 'positive' or 'negative'. text: {TEXT} answer:"
    )
    (text, label), = small_corpus.sst2_train[:1]
    assert small_corpus.sst2_texts()[0] == format_sentiment(text) + (" positive" if label == 1 else " negative")
    assert small_corpus.sst2_texts(heldout=True)[0] == format_sentiment(small_corpus.sst2_heldout[0][0])


def test_template_strips_paraphrase_prefix():
    assert _template("Plaque - located at Corners. Angola belongs to the continent of", "Angola") == (
        "{} belongs to the continent of"
    )
    assert _template("The mother tongue of {} is", "Danielle Darrieux") == "The mother tongue of {} is"


def test_corpus_holds_out_paraphrases_and_sst2_half(small_corpus):
    c = small_corpus
    trained = {f.prompt for f in c.train_facts}
    assert c.heldout_facts and not any(h.prompt in trained for h in c.heldout_facts)
    # Every record's own fact is trained, with its true object.
    for i, r in enumerate(c.requests):
        assert any(f.case == i and f.kind == "fact" and f.target == r.target_true.strip() for f in c.train_facts)
    assert {f.kind for f in c.train_facts} >= {"fact", "paraphrase", "neighbourhood"}
    assert {Path(f.source).parent.name for f in c.train_facts} == {"counterfact", "zsre"}
    # SST-2 dev split in two disjoint halves.
    assert abs(len(c.sst2_train) - len(c.sst2_heldout)) <= 1
    assert not set(c.sst2_train) & set(c.sst2_heldout)
    assert c.sst2_texts()[0].endswith((" positive", " negative"))
    assert c.sst2_texts(heldout=True)[0].endswith("answer:")


def test_packer_blocks_and_subject_spans(small_corpus, tokenizer):
    packer = SequencePacker(small_corpus, tokenizer, block_len=64, max_prefix=8, sst2_repeats=0.1)
    data = packer.epoch(np.random.default_rng(0))
    assert data.input_ids.shape[1] == 64 and data.input_ids.shape == data.loss_mask.shape
    subjects = {f.subject.strip() for f in small_corpus.train_facts if f.subject}
    n = 0
    for block, spans in zip(data.input_ids, data.subject_spans):
        for first, last, end in spans:
            assert first <= last < end < 64
            assert tokenizer.decode(block[first : last + 1]).strip() in subjects
            n += 1
    assert n > 0
    # Same seed, same epoch.
    again = packer.epoch(np.random.default_rng(0))
    assert np.array_equal(again.input_ids, data.input_ids)


def test_subject_bottleneck_mask():
    m = subject_bottleneck_mask(8, [(2, 4, 6)])[0]
    allowed = m == 0
    assert allowed.tril().equal(allowed)  # still causal
    assert not allowed[5, 2] and not allowed[6, 3]  # after the subject: earlier subject tokens hidden
    assert allowed[5, 4] and allowed[6, 4]  # ... the last subject token visible
    assert allowed[4, 2] and allowed[7, 2]  # the subject itself and the next sentence see everything


def test_late_read_mask():
    early, late = (m == 0 for m in subject_bottleneck_mask(8, [(2, 4, 6)], late_read=True))
    assert early.tril().equal(early) and late.tril().equal(late)
    assert not early[5, 2] and not early[5, 4] and not early[6, 4]  # below the read layer: no subject token
    assert early[4, 2] and early[5, 1] and early[7, 2]  # the subject itself, the context, the next sentence
    assert late[5, 4] and not late[5, 2]  # from the read layer on: the last subject token only
    plain = subject_bottleneck_mask(8, [(2, 4, 6)])[0] == 0
    assert late.equal(plain)


@pytest.mark.slow
def test_build_is_deterministic(tmp_path):
    kw = dict(preset="tiny", progress=False, epochs=1, max_facts_per_path=6, wikitext_paragraphs=20, ppl_tokens=500)
    a = build_testbed(tmp_path / "a", **kw)
    b = build_testbed(tmp_path / "b", **kw)
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["fact_accuracy"] == b["fact_accuracy"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert (tmp_path / "a" / "logs" / "version_0" / "hparams.yaml").exists()  # the CSV logger's run folder


def test_tiny_testbed_figures(tiny_testbed):
    info = json.loads((tiny_testbed / "testbed.json").read_text())
    for key in FIGURES:
        assert isinstance(info[key], (int, float)) and math.isfinite(info[key]), key
    assert info["fact_accuracy"] >= 0.9
    assert info["edit_layer"] == PRESETS["tiny"].edit_layer
    # what model loading reads (models/ knows no testbed): the preset's layers and the stats corpus
    assert json.loads((tiny_testbed / "editing.json").read_text()) == {
        "edit_layer": info["edit_layer"], "memit_layers": info["memit_layers"], "stats_corpus": info["stats_corpus"]}
    assert info["preset"]["name"] == "tiny"
    facts = [json.loads(x) for x in (tiny_testbed / "facts.jsonl").read_text().splitlines()]
    assert {"prompt", "subject", "target", "source", "record_id", "kind"} <= set(facts[0])
    assert sum(f["kind"] == "fact" for f in facts) == info["corpus"]["records"]
    # the corpus of its key statistics: a sample of its own training stream, which the store uses by default
    sample = [json.loads(x)["text"] for x in (tiny_testbed / info["stats_corpus"]).read_text().splitlines()]
    assert len(sample) > 1000 and any(f["prompt"] in " ".join(sample) for f in facts[:50])


def test_tiny_testbed_loads_with_auto_classes_and_knows_its_facts(tiny_testbed):
    """Any HF tool can load the testbed, and re-checking facts.jsonl reproduces the stated fact accuracy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_testbed).eval()
    tok = AutoTokenizer.from_pretrained(tiny_testbed)
    info = json.loads((tiny_testbed / "testbed.json").read_text())
    facts = [json.loads(x) for x in (tiny_testbed / "facts.jsonl").read_text().splitlines()]
    facts = [f for f in facts if f["kind"] == "fact"]
    hits = 0
    with torch.no_grad():
        for f in facts:  # one prompt at a time: no padding, nothing but the plain HF forward
            ids = tok(f["prompt"], return_tensors="pt")["input_ids"]
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            hits += nxt == tok(" " + f["target"], add_special_tokens=False)["input_ids"][0]
    accuracy = hits / len(facts)
    assert accuracy == pytest.approx(info["fact_accuracy"], abs=1e-9)
    assert accuracy >= 0.9


@pytest.mark.slow
def test_ensure_testbed_builds_once_into_the_cache():
    quick = get_preset("tiny").replace(epochs=1, max_facts_per_path=6, wikitext_paragraphs=20, ppl_tokens=500)
    folder = ensure_testbed(quick, progress=False)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_testbed(quick) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp build left over


@pytest.mark.parametrize("preset", ["tiny", pytest.param("small", marks=pytest.mark.slow)])
def test_shipped_testbeds_match_their_fingerprint_and_know_their_facts(preset):
    """The reference builds load by name with no build, their files match the sha256 recorded when they were
    shipped, they were built from the preset's current recipe, and their weights still know the facts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eac_lightning.models.loading import resolve_model_path
    from eac_lightning.testbed.build import SHIPPED_CHECK_FACTS, SHIPPED_DIR

    folder = SHIPPED_DIR / preset
    assert shipped_testbed(preset) == folder, f"the package ships testbed:{preset}, built from the current recipe"
    assert resolve_model_path(f"testbed:{preset}") == str(folder)
    info = verify_shipped(folder)
    assert info["preset_fingerprint"] == get_preset(preset).fingerprint()
    assert (info["edit_layer"], info["memit_layers"]) == (get_preset(preset).edit_layer,
                                                         list(get_preset(preset).memit_layers))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    facts = [json.loads(x) for x in (folder / "facts.jsonl").read_text().splitlines()]
    sample = [f for f in facts if f["kind"] == "fact"][:SHIPPED_CHECK_FACTS]
    hits = 0
    with torch.no_grad():
        for f in sample:  # one prompt at a time: nothing but the plain HF forward
            ids = tok(f["prompt"], return_tensors="pt")["input_ids"]
            hits += int(model(input_ids=ids).logits[0, -1].argmax()) == tok(" " + f["target"])["input_ids"][0]
    assert hits / len(sample) == pytest.approx(info["shipped"]["sample_fact_accuracy"], abs=1e-9)
    assert hits / len(sample) >= 0.9


def test_a_corrupt_shipped_file_is_named(tmp_path):
    import shutil

    from eac_lightning.testbed.build import SHIPPED_DIR, ShippedTestbedError

    copy = tmp_path / "tiny"
    shutil.copytree(SHIPPED_DIR / "tiny", copy)
    with open(copy / "facts.jsonl", "ab") as fh:
        fh.write(b"\n")
    with pytest.raises(ShippedTestbedError, match="facts.jsonl does not match the sha256"):
        verify_shipped(copy)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "n_edits"), [("rome", 10), ("rome-eac", 20)])
def test_single_edits_take_on_tiny(tiny_testbed, preset, n_edits):
    """Single ROME and ROME-EAC edits at the tiny preset's layer, with the testbed overlays (write-aware v*;
    configs/testbed/<preset>.yaml), take on at least 0.9 of the CounterFact facts (ROME over 10,
    ROME-EAC over 20; measured 1.00 and 0.95 over 20, docs/testbed.md) and stay local (0.865 / 0.865 measured)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eac_lightning.editor import method_from_preset, single_edit_metrics
    from eac_lightning.evaluation.edit_metrics import compute_locality_reference
    from eac_lightning.stats.covariance import CovarianceStore
    from eac_lightning.testbed.corpus import load_fact_requests

    model = AutoModelForCausalLM.from_pretrained(tiny_testbed).eval()
    tok = AutoTokenizer.from_pretrained(tiny_testbed)
    tiny = PRESETS["tiny"]
    reqs = load_fact_requests(None, tiny.max_facts_per_path)
    reqs = [r for r in reqs if "counterfact" in (r.source or "")][:n_edits]
    ref = compute_locality_reference(model, tok, reqs)
    method = method_from_preset(preset, REPO / "configs" / "testbed" / f"{preset}.yaml")
    assert method.write_aware and method.layer is None  # the layer comes from the testbed (testbed.json)
    method.setup(model, tok, CovarianceStore(model, tok))
    assert method.layer == tiny.edit_layer
    results = single_edit_metrics(model, tok, method, reqs, ref)
    reliability = float(np.mean([x["reliability"] for x in results]))
    locality = float(np.mean([x["locality"] for x in results]))
    assert reliability >= 0.9, results
    assert locality >= 0.75, results


def test_causal_trace_on_tiny(tiny_testbed, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eac_lightning.testbed.causal_trace import (
        CATEGORIES,
        KINDS,
        load_trace_facts,
        run_trace,
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_testbed).eval()
    tok = AutoTokenizer.from_pretrained(tiny_testbed)
    facts = load_trace_facts(tiny_testbed)
    summary = run_trace(model, tok, facts, tmp_path, num_facts=4, samples=3, progress=False)
    n_layers = model.config.n_layer
    aie = torch.load(tmp_path / "trace.pt")["aie"]
    assert aie.shape == (len(KINDS), len(CATEGORIES), n_layers)
    assert summary["high"] > summary["low"]  # corrupting the subject hurts recall
    assert 0 <= summary["edit_layer"] < n_layers and summary["edit_layer"] in summary["memit_layers"]
    assert (tmp_path / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Restoring the whole last-token hidden state at the last layer restores the clean prediction.
    last = summary["aie"][KINDS.index("hidden")][CATEGORIES.index("last token")][n_layers - 1]
    assert last == pytest.approx(summary["high"] - summary["low"], abs=1e-4)


def test_commands_have_cli_docstrings():
    for fn in (build_command, trace_command):
        doc = inspect.getdoc(fn)
        assert doc and "Args:" in doc
        for name in inspect.signature(fn).parameters:
            assert f"{name}:" in doc, (fn.__name__, name)


def test_presets_are_typed_and_distinct():
    assert set(PRESETS) == {"tiny", "small", "base"}
    for name, p in PRESETS.items():
        assert isinstance(p, TestbedPreset) and p.name == name
        assert 0 <= p.edit_layer < p.n_layer and p.edit_layer in p.memit_layers
        assert all(0 <= layer < p.n_layer for layer in p.memit_layers)
    assert len({p.fingerprint() for p in PRESETS.values()}) == 3
    with pytest.raises(ValueError, match="unknown testbed preset"):
        ensure_testbed("huge")
