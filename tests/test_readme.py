"""Every command of the README's ```bash blocks, run as a user types it, on the tiny testbed.

The commands run in the order the README lists them, in one temporary folder that holds a link to ``configs/``, so
their relative paths (``configs/...``, ``runs/quickstart``, ``edited-model/``) mean what they mean in a clone: the
``fit`` that writes ``runs/quickstart`` first is the run that ``ask``, the resume, ``rollback``, ``validate`` and
``export`` then work on. Each command keeps all of its own arguments (``testbed:small`` becomes ``testbed:tiny``);
options appended after them (the last value wins) only make it small: a couple of edits, small statistics, a
cut-down evaluation. A renamed flag, a removed config file or a command that stopped working fails the test.

Not run: ``pip install ...`` and the test command (``python -m pytest``: this suite). Only parsed: the commands of
:data:`ONLY_PARSED` (``eac-lightning testbed DIR --preset small`` trains for about 25 minutes), whose arguments go
through the parser ``eac-lightning`` builds for the command, without running it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

#: options appended to every ``fit`` and ``validate``: the tiny testbed, small statistics, a cut-down evaluation
SMALL_RUN = [
    "--model.model", "testbed:tiny",
    "--model.stats_tokens", "2000",
    "--eval.tasks", "[sst2]",
    "--eval.default_limit", "4",
    "--eval.probes", "[fact_retention]",
    "--eval.rome_scores", "false",
    "--eval.literature_metrics", "false",
    "--data.num_edits", "2",
    "--data.num_retention", "4",
    "--eval.every", "0",
    "--trainer.enable_progress_bar", "false",
]
#: an option of the command -> the small value appended after it
SMALLER = {
    "fit": {"--data.batch_size": "2", "--data.insertions": "2"},
    "rollback": {"--to-edit": "1"},
}
#: appended to the other ``eac-lightning`` commands
APPENDED = {
    "stats": ["--num_tokens", "2000"],
    "trace": ["--num_facts", "2", "--samples", "1"],
}
#: commands that cannot run in CI time: their arguments are parsed, the command is not run
ONLY_PARSED = {"testbed"}
#: what this test knows how to make small
RUNNABLE = {"fit", "validate", "ask", "rollback", "export", "stats", "trace"}


def readme_commands(text: str) -> list[list[str]]:
    """The commands of the ```bash blocks of ``text`` in order: continuation lines joined, comments dropped, each
    ``a && b`` split in two."""
    out: list[list[str]] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append(words[:cut])
                words = words[cut + 1:]
    return out


def kind(command: list[str]) -> str:
    """``skip`` (an install, the test suite), ``parse`` (:data:`ONLY_PARSED`), ``run``, or ``unknown``."""
    if command[:1] == ["pip"] or command[:3] == ["python", "-m", "pytest"]:
        return "skip"
    if command[:1] == ["eac-lightning"] and len(command) > 1:
        if command[1] in ONLY_PARSED:
            return "parse"
        if command[1] in RUNNABLE or "--help" in command:
            return "run"
    return "unknown"


def option(args: list[str], name: str) -> str | None:
    """The last value given to ``name`` (``--name value`` or ``--name=value``) in ``args``."""
    found = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            found = args[i + 1]
        elif a.startswith(name + "="):
            found = a.split("=", 1)[1]
    return found


def run_root(args: list[str], cwd: Path) -> Path:
    """The run folder a ``fit`` command writes: its own ``--trainer.default_root_dir``, else its last config's,
    else ``runs/default`` (the CLI's default)."""
    root = option(args, "--trainer.default_root_dir")
    if root is None:
        for i, a in enumerate(args):
            if a == "--config":
                cfg = yaml.safe_load((cwd / args[i + 1]).read_text()) or {}
                root = (cfg.get("trainer") or {}).get("default_root_dir", root)
    return cwd / (root or "runs/default")


def shrunk(args: list[str], cwd: Path, used: set[Path], index: int) -> list[str]:
    """``eac-lightning`` arguments ``args`` on the tiny testbed, with the options that make the command small
    appended; ``used``: the run folders earlier fits wrote."""
    sub = args[0]
    if "--help" in args or "-h" in args:
        return args
    args = ["testbed:tiny" if a == "testbed:small" else a for a in args]
    extra = [x for name, small in SMALLER.get(sub, {}).items() if option(args, name) is not None
             for x in (name, small)]
    if sub in ("fit", "validate"):
        extra += SMALL_RUN
    if sub == "stats" and option(args, "--model") is None:
        extra += ["--model", "testbed:tiny"]
    if sub == "fit":
        root = run_root(args, cwd)
        # The README lists alternatives: a second fit into a folder that already holds a run, and a fit that
        # names no folder, get a fresh one; a resume (--ckpt_path) continues the run that is there.
        if option(args, "--ckpt_path") is None and (root in used or root == cwd / "runs/default"):
            root = cwd / "runs" / f"readme-{index}"
            extra += ["--trainer.default_root_dir", str(root.relative_to(cwd))]
        used.add(root)
    return args + extra + APPENDED.get(sub, [])


def parse_only(args: list[str]) -> None:
    """Parse ``eac-lightning`` ``args`` with the parser the CLI builds for the command, without running it; a
    refused argument raises, with the parser's message."""
    from jsonargparse import capture_parser

    from eac_lightning.lightning import cli

    parser = capture_parser(lambda: cli._dispatch(list(args), None))
    parser.exit_on_error = False
    parsed = parser.parse_args(args[1:])
    if args[0] == "testbed":
        from eac_lightning.testbed.presets import get_preset

        get_preset(parsed.preset)  # an unknown preset raises, naming the known ones


def eac_lightning(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eac_lightning.lightning.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_readme_commands_are_read_as_a_shell_reads_them():
    text = ("```bash\n# a comment\npip install x && eac-lightning fit --config a.yaml  # why\n"
            "eac-lightning ask runs/q \"The Eiffel Tower is located in\"\neac-lightning fit \\\n    --data.num_edits 5\n"
            "```\n```python\nprint(1)\n```\n```\n$ eac-lightning ask runs/q\n```\n")
    assert readme_commands(text) == [["pip", "install", "x"], ["eac-lightning", "fit", "--config", "a.yaml"],
                                     ["eac-lightning", "ask", "runs/q", "The Eiffel Tower is located in"],
                                     ["eac-lightning", "fit", "--data.num_edits", "5"]]
    assert option(["--a", "1", "--a=2"], "--a") == "2" and option(["--ab", "1"], "--a") is None


