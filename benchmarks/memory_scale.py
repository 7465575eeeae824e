"""Memory against model size on the CPU: ROME and MEMIT edits on random-weight models of real configurations,
with the process's peak resident memory after 1, 3 and 5 sequential edits (it must stay flat: an edit keeps
nothing but its weight change) and against the model's size.

Each (model, method) runs in its own process, so each peak RSS is that run's alone: the process trains the small
WikiText BPE tokenizer (its ids lie inside the model's vocabulary; see ``device_check.py``), builds the model from
its config (random weights), computes the key statistics of the edited layers (``--stats-tokens``), sets the method
up and applies ``--edits`` sequential single edits of CounterFact requests, recording the current and peak RSS
after each. To fit a shared 2-core CPU the target optimisation is cut to ``--steps`` steps and 3 prefix contexts
(published: 20 steps, 21 contexts); the memory an edit needs does not depend on either beyond the activations of
the contexts' batch. Edit layers: the rule of thumb for a model without published ones (a quarter of the depth).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/memory_scale.py --models gpt2-medium
    OMP_NUM_THREADS=1 python benchmarks/memory_scale.py --models gpt2-medium,llama-1b --dtype bfloat16

Writes ``benchmarks/results/memory_scale_cpu.json`` (``--out`` to change) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = ("gpt2-medium", "llama-1b")
METHODS = ("rome", "memit")


def config(name: str):
    """GPT-2 medium and a ~1B llama (TinyLlama-1.1B's shape), pad/eos on the trained tokenizer's id 0."""
    from transformers import GPT2Config, LlamaConfig

    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if name == "gpt2-medium":
        return GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257, **ids)
    if name == "llama-1b":
        return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, **ids)
    raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")


def rss_gib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GiB; current from psutil when installed."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB
    try:
        import psutil

        current = psutil.Process().memory_info().rss / 2**30
    except ImportError:
        current = float("nan")
    return current, peak


def worker(model_name: str, method_name: str, args) -> dict:
    """One (model, method) run in this process; returns its memory trace."""
    sys.path.insert(0, str(HERE))
    from device_check import build_model, train_tokenizer

    from eac_lightning.data.sources import load_requests
    from eac_lightning.methods import (
        MEMIT,
        ROME,
        ContextTemplateParams,
        TargetHyperParams,
    )
    from eac_lightning.methods.edit import edit
    from eac_lightning.stats.covariance import CovarianceStore

    trace: dict = {"model": model_name, "method": method_name, "dtype": args.dtype}
    tok = train_tokenizer(vocab_size=4096, max_lines=3000)
    requests = load_requests("counterfact", limit=args.edits)
    trace["rss_before_model_gib"] = rss_gib()
    t0 = time.perf_counter()
    model = build_model({"name": model_name, "config": config(model_name)}, tok, torch.device("cpu"),
                        getattr(torch, args.dtype))
    trace["build_s"] = time.perf_counter() - t0
    trace["parameters"] = sum(p.numel() for p in model.parameters())
    trace["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    trace["rss_after_model_gib"] = rss_gib()
    context = ContextTemplateParams(length_count=[[5, 2]])
    if method_name == "rome":
        method = ROME(target=TargetHyperParams(num_steps=args.steps), context=context)
    else:
        method = MEMIT(target=TargetHyperParams(num_steps=args.steps, clamp_norm_factor=0.75), context=context)
    with tempfile.TemporaryDirectory(prefix="memory_scale_stats-") as stats_dir:
        stats = CovarianceStore(model, tok, num_tokens=args.stats_tokens, seq_len=128, batch_size=4,
                                directory=stats_dir)
        t0 = time.perf_counter()
        method.setup(model, tok, stats)  # prefix contexts and the edited layers' key statistics
        trace["setup_s"] = time.perf_counter() - t0
    trace["layers"] = method.module_names
    trace["rss_after_stats_gib"] = rss_gib()
    trace["edits"] = []
    for i, request in enumerate(requests, 1):
        t0 = time.perf_counter()
        result = edit(method, model, tok, [request])
        current, peak = rss_gib()
        trace["edits"].append({"edit": i, "seconds": time.perf_counter() - t0, "rss_gib": current, "peak_rss_gib": peak,
                               "finite": all(bool(torch.isfinite(d).all()) for d in result.deltas.values())})
    return trace


def markdown(report: dict) -> str:
    lines = [("| model | params | dtype | weights GiB | method | RSS after load + stats | peak after edit 1 | "
              "edit 3 | edit 5 | growth 1→5 | s/edit |"), "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | {r['method']} | error: {r['error'][:120]} | | | | | |")
            continue
        peaks = {e["edit"]: e["peak_rss_gib"] for e in r["edits"]}
        secs = sorted(e["seconds"] for e in r["edits"])
        last = max(peaks)
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['dtype']} | {r['weights_gib']:.2f} | "
                     f"{r['method']} | {r['rss_after_stats_gib'][0]:.2f} | {peaks[1]:.2f} | {peaks.get(3, float('nan')):.2f} | "
                     f"{peaks[last]:.2f} | {peaks[last] - peaks[1]:+.3f} | {secs[len(secs) // 2]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-medium", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--edits", type=int, default=5, help="sequential single edits per run")
    parser.add_argument("--steps", type=int, default=3, help="target steps per edit (published: 20)")
    parser.add_argument("--stats-tokens", type=int, default=1024, help="key-statistics tokens")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "memory_scale_cpu.json"))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return {}

    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "settings": {"dtype": args.dtype, "edits": args.edits, "steps": args.steps, "contexts": 3,
                           "stats_tokens": args.stats_tokens},
              "memory": "process RSS (psutil) and peak RSS (getrusage ru_maxrss), one process per run",
              "runs": []}
    for model_name in args.models.split(","):
        config(model_name)  # an unknown name fails before anything runs
        for method_name in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", model_name, method_name, "--dtype", args.dtype,
                   "--edits", str(args.edits), "--steps", str(args.steps), "--stats-tokens", str(args.stats_tokens)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # a failed run is recorded
            if proc.returncode == 0:
                run = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                run = {"model": model_name, "method": method_name, "error": proc.stderr.strip()[-2000:]}
            run["wall_s"] = time.perf_counter() - t0
            report["runs"].append(run)
            print(f"{model_name} {method_name}: {run['wall_s']:.0f} s", file=sys.stderr, flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
