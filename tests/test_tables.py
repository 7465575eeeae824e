"""benchmarks/tables.py: every generated table in README.md and docs/*.md equals what its results file gives, and a
block follows its results file when the file changes (on a temporary copy of a doc and its results)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "tables.py"


def tables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_the_docs_tables_match_their_results_files():
    out = tables("--check")
    assert out.returncode == 0, (
        "a generated table differs from its results file (a number edited by hand, or a results file changed "
        "without `python benchmarks/tables.py`):\n" + out.stdout + out.stderr)


def _copy_readme(root: Path) -> Path:
    """README.md and the results files of its generated tables, under ``root`` as in the repository."""
    listed = dict(line.split(": ", 1) for line in tables("--list").stdout.splitlines())  # name: files -> docs
    readme = root / "README.md"
    shutil.copy(REPO / "README.md", readme)
    for name in re.findall(r"<!-- table: ([\w.-]+) -->", readme.read_text()):
        for rel in listed[name].split(" -> ")[0].split(", "):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, root / rel)
    return readme


def test_a_block_is_rewritten_when_its_results_file_changes(tmp_path):
    readme = _copy_readme(tmp_path)
    before = readme.read_text()
    assert "<!-- table: method_table_small -->" in before
    assert tables("--check", "--root", str(tmp_path)).returncode == 0

    results = tmp_path / "benchmarks" / "results" / "method_table_small.json"
    data = json.loads(results.read_text())
    assert data["rows"][0]["method"] == "rome"
    data["rows"][0]["edit_metrics"]["reliability"] = 0.5
    data["rows"][0]["seconds_per_edit"] = 9.876
    results.write_text(json.dumps(data))

    out = tables("--check", "--root", str(tmp_path))
    assert out.returncode == 1
    assert "method_table_small" in out.stdout and "README.md" in out.stdout
    assert readme.read_text() == before  # --check writes nothing

    assert tables("--root", str(tmp_path)).returncode == 0
    after = readme.read_text()
    m = data["rows"][0]["edit_metrics"]
    assert f"| rome | 1 | 0.50 | {m['generalization']:.3f} | {m['locality']:.3f} |" in after
    assert "| 9.88 | published |" in after
    assert "| rome | 1 | 1.00 |" not in after
    # only the table's row changed; the prose around the block is as it was
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(before.splitlines()) == len(after.splitlines()) and len(changed) == 1
    assert tables("--check", "--root", str(tmp_path)).returncode == 0


def test_check_names_an_unknown_table_and_a_missing_results_file(tmp_path):
    readme = _copy_readme(tmp_path)
    readme.write_text(readme.read_text() + "\n<!-- table: no_such_table -->\n<!-- /table -->\n")
    out = tables("--check", "--root", str(tmp_path))
    assert out.returncode != 0 and "no_such_table" in out.stderr

    readme = _copy_readme(tmp_path)
    (tmp_path / "benchmarks" / "results" / "method_table_small.json").unlink()
    out = tables("--check", "--root", str(tmp_path))
    assert out.returncode != 0 and "method_table_small.json not found" in out.stderr


def test_method_table_run_again_replaces_its_rows_and_keeps_the_others(tmp_path, monkeypatch):
    """``method_table.py --methods m`` on an existing results file measures m, replaces m's row in place and keeps
    the other rows, each with the command that made it (a file from one run records its command once)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import method_table

    out = tmp_path / "table.json"
    old = {"method": "rome", "batch_size": 1, "seconds_per_edit": 1.0, "method_settings": None,
           "edit_metrics": {"reliability": 1.0, "generalization": 1.0, "locality": 1.0}}
    out.write_text(json.dumps({"model": "testbed:small", "num_edits": 20, "command": "python first run",
                               "rows": [old, {**old, "method": "beac", "seconds_per_edit": 9.0}]}))
    monkeypatch.setattr(method_table, "run", lambda m, args, root: {**old, "method": m, "seconds_per_edit": 2.0})
    monkeypatch.setattr(sys, "argv", ["method_table.py", "--methods", "beac", "--out", str(out)])
    method_table.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["seconds_per_edit"]) for r in rows] == [("rome", 1.0), ("beac", 2.0)]
    assert rows[0]["command"] == "python first run"
    assert rows[1]["command"] == f"python benchmarks/method_table.py --methods beac --out {out}"
