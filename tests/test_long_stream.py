"""benchmarks/long_stream.py's rows read from a longer stream (``--rows-at``): the evaluation at N edits of a longer
stream is the row a stream of N edits ends with."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import long_stream  # noqa: E402


def _write_run(root: Path) -> None:
    (root / "logs").mkdir(parents=True)
    fields = ["edits", "step", "edit/reliability", "edit/generalization", "edit/locality", "edit/live_rel",
              "general/fact_retention", "general/wikitext2_ppl", "general/sst2"]
    rows = [  # before, at 200, at 400: general abilities at every point, edit metrics once there are edits
        {"edits": 0, "step": 0, "general/fact_retention": 0.8, "general/wikitext2_ppl": 200.0, "general/sst2": 0.5},
        {"edits": 200, "step": 2, "edit/reliability": 0.9, "edit/generalization": 0.7, "edit/locality": 0.6,
         "edit/live_rel": 0.5, "general/fact_retention": 0.4, "general/wikitext2_ppl": 400.0, "general/sst2": 0.55},
        {"edits": 400, "step": 4, "edit/reliability": 0.3, "edit/generalization": 0.2, "edit/locality": 0.1,
         "edit/live_rel": 0.1, "general/fact_retention": 0.2, "general/wikitext2_ppl": 800.0, "general/sst2": 0.5},
    ]
    with open(root / "logs" / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        w.writerows(rows)
    with open(root / "norms.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["edits", "module", "l1_rel_change", "fro_rel_change"])
        w.writeheader()
        for edits, growth in ((100, 0.5), (200, 1.0), (400, 3.0)):
            for module, scale in (("a", 1.0), ("b", 3.0)):
                w.writerow({"edits": edits, "module": module, "l1_rel_change": growth * scale,
                            "fro_rel_change": growth})
    ledger = [{"step": 1 + i // 100, "edit": i, "seconds": 1.0 if i < 200 else 5.0, "success": i % 4 != 0}
              for i in range(400)]
    # a refreshed edit's line holds no seconds and no stream position
    ledger.insert(150, {"step": 2, "refreshed": True, "success": True})
    (root / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ledger))


def test_a_row_read_at_n_edits_is_the_evaluation_there(tmp_path):
    root = tmp_path / "long_stream_400" / "alphaedit"
    _write_run(root)
    r = long_stream.row_at("alphaedit", root, 200, "python benchmarks/long_stream.py --edits 400 --rows-at 200")
    assert (r["edits"], r["reliability"], r["generalization"], r["locality"], r["live_rel"]) == (200, 0.9, 0.7, 0.6,
                                                                                                 0.5)
    assert r["fact_retention"] == pytest.approx(0.5) and r["ppl_ratio"] == pytest.approx(0.5)
    assert r["sst2"] == [0.5, 0.55]
    assert r["l1_growth"] == pytest.approx(2.0) and r["fro_growth"] == pytest.approx(1.0)  # norms at 200, mean
    assert r["seconds_per_edit"] == pytest.approx(1.0)  # the first 200 edits' own seconds
    assert r["wall_s"] is None and r["rss_mib_q4"] is None  # the longer run's, not this length's
    assert [t["edits"] for t in r["trace"]] == [200.0] and r["from_stream"] == "long_stream_400"
    assert "| alphaedit |" in long_stream.table([r])  # renders, wall and memory as –
    assert long_stream.row_at("alphaedit", root, 300, "") is None  # not evaluated at 300
    # per batch: its own edits and those holding after the write, the refresh's re-writes and those holding
    assert r["batches"] == [{"step": 1, "written": 100, "held": 75, "refreshed": 0, "refreshed_held": 0},
                            {"step": 2, "written": 100, "held": 75, "refreshed": 1, "refreshed_held": 1}]


def test_a_variant_of_a_preset_runs_under_its_label(tmp_path, monkeypatch):
    """--set adds settings to the preset's command; --label names the variant's row and run folder."""
    seen = []

    class Done:
        pid = 0

        def __init__(self, cmd, **kw):
            seen.append(cmd)

        def poll(self):
            return 0

        def wait(self):
            return 0

    monkeypatch.setattr(long_stream, "REPO", tmp_path)
    monkeypatch.setattr(long_stream.subprocess, "Popen", Done)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    long_stream.main(["--methods", "beac", "--label", "beac-wide", "--set", "beac={refresh: 0.5}", "--edits", "200",
                      "--tag", "t"])
    cmd = seen[0]
    assert cmd[cmd.index("--model.method.init_args.beac") + 1] == "{refresh: 0.5}"
    assert cmd[cmd.index("--trainer.default_root_dir") + 1] == str(tmp_path / "runs" / "long_stream_t" / "beac-wide")
    assert str(tmp_path / "configs" / "methods" / "beac.yaml") in cmd
    with pytest.raises(SystemExit):  # a variant needs its name
        long_stream.main(["--methods", "beac", "--set", "beac={refresh: 0.5}", "--tag", "t"])


@pytest.fixture(scope="module")
def four_edits(tmp_path_factory):
    """A 4-edit ROME-EAC run on testbed:tiny through the CLI (one edit per step)."""
    from cli_tools import run_cli, write_config

    root = tmp_path_factory.mktemp("stream")
    run_cli("fit", "--config", str(write_config(root / "cfg.yaml", root / "run")))
    return root / "run"


@pytest.mark.slow
def test_restart_rolls_the_run_back_once_and_keeps_the_earlier_record(four_edits, tmp_path):
    """--restart-at N: the run folder holds N edits (the project's rollback), the earlier bench record is kept with
    what the rollback set aside, and the next call leaves the folder alone; the row then has no wall time."""
    import shutil

    from eac_lightning.lightning.run_folder import read_ledger

    run = tmp_path / "run"
    shutil.copytree(four_edits, run)
    (run / "bench.json").write_text(json.dumps({"wall_s": 99.0, "memory": [[1.0, 5.0]], "attempts": 1}))
    long_stream.restart(run, 2)
    assert [r["edit"] for r in read_ledger(run / "edits.jsonl") if "edit" in r] == [0, 1]
    bench = json.loads((run / "bench.json").read_text())
    assert bench == {"wall_s": 0.0, "memory": [], "attempts": 0, "restarted_at": 2}
    (aside,) = (run / "rolled_back").iterdir()
    assert json.loads((aside / "bench.json").read_text())["wall_s"] == 99.0
    long_stream.restart(run, 2)  # done once
    assert len(list((run / "rolled_back").iterdir())) == 1
    summary = json.loads((four_edits / "summary.json").read_text())
    # the test config measures sst2 and 4 retention probes; a long stream's config measures these as well
    summary["general"].update(fact_retention={"before": 1.0, "after": 0.5},
                              wikitext2_ppl={"before": 100.0, "after": 200.0})
    (run / "summary.json").write_text(json.dumps(summary))
    assert long_stream.row("rome-eac", run, {**bench, "memory": [[1.0, 5.0]]}, "cmd")["wall_s"] is None


@pytest.mark.slow
def test_insertion_leakage_reads_the_model_after_n_edits_and_refuses_another_stream(four_edits, tmp_path):
    import shutil

    import insertion_leakage

    (row,) = insertion_leakage.measure(four_edits, [2], 2)
    assert row["at"] == 2 and row["upcoming"] == 2
    for key in ("next_reliability", "next_reliability_unedited", "last_batch_reliability"):
        assert 0.0 <= row[key] <= 1.0
    run = tmp_path / "run"
    shutil.copytree(four_edits, run)
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["seed"] = 1  # another order of the records: another stream
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="first 2 edits are not .*another stream"):
        insertion_leakage.measure(run, [2], 2)
