"""Edit requests: validation messages name the record and the field; the shared datasets load."""

from __future__ import annotations

import json

import pytest
import torch

from eac_lightning.data.requests import (
    EditRequest,
    MalformedRequestError,
    validate_requests,
)
from eac_lightning.data.sources import detect_format, load_requests
from eac_lightning.paths import data_dir


def _req(**kw) -> EditRequest:
    base = dict(prompt="{} is located in", subject="Angola", target_new="Antarctica", source="facts.json",
                source_index=7, case_id=20952)
    return EditRequest(**{**base, **kw})


class _DropTokenizer:
    """A tokenizer that maps some strings to no tokens at all (as a vocabulary without those characters would)."""

    def __init__(self, tok, drop: str):
        self.tok, self.drop = tok, drop

    def __call__(self, text, add_special_tokens=False):
        if self.drop in text:
            return {"input_ids": []}
        return self.tok(text, add_special_tokens=add_special_tokens)


def test_valid_request_passes_and_fills_the_prompt(tokenizer):
    r = _req()
    assert r.validate(tokenizer) is r
    assert r.prompt_text == "Angola is located in"
    assert r.name == "facts.json (row 7, case_id 20952)"
    assert EditRequest.from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    "changes, field, words",
    [
        (dict(prompt="Angola is located in"), "prompt", "'{}'"),
        (dict(prompt="{} is near {}"), "prompt", "exactly one"),
        (dict(prompt="Located in {}"), "prompt", "ends with the subject"),
        (dict(target_new=""), "target_new", "non-empty"),
        (dict(target_new="   "), "target_new", "non-empty"),
        (dict(subject=""), "subject", "non-empty"),
        (dict(paraphrase_prompts=["ok", " "]), "paraphrase_prompts[1]", "empty"),
        (dict(neighborhood_prompts=["a", "b", "c"], neighborhood_answers=["x", "y"]), "neighborhood_answers",
         "2 answers for 3"),
    ],
)
def test_malformed_request_names_record_and_field(changes, field, words):
    with pytest.raises(MalformedRequestError) as err:
        _req(**changes).validate()
    msg = str(err.value)
    assert msg.startswith("facts.json (row 7, case_id 20952): ")
    assert f"field '{field}'" in msg
    assert words in msg


def test_target_that_tokenises_to_nothing(tokenizer):
    tok = _DropTokenizer(tokenizer, "\u200b")
    with pytest.raises(MalformedRequestError, match=r"row 7.*field 'target_new'.*tokenises to nothing"):
        _req(target_new="\u200b").validate(tok)
    with pytest.raises(MalformedRequestError, match=r"field 'subject'.*tokenises to nothing"):
        _req(subject="\u200b", prompt="{} is located in").validate(tok)
    _req().validate(tok)  # other requests still pass


def test_batch_is_validated_completely_before_use(tokenizer):
    good, bad = _req(), _req(target_new="", source_index=8)
    with pytest.raises(MalformedRequestError, match=r"row 8"):
        validate_requests([good, bad], tokenizer)


def test_neighborhood_pairs_broadcast_one_answer():
    r = _req(neighborhood_prompts=["Ghana is in", "Mali is in"], neighborhood_answers=["Africa"])
    assert r.neighborhood_pairs() == [("Ghana is in", "Africa"), ("Mali is in", "Africa")]


def _write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_zsre_subject_missing_from_src_names_file_row_and_field(tmp_path):
    ok = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "alt": "aircraft",
          "answers": ["uniform"], "rephrase": "What will be the product of UniFirst?", "loc": "q", "loc_ans": "a"}
    bad = {**ok, "subject": "Acme"}
    path = _write(tmp_path, [ok, bad])
    with pytest.raises(MalformedRequestError) as err:
        load_requests(path)
    msg = str(err.value)
    assert str(path) in msg and "row 1" in msg and "field 'src'" in msg and "'Acme'" in msg
    (r,) = load_requests(_write(tmp_path, [ok], "ok.json"))
    assert r.prompt == "What is the product made by {}?" and r.target_new == "aircraft"
    assert r.paraphrase_prompts == ["What will be the product of UniFirst?"]
    assert r.neighborhood_pairs() == [("q", "a")]


def test_flat_counterfact_subject_missing_from_prompt(tmp_path):
    ok = {"subject": "Angola", "prompt": "Angola is located in", "target_new": "Antarctica",
          "ground_truth": "Africa", "rephrase_prompt": "Angola belongs to", "locality_prompt": "Ghana is in",
          "locality_ground_truth": "Africa"}
    path = _write(tmp_path, [ok, {**ok, "prompt": "Ghana is located in"}])
    with pytest.raises(MalformedRequestError, match=r"row 1.*field 'prompt' does not contain the subject 'Angola'"):
        load_requests(path)


def test_rome_counterfact_and_missing_fields(tmp_path):
    rec = {"case_id": 1, "requested_rewrite": {"prompt": "{} is located in", "subject": "Angola",
                                               "target_new": {"str": "Antarctica"}, "target_true": {"str": "Africa"}},
           "paraphrase_prompts": ["Angola belongs to"], "neighborhood_prompts": ["Ghana is in"]}
    assert detect_format(rec).__name__ == "from_rome_counterfact"
    (r,) = load_requests(_write(tmp_path, [rec]))
    assert (r.subject, r.target_new, r.target_true, r.case_id) == ("Angola", "Antarctica", "Africa", 1)
    broken = {"case_id": 2, "requested_rewrite": {"prompt": "{} is in", "subject": "Angola", "target_new": {}}}
    with pytest.raises(MalformedRequestError, match=r"row 0 requested_rewrite.target_new: missing field 'str'"):
        load_requests(_write(tmp_path, [broken], "broken.json"))
    with pytest.raises(MalformedRequestError, match="unknown edit-record format"):
        load_requests(_write(tmp_path, [{"question": "?"}], "odd.json"))


def test_shared_datasets_load_and_a_bad_shared_row_is_named():
    cf = load_requests(data_dir() / "counterfact", limit=5)
    assert len(cf) == 5 and cf[0].subject == "Angola" and cf[0].target_new == "Antarctica"
    assert all(len(r.neighborhood_pairs()) == len(r.neighborhood_prompts) for r in cf)
    # Rows 534 and 723 of the shipped ZsRE file have an empty 'alt': nothing to edit, left out with a notice each.
    with pytest.warns(UserWarning, match=r"zsre_mend_train-800.json row 534: field 'alt' is empty"):
        assert len(load_requests(data_dir() / "zsre")) == 798


def test_malformed_request_changes_no_weight(tokenizer, tiny_gpt2):
    """A bad record in a batch is rejected before any optimisation or weight change."""
    from eac_lightning.methods import FT, ROME, edit

    before = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    batch = [_req(), _req(prompt="Angola is located in", source_index=9)]
    for method in (ROME(layer=1, mom2_adjustment=False), FT(layers=[1])):
        with pytest.raises(MalformedRequestError, match="row 9"):
            edit(method, tiny_gpt2, tokenizer, batch)
    after = tiny_gpt2.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
