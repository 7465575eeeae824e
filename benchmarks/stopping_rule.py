"""What the target optimisation's stopping rule changes: the method table (``benchmarks/method_table.py``: 20 edits
through the real CLI, edit metrics of all of them on the final model) for the methods that optimise a target, run
once with the published loop (the default: ``num_steps`` forwards and ``num_steps`` − 1 updates, stopping when the
request's whole loss, NLL + KL + decay, is below 5e-2) and once with the loop it replaced (stopping when the NLL alone
is below 5e-2, ``num_steps`` updates; the code at commit a6cd86a).

    OMP_NUM_THREADS=1 python benchmarks/stopping_rule.py     # the published rule, at the current code

writes ``benchmarks/results/stopping_rule_small_published.json``; the other file,
``stopping_rule_small_nll.json``, was made by the same method table at commit a6cd86a (its ``command`` says how).
``--model.method.init_args.target.early_stop_on nll`` selects the NLL rule at the current code (with the published
step count).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["rome", "rome-eac", "memit", "memit-eac", "alphaedit", "alphaedit-eac", "beac"]


def table(nll: dict, published: dict) -> str:
    """Side by side per method: reliability / generalisation / locality, the mean L1 change of the edited matrices
    and seconds per edit, under the NLL rule and under the published rule."""
    def mean_l1(r: dict) -> float:
        return 100 * sum(r["l1_rel_change"].values()) / len(r["l1_rel_change"])

    before = {r["method"]: r for r in nll["rows"]}
    lines = ["| method | rule | reliability | generalization | locality | L1 change (%) | s/edit |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in published["rows"]:
        for label, row in (("NLL < 5e-2, N updates", before.get(r["method"])), ("**published**", r)):
            if row is None:
                continue
            e = row["edit_metrics"]
            lines.append(f"| {r['method']} | {label} | {e['reliability']:.2f} | {e['generalization']:.3f} | "
                         f"{e['locality']:.3f} | {mean_l1(row):+.1f} | {row['seconds_per_edit']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    out = REPO / "benchmarks" / "results" / "stopping_rule_small_published.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "method_table.py"), "--model", "testbed:small",
                    "--methods", *METHODS, "--out", str(out)], check=True, cwd=REPO)


if __name__ == "__main__":
    main()
