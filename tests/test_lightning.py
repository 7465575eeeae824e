"""The Lightning system through its CLI, as a user runs it: fit, kill-and-resume, DDP, validate, export, and the
failure cases (corrupt checkpoint, an occupied run folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_tools import current_deltas, run_cli, write_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def load_deltas(root: Path) -> dict[str, torch.Tensor]:
    return current_deltas(root)


def method_state_at_head(root: Path) -> dict:
    """The method's whole state in the snapshot a finished fit writes at its HEAD."""
    from eac_lightning.session import EditLog
    from eac_lightning.session.log import unflatten

    log = EditLog(root / "history")
    header, tensors = log.snapshot(log.head())
    return unflatten(header["method"], tensors)


def ledger(root: Path) -> list[dict]:
    return [json.loads(l) for l in (root / "edits.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    cfg = write_config(root / "cfg.yaml", root / "run")
    run_cli("fit", "--config", str(cfg))
    return root / "run"


def test_fit_writes_every_output(full_run):
    for name in ("config.yaml", "edits.jsonl", "metrics.csv", "norms.csv", "summary.json",
                 "plots/norms.png", "plots/metrics.png", "checkpoints/last.ckpt"):
        assert (full_run / name).exists(), name
    summary = json.loads((full_run / "summary.json").read_text())
    assert set(summary) == {"method", "method_settings", "model", "edits_applied", "batch_size", "edit_metrics",
                            "edit_metrics_variants", "general", "norms", "seconds_per_edit", "wall_seconds",
                            "skipped_records", "phase_seconds", "phase_seconds_first_step", "edit_steps"}
    # where the time went: the edit steps counted, each phase timed
    assert summary["edit_steps"] == 4 and summary["phase_seconds"]["target"] > 0
    assert {"setup", "target", "keys", "solve", "write", "evaluation"} <= set(summary["phase_seconds"])
    assert summary["edits_applied"] == 4
    # teacher-forced (EAC Eqs. 10-12) and, beside them, live decoding (WILD), on by default
    assert set(summary["edit_metrics"]) == {"reliability", "generalization", "locality", "live_rel", "live_gen",
                                            "live_loc"}
    header = (full_run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"edit/live_rel", "edit/live_gen", "edit/live_loc"} <= set(header)
    assert set(summary["general"]["sst2"]) == {"before", "after"}
    (norms,) = summary["norms"].values()
    assert norms["l1_after"] != norms["l1_before"]
    rows = ledger(full_run)
    assert [r["edit"] for r in rows] == [0, 1, 2, 3]
    assert all(r["case_id"] is not None and r["source_index"] is not None for r in rows)


def test_checkpoint_holds_no_weights_and_stands_at_the_edit_log_head(full_run):
    ckpt = torch.load(full_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] == {}
    state = ckpt["eac_lightning"]
    assert "deltas" not in state and "method_state" not in state
    assert state["head"] == (full_run / "history" / "HEAD").read_text().strip()
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["last.ckpt"]
    journal = [json.loads(l) for l in (full_run / "history" / "log.jsonl").read_text().splitlines()]
    assert [r["position"] for r in journal] == [0, 1, 2, 3, 4]  # the root, then one entry per edit step
    (name,) = current_deltas(full_run)
    assert name == "transformer.h.0.mlp.c_proj"


def test_kill_and_resume_equals_uninterrupted(full_run, tmp_path):
    root = tmp_path / "run"
    base = write_config(tmp_path / "cfg.yaml", root)
    killer = tmp_path / "kill.yaml"
    killer.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "run_probes.KillAfter", "init_args": {"steps": 2}}]}}))
    proc = run_cli("fit", "--config", str(base), "--config", str(killer), check=False)
    assert proc.returncode != 0  # SIGKILL, not a clean stop
    head = (root / "history" / "HEAD").read_text().strip()
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["eac_lightning"]["head"] == head
    # A fresh fit into the same folder refuses to overwrite the checkpoints.
    refused = run_cli("fit", "--config", str(base), check=False)
    assert refused.returncode != 0 and "--ckpt_path last" in refused.stderr + refused.stdout
    run_cli("fit", "--config", str(base), "--ckpt_path", "last")
    resumed, uninterrupted = load_deltas(root), load_deltas(full_run)
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:  # the log replayed on resume: bit-identical
        assert torch.equal(resumed[k], uninterrupted[k])
    rows = ledger(root)
    assert [r["edit"] for r in rows] == [0, 1, 2, 3]  # nothing applied twice, nothing skipped


