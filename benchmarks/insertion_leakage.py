"""Does a long stream's past predict its future? Teacher-forced accuracy of the next insertions *before* their edit.

A long stream (docs/long_streams.md) continues past the shipped facts with insertions, facts about invented entities
(``eac_lightning/data/insertions.py``). Its reliability of "every edit so far" means something only if each edit has
to be written: a model that already predicts the next insertions from the earlier ones (through a shared name part
and object, say) would score edits it never made. This reads a long-stream run folder's model after N edits (its
edit log checked out there) and measures, on the next ``--next`` requests of the same stream, reliability and
generalisation (EasyEdit's teacher-forced token accuracy) on that model and on the unedited one; the last batch
before N, already edited, is measured beside them for scale::

    python benchmarks/insertion_leakage.py runs/long_stream_2000/alphaedit --at 1000 1900

Upcoming requests near the unedited model's figures: the stream does not leak. Rows go to
``benchmarks/results/insertion_leakage.json`` (a run measured again replaces its rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "insertion_leakage.json"


def stream(run: Path, length: int):
    """The run's stream, ``length`` requests long (its data settings from config.yaml; a longer stream begins with
    the shorter one, so its first requests are the run's)."""
    import yaml

    from eac_lightning.data.datamodule import EditDataModule

    data = dict(yaml.safe_load((run / "config.yaml").read_text())["data"])
    shipped = data["num_edits"] - data.get("insertions", 0)
    data.update(num_edits=length, insertions=max(0, length - shipped))
    dm = EditDataModule(**data)
    dm.setup("fit")
    return dm.requests


def measure(run: Path, at: list[int], upcoming: int) -> list[dict]:
    import torch

    from eac_lightning.evaluation.edit_metrics import compute_locality_reference, evaluate_edit_metrics
    from eac_lightning.lightning.export import load_edited_model
    from eac_lightning.lightning.checkpoint import requests_sha256
    from eac_lightning.models.loading import load_model

    torch.manual_seed(0)
    edited = load_edited_model(run)
    log = edited.session.log
    positions = {log.header(i)["position"]: i for i in log.lineage(edited.head) if log.header(i)["kind"] == "step"}
    requests = stream(run, max(at) + upcoming)
    base, tok = load_model(edited.identity["model"], dtype=edited.identity.get("dtype", "float32"))
    rows = []
    for n in at:
        if n not in positions:
            raise SystemExit(f"{run}: no edit step ends at {n} edits (steps end at multiples of the batch size, "
                             f"up to {max(positions)})")
        # the stream's identity as the run recorded it (the hash a resume checks): the run must be this stream's
        recorded = log.header(positions[n])["resume"]["data"]
        if recorded["applied_sha256"] != requests_sha256(requests[:recorded["applied"]]):
            raise SystemExit(f"{run}: its first {recorded['applied']} edits are not the first requests of today's "
                             "stream (data.applied_sha256 differs): the run was made from another stream")
        edited.session.checkout(positions[n])
        last = requests[max((p for p in positions if p < n), default=0):n]
        row = {"run": str(run.relative_to(REPO)) if run.is_relative_to(REPO) else str(run),
               "method": run.name, "at": n, "upcoming": upcoming}
        for name, reqs in (("next", requests[n:n + upcoming]), ("last_batch", last)):
            if not reqs:
                continue
            ref = compute_locality_reference(base, tok, reqs)
            now = evaluate_edit_metrics(edited.model, edited.tokenizer, reqs, ref)
            unedited = evaluate_edit_metrics(base, tok, reqs, ref)
            for metric in ("reliability", "generalization"):
                row[f"{name}_{metric}"] = now[metric]
                row[f"{name}_{metric}_unedited"] = unedited[metric]
        print(f"{run.name} after {n} edits: next {upcoming} rel {row['next_reliability']:.3f} (unedited "
              f"{row['next_reliability_unedited']:.3f}), gen {row['next_generalization']:.3f} (unedited "
              f"{row['next_generalization_unedited']:.3f}); the last batch, edited: rel "
              f"{row.get('last_batch_reliability', float('nan')):.3f}", flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| run | after N edits | next: rel | next: rel, unedited | next: gen | next: gen, unedited "
             "| last batch (edited): rel |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['at']:,} | {r['next_reliability']:.3f} | "
                     f"{r['next_reliability_unedited']:.3f} | {r['next_generalization']:.3f} | "
                     f"{r['next_generalization_unedited']:.3f} | {r.get('last_batch_reliability', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a long-stream run folder (runs/long_stream_<tag>/<method>)")
    ap.add_argument("--at", type=int, nargs="+", required=True, help="edit counts to read the model at")
    ap.add_argument("--next", type=int, default=100, help="upcoming requests measured")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run = args.run.resolve()
    rows = measure(run, sorted(args.at), args.next)
    command = "python benchmarks/insertion_leakage.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for r in rows:
        r["command"] = command
    kept = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    kept = [r for r in kept if r["run"] != rows[0]["run"]] + rows
    text = table(kept)
    print(text)
    RESULTS.write_text(json.dumps({"table": text, "rows": kept}, indent=2) + "\n")


if __name__ == "__main__":
    main()
