"""The edit log (``<run>/history``) and the edit session: compact entries, a replay equal to the live run bit for
bit, one current state through resume, move and rollback, and readers that check what they apply."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_tools import current_deltas, run_cli, write_config
from conftest import make_tiny_model, wikitext_stats

from eac_lightning.data.requests import EditRequest
from eac_lightning.editor import Editor
from eac_lightning.methods import (
    FT,
    ROME,
    AlphaEdit,
    ContextTemplateParams,
    EACHyperParams,
    TargetHyperParams,
    UltraEdit,
    edit,
)
from eac_lightning.methods.base import Written
from eac_lightning.methods.beac import BEAC, BEACMEMIT
from eac_lightning.methods.beac_plan import BEACHyperParams
from eac_lightning.models.adapters import mlp_out_name, weight_view
from eac_lightning.session import EditLog, EditLogError, EditSession

CTX = ContextTemplateParams(length_count=[[4, 2]])
Z = TargetHyperParams(num_steps=4, clamp_norm_factor=4.0)
REQS = [EditRequest(prompt="{} is located in", subject=s, target_new=t, source="t", source_index=i)
        for i, (s, t) in enumerate([("The Eiffel Tower", "Rome"), ("Danielle Darrieux", "English"),
                                    ("Toko Yasuda", "piano"), ("Autonomous University", "Spain"),
                                    ("Apple A5", "Google"), ("Kyiv", "Oslo")])]


@pytest.fixture(scope="module")
def model_and_stats(tokenizer, wikitext_lines, tmp_path_factory):
    model = make_tiny_model("gpt2", len(tokenizer), seed=3)
    return model, wikitext_stats(model, tokenizer, wikitext_lines, tmp_path_factory.mktemp("log_stats"))


@pytest.fixture
def model(model_and_stats):
    model, _ = model_and_stats
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    yield model
    model.load_state_dict(saved)


def _methods(c_max: float) -> dict:
    return {
        "rome-eac": lambda: ROME(layer=1, context=CTX, target=Z, eac=EACHyperParams(gamma=80.0)),
        "alphaedit": lambda: AlphaEdit(layers=[1, 2], context=CTX, target=Z, nullspace_threshold=c_max * 2),
        "beac-memit": lambda: BEACMEMIT(layers=[1, 2], context=CTX, target=Z, mom2_update_weight=10.0,
                                   eac=EACHyperParams(gamma=80.0), beac=BEACHyperParams(key_memory=1.0)),
        # RAR's refresh over every earlier edit, 2 of them scored per batch: the logged step holds the slot it added
        "beac": lambda: BEAC(layers=[1, 2], context=CTX, target=Z, eac=EACHyperParams(gamma=80.0),
                             nullspace_threshold=c_max * 2,
                             beac=BEACHyperParams(key_memory=0.0, refresh=1.0, refresh_window=None, refresh_checks=2)),
        "ultraedit": lambda: UltraEdit(layers=[1, 2], value_step_size=1e-2),
        "ft": lambda: FT(layers=[1]),
    }


def _same(a, b) -> bool:
    """Deep equality of method states (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", ["rome-eac", "alphaedit", "beac-memit", "beac", "ultraedit", "ft"])
def test_replaying_the_log_equals_the_live_run_bit_for_bit(name, model, model_and_stats, tokenizer, tmp_path):
    stats = model_and_stats[1]
    c_max = float(torch.linalg.eigvalsh(stats.get(mlp_out_name(model, 1)).matrix).max())
    make = _methods(c_max)[name]
    live_method = make()
    live_method.setup(model, tokenizer, stats)
    session = EditSession(model, live_method, EditLog(tmp_path / "history"), snapshot_every=2)
    session.start({"test": name})
    batches = [REQS[0:2], REQS[2:4], REQS[4:6]]
    for i, batch in enumerate(batches, 1):
        result = edit(live_method, model, tokenizer, batch)
        session.commit(Written(result.deltas, None, result.factors), step=i, position=2 * i, requests=batch)
    live_weights = {n: weight_view(model, n).clone() for n in live_method.module_names}
    live_state, live_deltas = live_method.state_dict(), {k: v.clone() for k, v in session.deltas.items()}
    if name == "beac":  # the refresh drew from and re-wrote earlier edits, and the window kept every slot
        assert live_method.history[-1]["refreshed"] >= 1 and len(live_method.refresh_record) == 3

    # A fresh process: the unedited model, a new method, the log on disk. Replay goes through the snapshot after
    # batch 2 and the entry of batch 3; then from the root alone.
    for snapshots in (True, False):
        if not snapshots:
            shutil.rmtree(tmp_path / "history" / "snapshots")
        fresh = make()
        with torch.no_grad():
            for n, w0 in session.base_weights.items():
                weight_view(model, n).copy_(w0)
        fresh.setup(model, tokenizer, stats)
        replay = EditSession(model, fresh, EditLog(tmp_path / "history"), base_weights=session.base_weights)
        replay.checkout(EditLog(tmp_path / "history").head())
        assert live_deltas.keys() == replay.deltas.keys()
        assert all(torch.equal(live_deltas[k], replay.deltas[k]) for k in live_deltas)
        assert all(torch.equal(live_weights[n], weight_view(model, n)) for n in live_weights)
        assert _same(live_state, fresh.state_dict()), name


def test_an_entry_stores_factors_and_the_step_keys_not_the_matrices(model, model_and_stats, tokenizer, tmp_path):
    stats = model_and_stats[1]
    c_max = float(torch.linalg.eigvalsh(stats.get(mlp_out_name(model, 1)).matrix).max())
    for name in ("rome-eac", "alphaedit"):
        method = _methods(c_max)[name]()
        method.setup(model, tokenizer, stats)
        log = EditLog(tmp_path / name)
        session = EditSession(model, method, log)
        session.start({})
        result = edit(method, model, tokenizer, REQS[:2])
        ident = session.commit(Written(result.deltas, None, result.factors), step=1, position=2, requests=REQS[:2])
        header, tensors = log.entry(ident)
        for module, w in session.base_weights.items():
            out_dim, in_dim = w.shape
            assert header["updates"][module] == "low_rank"
            assert tensors[f"update/{module}/left"].shape == (out_dim, 2)  # one column per edit of the batch
            assert tensors[f"update/{module}/right"].shape == (2, in_dim)
        if name == "alphaedit":
            assert not any("null_kkt" in k for k in tensors)  # the r × r record is not stored per step
            assert {k for k in tensors if "written_keys" in k} == {f"method/written_keys/{m}" for m in
                                                                   method.module_names}
        matrices = sum(w.numel() * 4 for w in session.base_weights.values())
        assert log.entry_path(ident).stat().st_size < matrices / 2


def test_an_update_that_merely_broadcasts_is_refused(model, model_and_stats, tokenizer, tmp_path):
    method = ROME(layer=1, context=CTX, target=Z)
    method.setup(model, tokenizer, model_and_stats[1])
    log = EditLog(tmp_path / "history")
    session = EditSession(model, method, log)
    session.start({})
    name = method.module_names[0]
    row = torch.ones(1, session.base_weights[name].shape[1])  # (1, in): adding it would broadcast over every row
    bad = session.commit(Written({name: row}, None), step=1, position=1)
    with pytest.raises(EditLogError, match=r"shape \(1, \d+\).*nothing was loaded"):
        EditSession(model, method, EditLog(tmp_path / "history"), base_weights=session.base_weights).checkout(bad)


def test_editor_memory_per_edit_is_the_log_entry_and_an_empty_batch_is_refused(model, model_and_stats, tokenizer):
    editor = Editor(model, tokenizer, ROME(layer=1, context=CTX, target=Z), model_and_stats[1], snapshot_every=0)
    for r in REQS[:3]:
        editor.edit(r)
    (w,) = editor.session.base_weights.values()
    held = sum(t.numel() * t.element_size() for _, ts in editor.session.log._entries.values() for t in ts.values()
               if t.dim() == 2)
    assert held <= 3 * (w.shape[0] + w.shape[1]) * 4  # two vectors per ROME edit, no matrix copy
    with pytest.raises(ValueError, match="at least one EditRequest"):
        editor.edit([])
    assert editor.requests == REQS[:3]
    editor.undo()
    assert editor.requests == REQS[:2] and editor.edits_logged == 2


# ------------------------------------------------------------------------------------------------ the CLI
pytest_slow = pytest.mark.slow


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    run_cli("fit", "--config", str(write_config(root / "cfg.yaml", root / "run")))
    return root / "run"


def _kill(path: Path, steps: int = 2) -> Path:
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "run_probes.KillAfter", "init_args": {"steps": steps}}]}}))
    return path