def test_sigterm_stops_within_seconds_and_the_run_resumes(tmp_path):
    """SIGTERM mid-stream stops the run within seconds (as Ctrl-C: Lightning alone would finish the epoch, i.e. the
    whole stream), and the run resumes from its last checkpoint with every edit once in the ledger."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", root, num_edits=12)
    proc = subprocess.Popen([sys.executable, "-m", "eac_lightning.lightning.cli", "fit", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not ((root / "edits.jsonl").exists() and (root / "edits.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first edit"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    proc.wait(timeout=60)
    assert time.time() - sent < 15 and proc.returncode != 0
    run_cli("fit", "--config", str(cfg), "--ckpt_path", "last")
    assert [r["edit"] for r in ledger(root)] == list(range(12))


def test_a_run_stopped_before_its_first_checkpoint_starts_over_with_ckpt_path_last(tmp_path):
    """SIGTERM between the first ledger line and the first checkpoint: ``--ckpt_path last`` starts the run over
    (a fresh start would refuse the edit log left there), keeps the stopped run's records aside, and the ledger ends
    with every edit once."""
    root = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", root, num_edits=3)
    term = tmp_path / "term.yaml"
    term.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "run_probes.TermAtFirstCheckpoint"}]}}))
    assert run_cli("fit", "--config", str(cfg), "--config", str(term), check=False).returncode != 0
    assert (root / "history" / "HEAD").is_file() and not (root / "checkpoints" / "last.ckpt").exists()
    assert [r["edit"] for r in ledger(root)] == [0]
    proc = run_cli("fit", "--config", str(cfg), "--ckpt_path", "last")
    assert "stopped before its first checkpoint" in proc.stderr
    assert [r["edit"] for r in ledger(root)] == [0, 1, 2]
    (aside,) = (root / "interrupted").iterdir()
    assert [json.loads(x)["edit"] for x in (aside / "edits.jsonl").read_text().splitlines()] == [0]
    assert (aside / "history" / "HEAD").is_file()


def test_corrupt_checkpoint_is_named_and_not_overwritten(full_run, tmp_path):
    bad = tmp_path / "bad.ckpt"
    good = (full_run / "checkpoints" / "last.ckpt").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    proc = run_cli("validate", "--config", str(cfg), "--ckpt_path", str(bad), check=False)
    assert proc.returncode != 0
    assert "bad.ckpt" in proc.stderr and "corrupt" in proc.stderr
    assert bad.read_bytes() == good[: len(good) // 2]


def test_validate_and_export(full_run, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "val")
    proc = run_cli("validate", "--config", str(cfg), "--ckpt_path", str(full_run / "checkpoints" / "last.ckpt"))
    assert "edit/reliability" in proc.stdout
    assert json.loads((tmp_path / "val" / "summary.json").read_text())["edits_applied"] == 4
    out = tmp_path / "exported"
    run_cli("export", str(full_run), str(out))
    from transformers import AutoModelForCausalLM

    from eac_lightning.models.loading import load_model

    edited = AutoModelForCausalLM.from_pretrained(out)
    base, _ = load_model("testbed:tiny")
    (name, delta), = load_deltas(full_run).items()
    w_e = edited.get_submodule(name).weight.T  # GPT-2 Conv1D: (in, out) stored
    w_b = base.get_submodule(name).weight.T
    assert torch.allclose(w_e - w_b, delta, atol=1e-5)


def test_ddp_two_processes_match_single_process(full_run, tmp_path):
    probe = tmp_path / "probe.yaml"
    probe.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "run_probes.DumpWeights", "init_args": {"dir": str(tmp_path / "w")}}]}}))
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "ddp")
    run_cli("fit", "--config", str(cfg), "--config", str(probe), "--trainer.strategy", "ddp",
            "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    w0 = torch.load(tmp_path / "w" / "weights-rank0.pt")
    w1 = torch.load(tmp_path / "w" / "weights-rank1.pt")
    single = load_deltas(full_run)
    ddp = load_deltas(tmp_path / "ddp")
    for k in w0:
        assert torch.equal(w0[k], w1[k])  # computed once on rank 0 and broadcast: bit-identical
        # Each DDP rank runs with fewer intra-op threads than the single process, so float sums round in a
        # different order; the deltas agree to float32 precision, not bit for bit.
        scale = single[k].abs().max().item()
        assert (ddp[k] - single[k]).abs().max().item() <= 1e-5 * max(scale, 1.0)


def test_beac_kill_and_resume_equals_uninterrupted(tmp_path):
    """Batch-sequential B-EAC through the CLI: RAR's usage and key records and its refresh window travel in
    Lightning's checkpoint, so a run killed after two batches and resumed writes what an uninterrupted run writes."""
    method = {"class_path": "eac_lightning.methods.beac.BEACMEMIT",
              "init_args": {"target": {"num_steps": 4, "clamp_norm_factor": 4.0}, "context": {"length_count": [[5, 2]]},
                            "mom2_update_weight": 10.0, "eac": {"gamma": 80.0}, "beac": {"refresh": 0.5}}}
    extra = {"model": {"method": method}, "data": {"batch_size": 2}}
    runs = {}
    for name in ("full", "killed"):
        runs[name] = tmp_path / name
        write_config(tmp_path / f"{name}.yaml", runs[name], num_edits=6, extra=extra)
    run_cli("fit", "--config", str(tmp_path / "full.yaml"))
    killer = tmp_path / "kill.yaml"
    killer.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "run_probes.KillAfter", "init_args": {"steps": 2}}]}}))
    assert run_cli("fit", "--config", str(tmp_path / "killed.yaml"), "--config", str(killer), check=False).returncode
    run_cli("fit", "--config", str(tmp_path / "killed.yaml"), "--ckpt_path", "last")
    resumed, uninterrupted = (method_state_at_head(runs[n]) for n in ("killed", "full"))
    d_resumed, d_full = load_deltas(runs["killed"]), load_deltas(runs["full"])
    for k, delta in d_full.items():
        assert torch.equal(d_resumed[k], delta), k  # the log replayed on resume: bit-identical
    rec, rec_full = resumed["beac"], uninterrupted["beac"]
    assert rec["batches"] == rec_full["batches"] == 3
    torch.testing.assert_close(rec["usage"], rec_full["usage"])
    assert rec["refresh_record"] == rec_full["refresh_record"] and len(rec_full["refresh_record"]) == 3
    refreshed = [int(h["refreshed"]) for h in rec_full["history"]]
    assert rec["history"] == rec_full["history"] and refreshed[0] == 0 and sum(refreshed) > 0
    for k, r in rec_full["key_record"].items():  # each batch's edits and refreshed ones, decayed per batch
        assert r["weight"].tolist() == [0.8 ** 2] * (2 + refreshed[0]) + [0.8] * (2 + refreshed[1]) + [1.0] * (
            2 + refreshed[2])
        assert torch.equal(rec["key_record"][k]["cells"], r["cells"])
        assert torch.equal(rec["key_record"][k]["keys"], r["keys"])
    lines = ledger(runs["killed"])
    assert [r["edit"] for r in lines if "edit" in r] == list(range(6))
    # every write is recorded: the refreshed edits too, once each, though the run was killed and resumed
    again = [(r["step"], r["subject"]) for r in lines if r.get("refreshed")]
    assert len(again) == sum(refreshed) and again == [(r["step"], r["subject"]) for r in ledger(runs["full"])
                                                      if r.get("refreshed")]
    assert json.loads((runs["killed"] / "summary.json").read_text())["method"] == "B-EAC (MEMIT)"


