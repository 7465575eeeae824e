"""Where an edit's weight change acts: the subject position it was written for, or the rest of the prompt.

A locate-then-edit update ΔW is computed for the key k* at the last subject token, but it acts on every token's
key x: ΔW x = δ · (kᵀC⁻¹x)/(kᵀC⁻¹k) for ROME (EAC App. B Eq. 7), the analogue with (λC + KKᵀ)⁻¹ for a MEMIT
batch. On a large LM at a middle layer that leakage is small; this script measures it on a given model and shows
what it costs. For known facts (greedy continuation = target_true) it computes the real update, then re-runs each
prompt with ΔW applied

* at the last subject token only (what the target optimisation assumed),
* at every token except the prompt's last,
* at every token (the actual edited model),

and counts the prompts whose top-1 next token becomes the first token of target_new. It also reports the leakage
coefficient at the prompt's last token, |kᵀC⁻¹x_last| / kᵀC⁻¹k, next to 1/sqrt(kᵀC⁻¹k), its size for a key
unrelated to k* in the whitened metric.

With ``--write-aware`` both methods optimise their targets under the update they will write (docs/methods.md,
"Write-aware target"): the third column is then the figure that matters, and the first two show how far the
optimisation leaned on the other tokens.

    python benchmarks/edit_leakage.py --model testbed:tiny --edits 16 --batch 8
    python benchmarks/edit_leakage.py --model testbed:tiny --edits 24 --batch 8 --write-aware \
        --out benchmarks/results/edit_leakage-testbed-tiny-write-aware.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODES = ("subject_only", "all_but_last", "all_positions")


def hits_with_delta(model, tok, module, delta_w: torch.Tensor, request, mode: str) -> bool:
    """Whether target_new's first token is the top-1 prediction when ``delta_w`` acts only at ``mode``'s tokens."""
    from eac_lightning.methods.target import subject_last_index
    from eac_lightning.models.encoding import encode_target

    ids = tok(request.prompt_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    positions = {
        "subject_only": [subject_last_index(tok, request.prompt_text, request.subject)],
        "all_but_last": list(range(n - 1)),
        "all_positions": list(range(n)),
    }[mode]

    def hook(_module, inputs, output):
        extra = torch.zeros_like(output)
        extra[0, positions] = inputs[0][0, positions] @ delta_w.T.to(output.dtype)
        return output + extra

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
    finally:
        handle.remove()
    return logits.argmax().item() == encode_target(tok, request.target_new)[0]


def last_token_leakage(model, tok, cov, name: str, key: torch.Tensor, request) -> tuple[float, float]:
    """(|kᵀC⁻¹x_last| / kᵀC⁻¹k, 1/sqrt(kᵀC⁻¹k)) for the prompt's last token x_last."""
    from eac_lightning.models.tracing import capture

    ids = tok(request.prompt_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad(), capture(model, [name]) as rec:
        model(input_ids=ids)
    x_last = rec[name].input[0, -1].double()
    cinv_k = cov.solve(key.double()[:, None])[:, 0]
    s = float(cinv_k @ key.double())
    return abs(float(cinv_k @ x_last)) / s, s ** -0.5


def measure(model, tok, method, batches: list[list]) -> dict:
    """Apply each batch with ``method`` (one edited matrix), restore the weights, and count hits per mode of
    replaying the returned ΔW."""
    from eac_lightning.methods.base import restore_weights, snapshot
    from eac_lightning.methods.edit import edit

    name = method.module_names[0]
    module = dict(model.named_modules())[name]
    counts = {m: 0 for m in MODES}
    for batch in batches:
        saved = snapshot(model, method.module_names)
        try:
            delta_w = edit(method, model, tok, batch).deltas[name]
        finally:
            restore_weights(model, saved)
        for r in batch:
            for m in MODES:
                counts[m] += hits_with_delta(model, tok, module, delta_w, r, m)
    return {"n": sum(len(b) for b in batches), **counts}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="testbed:tiny")
    ap.add_argument("--edits", type=int, default=16, help="single ROME edits (known facts; 0: skip ROME)")
    ap.add_argument("--batch", type=int, default=8, help="MEMIT batch size (0: skip MEMIT)")
    ap.add_argument("--memit-layer", type=int, default=None, help="the MEMIT layer (default: the model's ROME layer)")
    ap.add_argument("--memit-lambda", type=float, default=10.0,
                    help="λ of (λC + KKᵀ); the published 20000 writes no edit on the testbed (docs/testbed.md)")
    ap.add_argument("--memit-clamp", type=float, default=4.0, help="z norm clamp (ROME's 4; MEMIT publishes 0.75)")
    ap.add_argument("--steps", type=int, default=None, help="v*/z optimisation steps (default: the presets' 20)")
    ap.add_argument("--write-aware", action="store_true", help="write-aware targets for ROME and MEMIT")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/edit_leakage-<model>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from eac_lightning.data.sources import load_requests
    from eac_lightning.editor import method_from_preset
    from eac_lightning.evaluation.probes import known_facts
    from eac_lightning.methods.target import compute_keys
    from eac_lightning.models.loading import default_layers, load_model
    from eac_lightning.paths import data_dir
    from eac_lightning.stats.covariance import CovarianceStore

    t0 = time.time()
    model, tok = load_model(args.model)
    requests = [r for name in ("counterfact", "zsre") for r in load_requests(data_dir() / name, limit=120)]
    known = known_facts(model, tok, requests)
    stats = CovarianceStore(model, tok)  # project defaults: WikiText-2, 100k tokens, cached per model
    result: dict = {"command": "python benchmarks/edit_leakage.py " + " ".join(argv or sys.argv[1:]),
                    "model": args.model, "known_facts": len(known), "write_aware": args.write_aware}

    if args.edits:
        rome = method_from_preset("rome")
        if args.steps:
            rome.target.num_steps = args.steps
        rome.write_aware = args.write_aware
        rome.setup(model, tok, stats)
        reqs = known[: args.edits]
        result["rome"] = {"layer": rome.layer, **measure(model, tok, rome, [[r] for r in reqs])}
        cov = stats.get(rome.module_names[0])
        keys = compute_keys(model, tok, reqs, rome.layer, rome.templates)
        pairs = [last_token_leakage(model, tok, cov, rome.module_names[0], k, r) for k, r in zip(keys, reqs)]
        result["rome"]["last_token_leakage_median"] = statistics.median(p[0] for p in pairs)
        result["rome"]["unrelated_key_leakage_median"] = statistics.median(p[1] for p in pairs)

    if args.batch:
        layer = args.memit_layer if args.memit_layer is not None else default_layers(model).rome
        memit = method_from_preset("memit")
        memit.layers = [layer]
        memit.mom2_update_weight = args.memit_lambda
        memit.target.clamp_norm_factor = args.memit_clamp
        if args.steps:
            memit.target.num_steps = args.steps
        memit.write_aware = args.write_aware
        memit.setup(model, tok, stats)
        batch = known[: args.batch]
        result["memit_single"] = {"layer": layer, "lambda": args.memit_lambda, "clamp": args.memit_clamp,
                                  **measure(model, tok, memit, [[r] for r in batch])}
        result["memit_batch"] = {"layer": layer, "lambda": args.memit_lambda, "clamp": args.memit_clamp,
                                 **measure(model, tok, memit, [batch])}
    result["seconds"] = round(time.time() - t0, 1)

    print(f"{'setting':<14} {'n':>3} " + " ".join(f"{m:>14}" for m in MODES))
    for key in ("rome", "memit_single", "memit_batch"):
        if key in result:
            row = result[key]
            print(f"{key:<14} {row['n']:>3} " + " ".join(f"{row[m]:>14}" for m in MODES))
    if "rome" in result:
        print(f"ROME last-token leakage (median) {result['rome']['last_token_leakage_median']:.3f} vs "
              f"{result['rome']['unrelated_key_leakage_median']:.3f} for an unrelated key")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"edit_leakage-{args.model.replace(':', '-')}.json")
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
