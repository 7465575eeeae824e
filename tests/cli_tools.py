"""What the CLI tests share: a small run config on the tiny testbed, and the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, root: Path, num_edits: int = 4, extra: dict | None = None) -> Path:
    """A 4-edit ROME-EAC run on testbed:tiny with quick statistics and evaluation; ``extra`` updates sections."""
    cfg = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(root), "enable_progress_bar": False},
        "model": {
            "model": "testbed:tiny",
            "method_settings": "as_given",  # the mechanics under test, not the testbed's measured settings
            "stats_tokens": 4000,
            "method": {"class_path": "eac_lightning.methods.ROME",
                       "init_args": {"target": {"num_steps": 6}, "context": {"length_count": [[5, 2]]},
                                     "eac": {"gamma": 80.0}}},
        },
        "data": {"path": "counterfact", "num_edits": num_edits, "num_retention": 4},
        "eval": {"every": 2, "tasks": ["sst2"], "default_limit": 4, "probes": ["fact_retention"], "rome_scores": False},
    }
    for k, v in (extra or {}).items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``eac-lightning *args`` in a subprocess (``tests/helpers`` importable, for the kill probes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "helpers")}
    proc = subprocess.run([sys.executable, "-m", "eac_lightning.lightning.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def current_deltas(run_or_checkpoint) -> dict:
    """D of a run's current state (its HEAD) or of one of its checkpoints: the edit log replayed and checked."""
    from eac_lightning.lightning.export import load_edited_model

    return load_edited_model(run_or_checkpoint).session.deltas
