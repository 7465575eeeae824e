"""Faults, hostile files and bad input: each case ends in a clear refusal or a correct result with nothing lost.
Bounded: one 4-edit run on testbed:tiny is shared; the other CLI calls resume it, are refused before any model loads,
or run at most 4 edits."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from cli_tools import current_deltas, run_cli, write_config

from eac_lightning.data.datamodule import EditDataModule
from eac_lightning.data.requests import (
    MAX_FIELD_CHARS,
    EditRequest,
    MalformedRequestError,
)
from eac_lightning.data.sources import load_requests
from eac_lightning.lightning.checkpoint import (
    AtomicCheckpointIO,
    UnsafeCheckpointError,
    load_checkpoint_file,
)
from eac_lightning.lightning.run_folder import (
    RunFolderLockedError,
    RunLock,
    read_ledger,
)
from eac_lightning.methods.edit import edit
from eac_lightning.paths import data_dir

REPO = Path(__file__).resolve().parents[1]
KEY = "eac_lightning"


# ------------------------------------------------------------------------------------------------------ helpers
def kill_config(path: Path, steps: int = 2) -> Path:
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "run_probes.KillAfter", "init_args": {"steps": steps}}]}}))
    return path


def deltas(run: Path) -> dict[str, torch.Tensor]:
    return current_deltas(run)


def entry_file(run: Path) -> Path:
    """The edit-log entry of the run's HEAD."""
    head = (run / "history" / "HEAD").read_text().strip()
    return run / "history" / "entries" / f"{head}.safetensors"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    cfg = yaml.safe_load((run.parent / "cfg.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(to)
    (to.parent / f"{to.name}.yaml").write_text(yaml.safe_dump(cfg))
    return to.parent / f"{to.name}.yaml"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    run_cli("fit", "--config", str(write_config(root / "cfg.yaml", root / "run")))
    return root / "run"


class Payload:
    """Unpickling this creates ``marker``: a checkpoint that runs code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------- 1. checkpoints never run code
@pytest.mark.slow
def test_pickled_payload_is_refused_unexecuted(full_run, tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({KEY: {"deltas": {}, "payload": Payload(marker)}}, evil)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt.*refused without running"):
        load_checkpoint_file(evil)
    with pytest.raises(ValueError, match="weights_only=False"):
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    proc = run_cli("export", str(evil), str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "evil.ckpt" in proc.stderr and "refused" in proc.stderr
    # Resuming a run folder whose last.ckpt was replaced.
    cfg = copy_run(full_run, tmp_path / "run")
    shutil.copy(evil, tmp_path / "run" / "checkpoints" / "last.ckpt")
    proc = run_cli("fit", "--config", str(cfg), "--ckpt_path", "last", check=False)
    assert proc.returncode != 0 and "last.ckpt" in proc.stderr and "refused" in proc.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------ 2. corrupted deltas are refused
@pytest.mark.slow
def test_flipped_bytes_altered_values_and_nan_in_the_edit_log_are_refused(full_run, tmp_path):
    from eac_lightning.lightning.export import export_command
    from eac_lightning.session import EditLog, EditLogError
    from eac_lightning.session.log import read_record

    run = tmp_path / "run"
    copy_run(full_run, run)
    entry = entry_file(run)
    raw = entry.read_bytes()
    flipped = raw[:-40] + bytes([raw[-40] ^ 0xFF]) + raw[-39:]  # a byte of the last stored tensor
    entry.write_bytes(flipped)
    with pytest.raises(EditLogError, match=f"{entry.name}.*sha256"):
        export_command(str(run), str(tmp_path / "out"))
    entry.write_bytes(raw)
    # An altered value whose checksums were recomputed is a different entry: its id no longer matches the name.
    header, tensors = read_record(entry)
    key = next(k for k in tensors if k.startswith("update/"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = 1e30
    log = EditLog(run / "history")
    forged = log.append({k: v for k, v in header.items() if k not in ("id", "format", "tensors")}, tensors)
    (run / "history" / "entries" / f"{forged}.safetensors").replace(entry)
    (run / "history" / "HEAD").write_text(header["id"] + "\n")
    with pytest.raises(EditLogError, match=f"holds entry {forged[:16]}, not {header['id'][:16]}"):
        export_command(str(run), str(tmp_path / "out"))
    entry.write_bytes(raw)
    # A consistent entry (its own id, checksums and parent) holding NaN is refused by ask and export alike.
    tensors[key].view(-1)[0] = float("nan")
    nan = log.append({**{k: v for k, v in header.items() if k not in ("id", "format", "tensors")}}, tensors)
    for command in ("export", "ask"):
        args = (str(run), str(tmp_path / "out")) if command == "export" else (str(run), "--prompt", "Paris is in")
        proc = run_cli(command, *args, check=False)
        assert proc.returncode != 0 and "NaN or inf" in proc.stderr and nan[:16] in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fuzzed_edit_log_bytes_never_load_altered_deltas(full_run, tmp_path):
    from eac_lightning.session import EditLogError

    run = tmp_path / "run"
    copy_run(full_run, run)
    original = deltas(run)
    entry = entry_file(run)
    raw = entry.read_bytes()
    rng = random.Random(0)
    for _ in range(25):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        entry.write_bytes(bytes(data))
        try:
            loaded = deltas(run)
        except EditLogError:
            continue
        for k, d in original.items():  # loaded: the bytes hit nothing that matters
            assert torch.equal(loaded[k], d)


# ------------------------------------------------------------------- 3. NaN and degenerate edits are rejected
@pytest.fixture(scope="module")
def testbed_model(tiny_testbed):
    from eac_lightning.models.loading import load_model

    return load_model(str(tiny_testbed))


def test_non_finite_or_zero_target_rejects_the_edit(testbed_model):
    from eac_lightning.methods import ROME
    from eac_lightning.methods.target import (
        ContextTemplateParams,
        EditOptimisationError,
        TargetHyperParams,
    )

    model, tok = testbed_model
    req = EditRequest(prompt="{} is located in", subject="Paris", target_new="Tokyo", source="t", source_index=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for lr, why in ((float("inf"), "NaN/inf|non-finite"), (1e30, "zero|NaN/inf|non-finite")):
        hp = TargetHyperParams(num_steps=2)  # two forwards, one update (the published loop)
        hp.lr = lr  # refused when built; set afterwards, the optimisation itself produces the fault
        method = ROME(layer=0, target=hp, context=ContextTemplateParams(length_count=[[3, 1]]), mom2_adjustment=False)
        method.setup(model, tok)
        with pytest.raises(EditOptimisationError, match=rf"t \(row 3\).*({why}).*nothing was applied"):
            edit(method, model, tok, [req])
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="clamp_norm_factor must be > 0"):
        TargetHyperParams(clamp_norm_factor=0)


def test_infinite_learning_rate_is_refused_at_config_time(tmp_path, capsys):
    # in this process: a fresh process's refusal is tests/test_cli_errors.py's (a subprocess costs ~20 s under load)
    from eac_lightning.lightning.cli import main

    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(cfg), "--model.method.init_args.target.lr", "inf"])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and "lr" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------- 4. resume verifies what a checkpoint is for
@pytest.mark.slow
def test_resume_refuses_another_method_data_or_base_model(full_run, tmp_path):
    cfg = copy_run(full_run, tmp_path / "run")
    cases = [
        (["--model.method.init_args.eac.gamma", "90"], "method.eac"),
        (["--model.method.init_args.eac", "null"], "method.eac"),
        (["--model.method", "eac_lightning.methods.MEMIT"], "'method'"),
        (["--data.seed", "1"], "data.seed"),
    ]
    for args, field in cases:
        proc = run_cli("fit", "--config", str(cfg), "--ckpt_path", "last", *args, check=False)
        out = proc.stderr + proc.stdout
        assert proc.returncode != 0 and field in out and "last.ckpt" in out, (args, out[-2000:])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint_file(last)
    for name in ckpt[KEY]["provenance"]["base_model"]["weights_sha256"]:
        ckpt[KEY]["provenance"]["base_model"]["weights_sha256"][name] = "0" * 64
    torch.save(ckpt, last)
    proc = run_cli("fit", "--config", str(cfg), "--ckpt_path", "last", check=False)
    assert proc.returncode != 0 and "base_model.weights_sha256" in proc.stderr
    # A deliberate change of method is allowed by the flag.
    shutil.copy(full_run / "checkpoints" / "last.ckpt", last)
    run_cli("fit", "--config", str(cfg), "--ckpt_path", "last", "--model.method.init_args.eac.gamma", "90",
            "--model.allow_method_change", "true")


# ------------------------------------------------------------- 5, 9. records checked before the first edit
def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [{"prompt": "{} is located in", "subject": s, "target_new": t, "case_id": i}
        for i, (s, t) in enumerate([("Paris", "Rome"), ("Oslo", "Lima"), ("Kyiv", "Bern"), ("Riga", "Baku")])]


def test_over_long_records_are_refused_or_skipped_before_any_edit(tmp_path, tokenizer):
    long = {"prompt": "{} is " + "very " * 200 + "located in", "subject": "Cairo", "target_new": "Quito",
            "case_id": 9}
    path = _jsonl(tmp_path / "d.jsonl", [GOOD[0], long, *GOOD[1:]])
    dm = EditDataModule(path=str(path), num_edits=3, shuffle=False, num_retention=0)
    dm.setup("fit")
    with pytest.raises(MalformedRequestError, match=r"d.jsonl \(row 1, case_id 9\).*'prompt'.*context of 64"):
        dm.screen(tokenizer, 64, "Some context. {}")
    dm = EditDataModule(path=str(path), num_edits=3, shuffle=False, num_retention=0, skip_malformed=True)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="row 1"):
        dm.screen(tokenizer, 64, "Some context. {}")
    assert [r.source_index for r in dm.requests] == [0, 2, 3]  # the next record takes the skipped one's place
    assert [s["row"] for s in dm.skipped] == [1]


def test_data_edge_cases_give_clear_messages(tmp_path):
    mixed = _jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "{} is in", "subject": 42, "target_new": "Paris"},  # numeric subject
        GOOD[0],
        {"src": "Where is {}?", "subject": "Oslo", "alt": "Norway", "loc": "x", "loc_ans": "y"},  # ZsRE row
    ])
    with pytest.raises(MalformedRequestError, match=r"row 0\).*'subject'.*int 42"):
        load_requests(mixed)
    skipped = []
    with pytest.warns(UserWarning):
        got = load_requests(mixed, skip_malformed=True, skipped=skipped)
    assert [r.subject for r in got] == ["Paris", "Oslo"] and [s["row"] for s in skipped] == [0]
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(MalformedRequestError, match=r"broken.jsonl.*line 2 column \d+: Expecting value"):
        load_requests(tmp_path / "broken.jsonl")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(MalformedRequestError, match="empty.json: is empty"):
        load_requests(tmp_path / "empty.json")
    with pytest.raises(FileNotFoundError, match="nowhere/edits.json does not exist"):
        load_requests("nowhere/edits.json")
    huge = _jsonl(tmp_path / "huge.jsonl", [{**GOOD[0], "target_new": "x" * (3 * 1024 * 1024)}])
    with pytest.raises(MalformedRequestError, match=f"'target_new' has .* more than the {MAX_FIELD_CHARS}"):
        load_requests(huge)
    dup = _jsonl(tmp_path / "dup.jsonl", [GOOD[0], GOOD[1], GOOD[0]])
    with pytest.warns(UserWarning, match="duplicate case ids.*case_id 0 \\(2 times\\)"):
        EditDataModule(path=str(dup), num_edits=None, num_retention=0).setup("fit")


def test_fuzzed_records_are_loaded_or_skipped_never_crash(tmp_path):
    rng = random.Random(0)
    values = [None, 0, 3.5, True, "", "  ", "x", "{}", "{} is in", ["a", 1], {"str": 5}, {"str": "y"}, [], "é" * 3]
    keys = ["prompt", "subject", "target_new", "target_true", "paraphrase_prompts", "neighborhood_prompts",
            "neighborhood_answers", "case_id", "src", "alt", "requested_rewrite", "rephrase_prompt", "loc"]
    rows = []
    for _ in range(300):
        row = dict(GOOD[0]) if rng.random() < 0.5 else {}
        for k in rng.sample(keys, rng.randint(1, 5)):
            row[k] = rng.choice(values)
        rows.append(row)
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(rows))
    skipped: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = load_requests(path, skip_malformed=True, skipped=skipped)
    assert len(got) + len(skipped) == len(rows)
    for r in got:
        r.validate()


# ------------------------------------------------------------------------ 8. arguments are validated by name
@pytest.mark.parametrize("make, name", [
    (lambda: EditDataModule(batch_size=0), "data.batch_size"),
    (lambda: EditDataModule(batch_size=-1), "data.batch_size"),
    (lambda: EditDataModule(num_edits=-2), "data.num_edits"),
    (lambda: EditDataModule(num_edits=2.5), "data.num_edits"),
    (lambda: EditDataModule(num_retention=-1), "data.num_retention"),
    (lambda: __import__("eac_lightning.methods.eac", fromlist=["x"]).EACHyperParams(gamma=101), "gamma"),
    (lambda: __import__("eac_lightning.methods.eac", fromlist=["x"]).EACHyperParams(gamma=0), "gamma"),
    (lambda: __import__("eac_lightning.methods.eac", fromlist=["x"]).EACHyperParams(lam=-1e-3), "lam"),
    (lambda: __import__("eac_lightning.methods.eac", fromlist=["x"]).EACHyperParams(mu=-0.5), "mu"),
    (lambda: __import__("eac_lightning.methods.target", fromlist=["x"]).TargetHyperParams(weight_decay=-1),
     "weight_decay"),
    (lambda: __import__("eac_lightning.methods.target", fromlist=["x"]).TargetHyperParams(lr=float("nan")), "lr"),
    (lambda: __import__("eac_lightning.methods.ft", fromlist=["x"]).FTHyperParams(lr=float("inf")), "lr"),
    (lambda: __import__("eac_lightning.methods", fromlist=["x"]).MEMIT(mom2_update_weight=-1),
     "mom2_update_weight"),
])
def test_bad_arguments_are_refused_by_name(make, name):
    with pytest.raises(ValueError, match=name):
        make()
    assert EditDataModule(num_edits=-1).num_edits is None  # -1: every record


# ------------------------------------------------------------ 6, 7, 10. run folder: lock, history, faults
@pytest.mark.slow
def test_run_folder_lock(tmp_path, full_run):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        with pytest.raises(RunFolderLockedError, match=f"in use by process {sleeper.pid}"):
            RunLock(tmp_path).acquire()
        cfg = copy_run(full_run, tmp_path / "run")
        shutil.copy(tmp_path / ".lock", tmp_path / "run" / ".lock")
        proc = run_cli("fit", "--config", str(cfg), "--ckpt_path", "last", check=False)
        assert proc.returncode != 0 and "in use by process" in proc.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(UserWarning, match="stale lock"):  # its process is gone
        lock = RunLock(tmp_path)
        lock.acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_full_disk_keeps_the_previous_checkpoint_and_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"a": torch.ones(2)}, path)

    def full_disk(obj, f):
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed, unexpected pos 64 vs 128")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="cannot write checkpoint .*last.ckpt .*disk is full.*previous checkpoint"):
        AtomicCheckpointIO().save_checkpoint({"a": torch.zeros(2)}, path)
    assert list(tmp_path.iterdir()) == [path]
    assert torch.equal(load_checkpoint_file(path)["a"], torch.ones(2))


@pytest.mark.slow
def test_kill_resume_keeps_history_skips_bad_records_and_tolerates_a_cut_ledger_line(tmp_path, full_run):
    records = json.loads((data_dir() / "counterfact" / "counterfact_500.json").read_text())[:5]
    bad_subject = json.loads(json.dumps(records[0]))
    bad_subject["requested_rewrite"]["subject"] = 1234
    too_long = json.loads(json.dumps(records[1]))
    too_long["requested_rewrite"]["prompt"] = "{} " + "and so on " * 150 + "is in"
    data = tmp_path / "edits.json"
    data.write_text(json.dumps([bad_subject, records[2], too_long, records[3], records[4]]))
    root = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", root, num_edits=3,
                       extra={"data": {"path": str(data), "shuffle": False, "skip_malformed": True, "num_retention": 0}})
    assert run_cli("fit", "--config", str(cfg), "--config", str(kill_config(tmp_path / "k.yaml")),
                   check=False).returncode
    with open(root / "edits.jsonl", "a") as fh:
        fh.write('{"step": 3, "edit": 2, "sou')  # a line cut short by the kill
    proc = run_cli("fit", "--config", str(cfg), "--ckpt_path", "last")
    assert "cut short" in proc.stderr
    ledger = read_ledger(root / "edits.jsonl")
    assert [r["edit"] for r in ledger] == [0, 1, 2]
    assert [r["source_index"] for r in ledger] == [1, 3, 4]
    metrics = (root / "metrics.csv").read_text().splitlines()
    steps = [int(float(r.split(",")[-1])) for r in metrics[1:]]
    assert steps == [0, 2, 3]  # the unedited baseline and the pre-kill evaluation survive the resume
    summary = json.loads((root / "summary.json").read_text())
    assert summary["edits_applied"] == 3
    assert sorted(s["row"] for s in summary["skipped_records"]) == [0, 2]
    assert not (root / ".lock").exists()


@pytest.mark.slow
def test_a_chosen_logger_keeps_the_run_resumable(tmp_path):
    root = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", root, num_edits=3)
    logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root)]
    assert run_cli("fit", "--config", str(cfg), "--config", str(kill_config(tmp_path / "k.yaml")), *logger,
                   check=False).returncode
    assert (root / "checkpoints" / "last.ckpt").exists() and (root / "edits.jsonl").exists()
    run_cli("fit", "--config", str(cfg), "--ckpt_path", "last", *logger)
    assert [r["edit"] for r in read_ledger(root / "edits.jsonl")] == [0, 1, 2]
    refused = run_cli("fit", "--config", str(write_config(tmp_path / "c2.yaml", tmp_path / "none")),
                      "--ckpt_path", "last", check=False)
    assert refused.returncode != 0 and "nothing to resume" in refused.stderr


# ------------------------------------------------------------------------------------------------ rollback
@pytest.mark.slow
def test_rollback_is_bit_identical_to_a_run_stopped_there_and_replays_without_dropped(full_run, tmp_path):
    from eac_lightning.lightning.rollback import rollback

    stopped = tmp_path / "stopped"
    run_cli("fit", "--config", str(write_config(tmp_path / "s.yaml", stopped, num_edits=2)))
    cfg = copy_run(full_run, tmp_path / "run")
    run = tmp_path / "run"
    before = read_ledger(run / "edits.jsonl")
    with pytest.raises(ValueError, match="--drop \\[1\\]"):
        rollback(run, 2, drop=[1])
    event = rollback(run, 2, drop=[2])
    a, b = deltas(run), deltas(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["edit"] for r in event["removed"]] == [2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    # Replay: the dropped record (ledger edit 2) is left out, the rest follows.
    run_cli("fit", "--config", str(cfg), "--ckpt_path", "last")
    after = read_ledger(run / "edits.jsonl")
    assert after[2]["event"] == "rollback" and after[2]["to_edit"] == 2
    edits = [r for r in after if "edit" in r]
    assert [r["source_index"] for r in edits] == [r["source_index"] for r in before[:2]] + [before[3]["source_index"]]
    proc = run_cli("rollback", str(run), "--to-edit", "9", check=False)
    assert proc.returncode != 0 and "holds only 3 edits" in proc.stderr
