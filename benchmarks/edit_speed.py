"""Editing speed: median seconds per edit of every method on one model, so later work can be compared.

For each method preset (``configs/methods/<name>.yaml``) the script sets the method up once (context templates,
key covariance: cached on disk and excluded from the timings, reported separately), then runs ``--repeats`` runs of
``--edits`` sequential edits of real CounterFact requests (``--batch-size`` requests per edit call; 1 = the
sequential setting of the EAC paper). Before each run the edited weights and the method's state are restored, so
every run edits the same model. One timing is one :meth:`EditMethod.edit` call (validation, target optimisation,
closed-form write) divided by its batch size; the table reports the median over all edits of all runs, with the
fastest and slowest, by wall clock and by CPU time of the process, and the **mean** CPU time per edit (all runs'
CPU time over all their edits): what a stream of such edits costs. Compare methods on the mean: a batch's timing is
already its edits' mean, and single edits are skewed (an edit that never meets the stopping rule runs every
step), so their median sits below their mean. The write step is timed on its own too
(``write``), which shows where the time goes.

Beside each median stands the **floor** of a locate-then-edit method: its target optimisation's unavoidable work,
one forward over the prefix contexts from the edited layer on and one backward per step, for the steps the edit
really took (:class:`FloorMeter`), so ``× floor`` says how much the rest (keys, closed form, bookkeeping) adds.

Usage::

    python benchmarks/edit_speed.py                                  # testbed:tiny (built on first use)
    python benchmarks/edit_speed.py --model testbed:small --edits 5 --repeats 3
    python benchmarks/edit_speed.py --methods rome,rome-eac --edits 10 --batch-size 1
    python benchmarks/edit_speed.py --model testbed:small --methods rome-eac,memit@10 --edits 20   # side by side

Writes a markdown table to stdout and the raw timings as JSON to ``benchmarks/results/`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

METHODS = ["rome", "rome-eac", "memit", "memit-eac", "ft", "ft-en", "alphaedit"]
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the timings were taken on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_start": load,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class FloorMeter:
    """The cost floor of the target optimisations: per step, one forward over the active requests'
    prefix contexts from the edited layer on and one backward, i.e. one :meth:`TargetProblem.loss` and its
    gradient. While installed it counts, per edit call and per problem (a batch is optimised in chunks), the prompts
    each step ran (requests that reached their target leave the forward); :meth:`floor_s` then times bare
    loss+gradient evaluations of each problem outside the timed region and prices its counted prompt-steps with
    them."""

    def __init__(self) -> None:
        from eac_lightning.methods.target import TargetProblem

        self.cls, self.original = TargetProblem, TargetProblem.loss
        self.counted: list[list] = []  # [problem, prompt-steps]
        meter = self

        def counted(problem, delta):
            entry = next((e for e in meter.counted if e[0] is problem), None)
            if entry is None:
                entry = [problem, 0]
                meter.counted.append(entry)
            entry[1] += len(problem._active_texts)
            return meter.original(problem, delta)

        TargetProblem.loss = counted

    def close(self) -> None:
        self.cls.loss = self.original

    def reset(self) -> None:
        self.counted = []

    def floor_s(self, reps: int = 3) -> float | None:
        """Seconds the counted steps cost, each problem's at the median speed of its own bare full step."""
        if not self.counted:
            return None
        total = 0.0
        for problem, prompt_steps in self.counted:
            problem.thaw()
            times = []
            for _ in range(reps):
                delta = torch.zeros_like(problem.v0, requires_grad=True)
                t0 = time.perf_counter()
                loss = self.original(problem, delta)[0]  # (loss, NLL rows, total rows)
                torch.autograd.grad(loss, delta)
                times.append(time.perf_counter() - t0)
            total += prompt_steps * statistics.median(times) / len(problem.owner)
        return total


