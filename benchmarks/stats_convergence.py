"""How many corpus tokens the key statistics need: the relative change of the solve C⁻¹k on held-out keys, for C over
a fraction of the tokens against C over all of them (:func:`eac_lightning.stats.covariance.convergence_report`,
also ``eac-lightning stats --convergence true``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/stats_convergence.py --model testbed:small --num_tokens 100000

Writes ``benchmarks/results/stats_convergence_<model>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def table(results: dict) -> str:
    rows = results["layers"]
    marks = [r["tokens"] for r in next(iter(rows.values()))]
    out = ["| layer | " + " | ".join(f"{t:,} tokens" for t in marks) + " |", "|---" * (len(marks) + 1) + "|"]
    for name, series in rows.items():
        out.append(f"| {name} | " + " | ".join(f"{r['relative_change']:.3f}" for r in series) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="testbed:small")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="default: the model's ROME and MEMIT layers")
    p.add_argument("--num_tokens", type=int, default=100_000)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    from eac_lightning.models.adapters import mlp_out_name
    from eac_lightning.models.loading import default_layers, load_model
    from eac_lightning.models.loading import default_stats_corpus
    from eac_lightning.stats.covariance import DEFAULT_CORPUS, convergence_report

    model, tok = load_model(args.model)
    layers = args.layers or sorted({default_layers(model).rome, *default_layers(model).memit})
    corpus = default_stats_corpus(model, DEFAULT_CORPUS)
    t = time.perf_counter()
    report = convergence_report(model, tok, [mlp_out_name(model, l) for l in layers], corpus, args.num_tokens,
                                args.seq_len, args.batch_size)
    results = {"model": args.model, "corpus": str(corpus), "num_tokens": args.num_tokens, "layers": report,
               "seconds": round(time.perf_counter() - t, 1), "measured": datetime.date.today().isoformat(),
               "command": "OMP_NUM_THREADS=1 python benchmarks/stats_convergence.py " + " ".join(sys.argv[1:])}
    out = args.out or RESULTS / f"stats_convergence_{args.model.replace(':', '_')}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
