"""Testbed build time and quality, and the checks that choose and justify its edit layers.

1. **Build** one preset from scratch and report wall time (corpus + tokenizer + training + measurements), training
   time, the process's CPU time, the machine's load average before and after (the CPU may be shared: a load above
   the core count slows the build proportionally) and the testbed's measured figures. The ``small`` preset must
   build in under 30 minutes on a 2-core CPU, ``tiny`` in under a minute.
2. **ROME check** (``--rome-edits N``): N independent single ROME edits of the testbed's own CounterFact records
   (true object -> CounterFact's ``target_new``) at each of ``--rome-layers``, with each of ``--rome-presets``
   (default ``configs/methods/rome.yaml``: ROME's GPT-2 XL values, 20 v* steps, lr 0.5, clamp 4, KL 0.0625, prefix
   contexts [[5,10],[10,10]], covariance adjustment), as published and, with ``--testbed-overlay``, also composed
   with ``configs/testbed/<preset>.yaml`` (write-aware v*); the weights are restored after each edit. Reports
   reliability, generalization and locality (EAC Eqs. 10-12, ``eac_lightning.evaluation.edit_metrics``) and their
   exact-greedy variants, per preset and layer.
3. **Causal trace** (``--trace-facts N``): ROME's causal tracing over N known CounterFact facts; writes
   ``trace.json``/``trace.pt``/``trace.png`` to ``--trace-out``.

The report is printed and written to ``benchmarks/results/testbed_<preset>.json``.

Usage::

    nice python benchmarks/testbed_build.py --preset small --install          # build, install as testbed:small
    python benchmarks/testbed_build.py --model testbed:small --rome-edits 50 --rome-layers 0,1,2,3 \\
        --trace-facts 50 --trace-out docs/img                                 # checks on the cached testbed
    python benchmarks/testbed_build.py --preset tiny --out /tmp/tb --rome-edits 10
    python benchmarks/testbed_build.py --model testbed:tiny --rome-edits 20 --rome-presets rome rome-eac \
        --testbed-overlay --tag edits                                         # published vs testbed overlay

``--install`` moves the build into the cache folder that ``testbed:<preset>`` resolves to (unless one is already
there), so the measured build is the one every later run uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

LIMITS_SECONDS = {"tiny": 60, "small": 30 * 60}
FIGURES = (
    "n_parameters",
    "train_seconds",
    "build_seconds",
    "fact_accuracy",
    "trained_prompt_accuracy",
    "heldout_paraphrase_accuracy",
    "neighbourhood_accuracy",
    "attribute_accuracy",
    "sst2_heldout_accuracy",
    "wikitext2_test_perplexity",
    "edit_layer",
    "memit_layers",
)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build(args) -> tuple[Path, dict]:
    import torch

    from eac_lightning.testbed.build import build_testbed, testbed_dir

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"testbed-{args.preset}-"))
    load_before = os.getloadavg()
    t0, c0 = time.time(), cpu_seconds()
    info = build_testbed(out, args.preset, seed=args.seed, **json.loads(args.set or "{}"))
    wall, cpu = time.time() - t0, cpu_seconds() - c0
    report = {
        "wall_seconds": round(wall, 1),
        "process_cpu_seconds": round(cpu, 1),
        "limit_seconds": LIMITS_SECONDS.get(args.preset),
        "within_limit": wall < LIMITS_SECONDS[args.preset] if args.preset in LIMITS_SECONDS else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "figures": {k: info.get(k) for k in FIGURES},
        "by_source": info.get("by_source"),
        "corpus": info.get("corpus"),
        "train_tokens": info.get("train_tokens"),
    }
    if args.install:
        final = testbed_dir(args.preset, args.seed)
        if (final / "testbed.json").exists():
            report["installed"] = f"not installed: {final} already holds a testbed"
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(out), str(final))
            out = final
            report["installed"] = str(final)
    report["out"] = str(out)
    return out, report


def rome_check(folder: Path, n_edits: int, layers: list[int], presets: list[str] = ("rome",),
               testbed_overlay: bool = False, stats_corpus: str | None = None,
               method_set: dict | None = None) -> dict:
    """N single edits (restored after each) of the testbed's CounterFact records at each layer, with each method
    preset as published and (``testbed_overlay``) composed with ``configs/testbed/<preset>.yaml``."""
    import numpy as np

    from eac_lightning.editor import method_from_preset, single_edit_metrics
    from eac_lightning.evaluation.edit_metrics import compute_locality_reference
    from eac_lightning.models.loading import load_model
    from eac_lightning.stats.covariance import CovarianceStore
    from eac_lightning.testbed.corpus import load_fact_requests

    model, tok = load_model(str(folder))
    info = json.loads((folder / "testbed.json").read_text())
    files = info.get("fact_files") or None
    reqs = [r for r in load_fact_requests(files, info["preset"]["max_facts_per_path"]) if "counterfact" in (r.source or "")]
    reqs = reqs[:n_edits]
    ref = compute_locality_reference(model, tok, reqs)
    # the project's defaults (the testbed's stats_corpus.jsonl, 100k tokens) unless another corpus is named
    stats = CovarianceStore(model, tok, **({"corpus": stats_corpus} if stats_corpus else {}))
    out = {"n_edits": len(reqs), "stats_corpus": stats.corpus, "presets": {}}
    metrics = ("reliability", "generalization", "locality", "reliability_gen", "generalization_gen", "locality_gen")
    variants = [(p, ()) for p in presets]
    if testbed_overlay:
        variants += [(f"{p}+testbed", (REPO / "configs" / "testbed" / f"{p}.yaml",)) for p in presets]
    if method_set:  # e.g. {"init_args": {"eac": {"gamma": 50.0}}}, merged last into every variant
        variants = [(name + "+set", (*overlays, method_set)) for name, overlays in variants]
    for name, overlays in variants:
        out["presets"][name] = {}
        for layer in layers:
            method = method_from_preset(name.split("+")[0], *overlays)
            method.layer = layer
            method.setup(model, tok, stats)
            t0 = time.time()
            rows = single_edit_metrics(model, tok, method, reqs, ref)
            out["presets"][name][str(layer)] = {
                **{k: round(float(np.mean([x[k] for x in rows])), 4) for k in metrics},
                "seconds": round(time.time() - t0, 1),
            }
            print(f"{name} layer {layer}: {out['presets'][name][str(layer)]}", flush=True)
    return out


def trace_table(trace: dict) -> str:
    """The causal trace's average indirect effect by layer (a report's ``trace``), as docs/testbed.md shows it."""
    layers = range(len(trace["mlp_last_subject_token"]))
    lines = ["| AIE by layer | " + " | ".join(str(i) for i in layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for key, label in (("mlp_last_subject_token", "MLP at the last subject token"),
                       ("mlp_last_token", "MLP at the last token"), ("attn_last_token", "attention at the last token")):
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in trace[key]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="check an existing testbed (folder or testbed:<preset>); no build")
    ap.add_argument("--out", default=None, help="build folder (default: a temporary folder)")
    ap.add_argument("--set", default=None, help='preset fields to change, as JSON (e.g. \'{"subject_mask": "mask"}\')')
    ap.add_argument("--install", action="store_true", help="install the build as the cached testbed:<preset>")
    ap.add_argument("--rome-edits", type=int, default=0, help="single ROME edits per layer (0: skip)")
    ap.add_argument("--rome-layers", default=None, help="comma-separated layers (default: the testbed's edit_layer)")
    ap.add_argument("--rome-presets", nargs="+", default=["rome"], help="method presets of the check (rome, rome-eac)")
    ap.add_argument("--testbed-overlay", action="store_true",
                    help="also run each preset composed with configs/testbed/<preset>.yaml")
    ap.add_argument("--stats-corpus", default=None,
                    help="corpus of the key statistics C (default: the testbed's own training-stream sample)")
    ap.add_argument("--method-set", nargs="*", default=None, metavar="ATTR=VALUE",
                    help="method settings merged over every preset of the edit check (e.g. eac.gamma=50)")
    ap.add_argument("--trace-facts", type=int, default=0, help="facts to causal-trace (0: skip)")
    ap.add_argument("--trace-samples", type=int, default=10)
    ap.add_argument("--trace-out", default=None, help="folder for trace.json/.pt/.png (default: <testbed>/trace)")
    ap.add_argument("--tag", default=None, help="suffix of the results file (for --set variants)")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.set and args.install:
        ap.error("--install builds the preset as defined; a --set variant is not testbed:<preset>")

    report: dict = {"preset": args.preset, "seed": args.seed, "set": json.loads(args.set or "{}"),
                    "command": "python benchmarks/testbed_build.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.model:
        from eac_lightning.models.loading import resolve_model_path

        folder = Path(resolve_model_path(args.model))
        info = json.loads((folder / "testbed.json").read_text())
        report.update(preset=info["preset"]["name"], model=str(folder),
                      figures={k: info.get(k) for k in FIGURES}, stored_build_seconds=info.get("build_seconds"))
    else:
        folder, built = build(args)
        report["build"] = built

    info = json.loads((folder / "testbed.json").read_text())
    if args.rome_edits:
        layers = [int(x) for x in args.rome_layers.split(",")] if args.rome_layers else [info["edit_layer"]]
        method_set: dict = {}
        for item in args.method_set or []:
            key, value = item.split("=", 1)
            node = method_set.setdefault("init_args", {})
            *parents, leaf = key.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = yaml.safe_load(value)
        report["rome"] = rome_check(folder, args.rome_edits, layers, args.rome_presets, args.testbed_overlay,
                                    args.stats_corpus, method_set)
        report["rome"]["method_set"] = args.method_set
    if args.trace_facts:
        from eac_lightning.models.loading import load_model
        from eac_lightning.testbed.causal_trace import load_trace_facts, run_trace

        model, tok = load_model(str(folder))
        trace_out = Path(args.trace_out) if args.trace_out else folder / "trace"
        summary = run_trace(model, tok, load_trace_facts(folder), trace_out, num_facts=args.trace_facts,
                            samples=args.trace_samples,
                            title=f"testbed:{report['preset']} - average indirect effect over {{n}} CounterFact facts")
        report["trace"] = {k: summary[k] for k in ("n_facts", "high", "low", "mlp_last_subject_token",
                                                   "mlp_last_token", "attn_last_token", "edit_layer", "memit_layers")}
        report["trace"]["files"] = str(trace_out)

    print(json.dumps(report, indent=2))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    (results / f"testbed_{report['preset']}{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
