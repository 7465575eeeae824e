"""What the live-decoding edit metrics cost, and what they say, on the main job's edited model.

The live metrics (``edit/live_rel``, ``edit/live_gen``, ``edit/live_loc``; the WILD protocol,
``eac_lightning/evaluation/live_metrics.py``) decode an answer to every edit prompt, paraphrase and neighbourhood
prompt, where the teacher-forced metrics score the target in one pass. This script runs the README's main job as a
user would (``eac-lightning fit --config configs/quickstart.yaml``: 100 sequential ROME-EAC edits of CounterFact on
``testbed:small``; an existing run folder is reused), loads the run's edited model and its unedited base, and times
with the quickstart's evaluation settings (``eval:`` of ``configs/quickstart.yaml``):

* the pre-edit reference on the unedited model: the teacher-forced locality reference, and the live answers to the
  neighbourhood prompts that ``live_loc`` compares with;
* one evaluation of all edits on the edited model, part by part: the teacher-forced edit metrics (EAC Eqs. 10-12,
  the exact-greedy variants, ROME's scores), the live metrics, generation success and fluency (which the
  quickstart's evaluation also runs), and the general-ability tasks and perplexity probe (fact retention needs the
  run's retention records and is left out).

Each part runs ``--runs`` times after a warm-up; the table shows the median wall and CPU seconds of the process
(torch with ``--threads`` intra-op threads), and the metric values of the last run::

    OMP_NUM_THREADS=1 python benchmarks/live_cost.py --out benchmarks/results/live_cost_small.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def fit(run: Path, num_edits: int) -> list[str]:
    """The README's main job into ``run`` (skipped when the run finished; resumed when it was interrupted)."""
    where = run.resolve().relative_to(REPO) if run.resolve().is_relative_to(REPO) else run
    cmd = [sys.executable, "-m", "eac_lightning.lightning.cli", "fit", "--config", "configs/quickstart.yaml",
           "--data.num_edits", str(num_edits), "--trainer.default_root_dir", str(where),
           "--trainer.enable_progress_bar", "false"]
    if (run / "summary.json").exists():
        return cmd
    if (run / "checkpoints" / "last.ckpt").exists():
        cmd += ["--ckpt_path", "last"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return cmd


def applied_requests(run: Path) -> list:
    """The run's edits in the order they were applied (its ledger), as the loader reads them."""
    from eac_lightning.data.sources import load_requests
    from eac_lightning.paths import data_dir

    ledger = [json.loads(line) for line in (run / "edits.jsonl").read_text().splitlines()]
    order = [(r["source"], r["source_index"]) for r in ledger if "edit" in r]
    by_row = {(r.source, r.source_index): r for r in load_requests(data_dir() / "counterfact")}
    return [by_row[key] for key in order]


def timed(fn, runs: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of ``runs`` calls after a warm-up, and the last result."""
    out = fn()
    wall, cpu = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu), out


def table(data: dict) -> str:
    """The cost table of docs/evaluation.md: seconds per part, and the live share of each evaluation."""
    parts = data["parts"]
    lines = ["| part | prompts | wall s | CPU s |", "|---|---:|---:|---:|"]
    for name, p in parts.items():
        lines.append(f"| {name} | {p['prompts']} | {p['wall_s']:.2f} | {p['cpu_s']:.2f} |")
    edit = next(p for k, p in parts.items() if k.startswith("teacher-forced"))
    live = parts["live edit metrics"]
    everything = sum(p["cpu_s"] for k, p in parts.items() if not k.startswith("reference"))
    lines.append(f"| **live / teacher-forced edit metrics** | | {live['wall_s'] / edit['wall_s']:.2f}x "
                 f"| {live['cpu_s'] / edit['cpu_s']:.2f}x |")
    lines.append(f"| **live share of one evaluation** (all but the references) | | "
                 f"| {100 * live['cpu_s'] / everything:.0f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "live_cost", help="run folder (reused if finished)")
    ap.add_argument("--num-edits", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cmd = fit(args.run, args.num_edits)

    from eac_lightning.evaluation import Evaluator, EvaluatorConfig
    from eac_lightning.evaluation.edit_metrics import compute_locality_reference
    from eac_lightning.evaluation.literature_metrics import evenly_spaced, literature_metrics
    from eac_lightning.evaluation.live_metrics import live_reference
    from eac_lightning.lightning.export import load_edited_model
    from eac_lightning.models.loading import load_model

    settings = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())["eval"]
    settings.pop("every")
    config = EvaluatorConfig(**settings)
    requests = applied_requests(args.run)
    base, tok = load_model("testbed:small")
    edited = load_edited_model(args.run).model
    n_edit = sum(1 + len(r.paraphrase_prompts) for r in requests)
    n_loc = sum(len(r.neighborhood_prompts) for r in requests)
    n_gen = len(evenly_spaced(requests, config.fluency_max_edits)) * (config.fluency_prompts_per_edit or 10)
    bs, budget = config.batch_size, config.live_max_new_tokens
    teacher_forced = Evaluator(EvaluatorConfig(**{**settings, "live_metrics": False, "literature_metrics": False}))
    live = Evaluator(config)
    tasks = Evaluator(EvaluatorConfig(**{**settings, "edit_metrics": False}))
    parts, values = {}, {}

    def part(name: str, prompts: int, fn):
        wall, cpu, out = timed(fn, args.runs)
        parts[name] = {"prompts": prompts, "wall_s": wall, "cpu_s": cpu}
        return out

    with torch.no_grad():
        ref = part("reference: teacher-forced (unedited model)", n_loc,
                   lambda: compute_locality_reference(base, tok, requests, bs))
        ref.update(part("reference: live answers (unedited model)", n_loc,
                        lambda: live_reference(base, tok, requests, budget, bs)))
        values.update(part("teacher-forced edit metrics (EAC Eqs. 10-12, ROME's scores)", n_edit + n_loc,
                           lambda: teacher_forced.evaluate_edits(edited, tok, requests, ref)))
        values.update(part("live edit metrics", n_edit + n_loc, lambda: live.evaluate_live(edited, tok, requests, ref)))
        values.update({f"edit/{k}": v for k, v in part(
            "generation success and fluency", n_edit + n_gen,
            lambda: literature_metrics(edited, tok, requests, bs,
                                       fluency_prompts_per_edit=config.fluency_prompts_per_edit,
                                       fluency_requests=evenly_spaced(requests, config.fluency_max_edits))).items()})
        part("tasks and perplexity (" + ", ".join(config.tasks + ["wikitext2_ppl"]) + ")",
             sum(len(tasks.examples(t)) for t in config.tasks), lambda: tasks.evaluate(edited, tok))
    data = {"command": "OMP_NUM_THREADS=1 python benchmarks/live_cost.py " + " ".join(sys.argv[1:]),
            "fit_command": " ".join(cmd[2:]), "model": "testbed:small", "edits": len(requests),
            "threads": args.threads, "runs": args.runs, "torch": torch.__version__, "parts": parts,
            "metrics": {k: round(v, 4) for k, v in values.items()}}
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(table(data))
    print(json.dumps(data["metrics"], indent=2))


if __name__ == "__main__":
    main()
