"""Does every method preset edit on the default model? The README's main job with each method preset composed after
it, through the real CLI, as a user would type it:

    eac-lightning fit --config configs/quickstart.yaml --config configs/methods/<m>.yaml --data.num_edits 20

On a testbed the method's measured settings apply by default (``--model.method_settings auto``; summary.json names
what they changed); ``<m>:as_given`` runs the preset exactly as written. Only the edit metrics are measured (the
general-ability tasks are switched off: this table is about whether the edits are written).

    python benchmarks/method_table.py --out benchmarks/results/method_table_small.json

Run again with ``--methods m ...`` on the same file, it measures those and keeps the other rows (each row records
its command).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["rome", "rome-eac", "memit", "memit-eac", "alphaedit", "alphaedit-eac", "beac", "ultraedit", "ft", "ft-en"]


def run(method: str, args, root: Path) -> dict:
    preset, _, mode = method.partition(":")
    batch = args.beac_batch_size if preset.startswith("beac") else 1
    cmd = [
        sys.executable, "-m", "eac_lightning.lightning.cli", "fit",
        "--config", "configs/quickstart.yaml", "--config", f"configs/methods/{preset}.yaml",
        "--model.model", args.model, "--data.num_edits", str(args.num_edits), "--data.batch_size", str(batch),
        "--eval.tasks", "[]", "--eval.probes", "[]",
        "--eval.literature_metrics", "false",
        "--eval.every", "0", "--trainer.default_root_dir", str(root / method.replace(":", "-")),
        "--trainer.enable_progress_bar", "false",
    ]
    if mode:
        cmd += ["--model.method_settings", mode]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    summary = json.loads((root / method.replace(":", "-") / "summary.json").read_text())
    return {"method": method, "batch_size": batch, "wall_seconds": round(time.perf_counter() - t0, 1),
            "seconds_per_edit": summary["seconds_per_edit"], "edit_metrics": summary["edit_metrics"],
            "method_settings": summary.get("method_settings"),
            "l1_rel_change": {k: v["l1_rel_change"] for k, v in summary["norms"].items()}}


def settings_cell(settings) -> str:
    """What ``--model.method_settings auto`` changed (``name old→new``), or "published": the preset as written."""
    changed = settings.get("changed") if isinstance(settings, dict) else None
    return ", ".join(f"{k} {old}→{new}" for k, (old, new) in changed.items()) if changed else "published"


def table(rows: list[dict]) -> str:
    """The docs' method table (README, docs/benchmarks.md): edit metrics of all edits on the final model."""
    def rel(x: float) -> str:  # 20 edits: steps of 0.05, two decimals where they are exact
        return f"{x:.2f}" if round(x, 2) == round(x, 3) else f"{x:.3f}"

    def live(x: float | None) -> str:  # "–": a row measured before the evaluator decoded live
        return "–" if x is None else rel(x)

    lines = ["| method | batch | reliability | generalization | locality | live rel | live gen | live loc | s/edit "
             "| settings |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["edit_metrics"]
        lines.append(f"| {r['method']} | {r['batch_size']} | {rel(e['reliability'])} | {e['generalization']:.3f} | "
                     f"{e['locality']:.3f} | {live(e.get('live_rel'))} | {live(e.get('live_gen'))} | "
                     f"{live(e.get('live_loc'))} | {r['seconds_per_edit']:.2f} "
                     f"| {settings_cell(r['method_settings'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="testbed:small")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--num-edits", type=int, default=20)
    ap.add_argument("--beac-batch-size", type=int, default=10, help="B-EAC is a batch method: 2 batches of 10")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    command = "python benchmarks/method_table.py " + shlex.join(sys.argv[1:])
    # Rows of earlier invocations are kept (each with its command); a method run again replaces its row in place.
    rows = {}
    if args.out.exists():
        earlier = json.loads(args.out.read_text())
        if (earlier.get("model"), earlier.get("num_edits")) == (args.model, args.num_edits):
            rows = {r["method"]: {**r, "command": r.get("command") or earlier.get("command")} for r in earlier["rows"]}
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods:
            rows[m] = {**run(m, args, Path(tmp)), "command": command}
            args.out.write_text(json.dumps({"model": args.model, "num_edits": args.num_edits,
                                            "rows": list(rows.values())}, indent=2) + "\n")
    print(table(list(rows.values())))


if __name__ == "__main__":
    main()
