"""Batch-sequential CounterFact on the offline testbed: MEMIT, MEMIT-EAC, AlphaEdit, B-EAC and its ablations.

For each schedule (e.g. ``10x50``: 10 batches of 50 edits, one after another on the same model) and each method,
a fresh copy of the testbed is edited batch after batch with the method's preset (configs/methods/<name>.yaml);
then every edit so far is evaluated on the final model (EAC App. C.3): reliability, generalisation, locality
(EasyEdit's token accuracies, :func:`eac_lightning.evaluation.evaluate_edit_metrics`), and general ability:

* fact retention: teacher-forced accuracy of the original object of ZsRE facts that were never edited
  (:func:`eac_lightning.evaluation.fact_retention`), relative to the unedited model;
* WikiText-2 perplexity (:func:`eac_lightning.evaluation.wikitext2_ppl`), as unedited / edited;
* general-ability retention = the mean of those two ratios;

and, after every batch, the L1 norm growth of the edited matrices, Σ_l ‖W_l − W_l⁰‖₁ / Σ_l ‖W_l⁰‖₁, and the
anchor collisions (the most edits of a batch sharing one (layer, dimension) anchor).

Results go to a JSON file (rewritten after every run; ``--resume`` skips runs already in it) and plots to
docs/img/ (``--img-dir``). A run over both schedules (docs/beac.md § 5 gives the command of every published table)::

    nice python benchmarks/beac_batches.py --model testbed:small --schedules 10x50 20x25 --tag small

Every method gets the same z optimisation and prefix contexts (``--context`` overrides the presets' contexts for
all methods alike, to fit a CPU budget). ``--order-seed N`` edits the same requests in another order (other
batches); ``--seed-table`` prints the spread of one results file per order (docs/beac.md § 5.1); ``--pairs``
edits two corrections about each subject (docs/beac.md § 5.4).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from beac_tables import seed_table, table  # a results file's tables (benchmarks/beac_tables.py, no torch)

from eac_lightning.data.requests import EditRequest, validate_requests
from eac_lightning.data.sources import iter_records, load_requests
from eac_lightning.editor import method_from_preset
from eac_lightning.evaluation import (
    compute_locality_reference,
    evaluate_edit_metrics,
    fact_retention,
    wikitext2_ppl,
)
from eac_lightning.lightning.callbacks import matrix_norms
from eac_lightning.methods.beac import LayeredTarget
from eac_lightning.methods.edit import optimise_targets, write_targets
from eac_lightning.models.adapters import weight_view
from eac_lightning.models.loading import load_model
from eac_lightning.stats.covariance import CovarianceStore

REPO = Path(__file__).resolve().parents[1]

METHODS = {
    "MEMIT": "memit",
    "MEMIT-EAC": "memit-eac",
    "AlphaEdit": "alphaedit",
    "AlphaEdit-EAC": "alphaedit-eac",
    # B-EAC (the preset, over AlphaEdit's solve) and its ablations (docs/beac.md § 5.2-5.3). Older results files
    # (beac_small-e20-*.json) name the B-EAC over MEMIT's solve "B-EAC" and this one "B-EAC (AlphaEdit)"
    "B-EAC": "beac",
    "B-EAC w/o refresh": "beac beac.refresh=0",
    "B-EAC w/o LAS": "beac-no-las",
    "B-EAC w/o RAR": "beac-no-rar",
    "B-EAC (MEMIT)": "beac-memit",
    "B-EAC (MEMIT) w/o LAS": "beac-memit-no-las",
    "B-EAC (MEMIT) w/o RAR": "beac-memit-no-rar",
    # LAS's per-layer anchors without its overlap bound (a bound no cell reaches: each edit takes its top-k;
    # docs/beac.md § 5.6).
    "B-EAC (MEMIT) w/o overlap bound": "beac-memit beac.max_overlap=1000000",
    # UltraEdit with its testbed settings (configs/testbed/ultraedit.yaml); the --set values it does not take are
    # left out (it has no z, λ or clamp)
    "UltraEdit": "ultraedit layers=[2,3] value_step_size=1e-3",
}


def second_corrections(edits: list[EditRequest], size: int, data: str) -> list[EditRequest]:
    """Two corrections about each subject in every batch (docs/beac.md § 5.4): the first half of ``edits`` keeps its
    own records; each of them gets a second request about the same subject made from a record of the second half
    with another relation (CounterFact's relation_id): its prompt, new object, paraphrases with the subject swapped
    in, and neighbourhood prompts. Each batch of ``size`` holds size/2 subjects with both of their corrections."""
    relation = {(src, row): (rec.get("requested_rewrite") or {}).get("relation_id")
                for src, row, rec in iter_records(data)}
    half = len(edits) // 2
    firsts, donors = edits[:half], list(edits[half:])
    seconds = []
    for a in firsts:
        rel = relation[(a.source, a.source_index)]
        b = next(d for d in donors if relation[(d.source, d.source_index)] != rel)
        donors.remove(b)
        seconds.append(EditRequest(
            prompt=b.prompt, subject=a.subject, target_new=b.target_new,
            paraphrase_prompts=[q.replace(b.subject, a.subject) for q in b.paraphrase_prompts if b.subject in q],
            neighborhood_prompts=list(b.neighborhood_prompts), neighborhood_answers=list(b.neighborhood_answers),
            case_id=f"{a.case_id}+{b.case_id}", source=b.source, source_index=b.source_index,
        ))
    g = size // 2
    return [r for i in range(0, half, g) for r in firsts[i:i + g] + seconds[i:i + g]]


def parse_schedule(s: str) -> tuple[int, int]:
    n_batches, size = s.lower().split("x")
    return int(n_batches), int(size)


def l1_growth(model, base) -> float:
    """Σ‖W − W⁰‖₁ / Σ‖W⁰‖₁ over the edited modules."""
    norms = [matrix_norms(weight_view(model, n).detach(), w0, condition=False) for n, w0 in base.items()]
    return sum(n["l1_dist"] for n in norms) / sum(n["l1_before"] for n in norms)


def overlay(method, settings: list[str]) -> dict:
    """``model.method`` overlay (for :func:`method_from_preset`) of ``ATTR=VALUE`` settings (dotted for nested
    ones: ``target.clamp_norm_factor=4``), keeping those the method takes: one ``--set`` applies to every method
    alike (``mom2_update_weight`` is MEMIT's and B-EAC's, not AlphaEdit's)."""
    init_args: dict = {}
    accepted = inspect.signature(type(method)).parameters
    for item in settings:
        key, value = item.split("=", 1)
        *path, attr = key.split(".")
        if (path[0] if path else attr) not in accepted:
            continue
        obj = method
        for part in path:
            obj = getattr(obj, part, None)
        if obj is None or not hasattr(obj, attr):
            continue
        node = init_args
        for part in path:
            node = node.setdefault(part, {})
        node[attr] = yaml.safe_load(value)  # numbers, null, true/false
    return {"init_args": init_args}


def collisions(targets, n: int) -> int:
    """The most edits of the batch (``n``) that share one anchor dimension (per layer for B-EAC's plans)."""
    if not isinstance(targets, list):
        return n  # no per-edit targets (UltraEdit's features): every edit writes every dimension
    if targets and isinstance(targets[0], LayeredTarget) and targets[0].layer_masks is not None:
        return int(torch.stack([t.layer_masks for t in targets]).sum(0).max())
    masks = [getattr(t, "anchors", None) for t in targets]
    if not masks or masks[0] is None:
        return n  # unmasked z: every edit writes every dimension
    return int(torch.stack(masks).sum(0).max())


def general_ability(model, tok, probes, ppl_tokens) -> dict[str, float]:
    return {
        "fact_retention": fact_retention(model, tok, probes),
        "wikitext2_ppl": wikitext2_ppl(model, tok, max_tokens=ppl_tokens),
    }


def run_one(name, preset, base_model, tok, stats, edits, n_batches, size, reference, probes, base_ga, args):
    model = copy.deepcopy(base_model)
    preset, *own_sets = preset.split()
    # The method's own settings, then e.g. mom2_update_weight=2000 or target.clamp_norm_factor=4 for every method
    # alike, then --context.
    settings = own_sets + (args.set or [])
    if args.context is not None:
        settings.append(f"context.length_count={[list(args.context)]}")
    method = method_from_preset(preset, overlay(method_from_preset(preset), settings))
    method.setup(model, tok, stats)
    w0 = {n: weight_view(model, n).detach().clone() for n in method.module_names}
    trace = []
    t_start = time.time()
    for b in range(n_batches):
        batch = edits[b * size:(b + 1) * size]
        t0 = time.time()
        targets = optimise_targets(method, model, tok, batch)
        write_targets(method, model, tok, targets)
        trace.append({
            "batch": b + 1, "edits": (b + 1) * size, "seconds": round(time.time() - t0, 2),
            "l1_growth": l1_growth(model, w0), "collisions": collisions(targets.targets, len(batch)),
        })
        print(f"  [{name} {n_batches}x{size}] batch {b + 1}/{n_batches}: {trace[-1]}", flush=True)
    edit_seconds = time.time() - t_start
    done = edits[: n_batches * size]
    metrics = evaluate_edit_metrics(model, tok, done, reference, batch_size=args.eval_batch_size)
    ga = general_ability(model, tok, probes, args.ppl_tokens)
    retention = 0.5 * (ga["fact_retention"] / base_ga["fact_retention"] + base_ga["wikitext2_ppl"] / ga["wikitext2_ppl"])
    head = {k: metrics[k] for k in ("reliability", "generalization", "locality")}
    out = {
        **head,
        "general_ability_retention": retention,
        "mean4": (head["reliability"] + head["generalization"] + head["locality"] + retention) / 4,
        **ga,
        "l1_growth": trace[-1]["l1_growth"],
        "edit_seconds": round(edit_seconds, 1),
        "metrics": metrics,
        "trace": trace,
    }
    if hasattr(method, "history"):
        out["beac_history"] = method.history
    return out


def _legend(axes, fontsize: int) -> None:
    """One legend of every method of every panel, outside the last panel (the curves and bars stay visible)."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[-1].legend(handles.values(), handles.keys(), fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1))


def plot(results, base, img_dir: Path, tag: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    schedules = sorted(results, key=lambda s: parse_schedule(s)[1], reverse=True)
    names = list(dict.fromkeys(name for sched in schedules for name in results[sched]))
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    color = {name: palette(i % palette.N) for i, name in enumerate(names)}  # one colour per method, both plots
    written = []

    def save(fig, axes, legend_size: int, name: str) -> None:
        _legend(axes[0], fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(img_dir / name, dpi=120)
        plt.close(fig)
        written.append(str(img_dir / name))

    # Norm growth per batch.
    fig, axes = plt.subplots(1, len(schedules), figsize=(5.2 * len(schedules) + 2.6, 3.8), squeeze=False)
    for ax, sched in zip(axes[0], schedules):
        for name, res in results[sched].items():
            xs = [t["edits"] for t in res["trace"]]
            ax.plot(xs, [t["l1_growth"] for t in res["trace"]], marker="o", ms=3, label=name, color=color[name])
        ax.set_title(f"{sched} (batches x edits)")
        ax.set_xlabel("edits so far")
        ax.set_ylabel("L1 growth  Σ‖W−W⁰‖₁ / Σ‖W⁰‖₁")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    save(fig, axes, 8, f"beac_norm_growth_{tag}.png")
    # Final metrics.
    keys = ["reliability", "generalization", "locality", "general_ability_retention", "mean4"]
    labels = ["reliability", "generalisation", "locality", "GA retention", "mean of 4"]
    fig, axes = plt.subplots(1, len(schedules), figsize=(6.5 * len(schedules) + 2.6, 4.0), squeeze=False)
    for ax, sched in zip(axes[0], schedules):
        names = list(results[sched])
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            vals = [results[sched][name][k] for k in keys]
            ax.bar([x + i * width for x in range(len(keys))], vals, width, label=name, color=color[name])
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{sched}: after all edits")
        ax.grid(axis="y", alpha=0.3)
    save(fig, axes, 7, f"beac_metrics_{tag}.png")
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="testbed:small when built, else testbed:tiny")
    ap.add_argument("--schedules", nargs="+", default=["10x50", "20x25"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--data", default="counterfact")
    ap.add_argument("--order-seed", type=int, default=0,
                    help="shuffle the edits with this seed before batching (0: file order)")
    ap.add_argument("--pairs", choices=["batch"], default=None,
                    help="two corrections about each subject in every batch (docs/beac.md § 5.4)")
    ap.add_argument("--probes", default="zsre", help="facts never edited, for fact retention")
    ap.add_argument("--n-probes", type=int, default=300)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--stats-tokens", type=int, default=100_000)
    ap.add_argument("--context", type=int, nargs=2, default=None, metavar=("LENGTH", "COUNT"),
                    help="prefix contexts [[LENGTH, COUNT]] for every method (presets: [[5,10],[10,10]])")
    ap.add_argument("--set", nargs="*", default=None, metavar="ATTR=VALUE",
                    help="override a method attribute for every method that has it (e.g. mom2_update_weight=2000)")
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/beac_<tag>.json)")
    ap.add_argument("--img-dir", default=str(REPO / "docs" / "img"))
    ap.add_argument("--resume", action="store_true", help="skip runs already in the results JSON")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only merge these results files (e.g. one per schedule, run in parallel) into --out, "
                         "print the table and plot")
    ap.add_argument("--rename", nargs="+", default=[], metavar="OLD=NEW",
                    help="with --merge: rename these methods of the merged files (a preset whose meaning changed, "
                         "e.g. \"B-EAC=B-EAC (MEMIT)\" for a file that names the MEMIT-based B-EAC \"B-EAC\")")
    ap.add_argument("--seed-table", nargs="+", default=None, metavar="JSON",
                    help="only print the spread over order seeds of these results files (one per --order-seed)")
    args = ap.parse_args(argv)
    if args.seed_table:
        print(seed_table(args.seed_table))
        return
    if args.merge:
        merged: dict = {"meta": [], "unedited": None, "results": {}}
        renames = dict(item.split("=", 1) for item in args.rename)
        for f in args.merge:
            part = json.loads(Path(f).read_text())
            merged["meta"].extend(part["meta"] if isinstance(part["meta"], list) else [part["meta"]])
            merged["unedited"] = merged["unedited"] or part["unedited"]
            for sched, runs in part["results"].items():
                merged["results"].setdefault(sched, {}).update({renames.get(m, m): r for m, r in runs.items()})
        tag = args.tag or "merged"
        out = Path(args.out or REPO / "benchmarks" / "results" / f"beac_{tag}.json")
        out.write_text(json.dumps(merged, indent=1))
        print(table(merged["results"]))
        print("plots:", plot(merged["results"], merged["unedited"], Path(args.img_dir), tag))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from eac_lightning.testbed.build import testbed_dir

        args.model = "testbed:small" if (testbed_dir("small") / "testbed.json").exists() else "testbed:tiny"
    tag = args.tag or args.model.split(":")[-1].replace("/", "_")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"beac_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = json.loads(out.read_text()) if (args.resume and out.exists()) else {}
    results = state.get("results", {})

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    stats = CovarianceStore(model, tok, num_tokens=args.stats_tokens)
    need = max(n * s for n, s in map(parse_schedule, args.schedules))
    edits = validate_requests(load_requests(args.data, limit=need), tok)
    if len(edits) < need:
        raise SystemExit(f"{args.data} has {len(edits)} requests; the schedules need {need}")
    if args.order_seed:  # the same edits in another order: other batches, for a spread over seeds
        order = torch.randperm(len(edits), generator=torch.Generator().manual_seed(args.order_seed)).tolist()
        edits = [edits[i] for i in order]
    if args.pairs:
        sizes = {parse_schedule(x)[1] for x in args.schedules}
        if len(sizes) != 1:
            raise SystemExit("--pairs builds the batches for one batch size: give schedules of one size")
        edits = validate_requests(second_corrections(edits, sizes.pop(), args.data), tok)
    probes = load_requests(args.probes, limit=args.n_probes)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters())} parameters; {len(edits)} edits; "
          f"{len(probes)} probe facts", flush=True)
    t0 = time.time()
    reference = compute_locality_reference(model, tok, edits, batch_size=args.eval_batch_size)
    base = state.get("unedited") or {
        **general_ability(model, tok, probes, args.ppl_tokens),
        **{k: v for k, v in evaluate_edit_metrics(model, tok, edits, reference, batch_size=args.eval_batch_size).items()
           if k in ("reliability", "generalization", "locality")},
    }
    print(f"unedited: {base} ({time.time() - t0:.0f}s)", flush=True)
    meta = {"model": args.model, "data": args.data, "order_seed": args.order_seed, "pairs": args.pairs,
            "probes": args.probes,
            "n_probes": len(probes), "ppl_tokens": args.ppl_tokens, "stats_tokens": args.stats_tokens, "context": args.context,
            "torch_threads": torch.get_num_threads(), "set": args.set, "command": " ".join(sys.argv)}

    for sched in args.schedules:
        n_batches, size = parse_schedule(sched)
        for name in args.methods:
            if name in results.get(sched, {}):
                continue
            print(f"{name} on {sched}", flush=True)
            res = run_one(name, METHODS[name], model, tok, stats, edits, n_batches, size, reference, probes, base, args)
            print(f"  -> rel {res['reliability']:.3f} gen {res['generalization']:.3f} loc {res['locality']:.3f} "
                  f"GA {res['general_ability_retention']:.3f} mean4 {res['mean4']:.3f} L1 {res['l1_growth']:.4f} "
                  f"({res['edit_seconds']:.0f}s)", flush=True)
            results.setdefault(sched, {})[name] = res
            tmp = out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"meta": meta, "unedited": base, "results": results}, indent=1))
            os.replace(tmp, out)
    print(table(results))
    print("plots:", plot(results, base, Path(args.img_dir), tag))


if __name__ == "__main__":
    main()
