"""Device check: ROME, ROME-EAC, MEMIT and MEMIT-EAC on random-weight models of the GPT2-XL and LLaMA-3-8B
configurations in bfloat16 on a GPU, against the EAC paper's Table 1 (seconds per edit, GPT2-XL: ROME 6.70,
ROME-EAC 6.21, MEMIT 5.23, MEMIT-EAC 5.92; LLaMA-3-8B about 24).

For each model it builds the architecture from its config (random weights, the real vocabulary size, so the
memory figures are the real ones), computes the key statistics of every edited layer once (one
:class:`~eac_lightning.stats.covariance.CovarianceStore` pass, reported as tokens/s), then for each method times
the project's edit path (:func:`~eac_lightning.methods.edit.optimise_targets` then
:func:`~eac_lightning.methods.edit.write_targets`, i.e. :func:`~eac_lightning.methods.edit.edit` in its two halves):
ROME and ROME-EAC on ``--rome-edits`` sequential single edits, MEMIT and MEMIT-EAC on one batch of
``--memit-batch`` (100) CounterFact requests. Reported per method: median seconds per edit (a MEMIT batch's time
over its size), the target-optimisation and write shares, the same figure extrapolated to the paper's 20 target
steps (the optimisation is linear in steps: random weights never reach ROME's early stop), and peak GPU memory
(``torch.cuda.max_memory_allocated`` since the method's setup). Weights are restored between methods.

What is reduced against Table 1's setting, to fit 8 minutes for both models: ``--steps`` (4) target steps
instead of 20, ``--stats-tokens`` (8192) tokens of key statistics instead of 100,000 WikiText tokens (the
timings exclude the statistics, as the paper's do), random weights (an edit's cost does not depend on the weights'
values, but its success does: none is reported), and a BPE tokenizer trained here on the shipped WikiText (no hub
is reachable) whose ids are a subset of the model's vocabulary; sampling of the prefix contexts is restricted to
those ids so they have their real lengths. Published edit layers and λ (``PUBLISHED_LAYERS``; λ 20000 GPT2-XL,
15000 LLaMA-3-8B) and the 21 prefix contexts are kept. A step past ``--budget-s`` is skipped and recorded so.

Usage::

    python benchmarks/device_check.py                 # on a GPU; JSON to $OUT/device_check.json or
                                                      # benchmarks/results/device_check.json
    OMP_NUM_THREADS=1 python benchmarks/device_check.py --smoke    # tiny configs of both families on the CPU

``--real-width`` runs the rows of ``benchmarks/real_width.py`` instead (``eac-lightning fit`` on the real-width proxies,
each method as the CPU table has it, on the GPU the CLI picks), into ``$OUT/real_width.json``; with ``--smoke``,
its smallest configuration on a 64-wide GPT-2 on the CPU::

    python benchmarks/device_check.py --real-width [--real-width-args "--shapes gpt2-xl llama3-8b --dtype bfloat16"]
    OMP_NUM_THREADS=1 python benchmarks/device_check.py --real-width --smoke
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_TABLE1_S_PER_EDIT = {
    "gpt2-xl": {"rome": 6.70, "rome-eac": 6.21, "memit": 5.23, "memit-eac": 5.92},
    "llama-3-8b": {"approximately, every method": 24.0},
}
PAPER_STEPS, PAPER_STATS_TOKENS = 20, 100_000
METHODS = ("rome", "rome-eac", "memit", "memit-eac")


def model_specs(smoke: bool) -> list[dict]:
    """The two configurations (name, transformers config, ROME layer, MEMIT layers, MEMIT's λ).

    Full: GPT2-XL and LLaMA-3-8B with their published edit layers. Smoke: 4-layer models of the same families."""
    from transformers import GPT2Config, LlamaConfig

    from eac_lightning.models.loading import PUBLISHED_LAYERS

    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}  # the trained tokenizer's <|endoftext|>
    if smoke:
        return [
            {"name": "gpt2-tiny", "config": GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=256,
                                                     vocab_size=1000, **ids),
                 "rome_layer": 1, "memit_layers": [0, 1], "mom2_update_weight": 100.0},
            {"name": "llama-tiny", "config": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                                       max_position_embeddings=256, **ids),
                 "rome_layer": 1, "memit_layers": [0, 1], "mom2_update_weight": 100.0},
        ]
    gpt2, llama = PUBLISHED_LAYERS["gpt2-xl"], PUBLISHED_LAYERS["meta-llama-3-8b"]
    return [
        {"name": "gpt2-xl", "config": GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=1024,
                                               vocab_size=50257, **ids),
             "rome_layer": gpt2.rome, "memit_layers": list(gpt2.memit), "mom2_update_weight": 20000.0},
        {"name": "llama-3-8b", "config": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                                   max_position_embeddings=8192, rope_theta=500000.0, **ids),
             "rome_layer": llama.rome, "memit_layers": list(llama.memit), "mom2_update_weight": 15000.0},
    ]


def make_method(name: str, spec: dict, steps: int):
    """The method preset's settings (configs/methods/<name>.yaml) with ``steps`` target steps and the model's
    published layers and λ."""
    from eac_lightning.methods import (
        MEMIT,
        ROME,
        ContextTemplateParams,
        EACHyperParams,
        TargetHyperParams,
    )

    eac = EACHyperParams() if name.endswith("-eac") else None
    context = ContextTemplateParams(length_count=[[5, 10], [10, 10]])
    if name.startswith("rome"):
        return ROME(layer=spec["rome_layer"], target=TargetHyperParams(num_steps=steps), context=context, eac=eac)
    return MEMIT(layers=spec["memit_layers"], target=TargetHyperParams(num_steps=steps, clamp_norm_factor=0.75),
                 context=context, mom2_update_weight=spec["mom2_update_weight"], eac=eac)


def train_tokenizer(vocab_size: int, max_lines: int | None):
    """A byte-level BPE tokenizer trained on the shipped WikiText-2 (no hub tokenizer is reachable)."""
    from eac_lightning.models.tokenizer import train_bpe_tokenizer
    from eac_lightning.paths import data_dir

    lines = []
    for file in sorted((data_dir() / "wikitext").glob("*.txt")):
        lines += [ln.strip() for ln in file.read_text(encoding="utf-8").splitlines() if len(ln.strip()) > 40]
    return train_bpe_tokenizer(lines[:max_lines], vocab_size=vocab_size)


def build_model(spec: dict, tok, device: torch.device, dtype: torch.dtype):
    """The random-weight model, initialised directly on ``device`` (an 8B model initialised on the CPU takes
    minutes). Sampling is restricted to the tokenizer's ids, which all lie inside the model's vocabulary."""
    from transformers import AutoModelForCausalLM

    vocab = spec["config"].vocab_size
    if len(tok) > vocab:
        raise ValueError(f"the tokenizer has {len(tok)} ids, more than {spec['name']}'s vocabulary of {vocab}")
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(spec["config"], dtype=dtype)
    model.eval()
    model.generation_config.suppress_tokens = list(range(len(tok), vocab)) or None
    return model


class MemoryMeter:
    """Peak memory of the device: CUDA's allocator statistics, or the process's peak RSS on the CPU (which
    cannot be reset, so on the CPU each figure is the peak so far)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "torch.cuda.max_memory_allocated" if self.cuda else "process peak RSS (getrusage ru_maxrss)"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated() / 2**30 if self.cuda else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_method(name: str, spec: dict, model, tok, stats, requests, args, device, meter: MemoryMeter) -> dict:
    """Set ``name`` up, apply its edits (ROME: sequential singles; MEMIT: one batch), restore the weights."""
    from eac_lightning.methods.base import restore_weights, snapshot
    from eac_lightning.methods.edit import optimise_targets, write_targets

    method = make_method(name, spec, args.steps)
    meter.reset()
    t0 = time.perf_counter()
    method.setup(model, tok, stats)  # prefix contexts (the statistics are already computed)
    _sync(device)
    setup_s = time.perf_counter() - t0
    saved = snapshot(model, method.module_names)
    batches = ([[r] for r in requests[:args.rome_edits]] if name.startswith("rome")
               else [requests[:args.memit_batch]])
    per_edit, target_share, write_share, success = [], [], [], []
    try:
        for batch in batches:
            _sync(device)
            t0 = time.perf_counter()
            targets = optimise_targets(method, model, tok, batch)
            _sync(device)
            t1 = time.perf_counter()
            result = write_targets(method, model, tok, targets)
            _sync(device)
            t2 = time.perf_counter()
            per_edit.append((t2 - t0) / len(batch))
            target_share.append((t1 - t0) / len(batch))
            write_share.append((t2 - t1) / len(batch))
            success += [rec.success for rec in result.records]
            finite = all(bool(torch.isfinite(d).all()) for d in result.deltas.values())
            if not finite:
                raise FloatingPointError(f"{name} wrote a non-finite update")
    finally:
        restore_weights(model, saved)
    target_s, write_s = statistics.median(target_share), statistics.median(write_share)
    return {
        "edits": sum(len(b) for b in batches),
        "batch_size": len(batches[0]),
        "layers": method.module_names,
        "target_steps": args.steps,
        "setup_s": setup_s,
        "median_s_per_edit": statistics.median(per_edit),
        "median_target_s_per_edit": target_s,
        "median_write_s_per_edit": write_s,
        "s_per_edit_extrapolated_to_20_steps": target_s * PAPER_STEPS / args.steps + write_s,
        "timings_s_per_edit": per_edit,
        "peak_memory_gib": meter.peak_gib(),
        "success_rate_random_weights": sum(success) / len(success),
    }


def check_model(spec: dict, tok, requests, args, device, dtype, meter: MemoryMeter, deadline: float,
                stats_dir: Path, out: dict, save) -> None:
    """Statistics throughput and the four methods on one configuration, written into ``out``; ``save`` is called
    after each step so that a run stopped by its time limit still leaves what it measured."""
    from eac_lightning.models.adapters import mlp_out_name
    from eac_lightning.stats.covariance import CovarianceStore

    out.update({"config": spec["config"].to_diff_dict(), "methods": {}})
    meter.reset()
    t0 = time.perf_counter()
    model = build_model(spec, tok, device, dtype)
    _sync(device)
    out["build_s"] = time.perf_counter() - t0
    out["parameters"] = sum(p.numel() for p in model.parameters())
    out["weights_gib"] = meter.allocated_gib()
    save()
    try:
        names = sorted({mlp_out_name(model, layer) for layer in [spec["rome_layer"], *spec["memit_layers"]]})
        stats = CovarianceStore(model, tok, num_tokens=args.stats_tokens, seq_len=args.stats_seq_len,
                                batch_size=args.stats_batch_size, directory=stats_dir)
        meter.reset()
        t0 = time.perf_counter()
        stats.prefetch(names)  # one pass over the corpus for every edited layer, as a run's setup does
        _sync(device)
        seconds = time.perf_counter() - t0
        count = stats.get(names[0]).count
        out["key_statistics"] = {"layers": names, "tokens": count, "seconds": seconds, "tokens_per_s": count / seconds,
                                 "seq_len": args.stats_seq_len, "batch_size": args.stats_batch_size,
                                 "peak_memory_gib": meter.peak_gib(),
                                 "note": "one pass; includes saving the float64 sums to the cache folder"}
        save()
        for name in args.methods:
            if time.monotonic() > deadline:
                out["methods"][name] = {"skipped": f"past the {args.budget_s:.0f}-s budget"}
                continue
            try:
                out["methods"][name] = time_method(name, spec, model, tok, stats, requests, args, device, meter)
            except Exception as err:  # noqa: BLE001 -- one method's failure (e.g. out of memory) must not lose the others
                out["methods"][name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"{spec['name']} {name}: {json.dumps(out['methods'][name])[:300]}", file=sys.stderr, flush=True)
            save()
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def markdown(report: dict) -> str:
    """The methods' table, then one line per model for the key statistics."""
    lines = ["| model | method | median s/edit | extrapolated to 20 steps | paper (Table 1) | peak GiB | edits |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, res in report["models"].items():
        paper = PAPER_TABLE1_S_PER_EDIT.get(model, {})
        for method, r in res.get("methods", {}).items():
            ref = paper.get(method, next(iter(paper.values()), None))
            if "median_s_per_edit" in r:
                lines.append(f"| {model} | {method} | {r['median_s_per_edit']:.3f} | "
                             f"{r['s_per_edit_extrapolated_to_20_steps']:.3f} | {ref if ref is not None else '-'} | "
                             f"{r['peak_memory_gib']:.2f} | {r['edits']} |")
            else:
                lines.append(f"| {model} | {method} | {r.get('error') or r.get('skipped')} | | | | |")
    lines.append("")
    for model, res in report["models"].items():
        if "key_statistics" in res:
            s = res["key_statistics"]
            lines.append(f"{model}: key statistics, {s['tokens']} tokens over {len(s['layers'])} layers in "
                         f"{s['seconds']:.1f} s = {s['tokens_per_s']:.0f} tokens/s, peak {s['peak_memory_gib']:.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU (checks the script itself)")
    parser.add_argument("--steps", type=int, default=None, help="target steps per edit (default 4; smoke 2)")
    parser.add_argument("--rome-edits", type=int, default=None, help="sequential ROME edits (default 3; smoke 2)")
    parser.add_argument("--memit-batch", type=int, default=None, help="MEMIT batch (default 100; smoke 4)")
    parser.add_argument("--stats-tokens", type=int, default=None, help="key-statistics tokens (8192; smoke 512)")
    parser.add_argument("--stats-seq-len", type=int, default=256)
    parser.add_argument("--stats-batch-size", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--models", default=None, help="comma-separated subset of the configurations' names")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip what would start after this")
    parser.add_argument("--out", default=None, help="JSON file (default $OUT/device_check.json if $OUT is set, "
                                                    "else benchmarks/results/device_check.json)")
    parser.add_argument("--real-width", action="store_true",
                        help="run benchmarks/real_width.py's rows (the real-width proxies through eac-lightning fit)")
    parser.add_argument("--real-width-args", default="",
                        help="more arguments for benchmarks/real_width.py (e.g. \"--shapes gpt2-xl --dtype bfloat16\")")
    args = parser.parse_args(argv)
    if args.real_width:
        return real_width(args)
    defaults = {"steps": (2, 4), "rome_edits": (2, 3), "memit_batch": (4, 100), "stats_tokens": (512, 8192)}
    for key, (smoke_value, full_value) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke_value if args.smoke else full_value)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)} (known: {', '.join(METHODS)})")

    started = time.monotonic()
    deadline = started + args.budget_s
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device: the device check needs a GPU (--smoke runs tiny configs on the CPU)")
    dtype = torch.bfloat16
    if args.out:
        out_path = Path(args.out)
    elif os.environ.get("OUT"):
        out_path = Path(os.environ["OUT"]) / "device_check.json"
    else:
        out_path = RESULTS / "device_check.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    from eac_lightning.data.sources import load_requests

    specs = model_specs(args.smoke)
    if args.models:
        wanted = args.models.split(",")
        specs = [s for s in specs if s["name"] in wanted]
        if not specs:
            parser.error(f"--models {args.models!r} names none of {[s['name'] for s in model_specs(args.smoke)]}")
    meter = MemoryMeter(device)
    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype).split(".")[-1],
        "memory": meter.kind,
        "paper_table1_s_per_edit": PAPER_TABLE1_S_PER_EDIT,
        "reduced_vs_paper": {
            "target_steps": [args.steps, PAPER_STEPS],
            "key_statistics_tokens": [args.stats_tokens, PAPER_STATS_TOKENS],
            "rome_edits_timed": args.rome_edits,
            "memit_batch": args.memit_batch,
            "weights": "random (from the config); success rates are not meaningful",
            "tokenizer": "BPE trained on the shipped WikiText-2, ids inside the model's vocabulary",
        },
        "settings": {k: getattr(args, k) for k in ("steps", "rome_edits", "memit_batch", "stats_tokens",
                                                   "stats_seq_len", "stats_batch_size", "budget_s")},
        "models": {},
    }

    def save() -> None:
        report["elapsed_s"] = time.monotonic() - started
        out_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    tok = train_tokenizer(vocab_size=512 if args.smoke else 8192, max_lines=1500 if args.smoke else None)
    needed = max(args.rome_edits, args.memit_batch)
    requests = load_requests("counterfact", limit=needed)
    if len(requests) < needed:
        raise SystemExit(f"the shipped CounterFact holds {len(requests)} requests, {needed} needed")
    report["tokenizer_vocab"] = len(tok)
    with tempfile.TemporaryDirectory(prefix="device_check_stats-") as stats_dir:
        for spec in specs:
            if time.monotonic() > deadline:
                report["models"][spec["name"]] = {"skipped": f"past the {args.budget_s:.0f}-s budget"}
                continue
            report["models"][spec["name"]] = {}
            check_model(spec, tok, requests, args, device, dtype, meter, deadline, Path(stats_dir),
                        report["models"][spec["name"]], save)
            save()
    save()
    print(markdown(report))
    print(f"wrote {out_path} ({report['elapsed_s']:.0f} s)", file=sys.stderr)
    return report


def real_width(args) -> dict:
    """benchmarks/real_width.py's rows, written to ``--out`` (default ``$OUT/real_width.json``, else a file beside
    the CPU one), run folders in a temporary folder; ``--smoke``: its smallest configuration (statistics and two
    ROME-EAC edits on a 64-wide GPT-2)."""
    import shlex

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import real_width as rw

    if args.out:
        out = Path(args.out)
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "real_width.json"
    else:
        out = RESULTS / "real_width_device.json"
    extra = shlex.split(args.real_width_args)
    if args.smoke:
        extra = ["--shapes", "tiny", "--methods", "statistics", "rome-eac", "--rome-edits", "1", "--stats-tokens",
                 "512", *extra]
    with tempfile.TemporaryDirectory(prefix="real_width-") as root:
        return rw.main(["--out", str(out), "--root", root, *extra])


if __name__ == "__main__":
    main()
