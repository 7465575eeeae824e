"""Cost of B-EAC's solve with RAR's anchor key record (docs/beac.md § 4, B5).

Times one layer's update, :meth:`BEACMEMIT._layer_update`, for a batch of n edits against records of N earlier edits
(each anchoring (100-γ) % of the dimensions): N = 0 is MEMIT's Woodbury solve; N = n/(1-ρ) is the record's effective
size at decay ρ, and N = n·21 its largest (entries fade below the floor after 21 batches at ρ = 0.8). Keys and
residuals are random (the cost does not depend on their values); C is the model's own. Median of ``--repeats``::

    python benchmarks/beac_solve_cost.py --model testbed:small --batch 50 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from eac_lightning.methods.beac import BEACMEMIT
from eac_lightning.methods.beac_plan import AnchorKeyRecord, BEACHyperParams
from eac_lightning.models.loading import default_layers, load_model
from eac_lightning.stats.covariance import CovarianceStore


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="testbed:small")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--gamma", type=float, default=85.0, help="EAC's anchor percentile (anchor density)")
    ap.add_argument("--decay", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="results JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    method = BEACMEMIT(layers=list(default_layers(model).memit), mom2_update_weight=10.0,
                  beac=BEACHyperParams(decay=args.decay))
    method.setup(model, tok, CovarianceStore(model, tok))
    name = method.module_names[0]
    d_k = method.stats.get(name).matrix.shape[0]
    d, n = model.config.hidden_size, args.batch
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(d_k, n, generator=gen, dtype=torch.float64)
    resid = torch.randn(d, n, generator=gen, dtype=torch.float64)
    density = 1 - args.gamma / 100
    report = {"model": args.model, "batch": n, "d": d, "d_k": d_k, "threads": torch.get_num_threads(), "rows": []}
    for size in (0, round(n / (1 - args.decay)), n * 21):
        method.key_record = {} if size == 0 else {name: AnchorKeyRecord(
            torch.randn(size, d_k, generator=gen, dtype=torch.float64), torch.rand(size, generator=gen,
                                                                                 dtype=torch.float64),
            torch.rand(size, d, generator=gen) < density)}
        method._layer_update(0, name, keys, resid)  # warm-up (factorisation of C)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            method._layer_update(0, name, keys, resid)
            times.append(time.perf_counter() - t)
        row = {"record": size, "median_s": statistics.median(times), "runs_s": times}
        report["rows"].append(row)
        print(f"record of {size} earlier edits: {row['median_s']:.3f} s per layer and batch (median of {args.repeats})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
