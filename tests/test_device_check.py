"""benchmarks/device_check.py in its CPU smoke mode: tiny GPT-2 and llama configs in bfloat16 take the four
methods' edits, and the JSON holds what the GPU run reports (date, device, timings, peak memory, throughput)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_reports_every_method_of_both_families(tmp_path):
    out = tmp_path / "device_check.json"
    report = _script().main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["models"].keys() == report["models"].keys() == {"gpt2-tiny", "llama-tiny"}
    assert saved["smoke"] is True and saved["device"] == "cpu" and saved["dtype"] == "bfloat16"
    assert saved["date"] and saved["torch"]
    assert saved["reduced_vs_paper"]["target_steps"] == [2, 20]
    assert saved["paper_table1_s_per_edit"]["gpt2-xl"]["rome"] == 6.70
    for name, res in saved["models"].items():
        stats = res["key_statistics"]
        assert stats["tokens"] == 512 and stats["tokens_per_s"] > 0, name
        assert res["parameters"] > 0
        assert set(res["methods"]) == {"rome", "rome-eac", "memit", "memit-eac"}
        for method, r in res["methods"].items():
            assert "error" not in r and "skipped" not in r, (name, method, r)
            assert r["edits"] == (2 if method.startswith("rome") else 4)
            assert r["batch_size"] == (1 if method.startswith("rome") else 4)
            assert r["median_s_per_edit"] > 0 and math.isfinite(r["s_per_edit_extrapolated_to_20_steps"])
            assert r["s_per_edit_extrapolated_to_20_steps"] > r["median_s_per_edit"]  # 2 of 20 steps were run
            assert r["peak_memory_gib"] > 0


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        _script().main(["--smoke", "--methods", "rome,romee", "--out", str(tmp_path / "x.json")])


@pytest.mark.slow
def test_real_width_option_runs_the_real_width_rows(tmp_path):
    out = tmp_path / "real_width.json"
    _script().main(["--real-width", "--smoke", "--out", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"statistics", "rome-eac"} and all(r["shape"] == "tiny" for r in rows.values())
    assert "error" not in rows["rome-eac"] and rows["rome-eac"]["s_per_edit"] > 0