def bench_method(spec: str, model, tok, stats, requests, edits: int, repeats: int, batch_size: int) -> dict:
    """Time ``spec`` ("preset" or "preset@batch_size") over ``repeats`` runs of ``edits`` edits."""
    from eac_lightning.editor import method_from_preset
    from eac_lightning.methods.base import restore_weights, snapshot

    name, _, batch = spec.partition("@")
    batch_size = int(batch) if batch else batch_size
    method = method_from_preset(name)
    t0 = time.perf_counter()
    method.setup(model, tok, stats)  # templates and statistics: once per run of a real job, not per edit
    setup_s = time.perf_counter() - t0
    saved = snapshot(model, method.module_names)
    state = method.state_dict()
    per_edit, per_edit_cpu, per_write, floors = [], [], [], []
    meter = FloorMeter()
    try:
        for _ in range(repeats):
            restore_weights(model, saved)
            method.load_state_dict(state)
            for start in range(0, edits, batch_size):
                batch = requests[start:start + batch_size]
                meter.reset()
                t0, c0 = time.perf_counter(), time.process_time()
                targets = method.compute_targets(model, tok, batch)
                t1 = time.perf_counter()
                method.write(model, tok, targets)
                t2, c2 = time.perf_counter(), time.process_time()
                per_edit.append((t2 - t0) / len(batch))
                per_edit_cpu.append((c2 - c0) / len(batch))
                per_write.append((t2 - t1) / len(batch))
                floor = meter.floor_s()
                if floor is not None:
                    floors.append(floor / len(batch))
    finally:
        meter.close()
    restore_weights(model, saved)
    median = statistics.median(per_edit)
    floor = statistics.median(floors) if floors else None
    return {
        "method": spec,
        "class": type(method).__name__,
        "batch_size": batch_size,
        "layers": method.module_names,
        "steps": int(method.target.num_steps),
        "setup_s": setup_s,
        "median_s_per_edit": median,
        "median_cpu_s_per_edit": statistics.median(per_edit_cpu),
        "mean_cpu_s_per_edit": statistics.fmean(per_edit_cpu),  # equal batches: total CPU / edits
        "min_s_per_edit": min(per_edit),
        "max_s_per_edit": max(per_edit),
        "median_write_s_per_edit": statistics.median(per_write),
        "median_floor_s_per_edit": floor,
        "ratio_to_floor": median / floor if floor else None,
        "timings_s_per_edit": per_edit,
        "cpu_s_per_edit": per_edit_cpu,
        "floor_s_per_edit": floors,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | batch | median s/edit | CPU s/edit | mean CPU s/edit | min | max | of which write | floor s/edit "
        "| × floor | steps | edited modules |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        floor = "–" if r["median_floor_s_per_edit"] is None else f"{r['median_floor_s_per_edit']:.3f}"
        ratio = "–" if r["ratio_to_floor"] is None else f"{r['ratio_to_floor']:.2f}"
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['median_s_per_edit']:.3f} | {r['median_cpu_s_per_edit']:.3f} "
            f"| {r['mean_cpu_s_per_edit']:.3f} | {r['min_s_per_edit']:.3f} | {r['max_s_per_edit']:.3f} | {r['median_write_s_per_edit']:.3f} "
            f"| {floor} | {ratio} | {r['steps']} | {len(r['layers'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed:tiny", help="testbed:<preset>, a local HF folder or a hub id")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated presets of configs/methods, each optionally @batch_size (memit@10)")
    parser.add_argument("--edits", type=int, default=5, help="requests edited per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method (the same edits each time)")
    parser.add_argument("--batch-size", type=int, default=1, help="requests per edit call (where @ gives none)")
    parser.add_argument("--requests", default="counterfact", help="edit requests (file, folder or hub dataset)")
    parser.add_argument("--stats-tokens", type=int, default=20_000, help="tokens of the key covariance (cached)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/edit_speed-<model>.json)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from eac_lightning.data.sources import load_requests
    from eac_lightning.models.adapters import mlp_out_name
    from eac_lightning.models.loading import default_layers, load_model
    from eac_lightning.stats.covariance import CovarianceStore

    info = machine()
    model, tok = load_model(args.model)
    requests = load_requests(args.requests, limit=args.edits)
    if len(requests) < args.edits:
        raise SystemExit(f"{args.requests} holds only {len(requests)} requests, {args.edits} asked for")
    stats = CovarianceStore(model, tok, num_tokens=args.stats_tokens)
    layers = default_layers(model)
    t0 = time.perf_counter()
    stats.prefetch(sorted({mlp_out_name(model, l) for l in (layers.rome, *layers.memit)}))
    stats_s = time.perf_counter() - t0

    rows = []
    for name in args.methods.split(","):
        rows.append(bench_method(name.strip(), model, tok, stats, requests, args.edits, args.repeats, args.batch_size))
        print(f"{name}: {rows[-1]['median_s_per_edit']:.3f} s/edit", file=sys.stderr)

    n_params = sum(p.numel() for p in model.parameters())
    header = (f"Model `{args.model}` ({n_params / 1e6:.1f}M parameters), {args.edits} CounterFact edits x "
              f"{args.repeats} runs, batch size {args.batch_size}; {info['cpu']}, {info['cpu_count']} cores, "
              f"{info['torch_threads']} torch thread(s), torch {info['torch']}.")
    table = markdown(rows)
    print(header + "\n\n" + table)
    result = {
        "command": "python benchmarks/edit_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model,
        "n_parameters": n_params,
        "edits": args.edits,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "stats_tokens": args.stats_tokens,
        "stats_s": stats_s,
        "default_layers": {"rome": layers.rome, "memit": list(layers.memit), "source": layers.source},
        "machine": info,
        "results": rows,
        "markdown": table,
    }
    out = Path(args.out) if args.out else RESULTS / f"edit_speed-{args.model.replace(':', '-').replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