def _equal_deltas(a: Path, b: Path) -> bool:
    da, db = current_deltas(a), current_deltas(b)
    return da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


@pytest_slow
def test_rollback_then_resume_equals_an_uninterrupted_run(straight, tmp_path):
    root = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", root)
    run_cli("fit", "--config", str(cfg))
    run_cli("rollback", str(root), "--to-edit", "2")
    assert not _equal_deltas(root, straight)
    journal = [json.loads(l) for l in (root / "history" / "log.jsonl").read_text().splitlines()]
    assert journal[-1]["event"] == "head" and journal[-1]["reason"] == "rollback"
    run_cli("fit", "--config", str(cfg), "--ckpt_path", "last")
    assert _equal_deltas(root, straight)
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]
    from eac_lightning.lightning.run_folder import read_ledger

    ledger = read_ledger(root / "edits.jsonl")
    assert [r["edit"] for r in ledger if "edit" in r] == [0, 1, 2, 3] and ledger[2]["event"] == "rollback"


@pytest_slow
def test_resume_from_a_moved_or_respelled_run_folder_keeps_one_current_model(straight, tmp_path):
    first = tmp_path / "first"
    cfg = write_config(tmp_path / "cfg.yaml", first)
    assert run_cli("fit", "--config", str(cfg), "--config", str(_kill(tmp_path / "k.yaml")), check=False).returncode
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(first), moved)
    # The moved folder, under another spelling (a symlink and a '..' detour) and with a stale lock of the kill.
    link = tmp_path / "link"
    link.symlink_to(moved)
    spelled = tmp_path / "elsewhere" / ".." / "link"
    # Resuming it under the old root refuses (its checkpoints are gone there) ...
    assert run_cli("fit", "--config", str(cfg), "--ckpt_path", "last", check=False).returncode
    # ... and the checkpoint of another run folder is not resumed into this one.
    other = run_cli("fit", "--config", str(cfg), "--ckpt_path", str(moved / "checkpoints" / "last.ckpt"),
                    check=False)
    assert other.returncode != 0 and "belongs to the run folder" in other.stderr
    run_cli("fit", "--config", str(cfg), "--trainer.default_root_dir", str(spelled), "--ckpt_path", "last")
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt
    head = (moved / "history" / "HEAD").read_text().strip()
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=False)["eac_lightning"]["head"] == head
    assert _equal_deltas(moved, straight)


