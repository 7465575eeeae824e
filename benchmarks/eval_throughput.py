"""Evaluation throughput: batched scoring/generation against one example at a time.

EasyEdit and the EAC code evaluate one example per forward pass: EasyEdit's ``test_prediction_acc`` tokenises a
prompt with its target, runs the model on that one sequence, takes the argmax over the full logits and slices the
target positions; generation-based checks call ``model.generate`` per prompt. This benchmark times three ways of
computing the same numbers on the same inputs:

* **one-at-a-time loop** — a re-implementation of that structure (one sequence per forward pass, full logits,
  ``model.generate`` per prompt, each (prompt, target) pair of a request computed once, as ROME does), written
  independently of the project's batched code, so the comparison is also a correctness check;
* **project, batch 1** — the project's functions with ``batch_size=1``;
* **batched** — the project's functions with ``--batch-size`` (left padding, length-sorted batches, identical
  pairs scored once across requests, only target-position logits, newline stop for generated answers).

It reports the median wall time of ``--runs`` runs (after a warm-up run), the speed-ups and the largest absolute
difference between the loop's and the batched results (metric values, token ids, per-example scores).

Workloads:

* ``edit metrics`` — reliability / generalization / locality (EAC Eqs. 10-12), their exact-greedy variants and
  ROME's scores over ``--requests`` CounterFact requests, against a pre-edit reference;
* ``locality reference`` — the pre-edit argmax tokens and greedy continuation of every neighbourhood prompt;
* ``sst2 (logits)`` — the SST-2 task, both answer words scored per example;
* ``nq_open (greedy 16)`` — the NQ-open task, greedy generation of up to 16 tokens.

Usage::

    python benchmarks/eval_throughput.py                       # testbed:tiny (built on first use)
    python benchmarks/eval_throughput.py --model /path/to/hf_model --requests 100 --runs 5
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch


def load(name: str) -> tuple[torch.nn.Module, Any]:
    """Model and tokenizer: ``eac_lightning.models.loading.load_model`` when present (``testbed:tiny`` etc.),
    otherwise a local Hugging Face folder through the Auto classes."""
    try:
        from eac_lightning.models.loading import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        return load_model(name)
    if name.startswith("testbed:"):
        sys.exit("testbed models need eac_lightning.models.loading; pass --model /path/to/hf_model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name).eval()
    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


# ---------------------------------------------------------------------------------------------------------------
# The one-at-a-time loop (EasyEdit's structure)
# ---------------------------------------------------------------------------------------------------------------


class OneAtATime:
    """One sequence per forward pass, full logits, ``model.generate`` per prompt."""

    def __init__(self, model: torch.nn.Module, tok: Any) -> None:
        self.model, self.tok = model, tok
        self.device = next(model.parameters()).device
        from eac_lightning.evaluation.scoring import model_max_length

        self.max_len = model_max_length(model)

    def target_ids(self, target: str) -> list[int]:
        return self.tok(" " + target.strip(), add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def score(self, prompt: str, target: str | list[int]) -> tuple[list[int], list[int], list[float]]:
        """(argmax at the target positions, target ids, target token log-probs) of one prompt."""
        t = self.target_ids(target) if isinstance(target, str) else list(target)
        p = self.tok(prompt)["input_ids"]
        row = (p + t[:-1])[-self.max_len:]  # the last target token's own logits are never read
        ids = torch.tensor([row], device=self.device)
        logits = self.model(input_ids=ids).logits[0]  # full logits, as EasyEdit
        span = logits[len(row) - len(t):].float()
        pred = span.argmax(-1).cpu().numpy().tolist()
        logp = torch.log_softmax(span, -1)[torch.arange(len(t)), torch.tensor(t)].cpu().tolist()
        return pred, t, logp

    @torch.no_grad()
    def generate(self, prompt: str, n: int, stop_at_eos: bool) -> list[int]:
        from transformers import GenerationConfig

        ids = self.tok(prompt, return_tensors="pt").to(self.device)
        ids = {k: v[:, -max(1, self.max_len - n):] for k, v in ids.items()}
        cfg = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=self.tok.pad_token_id,
                               eos_token_id=self.tok.eos_token_id if stop_at_eos else None)
        out = self.model.generate(**ids, generation_config=cfg)
        return out[0, ids["input_ids"].shape[1]:].tolist()

    def reference(self, requests: list[Any]) -> dict[str, Any]:
        from eac_lightning.evaluation.edit_metrics import REFERENCE_FORMAT, locality_key

        argmax, greedy = {}, {}
        for r in requests:
            for p, a in r.neighborhood_pairs():
                key = locality_key(p, a)
                if key in argmax:
                    continue
                pred, t, _ = self.score(p, a)
                argmax[key] = pred
                greedy[key] = self.generate(p, len(t), stop_at_eos=False)
        return {"format": REFERENCE_FORMAT, "argmax": argmax, "greedy": greedy}

    def edit_metrics(self, requests: list[Any], reference: dict[str, Any]) -> dict[str, float]:
        """The same quantities as ``evaluate_edit_metrics``, from per-prompt forward passes."""
        from eac_lightning.evaluation.edit_metrics import is_counterfact, locality_key

        acc: dict[str, list[float]] = {k: [] for k in ("reliability", "generalization", "locality",
                                                       "reliability_gen", "generalization_gen", "locality_gen")}
        rome: dict[str, list[tuple[float, float]]] = {"rome_efficacy": [], "rome_paraphrase": [],
                                                      "rome_neighborhood": []}

        def mlp(s: tuple[list[int], list[int], list[float]]) -> float:
            return sum(s[2]) / len(s[2])

        for r in requests:
            cache: dict[tuple[str, Any], Any] = {}  # each (prompt, target) pair of a request once, as ROME

            def sc(p: str, t: str | list[int]) -> Any:
                key = (p, tuple(t) if isinstance(t, list) else t)
                if key not in cache:
                    cache[key] = self.score(p, t)
                return cache[key]

            cf = is_counterfact(r)
            for kind, prompts in (("reliability", [r.prompt_text]), ("generalization", r.paraphrase_prompts)):
                for p in prompts:
                    pred, t, _ = sc(p, r.target_new)
                    acc[kind].append(sum(a == b for a, b in zip(pred, t)) / len(t))
                    acc[kind + "_gen"].append(float(pred == t))
                    if cf:
                        rk = "rome_efficacy" if kind == "reliability" else "rome_paraphrase"
                        rome[rk].append((mlp(sc(p, r.target_new)), mlp(sc(p, r.target_true))))
            for p, a in r.neighborhood_pairs():
                key = locality_key(p, a)
                pred, _, _ = sc(p, a)
                ref = reference["argmax"][key]
                acc["locality"].append(sum(x == y for x, y in zip(pred, ref)) / len(ref))
                g = reference["greedy"][key]
                acc["locality_gen"].append(float(sc(p, list(g))[0] == g))
                if cf:
                    rome["rome_neighborhood"].append((mlp(sc(p, r.target_true)), mlp(sc(p, r.target_new))))
        out = {k: (sum(v) / len(v) if v else math.nan) for k, v in acc.items()}
        for k, pairs in rome.items():
            out[f"{k}_score"] = sum(a > b for a, b in pairs) / len(pairs) if pairs else math.nan
            out[f"{k}_magnitude"] = sum(math.exp(a) - math.exp(b) for a, b in pairs) / len(pairs) if pairs else math.nan
        return out

    def sst2(self, examples: list[Any]) -> list[float]:
        out = []
        for ex in examples:
            lp = [sum(self.score(ex.prompt, c)[2]) for c in ex.choices]
            out.append(float(ex.choices[max(range(len(lp)), key=lambda j: lp[j])] == ex.answers[0]))
        return out

    def nq_open(self, examples: list[Any], n: int) -> list[float]:
        from eac_lightning.evaluation.tasks import exact_match, first_line

        return [exact_match(first_line(self.tok.decode(self.generate(ex.prompt, n, True), skip_special_tokens=True)),
                            ex.answers) for ex in examples]


# ---------------------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float, Any]:
    """Median wall seconds and median CPU seconds of this process over ``runs`` calls (after one untimed warm-up
    call), and the last result. With one torch thread the CPU time is the work done, whatever else the machine
    runs; wall time also counts waiting for a core."""
    result = fn()
    walls, cpus = [], []
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result


def max_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two results (nested dicts/lists of numbers or token ids)."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return math.inf
        return max((max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return math.inf
        return max((max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, str):
        return 0.0 if a == b else math.inf
    if isinstance(a, float) and math.isnan(a):
        return 0.0 if isinstance(b, float) and math.isnan(b) else math.inf
    return abs(float(a) - float(b))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed:tiny", help="testbed:<preset>, a local HF folder or a hub id")
    parser.add_argument("--data", default="counterfact", help="edit requests (file, folder or hub name)")
    parser.add_argument("--requests", type=int, default=50, help="CounterFact requests for the edit metrics")
    parser.add_argument("--task-limit", type=int, default=32, help="examples per general task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per setting (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-batch1", action="store_true", help="do not time the project's code at batch 1")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    from eac_lightning.data.sources import load_requests
    from eac_lightning.evaluation.edit_metrics import (
        compute_locality_reference,
        evaluate_edit_metrics,
    )
    from eac_lightning.evaluation.tasks import example_scores, load_task

    model, tok = load(args.model)
    model = model.to(args.device).eval()
    loop = OneAtATime(model, tok)
    reqs = load_requests(args.data, limit=args.requests)
    ref = compute_locality_reference(model, tok, reqs, args.batch_size)
    sst2 = load_task("sst2", limit=args.task_limit)
    nq = load_task("nq_open", limit=args.task_limit)
    n_prompts = sum(1 + len(r.paraphrase_prompts) + len(r.neighborhood_prompts) for r in reqs)
    n_neigh = sum(len(r.neighborhood_prompts) for r in reqs)

    workloads: list[tuple[str, str, Callable[[], Any], Callable[[int], Any]]] = [
        ("edit metrics", f"{len(reqs)} requests, {n_prompts} prompts",
         lambda: loop.edit_metrics(reqs, ref),
         lambda bs: evaluate_edit_metrics(model, tok, reqs, ref, batch_size=bs)),
        ("locality reference", f"{n_neigh} prompts",
         lambda: loop.reference(reqs),
         lambda bs: compute_locality_reference(model, tok, reqs, batch_size=bs)),
        ("sst2 (logits)", f"{len(sst2)} examples",
         lambda: loop.sst2(sst2),
         lambda bs: example_scores("sst2", model, tok, sst2, bs)),
        ("nq_open (greedy 16)", f"{len(nq)} examples",
         lambda: loop.nq_open(nq, 16),
         lambda bs: example_scores("nq_open", model, tok, nq, bs, max_new_tokens=16)),
    ]
    rows = []
    for name, size, base, ours in workloads:
        w_loop, c_loop, r_loop = timed(base, args.runs)
        w_one, c_one = (math.nan, math.nan) if args.skip_batch1 else timed(lambda: ours(1), args.runs)[:2]
        w_bat, c_bat, r_bat = timed(lambda: ours(args.batch_size), args.runs)
        rows.append((name, size, w_loop, w_one, w_bat, c_loop, c_one, c_bat, max_diff(r_loop, r_bat)))
        print(f"{name}: wall loop {w_loop:.3f}s / batch-1 {w_one:.3f}s / batched {w_bat:.3f}s (x{w_loop / w_bat:.1f}); "
              f"cpu {c_loop:.3f}s / {c_one:.3f}s / {c_bat:.3f}s (x{c_loop / c_bat:.1f})", file=sys.stderr)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model `{args.model}` ({n_params / 1e6:.2f}M parameters), device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.machine()}; batch size {args.batch_size}; "
          f"median of {args.runs} runs after a warm-up; wall / CPU seconds of the process\n")
    print("| workload | size | one-at-a-time loop (s) | project, batch 1 (s) | batched (s) | speed-up vs loop "
          "| speed-up vs batch 1 | max abs diff (loop vs batched) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")

    def cell(w: float, c: float) -> str:
        return f"{w:.2f} / {c:.2f}"

    def ratio(a: tuple[float, float], b: tuple[float, float]) -> str:
        return f"{a[0] / b[0]:.1f}x / {a[1] / b[1]:.1f}x"

    for name, size, w_loop, w_one, w_bat, c_loop, c_one, c_bat, diff in rows:
        print(f"| {name} | {size} | {cell(w_loop, c_loop)} | {cell(w_one, c_one)} | {cell(w_bat, c_bat)} "
              f"| {ratio((w_loop, c_loop), (w_bat, c_bat))} | {ratio((w_one, c_one), (w_bat, c_bat))} | {diff:.1e} |")
    tot = [sum(r[i] for r in rows) for i in range(2, 8)]
    print(f"| **all** | | {cell(tot[0], tot[3])} | {cell(tot[1], tot[4])} | {cell(tot[2], tot[5])} "
          f"| **{ratio((tot[0], tot[3]), (tot[2], tot[5]))}** | {ratio((tot[1], tot[4]), (tot[2], tot[5]))} | |")

if __name__ == "__main__":
    main()
