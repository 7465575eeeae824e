"""The edit stream: seeded order, resumable position, retention probes, the three record formats."""

from __future__ import annotations

import json

import pytest

from eac_lightning.data.datamodule import EditDataModule
from eac_lightning.data.requests import MalformedRequestError
from eac_lightning.paths import data_dir


def stream(dm: EditDataModule) -> list[list[str]]:
    return [[r.subject for r in batch] for batch in dm.train_dataloader()]


def test_seeded_order_and_batches():
    a = EditDataModule(path=str(data_dir() / "counterfact"), num_edits=7, batch_size=3, seed=1, num_retention=5)
    b = EditDataModule(path=str(data_dir() / "counterfact"), num_edits=7, batch_size=3, seed=1, num_retention=5)
    c = EditDataModule(path=str(data_dir() / "counterfact"), num_edits=7, batch_size=3, seed=2, num_retention=5)
    for dm in (a, b, c):
        dm.setup("fit")
    assert stream(a) == stream(b) != stream(c)
    assert [len(x) for x in stream(a)] == [3, 3, 1]
    edited = {r.case_id for r in a.requests}
    assert len(a.retention) == 5 and not edited & {r.case_id for r in a.retention}


def test_a_batch_reaches_the_step_uncopied():
    """Lightning moves each batch to the device; an edit batch is text, so the requests pass as the same objects
    (its default would copy every request of a stream of thousands)."""
    import torch
    from lightning.pytorch.core.hooks import DataHooks

    dm = EditDataModule(path=str(data_dir() / "counterfact"), num_edits=4, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    moved = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert moved is batch and all(a is b for a, b in zip(moved, dm.requests[:2]))
    copied = DataHooks.transfer_batch_to_device(dm, batch, torch.device("cpu"), 0)  # what the override avoids
    assert copied == batch and copied[0] is not batch[0]
    assert dm.transfer_batch_to_device({"x": torch.ones(1)}, torch.device("cpu"), 0)["x"].item() == 1


def test_position_resumes_at_next_edit():
    dm = EditDataModule(path=str(data_dir() / "counterfact"), num_edits=6, batch_size=2)
    dm.setup("fit")
    full = stream(dm)
    resumed = EditDataModule(path=str(data_dir() / "counterfact"), num_edits=6, batch_size=2)
    resumed.setup("fit")
    resumed.load_state_dict({"position": 4})
    assert stream(resumed) == full[2:]
    assert resumed.state_dict()["position"] == 4


@pytest.mark.parametrize("folder", ["counterfact", "zsre"])
def test_real_datasets_load(folder):
    dm = EditDataModule(path=folder, num_edits=None, num_retention=0)
    if folder == "zsre":  # two shipped ZsRE rows have an empty alt: no new target, so nothing to edit
        with pytest.warns(UserWarning, match="zsre/zsre_mend_train-800.json row 534: field 'alt' is empty"):
            dm.setup("fit")
        assert len(dm.requests) == 798  # left out by default, each named in a warning
    else:
        dm.setup("fit")
        assert len(dm.requests) == 500
    r = dm.requests[0]
    assert "{}" in r.prompt and r.subject and r.target_new and r.neighborhood_prompts
    assert r.source == f"{folder}/{folder}_500.json" if folder == "counterfact" else r.source.startswith("zsre/")
    assert r.source_index is not None


def test_zsre_empty_alt_is_not_an_edit_but_other_faults_fail(tmp_path):
    rows = json.loads((data_dir() / "zsre" / "zsre_mend_train-800.json").read_text())
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([rows[0], rows[534], dict(rows[1], subject="Nobody In The Question")]))
    with pytest.warns(UserWarning, match="row 1: field 'alt' is empty"), \
            pytest.raises(MalformedRequestError, match="zsre.json row 2: field 'src' does not contain the subject"):
        EditDataModule(path=str(path), num_edits=None, num_retention=0).setup("fit")


def test_flat_easyedit_format_and_errors(tmp_path):
    good = {"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
            "target_new": "English", "ground_truth": "French",
            "rephrase_prompt": "Danielle Darrieux's mother tongue is",
            "locality_prompt": "The mother tongue of Léon Blum is", "locality_ground_truth": "French"}
    path = tmp_path / "flat.json"
    path.write_text(json.dumps([good]))
    dm = EditDataModule(path=str(path), num_edits=None, num_retention=0)
    dm.setup("fit")
    (r,) = dm.requests
    assert r.prompt == "The mother tongue of {} is" and r.case_id == 7 and r.target_true == "French"
    bad = dict(good, prompt="The mother tongue of somebody is")
    path.write_text(json.dumps([good, bad]))
    with pytest.raises(MalformedRequestError, match=r"flat.json row 1: field 'prompt' does not contain the subject"):
        EditDataModule(path=str(path), num_retention=0).setup("fit")
    path.write_text(json.dumps([dict(good, target_new="")]))
    with pytest.raises(MalformedRequestError, match=r"row 0.*'target_new'"):
        EditDataModule(path=str(path), num_retention=0).setup("fit")


