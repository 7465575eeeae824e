"""One step of the target optimisation with its prompts grouped by length against one forward padded to the longest.

Builds the :class:`~eac_lightning.methods.target.TargetProblem` of the first ``n`` CounterFact requests at MEMIT's
last layer of the model (prefix contexts from ``--context``, optionally with write-aware directions, as the
long-stream runs have) and times one loss and its gradient, alternating the two settings after one untimed step so
that both see the same machine load; reports the medians, the padding share of each and the number of groups.

    python benchmarks/target_grouping.py --model testbed:small --requests 1 4 100 --contexts 10 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ONE_FORWARD = 10**9  # a per-forward cost no padding outweighs: every prompt in one padded forward


def step_seconds(problem, repeats: int, cost: int) -> list[float]:
    from eac_lightning.methods import target

    target.FORWARD_COST_TOKENS, saved = cost, target.FORWARD_COST_TOKENS
    problem.thaw()  # regroups its prompts under this cost
    try:
        times = []
        for _ in range(repeats):
            delta = torch.zeros_like(problem.v0, requires_grad=True)
            t0 = time.perf_counter()
            loss = problem.loss(delta)[0]
            torch.autograd.grad(loss, delta)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        target.FORWARD_COST_TOKENS = saved
        problem.thaw()


def table(results: list[dict]) -> str:
    """The rows of one or more results files: per problem, one padded forward against the grouped forwards."""
    lines = [("| requests | prefix contexts (count × tokens) | write-aware | prompts | one padded forward | grouped "
              "| padding (one / grouped) | groups | speed-up |"), "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        length, count = res["contexts"]
        for r in res["rows"]:
            lines.append(f"| {r['requests']} | {count} × {length} | {'yes' if res['write_aware'] else 'no'} "
                         f"| {r['prompts']} | {r['median_s one padded forward']:.3f} s | {r['median_s grouped']:.3f} s "
                         f"| {r['padding_one_forward']:.0%} / {r['padding_grouped']:.0%} | {r['groups']} "
                         f"| {r['speedup']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="testbed:small")
    ap.add_argument("--requests", type=int, nargs="+", default=[1, 4, 100], help="batch sizes (one problem each)")
    ap.add_argument("--contexts", type=int, nargs=2, default=[10, 5], metavar=("LENGTH", "COUNT"))
    ap.add_argument("--write-aware", action="store_true", help="MEMIT's write directions (λ 10), one joint problem")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two settings")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "target_grouping.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from eac_lightning.data.sources import load_requests
    from eac_lightning.methods import MEMIT
    from eac_lightning.methods.target import (
        FORWARD_COST_TOKENS,
        ContextTemplateParams,
        TargetHyperParams,
        TargetProblem,
        forward_cost_tokens,
        length_groups,
    )
    from eac_lightning.models.loading import load_model
    from eac_lightning.stats.covariance import CovarianceStore

    model, tok = load_model(args.model)
    requests = load_requests("counterfact", limit=max(args.requests))
    method = MEMIT(context=ContextTemplateParams(length_count=[args.contexts]), mom2_update_weight=10.0)
    method.setup(model, tok, CovarianceStore(model, tok, num_tokens=20_000))
    rows = []
    for n in args.requests:
        batch = requests[:n]
        directions = method._write_directions(model, method._batch_keys(model, tok, batch)) if args.write_aware else None
        problem = TargetProblem(model, tok, batch, method.layers[-1], method.templates, TargetHyperParams(),
                                site="residual", write_directions=directions)
        lengths = problem.mask.sum(1)
        times: dict[str, list[float]] = {"one padded forward": [], "grouped": []}
        step_seconds(problem, 1, FORWARD_COST_TOKENS)  # warm-up, not timed
        for _ in range(args.rounds):
            times["one padded forward"] += step_seconds(problem, 1, ONE_FORWARD)
            times["grouped"] += step_seconds(problem, 1, FORWARD_COST_TOKENS)
        groups = length_groups(lengths, forward_cost_tokens(problem.v0.shape[-1]))
        grouped_tokens = sum(len(g) * int(lengths[g].max()) for g in groups)
        row = {"requests": n, "prompts": len(lengths), "tokens": int(lengths.sum()),
               "padding_one_forward": 1 - int(lengths.sum()) / (len(lengths) * int(lengths.max())),
               "padding_grouped": 1 - int(lengths.sum()) / grouped_tokens, "groups": len(groups),
               **{f"median_s {k}": statistics.median(v) for k, v in times.items()}, "times": times}
        row["speedup"] = row["median_s one padded forward"] / row["median_s grouped"]
        rows.append(row)
        print(f"{n:>4} requests, {row['prompts']} prompts: one forward {row['median_s one padded forward']:.3f} s "
              f"({row['padding_one_forward']:.0%} padding), {row['groups']} groups {row['median_s grouped']:.3f} s "
              f"({row['padding_grouped']:.0%} padding): {row['speedup']:.2f}x", flush=True)
    results = {"model": args.model, "contexts": args.contexts, "write_aware": args.write_aware,
               "threads": args.threads, "command": "python benchmarks/target_grouping.py " + " ".join(sys.argv[1:]),
               "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table([results]))


if __name__ == "__main__":
    main()
