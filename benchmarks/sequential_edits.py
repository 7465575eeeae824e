"""Sequential editing benchmark (EAC Fig. 2a, 5, 6 and Table 1) on the offline testbed, through the real CLI.

Each method runs ``eac-lightning fit --config configs/bench/sequential.yaml --config configs/methods/<m>.yaml``;
this script then reads every run's ``norms.csv``, ``metrics.csv`` and ``summary.json`` and writes a markdown table,
a JSON file and PNG plots:

    python benchmarks/sequential_edits.py --methods rome rome-eac memit memit-eac --num-edits 500 \
        --out benchmarks/results/sequential

Unedited-fact retention probes 200 ZsRE facts the testbed was trained on (configs/bench/sequential.yaml).
``--testbed-overlay`` composes ``configs/testbed/<m>.yaml`` after each method preset (write-aware targets); such
runs are named ``<m>+testbed``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_method(method: str, args, out: Path) -> Path:
    preset, _, overlay = method.partition("+")
    root = out / method
    if (root / "summary.json").exists() and not args.force:
        return root
    cmd = [
        sys.executable, "-m", "eac_lightning.lightning.cli", "fit",
        "--config", str(REPO / "configs" / "bench" / "sequential.yaml"),
        "--config", str(REPO / "configs" / "methods" / f"{preset}.yaml"),
        *(["--config", str(REPO / "configs" / overlay / f"{preset}.yaml")] if overlay else []),
        "--model.model", args.model, "--data.num_edits", str(args.num_edits),
        "--data.batch_size", str(args.batch_size),
        "--eval.every", str(args.eval_every), "--trainer.default_root_dir", str(root),
    ]
    if (root / "checkpoints" / "last.ckpt").exists():
        cmd += ["--ckpt_path", "last"]  # an interrupted benchmark continues where it stopped
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def collect(root: Path) -> dict:
    summary = json.loads((root / "summary.json").read_text())
    norms = read_csv(root / "norms.csv")
    metrics = [r for r in read_csv(root / "metrics.csv")]
    return {"summary": summary, "norms": norms, "metrics": metrics}


def plot(results: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, r in results.items():
        by_edit: dict[int, list[float]] = {}
        for row in r["norms"]:
            by_edit.setdefault(int(row["edits"]), []).append(100 * float(row["l1_rel_change"]))
        xs = sorted(by_edit)
        ax.plot(xs, [sum(by_edit[x]) / len(by_edit[x]) for x in xs], label=m, linestyle="-" if "eac" in m else "--")
    ax.set(xlabel="edits", ylabel="L1 norm change of edited matrices (%)", title="Deviation (cf. EAC Fig. 2a)")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "l1_change.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    keys = ["general/fact_retention", "general/sst2", "general/wikitext2_ppl"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for ax, k in zip(axes, keys):
        for m, r in results.items():
            pts = [(int(row["edits"]), float(row[k])) for row in r["metrics"] if row.get(k)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, linestyle="-" if "eac" in m else "--")
        ax.set(xlabel="edits", title=k.split("/")[1])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "general_abilities.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["reliability", "generalization", "locality"]
    width = 0.8 / max(1, len(results))
    for i, (m, r) in enumerate(results.items()):
        vals = [r["summary"]["edit_metrics"].get(n, float("nan")) for n in names]
        ax.bar([j + i * width for j in range(3)], vals, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(3)], names)
    ax.set(ylim=(0, 1), title="All edits, measured after the stream (cf. EAC Fig. 5)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "edit_metrics.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def table(results: dict[str, dict]) -> str:
    lines = ["| method | edits | reliability | generalization | locality | live rel | live gen | live loc "
             "| L1 change (%) | fact retention before → after | SST-2 before → after "
             "| WikiText-2 ppl before → after | s/edit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for m, r in results.items():
        s = r["summary"]
        em, g = s["edit_metrics"], s["general"]
        l1 = sum(n["l1_rel_change"] for n in s["norms"].values()) / len(s["norms"]) * 100

        def live(k: str) -> str:  # "–": a summary written before the evaluator decoded live
            return "–" if em.get(k) is None else f"{em[k]:.3f}"

        def ba(k: str, fmt: str = "{:.3f}") -> str:
            if k not in g:
                return "n/a"
            return f"{fmt.format(g[k]['before'])} → {fmt.format(g[k]['after'])}"

        lines.append(
            f"| {m} | {s['edits_applied']} | {em['reliability']:.3f} | {em['generalization']:.3f} | "
            f"{em['locality']:.3f} | {live('live_rel')} | {live('live_gen')} | {live('live_loc')} | {l1:+.1f} "
            f"| {ba('fact_retention')} | {ba('sst2')} | {ba('wikitext2_ppl', '{:.1f}')} "
            f"| {s['seconds_per_edit']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="testbed:small")
    p.add_argument("--methods", nargs="+", default=["rome", "rome-eac", "memit", "memit-eac"])
    p.add_argument("--num-edits", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sequential")
    p.add_argument("--force", action="store_true", help="rerun methods that already have a summary")
    p.add_argument("--testbed-overlay", action="store_true",
                   help="also run each method with configs/testbed/<m>.yaml (as <m>+testbed)")
    args = p.parse_args()
    if args.testbed_overlay:
        args.methods = args.methods + [f"{m}+testbed" for m in args.methods]
    args.out.mkdir(parents=True, exist_ok=True)
    results = {m: collect(run_method(m, args, args.out)) for m in args.methods}
    md = table(results)
    print(md)
    (args.out / "table.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps({m: r["summary"] for m, r in results.items()}, indent=2))
    for path in plot(results, args.out):
        print("wrote", path)


if __name__ == "__main__":
    main()