def test_lightning_editor_and_edit_function_write_the_same_deltas(full_run):
    """The one edit path: the CLI run (training_step → WeightUpdate), the notebook Editor and a direct call of
    :func:`eac_lightning.methods.edit.edit` apply the same deltas to the same requests, and the ledger holds each
    edit's own norm and success as the edit function measures them."""
    from eac_lightning.data.datamodule import EditDataModule
    from eac_lightning.editor import Editor
    from eac_lightning.methods import (
        ROME,
        ContextTemplateParams,
        EACHyperParams,
        TargetHyperParams,
        edit,
    )
    from eac_lightning.models.loading import load_model
    from eac_lightning.stats.covariance import CovarianceStore

    dm = EditDataModule(path="counterfact", num_edits=4, num_retention=4)
    dm.setup()

    def method():
        return ROME(target=TargetHyperParams(num_steps=6), context=ContextTemplateParams(length_count=[[5, 2]]),
                    eac=EACHyperParams(gamma=80.0))

    model, tok = load_model("testbed:tiny")
    editor = Editor(model, tok, method(), CovarianceStore(model, tok, num_tokens=4000))
    by_editor = [editor.edit(r) for r in dm.requests]
    model, tok = load_model("testbed:tiny")
    direct_method = method()
    direct_method.setup(model, tok, CovarianceStore(model, tok, num_tokens=4000))
    direct = [edit(direct_method, model, tok, [r]) for r in dm.requests]
    (name, total), = load_deltas(full_run).items()
    # The Lightning run and the Editor share one edit session (W = W_base + D, D from the logged updates): equal.
    assert torch.equal(editor.session.deltas[name], total)
    summed = sum(r.deltas[name].float() for r in direct)
    # The direct calls add each update in place: later edits start from weights that differ in the last bit.
    assert (total - summed).abs().max().item() <= 1e-6 * max(total.abs().max().item(), 1.0)
    for a, b in zip(by_editor, direct):
        assert a.deltas.keys() == b.deltas.keys()
    rows = ledger(full_run)
    assert [row["success"] for row in rows] == [r.records[0].success for r in direct]
    for row, r in zip(rows, direct):
        assert row["delta_norm"] == pytest.approx(r.records[0].delta_norm, rel=1e-4)
        assert row["batch_delta_norm"] == pytest.approx(row["delta_norm"], rel=1e-6)  # one edit per batch


