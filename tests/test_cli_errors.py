"""Errors a user can act on: every deliberate refusal of ``eac-lightning`` ends with one line on stderr
(``eac-lightning: error: <message>``) and a non-zero exit, without a traceback unless ``--debug`` or
``EAC_DEBUG=1`` asks for it; an internal error keeps its traceback. Also: several devices without a strategy, a
lock held by an unrelated live process, an unwritable cache folder, and ``wall_seconds`` across a pause."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import types

import pytest
from cli_tools import REPO, write_config
from jsonargparse import Namespace

from eac_lightning.lightning import callbacks as callbacks_module
from eac_lightning.lightning import cli
from eac_lightning.lightning.callbacks import Evaluation
from eac_lightning.lightning.run_folder import RunFolderLockedError, RunLock
from eac_lightning.paths import cache_dir

GAMMA_101 = ["--model.method.init_args.eac.gamma", "101"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # main(args) is called in-process: keep pytest's own arguments out of what Lightning compares them with.
    monkeypatch.setattr(sys, "argv", ["eac-lightning"])
    monkeypatch.delenv("EAC_DEBUG", raising=False)


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """``main(args)`` in-process: its exit status and stderr (fails if it returns or raises anything else)."""
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    return info.value.code, capsys.readouterr().err


def assert_one_line(err: str, *names: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("eac-lightning: error: ")]
    assert len(lines) == 1, err[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------- one line, or --debug
def test_a_refused_value_is_one_line_naming_the_option(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    code, err = run_main(["fit", "--config", str(cfg), *GAMMA_101], capsys)
    # jsonargparse wraps the ValueError of EACHyperParams in its own; the line is the project's message
    line = assert_one_line(err, "gamma must be <= 100.0, got 101.0", "--model.method.init_args.eac.gamma")
    assert "Does not validate" not in line
    assert code == 2  # refused while the arguments were read: a usage error


def test_a_refusal_in_a_fresh_process_prints_no_traceback(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "EAC_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "eac_lightning.lightning.cli", "fit", "--config", str(cfg),
                           *GAMMA_101], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert_one_line(proc.stderr, "gamma")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    args = ["fit", "--config", str(cfg), *GAMMA_101]
    if how == "flag":
        args.insert(1, "--debug")  # anywhere on the command line
    else:
        monkeypatch.setenv("EAC_DEBUG", "1")
    with pytest.raises(ValueError, match="Does not validate") as info:
        cli.main(args)
    assert "gamma must be <= 100.0" in str(info.value)


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    def broken(argv, cli_args):
        raise TypeError("unsupported operand type(s) for +: 'Tensor' and 'NoneType'")

    monkeypatch.setattr(cli, "_dispatch", broken)
    with pytest.raises(TypeError, match="unsupported operand") as info:
        cli.main(["fit"])
    if sys.version_info >= (3, 11):
        assert any("internal error" in note for note in info.value.__notes__)


def test_a_refusal_raised_as_system_exit_gets_the_prefix(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    code, err = run_main(["fit", "--config", str(cfg), "--ckpt_path", "last"], capsys)
    assert code == 1
    assert_one_line(err, "last.ckpt does not exist", "nothing to resume")


def test_the_message_is_the_projects_own_not_its_cause(tmp_path):
    from eac_lightning.lightning.checkpoint import CorruptCheckpointError, load_checkpoint_file

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint_file(bad)
    refusal, usage = cli._refusal(info.value)
    assert refusal is info.value and not usage  # not the unpickling error it was raised from
    assert "bad.ckpt" in cli._message(refusal, [])


def test_an_os_error_names_its_file():
    err = FileNotFoundError(2, "No such file or directory", "/data/missing.json")
    assert cli._message(err, []) == "No such file or directory: /data/missing.json"


# ------------------------------------------------------------------------------ settings that moved: eval.* only
@pytest.mark.parametrize("where", ["command line", "config file", "config file after --model"])
def test_an_evaluation_setting_under_its_old_spelling_names_the_new_key(tmp_path, capsys, where):
    """What is measured was ``model.evaluation``; every evaluation setting is now in ``eval:``. The old spelling is
    refused before anything runs, naming the new key (and the file that holds the old one)."""
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    old = tmp_path / "old.yaml"
    if where == "command line":
        args, names = ["--model.evaluation.tasks", "[]"], ["--model.evaluation.tasks is now --eval.tasks"]
    elif where == "config file":
        old.write_text("model:\n  evaluation:\n    tasks: [sst2]\n")
        args, names = ["--config", str(old)], [str(old), "model.evaluation is now eval"]
    else:
        old.write_text("evaluation:\n  default_limit: 4\n")
        args, names = [f"--model={old}"], [str(old), "model.evaluation is now eval"]
    code, err = run_main(["fit", "--config", str(cfg), *args], capsys)
    assert_one_line(err, *names, "every evaluation setting", "is in eval:")
    assert code == 2
    assert not (tmp_path / "run").exists()  # refused before the run folder


def test_every_evaluation_setting_is_one_section_of_the_evaluation_callback():
    ev = Evaluation(every=5, tasks=["sst2"], live_max_new_tokens=20)
    assert (ev.every, ev.config.tasks, ev.config.live_max_new_tokens, ev.config.live_metrics) == (5, ["sst2"], 20, True)
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        Evaluation(tasks=["mnli"])
    with pytest.raises(ValueError, match="--eval.every must be an edit count >= 0"):
        Evaluation(every=-1)


# ------------------------------------------------------------------------------------- several devices, strategies
def _trainer(**kw) -> Namespace:
    return Namespace(**{"strategy": "auto", "devices": 1, "accelerator": "cpu", "num_nodes": 1, **kw})


@pytest.mark.parametrize("devices", [2, "2", [0, 1], "0,1"])
def test_several_devices_without_a_strategy_use_the_editing_ddp(devices):
    chosen = cli._editing_strategy(_trainer(devices=devices))
    assert chosen.class_path == "eac_lightning.lightning.strategy.EditingDDPStrategy"


def test_one_device_and_explicit_strategies_are_kept():
    assert cli._editing_strategy(_trainer()) == "auto"
    assert cli._editing_strategy(_trainer(strategy="single_device")) == "single_device"
    assert cli._editing_strategy(_trainer(strategy="ddp")).class_path.endswith("EditingDDPStrategy")
    assert cli._editing_strategy(_trainer(num_nodes=2)).class_path.endswith("EditingDDPStrategy")


def test_a_wrapping_ddp_variant_is_refused_with_the_fix(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    code, err = run_main(["fit", "--config", str(cfg), "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"],
                         capsys)
    assert code != 0
    assert_one_line(err, "ddp_spawn", "--trainer.strategy ddp")


@pytest.mark.slow
def test_two_cpu_devices_without_a_strategy_run(tmp_path):
    root = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", root, num_edits=1, extra={"eval": {"every": 0}})
    proc = subprocess.run([sys.executable, "-m", "eac_lightning.lightning.cli", "fit", "--config", str(cfg),
                           "--trainer.devices", "2", "--trainer.accelerator", "cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "editing DDP strategy" in proc.stderr
    assert json.loads((root / "summary.json").read_text())["edits_applied"] == 1


# -------------------------------------------------------------------------- a lock held by an unrelated live process
def test_a_lock_held_by_an_unrelated_live_process_says_how_to_clear_it(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    lock = root / ".lock"
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))  # pid 1: alive, never a run of ours
    cfg = write_config(tmp_path / "cfg.yaml", root)
    code, err = run_main(["fit", "--config", str(cfg)], capsys)
    assert code == 1
    assert_one_line(err, "in use by process 1", str(lock), f"delete {lock}")
    assert json.loads(lock.read_text())["pid"] == 1  # refused, not taken over


def test_the_lock_refusal_says_what_the_holder_runs(tmp_path, monkeypatch):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))
    lock = RunLock(tmp_path)
    for cmd, says in [("/usr/sbin/sshd -D", "which is not an eac-lightning run"),
                      ("/usr/bin/python3 -m jupyter lab", "a Python process"),
                      ("/usr/bin/python3 /usr/local/bin/eac-lightning fit --config x.yaml", "wait for it to finish"),
                      (None, "wait for it to finish")]:
        monkeypatch.setattr(RunLock, "command_line", staticmethod(lambda pid, cmd=cmd: cmd))
        with pytest.raises(RunFolderLockedError, match="in use by process 1") as info:
            lock.acquire()
        assert says in str(info.value) and f"delete {tmp_path / '.lock'}" in str(info.value)


# --------------------------------------------------------------------------------------- an unwritable cache folder
def test_an_unwritable_home_names_the_cache_folder_and_eac_cache_dir(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.write_text("a file, not a folder")  # root may write anywhere: a file in the way fails for everyone
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("EAC_CACHE_DIR", raising=False)
    with pytest.raises(OSError, match="EAC_CACHE_DIR") as info:
        cache_dir()
    assert str(home / ".cache" / "eac_lightning") in str(info.value)
    code, err = run_main(["stats", "--model", "testbed:tiny", "--num_tokens", "100"], capsys)
    assert code == 1
    assert_one_line(err, str(home / ".cache" / "eac_lightning"), "set EAC_CACHE_DIR to a writable folder")


def test_a_read_only_cache_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("EAC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder (root would pass any check)
    with pytest.raises(PermissionError, match="is not writable") as info:
        cache_dir()
    assert f"EAC_CACHE_DIR={tmp_path}" in str(info.value)


# ---------------------------------------------------------------------------------------- wall_seconds, pauses
class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_wall_seconds_counts_running_time_not_the_pause(monkeypatch):
    clock = _Clock(1000.0)
    monkeypatch.setattr(callbacks_module, "time", clock)
    trainer = types.SimpleNamespace(global_rank=0, logger=None, global_step=3)
    # A run that started at t=0, ran 40 s before it stopped (run_seconds, from its checkpoint), and resumes at
    # t=1000: 960 s of the 1000 were a pause.
    module = types.SimpleNamespace(extra_state={"reference": {}, "started": 0.0, "run_seconds": 40.0})
    ev = Evaluation()
    ev.on_train_start(trainer, module)
    clock.now += 5.0
    assert ev._running_seconds(module) == pytest.approx(45.0)
    ev.on_save_checkpoint(trainer, module, {})
    assert module.extra_state["run_seconds"] == pytest.approx(45.0)
    assert module.extra_state["started"] == 0.0
    # outside fit (validate), the running time recorded in the checkpoint
    assert Evaluation()._running_seconds(module) == pytest.approx(45.0)


def test_a_fresh_run_counts_from_its_start(monkeypatch):
    clock = _Clock(500.0)
    monkeypatch.setattr(callbacks_module, "time", clock)
    module = types.SimpleNamespace(extra_state={"reference": {}})
    ev = Evaluation()
    ev.on_train_start(types.SimpleNamespace(global_rank=0, logger=None, global_step=0), module)
    clock.now += 7.0
    assert ev._running_seconds(module) == pytest.approx(7.0)
    assert module.extra_state["started"] == 500.0


@pytest.mark.slow
def test_a_resumed_run_leaves_the_pause_out_of_wall_seconds(tmp_path, monkeypatch, capsys):
    root = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", root, num_edits=2, extra={"eval": {"every": 0}})
    cli.main(["fit", "--config", str(cfg)])
    first = json.loads((root / "summary.json").read_text())["wall_seconds"]
    cli.main(["rollback", str(root), "--to-edit", "1"])
    # the resume happens 10,000 s later
    monkeypatch.setattr(callbacks_module, "time", types.SimpleNamespace(time=lambda: time.time() + 10_000))
    cli.main(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    summary = json.loads((root / "summary.json").read_text())
    assert summary["edits_applied"] == 2
    assert 0 < summary["wall_seconds"] < first + 600, (first, summary["wall_seconds"])