def test_every_readme_command_is_one_this_module_runs_or_parses():
    """A new kind of README command needs a way to make it small here (SMALL_RUN, SMALLER, APPENDED) or a reason
    to only parse it (ONLY_PARSED)."""
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert sum(kind(c) == "run" for c in commands) >= 10, "the README's bash blocks were not found"
    assert [shlex.join(c) for c in commands if kind(c) == "unknown"] == []


def test_only_parsed_commands_refuse_a_wrong_argument():
    parse_only(["testbed", "out", "--preset", "tiny"])
    with pytest.raises(Exception, match="presett"):
        parse_only(["testbed", "out", "--presett", "tiny"])
    with pytest.raises(ValueError, match="unknown testbed preset"):
        parse_only(["testbed", "out", "--preset", "huge"])


@pytest.mark.slow
def test_every_readme_command_runs_on_the_tiny_testbed(tmp_path):
    commands = readme_commands(README.read_text(encoding="utf-8"))
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    # one torch thread unless one is chosen: the tiny model is dispatch-bound, and two threads on a busy 2-core
    # machine make an edit many times slower
    env = {"OMP_NUM_THREADS": "1", **os.environ, "EAC_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    used: set[Path] = set()
    done: dict[str, list[str]] = {"run": [], "parse": [], "skip": []}
    for i, command in enumerate(commands):
        line = shlex.join(command)
        what = kind(command)
        assert what != "unknown", f"a README command this test does not know how to make small: {line}"
        if what == "parse":
            parse_only(command[1:])
        elif what == "run":
            args = shrunk(command[1:], tmp_path, used, i)
            start = time.monotonic()
            proc = eac_lightning(args, tmp_path, env)
            print(f"{time.monotonic() - start:6.1f} s  eac-lightning {shlex.join(args)}", flush=True)
            assert proc.returncode == 0, (f"README command failed: {line}\nrun as: eac-lightning {shlex.join(args)}"
                                          f"\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            if args[0] == "ask":
                assert "unedited:" in proc.stdout and "edited:" in proc.stdout, proc.stdout[-3000:]
        done[what].append(line)
    print("ran:", *done["run"], "only parsed:", *done["parse"], "not run:", *done["skip"], sep="\n  ")
    # what the chained commands left: the run they share, and the exported model
    assert (tmp_path / "runs" / "quickstart" / "summary.json").is_file()
    for c in commands:
        if c[:2] == ["eac-lightning", "export"]:
            out = [a for a in c[2:] if not a.startswith("-")][1]
            assert any((tmp_path / out).glob("*.safetensors")), f"{shlex.join(c)} wrote no weights"