def test_help_lists_every_setting_and_only_fit_and_validate():
    out = run_cli("fit", "--help").stdout
    for field in ("gamma (default 85.0)", "lam (default 0.1)", "mu (default 0.05)", "max_overlap (default None)",
                  "clamp_norm_factor (default 4.0)", "norm_constraint (default 0.0005)", "length_count"):
        assert field in out, field
    for sub in ("test", "predict"):
        proc = run_cli(sub, "--help", check=False)
        assert proc.returncode != 0 and "invalid choice" in proc.stderr + proc.stdout


def test_an_evaluation_runs_when_the_stream_crosses_every_and_refreshed_edits_do_not_count():
    """``--eval.every 5000`` evaluates once at 5,000 edits: a batch of 100 that also writes 2 refreshed earlier edits
    (B-EAC) at stream position 5,100 crossed nothing."""
    from types import SimpleNamespace

    from eac_lightning.data.requests import EditRequest
    from eac_lightning.lightning.callbacks import Evaluation
    from eac_lightning.methods.edit import EditRecord, EditResult

    ev = Evaluation(every=5000)
    runs = []
    ev._run = lambda trainer, module: runs.append(trainer.datamodule.position) or {}
    ev._record = lambda trainer, module, res: None
    req = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome")
    for position in range(100, 10001, 100):
        records = [EditRecord(req, 1.0, True, 1.0)] * 100 + [EditRecord(req, 1.0, True, 1.0, refreshed=True)] * 2
        trainer = SimpleNamespace(datamodule=SimpleNamespace(position=position, requests=[req] * 20000))
        ev.on_edit_written(trainer, None, EditResult({}, records), 1.0)
    assert runs == [5000, 10000]


def test_freed_memory_goes_back_to_the_system_after_a_step_and_an_evaluation(monkeypatch):
    """glibc keeps what an evaluation freed unless asked (eac_lightning/lightning/memory.py): the step and the
    evaluation ask, so a long stream's resident memory is what it uses."""
    import ctypes.util
    import sys

    from eac_lightning.lightning import callbacks, memory

    if sys.platform.startswith("linux") and "musl" not in (ctypes.util.find_library("c") or ""):
        assert memory.release_freed_memory() is True
        big = torch.ones(64, 1024, 1024)  # 256 MB, freed below
        del big
        assert memory.release_freed_memory() is True
    calls = []
    monkeypatch.setattr(callbacks, "release_freed_memory", lambda: calls.append(1) or True)
    ev = callbacks.Evaluation(every=0)
    monkeypatch.setattr(ev, "_measure", lambda trainer, module: {"edit/reliability": 1.0})
    assert ev._run(None, None) == {"edit/reliability": 1.0} and calls == [1]
