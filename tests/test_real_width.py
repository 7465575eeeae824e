"""benchmarks/real_width.py: its table and FLOP accounting (fast), and its smallest configuration end to end on a
64-wide GPT-2 through the real CLI (slow), so that the script cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_width.py"


def _script():
    spec = importlib.util.spec_from_file_location("real_width", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_alphaedit_solve_is_cubic_in_the_key_width_and_rome_is_not():
    rw = _script()
    small, large = (rw.solve_flops("alphaedit", 4096, d_k, 10)["step"] for d_k in (4096, 8192))
    assert 7.5 < large / small < 8.1  # the null space's r³ (r at its bound d_k) dominates
    rome = [rw.solve_flops("rome-eac", 4096, d_k, 1)["step"] for d_k in (4096, 8192)]
    assert rome[1] / rome[0] < 4.1  # a solve through the cached factor: d_k², not d_k³
    assert rw.solve_flops("rome-eac", 4096, 8192, 1)["first"] == pytest.approx(8192**3 / 3)


def test_full_depth_scales_the_target_from_the_edited_layer_up():
    rw = _script()
    sc = {"layer_weights": 1000, "attention_width": 10, "hidden": 10, "d": 10, "d_k": 40, "vocab": 100}
    tokens = {"target": {"layer_tokens": {"fwd": 10, "bwd": 20}, "head_rows": {"bwd": 3}}}
    row = {"depth": 3, "layers": [1], "edit_steps": 1, "batch_size": 1, "edits": 1,
           "phase_seconds": {"target": 1.0, "solve": 1.0}}
    rep = rw.flop_report("gpt2-xl", "rome-eac", row, tokens, sc)
    layers = (10 + 2 * 20) * 2 * 1000
    head = 2 * 3 * 2 * 10 * 100
    assert rep["flops_proxy"]["target"] == pytest.approx((layers + head) / 1e9, abs=0.01)
    # GPT2-XL: ROME's layer 17 of 48 runs 31 layers, the proxy's layer 1 of 3 runs 2
    assert rep["flops_full_depth"]["target"] == pytest.approx((layers * 31 / 2 + head) / 1e9, abs=0.01)
    assert rep["h100_s_per_edit"] > 0 and rep["full_depth_layers"]["depth"] == 48


def test_table_has_a_line_per_row_and_every_column():
    rw = _script()
    results = json.loads((SCRIPT.parent / "results" / "real_width.json").read_text())
    text = rw.table(results)
    lines = text.splitlines()
    assert len(lines) == 2 + len(results["rows"])
    assert all(line.count("|") == len(rw.COLUMNS) + 1 for line in lines)


@pytest.mark.slow
def test_smallest_configuration_end_to_end(tmp_path):
    rw = _script()
    out = tmp_path / "real_width.json"
    argv = ["--shapes", "tiny", "--methods", "statistics", "rome-eac", "--rome-edits", "1", "--stats-tokens", "512",
            "--root", str(tmp_path / "work"), "--out", str(out)]
    rw.main(argv)
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    stats, rome = rows["statistics"], rows["rome-eac"]
    assert stats["tokens"] == 512 and stats["wall_s"] > 0 and stats["cache_bytes_per_layer"] > 256 * 256 * 8
    assert "error" not in rome, rome
    for column in ("s_per_edit", "phase_seconds", "phase_share", "peak_rss_mib", "bytes_per_step", "log_entry_bytes",
                   "flops_proxy", "cpu_gflops", "flops_full_depth", "h100_s_per_edit", "command", "machine",
                   "edit_metrics", "layer_tokens"):
        assert rome.get(column) is not None, column
    assert rome["edits"] == 2 and rome["warmup_edits"] == 1 and rome["edit_steps"] == 2
    assert {"target", "keys", "solve", "write", "evaluation"} <= set(rome["phase_share"])
    assert sum(rome["phase_share"].values()) == pytest.approx(1.0, abs=0.01)
    assert rome["layer_tokens"]["target"]["layer_tokens"]["bwd"] > 0  # the target steps' backward was counted
    assert rome["flops_full_depth"]["target"] > rome["flops_proxy"]["target"]  # 8 layers, not 3
    assert set(rome["machine"]) >= {"nproc", "threads", "load_note"} and rome["command"].startswith("eac-lightning fit")
    # a row already in the file is not run again
    before = out.read_text()
    rw.main(argv)
    assert out.read_text() == before
