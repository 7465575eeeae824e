"""When can concurrent edits of a MEMIT batch conflict? Key similarity and anchor saturation (docs/beac.md § 5.7).

MEMIT writes a batch with one least-squares solve per layer, ΔW_l = R Kᵀ(λC + KKᵀ)⁻¹, which is row-separable:
row j of ΔW_l only has to map each edit's key k_i to its residual R[j, i]. Two edits that share row j (an anchor
cell of B-EAC's LAS) therefore conflict only as far as their keys are hard to tell apart in the metric of the
solve, |cos_C⁻¹(k_i, k_i')| = |k_iᵀC⁻¹k_i'| / sqrt(k_iᵀC⁻¹k_i · k_i'ᵀC⁻¹k_i'): with near-orthogonal keys the
row can give each edit its own value at no extra cost. And anchors can only be kept apart while a batch's
n·k anchors fit into the d dimensions: the saturation n·k/d is how many edits of the batch share each dimension on
average (k = EAC's anchors per edit).

For batches of CounterFact requests (the order beac_batches.py edits them in) this prints, per MEMIT layer of the
model, the median / 90th percentile / max off-diagonal |cos| of the batch's keys in the C⁻¹ metric and in the
plain one, and n·k/d (``--pairs``: the batches of two corrections per subject of
``beac_batches.py --pairs batch``, with the |cos| of each subject's two corrections apart from the rest)::

    python benchmarks/batch_key_similarity.py --model testbed:small --batch 50 --batches 3 --context 5 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from beac_batches import (
    second_corrections,  # a sibling script: python puts benchmarks/ on the path
)
from beac_tables import similarity_table

from eac_lightning.data.sources import load_requests
from eac_lightning.methods.eac import anchor_count
from eac_lightning.methods.target import (
    ContextTemplateParams,
    compute_keys,
    generate_context_templates,
)
from eac_lightning.models.adapters import mlp_out_name
from eac_lightning.models.loading import default_layers, load_model
from eac_lightning.stats.covariance import CovarianceStore


def abs_cos(gram: torch.Tensor) -> torch.Tensor:
    """|cos| of every pair from a Gram matrix (n, n)."""
    norm = gram.diag().sqrt()
    return (gram / norm[:, None] / norm[None]).abs()


def summary(values: torch.Tensor) -> dict[str, float]:
    return {"median": float(values.median()), "p90": float(values.quantile(0.9)),
            "p99": float(values.quantile(0.99)), "min": float(values.min()), "max": float(values.max())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="testbed:small")
    ap.add_argument("--data", default="counterfact")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--batches", type=int, default=3, help="consecutive batches pooled")
    ap.add_argument("--context", type=int, nargs=2, default=[5, 2], metavar=("LENGTH", "COUNT"))
    ap.add_argument("--gamma", type=float, default=85.0, help="EAC's anchor percentile (for n·k/d)")
    ap.add_argument("--pairs", action="store_true",
                    help="batches of two corrections per subject (beac_batches.py --pairs batch; docs/beac.md § 5.4)")
    ap.add_argument("--pool", type=int, default=500, help="with --pairs: the requests the pairs are built from")
    ap.add_argument("--out", default=None, help="results JSON")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)
    stats = CovarianceStore(model, tok)
    layers = list(default_layers(model).memit)
    templates = generate_context_templates(model, tok, ContextTemplateParams([list(args.context)]))
    if args.pairs:
        edits = second_corrections(load_requests(args.data, limit=args.pool), args.batch, args.data)
    else:
        edits = load_requests(args.data, limit=args.batch * args.batches)
    d = model.config.hidden_size
    k = anchor_count(d, args.gamma)
    report = {"model": args.model, "batch": args.batch, "batches": args.batches, "pairs": args.pairs, "d": d,
              "anchors_per_edit": k, "saturation": args.batch * k / d, "layers": {},
              "command": "python benchmarks/batch_key_similarity.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    n = args.batch
    same_subject = torch.zeros(n, n, dtype=torch.bool)  # with --pairs: i and i + n/2 are one subject's corrections
    if args.pairs:
        half = torch.arange(n // 2)
        same_subject[half, half + n // 2] = same_subject[half + n // 2, half] = True
    others = ~torch.eye(n, dtype=torch.bool) & ~same_subject
    print(f"{args.model}: batch {args.batch}, k = {k} anchors of d = {d}: n·k/d = {report['saturation']:.1f}")
    for layer in layers:
        name = mlp_out_name(model, layer)
        cov = stats.get(name)
        whitened, plain, pairs = [], [], []
        for b in range(args.batches):
            keys = compute_keys(model, tok, edits[b * n:(b + 1) * n], layer, templates).double().T
            cinv = abs_cos(keys.T @ cov.solve(keys))
            whitened.append(cinv[others])
            pairs.append(cinv[same_subject])
            plain.append(abs_cos(keys.T @ keys)[others])
        row = {"cos_cinv": summary(torch.cat(whitened)), "cos_plain": summary(torch.cat(plain))}
        if args.pairs:
            row["cos_cinv_same_subject"] = summary(torch.cat(pairs))
        report["layers"][layer] = row
        print(f"layer {layer}: |cos| in C⁻¹ median {row['cos_cinv']['median']:.3f} p90 {row['cos_cinv']['p90']:.3f} "
              f"max {row['cos_cinv']['max']:.3f}; plain median {row['cos_plain']['median']:.3f} "
              f"p90 {row['cos_plain']['p90']:.3f} max {row['cos_plain']['max']:.3f}"
              + (f"; one subject's two corrections: median {row['cos_cinv_same_subject']['median']:.3f} "
                 f"min {row['cos_cinv_same_subject']['min']:.3f}" if args.pairs else ""))
    print(similarity_table([report]))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