def test_insertions_continue_the_stream_with_unknown_distinct_subjects():
    """Beyond the data, the stream edits invented subjects: each distinct and no real subject, written into the
    record's prompt and paraphrases, with an object of the record's relation; the same seed gives the same stream."""
    path = str(data_dir() / "counterfact")
    dm = EditDataModule(path=path, num_edits=2000, batch_size=100, insertions=1500, retention_path="zsre",
                        num_retention=10)
    dm.setup("fit")
    assert len(dm.requests) == 2000 and len(list(dm.train_dataloader())) == 20
    real, inserted = dm.requests[:500], dm.requests[500:]
    real_subjects = {r.subject for r in real}
    assert len({r.subject for r in inserted}) == 1500 and not real_subjects & {r.subject for r in inserted}
    templates = {(r.prompt, tuple(r.neighborhood_prompts), r.target_true) for r in real}
    objects = {r.target_new for r in real} | {r.target_true for r in real}
    for r in inserted:
        r.validate()
        assert r.paraphrase_prompts and all(r.subject in q for q in r.paraphrase_prompts)
        assert r.target_new in objects and r.target_new != r.target_true
        # a real record's prompt, with its neighbourhood (real facts) and true object unchanged
        assert (r.prompt, tuple(r.neighborhood_prompts), r.target_true) in templates
    # each name ends in a surname of its own, no word of a real subject: no earlier edit's key stands in for it
    last = [r.subject.split()[-1] for r in inserted]
    assert len(set(last)) == len(last)
    assert not {w.lower() for w in last} & {w.lower() for r in real for w in r.subject.split()}
    again = EditDataModule(path=path, num_edits=2000, insertions=1500, retention_path="zsre", num_retention=10)
    again.setup("fit")
    assert [r.subject for r in again.requests] == [r.subject for r in dm.requests]
    with pytest.raises(ValueError, match="retention_path"):
        EditDataModule(path=path, insertions=10)


def test_every_batch_of_a_long_stream_mixes_records_and_no_name_part_predicts_an_object():
    """Insertions take the records in rounds (each record once per round), so a batch of 100 never holds a record
    twice; the object is drawn apart from the name, so the insertions sharing a first name (and a prompt) do not
    share one object (an edit stream where earlier edits predict later ones measures nothing)."""
    import collections

    dm = EditDataModule(path=str(data_dir() / "counterfact"), num_edits=20000, batch_size=100, insertions=19500,
                        retention_path="zsre", num_retention=10)
    dm.setup("fit")
    record = lambda r: (r.prompt, r.target_true, tuple(r.neighborhood_prompts))
    assert all(len(set(map(record, dm.requests[a:a + 100]))) == 100 for a in range(500, 20000, 100))
    objects = collections.defaultdict(collections.Counter)  # (first name, prompt) -> objects of its insertions
    for r in dm.requests[500:]:
        objects[(r.subject.split()[0], r.prompt)][r.target_new] += 1
    choices = collections.defaultdict(set)  # prompt -> the objects its insertions were given
    for r in dm.requests[500:]:
        choices[r.prompt].add(r.target_new)
    # first names repeat with a prompt, without a common object (where the relation has objects to choose from)
    shared = [c for (_, prompt), c in objects.items() if sum(c.values()) >= 10 and len(choices[prompt]) >= 5]
    assert len(shared) > 50
    dominated = [c for c in shared if c.most_common(1)[0][1] > 0.6 * sum(c.values())]
    assert len(dominated) <= 0.01 * len(shared), dominated  # chance alone, in a relation of few objects


def test_a_longer_stream_begins_with_the_shorter_one():
    """``benchmarks/long_stream.py --rows-at N`` reads a stream of N edits from a longer stream's evaluation at N:
    that holds only if the first N requests of the longer stream (more insertions) are the shorter stream's."""
    path = str(data_dir() / "counterfact")
    short = EditDataModule(path=path, num_edits=1000, insertions=500, retention_path="zsre", num_retention=10)
    long = EditDataModule(path=path, num_edits=2000, insertions=1500, retention_path="zsre", num_retention=10)
    short.setup("fit")
    long.setup("fit")
    assert long.requests[:1000] == short.requests  # dataclasses: every field compared
    assert len(long.requests) == 2000