@pytest_slow
def test_readers_check_the_run_and_export_never_overwrites(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    # ask reads past a rollback event and a last line cut short.
    with open(run / "edits.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "rollback", "to_edit": 4, "removed": []}) + "\n")
        fh.write('{"step": 5, "edit": 4, "sou')
    proc = run_cli("ask", str(run), "--edits", "2")
    assert proc.stdout.count("unedited:") == 2
    proc = run_cli("ask", str(run), "The Eiffel Tower is located in", "Paris is the capital of")  # as README shows
    assert "Paris is the capital of" in proc.stdout and proc.stdout.count("edited:") == 4
    # export: never onto an existing file or into a non-empty folder unless told.
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    for target, why in ((tmp_path / "file", "is a file"), (tmp_path / "full", "not empty")):
        proc = run_cli("export", str(run), str(target), check=False)
        assert proc.returncode != 0 and why in proc.stderr
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "full" / "keep.txt").read_text() == "x"
    run_cli("export", str(run), str(tmp_path / "full"), "--overwrite", "true")
    assert (tmp_path / "full" / "config.json").exists() and (tmp_path / "full" / "keep.txt").exists()


@pytest_slow
def test_a_run_of_another_base_model_is_refused(tmp_path, tokenizer):
    """A log whose base-model fingerprint is not the model it names (another model saved under that folder)."""
    from eac_lightning.lightning.checkpoint import CheckpointMismatchError, model_fingerprint
    from eac_lightning.lightning.export import load_edited_model
    from eac_lightning.methods.base import snapshot

    folder = tmp_path / "model"
    make_tiny_model("gpt2", len(tokenizer), seed=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    other = make_tiny_model("gpt2", len(tokenizer), seed=6)
    name = mlp_out_name(other, 1)
    method = ROME(layer=1)
    method.module_names = [name]
    session = EditSession(other, method, EditLog(tmp_path / "run" / "history"))
    session.start({"model": str(folder), "dtype": "float32", "method": {"class": "ROME", "hparams": {}},
                   "base_model": model_fingerprint(other, snapshot(other, [name]))})
    with pytest.raises(CheckpointMismatchError, match="edit log .* belongs to another run: field 'base_model"):
        load_edited_model(tmp_path / "run")


@pytest_slow
def test_a_longer_stream_on_resume_is_refused_naming_the_setting(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    cfg = write_config(tmp_path / "cfg.yaml", run)
    proc = run_cli("fit", "--config", str(cfg), "--ckpt_path", "last", "--data.num_edits", "6", check=False)
    assert proc.returncode != 0 and "--data.num_edits 6 differs from the 4" in proc.stderr
    assert _equal_deltas(run, straight)


def test_a_step_that_cannot_be_logged_leaves_weights_and_method_state_as_they_were(model, model_and_stats, tokenizer,
                                                                                  tmp_path, monkeypatch):
    stats = model_and_stats[1]
    c_max = float(torch.linalg.eigvalsh(stats.get(mlp_out_name(model, 1)).matrix).max())
    method = _methods(c_max)["alphaedit"]()
    method.setup(model, tokenizer, stats)
    log = EditLog(tmp_path / "history")
    session = EditSession(model, method, log)
    session.start({})
    result = edit(method, model, tokenizer, REQS[:2], restore=session.materialise)
    session.commit(Written(result.deltas, None, result.factors), step=1, position=2, requests=REQS[:2])
    weights = {n: weight_view(model, n).clone() for n in method.module_names}
    state, head = method.state_dict(), log.head()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    result = edit(method, model, tokenizer, REQS[2:4], restore=session.materialise)  # written in place, state moved
    monkeypatch.setattr(log, "append", full_disk)
    with pytest.raises(OSError, match="No space left"):
        session.commit(Written(result.deltas, None, result.factors), step=2, position=4, requests=REQS[2:4])
    assert log.head() == head
    assert all(torch.equal(weights[n], weight_view(model, n)) for n in weights)
    assert _same(state, method.state_dict())


def test_a_setting_added_since_the_checkpoint_resumes_at_its_default_and_is_refused_otherwise():
    """A checkpoint written before a setting existed lacks it: at the value that means "left alone" (its default)
    the run is the same run and resumes; set to anything else it is another method, refused naming the setting."""
    import dataclasses

    from eac_lightning.lightning.checkpoint import CheckpointMismatchError, method_spec, verify_provenance
    from eac_lightning.methods.beac import BEAC_SETTINGS

    base = {"config_sha256": "c", "weights_sha256": {}}
    method = BEAC()
    older = method_spec(method)
    del older["hparams"]["beac"]["refresh_replaces_key"]  # as a checkpoint of a version without the setting
    del older["added"]
    verify_provenance("ckpt", {"base_model": base, "method": older}, {"base_model": base, "method": method_spec(method)})
    changed = BEAC(beac=dataclasses.replace(BEAC_SETTINGS, refresh_replaces_key=True))
    with pytest.raises(CheckpointMismatchError, match=r"field 'method\.beac\.refresh_replaces_key' was 'absent' there "
                       r"but is True here \(a setting added since .* --model\.method\.init_args\.beac\."
                       r"refresh_replaces_key False continues the run as it was\)"):
        verify_provenance("ckpt", {"base_model": base, "method": older},
                          {"base_model": base, "method": method_spec(changed)})
    # a setting both sides have is compared as before, named by its path
    other = BEAC(beac=dataclasses.replace(BEAC_SETTINGS, refresh=0.5))
    with pytest.raises(CheckpointMismatchError, match=r"field 'method\.beac\.refresh' was 1\.0"):
        verify_provenance("ckpt", {"base_model": base, "method": method_spec(method)},
                          {"base_model": base, "method": method_spec(other)})
